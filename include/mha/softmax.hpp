// mha — numerically stable softmax over the rows of a matrix.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <limits>
#include <type_traits>

namespace mha {
namespace detail {

/// The shift each row's exponentials are taken relative to: the row's maximum m, or 0 where m is
/// −∞ (a row with nothing to attend to), so that exp(−∞ − shift) = 0 instead of exp(NaN).
template <typename ArrayType>
auto stable_shift(const ArrayType& row_max) {
  using Scalar = typename ArrayType::Scalar;
  return (row_max == -std::numeric_limits<Scalar>::infinity()).select(Scalar(0), row_max);
}

/// exp(x), with every result below the smallest normal number made an exact 0. Eigen's vectorised
/// exp clamps its argument, so exp(−∞) comes out as a denormal near 10⁻³⁹ rather than 0: a key
/// that a mask removed would keep a sliver of weight, and a row with every key removed would
/// average the values instead of giving zeros. Subtracting the smallest normal (then clamping at
/// 0) also keeps denormals, slow on many CPUs, out of the products; it moves no normal weight by
/// more than 10⁻³⁸ (10⁻³⁰⁸ in double), far below its rounding next to the largest weight, 1.
template <typename Derived>
auto exp_flushed(const Eigen::ArrayBase<Derived>& x) {
  using Scalar = typename Derived::Scalar;
  return (x.derived().exp() - std::numeric_limits<Scalar>::min()).max(Scalar(0));
}

/// x = exp(x − shift) for an array x, `flushed` as exp_flushed (where a mask may have put −∞).
template <typename Values, typename Shift>
void exp_minus_into(Values& x, const Shift& shift, bool flushed) {
  if (flushed)
    x = exp_flushed(x - shift);
  else
    x = (x - shift).exp();
}

/// e^x for a packet of float x, computed as 2^t with t = x·log₂e rounded, t = k + f with k the
/// nearest integer and f in [−½, ½]: 2^f by a polynomial of degree 6 (fitted for the least largest
/// relative error on that interval, 1.9·10⁻⁹), 2^k added to its exponent bits. Its relative error
/// is at most 1.5·2⁻²⁴·(1 + |x|) (tests/test_softmax.cpp measures it against exp in double): the
/// |x| term is the rounding of t, the same size as what the rounding of x itself (x − shift, a
/// score less its row's largest) carries into e^x. Every result below 2^−125 (x < −86.64, and
/// x = −∞) is an exact 0, as exp_flushed makes Eigen's; NaN stays NaN, +∞ stays +∞, and finite x
/// above 88 (never a caller's: each subtracts the largest) saturate at 2^127. Eigen's own exp
/// takes the same steps around a base-e reduction and a general 2^k that handles overflow: about
/// half again as many instructions, 2.2× the time on AVX2, 1.0–1.3× on AVX-512 (BM_TileExponentials
/// in bench_forward; docs/performance.md).
template <typename Packet>
Packet exp_packet(const Packet& x) {
  using namespace Eigen::internal;
  using Integers = typename unpacket_traits<Packet>::integer_packet;
  const Packet t_unclamped = pmul(x, pset1<Packet>(1.44269504088896341f));  // log₂e
  const Packet below_normal = pcmp_lt(t_unclamped, pset1<Packet>(-125.0f));
  const Packet t = pmin(t_unclamped, pset1<Packet>(127.0f));  // NaN stays NaN (Eigen's pmin returns its first)
  // 1.5·2²³ added rounds t to the nearest integer k, and leaves k in the low bits of the sum.
  const Packet rounder = pset1<Packet>(12582912.0f);
  const Packet k_in_bits = padd(t, rounder);
  const Packet f = psub(t, psub(k_in_bits, rounder));
  Packet p = pset1<Packet>(1.534581177400404e-4f);
  p = pmadd(p, f, pset1<Packet>(1.339993142200721e-3f));
  p = pmadd(p, f, pset1<Packet>(9.618488959744639e-3f));
  p = pmadd(p, f, pset1<Packet>(5.550328776466931e-2f));
  p = pmadd(p, f, pset1<Packet>(2.402264689059301e-1f));
  p = pmadd(p, f, pset1<Packet>(6.931472057374952e-1f));
  p = pmadd(p, f, pset1<Packet>(1.0f));
  const Integers exponent = plogical_shift_left<23>(preinterpret<Integers>(k_in_bits));
  const Packet power = pandnot(preinterpret<Packet>(padd(preinterpret<Integers>(p), exponent)), below_normal);
  return pmax(t_unclamped, power);  // power > t, but +∞ and NaN (Eigen's pmax returns its first) pass
}

/// e^x for a packet: exp_packet for float; Eigen's exp for double, made an exact 0 below the
/// smallest normal number as exp_flushed does when `flushed`.
template <typename Packet>
Packet exp_of_packet(const Packet& x, bool flushed) {
  using namespace Eigen::internal;
  using Scalar = typename unpacket_traits<Packet>::type;
  if constexpr (std::is_same<Scalar, float>::value) {
    return exp_packet(x);
  } else {
    const Packet e = pexp(x);
    return flushed ? pmax(psub(e, pset1<Packet>(std::numeric_limits<Scalar>::min())), pset1<Packet>(Scalar(0))) : e;
  }
}

/// x_i = exp(x_i − shift_i) for the n entries at x (shift: n entries, or one for all), flushed as
/// exp_flushed where a mask may have put −∞ among them (a float always is, at no cost): the
/// exponentials of a tile's column (or of a one-row tile), compiled once per scalar type for every
/// pass that takes them. A packet at a time, the last few numbers through a packet of their own, so
/// that every number goes the same way wherever it stands.
template <typename Scalar>
void exp_minus(Scalar* x, Eigen::Index n, const Scalar* shift, bool flushed) {
  using namespace Eigen::internal;
  using Packet = typename packet_traits<Scalar>::type;
  constexpr Eigen::Index lanes = packet_traits<Scalar>::size;
  if constexpr (lanes > 1) {
    Eigen::Index i = 0;
    for (; i + lanes <= n; i += lanes)
      pstoreu(x + i, exp_of_packet(psub(ploadu<Packet>(x + i), ploadu<Packet>(shift + i)), flushed));
    if (i < n) {
      Scalar rest[lanes] = {}, rest_shift[lanes] = {};
      std::copy(x + i, x + n, rest);
      std::copy(shift + i, shift + n, rest_shift);
      pstoreu(rest, exp_of_packet(psub(ploadu<Packet>(rest), ploadu<Packet>(rest_shift)), flushed));
      std::copy_n(rest, n - i, x + i);
    }
  } else {  // no vectorisation: Eigen's exp, one number at a time
    Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>> values(x, n);
    exp_minus_into(values, Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>(shift, n), flushed);
  }
}
/// The same with one shift for all n: through the form above, a chunk of shifts at a time, so that
/// the vectorised exponential is compiled once.
template <typename Scalar>
void exp_minus(Scalar* x, Eigen::Index n, Scalar shift, bool flushed) {
  constexpr Eigen::Index kChunk = 256;
  Scalar shifts[kChunk];
  std::fill_n(shifts, std::min(kChunk, n), shift);
  for (Eigen::Index first = 0; first < n; first += kChunk)
    exp_minus(x + first, std::min(kChunk, n - first), static_cast<const Scalar*>(shifts), flushed);
}

}  // namespace detail

/// Replaces each row x of `logits` by softmax(x) = exp(x − max x) / Σ exp(x − max x), in place.
/// Subtracting the maximum keeps every exponential in (0, 1], so logits of any finite size neither
/// overflow nor give NaN. A row whose entries are all −∞ (every position masked) becomes zeros.
template <typename Derived>
void softmax_rows_in_place(const Eigen::MatrixBase<Derived>& logits) {
  using Scalar = typename Derived::Scalar;
  using Column = Eigen::Array<Scalar, Eigen::Dynamic, 1>;
  auto x = logits.const_cast_derived().array();
  if (x.size() == 0) return;
  const Column shift = detail::stable_shift(Column(x.rowwise().maxCoeff()));
  x = detail::exp_flushed(x.colwise() - shift);
  const Column sum = x.rowwise().sum();
  x.colwise() /= (sum == Scalar(0)).select(Scalar(1), sum);
}

/// \returns the row-wise softmax of `logits` (see softmax_rows_in_place).
template <typename Derived>
Eigen::Matrix<typename Derived::Scalar, Eigen::Dynamic, Eigen::Dynamic> softmax_rows(
    const Eigen::MatrixBase<Derived>& logits) {
  Eigen::Matrix<typename Derived::Scalar, Eigen::Dynamic, Eigen::Dynamic> p = logits;
  softmax_rows_in_place(p);
  return p;
}

}  // namespace mha
