// mha — modules from PyTorch nn.MultiheadAttention weights (its state_dict).
//
// PyTorch stores each projection as weight (out × in) and computes x · weightᵀ; mha computes x · W,
// so W = weightᵀ. Its in_proj_weight (3E × E) holds the query, key and value weights as row blocks
// [q | k | v]; with kdim or vdim ≠ E it has q_proj_weight (E × E), k_proj_weight (E × kdim) and
// v_proj_weight (E × vdim) instead. Head i uses output features i·E/h … (i+1)·E/h, which after the
// transposition is exactly column block i of mha's W^Q, W^K, W^V. in_proj_bias (3E) is
// [b^Q | b^K | b^V]; out_proj.weight (E × E) and out_proj.bias give W^O and b^O; bias_k and bias_v
// (1 × 1 × E) are the rows that add_bias_kv appends.
#pragma once

#include <mha/config.hpp>
#include <mha/multi_head_attention.hpp>

#include <Eigen/Core>

#include <string>

namespace mha {
namespace io {

/// The parameters of a PyTorch nn.MultiheadAttention, in PyTorch's own layout (out × in).
/// Matrices left empty are absent: in_proj_weight or the three q/k/v_proj_weight; the biases.
template <typename Scalar>
struct PyTorchMultiheadAttention {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  Matrix in_proj_weight;   ///< 3E × E, when kdim = vdim = E
  Matrix q_proj_weight;    ///< E × E, when kdim or vdim ≠ E
  Matrix k_proj_weight;    ///< E × kdim
  Matrix v_proj_weight;    ///< E × vdim
  Matrix in_proj_bias;     ///< 3E values (any shape: 3E × 1 or 1 × 3E), or empty for bias=False
  Matrix out_proj_weight;  ///< E × E
  Matrix out_proj_bias;    ///< E values, or empty for bias=False
  Matrix bias_k;           ///< E values, or empty without add_bias_kv
  Matrix bias_v;           ///< E values, or empty without add_bias_kv
};

}  // namespace io

namespace detail {

/// The rows and cols of a tensor without its values (0 × 0 for an absent one): what from_state_dict
/// reads of a file's tensors to check them before converting any.
struct MatrixSize {
  Eigen::Index row_count = 0;  ///< the rows
  Eigen::Index col_count = 0;  ///< the cols
  /// \returns the rows.
  Eigen::Index rows() const { return row_count; }
  /// \returns the cols.
  Eigen::Index cols() const { return col_count; }
  /// \returns the values (no overflow: a tensor with values holds them all in memory or in a file).
  Eigen::Index size() const { return row_count * col_count; }
};

/// The size of each tensor of a PyTorchMultiheadAttention, under the same names.
struct PyTorchSizes {
  MatrixSize in_proj_weight, q_proj_weight, k_proj_weight, v_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
      bias_k, bias_v;
};

/// Calls f(name, tensor) for each tensor of `w`, a PyTorchMultiheadAttention or PyTorchSizes, with its
/// name in nn.MultiheadAttention's state_dict.
template <typename Weights, typename F>
void for_each_tensor(Weights& w, F f) {
  f("in_proj_weight", w.in_proj_weight);
  f("q_proj_weight", w.q_proj_weight);
  f("k_proj_weight", w.k_proj_weight);
  f("v_proj_weight", w.v_proj_weight);
  f("in_proj_bias", w.in_proj_bias);
  f("out_proj.weight", w.out_proj_weight);
  f("out_proj.bias", w.out_proj_bias);
  f("bias_k", w.bias_k);
  f("bias_v", w.bias_v);
}

/// The size of tensor `name` of `tensors` (see from_state_dict), from matrix_size() alone, or 0 × 0
/// if there is none.
template <typename Tensors>
MatrixSize size_of(const Tensors& tensors, const std::string& name) {
  if (!tensors.contains(name)) return {};
  const auto [rows, cols] = tensors.matrix_size(name);
  return {rows, cols};
}

/// Throws unless `m`, a matrix or MatrixSize, is rows × cols; the message begins with `source`,
/// names the tensor `name` and both shapes, and ends with `why`.
template <typename M>
void expect_shape(const M& m, Eigen::Index rows, Eigen::Index cols, const std::string& name,
                  const char* source = "PyTorch weights", const std::string& why = "") {
  if (m.rows() != rows || m.cols() != cols)
    detail::fail(source, ": ", name, " is ", m.rows(), " x ", m.cols(), " but must be ", rows, " x ", cols, why);
}

/// Throws unless `m`, a matrix or MatrixSize, holds n values, whatever its shape (PyTorch's bias_k
/// is 1 × 1 × E); the message as expect_shape's.
template <typename M>
void expect_values(const M& m, Eigen::Index n, const std::string& name, const char* source = "PyTorch weights",
                   const std::string& why = "") {
  if (m.size() != n) detail::fail(source, ": ", name, " has ", m.size(), " values but must have ", n, why);
}

/// The values of `m` as a 1 × m.size() row.
template <typename Matrix>
Eigen::Map<const Eigen::Matrix<typename Matrix::Scalar, 1, Eigen::Dynamic>> as_row(const Matrix& m) {
  return Eigen::Map<const Eigen::Matrix<typename Matrix::Scalar, 1, Eigen::Dynamic>>(m.data(), m.size());
}

/// \returns the configuration of the module that the tensors of `w` (a PyTorchMultiheadAttention, or
/// the PyTorchSizes of one) make, after checking that every tensor has the shape it needs; throws
/// mha::invalid_argument naming the tensor (prefix + its name) and both shapes otherwise. It reads
/// only shapes: a small file that declares a huge module is rejected before anything is allocated.
template <typename Weights>
MultiHeadAttentionConfig checked_config(const Weights& w, Eigen::Index num_heads, bool add_zero_attn,
                                        const std::string& prefix) {
  const bool packed = w.in_proj_weight.size() > 0;
  if (packed == (w.q_proj_weight.size() > 0))
    detail::fail("PyTorch weights: give either in_proj_weight or q_proj_weight, k_proj_weight and v_proj_weight");
  const Eigen::Index E = packed ? w.in_proj_weight.cols() : w.q_proj_weight.rows();
  MultiHeadAttentionConfig config;
  config.d_model = E;
  config.num_heads = num_heads;
  config.kdim = packed ? E : w.k_proj_weight.cols();
  config.vdim = packed ? E : w.v_proj_weight.cols();
  config.bias = w.in_proj_bias.size() > 0;
  config.add_bias_kv = w.bias_k.size() > 0;
  config.add_zero_attn = add_zero_attn;
  const MultiHeadAttentionConfig resolved = config.resolved();  // checks that num_heads divides E
  if (packed) {
    expect_shape(w.in_proj_weight, 3 * E, E, prefix + "in_proj_weight");
  } else {
    // Against the resolved kdim and vdim: an empty k_proj_weight (kdim 0) would mean kdim = E.
    expect_shape(w.q_proj_weight, E, E, prefix + "q_proj_weight");
    expect_shape(w.k_proj_weight, E, resolved.kdim, prefix + "k_proj_weight");
    expect_shape(w.v_proj_weight, E, resolved.vdim, prefix + "v_proj_weight");
  }
  expect_shape(w.out_proj_weight, E, E, prefix + "out_proj.weight");
  if (config.bias) {
    expect_values(w.in_proj_bias, 3 * E, prefix + "in_proj_bias");
    expect_values(w.out_proj_bias, E, prefix + "out_proj.bias");
  } else if (w.out_proj_bias.size() > 0) {
    detail::fail("PyTorch weights: ", prefix, "out_proj.bias is given but ", prefix,
                 "in_proj_bias is not; PyTorch has both or neither");
  }
  if (config.add_bias_kv) {
    expect_values(w.bias_k, E, prefix + "bias_k");
    expect_values(w.bias_v, E, prefix + "bias_v");
  }
  return config;
}

/// The module of `config`, which checked_config(w, ...) returned, with the weights of `w`.
template <typename Scalar>
MultiHeadAttention<Scalar> module_with(const io::PyTorchMultiheadAttention<Scalar>& w,
                                       const MultiHeadAttentionConfig& config) {
  MultiHeadAttention<Scalar> module(config);
  const Eigen::Index E = config.d_model;
  if (w.in_proj_weight.size() > 0) {
    module.w_q() = w.in_proj_weight.topRows(E).transpose();
    module.w_k() = w.in_proj_weight.middleRows(E, E).transpose();
    module.w_v() = w.in_proj_weight.bottomRows(E).transpose();
  } else {
    module.w_q() = w.q_proj_weight.transpose();
    module.w_k() = w.k_proj_weight.transpose();
    module.w_v() = w.v_proj_weight.transpose();
  }
  module.w_o() = w.out_proj_weight.transpose();
  if (config.bias) {
    const auto in_bias = as_row(w.in_proj_bias);
    module.b_q() = in_bias.head(E);
    module.b_k() = in_bias.segment(E, E);
    module.b_v() = in_bias.tail(E);
    module.b_o() = as_row(w.out_proj_bias);
  }
  if (config.add_bias_kv) {
    module.bias_k() = as_row(w.bias_k);
    module.bias_v() = as_row(w.bias_v);
  }
  return module;
}

}  // namespace detail

namespace io {

/// A module with PyTorch's weights, so that forward() equals nn.MultiheadAttention's forward in
/// eval mode (batch_first or not: mha is one sequence of rows, or forward_batch). num_heads and
/// add_zero_attn are not in a state_dict: give them as the PyTorch module was built. Throws
/// mha::invalid_argument naming the tensor whose shape does not fit, before the module is built.
template <typename Scalar>
MultiHeadAttention<Scalar> from_pytorch(const PyTorchMultiheadAttention<Scalar>& w, Eigen::Index num_heads,
                                        bool add_zero_attn = false) {
  return detail::module_with(w, detail::checked_config(w, num_heads, add_zero_attn, ""));
}

/// A module from the tensors of a PyTorch state_dict held by `tensors`, any object with
/// `contains(name)`, `matrix_size(name)` (rows and cols) and `matrix<Scalar>(name)`
/// (mha::io::SafeTensors is one): the names are prefix + "in_proj_weight", "q_proj_weight",
/// "k_proj_weight", "v_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias", "bias_k",
/// "bias_v", as nn.MultiheadAttention.state_dict() names them (prefix: the module's path in a larger
/// model, e.g. "encoder.self_attn."). Every shape is checked, from matrix_size(), before any tensor
/// is converted or the module built: errors name the tensor with its prefix.
template <typename Scalar, typename Tensors>
MultiHeadAttention<Scalar> from_state_dict(const Tensors& tensors, Eigen::Index num_heads,
                                           const std::string& prefix = "", bool add_zero_attn = false) {
  detail::PyTorchSizes sizes;
  detail::for_each_tensor(
      sizes, [&](const char* name, detail::MatrixSize& size) { size = detail::size_of(tensors, prefix + name); });
  if (sizes.out_proj_weight.size() == 0) detail::fail("PyTorch weights: no tensor \"", prefix, "out_proj.weight\"");
  const MultiHeadAttentionConfig config = detail::checked_config(sizes, num_heads, add_zero_attn, prefix);
  PyTorchMultiheadAttention<Scalar> w;
  detail::for_each_tensor(w, [&](const char* name, typename PyTorchMultiheadAttention<Scalar>::Matrix& m) {
    if (tensors.contains(prefix + name)) m = tensors.template matrix<Scalar>(prefix + name);
  });
  return detail::module_with(w, config);
}

}  // namespace io
}  // namespace mha
