// The module's PyTorch-parity features against the literal reference: biases, kdim/vdim,
// add_bias_kv, add_zero_attn, dropout, and batches (ragged and padded).
#include <mha/mha.hpp>

#include "reference/reference_attention.hpp"
#include "test_util.hpp"

#include <limits>
#include <vector>

namespace {

using mha_test::BoolMatrix;
using mha_test::close;
using mha_test::error_of;
using mha_test::Matrix;
using mha_test::random_matrix;
using mha_test::tolerance;

template <typename Scalar>
class ModuleFeatures : public ::testing::Test {};
TYPED_TEST_SUITE(ModuleFeatures, mha_test::Scalars, mha_test::ScalarNames);

/// A module with every optional part on, and nonzero biases.
template <typename Scalar>
mha::MultiHeadAttention<Scalar> full_module(bool bias, bool bias_kv, bool zero_attn, double dropout = 0) {
  mha::MultiHeadAttentionConfig config;
  config.d_model = 12;
  config.num_heads = 3;
  config.kdim = 5;
  config.vdim = 7;
  config.bias = bias;
  config.add_bias_kv = bias_kv;
  config.add_zero_attn = zero_attn;
  config.dropout = dropout;
  config.seed = 11;
  mha::MultiHeadAttention<Scalar> attn(config);
  if (bias) {
    attn.b_q() = random_matrix<Scalar>(1, attn.b_q().cols(), 1);
    attn.b_k() = random_matrix<Scalar>(1, attn.b_k().cols(), 2);
    attn.b_v() = random_matrix<Scalar>(1, attn.b_v().cols(), 3);
    attn.b_o() = random_matrix<Scalar>(1, attn.b_o().cols(), 4);
  }
  return attn;
}

TYPED_TEST(ModuleFeatures, BiasesKdimVdimBiasKvAndZeroAttnEqualTheReference) {
  for (const bool bias : {false, true})
    for (const bool bias_kv : {false, true})
      for (const bool zero_attn : {false, true}) {
        const auto attn = full_module<TypeParam>(bias, bias_kv, zero_attn);
        for (const Eigen::Index S : {0, 1, 9, 600}) {
          const Matrix<TypeParam> query = random_matrix<TypeParam>(6, 12, S),
                                  key = random_matrix<TypeParam>(S, 5, S + 1),
                                  value = random_matrix<TypeParam>(S, 7, S + 2);
          for (const bool causal : {false, true}) {
            mha::AttentionOptions options;
            options.causal = causal;
            mha_reference::Options<TypeParam> reference;
            reference.causal = causal;
            EXPECT_TRUE(close(attn.forward(query, key, value, options),
                              mha_reference::multi_head_attention_full(attn, query, key, value, reference),
                              tolerance<TypeParam>()))
                << "bias " << bias << ", bias_kv " << bias_kv << ", zero_attn " << zero_attn << ", S " << S
                << ", causal " << causal;
          }
        }
      }
}

TYPED_TEST(ModuleFeatures, ParameterShapesFollowKdimAndVdim) {
  const auto attn = full_module<TypeParam>(true, true, false);
  EXPECT_EQ(attn.w_k(0).rows(), 5);
  EXPECT_EQ(attn.w_v(2).rows(), 7);
  EXPECT_EQ(attn.b_q().cols(), 12);
  EXPECT_EQ(attn.b_o().cols(), 12);
  EXPECT_EQ(attn.bias_k().cols(), 12);
  EXPECT_EQ(attn.bias_v().cols(), 12);
  const auto plain = full_module<TypeParam>(false, false, false);
  EXPECT_EQ(error_of([&] { plain.b_q(); }), "mha: b_q(): the module has no biases; set config.bias = true");
  EXPECT_EQ(error_of([&] { plain.bias_v(); }),
            "mha: bias_v(): the module has no bias_k and bias_v; set config.add_bias_kv = true");
  EXPECT_EQ(error_of([&] {
              plain.forward(random_matrix<TypeParam>(2, 12, 1), random_matrix<TypeParam>(3, 12, 2),
                            random_matrix<TypeParam>(3, 7, 3));
            }),
            "mha: MultiHeadAttention::forward: key is 3 x 12 but kdim is 5; key needs 5 columns");
}

TYPED_TEST(ModuleFeatures, DropoutIsOffInInferenceAndReproducibleInTraining) {
  const auto attn = full_module<TypeParam>(true, false, false, 0.3);
  const Matrix<TypeParam> query = random_matrix<TypeParam>(40, 12, 1), key = random_matrix<TypeParam>(700, 5, 2),
                          value = random_matrix<TypeParam>(700, 7, 3);
  const auto no_dropout = full_module<TypeParam>(true, false, false, 0.0);
  mha::AttentionOptions training;
  training.training = true;
  training.dropout_seed = 5;
  EXPECT_EQ(attn.forward(query, key, value), no_dropout.forward(query, key, value));  // inference: no dropout
  const Matrix<TypeParam> a = attn.forward(query, key, value, training), b = attn.forward(query, key, value, training);
  EXPECT_EQ(a, b);
  training.dropout_seed = 6;
  EXPECT_FALSE(close(attn.forward(query, key, value, training), a, 1e-3));
  // The dropped weights: about 30% of them, and the output is the reference's with the same pattern.
  training.dropout_seed = 5;
  const auto result = attn.forward_with_weights(query, key, value, training, mha::AttentionWeights::per_head);
  EXPECT_EQ(result.output, a);
  double dropped = 0, total = 0;
  for (const Matrix<TypeParam>& w : result.weights) {
    dropped += static_cast<double>((w.array() == 0).count());
    total += static_cast<double>(w.size());
  }
  EXPECT_NEAR(dropped / total, 0.3, 0.01);
  mha_reference::Options<TypeParam> reference;
  reference.keep = [](Eigen::Index head, Eigen::Index r, Eigen::Index j) {
    const double u = mha::detail::dropout_uniform(5, static_cast<std::uint64_t>(head), static_cast<std::uint64_t>(r),
                                                  static_cast<std::uint64_t>(j));
    return u < 0.3 ? TypeParam(0) : TypeParam(1 / 0.7);
  };
  std::vector<Matrix<TypeParam>> weights;
  EXPECT_TRUE(close(a, mha_reference::multi_head_attention_full(attn, query, key, value, reference, &weights),
                    tolerance<TypeParam>()));
  for (std::size_t i = 0; i < weights.size(); ++i)
    EXPECT_TRUE(close(result.weights[i], weights[i], tolerance<TypeParam>())) << "head " << i;
}

TYPED_TEST(ModuleFeatures, RaggedBatchEqualsEachSequenceAlone) {
  const auto attn = full_module<TypeParam>(true, true, true);
  const std::vector<Eigen::Index> query_lengths = {3, 0, 300, 1, 17}, key_lengths = {5, 4, 270, 0, 600};
  Eigen::Index total_q = 0, total_k = 0;
  for (std::size_t b = 0; b < query_lengths.size(); ++b) total_q += query_lengths[b], total_k += key_lengths[b];
  const Matrix<TypeParam> query = random_matrix<TypeParam>(total_q, 12, 1),
                          key = random_matrix<TypeParam>(total_k, 5, 2),
                          value = random_matrix<TypeParam>(total_k, 7, 3);
  for (const bool causal : {false, true}) {
    mha::AttentionOptions options;
    options.causal = causal;
    options.alignment = mha::CausalAlignment::bottom_right;
    const Matrix<TypeParam> batched = attn.forward_batch(query, key, value, query_lengths, key_lengths, options);
    ASSERT_EQ(batched.rows(), total_q);
    Eigen::Index q0 = 0, k0 = 0;
    for (std::size_t b = 0; b < query_lengths.size(); ++b) {
      const Eigen::Index L = query_lengths[b], S = key_lengths[b];
      EXPECT_TRUE(close(batched.middleRows(q0, L),
                        attn.forward(query.middleRows(q0, L), key.middleRows(k0, S), value.middleRows(k0, S), options),
                        tolerance<TypeParam>()))
          << "sequence " << b << ", causal " << causal;
      q0 += L;
      k0 += S;
    }
  }
}

TYPED_TEST(ModuleFeatures, PaddedBatchWithKeyPaddingEqualsEachSequenceAtItsLength) {
  const auto attn = full_module<TypeParam>(false, false, false);
  const Eigen::Index B = 3, L = 6, S = 530;
  const Eigen::Index lengths[] = {530, 100, 7};
  const Matrix<TypeParam> query = random_matrix<TypeParam>(B * L, 12, 1), key = random_matrix<TypeParam>(B * S, 5, 2),
                          value = random_matrix<TypeParam>(B * S, 7, 3);
  BoolMatrix padding = BoolMatrix::Constant(B, S, false);
  for (Eigen::Index b = 0; b < B; ++b) padding.row(b).tail(S - lengths[b]).setConstant(true);
  mha::AttentionOptions options;
  options.key_padding_mask = mha::AttentionMask::blocked(padding);
  const Matrix<TypeParam> batched = attn.forward_batch(query, key, value, {L, L, L}, {S, S, S}, options);
  for (Eigen::Index b = 0; b < B; ++b)
    EXPECT_TRUE(close(batched.middleRows(b * L, L),
                      attn.forward(query.middleRows(b * L, L), key.middleRows(b * S, lengths[b]),
                                   value.middleRows(b * S, lengths[b])),
                      tolerance<TypeParam>()))
        << "sequence " << b;
}

TYPED_TEST(ModuleFeatures, BatchLengthsAreChecked) {
  const auto attn = full_module<TypeParam>(false, false, false);
  const Matrix<TypeParam> q = random_matrix<TypeParam>(5, 12, 1), k = random_matrix<TypeParam>(4, 5, 2),
                          v = random_matrix<TypeParam>(4, 7, 3);
  EXPECT_EQ(error_of([&] {
              attn.forward_batch(q, k, v, {2, 2}, {2, 2});
            }),
            "mha: MultiHeadAttention::forward_batch: query_lengths add up to 4 but query has 5 rows");
  EXPECT_EQ(error_of([&] {
              attn.forward_batch(q, k, v, {2, 3}, {4});
            }),
            "mha: MultiHeadAttention::forward_batch: query_lengths has 2 sequences but key_lengths has 1");
  EXPECT_EQ(error_of([&] {
              attn.forward_batch(q, k, v, {6, -1}, {2, 2});
            }),
            "mha: MultiHeadAttention::forward_batch: sequence lengths must be >= 0, got -1");
  const BoolMatrix mask(2, 2);
  mha::AttentionOptions options;
  options.mask = mha::AttentionMask::blocked(mask);
  EXPECT_EQ(error_of([&] {
              attn.forward_batch(q, k, v, {2, 3}, {2, 2}, options);
            }),
            "mha: MultiHeadAttention::forward_batch: options.mask is shared by every sequence, so all need the same "
            "query and key lengths");
  mha::MultiHeadAttentionConfig bad;
  bad.d_model = 4;
  bad.num_heads = 2;
  bad.dropout = 1.0;
  EXPECT_EQ(error_of([&] { mha::MultiHeadAttention<TypeParam> m(bad); }),
            "mha: dropout must be in [0, 1), got dropout = 1");
}

}  // namespace
