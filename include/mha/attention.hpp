// mha — scaled dot-product attention of one head: softmax(Q Kᵀ · scale) V, tiled, forward and
// backward side by side.
#pragma once

#include <mha/config.hpp>
#include <mha/detail/checks.hpp>
#include <mha/detail/visibility.hpp>
#include <mha/softmax.hpp>
#include <mha/threads.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

namespace mha {
namespace detail {

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

  /// \returns the numbers it holds.
  Eigen::Index size() const {
    return scaled_q.size() + scores.size() + 5 * row_max.size() + packing.lhs.size() + packing.rhs.size();
  }

  Matrix<Scalar> scaled_q;  ///< B_r × d_k: scale · the query block
  Matrix<Scalar> scores;    ///< B_r × B_c: a tile of scores, then of their exponentials
  Column<Scalar> row_max, row_sum, new_max, shift, rescale;  ///< B_r each: m, ℓ, m′, shift, e^(m − m′)
  PackingSpace<Scalar> packing;  ///< the tiles' products' packed blocks, when too large for the stack
};

/// A scratch kept from one pass to the next (by a workspace, for one thread), fit for the query
/// blocks of an L × d_k query against S keys: as it is where it has room for them, else made anew.
template <typename Scalar>
AttentionScratch<Scalar>& fit_scratch(std::optional<AttentionScratch<Scalar>>& scratch, Eigen::Index L, Eigen::Index S,
                                      Eigen::Index d_k) {
  if (!scratch || scratch->scaled_q.cols() != d_k || scratch->scaled_q.rows() < std::min(kQueryBlock, L) ||
      scratch->scores.cols() < std::min(kKeyBlock, S))
    scratch.emplace(AttentionScratch<Scalar>::for_problem(L, S, d_k));
  return *scratch;
}

/// Query block `block` (rows block·B_r …) of one head's attention, written into those rows of
/// `out` (L × d_v):  out = softmax(q kᵀ · scale + masks) v,  q: L × d_k, k: S × d_k, v: S × d_v.
/// When `weights` is given (L × S), the attention weights of those rows are written into it; when
/// `log_sum_exp` is given (L entries), each row's log Σ_j exp(score_j) (−∞ for a row with no visible
/// key), all attention_backward needs to recompute the weights.
///
/// Never forms the L × S score matrix. It walks the key/value blocks with an online softmax
/// (Milakov & Gimelshein 2018; FlashAttention-2), keeping the running row maximum m, the running sum
/// ℓ of exp(score − m) and the unnormalised output in `out` itself; when a tile raises the maximum
/// from m to m′, the sum and output so far are rescaled by e^(m − m′); the division by ℓ happens
/// once, at the end. Causal key blocks wholly after the block's last row are never visited, tiles
/// the masks hide entirely are skipped, and only tiles that cross the diagonal are masked. A row
/// with no visible key outputs zeros (and zero weights). Dropout, in training, removes weights
/// after ℓ is summed, as PyTorch does: the kept weights are scaled by 1/(1 − p). Keys and values
/// are views of either storage order (Rows): a sequence's projections or a key/value cache.
template <typename Scalar>
void attention_query_block(const ConstMatrixRef<Scalar>& q, const Rows<Scalar>& k, const Rows<Scalar>& v, Scalar scale,
                           const KeyVisibility<Scalar>& visibility, Eigen::Index block,
                           AttentionScratch<Scalar>& scratch, MatrixRef<Scalar> out, Matrix<Scalar>* weights = nullptr,
                           Scalar* log_sum_exp = nullptr) {
  const Eigen::Index first_row = block * kQueryBlock;
  const Eigen::Index rows = std::min(kQueryBlock, q.rows() - first_row);
  auto acc = out.middleRows(first_row, rows);  // B_r × d_v, unnormalised until the end
  ColumnMap<Scalar> m(scratch.row_max.data(), rows), l(scratch.row_sum.data(), rows),
      m_new(scratch.new_max.data(), rows), shift(scratch.shift.data(), rows), alpha(scratch.rescale.data(), rows);
  // Column j of a tile, and of the output: contiguous, B_r numbers.
  const auto column = [rows](Scalar* data, Eigen::Index stride, Eigen::Index j) {
    return ColumnMap<Scalar>(data + j * stride, rows);
  };
  const auto scale_rows = [&](const ColumnMap<Scalar>& factors) { acc.array().colwise() *= factors; };
  m.setConstant(-std::numeric_limits<Scalar>::infinity());
  l.setZero();
  acc.setZero();
  auto qs = scratch.scaled_q.topRows(rows);
  qs.noalias() = scale * q.middleRows(first_row, rows);

  // One step of the online softmax: the tile's scores s (B_r × B_c) raise the running maximum,
  // rescale what was summed so far, and add their weighted values.
  const auto online_softmax_step = [&](Eigen::Map<Matrix<Scalar>>& s, Eigen::Index first_key, bool flushed) {
    // One query (a decode step): the tile is one contiguous row, and the softmax runs along it,
    // vectorised over the keys (a column at a time it would be one scalar exp per key). Otherwise
    // it runs down the tile one key (column) at a time, vectorised over the rows: Eigen's row-wise
    // reductions of a column-major tile were 2× slower (docs/performance.md).
    ColumnMap<Scalar> one_row(s.data(), rows == 1 ? s.cols() : 0);
    m_new = m;
    if (rows == 1)
      m_new(0) = std::max(m(0), one_row.maxCoeff());
    else
      for (Eigen::Index j = 0; j < s.cols(); ++j) m_new = m_new.max(column(s.data(), rows, j));
    shift = stable_shift(m_new);
    alpha = m;
    exp_minus(alpha.data(), rows, shift.data(), true);  // e^(m − m′): 0 on the first tile, where m = −∞
    l *= alpha;
    if (rows == 1) {
      exp_minus(one_row.data(), one_row.size(), shift(0), flushed);
      l(0) += one_row.sum();
    } else {
      for (Eigen::Index j = 0; j < s.cols(); ++j) {
        exp_minus(s.col(j).data(), rows, shift.data(), flushed);
        l += column(s.data(), rows, j);
      }
    }
    if (visibility.dropout > 0) drop_out(s, visibility, first_row, first_key);
    scale_rows(alpha);
    gemm(operand(s), v.middle_rows(first_key, s.cols()), acc, true, &scratch.packing);
    m = m_new;
  };
  for_each_tile<Scalar>(k, visibility, first_row, qs, scratch.scores, &scratch.packing, online_softmax_step);
  // 1/ℓ, and log Σ exp(score) = m + log ℓ, per row (loops: once per block, cheap to compile); a row
  // with nothing visible has m = −∞ and ℓ = 0: its output stays zero and its log-sum-exp −∞.
  ColumnMap<Scalar> inverse_sum(scratch.rescale.data(), rows);
  for (Eigen::Index r = 0; r < rows; ++r) {
    inverse_sum(r) = l(r) == Scalar(0) ? Scalar(1) : Scalar(1) / l(r);
    if (log_sum_exp) log_sum_exp[first_row + r] = l(r) == Scalar(0) ? m(r) : m(r) + std::log(l(r));
  }
  scale_rows(inverse_sum);

  if (weights) {
    // A second pass recomputes each tile's scores against the final maximum and sum.
    shift = stable_shift(m);
    const auto write_weights = [&](Eigen::Map<Matrix<Scalar>>& s, Eigen::Index first_key, bool flushed) {
      for (Eigen::Index j = 0; j < s.cols(); ++j) {
        exp_minus(s.col(j).data(), rows, shift.data(), flushed);
        column(s.data(), rows, j) *= inverse_sum;
      }
      if (visibility.dropout > 0) drop_out(s, visibility, first_row, first_key);
      weights->block(first_row, first_key, rows, s.cols()) = s;
    };
    for_each_tile<Scalar>(k, visibility, first_row, qs, scratch.scores, &scratch.packing, write_weights);
  }
}

/// Merges one block of queries' attention computed separately over disjoint parts of the keys (a
/// long key/value cache split across threads): part c gave the output O_c, normalised over its own
/// keys, and each row's log-sum-exp lse_c (outs: L × (parts·d_v), part c in column block c;
/// lses: L × parts). The whole is O = Σ_c e^(lse_c − lse) O_c with e^lse = Σ_c e^(lse_c): the same
/// rescaling as the online softmax, summed in the fixed order c = 0, 1, … so that the result does
/// not depend on which thread computed which part. A row that no part let see a key gets zeros.
/// When `log_sum_exp` is given (L entries), each row's lse of the whole is written into it (−∞ for a
/// row that sees no key), so that the merged output can be merged again (ring attention does).
/// `weights`, when given, is room for `parts` numbers the merge works in (else it allocates it).
template <typename Scalar>
void merge_key_parts(const ConstMatrixRef<Scalar>& outs, const ConstMatrixRef<Scalar>& lses, MatrixRef<Scalar> out,
                     Scalar* log_sum_exp = nullptr, Scalar* weights = nullptr) {
  // Plain loops: a merge touches parts × d_v numbers per row, and Eigen's array expressions here
  // cost half a second of every user's compile.
  const Eigen::Index parts = lses.cols(), d_v = out.cols();
  Column<Scalar> own(weights ? 0 : parts);
  ColumnMap<Scalar> weight(weights ? weights : own.data(), parts);
  for (Eigen::Index r = 0; r < lses.rows(); ++r) {
    Scalar shift = -std::numeric_limits<Scalar>::infinity();
    for (Eigen::Index c = 0; c < parts; ++c) shift = std::max(shift, weight(c) = lses(r, c));
    if (shift == -std::numeric_limits<Scalar>::infinity()) shift = 0;  // as stable_shift
    exp_minus(weight.data(), parts, shift, true);
    Scalar total = 0;
    for (Eigen::Index c = 0; c < parts; ++c) total += weight(c);
    const Scalar inverse = total == Scalar(0) ? Scalar(1) : Scalar(1) / total;
    if (log_sum_exp)
      log_sum_exp[r] = total == Scalar(0) ? -std::numeric_limits<Scalar>::infinity() : shift + std::log(total);
    for (Eigen::Index j = 0; j < d_v; ++j) {
      Scalar sum = 0;
      for (Eigen::Index c = 0; c < parts; ++c) sum += outs(r, c * d_v + j) * weight(c);
      out(r, j) = sum * inverse;
    }
  }
}

/// The per-thread working memory of attention_backward: tiles of weights, of their gradient and
/// of the dropout factors, B_r × B_c each, and a block of query rows and their gradient.
template <typename Scalar>
struct AttentionBackwardScratch {
  /// Room for tiles of up to `block_rows` queries × `block_keys` keys of width d_k.
  AttentionBackwardScratch(Eigen::Index block_rows, Eigen::Index block_keys, Eigen::Index d_k)
      : scaled_q(block_rows, d_k),
        grad_q(block_rows, d_k),
        scores(block_rows, block_keys),
        d_weights(block_rows, block_keys),
        keep(0, 0),
        shift(block_rows),
        d_dot_out(block_rows) {}
  /// The scratch for an L × d_k query against S keys.
  static AttentionBackwardScratch for_problem(Eigen::Index L, Eigen::Index S, Eigen::Index d_k) {
    return AttentionBackwardScratch(std::min(kQueryBlock, L), std::min(kKeyBlock, S), d_k);
  }

