// mha — what training needs beside the parameters: the tape a forward pass records for the
// backward pass, and the gradients with respect to the inputs that the backward pass returns.
#pragma once

#include <mha/config.hpp>

#include <Eigen/Core>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace mha {

namespace detail {

/// What a forward pass recorded for its backward pass (see Tape): the backward reads it, the
/// forward writes it, nothing else does.
template <typename Scalar>
struct TapedForward {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  std::uint64_t module = 0;         ///< the identity of the module that recorded it
  MultiHeadAttentionConfig config;  ///< of that module
  AttentionOptions options;         ///< with masks of its own (AttentionMask::owning)
  bool self_attention = false;      ///< key and value are empty: the inputs are `query`
  std::vector<Eigen::Index> query_lengths, key_lengths;
  Matrix query, key, value;  ///< the inputs: ΣL × d_model, ΣS × kdim, ΣS × vdim
  Matrix q, keys, values;    ///< ΣL × h·d_k; (ΣS + B·extra) × h_kv·d_k and × h_kv·d_v
  Matrix concat;             ///< ΣL × h·d_v: [head_1 … head_h]
  Matrix log_sum_exp;        ///< ΣL × h: log Σ_j exp(score_j) per row and head
};

}  // namespace detail

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
  void clear() { recorded_.reset(); }
  /// \returns the bytes of the matrices the tape holds.
  std::size_t bytes() const {
    if (!recorded_) return 0;
    const auto& r = *recorded_;
    std::size_t n = 0;
    for (const Matrix* m : {&r.query, &r.key, &r.value, &r.q, &r.keys, &r.values, &r.concat, &r.log_sum_exp})
      n += static_cast<std::size_t>(m->size()) * sizeof(Scalar);
    return n;
  }

  /// Records a forward pass, replacing what the tape held (MultiHeadAttention::forward does).
  void record(detail::TapedForward<Scalar> forward) { recorded_ = std::move(forward); }
  /// \returns the recorded forward pass (MultiHeadAttention::backward reads it); the tape must
  /// not be empty.
  const detail::TapedForward<Scalar>& recorded() const { return *recorded_; }

 private:
  std::optional<detail::TapedForward<Scalar>> recorded_;
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
