// Masks: the three conventions, per-head and shared masks, key padding, both causal alignments,
// fully masked rows, skipped tiles, and the attention weights, against the literal reference.
#include <mha/mha.hpp>

#include "reference/reference_attention.hpp"
#include "test_util.hpp"

#include <limits>
#include <random>
#include <vector>

namespace {

using mha_test::BoolMatrix;
using mha_test::close;
using mha_test::config;
using mha_test::error_of;
using mha_test::Matrix;
using mha_test::random_matrix;
using mha_test::tolerance;

template <typename Scalar>
class Masks : public ::testing::Test {};
TYPED_TEST_SUITE(Masks, mha_test::Scalars, mha_test::ScalarNames);

/// A rows × cols boolean matrix, each entry true with probability `p`.
BoolMatrix random_bools(Eigen::Index rows, Eigen::Index cols, double p, std::uint64_t seed) {
  std::mt19937_64 engine(seed);
  BoolMatrix m(rows, cols);
  for (Eigen::Index j = 0; j < cols; ++j)
    for (Eigen::Index i = 0; i < rows; ++i) m(i, j) = static_cast<double>(engine() >> 11) * 0x1.0p-53 < p;
  return m;
}

/// The additive form of a blocked mask: −∞ where true, 0 elsewhere.
template <typename Scalar>
Matrix<Scalar> additive(const BoolMatrix& blocked) {
  return blocked.select(
      Matrix<Scalar>::Constant(blocked.rows(), blocked.cols(), -std::numeric_limits<Scalar>::infinity()),
      Matrix<Scalar>::Zero(blocked.rows(), blocked.cols()));
}

TYPED_TEST(Masks, SharedPerHeadAndPaddingMasksEqualTheReferenceAcrossTiles) {
  const mha::MultiHeadAttention<TypeParam> attn(config(24, 3));
  const Eigen::Index sizes[][2] = {{1, 1}, {5, 9}, {257, 300}, {70, 1030}, {600, 513}};
  for (const auto& size : sizes) {
    const Eigen::Index L = size[0], S = size[1];
    const Matrix<TypeParam> query = random_matrix<TypeParam>(L, 24, L), kv = random_matrix<TypeParam>(S, 24, S);
    const BoolMatrix shared = random_bools(L, S, 0.3, 1), per_head = random_bools(3 * L, S, 0.3, 2),
                     padding = random_bools(1, S, 0.2, 3);
    for (const bool causal : {false, true})
      for (const bool bottom_right : {false, true})
        for (const bool heads : {false, true}) {
          mha::AttentionOptions options;
          options.causal = causal;
          options.alignment = bottom_right ? mha::CausalAlignment::bottom_right : mha::CausalAlignment::top_left;
          options.mask = mha::AttentionMask::blocked(heads ? per_head : shared);
          options.key_padding_mask = mha::AttentionMask::blocked(padding);
          mha_reference::Options<TypeParam> reference;
          reference.causal = causal;
          reference.bottom_right = bottom_right;
          for (Eigen::Index i = 0; i < (heads ? 3 : 1); ++i)
            reference.masks.push_back(additive<TypeParam>(heads ? BoolMatrix(per_head.middleRows(i * L, L)) : shared));
          reference.key_padding = additive<TypeParam>(padding);
          EXPECT_TRUE(close(attn.forward(query, kv, kv, options),
                            mha_reference::multi_head_attention_full(attn, query, kv, kv, reference),
                            tolerance<TypeParam>()))
              << "L = " << L << ", S = " << S << ", causal = " << causal << ", bottom_right = " << bottom_right
              << ", per head = " << heads;
        }
  }
}

TYPED_TEST(Masks, AllowedIsBlockedNegatedAndAdditiveInfinityIsBlocked) {
  const mha::MultiHeadAttention<TypeParam> attn(config(16, 2));
  const Matrix<TypeParam> x = random_matrix<TypeParam>(40, 16, 1);
  const BoolMatrix blocked = random_bools(40, 40, 0.4, 2);
  mha::AttentionOptions a, b, c;
  a.mask = mha::AttentionMask::blocked(blocked);
  b.mask = mha::AttentionMask::allowed(!blocked.array());  // an expression: evaluated into the mask
  const Matrix<TypeParam> minus_infinity = additive<TypeParam>(blocked);
  c.mask = mha::AttentionMask::additive(minus_infinity);
  const Matrix<TypeParam> out = attn.forward(x, a);
  EXPECT_EQ(out, attn.forward(x, b));
  EXPECT_EQ(out, attn.forward(x, c));
  EXPECT_FALSE(close(out, attn.forward(x), 1e-3));
}

TYPED_TEST(Masks, FloatMaskIsAddedToTheScaledScores) {
  // One head, identity projections: with the mask log(w) on the (all-zero) scores, the weights
  // become w / Σw.
  const Matrix<TypeParam> q = Matrix<TypeParam>::Zero(2, 3), k = random_matrix<TypeParam>(3, 3, 1);
  Matrix<TypeParam> v = Matrix<TypeParam>::Identity(3, 3), bias(2, 3);
  bias << std::log(1.0), std::log(2.0), std::log(5.0),  //
      0, -std::numeric_limits<TypeParam>::infinity(), 0;
  mha::AttentionOptions options;
  options.mask = mha::AttentionMask::additive(bias);
  Matrix<TypeParam> expected(2, 3);
  expected << 0.125, 0.25, 0.625,  //
      0.5, 0, 0.5;
  EXPECT_TRUE(close(mha::scaled_dot_product_attention(q, k, v, options), expected, tolerance<TypeParam>()));
}

TYPED_TEST(Masks, FullyMaskedRowsGiveZeroOutputsAndZeroWeights) {
  const mha::MultiHeadAttention<TypeParam> attn(config(16, 4));
  const Eigen::Index L = 7, S = 1100;  // the masked rows span three key tiles
  const Matrix<TypeParam> query = random_matrix<TypeParam>(L, 16, 1), kv = random_matrix<TypeParam>(S, 16, 2);
  BoolMatrix blocked = random_bools(L, S, 0.5, 3);
  blocked.row(2).setConstant(true);
  blocked.row(5).setConstant(true);
  mha::AttentionOptions options;
  options.mask = mha::AttentionMask::blocked(blocked);
  const auto result = attn.forward_with_weights(query, kv, kv, options, mha::AttentionWeights::per_head);
  ASSERT_TRUE(result.output.allFinite());
  // Each head outputs zeros there, so the output row is zero (no biases).
  EXPECT_TRUE(result.output.row(2).isZero(0));
  EXPECT_TRUE(result.output.row(5).isZero(0));
  for (const Matrix<TypeParam>& w : result.weights) {
    EXPECT_TRUE(w.row(2).isZero(0));
    EXPECT_TRUE(w.row(5).isZero(0));
    EXPECT_NEAR(w.row(0).sum(), 1.0, 1e-5);
    EXPECT_TRUE((blocked.array() && (w.array() != 0)).count() == 0) << "a blocked key got weight";
  }
}

TYPED_TEST(Masks, WhollyMaskedKeyTilesAreSkippedWithoutChangingTheResult) {
  const mha::MultiHeadAttention<TypeParam> attn(config(16, 2));
  const Eigen::Index L = 300, S = 3 * mha::detail::kKeyBlock;
  const Matrix<TypeParam> query = random_matrix<TypeParam>(L, 16, 1), kv = random_matrix<TypeParam>(S, 16, 2);
  BoolMatrix padding = BoolMatrix::Constant(1, S, false);
  padding.middleCols(mha::detail::kKeyBlock, mha::detail::kKeyBlock).setConstant(true);  // the middle tile
  mha::AttentionOptions options;
  options.key_padding_mask = mha::AttentionMask::blocked(padding);
  mha_reference::Options<TypeParam> reference;
  reference.key_padding = additive<TypeParam>(padding);
  EXPECT_TRUE(close(attn.forward(query, kv, kv, options),
                    mha_reference::multi_head_attention_full(attn, query, kv, kv, reference), tolerance<TypeParam>()));
}

TYPED_TEST(Masks, BottomRightCausalLetsTheLastQuerySeeEveryKey) {
  const Matrix<TypeParam> q = random_matrix<TypeParam>(3, 4, 1), k = random_matrix<TypeParam>(5, 4, 2),
                          v = random_matrix<TypeParam>(5, 2, 3);
  mha::AttentionOptions options;
  options.causal = true;
  options.alignment = mha::CausalAlignment::bottom_right;  // query i sees keys j ≤ i + 2
  const Matrix<TypeParam> out = mha::scaled_dot_product_attention(q, k, v, options);
  for (Eigen::Index i = 0; i < 3; ++i)
    EXPECT_TRUE(close(out.row(i), mha::scaled_dot_product_attention(q.row(i), k.topRows(i + 3), v.topRows(i + 3)),
                      tolerance<TypeParam>()))
        << "query " << i;
  // More queries than keys: the first L − S queries see no key at all and give zeros.
  const Matrix<TypeParam> many = random_matrix<TypeParam>(8, 4, 4);
  const Matrix<TypeParam> out2 = mha::scaled_dot_product_attention(many, k, v, options);
  EXPECT_TRUE(out2.topRows(3).isZero(0));
  EXPECT_TRUE(close(out2.row(3), mha::scaled_dot_product_attention(many.row(3), k.topRows(1), v.topRows(1)),
                    tolerance<TypeParam>()));
}

TYPED_TEST(Masks, WeightsAreTheSoftmaxOfEachHeadAndTheirMean) {
  const mha::MultiHeadAttention<TypeParam> attn(config(24, 3));
  const Matrix<TypeParam> query = random_matrix<TypeParam>(300, 24, 1), kv = random_matrix<TypeParam>(700, 24, 2);
  for (const bool causal : {false, true}) {
    mha::AttentionOptions options;
    options.causal = causal;
    const auto per_head = attn.forward_with_weights(query, kv, kv, options, mha::AttentionWeights::per_head);
    const auto averaged = attn.forward_with_weights(query, kv, kv, options, mha::AttentionWeights::averaged);
    std::vector<Matrix<TypeParam>> expected;
    mha_reference::Options<TypeParam> reference;
    reference.causal = causal;
    const Matrix<TypeParam> out = mha_reference::multi_head_attention_full(attn, query, kv, kv, reference, &expected);
    EXPECT_TRUE(close(per_head.output, out, tolerance<TypeParam>()));
    EXPECT_EQ(per_head.output, attn.forward(query, kv, kv, options));
    ASSERT_EQ(per_head.weights.size(), 3u);
    ASSERT_EQ(averaged.weights.size(), 1u);
    Matrix<TypeParam> mean = Matrix<TypeParam>::Zero(300, 700);
    for (std::size_t i = 0; i < 3; ++i) {
      EXPECT_TRUE(close(per_head.weights[i], expected[i], tolerance<TypeParam>())) << "head " << i;
      EXPECT_TRUE(close(per_head.weights[i].rowwise().sum(), Matrix<TypeParam>::Ones(300, 1), tolerance<TypeParam>()));
      mean += expected[i] / TypeParam(3);
    }
    EXPECT_TRUE(close(averaged.weights[0], mean, tolerance<TypeParam>()));
  }
}

TYPED_TEST(Masks, WrongMaskShapesAreRejected) {
  const mha::MultiHeadAttention<TypeParam> attn(config(8, 2));
  const Matrix<TypeParam> x = random_matrix<TypeParam>(4, 8, 1);
  const BoolMatrix wrong(3, 4), padding(2, 4);
  mha::AttentionOptions options;
  options.mask = mha::AttentionMask::blocked(wrong);
  EXPECT_EQ(error_of([&] { attn.forward(x, options); }),
            "mha: MultiHeadAttention::forward: options.mask is 3 x 4 but must be L x S = 4 x 4 (or h*L x S = 8 x 4 "
            "for one mask per head)");
  options.mask = mha::AttentionMask();
  options.key_padding_mask = mha::AttentionMask::blocked(padding);
  EXPECT_EQ(error_of([&] { attn.forward(x, options); }),
            "mha: MultiHeadAttention::forward: options.key_padding_mask is 2 x 4 but must be B x S = 1 x 4 (one row "
            "per sequence)");
  EXPECT_EQ(error_of([&] { mha::scaled_dot_product_attention(x, x, x, options); }),
            "mha: scaled_dot_product_attention: options.key_padding_mask is 2 x 4 but must be 1 x S = 1 x 4");
}

}  // namespace
