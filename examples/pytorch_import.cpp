// pytorch_import — run a PyTorch nn.MultiheadAttention in C++.
//
// examples/export_pytorch_mha.py saves a torch module's state_dict, with an input and PyTorch's
// output for it, to a .safetensors file. This program loads the weights into an
// mha::MultiHeadAttention (mha::io::from_state_dict: PyTorch's out × in weights become mha's
// x · W matrices), runs the same input and prints the largest difference from PyTorch's output.
//
//   /usr/bin/python3 examples/export_pytorch_mha.py mha_module.safetensors
//   ./build/examples/pytorch_import mha_module.safetensors
#include <mha/io/pytorch.hpp>
#include <mha/io/safetensors.hpp>
#include <mha/mha.hpp>

#include <cstdio>
#include <exception>
#include <string>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: pytorch_import FILE.safetensors (made by examples/export_pytorch_mha.py)\n");
    return 2;
  }
  try {
    const auto file = mha::io::SafeTensors::load(argv[1]);
    const auto num_heads = std::stol(file.metadata().at("num_heads"));
    const bool add_zero_attn = file.metadata().at("add_zero_attn") == "1";
    const auto attention = mha::io::from_state_dict<double>(file, num_heads, "", add_zero_attn);
    const auto& c = attention.config();
    std::printf(
        "loaded nn.MultiheadAttention (torch %s): d_model %ld, %ld heads of d_k = d_v = %ld, kdim %ld, "
        "vdim %ld, bias %s, add_bias_kv %s, add_zero_attn %s\n",
        file.metadata().at("torch").c_str(), static_cast<long>(c.d_model), static_cast<long>(c.num_heads),
        static_cast<long>(c.d_k), static_cast<long>(c.kdim), static_cast<long>(c.vdim), c.bias ? "yes" : "no",
        c.add_bias_kv ? "yes" : "no", c.add_zero_attn ? "yes" : "no");
    const Eigen::MatrixXd query = file.matrix<double>("check.query"), key = file.matrix<double>("check.key"),
                          value = file.matrix<double>("check.value"), expected = file.matrix<double>("check.output");
    const Eigen::MatrixXd output = attention.forward(query, key, value);
    std::printf("query %ld x %ld, key %ld x %ld, value %ld x %ld -> output %ld x %ld\n",
                static_cast<long>(query.rows()), static_cast<long>(query.cols()), static_cast<long>(key.rows()),
                static_cast<long>(key.cols()), static_cast<long>(value.rows()), static_cast<long>(value.cols()),
                static_cast<long>(output.rows()), static_cast<long>(output.cols()));
    const double difference = (output - expected).cwiseAbs().maxCoeff();
    std::printf("max |mha - PyTorch| = %.3g (PyTorch's output: max |y| = %.3g)\n", difference,
                expected.cwiseAbs().maxCoeff());
    return difference <= 1e-5 * std::max(1.0, expected.cwiseAbs().maxCoeff()) ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pytorch_import: %s\n", e.what());
    return 1;
  }
}
