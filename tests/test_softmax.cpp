// Properties of mha::softmax_rows: a probability distribution per row, shift invariant, stable.
#include <mha/softmax.hpp>

#include "test_util.hpp"

#include <cmath>
#include <limits>

namespace {

using mha_test::Matrix;
using mha_test::random_matrix;
using mha_test::tolerance;

template <typename Scalar>
class Softmax : public ::testing::Test {};
TYPED_TEST_SUITE(Softmax, mha_test::Scalars, mha_test::ScalarNames);

TYPED_TEST(Softmax, RowsSumToOneAndArePositive) {
  for (Eigen::Index cols : {1, 2, 7, 64, 65, 257}) {
    const Matrix<TypeParam> logits = 5 * random_matrix<TypeParam>(9, cols, cols);
    const Matrix<TypeParam> p = mha::softmax_rows(logits);
    for (Eigen::Index r = 0; r < p.rows(); ++r) {
      EXPECT_NEAR(p.row(r).sum(), 1.0, 10 * tolerance<TypeParam>()) << "cols = " << cols;
      EXPECT_GT(p.row(r).minCoeff(), 0) << "cols = " << cols;
    }
  }
}

TYPED_TEST(Softmax, MatchesTheDefinition) {
  const Matrix<TypeParam> logits = 3 * random_matrix<TypeParam>(4, 11, 1);
  Matrix<TypeParam> expected(4, 11);
  for (Eigen::Index r = 0; r < 4; ++r) {
    double sum = 0;
    for (Eigen::Index j = 0; j < 11; ++j) sum += std::exp(static_cast<double>(logits(r, j)));
    for (Eigen::Index j = 0; j < 11; ++j)
      expected(r, j) = static_cast<TypeParam>(std::exp(static_cast<double>(logits(r, j))) / sum);
  }
  EXPECT_TRUE(mha_test::close(mha::softmax_rows(logits), expected, tolerance<TypeParam>()));
}

TYPED_TEST(Softmax, AddingAConstantToARowChangesNothing) {
  const Matrix<TypeParam> logits = random_matrix<TypeParam>(5, 13, 2);
  Matrix<TypeParam> shifted = logits;
  const TypeParam shifts[] = {-100, -1, 0.5, 30, 1000};
  for (Eigen::Index r = 0; r < 5; ++r) shifted.row(r).array() += shifts[r];
  EXPECT_TRUE(mha_test::close(mha::softmax_rows(shifted), mha::softmax_rows(logits), 100 * tolerance<TypeParam>()));
}

TYPED_TEST(Softmax, HugeLogitsGiveNoNaNOrInf) {
  Matrix<TypeParam> logits(3, 4);
  logits << 1e4, -1e4, 1e4, 0,  //
      -1e4, -1e4, -1e4, -1e4,   //
      1e4, 1e4 - 1, -1e4, 1e4 - 2;
  const Matrix<TypeParam> p = mha::softmax_rows(logits);
  EXPECT_TRUE(p.allFinite());
  EXPECT_NEAR(p(0, 0), 0.5, 1e-6);
  EXPECT_NEAR(p(0, 2), 0.5, 1e-6);
  EXPECT_NEAR(p(1, 0), 0.25, 1e-6);
  const double e1 = std::exp(-1.0), e2 = std::exp(-2.0);
  EXPECT_NEAR(p(2, 0), 1 / (1 + e1 + e2), 1e-6);
  EXPECT_NEAR(p(2, 3), e2 / (1 + e1 + e2), 1e-6);
  EXPECT_EQ(p(2, 2), 0);
}

TYPED_TEST(Softmax, RowOfAllMinusInfinityGivesZeros) {
  const TypeParam inf = std::numeric_limits<TypeParam>::infinity();
  Matrix<TypeParam> logits(2, 3);
  logits << -inf, -inf, -inf,  //
      0, -inf, 0;
  const Matrix<TypeParam> p = mha::softmax_rows(logits);
  EXPECT_TRUE(p.row(0).isZero(0));
  EXPECT_EQ(p(1, 0), TypeParam(0.5));
  EXPECT_EQ(p(1, 1), TypeParam(0));
  EXPECT_EQ(p(1, 2), TypeParam(0.5));
}

TYPED_TEST(Softmax, EmptyMatrixStaysEmpty) {
  EXPECT_EQ(mha::softmax_rows(Matrix<TypeParam>(0, 5)).size(), 0);
  EXPECT_EQ(mha::softmax_rows(Matrix<TypeParam>(3, 0)).size(), 0);
}

TYPED_TEST(Softmax, InPlaceWorksOnABlockOfALargerMatrix) {
  Matrix<TypeParam> m = random_matrix<TypeParam>(6, 8, 3);
  const Matrix<TypeParam> before = m;
  mha::softmax_rows_in_place(m.block(1, 2, 3, 4));
  EXPECT_TRUE(
      mha_test::close(m.block(1, 2, 3, 4), mha::softmax_rows(before.block(1, 2, 3, 4)), tolerance<TypeParam>()));
  m.block(1, 2, 3, 4) = before.block(1, 2, 3, 4);
  EXPECT_EQ(m, before);
}

}  // namespace
