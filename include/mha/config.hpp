// mha — the options of one attention call and the configuration of a module.
#pragma once

#include <mha/detail/checks.hpp>
#include <mha/mask.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <string>

namespace mha {

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
  /// Sliding-window attention: a query at position p sees only the keys at positions > p − window
  /// (with causal: the last `window` keys, itself included); 0 means no window. Key j of a sequence
  /// is at position j, and query i at position i, or i + S − L with bottom-right alignment.
  Eigen::Index window = 0;
};

/// Which coordinates of a head's query or key rotary position embeddings rotate together.
enum class RotaryPairs {
  /// (2i, 2i + 1): the RoFormer paper, GPT-J, Meta's LLaMA.
  interleaved,
  /// (i, i + d_k / 2): GPT-NeoX, Hugging Face's LLaMA ("rotate_half").
  halves,
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
  /// h_kv, the heads of keys and values (grouped-query attention; 1 is multi-query attention);
  /// 0 means num_heads. It must divide num_heads: query head i reads key/value head
  /// i / (num_heads / num_kv_heads), as PyTorch's repeat_interleave of K and V over the heads does.
  Eigen::Index num_kv_heads = 0;
  /// Rotary position embeddings (RoPE, Su et al. 2021) on each head's projected queries and keys:
  /// each pair of coordinates (a, b) of a row at position p turns by the angle p·θ_i,
  /// θ_i = rotary_base^(−2i/d_k), to (a cos pθ_i − b sin pθ_i, a sin pθ_i + b cos pθ_i). Needs an even d_k.
  bool rotary = false;
  double rotary_base = 10000.0;                         ///< the base of the rotary angles
  RotaryPairs rotary_pairs = RotaryPairs::interleaved;  ///< which coordinates rotate together

  /// \returns this configuration with d_k, d_v, kdim and vdim resolved; throws
  /// mha::invalid_argument if it describes no valid module, including one whose parameter
  /// matrices would have more entries than an Eigen::Index can count.
  MultiHeadAttentionConfig resolved() const {
    if (d_model <= 0) detail::fail("d_model must be positive, got d_model = ", d_model);
    if (num_heads <= 0) detail::fail("num_heads must be positive, got num_heads = ", num_heads);
    if (d_k < 0) detail::fail("d_k must be positive (or 0 for d_model / num_heads), got d_k = ", d_k);
    if (d_v < 0) detail::fail("d_v must be positive (or 0 for d_model / num_heads), got d_v = ", d_v);
    if (kdim < 0) detail::fail("kdim must be positive (or 0 for d_model), got kdim = ", kdim);
    if (vdim < 0) detail::fail("vdim must be positive (or 0 for d_model), got vdim = ", vdim);
    if (!(dropout >= 0.0 && dropout < 1.0)) detail::fail("dropout must be in [0, 1), got dropout = ", dropout);
    if (num_kv_heads < 0)
      detail::fail("num_kv_heads must be positive (or 0 for num_heads), got num_kv_heads = ", num_kv_heads);
    if (num_kv_heads > 0 && num_heads % num_kv_heads != 0)
      detail::fail("num_kv_heads = ", num_kv_heads, " does not divide num_heads = ", num_heads,
                   "; each key/value head serves num_heads / num_kv_heads query heads");
    if (rotary && !(std::isfinite(rotary_base) && rotary_base > 0))
      detail::fail("rotary_base must be positive and finite, got rotary_base = ", rotary_base);
    if ((d_k == 0 || d_v == 0) && d_model % num_heads != 0)
      detail::fail("d_model = ", d_model, " is not divisible by num_heads = ", num_heads,
                   "; set d_k and d_v explicitly or choose a divisor");
    MultiHeadAttentionConfig r = *this;
    if (r.d_k == 0) r.d_k = d_model / num_heads;
    if (r.d_v == 0) r.d_v = d_model / num_heads;
    if (r.kdim == 0) r.kdim = d_model;
    if (r.vdim == 0) r.vdim = d_model;
    if (r.num_kv_heads == 0) r.num_kv_heads = num_heads;
    if (rotary && r.d_k % 2 != 0)
      detail::fail("rotary embeddings rotate pairs of coordinates, so d_k must be even, got d_k = ", r.d_k);
    if (rotary) r.check_rotary_frequencies();
    r.check_parameter_sizes();
    return r;
  }

