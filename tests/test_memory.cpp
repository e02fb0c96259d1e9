// Memory: the tiled kernels never allocate anything L × S. Causal self-attention over 32768 tokens
// (d_model 512, h = 8, float) would need 4 GiB for one head's score matrix alone; the whole
// forward pass must peak below 1 GiB of resident memory. A training step (forward with a tape,
// then backward) over 16384 tokens keeps O(N) too: one head's 16384 × 16384 weights would be 1 GiB.
#include <mha/mha.hpp>

#include <gtest/gtest.h>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <new>
#include <sstream>
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

/// The address space this process has mapped, in bytes (Linux's VmSize).
double address_space_bytes() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmSize:", 0) == 0) return std::stod(line.substr(7)) * 1024.0;
  return 0;
}

/// Limits this process's address space to `bytes` (the soft limit; it can be raised again).
void limit_address_space(double bytes) {
  rlimit limit{};
  getrlimit(RLIMIT_AS, &limit);
  limit.rlim_cur = bytes > 0 ? static_cast<rlim_t>(bytes) : limit.rlim_max;
  setrlimit(RLIMIT_AS, &limit);
}

/// What AllocationFailuresReachTheCallerAndLeaveTheCacheAsItWas checks, in a process of its own:
/// under an address-space limit a little above what the process already maps, swept in small
/// steps, each forward pass, backward pass and decode step either succeeds or throws
/// std::bad_alloc to its caller — from inside the parallel regions too, where an escaping
/// exception would call std::terminate — and a decode step that threw leaves the cache as it was.
void allocation_failure_sweep() {
  mha::set_num_threads(2);
  mha::MultiHeadAttentionConfig config;
  config.d_model = 128;
  config.num_heads = 4;
  const mha::MultiHeadAttention<float> attn(config);
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(1024, 128), prompt = Eigen::MatrixXf::Random(300, 128);
  mha::AttentionOptions causal;
  causal.causal = true;
  // Without a limit: the results, and OpenMP's threads started before any limit is set.
  const Eigen::MatrixXf expected = attn.forward(x, causal);
  auto reference_cache = attn.make_cache(), cache = attn.make_cache();
  attn.decode(prompt, reference_cache);
  attn.decode(prompt, cache);
  int failures = 0, successes = 0;
  const double base = address_space_bytes();
  for (double extra = 0; extra < 24.0 * kMiB; extra += 96.0 * 1024) {
    const Eigen::MatrixXf token = Eigen::MatrixXf::Random(static_cast<Eigen::Index>(extra / 1024) % 3 ? 1 : 40, 128);
    const Eigen::Index before = cache.length();
    Eigen::MatrixXf output, step;
    bool forward_failed = false, step_failed = false;
    limit_address_space(base + extra);
    try {
      output = attn.forward(x, causal);
    } catch (const std::bad_alloc&) {
      forward_failed = true;
    }
    try {
      step = attn.decode(token, cache);
    } catch (const std::bad_alloc&) {
      step_failed = true;
    }
    limit_address_space(0);
    (forward_failed ? failures : successes) += 1;
    if (!forward_failed) {
      EXPECT_EQ(output, expected) << "limit +" << extra / kMiB << " MiB";
    }
    const Eigen::MatrixXf reference_step = attn.decode(token, reference_cache);
    if (step_failed) {
      ++failures;
      ASSERT_EQ(cache.length(), before) << "a decode step that threw changed the cache";
      step = attn.decode(token, cache);
    }
    ASSERT_EQ(step, reference_step) << "limit +" << extra / kMiB << " MiB";
  }
  EXPECT_GT(failures, 0) << "no limit was tight enough to fail";
  EXPECT_GT(successes, 0) << "no limit was loose enough to succeed";
  std::cout << failures << " calls threw std::bad_alloc, " << successes << " forward passes succeeded\n";
}

// The sweep runs in a child process (this test program again), so that a terminate there is a
// failed test here, and this process's memory stays unlimited.
TEST(Memory, AllocationFailuresReachTheCallerAndLeaveTheCacheAsItWas) {
  if (std::getenv("MHA_ALLOCATION_FAILURE_CHILD")) return allocation_failure_sweep();
  char self[4096] = {};
  ASSERT_GT(readlink("/proc/self/exe", self, sizeof self - 1), 0);
  const std::string command = std::string("MHA_ALLOCATION_FAILURE_CHILD=1 '") + self +
                              "' --gtest_filter=Memory.AllocationFailuresReachTheCallerAndLeaveTheCacheAsItWas 2>&1";
  FILE* child = popen(command.c_str(), "r");
  ASSERT_NE(child, nullptr);
  std::string output;
  char buffer[4096];
  while (std::fgets(buffer, sizeof buffer, child)) output += buffer;
  const int status = pclose(child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "the child " << (WIFSIGNALED(status) ? "was killed by signal " + std::to_string(WTERMSIG(status)) : "failed")
      << ":\n"
      << output;
  const auto summary = output.find("calls threw");
  if (summary != std::string::npos)
    std::cout << "child: "
              << output.substr(output.rfind('\n', summary) + 1,
                               output.find('\n', summary) - output.rfind('\n', summary));
}

}  // namespace
