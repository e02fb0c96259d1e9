// mha — ring attention (Liu, Zaharia & Abbeel 2023): multi-head attention over a sequence whose rows
// are spread over the ranks of an MPI communicator. Each rank projects its own rows; the key/value
// blocks travel around the ring, each rank attending with its queries to the block it holds while
// the next one is in flight; the partial outputs merge by log-sum-exp; W^O is applied locally. The
// backward pass sends the blocks around again, each with the gradient of its keys and values, to
// which every rank adds its queries' part before passing it on, until it is back home.
#pragma once

#include <mha/attention.hpp>
#include <mha/config.hpp>
#include <mha/detail/checks.hpp>
#include <mha/detail/projection_backward.hpp>
#include <mha/detail/visibility.hpp>
#include <mha/distributed/communicator.hpp>
#include <mha/distributed/layout.hpp>
#include <mha/multi_head_attention.hpp>
#include <mha/tape.hpp>
#include <mha/threads.hpp>

#include <mpi.h>
#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

namespace mha {
namespace distributed {

/// One step of the ring, as a rank saw it.
struct RingStep {
  double compute_seconds = 0;  ///< attending to the block held
  /// Waiting, after the compute, for the step's messages to complete (in the backward's last step,
  /// also for the last gradients' hop home: the waits before and after the query projection's
  /// backward that overlaps it, not that work).
  double wait_seconds = 0;
  std::size_t bytes_sent = 0;  ///< sent this step: to the next rank, or a gradient home
};

/// What a rank's last call (forward or backward) did, step by step: where the time went.
struct RingStatistics {
  std::vector<RingStep> steps;
  double total_seconds = 0;  ///< the whole call, projections and checks included
  /// \returns the time spent waiting on communication over all steps.
  double wait_seconds() const {
    double t = 0;
    for (const RingStep& s : steps) t += s.wait_seconds;
    return t;
  }
  /// \returns the time spent attending over all steps.
  double compute_seconds() const {
    double t = 0;
    for (const RingStep& s : steps) t += s.compute_seconds;
    return t;
  }
};

template <typename Scalar>
class RingAttention;
template <typename Scalar>
class ShardedCache;

namespace detail {

/// What a ring forward pass recorded, on one rank: its own rows only.
template <typename Scalar>
struct RingRecord {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  std::uint64_t ring = 0;  ///< the identity of the RingAttention that recorded it
  std::uint64_t call = 0;  ///< which of its forward calls (the same number on every rank)
  MultiHeadAttentionConfig config;
  AttentionOptions options;  ///< with a key padding mask of its own
  bool self_attention = false;
  SequenceLayout query_layout, key_layout;
  Matrix query, key, value;  ///< this rank's inputs (key and value empty for self-attention)
  Matrix q, kv;              ///< this rank's Q W^Q (n_q × h·d_k) and [K W^K | V W^V] (n_k × h_kv·(d_k + d_v))
  Matrix concat;             ///< n_q × h·d_v: the merged heads
  Matrix log_sum_exp;        ///< n_q × h: each row's log-sum-exp over every key of the sequence
};

/// q = query W^Q + b^Q and kv = [key W^K + b^K | value W^V + b^V] of one rank's rows (n_q × h·d_k
/// and n_k × h_kv·(d_k + d_v)), the rows of q and of kv's keys turned at their positions with rotary
/// embeddings: the module's own projections, the keys and values then side by side, one block for
/// the ring to send (a copy of n_k rows, next to the n_k · d_model · width of the products).
template <typename Scalar>
void project_rows(const MultiHeadAttention<Scalar>& module, const mha::detail::ConstMatrixRef<Scalar>& query,
                  const mha::detail::ConstMatrixRef<Scalar>& key, const mha::detail::ConstMatrixRef<Scalar>& value,
                  const std::vector<Eigen::Index>& query_positions, const std::vector<Eigen::Index>& key_positions,
                  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>& q,
                  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>& kv) {
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> k, v;
  mha::detail::ModuleSteps::project_inputs(module, query, key, value, query_positions, key_positions, q, k, v);
  kv.resize(k.rows(), k.cols() + v.cols());
  kv << k, v;
}

}  // namespace detail

/// What RingAttention::forward(…, tape) keeps on each rank for RingAttention::backward: the rank's
/// inputs, projections, merged heads and their log-sum-exp, O((n_q + n_k) · width), never N × N.
/// It belongs to the RingAttention that recorded it.
template <typename Scalar>
class RingTape {
 public:
  /// \returns whether no forward pass has been recorded.
  bool empty() const { return !recorded_; }
  /// Frees the memory and forgets the recorded forward pass.
  void clear() { recorded_.reset(); }

