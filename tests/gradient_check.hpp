// Finite-difference gradient checks shared by the test programs: a forward pass to differentiate
// (Problem), the backward's gradients of it, and the check of every parameter's and input's gradient
// against central differences of the loss (double, relative error ≤ 1e-6).
#pragma once

#include <mha/mha.hpp>

#include "test_util.hpp"

#include <gtest/gtest.h>

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace mha_test::gradient_check {

using Matrix = Eigen::MatrixXd;
using Index = Eigen::Index;

inline constexpr double kFiniteDifferenceTolerance = 1e-6;
inline constexpr double kStep = 1e-5;  // central differences: truncation ~ step², rounding ~ 1e-16 / step

/// One forward pass to differentiate: a module, its inputs and options, and the loss
/// Σ d_output ∘ output, whose gradient with respect to the output is d_output.
struct Problem {
  mha::MultiHeadAttention<double> attn;
  Matrix query, key, value, d_output;
  std::vector<Index> query_lengths, key_lengths;
  mha::AttentionOptions options;
  bool self_attention = false;

  Problem(const mha::MultiHeadAttentionConfig& cfg, std::vector<Index> query_lengths_, std::vector<Index> key_lengths_,
          std::uint64_t seed = 1)
      : attn(cfg), query_lengths(std::move(query_lengths_)), key_lengths(std::move(key_lengths_)) {
    const Index L = sum(query_lengths), S = sum(key_lengths);
    query = random_matrix<double>(L, attn.d_model(), seed);
    key = random_matrix<double>(S, attn.kdim(), seed + 1);
    value = random_matrix<double>(S, attn.vdim(), seed + 2);
    d_output = random_matrix<double>(L, attn.d_model(), seed + 3);
    // Biases and bias_k/bias_v start at zero or small: make every parameter matter.
    std::uint64_t s = seed + 10;
    for (auto& p : attn.parameters()) p.value = random_matrix<double>(p.value.rows(), p.value.cols(), s++);
  }

  static Index sum(const std::vector<Index>& v) {
    Index n = 0;
    for (Index x : v) n += x;
    return n;
  }

  Matrix forward(mha::Tape<double>* tape = nullptr) {
    if (self_attention && query_lengths.size() == 1)
      return tape ? attn.forward(query, options, *tape) : attn.forward(query, options);
    if (self_attention)
      return tape ? attn.forward_batch(query, query_lengths, options, *tape)
                  : attn.forward_batch(query, query_lengths, options);
    if (tape) return attn.forward_batch(query, key, value, query_lengths, key_lengths, options, *tape);
    return attn.forward_batch(query, key, value, query_lengths, key_lengths, options);
  }

  double loss() { return forward().cwiseProduct(d_output).sum(); }

  /// The central difference of the loss in entry `i` of `x`.
  double derivative(double& x) {
    const double saved = x;
    x = saved + kStep;
    const double up = loss();
    x = saved - kStep;
    const double down = loss();
    x = saved;
    return (up - down) / (2 * kStep);
  }
};

/// The backward's gradients of a problem: parameters and inputs.
struct Backward {
  mha::AttentionParameters<double> parameters;
  mha::InputGradients<double> inputs;
};

inline Backward backward(Problem& p) {
  mha::Tape<double> tape;
  p.forward(&tape);
  Backward g{p.attn.zero_gradients(), {}};
  g.inputs = p.attn.backward(tape, p.d_output, g.parameters);
  return g;
}

/// Checks the gradients of the entries `entries(matrix)` of every parameter and input against
/// finite differences (all entries unless a selection is given).
using Selection = std::function<std::vector<Index>(const Eigen::Ref<const Matrix>&)>;

inline std::vector<Index> all_entries(const Eigen::Ref<const Matrix>& m) {
  std::vector<Index> v(static_cast<std::size_t>(m.size()));
  for (Index i = 0; i < m.size(); ++i) v[static_cast<std::size_t>(i)] = i;
  return v;
}

inline ::testing::AssertionResult matches_finite_differences(const std::string& name, double* data,
                                                             const Eigen::Ref<const Matrix>& shape,
                                                             const Matrix& gradient, Problem& p,
                                                             const Selection& select) {
  if (gradient.rows() != shape.rows() || gradient.cols() != shape.cols())
    return ::testing::AssertionFailure() << name << ": gradient is " << gradient.rows() << " x " << gradient.cols()
                                         << ", parameter " << shape.rows() << " x " << shape.cols();
  const std::vector<Index> entries = select(shape);
  Eigen::VectorXd numeric(static_cast<Index>(entries.size())), analytic(numeric.size());
  for (std::size_t e = 0; e < entries.size(); ++e) {
    numeric(static_cast<Index>(e)) = p.derivative(data[entries[e]]);
    analytic(static_cast<Index>(e)) = gradient(entries[e]);
  }
  if (numeric.size() == 0) return ::testing::AssertionSuccess();
  // Relative to the derivative's size, but not below 10⁻³: some gradients are exactly zero in
  // theory (b^K shifts every score of a row equally, and softmax ignores such shifts), and there
  // the finite difference is rounding noise of about 10⁻¹¹.
  const double scale = std::max(numeric.cwiseAbs().maxCoeff(), 1e-3);
  const double error = (analytic - numeric).cwiseAbs().maxCoeff() / scale;
  if (error <= kFiniteDifferenceTolerance) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << name << ": relative error " << error << " > " << kFiniteDifferenceTolerance
                                       << " (largest derivative " << numeric.cwiseAbs().maxCoeff() << ")";
}

inline void expect_gradients_match_finite_differences(Problem& p, const Selection& select = all_entries) {
  const Backward g = backward(p);
  auto params = p.attn.parameters();
  const auto grads = g.parameters.parameters();
  ASSERT_EQ(params.size(), grads.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    ASSERT_EQ(params[i].name, grads[i].name);
    const Matrix gradient = grads[i].value;
    EXPECT_TRUE(
        matches_finite_differences(params[i].name, params[i].value.data(), params[i].value, gradient, p, select));
  }
  if (p.self_attention) {
    EXPECT_TRUE(matches_finite_differences("x", p.query.data(), p.query, g.inputs.self_attention(), p, select));
    return;
  }
  EXPECT_TRUE(matches_finite_differences("query", p.query.data(), p.query, g.inputs.query, p, select));
  EXPECT_TRUE(matches_finite_differences("key", p.key.data(), p.key, g.inputs.key, p, select));
  EXPECT_TRUE(matches_finite_differences("value", p.value.data(), p.value, g.inputs.value, p, select));
}

inline mha::MultiHeadAttentionConfig with(mha::MultiHeadAttentionConfig c,
                                          const std::function<void(mha::MultiHeadAttentionConfig&)>& f) {
  f(c);
  return c;
}

}  // namespace mha_test::gradient_check
