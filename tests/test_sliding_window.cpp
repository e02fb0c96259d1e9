// Sliding windows: a query at position p sees only the keys at positions > p − window. The forward,
// its weights and the single-head kernel equal the literal reference (windowed masks) in both
// alignments, causal or not, across the tiles; a window covering every key is no window; ragged
// batches equal each sequence alone; the backward matches finite differences.
#include <mha/mha.hpp>

#include "decoding_util.hpp"
#include "gradient_check.hpp"
#include "reference/reference_attention.hpp"
#include "test_util.hpp"

#include <cmath>
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

namespace {

using mha_test::all_alignments;
using mha_test::config;
using mha_test::decoder_config;
using mha_test::describe;
using mha_test::error_of;
using mha_test::Lengths;
using mha_test::make_module;
using mha_test::Matrix;
using mha_test::near;
using mha_test::options_of;
using mha_test::random_matrix;
using mha_test::reference_options;
using mha_test::relative_error;
using mha_test::rotary;
using mha_test::total;
using Index = Eigen::Index;

template <typename Scalar>
class SlidingWindow : public ::testing::Test {};
TYPED_TEST_SUITE(SlidingWindow, mha_test::Scalars, mha_test::ScalarNames);

TYPED_TEST(SlidingWindow, ForwardEqualsTheReference) {
  auto c = decoder_config(16, 2, 1, 0, 0, 6);
  c.bias = true;
  const auto attn = make_module<TypeParam>(c);
  for (const Index window : {1, 2, 7, 300, 600})
    for (const auto& [L, S] : {std::pair<Index, Index>{600, 600}, {300, 530}, {530, 300}}) {
      const Matrix<TypeParam> query = random_matrix<TypeParam>(L, 16, L + window);
      const Matrix<TypeParam> kv = L == S ? query : random_matrix<TypeParam>(S, 16, S + window + 1);
      for (const auto& o : all_alignments(window))
        EXPECT_TRUE(near<TypeParam>(attn.forward(query, kv, kv, o),
                                    mha_reference::decoder_attention(attn, query, kv, kv, reference_options(o)),
                                    "window forward"))
            << "L = " << L << ", S = " << S << ", " << describe(o);
    }
}

TYPED_TEST(SlidingWindow, WeightsOutsideTheWindowAreZeroAndEqualTheReference) {
  const auto attn = make_module<TypeParam>(rotary(decoder_config(16, 4, 2, 0, 0, 7), mha::RotaryPairs::interleaved));
  const Matrix<TypeParam> query = random_matrix<TypeParam>(20, 16, 1), kv = random_matrix<TypeParam>(530, 16, 2);
  for (const auto& o : all_alignments(5)) {
    const auto result = attn.forward_with_weights(query, kv, kv, o, mha::AttentionWeights::per_head);
    std::vector<Matrix<TypeParam>> weights;
    const Matrix<TypeParam> expected =
        mha_reference::decoder_attention(attn, query, kv, kv, reference_options(o), &weights);
    EXPECT_TRUE(near<TypeParam>(result.output, expected, "window forward")) << describe(o);
    const Index offset = o.alignment == mha::CausalAlignment::bottom_right ? 530 - 20 : 0;
    for (std::size_t i = 0; i < weights.size(); ++i) {
      EXPECT_TRUE(near<TypeParam>(result.weights[i], weights[i], "window weights")) << describe(o) << ", head " << i;
      for (Index r = 0; r < 20; ++r)
        for (Index j = 0; j < 530; ++j)
          if (j <= r + offset - 5 || (o.causal && j > r + offset)) {
            ASSERT_EQ(result.weights[i](r, j), TypeParam(0)) << describe(o) << ", row " << r << ", key " << j;
          }
    }
  }
}

TYPED_TEST(SlidingWindow, SingleHeadKernelEqualsTheReference) {
  for (const auto& [L, S] : {std::pair<Index, Index>{600, 600}, {257, 1100}})
    for (const Index window : {1, 7, 513}) {
      const Matrix<TypeParam> q = random_matrix<TypeParam>(L, 8, L), k = random_matrix<TypeParam>(S, 8, S + 1),
                              v = random_matrix<TypeParam>(S, 5, S + 2);
      for (const auto& o : all_alignments(window)) {
        mha_reference::HeadMasks<TypeParam> masks;
        masks.causal = o.causal;
        masks.offset = o.alignment == mha::CausalAlignment::bottom_right ? S - L : 0;
        masks.window = window;
        const Matrix<TypeParam> expected =
            mha_reference::attention_weights<TypeParam>(q, k, TypeParam(1 / std::sqrt(8.0)), masks) * v;
        EXPECT_TRUE(near<TypeParam>(mha::scaled_dot_product_attention(q, k, v, o), expected, "window single head"))
            << "L = " << L << ", S = " << S << ", " << describe(o);
      }
    }
}

TYPED_TEST(SlidingWindow, WindowCoveringEveryKeyIsNoWindow) {
  const auto attn = make_module<TypeParam>(decoder_config(16, 2, 2, 0, 0, 8));
  for (const auto& [L, S] : {std::pair<Index, Index>{600, 600}, {300, 530}}) {
    const Matrix<TypeParam> query = random_matrix<TypeParam>(L, 16, 1), kv = random_matrix<TypeParam>(S, 16, 2);
    for (const auto& o : all_alignments()) {
      const Matrix<TypeParam> unwindowed = attn.forward(query, kv, kv, o);
      for (const Index window : {S, S + 1, Index(100000)}) {
        mha::AttentionOptions windowed = o;
        windowed.window = window;
        EXPECT_TRUE(near<TypeParam>(attn.forward(query, kv, kv, windowed), unwindowed, "window >= S"))
            << "L = " << L << ", S = " << S << ", " << describe(windowed);
      }
      // One key fewer: the last query (at position S − 1 when bottom-right) loses key 0, and only it.
      if (o.alignment == mha::CausalAlignment::bottom_right) {
        mha::AttentionOptions narrower = o;
        narrower.window = S - 1;
        const Matrix<TypeParam> y = attn.forward(query, kv, kv, narrower);
        EXPECT_TRUE(near<TypeParam>(y.topRows(L - 1), unwindowed.topRows(L - 1), "window >= S")) << describe(o);
        EXPECT_GT(relative_error(y.bottomRows(1), unwindowed.bottomRows(1)), 1e-4) << describe(o);
      }
    }
  }
}

TYPED_TEST(SlidingWindow, RaggedBatchWithRotaryAndWindowEqualsEachSequenceAlone) {
  auto c = rotary(decoder_config(16, 4, 2, 0, 0, 12), mha::RotaryPairs::halves);
  c.bias = true;
  const auto attn = make_module<TypeParam>(c);
  const Lengths query_lengths = {3, 0, 300, 1, 17}, key_lengths = {5, 4, 270, 0, 600};
  const Matrix<TypeParam> query = random_matrix<TypeParam>(total(query_lengths), 16, 1),
                          kv = random_matrix<TypeParam>(total(key_lengths), 16, 2);
  for (const auto& o : all_alignments(7)) {
    const Matrix<TypeParam> batched = attn.forward_batch(query, kv, kv, query_lengths, key_lengths, o);
    Index q0 = 0, k0 = 0;
    for (std::size_t b = 0; b < query_lengths.size(); ++b) {
      const Index L = query_lengths[b], S = key_lengths[b];
      const Matrix<TypeParam> q = query.middleRows(q0, L), k = kv.middleRows(k0, S);
      EXPECT_TRUE(near<TypeParam>(batched.middleRows(q0, L),
                                  mha_reference::decoder_attention(attn, q, k, k, reference_options(o)),
                                  "window batch"))
          << "sequence " << b << ", " << describe(o);
      q0 += L;
      k0 += S;
    }
  }
  // Batched self-attention: each sequence's positions start at 0.
  const Lengths lengths = {5, 300, 0, 40};
  const Matrix<TypeParam> x = random_matrix<TypeParam>(total(lengths), 16, 3);
  const mha::AttentionOptions o = options_of(true, mha::CausalAlignment::top_left, 30);
  const Matrix<TypeParam> batched = attn.forward_batch(x, lengths, o);
  Index r0 = 0;
  for (const Index n : lengths) {
    EXPECT_TRUE(near<TypeParam>(batched.middleRows(r0, n), attn.forward(x.middleRows(r0, n), o), "window batch"));
    r0 += n;
  }
}

TYPED_TEST(SlidingWindow, NegativeWindowIsRejected) {
  const auto attn = make_module<TypeParam>(decoder_config(8, 2, 1));
  const Matrix<TypeParam> x = random_matrix<TypeParam>(4, 8, 1);
  mha::AttentionOptions o;
  o.window = -1;
  const std::string expected = "mha: options.window must be >= 0 (0 = no window), got -1";
  EXPECT_EQ(error_of([&] { attn.forward(x, o); }), expected);
  EXPECT_EQ(error_of([&] { attn.forward_batch(x, Lengths{1, 3}, o); }), expected);
  EXPECT_EQ(error_of([&] { attn.forward_with_weights(x, x, x, o, mha::AttentionWeights::averaged); }), expected);
  EXPECT_EQ(error_of([&] { mha::scaled_dot_product_attention(x, x, x, o); }), expected);
  mha::Tape<TypeParam> tape;
  EXPECT_EQ(error_of([&] { attn.forward(x, o, tape); }), expected);
  auto cache = attn.make_cache(1, 0);
  EXPECT_EQ(error_of([&] { attn.decode(x, cache, o); }), expected);
  EXPECT_EQ(cache.length(), 0);
}

// --- gradients --------------------------------------------------------------------------------

using mha_test::gradient_check::expect_gradients_match_finite_differences;
using mha_test::gradient_check::Problem;

TEST(DecodingGradients, WindowMatchesFiniteDifferences) {
  for (const Index window : {1, 2, 3})
    for (const auto& [L, S] : {std::pair<Index, Index>{6, 6}, {4, 7}, {7, 4}})
      for (const auto& o : all_alignments(window)) {
        Problem p(config(6, 2), {L}, {S});
        p.options = o;
        SCOPED_TRACE("L = " + std::to_string(L) + ", S = " + std::to_string(S) + ", " + describe(o));
        expect_gradients_match_finite_differences(p);
      }
}

}  // namespace
