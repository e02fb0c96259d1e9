// The oracle: multi-head attention written as literally as the lecture teaches it. One loop over
// heads; each head projects its own Q_i, K_i, V_i with its own small products, materialises the
// L × S score matrix, takes a softmax row by row with std::exp, and multiplies by V_i; the heads are
// concatenated by copying; W^O is applied last. Slow on purpose: it shares no code with the library
// except reading its weights. decoder_attention, at the end, adds what a decoder uses as literally:
// key/value heads repeated for the query heads, rotary embeddings turned pair by pair, windows.
#pragma once

#include <mha/multi_head_attention.hpp>

#include <Eigen/Core>

#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <stdexcept>
#include <vector>

namespace mha_reference {

template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

/// softmax of each row, entry by entry; a row of all −∞ gives zeros.
template <typename Scalar>
Matrix<Scalar> softmax_rows(const Matrix<Scalar>& scores) {
  Matrix<Scalar> p(scores.rows(), scores.cols());
  for (Eigen::Index r = 0; r < scores.rows(); ++r) {
    Scalar max = -std::numeric_limits<Scalar>::infinity();
    for (Eigen::Index j = 0; j < scores.cols(); ++j) max = std::max(max, scores(r, j));
    Scalar sum = 0;
    for (Eigen::Index j = 0; j < scores.cols(); ++j) {
      p(r, j) = max == -std::numeric_limits<Scalar>::infinity() ? Scalar(0) : std::exp(scores(r, j) - max);
      sum += p(r, j);
    }
    for (Eigen::Index j = 0; j < scores.cols(); ++j) p(r, j) = sum > 0 ? p(r, j) / sum : Scalar(0);
  }
  return p;
}

/// Attention(Q, K, V) = softmax(Q Kᵀ · scale) V for one head; causal hides key j from query r < j.
template <typename Scalar>
Matrix<Scalar> attention(const Matrix<Scalar>& q, const Matrix<Scalar>& k, const Matrix<Scalar>& v, Scalar scale,
                         bool causal) {
  Matrix<Scalar> scores = (q * k.transpose()) * scale;  // L × S
  if (causal)
    for (Eigen::Index r = 0; r < scores.rows(); ++r)
      for (Eigen::Index j = r + 1; j < scores.cols(); ++j) scores(r, j) = -std::numeric_limits<Scalar>::infinity();
  return softmax_rows(scores) * v;  // L × d_v
}

/// What the PyTorch-parity features add to one head's scores, written out plainly: an additive
/// mask (L × S, this head's), an additive key padding row (1 × S), causal with query r seeing the
/// keys j ≤ r + offset, a sliding window hiding the keys j ≤ r + offset − window, and dropout as a
/// function keep(r, j) → 0 or 1/(1 − p). The keys from `masked_keys` on (add_bias_kv,
/// add_zero_attn) are exempt from all of them but dropout.
template <typename Scalar>
struct HeadMasks {
  const Matrix<Scalar>* mask = nullptr;
  const Matrix<Scalar>* key_padding = nullptr;
  bool causal = false;
  Eigen::Index offset = 0;
  Eigen::Index window = 0;        // > 0: query r sees only the keys j > r + offset − window
  Eigen::Index masked_keys = -1;  // −1: all keys
  std::function<Scalar(Eigen::Index, Eigen::Index)> keep;
};

/// The weights softmax(Q Kᵀ · scale + masks) of one head (with dropout applied), L × S.
template <typename Scalar>
Matrix<Scalar> attention_weights(const Matrix<Scalar>& q, const Matrix<Scalar>& k, Scalar scale,
                                 const HeadMasks<Scalar>& masks) {
  Matrix<Scalar> scores = (q * k.transpose()) * scale;  // L × S
  const Eigen::Index masked = masks.masked_keys < 0 ? scores.cols() : masks.masked_keys;
  for (Eigen::Index r = 0; r < scores.rows(); ++r)
    for (Eigen::Index j = 0; j < masked; ++j) {
      if (masks.mask) scores(r, j) += (*masks.mask)(r, j);
      if (masks.key_padding) scores(r, j) += (*masks.key_padding)(0, j);
      if (masks.causal && j > r + masks.offset) scores(r, j) = -std::numeric_limits<Scalar>::infinity();
      if (masks.window > 0 && j <= r + masks.offset - masks.window)
        scores(r, j) = -std::numeric_limits<Scalar>::infinity();
    }
  Matrix<Scalar> p = softmax_rows(scores);
  if (masks.keep)
    for (Eigen::Index r = 0; r < p.rows(); ++r)
      for (Eigen::Index j = 0; j < p.cols(); ++j) p(r, j) *= masks.keep(r, j);
  return p;
}

/// The lecture's multi-head attention with the weights of `module`.
template <typename Scalar>
Matrix<Scalar> multi_head_attention(const mha::MultiHeadAttention<Scalar>& module, const Matrix<Scalar>& query,
                                    const Matrix<Scalar>& key, const Matrix<Scalar>& value, bool causal,
                                    std::optional<double> scale = std::nullopt) {
  const Eigen::Index h = module.num_heads(), d_v = module.d_v();
  const Scalar s = static_cast<Scalar>(scale ? *scale : 1.0 / std::sqrt(static_cast<double>(module.d_k())));
  std::vector<Matrix<Scalar>> heads;
  for (Eigen::Index i = 0; i < h; ++i) {
    const Matrix<Scalar> q_i = query * module.w_q(i);  // L × d_k
    const Matrix<Scalar> k_i = key * module.w_k(i);    // S × d_k
    const Matrix<Scalar> v_i = value * module.w_v(i);  // S × d_v
    heads.push_back(attention<Scalar>(q_i, k_i, v_i, s, causal));
  }
  Matrix<Scalar> concat(query.rows(), h * d_v);  // L × h·d_v
  for (Eigen::Index i = 0; i < h; ++i) concat.middleCols(i * d_v, d_v) = heads[i];
  return concat * module.w_o();  // L × d_model
}

}  // namespace mha_reference

