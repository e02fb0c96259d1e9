// The key/value cache: every decode step's outputs are the rows of forward(all tokens so far,
// causal) at its positions, for single tokens, chunks, prefills across the tiles and ragged
// batches; fixed capacity, truncate, reset, the cache's views and bytes; results bit-identical for
// any thread count; and the calls decoding rejects.
#include <mha/mha.hpp>

#include "decoding_util.hpp"
#include "reference/reference_attention.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using mha_test::all_alignments;
using mha_test::BoolMatrix;
using mha_test::causal_if;
using mha_test::decoder_config;
using mha_test::describe;
using mha_test::error_of;
using mha_test::Lengths;
using mha_test::make_module;
using mha_test::Matrix;
using mha_test::near;
using mha_test::random_matrix;
using mha_test::rotary;
using mha_test::stack;
using mha_test::total;
using mha_test::use_threads;
using Index = Eigen::Index;

/// Sequence b's cached keys (or values) of every key/value head side by side, length × h_kv·d:
/// what a decode step appended, for comparing whole caches.
template <typename Scalar, typename View>
Matrix<Scalar> side_by_side(const mha::KVCache<Scalar>& cache, Index b, const View& view) {
  Matrix<Scalar> all(cache.length(b), 0);
  for (Index j = 0; j < cache.kv_heads(); ++j) {
    const Matrix<Scalar> head = view(cache, b, j);
    Matrix<Scalar> wider(all.rows(), all.cols() + head.cols());
    wider << all, head;
    all = wider;
  }
  return all;
}
template <typename Scalar>
Matrix<Scalar> all_keys(const mha::KVCache<Scalar>& cache, Index b = 0) {
  return side_by_side(cache, b, [](const auto& c, Index s, Index j) { return c.keys(s, j); });
}
template <typename Scalar>
Matrix<Scalar> all_values(const mha::KVCache<Scalar>& cache, Index b = 0) {
  return side_by_side(cache, b, [](const auto& c, Index s, Index j) { return c.values(s, j); });
}

template <typename Scalar>
class KVCache : public ::testing::Test {
 protected:
  void TearDown() override { mha::set_num_threads(0); }
};
TYPED_TEST_SUITE(KVCache, mha_test::Scalars, mha_test::ScalarNames);

/// The configurations decoding is checked with: plain; multi-query with rotary; everything at once
/// (grouped-query attention, rotary halves, biases, a window); and head widths that are no number
/// of packets (d_k = 37, d_v = 87: the one-token kernel's blocks of four packets, single packets and
/// leftover numbers, in float and double, on every instruction set), three query heads a group.
struct DecodeCase {
  mha::MultiHeadAttentionConfig config;
  Index window;
};

std::vector<DecodeCase> decode_cases() {
  auto everything = rotary(decoder_config(32, 8, 2, 0, 0, 21), mha::RotaryPairs::halves, 500.0);
  everything.bias = true;
  return {{decoder_config(32, 8, 0, 0, 0, 20), 0},
          {rotary(decoder_config(32, 4, 1, 0, 0, 22), mha::RotaryPairs::interleaved), 0},
          {everything, 7},
          {everything, 300},
          {decoder_config(32, 6, 2, 37, 87, 23), 0}};
}

/// Decodes x in steps of the given sizes (the last one repeated until x ends) on a fresh cache and
/// checks each step's output against the rows of forward(x, causal) at its positions.
template <typename Scalar>
void expect_decode_equals_forward(const mha::MultiHeadAttention<Scalar>& attn, const Matrix<Scalar>& x,
                                  const Lengths& steps, Index window) {
  mha::AttentionOptions forward_options = causal_if(true);
  forward_options.window = window;
  const Matrix<Scalar> full = attn.forward(x, forward_options);
  mha::AttentionOptions decode_options;  // causal is implied
  decode_options.window = window;
  auto cache = attn.make_cache(1, 0);
  Index position = 0;
  for (std::size_t step = 0; position < x.rows(); ++step) {
    const Index n = std::min(steps[std::min(step, steps.size() - 1)], x.rows() - position);
    const Matrix<Scalar> y = attn.decode(x.middleRows(position, n), cache, decode_options);
    ASSERT_EQ(cache.length(), position + n);
    ASSERT_TRUE(near<Scalar>(y, full.middleRows(position, n), "decode against forward"))
        << "step " << step << ": tokens " << position << " to " << position + n - 1;
    position += n;
  }
}

TYPED_TEST(KVCache, DecodeStepsEqualTheFullCausalForward) {
  struct Pattern {
    const char* name;
    Index tokens;
    Lengths steps;
  };
  const Pattern patterns[] = {
      {"one token at a time", 45, {1}},
      {"chunks of 3", 50, {3}},
      {"chunks of 7", 60, {7}},
      {"chunks of 64", 200, {64}},
      {"a prefill, then single tokens", 130, {100, 1}},
      {"a prefill across the tiles, then single tokens", 700, {600, 1}},
      {"growing steps", 620, {1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233}},
  };
  for (const DecodeCase& c : decode_cases()) {
    const auto attn = make_module<TypeParam>(c.config);
    for (const Pattern& p : patterns) {
      SCOPED_TRACE(describe(c.config) + ", window " + std::to_string(c.window) + ": " + p.name);
      expect_decode_equals_forward(attn, random_matrix<TypeParam>(p.tokens, 32, p.tokens), p.steps, c.window);
    }
  }
}

TYPED_TEST(KVCache, EmptyStepChangesNothing) {
  const auto attn = make_module<TypeParam>(decoder_config(16, 4, 2));
  auto cache = attn.make_cache(1, 0);
  const Matrix<TypeParam> x = random_matrix<TypeParam>(5, 16, 1);
  attn.decode(x, cache);
  const Matrix<TypeParam> keys = all_keys(cache), values = all_values(cache);
  const Matrix<TypeParam> y = attn.decode(Matrix<TypeParam>(0, 16), cache);
  EXPECT_EQ(y.rows(), 0);
  EXPECT_EQ(y.cols(), 16);
  EXPECT_EQ(cache.length(), 5);
  EXPECT_EQ(all_keys(cache), keys);
  EXPECT_EQ(all_values(cache), values);
}

TYPED_TEST(KVCache, BatchedDecodeWithRaggedNewLengthsEqualsEachSequenceAlone) {
  for (const DecodeCase& c : decode_cases()) {
    const auto attn = make_module<TypeParam>(c.config);
    SCOPED_TRACE(describe(c.config) + ", window " + std::to_string(c.window));
    const std::vector<Lengths> rounds = {{3, 0, 5, 1}, {0, 0, 2, 7},   {1, 1, 1, 1}, {300, 0, 1, 2},
                                         {0, 0, 0, 0}, {1, 260, 0, 1}, {1, 1, 1, 1}, {2, 0, 1, 0}};
    const std::size_t B = 4;
    Lengths final_lengths(B, 0);
    for (const Lengths& round : rounds)
      for (std::size_t b = 0; b < B; ++b) final_lengths[b] += round[b];
    std::vector<Matrix<TypeParam>> tokens, expected;
    mha::AttentionOptions forward_options = causal_if(true);
    forward_options.window = c.window;
    for (std::size_t b = 0; b < B; ++b) {
      tokens.push_back(random_matrix<TypeParam>(final_lengths[b], 32, 100 + b));
      expected.push_back(attn.forward(tokens[b], forward_options));  // causal: row i depends on rows ≤ i only
    }
    auto cache = attn.make_cache(static_cast<Index>(B), 0);
    ASSERT_EQ(cache.sequences(), static_cast<Index>(B));
    mha::AttentionOptions decode_options;
    decode_options.window = c.window;
    Lengths position(B, 0);
    for (std::size_t round = 0; round < rounds.size(); ++round) {
      Matrix<TypeParam> stacked(total(rounds[round]), 32);
      Index row = 0;
      for (std::size_t b = 0; b < B; ++b) {
        stacked.middleRows(row, rounds[round][b]) = tokens[b].middleRows(position[b], rounds[round][b]);
        row += rounds[round][b];
      }
      const Matrix<TypeParam> y = attn.decode_batch(stacked, rounds[round], cache, decode_options);
      ASSERT_EQ(y.rows(), stacked.rows());
      row = 0;
      for (std::size_t b = 0; b < B; ++b) {
        const Index n = rounds[round][b];
        EXPECT_TRUE(near<TypeParam>(y.middleRows(row, n), expected[b].middleRows(position[b], n), "batched decode"))
            << "round " << round << ", sequence " << b;
        position[b] += n;
        row += n;
        EXPECT_EQ(cache.length(static_cast<Index>(b)), position[b]);
      }
    }
  }
}

