// Properties of mha::MultiHeadAttention: parameters, and forward against the oracle (the checks of its
// configuration are in test_config.cpp).
#include <mha/mha.hpp>

#include "reference/reference_attention.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace {

using mha_test::causal_if;
using mha_test::close;
using mha_test::config;
using mha_test::error_of;
using mha_test::Matrix;
using mha_test::random_matrix;
using mha_test::tolerance;

template <typename Scalar>
class MultiHeadAttention : public ::testing::Test {};
TYPED_TEST_SUITE(MultiHeadAttention, mha_test::Scalars, mha_test::ScalarNames);

// --- parameters -------------------------------------------------------------------------------

TYPED_TEST(MultiHeadAttention, ParametersHaveTheLectureShapes) {
  mha::MultiHeadAttention<TypeParam> attn(config(12, 3, 5, 7));
  EXPECT_EQ(attn.d_model(), 12);
  EXPECT_EQ(attn.num_heads(), 3);
  for (Eigen::Index i = 0; i < 3; ++i) {
    EXPECT_EQ(attn.w_q(i).rows(), 12);
    EXPECT_EQ(attn.w_q(i).cols(), 5);
    EXPECT_EQ(attn.w_k(i).cols(), 5);
    EXPECT_EQ(attn.w_v(i).rows(), 12);
    EXPECT_EQ(attn.w_v(i).cols(), 7);
  }
  EXPECT_EQ(attn.w_q().cols(), 15);
  EXPECT_EQ(attn.w_v().cols(), 21);
  EXPECT_EQ(attn.w_o().rows(), 21);
  EXPECT_EQ(attn.w_o().cols(), 12);
}

TYPED_TEST(MultiHeadAttention, HeadViewsAreColumnBlocksOfOneMatrixAndWritable) {
  mha::MultiHeadAttention<TypeParam> attn(config(8, 2));
  EXPECT_EQ(Matrix<TypeParam>(attn.w_k(1)), Matrix<TypeParam>(attn.w_k().middleCols(4, 4)));
  attn.w_q(1).setConstant(TypeParam(0.25));
  attn.w_v(0)(2, 3) = TypeParam(7);
  attn.w_o()(5, 6) = TypeParam(-3);
  EXPECT_TRUE((attn.w_q().middleCols(4, 4).array() == TypeParam(0.25)).all());
  EXPECT_EQ(attn.w_v()(2, 3), TypeParam(7));
  const auto& const_attn = attn;
  EXPECT_EQ(const_attn.w_v(0)(2, 3), TypeParam(7));
  EXPECT_EQ(const_attn.w_o()(5, 6), TypeParam(-3));
}

TYPED_TEST(MultiHeadAttention, HeadIndexOutOfRangeIsRejected) {
  mha::MultiHeadAttention<TypeParam> attn(config(8, 2));
  const auto& const_attn = attn;
  EXPECT_EQ(error_of([&] { attn.w_q(2); }),
            "mha: w_q(2): head index out of range; the module has num_heads = 2 (valid heads 0 to 1)");
  EXPECT_EQ(error_of([&] { attn.w_k(-1); }),
            "mha: w_k(-1): head index out of range; the module has num_heads = 2 (valid heads 0 to 1)");
  EXPECT_EQ(error_of([&] { const_attn.w_v(5); }),
            "mha: w_v(5): head index out of range; the module has num_heads = 2 (valid heads 0 to 1)");
}

TYPED_TEST(MultiHeadAttention, InitialisationIsSeededXavierUniform) {
  const mha::MultiHeadAttention<TypeParam> a(config(64, 4, 0, 0, 7)), b(config(64, 4, 0, 0, 7)),
      c(config(64, 4, 0, 0, 8));
  EXPECT_EQ(Matrix<TypeParam>(a.w_q()), Matrix<TypeParam>(b.w_q()));
  EXPECT_EQ(Matrix<TypeParam>(a.w_o()), Matrix<TypeParam>(b.w_o()));
  EXPECT_NE(Matrix<TypeParam>(a.w_q()), Matrix<TypeParam>(c.w_q()));
  EXPECT_NE(Matrix<TypeParam>(a.w_q()), Matrix<TypeParam>(a.w_k()));
  // U(−a, a) with a = √(6 / (fan_in + fan_out)): every weight within a, standard deviation a/√3.
  const double bound = std::sqrt(6.0 / (64 + 64));
  for (const Matrix<TypeParam>& w : {Matrix<TypeParam>(a.w_q()), Matrix<TypeParam>(a.w_k()), Matrix<TypeParam>(a.w_v()),
                                     Matrix<TypeParam>(a.w_o())}) {
    EXPECT_LE(w.cwiseAbs().maxCoeff(), bound);
    EXPECT_GT(w.cwiseAbs().maxCoeff(), 0.99 * bound);
    const double mean = w.template cast<double>().mean();
    const double sd = std::sqrt((w.template cast<double>().array() - mean).square().mean());
    EXPECT_NEAR(mean, 0.0, 0.02);
    EXPECT_NEAR(sd, bound / std::sqrt(3.0), 0.02);
  }
}

