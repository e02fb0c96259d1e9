// mha — the multi-head attention module, as the lecture builds it: the queries, keys and values
// projected for every head (one product each), scaled dot-product attention per head, the heads
// concatenated, and W^O. Its three passes — forward, backward, decode — read in those steps.
#pragma once

#include <mha/attention.hpp>
#include <mha/config.hpp>
#include <mha/decode_weights.hpp>
#include <mha/detail/batch.hpp>
#include <mha/detail/cache_reads.hpp>
#include <mha/detail/checks.hpp>
#include <mha/detail/products.hpp>
#include <mha/detail/projection_backward.hpp>
#include <mha/detail/stored_products.hpp>
#include <mha/detail/visibility.hpp>
#include <mha/forward_workspace.hpp>
#include <mha/kv_cache.hpp>
#include <mha/mask.hpp>
#include <mha/parameters.hpp>
#include <mha/rotary.hpp>
#include <mha/tape.hpp>
#include <mha/threads.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace mha {
namespace detail {

/// \returns a number that no other module of this process has had: what a tape or a cache
/// records of the module that filled it.
inline std::uint64_t new_module_identity() {
  static std::atomic<std::uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

/// A tag whose type names the alignment Eigen was compiled with (EIGEN_MAX_ALIGN_BYTES, which
/// -march changes): Eigen's matrices of two alignments cannot be passed between translation units.
template <int Bytes>
struct EigenAlignment {};

/// The module's own first and last steps — project the inputs, project the concatenated heads
/// with W^O — for passes that run the attention between them elsewhere (mha/distributed/): one
/// home for the projections.
struct ModuleSteps;

}  // namespace detail

/// Which attention weights forward_with_weights returns.
enum class AttentionWeights {
  /// One L × S matrix per head.
  per_head,
  /// Their mean over the heads, one L × S matrix (PyTorch's average_attn_weights=True).
  averaged,
};

/// The output of a forward pass together with its attention weights.
template <typename Scalar>
struct AttentionResult {
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> output;                ///< L × d_model
  std::vector<Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>> weights;  ///< h or 1 matrices, L × S
};

/// Multi-head attention (Vaswani et al. 2017, §3.2.2), one row per token:
///   head_i = softmax(Q W_i^Q (K W_i^K)ᵀ / √d_k [+ masks]) · V W_i^V      L × d_v
///   output = [head_1 … head_h] · W^O                                  L × d_model
/// with W_i^Q: d_model × d_k, W_i^K: kdim × d_k, W_i^V: vdim × d_v and W^O: (h·d_v) × d_model
/// (kdim = vdim = d_model unless configured), and, when config.bias is set, b^Q, b^K, b^V added to
/// the projections and b^O to the output.
///
/// All heads' query projections live in one d_model × (h·d_k) matrix whose column block i is
/// W_i^Q (likewise K and V), so each projection of all heads is a single matrix product (cut into
/// row blocks for the threads); head i's projected queries are then a contiguous column block, and
/// each head writes its output straight into its column block of the concatenation, which meets
/// W^O in one more product.
template <typename Scalar_>
class MultiHeadAttention : public AttentionParameters<Scalar_> {
  using Base = AttentionParameters<Scalar_>;

 public:
  using Scalar = Scalar_;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  using Index = Eigen::Index;
  /// The gradients of the parameters: the same shapes and views, grads.w_q(i) = ∂loss/∂W_i^Q.
  using Gradients = AttentionParameters<Scalar>;

  using Base::config;
  using Base::d_k;
  using Base::d_model;
  using Base::d_v;
  using Base::kdim;
  using Base::num_heads;
  using Base::num_kv_heads;
  using Base::vdim;

  /// A module of the given shape with deterministic weights: each projection matrix W (rows × cols)
  /// is drawn from U(−a, a), a = √(6 / (rows + cols)) (Xavier-uniform), in the order W^Q, W^K, W^V,
  /// W^O, then bias_k and bias_v when add_bias_kv is set, column by column, from a 64-bit Mersenne
  /// Twister seeded with config.seed. The biases b^Q, b^K, b^V, b^O start at zero, as PyTorch's.
  /// Throws mha::invalid_argument if the configuration is invalid (see
  /// MultiHeadAttentionConfig::resolved).
  explicit MultiHeadAttention(const MultiHeadAttentionConfig& config = {}) : Base(config) {
    std::mt19937_64 engine(config_.seed);
    for (Matrix* w : {&w_q_, &w_k_, &w_v_, &w_o_}) xavier_uniform(*w, engine);
    xavier_uniform(bias_k_, engine);
    xavier_uniform(bias_v_, engine);
  }

  /// A copy is another module: the tapes and caches of the original are not its own (see decode
  /// and backward). A move keeps the module, and so they stay valid for it.
  MultiHeadAttention(const MultiHeadAttention& other) : Base(other) {}
  MultiHeadAttention& operator=(const MultiHeadAttention& other) {
    Base::operator=(other);
    identity_ = detail::new_module_identity();
    return *this;
  }
  MultiHeadAttention(MultiHeadAttention&&) = default;
  MultiHeadAttention& operator=(MultiHeadAttention&&) = default;

  /// \returns gradients for this module, all zero: AttentionParameters of the same shapes, for
  /// backward() to add into.
  Gradients zero_gradients() const { return Gradients(config_); }

  /// Multi-head attention of L queries over S keys and values (cross-attention when they differ):
  ///   query: L × d_model, key: S × kdim, value: S × vdim  →  L × d_model.
  /// Any Eigen expressions are accepted. L = 0 gives a 0 × d_model result; a query row with no
  /// key to attend to (S = 0, or every key masked) gets a head output of zeros, never NaN.
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  Matrix forward(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
                 const Eigen::MatrixBase<DerivedV>& value, const AttentionOptions& options = {}) const {
    return run_forward(query, key, value, {query.rows()}, {key.rows()}, options, {}, "MultiHeadAttention::forward");
  }

  /// Self-attention: forward(x, x, x, options), x: L × d_model  →  L × d_model.
  template <typename Derived>
  Matrix forward(const Eigen::MatrixBase<Derived>& x, const AttentionOptions& options = {}) const {
    const detail::Input<Scalar> rows(x);
    return run_forward(rows, rows, rows, {x.rows()}, {x.rows()}, options, {}, "MultiHeadAttention::forward");
  }

  /// forward(query, key, value, options), the output written into `out` (resized to L × d_model
  /// unless it has that shape already), working in `workspace` (ForwardWorkspace): a forward of
  /// the same shapes and options as the one before it in the same workspace allocates nothing, as
  /// long as the inputs are matrices or blocks of them with contiguous columns (an expression is
  /// evaluated first) and the thread count does not grow. A program that runs the same forward
  /// again and again (a robot's control loop, a server's fixed batch) then neither waits on the
  /// allocator nor touches fresh pages. `out` may be one of the inputs: they are read before it is
  /// written. The same numbers as forward(query, key, value, options), bit for bit.
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  void forward(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
               const Eigen::MatrixBase<DerivedV>& value, Matrix& out, ForwardWorkspace<Scalar>& workspace,
               const AttentionOptions& options = {}) const {
    workspace.query_lengths.assign(1, query.rows());
    workspace.key_lengths.assign(1, key.rows());
    run_forward(query, key, value, workspace.query_lengths, workspace.key_lengths, options, {}, workspace, out,
                "MultiHeadAttention::forward");
  }

  /// Self-attention forward(x, x, x, out, workspace, options).
  template <typename Derived>
  void forward(const Eigen::MatrixBase<Derived>& x, Matrix& out, ForwardWorkspace<Scalar>& workspace,
               const AttentionOptions& options = {}) const {
    const detail::Input<Scalar> rows(x);
    workspace.query_lengths.assign(1, x.rows());
    workspace.key_lengths.assign(1, x.rows());
    run_forward(rows, rows, rows, workspace.query_lengths, workspace.key_lengths, options, {}, workspace, out,
                "MultiHeadAttention::forward");
  }

  /// forward(query, key, value, options), recording into `tape` what backward() needs. The output
  /// is the same as without a tape; the tape costs O((L + S) · width) memory, never L × S.
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  Matrix forward(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
                 const Eigen::MatrixBase<DerivedV>& value, const AttentionOptions& options, Tape<Scalar>& tape) const {
    return run_forward(query, key, value, {query.rows()}, {key.rows()}, options, {nullptr, &tape, false},
                       "MultiHeadAttention::forward");
  }

  /// Self-attention forward(x, options), recording into `tape` what backward() needs (x once).
  template <typename Derived>
  Matrix forward(const Eigen::MatrixBase<Derived>& x, const AttentionOptions& options, Tape<Scalar>& tape) const {
    const detail::Input<Scalar> rows(x);
    return run_forward(rows, rows, rows, {x.rows()}, {x.rows()}, options, {nullptr, &tape, true},
                       "MultiHeadAttention::forward");
  }

