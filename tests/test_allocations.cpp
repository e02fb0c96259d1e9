// A decode step into a cache with room, and a forward into a workspace of the same shapes as the
// forward before, allocate nothing: every call to the heap (malloc and its kin, which operator new
// and Eigen call too) is counted while they run, after a first call has sized what they keep to
// work in. A server decoding for hours, or a control loop running the same forward at every tick,
// then neither fragments its heap nor waits on its lock. Not built under the sanitizers, which
// replace malloc.
#include "test_util.hpp"

#include <mha/mha.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdlib>

// glibc's own entry points, which the counting ones below forward to.
extern "C" {
void* __libc_malloc(std::size_t size);
void* __libc_calloc(std::size_t count, std::size_t size);
void* __libc_realloc(void* pointer, std::size_t size);
void* __libc_memalign(std::size_t alignment, std::size_t size);
}

namespace {
std::atomic<bool> counting{false};
std::atomic<long> allocations{0};
void count() {
  if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
}
}  // namespace

// Every allocation of the program goes through these (the executable's definitions come first).
extern "C" {
void* malloc(std::size_t size) {
  count();
  return __libc_malloc(size);
}
void* calloc(std::size_t count_, std::size_t size) {
  count();
  return __libc_calloc(count_, size);
}
void* realloc(void* pointer, std::size_t size) {
  count();
  return __libc_realloc(pointer, size);
}
void* memalign(std::size_t alignment, std::size_t size) {
  count();
  return __libc_memalign(alignment, size);
}
void* aligned_alloc(std::size_t alignment, std::size_t size) {
  count();
  return __libc_memalign(alignment, size);
}
int posix_memalign(void** pointer, std::size_t alignment, std::size_t size) {
  count();
  *pointer = __libc_memalign(alignment, size);
  return *pointer || size == 0 ? 0 : ENOMEM;
}
}

