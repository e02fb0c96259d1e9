// A user's translation unit for bench/compile_time.sh: forward (with a tape), backward and a decode
// step of a float module.
#include <mha/mha.hpp>

#include <iostream>

int main() {
  mha::MultiHeadAttentionConfig config;
  config.d_model = 64;
  config.num_heads = 4;
  const mha::MultiHeadAttention<float> attention(config);
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(10, 64);
  mha::AttentionOptions causal;
  causal.causal = true;
  mha::Tape<float> tape;
  const Eigen::MatrixXf y = attention.forward(x, causal, tape);
  auto gradients = attention.zero_gradients();
  const auto d_inputs = attention.backward(tape, y, gradients);
  auto cache = attention.make_cache();
  const Eigen::MatrixXf z = attention.decode(x, cache);
  std::cout << y.sum() + z.sum() + d_inputs.query.sum() << "\n";
}
