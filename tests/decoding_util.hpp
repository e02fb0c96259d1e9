// Helpers shared by the decoding tests (grouped-query attention, rotary embeddings, sliding windows,
// the key/value cache): modules with random biases, every alignment of the options, the literal
// reference's options, descriptions for failure messages, and a report of the largest errors.
#pragma once

#include <mha/mha.hpp>

#include "reference/reference_attention.hpp"
#include "test_util.hpp"

#include <gtest/gtest.h>

#include <Eigen/Core>

#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

namespace mha_test {

using Lengths = std::vector<Eigen::Index>;

/// The largest relative error seen per check and scalar type, printed when the program ends: how
/// far below its tolerance each check passes.
class ErrorReport : public ::testing::Environment {
 public:
  static std::map<std::string, double>& largest() {
    static std::map<std::string, double> errors;
    return errors;
  }
  void TearDown() override {
    for (const auto& [what, error] : largest()) std::printf("largest relative error, %s: %.3g\n", what.c_str(), error);
  }
};
[[maybe_unused]] inline ::testing::Environment* const kErrorReport =
    ::testing::AddGlobalTestEnvironment(new ErrorReport);

template <typename Scalar>
std::string scalar_name() {
  return ScalarNames::GetName<Scalar>(0);
}

/// close() at the scalar's tolerance, recording the error under `what`.
template <typename Scalar, typename A, typename B>
::testing::AssertionResult near(const Eigen::MatrixBase<A>& actual, const Eigen::MatrixBase<B>& expected,
                                const std::string& what) {
  if (actual.rows() == expected.rows() && actual.cols() == expected.cols()) {
    double& largest = ErrorReport::largest()[what + " (" + scalar_name<Scalar>() + ")"];
    largest = std::max(largest, relative_error(actual, expected));
  }
  return mha_test::close(actual, expected, tolerance<Scalar>());
}

/// A module of the configuration; with config.bias, biases drawn at random (they start at zero).
template <typename Scalar>
mha::MultiHeadAttention<Scalar> make_module(const mha::MultiHeadAttentionConfig& c) {
  mha::MultiHeadAttention<Scalar> attn(c);
  if (c.bias) {
    attn.b_q() = random_matrix<Scalar>(1, attn.b_q().cols(), 901) / 2;
    attn.b_k() = random_matrix<Scalar>(1, attn.b_k().cols(), 902) / 2;
    attn.b_v() = random_matrix<Scalar>(1, attn.b_v().cols(), 903) / 2;
    attn.b_o() = random_matrix<Scalar>(1, attn.b_o().cols(), 904) / 2;
  }
  return attn;
}

/// Every combination of causal and alignment (the alignment places the queries even without causal).
inline std::vector<mha::AttentionOptions> all_alignments(Eigen::Index window = 0) {
  std::vector<mha::AttentionOptions> all;
  for (const bool causal : {false, true})
    for (const auto alignment : {mha::CausalAlignment::top_left, mha::CausalAlignment::bottom_right})
      all.push_back(options_of(causal, alignment, window));
  return all;
}

inline mha_reference::DecoderOptions reference_options(const mha::AttentionOptions& o) {
  mha_reference::DecoderOptions r;
  r.causal = o.causal;
  r.bottom_right = o.alignment == mha::CausalAlignment::bottom_right;
  r.window = o.window;
  r.scale = o.scale;
  return r;
}

inline std::string describe(const mha::AttentionOptions& o) {
  return std::string(o.causal ? "causal" : "not causal") +
         (o.alignment == mha::CausalAlignment::bottom_right ? ", bottom-right" : ", top-left") + ", window " +
         std::to_string(o.window);
}

inline std::string describe(const mha::MultiHeadAttentionConfig& c) {
  return "h " + std::to_string(c.num_heads) + ", h_kv " + std::to_string(c.num_kv_heads) +
         (c.rotary ? (c.rotary_pairs == mha::RotaryPairs::interleaved ? ", rotary interleaved base "
                                                                      : ", rotary halves base ") +
                         std::to_string(c.rotary_base)
                   : ", no rotary") +
         (c.bias ? ", bias" : "");
}

/// The rows of `top` above those of `bottom`.
template <typename Scalar>
Matrix<Scalar> stack(const Matrix<Scalar>& top, const Matrix<Scalar>& bottom) {
  Matrix<Scalar> m(top.rows() + bottom.rows(), top.cols());
  m << top, bottom;
  return m;
}

inline Eigen::Index total(const Lengths& lengths) {
  Eigen::Index n = 0;
  for (const Eigen::Index l : lengths) n += l;
  return n;
}

}  // namespace mha_test
