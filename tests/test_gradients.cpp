// The backward pass: every gradient equals the finite-difference derivative of the forward pass
// (double, relative error ≤ 1e-6), for every option the forward supports; and the training API's
// contracts (accumulation, thread independence, errors, memory, empty inputs).
#include <mha/mha.hpp>

#include "gradient_check.hpp"
#include "test_util.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <string>
#include <vector>

namespace {

using mha_test::BoolMatrix;
using mha_test::close;
using mha_test::config;
using mha_test::decoder_config;
using mha_test::error_of;
using mha_test::options_of;
using mha_test::random_matrix;
using mha_test::rotary;
using mha_test::use_threads;
using Matrix = Eigen::MatrixXd;
using Index = Eigen::Index;
using mha_test::gradient_check::all_entries;
using mha_test::gradient_check::Backward;
using mha_test::gradient_check::backward;
using mha_test::gradient_check::expect_gradients_match_finite_differences;
using mha_test::gradient_check::Problem;
using mha_test::gradient_check::with;

TEST(Gradients, CrossAttentionMatchesFiniteDifferences) {
  for (const Index h : {1, 2, 3}) {
    Problem p(config(6, h), {5}, {7});
    SCOPED_TRACE("h = " + std::to_string(h));
    expect_gradients_match_finite_differences(p);
  }
}

TEST(Gradients, SelfAttentionGradientIsTheSumOverQueryKeyAndValue) {
  Problem p(config(8, 2), {6}, {6});
  p.self_attention = true;
  expect_gradients_match_finite_differences(p);
}

TEST(Gradients, RaggedSelfAttentionBatchMatchesFiniteDifferences) {
  Problem p(config(8, 2), {3, 6, 1}, {3, 6, 1});
  p.self_attention = true;
  p.options.causal = true;
  expect_gradients_match_finite_differences(p);
}

TEST(Gradients, CausalMatchesFiniteDifferencesInBothAlignments) {
  for (const auto alignment : {mha::CausalAlignment::top_left, mha::CausalAlignment::bottom_right})
    for (const auto& [L, S] : {std::pair<Index, Index>{6, 6}, {4, 7}, {7, 4}}) {
      Problem p(config(6, 2), {L}, {S});
      p.options.causal = true;
      p.options.alignment = alignment;
      SCOPED_TRACE("L = " + std::to_string(L) + ", S = " + std::to_string(S) +
                   (alignment == mha::CausalAlignment::top_left ? ", top-left" : ", bottom-right"));
      expect_gradients_match_finite_differences(p);
    }
}

TEST(Gradients, MasksMatchFiniteDifferences) {
  // An additive mask with −∞ and finite biases, shared by the heads.
  Matrix additive = random_matrix<double>(5, 7, 40);
  additive(1, 2) = additive(3, 0) = additive(3, 6) = -std::numeric_limits<double>::infinity();
  Problem shared(config(6, 2), {5}, {7});
  shared.options.mask = mha::AttentionMask::additive(additive);
  expect_gradients_match_finite_differences(shared);

  // One boolean mask per head, with the causal rule on top.
  BoolMatrix blocked = random_matrix<double>(2 * 5, 7, 41).array() > 0.4;
  Problem per_head(config(6, 2), {5}, {7});
  per_head.options.mask = mha::AttentionMask::blocked(blocked);
  per_head.options.causal = true;
  per_head.options.alignment = mha::CausalAlignment::bottom_right;
  expect_gradients_match_finite_differences(per_head);
}

TEST(Gradients, KeyPaddingInAPaddedBatchMatchesFiniteDifferences) {
  BoolMatrix padding = BoolMatrix::Zero(3, 6);
  padding.row(1).tail(2).setConstant(true);
  padding.row(2).tail(5).setConstant(true);
  Problem p(config(6, 2), {4, 4, 4}, {6, 6, 6});
  p.options.key_padding_mask = mha::AttentionMask::blocked(padding);
  expect_gradients_match_finite_differences(p);
}

TEST(Gradients, RaggedCausalBatchMatchesFiniteDifferences) {
  Problem p(config(6, 3), {3, 0, 5, 1}, {4, 2, 5, 0});
  p.options.causal = true;
  p.options.alignment = mha::CausalAlignment::bottom_right;
  expect_gradients_match_finite_differences(p);
}

TEST(Gradients, KdimVdimAndDkNotDvWithBiasesMatchFiniteDifferences) {
  const auto cfg = with(config(6, 2, 4, 3), [](auto& c) {
    c.kdim = 5;
    c.vdim = 3;
    c.bias = true;
  });
  Problem p(cfg, {5}, {4});
  expect_gradients_match_finite_differences(p);
}

TEST(Gradients, AddBiasKvAndAddZeroAttnMatchFiniteDifferences) {
  for (const bool bias_kv : {false, true})
    for (const bool zero_attn : {false, true}) {
      if (!bias_kv && !zero_attn) continue;
      const auto cfg = with(config(6, 2), [&](auto& c) {
        c.bias = true;
        c.add_bias_kv = bias_kv;
        c.add_zero_attn = zero_attn;
      });
      Problem p(cfg, {4, 3}, {5, 2});
      p.options.causal = true;  // the extra keys stay visible to every query
      SCOPED_TRACE(std::string(bias_kv ? "add_bias_kv " : "") + (zero_attn ? "add_zero_attn" : ""));
      expect_gradients_match_finite_differences(p);
    }
}

TEST(Gradients, DropoutDifferentiatesTheSameDroppedWeightsAsTheForward) {
  const auto cfg = with(config(6, 2), [](auto& c) { c.dropout = 0.3; });
  Problem p(cfg, {6, 3}, {7, 4});
  p.options.training = true;
  p.options.dropout_seed = 42;
  p.options.causal = true;
  expect_gradients_match_finite_differences(p);
  // And the dropout mattered: the gradients differ from those without it.
  const Backward with_dropout = backward(p);
  p.options.training = false;
  const Backward without = backward(p);
  EXPECT_GT((with_dropout.parameters.w_q() - without.parameters.w_q()).norm(), 1e-3);
}

// softmax(s + c) = softmax(s) for a constant c per row, and b^K adds q·b^K to every score of the
// row q: so b^K never changes the output, and its gradient is zero (up to rounding).
TEST(Gradients, KeyBiasHasNoGradientBecauseSoftmaxIgnoresShifts) {
  Problem p(with(config(6, 2), [](auto& c) { c.bias = true; }), {5}, {7});
  p.options.causal = true;
  const Backward g = backward(p);
  EXPECT_LT(g.parameters.b_k().cwiseAbs().maxCoeff(), 1e-14 * g.parameters.b_q().cwiseAbs().maxCoeff());
  EXPECT_GT(g.parameters.b_q().cwiseAbs().maxCoeff(), 1e-3);
}

TEST(Gradients, ExplicitScaleMatchesFiniteDifferences) {
  Problem p(config(6, 2), {4}, {5});
  p.options.scale = 0.9;
  expect_gradients_match_finite_differences(p);
}

// Query and key blocks are 256 × 512: the tile-boundary checks take rows and keys on both sides of
// the boundaries, and check the entries next to them (every third column of the first and last
// rows and rows 255, 256, 511, 512) and a spread of others.
std::vector<Index> near_tile_boundaries(const Eigen::Ref<const Matrix>& m) {
  std::vector<Index> rows = {0, m.rows() - 1};
  for (const Index r : {255, 256, 511, 512})
    if (r < m.rows()) rows.push_back(r);
  std::vector<Index> entries;
  for (const Index r : rows)
    for (Index c = 0; c < m.cols(); c += 3) entries.push_back(c * m.rows() + r);
  for (Index e = 7; e < m.size(); e += m.size() / 5 + 1) entries.push_back(e);
  return entries;
}

TEST(Gradients, MatchFiniteDifferencesAcrossTileBoundaries) {
  for (const bool causal : {false, true}) {
    Problem p(config(4, 2), {300}, {530});
    p.options.causal = true;
    p.options.causal = causal;
    p.options.alignment = mha::CausalAlignment::bottom_right;
    SCOPED_TRACE(causal ? "causal" : "not causal");
    expect_gradients_match_finite_differences(p, near_tile_boundaries);
  }
}

// Grouped-query attention, rotary, a window and biases together, in a batch and across the tiles.
// (Each of them alone is checked in its own program: test_grouped_query_attention, test_rotary,
// test_sliding_window.)
TEST(DecodingGradients, EverythingTogetherMatchesFiniteDifferencesAcrossTileBoundaries) {
  const auto c = with(rotary(decoder_config(8, 4, 2), mha::RotaryPairs::halves), [](auto& cfg) { cfg.bias = true; });
  for (const Index window : {5, 300}) {
    Problem p(c, {300, 4}, {530, 6});
    p.options = options_of(true, mha::CausalAlignment::bottom_right, window);
    SCOPED_TRACE("window " + std::to_string(window));
    expect_gradients_match_finite_differences(p, near_tile_boundaries);
  }
}

TEST(Gradients, FullyMaskedRowHasZeroGradientsAndNoNaN) {
  BoolMatrix blocked = BoolMatrix::Zero(4, 5);
  blocked.row(2).setConstant(true);
  Problem p(config(6, 2), {4}, {5});
  p.options.mask = mha::AttentionMask::blocked(blocked);
  const Backward g = backward(p);
  EXPECT_TRUE(g.inputs.query.allFinite());
  EXPECT_TRUE(g.inputs.key.allFinite());
  EXPECT_TRUE(g.parameters.w_q().allFinite());
  EXPECT_EQ(g.inputs.query.row(2).cwiseAbs().maxCoeff(), 0.0);  // its output is 0 whatever its query
  expect_gradients_match_finite_differences(p);
}

TEST(Gradients, EmptyInputsGiveEmptyOrZeroGradients) {
  for (const auto& [L, S] : {std::pair<Index, Index>{0, 4}, {3, 0}, {0, 0}}) {
    Problem p(config(6, 2), {L}, {S});
    const Backward g = backward(p);
    EXPECT_EQ(g.inputs.query.rows(), L);
    EXPECT_EQ(g.inputs.key.rows(), S);
    EXPECT_EQ(g.inputs.value.rows(), S);
    // With no keys the output is b^O only (here no bias): W^O still sees a zero concatenation.
    for (const auto& grad : g.parameters.parameters()) EXPECT_EQ(grad.value.cwiseAbs().maxCoeff(), 0.0) << grad.name;
  }
}

TEST(Gradients, BackwardAddsIntoTheGradients) {
  Problem p(config(6, 2), {4}, {5});
  mha::Tape<double> tape;
  p.forward(&tape);
  auto grads = p.attn.zero_gradients();
  p.attn.backward(tape, p.d_output, grads);
  const Matrix once = grads.w_k();
  p.attn.backward(tape, p.d_output, grads);
  EXPECT_TRUE(close(grads.w_k(), 2 * once, 1e-15));
  grads.set_zero();
  EXPECT_EQ(grads.w_k().cwiseAbs().maxCoeff(), 0.0);
}

TEST(Gradients, PerHeadViewsOfTheGradientsAreTheHeadsColumnBlocks) {
  Problem p(config(6, 3), {4}, {5});
  const Backward g = backward(p);
  for (Index i = 0; i < 3; ++i) {
    EXPECT_EQ(g.parameters.w_q(i), g.parameters.w_q().middleCols(2 * i, 2));
    EXPECT_EQ(g.parameters.w_v(i), g.parameters.w_v().middleCols(2 * i, 2));
  }
  // Head 1's W^Q gradient by finite differences through the per-head view.
  auto view = p.attn.w_q(1);
  const Matrix expected = g.parameters.w_q(1);
  for (Index c = 0; c < view.cols(); ++c)
    for (Index r = 0; r < view.rows(); ++r) EXPECT_NEAR(p.derivative(view(r, c)), expected(r, c), 1e-8);
}

TEST(Gradients, TapeForwardGivesTheInferenceOutput) {
  Problem p(with(config(6, 2),
                 [](auto& c) {
                   c.bias = true;
                   c.add_zero_attn = true;
                 }),
            {5, 3}, {4, 6});
  p.options.causal = true;
  mha::Tape<double> tape;
  EXPECT_TRUE(tape.empty());
  EXPECT_EQ(p.forward(&tape), p.forward());  // bit for bit
  EXPECT_FALSE(tape.empty());
  tape.clear();
  EXPECT_TRUE(tape.empty());
}

TEST(Gradients, AreBitIdenticalForAnyThreadCount) {
  MHA_TEST_SKIP_WITHOUT_OPENMP();
  // The backward's attention, two sequences × four heads, is eight tasks of 17 Mflop in all (2.5
  // times the forward's 6.9): four threads' worth of kMinFlopsPerThread. The forward's 6.9 Mflop
  // stay on one thread, so the team checked is the backward's.
  Problem p(config(16, 4), {300, 40}, {280, 600});
  p.options.causal = true;
  use_threads(1);
  const Backward one = backward(p);
  use_threads(2);
  const Backward two = backward(p);
  EXPECT_EQ(mha::detail::largest_team(), 2) << "the backward did not run on two threads";
  mha::set_num_threads(0);
  EXPECT_EQ(one.inputs.query, two.inputs.query);
  EXPECT_EQ(one.inputs.key, two.inputs.key);
  EXPECT_EQ(one.inputs.value, two.inputs.value);
  EXPECT_EQ(one.parameters.w_q(), two.parameters.w_q());
  EXPECT_EQ(one.parameters.w_o(), two.parameters.w_o());
}

// The tape holds the inputs, their projections, the concatenation and one log-sum-exp per row
// and head: linear in L and S. At L = S = 2000 an L × S matrix alone would be 32 MB.
TEST(Gradients, TapeHoldsNothingQuadratic) {
  mha::MultiHeadAttention<double> attn(config(16, 4));
  const Index N = 2000;
  const Matrix x = random_matrix<double>(N, 16, 1);
  mha::Tape<double> tape;
  attn.forward(x, mha_test::causal_if(true), tape);
  // x (N × 16), q, k, v (N × 16 each), concat (N × 16), log-sum-exp (N × 4).
  EXPECT_EQ(tape.bytes(), static_cast<std::size_t>(N * (16 * 5 + 4)) * sizeof(double));
}

TEST(Gradients, BadCallsAreRejectedWithTheShapes) {
  mha::MultiHeadAttention<double> attn(config(6, 2));
  auto grads = attn.zero_gradients();
  mha::Tape<double> tape;
  const Matrix x = random_matrix<double>(4, 6, 1);
  EXPECT_EQ(error_of([&] { attn.backward(tape, x, grads); }),
            "mha: MultiHeadAttention::backward: the tape is empty; record a forward(…, tape) first");
  attn.forward(x, {}, tape);
  EXPECT_EQ(error_of([&] { attn.backward(tape, Matrix(3, 6), grads); }),
            "mha: MultiHeadAttention::backward: d_output is 3 x 6 but the forward's output was 4 x 6");
  mha::MultiHeadAttention<double> other(config(6, 3));
  auto other_grads = other.zero_gradients();
  EXPECT_EQ(error_of([&] { attn.backward(tape, x, other_grads); }),
            "mha: MultiHeadAttention::backward: gradients are for a module of another shape (d_model 6, num_heads 3, "
            "d_k 2, d_v 2, kdim 6, vdim 6) than this one (d_model 6, num_heads 2, d_k 3, d_v 3, kdim 6, vdim 6); "
            "use zero_gradients()");
  EXPECT_EQ(error_of([&] { other.backward(tape, x, other_grads); }),
            "mha: MultiHeadAttention::backward: the tape was recorded by a module of another shape (d_model 6, "
            "num_heads 2, d_k 3, d_v 3, kdim 6, vdim 6) than this one (d_model 6, num_heads 3, d_k 2, d_v 2, kdim 6, "
            "vdim 6)");
  mha::InputGradients<double> d{Matrix(2, 6), Matrix(3, 6), Matrix(3, 6)};
  EXPECT_EQ(error_of([&] { d.self_attention(); }),
            "mha: InputGradients::self_attention: query is 2 x 6, key is 3 x 6 and value is 3 x 6; self-attention "
            "needs the same shape for all three");
}

// Float gradients follow the double ones to float's precision (PyTorch's own f32 gradients are
// checked against fixtures in test_pytorch_gradients).
TEST(Gradients, FloatFollowsDouble) {
  const auto cfg = with(config(32, 4), [](auto& c) { c.bias = true; });
  mha::MultiHeadAttention<double> attn_d(cfg);
  mha::MultiHeadAttention<float> attn_f(cfg);
  for (auto& p : attn_d.parameters()) p.value = random_matrix<double>(p.value.rows(), p.value.cols(), 7) / 4;
  auto pf = attn_f.parameters();
  const auto pd = attn_d.parameters();
  for (std::size_t i = 0; i < pf.size(); ++i) pf[i].value = pd[i].value.cast<float>();
  const Matrix x = random_matrix<double>(700, 32, 3), dy = random_matrix<double>(700, 32, 4);
  mha::Tape<double> tape_d;
  mha::Tape<float> tape_f;
  attn_d.forward(x, mha_test::causal_if(true), tape_d);
  attn_f.forward(Eigen::MatrixXf(x.cast<float>()), mha_test::causal_if(true), tape_f);
  auto gd = attn_d.zero_gradients();
  auto gf = attn_f.zero_gradients();
  const auto dd = attn_d.backward(tape_d, dy, gd);
  const auto df = attn_f.backward(tape_f, Eigen::MatrixXf(dy.cast<float>()), gf);
  EXPECT_TRUE(close(df.self_attention(), dd.self_attention(), 1e-4));
  const auto gfs = gf.parameters();
  const auto gds = gd.parameters();
  // Relative to the largest gradient entry: b^K's is zero up to rounding (see above).
  double largest = 0;
  for (const auto& g : gds) largest = std::max(largest, g.value.cwiseAbs().maxCoeff());
  for (std::size_t i = 0; i < gfs.size(); ++i)
    EXPECT_LE((gfs[i].value.cast<double>() - gds[i].value).cwiseAbs().maxCoeff(), 1e-4 * largest) << gds[i].name;
}

}  // namespace
