// Memory: the tiled kernel never allocates anything L × S. Causal self-attention over 32768 tokens
// (d_model 512, h = 8, float) would need 4 GiB for one head's score matrix alone; the whole
// forward pass must peak below 1 GiB of resident memory.
#include <mha/mha.hpp>

#include <gtest/gtest.h>

#include <sys/resource.h>

namespace {

/// The peak resident memory of this process so far, in bytes (Linux reports KiB).
double peak_resident_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) * 1024.0;
}

TEST(Memory, CausalSelfAttentionOver32768TokensPeaksBelowOneGiB) {
  mha::MultiHeadAttentionConfig config;
  config.d_model = 512;
  config.num_heads = 8;
  const mha::MultiHeadAttention<float> attn(config);
  const Eigen::Index n = 32768;
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(n, 512);  // 64 MiB
  mha::AttentionOptions options;
  options.causal = true;
  const Eigen::MatrixXf y = attn.forward(x, options);
  ASSERT_EQ(y.rows(), n);
  EXPECT_TRUE(y.allFinite());
  const double peak = peak_resident_bytes();
  RecordProperty("peak_resident_MiB", static_cast<int>(peak / (1 << 20)));
  EXPECT_LT(peak, 1024.0 * 1024 * 1024) << "peak resident memory " << peak / (1 << 20) << " MiB";
}

}  // namespace