 private:
  friend class RingAttention<Scalar>;
  std::optional<detail::RingRecord<Scalar>> recorded_;
};

/// Multi-head attention over a sequence spread over the ranks of an MPI communicator (context
/// parallelism): the same outputs as MultiHeadAttention::forward of the whole sequence, each rank
/// computing the rows it holds. Every call is collective: all ranks of the communicator make it, with
/// the same module weights, layouts and options and their own rows; arguments are checked on all
/// ranks together before any message of the ring is sent, and bad ones throw the same
/// mha::invalid_argument on every rank.
///
/// The ring: rank r projects its rows into Q_r and [K_r | V_r]; at step s = 0 … P − 1 it holds the
/// key/value block of rank r − s, attends to it with all its queries, and meanwhile sends that block to
/// rank r + 1 and receives the next from rank r − 1 (MPI_Isend and MPI_Irecv, tested between tiles
/// so that they progress during the compute). Each step's partial output and log-sum-exp per row
/// and head merge into the running ones exactly as the split-KV merge of decoding does. A block no
/// later rank on its way needs (causal attention, windows) travels no further; a pair of query and
/// key ranges that the causal rule or the window hides entirely is never computed.
///
/// Options: causal in both alignments, window, scale, key_padding_mask (1 × S, the whole
/// sequence's, on every rank), dropout in training (the single-process pattern: a function of the
/// seed, the head and the global row and key); grouped-query attention, biases and rotary
/// embeddings (at the rows' global positions) from the module. Not supported: options.mask (an
/// L × S matrix on every rank would defeat the point), add_bias_kv and add_zero_attn.
///
/// The backward pass (backward(tape, d_output, gradients)) runs the ring again: each key/value
/// block travels with ∂loss/∂[K | V] of its rows, to which every rank on the way adds its queries'
/// part (FlashAttention-2's backward, recomputing the weights from the forward's log-sum-exp), and
/// the last rank that needs the block sends that gradient home; the parameter gradients are then
/// summed over the ranks in one MPI_Allreduce, so that every rank holds the same ones.
///
/// MPI must be initialised; with OpenMP threads, at least MPI_THREAD_FUNNELED (only the calling
/// thread calls MPI). The module is held by reference and must outlive this object.
template <typename Scalar>
class RingAttention {
 public:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  using Index = Eigen::Index;
  /// The gradients of the module's parameters (MultiHeadAttention::zero_gradients()).
  using Gradients = typename MultiHeadAttention<Scalar>::Gradients;

  /// Ring attention with `module`'s weights over the ranks of `comm` (collective: duplicates it).
  RingAttention(const MultiHeadAttention<Scalar>& module, MPI_Comm comm) : module_(module), comm_(comm) {}

  /// \returns this process's rank in the ring, and the number of ranks.
  int rank() const { return comm_.rank(); }
  int ranks() const { return comm_.size(); }

  /// Self-attention of the sequence whose rows `layout` spreads over the ranks: x_local is this
  /// rank's rows (layout.rows(rank()) × d_model, in the layout's local order).
  /// \returns this rank's rows of the output, layout.rows(rank()) × d_model.
  template <typename Derived>
  Matrix forward(const Eigen::MatrixBase<Derived>& x_local, const SequenceLayout& layout,
                 const AttentionOptions& options = {}) {
    const mha::detail::Input<Scalar> x(x_local);
    return run_forward(x, x, x, layout, layout, options, nullptr, true);
  }

  /// Attention of L queries over S keys and values, each spread over the ranks: query_local is this
  /// rank's query_layout rows (× d_model), key_local and value_local its key_layout rows (× kdim,
  /// × vdim). \returns this rank's rows of the output, query_layout.rows(rank()) × d_model.
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  Matrix forward(const Eigen::MatrixBase<DerivedQ>& query_local, const Eigen::MatrixBase<DerivedK>& key_local,
                 const Eigen::MatrixBase<DerivedV>& value_local, const SequenceLayout& query_layout,
                 const SequenceLayout& key_layout, const AttentionOptions& options = {}) {
    return run_forward(query_local, key_local, value_local, query_layout, key_layout, options, nullptr, false);
  }

  /// forward(x_local, layout, options), recording into `tape` what a backward pass needs.
  template <typename Derived>
  Matrix forward(const Eigen::MatrixBase<Derived>& x_local, const SequenceLayout& layout,
                 const AttentionOptions& options, RingTape<Scalar>& tape) {
    const mha::detail::Input<Scalar> x(x_local);
    return run_forward(x, x, x, layout, layout, options, &tape, true);
  }

  /// forward(query_local, key_local, value_local, …), recording into `tape` what a backward pass needs.
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  Matrix forward(const Eigen::MatrixBase<DerivedQ>& query_local, const Eigen::MatrixBase<DerivedK>& key_local,
                 const Eigen::MatrixBase<DerivedV>& value_local, const SequenceLayout& query_layout,
                 const SequenceLayout& key_layout, const AttentionOptions& options, RingTape<Scalar>& tape) {
    return run_forward(query_local, key_local, value_local, query_layout, key_layout, options, &tape, false);
  }

  /// The backward pass of the forward pass recorded in `tape` (collective): given this rank's rows
  /// of d_output = ∂loss/∂output (the forward's output rows × d_model), ADDS ∂loss/∂(every
  /// parameter) of the whole sequence into `gradients`, the same on every rank (as
  /// MultiHeadAttention::backward adds them for the whole sequence), and returns this rank's rows of
  /// ∂loss/∂query, ∂loss/∂key and ∂loss/∂value (for forward(x_local, …), ∂loss/∂x_local is their
  /// sum: InputGradients::self_attention()). The module's weights must not have changed since the
  /// forward, and every rank must pass the tape of the same forward call.
  template <typename Derived>
  InputGradients<Scalar> backward(const RingTape<Scalar>& tape, const Eigen::MatrixBase<Derived>& d_output,
                                  Gradients& gradients) {
    return run_backward(tape, Input(d_output), gradients);
  }

  /// \returns what this rank's last call did, step by step.
  const RingStatistics& statistics() const { return statistics_; }

 private:
  using Input = mha::detail::Input<Scalar>;
  using ConstRef = mha::detail::ConstMatrixRef<Scalar>;

  /// The MPI tags of the ring's messages: a key/value block, the gradient travelling with it, and
  /// that gradient sent home by the last rank that needs the block.
  enum Tag : int { kBlock = 1, kGradient = 2, kHome = 3 };

