// Properties of mha::scaled_dot_product_attention, the single-head kernel.
#include <mha/attention.hpp>

#include "reference/reference_attention.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

using mha_test::causal_if;
using mha_test::close;
using mha_test::error_of;
using mha_test::Matrix;
using mha_test::random_matrix;
using mha_test::tolerance;

template <typename Scalar>
class ScaledDotProductAttention : public ::testing::Test {};
TYPED_TEST_SUITE(ScaledDotProductAttention, mha_test::Scalars, mha_test::ScalarNames);

TYPED_TEST(ScaledDotProductAttention, HandCheckableTwoTokenExample) {
  // d_k = 1, so the scale is 1/√1 = 1. Query 0 scores both keys 0 → weights (1/2, 1/2);
  // query 1 scores them 0 and ln 3 → weights (1/4, 3/4).
  Matrix<TypeParam> q(2, 1), k(2, 1), v(2, 2);
  q << 0, std::log(3.0);
  k << 0, 1;
  v << 2, 0,  //
      0, 4;
  Matrix<TypeParam> expected(2, 2);
  expected << 1.0, 2.0,  //
      0.5, 3.0;
  EXPECT_TRUE(close(mha::scaled_dot_product_attention(q, k, v), expected, tolerance<TypeParam>()));

  // Causal: query 0 sees only key 0 and copies value 0; query 1 is unchanged.
  expected.row(0) << 2.0, 0.0;
  EXPECT_TRUE(close(mha::scaled_dot_product_attention(q, k, v, causal_if(true)), expected, tolerance<TypeParam>()));
}

TYPED_TEST(ScaledDotProductAttention, ScoresAreScaledByOneOverSqrtDk) {
  // d_k = 4: q·k₁ = 4 · ln 3 · ½ = 2 ln 3, and 2 ln 3 / √4 = ln 3, so the weights are (1/4, 3/4).
  Matrix<TypeParam> q(1, 4), k(2, 4), v(2, 1);
  q.setConstant(std::log(3.0));
  k << 0, 0, 0, 0,  //
      0.5, 0.5, 0.5, 0.5;
  v << 4, 8;
  EXPECT_NEAR(mha::scaled_dot_product_attention(q, k, v)(0, 0), 0.25 * 4 + 0.75 * 8, 1e-5);
  mha::AttentionOptions options;
  options.scale = 0.0;  // every score 0: a plain average of the values
  EXPECT_NEAR(mha::scaled_dot_product_attention(q, k, v, options)(0, 0), 6.0, 1e-5);
}

/// {1, 2, 7} and, for each tile size B of the kernel, {B − 1, B, B + 1, 2B + 3}.
std::vector<Eigen::Index> sizes_across_block_boundaries() {
  std::vector<Eigen::Index> sizes = {1, 2, 7};
  for (const Eigen::Index b : {mha::detail::kQueryBlock, mha::detail::kKeyBlock})
    for (const Eigen::Index n : {b - 1, b, b + 1, 2 * b + 3}) sizes.push_back(n);
  return sizes;
}

TYPED_TEST(ScaledDotProductAttention, EqualsTheLiteralReferenceAcrossBlockBoundaries) {
  const Eigen::Index d_k = 5, d_v = 3;
  for (const bool causal : {false, true})
    for (const Eigen::Index L : sizes_across_block_boundaries())
      for (const Eigen::Index S : sizes_across_block_boundaries()) {
        const Matrix<TypeParam> q = 2 * random_matrix<TypeParam>(L, d_k, L * 1000 + S);
        const Matrix<TypeParam> k = 2 * random_matrix<TypeParam>(S, d_k, L * 1000 + S + 1);
        const Matrix<TypeParam> v = random_matrix<TypeParam>(S, d_v, L * 1000 + S + 2);
        mha::AttentionOptions options;
        options.causal = causal;
        const auto scale = static_cast<TypeParam>(1 / std::sqrt(5.0));
        EXPECT_TRUE(close(mha::scaled_dot_product_attention(q, k, v, options),
                          mha_reference::attention<TypeParam>(q, k, v, scale, causal), tolerance<TypeParam>()))
            << "L = " << L << ", S = " << S << ", causal = " << causal;
      }
}