namespace {

using mha_test::decoder_config;
using mha_test::random_matrix;
using mha_test::rotary;
using Index = Eigen::Index;

/// The heap allocations of `steps` calls of step(t), t = 0 … steps − 1.
template <typename Step>
long allocations_of(Index steps, const Step& step) {
  allocations = 0;
  counting = true;
  for (Index t = 0; t < steps; ++t) step(t);
  counting = false;
  return allocations.load();
}

template <typename Scalar>
class DecodeAllocations : public ::testing::Test {
 protected:
  void TearDown() override { mha::set_num_threads(0); }
};
TYPED_TEST_SUITE(DecodeAllocations, mha_test::Scalars, mha_test::ScalarNames);

/// The counter counts: a step that returns a new matrix, and a cache that grows, allocate.
TYPED_TEST(DecodeAllocations, TheCounterSeesAllocations) {
  using Matrix = Eigen::Matrix<TypeParam, Eigen::Dynamic, Eigen::Dynamic>;
  const mha::MultiHeadAttention<TypeParam> attn(decoder_config(32, 4, 2, 0, 0, 1));
  auto cache = attn.make_cache();  // no max_length: grows by doubling
  const Matrix x = random_matrix<TypeParam>(1, 32, 2);
  EXPECT_GT(allocations_of(1, [&](Index) { Matrix y(1, 32); }), 0);
  EXPECT_GT(allocations_of(40, [&](Index) { attn.decode(x, cache); }), 40);
}

/// One token a step, into caches with room: multi-head, grouped-query with rotary and biases, a
/// window, caches of bfloat16 and half, a rolling cache, projection weights of bfloat16, a batch of
/// two sequences; on one thread
/// and on two, over more than a part of keys (the parts of 512 keys grow in number as it fills).
TYPED_TEST(DecodeAllocations, DecodeStepsIntoACacheWithRoomAllocateNothing) {
  using Matrix = Eigen::Matrix<TypeParam, Eigen::Dynamic, Eigen::Dynamic>;
  auto grouped = rotary(decoder_config(64, 8, 2, 0, 0, 3), mha::RotaryPairs::halves);
  grouped.bias = true;
  const mha::MultiHeadAttention<TypeParam> plain(decoder_config(64, 4, 0, 0, 0, 2)), gqa(grouped);
  const Matrix prompt = random_matrix<TypeParam>(600, 64, 4), token = random_matrix<TypeParam>(1, 64, 5),
               pair = random_matrix<TypeParam>(2, 64, 6);
  constexpr Index kSteps = 500, kRoom = 600 + kSteps + 1;
  for (const int threads : {1, 2}) {
    mha::set_num_threads(threads);
    SCOPED_TRACE(std::to_string(threads) + " threads");
    Matrix y;
    const auto expect_none = [&](const char* what, auto& attn, auto& cache, const mha::AttentionOptions& options) {
      attn.decode(prompt, cache, y, options);  // the prefill, and a first step, size what the steps keep
      attn.decode(token, cache, y, options);
      EXPECT_EQ(allocations_of(kSteps, [&](Index) { attn.decode(token, cache, y, options); }), 0) << what;
      EXPECT_EQ(y.rows(), 1);
      EXPECT_TRUE(y.allFinite()) << what;
    };
    {
      auto cache = plain.make_cache(1, kRoom);
      expect_none("multi-head", plain, cache, {});
    }
    {
      auto cache = gqa.make_cache(1, kRoom);
      expect_none("grouped-query, rotary, biases", gqa, cache, {});
    }
    {
      mha::AttentionOptions window;
      window.window = 100;
      auto cache = gqa.make_cache(1, kRoom);
      expect_none("a window of 100", gqa, cache, window);
      auto rolling = gqa.make_rolling_cache(100);
      expect_none("a rolling cache", gqa, rolling, window);
    }
    {
      auto bf16 = gqa.template make_cache<Eigen::bfloat16>(1, kRoom);
      expect_none("bfloat16", gqa, bf16, {});
      auto half = gqa.template make_cache<Eigen::half>(1, kRoom);
      expect_none("half", gqa, half, {});
    }
    {
      // Projection weights of bfloat16 (make_decode_weights), with a bfloat16 cache: one token
      // and a batch of two.
      const auto weights = gqa.template make_decode_weights<Eigen::bfloat16>();
      auto bf16 = gqa.template make_cache<Eigen::bfloat16>(1, kRoom);
      gqa.decode(prompt, bf16, weights, y);
      gqa.decode(token, bf16, weights, y);
      EXPECT_EQ(allocations_of(kSteps, [&](Index) { gqa.decode(token, bf16, weights, y); }), 0) << "bfloat16 weights";
      auto two = gqa.template make_cache<Eigen::bfloat16>(2, kRoom);
      const std::vector<Index> ones{1, 1};
      gqa.decode_batch(pair, ones, two, weights, y);
      gqa.decode_batch(pair, ones, two, weights, y);
      EXPECT_EQ(allocations_of(kSteps, [&](Index) { gqa.decode_batch(pair, ones, two, weights, y); }), 0)
          << "bfloat16 weights, a batch";
      EXPECT_TRUE(y.allFinite());
    }
    {
      auto cache = gqa.make_cache(2, kRoom);
      const std::vector<Index> ones{1, 1};
      gqa.decode_batch(pair, ones, cache, y);
      gqa.decode_batch(pair, ones, cache, y);
      EXPECT_EQ(allocations_of(kSteps, [&](Index) { gqa.decode_batch(pair, ones, cache, y); }), 0) << "a batch";
      EXPECT_EQ(y.rows(), 2);
    }
  }
}

/// Cross-attention steps (decode_cross) into a workspace the caller keeps, over a memory of more
/// than a part of keys: one sequence, a batch of two, a bfloat16 memory; on one thread and on two.
/// The returning form, which works in a workspace of its own, allocates every step.
TYPED_TEST(DecodeAllocations, CrossAttentionStepsIntoAWorkspaceAllocateNothing) {
  using Matrix = Eigen::Matrix<TypeParam, Eigen::Dynamic, Eigen::Dynamic>;
  auto grouped = decoder_config(64, 8, 2, 0, 0, 12);
  grouped.bias = true;
  const mha::MultiHeadAttention<TypeParam> attn(grouped);
  const Matrix encoded = random_matrix<TypeParam>(700, 64, 13), token = random_matrix<TypeParam>(1, 64, 14),
               pair = random_matrix<TypeParam>(2, 64, 15);
  const auto memory = attn.make_cross_cache(encoded);
  const auto bf16 = attn.template make_cross_cache<Eigen::bfloat16>(encoded);
  const auto two = attn.make_cross_cache(encoded, encoded, {300, 400});
  const std::vector<Index> ones{1, 1};
  constexpr Index kSteps = 200;
  for (const int threads : {1, 2}) {
    mha::set_num_threads(threads);
    SCOPED_TRACE(std::to_string(threads) + " threads");
    Matrix y;
    mha::CrossDecodeWorkspace<TypeParam> workspace;
    attn.decode_cross(token, memory, y, workspace);  // a first step sizes the workspace
    EXPECT_EQ(allocations_of(kSteps, [&](Index) { attn.decode_cross(token, memory, y, workspace); }), 0);
    EXPECT_EQ(y.rows(), 1);
    attn.decode_cross(token, bf16, y, workspace);
    EXPECT_EQ(allocations_of(kSteps, [&](Index) { attn.decode_cross(token, bf16, y, workspace); }), 0) << "bfloat16";
    attn.decode_cross_batch(pair, ones, two, y, workspace);
    EXPECT_EQ(allocations_of(kSteps, [&](Index) { attn.decode_cross_batch(pair, ones, two, y, workspace); }), 0)
        << "a batch";
    EXPECT_EQ(y.rows(), 2);
    EXPECT_TRUE(y.allFinite());
    EXPECT_GE(allocations_of(kSteps, [&](Index) { attn.decode_cross(token, memory); }), kSteps) << "returning form";
  }
}

/// The cross-attention step into a kept workspace gives the returning form's rows, bit for bit,
/// whatever the workspace held before (another memory's step, a batch's).
TYPED_TEST(DecodeAllocations, TheCrossOutFormGivesTheSameRows) {
  using Matrix = Eigen::Matrix<TypeParam, Eigen::Dynamic, Eigen::Dynamic>;
  const mha::MultiHeadAttention<TypeParam> attn(decoder_config(32, 4, 2, 0, 0, 16));
  const Matrix encoded = random_matrix<TypeParam>(90, 32, 17), x = random_matrix<TypeParam>(12, 32, 18);
  const auto memory = attn.make_cross_cache(encoded), two = attn.make_cross_cache(encoded, encoded, {40, 50});
  mha::CrossDecodeWorkspace<TypeParam> workspace;
  Matrix out;
  for (Index t = 0; t + 3 <= x.rows(); t += 3) {
    const Matrix tokens = x.middleRows(t, 3);
    attn.decode_cross(tokens, memory, out, workspace);
    ASSERT_TRUE((attn.decode_cross(tokens, memory).array() == out.array()).all()) << "tokens " << t;
    const std::vector<Index> split{1, 2};
    attn.decode_cross_batch(tokens, split, two, out, workspace);
    ASSERT_TRUE((attn.decode_cross_batch(tokens, split, two).array() == out.array()).all()) << "tokens " << t;
  }
}

/// Steps that run on two threads (wide heads: one token over 1600 keys is three threads' worth, as
/// in test_kv_cache) allocate nothing either: OpenMP keeps a team of two or more threads from one
/// region to the next (it is the team of one that it allocates each time, which is why a step that
/// runs on one thread never opens a region).
TYPED_TEST(DecodeAllocations, StepsOnTwoThreadsAllocateNothing) {
  MHA_TEST_SKIP_WITHOUT_OPENMP();
  using Matrix = Eigen::Matrix<TypeParam, Eigen::Dynamic, Eigen::Dynamic>;
  const mha::MultiHeadAttention<TypeParam> attn(decoder_config(64, 8, 2, 256, 256, 9));
  auto cache = attn.make_cache(1, 1700);
  const Matrix prompt = random_matrix<TypeParam>(1600, 64, 10), token = random_matrix<TypeParam>(1, 64, 11);
  Matrix y;
  mha::set_num_threads(2);
  attn.decode(prompt, cache, y);
  attn.decode(token, cache, y);
  mha::detail::largest_team() = 0;
  EXPECT_EQ(allocations_of(50, [&](Index) { attn.decode(token, cache, y); }), 0);
  EXPECT_EQ(mha::detail::largest_team(), 2);
}

/// What the steps keep changes no result: steps into the out form equal the returning form's.
TYPED_TEST(DecodeAllocations, TheOutFormGivesTheSameRows) {
  using Matrix = Eigen::Matrix<TypeParam, Eigen::Dynamic, Eigen::Dynamic>;
  const mha::MultiHeadAttention<TypeParam> attn(decoder_config(32, 4, 2, 0, 0, 7));
  auto a = attn.make_cache(), b = attn.make_cache();
  const Matrix x = random_matrix<TypeParam>(40, 32, 8);
  Matrix out;
  for (Index t = 0; t < x.rows(); ++t) {
    const Matrix token = x.row(t);
    const Matrix y = attn.decode(token, a);
    attn.decode(token, b, out);
    ASSERT_TRUE((y.array() == out.array()).all()) << "token " << t;
  }
}

}  // namespace