  /// Where a call's queries and keys are, and which of them see each other: every rank builds the
  /// same plan from the same (checked) arguments, so that senders and receivers agree on every
  /// message without exchanging any.
  struct Plan {
    const SequenceLayout* queries;
    const SequenceLayout* keys;
    AttentionOptions options;  ///< causal, alignment, window, training (the key padding is in `padding`)
    Index L = 0, S = 0, offset = 0, window = 0, heads = 1;
    double dropout = 0;  ///< the module's
    int P = 1;
    /// The additive key padding of each rank's key ranges (1 × range size each), if any.
    std::vector<std::vector<Matrix>> padding;

    /// How head `head`'s query rows from global row `q_begin` see the keys of `keys`: the one
    /// visibility builder, the positions (and the dropout pattern's rows and keys) shifted from the
    /// whole sequence's to the ranges'.
    mha::detail::KeyVisibility<Scalar> visibility(Index q_begin, const RowRange& keys, const Matrix* key_padding,
                                                  Index head) const {
      const mha::detail::AdditiveMasks<Scalar> no_masks(AttentionOptions{});
      mha::detail::KeyVisibility<Scalar> v =
          mha::detail::key_visibility(options, no_masks, L, S, 0, head, heads, dropout);
      v.masked_keys = keys.size;
      v.position_offset = offset + q_begin - keys.begin;
      v.window = window;
      v.dropout_first_row = q_begin;
      v.dropout_first_key = keys.begin;
      if (key_padding) {
        v.key_padding = key_padding;
        v.key_padding_row = 0;
      }
      return v;
    }
    /// Whether any query of `queries` sees any key of `keys` under the causal rule and the window.
    bool sees(const RowRange& q, const RowRange& k) const {
      if (q.size == 0 || k.size == 0) return false;
      const mha::detail::KeyRanges r =
          mha::detail::key_ranges(visibility(q.begin, k, nullptr, 0), 0, q.size - 1, k.size);
      return r.masked_begin < r.masked_end;
    }
    /// Whether rank q_rank's queries see any of rank k_rank's keys.
    bool needs(int q_rank, int k_rank) const {
      for (const RowRange& q : queries->ranges(q_rank))
        for (const RowRange& k : keys->ranges(k_rank))
          if (sees(q, k)) return true;
      return false;
    }
    /// The block of rank `origin` that rank `holder` holds at step s (holder = origin + s): whether
    /// it travels on to holder + 1, because a rank further on its way needs it.
    bool travels_on(int holder, int step) const {
      const int origin = (holder - step % P + P) % P;
      for (int t = 1; t < P - step; ++t)
        if (needs((holder + t) % P, origin)) return true;
      return false;
    }
    /// The additive key padding of range b of rank `origin`'s keys (1 × its size), or null.
    const Matrix* padding_of(int origin, std::size_t b) const {
      return padding.empty() ? nullptr : &padding[static_cast<std::size_t>(origin)][b];
    }
    /// Calls f(range, first, b) for each range b of `ranges`, `first` being its first local row.
    template <typename F>
    static void for_each_range(const std::vector<RowRange>& ranges, const F& f) {
      Index first = 0;
      for (std::size_t b = 0; b < ranges.size(); ++b) {
        f(ranges[b], first, b);
        first += ranges[b].size;
      }
    }
    /// The last rank that holds the block of rank `origin` on its way (origin itself if the block
    /// never leaves it): the one that sends the block's gradient home in the backward pass.
    int last_holder(int origin) const {
      for (int t = P - 1; t > 0; --t)
        if (needs((origin + t) % P, origin)) return (origin + t) % P;
      return origin;
    }
  };

  /// The per-thread memory of the forward's tasks: the kernel's tiles, and a partial output and
  /// log-sum-exp beside the running ones, for the merge.
  struct ForwardScratch {
    ForwardScratch(Index d_k, Index d_v)
        : attention(mha::detail::kQueryBlock, mha::detail::kKeyBlock, d_k),
          outs(mha::detail::kQueryBlock, 2 * d_v),
          lses(mha::detail::kQueryBlock, 2) {}
    mha::detail::AttentionScratch<Scalar> attention;
    Matrix outs;  ///< B_r × 2·d_v: [running output | this block's]
    Matrix lses;  ///< B_r × 2: their log-sum-exps
  };

  /// A block of at most kQueryBlock query rows of one query range: a task of the attention.
  struct QueryPiece {
    Index local_row, rows, global_row;
  };

  /// The per-thread memory of the backward's tasks: the kernel's tiles, and one head's ∂loss/∂q
  /// of a query range against one key range, before it is added to the running one.
  struct BackwardScratch {
    BackwardScratch(Index rows, Index d_k)
        : attention(mha::detail::kQueryBlock, mha::detail::kKeyBlock, d_k), d_q(rows, d_k) {}
    mha::detail::AttentionBackwardScratch<Scalar> attention;
    Matrix d_q;
  };

  /// ShardedCache::prefill runs the forward of its checked arguments and keeps the keys and values.
  friend class ShardedCache<Scalar>;

  Matrix run_forward(const Input& query, const Input& key, const Input& value, const SequenceLayout& query_layout,
                     const SequenceLayout& key_layout, const AttentionOptions& options, RingTape<Scalar>* tape,
                     bool self_attention);
  /// The forward of arguments check_forward has checked on every rank, from time `start`; with
  /// `keys_values` (and no tape), this rank's [K W^K | V W^V] (n_k × h_kv·(d_k + d_v)) is moved into it.
  Matrix checked_forward(const Input& query, const Input& key, const Input& value, const SequenceLayout& query_layout,
                         const SequenceLayout& key_layout, const AttentionOptions& options, RingTape<Scalar>* tape,
                         bool self_attention, Matrix* keys_values, double start);
  InputGradients<Scalar> run_backward(const RingTape<Scalar>& tape, const Input& d_output, Gradients& gradients);
  /// Checks a backward's arguments on all ranks together.
  void check_backward(const RingTape<Scalar>& tape, const Input& d_output, const Gradients& gradients) const;
  /// Sums `partial` over the ranks (one MPI_Allreduce of all of it) and adds the sum into `gradients`.
  void add_summed_over_ranks(Gradients& partial, Gradients& gradients) const;