TYPED_TEST(ScaledDotProductAttention, RunningMaximumRescalesEarlierKeyBlocks) {
  // Scores that grow (or shrink) steadily along the keys: with growing scores every key block
  // raises the running maximum, so the sums and outputs of the earlier blocks must be rescaled;
  // with shrinking ones the first block holds the maximum. The scores span about 40 (e^40 ≈ 2·10¹⁷):
  // a kernel that skipped or botched the rescale would be far off.
  const Eigen::Index S = 3 * mha::detail::kKeyBlock + 17, L = 5;
  Matrix<TypeParam> q = Matrix<TypeParam>::Ones(L, 2), k(S, 2);
  for (Eigen::Index j = 0; j < S; ++j) k.row(j).setConstant(static_cast<TypeParam>(30.0 * j / S));
  q.col(1).setLinSpaced(L, 0.5, 1);
  const Matrix<TypeParam> v = random_matrix<TypeParam>(S, 3, 1);
  for (const bool grow : {true, false}) {
    const Matrix<TypeParam> keys = grow ? k : Matrix<TypeParam>(k.colwise().reverse());
    const Matrix<TypeParam> out = mha::scaled_dot_product_attention(q, keys, v);
    EXPECT_TRUE(out.allFinite());
    EXPECT_TRUE(close(out, mha_reference::attention<TypeParam>(q, keys, v, TypeParam(1 / std::sqrt(2.0)), false),
                      100 * tolerance<TypeParam>()))
        << "grow = " << grow;
  }
}

TYPED_TEST(ScaledDotProductAttention, CausalOutputIgnoresFutureKeys) {
  const Eigen::Index n = 150, d = 8;
  const Matrix<TypeParam> q = random_matrix<TypeParam>(n, d, 1), k = random_matrix<TypeParam>(n, d, 2),
                          v = random_matrix<TypeParam>(n, d, 3);
  const Matrix<TypeParam> out = mha::scaled_dot_product_attention(q, k, v, causal_if(true));
  for (Eigen::Index r : {0, 1, 63, 64, 100, 148}) {
    Matrix<TypeParam> k2 = k, v2 = v;
    k2.bottomRows(n - r - 1) = 7 * random_matrix<TypeParam>(n - r - 1, d, 100 + r);
    v2.bottomRows(n - r - 1) = 7 * random_matrix<TypeParam>(n - r - 1, d, 200 + r);
    const Matrix<TypeParam> out2 = mha::scaled_dot_product_attention(q, k2, v2, causal_if(true));
    EXPECT_TRUE(close(out2.topRows(r + 1), out.topRows(r + 1), tolerance<TypeParam>())) << "r = " << r;
    EXPECT_FALSE(close(out2.bottomRows(n - r - 1), out.bottomRows(n - r - 1), 1e-3)) << "r = " << r;
  }
}

TYPED_TEST(ScaledDotProductAttention, CausalRowZeroSeesOnlyKeyZero) {
  const Matrix<TypeParam> q = random_matrix<TypeParam>(5, 4, 1), k = random_matrix<TypeParam>(5, 4, 2),
                          v = random_matrix<TypeParam>(5, 3, 3);
  const Matrix<TypeParam> out = mha::scaled_dot_product_attention(q, k, v, causal_if(true));
  EXPECT_TRUE(close(out.row(0), v.row(0), tolerance<TypeParam>()));
}

TYPED_TEST(ScaledDotProductAttention, CausalRowsPastTheLastKeySeeEveryKey) {
  // Top-left alignment with L > S: rows r ≥ S − 1 see all S keys, like non-causal attention.
  const Matrix<TypeParam> q = random_matrix<TypeParam>(9, 4, 1), k = random_matrix<TypeParam>(4, 4, 2),
                          v = random_matrix<TypeParam>(4, 3, 3);
  const Matrix<TypeParam> causal = mha::scaled_dot_product_attention(q, k, v, causal_if(true));
  const Matrix<TypeParam> full = mha::scaled_dot_product_attention(q, k, v);
  EXPECT_TRUE(close(causal.bottomRows(6), full.bottomRows(6), tolerance<TypeParam>()));
  EXPECT_FALSE(close(causal.topRows(3), full.topRows(3), 1e-3));
}

TYPED_TEST(ScaledDotProductAttention, PermutingQueryRowsPermutesOutputRows) {
  const Matrix<TypeParam> q = random_matrix<TypeParam>(70, 6, 1), k = random_matrix<TypeParam>(33, 6, 2),
                          v = random_matrix<TypeParam>(33, 4, 3);
  Eigen::PermutationMatrix<Eigen::Dynamic> perm(70);
  perm.setIdentity();
  std::reverse(perm.indices().data(), perm.indices().data() + 70);
  std::swap(perm.indices()(3), perm.indices()(40));
  EXPECT_TRUE(close(mha::scaled_dot_product_attention(perm * q, k, v),
                    perm * mha::scaled_dot_product_attention(q, k, v), tolerance<TypeParam>()));
}

TYPED_TEST(ScaledDotProductAttention, PermutingKeyAndValueRowsTogetherChangesNothing) {
  const Matrix<TypeParam> q = random_matrix<TypeParam>(20, 6, 1), k = random_matrix<TypeParam>(300, 6, 2),
                          v = random_matrix<TypeParam>(300, 4, 3);
  Eigen::PermutationMatrix<Eigen::Dynamic> perm(300);
  perm.setIdentity();
  std::reverse(perm.indices().data(), perm.indices().data() + 300);
  std::swap(perm.indices()(0), perm.indices()(299 - 17));
  EXPECT_TRUE(close(mha::scaled_dot_product_attention(q, perm * k, perm * v),
                    mha::scaled_dot_product_attention(q, k, v), tolerance<TypeParam>()));
}