namespace mha_reference {

/// The options of multi_head_attention_full, each as literal as the lecture's math: additive masks
/// (one L × S matrix for every head, or h of them), an additive key padding row, causal alignment.
template <typename Scalar>
struct Options {
  std::vector<Matrix<Scalar>> masks;  ///< empty, one shared, or one per head
  Matrix<Scalar> key_padding;         ///< empty or 1 × S
  bool causal = false;
  bool bottom_right = false;
  std::optional<double> scale;
  /// Dropout: keep(head, r, j) → 0 or 1/(1 − p); empty for none.
  std::function<Scalar(Eigen::Index, Eigen::Index, Eigen::Index)> keep;
};

/// Multi-head attention with biases, kdim/vdim, add_bias_kv, add_zero_attn, masks and dropout, one
/// head at a time as the lecture computes it; the weights of each head go to `weights` if given.
template <typename Scalar>
Matrix<Scalar> multi_head_attention_full(const mha::MultiHeadAttention<Scalar>& module, const Matrix<Scalar>& query,
                                         const Matrix<Scalar>& key, const Matrix<Scalar>& value,
                                         const Options<Scalar>& options,
                                         std::vector<Matrix<Scalar>>* weights = nullptr) {
  const auto& config = module.config();
  const Eigen::Index h = module.num_heads(), d_k = module.d_k(), d_v = module.d_v(), S = key.rows();
  const Scalar s = static_cast<Scalar>(options.scale ? *options.scale : 1.0 / std::sqrt(static_cast<double>(d_k)));
  Matrix<Scalar> concat(query.rows(), h * d_v);
  if (weights) weights->clear();
  for (Eigen::Index i = 0; i < h; ++i) {
    Matrix<Scalar> q_i = query * module.w_q(i);  // L × d_k
    Matrix<Scalar> k_i = key * module.w_k(i);    // S × d_k
    Matrix<Scalar> v_i = value * module.w_v(i);  // S × d_v
    if (config.bias) {
      q_i.rowwise() += module.b_q().segment(i * d_k, d_k);
      k_i.rowwise() += module.b_k().segment(i * d_k, d_k);
      v_i.rowwise() += module.b_v().segment(i * d_v, d_v);
    }
    if (config.add_bias_kv) {
      k_i.conservativeResize(k_i.rows() + 1, Eigen::NoChange);
      v_i.conservativeResize(v_i.rows() + 1, Eigen::NoChange);
      k_i.row(k_i.rows() - 1) = module.bias_k().segment(i * d_k, d_k);
      v_i.row(v_i.rows() - 1) = module.bias_v().segment(i * d_v, d_v);
    }
    if (config.add_zero_attn) {
      k_i.conservativeResize(k_i.rows() + 1, Eigen::NoChange);
      v_i.conservativeResize(v_i.rows() + 1, Eigen::NoChange);
      k_i.row(k_i.rows() - 1).setZero();
      v_i.row(v_i.rows() - 1).setZero();
    }
    HeadMasks<Scalar> masks;
    if (!options.masks.empty())
      masks.mask = &options.masks[options.masks.size() == 1 ? 0 : static_cast<std::size_t>(i)];
    if (options.key_padding.size() > 0) masks.key_padding = &options.key_padding;
    masks.causal = options.causal;
    masks.offset = options.bottom_right ? S - query.rows() : 0;
    masks.masked_keys = S;
    if (options.keep) masks.keep = [&, i](Eigen::Index r, Eigen::Index j) { return options.keep(i, r, j); };
    const Matrix<Scalar> p = attention_weights<Scalar>(q_i, k_i, s, masks);  // L × S′
    concat.middleCols(i * d_v, d_v) = p * v_i;
    if (weights) weights->push_back(p);
  }
  Matrix<Scalar> out = concat * module.w_o();  // L × d_model
  if (config.bias) out.rowwise() += module.b_o();
  return out;
}

}  // namespace mha_reference

