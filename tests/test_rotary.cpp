// Rotary position embeddings: queries and keys turned by their positions (both pair styles, any
// base), values not. A rotation checked by hand; the forward equals the literal reference (pairs
// rotated with std::cos and std::sin); the weights depend only on relative positions; the backward
// matches finite differences.
#include <mha/mha.hpp>

#include "decoding_util.hpp"
#include "gradient_check.hpp"
#include "reference/reference_attention.hpp"
#include "test_util.hpp"

#include <cmath>
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

namespace {

using mha_test::all_alignments;
using mha_test::causal_if;
using mha_test::config;
using mha_test::decoder_config;
using mha_test::describe;
using mha_test::make_module;
using mha_test::Matrix;
using mha_test::near;
using mha_test::options_of;
using mha_test::random_matrix;
using mha_test::reference_options;
using mha_test::relative_error;
using mha_test::rotary;
using mha_test::stack;
using Index = Eigen::Index;

template <typename Scalar>
class Rotary : public ::testing::Test {};
TYPED_TEST_SUITE(Rotary, mha_test::Scalars, mha_test::ScalarNames);

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

TYPED_TEST(Rotary, TurnsAnyStorageOrderAndBlockAlikeAndBack) {
  // RotaryEmbedding::rotate on a column-major matrix, a row-major one and a block of a larger
  // matrix: the same numbers, each pair turned as the definition says, and rotate_back undoes it.
  using RowMajor = Eigen::Matrix<TypeParam, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  for (const auto pairs : {mha::RotaryPairs::interleaved, mha::RotaryPairs::halves}) {
    const mha::RotaryEmbedding rotation(6, 100.0, pairs);
    const Matrix<TypeParam> x = random_matrix<TypeParam>(5, 12, 3);  // two heads of width 6
    const std::vector<Index> positions = {0, 3, 1, 7, 2};
    Matrix<TypeParam> expected = x;
    for (Index r = 0; r < 5; ++r)
      for (Index head = 0; head < 2; ++head)
        for (Index i = 0; i < 3; ++i) {
          const Index a = head * 6 + (pairs == mha::RotaryPairs::interleaved ? 2 * i : i);
          const Index b = head * 6 + (pairs == mha::RotaryPairs::interleaved ? 2 * i + 1 : i + 3);
          const double angle =
              static_cast<double>(positions[static_cast<std::size_t>(r)]) * std::pow(100.0, -2.0 * i / 6);
          const double xa = x(r, a), xb = x(r, b);
          expected(r, a) = static_cast<TypeParam>(xa * std::cos(angle) - xb * std::sin(angle));
          expected(r, b) = static_cast<TypeParam>(xa * std::sin(angle) + xb * std::cos(angle));
        }
    Matrix<TypeParam> columns = x;
    rotation.rotate(columns, positions.data());
    RowMajor rows = x;
    rotation.rotate(rows, positions.data());
    Matrix<TypeParam> larger = random_matrix<TypeParam>(9, 15, 4);
    const Matrix<TypeParam> larger_before = larger;
    larger.block(2, 1, 5, 12) = x;
    rotation.rotate(larger.block(2, 1, 5, 12), positions.data());
    EXPECT_TRUE(near<TypeParam>(columns, expected, "column-major"));
    EXPECT_EQ(Matrix<TypeParam>(rows), columns);
    EXPECT_EQ(Matrix<TypeParam>(larger.block(2, 1, 5, 12)), columns);
    EXPECT_EQ(larger.topRows(2), larger_before.topRows(2));  // nothing outside the block moves
    EXPECT_EQ(larger.col(0), larger_before.col(0));
    rotation.rotate_back(rows, positions.data());
    EXPECT_TRUE(near<TypeParam>(Matrix<TypeParam>(rows), x, "rotated back"));
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
        EXPECT_TRUE(near<TypeParam>(attn.forward(x, o),
                                    mha_reference::decoder_attention(attn, x, x, x, reference_options(o)),
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
  const Matrix<TypeParam> x = random_matrix<TypeParam>(n, 16, 1),
                          keys = stack<TypeParam>(random_matrix<TypeParam>(m, 16, 2), x);
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

// --- gradients --------------------------------------------------------------------------------

using mha_test::gradient_check::expect_gradients_match_finite_differences;
using mha_test::gradient_check::Problem;
using mha_test::gradient_check::with;

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

}  // namespace
