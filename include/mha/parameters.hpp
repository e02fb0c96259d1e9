// mha — the learnable parameters of a multi-head attention module, and their gradients, which have
// the same shapes and are read through the same views.
#pragma once

#include <mha/config.hpp>

#include <Eigen/Core>

#include <string>
#include <type_traits>
#include <vector>

namespace mha {

/// A parameter (or its gradient) by name: `value` maps the whole matrix, in place.
template <typename MatrixType>
struct NamedMatrix {
  std::string name;              ///< "w_q", "w_k", "w_v", "w_o", "b_q", …, "bias_k", "bias_v"
  Eigen::Map<MatrixType> value;  ///< the matrix itself, writable unless MatrixType is const
};

/// The parameters of a multi-head attention module, "every linear transformation … contains a set
/// of learnable parameters": W^Q (d_model × h·d_k), W^K (kdim × h_kv·d_k), W^V (vdim × h_kv·d_v),
/// W^O (h·d_v × d_model), with head i's W_i^Q, W_i^K, W_i^V in column block i (h_kv = h unless
/// grouped-query attention, where key/value head j has column block j); with config.bias, the
/// row vectors b^Q, b^K, b^V, b^O; with config.add_bias_kv, the extra key and value rows bias_k and
/// bias_v. MultiHeadAttention is made of one; its gradients (MultiHeadAttention::zero_gradients) are
/// another of the same shapes, so that grads.w_q(i) is ∂loss/∂W_i^Q.
template <typename Scalar_>
class AttentionParameters {
  static_assert(std::is_floating_point<Scalar_>::value, "mha::AttentionParameters needs float or double");

 public:
  using Scalar = Scalar_;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  using Index = Eigen::Index;

  /// Zero parameters of the shape `config` describes (throws mha::invalid_argument if it is invalid).
  explicit AttentionParameters(const MultiHeadAttentionConfig& config = {})
      : config_(config.resolved()),
        w_q_(Matrix::Zero(config_.d_model, config_.num_heads * config_.d_k)),
        w_k_(Matrix::Zero(config_.kdim, config_.num_kv_heads * config_.d_k)),
        w_v_(Matrix::Zero(config_.vdim, config_.num_kv_heads * config_.d_v)),
        w_o_(Matrix::Zero(config_.num_heads * config_.d_v, config_.d_model)),
        b_q_(RowVector::Zero(config_.bias ? w_q_.cols() : 0)),
        b_k_(RowVector::Zero(config_.bias ? w_k_.cols() : 0)),
        b_v_(RowVector::Zero(config_.bias ? w_v_.cols() : 0)),
        b_o_(RowVector::Zero(config_.bias ? w_o_.cols() : 0)),
        bias_k_(RowVector::Zero(config_.add_bias_kv ? w_k_.cols() : 0)),
        bias_v_(RowVector::Zero(config_.add_bias_kv ? w_v_.cols() : 0)) {}

  /// \returns the configuration, with d_k, d_v, kdim and vdim resolved.
  const MultiHeadAttentionConfig& config() const { return config_; }
  /// \returns d_model, the width of the queries and of the output.
  Index d_model() const { return config_.d_model; }
  /// \returns h, the number of heads.
  Index num_heads() const { return config_.num_heads; }
  /// \returns h_kv, the number of key/value heads (num_heads unless grouped-query attention).
  Index num_kv_heads() const { return config_.num_kv_heads; }
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
  /// \returns a writable view of W_j^K (kdim × d_k) of key/value head `head` (a query head's own
  /// unless num_kv_heads < num_heads).
  auto w_k(Index head) { return w_k_.middleCols(checked_kv(head, "w_k") * d_k(), d_k()); }
  auto w_k(Index head) const { return w_k_.middleCols(checked_kv(head, "w_k") * d_k(), d_k()); }
  /// \returns a writable view of W_j^V (vdim × d_v) of key/value head `head`.
  auto w_v(Index head) { return w_v_.middleCols(checked_kv(head, "w_v") * d_v(), d_v()); }
  auto w_v(Index head) const { return w_v_.middleCols(checked_kv(head, "w_v") * d_v(), d_v()); }

  /// \returns a writable view of all heads' W^Q, d_model × (h·d_k), head i in column block i.
  auto w_q() { return w_q_.leftCols(w_q_.cols()); }
  auto w_q() const { return w_q_.leftCols(w_q_.cols()); }
  /// \returns a writable view of all heads' W^K, kdim × (h_kv·d_k), key/value head j in column block j.
  auto w_k() { return w_k_.leftCols(w_k_.cols()); }
  auto w_k() const { return w_k_.leftCols(w_k_.cols()); }
  /// \returns a writable view of all heads' W^V, vdim × (h_kv·d_v), key/value head j in column block j.
  auto w_v() { return w_v_.leftCols(w_v_.cols()); }
  auto w_v() const { return w_v_.leftCols(w_v_.cols()); }
  /// \returns a writable view of W^O, (h·d_v) × d_model.
  auto w_o() { return w_o_.leftCols(w_o_.cols()); }
  auto w_o() const { return w_o_.leftCols(w_o_.cols()); }

