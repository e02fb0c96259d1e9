// mha — decoding over a key/value cache spread over the ranks of an MPI communicator: each rank
// holds a shard of the tokens, attends to it, and one collective merges the shards' (output,
// log-sum-exp) into the same output on every rank.
#pragma once

#include <mha/attention.hpp>
#include <mha/config.hpp>
#include <mha/detail/checks.hpp>
#include <mha/detail/visibility.hpp>
#include <mha/distributed/communicator.hpp>
#include <mha/distributed/ring_attention.hpp>
#include <mha/multi_head_attention.hpp>

#include <mpi.h>
#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace mha {
namespace distributed {

/// The key/value cache of one sequence's causal self-attention decoding, spread over the ranks of
/// an MPI communicator: each rank keeps the keys and values of some of the tokens, projected at
/// their global positions, in increasing positions. prefill() fills an empty cache with a prompt
/// through ring attention, each rank keeping the rows it holds in the prompt's layout; decode()
/// appends one token at a time, kept by the rank that holds the fewest tokens (the first such
/// rank): round robin from an empty cache, and after an uneven prefill the smaller shards first
/// until the shards are even. Both are collective. In decode() every rank passes the same new
/// token; each attends with it to its shard, and one MPI_Allgather of every rank's per-head output
/// and log-sum-exp lets every rank merge them, in rank order, into the same output: bit-identical
/// on every rank, and equal to MultiHeadAttention::decode over one whole cache. Options: scale and
/// window (the window's keys of a shard are a suffix of it); decoding is causal by construction
/// (options.causal and alignment are not read); masks, key padding and training are refused. The
/// module is held by reference and must outlive the cache.
template <typename Scalar>
class ShardedCache {
 public:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using Index = Eigen::Index;

  /// An empty cache for `module`'s decoding over the ranks of `comm` (collective: duplicates it).
  ShardedCache(const MultiHeadAttention<Scalar>& module, MPI_Comm comm)
      : module_(module), comm_(comm), ring_(module, comm), shard_lengths_(static_cast<std::size_t>(comm_.size()), 0) {}

  /// \returns the tokens of the whole sequence so far, and those this rank holds.
  Index length() const { return length_; }
  Index shard_length() const { return static_cast<Index>(positions_.size()); }
  /// \returns the number of tokens each rank holds, by rank: the same on every rank.
  const std::vector<Index>& shard_lengths() const { return shard_lengths_; }

  /// The prompt (collective): the sequence whose rows `layout` spreads over the ranks, x_local this
  /// rank's rows (layout.rows(rank) × d_model, in the layout's local order), goes through ring
  /// attention, causal (a row sees the rows at positions ≤ its own, within options.window), and
  /// each rank keeps the keys and values it projected for its own rows: nothing more is sent. The
  /// cache must be empty. \returns this rank's rows of the output, layout.rows(rank) × d_model:
  /// its rows of MultiHeadAttention::decode(prompt, cache) over one whole cache.
  template <typename Derived>
  Matrix prefill(const Eigen::MatrixBase<Derived>& x_local, const SequenceLayout& layout,
                 const AttentionOptions& options = {}) {
    const mha::detail::Input<Scalar> x(x_local);
    return run_prefill(x, layout, options);
  }

  /// A decode step (collective): the new token x (1 × d_model, the same on every rank) at position
  /// length() is projected, its key and value kept by the rank with the fewest tokens, and its
  /// query attends to every token so far (within options.window). \returns its output,
  /// 1 × d_model, on every rank.
  template <typename Derived>
  Matrix decode(const Eigen::MatrixBase<Derived>& x_new, const AttentionOptions& options = {}) {
    const mha::detail::Input<Scalar> x(x_new);
    return run_decode(x, options);
  }

  /// \returns what this rank's part of the last prefill did, step by step of the ring.
  const RingStatistics& prefill_statistics() const { return ring_.statistics(); }

 private:
  Matrix run_prefill(const mha::detail::Input<Scalar>& x, const SequenceLayout& layout,
                     const AttentionOptions& options);
  Matrix run_decode(const mha::detail::Input<Scalar>& x, const AttentionOptions& options);
  /// The checks of prefill and decode alike: the module and the options decoding supports; then
  /// the values every rank must share.
  void check_decoding(detail::CollectiveCheck& check, const AttentionOptions& options, const char* caller) const;