// --- forward ----------------------------------------------------------------------------------

TYPED_TEST(MultiHeadAttention, HandCheckableTwoHeadExample) {
  // d_model = 2, two heads of width 1: with identity projections head i attends over feature i
  // alone, and W^O swaps the two heads' columns.
  mha::MultiHeadAttention<TypeParam> attn(config(2, 2));
  attn.w_q().setIdentity();
  attn.w_k().setIdentity();
  attn.w_v().setIdentity();
  attn.w_o() << 0, 1,  //
      1, 0;
  Matrix<TypeParam> x(2, 2);
  x << 0, 2,  //
      1, 0;
  // head 1 (feature 0 = (0, 1)): row 0 scores (0, 0) → ½·0 + ½·1 = 0.5;
  //                              row 1 scores (0, 1) → e/(1+e) = 0.7310585786300049.
  // head 2 (feature 1 = (2, 0)): row 0 scores (4, 0) → 2·e⁴/(1+e⁴) = 1.9640275800758169;
  //                              row 1 scores (0, 0) → ½·2 + ½·0 = 1.
  Matrix<TypeParam> expected(2, 2);
  expected << 1.9640275800758169, 0.5,  //
      1.0, 0.7310585786300049;
  EXPECT_TRUE(close(attn.forward(x), expected, tolerance<TypeParam>()));
}

TYPED_TEST(MultiHeadAttention, OneFullWidthHeadIsSingleHeadAttentionOnTheProjectedInputs) {
  const mha::MultiHeadAttention<TypeParam> attn(config(16, 1, 16, 16, 3));
  const Matrix<TypeParam> q = random_matrix<TypeParam>(9, 16, 1), kv = random_matrix<TypeParam>(13, 16, 2);
  for (const bool causal : {false, true}) {
    const Matrix<TypeParam> single =
        mha::scaled_dot_product_attention(q * attn.w_q(), kv * attn.w_k(), kv * attn.w_v(), causal_if(causal));
    EXPECT_TRUE(close(attn.forward(q, kv, kv, causal_if(causal)), single * attn.w_o(), tolerance<TypeParam>()));
  }
}

TYPED_TEST(MultiHeadAttention, EqualsTheLiteralReferenceOverASweep) {
  const Eigen::Index lengths[] = {1, 2, 7, 64, 65, 257};
  int cases = 0;
  for (const Eigen::Index h : {1, 2, 3, 4, 8, 16}) {
    const Eigen::Index d_model = 48;
    const mha::MultiHeadAttention<TypeParam> attn(config(d_model, h, 5, 7, h));  // d_k ≠ d_v
    for (const Eigen::Index L : lengths)
      for (const Eigen::Index S : lengths) {
        const Matrix<TypeParam> query = random_matrix<TypeParam>(L, d_model, 10 * L + S);
        const Matrix<TypeParam> key = random_matrix<TypeParam>(S, d_model, 10 * L + S + 1);
        const Matrix<TypeParam> value = random_matrix<TypeParam>(S, d_model, 10 * L + S + 2);
        for (const bool causal : {false, true}) {
          EXPECT_TRUE(close(attn.forward(query, key, value, causal_if(causal)),
                            mha_reference::multi_head_attention(attn, query, key, value, causal),
                            tolerance<TypeParam>()))
              << "h = " << h << ", L = " << L << ", S = " << S << ", causal = " << causal;
          ++cases;
        }
      }
  }
  EXPECT_EQ(cases, 6 * 6 * 6 * 2);
}