  /// Adds a forward's checks to `check`, which the caller finishes on all ranks together (see
  /// CollectiveCheck): this rank's own, then the values every rank must share.
  void check_forward(mha::distributed::detail::CollectiveCheck& check, const Input& query, const Input& key,
                     const Input& value, const SequenceLayout& query_layout, const SequenceLayout& key_layout,
                     const AttentionOptions& options, bool self_attention, const char* caller) const;
  /// The values every rank must share: the module's shape, the layouts, the options.
  void agree_on(mha::distributed::detail::CollectiveCheck& check, const SequenceLayout& query_layout,
                const SequenceLayout& key_layout, const AttentionOptions& options, bool self_attention) const;

  Plan make_plan(const SequenceLayout& query_layout, const SequenceLayout& key_layout,
                 const AttentionOptions& options) const;
  std::vector<QueryPiece> query_pieces(const SequenceLayout& query_layout) const;
  /// The positions of this rank's query rows, for rotary embeddings: global row i at i + offset.
  std::vector<Index> query_positions(const Plan& plan) const {
    std::vector<Index> positions = plan.queries->global_rows(comm_.rank());
    for (Index& p : positions) p += plan.offset;
    return positions;
  }
  /// The key/value blocks of step `step`: posts the send of `held` to the next rank, if a rank
  /// further on needs it, and the receive of the next block into `incoming`, if this rank holds it
  /// at the next step. \returns the block held at the next step: &incoming, or null.
  const Matrix* pass_blocks(const Plan& plan, int step, const Matrix* held, Matrix& incoming,
                            std::vector<MPI_Request>& requests, RingStep& stats, const char* caller) const {
    const int P = plan.P;
    if (step + 1 < P && plan.travels_on(comm_.rank(), step)) {
      requests.emplace_back();
      MPI_Isend(held->data(), detail::mpi_count(held->size(), caller), detail::mpi_type<Scalar>(), comm_.next(), kBlock,
                comm_.get(), &requests.back());
      stats.bytes_sent += static_cast<std::size_t>(held->size()) * sizeof(Scalar);
    }
    if (!(step + 1 < P && plan.travels_on(comm_.previous(), step))) return nullptr;
    const int origin = (comm_.rank() - step - 1 + 2 * P) % P;  // of the next block
    incoming.resize(plan.keys->rows(origin), kv_width());
    requests.emplace_back();
    MPI_Irecv(incoming.data(), detail::mpi_count(incoming.size(), caller), detail::mpi_type<Scalar>(), comm_.previous(),
              kBlock, comm_.get(), &requests.back());
    return &incoming;
  }

  /// Runs task(t, scratch) for t < count on mha's threads, a few tasks at a time, testing the
  /// pending requests between them so that the messages progress while the ranks compute.
  template <typename MakeScratch, typename Task>
  static void tasks_with_progress(Index count, double flops, std::vector<MPI_Request>& requests,
                                  const MakeScratch& make_scratch, const Task& task) {
    const Index chunk = std::max<Index>(1, 2 * num_threads());
    for (Index first = 0; first < count; first += chunk) {
      const Index n = std::min(chunk, count - first);
      mha::detail::parallel_tasks(n, flops * static_cast<double>(n) / static_cast<double>(count), make_scratch,
                                  [&](Index t, auto& scratch) { task(first + t, scratch); });
      if (!requests.empty()) {
        int done = 0;
        MPI_Testall(static_cast<int>(requests.size()), requests.data(), &done, MPI_STATUSES_IGNORE);
      }
    }
  }

  Index key_width() const { return module_.num_kv_heads() * module_.d_k(); }
  Index kv_width() const { return module_.num_kv_heads() * (module_.d_k() + module_.d_v()); }

