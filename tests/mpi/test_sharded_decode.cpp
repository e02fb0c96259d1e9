// Decoding over a cache sharded across the ranks equals decoding over one whole cache, step by
// step, and every rank gets the same output, bit for bit.
#include <mha/distributed/sharded_cache.hpp>
#include <mha/mha.hpp>

#include "mpi_test_util.hpp"
#include "test_util.hpp"

#include <gtest/gtest.h>

#include <string>

namespace {

using mha::MultiHeadAttention;
using mha::distributed::ShardedCache;
using mha_test::Matrix;

template <typename Scalar>
class ShardedDecode : public ::testing::Test {};
TYPED_TEST_SUITE(ShardedDecode, mha_test::Scalars, mha_test::ScalarNames);

/// Whether `m` is the same, bit for bit, on every rank.
template <typename Scalar>
bool same_on_every_rank(const Matrix<Scalar>& m) {
  Matrix<Scalar> first = m;
  MPI_Bcast(first.data(), static_cast<int>(first.size() * sizeof(Scalar)), MPI_BYTE, 0, MPI_COMM_WORLD);
  return mha_test::on_every_rank(first == m);
}

TYPED_TEST(ShardedDecode, EveryStepEqualsOneWholeCacheOnEveryRank) {
  using Scalar = TypeParam;
  const double tolerance = std::is_same<Scalar, float>::value ? 1e-5 : 1e-12;
  for (const bool gqa_rotary : {false, true})
    for (const Eigen::Index window : {0, 5}) {
      mha::MultiHeadAttentionConfig c = mha_test::decoder_config(16, 4, gqa_rotary ? 2 : 0, 0, 0, 17);
      if (gqa_rotary) c = mha_test::rotary(c, mha::RotaryPairs::halves);
      c.bias = true;
      MultiHeadAttention<Scalar> module(c);
      for (auto& p : module.parameters())
        if (p.name[0] == 'b') p.value = mha_test::random_matrix<Scalar>(p.value.rows(), p.value.cols(), 3);
      mha::AttentionOptions options;
      options.window = window;
      const Eigen::Index T = 37;
      const Matrix<Scalar> x = mha_test::random_matrix<Scalar>(T, 16, 9);
      auto whole = module.make_cache();
      ShardedCache<Scalar> sharded(module, MPI_COMM_WORLD);
      bool all_close = true, all_same = true;
      for (Eigen::Index t = 0; t < T; ++t) {
        const Matrix<Scalar> expected = module.decode(x.row(t), whole, options);
        const Matrix<Scalar> got = sharded.decode(x.row(t), options);
        const auto close = mha_test::close(got, expected, tolerance);
        if (!close) ADD_FAILURE() << "step " << t << ": " << close.message();
        all_close = all_close && close;
        all_same = same_on_every_rank(got) && all_same;
      }
      EXPECT_TRUE(all_close) << "GQA and rotary " << gqa_rotary << ", window " << window;
      EXPECT_TRUE(all_same) << "GQA and rotary " << gqa_rotary << ", window " << window;
      // Round robin: every rank holds its share of the tokens.
      const int P = mha_test::world_size(), r = mha_test::world_rank();
      EXPECT_EQ(sharded.length(), T);
      EXPECT_EQ(sharded.shard_length(), (T - r + P - 1) / P);
    }
}

TEST(ShardedDecodeChecks, ADifferentTokenOnOneRankThrowsTheSameOnEveryRankAndChangesNothing) {
  const MultiHeadAttention<double> module(mha_test::config(8, 2, 0, 0, 1));
  ShardedCache<double> cache(module, MPI_COMM_WORLD);
  const Matrix<double> x = mha_test::random_matrix<double>(3, 8, 2);
  cache.decode(x.row(0));
  const bool odd = mha_test::world_rank() == mha_test::world_size() - 1;
  const std::string message = mha_test::error_of([&] { cache.decode(x.row(odd ? 2 : 1)); });
  const std::string width =
      mha_test::error_of([&] { cache.decode(odd ? Matrix<double>(x.row(1).leftCols(7)) : Matrix<double>(x.row(1))); });
  if (mha_test::world_size() > 1) {
    EXPECT_NE(message.find("the ranks disagree on x_new's entries"), std::string::npos) << message;
  }
  EXPECT_NE(width.find("x_new is 1 x 7 but d_model is 8"), std::string::npos) << width;
  EXPECT_EQ(cache.length(), 1 + (mha_test::world_size() > 1 ? 0 : 1));
}

}  // namespace