namespace mha_reference {

/// The options of decoder_attention: causal in either alignment, a sliding window, a scale.
/// Positions: key j is at position j, query r at r + (S − L) when bottom_right, else at r.
struct DecoderOptions {
  bool causal = false;
  bool bottom_right = false;
  Eigen::Index window = 0;  ///< > 0: the query at position p sees only keys at positions > p − window
  std::optional<double> scale;
};

/// Rotary position embeddings on one head's queries or keys (rows × d_k), row r at position
/// first_position + r: each pair of coordinates (a, b) turns by the angle p·θ_i, θ_i = base^(−2i/d_k),
/// to (a cos pθ_i − b sin pθ_i, a sin pθ_i + b cos pθ_i). The pairs are (2i, 2i + 1) (interleaved)
/// or (i, i + d_k/2) (halves). Computed in double, one pair at a time.
template <typename Scalar>
Matrix<Scalar> rotate(const Matrix<Scalar>& x, Eigen::Index first_position, double base, mha::RotaryPairs pairs) {
  const Eigen::Index d_k = x.cols(), half = d_k / 2;
  Matrix<Scalar> y = x;
  for (Eigen::Index r = 0; r < x.rows(); ++r) {
    const double p = static_cast<double>(first_position + r);
    for (Eigen::Index i = 0; i < half; ++i) {
      const double theta = std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(d_k));
      const double c = std::cos(p * theta), s = std::sin(p * theta);
      const Eigen::Index first = pairs == mha::RotaryPairs::interleaved ? 2 * i : i;
      const Eigen::Index second = pairs == mha::RotaryPairs::interleaved ? 2 * i + 1 : i + half;
      const double a = static_cast<double>(x(r, first)), b = static_cast<double>(x(r, second));
      y(r, first) = static_cast<Scalar>(a * c - b * s);
      y(r, second) = static_cast<Scalar>(a * s + b * c);
    }
  }
  return y;
}