  Matrix<Scalar> scaled_q;   ///< B_r × d_k: scale · the query block, as in the forward
  Matrix<Scalar> grad_q;     ///< B_r × d_k: ∂loss/∂(q kᵀ) · k, summed over the key tiles
  Matrix<Scalar> scores;     ///< B_r × B_c: a tile of scores, then weights P, then ∂loss/∂scores
  Matrix<Scalar> d_weights;  ///< B_r × B_c: ∂loss/∂P
  Matrix<Scalar> keep;       ///< B_r × B_c (with dropout only): the factors 0 or 1/(1 − p), then P after dropout
  Column<Scalar> shift, d_dot_out;  ///< B_r each: the log-sum-exp (0 where −∞), D = rowsum(dO ∘ O)
  PackingSpace<Scalar> packing;     ///< the tiles' products' packed blocks, when too large for the stack
};

/// The backward of one head's attention (attention_query_block over every block): given what the
/// forward read (q: L × d_k, k: S × d_k, v: S × d_v, the same scale and visibility), what it wrote
/// (out: L × d_v, log_sum_exp: L) and d_out = ∂loss/∂out (L × d_v), writes grad_q = ∂loss/∂q
/// (L × d_k) and adds into grad_k (S × d_k) and grad_v (S × d_v) ∂loss/∂k and ∂loss/∂v (adds: the
/// heads that share keys and values, in grouped-query attention, sum there).
///
/// FlashAttention-2's backward: nothing L × S was kept, so each tile's weights are recomputed from
/// the scores and the saved log-sum-exp, P = exp(s − lse), exactly as the forward normalised them.
/// With s = scale · q kᵀ (+ masks) and out = P̃ v, where P̃ is P after dropout:
///   ∂loss/∂v  = P̃ᵀ d_out                                      (forward: out += P̃ v)
///   ∂loss/∂P  = (d_out vᵀ) ∘ dropout factors
///   ∂loss/∂s  = P ∘ (∂loss/∂P − D),  D = rowsum(d_out ∘ out)   (softmax; D = Σ_j P_j ∂loss/∂P_j)
///   ∂loss/∂q  = scale · ∂loss/∂s · k,   ∂loss/∂k = ∂loss/∂sᵀ · scale · q
/// Five products per tile (the forward has two): QKᵀ again, d_out vᵀ, P̃ᵀ d_out, dSᵀ q, dS k.
/// Masked scores have P = 0 and so no gradient; a row with no visible key has none at all.
template <typename Scalar>
void attention_backward(const ConstMatrixRef<Scalar>& q, const ConstMatrixRef<Scalar>& k,
                        const ConstMatrixRef<Scalar>& v, const ConstMatrixRef<Scalar>& out, const Scalar* log_sum_exp,
                        const ConstMatrixRef<Scalar>& d_out, Scalar scale, const KeyVisibility<Scalar>& visibility,
                        AttentionBackwardScratch<Scalar>& scratch, MatrixRef<Scalar> grad_q, MatrixRef<Scalar> grad_k,
                        MatrixRef<Scalar> grad_v) {
  for (Eigen::Index first_row = 0; first_row < q.rows(); first_row += kQueryBlock) {
    const Eigen::Index rows = std::min(kQueryBlock, q.rows() - first_row);
    auto qs = scratch.scaled_q.topRows(rows);
    qs.noalias() = scale * q.middleRows(first_row, rows);
    auto grad_q_rows = scratch.grad_q.topRows(rows);
    grad_q_rows.setZero();
    const auto d_out_rows = d_out.middleRows(first_row, rows);  // B_r × d_v
    ColumnMap<Scalar> shift(scratch.shift.data(), rows), D(scratch.d_dot_out.data(), rows);
    std::copy_n(log_sum_exp + first_row, rows, shift.data());
    shift = stable_shift(shift);
    // D = rowsum(d_out ∘ out), in loops down the columns: as a row-wise reduction it cost 20 MB of
    // every compile.
    D.setZero();
    for (Eigen::Index j = 0; j < d_out.cols(); ++j)
      for (Eigen::Index r = 0; r < rows; ++r) D(r) += d_out(first_row + r, j) * out(first_row + r, j);

    // One tile of the forward pass, run backwards.
    const auto backward_step = [&](Eigen::Map<Matrix<Scalar>>& s, Eigen::Index first_key, bool flushed) {
      const Eigen::Index keys = s.cols();
      // In the forward pass this was: P = exp(s − m) / ℓ, which is exp(s − lse).
      for (Eigen::Index j = 0; j < keys; ++j) exp_minus(s.col(j).data(), rows, shift.data(), flushed);
      auto dp = scratch.d_weights.topLeftCorner(rows, keys);
      gemm(operand(d_out_rows), operand(v).middle_rows(first_key, keys).t(), dp, false, &scratch.packing);
      if (visibility.dropout > 0) {
        // In the forward pass this was: P̃ = P ∘ keep (drop_out), then out += P̃ v.
        scratch.keep.resize(scratch.scores.rows(), scratch.scores.cols());  // once per thread, then a no-op
        auto keep = scratch.keep.topLeftCorner(rows, keys);
        keep.setOnes();
        drop_out(keep, visibility, first_row, first_key);
        dp.array() *= keep.array();
        keep.array() *= s.array();
        gemm(operand(keep).t(), operand(d_out_rows), grad_v.middleRows(first_key, keys), true, &scratch.packing);
      } else {
        // In the forward pass this was: out += P v.
        gemm(operand(s).t(), operand(d_out_rows), grad_v.middleRows(first_key, keys), true, &scratch.packing);
      }
      // The softmax's backward: ∂loss/∂s = P ∘ (∂loss/∂P − D).
      for (Eigen::Index j = 0; j < keys; ++j)
        ColumnMap<Scalar>(s.col(j).data(), rows) *= ColumnMap<Scalar>(dp.col(j).data(), rows) - D;
      // In the forward pass this was: s = (scale · q) kᵀ.
      gemm(operand(s), operand(k).middle_rows(first_key, keys), grad_q_rows, true, &scratch.packing);
      gemm(operand(s).t(), operand(qs), grad_k.middleRows(first_key, keys), true, &scratch.packing);
    };
    for_each_tile<Scalar>(operand(k), visibility, first_row, qs, scratch.scores, &scratch.packing, backward_step);
    grad_q.middleRows(first_row, rows) = scale * grad_q_rows;
  }
}

/// scaled_dot_product_attention, once its inputs are views (or evaluated copies) of one type.
template <typename Scalar>
Matrix<Scalar> scaled_dot_product_attention(const Input<Scalar>& q, const Input<Scalar>& k, const Input<Scalar>& v,
                                            const AttentionOptions& options) {
  if (q.cols() != k.cols())
    fail("scaled_dot_product_attention: query is ", shape(q), " and key is ", shape(k), "; both need d_k columns");
  if (k.rows() != v.rows())
    fail("scaled_dot_product_attention: key has ", k.rows(), " rows but value has ", v.rows(), " (key is ", shape(k),
         ", value is ", shape(v), ")");
  const Eigen::Index L = q.rows(), S = k.rows();
  if (!options.mask.empty() && (options.mask.rows() != L || options.mask.cols() != S))
    fail("scaled_dot_product_attention: options.mask is ", options.mask.rows(), " x ", options.mask.cols(),
         " but must be L x S = ", L, " x ", S);
  if (!options.key_padding_mask.empty() &&
      (options.key_padding_mask.rows() != 1 || options.key_padding_mask.cols() != S))
    fail("scaled_dot_product_attention: options.key_padding_mask is ", options.key_padding_mask.rows(), " x ",
         options.key_padding_mask.cols(), " but must be 1 x S = 1 x ", S);
  const auto scale = resolve_scale<Scalar>(options, q.cols());
  resolve_window(options);
  const AdditiveMasks<Scalar> masks(options);
  const auto visibility = key_visibility(options, masks, L, S);
  Matrix<Scalar> out(L, v.cols());
  parallel_tasks(
      query_blocks(L), attention_flops(L, S, q.cols(), v.cols()),
      [&] { return AttentionScratch<Scalar>::for_problem(L, S, q.cols()); },
      [&](Eigen::Index block, AttentionScratch<Scalar>& scratch) {
        attention_query_block<Scalar>(q, operand(k), operand(v), scale, visibility, block, scratch, out);
      });
  return out;
}

}  // namespace detail

/// Scaled dot-product attention of one head: softmax(q kᵀ · scale) v, optionally causal.
///   q: L × d_k (one row per query token), k: S × d_k, v: S × d_v  →  L × d_v.
/// The scale is options.scale or 1/√d_k; options.mask (L × S), options.key_padding_mask (1 × S),
/// causal and its alignment, and the window apply as in MultiHeadAttention (no dropout here). Any Eigen
/// expressions are accepted (blocks, maps, row-major matrices). A row with no visible key (S = 0,
/// or all masked) gives zeros; L = 0 gives a 0 × d_v matrix. Query blocks run in parallel on
/// mha::num_threads() threads.
template <typename DerivedQ, typename DerivedK, typename DerivedV>
Eigen::Matrix<typename DerivedQ::Scalar, Eigen::Dynamic, Eigen::Dynamic> scaled_dot_product_attention(
    const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v,
    const AttentionOptions& options = {}) {
  return detail::scaled_dot_product_attention<typename DerivedQ::Scalar>(q, k, v, options);
}

}  // namespace mha