 private:
  /// Throws unless every parameter matrix, W^Q (d_model × h·d_k), W^K (kdim × h_kv·d_k),
  /// W^V (vdim × h_kv·d_v) and W^O (h·d_v × d_model), has a width and a count of entries that an
  /// Eigen::Index holds, in bytes of double: sizes past that are no module but an overflow.
  void check_parameter_sizes() const {
    const auto product = [](const char* a_name, Eigen::Index a, const char* b_name, Eigen::Index b) {
      Eigen::Index ab = 0;
      if (!detail::multiply(a, b, ab) || !detail::multiply(ab, Eigen::Index(sizeof(double)), ab))
        detail::fail(a_name, " · ", b_name, " = ", a, " · ", b, " is too large: the parameters would not fit in ",
                     "memory (more than 2^63 bytes)");
      return a * b;
    };
    const Eigen::Index q_width = product("num_heads", num_heads, "d_k", d_k);
    const Eigen::Index k_width = product("num_kv_heads", num_kv_heads, "d_k", d_k);
    const Eigen::Index v_width = product("num_kv_heads", num_kv_heads, "d_v", d_v);
    const Eigen::Index o_rows = product("num_heads", num_heads, "d_v", d_v);
    product("d_model", d_model, "num_heads·d_k", q_width);
    product("kdim", kdim, "num_kv_heads·d_k", k_width);
    product("vdim", vdim, "num_kv_heads·d_v", v_width);
    product("num_heads·d_v", o_rows, "d_model", d_model);
  }

  /// Throws unless every rotation frequency θ_i = rotary_base^(−2i/d_k), and its angle at any
  /// position an Eigen::Index can hold, is finite: a tiny base makes the last θ overflow.
  void check_rotary_frequencies() const {
    // θ_i is monotone in i: the extreme frequencies are θ_0 = 1 and the last pair's.
    const double last = std::pow(rotary_base, -static_cast<double>(d_k - 2) / static_cast<double>(d_k));
    const double largest_position = static_cast<double>(std::numeric_limits<Eigen::Index>::max());
    if (!(std::isfinite(last) && std::isfinite(last * largest_position)))
      detail::fail("rotary_base = ", rotary_base, " gives the rotation frequency θ = ", last, " for d_k = ", d_k,
                   ", whose angles overflow; use a base of about 1 or more (10000 is usual)");
  }
};

namespace detail {

/// The window of the options; throws on a negative one.
inline Eigen::Index resolve_window(const AttentionOptions& options) {
  if (options.window < 0) fail("options.window must be >= 0 (0 = no window), got ", options.window);
  return options.window;
}

/// The scale of the scores in `Scalar`: options.scale if set, else 1/√d_k (1 when d_k = 0, where
/// every score is 0 anyway). Throws unless it is finite as a `Scalar` (1e39 is not a float).
template <typename Scalar>
Scalar resolve_scale(const AttentionOptions& options, Eigen::Index d_k) {
  if (options.scale) {
    if (!std::isfinite(*options.scale)) fail("options.scale must be finite, got ", *options.scale);
    if (!std::isfinite(static_cast<Scalar>(*options.scale)))
      fail("options.scale = ", *options.scale, " is not finite in the module's scalar type (at most ",
           std::numeric_limits<Scalar>::max(), ")");
    return static_cast<Scalar>(*options.scale);
  }
  return static_cast<Scalar>(d_k > 0 ? 1.0 / std::sqrt(static_cast<double>(d_k)) : 1.0);
}

/// Whether two configurations give parameters, tapes and caches of the same shapes.
inline bool same_shape(const MultiHeadAttentionConfig& a, const MultiHeadAttentionConfig& b) {
  return a.d_model == b.d_model && a.num_heads == b.num_heads && a.num_kv_heads == b.num_kv_heads && a.d_k == b.d_k &&
         a.d_v == b.d_v && a.kdim == b.kdim && a.vdim == b.vdim && a.bias == b.bias && a.add_bias_kv == b.add_bias_kv &&
         a.add_zero_attn == b.add_zero_attn;
}

/// Whether two configurations turn queries and keys alike (what a tape or a cache holds depends on it).
inline bool same_rotation(const MultiHeadAttentionConfig& a, const MultiHeadAttentionConfig& b) {
  return a.rotary == b.rotary && (!a.rotary || (a.rotary_base == b.rotary_base && a.rotary_pairs == b.rotary_pairs));
}

/// "d_model 8, num_heads 2, d_k 4, …": a resolved configuration's shape, as error messages print it.
inline std::string describe(const MultiHeadAttentionConfig& c) {
  std::ostringstream base;
  base << c.rotary_base;
  return "d_model " + std::to_string(c.d_model) + ", num_heads " + std::to_string(c.num_heads) +
         (c.num_kv_heads != c.num_heads ? ", num_kv_heads " + std::to_string(c.num_kv_heads) : "") + ", d_k " +
         std::to_string(c.d_k) + ", d_v " + std::to_string(c.d_v) + ", kdim " + std::to_string(c.kdim) + ", vdim " +
         std::to_string(c.vdim) + (c.bias ? ", bias" : "") + (c.add_bias_kv ? ", add_bias_kv" : "") +
         (c.add_zero_attn ? ", add_zero_attn" : "") +
         (c.rotary ? ", rotary " + std::string(c.rotary_pairs == RotaryPairs::interleaved ? "interleaved" : "halves") +
                         " base " + base.str()
                   : "");
}

}  // namespace detail
}  // namespace mha
