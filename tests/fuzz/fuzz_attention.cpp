// A libFuzzer harness over the public API. The bytes choose a scalar type, shapes, head counts,
// d_k/d_v, kdim/vdim, biases, batches, masks, options, key/value heads, rotary embeddings, windows,
// decode steps and values (including NaN, ±Inf, huge and denormal numbers), valid and invalid, and
// for decoding the cache: its storage (Scalar, Eigen::bfloat16 or Eigen::half, for the
// self-attention cache and the cross-attention memory alike), a rolling cache of a window (valid
// and invalid windows) and truncations between the steps.
// Properties checked, besides "no crash and no sanitizer report":
//   - invalid input throws mha::invalid_argument, and only invalid input does;
//   - the result has the documented shape;
//   - finite inputs of moderate size (|x| ≤ 1e3, so that no product can overflow) give finite output,
//     and finite gradients in the backward pass, whose taped forward gives the same output, as does
//     the forward into a workspace kept from one input to the next; for a
//     cache of half, whose numbers overflow above 65504, moderate means |x| ≤ 4 (the fuzzer's
//     ordinary numbers: no key or value of a module of d_model ≤ 24 reaches 200);
//   - a decode step appends its tokens to the cache; a rejected step or truncate leaves length(),
//     held() and bytes() as they were; held() ≤ length(), equal but in a rolling cache, which holds
//     at least what the window needs (min(length, window − 1 + the step)) and at most its room or
//     window − 1 + the largest step; a rolling cache's bytes() stay the same while the steps fit
//     its room; a reduced cache has exactly half (bfloat16, half) of a Scalar cache's bytes;
//   - oracles, for plain input (every number 0 or normal with |x| ≤ 4, the scale at most 1): a
//     rolling cache's outputs equal those of a cache that keeps every token (same module, steps and
//     window) within 1e-4 (float) or 1e-10 (double), relative (max |difference| / max |output|), and
//     a bfloat16 (half) cache's or memory's outputs are within 1e-2 (2e-3) of a Scalar one's, also
//     on the steps (every third) that read the projection weights rounded to the cache's storage
//     (make_decode_weights); the cache compared against accepts and rejects the same steps.
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
#include <optional>
#include <type_traits>
#include <vector>

namespace {

/// What the numbers of a matrix were, beyond moderate: `small` when none is of the fuzzer's large
/// kind (up to 1e3; a half's range ends at 65504), `plain` when every one is 0 or a normal number
/// of magnitude at most 4 (no NaN, ±Inf, huge, large or denormal number).
struct Kinds {
  bool small = true;
  bool plain = true;
};

/// Reads numbers from the fuzzer's bytes; past the end, every read gives 0.
class Bytes {
 public:
  Bytes(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}

  std::uint8_t byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  /// An integer in [lo, hi].
  int in(int lo, int hi) { return lo + static_cast<int>(byte() % static_cast<unsigned>(hi - lo + 1)); }

  /// From now on, every value() is a plain number of magnitude at most 1 (it reads the same bytes).
  bool plain() const { return plain_only_; }
  void plain_only() { plain_only_ = true; }

