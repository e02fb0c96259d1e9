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
  Matrix in_proj_weight;  ///< 3E × E, when kdim = vdim = E
  Matrix q_proj_weight;   ///< E × E, when kdim or vdim ≠ E
  Matrix k_proj_weight;   ///< E × kdim
  Matrix v_proj_weight;   ///< E × vdim
  Matrix in_proj_bias;    ///< 3E values (any shape: 3E × 1 or 1 × 3E), or empty for bias=False
  Matrix out_proj_weight; ///< E × E
  Matrix out_proj_bias;   ///< E values, or empty for bias=False
  Matrix bias_k;          ///< E values, or empty without add_bias_kv
  Matrix bias_v;          ///< E values, or empty without add_bias_kv
};

namespace detail {

template <typename Matrix>
void expect_shape(const Matrix& m, Eigen::Index rows, Eigen::Index cols, const char* name) {
  if (m.rows() != rows || m.cols() != cols)
    mha::detail::fail("PyTorch weights: ", name, " is ", m.rows(), " x ", m.cols(), " but must be ", rows, " x ",
                      cols);
}

/// A tensor of n values as a 1 × n row, whatever its shape (PyTorch's bias_k is 1 × 1 × E).
template <typename Matrix>
Eigen::Matrix<typename Matrix::Scalar, 1, Eigen::Dynamic> as_row(const Matrix& m, Eigen::Index n, const char* name) {
  if (m.size() != n) mha::detail::fail("PyTorch weights: ", name, " has ", m.size(), " values but must have ", n);
  return Eigen::Map<const Eigen::Matrix<typename Matrix::Scalar, 1, Eigen::Dynamic>>(m.data(), n);
}

}  // namespace detail

/// A module with PyTorch's weights, so that forward() equals nn.MultiheadAttention's forward in
/// eval mode (batch_first or not: mha is one sequence of rows, or forward_batch). num_heads and
/// add_zero_attn are not in a state_dict: give them as the PyTorch module was built. Throws
/// mha::invalid_argument naming the tensor whose shape does not fit.
template <typename Scalar>
MultiHeadAttention<Scalar> from_pytorch(const PyTorchMultiheadAttention<Scalar>& w, Eigen::Index num_heads,
                                        bool add_zero_attn = false) {
  const bool packed = w.in_proj_weight.size() > 0;
  if (packed == (w.q_proj_weight.size() > 0))
    mha::detail::fail("PyTorch weights: give either in_proj_weight or q_proj_weight, k_proj_weight and v_proj_weight");
  const Eigen::Index E = packed ? w.in_proj_weight.cols() : w.q_proj_weight.rows();
  MultiHeadAttentionConfig config;
  config.d_model = E;
  config.num_heads = num_heads;
  config.kdim = packed ? E : w.k_proj_weight.cols();
  config.vdim = packed ? E : w.v_proj_weight.cols();
  config.bias = w.in_proj_bias.size() > 0;
  config.add_bias_kv = w.bias_k.size() > 0;
  config.add_zero_attn = add_zero_attn;
  MultiHeadAttention<Scalar> module(config);  // checks that num_heads divides E
  if (packed) {
    detail::expect_shape(w.in_proj_weight, 3 * E, E, "in_proj_weight");
    module.w_q() = w.in_proj_weight.topRows(E).transpose();
    module.w_k() = w.in_proj_weight.middleRows(E, E).transpose();
    module.w_v() = w.in_proj_weight.bottomRows(E).transpose();
  } else {
    detail::expect_shape(w.q_proj_weight, E, E, "q_proj_weight");
    detail::expect_shape(w.k_proj_weight, E, config.kdim, "k_proj_weight");
    detail::expect_shape(w.v_proj_weight, E, config.vdim, "v_proj_weight");
    module.w_q() = w.q_proj_weight.transpose();
    module.w_k() = w.k_proj_weight.transpose();
    module.w_v() = w.v_proj_weight.transpose();
  }
  detail::expect_shape(w.out_proj_weight, E, E, "out_proj.weight");
  module.w_o() = w.out_proj_weight.transpose();
  if (config.bias) {
    const auto in_bias = detail::as_row(w.in_proj_bias, 3 * E, "in_proj_bias");
    module.b_q() = in_bias.head(E);
    module.b_k() = in_bias.segment(E, E);
    module.b_v() = in_bias.tail(E);
    module.b_o() = detail::as_row(w.out_proj_bias, E, "out_proj.bias");
  } else if (w.out_proj_bias.size() > 0) {
    mha::detail::fail("PyTorch weights: out_proj.bias is given but in_proj_bias is not; PyTorch has both or neither");
  }
  if (config.add_bias_kv) {
    module.bias_k() = detail::as_row(w.bias_k, E, "bias_k");
    module.bias_v() = detail::as_row(w.bias_v, E, "bias_v");
  }
  return module;
}

/// A module from the tensors of a PyTorch state_dict held by `tensors`, any object with
/// `contains(name)` and `matrix<Scalar>(name)` (mha::io::SafeTensors is one): the names are
/// prefix + "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
/// "out_proj.weight", "out_proj.bias", "bias_k", "bias_v", as nn.MultiheadAttention.state_dict()
/// names them (prefix: the module's path in a larger model, e.g. "encoder.self_attn.").
template <typename Scalar, typename Tensors>
MultiHeadAttention<Scalar> from_state_dict(const Tensors& tensors, Eigen::Index num_heads,
                                           const std::string& prefix = "", bool add_zero_attn = false) {
  PyTorchMultiheadAttention<Scalar> w;
  const auto read = [&](const char* name, typename PyTorchMultiheadAttention<Scalar>::Matrix& into) {
    if (tensors.contains(prefix + name)) into = tensors.template matrix<Scalar>(prefix + name);
  };
  read("in_proj_weight", w.in_proj_weight);
  read("q_proj_weight", w.q_proj_weight);
  read("k_proj_weight", w.k_proj_weight);
  read("v_proj_weight", w.v_proj_weight);
  read("in_proj_bias", w.in_proj_bias);
  read("out_proj.weight", w.out_proj_weight);
  read("out_proj.bias", w.out_proj_bias);
  read("bias_k", w.bias_k);
  read("bias_v", w.bias_v);
  if (w.out_proj_weight.size() == 0)
    mha::detail::fail("PyTorch weights: no tensor \"", prefix, "out_proj.weight\"");
  return from_pytorch(w, num_heads, add_zero_attn);
}

}  // namespace io
}  // namespace mha
