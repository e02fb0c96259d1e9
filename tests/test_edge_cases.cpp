// Numerical edge cases: extreme and equal scores, one key, one query, d_k = 1, very large d_k,
// empty inputs. Each is a case a user meets sooner or later; none may crash or give NaN.
#include <mha/mha.hpp>

#include "reference/reference_attention.hpp"
#include "test_util.hpp"

#include <cmath>

namespace {

using mha_test::causal_if;
using mha_test::close;
using mha_test::Matrix;
using mha_test::random_matrix;
using mha_test::tolerance;

template <typename Scalar>
class EdgeCases : public ::testing::Test {};
TYPED_TEST_SUITE(EdgeCases, mha_test::Scalars, mha_test::ScalarNames);

TYPED_TEST(EdgeCases, ScoresOfPlusAndMinus1e30PickTheLargest) {
  // d_k = 1 and scale 1: the scores are q·k = ±1e30 and 0, representable in float as in double.
  Matrix<TypeParam> q(2, 1), k(3, 1), v(3, 2);
  q << 1e15, -1e15;
  k << 1e15, -1e15, 0;
  v << 1, 2,  //
      3, 4,   //
      5, 6;
  const Matrix<TypeParam> out = mha::scaled_dot_product_attention(q, k, v);
  ASSERT_TRUE(out.allFinite());
  Matrix<TypeParam> expected(2, 2);
  expected << 1, 2,  // query 0 scores (1e30, −1e30, 0): all weight on key 0
      3, 4;          // query 1 scores (−1e30, 1e30, 0): all weight on key 1
  EXPECT_TRUE(close(out, expected, tolerance<TypeParam>()));
}

TYPED_TEST(EdgeCases, AllEqualScoresAverageTheValues) {
  const Matrix<TypeParam> q = Matrix<TypeParam>::Zero(4, 3), k = random_matrix<TypeParam>(700, 3, 1),
                          v = random_matrix<TypeParam>(700, 2, 2);
  const Matrix<TypeParam> out = mha::scaled_dot_product_attention(q, k, v);
  for (Eigen::Index r = 0; r < 4; ++r)
    EXPECT_TRUE(close(out.row(r), v.colwise().mean(), 10 * tolerance<TypeParam>())) << "row " << r;
  // Causal, equal scores: row r averages values 0 … r.
  const Matrix<TypeParam> causal = mha::scaled_dot_product_attention(q, k, v, causal_if(true));
  for (Eigen::Index r = 0; r < 4; ++r)
    EXPECT_TRUE(close(causal.row(r), v.topRows(r + 1).colwise().mean(), 10 * tolerance<TypeParam>())) << "row " << r;
}

TYPED_TEST(EdgeCases, OneKeyIsCopiedToEveryQuery) {
  const Matrix<TypeParam> q = 50 * random_matrix<TypeParam>(300, 4, 1), k = random_matrix<TypeParam>(1, 4, 2),
                          v = random_matrix<TypeParam>(1, 3, 3);
  for (const bool causal : {false, true}) {
    const Matrix<TypeParam> out = mha::scaled_dot_product_attention(q, k, v, causal_if(causal));
    EXPECT_TRUE(close(out, v.replicate(300, 1), tolerance<TypeParam>())) << "causal = " << causal;
  }
}

TYPED_TEST(EdgeCases, OneQueryEqualsTheReference) {
  const mha::MultiHeadAttentionConfig config = mha_test::config(32, 4);
  const mha::MultiHeadAttention<TypeParam> attn(config);
  const Matrix<TypeParam> query = random_matrix<TypeParam>(1, 32, 1), kv = random_matrix<TypeParam>(1000, 32, 2);
  for (const bool causal : {false, true})
    EXPECT_TRUE(close(attn.forward(query, kv, kv, causal_if(causal)),
                      mha_reference::multi_head_attention(attn, query, kv, kv, causal), tolerance<TypeParam>()))
        << "causal = " << causal;
}

TYPED_TEST(EdgeCases, HeadsOfWidthOneEqualTheReference) {
  const mha::MultiHeadAttentionConfig config = mha_test::config(5, 3, 1, 1);
  const mha::MultiHeadAttention<TypeParam> attn(config);
  const Matrix<TypeParam> x = random_matrix<TypeParam>(40, 5, 1);
  for (const bool causal : {false, true})
    EXPECT_TRUE(close(attn.forward(x, causal_if(causal)), mha_reference::multi_head_attention(attn, x, x, x, causal),
                      tolerance<TypeParam>()));
}

TYPED_TEST(EdgeCases, VeryLargeDkEqualsTheReference) {
  const Eigen::Index d_k = 4096;
  const Matrix<TypeParam> q = random_matrix<TypeParam>(9, d_k, 1), k = random_matrix<TypeParam>(13, d_k, 2),
                          v = random_matrix<TypeParam>(13, 3, 3);
  const auto scale = static_cast<TypeParam>(1 / std::sqrt(static_cast<double>(d_k)));
  for (const bool causal : {false, true})
    EXPECT_TRUE(close(mha::scaled_dot_product_attention(q, k, v, causal_if(causal)),
                      mha_reference::attention<TypeParam>(q, k, v, scale, causal), tolerance<TypeParam>()));
}

TYPED_TEST(EdgeCases, EmptyInputsGiveEmptyOrZeroResults) {
  const mha::MultiHeadAttentionConfig config = mha_test::config(6, 2);
  const mha::MultiHeadAttention<TypeParam> attn(config);
  const Matrix<TypeParam> none(0, 6);
  EXPECT_EQ(attn.forward(none, none, none).rows(), 0);
  EXPECT_EQ(attn.forward(none, none, none).cols(), 6);
  EXPECT_TRUE(attn.forward(random_matrix<TypeParam>(3, 6, 1), none, none).isZero(0));
  // A value width of 0: every row of the result is empty.
  const Matrix<TypeParam> out = mha::scaled_dot_product_attention(
      random_matrix<TypeParam>(3, 2, 1), random_matrix<TypeParam>(4, 2, 2), Matrix<TypeParam>(4, 0));
  EXPECT_EQ(out.rows(), 3);
  EXPECT_EQ(out.cols(), 0);
  // A query and key width of 0: every score is 0, so each row averages the values.
  const Matrix<TypeParam> v = random_matrix<TypeParam>(4, 2, 3);
  EXPECT_TRUE(close(mha::scaled_dot_product_attention(Matrix<TypeParam>(3, 0), Matrix<TypeParam>(4, 0), v),
                    v.colwise().mean().replicate(3, 1), tolerance<TypeParam>()));
}

TYPED_TEST(EdgeCases, DenormalAndHugeFiniteInputsGiveFiniteOutputs) {
  const mha::MultiHeadAttentionConfig config = mha_test::config(16, 4);
  const mha::MultiHeadAttention<TypeParam> attn(config);
  const TypeParam denormal = std::numeric_limits<TypeParam>::denorm_min() * 3;
  const Matrix<TypeParam> tiny = Matrix<TypeParam>::Constant(20, 16, denormal);
  EXPECT_TRUE(attn.forward(tiny, causal_if(true)).allFinite());
  const Matrix<TypeParam> huge = 1e6 * random_matrix<TypeParam>(20, 16, 1);  // scores ~1e10: a one-hot softmax
  EXPECT_TRUE(attn.forward(huge, causal_if(true)).allFinite());
  EXPECT_TRUE(attn.forward(huge).allFinite());
}

}  // namespace