TYPED_TEST(KVCache, FixedCapacityIsAnErrorWhenFullAndLeavesTheCacheUnchanged) {
  const auto attn = make_module<TypeParam>(rotary(decoder_config(16, 4, 2, 0, 0, 3), mha::RotaryPairs::interleaved));
  const Matrix<TypeParam> x = random_matrix<TypeParam>(10, 16, 1);
  const Matrix<TypeParam> full = attn.forward(x, causal_if(true));
  auto cache = attn.make_cache(1, 10);
  EXPECT_EQ(cache.max_length(), 10);
  attn.decode(x.topRows(8), cache);
  const Matrix<TypeParam> keys = all_keys(cache), values = all_values(cache);
  EXPECT_EQ(error_of([&] { attn.decode(random_matrix<TypeParam>(3, 16, 2), cache); }),
            "mha: KVCache: sequence 0 holds 8 of at most 10 tokens; 3 more do not fit (make the cache with a larger "
            "max_length, or truncate it)");
  EXPECT_EQ(cache.length(), 8);
  EXPECT_EQ(all_keys(cache), keys);
  EXPECT_EQ(all_values(cache), values);
  // It still decodes what fits, as if the failed step had never been tried.
  EXPECT_TRUE(near<TypeParam>(attn.decode(x.bottomRows(2), cache), full.bottomRows(2), "decode against forward"));
  EXPECT_EQ(cache.length(), 10);
  EXPECT_THROW(attn.decode(x.topRows(1), cache), mha::invalid_argument);
  EXPECT_EQ(cache.length(), 10);

  // In a batch, one sequence that would overflow rejects the whole step: no sequence changes.
  auto batch = attn.make_cache(2, 10);
  attn.decode_batch(random_matrix<TypeParam>(8, 16, 3), Lengths{4, 4}, batch);
  const Matrix<TypeParam> keys0 = all_keys(batch, 0), keys1 = all_keys(batch, 1);
  EXPECT_EQ(error_of([&] {
              attn.decode_batch(random_matrix<TypeParam>(9, 16, 4), Lengths{2, 7}, batch);
            }),
            "mha: KVCache: sequence 1 holds 4 of at most 10 tokens; 7 more do not fit (make the cache with a larger "
            "max_length, or truncate it)");
  EXPECT_EQ(batch.length(0), 4);
  EXPECT_EQ(batch.length(1), 4);
  EXPECT_EQ(all_keys(batch, 0), keys0);
  EXPECT_EQ(all_keys(batch, 1), keys1);
  attn.decode_batch(random_matrix<TypeParam>(12, 16, 5), Lengths{6, 6}, batch);
  EXPECT_EQ(batch.length(0), 10);
  EXPECT_EQ(batch.length(1), 10);
}

TYPED_TEST(KVCache, TruncateRollsBackForSpeculativeDecoding) {
  auto c = rotary(decoder_config(32, 8, 2, 0, 0, 4), mha::RotaryPairs::halves);
  c.bias = true;
  const auto attn = make_module<TypeParam>(c);
  mha::AttentionOptions o;
  o.window = 9;
  // 20 drafted tokens of which the first 12 are accepted, then 5 others follow them.
  const Matrix<TypeParam> draft = random_matrix<TypeParam>(20, 32, 1), next = random_matrix<TypeParam>(5, 32, 2);
  auto speculative = attn.make_cache(1, 0);
  attn.decode(draft.topRows(3), speculative, o);
  attn.decode(draft.bottomRows(17), speculative, o);
  speculative.truncate(12);
  EXPECT_EQ(speculative.length(), 12);
  auto straight = attn.make_cache(1, 0);
  attn.decode(draft.topRows(12), straight, o);
  EXPECT_TRUE(near<TypeParam>(all_keys(speculative), all_keys(straight), "truncate"));
  EXPECT_TRUE(near<TypeParam>(all_values(speculative), all_values(straight), "truncate"));
  const Matrix<TypeParam> after_rollback = attn.decode(next, speculative, o);
  EXPECT_TRUE(near<TypeParam>(attn.decode(next, straight, o), after_rollback, "truncate"));
  mha::AttentionOptions forward_options = causal_if(true);
  forward_options.window = 9;
  const Matrix<TypeParam> accepted = stack<TypeParam>(draft.topRows(12), next);
  EXPECT_TRUE(near<TypeParam>(after_rollback, attn.forward(accepted, forward_options).bottomRows(5), "truncate"));

  // Rolling back to the current length changes nothing; past it is an error.
  speculative.truncate(17);
  EXPECT_EQ(speculative.length(), 17);
  EXPECT_EQ(error_of([&] { speculative.truncate(18); }),
            "mha: KVCache::truncate: sequence 0 holds 17 tokens; cannot truncate it to 18");
  EXPECT_EQ(speculative.length(), 17);
  // Back to nothing: like a fresh cache.
  speculative.truncate(0);
  auto fresh = attn.make_cache(1, 0);
  EXPECT_TRUE(near<TypeParam>(attn.decode(accepted, speculative, o), attn.decode(accepted, fresh, o), "truncate"));

  // One sequence of a batch.
  auto batch = attn.make_cache(3, 0);
  const Matrix<TypeParam> tokens = random_matrix<TypeParam>(30, 32, 3);
  attn.decode_batch(tokens, Lengths{10, 10, 10}, batch, o);
  batch.truncate(1, 4);
  EXPECT_EQ(batch.length(0), 10);
  EXPECT_EQ(batch.length(1), 4);
  EXPECT_EQ(batch.length(2), 10);
  const Matrix<TypeParam> y = attn.decode_batch(next.topRows(3), Lengths{1, 1, 1}, batch, o);
  const Matrix<TypeParam> second = stack<TypeParam>(tokens.middleRows(10, 4), next.row(1));
  EXPECT_TRUE(near<TypeParam>(y.row(1), attn.forward(second, forward_options).bottomRows(1), "truncate"));
  EXPECT_THROW(batch.truncate(1, 6), mha::invalid_argument);
}

