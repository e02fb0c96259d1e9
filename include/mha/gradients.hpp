// mha — what training needs beside the parameters: the tape a forward pass records for the
// backward pass, and the gradients with respect to the inputs that the backward pass returns.
#pragma once

#include <mha/config.hpp>

#include <Eigen/Core>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace mha {

template <typename Scalar>
class MultiHeadAttention;

/// What a training forward pass, MultiHeadAttention::forward(…, tape), keeps for its backward pass:
/// the inputs, their projections Q W^Q, K W^K, V W^V, the concatenated heads and, per head and query
/// row, the log-sum-exp of the scores. Its memory is O((L + S) · width), never L × S: the backward
/// recomputes the attention weights tile by tile from the log-sum-exp (FlashAttention-2). A tape
/// can be reused; each forward overwrites it. It keeps a copy of the options and of their masks,
/// and belongs to the module that recorded it: only that module's backward() reads it.
template <typename Scalar>
class Tape {
 public:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

  /// \returns whether no forward pass has been recorded (or the tape was cleared).
  bool empty() const { return !recorded_; }
  /// Frees the memory and forgets the recorded forward pass.
  void clear() { *this = Tape(); }
  /// \returns the bytes of the matrices the tape holds.
  std::size_t bytes() const {
    std::size_t n = 0;
    for (const Matrix* m : {&query_, &key_, &value_, &q_, &keys_, &values_, &concat_, &log_sum_exp_})
      n += static_cast<std::size_t>(m->size()) * sizeof(Scalar);
    return n;
  }

 private:
  friend class MultiHeadAttention<Scalar>;

  bool recorded_ = false;
  bool self_attention_ = false;               ///< key_ and value_ are empty: the inputs are query_
  MultiHeadAttentionConfig config_;           ///< of the module that recorded it
  std::uint64_t module_ = 0;                  ///< the identity of the module that recorded it
  AttentionOptions options_;
  std::vector<Eigen::Index> query_lengths_, key_lengths_;
  Matrix query_, key_, value_;                ///< the inputs: ΣL × d_model, ΣS × kdim, ΣS × vdim
  Matrix q_, keys_, values_;                  ///< ΣL × h·d_k; (ΣS + B·extra) × h·d_k and × h·d_v
  Matrix concat_;                             ///< ΣL × h·d_v: [head_1 … head_h]
  Matrix log_sum_exp_;                        ///< ΣL × h: log Σ_j exp(score_j) per row and head
};

/// The gradients of the loss with respect to the inputs of a forward pass, as
/// MultiHeadAttention::backward returns them, stacked like the inputs were.
template <typename Scalar>
struct InputGradients {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

  Matrix query;  ///< ∂loss/∂query, ΣL × d_model
  Matrix key;    ///< ∂loss/∂key, ΣS × kdim
  Matrix value;  ///< ∂loss/∂value, ΣS × vdim

  /// \returns ∂loss/∂x of self-attention, forward(x): x was the query, the key and the value, so
  /// its gradient is the sum of the three.
  Matrix self_attention() const {
    if (query.rows() != key.rows() || query.cols() != key.cols() || key.rows() != value.rows() ||
        key.cols() != value.cols())
      detail::fail("InputGradients::self_attention: query is ", detail::shape(query), ", key is ", detail::shape(key),
                   " and value is ", detail::shape(value), "; self-attention needs the same shape for all three");
    return query + key + value;
  }
};

}  // namespace mha