  const MultiHeadAttention<Scalar>& module_;
  mha::distributed::detail::Communicator comm_;
  RingStatistics statistics_;
  /// Where the backward's gradient of this rank's own block comes home, kept from one call to the
  /// next: a receive into memory just allocated pays for mapping its pages while the message waits
  /// (for a block of 32 MiB in shared memory, 100-200 ms, against 5-20 ms into memory mapped already).
  Matrix home_;
  std::uint64_t identity_ = mha::detail::new_module_identity();  ///< what its tapes record of it
  std::uint64_t calls_ = 0;                                      ///< forward calls so far: the same count on every rank
};

// ---- The passes ----

template <typename Scalar>
void RingAttention<Scalar>::agree_on(mha::distributed::detail::CollectiveCheck& check,
                                     const SequenceLayout& query_layout, const SequenceLayout& key_layout,
                                     const AttentionOptions& options, bool self_attention) const {
  check.agree_module(module_.config());
  check.agree("self-attention (forward(x, …)) or not (forward(query, key, value, …))", self_attention);
  check.agree("the query layout's length", static_cast<std::int64_t>(query_layout.length()));
  check.agree("the query layout", static_cast<std::int64_t>(query_layout.fingerprint()));
  check.agree("the key layout's length", static_cast<std::int64_t>(key_layout.length()));
  check.agree("the key layout", static_cast<std::int64_t>(key_layout.fingerprint()));
  check.agree("options.causal", options.causal);
  check.agree("options.alignment", static_cast<std::int64_t>(options.alignment));
  check.agree("options.window", static_cast<std::int64_t>(options.window));
  check.agree("whether options.scale is set", options.scale.has_value());
  check.agree("options.scale", options.scale.value_or(0.0));
  check.agree("options.training", options.training);
  const bool dropping = options.training && module_.config().dropout > 0;
  check.agree("options.dropout_seed (in training with dropout)",
              static_cast<std::int64_t>(dropping ? options.dropout_seed : 0));
  check.agree("options.mask's rows", static_cast<std::int64_t>(options.mask.rows()));
  check.agree("options.key_padding_mask's rows", static_cast<std::int64_t>(options.key_padding_mask.rows()));
  check.agree("options.key_padding_mask's columns", static_cast<std::int64_t>(options.key_padding_mask.cols()));
  // The padding itself: every rank must hide the same keys.
  check.agree_entries("options.key_padding_mask's entries",
                      options.key_padding_mask.template additive_matrix<Scalar>());
}

template <typename Scalar>
void RingAttention<Scalar>::check_forward(mha::distributed::detail::CollectiveCheck& check, const Input& query,
                                          const Input& key, const Input& value, const SequenceLayout& query_layout,
                                          const SequenceLayout& key_layout, const AttentionOptions& options,
                                          bool self_attention, const char* caller) const {
  namespace md = mha::detail;
  check.local([&] {
    md::check_width(query, self_attention ? "x_local" : "query_local", module_.d_model(), "d_model", caller);
    md::check_width(key, "key_local", module_.kdim(), module_.kdim() == module_.d_model() ? "d_model" : "kdim", caller);
    md::check_width(value, "value_local", module_.vdim(), module_.vdim() == module_.d_model() ? "d_model" : "vdim",
                    caller);
    if (key.rows() != value.rows())
      md::fail(caller, ": key_local has ", key.rows(), " rows but value_local has ", value.rows(), " (key_local is ",
               md::shape(key), ", value_local is ", md::shape(value), ")");
    for (const auto* layout : {&query_layout, &key_layout})
      if (layout->ranks() != comm_.size())
        md::fail(caller, ": the ", layout == &query_layout ? "query" : "key", " layout spreads the sequence over ",
                 layout->ranks(), " ranks but the communicator has ", comm_.size());
    if (query.rows() != query_layout.rows(comm_.rank()))
      md::fail(caller, ": ", self_attention ? "x_local" : "query_local", " is ", md::shape(query),
               " but the layout gives this rank ", query_layout.rows(comm_.rank()), " rows (of ", query_layout.length(),
               ")");
    if (key.rows() != key_layout.rows(comm_.rank()))
      md::fail(caller, ": key_local is ", md::shape(key), " but the key layout gives this rank ",
               key_layout.rows(comm_.rank()), " rows (of ", key_layout.length(), ")");
    if (!options.mask.empty())
      md::fail(caller, ": options.mask (", options.mask.rows(), " x ", options.mask.cols(),
               ") is not supported by ring attention, whose ranks never hold all L x S scores; use causal, "
               "window and key_padding_mask, which are functions of the positions");
    if (module_.config().add_bias_kv || module_.config().add_zero_attn)
      md::fail(caller, ": a module with add_bias_kv or add_zero_attn is not supported by ring attention");
    const Index S = key_layout.length();
    if (!options.key_padding_mask.empty() &&
        (options.key_padding_mask.rows() != 1 || options.key_padding_mask.cols() != S))
      md::fail(caller, ": options.key_padding_mask is ", options.key_padding_mask.rows(), " x ",
               options.key_padding_mask.cols(), " but must be 1 x S = 1 x ", S,
               " (the whole sequence's keys, the same on every rank)");
    if (self_attention && query_layout != key_layout)
      md::fail(caller, ": self-attention needs one layout for queries and keys");
    md::resolve_scale<Scalar>(options, module_.d_k());
    md::resolve_window(options);
  });
  agree_on(check, query_layout, key_layout, options, self_attention);
}

template <typename Scalar>
auto RingAttention<Scalar>::make_plan(const SequenceLayout& query_layout, const SequenceLayout& key_layout,
                                      const AttentionOptions& options) const -> Plan {
  Plan plan;
  plan.queries = &query_layout;
  plan.keys = &key_layout;
  plan.options.causal = options.causal;
  plan.options.alignment = options.alignment;
  plan.options.window = options.window;
  plan.options.training = options.training;
  plan.options.dropout_seed = options.dropout_seed;
  plan.heads = module_.num_heads();
  plan.dropout = module_.config().dropout;
  plan.L = query_layout.length();
  plan.S = key_layout.length();
  plan.offset = mha::detail::query_position_offset(options.alignment, plan.L, plan.S);
  plan.window = mha::detail::effective_window(options.window, plan.L, plan.S);
  plan.P = comm_.size();
  if (!options.key_padding_mask.empty()) {
    const Matrix padding = options.key_padding_mask.template additive_matrix<Scalar>();  // 1 × S
    plan.padding.resize(static_cast<std::size_t>(plan.P));
    for (int r = 0; r < plan.P; ++r)
      for (const RowRange& range : key_layout.ranges(r))
        plan.padding[static_cast<std::size_t>(r)].push_back(padding.middleCols(range.begin, range.size));
  }
  return plan;
}

template <typename Scalar>
auto RingAttention<Scalar>::query_pieces(const SequenceLayout& query_layout) const -> std::vector<QueryPiece> {
  std::vector<QueryPiece> pieces;
  Index local = 0;
  for (const RowRange& range : query_layout.ranges(comm_.rank())) {
    for (Index first = 0; first < range.size; first += mha::detail::kQueryBlock)
      pieces.push_back({local + first, std::min(mha::detail::kQueryBlock, range.size - first), range.begin + first});
    local += range.size;
  }
  return pieces;
}

template <typename Scalar>
auto RingAttention<Scalar>::run_forward(const Input& query, const Input& key, const Input& value,
                                        const SequenceLayout& query_layout, const SequenceLayout& key_layout,
                                        const AttentionOptions& options, RingTape<Scalar>* tape, bool self_attention)
    -> Matrix {
  const double start = MPI_Wtime();
  const char* caller = "RingAttention::forward";
  mha::distributed::detail::CollectiveCheck check(comm_, caller);
  check_forward(check, query, key, value, query_layout, key_layout, options, self_attention, caller);
  check.finish();
  return checked_forward(query, key, value, query_layout, key_layout, options, tape, self_attention, nullptr, start);
}

template <typename Scalar>
auto RingAttention<Scalar>::checked_forward(const Input& query, const Input& key, const Input& value,
                                            const SequenceLayout& query_layout, const SequenceLayout& key_layout,
                                            const AttentionOptions& options, RingTape<Scalar>* tape,
                                            bool self_attention, Matrix* keys_values, double start) -> Matrix {
  namespace md = mha::detail;
  statistics_ = RingStatistics();
  ++calls_;  // after the collective check: on every rank, or on none
  const Plan plan = make_plan(query_layout, key_layout, options);
  const int P = plan.P, rank = comm_.rank();
  const Index h = module_.num_heads(), group = h / module_.num_kv_heads();
  const Index d_k = module_.d_k(), d_v = module_.d_v(), kw = key_width();
  const auto scale = md::resolve_scale<Scalar>(options, d_k);

  // 1. Project this rank's rows: Q W^Q for its queries, [K W^K | V W^V] for its keys and values.
  Matrix q, kv;  // n_q × h·d_k, n_k × h_kv·(d_k + d_v)
  // Rotary positions are global: query row i of the sequence at i + offset, key row j at j.
  detail::project_rows(module_, query, key, value, query_positions(plan), key_layout.global_rows(rank), q, kv);

  // 2. Attend: at step s, this rank's queries to the block of rank r − s, while it travels on.
  const std::vector<QueryPiece> pieces = query_pieces(query_layout);
  Matrix concat = Matrix::Zero(q.rows(), h * d_v);  // n_q × h·d_v, merged over the steps so far
  Matrix log_sum_exp = Matrix::Constant(q.rows(), h, -std::numeric_limits<Scalar>::infinity());  // n_q × h
  Matrix buffers[2];         // the blocks received, alternately
  const Matrix* held = &kv;  // the block of this step: this rank's own at step 0
  for (int step = 0; step < P; ++step) {
    const int origin = (rank - step + P) % P;
    RingStep stats;
    std::vector<MPI_Request> requests;
    Matrix& incoming = buffers[step % 2];
    const Matrix* next_held = pass_blocks(plan, step, held, incoming, requests, stats, "RingAttention::forward");
    const double compute_start = MPI_Wtime();
    if (held && plan.needs(rank, origin)) {
      const std::vector<RowRange>& key_ranges = key_layout.ranges(origin);
      double flops = 0;
      for (const QueryPiece& piece : pieces)
        for (const RowRange& k : key_ranges) flops += md::attention_flops(piece.rows, k.size, d_k, d_v);
      // One task per head and piece of query rows: it attends to each key range of the block in
      // turn and merges each partial result into the running one, rows it alone writes.
      tasks_with_progress(
          h * static_cast<Index>(pieces.size()), flops * static_cast<double>(h), requests,
          [&] { return ForwardScratch(d_k, d_v); },
          [&](Index t, ForwardScratch& scratch) {
            const Index i = t / static_cast<Index>(pieces.size()), j = i / group;
            const QueryPiece& piece = pieces[static_cast<std::size_t>(t % static_cast<Index>(pieces.size()))];
            auto running = concat.block(piece.local_row, i * d_v, piece.rows, d_v);
            Scalar* running_lse = log_sum_exp.col(i).data() + piece.local_row;
            Plan::for_each_range(key_ranges, [&](const RowRange& k, Index k0, std::size_t b) {
              if (!plan.sees({piece.global_row, piece.rows}, k)) return;
              const Matrix* padding = plan.padding_of(origin, b);
              auto outs = scratch.outs.topRows(piece.rows);
              auto lses = scratch.lses.topRows(piece.rows);
              md::attention_query_block<Scalar>(q.block(piece.local_row, i * d_k, piece.rows, d_k),
                                                md::operand(held->block(k0, j * d_k, k.size, d_k)),
                                                md::operand(held->block(k0, kw + j * d_v, k.size, d_v)), scale,
                                                plan.visibility(piece.global_row, k, padding, i), 0, scratch.attention,
                                                outs.rightCols(d_v), nullptr, lses.col(1).data());
              outs.leftCols(d_v) = running;
              std::copy_n(running_lse, piece.rows, lses.col(0).data());
              md::merge_key_parts<Scalar>(outs, lses, running, running_lse);
            });
          });
    }
    stats.compute_seconds = MPI_Wtime() - compute_start;
    const double wait_start = MPI_Wtime();
    MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE);
    stats.wait_seconds = MPI_Wtime() - wait_start;
    statistics_.steps.push_back(stats);
    held = next_held;
  }