TYPED_TEST(KVCache, ResetEmptiesEverySequence) {
  const auto attn = make_module<TypeParam>(decoder_config(16, 4, 1, 0, 0, 5));
  auto cache = attn.make_cache(2, 0);
  const Matrix<TypeParam> x = random_matrix<TypeParam>(7, 16, 1);
  const Matrix<TypeParam> first = attn.decode_batch(x, Lengths{3, 4}, cache);
  cache.reset();
  EXPECT_EQ(cache.sequences(), 2);
  EXPECT_EQ(cache.length(0), 0);
  EXPECT_EQ(cache.length(1), 0);
  EXPECT_EQ(cache.keys(1, 0).rows(), 0);
  EXPECT_TRUE(near<TypeParam>(attn.decode_batch(x, Lengths{3, 4}, cache), first, "reset"));
}

TYPED_TEST(KVCache, ViewsHaveTheDocumentedShapesAndHoldTheProjectedKeysAndValues) {
  for (const bool with_rotary : {false, true}) {
    auto c = decoder_config(32, 8, 2, 4, 6, 6);
    c.bias = true;
    if (with_rotary) c = rotary(c, mha::RotaryPairs::halves, 100.0);
    const auto attn = make_module<TypeParam>(c);
    SCOPED_TRACE(describe(c));
    auto cache = attn.make_cache(2, 0);
    const Matrix<TypeParam> x = random_matrix<TypeParam>(8, 32, 1);
    attn.decode_batch(x.topRows(5), Lengths{2, 3}, cache);
    attn.decode_batch(x.bottomRows(3), Lengths{3, 0}, cache);  // sequence 0: rows 0, 1, 5, 6, 7
    ASSERT_EQ(cache.kv_heads(), 2);
    for (Index j = 0; j < 2; ++j) {
      ASSERT_EQ(cache.keys(0, j).rows(), 5);
      ASSERT_EQ(cache.keys(0, j).cols(), 4);
      ASSERT_EQ(cache.values(0, j).rows(), 5);
      ASSERT_EQ(cache.values(0, j).cols(), 6);
      ASSERT_EQ(cache.keys(1, j).rows(), 3);
      ASSERT_EQ(cache.values(1, j).cols(), 6);
      // Head-major: each head's tokens are one contiguous block.
      EXPECT_EQ(cache.keys(0, j).outerStride(), 4);
      EXPECT_EQ(cache.values(1, j).outerStride(), 6);
    }
    Matrix<TypeParam> tokens0(5, 32);
    tokens0 << x.topRows(2), x.bottomRows(3);
    const std::pair<Matrix<TypeParam>, Index> sequences[] = {{tokens0, 0}, {x.middleRows(2, 3), 1}};
    for (const auto& [tokens, b] : sequences)
      for (Index j = 0; j < 2; ++j) {
        Matrix<TypeParam> k_j = tokens * attn.w_k(j), v_j = tokens * attn.w_v(j);
        k_j.rowwise() += attn.b_k().segment(j * 4, 4);
        v_j.rowwise() += attn.b_v().segment(j * 6, 6);
        if (with_rotary) k_j = mha_reference::rotate<TypeParam>(k_j, 0, c.rotary_base, c.rotary_pairs);
        EXPECT_TRUE(near<TypeParam>(cache.keys(b, j), k_j, "cached keys and values"))
            << "sequence " << b << ", kv head " << j;
        EXPECT_TRUE(near<TypeParam>(cache.values(b, j), v_j, "cached keys and values"))
            << "sequence " << b << ", kv head " << j;
      }
  }
}

TYPED_TEST(KVCache, GroupedQueryAttentionShrinksTheCache) {
  const auto full = make_module<TypeParam>(decoder_config(64, 8, 8));
  const auto grouped = make_module<TypeParam>(decoder_config(64, 8, 2));
  const Matrix<TypeParam> x = random_matrix<TypeParam>(100, 64, 1);
  for (const Index max_length : {0, 256}) {
    auto full_cache = full.make_cache(3, max_length);
    auto grouped_cache = grouped.make_cache(3, max_length);
    full.decode_batch(x, Lengths{50, 0, 50}, full_cache);
    grouped.decode_batch(x, Lengths{50, 0, 50}, grouped_cache);
    EXPECT_EQ(full_cache.bytes(), 4 * grouped_cache.bytes()) << "max_length " << max_length;
    // At least the keys and values themselves: 100 tokens × h_kv · (d_k + d_v).
    EXPECT_GE(grouped_cache.bytes(), static_cast<std::size_t>(100 * 2 * (8 + 8)) * sizeof(TypeParam));
    if (max_length > 0) {
      EXPECT_GE(grouped_cache.bytes(), static_cast<std::size_t>(3 * 256 * 2 * (8 + 8)) * sizeof(TypeParam));
    }
  }
}

TYPED_TEST(KVCache, DecodeIsBitIdenticalForAnyThreadCount) {
  MHA_TEST_SKIP_WITHOUT_OPENMP();
  // One new token over n cached ones costs 2·(n + 1)·(d_k + d_v) flops per head (attention_flops),
  // and runs on t threads from t · kMinFlopsPerThread: with 8 heads of d_k = d_v = 256, 1600 cached
  // tokens are 13 Mflop, three threads' worth (at d_k = d_v = 8 it would take 47 000). Wide heads
  // rather than a long cache, since the causal forward that checks the result grows with n².
  constexpr Index n = 1600, heads = 8, width = 256;
  static_assert(2.0 * (n + 1) * heads * (2 * width) >= 3 * mha::detail::kMinFlopsPerThread,
                "one new token over the cache must be three threads' worth");
  const auto attn =
      make_module<TypeParam>(rotary(decoder_config(64, heads, 2, width, width, 8), mha::RotaryPairs::interleaved));
  const Matrix<TypeParam> x = random_matrix<TypeParam>(n + 5, 64, 1);
  for (const Index window : {0, 1000}) {
    mha::AttentionOptions forward_options = causal_if(true), o;
    forward_options.window = o.window = window;
    const Matrix<TypeParam> full = attn.forward(x, forward_options);
    auto cache = attn.make_cache(1, 0);
    attn.decode(x.topRows(n), cache, o);
    for (const Index new_tokens : {1, 5}) {
      std::vector<Matrix<TypeParam>> outputs;
      for (const int threads : {1, 2, 3}) {
        use_threads(threads);
        outputs.push_back(attn.decode(x.middleRows(n, new_tokens), cache, o));
        EXPECT_EQ(mha::detail::largest_team(), threads) << new_tokens << " new, window " << window;
        cache.truncate(n);
      }
      mha::set_num_threads(0);
      EXPECT_TRUE((outputs[0].array() == outputs[1].array()).all()) << new_tokens << " new, window " << window;
      EXPECT_TRUE((outputs[0].array() == outputs[2].array()).all()) << new_tokens << " new, window " << window;
      EXPECT_TRUE(near<TypeParam>(outputs[0], full.middleRows(n, new_tokens), "decode over a long cache"))
          << new_tokens << " new, window " << window;
    }
  }
}

