// mha — modules from the attention weights of Hugging Face LLaMA-style models (LlamaAttention,
// MistralAttention, Qwen2Attention and the others of their kind).
//
// Such a layer has four nn.Linear, stored under its path in the model (e.g.
// "model.layers.0.self_attn."), out × in as PyTorch stores every weight:
//   q_proj.weight [h·head_dim, hidden_size]      q_proj.bias [h·head_dim]       (optional)
//   k_proj.weight [h_kv·head_dim, hidden_size]   k_proj.bias [h_kv·head_dim]    (optional)
//   v_proj.weight [h_kv·head_dim, hidden_size]   v_proj.bias [h_kv·head_dim]    (optional)
//   o_proj.weight [hidden_size, h·head_dim]      o_proj.bias [hidden_size]      (optional)
// LLaMA and Mistral have no biases, Qwen2 has those of q, k and v, LLaMA with attention_bias all
// four. Its forward projects the hidden states (with the biases), views each projection as heads
// of head_dim, turns every query and key head at position p by Hugging Face's rotate_half: the
// pairs (i, i + head_dim/2) by the angles p·θ_i, θ_i = rope_theta^(−2i/head_dim) (cos and sin of
// position · inv_freq, concatenated twice), repeats each key/value head for h/h_kv query heads
// (repeat_kv: query head i reads key/value head i / (h/h_kv)), and computes
// softmax(q kᵀ/√head_dim + causal mask) v per head and o_proj of the heads concatenated.
// That is MultiHeadAttention with d_k = d_v = head_dim, num_kv_heads = h_kv, rotary embeddings
// RotaryPairs::halves of base rope_theta, and the default scale 1/√d_k, called causal: forward with
// options.causal = true (positions 0 … L−1, Hugging Face's position_ids = arange(L)), or decode.
// Each weight is transposed into mha's x · W layout, as io/pytorch.hpp does; a missing bias is zero.
// mha computes the rotary angles in double; Hugging Face computes them in float32 whatever the
// model's dtype, so at position p its angles are off the exact ones by up to about p · 6e-8 radians.
//
// Not covered (the loader cannot see them in the weights): rope_scaling other than the default
// rope_type (linear, dynamic, yarn, llama3, …) and partial_rotary_factor < 1, which turn other
// angles, and a scale other than 1/√head_dim (options.scale). Mistral's sliding_window is
// AttentionOptions::window at the call. Layers that normalise q and k per head (q_norm.weight,
// k_norm.weight: Qwen3, OLMo 2) are rejected.
#pragma once

#include <mha/config.hpp>
#include <mha/io/pytorch.hpp>
#include <mha/multi_head_attention.hpp>

#include <Eigen/Core>

#include <cstddef>
#include <cstdint>
#include <string>