  /// A value of one of several kinds: moderate, zero, huge, denormal, NaN or ±Inf.
  template <typename Scalar>
  Scalar value(bool& moderate, Kinds& kinds) {
    const std::uint8_t kind = byte();
    const double unit = (static_cast<double>(byte()) - 127.5) / 127.5;  // in [−1, 1]
    if (plain_only_) return static_cast<Scalar>(unit);
    switch (kind % 16) {
      case 0:
        moderate = kinds.small = kinds.plain = false;
        return std::numeric_limits<Scalar>::quiet_NaN();
      case 1:
        moderate = kinds.small = kinds.plain = false;
        return (unit < 0 ? -1 : 1) * std::numeric_limits<Scalar>::infinity();
      case 2:
        moderate = kinds.small = kinds.plain = false;
        return static_cast<Scalar>(unit * 0.99) * std::numeric_limits<Scalar>::max();
      case 3:
        kinds.plain = false;
        return static_cast<Scalar>(unit * 100) * std::numeric_limits<Scalar>::denorm_min();
      case 4:
        return 0;
      case 5:
        kinds.small = kinds.plain = false;
        return static_cast<Scalar>(unit * 1e3);
      default:
        return static_cast<Scalar>(unit * 4);
    }
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
  bool plain_only_ = false;
};

template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

template <typename Scalar>
Matrix<Scalar> matrix(Bytes& in, Eigen::Index rows, Eigen::Index cols, bool& moderate, Kinds& kinds) {
  Matrix<Scalar> m(rows, cols);
  for (Eigen::Index j = 0; j < cols; ++j)
    for (Eigen::Index i = 0; i < rows; ++i) m(i, j) = in.value<Scalar>(moderate, kinds);
  return m;
}

template <typename Scalar>
Matrix<Scalar> matrix(Bytes& in, Eigen::Index rows, Eigen::Index cols, bool& moderate) {
  Kinds kinds;
  return matrix<Scalar>(in, rows, cols, moderate, kinds);
}

/// Whether a and b hold the same numbers, bit for bit where they are numbers (NaN where either is).
template <typename Scalar>
bool same_numbers(const Matrix<Scalar>& a, const Matrix<Scalar>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.array() == b.array() || (a.array() != a.array() && b.array() != b.array())).all();
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
Eigen::Index window_from(Bytes& in) {
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
    o.window = window_from(in);
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
      if (!same_numbers(taped, out)) violated("the taped forward differs from the forward");
      // Into a workspace kept from one input to the next (sized by forwards of other shapes and
      // modules): the same numbers.
      static mha::ForwardWorkspace<Scalar> workspace;
      Matrix<Scalar> kept;
      attn.forward_batch(query, key, value, query_lengths, key_lengths, kept, workspace, o);
      if (!same_numbers(kept, out)) violated("the forward into a workspace differs from the forward");
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
  o.window = window_from(in);
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

/// The largest magnitude the attention part of an output row can have over the values `cache`
/// holds: max |value| · max over W^O's columns of Σ |W^O|. Rounding a cached value moves an output by
/// a fraction of this, whatever the output itself is (it may cancel to near 0).
template <typename Scalar, typename Cache>
double attainable_output(const mha::MultiHeadAttention<Scalar>& attn, const Cache& cache) {
  double largest = 0;
  for (Eigen::Index b = 0; b < cache.sequences(); ++b)
    for (Eigen::Index j = 0; j < cache.kv_heads(); ++j) {
      const auto values = cache.values(b, j);
      for (Eigen::Index r = 0; r < values.rows(); ++r)
        for (Eigen::Index c = 0; c < values.cols(); ++c)
          largest = std::max(largest, std::abs(static_cast<double>(static_cast<float>(values(r, c)))));
    }
  return largest * static_cast<double>(attn.w_o().cwiseAbs().colwise().sum().maxCoeff());
}

/// ‖actual − expected‖∞ / `scale` (0 for empty matrices), NaN if either holds a NaN.
template <typename Scalar>
double error(const Matrix<Scalar>& actual, const Matrix<Scalar>& expected, double scale) {
  if (actual.size() == 0) return 0;
  const double difference = static_cast<double>((actual - expected).cwiseAbs().maxCoeff());
  if (!(scale > 0)) return difference == 0 ? 0 : std::numeric_limits<double>::infinity();
  return difference / scale;
}

/// How far a cache of Storage may be from one of Scalar on plain input: bfloat16 keeps 8
/// significant bits, half 11 (each cached number rounded to a relative 2^-9, 2^-12).
template <typename Scalar, typename Storage>
double storage_bound() {
  return std::is_same<Storage, Eigen::bfloat16>::value ? 1e-2 : std::is_same<Storage, Eigen::half>::value ? 2e-3 : 0;
}

/// How far two caches of one storage type that hold the same numbers may be apart (the keys split
/// differently into the kernel's blocks): the rounding of Scalar.
template <typename Scalar>
double rounding_bound() {
  return std::is_same<Scalar, float>::value ? 1e-4 : 1e-10;
}

/// A rolling cache's window from the bytes: mostly 1 … 20, now and then 0, negative or too large.
Eigen::Index rolling_window(Bytes& in) {
  const Eigen::Index largest = std::numeric_limits<Eigen::Index>::max();
  switch (in.in(0, 15)) {
    case 0:
      return 0;
    case 1:
      return -in.in(1, 3);
    case 2:
      return largest / 2 + in.in(1, 3);  // its room, window + window/8 rows, is no number of rows
    case 3:
      return largest;
    default:
      return in.in(1, 20);
  }
}

/// The documented rule for truncate(b, keep): 0 ≤ keep ≤ length(b), and a rolling cache must still
/// hold the window − 1 tokens before position keep (all keep of them when there are fewer).
template <typename Cache>
bool truncate_valid(const Cache& cache, Eigen::Index b, Eigen::Index keep) {
  if (keep < 0 || keep > cache.length(b)) return false;
  if (cache.window() == 0) return true;
  const Eigen::Index forgotten = cache.length(b) - cache.held(b);
  return keep - forgotten >= std::min(keep, cache.window() - 1);
}

/// cache.truncate(b, keep), checked: it keeps exactly `keep` tokens when the rule allows it, throws
/// and changes nothing when not, and never changes the memory. \returns whether it was valid.
template <typename Cache>
bool checked_truncate(Cache& cache, Eigen::Index b, Eigen::Index keep) {
  const bool valid = truncate_valid(cache, b, keep);
  const Eigen::Index length = cache.length(b), held = cache.held(b);
  const std::size_t bytes = cache.bytes();
  try {
    cache.truncate(b, keep);
    if (!valid) violated("an invalid truncate was accepted");
    if (cache.length(b) != keep) violated("truncate did not keep the given length");
    if (cache.held(b) != held - (length - keep)) violated("truncate did not drop exactly the tokens past its length");
  } catch (const mha::invalid_argument&) {
    if (valid) violated("a valid truncate was rejected");
    if (cache.length(b) != length || cache.held(b) != held) violated("a rejected truncate changed the cache");
  }
  if (cache.bytes() != bytes) violated("truncate changed the cache's memory");
  return valid;
}

/// The options, scale and validity the self-attention steps leave for the cross-attention memory.
struct DecodeOptions {
  mha::AttentionOptions options;
  bool scale_valid = false;
};

/// A few decode steps of ragged new lengths over one to three sequences into a cache of Storage:
/// make_cache(sequences, max_length), now and then past its max_length (which must throw and leave
/// the cache as it was), or a rolling cache of a window from the bytes; truncations between the
/// steps when `truncates`, then one more. Beside it, the caches it must agree with: one of Scalar
/// of the same kind (for a reduced Storage) and, for a rolling cache, one that keeps every token.
/// \returns false when the rolling cache's window was (rightly) refused.
template <typename Scalar, typename Storage>
bool self_decoding(Bytes& in, const mha::MultiHeadAttention<Scalar>& attn, int sequences, int max_length, bool rolling,
                   bool truncates, DecodeOptions& result) {
  using Index = Eigen::Index;
  constexpr bool reduced = !std::is_same<Storage, Scalar>::value;
  constexpr bool half = std::is_same<Storage, Eigen::half>::value;
  const Index window = rolling ? rolling_window(in) : 0;
  std::optional<mha::KVCache<Scalar, Storage>> made;
  try {
    made.emplace(rolling ? attn.template make_rolling_cache<Storage>(window, sequences)
                         : attn.template make_cache<Storage>(sequences, max_length));
    if (rolling && (window < 1 || window > std::numeric_limits<Index>::max() / 2))
      violated("an invalid rolling window was accepted");
  } catch (const mha::invalid_argument&) {
    if (!rolling || (window >= 1 && window <= std::numeric_limits<Index>::max() / 2))
      violated("a valid cache was rejected");
    return false;
  }
  auto& cache = *made;
  if (cache.window() != window) violated("the cache has another window than it was made with");
  std::optional<mha::KVCache<Scalar>> exact;  // Scalar storage, the same kind of cache
  if (reduced)
    exact.emplace(rolling ? attn.make_rolling_cache(window, sequences) : attn.make_cache(sequences, max_length));
  std::optional<mha::KVCache<Scalar, Storage>> full;  // keeps every token, for the rolling cache
  if (rolling) full.emplace(attn.template make_cache<Storage>(sequences));
  // A reduced cache's steps read, every third, the projection weights rounded to its storage too.
  const auto weights = [&] {
    if constexpr (reduced)
      return std::optional(attn.template make_decode_weights<Storage>());
    else
      return 0;
  }();
  // The rows a rolling cache's sequence has room for, allocated at once (1.1 × window; 16 more at
  // least), and the largest step so far, which may make a sequence's room larger.
  const auto per_row =
      static_cast<std::size_t>(sequences * attn.num_kv_heads() * (attn.d_k() + attn.d_v())) * sizeof(Storage);
  const auto room = static_cast<Index>(cache.bytes() / per_row);
  if (rolling && (cache.bytes() % per_row != 0 || room < window || room > window + std::max<Index>(window / 8, 16)))
    violated("a rolling cache has another room than about 1.1 x its window");
  Index largest_step = 0;

  bool options_valid = true, cached_moderate = true;  // every token in the cache came from finite moderate input
  bool cached_small = true, cached_plain = true;      // … and from small (plain) numbers
  auto& o = result.options;
  o = options<Scalar>(in, options_valid, cached_moderate);
  const bool scale_valid = options_valid;
  result.scale_valid = scale_valid;
  const bool plain_scale = !o.scale || std::abs(*o.scale) <= 1;
  Index filled_window = 0;  // the window the cache's tokens were decoded with
  o.window = window_from(in);
  // A truncation of a sequence from the bytes, checked on every cache: they agree on its validity.
  const auto truncate = [&](Index b, Index keep) {
    const bool valid = checked_truncate(cache, b, keep);
    if (exact && checked_truncate(*exact, b, keep) != valid) violated("caches of two storages truncate differently");
    if (full && valid && !checked_truncate(*full, b, keep)) violated("a full cache refused what a rolling one took");
  };
  for (int step = in.in(1, 4); step > 0; --step) {
    if (truncates && in.in(0, 2) == 0) {
      const Index b = in.in(0, sequences - 1), length = cache.length(b);
      const int choice = in.in(0, 7);
      truncate(b, choice == 0 ? -1 : choice == 6 ? length + 1 : choice == 7 ? in.in(0, 40) : length - (choice - 1));
    }
    // The window, now and then changed between steps: a cache that holds tokens keeps its own, and
    // a rolling cache takes windows of 1 to its own.
    if (in.in(0, 3) == 0) o.window = window_from(in);
    options_valid = scale_valid && o.window >= 0 && (cache.empty() || o.window == filled_window) &&
                    (!rolling || (o.window >= 1 && o.window <= window));
    std::vector<Index> lengths, before, held_before;
    Index rows = 0;
    bool fits = true, fits_room = true;
    for (int b = 0; b < sequences; ++b) {
      lengths.push_back(in.in(0, 12));
      before.push_back(cache.length(b));
      held_before.push_back(cache.held(b));
      rows += lengths.back();
      fits = fits && (rolling || max_length == 0 || cache.length(b) + lengths.back() <= max_length);
      fits_room = fits_room && window - 1 + lengths.back() <= room;
    }
    const std::size_t bytes_before = cache.bytes();
    bool moderate = true;
    Kinds kinds;
    const auto x = matrix<Scalar>(in, rows, attn.d_model(), moderate, kinds);
    // The new tokens' keys join the cache first.
    cached_moderate = cached_moderate && moderate;
    cached_small = cached_small && kinds.small;
    cached_plain = cached_plain && kinds.plain;
    const bool finite_expected = cached_moderate && (!half || cached_small);
    const bool plain = cached_moderate && cached_plain && plain_scale;
    const bool unit = plain && in.plain();  // every number of the input at most 1
    // Every other step through the form that writes into a matrix (of another shape, to be resized),
    // which must give what the returning form gives.
    const bool into = step % 2 == 0;
    const auto decode = [&](auto& c) -> Matrix<Scalar> {
      if constexpr (reduced) {
        // The caches of Storage (the one checked, and the full cache it is compared with): with the
        // rounded weights, every third step; the Scalar cache, as ever.
        if (step % 3 == 0 && std::is_same<std::decay_t<decltype(c)>, mha::KVCache<Scalar, Storage>>::value) {
          if (!into)
            return sequences == 1 ? attn.decode(x, c, *weights, o) : attn.decode_batch(x, lengths, c, *weights, o);
          Matrix<Scalar> y = Matrix<Scalar>::Constant(3, 2, Scalar(7));
          if (sequences == 1)
            attn.decode(x, c, *weights, y, o);
          else
            attn.decode_batch(x, lengths, c, *weights, y, o);
          return y;
        }
      }
      if (!into) return sequences == 1 ? attn.decode(x, c, o) : attn.decode_batch(x, lengths, c, o);
      Matrix<Scalar> y = Matrix<Scalar>::Constant(3, 2, Scalar(7));
      if (sequences == 1)
        attn.decode(x, c, y, o);
      else
        attn.decode_batch(x, lengths, c, y, o);
      return y;
    };
    Matrix<Scalar> out;
    bool accepted = false;
    try {
      out = decode(cache);
      accepted = true;
    } catch (const mha::invalid_argument&) {
      if (options_valid && fits) violated("valid input was rejected by decode");
      for (int b = 0; b < sequences; ++b)
        if (cache.length(b) != before[b] || cache.held(b) != held_before[b])
          violated("a rejected decode step changed the cache");
      if (cache.bytes() != bytes_before) violated("a rejected decode step changed the cache's memory");
    }
    if (accepted) {
      if (!options_valid || !fits) violated("invalid input was accepted by decode");
      if (out.rows() != rows || out.cols() != attn.d_model()) violated("decode returned the wrong shape");
      if (finite_expected && !out.allFinite()) violated("finite moderate input gave a non-finite decode output");
      for (int b = 0; b < sequences; ++b) {
        const Index length = cache.length(b), held = cache.held(b), step_length = lengths[b];
        largest_step = std::max(largest_step, step_length);
        if (length != before[b] + step_length) violated("decode did not append the new tokens");
        if (held > length) violated("a cache holds more tokens than it was given");
        if (!rolling && held != length) violated("a cache that keeps every token forgot some");
        if (rolling && held < std::min(length, window - 1 + step_length))
          violated("a rolling cache forgot tokens that its window still sees");
        if (rolling && held > std::max(room, window - 1 + largest_step))
          violated("a rolling cache holds more tokens than its room or its window and steps need");
      }
      if (rolling && fits_room && cache.bytes() != bytes_before)
        violated("a rolling cache's memory changed on a step that fits its room");
      filled_window = o.window;
    }
    // The caches it is checked against take the same step.
    if (exact) {
      try {
        const Matrix<Scalar> expected = decode(*exact);
        if (!accepted) violated("a Scalar cache accepted a step that a reduced one rejected");
        if (unit && !(error(out, expected, attainable_output(attn, *exact)) <= storage_bound<Scalar, Storage>()))
          violated("a reduced cache's decode output is too far from a Scalar cache's");
      } catch (const mha::invalid_argument&) {
        if (accepted) violated("a reduced cache accepted a step that a Scalar cache rejected");
      }
      for (int b = 0; b < sequences; ++b)
        if (exact->length(b) != cache.length(b) || exact->held(b) != cache.held(b))
          violated("caches of two storages hold different tokens");
      if (cache.bytes() * sizeof(Scalar) != exact->bytes() * sizeof(Storage))
        violated("a reduced cache does not take its share of a Scalar cache's bytes");
    }
    if (full && accepted) {
      try {
        const Matrix<Scalar> expected = decode(*full);
        if (plain && !(error(out, expected, attainable_output(attn, *full)) <= rounding_bound<Scalar>()))
          violated("a rolling cache's decode output differs from a full cache's");
      } catch (const mha::invalid_argument&) {
        violated("a full cache rejected a step that a rolling cache accepted");
      }
    }
  }
  const int b = in.in(0, sequences - 1), keep = in.in(0, 40);
  truncate(b, keep);
  return true;
}

/// A cross-attention memory of Storage of the same module, made once and read by decode_cross
/// steps (and, for a reduced Storage, compared with a memory of Scalar); decode must refuse it.
template <typename Scalar, typename Storage>
void cross_decoding(Bytes& in, const mha::MultiHeadAttention<Scalar>& attn, int sequences, bool rotary,
                    const DecodeOptions& self) {
  constexpr bool reduced = !std::is_same<Storage, Scalar>::value;
  constexpr bool half = std::is_same<Storage, Eigen::half>::value;
  const auto& o = self.options;
  const bool scale_valid = self.scale_valid;
  std::vector<Eigen::Index> memory_lengths, new_lengths;
  Eigen::Index memory_rows = 0, query_rows = 0;
  for (int s = 0; s < sequences; ++s) {
    memory_lengths.push_back(in.in(0, 12));
    memory_rows += memory_lengths.back();
    new_lengths.push_back(in.in(0, 4));
    query_rows += new_lengths.back();
  }
  bool cross_moderate = !o.scale || std::abs(*o.scale) < 1e30;
  Kinds memory_kinds;
  const auto memory = matrix<Scalar>(in, memory_rows, attn.d_model(), cross_moderate, memory_kinds);
  const bool memory_valid =
      !rotary && std::all_of(memory_lengths.begin(), memory_lengths.end(), [](Eigen::Index n) { return n >= 1; });
  try {
    auto cross = attn.template make_cross_cache<Storage>(memory, memory, memory_lengths);
    if (!memory_valid) violated("an invalid cross-attention memory was accepted");
    const auto queries = matrix<Scalar>(in, query_rows, attn.d_model(), cross_moderate);
    const bool finite_expected = cross_moderate && (!half || memory_kinds.small);
    const bool unit = cross_moderate && in.plain() && (!o.scale || std::abs(*o.scale) <= 1);
    mha::AttentionOptions cross_options;
    cross_options.scale = o.scale;
    try {
      const Matrix<Scalar> out = attn.decode_cross_batch(queries, new_lengths, cross, cross_options);
      if (!scale_valid) violated("an invalid scale was accepted by decode_cross");
      if (out.rows() != query_rows || out.cols() != attn.d_model()) violated("decode_cross gave the wrong shape");
      if (finite_expected && !out.allFinite()) violated("finite moderate input gave a non-finite decode_cross output");
      // Into a workspace kept from one input to the next (sized by steps of other shapes and
      // modules): the same numbers.
      static mha::CrossDecodeWorkspace<Scalar> workspace;
      Matrix<Scalar> kept;
      attn.decode_cross_batch(queries, new_lengths, cross, kept, workspace, cross_options);
      if (!same_numbers(kept, out)) violated("decode_cross into a workspace differs from the returning form");
      if (reduced) {
        const auto exact = attn.make_cross_cache(memory, memory, memory_lengths);
        if (cross.bytes() * sizeof(Scalar) != exact.bytes() * sizeof(Storage))
          violated("a reduced memory does not take its share of a Scalar memory's bytes");
        const Matrix<Scalar> expected = attn.decode_cross_batch(queries, new_lengths, exact, cross_options);
        if (unit && !(error(out, expected, attainable_output(attn, exact)) <= storage_bound<Scalar, Storage>()))
          violated("a reduced memory's decode_cross output is too far from a Scalar memory's");
      }
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
      if (cross.length(s) != memory_lengths[static_cast<std::size_t>(s)] || cross.held(s) != cross.length(s))
        violated("the memory changed");
  } catch (const mha::invalid_argument&) {
    if (memory_valid) violated("a valid cross-attention memory was rejected");
  }
}

/// Grouped-query attention, rotary embeddings, windows, key/value caches and cross-attention
/// memories. `kind` (the first byte's upper bits, so that the inputs that chose none of them read as
/// before) chooses: bits 0–1 the cache's storage (Scalar, bfloat16, half, half), bit 2 a rolling
/// cache, bit 3 truncations between the steps, bit 4 the memory's storage one further along.
template <typename Scalar>
void decoding(Bytes& in, int kind) {
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
  // A quarter of the inputs have only plain numbers, which the oracles compare (the top bits 001
  // and 101: none of the committed corpus's inputs had them, so that they read as before).
  if ((flags >> 5) == 1 || (flags >> 5) == 5) in.plain_only();
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
  std::optional<mha::MultiHeadAttention<Scalar>> made;
  try {
    made.emplace(config);
    if (!config_valid) violated("an invalid configuration was accepted");
  } catch (const mha::invalid_argument&) {
    if (config_valid) violated("a valid configuration was rejected");
    return;
  }
  const auto& attn = *made;
  const int sequences = in.in(1, 3), max_length = in.in(0, 30);
  const int storage = (kind & 3) == 3 ? 2 : kind & 3, memory_storage = (kind & 16) ? (storage + 1) % 3 : storage;
  const bool rolling = kind & 4, truncates = kind & 8;
  DecodeOptions self;
  bool decoded = false;
  switch (storage) {
    case 0:
      decoded = self_decoding<Scalar, Scalar>(in, attn, sequences, max_length, rolling, truncates, self);
      break;
    case 1:
      decoded = self_decoding<Scalar, Eigen::bfloat16>(in, attn, sequences, max_length, rolling, truncates, self);
      break;
    default:
      decoded = self_decoding<Scalar, Eigen::half>(in, attn, sequences, max_length, rolling, truncates, self);
      break;
  }
  if (!decoded) return;
  switch (memory_storage) {
    case 0:
      cross_decoding<Scalar, Scalar>(in, attn, sequences, config.rotary, self);
      break;
    case 1:
      cross_decoding<Scalar, Eigen::bfloat16>(in, attn, sequences, config.rotary, self);
      break;
    default:
      cross_decoding<Scalar, Eigen::half>(in, attn, sequences, config.rotary, self);
      break;
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
      use_double ? decoding<double>(in, what >> 3) : decoding<float>(in, what >> 3);
      break;
  }
  return 0;
}