  /// forward(query, key, value, options), and the attention weights softmax(…) of every head
  /// (h matrices L × S, S counting add_bias_kv's and add_zero_attn's extra keys), or their mean
  /// over the heads. The weights cost L × S memory per head; forward() never allocates them.
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  AttentionResult<Scalar> forward_with_weights(const Eigen::MatrixBase<DerivedQ>& query,
                                               const Eigen::MatrixBase<DerivedK>& key,
                                               const Eigen::MatrixBase<DerivedV>& value,
                                               const AttentionOptions& options = {},
                                               AttentionWeights which = AttentionWeights::averaged) const {
    AttentionResult<Scalar> result;
    result.output = run_forward(query, key, value, {query.rows()}, {key.rows()}, options,
                                {&result.weights, nullptr, false}, "MultiHeadAttention::forward_with_weights");
    if (which == AttentionWeights::averaged) {
      Matrix mean = Matrix::Zero(query.rows(), key.rows() + extra_keys());
      for (const Matrix& w : result.weights) mean += w;
      mean /= static_cast<Scalar>(num_heads());
      result.weights.assign(1, std::move(mean));
    }
    return result;
  }

  /// A batch of B sequences in one call, their rows stacked: sequence b owns the next
  /// query_lengths[b] rows of `query` and the next key_lengths[b] rows of `key` and `value`.
  /// Ragged batches need no padding and do no work for it; a padded batch (PyTorch's
  /// batch_first (B, L, E) tensor is exactly B·L stacked rows) passes equal lengths and its
  /// options.key_padding_mask, B × S. options.mask, if any, is shared by every sequence (which then
  /// must all have the same L and S). Sequences × heads × query blocks run in parallel.
  /// \returns the outputs, stacked the same way: (Σ L_b) × d_model.
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  Matrix forward_batch(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
                       const Eigen::MatrixBase<DerivedV>& value, const std::vector<Index>& query_lengths,
                       const std::vector<Index>& key_lengths, const AttentionOptions& options = {}) const {
    return run_forward(query, key, value, query_lengths, key_lengths, options, {}, "MultiHeadAttention::forward_batch");
  }

  /// forward_batch(…), recording into `tape` what backward() needs.
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  Matrix forward_batch(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
                       const Eigen::MatrixBase<DerivedV>& value, const std::vector<Index>& query_lengths,
                       const std::vector<Index>& key_lengths, const AttentionOptions& options,
                       Tape<Scalar>& tape) const {
    return run_forward(query, key, value, query_lengths, key_lengths, options, {nullptr, &tape, false},
                       "MultiHeadAttention::forward_batch");
  }

  /// Self-attention over a batch: forward_batch(x, x, x, lengths, lengths, options).
  template <typename Derived>
  Matrix forward_batch(const Eigen::MatrixBase<Derived>& x, const std::vector<Index>& lengths,
                       const AttentionOptions& options = {}) const {
    const detail::Input<Scalar> rows(x);
    return run_forward(rows, rows, rows, lengths, lengths, options, {}, "MultiHeadAttention::forward_batch");
  }

  /// forward_batch(query, key, value, query_lengths, key_lengths, options) into `out`, working in
  /// `workspace`, allocating nothing as forward(query, key, value, out, workspace, options) does.
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  void forward_batch(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
                     const Eigen::MatrixBase<DerivedV>& value, const std::vector<Index>& query_lengths,
                     const std::vector<Index>& key_lengths, Matrix& out, ForwardWorkspace<Scalar>& workspace,
                     const AttentionOptions& options = {}) const {
    run_forward(query, key, value, query_lengths, key_lengths, options, {}, workspace, out,
                "MultiHeadAttention::forward_batch");
  }

  /// Self-attention over a batch into `out`, working in `workspace`.
  template <typename Derived>
  void forward_batch(const Eigen::MatrixBase<Derived>& x, const std::vector<Index>& lengths, Matrix& out,
                     ForwardWorkspace<Scalar>& workspace, const AttentionOptions& options = {}) const {
    const detail::Input<Scalar> rows(x);
    run_forward(rows, rows, rows, lengths, lengths, options, {}, workspace, out, "MultiHeadAttention::forward_batch");
  }

  /// Self-attention over a batch, recording into `tape` what backward() needs (x once).
  template <typename Derived>
  Matrix forward_batch(const Eigen::MatrixBase<Derived>& x, const std::vector<Index>& lengths,
                       const AttentionOptions& options, Tape<Scalar>& tape) const {
    const detail::Input<Scalar> rows(x);
    return run_forward(rows, rows, rows, lengths, lengths, options, {nullptr, &tape, true},
                       "MultiHeadAttention::forward_batch");
  }

  /// \returns an empty key/value cache for decoding `sequences` sequences with this module, holding
  /// up to `max_length` tokens each (0: growing as needed), its numbers kept as Storage: Scalar, or
  /// Eigen::bfloat16 or Eigen::half for half the bytes (make_cache<Eigen::bfloat16>()). See KVCache.
  template <typename Storage = Scalar>
  KVCache<Scalar, Storage> make_cache(Index sequences = 1, Index max_length = 0) const {
    return KVCache<Scalar, Storage>(config_, sequences, max_length);
  }

  /// \returns an empty rolling cache for decoding with a sliding window of `window` keys
  /// (options.window): it keeps only the tokens a window can still see, in memory of about 1.1 ×
  /// `window` tokens allocated once. See KVCache::rolling.
  template <typename Storage = Scalar>
  KVCache<Scalar, Storage> make_rolling_cache(Index window, Index sequences = 1) const {
    return KVCache<Scalar, Storage>::rolling(config_, window, sequences);
  }

  /// \returns this module's W^Q, W^K, W^V and W^O rounded to Storage (Eigen::bfloat16 or
  /// Eigen::half), for decode steps that read half the bytes of float weights:
  /// decode(x, cache, weights). A snapshot of the weights as they are now. See DecodeWeights.
  template <typename Storage>
  DecodeWeights<Scalar, Storage> make_decode_weights() const {
    static_assert(std::is_same<Storage, Eigen::bfloat16>::value || std::is_same<Storage, Eigen::half>::value,
                  "mha::MultiHeadAttention::make_decode_weights: Storage is Eigen::bfloat16 or Eigen::half");
    return DecodeWeights<Scalar, Storage>(identity_, w_q_, w_k_, w_v_, w_o_);
  }

  /// A decode step of causal self-attention: the new tokens x (L_new × d_model) of the cache's one
  /// sequence are projected, their keys and values appended to the cache, and their queries
  /// attend to everything cached, new token i of a sequence that held n tokens at position n + i
  /// seeing the positions ≤ n + i (and > n + i − window with options.window): bottom-right causal.
  /// Its rows equal the rows of forward(all tokens so far, causal) at the same positions, for the
  /// cost of the new tokens alone. One new token over a long cache is split across threads by
  /// parts of 512 keys, merged in log-sum-exp fashion; results do not depend on the thread count.
  /// The query heads that share a key/value head read its cached keys and values together, once.
  /// Options: scale and window; decoding is causal by construction (options.causal and alignment
  /// are not read) and rejects masks, training, add_bias_kv and add_zero_attn.
  /// \returns the new tokens' outputs, L_new × d_model.
  template <typename Derived, typename Storage>
  Matrix decode(const Eigen::MatrixBase<Derived>& x, KVCache<Scalar, Storage>& cache,
                const AttentionOptions& options = {}) const {
    Matrix out;
    decode(x, cache, out, options);
    return out;
  }
  /// decode(x, cache, options), its outputs written into `out` (resized to L_new × d_model unless it
  /// is already): a step into a cache with room (capacity()) then allocates nothing, once a first
  /// step has sized what the cache keeps for its steps to work in (KVCache: workspace), as long as
  /// x is a matrix or a block of one with contiguous columns (a row of a column-major matrix is
  /// copied first: take x as a 1 × d_model matrix) and the thread count does not grow.
  template <typename Derived, typename Storage>
  void decode(const Eigen::MatrixBase<Derived>& x, KVCache<Scalar, Storage>& cache, Matrix& out,
              const AttentionOptions& options = {}) const {
    if (cache.sequences() != 1)
      detail::fail("MultiHeadAttention::decode: the cache holds ", cache.sequences(),
                   " sequences; decode_batch takes the new tokens of each");
    cache.workspace_.new_lengths.assign(1, x.rows());
    run_decode(x, cache.workspace_.new_lengths, cache, options, out, "MultiHeadAttention::decode");
  }

  /// A decode step for every sequence of a batch cache: sequence b's new tokens are the next
  /// new_lengths[b] rows of x (0 for a sequence that has finished), as in decode().
  /// \returns the new tokens' outputs, stacked the same way: (Σ new_lengths) × d_model.
  template <typename Derived, typename Storage>
  Matrix decode_batch(const Eigen::MatrixBase<Derived>& x, const std::vector<Index>& new_lengths,
                      KVCache<Scalar, Storage>& cache, const AttentionOptions& options = {}) const {
    Matrix out;
    run_decode(x, new_lengths, cache, options, out, "MultiHeadAttention::decode_batch");
    return out;
  }
  /// decode_batch(x, new_lengths, cache, options) into `out`, allocating nothing as decode(x,
  /// cache, out, options) does.
  template <typename Derived, typename Storage>
  void decode_batch(const Eigen::MatrixBase<Derived>& x, const std::vector<Index>& new_lengths,
                    KVCache<Scalar, Storage>& cache, Matrix& out, const AttentionOptions& options = {}) const {
    run_decode(x, new_lengths, cache, options, out, "MultiHeadAttention::decode_batch");
  }