TYPED_TEST(KVCache, DecodeRejectsWhatItCannotDo) {
  const auto attn = make_module<TypeParam>(decoder_config(8, 2, 1));
  const Matrix<TypeParam> x = random_matrix<TypeParam>(3, 8, 1);
  auto cache = attn.make_cache(1, 0);
  const BoolMatrix blocked = BoolMatrix::Constant(3, 3, false);
  mha::AttentionOptions masked;
  masked.mask = mha::AttentionMask::blocked(blocked);
  const std::string not_read =
      "mha: MultiHeadAttention::decode: options.mask and options.key_padding_mask are not read when decoding "
      "(decoding is causal by construction); leave them empty";
  EXPECT_EQ(error_of([&] { attn.decode(x, cache, masked); }), not_read);
  const Eigen::Matrix<bool, 1, Eigen::Dynamic> padding = Eigen::Matrix<bool, 1, Eigen::Dynamic>::Constant(3, false);
  mha::AttentionOptions padded;
  padded.key_padding_mask = mha::AttentionMask::blocked(padding);
  EXPECT_EQ(error_of([&] { attn.decode(x, cache, padded); }), not_read);
  mha::AttentionOptions training;
  training.training = true;
  EXPECT_EQ(error_of([&] { attn.decode(x, cache, training); }),
            "mha: MultiHeadAttention::decode: decoding is inference; options.training must be false");
  EXPECT_EQ(error_of([&] { attn.decode(random_matrix<TypeParam>(3, 7, 1), cache); }),
            "mha: MultiHeadAttention::decode: x is 3 x 7 but d_model is 8; x needs 8 columns");
  EXPECT_EQ(error_of([&] {
              attn.decode_batch(x, Lengths{1, 2}, cache);
            }),
            "mha: MultiHeadAttention::decode_batch: new_lengths has 2 sequences but the cache holds 1");
  auto two = attn.make_cache(2, 0);
  EXPECT_EQ(error_of([&] {
              attn.decode_batch(x, Lengths{1, 1}, two);
            }),
            "mha: MultiHeadAttention::decode_batch: new_lengths add up to 2 but x has 3 rows");
  EXPECT_EQ(error_of([&] {
              attn.decode_batch(x, Lengths{4, -1}, two);
            }),
            "mha: MultiHeadAttention::decode_batch: sequence lengths must be >= 0, got -1");
  EXPECT_EQ(error_of([&] { attn.decode(x, two); }),
            "mha: MultiHeadAttention::decode: the cache holds 2 sequences; decode_batch takes the new tokens of each");
  EXPECT_EQ(cache.length(), 0);
  EXPECT_EQ(two.length(0), 0);
  EXPECT_EQ(two.length(1), 0);

  for (const bool bias_kv : {true, false}) {
    auto c = decoder_config(8, 2, 1);
    c.add_bias_kv = bias_kv;
    c.add_zero_attn = !bias_kv;
    const mha::MultiHeadAttention<TypeParam> extra(c);
    EXPECT_EQ(error_of([&] {
                auto extra_cache = extra.make_cache(1, 0);
                extra.decode(x, extra_cache);
              }),
              "mha: MultiHeadAttention::decode: a module with add_bias_kv or add_zero_attn cannot decode with a cache")
        << (bias_kv ? "add_bias_kv" : "add_zero_attn");
  }
  // A cache belongs to modules of one shape.
  const auto other = make_module<TypeParam>(decoder_config(8, 2, 2));
  auto other_cache = other.make_cache(1, 0);
  EXPECT_EQ(
      error_of([&] { attn.decode(x, other_cache); }),
      "mha: MultiHeadAttention::decode: the cache was made for a module of another shape (d_model 8, num_heads 2, "
      "d_k 4, d_v 4, kdim 8, vdim 8) than this one (d_model 8, num_heads 2, num_kv_heads 1, d_k 4, d_v 4, kdim 8, "
      "vdim 8); use make_cache()");
  EXPECT_EQ(other_cache.length(), 0);
  // And to modules that turn the keys alike: a cache holds rotated keys.
  auto rotating = decoder_config(8, 2, 1);
  rotating.rotary = true;
  const auto rotary = make_module<TypeParam>(rotating);
  auto rotated_cache = rotary.make_cache(1, 0);
  EXPECT_EQ(
      error_of([&] { attn.decode(x, rotated_cache); }),
      "mha: MultiHeadAttention::decode: the cache was made for a module of another shape (d_model 8, num_heads 2, "
      "num_kv_heads 1, d_k 4, d_v 4, kdim 8, vdim 8, rotary interleaved base 10000) than this one (d_model 8, "
      "num_heads 2, num_kv_heads 1, d_k 4, d_v 4, kdim 8, vdim 8); use make_cache()");
  EXPECT_EQ(rotated_cache.length(), 0);
}

// Decoding is self-attention: the new tokens are the queries, the keys and the values at once.
TYPED_TEST(KVCache, ModulesWithOtherKeyOrValueWidthsCannotDecode) {
  auto c = decoder_config(8, 2, 1);
  c.kdim = 5;
  c.vdim = 7;
  const mha::MultiHeadAttention<TypeParam> attn(c);
  auto cache = attn.make_cache(1, 0);
  EXPECT_EQ(error_of([&] { attn.decode(random_matrix<TypeParam>(3, 8, 1), cache); }),
            "mha: MultiHeadAttention::decode: decoding is self-attention, so kdim and vdim must equal d_model = 8; "
            "this module has kdim = 5 and vdim = 7");
  EXPECT_EQ(cache.length(), 0);
}

TYPED_TEST(KVCache, BadCacheArgumentsAreRejected) {
  const auto attn = make_module<TypeParam>(decoder_config(8, 2, 1));
  EXPECT_EQ(error_of([&] { attn.make_cache(0, 0); }), "mha: KVCache: sequences must be >= 1, got 0");
  EXPECT_EQ(error_of([&] { attn.make_cache(1, -1); }), "mha: KVCache: max_length must be >= 0 (0 = no limit), got -1");
  auto cache = attn.make_cache(2, 0);
  attn.decode_batch(random_matrix<TypeParam>(3, 8, 1), Lengths{1, 2}, cache);
  EXPECT_EQ(error_of([&] { cache.truncate(-1); }),
            "mha: KVCache::truncate: sequence 0 holds 1 tokens; cannot truncate it to -1");
  EXPECT_EQ(error_of([&] { cache.truncate(2, 0); }),
            "mha: KVCache::truncate: sequence 2 out of range; the cache holds 2 sequences");
  EXPECT_EQ(error_of([&] { cache.keys(2, 0); }),
            "mha: KVCache::keys: sequence 2 out of range; the cache holds 2 sequences");
  EXPECT_EQ(error_of([&] { cache.values(-1, 0); }),
            "mha: KVCache::values: sequence -1 out of range; the cache holds 2 sequences");
  EXPECT_EQ(error_of([&] { cache.keys(0, cache.kv_heads()); }),
            "mha: KVCache::keys: kv_head " + std::to_string(cache.kv_heads()) + " out of range; the cache holds " +
                std::to_string(cache.kv_heads()) + " key/value heads");
  EXPECT_EQ(error_of([&] { cache.values(1, -1); }), "mha: KVCache::values: kv_head -1 out of range; the cache holds " +
                                                        std::to_string(cache.kv_heads()) + " key/value heads");
  EXPECT_EQ(error_of([&] { cache.length(5); }),
            "mha: KVCache::length: sequence 5 out of range; the cache holds 2 sequences");
  EXPECT_EQ(cache.length(0), 1);
  EXPECT_EQ(cache.length(1), 2);
}

// Decoding is causal with bottom-right alignment whatever the options say; the scale is honoured.
TYPED_TEST(KVCache, DecodeIgnoresCausalAndAlignmentAndHonoursTheScale) {
  const auto attn = make_module<TypeParam>(rotary(decoder_config(16, 4, 2, 0, 0, 2), mha::RotaryPairs::interleaved));
  const Matrix<TypeParam> x = random_matrix<TypeParam>(30, 16, 1);
  mha::AttentionOptions forward_options = causal_if(true);
  forward_options.scale = 0.3;
  const Matrix<TypeParam> full = attn.forward(x, forward_options);
  for (const auto& o : all_alignments()) {
    mha::AttentionOptions decode_options = o;
    decode_options.scale = 0.3;
    auto cache = attn.make_cache(1, 0);
    attn.decode(x.topRows(20), cache, decode_options);
    EXPECT_TRUE(near<TypeParam>(attn.decode(x.bottomRows(10), cache, decode_options), full.bottomRows(10),
                                "decode against forward"))
        << describe(o);
  }
}

