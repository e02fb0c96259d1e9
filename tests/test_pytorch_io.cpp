// PyTorch weights: a module built from a state_dict's tensors, or loaded from a .safetensors file
// saved from PyTorch, computes what the PyTorch module computed. The files in tests/fixtures are
// made by examples/export_pytorch_mha.py and carry an input and PyTorch's output for it. Shapes are
// checked before anything is allocated: Eigen may be forbidden to allocate while an import fails.

// Before any Eigen header: Eigen's assertions throw, and allocations can be forbidden.
#include "eigen_checked.hpp"  // NOLINT(build/include_order)

#include <mha/io/pytorch.hpp>
#include <mha/io/safetensors.hpp>
#include <mha/mha.hpp>

#include "test_util.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <fstream>
#include <iterator>
#include <map>
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
  const auto attn =
      mha::io::from_state_dict<Scalar>(tensors, num_heads, "", tensors.metadata().at("add_zero_attn") == "1");
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
  EXPECT_EQ(error_of([&] { mha::io::from_pytorch(w, 2); }),
            "mha: PyTorch weights: out_proj.weight is 4 x 5 but must be 4 x 4");
  w.out_proj_weight = Matrix<TypeParam>::Zero(4, 4);
  w.in_proj_bias = Matrix<TypeParam>::Zero(1, 11);
  w.out_proj_bias = Matrix<TypeParam>::Zero(1, 4);
  EXPECT_EQ(error_of([&] { mha::io::from_pytorch(w, 2); }),
            "mha: PyTorch weights: in_proj_bias has 11 values but must have 12");
  w.in_proj_weight = Matrix<TypeParam>::Zero(11, 4);
  EXPECT_EQ(error_of([&] { mha::io::from_pytorch(w, 2); }),
            "mha: PyTorch weights: in_proj_weight is 11 x 4 but must be 12 x 4");
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

/// A safetensors file of F16 zeros: a tensor of each shape, by name.
std::vector<unsigned char> f16_file(const std::map<std::string, std::vector<std::int64_t>>& shapes) {
  nlohmann::json header = nlohmann::json::object();
  std::int64_t end = 0;
  for (const auto& [name, shape] : shapes) {
    std::int64_t bytes = 2;
    for (std::int64_t n : shape) bytes *= n;
    header[name] = {{"dtype", "F16"}, {"shape", shape}, {"data_offsets", {end, end + bytes}}};
    end += bytes;
  }
  const std::string text = header.dump();
  std::vector<unsigned char> file;
  for (int i = 0; i < 8; ++i) file.push_back(static_cast<unsigned char>(text.size() >> (8 * i)));
  file.insert(file.end(), text.begin(), text.end());
  file.resize(file.size() + static_cast<std::size_t>(end));
  return file;
}

/// Forbids Eigen's heap allocations while it lives: one throws std::runtime_error (see eigen_assert
/// above), which error_of does not catch.
class NoEigenAllocation {
 public:
  NoEigenAllocation() { Eigen::internal::set_is_malloc_allowed(false); }
  ~NoEigenAllocation() { Eigen::internal::set_is_malloc_allowed(true); }
  NoEigenAllocation(const NoEigenAllocation&) = delete;
  NoEigenAllocation& operator=(const NoEigenAllocation&) = delete;
};

TEST(PyTorchImport, HugeDeclaredWidthsAreRejectedBeforeAnythingIsAllocated) {
  // A 16 KB file whose in_proj_weight is 1 x 8000 declares E = 8000: its module, 4 · 8000² floats
  // (1 GiB), was allocated and initialised (3.4 s) before the shape was checked; 1 x 50000 (a
  // 100 KB file) ran out of memory. Now no tensor is converted and no module built.
  for (const std::int64_t E : {8000, 50000}) {
    const auto tensors =
        mha::io::SafeTensors::parse(f16_file({{"in_proj_weight", {1, E}}, {"out_proj.weight", {1, 1}}}));
    const std::string e = std::to_string(E);
    const NoEigenAllocation forbidden;
    EXPECT_EQ(error_of([&] { mha::io::from_state_dict<float>(tensors, 1); }),
              "mha: PyTorch weights: in_proj_weight is 1 x " + e + " but must be " + std::to_string(3 * E) + " x " + e);
    EXPECT_EQ(
        error_of([&] { mha::io::from_state_dict<double>(tensors, 3); }),
        "mha: d_model = " + e + " is not divisible by num_heads = 3; set d_k and d_v explicitly or choose a divisor");
  }
  // Every other shape too, with kdim and vdim from k_proj_weight and v_proj_weight.
  const auto unpacked = mha::io::SafeTensors::parse(f16_file({{"q_proj_weight", {4, 4}},
                                                              {"k_proj_weight", {1, 50000}},
                                                              {"v_proj_weight", {4, 3}},
                                                              {"out_proj.weight", {4, 4}}}));
  const auto biased = mha::io::SafeTensors::parse(f16_file(
      {{"in_proj_weight", {12, 4}}, {"in_proj_bias", {50000}}, {"out_proj.weight", {4, 4}}, {"out_proj.bias", {4}}}));
  const auto out =
      mha::io::SafeTensors::parse(f16_file({{"in_proj_weight", {12, 4}}, {"out_proj.weight", {50000, 4}}}));
  const NoEigenAllocation forbidden;
  EXPECT_EQ(error_of([&] { mha::io::from_state_dict<float>(unpacked, 2); }),
            "mha: PyTorch weights: k_proj_weight is 1 x 50000 but must be 4 x 50000");
  EXPECT_EQ(error_of([&] { mha::io::from_state_dict<float>(biased, 2); }),
            "mha: PyTorch weights: in_proj_bias has 50000 values but must have 12");
  EXPECT_EQ(error_of([&] { mha::io::from_state_dict<float>(out, 2); }),
            "mha: PyTorch weights: out_proj.weight is 50000 x 4 but must be 4 x 4");
}

