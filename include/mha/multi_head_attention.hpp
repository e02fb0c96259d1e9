// mha — the multi-head attention module: per-head projections, attention, concatenation, W^O.
#pragma once

#include <mha/attention.hpp>
#include <mha/config.hpp>
#include <mha/gradients.hpp>
#include <mha/kv_cache.hpp>
#include <mha/mask.hpp>
#include <mha/parameters.hpp>
#include <mha/rotary.hpp>
#include <mha/threads.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>
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
    return run(query, key, value, {query.rows()}, {key.rows()}, options, {}, "forward");
  }

  /// Self-attention: forward(x, x, x, options), x: L × d_model  →  L × d_model.
  template <typename Derived>
  Matrix forward(const Eigen::MatrixBase<Derived>& x, const AttentionOptions& options = {}) const {
    return forward(x, x, x, options);
  }

  /// forward(query, key, value, options), recording into `tape` what backward() needs. The output
  /// is the same as without a tape; the tape costs O((L + S) · width) memory, never L × S.
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  Matrix forward(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
                 const Eigen::MatrixBase<DerivedV>& value, const AttentionOptions& options, Tape<Scalar>& tape) const {
    return run(query, key, value, {query.rows()}, {key.rows()}, options, {nullptr, &tape, false}, "forward");
  }

  /// Self-attention forward(x, options), recording into `tape` what backward() needs (x once).
  template <typename Derived>
  Matrix forward(const Eigen::MatrixBase<Derived>& x, const AttentionOptions& options, Tape<Scalar>& tape) const {
    return run(x, x, x, {x.rows()}, {x.rows()}, options, {nullptr, &tape, true}, "forward");
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
    result.output = run(query, key, value, {query.rows()}, {key.rows()}, options, {&result.weights, nullptr, false},
                        "forward_with_weights");
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
    return run(query, key, value, query_lengths, key_lengths, options, {}, "forward_batch");
  }

  /// forward_batch(…), recording into `tape` what backward() needs.
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  Matrix forward_batch(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
                       const Eigen::MatrixBase<DerivedV>& value, const std::vector<Index>& query_lengths,
                       const std::vector<Index>& key_lengths, const AttentionOptions& options,
                       Tape<Scalar>& tape) const {
    return run(query, key, value, query_lengths, key_lengths, options, {nullptr, &tape, false}, "forward_batch");
  }

  /// Self-attention over a batch: forward_batch(x, x, x, lengths, lengths, options).
  template <typename Derived>
  Matrix forward_batch(const Eigen::MatrixBase<Derived>& x, const std::vector<Index>& lengths,
                       const AttentionOptions& options = {}) const {
    return run(x, x, x, lengths, lengths, options, {}, "forward_batch");
  }

  /// Self-attention over a batch, recording into `tape` what backward() needs (x once).
  template <typename Derived>
  Matrix forward_batch(const Eigen::MatrixBase<Derived>& x, const std::vector<Index>& lengths,
                       const AttentionOptions& options, Tape<Scalar>& tape) const {
    return run(x, x, x, lengths, lengths, options, {nullptr, &tape, true}, "forward_batch");
  }

  /// \returns an empty key/value cache for decoding `sequences` sequences with this module, holding
  /// up to `max_length` tokens each (0: growing as needed). See KVCache.
  KVCache<Scalar> make_cache(Index sequences = 1, Index max_length = 0) const {
    return KVCache<Scalar>(config_, sequences, max_length);
  }

  /// A decode step of causal self-attention: the new tokens x (L_new × d_model) of the cache's one
  /// sequence are projected, their keys and values appended to the cache, and their queries
  /// attend to everything cached, new token i of a sequence that held n tokens at position n + i
  /// seeing the positions ≤ n + i (and > n + i − window with options.window): bottom-right causal.
  /// Its rows equal the rows of forward(all tokens so far, causal) at the same positions, for the
  /// cost of the new tokens alone. One new token over a long cache is split across threads by
  /// parts of 512 keys, merged in log-sum-exp fashion; results do not depend on the thread count.
  /// The query heads that share a key/value head read its cached keys and values in turn, from cache.
  /// Options: scale and window; decoding is causal by construction (options.causal and alignment
  /// are not read) and rejects masks, training, add_bias_kv and add_zero_attn.
  /// \returns the new tokens' outputs, L_new × d_model.
  template <typename Derived>
  Matrix decode(const Eigen::MatrixBase<Derived>& x, KVCache<Scalar>& cache, const AttentionOptions& options = {}) const {
    if (cache.sequences() != 1)
      detail::fail("MultiHeadAttention::decode: the cache holds ", cache.sequences(),
                   " sequences; decode_batch takes the new tokens of each");
    return run_decode(x, {x.rows()}, cache, options, "decode");
  }

  /// A decode step for every sequence of a batch cache: sequence b's new tokens are the next
  /// new_lengths[b] rows of x (0 for a sequence that has finished), as in decode().
  /// \returns the new tokens' outputs, stacked the same way: (Σ new_lengths) × d_model.
  template <typename Derived>
  Matrix decode_batch(const Eigen::MatrixBase<Derived>& x, const std::vector<Index>& new_lengths,
                      KVCache<Scalar>& cache, const AttentionOptions& options = {}) const {
    return run_decode(x, new_lengths, cache, options, "decode_batch");
  }

  /// The backward pass of the forward pass recorded in `tape`: given d_output = ∂loss/∂output
  /// (ΣL × d_model), ADDS ∂loss/∂(every parameter) into `gradients` (as PyTorch accumulates .grad;
  /// call gradients.set_zero() between steps) and returns ∂loss/∂query, ∂loss/∂key, ∂loss/∂value.
  /// Every option of the forward is differentiated: masks, causal, key padding, batches, biases,
  /// add_bias_kv, add_zero_attn and dropout (the same dropped weights as the forward). The weights
  /// must not have changed since the forward. The attention weights are recomputed tile by tile
  /// from the saved log-sum-exp: nothing L × S is stored or allocated (beyond the masks themselves).
  template <typename Derived>
  InputGradients<Scalar> backward(const Tape<Scalar>& tape, const Eigen::MatrixBase<Derived>& d_output,
                                  Gradients& gradients) const {
    static_assert(std::is_same<Scalar, typename Derived::Scalar>::value,
                  "mha::MultiHeadAttention::backward: d_output must have the module's scalar type");
    if (tape.empty()) detail::fail("MultiHeadAttention::backward: the tape is empty; record a forward(…, tape) first");
    if (!same_shape(tape.config_, config_) || !same_rotation(tape.config_, config_))
      detail::fail("MultiHeadAttention::backward: the tape was recorded by a module of another shape (",
                   describe(tape.config_), ") than this one (", describe(config_), ")");
    if (tape.module_ != identity_)
      detail::fail("MultiHeadAttention::backward: the tape was recorded by another module of the same shape; "
                   "call backward() on the module whose forward() recorded it");
    if (!same_shape(gradients.config(), config_))
      detail::fail("MultiHeadAttention::backward: gradients are for a module of another shape (",
                   describe(gradients.config()), ") than this one (", describe(config_), "); use zero_gradients()");
    if (static_cast<const Base*>(&gradients) == static_cast<const Base*>(this))
      detail::fail("MultiHeadAttention::backward: gradients is this module itself, whose weights the backward "
                   "reads; pass the gradients zero_gradients() made");
    if (d_output.rows() != tape.q_.rows() || d_output.cols() != d_model())
      detail::fail("MultiHeadAttention::backward: d_output is ", detail::shape(d_output),
                   " but the forward's output was ", tape.q_.rows(), " x ", d_model());
    const auto& dy = detail::evaluated(d_output);
    const Index h = num_heads(), h_kv = num_kv_heads(), group = h / h_kv, extra = extra_keys();
    const Index total_L = tape.q_.rows();
    const Batch batch(tape.query_lengths_, tape.key_lengths_, extra);
    const Matrix& query = tape.query_;
    const Matrix& key = tape.self_attention_ ? tape.query_ : tape.key_;
    const Matrix& value = tape.self_attention_ ? tape.query_ : tape.value_;
    const Index total_S = key.rows();

    // In the forward pass this was: output = concat · W^O + b^O.
    Matrix d_concat(total_L, h * d_v());               // ΣL × h·d_v
    Jobs jobs;
    add_product(jobs, dy, w_o_.transpose(), d_concat, false);
    add_product(jobs, tape.concat_.transpose(), dy, gradients.w_o_, true);
    run_jobs(jobs, 4.0 * static_cast<double>(total_L * h * d_v() * d_model()));
    if (config_.bias) gradients.b_o_ += dy.colwise().sum();

    // In the forward pass this was: head_i = attention(Q W_i^Q, K W_j^K, V W_j^V), j = i / group.
    // One task per sequence and key/value head, owning its rows of ∂loss/∂(K W^K) and
    // ∂loss/∂(V W^V), to which the heads of its group add in turn, and their ∂loss/∂(Q W^Q).
    Matrix d_q(total_L, h * d_k());                       // ΣL × h·d_k
    Matrix d_keys(tape.keys_.rows(), h_kv * d_k());       // (ΣS + B·extra) × h_kv·d_k
    Matrix d_values(tape.values_.rows(), h_kv * d_v());   // (ΣS + B·extra) × h_kv·d_v
    const AttentionMasks<Scalar> masks(tape.options_);
    const auto scale = detail::resolve_scale<Scalar>(tape.options_, d_k());
    detail::parallel_tasks(
        batch.size() * h_kv, 2.5 * batch.attention_flops(h, d_k(), d_v()),
        [&] { return detail::AttentionBackwardScratch<Scalar>::for_problem(batch.max_L, batch.max_S + extra, d_k()); },
        [&](Index t, detail::AttentionBackwardScratch<Scalar>& scratch) {
          const Index b = t / h_kv, j = t % h_kv;
          const Index L_b = batch.query_lengths[b], S_b = batch.key_lengths[b] + extra;
          const Index q0 = batch.q_offset[b], k0 = batch.k_offset[b];
          auto d_k_head = d_keys.block(k0, j * d_k(), S_b, d_k());
          auto d_v_head = d_values.block(k0, j * d_v(), S_b, d_v());
          d_k_head.setZero();
          d_v_head.setZero();
          for (Index i = j * group; i < (j + 1) * group; ++i)
            detail::attention_backward<Scalar>(
                tape.q_.block(q0, i * d_k(), L_b, d_k()), tape.keys_.block(k0, j * d_k(), S_b, d_k()),
                tape.values_.block(k0, j * d_v(), S_b, d_v()), tape.concat_.block(q0, i * d_v(), L_b, d_v()),
                tape.log_sum_exp_.col(i).data() + q0, d_concat.block(q0, i * d_v(), L_b, d_v()), scale,
                visibility(tape.options_, masks, batch, b, i), scratch, d_q.block(q0, i * d_k(), L_b, d_k()),
                d_k_head, d_v_head);
        });

    // add_bias_kv and add_zero_attn: the extra rows' gradients go to bias_k and bias_v (the zero
    // rows are constants); the rest are the gradients of the projected keys and values.
    Matrix d_k_rows, d_v_rows;
    if (extra > 0) {
      d_k_rows.resize(total_S, d_keys.cols());
      d_v_rows.resize(total_S, d_values.cols());
      remove_extra_rows(d_keys, batch, d_k_rows, config_.add_bias_kv ? &gradients.bias_k_ : nullptr);
      remove_extra_rows(d_values, batch, d_v_rows, config_.add_bias_kv ? &gradients.bias_v_ : nullptr);
    }
    Matrix& d_k_projected = extra > 0 ? d_k_rows : d_keys;          // ΣS × h_kv·d_k
    const Matrix& d_v_projected = extra > 0 ? d_v_rows : d_values;  // ΣS × h_kv·d_v

    // In the forward pass this was: the rows of Q W^Q + b^Q and K W^K + b^K turned by their
    // positions. A rotation's inverse is its transpose: the gradients turn back by the same angles.
    if (config_.rotary) {
      const Positions positions(batch, tape.options_);
      add_rotation(jobs, d_q, positions.query.data(), true);
      add_rotation(jobs, d_k_projected, positions.key.data(), true);
      run_jobs(jobs, 0);
    }

    // In the forward pass this was: Q W^Q + b^Q, K W^K + b^K, V W^V + b^V.
    InputGradients<Scalar> d_inputs;
    d_inputs.query.resize(total_L, d_model());
    d_inputs.key.resize(total_S, kdim());
    d_inputs.value.resize(total_S, vdim());
    add_product(jobs, d_q, w_q_.transpose(), d_inputs.query, false);
    add_product(jobs, d_k_projected, w_k_.transpose(), d_inputs.key, false);
    add_product(jobs, d_v_projected, w_v_.transpose(), d_inputs.value, false);
    add_product(jobs, query.transpose(), d_q, gradients.w_q_, true);
    add_product(jobs, key.transpose(), d_k_projected, gradients.w_k_, true);
    add_product(jobs, value.transpose(), d_v_projected, gradients.w_v_, true);
    run_jobs(jobs, 4.0 * static_cast<double>(total_L * d_model() * h * d_k() +
                                             total_S * (kdim() * h_kv * d_k() + vdim() * h_kv * d_v())));
    if (config_.bias) {
      gradients.b_q_ += d_q.colwise().sum();
      gradients.b_k_ += d_k_projected.colwise().sum();
      gradients.b_v_ += d_v_projected.colwise().sum();
    }
    return d_inputs;
  }

 private:
  /// Rows per task of the projections: a fixed count, so results do not depend on the threads.
  static constexpr Index kProjectionRows = 256;
  static Index row_blocks(Index rows) { return (rows + kProjectionRows - 1) / kProjectionRows; }
  static int no_scratch() { return 0; }
  /// Independent pieces of work, run in parallel by run_jobs.
  using Jobs = std::vector<std::function<void()>>;

  /// Where a forward pass puts what it returns beside the output.
  struct Record {
    std::vector<Matrix>* weights = nullptr;  ///< each head's attention weights (a batch of one only)
    Tape<Scalar>* tape = nullptr;            ///< what backward() needs
    bool self_attention = false;             ///< query, key and value are the same input
  };

  /// The sequences of a batch: their lengths and where their rows start.
  struct Batch {
    Batch(const std::vector<Index>& query_lengths_, const std::vector<Index>& key_lengths_, Index extra)
        : query_lengths(query_lengths_),
          key_lengths(key_lengths_),
          q_offset(size() + 1, 0),
          k_offset(size() + 1, 0),
          extra_keys(extra) {
      for (Index b = 0; b < size(); ++b) {
        q_offset[b + 1] = q_offset[b] + query_lengths[b];
        k_offset[b + 1] = k_offset[b] + key_lengths[b] + extra;
        max_L = std::max(max_L, query_lengths[b]);
        max_S = std::max(max_S, key_lengths[b]);
      }
    }
    Index size() const { return static_cast<Index>(query_lengths.size()); }
    /// \returns the flops of the attention of every head of every sequence.
    double attention_flops(Index h, Index d_k, Index d_v) const {
      double flops = 0;
      for (Index b = 0; b < size(); ++b)
        flops += static_cast<double>(h) * detail::attention_flops(query_lengths[b], key_lengths[b] + extra_keys, d_k, d_v);
      return flops;
    }

    const std::vector<Index>& query_lengths;
    const std::vector<Index>& key_lengths;
    std::vector<Index> q_offset, k_offset;  ///< first row of each sequence's queries; keys (with extras)
    Index extra_keys;                       ///< add_bias_kv's and add_zero_attn's rows per sequence
    Index max_L = 0, max_S = 0;
  };

  /// The masks of an options, as additive matrices of Scalar, made once for every head and sequence.
  template <typename T>
  struct AttentionMasks {
    explicit AttentionMasks(const AttentionOptions& options)
        : mask(options.mask.template additive_matrix<T>()),
          key_padding(options.key_padding_mask.template additive_matrix<T>()) {}
    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> mask, key_padding;
  };

  /// How head i of sequence b hides and weighs its keys; the same in the forward and the backward.
  detail::KeyVisibility<Scalar> visibility(const AttentionOptions& options, const AttentionMasks<Scalar>& masks,
                                           const Batch& batch, Index b, Index i) const {
    const Index L_b = batch.query_lengths[b], S_b = batch.key_lengths[b];
    detail::KeyVisibility<Scalar> v;
    v.masked_keys = S_b;
    v.causal = options.causal;
    v.position_offset = options.alignment == CausalAlignment::bottom_right ? S_b - L_b : 0;
    v.window = detail::effective_window(options.window, L_b, S_b);
    if (masks.mask.size() > 0) {
      v.mask = &masks.mask;
      v.mask_row = masks.mask.rows() == L_b ? 0 : i * L_b;  // one mask for all heads, or one per head
    }
    if (masks.key_padding.size() > 0) {
      v.key_padding = &masks.key_padding;
      v.key_padding_row = b;
    }
    if (options.training && config_.dropout > 0) {
      v.dropout = config_.dropout;
      v.dropout_seed = options.dropout_seed;
      v.dropout_stream = static_cast<std::uint64_t>(b * num_heads() + i);
    }
    return v;
  }

  /// The number of keys appended to every sequence: add_bias_kv's row, add_zero_attn's row.
  Index extra_keys() const { return Index(config_.add_bias_kv) + Index(config_.add_zero_attn); }

  /// Row block `block` of out = input · w + b (b empty: no bias), its rows then turned by their
  /// positions when given (rotary embeddings).
  template <typename Input>
  void project(const Input& input, const Matrix& w, const RowVector& b, Index block, Matrix& out,
               const Index* positions = nullptr) const {
    const Index first = block * kProjectionRows, rows = std::min(kProjectionRows, input.rows() - first);
    auto out_rows = out.middleRows(first, rows);
    out_rows.noalias() = input.middleRows(first, rows) * w;
    if (b.size() > 0) out_rows.rowwise() += b;
    if (positions) rotary().apply(out_rows, positions + first);
  }

  /// q = query · W^Q + b^Q, k = key · W^K + b^K, v = value · W^V + b^V: each one product for all
  /// heads, cut into row blocks that run in parallel. With positions, the rows of q and k are then
  /// turned by them (rotary embeddings).
  template <typename Query, typename Key, typename Value>
  void project_inputs(const Query& query, const Key& key, const Value& value, const Index* query_positions,
                      const Index* key_positions, Matrix& q, Matrix& k, Matrix& v) const {
    q.resize(query.rows(), w_q_.cols());
    k.resize(key.rows(), w_k_.cols());
    v.resize(value.rows(), w_v_.cols());
    const Index q_blocks = row_blocks(q.rows()), kv_blocks = row_blocks(k.rows());
    const double flops = 2.0 * static_cast<double>(q.size() * query.cols() + k.size() * key.cols() + v.size() * value.cols());
    detail::parallel_tasks(q_blocks + 2 * kv_blocks, flops, no_scratch, [&](Index t, int) {
      if (t < q_blocks) return project(query, w_q_, b_q_, t, q, query_positions);
      t -= q_blocks;
      if (t < kv_blocks) return project(key, w_k_, b_k_, t, k, key_positions);
      project(value, w_v_, b_v_, t - kv_blocks, v);
    });
  }

  /// \returns concat · W^O + b^O, in row blocks in parallel.
  Matrix project_output(const Matrix& concat) const {
    Matrix output(concat.rows(), d_model());
    detail::parallel_tasks(row_blocks(concat.rows()), 2.0 * static_cast<double>(output.size() * concat.cols()),
                           no_scratch, [&](Index t, int) { project(concat, w_o_, b_o_, t, output); });
    return output;
  }

  /// The rotary embedding of this module's heads.
  detail::Rotary rotary() const { return {config_.rotary_base, config_.rotary_pairs, d_k()}; }

  /// The positions of a batch's rows for rotary embeddings: key j of a sequence is at position j,
  /// query i at i, or at i + S − L with bottom-right alignment (the newest L of S tokens).
  struct Positions {
    Positions(const Batch& batch, const AttentionOptions& options) {
      for (Index b = 0; b < batch.size(); ++b) {
        const Index L = batch.query_lengths[b], S = batch.key_lengths[b];
        const Index offset = options.alignment == CausalAlignment::bottom_right ? S - L : 0;
        for (Index i = 0; i < L; ++i) query.push_back(i + offset);
        for (Index j = 0; j < S; ++j) key.push_back(j);
      }
    }
    std::vector<Index> query, key;
  };

  /// Adds to `jobs` the row blocks of rotating (or, with `inverse`, unrotating) the rows of x.
  void add_rotation(Jobs& jobs, Matrix& x, const Index* positions, bool inverse) const {
    for (Index first = 0; first < x.rows(); first += kProjectionRows)
      jobs.push_back([this, &x, positions, inverse, first] {
        const Index rows = std::min(kProjectionRows, x.rows() - first);
        rotary().apply(x.middleRows(first, rows), positions + first, inverse);
      });
  }

  /// A matrix by reference, an expression (a transpose, which views a matrix) by value: what a job
  /// keeps of an operand, so that it neither copies a matrix nor outlives a temporary expression.
  template <typename T>
  using Operand = std::conditional_t<std::is_base_of<Eigen::PlainObjectBase<T>, T>::value, const T&, T>;

  /// Adds to `jobs` the row blocks of out = lhs · rhs, or out += lhs · rhs when `accumulate`; lhs
  /// and rhs are matrices (which must outlive the jobs) or their transposes.
  template <typename Lhs, typename Rhs>
  static void add_product(Jobs& jobs, const Lhs& lhs, const Rhs& rhs, Matrix& out, bool accumulate) {
    struct Operands {
      Operand<Lhs> lhs;
      Operand<Rhs> rhs;
    };
    for (Index first = 0; first < out.rows(); first += kProjectionRows)
      jobs.push_back([operands = Operands{lhs, rhs}, &out, first, accumulate] {
        const Index rows = std::min(kProjectionRows, out.rows() - first);
        const auto product = operands.lhs.middleRows(first, rows) * operands.rhs;
        if (accumulate)
          out.middleRows(first, rows).noalias() += product;
        else
          out.middleRows(first, rows).noalias() = product;
      });
  }

  /// Runs the jobs, worth about `flops` in all, in parallel, and empties the list.
  static void run_jobs(Jobs& jobs, double flops) {
    detail::parallel_tasks(static_cast<Index>(jobs.size()), flops, no_scratch,
                           [&](Index t, int) { jobs[static_cast<std::size_t>(t)](); });
    jobs.clear();
  }

  /// Sequence b's projected keys (or values) with the extra rows appended: S_b + extra rows.
  void append_extra_rows(const Matrix& projected, const RowVector& bias_row, const std::vector<Index>& lengths,
                         Matrix& out) const {
    Index from = 0, to = 0;
    for (const Index length : lengths) {
      out.middleRows(to, length) = projected.middleRows(from, length);
      from += length;
      to += length;
      if (config_.add_bias_kv) out.row(to++) = bias_row;
      if (config_.add_zero_attn) out.row(to++).setZero();
    }
  }

  /// The backward of append_extra_rows: copies the sequences' own rows of `extended` into `out`
  /// and adds the add_bias_kv rows into `bias_row` (when given).
  void remove_extra_rows(const Matrix& extended, const Batch& batch, Matrix& out, RowVector* bias_row) const {
    Index from = 0, to = 0;
    for (const Index length : batch.key_lengths) {
      out.middleRows(to, length) = extended.middleRows(from, length);
      to += length;
      from += length;
      if (bias_row) *bias_row += extended.row(from);
      from += batch.extra_keys;
    }
  }

  /// The whole forward pass over a batch of sequences (one, for forward()), recording into
  /// `record` what it asks for.
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  Matrix run(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
             const Eigen::MatrixBase<DerivedV>& value, const std::vector<Index>& query_lengths,
             const std::vector<Index>& key_lengths, const AttentionOptions& options, Record record,
             const char* caller) const {
    static_assert(std::is_same<Scalar, typename DerivedQ::Scalar>::value &&
                      std::is_same<Scalar, typename DerivedK::Scalar>::value &&
                      std::is_same<Scalar, typename DerivedV::Scalar>::value,
                  "mha::MultiHeadAttention: inputs must have the module's scalar type");
    check_width(query, "query", d_model(), "d_model", caller);
    check_width(key, "key", kdim(), kdim() == d_model() ? "d_model" : "kdim", caller);
    check_width(value, "value", vdim(), vdim() == d_model() ? "d_model" : "vdim", caller);
    if (key.rows() != value.rows())
      detail::fail("MultiHeadAttention::", caller, ": key has ", key.rows(), " rows but value has ", value.rows(),
                   " (key is ", detail::shape(key), ", value is ", detail::shape(value), ")");
    check_lengths(query_lengths, key_lengths, query.rows(), key.rows(), caller);
    check_masks(options, query_lengths, key_lengths, caller);
    const Index h = num_heads(), h_kv = num_kv_heads(), group = h / h_kv, extra = extra_keys();
    const Batch batch(query_lengths, key_lengths, extra);
    const auto scale = detail::resolve_scale<Scalar>(options, d_k());
    detail::resolve_window(options);
    const auto& query_rows = detail::evaluated(query);
    const auto& key_rows = detail::evaluated(key);
    const auto& value_rows = detail::evaluated(value);
    const Index total_L = query.rows(), total_S = key.rows();

    // The projections of all heads and all sequences; rotary embeddings turn the queries and keys.
    Matrix q, k, v;                                     // ΣL × h·d_k, ΣS × h_kv·d_k, ΣS × h_kv·d_v
    const std::optional<Positions> positions =
        config_.rotary ? std::optional<Positions>(std::in_place, batch, options) : std::nullopt;
    project_inputs(query_rows, key_rows, value_rows, positions ? positions->query.data() : nullptr,
                   positions ? positions->key.data() : nullptr, q, k, v);
    // add_bias_kv and add_zero_attn: each sequence's keys and values get their extra rows.
    Matrix k_extended, v_extended;
    if (extra > 0) {
      k_extended.resize(total_S + batch.size() * extra, k.cols());
      v_extended.resize(total_S + batch.size() * extra, v.cols());
      append_extra_rows(k, bias_k_, key_lengths, k_extended);
      append_extra_rows(v, bias_v_, key_lengths, v_extended);
    }
    Matrix& keys = extra > 0 ? k_extended : k;
    Matrix& values = extra > 0 ? v_extended : v;

    // One task per sequence, head and block of query rows; each writes its rows of the head's
    // column block of the concatenation (and of the log-sum-exp, for a tape).
    struct Task {
      Index sequence, head, block;
    };
    std::vector<Task> tasks;
    for (Index b = 0; b < batch.size(); ++b)
      for (Index i = 0; i < h; ++i)
        for (Index block = 0; block < detail::query_blocks(query_lengths[b]); ++block) tasks.push_back({b, i, block});
    if (record.weights) record.weights->assign(h, Matrix::Zero(total_L, keys.rows()));
    Matrix log_sum_exp(record.tape ? total_L : 0, h);  // ΣL × h
    Matrix concat(total_L, h * d_v());                  // ΣL × h·d_v: [head_1 … head_h]
    const AttentionMasks<Scalar> masks(options);
    detail::parallel_tasks(
        static_cast<Index>(tasks.size()), batch.attention_flops(h, d_k(), d_v()),
        [&] { return detail::AttentionScratch<Scalar>::for_problem(batch.max_L, batch.max_S + extra, d_k()); },
        [&](Index t, detail::AttentionScratch<Scalar>& scratch) {
          const Task& task = tasks[static_cast<std::size_t>(t)];
          const Index b = task.sequence, i = task.head;
          const Index L_b = query_lengths[b], S_b = key_lengths[b] + extra;
          const Index q0 = batch.q_offset[b], k0 = batch.k_offset[b];
          const Index j = i / group;  // the key/value head of query head i
          detail::attention_query_block<Scalar>(
              q.block(q0, i * d_k(), L_b, d_k()), keys.block(k0, j * d_k(), S_b, d_k()),
              values.block(k0, j * d_v(), S_b, d_v()), scale, visibility(options, masks, batch, b, i), task.block,
              scratch, concat.block(q0, i * d_v(), L_b, d_v()),
              record.weights ? &(*record.weights)[static_cast<std::size_t>(i)] : nullptr,
              record.tape ? log_sum_exp.col(i).data() + q0 : nullptr);
        });

    Matrix output = project_output(concat);             // ΣL × d_model

    if (Tape<Scalar>* tape = record.tape) {
      tape->recorded_ = true;
      tape->self_attention_ = record.self_attention;
      tape->config_ = config_;
      tape->module_ = identity_;
      // The tape's own copy of the masks: its backward may come after the caller's matrices are gone.
      tape->options_ = options;
      tape->options_.mask = options.mask.owning();
      tape->options_.key_padding_mask = options.key_padding_mask.owning();
      tape->query_lengths_ = query_lengths;
      tape->key_lengths_ = key_lengths;
      tape->query_ = query_rows;
      tape->key_ = record.self_attention ? Matrix() : Matrix(key_rows);
      tape->value_ = record.self_attention ? Matrix() : Matrix(value_rows);
      tape->q_ = std::move(q);
      tape->keys_ = std::move(keys);
      tape->values_ = std::move(values);
      tape->concat_ = std::move(concat);
      tape->log_sum_exp_ = std::move(log_sum_exp);
    }
    return output;
  }

  /// The decode step of decode() and decode_batch().
  template <typename Derived>
  Matrix run_decode(const Eigen::MatrixBase<Derived>& x, const std::vector<Index>& new_lengths, KVCache<Scalar>& cache,
                    const AttentionOptions& options, const char* caller) const {
    static_assert(std::is_same<Scalar, typename Derived::Scalar>::value,
                  "mha::MultiHeadAttention: inputs must have the module's scalar type");
    check_width(x, "x", d_model(), "d_model", caller);
    if (kdim() != d_model() || vdim() != d_model())
      detail::fail("MultiHeadAttention::", caller, ": decoding is self-attention, so kdim and vdim must equal d_model = ",
                   d_model(), "; this module has kdim = ", kdim(), " and vdim = ", vdim());
    if (!same_shape(cache.config_, config_) || !same_rotation(cache.config_, config_))
      detail::fail("MultiHeadAttention::", caller, ": the cache was made for a module of another shape (",
                   describe(cache.config_), ") than this one (", describe(config_), "); use make_cache()");
    if (static_cast<Index>(new_lengths.size()) != cache.sequences())
      detail::fail("MultiHeadAttention::", caller, ": new_lengths has ", new_lengths.size(),
                   " sequences but the cache holds ", cache.sequences());
    check_lengths_add_up(new_lengths, x.rows(), "new_lengths", "x", caller);
    if (!options.mask.empty() || !options.key_padding_mask.empty())
      detail::fail("MultiHeadAttention::", caller, ": options.mask and options.key_padding_mask are not read when "
                   "decoding (decoding is causal by construction); leave them empty");
    if (options.training) detail::fail("MultiHeadAttention::", caller, ": decoding is inference; options.training must be false");
    if (extra_keys() > 0)
      detail::fail("MultiHeadAttention::", caller, ": a module with add_bias_kv or add_zero_attn cannot decode with a cache");
    detail::resolve_window(options);
    const auto scale = detail::resolve_scale<Scalar>(options, d_k());
    for (std::size_t b = 0; b < new_lengths.size(); ++b) cache.check_room(b, new_lengths[b]);
    // A cache holds the keys and values of one module (one layer of a model), attended to with one
    // window and scale: tokens from another module, or earlier tokens that saw other keys, would
    // give rows that no forward pass gives.
    const typename KVCache<Scalar>::Provenance provenance{identity_, options.window, static_cast<double>(scale)};
    if (!cache.empty()) {
      const auto& filled = cache.filled_by_;
      if (filled.module != provenance.module)
        detail::fail("MultiHeadAttention::", caller, ": the cache holds tokens that another module decoded; a cache "
                     "belongs to one module (one layer): make one per layer with make_cache(), or reset() it");
      if (filled.window != provenance.window)
        detail::fail("MultiHeadAttention::", caller, ": the cache holds tokens decoded with options.window = ",
                     filled.window, "; options.window = ", options.window,
                     " would attend over other keys than theirs (reset() the cache to change it)");
      if (filled.scale != provenance.scale)
        detail::fail("MultiHeadAttention::", caller, ": the cache holds tokens decoded with the scale ", filled.scale,
                     "; options.scale gives ", provenance.scale, " (reset() the cache to change it)");
    }

    const Index sequences = cache.sequences();
    // New token i of sequence b is at position cache.length(b) + i, for the rotary embeddings.
    std::vector<Index> offset(static_cast<std::size_t>(sequences) + 1, 0), positions;
    for (Index b = 0; b < sequences; ++b) {
      offset[b + 1] = offset[b] + new_lengths[b];
      for (Index i = 0; i < new_lengths[b]; ++i) positions.push_back(cache.length(b) + i);
    }
    const Index* rotate = config_.rotary ? positions.data() : nullptr;

    // The new tokens' projections, then their keys and values join the cache. If anything throws
    // from here on (std::bad_alloc, say), the cache is rolled back to the tokens it held.
    const auto& rows = detail::evaluated(x);
    Matrix q, k, v;                             // ΣL_new × h·d_k, ΣL_new × h_kv·d_k, ΣL_new × h_kv·d_v
    project_inputs(rows, rows, rows, rotate, rotate, q, k, v);
    const auto saved_lengths = cache.lengths_;
    const auto saved_provenance = cache.filled_by_;
    try {
      cache.filled_by_ = provenance;
      for (Index b = 0; b < sequences; ++b)
        cache.append(static_cast<std::size_t>(b), k.middleRows(offset[b], new_lengths[b]),
                     v.middleRows(offset[b], new_lengths[b]));
      return attend_to_cache(q, new_lengths, offset, cache, scale, options.window);
    } catch (...) {
      cache.lengths_ = saved_lengths;
      cache.filled_by_ = saved_provenance;
      throw;
    }
  }

  /// The attention of decode(): the new tokens' queries q (ΣL_new × h·d_k; sequence b's from row
  /// offset[b]) over their sequences' cached keys and values, then W^O.
  Matrix attend_to_cache(const Matrix& q, const std::vector<Index>& new_lengths, const std::vector<Index>& offset,
                         const KVCache<Scalar>& cache, Scalar scale, Index window) const {
    const Index h = num_heads(), h_kv = num_kv_heads(), group = h / h_kv, total = q.rows();
    const Index sequences = cache.sequences();

    // Attention over the cache. Several new tokens (a prompt, draft tokens) run by query blocks,
    // one task per head and block. One new token sees every cached key of its window, so no mask
    // is needed; its keys are split into parts of kKeyBlock, one task per key/value head and part,
    // merged afterwards, so that one token over a long cache uses every thread. A task runs the
    // query heads that share its key/value head one after the other, while the part's keys and
    // values are still in cache: they are read from memory once per group, not once per head.
    struct Task {
      Index sequence, head, part, block;  ///< part < 0: a query block of head `head`; else a KV head's part
    };
    std::vector<Task> tasks, merges;
    std::vector<Index> first_key(static_cast<std::size_t>(sequences), 0), parts(static_cast<std::size_t>(sequences), 0);
    std::vector<Matrix> part_outs(static_cast<std::size_t>(sequences)), part_lses(static_cast<std::size_t>(sequences));
    double flops = 0;
    Index max_L = 0, max_S = 0;
    for (Index b = 0; b < sequences; ++b) {
      const Index L = new_lengths[b], S = cache.length(b);
      if (L == 0) continue;
      flops += static_cast<double>(h) * detail::attention_flops(L, S, d_k(), d_v());
      max_L = std::max(max_L, L);
      max_S = std::max(max_S, S);
      if (L == 1) {
        // The token at position S − 1 sees the keys from S − window on (all, without a window).
        first_key[b] = window > 0 ? std::max<Index>(0, S - window) : 0;
        const Index n = (S - first_key[b] + detail::kKeyBlock - 1) / detail::kKeyBlock;
        parts[b] = n;
        part_outs[b].resize(1, n * h * d_v());  // query head i's part c in column block i·n + c
        part_lses[b].resize(1, n * h);
        for (Index i = 0; i < h; ++i) merges.push_back({b, i, 0, 0});
        for (Index j = 0; j < h_kv; ++j)
          for (Index c = 0; c < n; ++c) tasks.push_back({b, j, c, 0});
      } else {
        for (Index i = 0; i < h; ++i)
          for (Index block = 0; block < detail::query_blocks(L); ++block) tasks.push_back({b, i, -1, block});
      }
    }
    Matrix concat(total, h * d_v());            // ΣL_new × h·d_v: [head_1 … head_h]
    detail::parallel_tasks(
        static_cast<Index>(tasks.size()), flops,
        [&] { return detail::AttentionScratch<Scalar>::for_problem(max_L, max_S, d_k()); },
        [&](Index t, detail::AttentionScratch<Scalar>& scratch) {
          const Task& task = tasks[static_cast<std::size_t>(t)];
          const Index b = task.sequence, L = new_lengths[b], S = cache.length(b);
          const auto& cached_keys = cache.keys_[static_cast<std::size_t>(b)];
          const auto& cached_values = cache.values_[static_cast<std::size_t>(b)];
          detail::KeyVisibility<Scalar> visibility;
          if (task.part < 0) {
            const Index i = task.head, j = i / group;
            visibility.masked_keys = S;
            visibility.causal = true;
            visibility.position_offset = S - L;
            visibility.window = detail::effective_window(window, L, S);
            detail::attention_query_block<Scalar, Eigen::RowMajor>(
                q.block(offset[b], i * d_k(), L, d_k()), cached_keys.block(0, j * d_k(), S, d_k()),
                cached_values.block(0, j * d_v(), S, d_v()), scale, visibility, task.block, scratch,
                concat.block(offset[b], i * d_v(), L, d_v()));
            return;
          }
          // Key/value head j's part c: keys first … first + keys − 1, for each of its query heads.
          const Index j = task.head, n = parts[b];
          const Index first = first_key[b] + task.part * detail::kKeyBlock, keys = std::min(detail::kKeyBlock, S - first);
          visibility.masked_keys = keys;
          for (Index i = j * group; i < (j + 1) * group; ++i)
            detail::attention_query_block<Scalar, Eigen::RowMajor>(
                q.block(offset[b], i * d_k(), 1, d_k()), cached_keys.block(first, j * d_k(), keys, d_k()),
                cached_values.block(first, j * d_v(), keys, d_v()), scale, visibility, 0, scratch,
                part_outs[b].middleCols((i * n + task.part) * d_v(), d_v()), nullptr,
                part_lses[b].col(i * n + task.part).data());
        });
    detail::parallel_tasks(static_cast<Index>(merges.size()), 0, no_scratch, [&](Index t, int) {
      const Task& task = merges[static_cast<std::size_t>(t)];
      const Index b = task.sequence, i = task.head, n = parts[b];
      detail::merge_key_parts<Scalar>(part_outs[b].middleCols(i * n * d_v(), n * d_v()), part_lses[b].middleCols(i * n, n),
                                      concat.block(offset[b], i * d_v(), 1, d_v()));
    });

    return project_output(concat);              // ΣL_new × d_model
  }

  /// Whether two configurations give parameters and tapes of the same shapes.
  static bool same_shape(const MultiHeadAttentionConfig& a, const MultiHeadAttentionConfig& b) {
    return a.d_model == b.d_model && a.num_heads == b.num_heads && a.num_kv_heads == b.num_kv_heads &&
           a.d_k == b.d_k && a.d_v == b.d_v && a.kdim == b.kdim && a.vdim == b.vdim && a.bias == b.bias &&
           a.add_bias_kv == b.add_bias_kv && a.add_zero_attn == b.add_zero_attn;
  }

  /// Whether two configurations turn queries and keys alike (what a tape or a cache holds depends on it).
  static bool same_rotation(const MultiHeadAttentionConfig& a, const MultiHeadAttentionConfig& b) {
    return a.rotary == b.rotary && (!a.rotary || (a.rotary_base == b.rotary_base && a.rotary_pairs == b.rotary_pairs));
  }

  static std::string describe(const MultiHeadAttentionConfig& c) {
    std::ostringstream base;
    base << c.rotary_base;
    return "d_model " + std::to_string(c.d_model) + ", num_heads " + std::to_string(c.num_heads) +
           (c.num_kv_heads != c.num_heads ? ", num_kv_heads " + std::to_string(c.num_kv_heads) : "") + ", d_k " +
           std::to_string(c.d_k) + ", d_v " + std::to_string(c.d_v) + ", kdim " + std::to_string(c.kdim) + ", vdim " +
           std::to_string(c.vdim) + (c.bias ? ", bias" : "") + (c.add_bias_kv ? ", add_bias_kv" : "") +
           (c.add_zero_attn ? ", add_zero_attn" : "") +
           (c.rotary ? ", rotary " + std::string(c.rotary_pairs == RotaryPairs::interleaved ? "interleaved" : "halves") +
                           " base " + base.str()
                     : "");
  }

  template <typename Derived>
  static void check_width(const Eigen::MatrixBase<Derived>& input, const char* name, Index width,
                          const char* width_name, const char* caller) {
    if (input.cols() != width)
      detail::fail("MultiHeadAttention::", caller, ": ", name, " is ", detail::shape(input), " but ", width_name,
                   " is ", width, "; ", name, " needs ", width, " columns");
  }

  static void check_lengths(const std::vector<Index>& query_lengths, const std::vector<Index>& key_lengths,
                            Index query_rows, Index key_rows, const char* caller) {
    if (query_lengths.size() != key_lengths.size())
      detail::fail("MultiHeadAttention::", caller, ": query_lengths has ", query_lengths.size(),
                   " sequences but key_lengths has ", key_lengths.size());
    check_lengths_add_up(query_lengths, query_rows, "query_lengths", "query", caller);
    check_lengths_add_up(key_lengths, key_rows, "key_lengths", "key", caller);
  }

  /// Checks that sequence lengths are >= 0 and add up to the rows of the stacked input. The sum is
  /// never taken past `rows`, so lengths whose sum would overflow are rejected like any other.
  static void check_lengths_add_up(const std::vector<Index>& lengths, Index rows, const char* lengths_name,
                                   const char* rows_name, const char* caller) {
    for (const Index n : lengths)
      if (n < 0) detail::fail("MultiHeadAttention::", caller, ": sequence lengths must be >= 0, got ", n);
    Index sum = 0;
    for (std::size_t b = 0; b < lengths.size(); ++b) {
      if (lengths[b] > rows - sum)
        detail::fail("MultiHeadAttention::", caller, ": ", lengths_name, " add up to more than the ", rows, " rows of ",
                     rows_name, " (sequence ", b, " has ", lengths[b], " after ", sum, " rows before it)");
      sum += lengths[b];
    }
    if (sum != rows)
      detail::fail("MultiHeadAttention::", caller, ": ", lengths_name, " add up to ", sum, " but ", rows_name, " has ",
                   rows, " rows");
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
        detail::fail("MultiHeadAttention::", caller, ": options.mask is shared by every sequence, so all need the "
                     "same query and key lengths");
      const bool per_head = options.mask.rows() == num_heads() * L && num_heads() > 1;
      if ((options.mask.rows() != L && !per_head) || options.mask.cols() != S)
        detail::fail("MultiHeadAttention::", caller, ": options.mask is ", options.mask.rows(), " x ", options.mask.cols(),
                     " but must be L x S = ", L, " x ", S, " (or h*L x S = ", num_heads() * L, " x ", S,
                     " for one mask per head)");
    }
    if (!options.key_padding_mask.empty()) {
      if (!all_equal(key_lengths))
        detail::fail("MultiHeadAttention::", caller, ": options.key_padding_mask needs every sequence to have the "
                     "same number of keys");
      if (options.key_padding_mask.rows() != batch || options.key_padding_mask.cols() != S)
        detail::fail("MultiHeadAttention::", caller, ": options.key_padding_mask is ",
                     options.key_padding_mask.rows(), " x ", options.key_padding_mask.cols(), " but must be B x S = ",
                     batch, " x ", S,
                     " (one row per sequence)");
    }
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

}  // namespace mha
