// mha — the multi-head attention module: per-head projections, attention, concatenation, W^O.
#pragma once

#include <mha/attention.hpp>
#include <mha/config.hpp>
#include <mha/threads.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <type_traits>

namespace mha {

/// Multi-head attention (Vaswani et al. 2017, §3.2.2), one row per token:
///   head_i = softmax(Q W_i^Q (K W_i^K)ᵀ / √d_k) · V W_i^V              L × d_v
///   output = [head_1 … head_h] · W^O                                  L × d_model
/// with W_i^Q, W_i^K: d_model × d_k, W_i^V: d_model × d_v and W^O: (h·d_v) × d_model.
///
/// All heads' query projections live in one d_model × (h·d_k) matrix whose column block i is
/// W_i^Q (likewise K and V), so each projection of all heads is a single matrix product; head i's
/// projected queries are then a contiguous column block, and each head writes its output straight
/// into its column block of the concatenation, which meets W^O in one more product.
template <typename Scalar_>
class MultiHeadAttention {
  static_assert(std::is_floating_point<Scalar_>::value, "mha::MultiHeadAttention needs float or double");

 public:
  using Scalar = Scalar_;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using Index = Eigen::Index;

  /// A module of the given shape with deterministic Xavier-uniform weights: each projection
  /// matrix W (rows × cols) is drawn from U(−a, a), a = √(6 / (rows + cols)), in the order W^Q, W^K,
  /// W^V, W^O, column by column, from a 64-bit Mersenne Twister seeded with config.seed.
  /// Throws mha::invalid_argument if the configuration is invalid (see
  /// MultiHeadAttentionConfig::resolved).
  explicit MultiHeadAttention(const MultiHeadAttentionConfig& config = {})
      : config_(config.resolved()),
        w_q_(config_.d_model, config_.num_heads * config_.d_k),
        w_k_(config_.d_model, config_.num_heads * config_.d_k),
        w_v_(config_.d_model, config_.num_heads * config_.d_v),
        w_o_(config_.num_heads * config_.d_v, config_.d_model) {
    std::mt19937_64 engine(config_.seed);
    for (Matrix* w : {&w_q_, &w_k_, &w_v_, &w_o_}) xavier_uniform(*w, engine);
  }

  /// \returns the configuration, with d_k and d_v resolved.
  const MultiHeadAttentionConfig& config() const { return config_; }
  /// \returns d_model, the width of inputs and output.
  Index d_model() const { return config_.d_model; }
  /// \returns h, the number of heads.
  Index num_heads() const { return config_.num_heads; }
  /// \returns d_k, the width of each head's queries and keys.
  Index d_k() const { return config_.d_k; }
  /// \returns d_v, the width of each head's values and output.
  Index d_v() const { return config_.d_v; }

  /// \returns a writable view of W_i^Q (d_model × d_k) of head `head`.
  auto w_q(Index head) { return w_q_.middleCols(checked(head, "w_q") * d_k(), d_k()); }
  auto w_q(Index head) const { return w_q_.middleCols(checked(head, "w_q") * d_k(), d_k()); }
  /// \returns a writable view of W_i^K (d_model × d_k) of head `head`.
  auto w_k(Index head) { return w_k_.middleCols(checked(head, "w_k") * d_k(), d_k()); }
  auto w_k(Index head) const { return w_k_.middleCols(checked(head, "w_k") * d_k(), d_k()); }
  /// \returns a writable view of W_i^V (d_model × d_v) of head `head`.
  auto w_v(Index head) { return w_v_.middleCols(checked(head, "w_v") * d_v(), d_v()); }
  auto w_v(Index head) const { return w_v_.middleCols(checked(head, "w_v") * d_v(), d_v()); }

  /// \returns a writable view of all heads' W^Q, d_model × (h·d_k), head i in column block i.
  auto w_q() { return w_q_.leftCols(w_q_.cols()); }
  auto w_q() const { return w_q_.leftCols(w_q_.cols()); }
  /// \returns a writable view of all heads' W^K, d_model × (h·d_k), head i in column block i.
  auto w_k() { return w_k_.leftCols(w_k_.cols()); }
  auto w_k() const { return w_k_.leftCols(w_k_.cols()); }
  /// \returns a writable view of all heads' W^V, d_model × (h·d_v), head i in column block i.
  auto w_v() { return w_v_.leftCols(w_v_.cols()); }
  auto w_v() const { return w_v_.leftCols(w_v_.cols()); }
  /// \returns a writable view of W^O, (h·d_v) × d_model.
  auto w_o() { return w_o_.leftCols(w_o_.cols()); }
  auto w_o() const { return w_o_.leftCols(w_o_.cols()); }