TEST(PyTorchImport, FromPytorchChecksEveryShapeBeforeBuildingTheModule) {
  mha::io::PyTorchMultiheadAttention<float> w;
  w.in_proj_weight = Matrix<float>::Zero(1, 50000);
  w.out_proj_weight = Matrix<float>::Zero(1, 1);
  mha::io::PyTorchMultiheadAttention<float> valid;
  valid.in_proj_weight = Matrix<float>::Zero(12, 4);
  valid.out_proj_weight = Matrix<float>::Zero(4, 4);
  valid.bias_k = Matrix<float>::Zero(1, 4);
  valid.bias_v = Matrix<float>::Zero(1, 5);
  const NoEigenAllocation forbidden;
  EXPECT_EQ(error_of([&] { mha::io::from_pytorch(w, 1); }),
            "mha: PyTorch weights: in_proj_weight is 1 x 50000 but must be 150000 x 50000");
  EXPECT_EQ(error_of([&] { mha::io::from_pytorch(valid, 2); }),
            "mha: PyTorch weights: bias_v has 5 values but must have 4");
  valid.bias_v = Matrix<float>::Zero(0, 0);  // (allocates nothing)
  EXPECT_EQ(error_of([&] { mha::io::from_pytorch(valid, 2); }),
            "mha: PyTorch weights: bias_v has 0 values but must have 4");
  valid.bias_k = Matrix<float>::Zero(0, 0);
  // Shapes that fit: building the module allocates, which the guard catches (so it would catch an
  // allocation before the checks too).
  EXPECT_THROW(mha::io::from_pytorch(valid, 2), std::runtime_error);
}

TEST(PyTorchImport, EmptyKeyAndValueProjectionsAreRejected) {
  // k_proj_weight of shape E x 0 gave kdim = 0, which a configuration reads as "kdim = E": the E x 0
  // weight passed its check against E x 0 and was then copied into the E x E W^K.
  mha::io::PyTorchMultiheadAttention<double> w;
  w.q_proj_weight = Matrix<double>::Zero(4, 4);
  w.k_proj_weight = Matrix<double>::Zero(4, 0);
  w.v_proj_weight = Matrix<double>::Zero(4, 4);
  w.out_proj_weight = Matrix<double>::Zero(4, 4);
  EXPECT_EQ(error_of([&] { mha::io::from_pytorch(w, 2); }),
            "mha: PyTorch weights: k_proj_weight is 4 x 0 but must be 4 x 4");
  w.k_proj_weight = Matrix<double>::Zero(4, 3);
  w.v_proj_weight = Matrix<double>::Zero(4, 0);
  EXPECT_EQ(error_of([&] { mha::io::from_pytorch(w, 2); }),
            "mha: PyTorch weights: v_proj_weight is 4 x 0 but must be 4 x 4");
  const auto tensors = mha::io::SafeTensors::parse(f16_file(
      {{"q_proj_weight", {4, 4}}, {"k_proj_weight", {4, 0}}, {"v_proj_weight", {4, 4}}, {"out_proj.weight", {4, 4}}}));
  EXPECT_EQ(error_of([&] { mha::io::from_state_dict<float>(tensors, 2); }),
            "mha: PyTorch weights: k_proj_weight is 4 x 0 but must be 4 x 4");
}

TEST(PyTorchImport, StateDictErrorsNameTheTensorWithItsPrefix) {
  const auto tensors = mha::io::SafeTensors::parse(f16_file({{"encoder.self_attn.in_proj_weight", {24, 8}},
                                                             {"encoder.self_attn.out_proj.weight", {8, 8}},
                                                             {"encoder.self_attn.bias_k", {1, 1, 8}},
                                                             {"encoder.self_attn.bias_v", {1, 1, 7}}}));
  EXPECT_EQ(error_of([&] { mha::io::from_state_dict<float>(tensors, 2, "encoder.self_attn."); }),
            "mha: PyTorch weights: encoder.self_attn.bias_v has 7 values but must have 8");
  const auto stray = mha::io::SafeTensors::parse(
      f16_file({{"enc.in_proj_weight", {24, 8}}, {"enc.out_proj.weight", {8, 8}}, {"enc.out_proj.bias", {8}}}));
  EXPECT_EQ(
      error_of([&] { mha::io::from_state_dict<float>(stray, 2, "enc."); }),
      "mha: PyTorch weights: enc.out_proj.bias is given but enc.in_proj_bias is not; PyTorch has both or neither");
}

}  // namespace
