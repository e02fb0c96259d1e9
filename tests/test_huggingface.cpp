// Hugging Face attention weights (LlamaAttention, Qwen2Attention, ...): a module loaded with
// mha::io::from_huggingface computes what Hugging Face's forward computes. The fixtures in
// tests/fixtures/hf_*.safetensors are made by tests/fixtures/generate_hf_fixtures.py, which writes
// LlamaAttention's forward literally in torch and saves the weights, an input and the outputs
// (float32 and float64). Shapes and head counts are checked before anything is allocated.

// Before any Eigen header: Eigen's assertions throw, and allocations can be forbidden.
#include "eigen_checked.hpp"  // NOLINT(build/include_order)

#include <mha/io/huggingface.hpp>
#include <mha/io/safetensors.hpp>
#include <mha/mha.hpp>

#include "test_util.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using mha_test::close;
using mha_test::error_of;
using mha_test::Matrix;
using mha_test::relative_error;

const std::string kPrefix = "model.layers.0.self_attn.";

std::string fixture(const std::string& name) { return std::string(MHA_FIXTURE_DIR) + "/" + name; }

/// The relative error allowed against the fixture's float64 output: float arithmetic (the fixture's
/// inputs and weights are exact in float), and double arithmetic, whose error is about 1e-15.
template <typename Scalar>
constexpr double hf_tolerance() {
  return std::is_same<Scalar, float>::value ? 1e-5 : 1e-12;
}

/// A fixture file, its layer's configuration from the config.json text in its metadata, and the module.
template <typename Scalar>
struct Loaded {
  mha::io::SafeTensors file;
  mha::io::HuggingFaceAttentionConfig hf;
  mha::MultiHeadAttention<Scalar> module;
};

template <typename Scalar>
Loaded<Scalar> load(const std::string& name) {
  auto file = mha::io::SafeTensors::load(fixture(name));
  const auto hf = mha::io::huggingface_attention_config(nlohmann::json::parse(file.metadata().at("config")));
  auto module = mha::io::from_huggingface<Scalar>(file, hf, file.metadata().at("prefix"));
  return {std::move(file), hf, std::move(module)};
}

/// Hugging Face's attention is causal.
mha::AttentionOptions causal() {
  mha::AttentionOptions options;
  options.causal = true;
  return options;
}

template <typename Scalar>
class HuggingFaceImport : public ::testing::Test {};
TYPED_TEST_SUITE(HuggingFaceImport, mha_test::Scalars, mha_test::ScalarNames);

/// Compares the loaded module's causal forward with the fixture's outputs; \returns the error
/// against the float64 output.
template <typename Scalar>
double check_forward(const Loaded<Scalar>& l, const char* what) {
  const Matrix<Scalar> x = l.file.template matrix<Scalar>("check.hidden_states");
  const Matrix<Scalar> y = l.module.forward(x, causal());
  const Matrix<double> y64 = l.file.template matrix<double>("check.output_f64");
  const Matrix<double> y32 = l.file.template matrix<double>("check.output_f32");
  EXPECT_TRUE(close(y, y64, hf_tolerance<Scalar>())) << what << " against torch in float64";
  // Hugging Face run in float32 (its rotary angles in float32 too): 1e-5 in both types.
  EXPECT_TRUE(close(y, y32, 1e-5)) << what << " against torch in float32";
  std::cout << what << ": relative error " << relative_error(y, y64) << " against torch's float64 output, "
            << relative_error(y, y32) << " against its float32 output\n";
  return relative_error(y, y64);
}

TYPED_TEST(HuggingFaceImport, LlamaGroupedQueryLayerMatchesTorch) {
  const auto l = load<TypeParam>("hf_llama_gqa.safetensors");
  // The file has other tensors of the layer too, which the loader ignores.
  ASSERT_TRUE(l.file.contains("model.layers.0.mlp.down_proj.weight"));
  ASSERT_TRUE(l.file.contains("model.layers.0.input_layernorm.weight"));
  const mha::MultiHeadAttentionConfig& c = l.module.config();
  EXPECT_EQ(c.d_model, 32);
  EXPECT_EQ(c.num_heads, 4);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.d_k, 8);  // no head_dim in its config.json: hidden_size / num_attention_heads
  EXPECT_EQ(c.d_v, 8);
  EXPECT_FALSE(c.bias);
  EXPECT_TRUE(c.rotary);
  EXPECT_EQ(c.rotary_pairs, mha::RotaryPairs::halves);
  EXPECT_EQ(c.rotary_base, 10000.0);
  check_forward(l, "LLaMA-like, grouped-query");
}

