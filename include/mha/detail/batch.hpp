// mha — the layout of a batch of sequences stacked by rows: where each sequence's queries and keys
// start, the positions of its rows, the tasks of its query blocks, and the extra key rows of
// PyTorch's add_bias_kv and add_zero_attn.
#pragma once

#include <mha/config.hpp>
#include <mha/detail/visibility.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <vector>

namespace mha {
namespace detail {

/// The sequences of a batch: their lengths (checked by the caller) and where their rows start.
/// Sequence b's queries are rows q_offset[b] … of the stacked queries; its keys, with the
/// extra_keys rows appended to each sequence, rows k_offset[b] … of the stacked keys.
struct Batch {
  Batch() = default;
  Batch(const std::vector<Eigen::Index>& query_lengths_, const std::vector<Eigen::Index>& key_lengths_,
        Eigen::Index extra = 0) {
    assign(query_lengths_, key_lengths_, extra);
  }
  /// Makes this the batch of these lengths, in the memory it has (a decode step's, kept by its cache).
  void assign(const std::vector<Eigen::Index>& query_lengths_, const std::vector<Eigen::Index>& key_lengths_,
              Eigen::Index extra = 0) {
    query_lengths.assign(query_lengths_.begin(), query_lengths_.end());
    key_lengths.assign(key_lengths_.begin(), key_lengths_.end());
    q_offset.assign(query_lengths.size() + 1, 0);
    k_offset.assign(query_lengths.size() + 1, 0);
    extra_keys = extra;
    max_L = max_S = 0;
    for (Eigen::Index b = 0; b < size(); ++b) {
      q_offset[b + 1] = q_offset[b] + query_lengths[b];
      k_offset[b + 1] = k_offset[b] + key_lengths[b] + extra;
      max_L = std::max(max_L, query_lengths[b]);
      max_S = std::max(max_S, key_lengths[b]);
    }
  }
  Eigen::Index size() const { return static_cast<Eigen::Index>(query_lengths.size()); }
  /// \returns the flops of the attention of `heads` heads of every sequence.
  double attention_flops(Eigen::Index heads, Eigen::Index d_k, Eigen::Index d_v) const {
    double flops = 0;
    for (Eigen::Index b = 0; b < size(); ++b)
      flops +=
          static_cast<double>(heads) * detail::attention_flops(query_lengths[b], key_lengths[b] + extra_keys, d_k, d_v);
    return flops;
  }

  std::vector<Eigen::Index> query_lengths, key_lengths;
  std::vector<Eigen::Index> q_offset, k_offset;  ///< first row of each sequence's queries; keys (with extras)
  Eigen::Index extra_keys = 0;                   ///< add_bias_kv's and add_zero_attn's rows per sequence
  Eigen::Index max_L = 0, max_S = 0;
};

/// The positions of a batch's query rows, for rotary embeddings: query i of a sequence of L
/// queries over S keys is at i + query_position_offset(alignment, L, S).
inline void query_positions(const Batch& batch, CausalAlignment alignment, std::vector<Eigen::Index>& positions) {
  positions.clear();
  for (Eigen::Index b = 0; b < batch.size(); ++b) {
    const Eigen::Index L = batch.query_lengths[b], offset = query_position_offset(alignment, L, batch.key_lengths[b]);
    for (Eigen::Index i = 0; i < L; ++i) positions.push_back(i + offset);
  }
}
inline std::vector<Eigen::Index> query_positions(const Batch& batch, CausalAlignment alignment) {
  std::vector<Eigen::Index> positions;
  query_positions(batch, alignment, positions);
  return positions;
}

/// The positions of a batch's key rows: key j of a sequence is at position j.
inline void key_positions(const Batch& batch, std::vector<Eigen::Index>& positions) {
  positions.clear();
  for (const Eigen::Index S : batch.key_lengths)
    for (Eigen::Index j = 0; j < S; ++j) positions.push_back(j);
}
inline std::vector<Eigen::Index> key_positions(const Batch& batch) {
  std::vector<Eigen::Index> positions;
  key_positions(batch, positions);
  return positions;
}

/// One block of query rows of one head of one sequence: a task of the attention.
struct QueryBlock {
  Eigen::Index sequence, head, block;
};

/// Every query block of `heads` heads of the sequences with at least `min_rows` queries.
inline void query_block_tasks(const Batch& batch, Eigen::Index heads, Eigen::Index min_rows,
                              std::vector<QueryBlock>& blocks) {
  blocks.clear();
  for (Eigen::Index b = 0; b < batch.size(); ++b)
    if (batch.query_lengths[b] >= min_rows)
      for (Eigen::Index i = 0; i < heads; ++i)
        for (Eigen::Index block = 0; block < query_blocks(batch.query_lengths[b]); ++block)
          blocks.push_back({b, i, block});
}
inline std::vector<QueryBlock> query_block_tasks(const Batch& batch, Eigen::Index heads, Eigen::Index min_rows = 1) {
  std::vector<QueryBlock> blocks;
  query_block_tasks(batch, heads, min_rows, blocks);
  return blocks;
}

/// Each sequence's projected keys (or values) with the extra rows appended: add_bias_kv's row
/// `bias_row` (when given), then add_zero_attn's zero row (when `zero_row`). Column by column, as
/// copies of contiguous runs: a sequence's rows of one column are next to each other.
template <typename Matrix, typename RowVector>
void append_extra_rows(const Matrix& projected, const Batch& batch, const RowVector* bias_row, bool zero_row,
                       Matrix& out) {
  out.resize(projected.rows() + batch.size() * batch.extra_keys, projected.cols());
  for (Eigen::Index c = 0; c < out.cols(); ++c) {
    const auto* from = projected.data() + c * projected.rows();
    auto* to = out.data() + c * out.rows();
    for (const Eigen::Index length : batch.key_lengths) {
      to = std::copy_n(from, length, to);
      from += length;
      if (bias_row) *to++ = (*bias_row)(c);
      if (zero_row) *to++ = 0;
    }
  }
}

/// The backward of append_extra_rows: copies the sequences' own rows of `extended` into `out`
/// and adds the add_bias_kv rows into `bias_row` (when given).
template <typename Matrix, typename BiasRow>
void remove_extra_rows(const Matrix& extended, const Batch& batch, Matrix& out, BiasRow* bias_row) {
  out.resize(extended.rows() - batch.size() * batch.extra_keys, extended.cols());
  for (Eigen::Index c = 0; c < out.cols(); ++c) {
    const auto* from = extended.data() + c * extended.rows();
    auto* to = out.data() + c * out.rows();
    for (const Eigen::Index length : batch.key_lengths) {
      to = std::copy_n(from, length, to);
      from += length;
      if (bias_row) (*bias_row)(c) += *from;
      from += batch.extra_keys;
    }
  }
}

}  // namespace detail
}  // namespace mha