TYPED_TEST(MultiHeadAttention, TiledKernelEqualsTheReferenceAcrossBlockBoundaries) {
  // For each tile size B of the kernel: 1, B − 1, B, B + 1 and 2B + 3 query and key rows.
  std::vector<Eigen::Index> sizes = {1};
  for (const Eigen::Index b : {mha::detail::kQueryBlock, mha::detail::kKeyBlock})
    for (const Eigen::Index n : {b - 1, b, b + 1, 2 * b + 3}) sizes.push_back(n);
  for (const Eigen::Index h : {1, 3, 8}) {
    const mha::MultiHeadAttention<TypeParam> attn(config(24, h, 5, 7, h));
    for (const Eigen::Index L : sizes)
      for (const Eigen::Index S : sizes) {
        const Matrix<TypeParam> query = random_matrix<TypeParam>(L, 24, 7 * L + S);
        const Matrix<TypeParam> key = random_matrix<TypeParam>(S, 24, 7 * L + S + 1);
        const Matrix<TypeParam> value = random_matrix<TypeParam>(S, 24, 7 * L + S + 2);
        for (const bool causal : {false, true})
          EXPECT_TRUE(close(attn.forward(query, key, value, causal_if(causal)),
                            mha_reference::multi_head_attention(attn, query, key, value, causal),
                            tolerance<TypeParam>()))
              << "h = " << h << ", L = " << L << ", S = " << S << ", causal = " << causal;
      }
  }
}

TYPED_TEST(MultiHeadAttention, SelfAttentionWithDefaultHeadSizesEqualsTheReference) {
  for (const Eigen::Index h : {1, 2, 4, 8, 16}) {
    const mha::MultiHeadAttention<TypeParam> attn(config(64, h, 0, 0, 100 + h));
    for (const Eigen::Index n : {1, 63, 64, 65, 130}) {
      const Matrix<TypeParam> x = random_matrix<TypeParam>(n, 64, n);
      for (const bool causal : {false, true})
        EXPECT_TRUE(close(attn.forward(x, causal_if(causal)),
                          mha_reference::multi_head_attention(attn, x, x, x, causal), tolerance<TypeParam>()))
            << "h = " << h << ", n = " << n << ", causal = " << causal;
    }
  }
}

TYPED_TEST(MultiHeadAttention, ScaleOptionReplacesOneOverSqrtDk) {
  const mha::MultiHeadAttention<TypeParam> attn(config(24, 3, 0, 0, 5));
  const Matrix<TypeParam> x = random_matrix<TypeParam>(10, 24, 1);
  mha::AttentionOptions options;
  options.scale = 0.9;
  const Matrix<TypeParam> scaled = attn.forward(x, options);
  EXPECT_TRUE(close(scaled, mha_reference::multi_head_attention(attn, x, x, x, false, 0.9), tolerance<TypeParam>()));
  EXPECT_FALSE(close(scaled, attn.forward(x), 1e-3));
}

TYPED_TEST(MultiHeadAttention, CausalOutputIgnoresFutureTokens) {
  const mha::MultiHeadAttention<TypeParam> attn(config(32, 4, 0, 0, 9));
  const Eigen::Index n = 140;
  const Matrix<TypeParam> x = random_matrix<TypeParam>(n, 32, 1);
  const Matrix<TypeParam> out = attn.forward(x, causal_if(true));
  for (const Eigen::Index r : {0, 5, 64, 100}) {
    Matrix<TypeParam> changed = x;
    changed.bottomRows(n - r - 1) = 3 * random_matrix<TypeParam>(n - r - 1, 32, r);
    const Matrix<TypeParam> out2 = attn.forward(changed, causal_if(true));
    EXPECT_TRUE(close(out2.topRows(r + 1), out.topRows(r + 1), tolerance<TypeParam>())) << "r = " << r;
    EXPECT_FALSE(close(out2.bottomRows(n - r - 1), out.bottomRows(n - r - 1), 1e-3)) << "r = " << r;
  }
}

