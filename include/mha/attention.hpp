// mha — scaled dot-product attention of one head: softmax(Q Kᵀ · scale) V, tiled.
#pragma once

#include <mha/config.hpp>
#include <mha/softmax.hpp>
#include <mha/threads.hpp>

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

// Tile sizes, chosen by measurement (f32, d_model 512, one thread; README "Performance"): at
// N = 2048 and h = 8 the attention ran at 89 useful GFLOP/s with 64 × 256 tiles, 105 with
// 128 × 128, 118 with 256 × 256, 124 with 256 × 512 and 120 with 512 × 512; 256 × 512 was also
// best or within noise of it at N = 256, 512, 1024 and 4096, for h = 1, 8 and 16. Larger tiles
// repack the keys less often; beyond 256 × 512 floats (512 KiB) the tile leaves the L2 cache.
/// Query rows per tile.
constexpr Eigen::Index kQueryBlock = 256;
/// Keys (and values) per tile: one step of the online softmax.
constexpr Eigen::Index kKeyBlock = 512;

/// The per-thread working memory of the kernel, O(B_r·B_c + B_r·d_k): nothing in it is L × S.
template <typename Scalar>
struct AttentionScratch {
  /// Room for tiles of up to `block_rows` queries × `block_keys` keys of width d_k.
  AttentionScratch(Eigen::Index block_rows, Eigen::Index block_keys, Eigen::Index d_k)
      : scaled_q(block_rows, d_k),
        scores(block_rows, block_keys),
        row_max(block_rows),
        row_sum(block_rows),
        new_max(block_rows),
        shift(block_rows),
        rescale(block_rows) {}
  /// The scratch for the query blocks of an L × d_k query against S keys.
  static AttentionScratch for_problem(Eigen::Index L, Eigen::Index S, Eigen::Index d_k) {
    return AttentionScratch(std::min(kQueryBlock, L), std::min(kKeyBlock, S), d_k);
  }

  Matrix<Scalar> scaled_q;  ///< B_r × d_k: scale · the query block
  Matrix<Scalar> scores;    ///< B_r × B_c: a tile of scores, then of their exponentials
  Column<Scalar> row_max, row_sum, new_max, shift, rescale;  ///< B_r each: m, ℓ, m′, shift, e^(m − m′)
};

/// \returns the number of query blocks of an L-row query.
inline Eigen::Index query_blocks(Eigen::Index L) { return (L + kQueryBlock - 1) / kQueryBlock; }

/// \returns the flops of one head's attention, 2·L·S·(d_k + d_v) (the two products).
inline double attention_flops(Eigen::Index L, Eigen::Index S, Eigen::Index d_k, Eigen::Index d_v) {
  return 2.0 * static_cast<double>(L) * static_cast<double>(S) * static_cast<double>(d_k + d_v);
}

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

/// Query block `block` (rows block·B_r …) of one head's attention, written into those rows of
/// `out` (L × d_v):  out = softmax(q kᵀ · scale [causal mask]) v,  q: L × d_k, k: S × d_k, v: S × d_v.
///
/// Never forms the L × S score matrix. It walks the key/value blocks with an online softmax
/// (Milakov & Gimelshein 2018; FlashAttention-2), keeping the running row maximum m, the running sum
/// ℓ of exp(score − m) and the unnormalised output in `out` itself; when a tile raises the maximum
/// from m to m′, the sum and output so far are rescaled by e^(m − m′); the division by ℓ happens
/// once, at the end. Causal key blocks wholly after the block's last row are never visited, and
/// only tiles that cross the diagonal are masked. A row with no visible key (S = 0) outputs zeros.
template <typename Scalar>
void attention_query_block(const ConstMatrixRef<Scalar>& q, const ConstMatrixRef<Scalar>& k,
                           const ConstMatrixRef<Scalar>& v, Scalar scale, bool causal, Eigen::Index block,
                           AttentionScratch<Scalar>& scratch, MatrixRef<Scalar> out) {
  const Eigen::Index first_row = block * kQueryBlock;
  const Eigen::Index rows = std::min(kQueryBlock, q.rows() - first_row);
  // Causal: the block's last row, first_row + rows − 1, sees keys j ≤ first_row + rows − 1.
  const Eigen::Index keys_end = causal ? std::min(k.rows(), first_row + rows) : k.rows();
  auto acc = out.middleRows(first_row, rows);  // B_r × d_v, unnormalised until the end
  auto m = scratch.row_max.head(rows);
  auto l = scratch.row_sum.head(rows);
  auto m_new = scratch.new_max.head(rows);
  auto shift = scratch.shift.head(rows);
  auto alpha = scratch.rescale.head(rows);
  m.setConstant(-std::numeric_limits<Scalar>::infinity());
  l.setZero();
  acc.setZero();
  auto qs = scratch.scaled_q.topRows(rows);
  qs.noalias() = scale * q.middleRows(first_row, rows);

  for (Eigen::Index first_key = 0; first_key < keys_end; first_key += kKeyBlock) {
    const Eigen::Index keys = std::min(kKeyBlock, keys_end - first_key);
    auto s = scratch.scores.topLeftCorner(rows, keys);  // B_r × B_c
    s.noalias() = qs * k.middleRows(first_key, keys).transpose();
    if (causal && first_key + keys - 1 > first_row) mask_future_keys(s, first_row, first_key);

    // The softmax runs down the tile one key (column) at a time, vectorised over the rows: Eigen's
    // row-wise reductions of a column-major tile were 2× slower (README "Performance").
    m_new = m;
    for (Eigen::Index j = 0; j < keys; ++j) m_new = m_new.max(s.col(j).array());
    shift = stable_shift(m_new);
    alpha = (m - shift).exp();  // e^(m − m′): 0 on the first tile, where m = −∞
    l *= alpha;
    for (Eigen::Index j = 0; j < keys; ++j) {
      auto p = s.col(j).array();
      p = (p - shift).exp();
      l += p;
    }
    acc.array().colwise() *= alpha;
    acc.noalias() += s * v.middleRows(first_key, keys);
    m = m_new;
  }
  acc.array().colwise() /= (l == Scalar(0)).select(Scalar(1), l);
}

}  // namespace detail

/// Scaled dot-product attention of one head: softmax(q kᵀ · scale) v, optionally causal.
///   q: L × d_k (one row per query token), k: S × d_k, v: S × d_v  →  L × d_v.
/// The scale is options.scale or 1/√d_k. Any Eigen expressions are accepted (blocks, maps,
/// row-major matrices). S = 0 gives zeros; L = 0 gives a 0 × d_v matrix. Query blocks run in
/// parallel on mha::num_threads() threads.
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
  // Views of the inputs; an expression or a strided layout is evaluated once, here.
  const detail::ConstMatrixRef<Scalar> q_ref(q.derived()), k_ref(k.derived()), v_ref(v.derived());
  detail::Matrix<Scalar> out(q.rows(), v.cols());
  detail::parallel_tasks(
      detail::query_blocks(q.rows()), detail::attention_flops(q.rows(), k.rows(), q.cols(), v.cols()),
      [&] { return detail::AttentionScratch<Scalar>::for_problem(q.rows(), k.rows(), q.cols()); },
      [&](Eigen::Index block, detail::AttentionScratch<Scalar>& scratch) {
        detail::attention_query_block<Scalar>(q_ref, k_ref, v_ref, scale, options.causal, block, scratch, out);
      });
  return out;
}

}  // namespace mha
