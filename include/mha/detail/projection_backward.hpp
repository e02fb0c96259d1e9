// mha — the backward of the module's projections, outside the attention between them: for passes
// that run the attention's backward elsewhere (mha/distributed/) and need the gradients of the
// inputs and of W^Q, W^K, W^V, W^O and the biases from those of the projected rows.
#pragma once

#include <mha/detail/gemm.hpp>
#include <mha/detail/products.hpp>
#include <mha/detail/visibility.hpp>
#include <mha/parameters.hpp>
#include <mha/rotary.hpp>
#include <mha/tape.hpp>

#include <Eigen/Core>

#include <vector>

namespace mha {
namespace detail {

/// The backward of output = concat · W^O + b^O: \returns ∂loss/∂concat = dy · W^Oᵀ and adds
/// concatᵀ · dy into gradients.w_o() and the column sums of dy into gradients.b_o().
template <typename Scalar>
Matrix<Scalar> output_projection_backward(const AttentionParameters<Scalar>& weights,
                                          const ConstMatrixRef<Scalar>& concat, const ConstMatrixRef<Scalar>& dy,
                                          AttentionParameters<Scalar>& gradients) {
  Matrix<Scalar> d_concat(concat.rows(), concat.cols());
  RowBlockJobs<Scalar> jobs;
  jobs.product(operand(dy), operand(weights.w_o()).t(), d_concat);
  jobs.product(operand(concat).t(), operand(dy), gradients.w_o(), true);
  jobs.run();
  if (weights.config().bias) add_column_sums(operand(dy), gradients.b_o().data());
  return d_concat;
}

/// With rotary embeddings, turns the rows of ∂loss/∂q (or ∂loss/∂k) back in place by their
/// positions: the rotation's transpose, the backward of turning them.
template <typename Scalar>
void turn_back(const MultiHeadAttentionConfig& config, Matrix<Scalar>& d, const std::vector<Eigen::Index>& positions) {
  if (!config.rotary) return;
  const RotaryEmbedding rotary(config);
  RowBlockJobs<Scalar> jobs;
  jobs.rotate_back(d, {&rotary, positions.data()});
  jobs.run();
}

/// The backward of q = query · W^Q + b^Q, its rows turned at their positions with rotary
/// embeddings: given ∂loss/∂q (turned back in place by the rotation's transpose), \returns
/// ∂loss/∂query and adds W^Q's and b^Q's gradients into `gradients`.
template <typename Scalar>
Matrix<Scalar> query_projection_backward(const AttentionParameters<Scalar>& weights,
                                         const ConstMatrixRef<Scalar>& query,
                                         const std::vector<Eigen::Index>& query_positions, Matrix<Scalar>& d_q,
                                         AttentionParameters<Scalar>& gradients) {
  const MultiHeadAttentionConfig& config = weights.config();
  turn_back(config, d_q, query_positions);
  RowBlockJobs<Scalar> jobs;
  Matrix<Scalar> d_query(query.rows(), config.d_model);
  jobs.product(operand(d_q), operand(weights.w_q()).t(), d_query);
  jobs.product(operand(query).t(), operand(d_q), gradients.w_q(), true);
  jobs.run();
  if (config.bias) add_column_sums(operand(d_q), gradients.b_q().data());
  return d_query;
}

/// The backward of k = key · W^K + b^K and v = value · W^V + b^V, the rows of k turned at their
/// positions with rotary embeddings: given ∂loss/∂k (turned back in place) and ∂loss/∂v, writes
/// ∂loss/∂key and ∂loss/∂value into d_key and d_value and adds the weights' and biases' gradients
/// into `gradients`.
template <typename Scalar>
void key_value_projections_backward(const AttentionParameters<Scalar>& weights, const ConstMatrixRef<Scalar>& key,
                                    const ConstMatrixRef<Scalar>& value, const std::vector<Eigen::Index>& key_positions,
                                    Matrix<Scalar>& d_k, Matrix<Scalar>& d_v, AttentionParameters<Scalar>& gradients,
                                    Matrix<Scalar>& d_key, Matrix<Scalar>& d_value) {
  const MultiHeadAttentionConfig& config = weights.config();
  turn_back(config, d_k, key_positions);
  RowBlockJobs<Scalar> jobs;
  d_key.resize(key.rows(), config.kdim);
  d_value.resize(value.rows(), config.vdim);
  jobs.product(operand(d_k), operand(weights.w_k()).t(), d_key);
  jobs.product(operand(d_v), operand(weights.w_v()).t(), d_value);
  jobs.product(operand(key).t(), operand(d_k), gradients.w_k(), true);
  jobs.product(operand(value).t(), operand(d_v), gradients.w_v(), true);
  jobs.run();
  if (config.bias) {
    add_column_sums(operand(d_k), gradients.b_k().data());
    add_column_sums(operand(d_v), gradients.b_v().data());
  }
}

/// The backward of q = query · W^Q + b^Q, k = key · W^K + b^K, v = value · W^V + b^V, the rows of q
/// and k turned at their positions with rotary embeddings: given ∂loss/∂q, ∂loss/∂k and ∂loss/∂v
/// (turned back in place by the rotation's transpose), \returns ∂loss/∂query, ∂loss/∂key and
/// ∂loss/∂value, and adds the weights' and biases' gradients into `gradients`. The query's part
/// and the keys' and values' are the two functions above: a pass whose ∂loss/∂k and ∂loss/∂v
/// arrive later (the ring's) runs the first while it waits for them.
template <typename Scalar>
InputGradients<Scalar> input_projections_backward(
    const AttentionParameters<Scalar>& weights, const ConstMatrixRef<Scalar>& query, const ConstMatrixRef<Scalar>& key,
    const ConstMatrixRef<Scalar>& value, const std::vector<Eigen::Index>& query_positions,
    const std::vector<Eigen::Index>& key_positions, Matrix<Scalar>& d_q, Matrix<Scalar>& d_k, Matrix<Scalar>& d_v,
    AttentionParameters<Scalar>& gradients) {
  InputGradients<Scalar> d_inputs;
  d_inputs.query = query_projection_backward(weights, query, query_positions, d_q, gradients);
  key_value_projections_backward(weights, key, value, key_positions, d_k, d_v, gradients, d_inputs.key, d_inputs.value);
  return d_inputs;
}

}  // namespace detail
}  // namespace mha
