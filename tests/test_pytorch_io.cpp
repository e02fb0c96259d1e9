// PyTorch weights: a module built from a state_dict's tensors, or loaded from a .safetensors file
// saved from PyTorch, computes what the PyTorch module computed. The files in tests/fixtures are
// made by examples/export_pytorch_mha.py and carry an input and PyTorch's output for it.
#include <mha/io/pytorch.hpp>
#include <mha/io/safetensors.hpp>
#include <mha/mha.hpp>

#include "test_util.hpp"

#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

using mha_test::close;
using mha_test::error_of;
using mha_test::Matrix;
using mha_test::tolerance;

template <typename Scalar>
class PyTorchImport : public ::testing::Test {};
TYPED_TEST_SUITE(PyTorchImport, mha_test::Scalars, mha_test::ScalarNames);

std::string fixture(const std::string& name) { return std::string(MHA_FIXTURE_DIR) + "/" + name; }

/// Loads `file`, builds the module and compares its output with PyTorch's.
template <typename Scalar>
void check_against_torch(const std::string& file, double tol) {
  const auto tensors = mha::io::SafeTensors::load(fixture(file));
  const auto num_heads = std::stol(tensors.metadata().at("num_heads"));
  const auto attn = mha::io::from_state_dict<Scalar>(tensors, num_heads, "", tensors.metadata().at("add_zero_attn") == "1");
  const Matrix<Scalar> out = attn.forward(tensors.matrix<Scalar>("check.query"), tensors.matrix<Scalar>("check.key"),
                                          tensors.matrix<Scalar>("check.value"));
  EXPECT_TRUE(close(out, tensors.matrix<double>("check.output"), tol)) << file;
}

TYPED_TEST(PyTorchImport, PackedInProjectionWithBiasesMatchesTorch) {
  // Saved in float32 by PyTorch: its own output carries float32 rounding, so 1e-5 in both types.
  check_against_torch<TypeParam>("torch_mha_packed.safetensors", 1e-5);
}

TYPED_TEST(PyTorchImport, KdimVdimBiasKvAndZeroAttnMatchTorch) {
  // Saved in float64: double matches to 1e-10.
  check_against_torch<TypeParam>("torch_mha_kdim_vdim.safetensors", tolerance<TypeParam>());
}

TYPED_TEST(PyTorchImport, StateDictTensorsAreTransposedIntoTheHeadBlocks) {
  // in_proj_weight rows [q | k | v], each out × in: W^Q = rows 0 … E−1, transposed; head i is
  // output features i·d_k …, i.e. column block i of W^Q.
  const Eigen::Index E = 4;
  mha::io::PyTorchMultiheadAttention<TypeParam> w;
  w.in_proj_weight = Matrix<TypeParam>(3 * E, E);
  for (Eigen::Index r = 0; r < 3 * E; ++r)
    for (Eigen::Index c = 0; c < E; ++c) w.in_proj_weight(r, c) = static_cast<TypeParam>(100 * r + c);
  w.out_proj_weight = Matrix<TypeParam>::Identity(E, E);
  w.in_proj_bias = Eigen::Matrix<TypeParam, 1, Eigen::Dynamic>::LinSpaced(3 * E, 0, 11);
  w.out_proj_bias = Matrix<TypeParam>::Constant(1, E, 7);
  const auto attn = mha::io::from_pytorch(w, 2);
  EXPECT_EQ(attn.w_q(1)(3, 0), TypeParam(100 * 2 + 3));  // W_1^Q(in 3, out 0) = weight(out 2, in 3)
  EXPECT_EQ(attn.w_k(0)(0, 1), TypeParam(100 * (E + 1)));
  EXPECT_EQ(attn.w_v(1)(2, 1), TypeParam(100 * (2 * E + 3) + 2));
  EXPECT_EQ(attn.b_k()(0, 1), TypeParam(E + 1));
  EXPECT_EQ(attn.b_o()(0, 3), TypeParam(7));
}

TYPED_TEST(PyTorchImport, WrongShapesAreRejectedByName) {
  mha::io::PyTorchMultiheadAttention<TypeParam> w;
  w.in_proj_weight = Matrix<TypeParam>::Zero(12, 4);
  w.out_proj_weight = Matrix<TypeParam>::Zero(4, 5);
  EXPECT_EQ(error_of([&] { mha::io::from_pytorch(w, 2); }), "mha: PyTorch weights: out_proj.weight is 4 x 5 but must be 4 x 4");
  w.out_proj_weight = Matrix<TypeParam>::Zero(4, 4);
  w.in_proj_bias = Matrix<TypeParam>::Zero(1, 11);
  w.out_proj_bias = Matrix<TypeParam>::Zero(1, 4);
  EXPECT_EQ(error_of([&] { mha::io::from_pytorch(w, 2); }), "mha: PyTorch weights: in_proj_bias has 11 values but must have 12");
  w.in_proj_weight = Matrix<TypeParam>::Zero(11, 4);
  EXPECT_EQ(error_of([&] { mha::io::from_pytorch(w, 2); }), "mha: PyTorch weights: in_proj_weight is 11 x 4 but must be 12 x 4");
  EXPECT_EQ(error_of([&] { mha::io::from_pytorch(w, 3); }),
            "mha: d_model = 4 is not divisible by num_heads = 3; set d_k and d_v explicitly or choose a divisor");
}

TEST(PyTorchImport, TruncatedOrMissingFilesAreClearErrors) {
  std::ifstream in(fixture("torch_mha_packed.safetensors"), std::ios::binary);
  const std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_GT(bytes.size(), 100u);
  const std::vector<unsigned char> truncated(bytes.begin(), bytes.end() - 10);
  const std::string message = error_of([&] { mha::io::SafeTensors::parse(truncated, "cut.safetensors"); });
  EXPECT_NE(message.find("cut.safetensors"), std::string::npos) << message;
  EXPECT_NE(message.find("truncated"), std::string::npos) << message;
  const auto tensors = mha::io::SafeTensors::parse(bytes);
  EXPECT_EQ(error_of([&] { mha::io::from_state_dict<float>(tensors, 4, "decoder.self_attn."); }),
            "mha: PyTorch weights: no tensor \"decoder.self_attn.out_proj.weight\"");
}

}  // namespace
