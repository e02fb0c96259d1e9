// Decoding over a cache sharded across the ranks equals decoding over one whole cache, step by
// step, and every rank gets the same output, bit for bit; so does decoding after a prompt
// prefilled through ring attention, whose keys and values stay on the ranks that projected them.
#include <mha/distributed/sharded_cache.hpp>
#include <mha/mha.hpp>

#include "mpi_test_util.hpp"
#include "test_util.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

namespace {

using mha::MultiHeadAttention;
using mha::distributed::SequenceLayout;
using mha::distributed::ShardedCache;
using mha_test::is_odd_one_out;
using mha_test::LayoutKind;
using mha_test::Matrix;
using mha_test::Outcome;
using mha_test::outcome_of;

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

/// Decodes rows first … last − 1 of x, one a step, with one whole cache and with the sharded one:
/// a failure for each step whose outputs differ by more than `tolerance` (relative), all_close
/// false after any, and all_same false after any step whose output differs between ranks.
template <typename Scalar>
void decode_both(const MultiHeadAttention<Scalar>& module, mha::KVCache<Scalar>& whole, ShardedCache<Scalar>& sharded,
                 const Matrix<Scalar>& x, Eigen::Index first, Eigen::Index last, const mha::AttentionOptions& options,
                 double tolerance, bool& all_close, bool& all_same) {
  for (Eigen::Index t = first; t < last; ++t) {
    const Matrix<Scalar> expected = module.decode(x.row(t), whole, options);
    const Matrix<Scalar> got = sharded.decode(x.row(t), options);
    const auto close = mha_test::close(got, expected, tolerance);
    if (!close) ADD_FAILURE() << "step " << t << ": " << close.message();
    all_close = all_close && close;
    all_same = same_on_every_rank(got) && all_same;
  }
}

/// The shard length of every rank, by rank (collective).
std::vector<Eigen::Index> gathered_shard_lengths(Eigen::Index mine) {
  std::vector<long long> all(static_cast<std::size_t>(mha_test::world_size()));
  const long long n = mine;
  MPI_Allgather(&n, 1, MPI_LONG_LONG, all.data(), 1, MPI_LONG_LONG, MPI_COMM_WORLD);
  return std::vector<Eigen::Index>(all.begin(), all.end());
}

/// Biases of their own, not zero, for the module's projections.
template <typename Scalar>
void set_biases(MultiHeadAttention<Scalar>& module) {
  for (auto& p : module.parameters())
    if (p.name[0] == 'b') p.value = mha_test::random_matrix<Scalar>(p.value.rows(), p.value.cols(), 3);
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
      set_biases(module);
      mha::AttentionOptions options;
      options.window = window;
      const Eigen::Index T = 37;
      const Matrix<Scalar> x = mha_test::random_matrix<Scalar>(T, 16, 9);
      auto whole = module.make_cache();
      ShardedCache<Scalar> sharded(module, MPI_COMM_WORLD);
      bool all_close = true, all_same = true;
      decode_both(module, whole, sharded, x, 0, T, options, tolerance, all_close, all_same);
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

TYPED_TEST(ShardedDecode, APromptPrefilledThroughTheRingThenDecodedEqualsOneWholeCacheOnEveryRank) {
  using Scalar = TypeParam;
  const double tolerance = mha_test::ring_tolerance<Scalar>();
  const int P = mha_test::world_size(), rank = mha_test::world_rank();
  for (const bool gqa_rotary : {false, true}) {
    mha::MultiHeadAttentionConfig c = mha_test::decoder_config(16, 4, gqa_rotary ? 2 : 0, 0, 0, 17);
    if (gqa_rotary) c = mha_test::rotary(c, mha::RotaryPairs::interleaved);
    c.bias = true;
    MultiHeadAttention<Scalar> module(c);
    set_biases(module);
    // N = 600: several query blocks (256) and key tiles per rank, and a window that crosses ranks.
    for (const Eigen::Index N : {37, 600})
      for (const Eigen::Index window : {0, 5, 300})
        for (const LayoutKind kind : {LayoutKind::even, LayoutKind::uneven, LayoutKind::zigzag}) {
          mha::AttentionOptions options;
          options.window = window;
          const Eigen::Index T = 11;  // tokens decoded after the prompt
          const Matrix<Scalar> x = mha_test::random_matrix<Scalar>(N + T, 16, 9);
          const Matrix<Scalar> prompt = x.topRows(N);
          const SequenceLayout layout = mha_test::make_layout(kind, N, P);
          auto whole = module.make_cache();
          const Matrix<Scalar> expected_prompt = module.decode(prompt, whole, options);
          ShardedCache<Scalar> sharded(module, MPI_COMM_WORLD);
          const Matrix<Scalar> got_prompt = sharded.prefill(layout.local_rows(prompt, rank), layout, options);
          bool all_close = true, all_same = true;
          const auto prompt_close = mha_test::close(got_prompt, layout.local_rows(expected_prompt, rank), tolerance);
          if (!prompt_close) ADD_FAILURE() << "the prompt: " << prompt_close.message();
          all_close = mha_test::on_every_rank(static_cast<bool>(prompt_close));
          decode_both(module, whole, sharded, x, N, N + T, options, tolerance, all_close, all_same);
          const std::string what = std::string("GQA and rotary ") + (gqa_rotary ? "1" : "0") +
                                   ", N = " + std::to_string(N) + ", window " + std::to_string(window) + ", layout " +
                                   mha_test::name_of(kind);
          EXPECT_TRUE(all_close) << what;
          EXPECT_TRUE(all_same) << what;
          EXPECT_EQ(sharded.length(), N + T) << what;
        }
  }
}

TEST(ShardedDecodePrefill, EachRankKeepsItsPromptRowsAndNewTokensGoToTheSmallestShard) {
  const MultiHeadAttention<double> module(mha_test::config(8, 2, 0, 0, 1));
  const int P = mha_test::world_size(), rank = mha_test::world_rank();
  const Eigen::Index N = 37, T = 3 * P + 5;
  const Matrix<double> x = mha_test::random_matrix<double>(N + T, 8, 2);
  for (const LayoutKind kind : {LayoutKind::uneven, LayoutKind::zigzag}) {
    const SequenceLayout layout = mha_test::make_layout(kind, N, P);
    ShardedCache<double> cache(module, MPI_COMM_WORLD);
    cache.prefill(layout.local_rows(x.topRows(N), rank), layout);
    std::vector<Eigen::Index> expected(static_cast<std::size_t>(P));
    for (int r = 0; r < P; ++r) expected[static_cast<std::size_t>(r)] = layout.rows(r);
    EXPECT_EQ(gathered_shard_lengths(cache.shard_length()), expected) << mha_test::name_of(kind);
    EXPECT_EQ(cache.shard_lengths(), expected) << mha_test::name_of(kind);
    for (Eigen::Index t = N; t < N + T; ++t) {
      // The first of the ranks that hold the fewest tokens keeps the new one.
      ++*std::min_element(expected.begin(), expected.end());
      cache.decode(x.row(t));
      EXPECT_EQ(gathered_shard_lengths(cache.shard_length()), expected) << mha_test::name_of(kind) << ", step " << t;
    }
    EXPECT_EQ(cache.shard_lengths(), expected) << mha_test::name_of(kind);
  }
}

class ShardedPrefillChecks : public ::testing::Test {
 protected:
  const MultiHeadAttention<double> module{mha_test::config(8, 2, 0, 0, 3)};
  const Eigen::Index N = 40;
  const Matrix<double> x = mha_test::random_matrix<double>(N + 1, 8, 1);
  const Matrix<double> prompt = x.topRows(N);
  const SequenceLayout layout = SequenceLayout::zigzag(N, mha_test::world_size());
  ShardedCache<double> cache{module, MPI_COMM_WORLD};
  Matrix<double> local() const { return layout.local_rows(prompt, mha_test::world_rank()); }

  /// Whether the cache is still empty, on every rank, and the counts it keeps of each shard zero.
  bool still_empty() const {
    const std::vector<Eigen::Index> zeros(static_cast<std::size_t>(mha_test::world_size()), 0);
    return mha_test::on_every_rank(cache.length() == 0 && cache.shard_length() == 0 && cache.shard_lengths() == zeros);
  }
  /// After refused calls the cache must work: no rank has a message left in flight.
  void expect_prefill_and_decode_still_work() {
    auto whole = module.make_cache();
    const Matrix<double> expected = module.decode(prompt, whole);
    EXPECT_TRUE(
        mha_test::close(cache.prefill(local(), layout), layout.local_rows(expected, mha_test::world_rank()), 1e-12));
    EXPECT_TRUE(mha_test::close(cache.decode(x.row(N)), module.decode(x.row(N), whole), 1e-12));
  }
};

TEST_F(ShardedPrefillChecks, APrefillIntoANonEmptyCacheThrowsTheSameOnEveryRankAndChangesNothing) {
  auto whole = module.make_cache();
  module.decode(prompt, whole);
  cache.prefill(local(), layout);
  const std::vector<Eigen::Index> lengths = cache.shard_lengths();
  const Outcome o = outcome_of([&] { cache.prefill(local(), layout); });
  EXPECT_TRUE(o.same_everywhere) << o.message;
  EXPECT_NE(o.message.find("ShardedCache::prefill: the cache holds 40 tokens already; prefill fills an empty cache"),
            std::string::npos)
      << o.message;
  EXPECT_EQ(cache.length(), N);
  EXPECT_EQ(cache.shard_lengths(), lengths);
  EXPECT_EQ(cache.shard_length(), layout.rows(mha_test::world_rank()));
  // The cache still decodes as one whole cache of the prompt.
  EXPECT_TRUE(mha_test::close(cache.decode(x.row(N)), module.decode(x.row(N), whole), 1e-12));
}

TEST_F(ShardedPrefillChecks, AWrongShapeOnOneRankThrowsTheSameOnEveryRankAndChangesNothing) {
  const int last = mha_test::world_size() - 1;
  const Outcome width = outcome_of([&] {
    const Matrix<double> rows = local();
    cache.prefill(is_odd_one_out() ? Matrix<double>(rows.leftCols(7)) : rows, layout);
  });
  EXPECT_TRUE(width.same_everywhere) << width.message;
  EXPECT_NE(width.message.find("ShardedCache::prefill: x_local is " + std::to_string(layout.rows(last)) +
                               " x 7 but d_model is 8"),
            std::string::npos)
      << width.message;
  EXPECT_NE(width.message.find("(on rank " + std::to_string(last) + " of "), std::string::npos) << width.message;
  const Outcome rows = outcome_of([&] {
    const Matrix<double> mine = local();
    cache.prefill(is_odd_one_out() ? Matrix<double>(mine.topRows(mine.rows() - 1)) : mine, layout);
  });
  EXPECT_TRUE(rows.same_everywhere) << rows.message;
  EXPECT_NE(rows.message.find("but the layout gives this rank " + std::to_string(layout.rows(last)) + " rows"),
            std::string::npos)
      << rows.message;
  const SequenceLayout too_many = SequenceLayout::contiguous(N, mha_test::world_size() + 1);
  const Outcome ranks = outcome_of([&] { cache.prefill(local(), too_many); });
  EXPECT_TRUE(ranks.same_everywhere) << ranks.message;
  EXPECT_NE(ranks.message.find("spreads the sequence over " + std::to_string(mha_test::world_size() + 1) + " ranks"),
            std::string::npos)
      << ranks.message;
  EXPECT_TRUE(still_empty());
  expect_prefill_and_decode_still_work();
}

TEST_F(ShardedPrefillChecks, RanksThatDisagreeOnTheLayoutOrTheWindowThrowTheSameOnEveryRankAndChangeNothing) {
  if (mha_test::world_size() == 1) GTEST_SKIP() << "one rank cannot disagree with itself";
  const int P = mha_test::world_size();
  const SequenceLayout mine = is_odd_one_out() ? SequenceLayout::contiguous(N, P) : layout;
  const Outcome l = outcome_of(
      [&] { cache.prefill(mine.local_rows(prompt, mha_test::world_rank()), mine, mha::AttentionOptions{}); });
  EXPECT_TRUE(l.same_everywhere) << l.message;
  EXPECT_NE(l.message.find("ShardedCache::prefill: the ranks disagree on the query layout"), std::string::npos)
      << l.message;
  mha::AttentionOptions window;
  window.window = is_odd_one_out() ? 5 : 4;
  const Outcome w = outcome_of([&] { cache.prefill(local(), layout, window); });
  EXPECT_TRUE(w.same_everywhere) << w.message;
  EXPECT_NE(
      w.message.find("the ranks disagree on options.window: rank 0 has 4 and rank " + std::to_string(P - 1) + " has 5"),
      std::string::npos)
      << w.message;
  EXPECT_TRUE(still_empty());
  expect_prefill_and_decode_still_work();
}

TEST_F(ShardedPrefillChecks, OptionsDecodingCannotHonourAreRefusedOnEveryRankAndChangeNothing) {
  mha::AttentionOptions training;
  training.training = is_odd_one_out();
  const Outcome t = outcome_of([&] { cache.prefill(local(), layout, training); });
  EXPECT_TRUE(t.same_everywhere) << t.message;
  EXPECT_NE(t.message.find("ShardedCache::prefill: decoding is inference; options.training must be false"),
            std::string::npos)
      << t.message;
  mha::AttentionOptions padding;
  padding.key_padding_mask = mha::AttentionMask::blocked(Eigen::Matrix<bool, 1, Eigen::Dynamic>::Zero(N));
  const Outcome p = outcome_of([&] { cache.prefill(local(), layout, padding); });
  EXPECT_TRUE(p.same_everywhere) << p.message;
  EXPECT_NE(p.message.find("options.mask and options.key_padding_mask are not read when decoding"), std::string::npos)
      << p.message;
  EXPECT_TRUE(still_empty());
  expect_prefill_and_decode_still_work();
}

}  // namespace
