// MultiHeadAttentionConfig::resolved(): the head sizes it fills in, and every configuration it
// rejects with a message naming the field (a module's constructor resolves its configuration, so
// it rejects the same).
#include <mha/mha.hpp>

#include "test_util.hpp"

#include <limits>
#include <sstream>

namespace {

using mha_test::config;
using mha_test::decoder_config;
using mha_test::error_of;
using mha_test::rotary;

TEST(MultiHeadAttentionConfig, DefaultsToDModelOverHeads) {
  const auto c = config(512, 8).resolved();
  EXPECT_EQ(c.d_k, 64);
  EXPECT_EQ(c.d_v, 64);
  const auto explicit_sizes = config(10, 3, 4, 6).resolved();  // 10 is not divisible by 3: fine when set
  EXPECT_EQ(explicit_sizes.d_k, 4);
  EXPECT_EQ(explicit_sizes.d_v, 6);
}

TEST(MultiHeadAttentionConfig, RejectsInvalidConfigurationsWithAClearMessage) {
  EXPECT_EQ(error_of([] { config(8, 0).resolved(); }), "mha: num_heads must be positive, got num_heads = 0");
  EXPECT_EQ(error_of([] { config(8, -2).resolved(); }), "mha: num_heads must be positive, got num_heads = -2");
  EXPECT_EQ(error_of([] { config(0, 2).resolved(); }), "mha: d_model must be positive, got d_model = 0");
  EXPECT_EQ(error_of([] { config(10, 3).resolved(); }),
            "mha: d_model = 10 is not divisible by num_heads = 3; set d_k and d_v explicitly or choose a divisor");
  EXPECT_EQ(error_of([] { config(10, 3, 4).resolved(); }),
            "mha: d_model = 10 is not divisible by num_heads = 3; set d_k and d_v explicitly or choose a divisor");
  EXPECT_EQ(error_of([] { config(8, 2, -1).resolved(); }),
            "mha: d_k must be positive (or 0 for d_model / num_heads), got d_k = -1");
  EXPECT_EQ(error_of([] { config(8, 2, 4, -3).resolved(); }),
            "mha: d_v must be positive (or 0 for d_model / num_heads), got d_v = -3");
  EXPECT_THROW(mha::MultiHeadAttention<float>(config(8, 0)), mha::invalid_argument);
}

TEST(GroupedQueryAttentionConfig, KvHeadsMustDivideTheHeads) {
  EXPECT_EQ(decoder_config(32, 8, 0).resolved().num_kv_heads, 8);
  EXPECT_EQ(decoder_config(32, 8, 2).resolved().num_kv_heads, 2);
  EXPECT_EQ(error_of([] { decoder_config(32, 8, 3).resolved(); }),
            "mha: num_kv_heads = 3 does not divide num_heads = 8; each key/value head serves num_heads / num_kv_heads "
            "query heads");
  EXPECT_EQ(error_of([] { decoder_config(32, 8, 16).resolved(); }),
            "mha: num_kv_heads = 16 does not divide num_heads = 8; each key/value head serves num_heads / "
            "num_kv_heads query heads");
  EXPECT_EQ(error_of([] { decoder_config(32, 8, -1).resolved(); }),
            "mha: num_kv_heads must be positive (or 0 for num_heads), got num_kv_heads = -1");
  EXPECT_THROW(mha::MultiHeadAttention<float>(decoder_config(32, 8, 3)), mha::invalid_argument);
}

TEST(RotaryConfig, OddHeadWidthAndBadBaseAreRejected) {
  EXPECT_EQ(error_of([] { rotary(config(20, 2, 5, 4), mha::RotaryPairs::interleaved).resolved(); }),
            "mha: rotary embeddings rotate pairs of coordinates, so d_k must be even, got d_k = 5");
  EXPECT_EQ(error_of([] { rotary(config(12, 4), mha::RotaryPairs::halves).resolved(); }),  // d_k = 12 / 4 = 3
            "mha: rotary embeddings rotate pairs of coordinates, so d_k must be even, got d_k = 3");
  EXPECT_THROW(mha::MultiHeadAttention<double>(rotary(config(12, 4), mha::RotaryPairs::halves)), mha::invalid_argument);
  EXPECT_EQ(config(20, 2, 5, 4).resolved().d_k, 5);                                    // odd d_k is fine without rotary
  EXPECT_EQ(rotary(config(20, 2, 4, 5), mha::RotaryPairs::halves).resolved().d_v, 5);  // d_v is not rotated
  for (const double base : {0.0, -2.0, std::numeric_limits<double>::infinity()}) {
    const auto c = rotary(config(16, 2), mha::RotaryPairs::interleaved, base);
    std::ostringstream expected;
    expected << "mha: rotary_base must be positive and finite, got rotary_base = " << base;
    EXPECT_EQ(error_of([&] { c.resolved(); }), expected.str());
  }
}

}  // namespace
