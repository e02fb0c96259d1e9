// mha — the multi-head attention module: per-head projections, attention, concatenation, W^O.
#pragma once

#include <mha/attention.hpp>
#include <mha/config.hpp>
#include <mha/mask.hpp>
#include <mha/threads.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <type_traits>
#include <vector>

namespace mha {

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
class MultiHeadAttention {
  static_assert(std::is_floating_point<Scalar_>::value, "mha::MultiHeadAttention needs float or double");

 public:
  using Scalar = Scalar_;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  using Index = Eigen::Index;

  /// A module of the given shape with deterministic weights: each projection matrix W (rows × cols)
  /// is drawn from U(−a, a), a = √(6 / (rows + cols)) (Xavier-uniform), in the order W^Q, W^K, W^V,
  /// W^O, then bias_k and bias_v when add_bias_kv is set, column by column, from a 64-bit Mersenne
  /// Twister seeded with config.seed. The biases b^Q, b^K, b^V, b^O start at zero, as PyTorch's.
  /// Throws mha::invalid_argument if the configuration is invalid (see
  /// MultiHeadAttentionConfig::resolved).
  explicit MultiHeadAttention(const MultiHeadAttentionConfig& config = {})
      : config_(config.resolved()),
        w_q_(config_.d_model, config_.num_heads * config_.d_k),
        w_k_(config_.kdim, config_.num_heads * config_.d_k),
        w_v_(config_.vdim, config_.num_heads * config_.d_v),
        w_o_(config_.num_heads * config_.d_v, config_.d_model),
        b_q_(RowVector::Zero(config_.bias ? w_q_.cols() : 0)),
        b_k_(RowVector::Zero(config_.bias ? w_k_.cols() : 0)),
        b_v_(RowVector::Zero(config_.bias ? w_v_.cols() : 0)),
        b_o_(RowVector::Zero(config_.bias ? w_o_.cols() : 0)),
        bias_k_(config_.add_bias_kv ? w_k_.cols() : 0),
        bias_v_(config_.add_bias_kv ? w_v_.cols() : 0) {
    std::mt19937_64 engine(config_.seed);
    for (Matrix* w : {&w_q_, &w_k_, &w_v_, &w_o_}) xavier_uniform(*w, engine);
    xavier_uniform(bias_k_, engine);
    xavier_uniform(bias_v_, engine);
  }

  /// \returns the configuration, with d_k, d_v, kdim and vdim resolved.
  const MultiHeadAttentionConfig& config() const { return config_; }
  /// \returns d_model, the width of the queries and of the output.
  Index d_model() const { return config_.d_model; }
  /// \returns h, the number of heads.
  Index num_heads() const { return config_.num_heads; }
  /// \returns d_k, the width of each head's queries and keys.
  Index d_k() const { return config_.d_k; }
  /// \returns d_v, the width of each head's values and output.
  Index d_v() const { return config_.d_v; }
  /// \returns kdim, the width of the key rows.
  Index kdim() const { return config_.kdim; }
  /// \returns vdim, the width of the value rows.
  Index vdim() const { return config_.vdim; }

  /// \returns a writable view of W_i^Q (d_model × d_k) of head `head`.
  auto w_q(Index head) { return w_q_.middleCols(checked(head, "w_q") * d_k(), d_k()); }
  auto w_q(Index head) const { return w_q_.middleCols(checked(head, "w_q") * d_k(), d_k()); }
  /// \returns a writable view of W_i^K (kdim × d_k) of head `head`.
  auto w_k(Index head) { return w_k_.middleCols(checked(head, "w_k") * d_k(), d_k()); }
  auto w_k(Index head) const { return w_k_.middleCols(checked(head, "w_k") * d_k(), d_k()); }
  /// \returns a writable view of W_i^V (vdim × d_v) of head `head`.
  auto w_v(Index head) { return w_v_.middleCols(checked(head, "w_v") * d_v(), d_v()); }
  auto w_v(Index head) const { return w_v_.middleCols(checked(head, "w_v") * d_v(), d_v()); }

