// A libFuzzer harness over the public API. The bytes choose a scalar type, shapes, head counts,
// d_k/d_v, kdim/vdim, biases, batches, masks, options, key/value heads, rotary embeddings, windows,
// decode steps and values (including NaN, ±Inf, huge and denormal numbers), valid and invalid.
// Properties checked, besides "no crash and no sanitizer report":
//   - invalid input throws mha::invalid_argument, and only invalid input does;
//   - the result has the documented shape;
//   - finite inputs of moderate size (|x| ≤ 1e3, so that no product can overflow) give finite output,
//     and finite gradients in the backward pass, whose taped forward gives the same output;
//   - a decode step appends its tokens to the cache, and a rejected one leaves the cache as it was.
// Built with clang's -fsanitize=fuzzer; fuzz_replay.cpp runs the same function over the committed
// corpus in every build, so each input the fuzzer ever found becomes a regression test.
#include <mha/mha.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

/// Reads numbers from the fuzzer's bytes; past the end, every read gives 0.
class Bytes {
 public:
  Bytes(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}

  std::uint8_t byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  /// An integer in [lo, hi].
  int in(int lo, int hi) { return lo + static_cast<int>(byte() % static_cast<unsigned>(hi - lo + 1)); }

  /// A value of one of several kinds: moderate, zero, huge, denormal, NaN or ±Inf.
  template <typename Scalar>
  Scalar value(bool& moderate) {
    const std::uint8_t kind = byte();
    const double unit = (static_cast<double>(byte()) - 127.5) / 127.5;  // in [−1, 1]
    switch (kind % 16) {
      case 0:
        moderate = false;
        return std::numeric_limits<Scalar>::quiet_NaN();
      case 1:
        moderate = false;
        return (unit < 0 ? -1 : 1) * std::numeric_limits<Scalar>::infinity();
      case 2:
        moderate = false;
        return static_cast<Scalar>(unit * 0.99) * std::numeric_limits<Scalar>::max();
      case 3:
        return static_cast<Scalar>(unit * 100) * std::numeric_limits<Scalar>::denorm_min();
      case 4:
        return 0;
      case 5:
        return static_cast<Scalar>(unit * 1e3);
      default:
        return static_cast<Scalar>(unit * 4);
    }
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
};

template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

template <typename Scalar>
Matrix<Scalar> matrix(Bytes& in, Eigen::Index rows, Eigen::Index cols, bool& moderate) {
  Matrix<Scalar> m(rows, cols);
  for (Eigen::Index j = 0; j < cols; ++j)
    for (Eigen::Index i = 0; i < rows; ++i) m(i, j) = in.value<Scalar>(moderate);
  return m;
}

[[noreturn]] void violated(const char* property) {
  std::fprintf(stderr, "fuzz_attention: property violated: %s\n", property);
  std::abort();
}

/// Options from the bytes; `valid` is cleared when the scale is not finite in Scalar, and
/// `moderate` when it is finite but huge.
template <typename Scalar>
mha::AttentionOptions options(Bytes& in, bool& valid, bool& moderate) {
  mha::AttentionOptions o;
  o.causal = in.byte() % 2 == 1;
  switch (in.byte() % 7) {
    case 0:
      o.scale = (in.byte() - 127.5) / 16;
      break;
    case 1:
      o.scale = std::numeric_limits<double>::quiet_NaN();
      valid = false;
      break;
    case 2:
      o.scale = std::numeric_limits<double>::infinity();
      valid = false;
      break;
    case 3:
      // Finite in double, not in float.
      o.scale = 1e39;
      valid = valid && std::is_same<Scalar, double>::value;
      moderate = false;
      break;
    default:
      break;
  }
  return o;
}

/// A window from the bytes: none, small, or near the largest index (which hides nothing).
Eigen::Index window(Bytes& in) {
  const int kind = in.in(0, 7);
  if (kind == 0) return std::numeric_limits<Eigen::Index>::max() - in.in(0, 3);
  return kind < 4 ? 0 : in.in(-1, 8);
}

/// A mask from the bytes, rows × cols, in one of the three conventions, now and then with a row
/// too many (the caller judges the shape by the documented rule). Additive values may be −∞ (a
/// removed key) or, rarely, NaN, which clears `moderate`.
template <typename Scalar>
mha::AttentionMask mask(Bytes& in, Eigen::Index rows, Eigen::Index cols, bool& moderate,
                        Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic>& bools, Matrix<Scalar>& numbers) {
  const int kind = in.in(0, 3);
  if (kind == 0) return {};
  if (in.in(0, 15) == 0) rows += 1;
  bools.resize(rows, cols);
  numbers.resize(rows, cols);
  for (Eigen::Index j = 0; j < cols; ++j)
    for (Eigen::Index i = 0; i < rows; ++i) {
      const std::uint8_t b = in.byte();
      bools(i, j) = b % 3 == 0;
      numbers(i, j) = b % 5 == 0 ? -std::numeric_limits<Scalar>::infinity() : static_cast<Scalar>(b) / 64;
      if (b == 255) {
        numbers(i, j) = std::numeric_limits<Scalar>::quiet_NaN();
        moderate = moderate && kind != 3;
      }
    }
  if (kind == 1) return mha::AttentionMask::blocked(bools);
  if (kind == 2) return mha::AttentionMask::allowed(bools);
  return mha::AttentionMask::additive(numbers);
}

template <typename Scalar>
void multi_head(Bytes& in) {
  mha::MultiHeadAttentionConfig config;
  config.d_model = in.in(-1, 24);
  config.num_heads = in.in(-1, 6);
  config.d_k = in.in(-1, 6);
  config.d_v = in.in(-1, 6);
  config.kdim = in.in(-1, 3) > 1 ? in.in(1, 9) : 0;
  config.vdim = in.in(-1, 3) > 1 ? in.in(1, 9) : 0;
  const int flags = in.byte();
  config.bias = flags & 1;
  config.add_bias_kv = flags & 2;
  config.add_zero_attn = flags & 4;
  config.dropout = (flags & 8) ? (flags >> 4) / 16.0 : 0.0;
  config.seed = in.byte();
  // Now and then a configuration whose parameter matrices overflow an index.
  const int huge = in.in(0, 31);
  if (huge == 0) config.d_k = config.d_v = Eigen::Index(1) << 62;
  if (huge == 1) {
    // d_k = d_v = d_model / h: W^Q's d_model · h·d_k entries overflow (a small explicit d_k would
    // make a valid module of terabytes, whose allocation may fail only as std::bad_alloc).
    config.d_model = Eigen::Index(1) << 40;
    config.d_k = config.d_v = 0;
  }
  const bool config_valid = huge > 1 && config.d_model > 0 && config.num_heads > 0 && config.d_k >= 0 &&
                            config.d_v >= 0 && config.kdim >= 0 && config.vdim >= 0 &&
                            ((config.d_k > 0 && config.d_v > 0) || config.d_model % config.num_heads == 0);
  try {
    mha::MultiHeadAttention<Scalar> attn(config);
    if (!config_valid) violated("an invalid configuration was accepted");
    bool valid = true, moderate = true;
    auto o = options<Scalar>(in, valid, moderate);
    o.alignment = in.byte() % 2 ? mha::CausalAlignment::bottom_right : mha::CausalAlignment::top_left;
    o.window = window(in);
    valid = valid && o.window >= 0;
    o.training = in.byte() % 2 == 1;
    o.dropout_seed = in.byte();
    // A batch of one to three sequences, of lengths up to 20.
    const int batch = in.in(1, 3);
    std::vector<Eigen::Index> query_lengths, key_lengths;
    const bool equal = in.byte() % 2 == 0;
    for (int b = 0; b < batch; ++b) {
      query_lengths.push_back(equal && b > 0 ? query_lengths[0] : in.in(0, 20));
      key_lengths.push_back(equal && b > 0 ? key_lengths[0] : in.in(0, 20));
    }
    Eigen::Index L = 0, S = 0;
    for (int b = 0; b < batch; ++b) L += query_lengths[b], S += key_lengths[b];
    // Now and then a width or a row count that does not match.
    const int mismatch = in.in(0, 15);
    const Eigen::Index q_cols = attn.d_model() + (mismatch == 1 ? 1 : 0);
    const Eigen::Index k_cols = attn.kdim() - (mismatch == 2 ? 1 : 0);
    const Eigen::Index v_rows = S + (mismatch == 3 ? 1 : 0);
    valid = valid && (mismatch == 0 || mismatch > 3);
    const auto query = matrix<Scalar>(in, L, q_cols, moderate);
    const auto key = matrix<Scalar>(in, S, k_cols, moderate);
    const auto value = matrix<Scalar>(in, v_rows, attn.vdim(), moderate);
    // Masks: shared by every sequence, so they need equal lengths (per head: h·L rows).
    Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic> mask_bools, padding_bools;
    Matrix<Scalar> mask_numbers, padding_numbers;
    const bool per_head = in.byte() % 2 == 1 && attn.num_heads() > 1;
    o.mask = mask<Scalar>(in, (per_head ? attn.num_heads() : 1) * query_lengths[0], key_lengths[0], moderate,
                          mask_bools, mask_numbers);
    o.key_padding_mask = mask<Scalar>(in, batch, key_lengths[0], moderate, padding_bools, padding_numbers);
    // The documented rules: a mask is L × S or h·L × S and needs equal lengths; key padding is
    // B × S and needs equal key lengths.
    const bool same_L = std::equal(query_lengths.begin() + 1, query_lengths.end(), query_lengths.begin());
    const bool same_S = std::equal(key_lengths.begin() + 1, key_lengths.end(), key_lengths.begin());
    const Eigen::Index L0 = query_lengths[0], S0 = key_lengths[0], h = attn.num_heads();
    if (!o.mask.empty())
      valid = valid && same_L && same_S && o.mask.cols() == S0 &&
              (o.mask.rows() == L0 || (h > 1 && o.mask.rows() == h * L0));
    if (!o.key_padding_mask.empty())
      valid = valid && same_S && o.key_padding_mask.rows() == batch && o.key_padding_mask.cols() == S0;
    // Now and then lengths whose sum wraps around to the row count: (max − a) + (max − b) + c
    // = L when c = L + a + b + 2 (mod 2^64).
    if (in.in(0, 15) == 0) {
      const Eigen::Index largest = std::numeric_limits<Eigen::Index>::max(), a = in.in(0, 3), b = in.in(0, 3);
      const bool queries = in.byte() % 2;
      (queries ? query_lengths : key_lengths) =
          std::vector<Eigen::Index>{largest - a, largest - b, (queries ? L : S) + a + b + 2};
      valid = false;
    }
    try {
      const Matrix<Scalar> out = attn.forward_batch(query, key, value, query_lengths, key_lengths, o);
      if (!valid) violated("invalid input was accepted by forward_batch");
      if (out.rows() != L || out.cols() != attn.d_model()) violated("forward_batch returned the wrong shape");
      if (moderate && !out.allFinite()) violated("finite moderate input gave a non-finite output");
      // Training: the taped forward gives the same output; the backward gives gradients of the
      // inputs' and parameters' shapes, finite for finite moderate input.
      mha::Tape<Scalar> tape;
      const Matrix<Scalar> taped = attn.forward_batch(query, key, value, query_lengths, key_lengths, o, tape);
      if (!(taped.array() == out.array() || (taped.array() != taped.array() && out.array() != out.array())).all())
        violated("the taped forward differs from the forward");
      const auto d_output = matrix<Scalar>(in, L, attn.d_model(), moderate);
      auto gradients = attn.zero_gradients();
      const auto d = attn.backward(tape, d_output, gradients);
      if (d.query.rows() != L || d.query.cols() != attn.d_model() || d.key.rows() != S || d.key.cols() != attn.kdim() ||
          d.value.rows() != S || d.value.cols() != attn.vdim())
        violated("backward returned input gradients of the wrong shape");
      bool finite = d.query.allFinite() && d.key.allFinite() && d.value.allFinite();
      for (const auto& g : gradients.parameters()) finite = finite && g.value.allFinite();
      if (moderate && !finite) violated("finite moderate input gave a non-finite gradient");
    } catch (const mha::invalid_argument&) {
      if (valid) violated("valid input was rejected by forward_batch");
    }
  } catch (const mha::invalid_argument&) {
    if (config_valid) violated("a valid configuration was rejected");
  }
}

template <typename Scalar>
void single_head(Bytes& in) {
  bool valid = true, moderate = true;
  auto o = options<Scalar>(in, valid, moderate);
  o.window = window(in);
  valid = valid && o.window >= 0;
  const Eigen::Index L = in.in(0, 40), S = in.in(0, 40), d_k = in.in(0, 9), d_v = in.in(0, 9);
  const int mismatch = in.in(0, 15);
  valid = valid && mismatch > 1;
  const auto q = matrix<Scalar>(in, L, d_k, moderate);
  const auto k = matrix<Scalar>(in, S, d_k + (mismatch == 0 ? 1 : 0), moderate);
  const auto v = matrix<Scalar>(in, S + (mismatch == 1 ? 1 : 0), d_v, moderate);
  try {
    const Matrix<Scalar> out = mha::scaled_dot_product_attention(q, k, v, o);
    if (!valid) violated("invalid input was accepted by scaled_dot_product_attention");
    if (out.rows() != L || out.cols() != d_v) violated("scaled_dot_product_attention returned the wrong shape");
    if (moderate && !out.allFinite()) violated("finite moderate input gave a non-finite output");
  } catch (const mha::invalid_argument&) {
    if (valid) violated("valid input was rejected by scaled_dot_product_attention");
  }
}

template <typename Scalar>
void softmax(Bytes& in) {
  bool moderate = true;
  const auto logits = matrix<Scalar>(in, in.in(0, 20), in.in(0, 20), moderate);
  const Matrix<Scalar> p = mha::softmax_rows(logits);
  if (p.rows() != logits.rows() || p.cols() != logits.cols()) violated("softmax_rows returned the wrong shape");
  if (moderate && !p.allFinite()) violated("softmax_rows of finite moderate logits is not finite");
}

/// Grouped-query attention, rotary embeddings, windows and a key/value cache: a few decode steps
/// of ragged new lengths over one to three sequences, now and then past a fixed max_length (which
/// must throw and leave the cache as it was), then a truncation.
template <typename Scalar>
void decoding(Bytes& in) {
  mha::MultiHeadAttentionConfig config;
  config.d_model = in.in(1, 24);
  config.num_heads = in.in(1, 6);
  config.num_kv_heads = in.in(-1, 6);
  config.d_k = in.in(0, 6);
  config.d_v = in.in(0, 6);
  const int flags = in.byte();
  config.bias = flags & 1;
  config.rotary = flags & 2;
  config.rotary_pairs = (flags & 4) ? mha::RotaryPairs::halves : mha::RotaryPairs::interleaved;
  config.rotary_base = (flags & 8) ? 0.0 : (flags & 16) ? 1e-320 : std::pow(10.0, in.in(0, 6));
  const Eigen::Index d_k = config.d_k > 0 ? config.d_k : config.d_model / config.num_heads;
  // The documented rule for the base: every frequency base^(−2i/d_k), times any position up to
  // 2^63, is finite (a denormal base with d_k > 2 overflows).
  const bool base_valid =
      config.rotary_base > 0 &&
      std::isfinite(std::pow(config.rotary_base, -static_cast<double>(d_k - 2) / static_cast<double>(d_k)) * 0x1p63);
  const bool config_valid = ((config.d_k > 0 && config.d_v > 0) || config.d_model % config.num_heads == 0) &&
                            config.num_kv_heads >= 0 &&
                            (config.num_kv_heads == 0 || config.num_heads % config.num_kv_heads == 0) &&
                            (!config.rotary || (base_valid && d_k % 2 == 0));
  try {
    const mha::MultiHeadAttention<Scalar> attn(config);
    if (!config_valid) violated("an invalid configuration was accepted");
    const int sequences = in.in(1, 3), max_length = in.in(0, 30);
    auto cache = attn.make_cache(sequences, max_length);
    bool options_valid = true, cached_moderate = true;  // every token in the cache came from finite moderate input
    auto o = options<Scalar>(in, options_valid, cached_moderate);
    const bool scale_valid = options_valid;
    Eigen::Index filled_window = 0;  // the window the cache's tokens were decoded with
    o.window = window(in);
    for (int step = in.in(1, 4); step > 0; --step) {
      // The window, now and then changed between steps: a cache that holds tokens keeps its own.
      if (in.in(0, 3) == 0) o.window = window(in);
      options_valid = scale_valid && o.window >= 0 && (cache.empty() || o.window == filled_window);
      std::vector<Eigen::Index> lengths, before;
      Eigen::Index rows = 0;
      bool fits = true;
      for (int b = 0; b < sequences; ++b) {
        lengths.push_back(in.in(0, 12));
        before.push_back(cache.length(b));
        rows += lengths.back();
        fits = fits && (max_length == 0 || cache.length(b) + lengths.back() <= max_length);
      }
      bool moderate = true;
      const auto x = matrix<Scalar>(in, rows, attn.d_model(), moderate);
      cached_moderate = cached_moderate && moderate;  // the new tokens' keys join the cache first
      try {
        const Matrix<Scalar> out = sequences == 1 ? attn.decode(x, cache, o) : attn.decode_batch(x, lengths, cache, o);
        if (!options_valid || !fits) violated("invalid input was accepted by decode");
        if (out.rows() != rows || out.cols() != attn.d_model()) violated("decode returned the wrong shape");
        if (cached_moderate && !out.allFinite()) violated("finite moderate input gave a non-finite decode output");
        for (int b = 0; b < sequences; ++b)
          if (cache.length(b) != before[b] + lengths[b]) violated("decode did not append the new tokens");
        filled_window = o.window;
      } catch (const mha::invalid_argument&) {
        if (options_valid && fits) violated("valid input was rejected by decode");
        for (int b = 0; b < sequences; ++b)
          if (cache.length(b) != before[b]) violated("a rejected decode step changed the cache");
      }
    }
    const int b = in.in(0, sequences - 1), keep = in.in(0, 40);
    try {
      cache.truncate(b, keep);
      if (cache.length(b) != keep) violated("truncate did not keep the given length");
    } catch (const mha::invalid_argument&) {
      if (keep <= cache.length(b)) violated("a valid truncate was rejected");
    }
    // A cross-attention memory of the same module, made once and read by decode_cross steps; the
    // self-attention decode must refuse it.
    std::vector<Eigen::Index> memory_lengths, new_lengths;
    Eigen::Index memory_rows = 0, query_rows = 0;
    for (int s = 0; s < sequences; ++s) {
      memory_lengths.push_back(in.in(0, 12));
      memory_rows += memory_lengths.back();
      new_lengths.push_back(in.in(0, 4));
      query_rows += new_lengths.back();
    }
    bool cross_moderate = !o.scale || std::abs(*o.scale) < 1e30;
    const auto memory = matrix<Scalar>(in, memory_rows, attn.d_model(), cross_moderate);
    const bool memory_valid = !config.rotary && std::all_of(memory_lengths.begin(), memory_lengths.end(),
                                                            [](Eigen::Index n) { return n >= 1; });
    try {
      auto cross = attn.make_cross_cache(memory, memory, memory_lengths);
      if (!memory_valid) violated("an invalid cross-attention memory was accepted");
      const auto queries = matrix<Scalar>(in, query_rows, attn.d_model(), cross_moderate);
      mha::AttentionOptions cross_options;
      cross_options.scale = o.scale;
      try {
        const Matrix<Scalar> out = attn.decode_cross_batch(queries, new_lengths, cross, cross_options);
        if (!scale_valid) violated("an invalid scale was accepted by decode_cross");
        if (out.rows() != query_rows || out.cols() != attn.d_model()) violated("decode_cross gave the wrong shape");
        if (cross_moderate && !out.allFinite()) violated("finite moderate input gave a non-finite decode_cross output");
      } catch (const mha::invalid_argument&) {
        if (scale_valid) violated("valid input was rejected by decode_cross");
      }
      try {
        if (sequences == 1) {
          attn.decode(queries, cross);
          violated("decode appended to a cross-attention memory");
        }
      } catch (const mha::invalid_argument&) {
      }
      for (int s = 0; s < sequences; ++s)
        if (cross.length(s) != memory_lengths[static_cast<std::size_t>(s)]) violated("the memory changed");
    } catch (const mha::invalid_argument&) {
      if (memory_valid) violated("a valid cross-attention memory was rejected");
    }
  } catch (const mha::invalid_argument&) {
    if (config_valid) violated("a valid configuration was rejected");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in(data, size);
  const std::uint8_t what = in.byte();
  const bool use_double = what & 1;
  switch ((what >> 1) % 4) {
    case 0:
      use_double ? multi_head<double>(in) : multi_head<float>(in);
      break;
    case 1:
      use_double ? single_head<double>(in) : single_head<float>(in);
      break;
    case 2:
      use_double ? softmax<double>(in) : softmax<float>(in);
      break;
    default:
      use_double ? decoding<double>(in) : decoding<float>(in);
      break;
  }
  return 0;
}