// The step is 77 Mflop by attention_flops (mostly sequence 1's 300 tokens over 1000), many threads'
// worth of kMinFlopsPerThread.
TYPED_TEST(KVCache, BatchedDecodeIsBitIdenticalForAnyThreadCount) {
  MHA_TEST_SKIP_WITHOUT_OPENMP();
  const auto attn = make_module<TypeParam>(rotary(decoder_config(64, 8, 2, 0, 0, 9), mha::RotaryPairs::halves));
  const Matrix<TypeParam> prompt = random_matrix<TypeParam>(1300 + 700 + 2, 64, 1),
                          step = random_matrix<TypeParam>(1 + 300 + 8, 64, 2);
  mha::AttentionOptions o;
  o.window = 600;
  auto cache = attn.make_cache(3, 0);
  attn.decode_batch(prompt, Lengths{1300, 700, 2}, cache, o);
  std::vector<Matrix<TypeParam>> outputs;
  for (const int threads : {1, 2, 3}) {
    use_threads(threads);
    outputs.push_back(attn.decode_batch(step, Lengths{1, 300, 8}, cache, o).eval());
    EXPECT_EQ(mha::detail::largest_team(), threads);
    cache.truncate(0, 1300);
    cache.truncate(1, 700);
    cache.truncate(2, 2);
  }
  mha::set_num_threads(0);
  EXPECT_TRUE((outputs[0].array() == outputs[1].array()).all());
  EXPECT_TRUE((outputs[0].array() == outputs[2].array()).all());
  // And right: sequence 1's 300 new tokens after its 700.
  mha::AttentionOptions forward_options = causal_if(true);
  forward_options.window = 600;
  const Matrix<TypeParam> second = stack<TypeParam>(prompt.middleRows(1300, 700), step.middleRows(1, 300));
  EXPECT_TRUE(near<TypeParam>(outputs[0].middleRows(1, 300), attn.forward(second, forward_options).bottomRows(300),
                              "batched decode"));
}

}  // namespace

namespace {

// ---- The cross-attention memory (make_cross_cache, decode_cross) ----

TYPED_TEST(KVCache, CrossAttentionStepsEqualTheForwardOverTheMemory) {
  // Decoder tokens decoded in steps of 1, 3, 1 and 4 against memories of 1 key, 7, and 600 (past
  // the 512 keys of a part, so that one token's keys are split and merged): the stacked outputs
  // are forward(all tokens, memory, memory)'s rows, and the memory never changes.
  auto grouped = decoder_config(32, 8, 2, 4, 6, 5);
  grouped.bias = true;
  auto widths = decoder_config(16, 4, 4, 0, 0, 6);  // keys and values of other widths than d_model
  widths.kdim = 12;
  widths.vdim = 10;
  for (const auto& c : {grouped, widths})
    for (const Index S : {1, 7, 600}) {
      const auto attn = make_module<TypeParam>(c);
      SCOPED_TRACE(describe(c) + ", memory of " + std::to_string(S));
      const Matrix<TypeParam> memory_key = random_matrix<TypeParam>(S, attn.kdim(), 1);
      const Matrix<TypeParam> memory_value =
          attn.kdim() == attn.vdim() ? memory_key : random_matrix<TypeParam>(S, attn.vdim(), 2);
      const Matrix<TypeParam> x = random_matrix<TypeParam>(9, c.d_model, 3);
      const auto memory = attn.make_cross_cache(memory_key, memory_value);
      ASSERT_EQ(memory.length(), S);
      Matrix<TypeParam> steps(0, c.d_model);
      Index row = 0;
      for (const Index n : {1, 3, 1, 4}) {
        steps = stack<TypeParam>(steps, attn.decode_cross(x.middleRows(row, n), memory));
        row += n;
      }
      EXPECT_EQ(memory.length(), S);
      EXPECT_TRUE(near<TypeParam>(steps, attn.forward(x, memory_key, memory_value), "cross-attention decode"));
    }
}

TYPED_TEST(KVCache, CrossAttentionBatchEqualsEachSequenceAlone) {
  const auto attn = make_module<TypeParam>(decoder_config(16, 4, 2));
  const Matrix<TypeParam> memory = random_matrix<TypeParam>(5 + 513, 16, 1), x = random_matrix<TypeParam>(3, 16, 2);
  const auto batch = attn.make_cross_cache(memory, memory, Lengths{5, 513});
  const Matrix<TypeParam> both = attn.decode_cross_batch(x, Lengths{1, 2}, batch);
  const auto first = attn.make_cross_cache(Matrix<TypeParam>(memory.topRows(5)));
  const auto second = attn.make_cross_cache(Matrix<TypeParam>(memory.bottomRows(513)));
  EXPECT_TRUE(near<TypeParam>(
      both, stack<TypeParam>(attn.decode_cross(x.topRows(1), first), attn.decode_cross(x.bottomRows(2), second)),
      "cross-attention batch"));
}

TYPED_TEST(KVCache, CrossAttentionMemoryRefusesWhatItCannotDo) {
  const auto attn = make_module<TypeParam>(decoder_config(16, 4, 2));
  const Matrix<TypeParam> memory = random_matrix<TypeParam>(6, 16, 1), x = random_matrix<TypeParam>(1, 16, 2);
  auto cross = attn.make_cross_cache(memory);
  EXPECT_EQ(error_of([&] { attn.decode(x, cross); }),
            "mha: MultiHeadAttention::decode: the cache holds a cross-attention memory (make_cross_cache), which "
            "decode_cross reads and nothing appends to; decode appends to a cache made with make_cache()");
  EXPECT_EQ(cross.length(), 6);
  auto self = attn.make_cache();
  attn.decode(x, self);
  const std::string not_a_memory =
      "mha: MultiHeadAttention::decode_cross: the cache is not a cross-attention memory of this module; make it with "
      "this module's make_cross_cache()";
  EXPECT_EQ(error_of([&] { attn.decode_cross(x, self); }), not_a_memory);
  const auto other = make_module<TypeParam>(decoder_config(16, 4, 2));
  EXPECT_EQ(error_of([&] { other.decode_cross(x, cross); }), not_a_memory);
  EXPECT_EQ(error_of([&] { attn.decode_cross(x, cross, causal_if(true)); }),
            "mha: MultiHeadAttention::decode_cross: cross-attention decoding sees the whole memory: options.mask, "
            "options.key_padding_mask, options.window and options.causal must be left unset");
  EXPECT_EQ(error_of([&] { attn.make_cross_cache(Matrix<TypeParam>(6, 15)); }),
            "mha: MultiHeadAttention::make_cross_cache: memory_key is 6 x 15 but kdim is 16; memory_key needs 16 "
            "columns");
  EXPECT_EQ(error_of([&] {
              attn.make_cross_cache(memory, memory, Lengths{6, 0});
            }),
            "mha: MultiHeadAttention::make_cross_cache: sequence 1 has an empty memory; every query needs a key to "
            "attend to");
  const auto turning = make_module<TypeParam>(rotary(decoder_config(16, 4, 2), mha::RotaryPairs::halves));
  EXPECT_EQ(error_of([&] { turning.make_cross_cache(memory); }),
            "mha: MultiHeadAttention::make_cross_cache: this module turns queries and keys by their positions "
            "(rotary), which a cross-attention memory does not share with the decoder's tokens");
}

}  // namespace