  // 3. Concatenate (done: each head merged into its own columns) and project with W^O, locally.
  Matrix output = mha::detail::ModuleSteps::project_output(module_, concat);
  if (keys_values) *keys_values = std::move(kv);  // no longer in flight: every step waited for its messages
  if (tape) {
    detail::RingRecord<Scalar> r{identity_,
                                 calls_,
                                 module_.config(),
                                 options,
                                 self_attention,
                                 query_layout,
                                 key_layout,
                                 query,
                                 self_attention ? Matrix() : Matrix(key),
                                 self_attention ? Matrix() : Matrix(value),
                                 std::move(q),
                                 std::move(kv),
                                 std::move(concat),
                                 std::move(log_sum_exp)};
    r.options.key_padding_mask = options.key_padding_mask.owning();
    tape->recorded_ = std::move(r);
  }
  statistics_.total_seconds = MPI_Wtime() - start;
  return output;
}

template <typename Scalar>
void RingAttention<Scalar>::check_backward(const RingTape<Scalar>& tape, const Input& d_output,
                                           const Gradients& gradients) const {
  namespace md = mha::detail;
  const char* caller = "RingAttention::backward";
  mha::distributed::detail::CollectiveCheck check(comm_, caller);
  check.local([&] {
    if (tape.empty()) md::fail(caller, ": the tape is empty; record a forward(…, tape) first");
    const detail::RingRecord<Scalar>& f = *tape.recorded_;
    if (f.ring != identity_)
      md::fail(caller,
               ": the tape was recorded by another RingAttention; call backward() on the one whose forward() "
               "recorded it");
    if (!md::same_shape(gradients.config(), module_.config()))
      md::fail(caller, ": gradients are for a module of another shape (", md::describe(gradients.config()),
               ") than this one (", md::describe(module_.config()), "); use the module's zero_gradients()");
    if (&gradients == static_cast<const AttentionParameters<Scalar>*>(&module_))
      md::fail(caller,
               ": gradients is the module itself, whose weights the backward reads; pass the gradients "
               "zero_gradients() made");
    if (d_output.rows() != f.q.rows() || d_output.cols() != module_.d_model())
      md::fail(caller, ": d_output is ", md::shape(d_output), " but this rank's output of the forward was ", f.q.rows(),
               " x ", module_.d_model());
  });
  check.agree_module(module_.config());
  // The same forward call on every rank (a tape of another call would pair blocks of other layouts).
  check.agree("the forward call the tape recorded",
              static_cast<std::int64_t>(tape.empty() ? -1 : static_cast<std::int64_t>(tape.recorded_->call)));
  check.finish();
}

template <typename Scalar>
void RingAttention<Scalar>::add_summed_over_ranks(Gradients& partial, Gradients& gradients) const {
  auto mine = partial.parameters();
  auto theirs = gradients.parameters();  // the same names, in the same order
  Index n = 0;
  for (const auto& p : mine) n += p.value.size();
  std::vector<Scalar> sums(static_cast<std::size_t>(n));
  Index at = 0;
  for (const auto& p : mine) {
    std::copy_n(p.value.data(), p.value.size(), sums.data() + at);
    at += p.value.size();
  }
  MPI_Allreduce(MPI_IN_PLACE, sums.data(), detail::mpi_count(n, "RingAttention::backward"), detail::mpi_type<Scalar>(),
                MPI_SUM, comm_.get());
  at = 0;
  for (auto& p : theirs) {
    p.value += Eigen::Map<const Matrix>(sums.data() + at, p.value.rows(), p.value.cols());
    at += p.value.size();
  }
}

template <typename Scalar>
auto RingAttention<Scalar>::run_backward(const RingTape<Scalar>& tape, const Input& d_output, Gradients& gradients)
    -> InputGradients<Scalar> {
  namespace md = mha::detail;
  const double start = MPI_Wtime();
  check_backward(tape, d_output, gradients);
  statistics_ = RingStatistics();
  const detail::RingRecord<Scalar>& f = *tape.recorded_;
  const SequenceLayout &query_layout = f.query_layout, &key_layout = f.key_layout;
  const Plan plan = make_plan(query_layout, key_layout, f.options);
  const int P = plan.P, rank = comm_.rank();
  const Index h = module_.num_heads(), h_kv = module_.num_kv_heads(), group = h / h_kv;
  const Index d_k = module_.d_k(), d_v = module_.d_v(), kw = key_width(), width = kv_width();
  const auto scale = md::resolve_scale<Scalar>(f.options, d_k);
  const auto mpi = detail::mpi_type<Scalar>();
  const char* caller = "RingAttention::backward";

  // 1. In the forward pass this was: output = concat · W^O + b^O, on this rank's rows. The
  //    parameters' gradients of this rank's rows go to `partial`, summed over the ranks at the end.
  Gradients partial = module_.zero_gradients();
  const Matrix d_concat = md::output_projection_backward<Scalar>(module_, f.concat, d_output, partial);

  // 2. In the forward pass this was: the heads, attending at step s to the block of rank r − s. The
  //    block travels again, with ∂loss/∂[K | V] of its rows (`sums`, in the block's layout): at each
  //    step this rank computes its queries' part of it (`parts`) while the sum so far arrives from
  //    the previous rank, adds the two and passes the sum on, to the next rank or, from the last
  //    rank that needs the block, home. ∂loss/∂Q of this rank's queries accumulates here.
  const std::vector<RowRange>& query_ranges = query_layout.ranges(rank);
  Index longest = 0;
  for (const RowRange& range : query_ranges) longest = std::max(longest, range.size);
  Matrix d_q = Matrix::Zero(f.q.rows(), h * d_k);  // n_q × h·d_k
  Matrix blocks[2], sums[2], parts[2];             // alternately: received blocks, their sums, this rank's parts
  Matrix& home = home_;                            // n_k × width: ∂loss/∂[K | V] of this rank's own block
  std::vector<MPI_Request> sending;                // the sum passed on at the end of the last step
  MPI_Request home_request = MPI_REQUEST_NULL;
  const int home_sender = plan.last_holder(rank);
  if (home_sender != rank) {
    home.resize(f.kv.rows(), width);
    MPI_Irecv(home.data(), detail::mpi_count(home.size(), caller), mpi, home_sender, kHome, comm_.get(), &home_request);
  }
  const Matrix* held = &f.kv;
  for (int step = 0; step < P; ++step) {
    const int origin = (rank - step + P) % P;
    const bool passes_on = step + 1 < P && plan.travels_on(rank, step);
    RingStep stats;
    std::vector<MPI_Request> requests = std::move(sending);
    sending.clear();
    Matrix& incoming = blocks[step % 2];
    Matrix& sum = sums[step % 2];
    Matrix& part = parts[step % 2];
    const Matrix* next_held = pass_blocks(plan, step, held, incoming, requests, stats, caller);
    // The sum of the held block so far, from the rank that held it at the last step.
    const bool has_sum = held && step > 0;
    if (has_sum) {
      sum.resize(held->rows(), width);
      requests.emplace_back();
      MPI_Irecv(sum.data(), detail::mpi_count(sum.size(), caller), mpi, comm_.previous(), kGradient, comm_.get(),
                &requests.back());
    }
    const double compute_start = MPI_Wtime();
    const bool computes = held && plan.needs(rank, origin);
    if (held) part.setZero(held->rows(), width);
    if (computes) {
      const std::vector<RowRange>& key_ranges = key_layout.ranges(origin);
      double flops = 0;
      for (const RowRange& q : query_ranges)
        for (const RowRange& k : key_ranges)
          if (plan.sees(q, k)) flops += 2.5 * md::attention_flops(q.size, k.size, d_k, d_v) * static_cast<double>(h);
      // One task per key/value head: it alone writes that head's columns of the part, to which the
      // query heads of its group add in turn, and their columns of ∂loss/∂Q.
      tasks_with_progress(
          h_kv, flops, requests, [&] { return BackwardScratch(longest, d_k); },
          [&](Index j, BackwardScratch& scratch) {
            Plan::for_each_range(key_ranges, [&](const RowRange& k, Index k0, std::size_t b) {
              Plan::for_each_range(query_ranges, [&](const RowRange& q, Index q0, std::size_t) {
                if (!plan.sees(q, k)) return;
                auto d_q_part = scratch.d_q.topRows(q.size);
                for (Index i = j * group; i < (j + 1) * group; ++i) {
                  md::attention_backward<Scalar>(
                      f.q.block(q0, i * d_k, q.size, d_k), held->block(k0, j * d_k, k.size, d_k),
                      held->block(k0, kw + j * d_v, k.size, d_v), f.concat.block(q0, i * d_v, q.size, d_v),
                      f.log_sum_exp.col(i).data() + q0, d_concat.block(q0, i * d_v, q.size, d_v), scale,
                      plan.visibility(q.begin, k, plan.padding_of(origin, b), i), scratch.attention, d_q_part,
                      part.block(k0, j * d_k, k.size, d_k), part.block(k0, kw + j * d_v, k.size, d_v));
                  d_q.block(q0, i * d_k, q.size, d_k) += d_q_part;
                }
              });
            });
          });
    }
    stats.compute_seconds = MPI_Wtime() - compute_start;
    const double wait_start = MPI_Wtime();
    MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE);
    stats.wait_seconds = MPI_Wtime() - wait_start;
    if (held) {
      Matrix* total = &part;
      if (has_sum) {
        if (computes) sum += part;
        total = &sum;
      }
      // On to the next rank, home from the last rank that needs the block, or kept: this rank's own.
      const int destination = passes_on ? comm_.next() : origin;
      if (destination == rank) {
        home = std::move(*total);
      } else {
        sending.emplace_back();
        MPI_Isend(total->data(), detail::mpi_count(total->size(), caller), mpi, destination,
                  passes_on ? kGradient : kHome, comm_.get(), &sending.back());
        stats.bytes_sent += static_cast<std::size_t>(total->size()) * sizeof(Scalar);
      }
    }
    statistics_.steps.push_back(stats);
    held = next_held;
  }
  // 3. In the forward pass this was: Q W^Q + b^Q and [K W^K + b^K | V W^V + b^V] of this rank's
  //    rows, turned at their global positions. The query's part needs nothing more from the ring:
  //    it runs while the last sum on its way, and this rank's own block's, go home (the same
  //    products as run together with the keys' and values', so the same numbers bit for bit).
  //    One test first starts a message that has arrived already: a network that moves it by
  //    itself (RDMA) then does so meanwhile; in shared memory the receiver copies it there and then.
  sending.push_back(home_request);
  double wait_start = MPI_Wtime();
  int arrived = 0;
  MPI_Testall(static_cast<int>(sending.size()), sending.data(), &arrived, MPI_STATUSES_IGNORE);
  double waited = MPI_Wtime() - wait_start;
  InputGradients<Scalar> d_inputs;
  d_inputs.query = md::query_projection_backward<Scalar>(module_, f.query, query_positions(plan), d_q, partial);
  wait_start = MPI_Wtime();
  MPI_Waitall(static_cast<int>(sending.size()), sending.data(), MPI_STATUSES_IGNORE);
  waited += MPI_Wtime() - wait_start;
  if (!statistics_.steps.empty()) statistics_.steps.back().wait_seconds += waited;
  Matrix d_keys = home.leftCols(kw), d_values = home.rightCols(width - kw);
  const Matrix& key = f.self_attention ? f.query : f.key;
  const Matrix& value = f.self_attention ? f.query : f.value;
  md::key_value_projections_backward<Scalar>(module_, key, value, key_layout.global_rows(rank), d_keys, d_values,
                                             partial, d_inputs.key, d_inputs.value);

  // 4. The parameters' gradients of the whole sequence: the sum of every rank's.
  add_summed_over_ranks(partial, gradients);
  statistics_.total_seconds = MPI_Wtime() - start;
  return d_inputs;
}

}  // namespace distributed
}  // namespace mha
