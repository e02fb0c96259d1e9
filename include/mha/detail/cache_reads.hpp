// mha — how a decode step reads a key/value cache: its numbers converted from their storage type
// (bfloat16, half) to the type computed in, and the attention of one new token over a part of it.
#pragma once

#include <mha/detail/gemm.hpp>
#include <mha/detail/packets.hpp>
#include <mha/detail/visibility.hpp>
#include <mha/softmax.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cassert>
#include <cmath>
#include <limits>
#include <type_traits>

#ifdef __SSE2__
#include <immintrin.h>
#endif

namespace mha {
namespace detail {

/// Converts the first numbers of `count` from one storage type to another a packet at a time,
/// where the machine has the conversion in registers; \returns how many it converted.
template <typename From, typename To>
Eigen::Index convert_packets(const From* from, Eigen::Index count, To* to) {
  Eigen::Index i = 0;
#ifdef __F16C__
  // Eigen 3.4 converts half in software, one number at a time, even where F16C is there (its
  // EIGEN_HAS_FP16_C is never defined): 15x slower than these instructions.
  if constexpr (std::is_same<From, Eigen::half>::value && std::is_same<To, float>::value) {
    for (; i + 8 <= count; i += 8)
      _mm256_storeu_ps(to + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(from + i))));
    return i;
  }
#endif
  using namespace Eigen::internal;
  using PacketFrom = typename packet_traits<From>::type;
  using PacketTo = typename packet_traits<To>::type;
  constexpr int n = packet_traits<To>::size;
  if constexpr (n > 1 && packet_traits<From>::Vectorizable && packet_traits<To>::Vectorizable &&
                packet_traits<From>::size == n && type_casting_traits<From, To>::VectorizedCast)
    for (; i + n <= count; i += n) pstoreu(to + i, pcast<PacketFrom, PacketTo>(ploadu<PacketFrom>(from + i)));
  return i;
}

/// Converts `count` numbers from one storage type to another (float ↔ bfloat16 or half, or a plain
/// copy): a packet at a time where the machine can (bfloat16 with AVX2 or AVX-512, half with F16C),
/// else one number at a time. Eigen 3.4's .cast<>() converts one number at a time.
template <typename From, typename To>
void convert(const From* from, Eigen::Index count, To* to) {
  if constexpr (std::is_same<From, To>::value) {
    std::copy_n(from, count, to);
  } else {
    for (Eigen::Index i = convert_packets(from, count, to); i < count; ++i) to[i] = static_cast<To>(from[i]);
  }
}

/// `rows` of a cache (a block of whole rows of a row-major matrix) as an operand of Scalar: the
/// cache's own numbers when it stores Scalar, else converted into `buffer`, which must have room.
template <typename Scalar, typename Rows>
Operand<Scalar> cached_rows(const Rows& rows, Eigen::Array<Scalar, Eigen::Dynamic, 1>& buffer) {
  if constexpr (std::is_same<typename Rows::Scalar, Scalar>::value) {
    return operand(rows);
  } else {
    const Eigen::Index count = rows.rows() * rows.cols();
    assert(buffer.size() >= count);
    convert(rows.data(), count, buffer.data());
    return Operand<Scalar>{buffer.data(), rows.cols(), rows.rows(), rows.cols(), true};
  }
}

/// Rows of a cache that a decode step reads at once: 64 rows of 64 floats are 16 KiB, which stay
/// in L1 while every query head of a group reads them.
constexpr Eigen::Index kChunkRows = 64;

/// The rows a pass over a cache asks the memory for before it reads them, when it reads them from
/// memory: the hardware's prefetcher alone kept one core at 0.6 of its read bandwidth there.
constexpr Eigen::Index kPrefetchRows = 8;

/// Asks for rows `row` … row + count − 1 (of `width` numbers) to be brought into cache.
template <typename Storage>
void prefetch_rows(const Storage* row, Eigen::Index count, Eigen::Index width) {
  constexpr Eigen::Index line = 64 / static_cast<Eigen::Index>(sizeof(Storage));  // numbers per cache line
  for (Eigen::Index l = 0; l < count * width; l += line) Eigen::internal::prefetch(row + l);
}