TYPED_TEST(MultiHeadAttention, PermutingQueryRowsPermutesOutputRows) {
  const mha::MultiHeadAttention<TypeParam> attn(config(32, 4, 0, 0, 2));
  const Matrix<TypeParam> query = random_matrix<TypeParam>(67, 32, 1), kv = random_matrix<TypeParam>(20, 32, 2);
  Eigen::PermutationMatrix<Eigen::Dynamic> perm(67);
  perm.setIdentity();
  std::reverse(perm.indices().data(), perm.indices().data() + 67);
  EXPECT_TRUE(close(attn.forward(perm * query, kv, kv), perm * attn.forward(query, kv, kv), tolerance<TypeParam>()));
}

TYPED_TEST(MultiHeadAttention, PermutingKeyAndValueRowsTogetherChangesNothing) {
  const mha::MultiHeadAttention<TypeParam> attn(config(32, 4, 0, 0, 2));
  const Matrix<TypeParam> query = random_matrix<TypeParam>(9, 32, 1), key = random_matrix<TypeParam>(270, 32, 2),
                          value = random_matrix<TypeParam>(270, 32, 3);
  Eigen::PermutationMatrix<Eigen::Dynamic> perm(270);
  perm.setIdentity();
  std::reverse(perm.indices().data(), perm.indices().data() + 270);
  std::swap(perm.indices()(1), perm.indices()(200));
  EXPECT_TRUE(
      close(attn.forward(query, perm * key, perm * value), attn.forward(query, key, value), tolerance<TypeParam>()));
}

TYPED_TEST(MultiHeadAttention, SelfAttentionIsForwardWithQueryKeyAndValueEqual) {
  const mha::MultiHeadAttention<TypeParam> attn(config(16, 2, 0, 0, 4));
  const Matrix<TypeParam> x = random_matrix<TypeParam>(11, 16, 1);
  EXPECT_EQ(attn.forward(x, causal_if(true)), attn.forward(x, x, x, causal_if(true)));
}

TYPED_TEST(MultiHeadAttention, AcceptsRowMajorMapsBlocksAndExpressions) {
  const mha::MultiHeadAttention<TypeParam> attn(config(16, 4, 0, 0, 4));
  const Matrix<TypeParam> q = random_matrix<TypeParam>(7, 16, 1), kv = random_matrix<TypeParam>(12, 16, 2);
  const Matrix<TypeParam> expected = attn.forward(q, kv, kv);

  using RowMajor = Eigen::Matrix<TypeParam, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const RowMajor q_rm = q, kv_rm = kv;
  EXPECT_TRUE(close(attn.forward(q_rm, kv_rm, kv_rm), expected, tolerance<TypeParam>()));

  std::vector<TypeParam> buffer(q_rm.data(), q_rm.data() + q_rm.size());  // a caller's row-major buffer
  const Eigen::Map<const RowMajor> q_map(buffer.data(), 7, 16);
  EXPECT_TRUE(close(attn.forward(q_map, kv, kv), expected, tolerance<TypeParam>()));

  Matrix<TypeParam> big = Matrix<TypeParam>::Zero(30, 20);
  big.block(5, 3, 12, 16) = kv;
  EXPECT_TRUE(
      close(attn.forward(q, big.block(5, 3, 12, 16), big.block(5, 3, 12, 16)), expected, tolerance<TypeParam>()));
  EXPECT_TRUE(close(attn.forward(q + Matrix<TypeParam>::Zero(7, 16), kv, kv), expected, tolerance<TypeParam>()));
}

TYPED_TEST(MultiHeadAttention, EmptyQueryGivesAnEmptyOutput) {
  const mha::MultiHeadAttention<TypeParam> attn(config(8, 2));
  const Matrix<TypeParam> out =
      attn.forward(Matrix<TypeParam>(0, 8), random_matrix<TypeParam>(3, 8, 1), random_matrix<TypeParam>(3, 8, 2));
  EXPECT_EQ(out.rows(), 0);
  EXPECT_EQ(out.cols(), 8);
  EXPECT_EQ(attn.forward(Matrix<TypeParam>(0, 8), causal_if(true)).rows(), 0);
}

TYPED_TEST(MultiHeadAttention, NoKeysGiveZeroOutputs) {
  const mha::MultiHeadAttention<TypeParam> attn(config(8, 2));
  for (const bool causal : {false, true}) {
    const Matrix<TypeParam> out = attn.forward(random_matrix<TypeParam>(4, 8, 1), Matrix<TypeParam>(0, 8),
                                               Matrix<TypeParam>(0, 8), causal_if(causal));
    EXPECT_EQ(out.rows(), 4);
    EXPECT_EQ(out.cols(), 8);
    EXPECT_TRUE(out.isZero(0));
  }
}

