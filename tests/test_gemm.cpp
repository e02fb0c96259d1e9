// mha::detail::gemm, the one matrix product of the library: c (+)= op(a) · op(b) against the
// definition (a triple loop in long double), for each of the four transpositions, operands and
// results that are blocks of larger matrices (an outer stride), and the shapes that take each of
// its paths: one row or one column (the two GEMVs, with contiguous and strided vectors), one
// inner dimension, sizes across the kernel's register and cache blocks. mha's packed kernel
// (packed_gemm.hpp, gemm's under AVX-512) is also tested on its own in every build, with the
// register block of that build's instruction set. Built with mha::blas
// (MHA_TEST_BLAS: with EIGEN_USE_BLAS), it also checks that the products run on the BLAS.
#include <mha/detail/gemm.hpp>
#include <mha/detail/packed_gemm.hpp>

#include "test_util.hpp"

#include <tuple>
#include <vector>

#ifdef MHA_TEST_BLAS
#include <mha/mha.hpp>

#include <dlfcn.h>

#include <atomic>

// The BLAS's GEMM and GEMV, counted: this program's definitions come before the library's, and
// each passes the call on to the library's own (the next definition of its name).
namespace {
std::atomic<int> blas_products{0};
template <typename Function>
Function next_definition(const char* name) {
  return reinterpret_cast<Function>(dlsym(RTLD_NEXT, name));
}
}  // namespace
#define MHA_COUNTED_GEMM(name, T)                                                                                    \
  extern "C" int name(const char* ta, const char* tb, const int* m, const int* n, const int* k, const T* alpha,      \
                      const T* a, const int* lda, const T* b, const int* ldb, const T* beta, T* c, const int* ldc) { \
    using Gemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*,          \
                          const int*, const T*, const int*, const T*, T*, const int*);                               \
    static const Gemm next = next_definition<Gemm>(#name);                                                           \
    ++blas_products;                                                                                                 \
    next(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);                                                      \
    return 0;                                                                                                        \
  }
