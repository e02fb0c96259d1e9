// Built by scripts/test against the installed package and the source tree: proves that
// find_package(mha) and add_subdirectory both give a working mha::mha, and the installed
// mha::precompiled a working library (its program compiled without OpenMP, its threads the library's).
#include <mha/mha.hpp>

#include <iostream>

int main() {
  mha::MultiHeadAttentionConfig config;
  config.d_model = 16;
  config.num_heads = 4;
  const mha::MultiHeadAttention<float> attention(config);
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(5, 16);
  const Eigen::MatrixXf y = attention.forward(x);
  const bool ok = y.rows() == 5 && y.cols() == 16 && y.allFinite();
#ifndef MHA_CONSUMER_TARGET
#define MHA_CONSUMER_TARGET "mha::mha"
#endif
  std::cout << "consumer linking " MHA_CONSUMER_TARGET ": forward gave " << y.rows() << " x " << y.cols()
            << (ok ? ", ok" : ", WRONG") << "; mha::num_threads() = " << mha::num_threads() << "\n";
  return ok ? 0 : 1;
}
