// mha — how a decode step reads a key/value cache: its numbers converted from their storage type
// (bfloat16, half) to the type computed in, and the attention of one new token over a part of it.
#pragma once

#include <mha/detail/gemm.hpp>
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

/// scores[j] = query · row j, for the `count` rows of `width` contiguous numbers at `rows`: four
/// rows at a time, each a sum of packets reduced once at the end. (Eigen's row-major GEMV, on rows
/// as short as a head's 64 numbers, spent 27 cycles a row; this spends about 6.) The rows are of
/// Storage, converted as they are loaded (load_packet). With `stream`, the rows come from memory:
/// each block of four asks for the rows kPrefetchRows further on.
template <typename Scalar, typename Storage>
void dot_rows(const Scalar* query, const Storage* rows, Eigen::Index count, Eigen::Index width, Scalar* scores,
              bool stream) {
  using namespace Eigen::internal;
  using Packet = typename packet_traits<Scalar>::type;
  constexpr Eigen::Index n = packet_traits<Scalar>::size;
  const Eigen::Index packed = width / n * n;
  Eigen::Index j = 0;
  for (; j + 4 <= count; j += 4) {
    const Storage* row = rows + j * width;
    if (stream) prefetch_rows(row + kPrefetchRows * width, 4, width);
    Packet sum0 = pset1<Packet>(Scalar(0)), sum1 = sum0, sum2 = sum0, sum3 = sum0;
    for (Eigen::Index e = 0; e < packed; e += n) {
      const Packet q = ploadu<Packet>(query + e);
      sum0 = pmadd(load_packet<Scalar>(row + e), q, sum0);
      sum1 = pmadd(load_packet<Scalar>(row + width + e), q, sum1);
      sum2 = pmadd(load_packet<Scalar>(row + 2 * width + e), q, sum2);
      sum3 = pmadd(load_packet<Scalar>(row + 3 * width + e), q, sum3);
    }
    Scalar tail[4] = {predux(sum0), predux(sum1), predux(sum2), predux(sum3)};
    for (Eigen::Index e = packed; e < width; ++e)
      for (int r = 0; r < 4; ++r) tail[r] += static_cast<Scalar>(row[r * width + e]) * query[e];
    std::copy_n(tail, 4, scores + j);
  }
  for (; j < count; ++j) {
    const Storage* row = rows + j * width;
    Packet sum = pset1<Packet>(Scalar(0));
    for (Eigen::Index e = 0; e < packed; e += n)
      sum = pmadd(load_packet<Scalar>(row + e), ploadu<Packet>(query + e), sum);
    Scalar total = predux(sum);
    for (Eigen::Index e = packed; e < width; ++e) total += static_cast<Scalar>(row[e]) * query[e];
    scores[j] = total;
  }
}

/// out += Σ_j weights[j] · row j, for the `count` rows of `width` contiguous numbers at `rows`: a
/// block of up to four packets of out kept in registers across all the rows. Storage and `stream`
/// as for dot_rows.
template <typename Scalar, typename Storage>
void add_weighted_rows(const Scalar* weights, const Storage* rows, Eigen::Index count, Eigen::Index width, Scalar* out,
                       bool stream) {
  using namespace Eigen::internal;
  using Packet = typename packet_traits<Scalar>::type;
  constexpr Eigen::Index n = packet_traits<Scalar>::size;
  Eigen::Index e = 0;
  for (; e + 4 * n <= width; e += 4 * n) {
    Packet sum0 = ploadu<Packet>(out + e), sum1 = ploadu<Packet>(out + e + n), sum2 = ploadu<Packet>(out + e + 2 * n),
           sum3 = ploadu<Packet>(out + e + 3 * n);
    for (Eigen::Index j = 0; j < count; ++j) {
      const Packet w = pset1<Packet>(weights[j]);
      const Storage* row = rows + j * width + e;
      if (stream) prefetch_rows(row + kPrefetchRows * width, 1, std::min<Eigen::Index>(4 * n, width));
      sum0 = pmadd(load_packet<Scalar>(row), w, sum0);
      sum1 = pmadd(load_packet<Scalar>(row + n), w, sum1);
      sum2 = pmadd(load_packet<Scalar>(row + 2 * n), w, sum2);
      sum3 = pmadd(load_packet<Scalar>(row + 3 * n), w, sum3);
    }
    pstoreu(out + e, sum0);
    pstoreu(out + e + n, sum1);
    pstoreu(out + e + 2 * n, sum2);
    pstoreu(out + e + 3 * n, sum3);
  }
  for (; e + n <= width; e += n) {
    Packet sum = ploadu<Packet>(out + e);
    for (Eigen::Index j = 0; j < count; ++j)
      sum = pmadd(load_packet<Scalar>(rows + j * width + e), pset1<Packet>(weights[j]), sum);
    pstoreu(out + e, sum);
  }
  for (; e < width; ++e) {
    Scalar sum = out[e];
    for (Eigen::Index j = 0; j < count; ++j) sum += weights[j] * static_cast<Scalar>(rows[j * width + e]);
    out[e] = sum;
  }
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
/// time, for every head of the group while they are in L1: the first head's reads come from memory
/// and ask for the rows ahead, the others' from L1. A cache of bfloat16 or half is converted to
/// Scalar in registers as it is read. Computes and accumulates in Scalar.
template <typename Scalar, typename Storage>
void attend_to_part(Eigen::Index group, const Storage* keys, const Storage* values, Eigen::Index n, Eigen::Index d_k,
                    Eigen::Index d_v, PartScratch<Scalar>& scratch, Scalar* out, Eigen::Index out_step,
                    Scalar* log_sum_exp, Eigen::Index lse_step) {
  using Index = Eigen::Index;
  assert(n >= 1 && n <= kKeyBlock && scratch.queries.size() >= group * d_k && scratch.scores.size() >= group * n);
  // 1. Each head's scores, query · keyᵀ (the queries are scaled already).
  for (Index first = 0; first < n; first += kChunkRows) {
    const Index count = std::min(kChunkRows, n - first);
    for (Index g = 0; g < group; ++g)
      dot_rows(scratch.queries.data() + g * d_k, keys + first * d_k, count, d_k, scratch.scores.data() + g * n + first,
               g == 0);
  }
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
  for (Index first = 0; first < n; first += kChunkRows) {
    const Index count = std::min(kChunkRows, n - first);
    for (Index g = 0; g < group; ++g)
      add_weighted_rows(scratch.scores.data() + g * n + first, values + first * d_v, count, d_v, out + g * out_step,
                        g == 0);
  }
}

}  // namespace detail
}  // namespace mha
