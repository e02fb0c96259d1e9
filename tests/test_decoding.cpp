// Decoding (issue #7): grouped-query attention, rotary position embeddings and sliding windows
// against the literal reference, and the key/value cache against the full causal forward pass:
// every decode step's outputs are the rows of forward(all tokens so far, causal) at its positions.
// The backward of the new options is checked against finite differences.
#include <mha/mha.hpp>

#include "gradient_check.hpp"
#include "reference/reference_attention.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace {

using mha_test::BoolMatrix;
using mha_test::causal_if;
using mha_test::config;
using mha_test::error_of;
using mha_test::Matrix;
using mha_test::random_matrix;
using mha_test::relative_error;
using mha_test::tolerance;
using mha_test::gradient_check::with;
using Index = Eigen::Index;
using Lengths = std::vector<Index>;

// --- helpers ----------------------------------------------------------------------------------

/// The largest relative error seen per check and scalar type, printed when the program ends.
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
[[maybe_unused]] ::testing::Environment* const kErrorReport = ::testing::AddGlobalTestEnvironment(new ErrorReport);

template <typename Scalar>
std::string scalar_name() {
  return mha_test::ScalarNames::GetName<Scalar>(0);
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

/// A module configuration for decoding: h heads over h_kv key/value heads, rotary or not.
mha::MultiHeadAttentionConfig decoder_config(Index d_model, Index h, Index h_kv, Index d_k = 0, Index d_v = 0,
                                             std::uint64_t seed = 0) {
  mha::MultiHeadAttentionConfig c = config(d_model, h, d_k, d_v, seed);
  c.num_kv_heads = h_kv;
  return c;
}

mha::MultiHeadAttentionConfig rotary(mha::MultiHeadAttentionConfig c, mha::RotaryPairs pairs, double base = 10000.0) {
  c.rotary = true;
  c.rotary_pairs = pairs;
  c.rotary_base = base;
  return c;
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

mha::AttentionOptions options_of(bool causal, mha::CausalAlignment alignment, Index window = 0) {
  mha::AttentionOptions o;
  o.causal = causal;
  o.alignment = alignment;
  o.window = window;
  return o;
}

/// Every combination of causal and alignment (the alignment places the queries even without causal).
std::vector<mha::AttentionOptions> all_alignments(Index window = 0) {
  std::vector<mha::AttentionOptions> all;
  for (const bool causal : {false, true})
    for (const auto alignment : {mha::CausalAlignment::top_left, mha::CausalAlignment::bottom_right})
      all.push_back(options_of(causal, alignment, window));
  return all;
}

mha_reference::DecoderOptions reference_options(const mha::AttentionOptions& o) {
  mha_reference::DecoderOptions r;
  r.causal = o.causal;
  r.bottom_right = o.alignment == mha::CausalAlignment::bottom_right;
  r.window = o.window;
  r.scale = o.scale;
  return r;
}

std::string describe(const mha::AttentionOptions& o) {
  return std::string(o.causal ? "causal" : "not causal") +
         (o.alignment == mha::CausalAlignment::bottom_right ? ", bottom-right" : ", top-left") +
         ", window " + std::to_string(o.window);
}

std::string describe(const mha::MultiHeadAttentionConfig& c) {
  return "h " + std::to_string(c.num_heads) + ", h_kv " + std::to_string(c.num_kv_heads) +
         (c.rotary ? (c.rotary_pairs == mha::RotaryPairs::interleaved ? ", rotary interleaved base "
                                                                       : ", rotary halves base ") +
                         std::to_string(c.rotary_base)
                   : ", no rotary") +
         (c.bias ? ", bias" : "");
}

template <typename Scalar>
Matrix<Scalar> stack(const Matrix<Scalar>& top, const Matrix<Scalar>& bottom) {
  Matrix<Scalar> m(top.rows() + bottom.rows(), top.cols());
  m << top, bottom;
  return m;
}

Index total(const Lengths& lengths) {
  Index n = 0;
  for (const Index l : lengths) n += l;
  return n;
}

// --- grouped-query attention ------------------------------------------------------------------

template <typename Scalar>
class GroupedQueryAttention : public ::testing::Test {};
TYPED_TEST_SUITE(GroupedQueryAttention, mha_test::Scalars, mha_test::ScalarNames);

TEST(GroupedQueryAttentionConfig, KvHeadsMustDivideTheHeads) {
  EXPECT_EQ(decoder_config(32, 8, 0).resolved().num_kv_heads, 8);
  EXPECT_EQ(decoder_config(32, 8, 2).resolved().num_kv_heads, 2);
  EXPECT_EQ(error_of([] { decoder_config(32, 8, 3).resolved(); }),
            "mha: num_kv_heads = 3 does not divide num_heads = 8; each key/value head serves num_heads / num_kv_heads "
            "query heads");
  EXPECT_EQ(error_of([] { decoder_config(32, 8, 16).resolved(); }),
            "mha: num_kv_heads = 16 does not divide num_heads = 8; each key/value head serves num_heads / "
            "num_kv_heads query heads");
  EXPECT_EQ(error_of([] { decoder_config(32, 8, -1).resolved(); }),
            "mha: num_kv_heads must be positive (or 0 for num_heads), got num_kv_heads = -1");
  EXPECT_THROW(mha::MultiHeadAttention<float>(decoder_config(32, 8, 3)), mha::invalid_argument);
}

TYPED_TEST(GroupedQueryAttention, KeyAndValueParametersHaveOneBlockPerKvHead) {
  auto c = decoder_config(32, 8, 2, 4, 6);
  c.bias = true;
  c.add_bias_kv = true;
  c.kdim = 20;
  c.vdim = 12;
  mha::MultiHeadAttention<TypeParam> attn(c);
  EXPECT_EQ(attn.num_heads(), 8);
  EXPECT_EQ(attn.num_kv_heads(), 2);
  EXPECT_EQ(attn.w_q().cols(), 8 * 4);
  EXPECT_EQ(attn.w_k().rows(), 20);
  EXPECT_EQ(attn.w_k().cols(), 2 * 4);
  EXPECT_EQ(attn.w_v().rows(), 12);
  EXPECT_EQ(attn.w_v().cols(), 2 * 6);
  EXPECT_EQ(attn.w_o().rows(), 8 * 6);
  EXPECT_EQ(attn.b_k().cols(), 2 * 4);
  EXPECT_EQ(attn.b_v().cols(), 2 * 6);
  EXPECT_EQ(attn.bias_k().cols(), 2 * 4);
  EXPECT_EQ(attn.bias_v().cols(), 2 * 6);
  EXPECT_EQ(Matrix<TypeParam>(attn.w_k(1)), Matrix<TypeParam>(attn.w_k().middleCols(4, 4)));
  EXPECT_EQ(Matrix<TypeParam>(attn.w_v(1)), Matrix<TypeParam>(attn.w_v().middleCols(6, 6)));
  EXPECT_EQ(attn.w_q(7).cols(), 4);
  EXPECT_EQ(error_of([&] { attn.w_k(2); }),
            "mha: w_k(2): key/value head index out of range; the module has num_kv_heads = 2 (valid heads 0 to 1)");
  EXPECT_EQ(error_of([&] { attn.w_v(-1); }),
            "mha: w_v(-1): key/value head index out of range; the module has num_kv_heads = 2 (valid heads 0 to 1)");
  // The gradients have the same shapes, parameter by parameter.
  const auto gradients = attn.zero_gradients();
  const auto ps = attn.parameters();
  const auto gs = gradients.parameters();
  ASSERT_EQ(ps.size(), gs.size());
  for (std::size_t i = 0; i < ps.size(); ++i) {
    EXPECT_EQ(ps[i].name, gs[i].name);
    EXPECT_EQ(ps[i].value.rows(), gs[i].value.rows()) << ps[i].name;
    EXPECT_EQ(ps[i].value.cols(), gs[i].value.cols()) << ps[i].name;
  }
}

TYPED_TEST(GroupedQueryAttention, ForwardEqualsTheRepeatInterleaveReference) {
  // Shapes on both sides of the 256-row and 512-key tiles, and odd ones.
  const std::pair<Index, Index> shapes[] = {{1, 1}, {5, 9}, {9, 5}, {255, 257}, {257, 513}, {513, 300}, {1, 600}};
  for (const Index h_kv : {1, 2, 4, 8}) {
    auto cross = decoder_config(32, 8, h_kv, 6, 5, h_kv);  // d_k ≠ d_v
    cross.kdim = 20;
    cross.vdim = 12;
    cross.bias = true;
    const auto attn = make_module<TypeParam>(cross);
    for (const auto& [L, S] : shapes) {
      const Matrix<TypeParam> query = random_matrix<TypeParam>(L, 32, 10 * L + S);
      const Matrix<TypeParam> key = random_matrix<TypeParam>(S, 20, 10 * L + S + 1);
      const Matrix<TypeParam> value = random_matrix<TypeParam>(S, 12, 10 * L + S + 2);
      for (const auto& o : {options_of(false, mha::CausalAlignment::top_left),
                            options_of(true, mha::CausalAlignment::top_left),
                            options_of(true, mha::CausalAlignment::bottom_right)})
        EXPECT_TRUE(near<TypeParam>(attn.forward(query, key, value, o),
                                    mha_reference::decoder_attention(attn, query, key, value, reference_options(o)),
                                    "grouped-query forward"))
            << "h_kv = " << h_kv << ", L = " << L << ", S = " << S << ", " << describe(o);
    }
    // Self-attention, and the weights of every head.
    const auto self = make_module<TypeParam>(decoder_config(32, 8, h_kv, 0, 0, 50 + h_kv));
    const Matrix<TypeParam> x = random_matrix<TypeParam>(300, 32, 7);
    for (const bool causal : {false, true}) {
      const auto result = self.forward_with_weights(x, x, x, causal_if(causal), mha::AttentionWeights::per_head);
      std::vector<Matrix<TypeParam>> weights;
      const mha_reference::DecoderOptions o = reference_options(causal_if(causal));
      EXPECT_TRUE(near<TypeParam>(self.forward(x, causal_if(causal)),
                                  mha_reference::decoder_attention(self, x, x, x, o, &weights), "grouped-query forward"))
          << "self-attention, h_kv = " << h_kv << ", causal = " << causal;
      ASSERT_EQ(result.weights.size(), weights.size());
      for (std::size_t i = 0; i < weights.size(); ++i)
        EXPECT_TRUE(near<TypeParam>(result.weights[i], weights[i], "grouped-query weights")) << "head " << i;
    }
  }
}

TYPED_TEST(GroupedQueryAttention, AsManyKvHeadsAsHeadsIsPlainMultiHeadAttention) {
  const mha::MultiHeadAttention<TypeParam> plain(config(32, 4, 0, 0, 3)), explicit_kv(decoder_config(32, 4, 4, 0, 0, 3));
  EXPECT_EQ(Matrix<TypeParam>(plain.w_k()), Matrix<TypeParam>(explicit_kv.w_k()));  // same shapes, same draws
  EXPECT_EQ(Matrix<TypeParam>(plain.w_o()), Matrix<TypeParam>(explicit_kv.w_o()));
  const Matrix<TypeParam> query = random_matrix<TypeParam>(70, 32, 1), kv = random_matrix<TypeParam>(530, 32, 2);
  for (const bool causal : {false, true}) {
    const Matrix<TypeParam> y = explicit_kv.forward(query, kv, kv, causal_if(causal));
    EXPECT_EQ(y, plain.forward(query, kv, kv, causal_if(causal)));
    EXPECT_TRUE(near<TypeParam>(y, mha_reference::multi_head_attention(plain, query, kv, kv, causal),
                                "h_kv = h against the plain reference"));
  }
}

/// The module with h_kv = h whose key/value head i is the grouped module's head i / (h / h_kv):
/// grouped-query attention written as plain multi-head attention, without the reference.
template <typename Scalar>
mha::MultiHeadAttention<Scalar> ungrouped(const mha::MultiHeadAttention<Scalar>& grouped) {
  auto c = grouped.config();
  c.num_kv_heads = 0;
  mha::MultiHeadAttention<Scalar> full(c);
  const Index h = c.num_heads, group = h / grouped.num_kv_heads(), d_k = c.d_k, d_v = c.d_v;
  full.w_q() = grouped.w_q();
  full.w_o() = grouped.w_o();
  for (Index i = 0; i < h; ++i) {
    full.w_k(i) = grouped.w_k(i / group);
    full.w_v(i) = grouped.w_v(i / group);
    if (c.bias) {
      full.b_k().segment(i * d_k, d_k) = grouped.b_k().segment(i / group * d_k, d_k);
      full.b_v().segment(i * d_v, d_v) = grouped.b_v().segment(i / group * d_v, d_v);
    }
  }
  if (c.bias) {
    full.b_q() = grouped.b_q();
    full.b_o() = grouped.b_o();
  }
  return full;
}

TYPED_TEST(GroupedQueryAttention, EqualsAFullModuleWhoseKvBlocksAreRepeated) {
  for (const Index h_kv : {1, 2})
    for (const bool with_rotary : {false, true}) {
      auto c = decoder_config(24, 4, h_kv, 0, 0, 5);
      c.bias = true;
      if (with_rotary) c = rotary(c, mha::RotaryPairs::halves);
      const auto grouped = make_module<TypeParam>(c);
      const auto full = ungrouped(grouped);
      SCOPED_TRACE(describe(c));
      const Matrix<TypeParam> query = random_matrix<TypeParam>(300, 24, 1), kv = random_matrix<TypeParam>(530, 24, 2);
      for (const auto& o : {options_of(false, mha::CausalAlignment::top_left),
                            options_of(true, mha::CausalAlignment::bottom_right, 7)}) {
        EXPECT_TRUE(near<TypeParam>(grouped.forward(query, kv, kv, o), full.forward(query, kv, kv, o),
                                    "grouped against repeated blocks"))
            << describe(o);
        // The gradient of a shared key/value head is the sum of its query heads' gradients.
        mha::Tape<TypeParam> grouped_tape, full_tape;
        grouped.forward(query, kv, kv, o, grouped_tape);
        full.forward(query, kv, kv, o, full_tape);
        const Matrix<TypeParam> d_y = random_matrix<TypeParam>(300, 24, 3);
        auto dg = grouped.zero_gradients();
        auto df = full.zero_gradients();
        const auto ig = grouped.backward(grouped_tape, d_y, dg);
        const auto ifull = full.backward(full_tape, d_y, df);
        EXPECT_TRUE(near<TypeParam>(ig.query, ifull.query, "grouped against repeated blocks, gradients"));
        EXPECT_TRUE(near<TypeParam>(ig.key, ifull.key, "grouped against repeated blocks, gradients"));
        EXPECT_TRUE(near<TypeParam>(ig.value, ifull.value, "grouped against repeated blocks, gradients"));
        EXPECT_TRUE(near<TypeParam>(dg.w_q(), df.w_q(), "grouped against repeated blocks, gradients"));
        EXPECT_TRUE(near<TypeParam>(dg.w_o(), df.w_o(), "grouped against repeated blocks, gradients"));
        const Index group = 4 / h_kv;
        for (Index j = 0; j < h_kv; ++j) {
          Matrix<TypeParam> w_k_sum = Matrix<TypeParam>::Zero(24, full.d_k()), w_v_sum = Matrix<TypeParam>::Zero(24, full.d_v());
          for (Index i = j * group; i < (j + 1) * group; ++i) {
            w_k_sum += df.w_k(i);
            w_v_sum += df.w_v(i);
          }
          EXPECT_TRUE(near<TypeParam>(dg.w_k(j), w_k_sum, "grouped against repeated blocks, gradients")) << "kv head " << j;
          EXPECT_TRUE(near<TypeParam>(dg.w_v(j), w_v_sum, "grouped against repeated blocks, gradients")) << "kv head " << j;
        }
      }
    }
}

// --- rotary position embeddings ---------------------------------------------------------------

template <typename Scalar>
class Rotary : public ::testing::Test {};
TYPED_TEST_SUITE(Rotary, mha_test::Scalars, mha_test::ScalarNames);

TEST(RotaryConfig, OddHeadWidthAndBadBaseAreRejected) {
  EXPECT_EQ(error_of([] { rotary(config(20, 2, 5, 4), mha::RotaryPairs::interleaved).resolved(); }),
            "mha: rotary embeddings rotate pairs of coordinates, so d_k must be even, got d_k = 5");
  EXPECT_EQ(error_of([] { rotary(config(12, 4), mha::RotaryPairs::halves).resolved(); }),  // d_k = 12 / 4 = 3
            "mha: rotary embeddings rotate pairs of coordinates, so d_k must be even, got d_k = 3");
  EXPECT_THROW(mha::MultiHeadAttention<double>(rotary(config(12, 4), mha::RotaryPairs::halves)), mha::invalid_argument);
  EXPECT_EQ(config(20, 2, 5, 4).resolved().d_k, 5);  // odd d_k is fine without rotary
  EXPECT_EQ(rotary(config(20, 2, 4, 5), mha::RotaryPairs::halves).resolved().d_v, 5);  // d_v is not rotated
  for (const double base : {0.0, -2.0, std::numeric_limits<double>::infinity()}) {
    const auto c = rotary(config(16, 2), mha::RotaryPairs::interleaved, base);
    std::ostringstream expected;
    expected << "mha: rotary_base must be positive and finite, got rotary_base = " << base;
    EXPECT_EQ(error_of([&] { c.resolved(); }), expected.str());
  }
}

TYPED_TEST(Rotary, HandCheckableRotation) {
  // One head of width 2 with identity projections: θ_0 = base⁰ = 1, so a row at position p turns
  // by p radians. Token a = (1, 0) at position 1 becomes (cos 1, sin 1); token b = (0, 1) at 0
  // stays. The query a at 1 scores b at 0 with (cos 1, sin 1)·(0, 1) = sin 1 = sin(1 − 0), and
  // itself with cos 0 = 1; both scaled by 1/√2.
  for (const auto pairs : {mha::RotaryPairs::interleaved, mha::RotaryPairs::halves}) {
    mha::MultiHeadAttention<TypeParam> attn(rotary(config(2, 1), pairs, 77.0));
    attn.w_q().setIdentity();
    attn.w_k().setIdentity();
    attn.w_v().setIdentity();
    attn.w_o().setIdentity();
    Matrix<TypeParam> x(2, 2);
    x << 0, 1,  // b, at position 0
        1, 0;   // a, at position 1
    const auto result = attn.forward_with_weights(x, x, x, causal_if(true), mha::AttentionWeights::per_head);
    const double s = 1 / std::sqrt(2.0);
    const double to_b = 1 / (1 + std::exp((1 - std::sin(1.0)) * s));  // softmax(sin 1·s, 1·s)
    Matrix<TypeParam> expected_weights(2, 2);
    expected_weights << 1, 0,  //
        static_cast<TypeParam>(to_b), static_cast<TypeParam>(1 - to_b);
    EXPECT_TRUE(near<TypeParam>(result.weights[0], expected_weights, "rotary by hand"));
    // The values are not rotated: row 1 mixes b = (0, 1) and a = (1, 0).
    Matrix<TypeParam> expected(2, 2);
    expected << 0, 1,  //
        static_cast<TypeParam>(1 - to_b), static_cast<TypeParam>(to_b);
    EXPECT_TRUE(near<TypeParam>(result.output, expected, "rotary by hand"));
  }
}

TYPED_TEST(Rotary, ForwardEqualsTheReferenceForBothPairStylesAndBases) {
  for (const auto pairs : {mha::RotaryPairs::interleaved, mha::RotaryPairs::halves})
    for (const double base : {10000.0, 500.0}) {
      auto c = rotary(decoder_config(32, 4, 2, 8, 6, 3), pairs, base);
      c.bias = true;
      const auto attn = make_module<TypeParam>(c);
      SCOPED_TRACE(describe(c));
      // Self-attention over two query tiles, and cross-attention where the alignment moves the queries.
      const Matrix<TypeParam> x = random_matrix<TypeParam>(300, 32, 1);
      for (const auto& o : all_alignments())
        EXPECT_TRUE(near<TypeParam>(attn.forward(x, o), mha_reference::decoder_attention(attn, x, x, x, reference_options(o)),
                                    "rotary forward"))
            << "self-attention, " << describe(o);
      for (const auto& [L, S] : {std::pair<Index, Index>{9, 530}, {530, 9}, {257, 513}}) {
        const Matrix<TypeParam> query = random_matrix<TypeParam>(L, 32, L), kv = random_matrix<TypeParam>(S, 32, S);
        for (const auto& o : all_alignments())
          EXPECT_TRUE(near<TypeParam>(attn.forward(query, kv, kv, o),
                                      mha_reference::decoder_attention(attn, query, kv, kv, reference_options(o)),
                                      "rotary forward"))
              << "L = " << L << ", S = " << S << ", " << describe(o);
      }
    }
  // Wide heads: the halves pair coordinates 0 with 16, …, 15 with 31.
  const auto wide = make_module<TypeParam>(rotary(decoder_config(32, 1, 1), mha::RotaryPairs::halves));
  const Matrix<TypeParam> x = random_matrix<TypeParam>(40, 32, 2);
  EXPECT_TRUE(near<TypeParam>(wide.forward(x, causal_if(true)),
                              mha_reference::decoder_attention(wide, x, x, x, reference_options(causal_if(true))),
                              "rotary forward"));
}

// RoPE makes the score of a query at position p and a key at position p' a function of p − p'.
// Give the keys a prefix of m extra tokens and hide it with a key padding mask: with bottom-right
// alignment every query and key moves m positions on and every weight stays; moving only the
// queries changes them (the positions matter), and without rotary nothing changes at all.
TYPED_TEST(Rotary, WeightsDependOnlyOnRelativePositions) {
  const Index n = 40, m = 300;
  for (const auto pairs : {mha::RotaryPairs::interleaved, mha::RotaryPairs::halves})
    for (const bool causal : {false, true}) {
      const auto attn = make_module<TypeParam>(rotary(decoder_config(16, 2, 1, 0, 0, 9), pairs));
      const Matrix<TypeParam> x = random_matrix<TypeParam>(n, 16, 1) * 3, prefix = random_matrix<TypeParam>(m, 16, 2);
      const Matrix<TypeParam> keys = stack(prefix, x);
      Eigen::Matrix<bool, 1, Eigen::Dynamic> padding = Eigen::Matrix<bool, 1, Eigen::Dynamic>::Constant(m + n, false);
      padding.head(m).setConstant(true);
      mha::AttentionOptions shifted = options_of(causal, mha::CausalAlignment::bottom_right);
      shifted.key_padding_mask = mha::AttentionMask::blocked(padding);
      const auto at_zero = attn.forward_with_weights(x, x, x, causal_if(causal), mha::AttentionWeights::per_head);
      const auto at_m = attn.forward_with_weights(x, keys, keys, shifted, mha::AttentionWeights::per_head);
      SCOPED_TRACE(std::string(pairs == mha::RotaryPairs::interleaved ? "interleaved" : "halves") +
                   (causal ? ", causal" : ""));
      EXPECT_TRUE(near<TypeParam>(at_m.output, at_zero.output, "rotary relative positions"));
      for (std::size_t i = 0; i < 2; ++i) {
        EXPECT_TRUE(near<TypeParam>(at_m.weights[i].rightCols(n), at_zero.weights[i], "rotary relative positions"));
        EXPECT_EQ(at_m.weights[i].leftCols(m).cwiseAbs().maxCoeff(), TypeParam(0));
      }
      // Only the queries moved (top-left: query i at i, its keys at m + j): the weights change.
      mha::AttentionOptions queries_only = shifted;
      queries_only.alignment = mha::CausalAlignment::top_left;
      queries_only.causal = false;
      const auto moved = attn.forward_with_weights(x, keys, keys, queries_only, mha::AttentionWeights::per_head);
      const auto unmoved = attn.forward_with_weights(x, x, x, {}, mha::AttentionWeights::per_head);
      EXPECT_GT(relative_error(moved.weights[0].rightCols(n), unmoved.weights[0]), 1e-2);
    }
  // Without rotary, positions do not exist: the same comparison gives the same weights.
  const auto plain = make_module<TypeParam>(decoder_config(16, 2, 1, 0, 0, 9));
  const Matrix<TypeParam> x = random_matrix<TypeParam>(n, 16, 1), keys = stack<TypeParam>(random_matrix<TypeParam>(m, 16, 2), x);
  Eigen::Matrix<bool, 1, Eigen::Dynamic> padding = Eigen::Matrix<bool, 1, Eigen::Dynamic>::Constant(m + n, false);
  padding.head(m).setConstant(true);
  mha::AttentionOptions queries_only;
  queries_only.key_padding_mask = mha::AttentionMask::blocked(padding);
  const auto moved = plain.forward_with_weights(x, keys, keys, queries_only, mha::AttentionWeights::per_head);
  const auto unmoved = plain.forward_with_weights(x, x, x, {}, mha::AttentionWeights::per_head);
  EXPECT_TRUE(near<TypeParam>(moved.weights[0].rightCols(n), unmoved.weights[0], "rotary relative positions"));
}

TYPED_TEST(Rotary, RotatesQueriesAndKeysButNotValues) {
  // Position 0 is not rotated: a single token's output is the same with and without rotary.
  auto c = decoder_config(16, 2, 2, 0, 0, 4);
  c.bias = true;
  const auto plain = make_module<TypeParam>(c);
  const auto rotated = make_module<TypeParam>(rotary(c, mha::RotaryPairs::interleaved));
  const Matrix<TypeParam> x = random_matrix<TypeParam>(1, 16, 1);
  EXPECT_TRUE(near<TypeParam>(rotated.forward(x), plain.forward(x), "rotary at position 0"));
  // With identical keys at every position, the weights change but the values they mix do not:
  // every output row is the one value row (values are not rotated).
  const Matrix<TypeParam> same = Matrix<TypeParam>::Ones(50, 1) * random_matrix<TypeParam>(1, 16, 2);
  EXPECT_TRUE(near<TypeParam>(rotated.forward(same, causal_if(true)), plain.forward(same, causal_if(true)),
                              "rotary leaves values alone"));
}

// --- sliding window ---------------------------------------------------------------------------

template <typename Scalar>
class SlidingWindow : public ::testing::Test {};
TYPED_TEST_SUITE(SlidingWindow, mha_test::Scalars, mha_test::ScalarNames);

TYPED_TEST(SlidingWindow, ForwardEqualsTheReference) {
  auto c = decoder_config(16, 2, 1, 0, 0, 6);
  c.bias = true;
  const auto attn = make_module<TypeParam>(c);
  for (const Index window : {1, 2, 7, 300, 600})
    for (const auto& [L, S] : {std::pair<Index, Index>{600, 600}, {300, 530}, {530, 300}}) {
      const Matrix<TypeParam> query = random_matrix<TypeParam>(L, 16, L + window);
      const Matrix<TypeParam> kv = L == S ? query : random_matrix<TypeParam>(S, 16, S + window + 1);
      for (const auto& o : all_alignments(window))
        EXPECT_TRUE(near<TypeParam>(attn.forward(query, kv, kv, o),
                                    mha_reference::decoder_attention(attn, query, kv, kv, reference_options(o)),
                                    "window forward"))
            << "L = " << L << ", S = " << S << ", " << describe(o);
    }
}

TYPED_TEST(SlidingWindow, WeightsOutsideTheWindowAreZeroAndEqualTheReference) {
  const auto attn = make_module<TypeParam>(rotary(decoder_config(16, 4, 2, 0, 0, 7), mha::RotaryPairs::interleaved));
  const Matrix<TypeParam> query = random_matrix<TypeParam>(20, 16, 1), kv = random_matrix<TypeParam>(530, 16, 2);
  for (const auto& o : all_alignments(5)) {
    const auto result = attn.forward_with_weights(query, kv, kv, o, mha::AttentionWeights::per_head);
    std::vector<Matrix<TypeParam>> weights;
    const Matrix<TypeParam> expected = mha_reference::decoder_attention(attn, query, kv, kv, reference_options(o), &weights);
    EXPECT_TRUE(near<TypeParam>(result.output, expected, "window forward")) << describe(o);
    const Index offset = o.alignment == mha::CausalAlignment::bottom_right ? 530 - 20 : 0;
    for (std::size_t i = 0; i < weights.size(); ++i) {
      EXPECT_TRUE(near<TypeParam>(result.weights[i], weights[i], "window weights")) << describe(o) << ", head " << i;
      for (Index r = 0; r < 20; ++r)
        for (Index j = 0; j < 530; ++j)
          if (j <= r + offset - 5 || (o.causal && j > r + offset)) {
            ASSERT_EQ(result.weights[i](r, j), TypeParam(0)) << describe(o) << ", row " << r << ", key " << j;
          }
    }
  }
}

TYPED_TEST(SlidingWindow, SingleHeadKernelEqualsTheReference) {
  for (const auto& [L, S] : {std::pair<Index, Index>{600, 600}, {257, 1100}})
    for (const Index window : {1, 7, 513}) {
      const Matrix<TypeParam> q = random_matrix<TypeParam>(L, 8, L), k = random_matrix<TypeParam>(S, 8, S + 1),
                              v = random_matrix<TypeParam>(S, 5, S + 2);
      for (const auto& o : all_alignments(window)) {
        mha_reference::HeadMasks<TypeParam> masks;
        masks.causal = o.causal;
        masks.offset = o.alignment == mha::CausalAlignment::bottom_right ? S - L : 0;
        masks.window = window;
        const Matrix<TypeParam> expected =
            mha_reference::attention_weights<TypeParam>(q, k, TypeParam(1 / std::sqrt(8.0)), masks) * v;
        EXPECT_TRUE(near<TypeParam>(mha::scaled_dot_product_attention(q, k, v, o), expected, "window single head"))
            << "L = " << L << ", S = " << S << ", " << describe(o);
      }
    }
}

TYPED_TEST(SlidingWindow, WindowCoveringEveryKeyIsNoWindow) {
  const auto attn = make_module<TypeParam>(decoder_config(16, 2, 2, 0, 0, 8));
  for (const auto& [L, S] : {std::pair<Index, Index>{600, 600}, {300, 530}}) {
    const Matrix<TypeParam> query = random_matrix<TypeParam>(L, 16, 1), kv = random_matrix<TypeParam>(S, 16, 2);
    for (const auto& o : all_alignments()) {
      const Matrix<TypeParam> unwindowed = attn.forward(query, kv, kv, o);
      for (const Index window : {S, S + 1, Index(100000)}) {
        mha::AttentionOptions windowed = o;
        windowed.window = window;
        EXPECT_TRUE(near<TypeParam>(attn.forward(query, kv, kv, windowed), unwindowed, "window >= S"))
            << "L = " << L << ", S = " << S << ", " << describe(windowed);
      }
      // One key fewer: the last query (at position S − 1 when bottom-right) loses key 0, and only it.
      if (o.alignment == mha::CausalAlignment::bottom_right) {
        mha::AttentionOptions narrower = o;
        narrower.window = S - 1;
        const Matrix<TypeParam> y = attn.forward(query, kv, kv, narrower);
        EXPECT_TRUE(near<TypeParam>(y.topRows(L - 1), unwindowed.topRows(L - 1), "window >= S")) << describe(o);
        EXPECT_GT(relative_error(y.bottomRows(1), unwindowed.bottomRows(1)), 1e-4) << describe(o);
      }
    }
  }
}

TYPED_TEST(SlidingWindow, RaggedBatchWithRotaryAndWindowEqualsEachSequenceAlone) {
  auto c = rotary(decoder_config(16, 4, 2, 0, 0, 12), mha::RotaryPairs::halves);
  c.bias = true;
  const auto attn = make_module<TypeParam>(c);
  const Lengths query_lengths = {3, 0, 300, 1, 17}, key_lengths = {5, 4, 270, 0, 600};
  const Matrix<TypeParam> query = random_matrix<TypeParam>(total(query_lengths), 16, 1),
                          kv = random_matrix<TypeParam>(total(key_lengths), 16, 2);
  for (const auto& o : all_alignments(7)) {
    const Matrix<TypeParam> batched = attn.forward_batch(query, kv, kv, query_lengths, key_lengths, o);
    Index q0 = 0, k0 = 0;
    for (std::size_t b = 0; b < query_lengths.size(); ++b) {
      const Index L = query_lengths[b], S = key_lengths[b];
      const Matrix<TypeParam> q = query.middleRows(q0, L), k = kv.middleRows(k0, S);
      EXPECT_TRUE(near<TypeParam>(batched.middleRows(q0, L),
                                  mha_reference::decoder_attention(attn, q, k, k, reference_options(o)), "window batch"))
          << "sequence " << b << ", " << describe(o);
      q0 += L;
      k0 += S;
    }
  }
  // Batched self-attention: each sequence's positions start at 0.
  const Lengths lengths = {5, 300, 0, 40};
  const Matrix<TypeParam> x = random_matrix<TypeParam>(total(lengths), 16, 3);
  const mha::AttentionOptions o = options_of(true, mha::CausalAlignment::top_left, 30);
  const Matrix<TypeParam> batched = attn.forward_batch(x, lengths, o);
  Index r0 = 0;
  for (const Index n : lengths) {
    EXPECT_TRUE(near<TypeParam>(batched.middleRows(r0, n), attn.forward(x.middleRows(r0, n), o), "window batch"));
    r0 += n;
  }
}

TYPED_TEST(SlidingWindow, NegativeWindowIsRejected) {
  const auto attn = make_module<TypeParam>(decoder_config(8, 2, 1));
  const Matrix<TypeParam> x = random_matrix<TypeParam>(4, 8, 1);
  mha::AttentionOptions o;
  o.window = -1;
  const std::string expected = "mha: options.window must be >= 0 (0 = no window), got -1";
  EXPECT_EQ(error_of([&] { attn.forward(x, o); }), expected);
  EXPECT_EQ(error_of([&] { attn.forward_batch(x, Lengths{1, 3}, o); }), expected);
  EXPECT_EQ(error_of([&] { attn.forward_with_weights(x, x, x, o, mha::AttentionWeights::averaged); }), expected);
  EXPECT_EQ(error_of([&] { mha::scaled_dot_product_attention(x, x, x, o); }), expected);
  mha::Tape<TypeParam> tape;
  EXPECT_EQ(error_of([&] { attn.forward(x, o, tape); }), expected);
  auto cache = attn.make_cache(1, 0);
  EXPECT_EQ(error_of([&] { attn.decode(x, cache, o); }), expected);
  EXPECT_EQ(cache.length(), 0);
}

// --- the key/value cache ----------------------------------------------------------------------

template <typename Scalar>
class KVCache : public ::testing::Test {
 protected:
  void TearDown() override { mha::set_num_threads(0); }
};
TYPED_TEST_SUITE(KVCache, mha_test::Scalars, mha_test::ScalarNames);

/// The configurations decoding is checked with: plain; multi-query with rotary; and everything at
/// once (grouped-query attention, rotary halves, biases, a window).
struct DecodeCase {
  mha::MultiHeadAttentionConfig config;
  Index window;
};

std::vector<DecodeCase> decode_cases() {
  auto everything = rotary(decoder_config(32, 8, 2, 0, 0, 21), mha::RotaryPairs::halves, 500.0);
  everything.bias = true;
  return {{decoder_config(32, 8, 0, 0, 0, 20), 0},
          {rotary(decoder_config(32, 4, 1, 0, 0, 22), mha::RotaryPairs::interleaved), 0},
          {everything, 7},
          {everything, 300}};
}

/// Decodes x in steps of the given sizes (the last one repeated until x ends) on a fresh cache and
/// checks each step's output against the rows of forward(x, causal) at its positions.
template <typename Scalar>
void expect_decode_equals_forward(const mha::MultiHeadAttention<Scalar>& attn, const Matrix<Scalar>& x,
                                  const Lengths& steps, Index window) {
  mha::AttentionOptions forward_options = causal_if(true);
  forward_options.window = window;
  const Matrix<Scalar> full = attn.forward(x, forward_options);
  mha::AttentionOptions decode_options;  // causal is implied
  decode_options.window = window;
  auto cache = attn.make_cache(1, 0);
  Index position = 0;
  for (std::size_t step = 0; position < x.rows(); ++step) {
    const Index n = std::min(steps[std::min(step, steps.size() - 1)], x.rows() - position);
    const Matrix<Scalar> y = attn.decode(x.middleRows(position, n), cache, decode_options);
    ASSERT_EQ(cache.length(), position + n);
    ASSERT_TRUE(near<Scalar>(y, full.middleRows(position, n), "decode against forward"))
        << "step " << step << ": tokens " << position << " to " << position + n - 1;
    position += n;
  }
}

TYPED_TEST(KVCache, DecodeStepsEqualTheFullCausalForward) {
  struct Pattern {
    const char* name;
    Index tokens;
    Lengths steps;
  };
  const Pattern patterns[] = {
      {"one token at a time", 45, {1}},
      {"chunks of 3", 50, {3}},
      {"chunks of 7", 60, {7}},
      {"chunks of 64", 200, {64}},
      {"a prefill, then single tokens", 130, {100, 1}},
      {"a prefill across the tiles, then single tokens", 700, {600, 1}},
      {"growing steps", 620, {1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233}},
  };
  for (const DecodeCase& c : decode_cases()) {
    const auto attn = make_module<TypeParam>(c.config);
    for (const Pattern& p : patterns) {
      SCOPED_TRACE(describe(c.config) + ", window " + std::to_string(c.window) + ": " + p.name);
      expect_decode_equals_forward(attn, random_matrix<TypeParam>(p.tokens, 32, p.tokens), p.steps, c.window);
    }
  }
}

TYPED_TEST(KVCache, EmptyStepChangesNothing) {
  const auto attn = make_module<TypeParam>(decoder_config(16, 4, 2));
  auto cache = attn.make_cache(1, 0);
  const Matrix<TypeParam> x = random_matrix<TypeParam>(5, 16, 1);
  attn.decode(x, cache);
  const Matrix<TypeParam> keys = cache.keys(), values = cache.values();
  const Matrix<TypeParam> y = attn.decode(Matrix<TypeParam>(0, 16), cache);
  EXPECT_EQ(y.rows(), 0);
  EXPECT_EQ(y.cols(), 16);
  EXPECT_EQ(cache.length(), 5);
  EXPECT_EQ(Matrix<TypeParam>(cache.keys()), keys);
  EXPECT_EQ(Matrix<TypeParam>(cache.values()), values);
}

TYPED_TEST(KVCache, BatchedDecodeWithRaggedNewLengthsEqualsEachSequenceAlone) {
  for (const DecodeCase& c : decode_cases()) {
    const auto attn = make_module<TypeParam>(c.config);
    SCOPED_TRACE(describe(c.config) + ", window " + std::to_string(c.window));
    const std::vector<Lengths> rounds = {{3, 0, 5, 1}, {0, 0, 2, 7}, {1, 1, 1, 1}, {300, 0, 1, 2},
                                         {0, 0, 0, 0}, {1, 260, 0, 1}, {1, 1, 1, 1}, {2, 0, 1, 0}};
    const std::size_t B = 4;
    Lengths final_lengths(B, 0);
    for (const Lengths& round : rounds)
      for (std::size_t b = 0; b < B; ++b) final_lengths[b] += round[b];
    std::vector<Matrix<TypeParam>> tokens, expected;
    mha::AttentionOptions forward_options = causal_if(true);
    forward_options.window = c.window;
    for (std::size_t b = 0; b < B; ++b) {
      tokens.push_back(random_matrix<TypeParam>(final_lengths[b], 32, 100 + b));
      expected.push_back(attn.forward(tokens[b], forward_options));  // causal: row i depends on rows ≤ i only
    }
    auto cache = attn.make_cache(static_cast<Index>(B), 0);
    ASSERT_EQ(cache.sequences(), static_cast<Index>(B));
    mha::AttentionOptions decode_options;
    decode_options.window = c.window;
    Lengths position(B, 0);
    for (std::size_t round = 0; round < rounds.size(); ++round) {
      Matrix<TypeParam> stacked(total(rounds[round]), 32);
      Index row = 0;
      for (std::size_t b = 0; b < B; ++b) {
        stacked.middleRows(row, rounds[round][b]) = tokens[b].middleRows(position[b], rounds[round][b]);
        row += rounds[round][b];
      }
      const Matrix<TypeParam> y = attn.decode_batch(stacked, rounds[round], cache, decode_options);
      ASSERT_EQ(y.rows(), stacked.rows());
      row = 0;
      for (std::size_t b = 0; b < B; ++b) {
        const Index n = rounds[round][b];
        EXPECT_TRUE(near<TypeParam>(y.middleRows(row, n), expected[b].middleRows(position[b], n), "batched decode"))
            << "round " << round << ", sequence " << b;
        position[b] += n;
        row += n;
        EXPECT_EQ(cache.length(static_cast<Index>(b)), position[b]);
      }
    }
  }
}

TYPED_TEST(KVCache, FixedCapacityIsAnErrorWhenFullAndLeavesTheCacheUnchanged) {
  const auto attn = make_module<TypeParam>(rotary(decoder_config(16, 4, 2, 0, 0, 3), mha::RotaryPairs::interleaved));
  const Matrix<TypeParam> x = random_matrix<TypeParam>(10, 16, 1);
  const Matrix<TypeParam> full = attn.forward(x, causal_if(true));
  auto cache = attn.make_cache(1, 10);
  EXPECT_EQ(cache.max_length(), 10);
  attn.decode(x.topRows(8), cache);
  const Matrix<TypeParam> keys = cache.keys(), values = cache.values();
  EXPECT_EQ(error_of([&] { attn.decode(random_matrix<TypeParam>(3, 16, 2), cache); }),
            "mha: KVCache: sequence 0 holds 8 of at most 10 tokens; 3 more do not fit (make the cache with a larger "
            "max_length, or truncate it)");
  EXPECT_EQ(cache.length(), 8);
  EXPECT_EQ(Matrix<TypeParam>(cache.keys()), keys);
  EXPECT_EQ(Matrix<TypeParam>(cache.values()), values);
  // It still decodes what fits, as if the failed step had never been tried.
  EXPECT_TRUE(near<TypeParam>(attn.decode(x.bottomRows(2), cache), full.bottomRows(2), "decode against forward"));
  EXPECT_EQ(cache.length(), 10);
  EXPECT_THROW(attn.decode(x.topRows(1), cache), mha::invalid_argument);
  EXPECT_EQ(cache.length(), 10);

  // In a batch, one sequence that would overflow rejects the whole step: no sequence changes.
  auto batch = attn.make_cache(2, 10);
  attn.decode_batch(random_matrix<TypeParam>(8, 16, 3), Lengths{4, 4}, batch);
  const Matrix<TypeParam> keys0 = batch.keys(0), keys1 = batch.keys(1);
  EXPECT_EQ(error_of([&] { attn.decode_batch(random_matrix<TypeParam>(9, 16, 4), Lengths{2, 7}, batch); }),
            "mha: KVCache: sequence 1 holds 4 of at most 10 tokens; 7 more do not fit (make the cache with a larger "
            "max_length, or truncate it)");
  EXPECT_EQ(batch.length(0), 4);
  EXPECT_EQ(batch.length(1), 4);
  EXPECT_EQ(Matrix<TypeParam>(batch.keys(0)), keys0);
  EXPECT_EQ(Matrix<TypeParam>(batch.keys(1)), keys1);
  attn.decode_batch(random_matrix<TypeParam>(12, 16, 5), Lengths{6, 6}, batch);
  EXPECT_EQ(batch.length(0), 10);
  EXPECT_EQ(batch.length(1), 10);
}

TYPED_TEST(KVCache, TruncateRollsBackForSpeculativeDecoding) {
  auto c = rotary(decoder_config(32, 8, 2, 0, 0, 4), mha::RotaryPairs::halves);
  c.bias = true;
  const auto attn = make_module<TypeParam>(c);
  mha::AttentionOptions o;
  o.window = 9;
  // 20 drafted tokens of which the first 12 are accepted, then 5 others follow them.
  const Matrix<TypeParam> draft = random_matrix<TypeParam>(20, 32, 1), next = random_matrix<TypeParam>(5, 32, 2);
  auto speculative = attn.make_cache(1, 0);
  attn.decode(draft.topRows(3), speculative, o);
  attn.decode(draft.bottomRows(17), speculative, o);
  speculative.truncate(12);
  EXPECT_EQ(speculative.length(), 12);
  auto straight = attn.make_cache(1, 0);
  attn.decode(draft.topRows(12), straight, o);
  EXPECT_TRUE(near<TypeParam>(speculative.keys(), straight.keys(), "truncate"));
  EXPECT_TRUE(near<TypeParam>(speculative.values(), straight.values(), "truncate"));
  const Matrix<TypeParam> after_rollback = attn.decode(next, speculative, o);
  EXPECT_TRUE(near<TypeParam>(attn.decode(next, straight, o), after_rollback, "truncate"));
  mha::AttentionOptions forward_options = causal_if(true);
  forward_options.window = 9;
  const Matrix<TypeParam> accepted = stack<TypeParam>(draft.topRows(12), next);
  EXPECT_TRUE(near<TypeParam>(after_rollback, attn.forward(accepted, forward_options).bottomRows(5), "truncate"));

  // Rolling back to the current length changes nothing; past it is an error.
  speculative.truncate(17);
  EXPECT_EQ(speculative.length(), 17);
  EXPECT_EQ(error_of([&] { speculative.truncate(18); }),
            "mha: KVCache::truncate: sequence 0 holds 17 tokens; cannot truncate it to 18");
  EXPECT_EQ(speculative.length(), 17);
  // Back to nothing: like a fresh cache.
  speculative.truncate(0);
  auto fresh = attn.make_cache(1, 0);
  EXPECT_TRUE(near<TypeParam>(attn.decode(accepted, speculative, o), attn.decode(accepted, fresh, o), "truncate"));

  // One sequence of a batch.
  auto batch = attn.make_cache(3, 0);
  const Matrix<TypeParam> tokens = random_matrix<TypeParam>(30, 32, 3);
  attn.decode_batch(tokens, Lengths{10, 10, 10}, batch, o);
  batch.truncate(1, 4);
  EXPECT_EQ(batch.length(0), 10);
  EXPECT_EQ(batch.length(1), 4);
  EXPECT_EQ(batch.length(2), 10);
  const Matrix<TypeParam> y = attn.decode_batch(next.topRows(3), Lengths{1, 1, 1}, batch, o);
  const Matrix<TypeParam> second = stack<TypeParam>(tokens.middleRows(10, 4), next.row(1));
  EXPECT_TRUE(near<TypeParam>(y.row(1), attn.forward(second, forward_options).bottomRows(1), "truncate"));
  EXPECT_THROW(batch.truncate(1, 6), mha::invalid_argument);
}

TYPED_TEST(KVCache, ResetEmptiesEverySequence) {
  const auto attn = make_module<TypeParam>(decoder_config(16, 4, 1, 0, 0, 5));
  auto cache = attn.make_cache(2, 0);
  const Matrix<TypeParam> x = random_matrix<TypeParam>(7, 16, 1);
  const Matrix<TypeParam> first = attn.decode_batch(x, Lengths{3, 4}, cache);
  cache.reset();
  EXPECT_EQ(cache.sequences(), 2);
  EXPECT_EQ(cache.length(0), 0);
  EXPECT_EQ(cache.length(1), 0);
  EXPECT_EQ(cache.keys(1).rows(), 0);
  EXPECT_TRUE(near<TypeParam>(attn.decode_batch(x, Lengths{3, 4}, cache), first, "reset"));
}

TYPED_TEST(KVCache, ViewsHaveTheDocumentedShapesAndHoldTheProjectedKeysAndValues) {
  for (const bool with_rotary : {false, true}) {
    auto c = decoder_config(32, 8, 2, 4, 6, 6);
    c.bias = true;
    if (with_rotary) c = rotary(c, mha::RotaryPairs::halves, 100.0);
    const auto attn = make_module<TypeParam>(c);
    SCOPED_TRACE(describe(c));
    auto cache = attn.make_cache(2, 0);
    const Matrix<TypeParam> x = random_matrix<TypeParam>(8, 32, 1);
    attn.decode_batch(x.topRows(5), Lengths{2, 3}, cache);
    attn.decode_batch(x.bottomRows(3), Lengths{3, 0}, cache);  // sequence 0: rows 0, 1, 5, 6, 7
    ASSERT_EQ(cache.keys(0).rows(), 5);
    ASSERT_EQ(cache.keys(0).cols(), 2 * 4);
    ASSERT_EQ(cache.values(0).rows(), 5);
    ASSERT_EQ(cache.values(0).cols(), 2 * 6);
    ASSERT_EQ(cache.keys(1).rows(), 3);
    ASSERT_EQ(cache.values(1).cols(), 2 * 6);
    Matrix<TypeParam> tokens0(5, 32);
    tokens0 << x.topRows(2), x.bottomRows(3);
    const std::pair<Matrix<TypeParam>, Index> sequences[] = {{tokens0, 0}, {x.middleRows(2, 3), 1}};
    for (const auto& [tokens, b] : sequences)
      for (Index j = 0; j < 2; ++j) {
        Matrix<TypeParam> k_j = tokens * attn.w_k(j), v_j = tokens * attn.w_v(j);
        k_j.rowwise() += attn.b_k().segment(j * 4, 4);
        v_j.rowwise() += attn.b_v().segment(j * 6, 6);
        if (with_rotary) k_j = mha_reference::rotate<TypeParam>(k_j, 0, c.rotary_base, c.rotary_pairs);
        EXPECT_TRUE(near<TypeParam>(cache.keys(b).middleCols(j * 4, 4), k_j, "cached keys and values"))
            << "sequence " << b << ", kv head " << j;
        EXPECT_TRUE(near<TypeParam>(cache.values(b).middleCols(j * 6, 6), v_j, "cached keys and values"))
            << "sequence " << b << ", kv head " << j;
      }
  }
}

TYPED_TEST(KVCache, GroupedQueryAttentionShrinksTheCache) {
  const auto full = make_module<TypeParam>(decoder_config(64, 8, 8));
  const auto grouped = make_module<TypeParam>(decoder_config(64, 8, 2));
  const Matrix<TypeParam> x = random_matrix<TypeParam>(100, 64, 1);
  for (const Index max_length : {0, 256}) {
    auto full_cache = full.make_cache(3, max_length);
    auto grouped_cache = grouped.make_cache(3, max_length);
    full.decode_batch(x, Lengths{50, 0, 50}, full_cache);
    grouped.decode_batch(x, Lengths{50, 0, 50}, grouped_cache);
    EXPECT_EQ(full_cache.bytes(), 4 * grouped_cache.bytes()) << "max_length " << max_length;
    // At least the keys and values themselves: 100 tokens × h_kv · (d_k + d_v).
    EXPECT_GE(grouped_cache.bytes(), static_cast<std::size_t>(100 * 2 * (8 + 8)) * sizeof(TypeParam));
    if (max_length > 0) {
      EXPECT_GE(grouped_cache.bytes(), static_cast<std::size_t>(3 * 256 * 2 * (8 + 8)) * sizeof(TypeParam));
    }
  }
}

TYPED_TEST(KVCache, DecodeIsBitIdenticalForAnyThreadCount) {
  const auto attn = make_module<TypeParam>(rotary(decoder_config(64, 8, 2, 0, 0, 8), mha::RotaryPairs::interleaved));
  const Index n = 3000;
  const Matrix<TypeParam> x = random_matrix<TypeParam>(n + 5, 64, 1);
  for (const Index window : {0, 1000}) {
    mha::AttentionOptions forward_options = causal_if(true), o;
    forward_options.window = o.window = window;
    const Matrix<TypeParam> full = attn.forward(x, forward_options);
    auto cache = attn.make_cache(1, 0);
    attn.decode(x.topRows(n), cache, o);
    for (const Index new_tokens : {1, 5}) {
      std::vector<Matrix<TypeParam>> outputs;
      for (const int threads : {1, 2, 3}) {
        mha::set_num_threads(threads);
        outputs.push_back(attn.decode(x.middleRows(n, new_tokens), cache, o));  // one token over 3000: split
        cache.truncate(n);
      }
      mha::set_num_threads(0);
      EXPECT_TRUE((outputs[0].array() == outputs[1].array()).all()) << new_tokens << " new, window " << window;
      EXPECT_TRUE((outputs[0].array() == outputs[2].array()).all()) << new_tokens << " new, window " << window;
      EXPECT_TRUE(near<TypeParam>(outputs[0], full.middleRows(n, new_tokens), "decode over a long cache"))
          << new_tokens << " new, window " << window;
    }
  }
}

TYPED_TEST(KVCache, DecodeRejectsWhatItCannotDo) {
  const auto attn = make_module<TypeParam>(decoder_config(8, 2, 1));
  const Matrix<TypeParam> x = random_matrix<TypeParam>(3, 8, 1);
  auto cache = attn.make_cache(1, 0);
  const BoolMatrix blocked = BoolMatrix::Constant(3, 3, false);
  mha::AttentionOptions masked;
  masked.mask = mha::AttentionMask::blocked(blocked);
  const std::string not_read =
      "mha: MultiHeadAttention::decode: options.mask and options.key_padding_mask are not read when decoding "
      "(decoding is causal by construction); leave them empty";
  EXPECT_EQ(error_of([&] { attn.decode(x, cache, masked); }), not_read);
  const Eigen::Matrix<bool, 1, Eigen::Dynamic> padding = Eigen::Matrix<bool, 1, Eigen::Dynamic>::Constant(3, false);
  mha::AttentionOptions padded;
  padded.key_padding_mask = mha::AttentionMask::blocked(padding);
  EXPECT_EQ(error_of([&] { attn.decode(x, cache, padded); }), not_read);
  mha::AttentionOptions training;
  training.training = true;
  EXPECT_EQ(error_of([&] { attn.decode(x, cache, training); }),
            "mha: MultiHeadAttention::decode: decoding is inference; options.training must be false");
  EXPECT_EQ(error_of([&] { attn.decode(random_matrix<TypeParam>(3, 7, 1), cache); }),
            "mha: MultiHeadAttention::decode: x is 3 x 7 but d_model is 8; x needs 8 columns");
  EXPECT_EQ(error_of([&] { attn.decode_batch(x, Lengths{1, 2}, cache); }),
            "mha: MultiHeadAttention::decode_batch: new_lengths has 2 sequences but the cache holds 1");
  auto two = attn.make_cache(2, 0);
  EXPECT_EQ(error_of([&] { attn.decode_batch(x, Lengths{1, 1}, two); }),
            "mha: MultiHeadAttention::decode_batch: new_lengths add up to 2 but x has 3 rows");
  EXPECT_EQ(error_of([&] { attn.decode_batch(x, Lengths{4, -1}, two); }),
            "mha: MultiHeadAttention::decode_batch: sequence lengths must be >= 0, got -1");
  EXPECT_EQ(error_of([&] { attn.decode(x, two); }),
            "mha: MultiHeadAttention::decode: the cache holds 2 sequences; decode_batch takes the new tokens of each");
  EXPECT_EQ(cache.length(), 0);
  EXPECT_EQ(two.length(0), 0);
  EXPECT_EQ(two.length(1), 0);

  for (const bool bias_kv : {true, false}) {
    auto c = decoder_config(8, 2, 1);
    c.add_bias_kv = bias_kv;
    c.add_zero_attn = !bias_kv;
    const mha::MultiHeadAttention<TypeParam> extra(c);
    EXPECT_EQ(error_of([&] {
                auto extra_cache = extra.make_cache(1, 0);
                extra.decode(x, extra_cache);
              }),
              "mha: MultiHeadAttention::decode: a module with add_bias_kv or add_zero_attn cannot decode with a cache")
        << (bias_kv ? "add_bias_kv" : "add_zero_attn");
  }
  // A cache belongs to modules of one shape.
  const auto other = make_module<TypeParam>(decoder_config(8, 2, 2));
  auto other_cache = other.make_cache(1, 0);
  EXPECT_EQ(error_of([&] { attn.decode(x, other_cache); }),
            "mha: MultiHeadAttention::decode: the cache was made for a module of another shape (d_model 8, num_heads 2, "
            "d_k 4, d_v 4, kdim 8, vdim 8) than this one (d_model 8, num_heads 2, num_kv_heads 1, d_k 4, d_v 4, kdim 8, "
            "vdim 8); use make_cache()");
  EXPECT_EQ(other_cache.length(), 0);
  // And to modules that turn the keys alike: a cache holds rotated keys.
  auto rotating = decoder_config(8, 2, 1);
  rotating.rotary = true;
  const auto rotary = make_module<TypeParam>(rotating);
  auto rotated_cache = rotary.make_cache(1, 0);
  EXPECT_EQ(error_of([&] { attn.decode(x, rotated_cache); }),
            "mha: MultiHeadAttention::decode: the cache was made for a module of another shape (d_model 8, num_heads 2, "
            "num_kv_heads 1, d_k 4, d_v 4, kdim 8, vdim 8, rotary interleaved base 10000) than this one (d_model 8, "
            "num_heads 2, num_kv_heads 1, d_k 4, d_v 4, kdim 8, vdim 8); use make_cache()");
  EXPECT_EQ(rotated_cache.length(), 0);
}

// Decoding is self-attention: the new tokens are the queries, the keys and the values at once.
TYPED_TEST(KVCache, ModulesWithOtherKeyOrValueWidthsCannotDecode) {
  auto c = decoder_config(8, 2, 1);
  c.kdim = 5;
  c.vdim = 7;
  const mha::MultiHeadAttention<TypeParam> attn(c);
  auto cache = attn.make_cache(1, 0);
  EXPECT_EQ(error_of([&] { attn.decode(random_matrix<TypeParam>(3, 8, 1), cache); }),
            "mha: MultiHeadAttention::decode: decoding is self-attention, so kdim and vdim must equal d_model = 8; "
            "this module has kdim = 5 and vdim = 7");
  EXPECT_EQ(cache.length(), 0);
}

TYPED_TEST(KVCache, BadCacheArgumentsAreRejected) {
  const auto attn = make_module<TypeParam>(decoder_config(8, 2, 1));
  EXPECT_EQ(error_of([&] { attn.make_cache(0, 0); }), "mha: KVCache: sequences must be >= 1, got 0");
  EXPECT_EQ(error_of([&] { attn.make_cache(1, -1); }), "mha: KVCache: max_length must be >= 0 (0 = no limit), got -1");
  auto cache = attn.make_cache(2, 0);
  attn.decode_batch(random_matrix<TypeParam>(3, 8, 1), Lengths{1, 2}, cache);
  EXPECT_EQ(error_of([&] { cache.truncate(-1); }), "mha: KVCache::truncate: sequence 0 holds 1 tokens; cannot truncate it to -1");
  EXPECT_EQ(error_of([&] { cache.truncate(2, 0); }),
            "mha: KVCache::truncate: sequence 2 out of range; the cache holds 2 sequences");
  EXPECT_EQ(error_of([&] { cache.keys(2); }), "mha: KVCache::keys: sequence 2 out of range; the cache holds 2 sequences");
  EXPECT_EQ(error_of([&] { cache.values(-1); }),
            "mha: KVCache::values: sequence -1 out of range; the cache holds 2 sequences");
  EXPECT_EQ(error_of([&] { cache.length(5); }), "mha: KVCache::length: sequence 5 out of range; the cache holds 2 sequences");
  EXPECT_EQ(cache.length(0), 1);
  EXPECT_EQ(cache.length(1), 2);
}

// Decoding is causal with bottom-right alignment whatever the options say; the scale is honoured.
TYPED_TEST(KVCache, DecodeIgnoresCausalAndAlignmentAndHonoursTheScale) {
  const auto attn = make_module<TypeParam>(rotary(decoder_config(16, 4, 2, 0, 0, 2), mha::RotaryPairs::interleaved));
  const Matrix<TypeParam> x = random_matrix<TypeParam>(30, 16, 1);
  mha::AttentionOptions forward_options = causal_if(true);
  forward_options.scale = 0.3;
  const Matrix<TypeParam> full = attn.forward(x, forward_options);
  for (const auto& o : all_alignments()) {
    mha::AttentionOptions decode_options = o;
    decode_options.scale = 0.3;
    auto cache = attn.make_cache(1, 0);
    attn.decode(x.topRows(20), cache, decode_options);
    EXPECT_TRUE(near<TypeParam>(attn.decode(x.bottomRows(10), cache, decode_options), full.bottomRows(10),
                                "decode against forward"))
        << describe(o);
  }
}

TYPED_TEST(KVCache, BatchedDecodeIsBitIdenticalForAnyThreadCount) {
  const auto attn = make_module<TypeParam>(rotary(decoder_config(64, 8, 2, 0, 0, 9), mha::RotaryPairs::halves));
  const Matrix<TypeParam> prompt = random_matrix<TypeParam>(1300 + 700 + 2, 64, 1),
                          step = random_matrix<TypeParam>(1 + 300 + 8, 64, 2);
  mha::AttentionOptions o;
  o.window = 600;
  auto cache = attn.make_cache(3, 0);
  attn.decode_batch(prompt, Lengths{1300, 700, 2}, cache, o);
  std::vector<Matrix<TypeParam>> outputs;
  for (const int threads : {1, 2, 3}) {
    mha::set_num_threads(threads);
    outputs.push_back(attn.decode_batch(step, Lengths{1, 300, 8}, cache, o).eval());
    cache.truncate(0, 1300);
    cache.truncate(1, 700);
    cache.truncate(2, 2);
  }
  mha::set_num_threads(0);
  EXPECT_TRUE((outputs[0].array() == outputs[1].array()).all());
  EXPECT_TRUE((outputs[0].array() == outputs[2].array()).all());
  // And right: sequence 1's 300 new tokens after its 700.
  mha::AttentionOptions forward_options = causal_if(true);
  forward_options.window = 600;
  const Matrix<TypeParam> second = stack<TypeParam>(prompt.middleRows(1300, 700), step.middleRows(1, 300));
  EXPECT_TRUE(near<TypeParam>(outputs[0].middleRows(1, 300), attn.forward(second, forward_options).bottomRows(300),
                              "batched decode"));
}

// The backward gives each key/value head's gradient one task that adds its query heads' parts in
// turn: grouped-query gradients do not depend on the thread count either.
TYPED_TEST(GroupedQueryAttention, BackwardIsBitIdenticalForAnyThreadCount) {
  auto c = rotary(decoder_config(32, 8, 2, 0, 0, 10), mha::RotaryPairs::interleaved);
  c.bias = true;
  const auto attn = make_module<TypeParam>(c);
  const Matrix<TypeParam> x = random_matrix<TypeParam>(600, 32, 1), d_y = random_matrix<TypeParam>(600, 32, 2);
  const mha::AttentionOptions o = options_of(true, mha::CausalAlignment::top_left, 100);
  std::vector<mha::AttentionParameters<TypeParam>> gradients;
  std::vector<Matrix<TypeParam>> d_x;
  for (const int threads : {1, 2, 3}) {
    mha::set_num_threads(threads);
    mha::Tape<TypeParam> tape;
    attn.forward(x, o, tape);
    gradients.push_back(attn.zero_gradients());
    d_x.push_back(attn.backward(tape, d_y, gradients.back()).self_attention());
  }
  mha::set_num_threads(0);
  for (std::size_t t = 1; t < 3; ++t) {
    EXPECT_TRUE((d_x[0].array() == d_x[t].array()).all()) << t + 1 << " threads";
    const auto a = gradients[0].parameters(), b = gradients[t].parameters();
    for (std::size_t i = 0; i < a.size(); ++i)
      EXPECT_TRUE((a[i].value.array() == b[i].value.array()).all()) << a[i].name << ", " << t + 1 << " threads";
  }
}

// --- gradients --------------------------------------------------------------------------------

using mha_test::gradient_check::expect_gradients_match_finite_differences;
using mha_test::gradient_check::Problem;
using mha_test::gradient_check::Selection;

TEST(DecodingGradients, GroupedQueryAttentionMatchesFiniteDifferences) {
  for (const Index h_kv : {1, 2}) {
    const auto c = with(decoder_config(8, 4, h_kv), [](auto& cfg) { cfg.bias = true; });
    SCOPED_TRACE("h_kv = " + std::to_string(h_kv));
    Problem cross(c, {5}, {7});
    expect_gradients_match_finite_differences(cross);
    Problem self(c, {3, 6, 1}, {3, 6, 1});
    self.self_attention = true;
    self.options.causal = true;
    expect_gradients_match_finite_differences(self);
  }
}

TEST(DecodingGradients, RotaryMatchesFiniteDifferences) {
  for (const auto pairs : {mha::RotaryPairs::interleaved, mha::RotaryPairs::halves}) {
    const auto c = with(rotary(decoder_config(8, 2, 1), pairs, 100.0), [](auto& cfg) { cfg.bias = true; });
    SCOPED_TRACE(describe(c));
    for (const auto& [L, S] : {std::pair<Index, Index>{4, 7}, {7, 4}})
      for (const auto& o : all_alignments()) {
        Problem p(c, {L}, {S});
        p.options = o;
        SCOPED_TRACE("L = " + std::to_string(L) + ", S = " + std::to_string(S) + ", " + describe(o));
        expect_gradients_match_finite_differences(p);
      }
    Problem self(c, {3, 6, 1}, {3, 6, 1});
    self.self_attention = true;
    self.options.causal = true;
    expect_gradients_match_finite_differences(self);
  }
}

TEST(DecodingGradients, WindowMatchesFiniteDifferences) {
  for (const Index window : {1, 2, 3})
    for (const auto& [L, S] : {std::pair<Index, Index>{6, 6}, {4, 7}, {7, 4}})
      for (const auto& o : all_alignments(window)) {
        Problem p(config(6, 2), {L}, {S});
        p.options = o;
        SCOPED_TRACE("L = " + std::to_string(L) + ", S = " + std::to_string(S) + ", " + describe(o));
        expect_gradients_match_finite_differences(p);
      }
}

// Grouped-query attention, rotary, a window and biases together, in a batch and across the tiles:
// rows and keys on both sides of 256 and 512, checked on the entries next to them and a spread.
TEST(DecodingGradients, EverythingTogetherMatchesFiniteDifferencesAcrossTileBoundaries) {
  const auto c = with(rotary(decoder_config(8, 4, 2), mha::RotaryPairs::halves), [](auto& cfg) { cfg.bias = true; });
  const Selection near_boundaries = [](const Eigen::Ref<const Eigen::MatrixXd>& m) {
    std::vector<Index> rows = {0, m.rows() - 1};
    for (const Index r : {255, 256, 511, 512})
      if (r < m.rows()) rows.push_back(r);
    std::vector<Index> entries;
    for (const Index r : rows)
      for (Index col = 0; col < m.cols(); col += 3) entries.push_back(col * m.rows() + r);
    for (Index e = 7; e < m.size(); e += m.size() / 5 + 1) entries.push_back(e);
    return entries;
  };
  for (const Index window : {5, 300}) {
    Problem p(c, {300, 4}, {530, 6});
    p.options = options_of(true, mha::CausalAlignment::bottom_right, window);
    SCOPED_TRACE("window " + std::to_string(window));
    expect_gradients_match_finite_differences(p, near_boundaries);
  }
}

}  // namespace
