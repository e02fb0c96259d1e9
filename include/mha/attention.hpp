// mha — scaled dot-product attention of one head: softmax(Q Kᵀ · scale) V, tiled.
#pragma once

#include <mha/config.hpp>
#include <mha/softmax.hpp>
#include <mha/threads.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
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
/// A read-only view of keys or values, one per row: column-major (a block of a sequence's
/// projections) or row-major (a key/value cache, which grows a row at a time).
template <typename Scalar, int Layout>
using KeysRef = Eigen::Ref<const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Layout>>;
template <typename T>
struct Identity {
  using type = T;
};
/// T, in a parameter that must not decide a template argument (the layout defaults instead).
template <typename T>
using NoDeduce = typename Identity<T>::type;

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

/// Sets to −∞ the scores of a tile whose keys lie after their query: key j is hidden from the
/// tile's row r when j > first_row + r + offset (offset 0: top-left causal; S − L: bottom-right).
/// The tile holds query rows first_row… and key columns first_key….
template <typename Tile>
void mask_future_keys(Tile& scores, Eigen::Index first_row, Eigen::Index offset, Eigen::Index first_key) {
  using Scalar = typename Tile::Scalar;
  for (Eigen::Index c = 0; c < scores.cols(); ++c) {
    // Key j = first_key + c is hidden from the rows r < j − offset − first_row.
    const Eigen::Index hidden = std::clamp<Eigen::Index>(first_key + c - offset - first_row, 0, scores.rows());
    scores.col(c).head(hidden).setConstant(-std::numeric_limits<Scalar>::infinity());
  }
}

/// Sets to −∞ the scores of a tile whose keys lie too far before their query: key j is hidden from
/// the tile's row r when j ≤ first_row + r + offset − window (a sliding window of `window` keys).
template <typename Tile>
void mask_past_keys(Tile& scores, Eigen::Index first_row, Eigen::Index offset, Eigen::Index window,
                    Eigen::Index first_key) {
  using Scalar = typename Tile::Scalar;
  for (Eigen::Index c = 0; c < scores.cols(); ++c) {
    // Key j = first_key + c is hidden from the rows r ≥ j − offset + window − first_row.
    const Eigen::Index visible = std::clamp<Eigen::Index>(first_key + c - offset + window - first_row, 0, scores.rows());
    scores.col(c).tail(scores.rows() - visible).setConstant(-std::numeric_limits<Scalar>::infinity());
  }
}

/// How one head of one sequence hides and weighs its keys, beyond the plain scaled scores. Keys
/// [0, masked_keys) obey the causal rule, the window and the masks; keys from masked_keys on
/// (PyTorch's add_bias_kv and add_zero_attn rows) are always visible.
template <typename Scalar>
struct KeyVisibility {
  Eigen::Index masked_keys = 0;
  Eigen::Index position_offset = 0;      ///< query r is at the position of key r + position_offset
  bool causal = false;                   ///< key j hidden from query r when j > r + position_offset
  Eigen::Index window = 0;               ///< if > 0, key j hidden when j ≤ r + position_offset − window
  const Matrix<Scalar>* mask = nullptr;  ///< additive; this head's query r is row mask_row + r
  Eigen::Index mask_row = 0;
  const Matrix<Scalar>* key_padding = nullptr;  ///< additive; this sequence is row key_padding_row
  Eigen::Index key_padding_row = 0;
  double dropout = 0.0;                  ///< probability of dropping a weight (training only)
  std::uint64_t dropout_seed = 0, dropout_stream = 0;
};