  /// decode() and decode_batch() with the projection weights `weights` (make_decode_weights) in
  /// place of the module's own: each step reads them, half the bytes of float weights. In every
  /// other way the same steps, with the same caches.
  template <typename Derived, typename Storage, typename WeightStorage>
  Matrix decode(const Eigen::MatrixBase<Derived>& x, KVCache<Scalar, Storage>& cache,
                const DecodeWeights<Scalar, WeightStorage>& weights, const AttentionOptions& options = {}) const {
    Matrix out;
    decode(x, cache, weights, out, options);
    return out;
  }
  template <typename Derived, typename Storage, typename WeightStorage>
  void decode(const Eigen::MatrixBase<Derived>& x, KVCache<Scalar, Storage>& cache,
              const DecodeWeights<Scalar, WeightStorage>& weights, Matrix& out,
              const AttentionOptions& options = {}) const {
    if (cache.sequences() != 1)
      detail::fail("MultiHeadAttention::decode: the cache holds ", cache.sequences(),
                   " sequences; decode_batch takes the new tokens of each");
    cache.workspace_.new_lengths.assign(1, x.rows());
    run_decode(x, cache.workspace_.new_lengths, cache, options, out, "MultiHeadAttention::decode", &weights);
  }
  template <typename Derived, typename Storage, typename WeightStorage>
  Matrix decode_batch(const Eigen::MatrixBase<Derived>& x, const std::vector<Index>& new_lengths,
                      KVCache<Scalar, Storage>& cache, const DecodeWeights<Scalar, WeightStorage>& weights,
                      const AttentionOptions& options = {}) const {
    Matrix out;
    run_decode(x, new_lengths, cache, options, out, "MultiHeadAttention::decode_batch", &weights);
    return out;
  }
  template <typename Derived, typename Storage, typename WeightStorage>
  void decode_batch(const Eigen::MatrixBase<Derived>& x, const std::vector<Index>& new_lengths,
                    KVCache<Scalar, Storage>& cache, const DecodeWeights<Scalar, WeightStorage>& weights, Matrix& out,
                    const AttentionOptions& options = {}) const {
    run_decode(x, new_lengths, cache, options, out, "MultiHeadAttention::decode_batch", &weights);
  }

  /// A cross-attention memory for decoding, as encoder-decoder generation uses it: the keys
  /// memory_key W^K (+ b^K) and values memory_value W^V (+ b^V) of the encoder's output, projected
  /// once, for every decode_cross step to attend to. memory_key is S × kdim and memory_value S × vdim
  /// (the same matrix, the encoder's output, for the usual kdim = vdim = d_model); with
  /// `memory_lengths`, they stack the memories of a batch of sequences (Σ S_b rows, each S_b ≥ 1).
  /// Not for a module with rotary embeddings (a memory has no positions shared with the decoder's
  /// tokens), add_bias_kv or add_zero_attn. Storage as for make_cache.
  template <typename Storage = Scalar, typename DerivedK, typename DerivedV>
  KVCache<Scalar, Storage> make_cross_cache(const Eigen::MatrixBase<DerivedK>& memory_key,
                                            const Eigen::MatrixBase<DerivedV>& memory_value,
                                            std::vector<Index> memory_lengths = {}) const {
    return run_make_cross_cache<Storage>(memory_key, memory_value, std::move(memory_lengths));
  }
  /// The cross-attention memory of one sequence whose keys and values both come from `memory`.
  template <typename Storage = Scalar, typename Derived>
  KVCache<Scalar, Storage> make_cross_cache(const Eigen::MatrixBase<Derived>& memory) const {
    const detail::Input<Scalar> rows(memory);
    return run_make_cross_cache<Storage>(rows, rows, {});
  }

  /// A decode step of cross-attention: the new tokens x (L_new × d_model) of the memory's one
  /// sequence attend to every key of the memory (no causal rule: the memory is the encoder's). Its
  /// rows equal forward(x, memory, memory)'s, so the steps of a generation together give the rows
  /// of forward(all the decoder's tokens, memory, memory). The memory is read, never changed.
  /// Options: scale; masks, windows and training are refused.
  /// \returns the new tokens' outputs, L_new × d_model.
  template <typename Derived, typename Storage>
  Matrix decode_cross(const Eigen::MatrixBase<Derived>& x, const KVCache<Scalar, Storage>& memory,
                      const AttentionOptions& options = {}) const {
    Matrix out;
    CrossDecodeWorkspace<Scalar> workspace;
    decode_cross(x, memory, out, workspace, options);
    return out;
  }
  /// decode_cross(x, memory, options), its outputs written into `out` (resized to L_new × d_model
  /// unless it is already), working in `workspace` (CrossDecodeWorkspace, which the caller keeps):
  /// a step after one with as many new tokens or more over a memory as long or longer, in the same
  /// workspace, allocates nothing, as long as x is a matrix or a block of one with contiguous columns and the thread
  /// count does not grow. The same numbers as decode_cross(x, memory, options), bit for bit.
  template <typename Derived, typename Storage>
  void decode_cross(const Eigen::MatrixBase<Derived>& x, const KVCache<Scalar, Storage>& memory, Matrix& out,
                    CrossDecodeWorkspace<Scalar>& workspace, const AttentionOptions& options = {}) const {
    if (memory.sequences() != 1)
      detail::fail("MultiHeadAttention::decode_cross: the memory holds ", memory.sequences(),
                   " sequences; decode_cross_batch takes the new tokens of each");
    workspace.work.new_lengths.assign(1, x.rows());
    run_decode_cross(x, workspace.work.new_lengths, memory, options, workspace.work, out,
                     "MultiHeadAttention::decode_cross");
  }
  /// decode_cross for every sequence of a batch memory: sequence b's new tokens are the next
  /// new_lengths[b] rows of x. \returns their outputs, stacked the same way.
  template <typename Derived, typename Storage>
  Matrix decode_cross_batch(const Eigen::MatrixBase<Derived>& x, const std::vector<Index>& new_lengths,
                            const KVCache<Scalar, Storage>& memory, const AttentionOptions& options = {}) const {
    Matrix out;
    CrossDecodeWorkspace<Scalar> workspace;
    decode_cross_batch(x, new_lengths, memory, out, workspace, options);
    return out;
  }
  /// decode_cross_batch(x, new_lengths, memory, options) into `out`, in `workspace`, allocating
  /// nothing as decode_cross(x, memory, out, workspace, options) does.
  template <typename Derived, typename Storage>
  void decode_cross_batch(const Eigen::MatrixBase<Derived>& x, const std::vector<Index>& new_lengths,
                          const KVCache<Scalar, Storage>& memory, Matrix& out, CrossDecodeWorkspace<Scalar>& workspace,
                          const AttentionOptions& options = {}) const {
    run_decode_cross(x, new_lengths, memory, options, workspace.work, out, "MultiHeadAttention::decode_cross_batch");
  }

  /// The backward pass of the forward pass recorded in `tape`: given d_output = ∂loss/∂output
  /// (ΣL × d_model), ADDS ∂loss/∂(every parameter) into `gradients` (as PyTorch accumulates .grad;
  /// call gradients.set_zero() between steps) and returns ∂loss/∂query, ∂loss/∂key, ∂loss/∂value.
  /// Every option of the forward is differentiated: masks, causal, key padding, batches, biases,
  /// add_bias_kv, add_zero_attn and dropout (the same dropped weights as the forward). The weights
  /// must not have changed since the forward. The attention weights are recomputed tile by tile
  /// from the saved log-sum-exp: nothing L × S is stored or allocated (beyond the masks themselves).
  /// The tape must have been recorded by this module (not a copy of it).
  template <typename Derived>
  InputGradients<Scalar> backward(const Tape<Scalar>& tape, const Eigen::MatrixBase<Derived>& d_output,
                                  Gradients& gradients) const {
    return run_backward(tape, d_output, gradients);
  }

 private:
  /// The ABI of the passes compiled by mha::precompiled: the Eigen alignment they were compiled
  /// with is part of their signature, so that a program compiled with another fails to link.
  using Abi = detail::EigenAlignment<EIGEN_MAX_ALIGN_BYTES>;

  /// The backward pass of backward().
  InputGradients<Scalar> run_backward(const Tape<Scalar>& tape, const detail::Input<Scalar>& dy, Gradients& gradients,
                                      Abi = {}) const;

  /// Where a forward pass puts what it returns beside the output.
  struct Record {
    std::vector<Matrix>* weights = nullptr;  ///< each head's attention weights (a batch of one only)
    Tape<Scalar>* tape = nullptr;            ///< what backward() needs
    bool self_attention = false;             ///< query, key and value are the same input
  };