// ---- Reduced-precision storage: bfloat16 and half ----

/// ‖actual − expected‖∞ / ‖expected‖∞ no larger than `bound`, recorded under `what`.
template <typename Scalar, typename A, typename B>
::testing::AssertionResult within(const Eigen::MatrixBase<A>& actual, const Eigen::MatrixBase<B>& expected,
                                  double bound, const std::string& what) {
  const double error = mha_test::relative_error(actual, expected);
  double& largest = mha_test::ErrorReport::largest()[what + " (" + mha_test::scalar_name<Scalar>() + ")"];
  largest = std::max(largest, error);
  if (error <= bound) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": relative error " << error << " > " << bound;
}

/// The configurations reduced storage is checked with: narrow heads (d_k = 8, fewer numbers than a
/// packet) with rotary halves and biases, and heads of 64 and of 40 numbers (whole packets, and
/// packets with a tail, on every instruction set) with two query heads a group.
std::vector<mha::MultiHeadAttentionConfig> reduced_storage_cases() {
  auto narrow = rotary(decoder_config(64, 8, 2, 0, 0, 31), mha::RotaryPairs::halves);
  narrow.bias = true;
  return {narrow, decoder_config(128, 2, 1, 0, 0, 32), decoder_config(64, 4, 2, 40, 40, 33)};
}

/// For a module of configuration c: a prefill of 1500 tokens (three parts of 512 keys), a chunk of
/// 3, then 40 single tokens, decoded into caches of Scalar and of Storage: their outputs stay within `bound` of each
/// other at every step, and the reduced cache holds exactly the Scalar cache's numbers rounded to Storage, in half its
/// bytes.
template <typename Scalar, typename Storage>
void expect_reduced_storage_close(const mha::MultiHeadAttentionConfig& c, double bound, const char* what) {
  const auto attn = make_module<Scalar>(c);
  const Matrix<Scalar> x = random_matrix<Scalar>(1543, c.d_model, 7);
  auto exact = attn.make_cache();
  auto reduced = attn.template make_cache<Storage>();
  static_assert(std::is_same<typename decltype(reduced)::StorageType, Storage>::value);
  Lengths steps{1500, 3};
  steps.resize(steps.size() + 40, 1);
  Index position = 0;
  for (const Index n : steps) {
    const Matrix<Scalar> y = attn.decode(x.middleRows(position, n), exact);
    ASSERT_TRUE(within<Scalar>(attn.decode(x.middleRows(position, n), reduced), y, bound, what))
        << "tokens " << position << " to " << position + n - 1;
    position += n;
  }
  ASSERT_EQ(reduced.length(), x.rows());
  for (Index j = 0; j < reduced.kv_heads(); ++j) {
    const auto keys = reduced.keys(0, j), values = reduced.values(0, j);
    const Matrix<Scalar> exact_keys = exact.keys(0, j), exact_values = exact.values(0, j);
    ASSERT_EQ(keys.rows(), exact_keys.rows());
    for (Index r = 0; r < keys.rows(); ++r)
      for (Index col = 0; col < keys.cols(); ++col) {
        ASSERT_EQ(static_cast<float>(keys(r, col)), static_cast<float>(static_cast<Storage>(exact_keys(r, col))));
        ASSERT_EQ(static_cast<float>(values(r, col)), static_cast<float>(static_cast<Storage>(exact_values(r, col))));
      }
  }
  EXPECT_EQ(reduced.bytes() * sizeof(Scalar), exact.bytes() * sizeof(Storage));
}

/// The same, for each of reduced_storage_cases().
template <typename Scalar, typename Storage>
void expect_reduced_storage_close(double bound, const char* what) {
  for (const mha::MultiHeadAttentionConfig& c : reduced_storage_cases()) {
    SCOPED_TRACE(describe(c));
    expect_reduced_storage_close<Scalar, Storage>(c, bound, what);
  }
}

TYPED_TEST(KVCache, BFloat16CacheStaysWithinItsRoundingOfTheExactCache) {
  expect_reduced_storage_close<TypeParam, Eigen::bfloat16>(1e-2, "bfloat16 cache against the exact one");
}

TYPED_TEST(KVCache, HalfCacheStaysWithinItsRoundingOfTheExactCache) {
  expect_reduced_storage_close<TypeParam, Eigen::half>(2e-3, "half cache against the exact one");
}

TYPED_TEST(KVCache, ReducedStorageIsReallyReduced) {
  // The bounds above are not met by accident: bfloat16 is measurably coarser than half, and half
  // than the exact cache (so a cache that silently kept Scalar, or rounded to bfloat16 when asked
  // for half, would fail here).
  const auto attn = make_module<TypeParam>(decoder_config(32, 4, 4, 0, 0, 8));
  const Matrix<TypeParam> x = random_matrix<TypeParam>(300, 32, 9);
  auto exact = attn.make_cache();
  auto half = attn.template make_cache<Eigen::half>();
  auto bf16 = attn.template make_cache<Eigen::bfloat16>();
  const Matrix<TypeParam> y = attn.decode(x, exact);
  const double half_error = mha_test::relative_error(attn.decode(x, half), y);
  const double bf16_error = mha_test::relative_error(attn.decode(x, bf16), y);
  EXPECT_GT(half_error, 1e-6);
  EXPECT_GT(bf16_error, 2 * half_error);
}

TYPED_TEST(KVCache, ReducedPrecisionCrossAttentionMemory) {
  const auto attn = make_module<TypeParam>(decoder_config(32, 8, 2, 0, 0, 10));
  const Matrix<TypeParam> memory = random_matrix<TypeParam>(700, 32, 1), x = random_matrix<TypeParam>(5, 32, 2);
  const Matrix<TypeParam> expected = attn.forward(x, memory, memory);
  EXPECT_TRUE(within<TypeParam>(attn.decode_cross(x, attn.template make_cross_cache<Eigen::bfloat16>(memory)), expected,
                                1e-2, "bfloat16 cross-attention memory"));
  EXPECT_TRUE(within<TypeParam>(attn.decode_cross(x, attn.template make_cross_cache<Eigen::half>(memory)), expected,
                                2e-3, "half cross-attention memory"));
}

TEST(KVCacheStorage, ConversionRoundsToNearestAndConvertsBackExactly) {
  // convert() is the vectorised path where Eigen has one (AVX2, AVX-512) and the scalar rounding
  // elsewhere: both give Eigen's own float <-> bfloat16 / half conversions, across a packet's edge.
  std::vector<float> from(37);
  for (std::size_t i = 0; i < from.size(); ++i) from[i] = std::ldexp(1.0f + static_cast<float>(i) / 37.0f, int(i) - 18);
  std::vector<Eigen::bfloat16> bf16(from.size());
  std::vector<Eigen::half> half(from.size());
  std::vector<float> back(from.size());
  for (std::size_t i = 0; i < from.size(); ++i) {
    bf16[i] = Eigen::bfloat16(from[i]);
    half[i] = Eigen::half(from[i]);
  }
  mha::detail::convert(bf16.data(), static_cast<Index>(bf16.size()), back.data());
  for (std::size_t i = 0; i < from.size(); ++i) EXPECT_EQ(back[i], static_cast<float>(bf16[i])) << i;
  mha::detail::convert(half.data(), static_cast<Index>(half.size()), back.data());
  for (std::size_t i = 0; i < from.size(); ++i) EXPECT_EQ(back[i], static_cast<float>(half[i])) << i;
  std::vector<double> wide(from.size());
  mha::detail::convert(bf16.data(), static_cast<Index>(bf16.size()), wide.data());
  for (std::size_t i = 0; i < from.size(); ++i) EXPECT_EQ(wide[i], static_cast<double>(static_cast<float>(bf16[i])));
}

