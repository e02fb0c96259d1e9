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
/// an MPI communicator: the token at position t is kept by rank t mod P (so every rank holds the
/// same share, and its keys are in increasing positions), projected with its global position.
/// decode() is collective: every rank passes the same new token; each attends with it to its
/// shard, and one MPI_Allgather of every rank's per-head output and log-sum-exp lets every rank
/// merge them, in rank order, into the same output: bit-identical on every rank, and equal to
/// MultiHeadAttention::decode over one whole cache. Options: scale and window (the window's keys
/// of a shard are a suffix of it); masks, key padding and training are refused. The module is held
/// by reference and must outlive the cache.
template <typename Scalar>
class ShardedCache {
 public:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using Index = Eigen::Index;

  /// An empty cache for `module`'s decoding over the ranks of `comm` (collective: duplicates it).
  ShardedCache(const MultiHeadAttention<Scalar>& module, MPI_Comm comm) : module_(module), comm_(comm) {}

  /// \returns the tokens of the whole sequence so far, and those this rank holds.
  Index length() const { return length_; }
  Index shard_length() const { return static_cast<Index>(positions_.size()); }

  /// A decode step (collective): the new token x (1 × d_model, the same on every rank) at position
  /// length() is projected, its key and value kept by its rank, and its query attends to every
  /// token so far (within options.window). \returns its output, 1 × d_model, on every rank.
  template <typename Derived>
  Matrix decode(const Eigen::MatrixBase<Derived>& x_new, const AttentionOptions& options = {}) {
    const mha::detail::Input<Scalar> x(x_new);
    return run_decode(x, options);
  }

 private:
  Matrix run_decode(const mha::detail::Input<Scalar>& x, const AttentionOptions& options);

  const MultiHeadAttention<Scalar>& module_;
  detail::Communicator comm_;
  Index length_ = 0;
  std::vector<Index> positions_;  ///< the global position of each token of the shard, increasing
  Matrix kv_;                     ///< capacity × h_kv·(d_k + d_v): the shard's [keys | values], by rows
};

template <typename Scalar>
auto ShardedCache<Scalar>::run_decode(const mha::detail::Input<Scalar>& x, const AttentionOptions& options) -> Matrix {
  namespace md = mha::detail;
  const char* caller = "ShardedCache::decode";
  detail::CollectiveCheck check(comm_, caller);
  check.local([&] {
    md::check_width(x, "x_new", module_.d_model(), "d_model", caller);
    if (x.rows() != 1) md::fail(caller, ": x_new is ", md::shape(x), "; a sharded cache decodes one token per step");
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
  check.agree("options.window", static_cast<std::int64_t>(options.window));
  check.agree("options.scale", options.scale.value_or(0.0));
  check.agree("x_new's rows", static_cast<std::int64_t>(x.rows()));
  check.agree_entries("x_new's entries", x);  // the new token itself: every rank must pass the same
  check.finish();

  const Index h = module_.num_heads(), group = h / module_.num_kv_heads();
  const Index d_k = module_.d_k(), d_v = module_.d_v(), kw = module_.num_kv_heads() * d_k;
  const Index t = length_, P = comm_.size();
  const auto scale = md::resolve_scale<Scalar>(options, d_k);

  // 1. Project the new token at its position; its rank keeps its key and value.
  Matrix q, kv;  // 1 × h·d_k, 1 × h_kv·(d_k + d_v)
  const std::vector<Index> position{t};
  detail::project_rows(module_, x, x, x, position, position, q, kv);
  if (t % P == comm_.rank()) {
    const Index n = shard_length();
    if (n == kv_.rows()) {  // grow by doubling: amortised O(1) per token
      Matrix grown(std::max<Index>(16, 2 * n), kv.cols());
      grown.topRows(n) = kv_.topRows(n);
      kv_.swap(grown);
    }
    kv_.row(n) = kv.row(0);
    positions_.push_back(t);
  }
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