  /// The forward pass over a batch of sequences (one, for forward()) into `out`, working in
  /// `workspace`, recording into `record` what it asks for (a tape takes the workspace's
  /// projections).
  void run_forward(const detail::Input<Scalar>& query, const detail::Input<Scalar>& key,
                   const detail::Input<Scalar>& value, const std::vector<Index>& query_lengths,
                   const std::vector<Index>& key_lengths, const AttentionOptions& options, Record record,
                   ForwardWorkspace<Scalar>& workspace, Matrix& out, const char* caller, Abi = {}) const;
  /// The same in a workspace of its own, \returns the output.
  Matrix run_forward(const detail::Input<Scalar>& query, const detail::Input<Scalar>& key,
                     const detail::Input<Scalar>& value, const std::vector<Index>& query_lengths,
                     const std::vector<Index>& key_lengths, const AttentionOptions& options, Record record,
                     const char* caller) const {
    ForwardWorkspace<Scalar> workspace(false);
    Matrix out;
    run_forward(query, key, value, query_lengths, key_lengths, options, record, workspace, out, caller);
    return out;
  }

  /// The decode step of decode() and decode_batch(), with the module's weights, or with `weights`
  /// where they are given.
  template <typename Storage, typename WeightStorage = Scalar>
  void run_decode(const detail::Input<Scalar>& x, const std::vector<Index>& new_lengths,
                  KVCache<Scalar, Storage>& cache, const AttentionOptions& options, Matrix& out, const char* caller,
                  const DecodeWeights<Scalar, WeightStorage>* weights = nullptr, Abi = {}) const;

  /// The attention of a decode step: the new tokens' queries q (ΣL_new × h·d_k) over their
  /// sequences' cached keys and values (batch: the new lengths, and the cache's lengths after the
  /// step). Writes the concatenated heads, ΣL_new × h·d_v, into workspace.concat, working in the
  /// workspace's memory (which run_decode keeps in the cache, so that its steps allocate nothing).
  ///
  /// Several new tokens of a sequence (a prompt, draft tokens) run by query blocks, one task per
  /// head and block, bottom-right causal. One new token sees every cached key of its window, so no
  /// mask is needed; its keys are split into parts of kKeyBlock, one task per key/value head and
  /// part, merged afterwards in log-sum-exp fashion in a fixed order, so that one token over a long
  /// cache uses every thread and the result does not depend on the thread count. A part's task
  /// (detail::attend_to_part) runs the query heads that share its key/value head together: the
  /// part's keys and values are read from memory once per group, not once per head, and a cache of
  /// bfloat16 or half is converted to Scalar in registers as it is read. For several new tokens, a
  /// reduced cache is converted a head at a time into the task's scratch.
  template <typename Storage>
  void attend_to_cache(const Matrix& q, const detail::Batch& batch, const KVCache<Scalar, Storage>& cache, Scalar scale,
                       Index window, bool causal, detail::DecodeWorkspace<Scalar>& workspace) const;

  /// make_cross_cache and decode_cross, once their inputs are views.
  template <typename Storage>
  KVCache<Scalar, Storage> run_make_cross_cache(const detail::Input<Scalar>& memory_key,
                                                const detail::Input<Scalar>& memory_value,
                                                std::vector<Index> memory_lengths, Abi = {}) const;
  template <typename Storage>
  void run_decode_cross(const detail::Input<Scalar>& x, const std::vector<Index>& new_lengths,
                        const KVCache<Scalar, Storage>& memory, const AttentionOptions& options,
                        detail::DecodeWorkspace<Scalar>& work, Matrix& out, const char* caller, Abi = {}) const;

  // ---- The steps the passes share ----

  /// How head i of sequence b sees its keys; the same in the forward and the backward.
  detail::KeyVisibility<Scalar> visibility(const AttentionOptions& options, const detail::AdditiveMasks<Scalar>& masks,
                                           const detail::Batch& batch, Index b, Index i) const {
    return detail::key_visibility(options, masks, batch.query_lengths[b], batch.key_lengths[b], b, i, num_heads(),
                                  config_.dropout);
  }

  friend struct detail::ModuleSteps;

  /// The number of keys appended to every sequence: add_bias_kv's row, add_zero_attn's row.
  Index extra_keys() const { return Index(config_.add_bias_kv) + Index(config_.add_zero_attn); }

  /// q = query · W^Q + b^Q, k = key · W^K + b^K, v = value · W^V + b^V: each one product for all
  /// heads, cut into row blocks that run in parallel; with rotary embeddings the rows of q and k
  /// are then turned by their positions. The blocks are collected in `jobs` where it is given (a
  /// workspace's, which keeps its memory), else in a list of their own.
  void project_inputs(const detail::ConstMatrixRef<Scalar>& query, const detail::ConstMatrixRef<Scalar>& key,
                      const detail::ConstMatrixRef<Scalar>& value, const std::vector<Index>& query_positions,
                      const std::vector<Index>& key_positions, Matrix& q, Matrix& k, Matrix& v,
                      detail::RowBlockJobs<Scalar>* jobs = nullptr) const {
    project_inputs(query, key, value, query_positions, key_positions, q, k, v, w_q_, w_k_, w_v_, jobs);
  }
  /// The same with other weights of the same shapes in place of W^Q, W^K and W^V.
  void project_inputs(const detail::ConstMatrixRef<Scalar>& query, const detail::ConstMatrixRef<Scalar>& key,
                      const detail::ConstMatrixRef<Scalar>& value, const std::vector<Index>& query_positions,
                      const std::vector<Index>& key_positions, Matrix& q, Matrix& k, Matrix& v, const Matrix& w_q,
                      const Matrix& w_k, const Matrix& w_v, detail::RowBlockJobs<Scalar>* jobs = nullptr) const;

  /// A decode step's projections of its new tokens x into work.q, work.k and work.v, at
  /// work.positions: with the module's weights, or with `weights` where they are given (a step of
  /// a few tokens reading them in place, a longer one converting them first).
  template <typename WeightStorage>
  void project_step_inputs(const detail::Input<Scalar>& x, const DecodeWeights<Scalar, WeightStorage>* weights,
                           detail::DecodeWorkspace<Scalar>& work) const {
    if constexpr (!std::is_same<WeightStorage, Scalar>::value) {
      if (weights && x.rows() <= detail::kStoredProductRows) {
        work.q.resize(x.rows(), w_q_.cols());
        work.k.resize(x.rows(), w_k_.cols());
        work.v.resize(x.rows(), w_v_.cols());
        detail::stored_products<Scalar, WeightStorage>(
            x, {{&weights->w_q_, &b_q_, &work.q}, {&weights->w_k_, &b_k_, &work.k}, {&weights->w_v_, &b_v_, &work.v}},
            work.stored);
        if (config_.rotary) {
          const RotaryEmbedding rotary(config_);
          rotary.rotate(work.q, work.positions.data());
          rotary.rotate(work.k, work.positions.data());
        }
      } else if (weights) {
        project_inputs(x, x, x, work.positions, work.positions, work.q, work.k, work.v,
                       weights->w_q_.template cast<Scalar>(), weights->w_k_.template cast<Scalar>(),
                       weights->w_v_.template cast<Scalar>());
      }
      if (weights) return;
    }
    project_inputs(x, x, x, work.positions, work.positions, work.q, work.k, work.v);
  }
  /// A decode step's out = work.concat · W^O + b^O, as project_step_inputs.
  template <typename WeightStorage>
  void project_step_output(const DecodeWeights<Scalar, WeightStorage>* weights, detail::DecodeWorkspace<Scalar>& work,
                           Matrix& out) const {
    if constexpr (!std::is_same<WeightStorage, Scalar>::value) {
      if (weights && work.concat.rows() <= detail::kStoredProductRows) {
        out.resize(work.concat.rows(), d_model());
        detail::stored_products<Scalar, WeightStorage>(work.concat, {{&weights->w_o_, &b_o_, &out}}, work.stored);
      } else if (weights) {
        project_output(work.concat, out, weights->w_o_.template cast<Scalar>());
      }
      if (weights) return;
    }
    project_output(work.concat, out);
  }

  /// \returns concat · W^O + b^O, in row blocks in parallel.
  Matrix project_output(const Matrix& concat) const {
    Matrix output;
    project_output(concat, output);
    return output;
  }
  /// output = concat · W^O + b^O, output resized unless it has the shape already; with `w_o`, that
  /// matrix in place of W^O; the blocks collected in `jobs` where it is given, as project_inputs.
  void project_output(const Matrix& concat, Matrix& output, detail::RowBlockJobs<Scalar>* jobs = nullptr) const {
    project_output(concat, output, w_o_, jobs);
  }
  void project_output(const Matrix& concat, Matrix& output, const Matrix& w_o,
                      detail::RowBlockJobs<Scalar>* jobs = nullptr) const {
    output.resize(concat.rows(), d_model());
    detail::RowBlockJobs<Scalar> own;
    detail::RowBlockJobs<Scalar>& blocks = jobs ? *jobs : own;
    blocks.product(detail::operand(concat), detail::operand(w_o), output, false, &b_o_);
    blocks.run();
  }

  // ---- Checks: every argument before any work, so that a throw leaves everything unchanged ----

