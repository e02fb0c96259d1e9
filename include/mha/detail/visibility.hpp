// mha — which keys each query sees (the causal rule in both alignments, sliding windows, masks,
// key padding, dropout), and the tiles of keys a block of queries visits: the rules every pass
// shares, so that the forward, the backward and decoding cannot disagree.
#pragma once

#include <mha/config.hpp>
#include <mha/detail/gemm.hpp>
#include <mha/softmax.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace mha {
namespace detail {

template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
template <typename Scalar>
using Column = Eigen::Array<Scalar, Eigen::Dynamic, 1>;
/// n contiguous numbers as a column: the one view the kernel's column arithmetic is written on, so
/// that each of its expressions is compiled once per scalar type.
template <typename Scalar>
using ColumnMap = Eigen::Map<Column<Scalar>>;
/// A read-only view of contiguous columns: a matrix, a block of whole columns, a column-major map.
template <typename Scalar>
using ConstMatrixRef = Eigen::Ref<const Matrix<Scalar>>;
template <typename Scalar>
using MatrixRef = Eigen::Ref<Matrix<Scalar>>;
/// Keys or values, one per row (an operand read as S × d): a block of a sequence's projections
/// (column-major), or of a key/value cache (row-major, which grows a row at a time).
template <typename Scalar>
using Rows = Operand<Scalar>;

// Tile sizes, chosen by measurement (f32, d_model 512, one thread; README "Performance"): at
// N = 2048 and h = 8 the attention ran at 89 useful GFLOP/s with 64 × 256 tiles, 105 with
// 128 × 128, 118 with 256 × 256, 124 with 256 × 512 and 120 with 512 × 512; 256 × 512 was also
// best or within noise of it at N = 256, 512, 1024 and 4096, for h = 1, 8 and 16. Larger tiles
// repack the keys less often; beyond 256 × 512 floats (512 KiB) the tile leaves the L2 cache.
/// Query rows per tile.
constexpr Eigen::Index kQueryBlock = 256;
/// Keys (and values) per tile: one step of the online softmax.
constexpr Eigen::Index kKeyBlock = 512;

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
    std::fill_n(scores.data() + c * scores.outerStride(), hidden, -std::numeric_limits<Scalar>::infinity());
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
    const Eigen::Index visible =
        std::clamp<Eigen::Index>(first_key + c - offset + window - first_row, 0, scores.rows());
    std::fill_n(scores.data() + c * scores.outerStride() + visible, scores.rows() - visible,
                -std::numeric_limits<Scalar>::infinity());
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
  double dropout = 0.0;  ///< probability of dropping a weight (training only)
  std::uint64_t dropout_seed = 0, dropout_stream = 0;
  /// Where query row 0 and key 0 are in the sequence whose dropout pattern applies: 0 unless the
  /// queries and keys are ranges of a longer sequence (ring attention), whose pattern is then drawn
  /// at the rows' and keys' places in it.
  Eigen::Index dropout_first_row = 0, dropout_first_key = 0;
};