TYPED_TEST(HuggingFaceImport, Qwen2BiasesAndMultiQueryLayerMatchesTorch) {
  const auto l = load<TypeParam>("hf_qwen2_bias.safetensors");
  const mha::MultiHeadAttentionConfig& c = l.module.config();
  EXPECT_EQ(c.d_model, 24);
  EXPECT_EQ(c.num_kv_heads, 1);
  EXPECT_EQ(c.d_k, 8);  // head_dim given, not 24 / 4
  EXPECT_EQ(c.rotary_base, 1e6);
  ASSERT_TRUE(c.bias);
  // q, k and v have biases, o_proj has none: b_o is zero.
  EXPECT_EQ(Matrix<TypeParam>(l.module.b_k()), l.file.template matrix<TypeParam>(kPrefix + "k_proj.bias"));
  EXPECT_GT(l.module.b_q().cwiseAbs().maxCoeff(), TypeParam(0.1));
  EXPECT_EQ(l.module.b_o().cwiseAbs().maxCoeff(), TypeParam(0));
  EXPECT_EQ(l.file.tensor(kPrefix + "q_proj.weight").dtype, "BF16");
  check_forward(l, "Qwen2-like, biases, multi-query, BF16 weights");
}

TYPED_TEST(HuggingFaceImport, DecodingWithACacheGivesTheFixturesRows) {
  for (const char* name : {"hf_llama_gqa.safetensors", "hf_qwen2_bias.safetensors"}) {
    const auto l = load<TypeParam>(name);
    const Matrix<TypeParam> x = l.file.template matrix<TypeParam>("check.hidden_states");
    const Matrix<double> y64 = l.file.template matrix<double>("check.output_f64");
    ASSERT_EQ(x.rows(), 9);
    mha::KVCache<TypeParam> cache = l.module.make_cache();
    // A prompt of 4 tokens, then 2, then one token at a time: each step's rows are the fixture's.
    const Eigen::Index steps[] = {4, 2, 1, 1, 1};
    Eigen::Index done = 0;
    double worst = 0;
    for (const Eigen::Index n : steps) {
      const Matrix<TypeParam> y = l.module.decode(x.middleRows(done, n), cache);
      EXPECT_TRUE(close(y, y64.middleRows(done, n), hf_tolerance<TypeParam>())) << name << ", rows " << done;
      worst = std::max(worst, relative_error(y, y64.middleRows(done, n)));
      done += n;
    }
    EXPECT_EQ(done, x.rows());
    EXPECT_EQ(cache.length(), x.rows());
    std::cout << name << ": decode, largest relative error of a step " << worst << "\n";
  }
}

TEST(HuggingFaceImport, TheFixturesTellPairingsBasesAndCausalityApart) {
  // What the tests above would see if the loader got the rotation or the mask wrong: the same
  // weights in a module with interleaved pairs, another base, no rotation or no causal mask miss
  // the fixture by far more than the tolerance.
  for (const char* name : {"hf_llama_gqa.safetensors", "hf_qwen2_bias.safetensors"}) {
    const auto l = load<double>(name);
    const Matrix<double> x = l.file.matrix<double>("check.hidden_states");
    const Matrix<double> y64 = l.file.matrix<double>("check.output_f64");
    const auto variant = [&](auto change) {
      mha::MultiHeadAttentionConfig c = l.module.config();
      change(c);
      mha::MultiHeadAttention<double> other(c);
      auto to = other.parameters();
      const auto from = l.module.parameters();
      for (std::size_t i = 0; i < to.size(); ++i) to[i].value = from[i].value;
      return other;
    };
    const auto interleaved = variant([](auto& c) { c.rotary_pairs = mha::RotaryPairs::interleaved; });
    const auto other_base = variant([](auto& c) { c.rotary_base = c.rotary_base == 1e4 ? 1e6 : 1e4; });
    const auto unrotated = variant([](auto& c) { c.rotary = false; });
    EXPECT_GT(relative_error(interleaved.forward(x, causal()), y64), 1e-2) << name;
    EXPECT_GT(relative_error(other_base.forward(x, causal()), y64), 1e-3) << name;
    EXPECT_GT(relative_error(unrotated.forward(x, causal()), y64), 1e-2) << name;
    EXPECT_GT(relative_error(l.module.forward(x), y64), 1e-2) << name;
  }
}

