// The oracle: multi-head attention written as literally as the lecture teaches it. One loop over
// heads; each head projects its own Q_i, K_i, V_i with its own small products, materialises the
// L × S score matrix, takes a softmax row by row with std::exp, and multiplies by V_i; the heads are
// concatenated by copying; W^O is applied last. Slow on purpose: it shares no code with the library
// except reading its weights.
#pragma once

#include <mha/multi_head_attention.hpp>

#include <Eigen/Core>

#include <cmath>
#include <limits>
#include <optional>
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
Matrix<Scalar> attention(const Matrix<Scalar>& q, const Matrix<Scalar>& k, const Matrix<Scalar>& v,
                         Scalar scale, bool causal) {
  Matrix<Scalar> scores = (q * k.transpose()) * scale;  // L × S
  if (causal)
    for (Eigen::Index r = 0; r < scores.rows(); ++r)
      for (Eigen::Index j = r + 1; j < scores.cols(); ++j) scores(r, j) = -std::numeric_limits<Scalar>::infinity();
  return softmax_rows(scores) * v;                      // L × d_v
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
    const Matrix<Scalar> q_i = query * module.w_q(i);   // L × d_k
    const Matrix<Scalar> k_i = key * module.w_k(i);     // S × d_k
    const Matrix<Scalar> v_i = value * module.w_v(i);   // S × d_v
    heads.push_back(attention<Scalar>(q_i, k_i, v_i, s, causal));
  }
  Matrix<Scalar> concat(query.rows(), h * d_v);         // L × h·d_v
  for (Eigen::Index i = 0; i < h; ++i) concat.middleCols(i * d_v, d_v) = heads[i];
  return concat * module.w_o();                         // L × d_model
}

}  // namespace mha_reference
