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

/// The backward of q = query · W^Q + b^Q, k = key · W^K + b^K, v = value · W^V + b^V, the rows of q
/// and k turned at their positions with rotary embeddings: given ∂loss/∂q, ∂loss/∂k and ∂loss/∂v
/// (turned back in place by the rotation's transpose), \returns ∂loss/∂query, ∂loss/∂key and
/// ∂loss/∂value, and adds the weights' and biases' gradients into `gradients`.
template <typename Scalar>
InputGradients<Scalar> input_projections_backward(
    const AttentionParameters<Scalar>& weights, const ConstMatrixRef<Scalar>& query, const ConstMatrixRef<Scalar>& key,
    const ConstMatrixRef<Scalar>& value, const std::vector<Eigen::Index>& query_positions,
    const std::vector<Eigen::Index>& key_positions, Matrix<Scalar>& d_q, Matrix<Scalar>& d_k, Matrix<Scalar>& d_v,
    AttentionParameters<Scalar>& gradients) {
  const MultiHeadAttentionConfig& config = weights.config();
  RowBlockJobs<Scalar> jobs;
  if (config.rotary) {
    const RotaryEmbedding rotary(config);
    jobs.rotate_back(d_q, {&rotary, query_positions.data()});
    jobs.rotate_back(d_k, {&rotary, key_positions.data()});
    jobs.run();
  }
  InputGradients<Scalar> d_inputs;
  d_inputs.query.resize(query.rows(), config.d_model);
  d_inputs.key.resize(key.rows(), config.kdim);
  d_inputs.value.resize(value.rows(), config.vdim);
  jobs.product(operand(d_q), operand(weights.w_q()).t(), d_inputs.query);
  jobs.product(operand(d_k), operand(weights.w_k()).t(), d_inputs.key);
  jobs.product(operand(d_v), operand(weights.w_v()).t(), d_inputs.value);
  jobs.product(operand(query).t(), operand(d_q), gradients.w_q(), true);
  jobs.product(operand(key).t(), operand(d_k), gradients.w_k(), true);
  jobs.product(operand(value).t(), operand(d_v), gradients.w_v(), true);
  jobs.run();
  if (config.bias) {
    add_column_sums(operand(d_q), gradients.b_q().data());
    add_column_sums(operand(d_k), gradients.b_k().data());
    add_column_sums(operand(d_v), gradients.b_v().data());
  }
  return d_inputs;
}

}  // namespace detail
}  // namespace mha