  /// \returns a writable view of all heads' W^Q, d_model × (h·d_k), head i in column block i.
  auto w_q() { return w_q_.leftCols(w_q_.cols()); }
  auto w_q() const { return w_q_.leftCols(w_q_.cols()); }
  /// \returns a writable view of all heads' W^K, kdim × (h·d_k), head i in column block i.
  auto w_k() { return w_k_.leftCols(w_k_.cols()); }
  auto w_k() const { return w_k_.leftCols(w_k_.cols()); }
  /// \returns a writable view of all heads' W^V, vdim × (h·d_v), head i in column block i.
  auto w_v() { return w_v_.leftCols(w_v_.cols()); }
  auto w_v() const { return w_v_.leftCols(w_v_.cols()); }
  /// \returns a writable view of W^O, (h·d_v) × d_model.
  auto w_o() { return w_o_.leftCols(w_o_.cols()); }
  auto w_o() const { return w_o_.leftCols(w_o_.cols()); }

  /// \returns a writable view of b^Q, 1 × (h·d_k), head i in column block i (config.bias only).
  auto b_q() {
    require_bias("b_q");
    return b_q_.leftCols(b_q_.cols());
  }
  auto b_q() const {
    require_bias("b_q");
    return b_q_.leftCols(b_q_.cols());
  }
  /// \returns a writable view of b^K, 1 × (h·d_k) (config.bias only).
  auto b_k() {
    require_bias("b_k");
    return b_k_.leftCols(b_k_.cols());
  }
  auto b_k() const {
    require_bias("b_k");
    return b_k_.leftCols(b_k_.cols());
  }
  /// \returns a writable view of b^V, 1 × (h·d_v) (config.bias only).
  auto b_v() {
    require_bias("b_v");
    return b_v_.leftCols(b_v_.cols());
  }
  auto b_v() const {
    require_bias("b_v");
    return b_v_.leftCols(b_v_.cols());
  }
  /// \returns a writable view of b^O, 1 × d_model (config.bias only).
  auto b_o() {
    require_bias("b_o");
    return b_o_.leftCols(b_o_.cols());
  }
  auto b_o() const {
    require_bias("b_o");
    return b_o_.leftCols(b_o_.cols());
  }
  /// \returns a writable view of the key row appended to every sequence, 1 × (h·d_k), in projected
  /// space (config.add_bias_kv only; PyTorch's bias_k).
  auto bias_k() {
    require_bias_kv("bias_k");
    return bias_k_.leftCols(bias_k_.cols());
  }
  auto bias_k() const {
    require_bias_kv("bias_k");
    return bias_k_.leftCols(bias_k_.cols());
  }
  /// \returns a writable view of the value row appended to every sequence, 1 × (h·d_v)
  /// (config.add_bias_kv only; PyTorch's bias_v).
  auto bias_v() {
    require_bias_kv("bias_v");
    return bias_v_.leftCols(bias_v_.cols());
  }
  auto bias_v() const {
    require_bias_kv("bias_v");
    return bias_v_.leftCols(bias_v_.cols());
  }

  /// Multi-head attention of L queries over S keys and values (cross-attention when they differ):
  ///   query: L × d_model, key: S × kdim, value: S × vdim  →  L × d_model.
  /// Any Eigen expressions are accepted. L = 0 gives a 0 × d_model result; a query row with no
  /// key to attend to (S = 0, or every key masked) gets a head output of zeros, never NaN.
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  Matrix forward(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
                 const Eigen::MatrixBase<DerivedV>& value, const AttentionOptions& options = {}) const {
    return run(query, key, value, {query.rows()}, {key.rows()}, options, nullptr, "forward");
  }

