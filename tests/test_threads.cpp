// Threads: results are bit-identical for any thread count; the thread count is settable.
#include <mha/mha.hpp>

#include "test_util.hpp"

#include <string>

namespace {

using mha_test::Matrix;
using mha_test::random_matrix;

/// Restores the default thread count when a test ends, whatever it set.
class Threads : public ::testing::Test {
 protected:
  void TearDown() override { mha::set_num_threads(0); }
};

template <typename Scalar>
class ThreadsTyped : public Threads {};
TYPED_TEST_SUITE(ThreadsTyped, mha_test::Scalars, mha_test::ScalarNames);

/// f() on `threads` of mha's threads, checking that its work really ran on that many.
template <typename F>
auto with_threads(int threads, F&& f) {
  mha_test::use_threads(threads);
  auto result = f();
  EXPECT_EQ(mha::detail::largest_team(), threads) << "the call did not run on " << threads << " threads";
  return result;
}

TYPED_TEST(ThreadsTyped, ForwardIsBitIdenticalOnOneAndTwoThreads) {
  MHA_TEST_SKIP_WITHOUT_OPENMP();
  const mha::MultiHeadAttentionConfig config = mha_test::config(64, 8);
  const mha::MultiHeadAttention<TypeParam> attn(config);
  // 700 query rows: several query blocks and projection row blocks, the last one partial; the
  // attention is 197 Mflop, far above three threads' worth of kMinFlopsPerThread.
  const Matrix<TypeParam> query = random_matrix<TypeParam>(700, 64, 1), kv = random_matrix<TypeParam>(1100, 64, 2);
  for (const bool causal : {false, true}) {
    mha::AttentionOptions options;
    options.causal = causal;
    const Matrix<TypeParam> one = with_threads(1, [&] { return attn.forward(query, kv, kv, options); });
    const Matrix<TypeParam> two = with_threads(2, [&] { return attn.forward(query, kv, kv, options); });
    const Matrix<TypeParam> three = with_threads(3, [&] { return attn.forward(query, kv, kv, options); });
    EXPECT_TRUE((one.array() == two.array()).all()) << "causal = " << causal;
    EXPECT_TRUE((one.array() == three.array()).all()) << "causal = " << causal;
  }
}

TYPED_TEST(ThreadsTyped, SingleHeadAttentionIsBitIdenticalOnOneAndTwoThreads) {
  MHA_TEST_SKIP_WITHOUT_OPENMP();
  // Four query blocks of 43 Mflop in all: ten threads' worth of kMinFlopsPerThread.
  const Matrix<TypeParam> q = random_matrix<TypeParam>(1000, 16, 1), k = random_matrix<TypeParam>(900, 16, 2),
                          v = random_matrix<TypeParam>(900, 8, 3);
  const Matrix<TypeParam> one = with_threads(1, [&] { return mha::scaled_dot_product_attention(q, k, v); });
  const Matrix<TypeParam> two = with_threads(2, [&] { return mha::scaled_dot_product_attention(q, k, v); });
  EXPECT_TRUE((one.array() == two.array()).all());
}

TEST_F(Threads, ThreadCountIsSettableAndZeroRestoresTheDefault) {
#ifdef _OPENMP
  mha::set_num_threads(3);
  EXPECT_EQ(mha::num_threads(), 3);
  mha::set_num_threads(0);
  EXPECT_EQ(mha::num_threads(), omp_get_max_threads());
#else
  mha::set_num_threads(3);
  EXPECT_EQ(mha::num_threads(), 1);  // without OpenMP everything runs on the calling thread
#endif
}

TEST_F(Threads, NegativeThreadCountIsRejected) {
  try {
    mha::set_num_threads(-2);
    FAIL() << "no exception";
  } catch (const mha::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()), "mha: set_num_threads: threads must be >= 0 (0 = OpenMP's default), got -2");
  }
}

}  // namespace