/// PyTorch's repeat_interleave over the heads: h matrices from h_kv, query head i getting key/value
/// head i / (h / h_kv), so that each key/value head serves h / h_kv consecutive query heads.
template <typename Scalar>
std::vector<Matrix<Scalar>> repeat_interleave(const std::vector<Matrix<Scalar>>& kv_heads, Eigen::Index h) {
  const Eigen::Index group = h / static_cast<Eigen::Index>(kv_heads.size());
  std::vector<Matrix<Scalar>> repeated;
  for (Eigen::Index i = 0; i < h; ++i) repeated.push_back(kv_heads[static_cast<std::size_t>(i / group)]);
  return repeated;
}

/// Multi-head attention as a decoder uses it, with the weights of `module`: biases, kdim/vdim,
/// grouped-query attention (num_kv_heads key/value heads, literally repeated for the query heads),
/// rotary position embeddings (config.rotary) and a sliding window, causal in either alignment.
/// The weights of each head go to `weights` if given. No masks, add_bias_kv, add_zero_attn or
/// dropout (multi_head_attention_full has those).
template <typename Scalar>
Matrix<Scalar> decoder_attention(const mha::MultiHeadAttention<Scalar>& module, const Matrix<Scalar>& query,
                                 const Matrix<Scalar>& key, const Matrix<Scalar>& value, const DecoderOptions& options,
                                 std::vector<Matrix<Scalar>>* weights = nullptr) {
  const auto& config = module.config();
  if (config.add_bias_kv || config.add_zero_attn || config.dropout > 0)
    throw std::logic_error("decoder_attention: no add_bias_kv, add_zero_attn or dropout");
  const Eigen::Index h = module.num_heads(), h_kv = module.num_kv_heads(), d_k = module.d_k(), d_v = module.d_v();
  const Eigen::Index L = query.rows(), S = key.rows();
  const Eigen::Index query_position = options.bottom_right ? S - L : 0;  // of query row 0; key row 0 is at 0
  const Scalar s = static_cast<Scalar>(options.scale ? *options.scale : 1.0 / std::sqrt(static_cast<double>(d_k)));

  // The key/value heads' keys and values (keys rotated to their positions 0 … S − 1).
  std::vector<Matrix<Scalar>> kv_keys, kv_values;
  for (Eigen::Index j = 0; j < h_kv; ++j) {
    Matrix<Scalar> k_j = key * module.w_k(j);    // S × d_k
    Matrix<Scalar> v_j = value * module.w_v(j);  // S × d_v
    if (config.bias) {
      k_j.rowwise() += module.b_k().segment(j * d_k, d_k);
      v_j.rowwise() += module.b_v().segment(j * d_v, d_v);
    }
    if (config.rotary) k_j = rotate<Scalar>(k_j, 0, config.rotary_base, config.rotary_pairs);
    kv_keys.push_back(k_j);
    kv_values.push_back(v_j);
  }
  const std::vector<Matrix<Scalar>> keys = repeat_interleave(kv_keys, h), values = repeat_interleave(kv_values, h);

  Matrix<Scalar> concat(L, h * d_v);
  if (weights) weights->clear();
  for (Eigen::Index i = 0; i < h; ++i) {
    Matrix<Scalar> q_i = query * module.w_q(i);  // L × d_k
    if (config.bias) q_i.rowwise() += module.b_q().segment(i * d_k, d_k);
    if (config.rotary) q_i = rotate<Scalar>(q_i, query_position, config.rotary_base, config.rotary_pairs);
    HeadMasks<Scalar> masks;
    masks.causal = options.causal;
    masks.offset = query_position;
    masks.window = options.window;
    const Matrix<Scalar> p = attention_weights<Scalar>(q_i, keys[static_cast<std::size_t>(i)], s, masks);  // L × S
    concat.middleCols(i * d_v, d_v) = p * values[static_cast<std::size_t>(i)];
    if (weights) weights->push_back(p);
  }
  Matrix<Scalar> out = concat * module.w_o();  // L × d_model
  if (config.bias) out.rowwise() += module.b_o();
  return out;
}

}  // namespace mha_reference