#define MHA_COUNTED_GEMV(name, T)                                                                                    \
  extern "C" int name(const char* t, const int* m, const int* n, const T* alpha, const T* a, const int* lda,         \
                      const T* x, const int* incx, const T* beta, T* y, const int* incy) {                           \
    using Gemv = void (*)(const char*, const int*, const int*, const T*, const T*, const int*, const T*, const int*, \
                          const T*, T*, const int*);                                                                 \
    static const Gemv next = next_definition<Gemv>(#name);                                                           \
    ++blas_products;                                                                                                 \
    next(t, m, n, alpha, a, lda, x, incx, beta, y, incy);                                                            \
    return 0;                                                                                                        \
  }
MHA_COUNTED_GEMM(sgemm_, float)
MHA_COUNTED_GEMM(dgemm_, double)
MHA_COUNTED_GEMV(sgemv_, float)
MHA_COUNTED_GEMV(dgemv_, double)
#endif

namespace {

using mha_test::Matrix;
using mha_test::random_matrix;
using mha_test::tolerance;
using Index = Eigen::Index;

template <typename Scalar>
class Gemm : public ::testing::Test {};
TYPED_TEST_SUITE(Gemm, mha_test::Scalars, mha_test::ScalarNames);

/// op(a) · op(b) by the definition, accumulated in long double.
template <typename Scalar>
Matrix<Scalar> definition(const Matrix<Scalar>& a, bool ta, const Matrix<Scalar>& b, bool tb) {
  const Index m = ta ? a.cols() : a.rows(), k = ta ? a.rows() : a.cols(), n = tb ? b.rows() : b.cols();
  Matrix<Scalar> c(m, n);
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n; ++j) {
      long double sum = 0;
      for (Index p = 0; p < k; ++p)
        sum += static_cast<long double>(ta ? a(p, i) : a(i, p)) * static_cast<long double>(tb ? b(j, p) : b(p, j));
      c(i, j) = static_cast<Scalar>(sum);
    }
  return c;
}

TYPED_TEST(Gemm, EqualsTheDefinitionForEveryTranspositionShapeAndStride) {
  using Scalar = TypeParam;
  // (m, n, k): scalars, one row, one column, one inner dimension, odd sizes, and sizes past the
  // register blocks (Eigen's 8–48 rows × 4 columns, the packed kernel's 8–32 × 6 or 12) and its
  // cache blocks: passes over the depth (256 and Eigen's), blocks of rows (256) and of columns
  // (1020 or 1014), each with a shorter last one.
  const std::vector<std::tuple<Index, Index, Index>> shapes = {
      {1, 1, 1},     {1, 1, 9},     {1, 7, 5},     {7, 1, 5},    {1, 300, 70}, {300, 1, 70},
      {13, 9, 1},    {5, 3, 2},     {33, 17, 29},  {65, 70, 3},  {2, 2, 600},  {97, 61, 300},
      {9, 20, 1030}, {301, 13, 40}, {20, 1100, 9}, {35, 25, 513}};
  std::uint64_t seed = 1;
  for (const auto& [m, n, k] : shapes)
    for (const bool ta : {false, true})
      for (const bool tb : {false, true})
        for (const bool strided : {false, true})
          for (const bool accumulate : {false, true}) {
            // Each operand is stored inside a larger matrix, 3 rows down, when `strided`.
            const Index pad = strided ? 3 : 0;
            const Matrix<Scalar> a_store = random_matrix<Scalar>((ta ? k : m) + pad, ta ? m : k, ++seed);
            const Matrix<Scalar> b_store = random_matrix<Scalar>((tb ? n : k) + pad, tb ? k : n, ++seed);
            Matrix<Scalar> c_store = random_matrix<Scalar>(m + pad, n, ++seed);
            const Matrix<Scalar> a = a_store.bottomRows(a_store.rows() - pad);
            const Matrix<Scalar> b = b_store.bottomRows(b_store.rows() - pad);
            const Matrix<Scalar> c0 = c_store.bottomRows(m);
            auto c = c_store.bottomRows(m);
            auto op_a = mha::detail::operand(a_store.bottomRows(a.rows()));
            auto op_b = mha::detail::operand(b_store.bottomRows(b.rows()));
            mha::detail::gemm(ta ? op_a.t() : op_a, tb ? op_b.t() : op_b, c, accumulate);
            Matrix<Scalar> expected = definition(a, ta, b, tb);
            if (accumulate) expected += c0;
            EXPECT_TRUE(mha_test::close(c_store.bottomRows(m), expected, 10 * tolerance<Scalar>()))
                << "m = " << m << ", n = " << n << ", k = " << k << ", op(a) " << (ta ? "aᵀ" : "a") << ", op(b) "
                << (tb ? "bᵀ" : "b") << (strided ? ", strided" : "") << (accumulate ? ", +=" : ", =");
            // The rows above the result are not written.
            EXPECT_EQ(c_store.topRows(pad), random_matrix<Scalar>(m + pad, n, seed).topRows(pad));
          }
}

TYPED_TEST(Gemm, ReadsARowMajorOperandAsTheTransposeOfItsStorage) {
  using Scalar = TypeParam;
  using RowMajor = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Matrix<Scalar> a = random_matrix<Scalar>(11, 6, 1), b = random_matrix<Scalar>(6, 9, 2);
  const RowMajor a_rows = a, b_rows = b;
  Matrix<Scalar> c(11, 9);
  mha::detail::gemm(mha::detail::operand(a_rows), mha::detail::operand(b_rows), c);
  EXPECT_TRUE(mha_test::close(c, definition(a, false, b, false), 10 * tolerance<Scalar>()));
}

TYPED_TEST(Gemm, EmptyProductsWriteZerosOrNothing) {
  using Scalar = TypeParam;
  const Matrix<Scalar> a(4, 0), b(0, 3);
  Matrix<Scalar> c = Matrix<Scalar>::Constant(4, 3, 2);
  mha::detail::gemm(mha::detail::operand(a), mha::detail::operand(b), c, true);
  EXPECT_EQ(c, Matrix<Scalar>::Constant(4, 3, 2));
  mha::detail::gemm(mha::detail::operand(a), mha::detail::operand(b), c);
  EXPECT_EQ(c, Matrix<Scalar>::Zero(4, 3));
}

/// c (+)= op(a) · op(b) through mha's packed kernel alone, its packed blocks in vectors.
template <typename Scalar>
void packed_product(const Matrix<Scalar>& a, bool ta, const Matrix<Scalar>& b, bool tb,
                    typename mha::detail::Operand<Scalar>::Result c) {
  namespace packed = mha::detail::packed;
  const Index m = c.rows(), n = c.cols(), k = ta ? a.rows() : a.cols();
  const packed::View<Scalar> a_view{a.data(), ta ? a.rows() : 1, ta ? 1 : a.rows()};
  const packed::View<Scalar> b_view{b.data(), tb ? b.rows() : 1, tb ? 1 : b.rows()};
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> lhs(packed::lhs_size<Scalar>(m, k)), rhs(packed::rhs_size<Scalar>(k, n));
  packed::multiply(m, n, k, a_view, b_view, c.data(), c.outerStride(), lhs.data(), rhs.data());
}

TYPED_TEST(Gemm, ThePackedKernelEqualsTheDefinitionInEveryBuild) {
  using Scalar = TypeParam;
  using Blocks = mha::detail::packed::Blocks<Scalar>;
  const Index panel = Blocks::kRowsPerPanel, cols = Blocks::kCols;
  // One panel exactly, a number short and over, one row, blocks of rows, columns and depth crossed.
  const std::vector<std::tuple<Index, Index, Index>> shapes = {{panel, cols, 7},
                                                               {panel - 1, cols + 1, 1},
                                                               {panel + 1, cols - 1, 3},
                                                               {1, 1, 5},
                                                               {Blocks::kRows + 3, 2 * cols, Blocks::kDepth + 5},
                                                               {2 * panel, Blocks::kColumns + 1, 11}};
  std::uint64_t seed = 50;
  for (const auto& [m, n, k] : shapes)
    for (const bool ta : {false, true})
      for (const bool tb : {false, true}) {
        const Matrix<Scalar> a = random_matrix<Scalar>(ta ? k : m, ta ? m : k, ++seed);
        const Matrix<Scalar> b = random_matrix<Scalar>(tb ? n : k, tb ? k : n, ++seed);
        const Matrix<Scalar> c0 = random_matrix<Scalar>(m + 2, n, ++seed);
        Matrix<Scalar> c = c0;
        packed_product(a, ta, b, tb, c.topRows(m));
        EXPECT_TRUE(mha_test::close(c.topRows(m), c0.topRows(m) + definition(a, ta, b, tb), 10 * tolerance<Scalar>()))
            << "m = " << m << ", n = " << n << ", k = " << k << (ta ? ", aᵀ" : ", a") << (tb ? ", bᵀ" : ", b");
        EXPECT_EQ(c.bottomRows(2), c0.bottomRows(2)) << "rows below c written";
      }
}

TYPED_TEST(Gemm, ThePackedKernelsNumbersDoNotDependOnTheRowsAndColumnsBesideThem) {
  // Each number of c is its sum over the depth in one order, wherever it falls in the blocks and
  // panels: rows 5–6 and columns 3–4 of a 300 × 1030 product, bit for bit as a 2 × 2 product.
  using Scalar = TypeParam;
  const Matrix<Scalar> a = random_matrix<Scalar>(300, 600, 1), b = random_matrix<Scalar>(600, 1030, 2);
  Matrix<Scalar> whole = Matrix<Scalar>::Zero(300, 1030), part = Matrix<Scalar>::Zero(2, 2);
  packed_product(a, false, b, false, whole);
  packed_product(Matrix<Scalar>(a.middleRows(5, 2)), false, Matrix<Scalar>(b.middleCols(3, 2)), false, part);
  EXPECT_EQ(part, whole.block(5, 3, 2, 2));
  EXPECT_TRUE(mha_test::close(
      part, definition(Matrix<Scalar>(a.middleRows(5, 2)), false, Matrix<Scalar>(b.middleCols(3, 2)), false),
      10 * tolerance<Scalar>()));
}

TYPED_TEST(Gemm, PacksIntoTheSpaceGivenAndGivesTheSameNumbers) {
  // Blocks above the stack's limit go into the PackingSpace when one is given, and the product is
  // the same bit for bit either way.
  using Scalar = TypeParam;
  const Matrix<Scalar> a = random_matrix<Scalar>(300, 512, 1), b = random_matrix<Scalar>(512, 200, 2);
  Matrix<Scalar> without(300, 200), with(300, 200);
  mha::detail::PackingSpace<Scalar> space;
  mha::detail::gemm(mha::detail::operand(a), mha::detail::operand(b), without);
  mha::detail::gemm(mha::detail::operand(a), mha::detail::operand(b), with, false, &space);
  EXPECT_EQ(with, without);
#ifndef EIGEN_USE_BLAS
  EXPECT_GT(space.lhs.size() + space.rhs.size(), 0);
#endif
  EXPECT_TRUE(mha_test::close(with, definition(a, false, b, false), 10 * tolerance<Scalar>()));
}

#ifdef MHA_TEST_BLAS
TYPED_TEST(Gemm, RunsOnTheBlasWithEigenUseBlas) {
  using Scalar = TypeParam;
  const Matrix<Scalar> a = random_matrix<Scalar>(40, 30, 1), b = random_matrix<Scalar>(30, 20, 2);
  Matrix<Scalar> c(40, 20), column(40, 1);
  const int before = blas_products;
  mha::detail::gemm(mha::detail::operand(a), mha::detail::operand(b), c);  // a GEMM
  EXPECT_EQ(blas_products - before, 1);
  EXPECT_TRUE(mha_test::close(c, definition(a, false, b, false), 10 * tolerance<Scalar>()));
  mha::detail::gemm(mha::detail::operand(a), mha::detail::operand(b.col(0)), column);  // a GEMV
  EXPECT_EQ(blas_products - before, 2);
  EXPECT_TRUE(mha_test::close(column, definition(a, false, Matrix<Scalar>(b.col(0)), false), 10 * tolerance<Scalar>()));
  // A whole forward pass: each projection and attention tile.
  mha::MultiHeadAttentionConfig config;
  config.d_model = 16;
  config.num_heads = 2;
  const mha::MultiHeadAttention<Scalar> attn(config);
  const Matrix<Scalar> x = random_matrix<Scalar>(9, 16, 3);
  const int before_forward = blas_products;
  const Matrix<Scalar> y = attn.forward(x);
  EXPECT_GE(blas_products - before_forward, 4 + 2 * 2);  // 4 projections, 2 products per head
}
#endif

}  // namespace