  /// Multi-head attention of L queries over S keys and values (cross-attention when they differ):
  ///   query: L × d_model, key and value: S × d_model  →  L × d_model.
  /// Any Eigen expressions are accepted. L = 0 gives a 0 × d_model result; S = 0 (nothing to
  /// attend to) gives heads of zeros and so an L × d_model matrix of zeros.
  template <typename DerivedQ, typename DerivedK, typename DerivedV>
  Matrix forward(const Eigen::MatrixBase<DerivedQ>& query, const Eigen::MatrixBase<DerivedK>& key,
                 const Eigen::MatrixBase<DerivedV>& value, const AttentionOptions& options = {}) const {
    static_assert(std::is_same<Scalar, typename DerivedQ::Scalar>::value &&
                      std::is_same<Scalar, typename DerivedK::Scalar>::value &&
                      std::is_same<Scalar, typename DerivedV::Scalar>::value,
                  "mha::MultiHeadAttention::forward: inputs must have the module's scalar type");
    check_width(query, "query");
    check_width(key, "key");
    check_width(value, "value");
    if (key.rows() != value.rows())
      detail::fail("MultiHeadAttention::forward: key has ", key.rows(), " rows but value has ",
                   value.rows(), " (key is ", detail::shape(key), ", value is ", detail::shape(value), ")");
    const auto scale = static_cast<Scalar>(detail::resolve_scale(options, d_k()));
    const auto& query_rows = detail::evaluated(query);
    const auto& key_rows = detail::evaluated(key);
    const auto& value_rows = detail::evaluated(value);
    const Index L = query.rows(), S = key.rows(), h = num_heads();

    // The projections of all heads, one product each, computed in blocks of rows in parallel.
    Matrix q(L, h * d_k());                             // L × h·d_k, head i in column block i
    Matrix k(S, h * d_k());                             // S × h·d_k
    Matrix v(S, h * d_v());                             // S × h·d_v
    const Index q_blocks = row_blocks(L), kv_blocks = row_blocks(S);
    const double dm = static_cast<double>(d_model());
    const double projection_flops = 2 * dm * static_cast<double>(L * h * d_k() + S * h * (d_k() + d_v()));
    detail::parallel_tasks(q_blocks + 2 * kv_blocks, projection_flops, no_scratch, [&](Index t, int) {
      if (t < q_blocks) return project(query_rows, w_q_, t, q);
      t -= q_blocks;
      if (t < kv_blocks) return project(key_rows, w_k_, t, k);
      project(value_rows, w_v_, t - kv_blocks, v);
    });

    // Each head's attention, one task per head and block of query rows, writes its rows of the
    // head's column block of the concatenation.
    Matrix concat(L, h * d_v());                        // L × h·d_v: [head_1 … head_h]
    const Index blocks = detail::query_blocks(L);
    detail::parallel_tasks(
        h * blocks, static_cast<double>(h) * detail::attention_flops(L, S, d_k(), d_v()),
        [&] { return detail::AttentionScratch<Scalar>::for_problem(L, S, d_k()); },
        [&](Index t, detail::AttentionScratch<Scalar>& scratch) {
          const Index i = t / blocks;
          detail::attention_query_block<Scalar>(q.middleCols(i * d_k(), d_k()), k.middleCols(i * d_k(), d_k()),
                                                v.middleCols(i * d_v(), d_v()), scale, options.causal, t % blocks,
                                                scratch, concat.middleCols(i * d_v(), d_v()));
        });

    Matrix output(L, d_model());                        // L × d_model = concat · W^O
    const double output_flops = 2 * dm * static_cast<double>(L * h * d_v());
    detail::parallel_tasks(q_blocks, output_flops, no_scratch, [&](Index t, int) { project(concat, w_o_, t, output); });
    return output;
  }

  /// Self-attention: forward(x, x, x, options), x: L × d_model  →  L × d_model.
  template <typename Derived>
  Matrix forward(const Eigen::MatrixBase<Derived>& x, const AttentionOptions& options = {}) const {
    return forward(x, x, x, options);
  }

 private:
  /// Rows per task of the projections: a fixed count, so results do not depend on the threads.
  static constexpr Index kProjectionRows = 256;
  static Index row_blocks(Index rows) { return (rows + kProjectionRows - 1) / kProjectionRows; }
  static int no_scratch() { return 0; }

  /// Row block `block` of out = input · w.
  template <typename Input>
  static void project(const Input& input, const Matrix& w, Index block, Matrix& out) {
    const Index first = block * kProjectionRows, rows = std::min(kProjectionRows, input.rows() - first);
    out.middleRows(first, rows).noalias() = input.middleRows(first, rows) * w;
  }

  Index checked(Index head, const char* accessor) const {
    if (head < 0 || head >= num_heads())
      detail::fail(accessor, "(", head, "): head index out of range; the module has num_heads = ",
                   num_heads(), " (valid heads 0 to ", num_heads() - 1, ")");
    return head;
  }

  template <typename Derived>
  void check_width(const Eigen::MatrixBase<Derived>& input, const char* name) const {
    if (input.cols() != d_model())
      detail::fail("MultiHeadAttention::forward: ", name, " is ", detail::shape(input), " but d_model is ",
                   d_model(), "; ", name, " needs ", d_model(), " columns");
  }

  static void xavier_uniform(Matrix& w, std::mt19937_64& engine) {
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
};

}  // namespace mha