/// A tensor of an in-memory file: F32 values in row-major order (zeros if none are given).
struct Entry {
  std::string name;
  std::vector<std::int64_t> shape;
  std::vector<float> values = {};
};

/// A safetensors file holding `entries`.
mha::io::SafeTensors file_of(const std::vector<Entry>& entries) {
  nlohmann::json header = nlohmann::json::object();
  std::vector<unsigned char> data;
  for (const Entry& e : entries) {
    std::int64_t n = 1;
    for (const std::int64_t d : e.shape) n *= d;
    std::vector<float> values = e.values;
    values.resize(static_cast<std::size_t>(n));
    const std::size_t begin = data.size();
    data.resize(begin + 4 * values.size());
    if (!values.empty()) std::memcpy(data.data() + begin, values.data(), 4 * values.size());
    header[e.name] = {{"dtype", "F32"}, {"shape", e.shape}, {"data_offsets", {begin, data.size()}}};
  }
  const std::string text = header.dump();
  std::vector<unsigned char> file;
  for (int i = 0; i < 8; ++i) file.push_back(static_cast<unsigned char>(text.size() >> (8 * i)));
  file.insert(file.end(), text.begin(), text.end());
  file.insert(file.end(), data.begin(), data.end());
  return mha::io::SafeTensors::parse(file);
}

/// The tensors of a layer of width E with h heads over h_kv of width d, zeros, Hugging Face's names
/// and shapes, with q/k/v biases if `biases`, and an MLP weight of the same layer.
std::vector<Entry> layer(std::int64_t E, std::int64_t h, std::int64_t h_kv, std::int64_t d, bool biases = false) {
  std::vector<Entry> t = {{kPrefix + "q_proj.weight", {h * d, E}},
                          {kPrefix + "k_proj.weight", {h_kv * d, E}},
                          {kPrefix + "v_proj.weight", {h_kv * d, E}},
                          {kPrefix + "o_proj.weight", {E, h * d}},
                          {"model.layers.0.mlp.up_proj.weight", {2 * E, E}}};
  if (biases) {
    t.push_back({kPrefix + "q_proj.bias", {h * d}});
    t.push_back({kPrefix + "k_proj.bias", {h_kv * d}});
    t.push_back({kPrefix + "v_proj.bias", {h_kv * d}});
  }
  return t;
}

/// `entries` with tensor `name`'s shape replaced (or the tensor removed, for an empty shape).
std::vector<Entry> with(std::vector<Entry> entries, const std::string& name, std::vector<std::int64_t> shape) {
  for (auto it = entries.begin(); it != entries.end(); ++it)
    if (it->name == kPrefix + name) {
      if (shape.empty())
        entries.erase(it);
      else
        it->shape = shape;
      return entries;
    }
  entries.push_back({kPrefix + name, shape});
  return entries;
}

mha::io::HuggingFaceAttentionConfig heads(Eigen::Index h, Eigen::Index h_kv, Eigen::Index head_dim = 0) {
  mha::io::HuggingFaceAttentionConfig hf;
  hf.num_attention_heads = h;
  hf.num_key_value_heads = h_kv;
  hf.head_dim = head_dim;
  return hf;
}

TYPED_TEST(HuggingFaceImport, WeightsAreTransposedIntoTheHeadBlocks) {
  // E = 4, h = 2 heads of d = 2 over h_kv = 1: weight(out r, in c) = 100 r + c becomes W(in c, out r),
  // and output feature r belongs to head r / d, column r % d of its block.
  const auto numbered = [](std::int64_t rows, std::int64_t cols, float offset) {
    std::vector<float> v;
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < cols; ++c) v.push_back(offset + static_cast<float>(100 * r + c));
    return v;
  };
  const auto tensors = file_of({{kPrefix + "q_proj.weight", {4, 4}, numbered(4, 4, 0)},
                                {kPrefix + "k_proj.weight", {2, 4}, numbered(2, 4, 1000)},
                                {kPrefix + "v_proj.weight", {2, 4}, numbered(2, 4, 2000)},
                                {kPrefix + "o_proj.weight", {4, 4}, numbered(4, 4, 3000)},
                                {kPrefix + "v_proj.bias", {2}, {7, 8}},
                                {kPrefix + "o_proj.bias", {4}, {1, 2, 3, 4}}});
  const auto attn = mha::io::from_huggingface<TypeParam>(tensors, heads(2, 1), kPrefix);
  EXPECT_EQ(attn.num_kv_heads(), 1);
  EXPECT_EQ(attn.w_q(1)(3, 0), TypeParam(100 * 2 + 3));  // W_1^Q(in 3, column 0) = weight(out 2, in 3)
  EXPECT_EQ(attn.w_q(0)(2, 1), TypeParam(100 * 1 + 2));
  EXPECT_EQ(attn.w_k(0)(1, 1), TypeParam(1000 + 100 + 1));
  EXPECT_EQ(attn.w_v(0)(3, 0), TypeParam(2000 + 3));
  EXPECT_EQ(attn.w_o()(1, 2), TypeParam(3000 + 200 + 1));  // W^O(in 1, out 2) = o_proj.weight(out 2, in 1)
  // Biases: the module has them as soon as one is given; the absent ones are zero.
  EXPECT_EQ(attn.b_v()(0, 1), TypeParam(8));
  EXPECT_EQ(attn.b_o()(0, 3), TypeParam(4));
  EXPECT_EQ(attn.b_q().cwiseAbs().maxCoeff(), TypeParam(0));
  EXPECT_EQ(attn.b_k().cwiseAbs().maxCoeff(), TypeParam(0));
}