  void check_forward(const detail::Input<Scalar>& query, const detail::Input<Scalar>& key,
                     const detail::Input<Scalar>& value, const std::vector<Index>& query_lengths,
                     const std::vector<Index>& key_lengths, const AttentionOptions& options, const char* caller) const {
    detail::check_width(query, "query", d_model(), "d_model", caller);
    detail::check_width(key, "key", kdim(), kdim() == d_model() ? "d_model" : "kdim", caller);
    detail::check_width(value, "value", vdim(), vdim() == d_model() ? "d_model" : "vdim", caller);
    if (key.rows() != value.rows())
      detail::fail(caller, ": key has ", key.rows(), " rows but value has ", value.rows(), " (key is ",
                   detail::shape(key), ", value is ", detail::shape(value), ")");
    if (query_lengths.size() != key_lengths.size())
      detail::fail(caller, ": query_lengths has ", query_lengths.size(), " sequences but key_lengths has ",
                   key_lengths.size());
    detail::check_lengths_add_up(query_lengths, query.rows(), "query_lengths", "query", caller);
    detail::check_lengths_add_up(key_lengths, key.rows(), "key_lengths", "key", caller);
    check_masks(options, query_lengths, key_lengths, caller);
    detail::resolve_scale<Scalar>(options, d_k());
    detail::resolve_window(options);
  }

  /// Checks the masks' shapes against the batch.
  void check_masks(const AttentionOptions& options, const std::vector<Index>& query_lengths,
                   const std::vector<Index>& key_lengths, const char* caller) const {
    const auto all_equal = [](const std::vector<Index>& v) {
      return std::all_of(v.begin(), v.end(), [&](Index n) { return n == v.front(); });
    };
    const Index batch = static_cast<Index>(query_lengths.size());
    const Index L = batch ? query_lengths.front() : 0, S = batch ? key_lengths.front() : 0;
    if (!options.mask.empty()) {
      if (!all_equal(query_lengths) || !all_equal(key_lengths))
        detail::fail(caller, ": options.mask is shared by every sequence, so all need the same query and key lengths");
      const bool per_head = options.mask.rows() == num_heads() * L && num_heads() > 1;
      if ((options.mask.rows() != L && !per_head) || options.mask.cols() != S)
        detail::fail(caller, ": options.mask is ", options.mask.rows(), " x ", options.mask.cols(),
                     " but must be L x S = ", L, " x ", S, " (or h*L x S = ", num_heads() * L, " x ", S,
                     " for one mask per head)");
    }
    if (!options.key_padding_mask.empty()) {
      if (!all_equal(key_lengths))
        detail::fail(caller, ": options.key_padding_mask needs every sequence to have the same number of keys");
      if (options.key_padding_mask.rows() != batch || options.key_padding_mask.cols() != S)
        detail::fail(caller, ": options.key_padding_mask is ", options.key_padding_mask.rows(), " x ",
                     options.key_padding_mask.cols(), " but must be B x S = ", batch, " x ", S,
                     " (one row per sequence)");
    }
  }

  /// Checks a decode step's arguments; \returns the owner its tokens will have in the cache.
  template <typename Storage>
  detail::CacheOwner check_decode(const detail::Input<Scalar>& x, const std::vector<Index>& new_lengths,
                                  const KVCache<Scalar, Storage>& cache, const AttentionOptions& options,
                                  const char* caller) const {
    detail::check_width(x, "x", d_model(), "d_model", caller);
    if (kdim() != d_model() || vdim() != d_model())
      detail::fail(caller, ": decoding is self-attention, so kdim and vdim must equal d_model = ", d_model(),
                   "; this module has kdim = ", kdim(), " and vdim = ", vdim());
    if (!detail::same_shape(cache.config(), config_) || !detail::same_rotation(cache.config(), config_))
      detail::fail(caller, ": the cache was made for a module of another shape (", detail::describe(cache.config()),
                   ") than this one (", detail::describe(config_), "); use make_cache()");
    if (static_cast<Index>(new_lengths.size()) != cache.sequences())
      detail::fail(caller, ": new_lengths has ", new_lengths.size(), " sequences but the cache holds ",
                   cache.sequences());
    detail::check_lengths_add_up(new_lengths, x.rows(), "new_lengths", "x", caller);
    if (!options.mask.empty() || !options.key_padding_mask.empty())
      detail::fail(caller,
                   ": options.mask and options.key_padding_mask are not read when decoding (decoding is "
                   "causal by construction); leave them empty");
    if (options.training) detail::fail(caller, ": decoding is inference; options.training must be false");
    if (extra_keys() > 0)
      detail::fail(caller, ": a module with add_bias_kv or add_zero_attn cannot decode with a cache");
    detail::resolve_window(options);
    const detail::CacheOwner owner{identity_, options.window,
                                   static_cast<double>(detail::resolve_scale<Scalar>(options, d_k()))};
    cache.check_append(owner, new_lengths, caller);
    return owner;
  }

  void check_backward(const Tape<Scalar>& tape, const detail::Input<Scalar>& d_output,
                      const Gradients& gradients) const {
    const char* caller = "MultiHeadAttention::backward";
    if (tape.empty()) detail::fail(caller, ": the tape is empty; record a forward(…, tape) first");
    const detail::TapedForward<Scalar>& f = tape.recorded();
    if (!detail::same_shape(f.config, config_) || !detail::same_rotation(f.config, config_))
      detail::fail(caller, ": the tape was recorded by a module of another shape (", detail::describe(f.config),
                   ") than this one (", detail::describe(config_), ")");
    if (f.module != identity_)
      detail::fail(caller,
                   ": the tape was recorded by another module of the same shape; call backward() on the "
                   "module whose forward() recorded it");
    if (!detail::same_shape(gradients.config(), config_))
      detail::fail(caller, ": gradients are for a module of another shape (", detail::describe(gradients.config()),
                   ") than this one (", detail::describe(config_), "); use zero_gradients()");
    if (&gradients == static_cast<const Base*>(this))
      detail::fail(caller,
                   ": gradients is this module itself, whose weights the backward reads; pass the gradients "
                   "zero_gradients() made");
    if (d_output.rows() != f.q.rows() || d_output.cols() != d_model())
      detail::fail(caller, ": d_output is ", detail::shape(d_output), " but the forward's output was ", f.q.rows(),
                   " x ", d_model());
  }

  template <typename Dense>
  static void xavier_uniform(Dense& w, std::mt19937_64& engine) {
    // The uniform draw is built from the engine's bits (not std::uniform_real_distribution, whose
    // algorithm differs between standard libraries), so a seed gives the same weights everywhere.
    const double bound = std::sqrt(6.0 / static_cast<double>(w.rows() + w.cols()));
    for (Index j = 0; j < w.cols(); ++j)
      for (Index i = 0; i < w.rows(); ++i) {
        const double unit = static_cast<double>(engine() >> 11) * 0x1.0p-53;  // [0, 1)
        w(i, j) = static_cast<Scalar>((2.0 * unit - 1.0) * bound);
      }
  }

  using Base::b_k_;
  using Base::b_o_;
  using Base::b_q_;
  using Base::b_v_;
  using Base::bias_k_;
  using Base::bias_v_;
  using Base::config_;
  using Base::w_k_;
  using Base::w_o_;
  using Base::w_q_;
  using Base::w_v_;