TYPED_TEST(ScaledDotProductAttention, LargeLogitsStayFinite) {
  const Matrix<TypeParam> q = 100 * random_matrix<TypeParam>(40, 4, 1), k = 100 * random_matrix<TypeParam>(300, 4, 2),
                          v = random_matrix<TypeParam>(300, 3, 3);
  const Matrix<TypeParam> out = mha::scaled_dot_product_attention(q, k, v);
  EXPECT_TRUE(out.allFinite());
  EXPECT_TRUE(
      close(out, mha_reference::attention<TypeParam>(q, k, v, TypeParam(0.5), false), 100 * tolerance<TypeParam>()));
}

TYPED_TEST(ScaledDotProductAttention, EmptyQueriesGiveAnEmptyResult) {
  const Matrix<TypeParam> out = mha::scaled_dot_product_attention(
      Matrix<TypeParam>(0, 4), random_matrix<TypeParam>(3, 4, 1), random_matrix<TypeParam>(3, 2, 2));
  EXPECT_EQ(out.rows(), 0);
  EXPECT_EQ(out.cols(), 2);
}

TYPED_TEST(ScaledDotProductAttention, NoKeysGiveZeros) {
  for (const bool causal : {false, true}) {
    mha::AttentionOptions options;
    options.causal = causal;
    const Matrix<TypeParam> out = mha::scaled_dot_product_attention(
        random_matrix<TypeParam>(3, 4, 1), Matrix<TypeParam>(0, 4), Matrix<TypeParam>(0, 2), options);
    EXPECT_EQ(out.rows(), 3);
    EXPECT_EQ(out.cols(), 2);
    EXPECT_TRUE(out.isZero(0));
  }
}

TYPED_TEST(ScaledDotProductAttention, AcceptsRowMajorMapsBlocksAndExpressions) {
  const Matrix<TypeParam> q = random_matrix<TypeParam>(9, 4, 1), k = random_matrix<TypeParam>(11, 4, 2),
                          v = random_matrix<TypeParam>(11, 3, 3);
  const Matrix<TypeParam> expected = mha::scaled_dot_product_attention(q, k, v);

  using RowMajor = Eigen::Matrix<TypeParam, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const RowMajor q_rm = q, k_rm = k, v_rm = v;
  EXPECT_TRUE(close(mha::scaled_dot_product_attention(q_rm, k_rm, v_rm), expected, tolerance<TypeParam>()));

  std::vector<TypeParam> buffer(q.data(), q.data() + q.size());
  const Eigen::Map<const Matrix<TypeParam>> q_map(buffer.data(), 9, 4);
  EXPECT_TRUE(close(mha::scaled_dot_product_attention(q_map, k, v), expected, tolerance<TypeParam>()));

  Matrix<TypeParam> big = Matrix<TypeParam>::Zero(20, 10);
  big.block(3, 2, 9, 4) = q;  // a block with an outer stride, not whole columns
  EXPECT_TRUE(close(mha::scaled_dot_product_attention(big.block(3, 2, 9, 4), k, v), expected, tolerance<TypeParam>()));

  EXPECT_TRUE(close(mha::scaled_dot_product_attention(2 * q, k, (v.array() + 1).matrix()),
                    mha::scaled_dot_product_attention(Matrix<TypeParam>(2 * q), k, Matrix<TypeParam>(v.array() + 1)),
                    tolerance<TypeParam>()));
}

TYPED_TEST(ScaledDotProductAttention, RejectsMismatchedShapesWithAClearMessage) {
  const Matrix<TypeParam> q = random_matrix<TypeParam>(3, 4, 1);
  EXPECT_EQ(error_of([&] { mha::scaled_dot_product_attention(q, Matrix<TypeParam>(5, 3), Matrix<TypeParam>(5, 2)); }),
            "mha: scaled_dot_product_attention: query is 3 x 4 and key is 5 x 3; both need d_k columns");
  EXPECT_EQ(error_of([&] { mha::scaled_dot_product_attention(q, Matrix<TypeParam>(5, 4), Matrix<TypeParam>(6, 2)); }),
            "mha: scaled_dot_product_attention: key has 5 rows but value has 6 (key is 5 x 4, value is 6 x 2)");
  mha::AttentionOptions options;
  options.scale = std::numeric_limits<double>::quiet_NaN();
  EXPECT_EQ(error_of([&] { mha::scaled_dot_product_attention(q, q, q, options); }),
            "mha: options.scale must be finite, got nan");
  // The error type is the library's own subclass of std::invalid_argument.
  EXPECT_THROW(mha::scaled_dot_product_attention(q, Matrix<TypeParam>(5, 3), Matrix<TypeParam>(5, 2)),
               mha::invalid_argument);
}

}  // namespace
