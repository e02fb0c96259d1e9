// mha — multi-head attention on Eigen.
// Options of one attention call, the configuration of a module, and the library's error type.
#pragma once

#include <mha/mask.hpp>

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

/// Which keys a causal query sees when there are not as many queries as keys.
enum class CausalAlignment {
  /// Query i sees keys j ≤ i: PyTorch's `is_causal` (`ones(L, S).tril()`).
  top_left,
  /// Query i sees keys j ≤ i + S − L: the last query sees every key. What a decoder needs when the
  /// queries are the newest L of S tokens (a key/value cache).
  bottom_right,
};

/// Options of one attention call.
struct AttentionOptions {
  /// Causal (decoder) attention: each query sees only the keys up to its own position, aligned as
  /// `alignment` says (top-left by default, as PyTorch's `is_causal`).
  bool causal = false;
  /// How causal queries line up with keys when L ≠ S.
  CausalAlignment alignment = CausalAlignment::top_left;
  /// The factor the scores Q_i K_iᵀ are multiplied by; unset means 1/√d_k.
  std::optional<double> scale;
  /// A mask over the scores, L × S or h·L × S (head i in row block i); combines with causal and
  /// key_padding_mask. See AttentionMask for its three conventions.
  AttentionMask mask;
  /// A mask over the keys, 1 × S (or B × S for a batch of B sequences of S keys each): PyTorch's
  /// key_padding_mask, made with AttentionMask::blocked (true = padding) or ::additive.
  AttentionMask key_padding_mask;
  /// Training mode: the attention weights are dropped out with the module's `dropout`
  /// probability. Inference (false) is the default and never drops anything.
  bool training = false;
  /// Seed of the dropout pattern, which depends only on (seed, sequence, head, query, key), not
  /// on threads or tiles: the same seed gives the same pattern.
  std::uint64_t dropout_seed = 0;
};

/// The shape of a multi-head attention module. d_k = d_v = 0 mean d_model / num_heads, the choice
/// of "Attention Is All You Need" that makes h heads cost about what one full-width head costs.
struct MultiHeadAttentionConfig {
  Eigen::Index d_model = 512;  ///< width of the query rows and of the output
  Eigen::Index num_heads = 8;  ///< h, the number of heads
  Eigen::Index d_k = 0;        ///< width of each head's queries and keys; 0 means d_model / h
  Eigen::Index d_v = 0;        ///< width of each head's values and output; 0 means d_model / h
  Eigen::Index kdim = 0;       ///< width of the key rows; 0 means d_model
  Eigen::Index vdim = 0;       ///< width of the value rows; 0 means d_model
  bool bias = false;           ///< biases b^Q, b^K, b^V on the projections and b^O on the output
  bool add_bias_kv = false;    ///< a learned key row and value row appended to every sequence
  bool add_zero_attn = false;  ///< a zero key row and value row appended (after add_bias_kv's)
  double dropout = 0.0;        ///< probability of dropping an attention weight in training mode
  std::uint64_t seed = 0;      ///< seed of the deterministic Xavier-uniform initialisation

  /// \returns this configuration with d_k, d_v, kdim and vdim resolved; throws
  /// mha::invalid_argument if it describes no valid module.
  MultiHeadAttentionConfig resolved() const {
    if (d_model <= 0) detail::fail("d_model must be positive, got d_model = ", d_model);
    if (num_heads <= 0) detail::fail("num_heads must be positive, got num_heads = ", num_heads);
    if (d_k < 0) detail::fail("d_k must be positive (or 0 for d_model / num_heads), got d_k = ", d_k);
    if (d_v < 0) detail::fail("d_v must be positive (or 0 for d_model / num_heads), got d_v = ", d_v);
    if (kdim < 0) detail::fail("kdim must be positive (or 0 for d_model), got kdim = ", kdim);
    if (vdim < 0) detail::fail("vdim must be positive (or 0 for d_model), got vdim = ", vdim);
    if (!(dropout >= 0.0 && dropout < 1.0)) detail::fail("dropout must be in [0, 1), got dropout = ", dropout);
    if ((d_k == 0 || d_v == 0) && d_model % num_heads != 0)
      detail::fail("d_model = ", d_model, " is not divisible by num_heads = ", num_heads,
                   "; set d_k and d_v explicitly or choose a divisor");
    MultiHeadAttentionConfig r = *this;
    if (r.d_k == 0) r.d_k = d_model / num_heads;
    if (r.d_v == 0) r.d_v = d_model / num_heads;
    if (r.kdim == 0) r.kdim = d_model;
    if (r.vdim == 0) r.vdim = d_model;
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