  std::uint64_t identity_ = detail::new_module_identity();  ///< what its tapes and caches record of it
};

// ---- The passes, defined outside the class so that mha::precompiled's explicit instantiations
// ---- are the only copy a program using it compiles (see the end of this file).

/// The backward pass: the forward's steps in reverse, each step's gradients beside the step it undoes.
template <typename Scalar_>
auto MultiHeadAttention<Scalar_>::run_backward(const Tape<Scalar>& tape, const detail::Input<Scalar>& dy,
                                               Gradients& gradients, Abi) const -> InputGradients<Scalar> {
  check_backward(tape, dy, gradients);
  const detail::TapedForward<Scalar>& f = tape.recorded();
  const Index h = num_heads(), h_kv = num_kv_heads(), group = h / h_kv;
  const detail::Batch batch(f.query_lengths, f.key_lengths, extra_keys());
  const Matrix& key = f.self_attention ? f.query : f.key;
  const Matrix& value = f.self_attention ? f.query : f.value;

  // In the forward pass this was: output = concat · W^O + b^O.
  const Matrix d_concat = detail::output_projection_backward<Scalar>(*this, f.concat, dy, gradients);  // ΣL × h·d_v

  // In the forward pass this was: head_i = attention(Q W_i^Q, K W_j^K, V W_j^V), j = i / group.
  // One task per sequence and key/value head, owning its rows of ∂loss/∂(K W^K) and
  // ∂loss/∂(V W^V), to which the heads of its group add in turn, and their ∂loss/∂(Q W^Q).
  Matrix d_q(f.q.rows(), h * d_k());               // ΣL × h·d_k
  Matrix d_keys(f.keys.rows(), h_kv * d_k());      // (ΣS + B·extra) × h_kv·d_k
  Matrix d_values(f.values.rows(), h_kv * d_v());  // (ΣS + B·extra) × h_kv·d_v
  const detail::AdditiveMasks<Scalar> masks(f.options);
  const auto scale = detail::resolve_scale<Scalar>(f.options, d_k());
  detail::parallel_tasks(
      batch.size() * h_kv, 2.5 * batch.attention_flops(h, d_k(), d_v()),
      [&] {
        return detail::AttentionBackwardScratch<Scalar>::for_problem(batch.max_L, batch.max_S + batch.extra_keys,
                                                                     d_k());
      },
      [&](Index t, detail::AttentionBackwardScratch<Scalar>& scratch) {
        const Index b = t / h_kv, j = t % h_kv;
        const Index L_b = batch.query_lengths[b], S_b = batch.key_lengths[b] + batch.extra_keys;
        const Index q0 = batch.q_offset[b], k0 = batch.k_offset[b];
        auto d_k_head = d_keys.block(k0, j * d_k(), S_b, d_k());
        auto d_v_head = d_values.block(k0, j * d_v(), S_b, d_v());
        d_k_head.setZero();
        d_v_head.setZero();
        for (Index i = j * group; i < (j + 1) * group; ++i)
          detail::attention_backward<Scalar>(
              f.q.block(q0, i * d_k(), L_b, d_k()), f.keys.block(k0, j * d_k(), S_b, d_k()),
              f.values.block(k0, j * d_v(), S_b, d_v()), f.concat.block(q0, i * d_v(), L_b, d_v()),
              f.log_sum_exp.col(i).data() + q0, d_concat.block(q0, i * d_v(), L_b, d_v()), scale,
              visibility(f.options, masks, batch, b, i), scratch, d_q.block(q0, i * d_k(), L_b, d_k()), d_k_head,
              d_v_head);
      });

  // In the forward pass this was: the extra rows of add_bias_kv (bias_k, bias_v) and
  // add_zero_attn (constants) appended to each sequence's projected keys and values.
  if (batch.extra_keys > 0) {
    Matrix d_k_rows, d_v_rows;
    auto d_bias_k = config_.add_bias_kv ? std::optional(gradients.bias_k()) : std::nullopt;
    auto d_bias_v = config_.add_bias_kv ? std::optional(gradients.bias_v()) : std::nullopt;
    detail::remove_extra_rows(d_keys, batch, d_k_rows, d_bias_k ? &*d_bias_k : nullptr);
    detail::remove_extra_rows(d_values, batch, d_v_rows, d_bias_v ? &*d_bias_v : nullptr);
    d_keys = std::move(d_k_rows);    // ΣS × h_kv·d_k
    d_values = std::move(d_v_rows);  // ΣS × h_kv·d_v
  }

  // In the forward pass this was: Q W^Q + b^Q, K W^K + b^K, V W^V + b^V, the rows of the first two
  // turned by their positions (a rotation's inverse is its transpose: the gradients turn back by
  // the same angles).
  std::vector<Index> query_positions, key_positions;
  if (config_.rotary) {
    query_positions = detail::query_positions(batch, f.options.alignment);
    key_positions = detail::key_positions(batch);
  }
  return detail::input_projections_backward<Scalar>(*this, f.query, key, value, query_positions, key_positions, d_q,
                                                    d_keys, d_values, gradients);
}

/// The forward pass over a batch of sequences (one, for forward()), in the lecture's steps.
template <typename Scalar_>
void MultiHeadAttention<Scalar_>::run_forward(const detail::Input<Scalar>& query, const detail::Input<Scalar>& key,
                                              const detail::Input<Scalar>& value,
                                              const std::vector<Index>& query_lengths,
                                              const std::vector<Index>& key_lengths, const AttentionOptions& options,
                                              Record record, ForwardWorkspace<Scalar>& work, Matrix& out,
                                              const char* caller, Abi) const {
  check_forward(query, key, value, query_lengths, key_lengths, options, caller);
  const Index h = num_heads(), group = h / num_kv_heads();
  detail::Batch& batch = work.batch;
  batch.assign(query_lengths, key_lengths, extra_keys());
  const auto scale = detail::resolve_scale<Scalar>(options, d_k());

  // 1. Project: Q W^Q, K W^K, V W^V for all heads at once (rotated by their positions with
  //    rotary embeddings), and add_bias_kv's and add_zero_attn's rows after each sequence's keys.
  detail::query_positions(batch, options.alignment, work.query_positions);
  detail::key_positions(batch, work.key_positions);
  Matrix& q = work.q;  // ΣL × h·d_k
  project_inputs(query, key, value, work.query_positions, work.key_positions, q, work.keys, work.values, &work.jobs);
  Matrix* keys = &work.keys;  // ΣS × h_kv·d_k, or (ΣS + B·extra) × h_kv·d_k with the extra rows
  Matrix* values = &work.values;
  if (batch.extra_keys > 0) {
    detail::append_extra_rows(work.keys, batch, config_.add_bias_kv ? &bias_k_ : nullptr, config_.add_zero_attn,
                              work.extended_keys);
    detail::append_extra_rows(work.values, batch, config_.add_bias_kv ? &bias_v_ : nullptr, config_.add_zero_attn,
                              work.extended_values);
    keys = &work.extended_keys;
    values = &work.extended_values;
  }

  // 2. Attend: head i of sequence b, block by block of query rows, over key/value head
  //    j = i / group, writing its output straight into its column block of the concatenation.
  detail::query_block_tasks(batch, h, 1, work.tasks);
  if (record.weights) record.weights->assign(h, Matrix::Zero(q.rows(), keys->rows()));
  Matrix log_sum_exp(record.tape ? q.rows() : 0, h);  // ΣL × h
  Matrix& concat = work.concat;                       // ΣL × h·d_v: [head_1 … head_h]
  concat.resize(q.rows(), h * d_v());
  work.masks.assign(options);
  const detail::AdditiveMasks<Scalar>& masks = work.masks;
  // Each thread's tiles, in the workspace: grown where this forward needs more, else as they are.
  // A kept workspace readies every thread's, and after the loop every thread's room for packed
  // blocks too, since a thread that got no task in one forward may get one in the next.
  const Index tile_keys = batch.max_S + batch.extra_keys;
  if (work.threads.size() < static_cast<std::size_t>(detail::thread_count()))
    work.threads.resize(static_cast<std::size_t>(detail::thread_count()));
  if (work.kept_)
    for (auto& kept : work.threads) detail::fit_scratch(kept, batch.max_L, tile_keys, d_k());
  const auto thread_scratch = [&] { return &work.threads[static_cast<std::size_t>(detail::thread_index())]; };
  detail::parallel_tasks(
      static_cast<Index>(work.tasks.size()), batch.attention_flops(h, d_k(), d_v()), thread_scratch,
      [&](Index t, std::optional<detail::AttentionScratch<Scalar>>* kept) {
        const auto [b, i, block] = work.tasks[static_cast<std::size_t>(t)];
        const Index L_b = batch.query_lengths[b], S_b = batch.key_lengths[b] + batch.extra_keys;
        const Index q0 = batch.q_offset[b], k0 = batch.k_offset[b], j = i / group;
        auto& scratch = detail::fit_scratch(*kept, batch.max_L, tile_keys, d_k());  // as it is, when kept
        detail::attention_query_block<Scalar>(
            q.block(q0, i * d_k(), L_b, d_k()), detail::operand(keys->block(k0, j * d_k(), S_b, d_k())),
            detail::operand(values->block(k0, j * d_v(), S_b, d_v())), scale, visibility(options, masks, batch, b, i),
            block, scratch, concat.block(q0, i * d_v(), L_b, d_v()),
            record.weights ? &(*record.weights)[static_cast<std::size_t>(i)] : nullptr,
            record.tape ? log_sum_exp.col(i).data() + q0 : nullptr);
      });
  if (work.kept_)
    detail::grow_to_largest(work.threads.size(),
                            [&](std::size_t t) -> detail::PackingSpace<Scalar>& { return work.threads[t]->packing; });

  // 3. Concatenate (done: each head wrote its own columns) and project with W^O. The inputs have
  //    all been read: `out` may be one of them.
  project_output(concat, out, &work.jobs);  // ΣL × d_model
  if (record.tape) {
    detail::TapedForward<Scalar> taped{identity_,
                                       config_,
                                       options,
                                       record.self_attention,
                                       query_lengths,
                                       key_lengths,
                                       query,
                                       Matrix(),
                                       Matrix(),
                                       std::move(q),
                                       std::move(*keys),
                                       std::move(*values),
                                       std::move(concat),
                                       std::move(log_sum_exp)};
    // The tape's own copy of the masks: its backward may come after the caller's matrices are gone.
    taped.options.mask = options.mask.owning();
    taped.options.key_padding_mask = options.key_padding_mask.owning();
    if (!record.self_attention) {
      taped.key = key;
      taped.value = value;
    }
    record.tape->record(std::move(taped));
  }
}

/// A decode step: the new tokens' keys and values appended to the cache, their queries attending to
/// it, in the memory the cache keeps for its steps.
template <typename Scalar_>
template <typename Storage, typename WeightStorage>
void MultiHeadAttention<Scalar_>::run_decode(const detail::Input<Scalar>& x, const std::vector<Index>& new_lengths,
                                             KVCache<Scalar, Storage>& cache, const AttentionOptions& options,
                                             Matrix& out, const char* caller,
                                             const DecodeWeights<Scalar, WeightStorage>* weights, Abi) const {
  const detail::CacheOwner owner = check_decode(x, new_lengths, cache, options, caller);
  if (weights && weights->module_ != identity_)
    detail::fail(caller,
                 ": the weights were made by another module (or by this one before it was assigned to); use "
                 "make_decode_weights()");
  detail::DecodeWorkspace<Scalar>& work = cache.workspace_;
  // New token i of sequence b, which had n tokens, is at position n + i: the bottom-right
  // alignment of the new tokens over all the sequence's tokens (the positions rotary turns by).
  work.lengths_after.resize(new_lengths.size());
  for (std::size_t b = 0; b < new_lengths.size(); ++b)
    work.lengths_after[b] = cache.length(static_cast<Index>(b)) + new_lengths[b];
  work.batch.assign(new_lengths, work.lengths_after);
  detail::query_positions(work.batch, CausalAlignment::bottom_right, work.positions);

  // 1. Project the new tokens, and append their keys and values to the cache. If anything
  //    throws from here on (std::bad_alloc, say), the cache is rolled back to the tokens it held.
  project_step_inputs(x, weights, work);
  cache.append(owner, new_lengths, work.k, work.v);
  // The keys attended are those held: all of them, or a rolling cache's last ones, which are
  // still aligned bottom-right with the new tokens.
  work.held.resize(new_lengths.size());
  for (std::size_t b = 0; b < new_lengths.size(); ++b) work.held[b] = cache.held(static_cast<Index>(b));
  work.batch.assign(new_lengths, work.held);
  try {
    // 2. Attend over the cache, 3. concatenate and project with W^O.
    attend_to_cache(work.q, work.batch, cache, static_cast<Scalar>(owner.scale), options.window, true, work);
    project_step_output(weights, work, out);
  } catch (...) {
    for (std::size_t b = 0; b < new_lengths.size(); ++b)
      cache.truncate(static_cast<Index>(b), work.lengths_after[b] - new_lengths[b]);
    throw;
  }
}

/// The cross-attention memory: keys and values projected once, appended as the cache's only tokens.
template <typename Scalar_>
template <typename Storage>
auto MultiHeadAttention<Scalar_>::run_make_cross_cache(const detail::Input<Scalar>& memory_key,
                                                       const detail::Input<Scalar>& memory_value,
                                                       std::vector<Index> memory_lengths, Abi) const
    -> KVCache<Scalar, Storage> {
  const char* caller = "MultiHeadAttention::make_cross_cache";
  detail::check_width(memory_key, "memory_key", kdim(), "kdim", caller);
  detail::check_width(memory_value, "memory_value", vdim(), "vdim", caller);
  if (memory_key.rows() != memory_value.rows())
    detail::fail(caller, ": memory_key is ", detail::shape(memory_key), " and memory_value ",
                 detail::shape(memory_value), "; they need the same rows (one per memory token)");
  if (memory_lengths.empty()) memory_lengths = {memory_key.rows()};
  detail::check_lengths_add_up(memory_lengths, memory_key.rows(), "memory_lengths", "memory_key", caller);
  for (std::size_t b = 0; b < memory_lengths.size(); ++b)
    if (memory_lengths[b] < 1)
      detail::fail(caller, ": sequence ", b, " has an empty memory; every query needs a key to attend to");
  if (config_.rotary)
    detail::fail(caller,
                 ": this module turns queries and keys by their positions (rotary), which a cross-attention "
                 "memory does not share with the decoder's tokens");
  if (extra_keys() > 0) detail::fail(caller, ": a module with add_bias_kv or add_zero_attn cannot decode with a cache");
  Matrix q, k, v;
  const Matrix no_query(0, d_model());
  project_inputs(no_query, memory_key, memory_value, {}, {}, q, k, v);
  KVCache<Scalar, Storage> memory(config_, static_cast<Index>(memory_lengths.size()));
  detail::CacheOwner owner;
  owner.module = identity_;
  owner.cross = true;
  memory.append(owner, memory_lengths, k, v);
  return memory;
}

/// A cross-attention decode step: the new tokens' queries over the whole memory, no causal rule.
template <typename Scalar_>
template <typename Storage>
void MultiHeadAttention<Scalar_>::run_decode_cross(const detail::Input<Scalar>& x,
                                                   const std::vector<Index>& new_lengths,
                                                   const KVCache<Scalar, Storage>& memory,
                                                   const AttentionOptions& options,
                                                   detail::DecodeWorkspace<Scalar>& work, Matrix& out,
                                                   const char* caller, Abi) const {
  detail::check_width(x, "x", d_model(), "d_model", caller);
  if (!detail::same_shape(memory.config(), config_))
    detail::fail(caller, ": the memory was made for a module of another shape (", detail::describe(memory.config()),
                 ") than this one (", detail::describe(config_), ")");
  if (memory.empty() || !memory.owner().cross || memory.owner().module != identity_)
    detail::fail(caller,
                 ": the cache is not a cross-attention memory of this module; make it with this module's "
                 "make_cross_cache()");
  if (static_cast<Index>(new_lengths.size()) != memory.sequences())
    detail::fail(caller, ": new_lengths has ", new_lengths.size(), " sequences but the memory holds ",
                 memory.sequences());
  detail::check_lengths_add_up(new_lengths, x.rows(), "new_lengths", "x", caller);
  if (!options.mask.empty() || !options.key_padding_mask.empty() || options.window != 0 || options.causal)
    detail::fail(caller,
                 ": cross-attention decoding sees the whole memory: options.mask, options.key_padding_mask, "
                 "options.window and options.causal must be left unset");
  if (options.training) detail::fail(caller, ": decoding is inference; options.training must be false");
  // The memory is read only, and may be read by several steps at once: each works in the
  // workspace its caller gives it (whose contents mean nothing between steps).
  work.held.resize(new_lengths.size());
  for (std::size_t b = 0; b < new_lengths.size(); ++b) {
    work.held[b] = memory.length(static_cast<Index>(b));
    if (work.held[b] < 1)
      detail::fail(caller, ": sequence ", b, " of the memory holds no token (it was truncated or reset)");
  }
  work.batch.assign(new_lengths, work.held);
  const Matrix no_key(0, kdim()), no_value(0, vdim());  // zero rows: no memory of their own
  project_inputs(x, no_key, no_value, {}, {}, work.q, work.k, work.v);
  attend_to_cache(work.q, work.batch, memory, detail::resolve_scale<Scalar>(options, d_k()), 0, false, work);
  project_output(work.concat, out);
}

template <typename Scalar_>
template <typename Storage>
void MultiHeadAttention<Scalar_>::attend_to_cache(const Matrix& q, const detail::Batch& batch,
                                                  const KVCache<Scalar, Storage>& cache, Scalar scale, Index window,
                                                  bool causal, detail::DecodeWorkspace<Scalar>& work) const {
  const Index h = num_heads(), h_kv = num_kv_heads(), group = h / h_kv;
  detail::query_block_tasks(batch, h, 2, work.blocks);
  AttentionOptions bottom_right;
  bottom_right.causal = causal;
  bottom_right.alignment = CausalAlignment::bottom_right;
  bottom_right.window = window;
  const detail::AdditiveMasks<Scalar> no_masks(bottom_right);
  const auto sequences = static_cast<std::size_t>(batch.size());
  work.first_key.assign(sequences, 0);
  work.part_count.assign(sequences, 0);
  if (work.part_outs.size() < sequences) {
    work.part_outs.resize(sequences);
    work.part_lses.resize(sequences);
  }
  // Room for the parts of as many keys as the cache holds without growing: the next steps then
  // find it there.
  const auto room = [&](Index b) {
    return (std::max(cache.capacity(b), batch.key_lengths[b]) + detail::kKeyBlock - 1) / detail::kKeyBlock;
  };
  Index most_parts = 0;
  for (Index b = 0; b < batch.size(); ++b)
    if (batch.query_lengths[b] == 1) most_parts += h_kv * room(b);
  work.parts.clear();
  work.parts.reserve(static_cast<std::size_t>(most_parts));
  for (Index b = 0; b < batch.size(); ++b) {
    if (batch.query_lengths[b] != 1) continue;
    // The keys the one token sees (all, without a window): no key in them needs a mask.
    const Index S = batch.key_lengths[b];
    const detail::KeyRanges visible = detail::key_ranges(detail::key_visibility(bottom_right, no_masks, 1, S), 0, 0, S);
    work.first_key[b] = visible.masked_begin;
    const Index n = (visible.masked_end - work.first_key[b] + detail::kKeyBlock - 1) / detail::kKeyBlock;
    work.part_count[b] = n;
    detail::reserve(work.part_outs[b], room(b) * h * d_v());
    detail::reserve(work.part_lses[b], room(b) * h);
    for (Index j = 0; j < h_kv; ++j)
      for (Index c = 0; c < n; ++c) work.parts.push_back({b, j, c});
  }
  work.concat.resize(q.rows(), h * d_v());  // ΣL_new × h·d_v: [head_1 … head_h]
  const Index tasks = static_cast<Index>(work.blocks.size() + work.parts.size());
  if (work.threads.size() < static_cast<std::size_t>(detail::thread_count()))
    work.threads.resize(static_cast<std::size_t>(detail::thread_count()));
  // Every thread's room for the parts, made here: a thread that got no task in one step (the tasks
  // are handed out as threads come) may get one in the next.
  Index most_room = 0;
  for (Index b = 0; b < batch.size(); ++b) most_room = std::max(most_room, room(b));
  for (detail::DecodeThreadScratch<Scalar>& scratch : work.threads) {
    scratch.part.reserve_for(group, d_k());
    detail::reserve(scratch.merge, most_room);
  }
  // Each thread's scratch, kept in the workspace: grown where this step needs more, else as it is.
  const auto thread_scratch = [&] { return &work.threads[static_cast<std::size_t>(detail::thread_index())]; };
  detail::parallel_tasks(
      tasks, batch.attention_flops(h, d_k(), d_v()), thread_scratch,
      [&](Index t, detail::DecodeThreadScratch<Scalar>* scratch) {
        if (t < static_cast<Index>(work.blocks.size())) {
          const auto [b, i, block] = work.blocks[static_cast<std::size_t>(t)];
          const Index L = batch.query_lengths[b], S = batch.key_lengths[b], j = i / group;
          auto& attention = detail::fit_scratch(scratch->attention, batch.max_L, batch.max_S, d_k());
          // A cache of another type than Scalar: the head's keys and values converted, S rows.
          if (!std::is_same<Storage, Scalar>::value) {
            detail::reserve(scratch->keys, S * d_k());
            detail::reserve(scratch->values, S * d_v());
          }
          detail::attention_query_block<Scalar>(q.block(batch.q_offset[b], i * d_k(), L, d_k()),
                                                detail::cached_rows(cache.keys(b, j).topRows(S), scratch->keys),
                                                detail::cached_rows(cache.values(b, j).topRows(S), scratch->values),
                                                scale, detail::key_visibility(bottom_right, no_masks, L, S), block,
                                                attention, work.concat.block(batch.q_offset[b], i * d_v(), L, d_v()));
          return;
        }
        // Key/value head j's part c, keys first … first + keys − 1, for each of its query heads.
        const auto [b, j, c] = work.parts[static_cast<std::size_t>(t) - work.blocks.size()];
        const Index n = work.part_count[b], first = work.first_key[b] + c * detail::kKeyBlock;
        const Index keys = std::min(detail::kKeyBlock, batch.key_lengths[b] - first);
        for (Index g = 0; g < group; ++g)
          for (Index e = 0; e < d_k(); ++e)
            scratch->part.queries(g * d_k() + e) = scale * q(batch.q_offset[b], (j * group + g) * d_k() + e);
        detail::attend_to_part<Scalar>(group, cache.keys(b, j).row(first).data(), cache.values(b, j).row(first).data(),
                                       keys, d_k(), d_v(), scratch->part,
                                       work.part_outs[b].data() + (j * group * n + c) * d_v(), n * d_v(),
                                       work.part_lses[b].data() + j * group * n + c, n);
      });
  detail::parallel_tasks(
      batch.size() * h, 0, thread_scratch, [&](Index t, detail::DecodeThreadScratch<Scalar>* scratch) {
        const Index b = t / h, i = t % h, n = work.part_count[b];
        if (batch.query_lengths[b] != 1) return;
        using Row = Eigen::Map<const Matrix>;
        detail::merge_key_parts<Scalar>(
            Row(work.part_outs[b].data() + i * n * d_v(), 1, n * d_v()), Row(work.part_lses[b].data() + i * n, 1, n),
            work.concat.block(batch.q_offset[b], i * d_v(), 1, d_v()), nullptr, scratch->merge.data());
      });
}

template <typename Scalar_>
void MultiHeadAttention<Scalar_>::project_inputs(const detail::ConstMatrixRef<Scalar>& query,
                                                 const detail::ConstMatrixRef<Scalar>& key,
                                                 const detail::ConstMatrixRef<Scalar>& value,
                                                 const std::vector<Index>& query_positions,
                                                 const std::vector<Index>& key_positions, Matrix& q, Matrix& k,
                                                 Matrix& v, const Matrix& w_q, const Matrix& w_k, const Matrix& w_v,
                                                 detail::RowBlockJobs<Scalar>* jobs) const {
  q.resize(query.rows(), w_q_.cols());
  k.resize(key.rows(), w_k_.cols());
  v.resize(value.rows(), w_v_.cols());
  const std::optional<RotaryEmbedding> rotary = config_.rotary ? std::optional<RotaryEmbedding>(config_) : std::nullopt;
  const auto rotation = [&](const std::vector<Index>& positions) {
    return detail::RowRotation{rotary ? &*rotary : nullptr, positions.data()};
  };
  detail::RowBlockJobs<Scalar> own;
  detail::RowBlockJobs<Scalar>& blocks = jobs ? *jobs : own;
  blocks.product(detail::operand(query), detail::operand(w_q), q, false, &b_q_, rotation(query_positions));
  blocks.product(detail::operand(key), detail::operand(w_k), k, false, &b_k_, rotation(key_positions));
  blocks.product(detail::operand(value), detail::operand(w_v), v, false, &b_v_);
  blocks.run();
}

namespace detail {

struct ModuleSteps {
  /// q = query W^Q + b^Q, k = key W^K + b^K, v = value W^V + b^V, the rows of q and k turned at
  /// their positions with rotary embeddings (MultiHeadAttention::project_inputs).
  template <typename Scalar>
  static void project_inputs(const MultiHeadAttention<Scalar>& module, const ConstMatrixRef<Scalar>& query,
                             const ConstMatrixRef<Scalar>& key, const ConstMatrixRef<Scalar>& value,
                             const std::vector<Eigen::Index>& query_positions,
                             const std::vector<Eigen::Index>& key_positions, Matrix<Scalar>& q, Matrix<Scalar>& k,
                             Matrix<Scalar>& v) {
    module.project_inputs(query, key, value, query_positions, key_positions, q, k, v);
  }
  /// The attention of a decode step's queries over a cache, no causal rule, no window
  /// (MultiHeadAttention::attend_to_cache): what bench_decode times alone.
  template <typename Scalar, typename Storage>
  static const Matrix<Scalar>& attend_to_cache(const MultiHeadAttention<Scalar>& module, const Matrix<Scalar>& q,
                                               const Batch& batch, const KVCache<Scalar, Storage>& cache, Scalar scale,
                                               DecodeWorkspace<Scalar>& workspace) {
    module.attend_to_cache(q, batch, cache, scale, 0, false, workspace);
    return workspace.concat;
  }
  /// concat W^O + b^O (MultiHeadAttention::project_output).
  template <typename Scalar>
  static Matrix<Scalar> project_output(const MultiHeadAttention<Scalar>& module, const Matrix<Scalar>& concat) {
    return module.project_output(concat);
  }
};

}  // namespace detail

}  // namespace mha