/// Forbids Eigen's heap allocations while it lives (see eigen_assert above).
class NoEigenAllocation {
 public:
  NoEigenAllocation() { Eigen::internal::set_is_malloc_allowed(false); }
  ~NoEigenAllocation() { Eigen::internal::set_is_malloc_allowed(true); }
  NoEigenAllocation(const NoEigenAllocation&) = delete;
  NoEigenAllocation& operator=(const NoEigenAllocation&) = delete;
};

TEST(HuggingFaceImport, MissingTensorsWrongShapesAndHeadCountsAreRejectedByName) {
  const std::string p = "mha: Hugging Face weights: " + kPrefix;
  const auto good = layer(32, 4, 2, 8, true);  // a valid layer: h 4, h_kv 2, d 8
  auto module = mha::io::from_huggingface<float>(file_of(good), heads(4, 2), kPrefix);
  const Matrix<float> w_k = module.w_k();
  const auto error = [&](const std::vector<Entry>& entries, const mha::io::HuggingFaceAttentionConfig& hf) {
    const auto tensors = file_of(entries);
    const NoEigenAllocation forbidden;  // every check runs before the module or a tensor is allocated
    return error_of([&] { module = mha::io::from_huggingface<float>(tensors, hf, kPrefix); });
  };
  EXPECT_EQ(error(with(good, "k_proj.weight", {}), heads(4, 2)),
            "mha: Hugging Face weights: no tensor \"" + kPrefix + "k_proj.weight\"");
  {
    // The valid layer: building the module allocates, which the guard catches (so it would catch an
    // allocation before the checks too).
    const auto tensors = file_of(good);
    const NoEigenAllocation forbidden;
    EXPECT_THROW(mha::io::from_huggingface<float>(tensors, heads(4, 2), kPrefix), std::runtime_error);
  }
  EXPECT_EQ(
      error(with(good, "k_proj.weight", {8, 32}), heads(4, 2)),
      p + "k_proj.weight is 8 x 32 but must be 16 x 32 (num_key_value_heads · head_dim = 2 · 8, hidden_size = 32)");
  EXPECT_EQ(
      error(with(good, "v_proj.weight", {16, 31}), heads(4, 2)),
      p + "v_proj.weight is 16 x 31 but must be 16 x 32 (num_key_value_heads · head_dim = 2 · 8, hidden_size = 32)");
  EXPECT_EQ(
      error(with(good, "o_proj.weight", {32, 16}), heads(4, 2)),
      p + "o_proj.weight is 32 x 16 but must be 32 x 32 (hidden_size = 32, num_attention_heads · head_dim = 4 · 8)");
  EXPECT_EQ(error(with(good, "q_proj.bias", {31}), heads(4, 2)),
            p + "q_proj.bias has 31 values but must have 32 (num_attention_heads · head_dim = 4 · 8)");
  EXPECT_EQ(error(with(good, "o_proj.bias", {16}), heads(4, 2)),
            p + "o_proj.bias has 16 values but must have 32 (hidden_size)");
  // Head counts that do not fit the weights.
  EXPECT_EQ(
      error(good, heads(4, 1)),
      p + "k_proj.weight is 16 x 32 but must be 8 x 32 (num_key_value_heads · head_dim = 1 · 8, hidden_size = 32)");
  EXPECT_EQ(
      error(good, heads(8, 2)),
      p + "k_proj.weight is 16 x 32 but must be 8 x 32 (num_key_value_heads · head_dim = 2 · 4, hidden_size = 32)");
  EXPECT_EQ(
      error(good, heads(4, 2, 4)),
      p + "q_proj.weight is 32 x 32 but must be 16 x 32 (num_attention_heads · head_dim = 4 · 4, hidden_size = 32)");
  EXPECT_EQ(error(good, heads(3, 0)), "mha: Hugging Face weights: hidden_size = 32 (the columns of " + kPrefix +
                                          "q_proj.weight) is not divisible by num_attention_heads = 3; give head_dim");
  EXPECT_EQ(error(good, heads(4, 3)),
            "mha: Hugging Face weights: num_key_value_heads = 3 must be positive and divide num_attention_heads = 4");
  EXPECT_EQ(error(good, heads(0, 0)), "mha: Hugging Face weights: num_attention_heads must be positive, got 0");
  EXPECT_EQ(error(with(good, "q_norm.weight", {8}), heads(4, 2)),
            p + "q_norm.weight normalises the queries or keys of each head (Qwen3, OLMo 2), which mha's attention "
                "does not");
  EXPECT_EQ(error(layer(28, 4, 2, 7), heads(4, 2)),
            "mha: rotary embeddings rotate pairs of coordinates, so d_k must be even, got d_k = 7");
  // A small file that declares a huge layer: rejected from its header, nothing allocated.
  EXPECT_EQ(error(with(good, "q_proj.weight", {1, 50000}), heads(4, 2)),
            p + "q_proj.weight is 1 x 50000 but must be 50000 x 50000 (num_attention_heads · head_dim = 4 · 12500, "
                "hidden_size = 50000)");
  // The destination module is as it was before the failed imports.
  EXPECT_EQ(module.config().num_kv_heads, 2);
  EXPECT_EQ(Matrix<float>(module.w_k()), w_k);
}