  const MultiHeadAttention<Scalar>& module_;
  detail::Communicator comm_;
  RingAttention<Scalar> ring_;  ///< the prefill's
  Index length_ = 0;
  std::vector<Index> shard_lengths_;  ///< the tokens each rank holds, by rank
  std::vector<Index> positions_;      ///< the global position of each token of the shard, increasing
  Matrix kv_;                         ///< capacity × h_kv·(d_k + d_v): the shard's [keys | values], by rows
};

template <typename Scalar>
void ShardedCache<Scalar>::check_decoding(detail::CollectiveCheck& check, const AttentionOptions& options,
                                          const char* caller) const {
  namespace md = mha::detail;
  check.local([&] {
    if (module_.kdim() != module_.d_model() || module_.vdim() != module_.d_model())
      md::fail(caller, ": decoding is self-attention, so kdim and vdim must equal d_model");
    if (!options.mask.empty() || !options.key_padding_mask.empty())
      md::fail(caller, ": options.mask and options.key_padding_mask are not read when decoding; leave them empty");
    if (options.training) md::fail(caller, ": decoding is inference; options.training must be false");
    if (module_.config().add_bias_kv || module_.config().add_zero_attn)
      md::fail(caller, ": a module with add_bias_kv or add_zero_attn cannot decode with a cache");
    md::resolve_scale<Scalar>(options, module_.d_k());
    md::resolve_window(options);
  });
  check.agree_module(module_.config());
  check.agree("the cache's length", static_cast<std::int64_t>(length_));
  check.agree_entries("the cache's shard lengths",
                      Eigen::Map<const Eigen::Matrix<Index, Eigen::Dynamic, 1>>(
                          shard_lengths_.data(), static_cast<Index>(shard_lengths_.size())));
  check.agree("options.window", static_cast<std::int64_t>(options.window));
  check.agree("options.scale", options.scale.value_or(0.0));
}

template <typename Scalar>
auto ShardedCache<Scalar>::run_prefill(const mha::detail::Input<Scalar>& x, const SequenceLayout& layout,
                                       const AttentionOptions& options) -> Matrix {
  namespace md = mha::detail;
  const double start = MPI_Wtime();
  const char* caller = "ShardedCache::prefill";
  // The prompt's attention is decoding's: causal, within the window, at the given scale.
  AttentionOptions causal;
  causal.causal = true;
  causal.window = options.window;
  causal.scale = options.scale;
  detail::CollectiveCheck check(comm_, caller);
  check.local([&] {
    if (length_ > 0)
      md::fail(caller, ": the cache holds ", length_,
               " tokens already; prefill fills an empty cache, and decode() appends to one");
  });
  check_decoding(check, options, caller);
  ring_.check_forward(check, x, x, x, layout, layout, causal, true, caller);
  check.finish();

  Matrix kv;  // n × h_kv·(d_k + d_v): this rank's rows' [keys | values], as the ring projected them
  Matrix output = ring_.checked_forward(x, x, x, layout, layout, causal, nullptr, true, &kv, start);
  // A layout holds a rank's ranges in increasing order (contiguous, or zigzag's chunks i and
  // 2P − 1 − i), so the shard's positions increase, as decoding's window needs.
  std::vector<Index> positions = layout.global_rows(comm_.rank());
  std::vector<Index> lengths(shard_lengths_.size());
  for (std::size_t r = 0; r < lengths.size(); ++r) lengths[r] = layout.rows(static_cast<int>(r));
  kv_.swap(kv);
  positions_.swap(positions);
  shard_lengths_.swap(lengths);
  length_ = layout.length();
  return output;
}

template <typename Scalar>
auto ShardedCache<Scalar>::run_decode(const mha::detail::Input<Scalar>& x, const AttentionOptions& options) -> Matrix {
  namespace md = mha::detail;
  const char* caller = "ShardedCache::decode";
  detail::CollectiveCheck check(comm_, caller);
  check.local([&] {
    md::check_width(x, "x_new", module_.d_model(), "d_model", caller);
    if (x.rows() != 1) md::fail(caller, ": x_new is ", md::shape(x), "; a sharded cache decodes one token per step");
  });
  check_decoding(check, options, caller);
  check.agree("x_new's rows", static_cast<std::int64_t>(x.rows()));
  check.agree_entries("x_new's entries", x);  // the new token itself: every rank must pass the same
  check.finish();

  const Index h = module_.num_heads(), group = h / module_.num_kv_heads();
  const Index d_k = module_.d_k(), d_v = module_.d_v(), kw = module_.num_kv_heads() * d_k;
  const Index t = length_, P = comm_.size();
  const auto scale = md::resolve_scale<Scalar>(options, d_k);

  // 1. Project the new token at its position; the rank with the fewest tokens keeps its key and value.
  Matrix q, kv;  // 1 × h·d_k, 1 × h_kv·(d_k + d_v)
  const std::vector<Index> position{t};
  detail::project_rows(module_, x, x, x, position, position, q, kv);
  const auto keeper = std::min_element(shard_lengths_.begin(), shard_lengths_.end());
  if (keeper - shard_lengths_.begin() == comm_.rank()) {
    const Index n = shard_length();
    if (n == kv_.rows()) {  // grow by doubling: amortised O(1) per token
      Matrix grown(std::max<Index>(16, 2 * n), kv.cols());
      grown.topRows(n) = kv_.topRows(n);
      kv_.swap(grown);
    }
    kv_.row(n) = kv.row(0);
    positions_.push_back(t);
  }
  ++*keeper;
  ++length_;

  // 2. Attend to this rank's shard: within a window, its keys at positions > t − window, a suffix.
  const Index n = shard_length();
  const Index window = md::effective_window(options.window, 1, length_);
  const Index first =
      window > 0
          ? static_cast<Index>(std::upper_bound(positions_.begin(), positions_.end(), t - window) - positions_.begin())
          : 0;
  const Index keys = n - first;
  Matrix mine(1, h * (d_v + 1));  // per head: its output (d_v), then its log-sum-exp
  const md::AdditiveMasks<Scalar> no_masks(AttentionOptions{});
  const auto visibility = md::key_visibility(AttentionOptions{}, no_masks, 1, keys);
  md::AttentionScratch<Scalar> scratch(1, std::min(md::kKeyBlock, std::max<Index>(keys, 1)), d_k);
  for (Index i = 0; i < h; ++i) {
    auto out = mine.middleCols(i * (d_v + 1), d_v);
    Scalar& lse = mine(0, i * (d_v + 1) + d_v);
    if (keys == 0) {
      out.setZero();
      lse = -std::numeric_limits<Scalar>::infinity();
      continue;
    }
    const Index j = i / group;
    md::attention_query_block<Scalar>(q.middleCols(i * d_k, d_k), md::operand(kv_.block(first, j * d_k, keys, d_k)),
                                      md::operand(kv_.block(first, kw + j * d_v, keys, d_v)), scale, visibility, 0,
                                      scratch, out, nullptr, &lse);
  }

  // 3. One collective: every rank's (output, log-sum-exp) per head, merged in rank order.
  Matrix all(1, P * mine.cols());
  MPI_Allgather(mine.data(), detail::mpi_count(mine.size(), caller), detail::mpi_type<Scalar>(), all.data(),
                detail::mpi_count(mine.size(), caller), detail::mpi_type<Scalar>(), comm_.get());
  Matrix concat(1, h * d_v), outs(1, P * d_v), lses(1, P);
  for (Index i = 0; i < h; ++i) {
    for (Index r = 0; r < P; ++r) {
      const Index at = r * mine.cols() + i * (d_v + 1);
      outs.middleCols(r * d_v, d_v) = all.middleCols(at, d_v);
      lses(0, r) = all(0, at + d_v);
    }
    md::merge_key_parts<Scalar>(outs, lses, concat.middleCols(i * d_v, d_v));
  }
  // 4. W^O, on every rank.
  return mha::detail::ModuleSteps::project_output(module_, concat);
}

}  // namespace distributed
}  // namespace mha