namespace mha {
namespace io {

/// What shapes a Hugging Face attention layer besides its weights: the numbers of its config.json
/// of the same names (see huggingface_attention_config for reading them from it).
struct HuggingFaceAttentionConfig {
  Eigen::Index num_attention_heads = 0;  ///< h, the query heads
  Eigen::Index num_key_value_heads = 0;  ///< h_kv, the key/value heads; 0 means num_attention_heads
  Eigen::Index head_dim = 0;             ///< the width of a head; 0 means hidden_size / num_attention_heads
  double rope_theta = 10000.0;           ///< the base of the rotary angles
};

}  // namespace io

namespace detail {

/// What error messages of the Hugging Face import begin with.
inline constexpr const char* kHuggingFace = "Hugging Face weights";

/// \returns the configuration of the module that the attention layer at `prefix` of `tensors` and
/// `hf` make, after checking every tensor's shape from matrix_size() alone; throws
/// mha::invalid_argument naming the tensor (prefix + its name) and both shapes otherwise.
template <typename Tensors>
MultiHeadAttentionConfig checked_huggingface_config(const Tensors& tensors, const io::HuggingFaceAttentionConfig& hf,
                                                    const std::string& prefix) {
  for (const char* name : {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"})
    if (!tensors.contains(prefix + name)) fail(kHuggingFace, ": no tensor \"", prefix, name, "\"");
  for (const char* name : {"q_norm.weight", "k_norm.weight"})
    if (tensors.contains(prefix + name))
      fail(kHuggingFace, ": ", prefix, name,
           " normalises the queries or keys of each head (Qwen3, OLMo 2), which mha's attention does not");
  const Eigen::Index h = hf.num_attention_heads;
  const Eigen::Index h_kv = hf.num_key_value_heads == 0 ? h : hf.num_key_value_heads;
  if (h <= 0) fail(kHuggingFace, ": num_attention_heads must be positive, got ", h);
  if (h_kv < 0 || h % h_kv != 0)
    fail(kHuggingFace, ": num_key_value_heads = ", h_kv, " must be positive and divide num_attention_heads = ", h);
  const MatrixSize q = size_of(tensors, prefix + "q_proj.weight");
  const Eigen::Index d_model = q.cols();
  if (d_model <= 0)
    fail(kHuggingFace, ": ", prefix, "q_proj.weight is ", q.rows(), " x ", q.cols(),
         ", but hidden_size, its columns, must be positive");
  if (hf.head_dim < 0) fail(kHuggingFace, ": head_dim must be positive (or 0 for hidden_size / num_attention_heads)");
  if (hf.head_dim == 0 && d_model % h != 0)
    fail(kHuggingFace, ": hidden_size = ", d_model, " (the columns of ", prefix,
         "q_proj.weight) is not divisible by num_attention_heads = ", h, "; give head_dim");
  MultiHeadAttentionConfig config;
  config.d_model = d_model;
  config.num_heads = h;
  config.num_kv_heads = h_kv;
  config.d_k = config.d_v = hf.head_dim == 0 ? d_model / h : hf.head_dim;
  config.rotary = true;
  config.rotary_pairs = RotaryPairs::halves;
  config.rotary_base = hf.rope_theta;
  for (const char* name : {"q_proj.bias", "k_proj.bias", "v_proj.bias", "o_proj.bias"})
    config.bias = config.bias || tensors.contains(prefix + name);
  const MultiHeadAttentionConfig r = config.resolved();  // no product below overflows
  const std::string heads = " (num_attention_heads · head_dim = " + std::to_string(h) + " · " + std::to_string(r.d_k);
  const std::string kv_heads =
      " (num_key_value_heads · head_dim = " + std::to_string(h_kv) + " · " + std::to_string(r.d_k);
  const std::string hidden = ", hidden_size = " + std::to_string(d_model) + ")";
  expect_shape(q, h * r.d_k, d_model, prefix + "q_proj.weight", kHuggingFace, heads + hidden);
  expect_shape(size_of(tensors, prefix + "k_proj.weight"), h_kv * r.d_k, d_model, prefix + "k_proj.weight",
               kHuggingFace, kv_heads + hidden);
  expect_shape(size_of(tensors, prefix + "v_proj.weight"), h_kv * r.d_v, d_model, prefix + "v_proj.weight",
               kHuggingFace, kv_heads + hidden);
  expect_shape(size_of(tensors, prefix + "o_proj.weight"), d_model, h * r.d_v, prefix + "o_proj.weight", kHuggingFace,
               " (hidden_size = " + std::to_string(d_model) +
                   ", num_attention_heads · head_dim = " + std::to_string(h) + " · " + std::to_string(r.d_v) + ")");
  const auto expect_bias = [&](const char* name, Eigen::Index n, const std::string& why) {
    if (tensors.contains(prefix + name))
      expect_values(size_of(tensors, prefix + name), n, prefix + name, kHuggingFace, why);
  };
  expect_bias("q_proj.bias", h * r.d_k, heads + ")");
  expect_bias("k_proj.bias", h_kv * r.d_k, kv_heads + ")");
  expect_bias("v_proj.bias", h_kv * r.d_v, kv_heads + ")");
  expect_bias("o_proj.bias", d_model, " (hidden_size)");
  return config;
}

}  // namespace detail

namespace io {

/// A module with the weights of the Hugging Face attention layer at `prefix` (e.g.
/// "model.layers.0.self_attn.") of `tensors`, any object with `contains(name)`,
/// `matrix_size(name)` and `matrix<Scalar>(name)` (mha::io::SafeTensors is one; other tensors of
/// the file are not read), whose forward(x, options) with options.causal = true, and whose decode,
/// compute the layer's forward (see the top of this header). `hf` gives what the weights do not
/// say, from the model's config.json. Every shape is checked from matrix_size() before the module is built or a tensor
/// converted; errors are mha::invalid_argument naming the tensor with its prefix and both shapes.
/// Absent biases are zero; the module has biases (config.bias) if any of the four is given.
template <typename Scalar, typename Tensors>
MultiHeadAttention<Scalar> from_huggingface(const Tensors& tensors, const HuggingFaceAttentionConfig& hf,
                                            const std::string& prefix = "") {
  MultiHeadAttention<Scalar> module(detail::checked_huggingface_config(tensors, hf, prefix));
  // One tensor converted at a time, straight into the module: memory peaks at the module and one
  // tensor, not two copies of the layer.
  const auto read = [&](const char* name) { return tensors.template matrix<Scalar>(prefix + name); };
  module.w_q() = read("q_proj.weight").transpose();
  module.w_k() = read("k_proj.weight").transpose();
  module.w_v() = read("v_proj.weight").transpose();
  module.w_o() = read("o_proj.weight").transpose();
  if (module.config().bias) {  // the constructor's biases are zero
    if (tensors.contains(prefix + "q_proj.bias")) module.b_q() = detail::as_row(read("q_proj.bias"));
    if (tensors.contains(prefix + "k_proj.bias")) module.b_k() = detail::as_row(read("k_proj.bias"));
    if (tensors.contains(prefix + "v_proj.bias")) module.b_v() = detail::as_row(read("v_proj.bias"));
    if (tensors.contains(prefix + "o_proj.bias")) module.b_o() = detail::as_row(read("o_proj.bias"));
  }
  return module;
}

/// The HuggingFaceAttentionConfig of a model's config.json, parsed into `json` by a JSON library
/// with nlohmann/json's interface (is_object, contains, at, is_null, is_number, is_number_integer,
/// get, dump), e.g. nlohmann::json::parse(std::ifstream("config.json")): num_attention_heads
/// (required), num_key_value_heads, head_dim and rope_theta (optional, as in Hugging Face; null
/// counts as absent). Throws mha::invalid_argument for a missing or mistyped field, and for a
/// rope_scaling other than the default rope_type or a partial_rotary_factor other than 1, which
/// mha's rotary embeddings do not compute.
template <typename Json>
HuggingFaceAttentionConfig huggingface_attention_config(const Json& json) {
  const char* what = "Hugging Face config.json";
  if (!json.is_object()) detail::fail(what, ": not a JSON object");
  const auto given = [&](const char* key) { return json.contains(key) && !json.at(key).is_null(); };
  const auto quoted = [&](const char* key) {  // at most 60 bytes of the value, not splitting a UTF-8 character
    const std::string text = json.at(key).dump();
    std::size_t n = 60;
    if (text.size() <= n) return text;
    while (n > 0 && (static_cast<unsigned char>(text[n]) & 0xc0) == 0x80) --n;
    return text.substr(0, n) + "...";
  };
  const auto integer = [&](const char* key, Eigen::Index& out) {
    if (!given(key)) return;
    const auto& value = json.at(key);
    if (!value.is_number_integer() || value.template get<std::int64_t>() < 0)
      detail::fail(what, ": \"", key, "\" is ", quoted(key), ", not an integer >= 0");
    out = static_cast<Eigen::Index>(value.template get<std::int64_t>());
  };
  HuggingFaceAttentionConfig c;
  if (!given("num_attention_heads")) detail::fail(what, ": no \"num_attention_heads\"");
  integer("num_attention_heads", c.num_attention_heads);
  integer("num_key_value_heads", c.num_key_value_heads);
  integer("head_dim", c.head_dim);
  if (given("rope_theta")) {
    if (!json.at("rope_theta").is_number())
      detail::fail(what, ": \"rope_theta\" is ", quoted("rope_theta"), ", not a number");
    c.rope_theta = json.at("rope_theta").template get<double>();
  }
  if (given("rope_scaling")) {
    const auto& scaling = json.at("rope_scaling");
    bool plain = false;
    for (const char* key : {"rope_type", "type"})
      if (scaling.is_object() && scaling.contains(key) && scaling.at(key) == "default") plain = true;
    if (!plain)
      detail::fail(what, ": \"rope_scaling\" is ", quoted("rope_scaling"),
                   "; mha's rotary embeddings are the default rope_type only");
  }
  if (given("partial_rotary_factor") &&
      !(json.at("partial_rotary_factor").is_number() && json.at("partial_rotary_factor").template get<double>() == 1.0))
    detail::fail(what, ": \"partial_rotary_factor\" is ", quoted("partial_rotary_factor"),
                 "; mha's rotary embeddings turn the whole head (1)");
  return c;
}

}  // namespace io
}  // namespace mha