  /// \returns a writable view of b^Q, 1 × (h·d_k), head i in column block i (config.bias only).
  auto b_q() { return require(b_q_, config_.bias, "b_q").leftCols(b_q_.cols()); }
  auto b_q() const { return require(b_q_, config_.bias, "b_q").leftCols(b_q_.cols()); }
  /// \returns a writable view of b^K, 1 × (h_kv·d_k) (config.bias only).
  auto b_k() { return require(b_k_, config_.bias, "b_k").leftCols(b_k_.cols()); }
  auto b_k() const { return require(b_k_, config_.bias, "b_k").leftCols(b_k_.cols()); }
  /// \returns a writable view of b^V, 1 × (h_kv·d_v) (config.bias only).
  auto b_v() { return require(b_v_, config_.bias, "b_v").leftCols(b_v_.cols()); }
  auto b_v() const { return require(b_v_, config_.bias, "b_v").leftCols(b_v_.cols()); }
  /// \returns a writable view of b^O, 1 × d_model (config.bias only).
  auto b_o() { return require(b_o_, config_.bias, "b_o").leftCols(b_o_.cols()); }
  auto b_o() const { return require(b_o_, config_.bias, "b_o").leftCols(b_o_.cols()); }
  /// \returns a writable view of the key row appended to every sequence, 1 × (h_kv·d_k), in projected
  /// space (config.add_bias_kv only; PyTorch's bias_k).
  auto bias_k() { return require(bias_k_, config_.add_bias_kv, "bias_k").leftCols(bias_k_.cols()); }
  auto bias_k() const { return require(bias_k_, config_.add_bias_kv, "bias_k").leftCols(bias_k_.cols()); }
  /// \returns a writable view of the value row appended to every sequence, 1 × (h_kv·d_v)
  /// (config.add_bias_kv only; PyTorch's bias_v).
  auto bias_v() { return require(bias_v_, config_.add_bias_kv, "bias_v").leftCols(bias_v_.cols()); }
  auto bias_v() const { return require(bias_v_, config_.add_bias_kv, "bias_v").leftCols(bias_v_.cols()); }

  /// \returns every parameter the configuration has, by name, in a fixed order: w_q, w_k, w_v, w_o,
  /// then b_q, b_k, b_v, b_o (config.bias), then bias_k, bias_v (config.add_bias_kv). The maps
  /// write through to the storage, so an optimiser updates the module with
  ///   auto p = attn.parameters(), g = grads.parameters();
  ///   for (std::size_t i = 0; i < p.size(); ++i) p[i].value -= learning_rate * g[i].value;
  std::vector<NamedMatrix<Matrix>> parameters() { return named<Matrix>(*this); }
  std::vector<NamedMatrix<const Matrix>> parameters() const { return named<const Matrix>(*this); }

  /// Sets every parameter to zero (for gradients: before accumulating the next step's).
  void set_zero() {
    for (auto& p : parameters()) p.value.setZero();
  }

 protected:
  MultiHeadAttentionConfig config_;
  Matrix w_q_, w_k_, w_v_, w_o_;
  RowVector b_q_, b_k_, b_v_, b_o_, bias_k_, bias_v_;

  Index checked(Index head, const char* accessor) const {
    if (head < 0 || head >= num_heads())
      detail::fail(accessor, "(", head, "): head index out of range; the module has num_heads = ", num_heads(),
                   " (valid heads 0 to ", num_heads() - 1, ")");
    return head;
  }

  Index checked_kv(Index head, const char* accessor) const {
    if (num_kv_heads() == num_heads()) return checked(head, accessor);
    if (head < 0 || head >= num_kv_heads())
      detail::fail(accessor, "(", head,
                   "): key/value head index out of range; the module has num_kv_heads = ", num_kv_heads(),
                   " (valid heads 0 to ", num_kv_heads() - 1, ")");
    return head;
  }

 private:
  template <typename Row>
  static Row& require(Row& row, bool present, const char* accessor) {
    if (!present && accessor[0] == 'b' && accessor[1] == '_')
      detail::fail(accessor, "(): the module has no biases; set config.bias = true");
    if (!present) detail::fail(accessor, "(): the module has no bias_k and bias_v; set config.add_bias_kv = true");
    return row;
  }

  template <typename MatrixType, typename Self>
  static std::vector<NamedMatrix<MatrixType>> named(Self& self) {
    std::vector<NamedMatrix<MatrixType>> list;
    const auto add = [&](const char* name, auto& m) {
      list.push_back({name, Eigen::Map<MatrixType>(m.data(), m.rows(), m.cols())});
    };
    add("w_q", self.w_q_);
    add("w_k", self.w_k_);
    add("w_v", self.w_v_);
    add("w_o", self.w_o_);
    if (self.config_.bias) {
      add("b_q", self.b_q_);
      add("b_k", self.b_k_);
      add("b_v", self.b_v_);
      add("b_o", self.b_o_);
    }
    if (self.config_.add_bias_kv) {
      add("bias_k", self.bias_k_);
      add("bias_v", self.bias_v_);
    }
    return list;
  }
};

}  // namespace mha