/// One SplitMix64 step mixing `word` into the state `z`.
inline std::uint64_t splitmix(std::uint64_t z, std::uint64_t word) {
  z += 0x9E3779B97F4A7C15ull ^ word;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// The dropout pattern of one head of one sequence: the uniform number u ∈ [0, 1) of (row, key) is
/// SplitMix64 over (seed, stream, row, key), so the pattern does not depend on tiles or threads;
/// a weight is dropped when u < p. The row's state is hoisted out of the loop over keys.
class DropoutPattern {
 public:
  DropoutPattern(std::uint64_t seed, std::uint64_t stream) : stream_(splitmix(seed, stream)) {}
  /// The state of row `row`, for uniform_bits.
  std::uint64_t row_state(std::uint64_t row) const { return splitmix(stream_, row); }
  /// The 53 bits of u(row, key) = bits · 2^−53, given the row's state.
  static std::uint64_t uniform_bits(std::uint64_t row_state, std::uint64_t key) {
    return splitmix(row_state, key) >> 11;
  }

 private:
  std::uint64_t stream_;
};

/// u(row, key) ∈ [0, 1) of the dropout pattern of (seed, stream).
inline double dropout_uniform(std::uint64_t seed, std::uint64_t stream, std::uint64_t row, std::uint64_t key) {
  const DropoutPattern pattern(seed, stream);
  return static_cast<double>(DropoutPattern::uniform_bits(pattern.row_state(row), key)) * 0x1.0p-53;
}

/// Scales the kept weights of a tile by 1/(1 − p) and zeroes the dropped ones.
template <typename Tile>
void drop_out(Tile& p, const KeyVisibility<typename Tile::Scalar>& visibility, Eigen::Index first_row,
              Eigen::Index first_key) {
  using Scalar = typename Tile::Scalar;
  const auto keep_scale = static_cast<Scalar>(1.0 / (1.0 - visibility.dropout));
  // u < p  ⇔  bits < p·2⁵³.
  const auto threshold = static_cast<std::uint64_t>(visibility.dropout * 0x1.0p53);
  const DropoutPattern pattern(visibility.dropout_seed, visibility.dropout_stream);
  first_row += visibility.dropout_first_row;
  first_key += visibility.dropout_first_key;
  for (Eigen::Index r = 0; r < p.rows(); ++r) {
    const std::uint64_t row = pattern.row_state(static_cast<std::uint64_t>(first_row + r));
    for (Eigen::Index c = 0; c < p.cols(); ++c) {
      const bool dropped = DropoutPattern::uniform_bits(row, static_cast<std::uint64_t>(first_key + c)) < threshold;
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
template <typename Scalar>
TileScores tile_scores(const Rows<Scalar>& k, const KeyVisibility<Scalar>& visibility, Eigen::Index first_row,
                       Eigen::Index first_key, bool masked, const Eigen::Ref<const Matrix<Scalar>>& scaled_q,
                       Eigen::Map<Matrix<Scalar>>& s, PackingSpace<Scalar>* packing = nullptr) {
  const Eigen::Index rows = s.rows(), keys = s.cols();
  constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
  // A tile is skipped when its largest mask value is −∞ (a vectorised reduction).
  if (masked && visibility.key_padding &&
      visibility.key_padding->row(visibility.key_padding_row).segment(first_key, keys).maxCoeff() == minus_infinity)
    return TileScores::hidden;
  if (masked && visibility.mask &&
      visibility.mask->block(visibility.mask_row + first_row, first_key, rows, keys).maxCoeff() == minus_infinity)
    return TileScores::hidden;
  gemm(operand(scaled_q), k.middle_rows(first_key, keys).t(), s, false, packing);
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
/// step(s, first_key, flushed) with each tile's scaled, masked scores s (B_r × B_c, in `scores`) and
/// which exponential to take of them (exp_minus): in double, Eigen's own where all are finite,
/// flushed where a mask may have put −∞ (Eigen's exp(−∞) is a denormal, not 0; flushing cost about
/// 5% at h = 8); float's own exponential always flushes, at no cost.
/// Tiles the masks hide entirely are skipped. The forward and the backward walk the same tiles
/// through this.
template <typename Scalar, typename Step>
void for_each_tile(const Rows<Scalar>& k, const KeyVisibility<Scalar>& visibility, Eigen::Index first_row,
                   const Eigen::Ref<const Matrix<Scalar>>& scaled_q, Matrix<Scalar>& scores,
                   PackingSpace<Scalar>* packing, const Step& step) {
  const Eigen::Index rows = scaled_q.rows();
  const KeyRanges ranges = key_ranges(visibility, first_row, first_row + rows - 1, k.op_rows());
  for (const bool masked : {true, false}) {
    const Eigen::Index begin = masked ? ranges.masked_begin : ranges.extra_begin;
    const Eigen::Index end = masked ? ranges.masked_end : ranges.extra_end;
    for (Eigen::Index first_key = begin; first_key < end; first_key += kKeyBlock) {
      // B_r × B_c, contiguous in the scratch whatever the block's row count: a one-row tile is one
      // contiguous row.
      Eigen::Map<Matrix<Scalar>> s(scores.data(), rows, std::min(kKeyBlock, end - first_key));
      const TileScores kind = tile_scores<Scalar>(k, visibility, first_row, first_key, masked, scaled_q, s, packing);
      if (kind != TileScores::hidden) step(s, first_key, kind == TileScores::masked);
    }
  }
}

/// The masks of an options as additive matrices of Scalar (0 or −∞ for the boolean conventions),
/// made once per call and read by every head and sequence: L × S (or h·L × S) and B × S.
template <typename Scalar>
struct AdditiveMasks {
  AdditiveMasks() = default;
  explicit AdditiveMasks(const AttentionOptions& options) { assign(options); }
  /// Makes these the masks of `options`, in the memory they have (a forward workspace's).
  void assign(const AttentionOptions& options) {
    options.mask.additive_matrix(mask);
    options.key_padding_mask.additive_matrix(key_padding);
  }
  Matrix<Scalar> mask, key_padding;
};

/// Where the queries of one sequence stand among its keys: query i of L at the position of key
/// i + offset of S: 0 for top-left alignment, S − L for bottom-right (the newest L of S tokens).
inline Eigen::Index query_position_offset(CausalAlignment alignment, Eigen::Index L, Eigen::Index S) {
  return alignment == CausalAlignment::bottom_right ? S - L : 0;
}

/// The window of L queries over S keys as the kernel applies it: a window of L + S keys or more
/// hides no key from any query (a query is at most at position S − 1 + L), so it is no window,
/// which keeps the kernel's position arithmetic far from overflow for any window the options hold.
inline Eigen::Index effective_window(Eigen::Index window, Eigen::Index L, Eigen::Index S) {
  return window >= L + S ? 0 : window;
}

/// How head `head` (of `heads`) of sequence `sequence` sees its S keys from its L queries under
/// `options` (checked by the caller): the causal rule in its alignment, the window, the masks
/// (`masks`, made from the same options: a mask of h·L rows has one block per head), key padding
/// and, in training with `dropout` > 0, the dropout pattern of (options.dropout_seed, sequence,
/// head). The forward and backward passes, decoding and the single-head function all see their
/// keys through this one function.
template <typename Scalar>
KeyVisibility<Scalar> key_visibility(const AttentionOptions& options, const AdditiveMasks<Scalar>& masks,
                                     Eigen::Index L, Eigen::Index S, Eigen::Index sequence = 0, Eigen::Index head = 0,
                                     Eigen::Index heads = 1, double dropout = 0.0) {
  KeyVisibility<Scalar> v;
  v.masked_keys = S;
  v.causal = options.causal;
  v.position_offset = query_position_offset(options.alignment, L, S);
  v.window = effective_window(options.window, L, S);
  if (masks.mask.size() > 0) {
    v.mask = &masks.mask;
    v.mask_row = masks.mask.rows() == L ? 0 : head * L;  // one mask for all heads, or one per head
  }
  if (masks.key_padding.size() > 0) {
    v.key_padding = &masks.key_padding;
    v.key_padding_row = sequence;
  }
  if (options.training && dropout > 0) {
    v.dropout = dropout;
    v.dropout_seed = options.dropout_seed;
    v.dropout_stream = static_cast<std::uint64_t>(sequence * heads + head);
  }
  return v;
}

}  // namespace detail
}  // namespace mha