  /// Self-attention: forward(x, x, x, options), x: L × d_model  →  L × d_model.
  template <typename Derived>
  Matrix forward(const Eigen::MatrixBase<Derived>& x, const AttentionOptions& options = {}) const {
    return forward(x, x, x, options);
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
    result.output = run(query, key, value, {query.rows()}, {key.rows()}, options, &result.weights,
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
    return run(query, key, value, query_lengths, key_lengths, options, nullptr, "forward_batch");
  }

 private:
  /// Rows per task of the projections: a fixed count, so results do not depend on the threads.
  static constexpr Index kProjectionRows = 256;
  static Index row_blocks(Index rows) { return (rows + kProjectionRows - 1) / kProjectionRows; }
  static int no_scratch() { return 0; }

  /// The number of keys appended to every sequence: add_bias_kv's row, add_zero_attn's row.
  Index extra_keys() const { return Index(config_.add_bias_kv) + Index(config_.add_zero_attn); }

  /// Row block `block` of out = input · w + b (b empty: no bias).
  template <typename Input>
  static void project(const Input& input, const Matrix& w, const RowVector& b, Index block, Matrix& out) {
    const Index first = block * kProjectionRows, rows = std::min(kProjectionRows, input.rows() - first);
    auto out_rows = out.middleRows(first, rows);
    out_rows.noalias() = input.middleRows(first, rows) * w;
    if (b.size() > 0) out_rows.rowwise() += b;
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

  /// The whole forward pass over a batch of sequences (one, for forward()). With `weights`, also
  /// each head's attention weights (a batch of one only).
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  Matrix run(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
             const Eigen::MatrixBase<DerivedV>& value, const std::vector<Index>& query_lengths,
             const std::vector<Index>& key_lengths, const AttentionOptions& options, std::vector<Matrix>* weights,
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
    const Index batch = static_cast<Index>(query_lengths.size());
    const Index L = query_lengths.empty() ? 0 : query_lengths.front();
    const Index S = key_lengths.empty() ? 0 : key_lengths.front();
    const Index h = num_heads(), extra = extra_keys();
    const bool per_head_mask = check_masks(options, query_lengths, key_lengths, caller);
    const auto scale = static_cast<Scalar>(detail::resolve_scale(options, d_k()));
    const auto& query_rows = detail::evaluated(query);
    const auto& key_rows = detail::evaluated(key);
    const auto& value_rows = detail::evaluated(value);
    const Index total_L = query.rows(), total_S = key.rows();
    const Index max_L = batch ? *std::max_element(query_lengths.begin(), query_lengths.end()) : 0;
    const Index max_S = batch ? *std::max_element(key_lengths.begin(), key_lengths.end()) : 0;

    // The projections of all heads and all sequences, one product each, in row blocks in parallel.
    Matrix q(total_L, h * d_k());                       // ΣL × h·d_k, head i in column block i
    Matrix k(total_S, h * d_k());                       // ΣS × h·d_k
    Matrix v(total_S, h * d_v());                       // ΣS × h·d_v
    const Index q_blocks = row_blocks(total_L), kv_blocks = row_blocks(total_S);
    const double projection_flops =
        2.0 * static_cast<double>(total_L * d_model() * h * d_k() + total_S * (kdim() * h * d_k() + vdim() * h * d_v()));
    detail::parallel_tasks(q_blocks + 2 * kv_blocks, projection_flops, no_scratch, [&](Index t, int) {
      if (t < q_blocks) return project(query_rows, w_q_, b_q_, t, q);
      t -= q_blocks;
      if (t < kv_blocks) return project(key_rows, w_k_, b_k_, t, k);
      project(value_rows, w_v_, b_v_, t - kv_blocks, v);
    });
    // add_bias_kv and add_zero_attn: each sequence's keys and values get their extra rows.
    Matrix k_extended, v_extended;
    if (extra > 0) {
      k_extended.resize(total_S + batch * extra, k.cols());
      v_extended.resize(total_S + batch * extra, v.cols());
      append_extra_rows(k, bias_k_, key_lengths, k_extended);
      append_extra_rows(v, bias_v_, key_lengths, v_extended);
    }
    const Matrix& keys = extra > 0 ? k_extended : k;
    const Matrix& values = extra > 0 ? v_extended : v;

    // The masks, as additive matrices of Scalar, once for every head and sequence.
    const Matrix mask = options.mask.template additive_matrix<Scalar>();
    const Matrix key_padding = options.key_padding_mask.template additive_matrix<Scalar>();

    // One task per sequence, head and block of query rows; each writes its rows of the head's
    // column block of the concatenation.
    struct Task {
      Index sequence, head, block;
    };
    std::vector<Task> tasks;
    std::vector<Index> q_offset(batch + 1, 0), k_offset(batch + 1, 0);
    double attention_flops = 0;
    for (Index b = 0; b < batch; ++b) {
      q_offset[b + 1] = q_offset[b] + query_lengths[b];
      k_offset[b + 1] = k_offset[b] + key_lengths[b] + extra;
      attention_flops += static_cast<double>(h) * detail::attention_flops(query_lengths[b], key_lengths[b] + extra, d_k(), d_v());
      for (Index i = 0; i < h; ++i)
        for (Index block = 0; block < detail::query_blocks(query_lengths[b]); ++block) tasks.push_back({b, i, block});
    }
    if (weights) weights->assign(h, Matrix::Zero(L, S + extra));
    Matrix concat(total_L, h * d_v());                  // ΣL × h·d_v: [head_1 … head_h]
    const bool dropout = options.training && config_.dropout > 0;
    detail::parallel_tasks(
        static_cast<Index>(tasks.size()), attention_flops,
        [&] { return detail::AttentionScratch<Scalar>::for_problem(max_L, max_S + extra, d_k()); },
        [&](Index t, detail::AttentionScratch<Scalar>& scratch) {
          const Task& task = tasks[static_cast<std::size_t>(t)];
          const Index b = task.sequence, i = task.head;
          const Index L_b = query_lengths[b], S_b = key_lengths[b];
          detail::KeyVisibility<Scalar> visibility;
          visibility.masked_keys = S_b;
          visibility.causal = options.causal;
          visibility.causal_offset = options.alignment == CausalAlignment::bottom_right ? S_b - L_b : 0;
          if (mask.size() > 0) {
            visibility.mask = &mask;
            visibility.mask_row = per_head_mask ? i * L_b : 0;
          }
          if (key_padding.size() > 0) {
            visibility.key_padding = &key_padding;
            visibility.key_padding_row = b;
          }
          if (dropout) {
            visibility.dropout = config_.dropout;
            visibility.dropout_seed = options.dropout_seed;
            visibility.dropout_stream = static_cast<std::uint64_t>(b * h + i);
          }
          const Index rows_b = L_b, keys_b = S_b + extra;
          detail::attention_query_block<Scalar>(
              q.block(q_offset[b], i * d_k(), rows_b, d_k()), keys.block(k_offset[b], i * d_k(), keys_b, d_k()),
              values.block(k_offset[b], i * d_v(), keys_b, d_v()), scale, visibility, task.block, scratch,
              concat.block(q_offset[b], i * d_v(), rows_b, d_v()), weights ? &(*weights)[static_cast<std::size_t>(i)] : nullptr);
        });

    Matrix output(total_L, d_model());                  // ΣL × d_model = concat · W^O + b^O
    const double output_flops = 2.0 * static_cast<double>(total_L * h * d_v() * d_model());
    detail::parallel_tasks(q_blocks, output_flops, no_scratch,
                           [&](Index t, int) { project(concat, w_o_, b_o_, t, output); });
    return output;
  }

  Index checked(Index head, const char* accessor) const {
    if (head < 0 || head >= num_heads())
      detail::fail(accessor, "(", head, "): head index out of range; the module has num_heads = ",
                   num_heads(), " (valid heads 0 to ", num_heads() - 1, ")");
    return head;
  }

  void require_bias(const char* accessor) const {
    if (!config_.bias) detail::fail(accessor, "(): the module has no biases; set config.bias = true");
  }

  void require_bias_kv(const char* accessor) const {
    if (!config_.add_bias_kv) detail::fail(accessor, "(): the module has no bias_k and bias_v; set config.add_bias_kv = true");
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
    for (const auto* lengths : {&query_lengths, &key_lengths})
      for (const Index n : *lengths)
        if (n < 0) detail::fail("MultiHeadAttention::", caller, ": sequence lengths must be >= 0, got ", n);
    const Index sum_q = std::accumulate(query_lengths.begin(), query_lengths.end(), Index(0));
    const Index sum_k = std::accumulate(key_lengths.begin(), key_lengths.end(), Index(0));
    if (sum_q != query_rows)
      detail::fail("MultiHeadAttention::", caller, ": query_lengths add up to ", sum_q, " but query has ",
                   query_rows, " rows");
    if (sum_k != key_rows)
      detail::fail("MultiHeadAttention::", caller, ": key_lengths add up to ", sum_k, " but key has ", key_rows,
                   " rows");
  }

  /// Checks the masks' shapes against the batch. \returns whether options.mask has one mask per head.
  bool check_masks(const AttentionOptions& options, const std::vector<Index>& query_lengths,
                   const std::vector<Index>& key_lengths, const char* caller) const {
    const auto all_equal = [](const std::vector<Index>& v) {
      return std::all_of(v.begin(), v.end(), [&](Index n) { return n == v.front(); });
    };
    const Index batch = static_cast<Index>(query_lengths.size());
    const Index L = batch ? query_lengths.front() : 0, S = batch ? key_lengths.front() : 0;
    bool per_head = false;
    if (!options.mask.empty()) {
      if (!all_equal(query_lengths) || !all_equal(key_lengths))
        detail::fail("MultiHeadAttention::", caller, ": options.mask is shared by every sequence, so all need the "
                     "same query and key lengths");
      per_head = options.mask.rows() == num_heads() * L && num_heads() > 1;
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
    return per_head;
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

  MultiHeadAttentionConfig config_;
  Matrix w_q_, w_k_, w_v_, w_o_;
  RowVector b_q_, b_k_, b_v_, b_o_, bias_k_, bias_v_;
};

}  // namespace mha