TYPED_TEST(MultiHeadAttention, RejectsInputsOfTheWrongShapeWithAClearMessage) {
  const mha::MultiHeadAttention<TypeParam> attn(config(8, 2));
  const Matrix<TypeParam> good = random_matrix<TypeParam>(3, 8, 1);
  EXPECT_EQ(error_of([&] { attn.forward(Matrix<TypeParam>(3, 7), good, good); }),
            "mha: MultiHeadAttention::forward: query is 3 x 7 but d_model is 8; query needs 8 columns");
  EXPECT_EQ(error_of([&] { attn.forward(good, Matrix<TypeParam>(3, 9), good); }),
            "mha: MultiHeadAttention::forward: key is 3 x 9 but d_model is 8; key needs 8 columns");
  EXPECT_EQ(error_of([&] { attn.forward(good, good, Matrix<TypeParam>(3, 4)); }),
            "mha: MultiHeadAttention::forward: value is 3 x 4 but d_model is 8; value needs 8 columns");
  EXPECT_EQ(error_of([&] { attn.forward(good, good, random_matrix<TypeParam>(5, 8, 2)); }),
            "mha: MultiHeadAttention::forward: key has 3 rows but value has 5 (key is 3 x 8, value is 5 x 8)");
  EXPECT_EQ(error_of([&] { attn.forward(Matrix<TypeParam>(3, 2)); }),
            "mha: MultiHeadAttention::forward: query is 3 x 2 but d_model is 8; query needs 8 columns");
  mha::AttentionOptions options;
  options.scale = std::numeric_limits<double>::infinity();
  EXPECT_EQ(error_of([&] { attn.forward(good, options); }), "mha: options.scale must be finite, got inf");
}

// --- forward into a workspace --------------------------------------------------------------------

/// One workspace and one output, reused by forwards of growing and shrinking shapes, of modules of
/// other head sizes, with and without masks, extra keys and batches, on one thread and on two: each
/// gives forward()'s numbers bit for bit (nothing left in the workspace by the forward before, or
/// sized for it, changes a result).
TYPED_TEST(MultiHeadAttention, ForwardIntoAWorkspaceEqualsForwardBitForBit) {
  using M = Matrix<TypeParam>;
  auto grouped = mha_test::rotary(mha_test::decoder_config(32, 8, 2, 0, 0, 3), mha::RotaryPairs::halves);
  grouped.bias = true;
  auto cross = config(32, 2, 24, 8, 4);
  cross.kdim = 12;
  cross.vdim = 20;
  cross.add_bias_kv = true;
  cross.add_zero_attn = true;
  const mha::MultiHeadAttention<TypeParam> plain(config(32, 4, 0, 0, 2)), gqa(grouped), crossing(cross);
  const M x = random_matrix<TypeParam>(700, 32, 1), query = random_matrix<TypeParam>(300, 32, 2),
          key = random_matrix<TypeParam>(530, 12, 3), value = random_matrix<TypeParam>(530, 20, 4);
  const M mask = random_matrix<TypeParam>(300, 530, 5);
  mha_test::BoolMatrix padding = mha_test::BoolMatrix::Constant(1, 530, false);
  padding.rightCols(100).setConstant(true);
  mha::AttentionOptions causal, window, masked;
  causal.causal = true;
  window.window = 37;
  window.causal = true;
  masked.mask = mha::AttentionMask::additive(mask);
  masked.key_padding_mask = mha::AttentionMask::blocked(padding);
  const std::vector<Eigen::Index> ragged{300, 1, 399}, ragged_keys{200, 130, 200};
  for (const int threads : {1, 2}) {
    mha::set_num_threads(threads);
    SCOPED_TRACE(std::to_string(threads) + " threads");
    M y;
    mha::ForwardWorkspace<TypeParam> workspace;
    EXPECT_EQ(workspace.bytes(), 0u);
    const auto expect_same = [&](const char* what, const M& expected, const auto& forward) {
      forward();
      EXPECT_EQ(y.rows(), expected.rows()) << what;
      EXPECT_EQ(y.cols(), expected.cols()) << what;
      EXPECT_TRUE(y.rows() == expected.rows() && (y.array() == expected.array()).all()) << what;
    };
    expect_same("700 tokens", plain.forward(x), [&] { plain.forward(x, y, workspace); });
    EXPECT_GT(workspace.bytes(), 700u * 32 * 3 * sizeof(TypeParam));
    expect_same("90 tokens, causal", plain.forward(x.topRows(90), causal),
                [&] { plain.forward(x.topRows(90), y, workspace, causal); });
    expect_same("grouped-query, rotary, a window", gqa.forward(x, window),
                [&] { gqa.forward(x, y, workspace, window); });
    expect_same("cross-attention, extra keys, masks", crossing.forward(query, key, value, masked),
                [&] { crossing.forward(query, key, value, y, workspace, masked); });
    expect_same("one token", gqa.forward(x.topRows(1), causal),
                [&] { gqa.forward(x.topRows(1), y, workspace, causal); });
    expect_same("a ragged batch", gqa.forward_batch(x, ragged, causal),
                [&] { gqa.forward_batch(x, ragged, y, workspace, causal); });
    expect_same("a ragged cross-attention batch", crossing.forward_batch(x, key, value, ragged, ragged_keys),
                [&] { crossing.forward_batch(x, key, value, ragged, ragged_keys, y, workspace); });
    expect_same("no keys", plain.forward(query, M(0, 32), M(0, 32)),
                [&] { plain.forward(query, M(0, 32), M(0, 32), y, workspace); });
    expect_same("no queries", plain.forward(M(0, 32)), [&] { plain.forward(M(0, 32), y, workspace); });
    expect_same("700 tokens again", plain.forward(x), [&] { plain.forward(x, y, workspace); });
    // A copy of a workspace starts empty, and works as well.
    mha::ForwardWorkspace<TypeParam> copy = workspace;
    EXPECT_EQ(copy.bytes(), 0u);
    expect_same("a copy", gqa.forward(x, window), [&] { gqa.forward(x, y, copy, window); });
  }
  mha::set_num_threads(0);
}

