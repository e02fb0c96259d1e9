// Decoding with the projection weights rounded to bfloat16 or half (make_decode_weights): every
// step equals the steps of a module whose weights are those rounded numbers (so the rounding is
// the only error, and the weights read in place are the ones rounded), for single tokens, chunks
// at and past the rows read in place, prompts, ragged batches, every configuration decoding is
// checked with; the error against the exact module stays within the stated bounds with a reduced
// cache too; results are bit-identical for any thread count; weights of another module are refused.
#include <mha/mha.hpp>

#include "decoding_util.hpp"
#include "test_util.hpp"

#include <string>
#include <type_traits>
#include <vector>

namespace {

using mha_test::decoder_config;
using mha_test::describe;
using mha_test::Lengths;
using mha_test::make_module;
using mha_test::Matrix;
using mha_test::near;
using mha_test::random_matrix;
using mha_test::relative_error;
using mha_test::rotary;
using Index = Eigen::Index;

template <typename Scalar>
class DecodeWeights : public ::testing::Test {
 protected:
  void TearDown() override { mha::set_num_threads(0); }
};
TYPED_TEST_SUITE(DecodeWeights, mha_test::Scalars, mha_test::ScalarNames);

/// The configurations: plain; multi-query with rotary; grouped-query with rotary halves and biases;
/// head widths that are no number of packets (d_k = 37, d_v = 87) over d_model = 40.
std::vector<mha::MultiHeadAttentionConfig> cases() {
  auto everything = rotary(decoder_config(32, 8, 2, 0, 0, 21), mha::RotaryPairs::halves, 500.0);
  everything.bias = true;
  return {decoder_config(32, 8, 0, 0, 0, 20), rotary(decoder_config(32, 4, 1, 0, 0, 22), mha::RotaryPairs::interleaved),
          everything, decoder_config(40, 6, 2, 37, 87, 23)};
}

/// A copy of attn whose W^Q, W^K, W^V and W^O are attn's rounded to Storage (and back to Scalar).
template <typename Storage, typename Scalar>
mha::MultiHeadAttention<Scalar> rounded(const mha::MultiHeadAttention<Scalar>& attn) {
  mha::MultiHeadAttention<Scalar> copy(attn);
  const auto round = [](const auto& w) { return w.template cast<Storage>().template cast<Scalar>().eval(); };
  copy.w_q() = round(attn.w_q());
  copy.w_k() = round(attn.w_k());
  copy.w_v() = round(attn.w_v());
  copy.w_o() = round(attn.w_o());
  return copy;
}

/// Steps of the given sizes (a prompt of 20 rows, then chunks of 8 and 9 — the most rows read in
/// place, and one more — then single tokens) with attn and its rounded weights, against the same
/// steps of the module whose weights are rounded: f64 ≤ 1e-10, f32 ≤ 1e-5 relative.
template <typename Scalar, typename Storage>
void expect_steps_equal_the_rounded_module(const mha::MultiHeadAttentionConfig& c, Index window) {
  const auto attn = make_module<Scalar>(c);
  const auto weights = attn.template make_decode_weights<Storage>();
  static_assert(std::is_same<typename decltype(weights)::StorageType, Storage>::value);
  const auto reference = rounded<Storage>(attn);
  const Matrix<Scalar> x = random_matrix<Scalar>(60, c.d_model, 5);
  mha::AttentionOptions o;
  o.window = window;
  auto cache = attn.make_cache(), expected_cache = reference.make_cache();
  Index position = 0;
  for (const Index n : Lengths{20, 8, 9, 1, 1, 1, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}) {
    const Matrix<Scalar> y = attn.decode(x.middleRows(position, n), cache, weights, o);
    const Matrix<Scalar> expected = reference.decode(x.middleRows(position, n), expected_cache, o);
    ASSERT_TRUE(near<Scalar>(y, expected, "decode weights against the rounded module"))
        << "tokens " << position << " to " << position + n - 1;
    position += n;
  }
  // The out form, and a ragged batch (one sequence at one token, one at three, one finished).
  Matrix<Scalar> out;
  attn.decode(x.middleRows(position, 1), cache, weights, out, o);
  EXPECT_TRUE(near<Scalar>(out, reference.decode(x.middleRows(position, 1), expected_cache, o), "out form"));
  auto batch = attn.make_cache(3), expected_batch = reference.make_cache(3);
  const Lengths prompts{11, 4, 7}, steps{1, 3, 0};
  const Matrix<Scalar> prompt = random_matrix<Scalar>(22, c.d_model, 6), step = random_matrix<Scalar>(4, c.d_model, 7);
  EXPECT_TRUE(near<Scalar>(attn.decode_batch(prompt, prompts, batch, weights, o),
                           reference.decode_batch(prompt, prompts, expected_batch, o), "batch prompts"));
  attn.decode_batch(step, steps, batch, weights, out, o);
  EXPECT_TRUE(near<Scalar>(out, reference.decode_batch(step, steps, expected_batch, o), "batch step"));
}

TYPED_TEST(DecodeWeights, StepsEqualTheModuleWithTheRoundedWeights) {
  for (const auto& c : cases())
    for (const Index window : {0, 5}) {
      SCOPED_TRACE(describe(c) + ", window " + std::to_string(window));
      expect_steps_equal_the_rounded_module<TypeParam, Eigen::bfloat16>(c, window);
      expect_steps_equal_the_rounded_module<TypeParam, Eigen::half>(c, window);
    }
}

TYPED_TEST(DecodeWeights, TheWeightsAreTheModulesRoundedInHalfTheBytes) {
  const auto attn = make_module<TypeParam>(decoder_config(32, 8, 2, 0, 0, 30));
  const auto bf16 = attn.template make_decode_weights<Eigen::bfloat16>();
  const auto half = attn.template make_decode_weights<Eigen::half>();
  const auto check = [&](const auto& stored, const auto& exact, const char* name) {
    using Storage = typename std::decay_t<decltype(stored)>::Scalar;
    ASSERT_EQ(stored.rows(), exact.rows()) << name;
    ASSERT_EQ(stored.cols(), exact.cols()) << name;
    for (Index c = 0; c < exact.cols(); ++c)
      for (Index r = 0; r < exact.rows(); ++r)
        ASSERT_EQ(static_cast<float>(stored(r, c)), static_cast<float>(static_cast<Storage>(exact(r, c)))) << name;
  };
  check(bf16.w_q(), attn.w_q(), "w_q");
  check(bf16.w_k(), attn.w_k(), "w_k");
  check(bf16.w_v(), attn.w_v(), "w_v");
  check(bf16.w_o(), attn.w_o(), "w_o");
  check(half.w_o(), attn.w_o(), "w_o, half");
  const std::size_t exact_bytes = sizeof(TypeParam) * static_cast<std::size_t>(attn.w_q().size() + attn.w_k().size() +
                                                                               attn.w_v().size() + attn.w_o().size());
  EXPECT_EQ(bf16.bytes() * sizeof(TypeParam), exact_bytes * sizeof(Eigen::bfloat16));
  EXPECT_EQ(half.bytes() * sizeof(TypeParam), exact_bytes * sizeof(Eigen::half));
}

/// With a reduced cache as well, a random layer's outputs stay within the stated bounds of the
/// exact module's (bfloat16 ≤ 1e-2, half ≤ 2e-3 relative) over a prompt of 1500 tokens (three
/// parts of 512 keys) and 40 single steps; and the rounding is really there: half's error is
/// above float's rounding, bfloat16's above half's.
TYPED_TEST(DecodeWeights, ReducedWeightsAndCacheStayWithinTheirBounds) {
  auto c = rotary(decoder_config(128, 4, 2, 0, 0, 31), mha::RotaryPairs::halves);
  c.bias = true;
  const auto attn = make_module<TypeParam>(c);
  const Matrix<TypeParam> x = random_matrix<TypeParam>(1540, c.d_model, 8);
  auto exact = attn.make_cache();
  auto bf16 = attn.template make_cache<Eigen::bfloat16>();
  auto half = attn.template make_cache<Eigen::half>();
  const auto bf16_weights = attn.template make_decode_weights<Eigen::bfloat16>();
  const auto half_weights = attn.template make_decode_weights<Eigen::half>();
  double bf16_error = 0, half_error = 0;
  Index position = 0;
  Lengths steps{1500};
  steps.resize(41, 1);
  for (const Index n : steps) {
    const auto rows = x.middleRows(position, n);
    const Matrix<TypeParam> y = attn.decode(rows, exact);
    bf16_error = std::max(bf16_error, relative_error(attn.decode(rows, bf16, bf16_weights), y));
    half_error = std::max(half_error, relative_error(attn.decode(rows, half, half_weights), y));
    position += n;
  }
  mha_test::ErrorReport::largest()["bfloat16 weights and cache against the exact module (" +
                                   mha_test::scalar_name<TypeParam>() + ")"] = bf16_error;
  mha_test::ErrorReport::largest()["half weights and cache against the exact module (" +
                                   mha_test::scalar_name<TypeParam>() + ")"] = half_error;
  EXPECT_LE(bf16_error, 1e-2);
  EXPECT_LE(half_error, 2e-3);
  EXPECT_GT(half_error, 1e-5);
  EXPECT_GT(bf16_error, 2 * half_error);
}

/// A batch of eight new tokens over wide projections is worth several threads: on one thread and
/// on two (really splitting the products), the same bits.
TYPED_TEST(DecodeWeights, BitIdenticalForAnyThreadCount) {
  MHA_TEST_SKIP_WITHOUT_OPENMP();
  const auto attn = make_module<TypeParam>(decoder_config(512, 8, 2, 0, 0, 40));
  const auto weights = attn.template make_decode_weights<Eigen::bfloat16>();
  const Matrix<TypeParam> prompts = random_matrix<TypeParam>(8 * 5, 512, 9),
                          step = random_matrix<TypeParam>(8, 512, 10);
  const Lengths five(8, 5), one(8, 1);
  Matrix<TypeParam> results[2];
  for (const int threads : {1, 2}) {
    mha::set_num_threads(threads);
    mha::detail::largest_team() = 0;
    auto cache = attn.make_cache(8);
    attn.decode_batch(prompts, five, cache, weights);
    results[threads - 1] = attn.decode_batch(step, one, cache, weights);
    EXPECT_EQ(mha::detail::largest_team(), threads);
  }
  EXPECT_TRUE((results[0].array() == results[1].array()).all());
}

TYPED_TEST(DecodeWeights, WeightsOfAnotherModuleAreRefusedAndChangeNothing) {
  const auto attn = make_module<TypeParam>(decoder_config(32, 4, 2, 0, 0, 50));
  const auto copy = attn;  // the same numbers, another module
  const auto weights = copy.template make_decode_weights<Eigen::bfloat16>();
  auto cache = attn.make_cache();
  const Matrix<TypeParam> x = random_matrix<TypeParam>(3, 32, 11);
  attn.decode(x, cache);
  const Matrix<TypeParam> keys = cache.keys(0, 1);
  const auto refused = [&](const auto& call) {
    try {
      call();
    } catch (const mha::invalid_argument& e) {
      return std::string(e.what()).find("make_decode_weights") != std::string::npos;
    }
    return false;
  };
  EXPECT_TRUE(refused([&] { attn.decode(x.topRows(1), cache, weights); }));
  EXPECT_TRUE(refused([&] { attn.decode_batch(x.topRows(1), {1}, cache, weights); }));
  EXPECT_EQ(cache.length(), 3);
  EXPECT_TRUE((Matrix<TypeParam>(cache.keys(0, 1)).array() == keys.array()).all());
  // A module assigned to is another module too: its earlier weights are refused.
  auto assigned = make_module<TypeParam>(decoder_config(32, 4, 2, 0, 0, 51));
  const auto earlier = assigned.template make_decode_weights<Eigen::half>();
  assigned = attn;
  auto other = assigned.make_cache();
  EXPECT_TRUE(refused([&] { assigned.decode(x, other, earlier); }));
  EXPECT_EQ(other.length(), 0);
  // Its own weights, made now, are taken.
  EXPECT_EQ(assigned.decode(x, other, assigned.template make_decode_weights<Eigen::half>()).rows(), 3);
}

}  // namespace
