// mha — numerically stable softmax over the rows of a matrix.
#pragma once

#include <Eigen/Core>

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
  x = (x.colwise() - shift).exp();
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
