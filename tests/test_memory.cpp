// Memory: the tiled kernels never allocate anything L × S. Causal self-attention over 32768 tokens
// (d_model 512, h = 8, float) would need 4 GiB for one head's score matrix alone; the whole
// forward pass must peak below 1 GiB of resident memory. A training step (forward with a tape,
// then backward) over 16384 tokens keeps O(N) too: one head's 16384 × 16384 weights would be 1 GiB.
#include <mha/mha.hpp>

#include <gtest/gtest.h>

#include <sys/resource.h>

#include <fstream>
#include <string>

namespace {

/// The peak resident memory of this process so far, in bytes (Linux reports KiB).
double peak_resident_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) * 1024.0;
}

mha::MultiHeadAttention<float> module_512_8() {
  mha::MultiHeadAttentionConfig config;
  config.d_model = 512;
  config.num_heads = 8;
  return mha::MultiHeadAttention<float>(config);
}

constexpr double kMiB = 1024.0 * 1024.0;

// ctest runs each test in a process of its own, so the peak is this test's.
TEST(Memory, CausalSelfAttentionOver32768TokensPeaksBelowOneGiB) {
  const auto attn = module_512_8();
  const Eigen::Index n = 32768;
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(n, 512);  // 64 MiB
  mha::AttentionOptions options;
  options.causal = true;
  const Eigen::MatrixXf y = attn.forward(x, options);
  ASSERT_EQ(y.rows(), n);
  EXPECT_TRUE(y.allFinite());
  const double peak = peak_resident_bytes();
  RecordProperty("peak_resident_MiB", static_cast<int>(peak / kMiB));
  EXPECT_LT(peak, 1024.0 * kMiB) << "peak resident memory " << peak / kMiB << " MiB";
}

// What a training step must hold, all N × 512 floats (32 MiB each at N = 16384): x and dy; the
// tape's q, k, v and concatenation (and N × h log-sum-exps); the backward's gradients of the
// concatenation, q, k and v, and of the input from each of q, k and v. About 15 such matrices,
// 480 MiB, against 1 GiB for a single head's weights.
TEST(Memory, CausalTrainingStepOver16384TokensPeaksBelowOneGiB) {
  const auto attn = module_512_8();
  const Eigen::Index n = 16384;
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(n, 512), dy = Eigen::MatrixXf::Random(n, 512);
  mha::AttentionOptions options;
  options.causal = true;
  mha::Tape<float> tape;
  const Eigen::MatrixXf y = attn.forward(x, options, tape);
  auto gradients = attn.zero_gradients();
  const auto d = attn.backward(tape, dy, gradients);
  EXPECT_TRUE(y.allFinite());
  EXPECT_TRUE(d.self_attention().allFinite());
  EXPECT_TRUE(gradients.w_q().allFinite());
  const double peak = peak_resident_bytes();
  RecordProperty("peak_resident_MiB", static_cast<int>(peak / kMiB));
  RecordProperty("tape_MiB", static_cast<int>(static_cast<double>(tape.bytes()) / kMiB));
  EXPECT_LT(peak, 1024.0 * kMiB) << "peak resident memory " << peak / kMiB << " MiB";
}

}  // namespace
