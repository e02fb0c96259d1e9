// mha — the memory a decode step works in, kept by its key/value cache: a step into a cache with
// room allocates nothing.
#pragma once

#include <mha/attention.hpp>
#include <mha/detail/batch.hpp>
#include <mha/detail/cache_reads.hpp>
#include <mha/detail/stored_products.hpp>

#include <Eigen/Core>

#include <optional>
#include <vector>

namespace mha {
namespace detail {

/// One task of a decode step's attention over a cache: key/value head `kv_head`'s part `part`
/// (kKeyBlock keys) of the keys of `sequence`, for one new token.
struct CachePart {
  Eigen::Index sequence, kv_head, part;
};

/// What one thread of a decode step works in.
template <typename Scalar>
struct DecodeThreadScratch {
  std::optional<AttentionScratch<Scalar>> attention;  ///< for several new tokens of a sequence
  PartScratch<Scalar> part;                           ///< for one new token, a part at a time
  Column<Scalar> keys, values;  ///< several new tokens of a reduced cache: a head's rows converted
  Column<Scalar> merge;         ///< the weights of the parts a token's output merges
};

/// Everything a decode step works in but the cache itself: the new tokens' positions and
/// projections, the tasks, the parts' outputs and every thread's scratch. Each buffer keeps the
/// largest size a step has needed (the parts' outputs, room for as many keys as the cache holds
/// without growing), so that the steps after the first allocate nothing until the cache grows.
/// Its contents mean nothing between steps: a copy of a cache starts with an empty workspace.
template <typename Scalar>
struct DecodeWorkspace {
  DecodeWorkspace() = default;
  DecodeWorkspace(const DecodeWorkspace&) {}
  DecodeWorkspace& operator=(const DecodeWorkspace&) { return *this; }
  DecodeWorkspace(DecodeWorkspace&&) noexcept = default;
  DecodeWorkspace& operator=(DecodeWorkspace&&) noexcept = default;

  std::vector<Eigen::Index> new_lengths;    ///< decode()'s (decode_cross()'s) one sequence's
  std::vector<Eigen::Index> lengths_after;  ///< each sequence's tokens after the step
  std::vector<Eigen::Index> positions;      ///< of the new tokens, for rotary embeddings
  std::vector<Eigen::Index> held;           ///< the keys each sequence attends over
  Batch batch;
  Matrix<Scalar> q, k, v, concat;  ///< ΣL_new × h·d_k, × h_kv·d_k, × h_kv·d_v; × h·d_v
  std::vector<QueryBlock> blocks;  ///< the tasks of sequences with several new tokens
  std::vector<CachePart> parts;    ///< and of those with one
  std::vector<Eigen::Index> first_key, part_count;
  /// Per sequence: query head i's part c's output at (i·parts + c)·d_v, its log-sum-exp at i·parts + c.
  std::vector<Column<Scalar>> part_outs, part_lses;
  std::vector<DecodeThreadScratch<Scalar>> threads;  ///< indexed by thread_index()
  StoredProductScratch<Scalar> stored;               ///< the projections with DecodeWeights
};

}  // namespace detail
}  // namespace mha
