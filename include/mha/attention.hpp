// mha — scaled dot-product attention of one head: softmax(Q Kᵀ · scale) V.
#pragma once

#include <mha/config.hpp>
#include <mha/softmax.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <limits>
#include <type_traits>

namespace mha {
namespace detail {

template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
template <typename Scalar>
using Column = Eigen::Array<Scalar, Eigen::Dynamic, 1>;
/// A read-only view of contiguous columns: a matrix, a block of whole columns, a column-major map.
template <typename Scalar>
using ConstMatrixRef = Eigen::Ref<const Matrix<Scalar>>;
template <typename Scalar>
using MatrixRef = Eigen::Ref<Matrix<Scalar>>;

/// Rows of queries handled together: one score tile is kQueryBlock × kKeyBlock.
constexpr Eigen::Index kQueryBlock = 64;
/// Keys (and values) visited per step of the online softmax.
constexpr Eigen::Index kKeyBlock = 256;

/// Sets to −∞ the scores of a tile whose keys lie after their query (causal, top-left aligned).
/// The tile holds query rows first_row… and key columns first_key….
template <typename Tile>
void mask_future_keys(Tile& scores, Eigen::Index first_row, Eigen::Index first_key) {
  using Scalar = typename Tile::Scalar;
  for (Eigen::Index c = 0; c < scores.cols(); ++c) {
    // Key j = first_key + c is hidden from the rows r < j, i.e. the first (j − first_row) rows.
    const Eigen::Index hidden = std::clamp<Eigen::Index>(first_key + c - first_row, 0, scores.rows());
    scores.col(c).head(hidden).setConstant(-std::numeric_limits<Scalar>::infinity());
  }
}

/// One head's attention, written into `out` (L × d_v):
///   out = softmax(q kᵀ · scale [causal mask]) v,   q: L × d_k, k: S × d_k, v: S × d_v.
///
/// Never forms the L × S score matrix. For each block of query rows it walks the key/value blocks
/// with an online softmax (Milakov & Gimelshein 2018; FlashAttention-2): it keeps the running row
/// maximum m, the running sum ℓ of exp(score − m) and the unnormalised output in `out` itself;
/// when a tile raises the maximum from m to m′ the old sum and output are rescaled by e^(m − m′);
/// the division by ℓ happens once, at the end. Causal blocks wholly after the diagonal are never
/// visited. A row with no visible key (S = 0) outputs zeros.
template <typename Scalar>
void attention_head(const ConstMatrixRef<Scalar>& q, const ConstMatrixRef<Scalar>& k,
                    const ConstMatrixRef<Scalar>& v, Scalar scale, bool causal, MatrixRef<Scalar> out) {
  const Eigen::Index L = q.rows(), S = k.rows();
  const Eigen::Index block_rows = std::min(kQueryBlock, L);
  const Eigen::Index block_keys = std::min(kKeyBlock, S);
  Matrix<Scalar> scaled_q(block_rows, q.cols());        // B_r × d_k: scale · query block
  Matrix<Scalar> scores(block_rows, block_keys);        // B_r × B_c: one tile, then its exp
  Column<Scalar> row_max(block_rows), row_sum(block_rows), new_max(block_rows), shift(block_rows),
      rescale(block_rows);

  for (Eigen::Index r0 = 0; r0 < L; r0 += kQueryBlock) {
    const Eigen::Index rows = std::min(kQueryBlock, L - r0);
    // Causal: the last row of the block, r0 + rows − 1, sees keys j ≤ r0 + rows − 1.
    const Eigen::Index keys_end = causal ? std::min(S, r0 + rows) : S;
    auto acc = out.middleRows(r0, rows);                // B_r × d_v, unnormalised until the end
    auto m = row_max.head(rows);
    auto l = row_sum.head(rows);
    m.setConstant(-std::numeric_limits<Scalar>::infinity());
    l.setZero();
    acc.setZero();
    auto qs = scaled_q.topRows(rows);
    qs.noalias() = scale * q.middleRows(r0, rows);

    for (Eigen::Index c0 = 0; c0 < keys_end; c0 += kKeyBlock) {
      const Eigen::Index keys = std::min(kKeyBlock, keys_end - c0);
      auto s = scores.topLeftCorner(rows, keys);
      s.noalias() = qs * k.middleRows(c0, keys).transpose();
      if (causal && c0 + keys - 1 > r0) mask_future_keys(s, r0, c0);

      auto m_new = new_max.head(rows);
      auto m_shift = shift.head(rows);
      auto alpha = rescale.head(rows);
      m_new = m.max(s.array().rowwise().maxCoeff());
      m_shift = stable_shift(m_new);
      alpha = (m - m_shift).exp();                      // e^(m − m′); 0 while m = −∞
      s.array() = (s.array().colwise() - m_shift).exp();
      l = alpha * l + s.array().rowwise().sum();
      acc.array().colwise() *= alpha;
      acc.noalias() += s * v.middleRows(c0, keys);
      m = m_new;
    }
    acc.array().colwise() /= (l == Scalar(0)).select(Scalar(1), l);
  }
}

}  // namespace detail

/// Scaled dot-product attention of one head: softmax(q kᵀ · scale) v, optionally causal.
///   q: L × d_k (one row per query token), k: S × d_k, v: S × d_v  →  L × d_v.
/// The scale is options.scale or 1/√d_k. Any Eigen expressions are accepted (blocks, maps,
/// row-major matrices). S = 0 gives zeros; L = 0 gives a 0 × d_v matrix.
template <typename DerivedQ, typename DerivedK, typename DerivedV>
Eigen::Matrix<typename DerivedQ::Scalar, Eigen::Dynamic, Eigen::Dynamic> scaled_dot_product_attention(
    const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
    const Eigen::MatrixBase<DerivedV>& v, const AttentionOptions& options = {}) {
  using Scalar = typename DerivedQ::Scalar;
  static_assert(std::is_same<Scalar, typename DerivedK::Scalar>::value &&
                    std::is_same<Scalar, typename DerivedV::Scalar>::value,
                "mha::scaled_dot_product_attention: q, k and v must have the same scalar type");
  if (q.cols() != k.cols())
    detail::fail("scaled_dot_product_attention: query is ", detail::shape(q), " and key is ",
                 detail::shape(k), "; both need d_k columns");
  if (k.rows() != v.rows())
    detail::fail("scaled_dot_product_attention: key has ", k.rows(), " rows but value has ", v.rows(),
                 " (key is ", detail::shape(k), ", value is ", detail::shape(v), ")");
  const auto scale = static_cast<Scalar>(detail::resolve_scale(options, q.cols()));
  detail::Matrix<Scalar> out(q.rows(), v.cols());
  detail::attention_head<Scalar>(q.derived(), k.derived(), v.derived(), scale, options.causal, out);
  return out;
}

}  // namespace mha