/// attend_to_part over rows of Storage (converted as they are loaded) gives what it gives over the
/// same rows converted to Scalar first, to a few units of Scalar's last place (the packets agree bit
/// for bit; in the leftover numbers the compiler may fuse a multiply-add in one instantiation and
/// not in the other), for head widths of whole packets, packets
/// with tails and less than a packet, parts of 1 to 512 keys, and groups of one to eight query
/// heads (the kernels' blocks of four, two and one).
template <typename Scalar, typename Storage>
void expect_part_reads_rows_as_converted() {
  struct Shape {
    Index group, d_k, d_v;
  };
  for (const Shape shape :
       {Shape{1, 64, 64}, Shape{3, 37, 87}, Shape{2, 16, 128}, Shape{1, 5, 3}, Shape{4, 64, 64}, Shape{8, 37, 87}})
    for (const Index n : {1, 3, 63, 64, 65, 512}) {
      SCOPED_TRACE(::testing::Message() << "group " << shape.group << ", d_k " << shape.d_k << ", d_v " << shape.d_v
                                        << ", " << n << " keys");
      const Matrix<Scalar> k = random_matrix<Scalar>(n, shape.d_k, 1), v = random_matrix<Scalar>(n, shape.d_v, 2);
      // Row-major rows of Storage, and the same numbers as Scalar.
      std::vector<Storage> keys(static_cast<std::size_t>(n * shape.d_k)),
          values(static_cast<std::size_t>(n * shape.d_v));
      std::vector<Scalar> exact_keys(keys.size()), exact_values(values.size());
      for (Index r = 0; r < n; ++r) {
        for (Index c = 0; c < shape.d_k; ++c) {
          keys[static_cast<std::size_t>(r * shape.d_k + c)] = static_cast<Storage>(k(r, c));
          exact_keys[static_cast<std::size_t>(r * shape.d_k + c)] =
              static_cast<Scalar>(static_cast<float>(keys[static_cast<std::size_t>(r * shape.d_k + c)]));
        }
        for (Index c = 0; c < shape.d_v; ++c) {
          values[static_cast<std::size_t>(r * shape.d_v + c)] = static_cast<Storage>(v(r, c));
          exact_values[static_cast<std::size_t>(r * shape.d_v + c)] =
              static_cast<Scalar>(static_cast<float>(values[static_cast<std::size_t>(r * shape.d_v + c)]));
        }
      }
      const auto attend = [&](const auto* key_rows, const auto* value_rows, Matrix<Scalar>& out, Matrix<Scalar>& lse) {
        mha::detail::PartScratch<Scalar> scratch;
        scratch.reserve_for(shape.group, shape.d_k);
        const Matrix<Scalar> q = random_matrix<Scalar>(1, shape.group * shape.d_k, 3);
        for (Index e = 0; e < q.cols(); ++e) scratch.queries(e) = q(0, e);
        out.resize(shape.group, shape.d_v);
        lse.resize(shape.group, 1);
        Matrix<Scalar> by_rows(shape.d_v, shape.group);
        mha::detail::attend_to_part<Scalar>(shape.group, key_rows, value_rows, n, shape.d_k, shape.d_v, scratch,
                                            by_rows.data(), shape.d_v, lse.data(), 1);
        out = by_rows.transpose();
      };
      Matrix<Scalar> out, lse, expected_out, expected_lse;
      attend(keys.data(), values.data(), out, lse);
      attend(exact_keys.data(), exact_values.data(), expected_out, expected_lse);
      const double ulps = 8 * std::numeric_limits<Scalar>::epsilon();
      ASSERT_TRUE(expected_out.allFinite());
      EXPECT_LE(mha_test::relative_error(out, expected_out), ulps);
      EXPECT_LE(mha_test::relative_error(lse, expected_lse), ulps);
    }
}

TEST(KVCacheStorage, OneTokenKernelReadsReducedRowsAsTheirConvertedNumbers) {
  expect_part_reads_rows_as_converted<float, Eigen::bfloat16>();
  expect_part_reads_rows_as_converted<float, Eigen::half>();
  expect_part_reads_rows_as_converted<double, Eigen::bfloat16>();
  expect_part_reads_rows_as_converted<double, Eigen::half>();
}

/// attend_to_part against the lecture's attention (the tests' reference), for every way its kernels split a
/// group of query heads (blocks of four with 32 vector registers, of two, and one left over: groups
/// 1 to 9), head widths of whole blocks of four packets, single packets, tails and less than a
/// packet, and parts of 1 key to kKeyBlock keys (rows four at a time and left over, kChunkRows at a
/// time and a partial chunk): out_g = softmax(K q_g)ᵀ V, log_sum_exp_g = log Σ exp(K q_g).
template <typename Scalar>
void expect_part_matches_the_reference() {
  struct Widths {
    Index d_k, d_v;
  };
  const double tolerance = std::is_same<Scalar, float>::value ? 1e-5 : 1e-12;
  for (const Index group : {1, 2, 3, 4, 5, 6, 7, 8, 9})
    for (const Widths w : {Widths{64, 64}, Widths{37, 87}, Widths{16, 128}, Widths{5, 3}, Widths{1, 1}})
      for (const Index n :
           {Index{1}, Index{3}, Index{5}, Index{63}, Index{64}, Index{66}, Index{131}, mha::detail::kKeyBlock}) {
        SCOPED_TRACE(::testing::Message()
                     << "group " << group << ", d_k " << w.d_k << ", d_v " << w.d_v << ", " << n << " keys");
        // Row-major keys and values, as a cache holds them.
        const Matrix<Scalar> k = random_matrix<Scalar>(n, w.d_k, 1), v = random_matrix<Scalar>(n, w.d_v, 2);
        const Matrix<Scalar> q = random_matrix<Scalar>(group, w.d_k, 3);
        const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> keys = k, values = v;
        mha::detail::PartScratch<Scalar> scratch;
        scratch.reserve_for(group, w.d_k);
        for (Index g = 0; g < group; ++g)
          for (Index e = 0; e < w.d_k; ++e) scratch.queries(g * w.d_k + e) = q(g, e);
        Matrix<Scalar> by_heads(w.d_v, group), lse(group, 1);
        mha::detail::attend_to_part<Scalar>(group, keys.data(), values.data(), n, w.d_k, w.d_v, scratch,
                                            by_heads.data(), w.d_v, lse.data(), 1);
        // The oracle's attention, the group's queries as its rows (scaled already); and the
        // log-sum-exp of each head's scores, relative to the largest.
        const Matrix<Scalar> expected = mha_reference::attention<Scalar>(q, k, v, Scalar(1), false);
        const Matrix<Scalar> scores = q * k.transpose();  // group × n
        const Eigen::Matrix<Scalar, Eigen::Dynamic, 1> largest = scores.rowwise().maxCoeff();
        const Matrix<Scalar> expected_lse =
            largest.array() + (scores.colwise() - largest).array().exp().rowwise().sum().log();
        EXPECT_LE(mha_test::relative_error(by_heads.transpose(), expected), tolerance);
        EXPECT_LE(mha_test::relative_error(lse, expected_lse), tolerance);
      }
}