// mha::precompiled: the passes for float and double are compiled once, in that library, and a
// program linking it compiles only the thin public functions (CMake sets MHA_PRECOMPILED).
//
// The decoding passes are member templates of the cache's storage type, which the class's explicit
// instantiation does not cover: MHA_DECODING_PASSES names them for a scalar and a storage type,
// declared extern here and instantiated there, for each scalar's three storage types.
#define MHA_DECODING_PASSES(EXTERN, S, STORAGE)                                                                       \
  EXTERN template void MultiHeadAttention<S>::run_decode<STORAGE>(                                                    \
      const detail::Input<S>&, const std::vector<Eigen::Index>&, KVCache<S, STORAGE>&, const AttentionOptions&,       \
      MultiHeadAttention<S>::Matrix&, const char*, const DecodeWeights<S, S>*,                                        \
      detail::EigenAlignment<EIGEN_MAX_ALIGN_BYTES>) const;                                                           \
  EXTERN template KVCache<S, STORAGE> MultiHeadAttention<S>::run_make_cross_cache<STORAGE>(                           \
      const detail::Input<S>&, const detail::Input<S>&, std::vector<Eigen::Index>,                                    \
      detail::EigenAlignment<EIGEN_MAX_ALIGN_BYTES>) const;                                                           \
  EXTERN template void MultiHeadAttention<S>::run_decode_cross<STORAGE>(                                              \
      const detail::Input<S>&, const std::vector<Eigen::Index>&, const KVCache<S, STORAGE>&, const AttentionOptions&, \
      detail::DecodeWorkspace<S>&, MultiHeadAttention<S>::Matrix&, const char*,                                       \
      detail::EigenAlignment<EIGEN_MAX_ALIGN_BYTES>) const;
#define MHA_DECODING_PASSES_OF(EXTERN, S)         \
  MHA_DECODING_PASSES(EXTERN, S, S)               \
  MHA_DECODING_PASSES(EXTERN, S, Eigen::bfloat16) \
  MHA_DECODING_PASSES(EXTERN, S, Eigen::half)
#ifdef MHA_PRECOMPILED
namespace mha {
extern template class MultiHeadAttention<float>;
extern template class MultiHeadAttention<double>;
MHA_DECODING_PASSES_OF(extern, float)
MHA_DECODING_PASSES_OF(extern, double)
namespace detail {
extern template Matrix<float> scaled_dot_product_attention(const Input<float>&, const Input<float>&,
                                                           const Input<float>&, const AttentionOptions&);
extern template Matrix<double> scaled_dot_product_attention(const Input<double>&, const Input<double>&,
                                                            const Input<double>&, const AttentionOptions&);
}  // namespace detail
}  // namespace mha
#endif