/// A packet of Scalar from the packet's count of contiguous Storage numbers at `from`, converted in
/// registers: bfloat16 to float is a shift of each number into the upper half of its lane (AVX-512,
/// AVX2, SSE2), half to float the F16C instruction (AVX-512, F16C); other pairs (and machines
/// without them) convert one number at a time. So a cache of bfloat16 or half is read as it is,
/// half the bytes of a float cache, with no store and reload of converted rows.
template <typename Scalar, typename Storage>
typename Eigen::internal::packet_traits<Scalar>::type load_packet(const Storage* from) {
  using namespace Eigen::internal;
  using Packet = typename packet_traits<Scalar>::type;
  // The packet's lanes tell its type (16: __m512, 8: __m256, 4: __m128, where float is vectorised).
  [[maybe_unused]] constexpr int lanes = packet_traits<Scalar>::size;
  if constexpr (std::is_same<Storage, Scalar>::value) {
    return ploadu<Packet>(from);
  } else {
    [[maybe_unused]] const auto* bits = reinterpret_cast<const unsigned char*>(from);
    if constexpr (std::is_same<Scalar, float>::value && std::is_same<Storage, Eigen::bfloat16>::value) {
#if defined(__AVX512F__)
      if constexpr (lanes == 16)
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits))), 16));
#endif
#if defined(__AVX2__)
      if constexpr (lanes == 8)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits))), 16));
#endif
#if defined(__SSE2__)
      if constexpr (lanes == 4)
        return _mm_castsi128_ps(
            _mm_unpacklo_epi16(_mm_setzero_si128(), _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bits))));
#endif
    }
    if constexpr (std::is_same<Scalar, float>::value && std::is_same<Storage, Eigen::half>::value) {
#if defined(__AVX512F__)
      if constexpr (lanes == 16) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits)));
#endif
#if defined(__F16C__)
      if constexpr (lanes == 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits)));
      if constexpr (lanes == 4) return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bits)));
#endif
    }
    Scalar numbers[packet_traits<Scalar>::size];
    for (int i = 0; i < packet_traits<Scalar>::size; ++i) numbers[i] = static_cast<Scalar>(from[i]);
    return ploadu<Packet>(numbers);
  }
}

/// Query heads one pass over a block of rows serves at once, their sums kept in registers: four
/// with 32 vector registers (AVX-512), two with 16 (AVX2) — 4 × 4 or 2 × 4 independent sums, as
/// many as the FMA units need in flight (two units, four cycles each) to run at their peak.
constexpr int kHeadBlock = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 4 : 2;

/// Calls block(std::integral_constant<int, Heads>(), first) for blocks of the heads 0 … heads − 1:
/// kHeadBlock heads at a time, then fewer.
template <typename Block>
void for_head_blocks(Eigen::Index heads, Block&& block) {
  Eigen::Index first = 0;
  if constexpr (kHeadBlock >= 4)
    for (; first + 4 <= heads; first += 4) block(std::integral_constant<int, 4>(), first);
  for (; first + 2 <= heads; first += 2) block(std::integral_constant<int, 2>(), first);
  if (first < heads) block(std::integral_constant<int, 1>(), first);
}