template <typename Scalar>
class ForwardAllocations : public ::testing::Test {
 protected:
  void TearDown() override { mha::set_num_threads(0); }
};
TYPED_TEST_SUITE(ForwardAllocations, mha_test::Scalars, mha_test::ScalarNames);

/// Forwards into a workspace, each after one of the same shapes: self-attention of 700 tokens (three
/// query blocks, two key blocks, more row blocks of the projections than a list keeps inline),
/// causal; grouped-query heads with rotary embeddings and biases, a window; cross-attention of other
/// key and value widths with add_bias_kv and add_zero_attn, an additive mask and boolean key padding; a
/// ragged batch; on one thread and on two.
TYPED_TEST(ForwardAllocations, ForwardsIntoAWorkspaceAllocateNothing) {
  using Matrix = Eigen::Matrix<TypeParam, Eigen::Dynamic, Eigen::Dynamic>;
  auto grouped = rotary(decoder_config(64, 8, 2, 0, 0, 3), mha::RotaryPairs::halves);
  grouped.bias = true;
  auto cross = mha_test::config(64, 4, 0, 0, 4);
  cross.kdim = 24;
  cross.vdim = 40;
  cross.add_bias_kv = true;
  cross.add_zero_attn = true;
  const mha::MultiHeadAttention<TypeParam> plain(mha_test::config(64, 4, 0, 0, 2)), gqa(grouped), crossing(cross);
  const Matrix x = random_matrix<TypeParam>(2100, 64, 4), query = random_matrix<TypeParam>(300, 64, 5),
               key = random_matrix<TypeParam>(530, 24, 6), value = random_matrix<TypeParam>(530, 40, 7);
  const Matrix mask = random_matrix<TypeParam>(300, 530, 8);
  const mha_test::BoolMatrix padding = mha_test::BoolMatrix::Constant(1, 530, false);
  mha::AttentionOptions causal, window, masked;
  causal.causal = true;
  window.window = 100;
  masked.mask = mha::AttentionMask::additive(mask);
  masked.key_padding_mask = mha::AttentionMask::blocked(padding);
  const std::vector<Index> lengths{700, 1, 1399};
  for (const int threads : {1, 2}) {
    mha::set_num_threads(threads);
    SCOPED_TRACE(std::to_string(threads) + " threads");
    Matrix y;
    mha::ForwardWorkspace<TypeParam> workspace;
    const auto expect_none = [&](const char* what, const auto& forward) {
      forward();  // sizes the workspace and y for these shapes
      mha::detail::largest_team() = 0;
      EXPECT_EQ(allocations_of(3, [&](Index) { forward(); }), 0) << what;
      EXPECT_TRUE(y.allFinite()) << what;
#ifdef _OPENMP
      EXPECT_EQ(mha::detail::largest_team(), threads) << what << ": ran on that many threads";
#endif
    };
    const auto tokens = x.topRows(700);
    expect_none("self-attention", [&] { plain.forward(tokens, y, workspace); });
    expect_none("causal", [&] { plain.forward(tokens, y, workspace, causal); });
    expect_none("grouped-query, rotary, biases, a window", [&] { gqa.forward(tokens, y, workspace, window); });
    expect_none("cross-attention, extra keys, masks",
                [&] { crossing.forward(query, key, value, y, workspace, masked); });
    expect_none("a ragged batch", [&] { gqa.forward_batch(x, lengths, y, workspace, causal); });
  }
}

/// The counter sees a forward that returns a new matrix, and one into a workspace that must grow.
TYPED_TEST(ForwardAllocations, TheCounterSeesForwardsThatAllocate) {
  using Matrix = Eigen::Matrix<TypeParam, Eigen::Dynamic, Eigen::Dynamic>;
  const mha::MultiHeadAttention<TypeParam> attn(mha_test::config(32, 4, 0, 0, 1));
  const Matrix x = random_matrix<TypeParam>(50, 32, 2), longer = random_matrix<TypeParam>(60, 32, 3);
  EXPECT_GT(allocations_of(1, [&](Index) { attn.forward(x); }), 0);
  Matrix y;
  mha::ForwardWorkspace<TypeParam> workspace;
  attn.forward(x, y, workspace);
  EXPECT_GT(allocations_of(1, [&](Index) { attn.forward(longer, y, workspace); }), 0);
}