TEST(KVCacheStorage, OneTokenKernelMatchesTheReferenceForEveryGroupOfHeads) {
  expect_part_matches_the_reference<float>();
  expect_part_matches_the_reference<double>();
}

// ---- The rolling cache of a sliding window ----

/// Decodes x in steps of the given sizes into a rolling cache of `window` and into a cache that
/// keeps everything, both with options.window = `attend`: every step's rows agree (f64 ≤ 1e-10,
/// f32 ≤ 1e-5), and with the causal windowed forward.
template <typename Scalar>
void expect_rolling_equals_full(const mha::MultiHeadAttention<Scalar>& attn, const Matrix<Scalar>& x,
                                const Lengths& steps, Index window, Index attend) {
  mha::AttentionOptions o;
  o.window = attend;
  mha::AttentionOptions forward_options = causal_if(true);
  forward_options.window = attend;
  const Matrix<Scalar> full = attn.forward(x, forward_options);
  auto rolling = attn.make_rolling_cache(window);
  auto everything = attn.make_cache();
  const std::size_t allocated = rolling.bytes();
  // Steps that fit the room it was made with never grow it (a longer step grows it for good).
  const bool fits = *std::max_element(steps.begin(), steps.end()) <= std::max<Index>(window / 8, 16);
  Index position = 0;
  for (std::size_t step = 0; position < x.rows(); ++step) {
    const Index n = std::min(steps[std::min(step, steps.size() - 1)], x.rows() - position);
    const Matrix<Scalar> y = attn.decode(x.middleRows(position, n), rolling, o);
    ASSERT_TRUE(near<Scalar>(y, attn.decode(x.middleRows(position, n), everything, o), "rolling against full cache"))
        << "step " << step << ": tokens " << position << " to " << position + n - 1;
    ASSERT_TRUE(near<Scalar>(y, full.middleRows(position, n), "rolling against forward"));
    position += n;
    ASSERT_EQ(rolling.length(), position);
    // It holds what the next step can see, and no more than the room it was made with.
    ASSERT_GE(rolling.held(), std::min(position, window - 1));
    if (fits) {
      ASSERT_LE(rolling.held(), window + std::max<Index>(window / 8, 16));
      ASSERT_EQ(rolling.bytes(), allocated);
    }
  }
}

TYPED_TEST(KVCache, RollingCacheEqualsTheFullCache) {
  auto c = rotary(decoder_config(32, 8, 2, 0, 0, 41), mha::RotaryPairs::halves, 500.0);
  c.bias = true;
  for (const auto& config : {decoder_config(16, 4, 0, 0, 0, 40), c}) {
    const auto attn = make_module<TypeParam>(config);
    SCOPED_TRACE(describe(config));
    const Matrix<TypeParam> x = random_matrix<TypeParam>(700, config.d_model, 11);
    // One token at a time past several compactions, with the window the cache was made for and
    // a smaller one; chunks; a prompt longer than the room (the cache grows for that step).
    const Matrix<TypeParam> first = x.topRows(300);
    expect_rolling_equals_full(attn, first, {1}, 37, 37);
    expect_rolling_equals_full(attn, first, {1}, 37, 5);
    expect_rolling_equals_full(attn, first, {3, 1, 2}, 37, 37);
    expect_rolling_equals_full(attn, x, {200, 1}, 37, 37);
    expect_rolling_equals_full(attn, x, {1, 5, 1}, 600, 600);  // parts of 512 keys inside the window
    expect_rolling_equals_full(attn, Matrix<TypeParam>(x.topRows(60)), {1}, 1, 1);
  }
}

TYPED_TEST(KVCache, RollingBatchEqualsEachSequenceAlone) {
  const auto attn = make_module<TypeParam>(rotary(decoder_config(16, 4, 2, 0, 0, 42), mha::RotaryPairs::interleaved));
  mha::AttentionOptions o;
  o.window = 9;
  auto batch = attn.make_rolling_cache(9, 2);
  auto first = attn.make_rolling_cache(9), second = attn.make_rolling_cache(9);
  const Matrix<TypeParam> x = random_matrix<TypeParam>(200, 16, 12);
  Index row = 0;
  for (Index step = 0; step < 40; ++step) {
    const Index a = step % 3, b = 1 + step % 2;  // sequence 0 sometimes pauses
    const Matrix<TypeParam> both = attn.decode_batch(x.middleRows(row, a + b), Lengths{a, b}, batch, o);
    if (a > 0) {
      ASSERT_TRUE(near<TypeParam>(both.topRows(a), attn.decode(x.middleRows(row, a), first, o), "rolling batch"));
    }
    ASSERT_TRUE(near<TypeParam>(both.bottomRows(b), attn.decode(x.middleRows(row + a, b), second, o), "rolling batch"));
    row += a + b;
  }
  EXPECT_EQ(batch.length(0), first.length());
  EXPECT_EQ(batch.length(1), second.length());
}

TYPED_TEST(KVCache, RollingCacheRefusesWhatItCannotSee) {
  const auto attn = make_module<TypeParam>(decoder_config(16, 4, 2));
  EXPECT_EQ(error_of([&] { attn.make_rolling_cache(0); }), "mha: KVCache::rolling: window must be >= 1, got 0");
  EXPECT_EQ(error_of([&] { attn.make_rolling_cache(std::numeric_limits<Index>::max()); }),
            "mha: KVCache::rolling: window 9223372036854775807 is too large");
  auto rolling = attn.make_rolling_cache(8);
  EXPECT_EQ(rolling.window(), 8);
  const Matrix<TypeParam> x = random_matrix<TypeParam>(40, 16, 1);
  mha::AttentionOptions wide;
  wide.window = 9;
  for (const Index w : {Index(0), Index(9)}) {
    mha::AttentionOptions o;
    o.window = w;
    EXPECT_EQ(error_of([&] { attn.decode(x.topRows(1), rolling, o); }),
              "mha: MultiHeadAttention::decode: this rolling cache keeps what a window of at most 8 keys sees; "
              "options.window = " +
                  std::to_string(w) +
                  " would need older keys (set options.window to 8, or make the cache with "
                  "make_cache())");
  }
  EXPECT_TRUE(rolling.empty());
  mha::AttentionOptions o;
  o.window = 8;
  attn.decode(x, rolling, o);  // 40 tokens: it holds all of them until the next step
  attn.decode(x.topRows(1), rolling, o);
  EXPECT_EQ(rolling.length(), 41);
  EXPECT_EQ(rolling.held(), 8);  // the 7 the window keeps, and the new one
  // Speculative rollback works as far back as the window still sees.
  const Matrix<TypeParam> keys = rolling.keys(0, 1);
  rolling.truncate(40);
  EXPECT_EQ(rolling.held(), 7);
  EXPECT_EQ(Matrix<TypeParam>(rolling.keys(0, 1)), Matrix<TypeParam>(keys.topRows(7)));
  EXPECT_EQ(error_of([&] { rolling.truncate(39); }),
            "mha: KVCache::truncate: sequence 0 of this rolling cache (window 8) holds its tokens from position 33 "
            "on; truncated to 39 tokens, it would no longer hold the window − 1 before the next one");
  EXPECT_EQ(rolling.length(), 40);
  rolling.reset();
  EXPECT_TRUE(rolling.empty());
  EXPECT_EQ(rolling.length(), 0);
  EXPECT_EQ(rolling.held(), 0);
}
