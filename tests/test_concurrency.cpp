// Concurrency: one const module used from several threads at once gives exactly what serial calls
// give. Run under ThreadSanitizer in CI as well.
#include <mha/mha.hpp>

#include "test_util.hpp"

#include <thread>
#include <vector>

namespace {

using mha_test::Matrix;
using mha_test::random_matrix;

TEST(Concurrency, ForwardOnOneConstModuleFromFourThreadsEqualsSerialCalls) {
  const mha::MultiHeadAttentionConfig config = mha_test::config(32, 4);
  const mha::MultiHeadAttention<float> attn(config);
  const int threads = 4, calls = 6;
  std::vector<Matrix<float>> inputs, serial;
  for (int i = 0; i < threads * calls; ++i) {
    inputs.push_back(random_matrix<float>(30 + 40 * (i % 5), 32, static_cast<std::uint64_t>(i)));
    mha::AttentionOptions options;
    options.causal = i % 2 == 1;
    serial.push_back(attn.forward(inputs.back(), options));
  }
  std::vector<Matrix<float>> concurrent(inputs.size());
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (int c = 0; c < calls; ++c) {
        const auto i = static_cast<std::size_t>(t * calls + c);
        mha::AttentionOptions options;
        options.causal = i % 2 == 1;
        concurrent[i] = attn.forward(inputs[i], options);
      }
    });
  for (auto& thread : pool) thread.join();
  for (std::size_t i = 0; i < inputs.size(); ++i)
    EXPECT_TRUE((concurrent[i].array() == serial[i].array()).all()) << "call " << i;
}

TEST(Concurrency, SingleHeadAttentionFromFourThreadsEqualsSerialCalls) {
  const Matrix<double> q = random_matrix<double>(300, 8, 1), k = random_matrix<double>(600, 8, 2),
                       v = random_matrix<double>(600, 5, 3);
  const Matrix<double> serial = mha::scaled_dot_product_attention(q, k, v);
  std::vector<Matrix<double>> results(4);
  std::vector<std::thread> pool;
  for (std::size_t t = 0; t < results.size(); ++t)
    pool.emplace_back([&, t] { results[t] = mha::scaled_dot_product_attention(q, k, v); });
  for (auto& thread : pool) thread.join();
  for (const auto& result : results) EXPECT_TRUE((result.array() == serial.array()).all());
}

}  // namespace
