// mha — multi-head attention on Eigen.
// Options of one attention call, the configuration of a module, and the library's error type.
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>

namespace mha {

/// The error thrown for bad shapes, options or configurations; its message names the argument and
/// the shapes involved. Checks run in every build type, not only with assertions enabled.
class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

/// Throws mha::invalid_argument with "mha: " followed by the streamed parts.
template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream message;
  message << "mha: ";
  (message << ... << parts);
  throw invalid_argument(message.str());
}

/// "R x C", the shape of a matrix as the error messages print it.
template <typename Derived>
std::string shape(const Eigen::EigenBase<Derived>& m) {
  return std::to_string(m.rows()) + " x " + std::to_string(m.cols());
}

/// \returns `x` itself when its coefficients can be read in place (a matrix, map or block, of either
/// storage order), else `x` evaluated once into a matrix, so that taking blocks of it is cheap.
template <typename Derived>
decltype(auto) evaluated(const Eigen::MatrixBase<Derived>& x) {
  if constexpr (bool(Derived::Flags & Eigen::DirectAccessBit))
    return x.derived();
  else
    return typename Derived::PlainObject(x);
}

}  // namespace detail

/// Options of one attention call.
struct AttentionOptions {
  /// Causal (decoder) attention, top-left aligned as PyTorch's `is_causal`: query row r attends
  /// only to key rows j <= r. When L > S the rows r >= S see every key.
  bool causal = false;
  /// The factor the scores Q_i K_iᵀ are multiplied by; unset means 1/√d_k.
  std::optional<double> scale;
};

/// The shape of a multi-head attention module. d_k = d_v = 0 mean d_model / num_heads, the choice
/// of "Attention Is All You Need" that makes h heads cost about what one full-width head costs.
struct MultiHeadAttentionConfig {
  Eigen::Index d_model = 512;  ///< width of the query, key and value rows and of the output
  Eigen::Index num_heads = 8;  ///< h, the number of heads
  Eigen::Index d_k = 0;        ///< width of each head's queries and keys; 0 means d_model / h
  Eigen::Index d_v = 0;        ///< width of each head's values and output; 0 means d_model / h
  std::uint64_t seed = 0;      ///< seed of the deterministic Xavier-uniform initialisation

  /// \returns this configuration with d_k and d_v resolved; throws mha::invalid_argument if it
  /// describes no valid module.
  MultiHeadAttentionConfig resolved() const {
    if (d_model <= 0) detail::fail("d_model must be positive, got d_model = ", d_model);
    if (num_heads <= 0) detail::fail("num_heads must be positive, got num_heads = ", num_heads);
    if (d_k < 0) detail::fail("d_k must be positive (or 0 for d_model / num_heads), got d_k = ", d_k);
    if (d_v < 0) detail::fail("d_v must be positive (or 0 for d_model / num_heads), got d_v = ", d_v);
    if ((d_k == 0 || d_v == 0) && d_model % num_heads != 0)
      detail::fail("d_model = ", d_model, " is not divisible by num_heads = ", num_heads,
                   "; set d_k and d_v explicitly or choose a divisor");
    MultiHeadAttentionConfig r = *this;
    if (r.d_k == 0) r.d_k = d_model / num_heads;
    if (r.d_v == 0) r.d_v = d_model / num_heads;
    return r;
  }
};

namespace detail {

/// The scale of the scores: options.scale if set, else 1/√d_k (1 when d_k = 0, where every score
/// is 0 anyway). Throws on a non-finite scale.
inline double resolve_scale(const AttentionOptions& options, Eigen::Index d_k) {
  if (options.scale) {
    if (!std::isfinite(*options.scale)) fail("options.scale must be finite, got ", *options.scale);
    return *options.scale;
  }
  return d_k > 0 ? 1.0 / std::sqrt(static_cast<double>(d_k)) : 1.0;
}

}  // namespace detail
}  // namespace mha