/// The output may be the query itself (or the input of self-attention): every input is read
/// before the output is written.
TYPED_TEST(MultiHeadAttention, ForwardIntoAWorkspaceMayWriteOverItsInput) {
  using M = Matrix<TypeParam>;
  const mha::MultiHeadAttention<TypeParam> attn(config(16, 4, 0, 0, 4));
  mha::ForwardWorkspace<TypeParam> workspace;
  M x = random_matrix<TypeParam>(300, 16, 1);
  const M kv = random_matrix<TypeParam>(40, 16, 2);
  const M self = attn.forward(x, causal_if(true)), cross = attn.forward(x, kv, kv);
  M y = x;
  attn.forward(y, y, workspace, causal_if(true));
  EXPECT_TRUE((y.array() == self.array()).all());
  y = x;
  attn.forward(y, kv, kv, y, workspace);
  EXPECT_TRUE((y.array() == cross.array()).all());
}

/// A rejected forward into a workspace names the argument, as forward() does, and leaves the
/// output as it was.
TYPED_TEST(MultiHeadAttention, RejectedForwardIntoAWorkspaceLeavesTheOutputUnchanged) {
  using M = Matrix<TypeParam>;
  const mha::MultiHeadAttention<TypeParam> attn(config(8, 2));
  mha::ForwardWorkspace<TypeParam> workspace;
  const M good = random_matrix<TypeParam>(3, 8, 1), before = random_matrix<TypeParam>(5, 4, 2);
  M y = before;
  EXPECT_EQ(error_of([&] { attn.forward(good, good, M(3, 4), y, workspace); }),
            "mha: MultiHeadAttention::forward: value is 3 x 4 but d_model is 8; value needs 8 columns");
  EXPECT_EQ(error_of([&] { attn.forward(M(3, 2), y, workspace); }),
            "mha: MultiHeadAttention::forward: query is 3 x 2 but d_model is 8; query needs 8 columns");
  EXPECT_EQ(error_of([&] {
              attn.forward_batch(good, {2, 2}, y, workspace);
            }),
            error_of([&] {
              attn.forward_batch(good, {2, 2});
            }));
  EXPECT_TRUE((y.array() == before.array()).all());
  EXPECT_EQ(y.rows(), 5);
}

}  // namespace
