// A libFuzzer harness over the public API. The bytes choose a scalar type, shapes, head counts,
// d_k/d_v, options and values (including NaN, ±Inf, huge and denormal numbers), valid and invalid.
// Properties checked, besides "no crash and no sanitizer report":
//   - invalid input throws mha::invalid_argument, and only invalid input does;
//   - the result has the documented shape;
//   - finite inputs of moderate size (|x| ≤ 1e3, so that no product can overflow) give finite output.
// Built with clang's -fsanitize=fuzzer; fuzz_replay.cpp runs the same function over the committed
// corpus in every build, so each input the fuzzer ever found becomes a regression test.
#include <mha/mha.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

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
      case 0: moderate = false; return std::numeric_limits<Scalar>::quiet_NaN();
      case 1: moderate = false; return (unit < 0 ? -1 : 1) * std::numeric_limits<Scalar>::infinity();
      case 2: moderate = false; return static_cast<Scalar>(unit * 0.99) * std::numeric_limits<Scalar>::max();
      case 3: return static_cast<Scalar>(unit * 100) * std::numeric_limits<Scalar>::denorm_min();
      case 4: return 0;
      case 5: return static_cast<Scalar>(unit * 1e3);
      default: return static_cast<Scalar>(unit * 4);
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

/// Options from the bytes; `valid` is cleared when the scale is not finite.
mha::AttentionOptions options(Bytes& in, bool& valid) {
  mha::AttentionOptions o;
  o.causal = in.byte() % 2 == 1;
  switch (in.byte() % 6) {
    case 0: o.scale = (in.byte() - 127.5) / 16; break;
    case 1: o.scale = std::numeric_limits<double>::quiet_NaN(); valid = false; break;
    case 2: o.scale = std::numeric_limits<double>::infinity(); valid = false; break;
    default: break;
  }
  return o;
}

template <typename Scalar>
void multi_head(Bytes& in) {
  mha::MultiHeadAttentionConfig config;
  config.d_model = in.in(-1, 24);
  config.num_heads = in.in(-1, 6);
  config.d_k = in.in(-1, 6);
  config.d_v = in.in(-1, 6);
  config.seed = in.byte();
  const bool config_valid = config.d_model > 0 && config.num_heads > 0 && config.d_k >= 0 && config.d_v >= 0 &&
                            ((config.d_k > 0 && config.d_v > 0) || config.d_model % config.num_heads == 0);
  try {
    mha::MultiHeadAttention<Scalar> attn(config);
    if (!config_valid) violated("an invalid configuration was accepted");
    bool valid = true, moderate = true;
    const auto o = options(in, valid);
    const Eigen::Index L = in.in(0, 40), S = in.in(0, 40);
    // Now and then a width or a row count that does not match.
    const int mismatch = in.in(0, 15);
    const Eigen::Index q_cols = attn.d_model() + (mismatch == 1 ? 1 : 0);
    const Eigen::Index k_cols = attn.d_model() - (mismatch == 2 ? 1 : 0);
    const Eigen::Index v_rows = S + (mismatch == 3 ? 1 : 0);
    valid = valid && mismatch > 3;
    const auto query = matrix<Scalar>(in, L, q_cols, moderate);
    const auto key = matrix<Scalar>(in, S, k_cols, moderate);
    const auto value = matrix<Scalar>(in, v_rows, attn.d_model(), moderate);
    try {
      const Matrix<Scalar> out = attn.forward(query, key, value, o);
      if (!valid) violated("invalid input was accepted by forward");
      if (out.rows() != L || out.cols() != attn.d_model()) violated("forward returned the wrong shape");
      if (moderate && !out.allFinite()) violated("finite moderate input gave a non-finite output");
    } catch (const mha::invalid_argument&) {
      if (valid) violated("valid input was rejected by forward");
    }
  } catch (const mha::invalid_argument&) {
    if (config_valid) violated("a valid configuration was rejected");
  }
}

template <typename Scalar>
void single_head(Bytes& in) {
  bool valid = true, moderate = true;
  const auto o = options(in, valid);
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

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in(data, size);
  const std::uint8_t what = in.byte();
  const bool use_double = what & 1;
  switch ((what >> 1) % 3) {
    case 0: use_double ? multi_head<double>(in) : multi_head<float>(in); break;
    case 1: use_double ? single_head<double>(in) : single_head<float>(in); break;
    default: use_double ? softmax<double>(in) : softmax<float>(in); break;
  }
  return 0;
}
