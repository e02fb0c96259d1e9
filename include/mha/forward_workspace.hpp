// mha — the memory a forward pass works in, kept by the caller from one forward to the next: a
// forward of the same shapes as the one before allocates nothing.
#pragma once

#include <mha/attention.hpp>
#include <mha/detail/batch.hpp>
#include <mha/detail/products.hpp>
#include <mha/detail/visibility.hpp>

#include <Eigen/Core>

#include <cstddef>
#include <optional>
#include <vector>

namespace mha {

template <typename Scalar>
class MultiHeadAttention;

/// What MultiHeadAttention::forward(…, out, workspace) and forward_batch(…, out, workspace) work in:
/// the projections Q W^Q, K W^K, V W^V, the concatenated heads, the tasks and every thread's tiles.
/// Each forward sizes it for its shapes, and a forward of the same shapes as the one before finds
/// everything there: it allocates nothing (Eigen's matrices keep their memory when their size does
/// not change), and touches no page the system has to map afresh. A forward that returns a new
/// matrix works in a workspace of its own and gives its memory back when it returns.
///
/// Its contents mean nothing between forwards, and it belongs to no module: any module of its
/// scalar type may work in it, one forward at a time (a forward on several threads uses one
/// workspace; two forwards running at once need two). A copy starts empty.
template <typename Scalar>
class ForwardWorkspace {
 public:
  ForwardWorkspace() = default;
  ForwardWorkspace(const ForwardWorkspace&) {}
  ForwardWorkspace& operator=(const ForwardWorkspace&) { return *this; }
  ForwardWorkspace(ForwardWorkspace&&) noexcept = default;
  ForwardWorkspace& operator=(ForwardWorkspace&&) noexcept = default;

  /// \returns the bytes its matrices hold: ΣL · (h·d_k + h·d_v) + ΣS · (h_kv·d_k + h_kv·d_v)
  /// numbers after a forward (twice the keys' and values' with add_bias_kv or add_zero_attn), the
  /// masks' numbers, and each thread's tiles and room for the packed blocks of its products.
  std::size_t bytes() const {
    std::size_t numbers = 0;
    for (const auto* m :
         {&q, &keys, &values, &extended_keys, &extended_values, &concat, &masks.mask, &masks.key_padding})
      numbers += static_cast<std::size_t>(m->size());
    for (const auto& scratch : threads)
      if (scratch) numbers += static_cast<std::size_t>(scratch->size());
    numbers += static_cast<std::size_t>(jobs.packing_size());
    return numbers * sizeof(Scalar);
  }

 private:
  friend class MultiHeadAttention<Scalar>;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

  /// The workspace of one forward that returns its output (`kept` false): it readies no thread
  /// for a next forward, and leaves large packed blocks to Eigen, as a forward without one did.
  explicit ForwardWorkspace(bool kept) : jobs(kept), kept_(kept) {}

  std::vector<Eigen::Index> query_lengths, key_lengths;  ///< forward()'s one sequence's
  detail::Batch batch;
  std::vector<Eigen::Index> query_positions, key_positions;  ///< for rotary embeddings
  Matrix q, keys, values;                                    ///< ΣL × h·d_k, ΣS × h_kv·d_k, ΣS × h_kv·d_v
  /// The keys and values with add_bias_kv's and add_zero_attn's rows after each sequence's.
  Matrix extended_keys, extended_values;
  Matrix concat;                            ///< ΣL × h·d_v: [head_1 … head_h]
  detail::AdditiveMasks<Scalar> masks;      ///< the options' masks, as numbers added to the scores
  std::vector<detail::QueryBlock> tasks;    ///< head i's query block of sequence b
  detail::RowBlockJobs<Scalar> jobs{true};  ///< the projections' blocks of rows, and their packing
  std::vector<std::optional<detail::AttentionScratch<Scalar>>> threads;  ///< by thread_index()
  bool kept_ = true;                                                     ///< kept for the forwards after this one
};

}  // namespace mha
