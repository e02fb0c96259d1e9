// Grouped-query attention: h query heads share h_kv key/value heads, head i reading key/value head
// i / (h / h_kv). Parameters have one key/value block per key/value head; the forward equals the
// literal reference (K/V heads repeat-interleaved) and a full module whose key/value blocks are
// repeated, whose gradients it sums per group; the backward matches finite differences and does not
// depend on the thread count.
#include <mha/mha.hpp>

#include "decoding_util.hpp"
#include "gradient_check.hpp"
#include "reference/reference_attention.hpp"
#include "test_util.hpp"

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

namespace {

using mha_test::causal_if;
using mha_test::config;
using mha_test::decoder_config;
using mha_test::describe;
using mha_test::error_of;
using mha_test::make_module;
using mha_test::Matrix;
using mha_test::near;
using mha_test::options_of;
using mha_test::random_matrix;
using mha_test::reference_options;
using mha_test::rotary;
using mha_test::use_threads;
using Index = Eigen::Index;

template <typename Scalar>
class GroupedQueryAttention : public ::testing::Test {};
TYPED_TEST_SUITE(GroupedQueryAttention, mha_test::Scalars, mha_test::ScalarNames);

TYPED_TEST(GroupedQueryAttention, KeyAndValueParametersHaveOneBlockPerKvHead) {
  auto c = decoder_config(32, 8, 2, 4, 6);
  c.bias = true;
  c.add_bias_kv = true;
  c.kdim = 20;
  c.vdim = 12;
  mha::MultiHeadAttention<TypeParam> attn(c);
  EXPECT_EQ(attn.num_heads(), 8);
  EXPECT_EQ(attn.num_kv_heads(), 2);
  EXPECT_EQ(attn.w_q().cols(), 8 * 4);
  EXPECT_EQ(attn.w_k().rows(), 20);
  EXPECT_EQ(attn.w_k().cols(), 2 * 4);
  EXPECT_EQ(attn.w_v().rows(), 12);
  EXPECT_EQ(attn.w_v().cols(), 2 * 6);
  EXPECT_EQ(attn.w_o().rows(), 8 * 6);
  EXPECT_EQ(attn.b_k().cols(), 2 * 4);
  EXPECT_EQ(attn.b_v().cols(), 2 * 6);
  EXPECT_EQ(attn.bias_k().cols(), 2 * 4);
  EXPECT_EQ(attn.bias_v().cols(), 2 * 6);
  EXPECT_EQ(Matrix<TypeParam>(attn.w_k(1)), Matrix<TypeParam>(attn.w_k().middleCols(4, 4)));
  EXPECT_EQ(Matrix<TypeParam>(attn.w_v(1)), Matrix<TypeParam>(attn.w_v().middleCols(6, 6)));
  EXPECT_EQ(attn.w_q(7).cols(), 4);
  EXPECT_EQ(error_of([&] { attn.w_k(2); }),
            "mha: w_k(2): key/value head index out of range; the module has num_kv_heads = 2 (valid heads 0 to 1)");
  EXPECT_EQ(error_of([&] { attn.w_v(-1); }),
            "mha: w_v(-1): key/value head index out of range; the module has num_kv_heads = 2 (valid heads 0 to 1)");
  // The gradients have the same shapes, parameter by parameter.
  const auto gradients = attn.zero_gradients();
  const auto ps = attn.parameters();
  const auto gs = gradients.parameters();
  ASSERT_EQ(ps.size(), gs.size());
  for (std::size_t i = 0; i < ps.size(); ++i) {
    EXPECT_EQ(ps[i].name, gs[i].name);
    EXPECT_EQ(ps[i].value.rows(), gs[i].value.rows()) << ps[i].name;
    EXPECT_EQ(ps[i].value.cols(), gs[i].value.cols()) << ps[i].name;
  }
}

TYPED_TEST(GroupedQueryAttention, ForwardEqualsTheRepeatInterleaveReference) {
  // Shapes on both sides of the 256-row and 512-key tiles, and odd ones.
  const std::pair<Index, Index> shapes[] = {{1, 1}, {5, 9}, {9, 5}, {255, 257}, {257, 513}, {513, 300}, {1, 600}};
  for (const Index h_kv : {1, 2, 4, 8}) {
    auto cross = decoder_config(32, 8, h_kv, 6, 5, h_kv);  // d_k ≠ d_v
    cross.kdim = 20;
    cross.vdim = 12;
    cross.bias = true;
    const auto attn = make_module<TypeParam>(cross);
    for (const auto& [L, S] : shapes) {
      const Matrix<TypeParam> query = random_matrix<TypeParam>(L, 32, 10 * L + S);
      const Matrix<TypeParam> key = random_matrix<TypeParam>(S, 20, 10 * L + S + 1);
      const Matrix<TypeParam> value = random_matrix<TypeParam>(S, 12, 10 * L + S + 2);
      for (const auto& o :
           {options_of(false, mha::CausalAlignment::top_left), options_of(true, mha::CausalAlignment::top_left),
            options_of(true, mha::CausalAlignment::bottom_right)})
        EXPECT_TRUE(near<TypeParam>(attn.forward(query, key, value, o),
                                    mha_reference::decoder_attention(attn, query, key, value, reference_options(o)),
                                    "grouped-query forward"))
            << "h_kv = " << h_kv << ", L = " << L << ", S = " << S << ", " << describe(o);
    }
    // Self-attention, and the weights of every head.
    const auto self = make_module<TypeParam>(decoder_config(32, 8, h_kv, 0, 0, 50 + h_kv));
    const Matrix<TypeParam> x = random_matrix<TypeParam>(300, 32, 7);
    for (const bool causal : {false, true}) {
      const auto result = self.forward_with_weights(x, x, x, causal_if(causal), mha::AttentionWeights::per_head);
      std::vector<Matrix<TypeParam>> weights;
      const mha_reference::DecoderOptions o = reference_options(causal_if(causal));
      EXPECT_TRUE(near<TypeParam>(self.forward(x, causal_if(causal)),
                                  mha_reference::decoder_attention(self, x, x, x, o, &weights),
                                  "grouped-query forward"))
          << "self-attention, h_kv = " << h_kv << ", causal = " << causal;
      ASSERT_EQ(result.weights.size(), weights.size());
      for (std::size_t i = 0; i < weights.size(); ++i)
        EXPECT_TRUE(near<TypeParam>(result.weights[i], weights[i], "grouped-query weights")) << "head " << i;
    }
  }
}

TYPED_TEST(GroupedQueryAttention, AsManyKvHeadsAsHeadsIsPlainMultiHeadAttention) {
  const mha::MultiHeadAttention<TypeParam> plain(config(32, 4, 0, 0, 3)),
      explicit_kv(decoder_config(32, 4, 4, 0, 0, 3));
  EXPECT_EQ(Matrix<TypeParam>(plain.w_k()), Matrix<TypeParam>(explicit_kv.w_k()));  // same shapes, same draws
  EXPECT_EQ(Matrix<TypeParam>(plain.w_o()), Matrix<TypeParam>(explicit_kv.w_o()));
  const Matrix<TypeParam> query = random_matrix<TypeParam>(70, 32, 1), kv = random_matrix<TypeParam>(530, 32, 2);
  for (const bool causal : {false, true}) {
    const Matrix<TypeParam> y = explicit_kv.forward(query, kv, kv, causal_if(causal));
    EXPECT_EQ(y, plain.forward(query, kv, kv, causal_if(causal)));
    EXPECT_TRUE(near<TypeParam>(y, mha_reference::multi_head_attention(plain, query, kv, kv, causal),
                                "h_kv = h against the plain reference"));
  }
}

/// The module with h_kv = h whose key/value head i is the grouped module's head i / (h / h_kv):
/// grouped-query attention written as plain multi-head attention, without the reference.
template <typename Scalar>
mha::MultiHeadAttention<Scalar> ungrouped(const mha::MultiHeadAttention<Scalar>& grouped) {
  auto c = grouped.config();
  c.num_kv_heads = 0;
  mha::MultiHeadAttention<Scalar> full(c);
  const Index h = c.num_heads, group = h / grouped.num_kv_heads(), d_k = c.d_k, d_v = c.d_v;
  full.w_q() = grouped.w_q();
  full.w_o() = grouped.w_o();
  for (Index i = 0; i < h; ++i) {
    full.w_k(i) = grouped.w_k(i / group);
    full.w_v(i) = grouped.w_v(i / group);
    if (c.bias) {
      full.b_k().segment(i * d_k, d_k) = grouped.b_k().segment(i / group * d_k, d_k);
      full.b_v().segment(i * d_v, d_v) = grouped.b_v().segment(i / group * d_v, d_v);
    }
  }
  if (c.bias) {
    full.b_q() = grouped.b_q();
    full.b_o() = grouped.b_o();
  }
  return full;
}

TYPED_TEST(GroupedQueryAttention, EqualsAFullModuleWhoseKvBlocksAreRepeated) {
  for (const Index h_kv : {1, 2})
    for (const bool with_rotary : {false, true}) {
      auto c = decoder_config(24, 4, h_kv, 0, 0, 5);
      c.bias = true;
      if (with_rotary) c = rotary(c, mha::RotaryPairs::halves);
      const auto grouped = make_module<TypeParam>(c);
      const auto full = ungrouped(grouped);
      SCOPED_TRACE(describe(c));
      const Matrix<TypeParam> query = random_matrix<TypeParam>(300, 24, 1), kv = random_matrix<TypeParam>(530, 24, 2);
      for (const auto& o : {options_of(false, mha::CausalAlignment::top_left),
                            options_of(true, mha::CausalAlignment::bottom_right, 7)}) {
        EXPECT_TRUE(near<TypeParam>(grouped.forward(query, kv, kv, o), full.forward(query, kv, kv, o),
                                    "grouped against repeated blocks"))
            << describe(o);
        // The gradient of a shared key/value head is the sum of its query heads' gradients.
        mha::Tape<TypeParam> grouped_tape, full_tape;
        grouped.forward(query, kv, kv, o, grouped_tape);
        full.forward(query, kv, kv, o, full_tape);
        const Matrix<TypeParam> d_y = random_matrix<TypeParam>(300, 24, 3);
        auto dg = grouped.zero_gradients();
        auto df = full.zero_gradients();
        const auto ig = grouped.backward(grouped_tape, d_y, dg);
        const auto ifull = full.backward(full_tape, d_y, df);
        EXPECT_TRUE(near<TypeParam>(ig.query, ifull.query, "grouped against repeated blocks, gradients"));
        EXPECT_TRUE(near<TypeParam>(ig.key, ifull.key, "grouped against repeated blocks, gradients"));
        EXPECT_TRUE(near<TypeParam>(ig.value, ifull.value, "grouped against repeated blocks, gradients"));
        EXPECT_TRUE(near<TypeParam>(dg.w_q(), df.w_q(), "grouped against repeated blocks, gradients"));
        EXPECT_TRUE(near<TypeParam>(dg.w_o(), df.w_o(), "grouped against repeated blocks, gradients"));
        const Index group = 4 / h_kv;
        for (Index j = 0; j < h_kv; ++j) {
          Matrix<TypeParam> w_k_sum = Matrix<TypeParam>::Zero(24, full.d_k()),
                            w_v_sum = Matrix<TypeParam>::Zero(24, full.d_v());
          for (Index i = j * group; i < (j + 1) * group; ++i) {
            w_k_sum += df.w_k(i);
            w_v_sum += df.w_v(i);
          }
          EXPECT_TRUE(near<TypeParam>(dg.w_k(j), w_k_sum, "grouped against repeated blocks, gradients"))
              << "kv head " << j;
          EXPECT_TRUE(near<TypeParam>(dg.w_v(j), w_v_sum, "grouped against repeated blocks, gradients"))
              << "kv head " << j;
        }
      }
    }
}

// The backward gives each key/value head's gradient one task that adds its query heads' parts in
// turn: grouped-query gradients do not depend on the thread count either. Three key/value heads of
// four query heads each, so that the backward has a task for each of three threads (and 173 Mflop
// as its scheduler counts them, far above three threads' worth of kMinFlopsPerThread).
TYPED_TEST(GroupedQueryAttention, BackwardIsBitIdenticalForAnyThreadCount) {
  MHA_TEST_SKIP_WITHOUT_OPENMP();
  auto c = rotary(decoder_config(48, 12, 3, 0, 0, 10), mha::RotaryPairs::interleaved);
  c.bias = true;
  const auto attn = make_module<TypeParam>(c);
  const Matrix<TypeParam> x = random_matrix<TypeParam>(600, 48, 1), d_y = random_matrix<TypeParam>(600, 48, 2);
  const mha::AttentionOptions o = options_of(true, mha::CausalAlignment::top_left, 100);
  std::vector<mha::AttentionParameters<TypeParam>> gradients;
  std::vector<Matrix<TypeParam>> d_x;
  for (const int threads : {1, 2, 3}) {
    use_threads(threads);
    mha::Tape<TypeParam> tape;
    attn.forward(x, o, tape);
    mha::detail::largest_team() = 0;  // the backward's team, not the forward's
    gradients.push_back(attn.zero_gradients());
    d_x.push_back(attn.backward(tape, d_y, gradients.back()).self_attention());
    EXPECT_EQ(mha::detail::largest_team(), threads) << "the backward did not run on " << threads << " threads";
  }
  mha::set_num_threads(0);
  for (std::size_t t = 1; t < 3; ++t) {
    EXPECT_TRUE((d_x[0].array() == d_x[t].array()).all()) << t + 1 << " threads";
    const auto a = gradients[0].parameters(), b = gradients[t].parameters();
    for (std::size_t i = 0; i < a.size(); ++i)
      EXPECT_TRUE((a[i].value.array() == b[i].value.array()).all()) << a[i].name << ", " << t + 1 << " threads";
  }
}

// --- gradients --------------------------------------------------------------------------------

using mha_test::gradient_check::expect_gradients_match_finite_differences;
using mha_test::gradient_check::Problem;
using mha_test::gradient_check::with;

TEST(DecodingGradients, GroupedQueryAttentionMatchesFiniteDifferences) {
  for (const Index h_kv : {1, 2}) {
    const auto c = with(decoder_config(8, 4, h_kv), [](auto& cfg) { cfg.bias = true; });
    SCOPED_TRACE("h_kv = " + std::to_string(h_kv));
    Problem cross(c, {5}, {7});
    expect_gradients_match_finite_differences(cross);
    Problem self(c, {3, 6, 1}, {3, 6, 1});
    self.self_attention = true;
    self.options.causal = true;
    expect_gradients_match_finite_differences(self);
  }
}

}  // namespace