/// One SplitMix64 step mixing `word` into the state `z`.
inline std::uint64_t splitmix(std::uint64_t z, std::uint64_t word) {
  z += 0x9E3779B97F4A7C15ull ^ word;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// A uniform number in [0, 1) fixed by (seed, stream, row, key): SplitMix64 over the four, so the
/// dropout pattern does not depend on tiles or threads.
inline double dropout_uniform(std::uint64_t seed, std::uint64_t stream, std::uint64_t row, std::uint64_t key) {
  return static_cast<double>(splitmix(splitmix(splitmix(seed, stream), row), key) >> 11) * 0x1.0p-53;
}

/// Scales the kept weights of a tile by 1/(1 − p) and zeroes the dropped ones.
template <typename Tile>
void drop_out(Tile& p, const KeyVisibility<typename Tile::Scalar>& visibility, Eigen::Index first_row,
              Eigen::Index first_key) {
  using Scalar = typename Tile::Scalar;
  const auto keep_scale = static_cast<Scalar>(1.0 / (1.0 - visibility.dropout));
  // The 53-bit threshold below which a weight is dropped: u < p  ⇔  bits < p·2⁵³.
  const auto threshold = static_cast<std::uint64_t>(visibility.dropout * 0x1.0p53);
  const std::uint64_t stream = splitmix(visibility.dropout_seed, visibility.dropout_stream);
  for (Eigen::Index r = 0; r < p.rows(); ++r) {
    const std::uint64_t row = splitmix(stream, static_cast<std::uint64_t>(first_row + r));
    for (Eigen::Index c = 0; c < p.cols(); ++c) {
      const bool dropped = (splitmix(row, static_cast<std::uint64_t>(first_key + c)) >> 11) < threshold;
      p(r, c) = dropped ? Scalar(0) : p(r, c) * keep_scale;
    }
  }
}

/// The key ranges a query block visits: [masked_begin, masked_end) subject to the causal rule, the
/// window and the masks, then [masked_keys, S) always visible. Keys wholly after the block's last
/// row (causal) or before its first row's window are left out.
struct KeyRanges {
  Eigen::Index masked_begin, masked_end, extra_begin, extra_end;
};

template <typename Scalar>
KeyRanges key_ranges(const KeyVisibility<Scalar>& visibility, Eigen::Index first_row, Eigen::Index last_row,
                     Eigen::Index S) {
  Eigen::Index begin = 0, end = visibility.masked_keys;
  // The block's last row sees keys j ≤ last_row + offset; its first row keys j > first_row + offset − window.
  if (visibility.causal) end = std::clamp<Eigen::Index>(last_row + visibility.position_offset + 1, 0, end);
  if (visibility.window > 0)
    begin = std::clamp<Eigen::Index>(first_row + visibility.position_offset - visibility.window + 1, 0, end);
  return {begin, end, visibility.masked_keys, S};
}

/// What tile_scores found: the tile is hidden entirely (skip it), or its scores are finite, or
/// some may be −∞ (a mask or the causal diagonal crossed it).
enum class TileScores { hidden, finite, masked };

/// The scaled, masked scores of one tile into `s` (B_r × B_c), unless the masks hide every key of
/// the tile from every row (TileScores::hidden, `s` left unspecified).
template <typename Scalar, int Layout, typename Tile>
TileScores tile_scores(const KeysRef<Scalar, Layout>& k, const KeyVisibility<Scalar>& visibility, Eigen::Index first_row,
                       Eigen::Index first_key, bool masked, const Eigen::Ref<const Matrix<Scalar>>& scaled_q, Tile& s) {
  const Eigen::Index rows = s.rows(), keys = s.cols();
  constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
  // A tile is skipped when its largest mask value is −∞ (a vectorised reduction).
  if (masked && visibility.key_padding &&
      visibility.key_padding->row(visibility.key_padding_row).segment(first_key, keys).maxCoeff() == minus_infinity)
    return TileScores::hidden;
  if (masked && visibility.mask &&
      visibility.mask->block(visibility.mask_row + first_row, first_key, rows, keys).maxCoeff() == minus_infinity)
    return TileScores::hidden;
  s.noalias() = scaled_q * k.middleRows(first_key, keys).transpose();
  const Eigen::Index offset = visibility.position_offset;
  const bool crosses_diagonal = visibility.causal && first_key + keys - 1 > first_row + offset;
  // The last row's window starts latest: a key before it is hidden from some row.
  const bool crosses_window = visibility.window > 0 && first_key <= first_row + rows - 1 + offset - visibility.window;
  if (!masked || !(crosses_diagonal || crosses_window || visibility.mask || visibility.key_padding))
    return TileScores::finite;
  if (crosses_diagonal) mask_future_keys(s, first_row, offset, first_key);
  if (crosses_window) mask_past_keys(s, first_row, offset, visibility.window, first_key);
  if (visibility.mask) s += visibility.mask->block(visibility.mask_row + first_row, first_key, rows, keys);
  if (visibility.key_padding)
    for (Eigen::Index j = 0; j < keys; ++j)
      s.col(j).array() += (*visibility.key_padding)(visibility.key_padding_row, first_key + j);
  return TileScores::masked;
}

/// Visits the tiles that query rows [first_row, first_row + rows) attend to, calling
/// step(s, first_key, exp) with each tile's scaled, masked scores s (B_r × B_c, in `scores`) and the
/// exponential to take of them: Eigen's own where all are finite, exp_flushed where a mask may have
/// put −∞ (Eigen's exp(−∞) is a denormal, not 0; flushing costs about 5% at h = 8). Tiles the masks
/// hide entirely are skipped. The forward and the backward walk the same tiles through this.
template <typename Scalar, int Layout, typename Step>
void for_each_tile(const KeysRef<Scalar, Layout>& k, const KeyVisibility<Scalar>& visibility, Eigen::Index first_row,
                   const Eigen::Ref<const Matrix<Scalar>>& scaled_q, Matrix<Scalar>& scores, const Step& step) {
  const Eigen::Index rows = scaled_q.rows();
  const KeyRanges ranges = key_ranges(visibility, first_row, first_row + rows - 1, k.rows());
  const auto plain_exp = [](const auto& x) { return x.exp(); };
  const auto flushed_exp = [](const auto& x) { return exp_flushed(x); };
  for (const bool masked : {true, false}) {
    const Eigen::Index begin = masked ? ranges.masked_begin : ranges.extra_begin;
    const Eigen::Index end = masked ? ranges.masked_end : ranges.extra_end;
    for (Eigen::Index first_key = begin; first_key < end; first_key += kKeyBlock) {
      // B_r × B_c, contiguous in the scratch whatever the block's row count: a one-row tile is one
      // contiguous row.
      Eigen::Map<Matrix<Scalar>> s(scores.data(), rows, std::min(kKeyBlock, end - first_key));
      const TileScores kind = tile_scores<Scalar, Layout>(k, visibility, first_row, first_key, masked, scaled_q, s);
      if (kind == TileScores::finite) step(s, first_key, plain_exp);
      if (kind == TileScores::masked) step(s, first_key, flushed_exp);
    }
  }
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
/// are column-major views unless Layout says row-major (a key/value cache).
template <typename Scalar, int Layout = Eigen::ColMajor>
void attention_query_block(const ConstMatrixRef<Scalar>& q, const NoDeduce<KeysRef<Scalar, Layout>>& k,
                           const NoDeduce<KeysRef<Scalar, Layout>>& v, Scalar scale, const KeyVisibility<Scalar>& visibility,
                           Eigen::Index block, AttentionScratch<Scalar>& scratch, MatrixRef<Scalar> out,
                           Matrix<Scalar>* weights = nullptr, Scalar* log_sum_exp = nullptr) {
  const Eigen::Index first_row = block * kQueryBlock;
  const Eigen::Index rows = std::min(kQueryBlock, q.rows() - first_row);
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

  for_each_tile<Scalar, Layout>(k, visibility, first_row, qs, scratch.scores, [&](auto& s, Eigen::Index first_key, const auto& exp) {
    m_new = m;
    if (rows == 1) {
      // One query (a decode step): the tile is one contiguous row, and the softmax runs along
      // it, vectorised over the keys (a column at a time it would be one scalar exp per key).
      Eigen::Map<Eigen::Array<Scalar, 1, Eigen::Dynamic>> p(s.data(), s.cols());
      m_new(0) = std::max(m(0), p.maxCoeff());
      shift = stable_shift(m_new);
      alpha = exp_flushed(m - shift);
      l *= alpha;
      p = exp(p - shift(0));
      l(0) += p.sum();
    } else {
      // The softmax runs down the tile one key (column) at a time, vectorised over the rows:
      // Eigen's row-wise reductions of a column-major tile were 2× slower (README "Performance").
      for (Eigen::Index j = 0; j < s.cols(); ++j) m_new = m_new.max(s.col(j).array());
      shift = stable_shift(m_new);
      alpha = exp_flushed(m - shift);  // e^(m − m′): 0 on the first tile, where m = −∞
      l *= alpha;
      for (Eigen::Index j = 0; j < s.cols(); ++j) {
        auto p = s.col(j).array();
        p = exp(p - shift);
        l += p;
      }
    }
    if (visibility.dropout > 0) drop_out(s, visibility, first_row, first_key);
    acc.array().colwise() *= alpha;
    acc.noalias() += s * v.middleRows(first_key, s.cols());
    m = m_new;
  });
  const auto inverse_sum = (l == Scalar(0)).select(Scalar(1), l).inverse().eval();
  acc.array().colwise() *= inverse_sum;
  // log Σ exp(score) = m + log ℓ; a row with nothing visible has m = −∞ and ℓ = 0, and keeps −∞.
  if (log_sum_exp)
    Eigen::Map<Column<Scalar>>(log_sum_exp + first_row, rows) = (l == Scalar(0)).select(m, m + l.log());

  if (weights) {
    // A second pass recomputes each tile's scores against the final maximum and sum.
    shift = stable_shift(m);
    for_each_tile<Scalar, Layout>(k, visibility, first_row, qs, scratch.scores, [&](auto& s, Eigen::Index first_key, const auto& exp) {
      for (Eigen::Index j = 0; j < s.cols(); ++j) s.col(j).array() = exp(s.col(j).array() - shift) * inverse_sum;
      if (visibility.dropout > 0) drop_out(s, visibility, first_row, first_key);
      weights->block(first_row, first_key, rows, s.cols()) = s;
    });
  }
}

/// Merges one block of queries' attention computed separately over disjoint parts of the keys (a
/// long key/value cache split across threads): part c gave the output O_c, normalised over its own
/// keys, and each row's log-sum-exp lse_c (outs: L × (parts·d_v), part c in column block c;
/// lses: L × parts). The whole is O = Σ_c e^(lse_c − lse) O_c with e^lse = Σ_c e^(lse_c): the same
/// rescaling as the online softmax, summed in the fixed order c = 0, 1, … so that the result does
/// not depend on which thread computed which part. A row that no part let see a key gets zeros.
template <typename Scalar>
void merge_key_parts(const ConstMatrixRef<Scalar>& outs, const ConstMatrixRef<Scalar>& lses, MatrixRef<Scalar> out) {
  const Eigen::Index parts = lses.cols(), d_v = out.cols();
  const Column<Scalar> shift = stable_shift(Column<Scalar>(lses.rowwise().maxCoeff()));
  Column<Scalar> total = Column<Scalar>::Zero(lses.rows()), weight(lses.rows());
  out.setZero();
  for (Eigen::Index c = 0; c < parts; ++c) {
    weight = exp_flushed(lses.col(c).array() - shift);
    total += weight;
    out.array() += outs.middleCols(c * d_v, d_v).array().colwise() * weight;
  }
  out.array().colwise() *= (total == Scalar(0)).select(Scalar(1), total).inverse();
}

/// The per-thread working memory of attention_backward: tiles of weights, of their gradient and
/// of the dropout factors, B_r × B_c each, and a block of query rows and their gradient.
template <typename Scalar>
struct AttentionBackwardScratch {
  /// Room for tiles of up to `block_rows` queries × `block_keys` keys of width d_k.
  AttentionBackwardScratch(Eigen::Index block_rows, Eigen::Index block_keys, Eigen::Index d_k)
      : scaled_q(block_rows, d_k),
        d_q(block_rows, d_k),
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
  Matrix<Scalar> d_q;        ///< B_r × d_k: ∂loss/∂(q kᵀ) · k, summed over the key tiles
  Matrix<Scalar> scores;     ///< B_r × B_c: a tile of scores, then weights P, then ∂loss/∂scores
  Matrix<Scalar> d_weights;  ///< B_r × B_c: ∂loss/∂P
  Matrix<Scalar> keep;       ///< B_r × B_c (with dropout only): the factors 0 or 1/(1 − p), then P after dropout
  Column<Scalar> shift, d_dot_out;  ///< B_r each: the log-sum-exp (0 where −∞), D = rowsum(dO ∘ O)
};

/// The backward of one head's attention (attention_query_block over every block): given what the
/// forward read (q: L × d_k, k: S × d_k, v: S × d_v, the same scale and visibility), what it wrote
/// (out: L × d_v, log_sum_exp: L) and d_out = ∂loss/∂out (L × d_v), writes d_q (L × d_k) and
/// adds into d_k (S × d_k) and d_v (S × d_v) the gradients of the loss with respect to q, k and v
/// (adds: the heads that share keys and values, in grouped-query attention, sum there).
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
                        const ConstMatrixRef<Scalar>& v, const ConstMatrixRef<Scalar>& out,
                        const Scalar* log_sum_exp, const ConstMatrixRef<Scalar>& d_out, Scalar scale,
                        const KeyVisibility<Scalar>& visibility, AttentionBackwardScratch<Scalar>& scratch,
                        MatrixRef<Scalar> d_q, MatrixRef<Scalar> d_k, MatrixRef<Scalar> d_v) {
  for (Eigen::Index first_row = 0; first_row < q.rows(); first_row += kQueryBlock) {
    const Eigen::Index rows = std::min(kQueryBlock, q.rows() - first_row);
    auto qs = scratch.scaled_q.topRows(rows);
    qs.noalias() = scale * q.middleRows(first_row, rows);
    auto dq = scratch.d_q.topRows(rows);
    dq.setZero();
    const auto d_out_rows = d_out.middleRows(first_row, rows);  // B_r × d_v
    auto shift = scratch.shift.head(rows);
    shift = stable_shift(Eigen::Map<const Column<Scalar>>(log_sum_exp + first_row, rows));
    auto D = scratch.d_dot_out.head(rows);
    D = d_out_rows.cwiseProduct(out.middleRows(first_row, rows)).rowwise().sum();

    for_each_tile<Scalar, Eigen::ColMajor>(k, visibility, first_row, qs, scratch.scores,
                                           [&](auto& s, Eigen::Index first_key, const auto& exp) {
      const Eigen::Index keys = s.cols();
      // In the forward pass this was: P = exp(s − m) / ℓ, which is exp(s − lse).
      for (Eigen::Index j = 0; j < keys; ++j) s.col(j).array() = exp(s.col(j).array() - shift);
      auto dp = scratch.d_weights.topLeftCorner(rows, keys);
      dp.noalias() = d_out_rows * v.middleRows(first_key, keys).transpose();
      if (visibility.dropout > 0) {
        // In the forward pass this was: P̃ = P ∘ keep (drop_out), then out += P̃ v.
        scratch.keep.resize(scratch.scores.rows(), scratch.scores.cols());  // once per thread, then a no-op
        auto keep = scratch.keep.topLeftCorner(rows, keys);
        keep.setOnes();
        drop_out(keep, visibility, first_row, first_key);
        dp.array() *= keep.array();
        keep.array() *= s.array();
        d_v.middleRows(first_key, keys).noalias() += keep.transpose() * d_out_rows;
      } else {
        // In the forward pass this was: out += P v.
        d_v.middleRows(first_key, keys).noalias() += s.transpose() * d_out_rows;
      }
      // The softmax's backward: ∂loss/∂s = P ∘ (∂loss/∂P − D).
      for (Eigen::Index j = 0; j < keys; ++j) s.col(j).array() *= dp.col(j).array() - D;
      // In the forward pass this was: s = (scale · q) kᵀ.
      dq.noalias() += s * k.middleRows(first_key, keys);
      d_k.middleRows(first_key, keys).noalias() += s.transpose() * qs;
    });
    d_q.middleRows(first_row, rows) = scale * dq;
  }
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
  const Eigen::Index L = q.rows(), S = k.rows();
  if (!options.mask.empty() && (options.mask.rows() != L || options.mask.cols() != S))
    detail::fail("scaled_dot_product_attention: options.mask is ", options.mask.rows(), " x ", options.mask.cols(),
                 " but must be L x S = ", L, " x ", S);
  if (!options.key_padding_mask.empty() && (options.key_padding_mask.rows() != 1 || options.key_padding_mask.cols() != S))
    detail::fail("scaled_dot_product_attention: options.key_padding_mask is ", options.key_padding_mask.rows(), " x ",
                 options.key_padding_mask.cols(), " but must be 1 x S = 1 x ", S);
  const auto scale = detail::resolve_scale<Scalar>(options, q.cols());
  // Views of the inputs; an expression or a strided layout is evaluated once, here.
  const detail::ConstMatrixRef<Scalar> q_ref(q.derived()), k_ref(k.derived()), v_ref(v.derived());
  const detail::Matrix<Scalar> mask = options.mask.template additive_matrix<Scalar>();
  const detail::Matrix<Scalar> key_padding = options.key_padding_mask.template additive_matrix<Scalar>();
  detail::KeyVisibility<Scalar> visibility;
  visibility.masked_keys = S;
  visibility.causal = options.causal;
  visibility.position_offset = options.alignment == CausalAlignment::bottom_right ? S - L : 0;
  visibility.window = detail::effective_window(detail::resolve_window(options), L, S);
  if (mask.size() > 0) visibility.mask = &mask;
  if (key_padding.size() > 0) visibility.key_padding = &key_padding;
  detail::Matrix<Scalar> out(L, v.cols());
  detail::parallel_tasks(
      detail::query_blocks(L), detail::attention_flops(L, S, q.cols(), v.cols()),
      [&] { return detail::AttentionScratch<Scalar>::for_problem(L, S, q.cols()); },
      [&](Eigen::Index block, detail::AttentionScratch<Scalar>& scratch) {
        detail::attention_query_block<Scalar>(q_ref, k_ref, v_ref, scale, visibility, block, scratch, out);
      });
  return out;
}

}  // namespace mha
