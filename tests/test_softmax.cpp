// Properties of mha::softmax_rows: a probability distribution per row, shift invariant, stable.
#include <mha/softmax.hpp>

#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

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

// The exponentials of the attention's tiles (detail::exp_minus): for float its own 2^t polynomial,
// for double Eigen's exp. Relative error against exp in long double at most 1.5·2⁻²⁴·(1 + |x|) in
// float (the |x| term is the rounding of x·log₂e; softmax.hpp says why it is harmless), 4·2⁻⁵³ in
// double: 10⁶ numbers x spread evenly in magnitude (10⁻⁶ to the smallest normal result's −86.6 in
// float, −708 in double), 1000 of their negatives, and the whole numbers to 88.
TYPED_TEST(Softmax, TileExponentialsAreAccurate) {
  using T = TypeParam;
  const bool is_float = std::is_same<T, float>::value;
  const double epsilon = is_float ? std::ldexp(1.5, -24) : std::ldexp(4.0, -53), largest = is_float ? 86.6 : 708;
  std::mt19937 random(7);
  std::uniform_real_distribution<double> log_magnitude(std::log(1e-6), std::log(largest));
  std::vector<T> x;
  for (int i = 0; i < 1000000; ++i) x.push_back(-static_cast<T>(std::exp(log_magnitude(random))));
  for (int i = 0; i < 1000; ++i) x.push_back(-x[i]);
  for (int k = 1; k <= 88; ++k) x.push_back(T(k));
  std::vector<T> y = x, zero(x.size(), T(0));
  mha::detail::exp_minus(y.data(), static_cast<Eigen::Index>(y.size()), zero.data(), true);
  double worst = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const long double exact = std::exp(static_cast<long double>(x[i]));
    // Less the smallest normal number, which the flush of Eigen's exp (double, and a build without
    // vectorisation) may take from any result (exp_flushed).
    const double error =
        static_cast<double>(std::max(0.0L, std::fabs(y[i] - exact) - std::numeric_limits<T>::min()) / exact);
    worst = std::max(worst, is_float ? error / (1 + std::fabs(double(x[i]))) : error);
  }
  EXPECT_LE(worst, epsilon);
}

TYPED_TEST(Softmax, TileExponentialsFlushBelowTheSmallestNormalAndPassNaNAndInfinity) {
  using T = TypeParam;
  const T inf = std::numeric_limits<T>::infinity();
  const T underflowing = std::is_same<T, float>::value ? T(-87.4) : T(-708.5);  // e^x just below the smallest normal
  std::vector<T> x = {-inf, underflowing, T(-1e30), T(0), std::numeric_limits<T>::quiet_NaN(), T(-1), inf};
  mha::detail::exp_minus(x.data(), static_cast<Eigen::Index>(x.size()), T(0), true);
  EXPECT_EQ(x[0], T(0));
  EXPECT_EQ(x[1], T(0));
  EXPECT_EQ(x[2], T(0));
  EXPECT_EQ(x[3], T(1));
  EXPECT_TRUE(std::isnan(x[4]));
  EXPECT_NEAR(x[5], std::exp(T(-1)), 4 * std::numeric_limits<T>::epsilon());
  EXPECT_EQ(x[6], inf);
}

// Every number takes the same route whatever its place: the last few of a count that is not a
// whole number of packets come out as they do inside a longer run, bit for bit.
TYPED_TEST(Softmax, TileExponentialsOfTheLastFewEqualThoseOfAFullRun) {
  using T = TypeParam;
  const Matrix<T> values = 10 * random_matrix<T>(67, 1, 4);
  const Matrix<T> shifts = random_matrix<T>(67, 1, 5);
  Matrix<T> whole = values;
  mha::detail::exp_minus(whole.data(), 67, shifts.data(), false);
  for (Eigen::Index n = 1; n <= 67; ++n) {
    for (Eigen::Index first = 0; first + n <= 67; first += 13) {
      Matrix<T> part = values.middleRows(first, n);
      mha::detail::exp_minus(part.data(), n, shifts.data() + first, false);
      ASSERT_EQ(part, whole.middleRows(first, n)) << "n = " << n << ", first = " << first;
    }
  }
}

}  // namespace
