// mha — rotary position embeddings (RoPE, Su et al. 2021): each head's query and key rows turned
// by angles proportional to their positions, so that their dot product depends only on the
// distance between the two positions.
#pragma once

#include <mha/config.hpp>

#include <Eigen/Core>

#include <cmath>
#include <type_traits>

namespace mha {

/// The rotation of rows by their positions, for heads of width d (d even), as
/// MultiHeadAttention applies it with config.rotary: the pair of coordinates (a, b) = (2i, 2i + 1)
/// (RotaryPairs::interleaved) or (i, i + d/2) (RotaryPairs::halves) of a row at position p turns
/// by p·θ_i, θ_i = base^(−2i/d):
///   a′ = a cos pθ_i − b sin pθ_i,   b′ = a sin pθ_i + b cos pθ_i.
/// The inverse rotation (by −pθ_i) is the rotation's transpose: what the backward pass applies to
/// the gradients of rotated rows.
class RotaryEmbedding {
 public:
  /// The rotation of heads of width `d` (even), with the given base and pairing.
  RotaryEmbedding(Eigen::Index d, double base = 10000.0, RotaryPairs pairs = RotaryPairs::interleaved)
      : d_(d), base_(base), pairs_(pairs) {
    if (d <= 0 || d % 2 != 0) detail::fail("RotaryEmbedding: the head width must be even and positive, got ", d);
    if (!(std::isfinite(base) && base > 0))
      detail::fail("RotaryEmbedding: base must be positive and finite, got ", base);
  }
  /// The rotation a module configured by `config` applies to its heads' queries and keys.
  explicit RotaryEmbedding(const MultiHeadAttentionConfig& config)
      : RotaryEmbedding(config.resolved().d_k, config.rotary_base, config.rotary_pairs) {}

  /// Turns every head (column block of width d) of the rows of `x` by their positions: row r is at
  /// position positions[r]. `x` is a writable matrix, map or block of either storage order.
  template <typename Rows>
  void rotate(Rows&& x, const Eigen::Index* positions) const {
    turn(x, positions, 1.0);
  }
  /// The inverse of rotate(): turns the rows back by the same angles.
  template <typename Rows>
  void rotate_back(Rows&& x, const Eigen::Index* positions) const {
    turn(x, positions, -1.0);
  }

 private:
  /// The two coordinates of pair i within a head.
  Eigen::Index first(Eigen::Index i) const { return pairs_ == RotaryPairs::interleaved ? 2 * i : i; }
  Eigen::Index second(Eigen::Index i) const { return pairs_ == RotaryPairs::interleaved ? 2 * i + 1 : i + d_ / 2; }

  /// x's numbers as a pointer and the steps between rows and between columns, so that the rotation
  /// below is compiled once per scalar type, not once per type of x.
  template <typename Rows>
  void turn(Rows& x, const Eigen::Index* positions, double direction) const {
    using X = std::decay_t<Rows>;
    static_assert(bool(X::Flags & Eigen::DirectAccessBit) && bool(X::Flags & Eigen::LvalueBit),
                  "mha::RotaryEmbedding: the rows to turn must be a writable matrix, map or block");
    const bool row_major = bool(X::Flags & Eigen::RowMajorBit);
    turn(x.data(), x.rows(), x.cols(), row_major ? x.outerStride() : x.innerStride(),
         row_major ? x.innerStride() : x.outerStride(), positions, direction);
  }

  template <typename Scalar>
  void turn(Scalar* x, Eigen::Index rows, Eigen::Index cols, Eigen::Index row_step, Eigen::Index col_step,
            const Eigen::Index* positions, double direction) const {
    if (rows == 0 || cols == 0) return;
    const Eigen::Index heads = cols / d_;
    for (Eigen::Index i = 0; i < d_ / 2; ++i) {
      // The angles in double, with std::cos and std::sin: a position gets the same rotation
      // wherever it is computed (a full forward pass, a decode step, a backward pass).
      const double theta = std::pow(base_, -2.0 * static_cast<double>(i) / static_cast<double>(d_));
      for (Eigen::Index r = 0; r < rows; ++r) {
        const double angle = static_cast<double>(positions[r]) * theta;
        const auto cos = static_cast<Scalar>(std::cos(angle));
        const auto sin = static_cast<Scalar>(direction * std::sin(angle));
        Scalar* row = x + r * row_step;
        for (Eigen::Index head = 0; head < heads; ++head) {
          Scalar& a = row[(head * d_ + first(i)) * col_step];
          Scalar& b = row[(head * d_ + second(i)) * col_step];
          const Scalar a0 = a;
          a = a0 * cos - b * sin;
          b = a0 * sin + b * cos;
        }
      }
    }
  }

  Eigen::Index d_;
  double base_;
  RotaryPairs pairs_;
};

}  // namespace mha
