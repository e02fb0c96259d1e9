// mha — the one matrix product of the library, c (+)= op(a) · op(b), through which every product of
// every pass goes: the projections, the attention tiles and their backward.
//
// Each distinct operand type of an Eigen product compiles a GEMM and a GEMV of its own (the packing,
// the kernel, the small-size path), and the passes used to multiply a dozen kinds of blocks, maps and
// transposes: most of a translation unit's compile time. Here every operand is one view type, a
// column-major map with an outer stride, read as it is or transposed, so a scalar type compiles
// three products (a·b, a·bᵀ, aᵀ·b), whatever the callers hold.
#pragma once

#include <Eigen/Core>

#include <cassert>

namespace mha {
namespace detail {

/// An operand of gemm(): a column-major block of contiguous columns (a matrix, a block of one, a
/// map), to be read as it is or transposed. It views memory it does not own.
template <typename Scalar>
struct Operand {
  using Map = Eigen::Map<const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>, 0, Eigen::OuterStride<>>;
  /// What gemm() writes into: any block of contiguous columns.
  using Result = Eigen::Ref<Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>>;

  const Scalar* data;
  Eigen::Index rows, cols, stride;  ///< of the stored block; `stride` between its columns
  bool transposed;

  /// The rows and columns of op(this).
  Eigen::Index op_rows() const { return transposed ? cols : rows; }
  Eigen::Index op_cols() const { return transposed ? rows : cols; }
  /// The rows of op(this) first … first + count − 1 (a transposed operand's stored columns).
  Operand middle_rows(Eigen::Index first, Eigen::Index count) const {
    if (transposed) return {data + first * stride, rows, count, stride, true};
    return {data + first, count, cols, stride, false};
  }
  /// This operand read transposed (or back).
  Operand t() const { return {data, rows, cols, stride, !transposed}; }
  Map stored() const { return Map(data, rows, cols, Eigen::OuterStride<>(stride)); }
};

/// `x` as an operand: x must be stored column by column with contiguous columns (a matrix, a
/// column-major map, a block of either); a row-major one is read as the transpose of its
/// column-major reading.
template <typename Derived>
Operand<typename Derived::Scalar> operand(const Eigen::DenseBase<Derived>& x) {
  static_assert(bool(Derived::Flags & Eigen::DirectAccessBit), "mha::detail::operand: x must be stored in memory");
  assert(x.innerStride() == 1 && "mha::detail::operand: x's coefficients must be contiguous along its inner dimension");
  if constexpr (bool(Derived::Flags & Eigen::RowMajorBit))
    return {x.derived().data(), x.cols(), x.rows(), x.outerStride(), true};
  else
    return {x.derived().data(), x.rows(), x.cols(), x.outerStride(), false};
}

/// c = op(a) · op(b), or c += op(a) · op(b) with `accumulate`. c must not overlap a or b. For
/// `=`, c is zeroed and then added to, which is what Eigen's own GEMM does for an assignment.
template <typename Scalar>
void gemm(const Operand<Scalar>& a, const Operand<Scalar>& b, typename Operand<Scalar>::Result c,
          bool accumulate = false) {
  if (!accumulate) {
    // A contiguous c (a tile of scores, one row of them when decoding) is zeroed as one array: as a
    // view with an outer stride, a 1 × 512 row would be zeroed one column, one float, at a time,
    // which cost a decode step with grouped-query attention a fifth of its time.
    if (c.outerStride() == c.rows())
      Eigen::Map<Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>>(c.data(), c.rows(), c.cols()).setZero();
    else
      c.setZero();
  }
  const auto A = a.stored();
  const auto B = b.stored();
  if (!a.transposed && !b.transposed)
    c.noalias() += A * B;
  else if (!a.transposed)
    c.noalias() += A * B.transpose();
  else if (!b.transposed)
    c.noalias() += A.transpose() * B;
  else  // aᵀ · bᵀ, which no pass needs: (a copy of aᵀ) · bᵀ, so that a fourth product is never compiled
    gemm(operand(Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>(A.transpose())), b, c, true);
}

/// sums += the sums of x's columns (x: rows × n, sums: n contiguous numbers), as onesᵀ · x: one
/// more of the products above instead of a reduction compiled for each type of x.
template <typename Scalar>
void add_column_sums(const Operand<Scalar>& x, Scalar* sums) {
  const Eigen::Matrix<Scalar, Eigen::Dynamic, 1> ones = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>::Ones(x.op_rows());
  Eigen::Map<Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>> result(sums, 1, x.op_cols());
  gemm(operand(ones).t(), x, result, true);
}

}  // namespace detail
}  // namespace mha
