// mha — numerically stable softmax over the rows of a matrix.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <limits>

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

/// x_i = exp(x_i − shift_i) for the n entries at x (shift: n entries, or one for all), flushed as
/// exp_flushed where a mask may have put −∞ among them: the exponentials of a tile's column (or of
/// a one-row tile), compiled once per scalar type for every pass that takes them.
template <typename Scalar>
void exp_minus(Scalar* x, Eigen::Index n, const Scalar* shift, bool flushed) {
  Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>> values(x, n);
  exp_minus_into(values, Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>(shift, n), flushed);
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