TEST(HuggingFaceImport, ConfigJsonFieldsAreReadAndUnsupportedRopesRejected) {
  const auto parse = [](const char* text) {
    return mha::io::huggingface_attention_config(nlohmann::json::parse(text));
  };
  const auto c = parse(
      R"({"num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": null, "rope_theta": 500000.0,
          "rope_scaling": {"rope_type": "default"}, "hidden_size": 4096})");
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.head_dim, 0);
  EXPECT_EQ(c.rope_theta, 500000.0);
  const auto defaults = parse(R"({"num_attention_heads": 4})");
  EXPECT_EQ(defaults.num_key_value_heads, 0);
  EXPECT_EQ(defaults.rope_theta, 10000.0);
  EXPECT_EQ(parse(R"({"num_attention_heads": 4, "head_dim": 128})").head_dim, 128);
  const std::string p = "mha: Hugging Face config.json: ";
  EXPECT_EQ(error_of([&] { parse(R"({"num_key_value_heads": 4})"); }), p + "no \"num_attention_heads\"");
  EXPECT_EQ(error_of([&] { parse(R"([1])"); }), p + "not a JSON object");
  EXPECT_EQ(error_of([&] { parse(R"({"num_attention_heads": "4"})"); }),
            p + "\"num_attention_heads\" is \"4\", not an integer >= 0");
  EXPECT_EQ(error_of([&] { parse(R"({"num_attention_heads": 4, "num_key_value_heads": -2})"); }),
            p + "\"num_key_value_heads\" is -2, not an integer >= 0");
  EXPECT_EQ(error_of([&] { parse(R"({"num_attention_heads": 4, "rope_theta": "big"})"); }),
            p + "\"rope_theta\" is \"big\", not a number");
  EXPECT_EQ(
      error_of([&] { parse(R"({"num_attention_heads": 4, "rope_scaling": {"factor": 8.0, "rope_type": "llama3"}})"); }),
      p + "\"rope_scaling\" is {\"factor\":8.0,\"rope_type\":\"llama3\"}; mha's rotary embeddings are the "
          "default rope_type only");
  EXPECT_EQ(error_of([&] { parse(R"({"num_attention_heads": 4, "partial_rotary_factor": 0.5})"); }),
            p + "\"partial_rotary_factor\" is 0.5; mha's rotary embeddings turn the whole head (1)");
  EXPECT_EQ(parse(R"({"num_attention_heads": 4, "partial_rotary_factor": 1.0, "rope_scaling": null})").rope_theta,
            10000.0);
}

}  // namespace
