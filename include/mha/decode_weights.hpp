// mha — a module's projection weights rounded to bfloat16 or half for decoding: a decode step
// reads every weight once, so half the bytes is (nearly) half the time of its projections.
#pragma once

#include <Eigen/Core>

#include <cstddef>
#include <cstdint>

namespace mha {

template <typename Scalar_>
class MultiHeadAttention;

/// The projection weights W^Q, W^K, W^V and W^O of a module, rounded once to Storage
/// (Eigen::bfloat16 or Eigen::half), for decode steps that read them in place of the module's own:
///
///   auto cache = attn.make_cache<Eigen::bfloat16>();
///   const auto weights = attn.make_decode_weights<Eigen::bfloat16>();
///   Matrix y = attn.decode(x, cache, weights);
///
/// A step of a few new tokens reads each weight once per token and converts it to Scalar in
/// registers, computing and accumulating in Scalar; a longer step (a prompt, bound by flops rather
/// than bytes) converts the weights for the step and multiplies as the module does. Biases, rotary
/// embeddings and everything else are the module's own.
///
/// A snapshot: weights the module gets afterwards (a training step, a load, writes through w_q())
/// are not seen — make new ones. Only the module that made them decodes with them (a copy of the
/// module, or a module assigned to, refuses them).
template <typename Scalar, typename Storage>
class DecodeWeights {
 public:
  using StorageType = Storage;
  using Stored = Eigen::Matrix<Storage, Eigen::Dynamic, Eigen::Dynamic>;

  /// \returns the rounded weights, of the module's shapes: W^Q (d_model × h·d_k), W^K (kdim ×
  /// h_kv·d_k), W^V (vdim × h_kv·d_v), W^O (h·d_v × d_model).
  const Stored& w_q() const { return w_q_; }
  const Stored& w_k() const { return w_k_; }
  const Stored& w_v() const { return w_v_; }
  const Stored& w_o() const { return w_o_; }

  /// \returns the bytes of the rounded weights: half those of the module's float weights.
  std::size_t bytes() const {
    return sizeof(Storage) * static_cast<std::size_t>(w_q_.size() + w_k_.size() + w_v_.size() + w_o_.size());
  }

 private:
  friend class MultiHeadAttention<Scalar>;

  template <typename Matrix>
  DecodeWeights(std::uint64_t module, const Matrix& w_q, const Matrix& w_k, const Matrix& w_v, const Matrix& w_o)
      : module_(module),
        w_q_(w_q.template cast<Storage>()),
        w_k_(w_k.template cast<Storage>()),
        w_v_(w_v.template cast<Storage>()),
        w_o_(w_o.template cast<Storage>()) {}

  std::uint64_t module_;  ///< the identity of the module that made them
  Stored w_q_, w_k_, w_v_, w_o_;
};

}  // namespace mha
