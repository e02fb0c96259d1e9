// mha — rotary position embeddings (RoPE, Su et al. 2021): each head's query and key rows turned
// by angles proportional to their positions, so that their dot product depends only on the
// distance between the two positions.
#pragma once

#include <mha/config.hpp>

#include <Eigen/Core>

#include <cmath>
#include <type_traits>

namespace mha {
namespace detail {

/// The rotation of rows by their positions, for heads of width d (d even): the pair of coordinates
/// (a, b) = (2i, 2i + 1) or (i, i + d/2) of a row at position p turns by p·θ_i, θ_i = base^(−2i/d):
///   a′ = a cos pθ_i − b sin pθ_i,   b′ = a sin pθ_i + b cos pθ_i.
/// The inverse rotation (by −pθ_i) is the rotation's transpose: what the backward pass applies to
/// the gradients of rotated rows.
struct Rotary {
  double base;
  RotaryPairs pairs;
  Eigen::Index d;  ///< the width of one head

  /// The two coordinates of pair i within a head.
  Eigen::Index first(Eigen::Index i) const { return pairs == RotaryPairs::interleaved ? 2 * i : i; }
  Eigen::Index second(Eigen::Index i) const { return pairs == RotaryPairs::interleaved ? 2 * i + 1 : i + d / 2; }

  /// Rotates every head (column block of width d) of the rows of `x`; row r is at position
  /// positions[r]. With `inverse`, rotates by the opposite angles.
  template <typename Rows>
  void apply(Rows&& x, const Eigen::Index* positions, bool inverse = false) const {
    using Scalar = typename std::decay_t<Rows>::Scalar;
    using Column = Eigen::Array<Scalar, Eigen::Dynamic, 1>;
    const Eigen::Index rows = x.rows(), heads = x.cols() / d;
    Column cos(rows), sin(rows);
    for (Eigen::Index i = 0; i < d / 2; ++i) {
      // The angles in double, with std::cos and std::sin: a position gets the same rotation
      // wherever it is computed (a full forward pass, a decode step, a backward pass).
      const double theta = std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(d));
      for (Eigen::Index r = 0; r < rows; ++r) {
        const double angle = static_cast<double>(positions[r]) * theta;
        cos(r) = static_cast<Scalar>(std::cos(angle));
        sin(r) = static_cast<Scalar>(inverse ? -std::sin(angle) : std::sin(angle));
      }
      for (Eigen::Index head = 0; head < heads; ++head) {
        auto a = x.col(head * d + first(i)).array();
        auto b = x.col(head * d + second(i)).array();
        const Column a0 = a;
        a = a0 * cos - b * sin;
        b = a0 * sin + b * cos;
      }
    }
  }
};

}  // namespace detail
}  // namespace mha