/// scores[h·score_step + r] = the sum of sum[h][r]'s numbers. Four rows of float sums whose heads
/// fill a packet four numbers each (four heads with AVX-512, two with AVX, one at a time with SSE)
/// are summed by a tree of lane shuffles: each level pairs the packets and adds the two halves of
/// each, until one packet holds the 16 (8, 4) totals, head by head; 45 instructions for AVX-512's
/// sixteen sums where a horizontal sum of each (predux) takes about eight. Else predux each.
template <int Heads, int Rows, typename Packet, typename Scalar>
EIGEN_ALWAYS_INLINE void store_totals(const Packet (&sum)[Heads][Rows], Scalar* scores, Eigen::Index score_step) {
  // The sums row by row, the heads of a row side by side: p[r·Heads + h] = sum[h][r].
  [[maybe_unused]] const auto p = [&](int i) { return sum[i % Heads][i / Heads]; };
  [[maybe_unused]] constexpr int lanes = Eigen::internal::unpacket_traits<Packet>::size;
#if defined(__AVX512F__)
  if constexpr (std::is_same<Scalar, float>::value && lanes == 16 && Heads == 4 && Rows == 4) {
    // The masked forms with every lane kept: GCC 12's unmasked forms start from an "undefined"
    // packet its own -Wuninitialized warns about.
    constexpr __mmask16 kAll = 0xFFFF;
    __m512 halves[8], quarters[4], eighths[2];  // each sum's partial totals, in fewer numbers each level
    MHA_UNROLL
    for (int i = 0; i < 8; ++i)  // [a's two 256-bit halves added | b's]
      halves[i] = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(kAll, p(2 * i), p(2 * i + 1), _MM_SHUFFLE(1, 0, 1, 0)),
                                _mm512_maskz_shuffle_f32x4(kAll, p(2 * i), p(2 * i + 1), _MM_SHUFFLE(3, 2, 3, 2)));
    MHA_UNROLL
    for (int i = 0; i < 4; ++i)  // one 128-bit lane of four numbers for each of four sums
      quarters[i] =
          _mm512_add_ps(_mm512_maskz_shuffle_f32x4(kAll, halves[2 * i], halves[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                        _mm512_maskz_shuffle_f32x4(kAll, halves[2 * i], halves[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    MHA_UNROLL
    for (int i = 0; i < 2; ++i)  // lane j: two numbers of sum 4·(2i) + j, two of sum 4·(2i + 1) + j
      eighths[i] =
          _mm512_add_ps(_mm512_maskz_shuffle_ps(kAll, quarters[2 * i], quarters[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                        _mm512_maskz_shuffle_ps(kAll, quarters[2 * i], quarters[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    // Lane j: the totals of sums j, 4 + j, 8 + j, 12 + j, which are head j's four rows.
    const __m512 totals = _mm512_add_ps(_mm512_maskz_shuffle_ps(kAll, eighths[0], eighths[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                        _mm512_maskz_shuffle_ps(kAll, eighths[0], eighths[1], _MM_SHUFFLE(3, 1, 3, 1)));
    _mm_storeu_ps(scores, _mm512_maskz_extractf32x4_ps(0xF, totals, 0));
    _mm_storeu_ps(scores + score_step, _mm512_maskz_extractf32x4_ps(0xF, totals, 1));
    _mm_storeu_ps(scores + 2 * score_step, _mm512_maskz_extractf32x4_ps(0xF, totals, 2));
    _mm_storeu_ps(scores + 3 * score_step, _mm512_maskz_extractf32x4_ps(0xF, totals, 3));
    return;
  }
#endif
#if defined(__AVX__)
  if constexpr (std::is_same<Scalar, float>::value && lanes == 8 && Heads == 2 && Rows == 4) {
    __m256 halves[4], quarters[2];
    MHA_UNROLL
    for (int i = 0; i < 4; ++i)  // 128-bit lane 0: sum 2i's halves added, lane 1: sum 2i + 1's
      halves[i] = _mm256_add_ps(_mm256_permute2f128_ps(p(2 * i), p(2 * i + 1), 0x20),
                                _mm256_permute2f128_ps(p(2 * i), p(2 * i + 1), 0x31));
    MHA_UNROLL
    for (int i = 0; i < 2; ++i)  // lane j: two numbers of sum 4i + j, two of sum 4i + 2 + j
      quarters[i] = _mm256_add_ps(_mm256_shuffle_ps(halves[2 * i], halves[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm256_shuffle_ps(halves[2 * i], halves[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    // Lane j: the totals of sums j, 2 + j, 4 + j, 6 + j, which are head j's four rows.
    const __m256 totals = _mm256_add_ps(_mm256_shuffle_ps(quarters[0], quarters[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                        _mm256_shuffle_ps(quarters[0], quarters[1], _MM_SHUFFLE(3, 1, 3, 1)));
    _mm_storeu_ps(scores, _mm256_castps256_ps128(totals));
    _mm_storeu_ps(scores + score_step, _mm256_extractf128_ps(totals, 1));
    return;
  }
#endif
#if defined(__SSE2__)
  if constexpr (std::is_same<Scalar, float>::value && lanes == 4 && Rows == 4) {
    MHA_UNROLL
    for (int h = 0; h < Heads; ++h) {
      const __m128 rows01 = _mm_add_ps(_mm_shuffle_ps(sum[h][0], sum[h][1], _MM_SHUFFLE(1, 0, 1, 0)),
                                       _mm_shuffle_ps(sum[h][0], sum[h][1], _MM_SHUFFLE(3, 2, 3, 2)));
      const __m128 rows23 = _mm_add_ps(_mm_shuffle_ps(sum[h][2], sum[h][3], _MM_SHUFFLE(1, 0, 1, 0)),
                                       _mm_shuffle_ps(sum[h][2], sum[h][3], _MM_SHUFFLE(3, 2, 3, 2)));
      _mm_storeu_ps(scores + h * score_step, _mm_add_ps(_mm_shuffle_ps(rows01, rows23, _MM_SHUFFLE(2, 0, 2, 0)),
                                                        _mm_shuffle_ps(rows01, rows23, _MM_SHUFFLE(3, 1, 3, 1))));
    }
    return;
  }
#endif
  for (int h = 0; h < Heads; ++h)
    for (int r = 0; r < Rows; ++r) scores[h * score_step + r] = Eigen::internal::predux(sum[h][r]);
}

/// scores[h·score_step + r] = query h · row r, for Heads queries (query h at queries + h·query_step)
/// and Rows rows of `width` Storage numbers at `row`: each row's packets loaded once (converted
/// from Storage in registers, load_packet) for all the heads, each of the Heads × Rows sums reduced
/// once at the end.
template <int Heads, int Rows, typename Scalar, typename Storage>
void dot_row_block(const Scalar* queries, Eigen::Index query_step, const Storage* row, Eigen::Index width,
                   Scalar* scores, Eigen::Index score_step) {
  using namespace Eigen::internal;
  using Packet = typename packet_traits<Scalar>::type;
  constexpr Eigen::Index n = packet_traits<Scalar>::size;
  const Eigen::Index packed = width / n * n;
  Packet sum[Heads][Rows];
  MHA_UNROLL
  for (int h = 0; h < Heads; ++h) {
    MHA_UNROLL
    for (int r = 0; r < Rows; ++r) sum[h][r] = pset1<Packet>(Scalar(0));
  }
  for (Eigen::Index e = 0; e < packed; e += n) {
    Packet q[Heads];
    MHA_UNROLL
    for (int h = 0; h < Heads; ++h) {
      q[h] = ploadu<Packet>(queries + h * query_step + e);
      if constexpr (Rows > 1) keep_in_register(q[h]);
    }
    MHA_UNROLL
    for (int r = 0; r < Rows; ++r) {
      Packet key = load_packet<Scalar>(row + r * width + e);
      if constexpr (Heads > 1) keep_in_register(key);
      MHA_UNROLL
      for (int h = 0; h < Heads; ++h) sum[h][r] = pmadd(key, q[h], sum[h][r]);
    }
  }
  store_totals(sum, scores, score_step);
  for (Eigen::Index e = packed; e < width; ++e) {
    MHA_UNROLL
    for (int h = 0; h < Heads; ++h) {
      MHA_UNROLL
      for (int r = 0; r < Rows; ++r)
        scores[h * score_step + r] += static_cast<Scalar>(row[r * width + e]) * queries[h * query_step + e];
    }
  }
}

/// scores[h·score_step + j] = query h · row j, for `heads` queries (query h at queries + h·query_step)
/// and the `count` rows of `width` contiguous Storage numbers at `rows`: four rows at a time, for up
/// to kHeadBlock heads at once (dot_row_block). (Eigen's row-major GEMV, on rows as short as a
/// head's 64 numbers, spent 27 cycles a row; this spends about 6 for one head.) With `stream`, the
/// rows come from memory: the first heads' pass over each block of four asks for the rows
/// kPrefetchRows further on.
template <typename Scalar, typename Storage>
void dot_rows(Eigen::Index heads, const Scalar* queries, Eigen::Index query_step, const Storage* rows,
              Eigen::Index count, Eigen::Index width, Scalar* scores, Eigen::Index score_step, bool stream) {
  for_head_blocks(heads, [&](auto block, Eigen::Index first) {
    constexpr int Heads = decltype(block)::value;
    const Scalar* q = queries + first * query_step;
    Scalar* s = scores + first * score_step;
    Eigen::Index j = 0;
    for (; j + 4 <= count; j += 4) {
      if (stream && first == 0) prefetch_rows(rows + (j + kPrefetchRows) * width, 4, width);
      dot_row_block<Heads, 4>(q, query_step, rows + j * width, width, s + j, score_step);
    }
    for (; j < count; ++j) dot_row_block<Heads, 1>(q, query_step, rows + j * width, width, s + j, score_step);
  });
}

/// scores[j] = query · row j, for the `count` rows of `width` contiguous Storage numbers at `rows`.
template <typename Scalar, typename Storage>
void dot_rows(const Scalar* query, const Storage* rows, Eigen::Index count, Eigen::Index width, Scalar* scores,
              bool stream) {
  dot_rows(1, query, 0, rows, count, width, scores, 0, stream);
}

/// out_h[0 … Packets·n − 1] += Σ_j weights[h·weight_step + j] · row j's first Packets·n numbers, for
/// Heads heads (out_h at out + h·out_step) and the `count` rows at `rows`, `width` Storage numbers
/// apart: each row's packets loaded once for all the heads, the Heads × Packets sums kept in
/// registers across all the rows. With `stream`, each row asks for the row kPrefetchRows further on.
template <int Heads, int Packets, typename Scalar, typename Storage>
void add_weighted_row_block(const Scalar* weights, Eigen::Index weight_step, const Storage* rows, Eigen::Index count,
                            Eigen::Index width, Scalar* out, Eigen::Index out_step, bool stream) {
  using namespace Eigen::internal;
  using Packet = typename packet_traits<Scalar>::type;
  constexpr Eigen::Index n = packet_traits<Scalar>::size;
  Packet sum[Heads][Packets];
  MHA_UNROLL
  for (int h = 0; h < Heads; ++h) {
    MHA_UNROLL
    for (int p = 0; p < Packets; ++p) sum[h][p] = ploadu<Packet>(out + h * out_step + p * n);
  }
  for (Eigen::Index j = 0; j < count; ++j) {
    const Storage* row = rows + j * width;
    if (stream) prefetch_rows(row + kPrefetchRows * width, 1, Packets * n);
    Packet values[Packets];
    MHA_UNROLL
    for (int p = 0; p < Packets; ++p) {
      values[p] = load_packet<Scalar>(row + p * n);
      if constexpr (Heads > 1) keep_in_register(values[p]);
    }
    MHA_UNROLL
    for (int h = 0; h < Heads; ++h) {
      const Packet w = pset1<Packet>(weights[h * weight_step + j]);
      MHA_UNROLL
      for (int p = 0; p < Packets; ++p) {
        sum[h][p] = pmadd(values[p], w, sum[h][p]);
      }
    }
  }
  MHA_UNROLL
  for (int h = 0; h < Heads; ++h) {
    MHA_UNROLL
    for (int p = 0; p < Packets; ++p) pstoreu(out + h * out_step + p * n, sum[h][p]);
  }
}

/// out_h += Σ_j weights[h·weight_step + j] · row j, for `heads` heads (out_h, `width` numbers, at
/// out + h·out_step) and the `count` rows of `width` contiguous Storage numbers at `rows`: blocks
/// of up to kHeadBlock heads × four packets of their outputs (add_weighted_row_block). Storage and
/// `stream` as for dot_rows.
template <typename Scalar, typename Storage>
void add_weighted_rows(Eigen::Index heads, const Scalar* weights, Eigen::Index weight_step, const Storage* rows,
                       Eigen::Index count, Eigen::Index width, Scalar* out, Eigen::Index out_step, bool stream) {
  constexpr Eigen::Index n = Eigen::internal::packet_traits<Scalar>::size;
  for_head_blocks(heads, [&](auto block, Eigen::Index first) {
    constexpr int Heads = decltype(block)::value;
    const Scalar* w = weights + first * weight_step;
    Scalar* o = out + first * out_step;
    const bool ask = stream && first == 0;
    Eigen::Index e = 0;
    for (; e + 4 * n <= width; e += 4 * n)
      add_weighted_row_block<Heads, 4>(w, weight_step, rows + e, count, width, o + e, out_step, ask);
    for (; e + n <= width; e += n)
      add_weighted_row_block<Heads, 1>(w, weight_step, rows + e, count, width, o + e, out_step, ask);
    for (; e < width; ++e) {
      for (int h = 0; h < Heads; ++h) {
        Scalar sum = o[h * out_step + e];
        for (Eigen::Index j = 0; j < count; ++j)
          sum += w[h * weight_step + j] * static_cast<Scalar>(rows[j * width + e]);
        o[h * out_step + e] = sum;
      }
    }
  });
}

/// Makes `buffer` hold at least `size` numbers, keeping it when it does (its contents are lost when not).
template <typename Buffer>
void reserve(Buffer& buffer, Eigen::Index size) {
  if (buffer.size() < size) buffer.resize(size);
}

/// The working memory of attend_to_part.
template <typename Scalar>
struct PartScratch {
  /// Makes room for up to `group` query heads of width d_k over parts of kKeyBlock keys (nothing
  /// changes when there is).
  void reserve_for(Eigen::Index group, Eigen::Index d_k) {
    reserve(queries, group * d_k);
    reserve(scores, group * kKeyBlock);
  }
  Column<Scalar> queries;  ///< group × d_k: scale · each head's query
  Column<Scalar> scores;   ///< group × kKeyBlock: each head's scores, then their weights
};

/// The attention of one new token over one part of a cache, for the `group` query heads that share
/// its key/value head (grouped-query attention: the part's keys and values are read once for all of
/// them): query head g's scaled query is scratch.queries' g-th d_k numbers, the part's n ≤
/// kKeyBlock keys and values (none hidden by a mask) are n rows of d_k and d_v Storage numbers from
/// `keys` and `values`. Writes head g's output, normalised over the part, at out + g·out_step (d_v
/// numbers), and its log-sum-exp at log_sum_exp[g·lse_step] (what merge_key_parts merges the parts
/// with).
///
/// Two passes over the part instead of the online softmax: the scores of all n keys, their
/// exponentials and sum, then the weighted sum of the values. Each pass reads kChunkRows rows at a
/// time, for every head of the group while they are in L1, kHeadBlock heads per pass (each row's
/// packets loaded once for all of them): the first block of heads reads from memory and asks for
/// the rows ahead, the others from L1. A cache of bfloat16 or half is converted to
/// Scalar in registers as it is read. Computes and accumulates in Scalar.
template <typename Scalar, typename Storage>
void attend_to_part(Eigen::Index group, const Storage* keys, const Storage* values, Eigen::Index n, Eigen::Index d_k,
                    Eigen::Index d_v, PartScratch<Scalar>& scratch, Scalar* out, Eigen::Index out_step,
                    Scalar* log_sum_exp, Eigen::Index lse_step) {
  using Index = Eigen::Index;
  assert(n >= 1 && n <= kKeyBlock && scratch.queries.size() >= group * d_k && scratch.scores.size() >= group * n);
  // 1. Each head's scores, query · keyᵀ (the queries are scaled already).
  for (Index first = 0; first < n; first += kChunkRows)
    dot_rows(group, scratch.queries.data(), d_k, keys + first * d_k, std::min(kChunkRows, n - first), d_k,
             scratch.scores.data() + first, n, true);
  // 2. Their exponentials, relative to each head's largest score, and their sum.
  for (Index g = 0; g < group; ++g) {
    ColumnMap<Scalar> scores(scratch.scores.data() + g * n, n);
    const Scalar largest = scores.maxCoeff();
    const Scalar shift = largest == -std::numeric_limits<Scalar>::infinity() ? Scalar(0) : largest;  // stable_shift
    exp_minus(scores.data(), n, shift, false);
    const Scalar sum = scores.sum();
    log_sum_exp[g * lse_step] = sum == Scalar(0) ? largest : largest + std::log(sum);
    // The normaliser, folded into the weights: n products instead of d_v at the end.
    scores *= sum == Scalar(0) ? Scalar(1) : Scalar(1) / sum;
    std::fill_n(out + g * out_step, d_v, Scalar(0));
  }
  // 3. Each head's output, weights · values.
  for (Index first = 0; first < n; first += kChunkRows)
    add_weighted_rows(group, scratch.scores.data() + first, n, values + first * d_v, std::min(kChunkRows, n - first),
                      d_v, out, out_step, true);
}

}  // namespace detail
}  // namespace mha
