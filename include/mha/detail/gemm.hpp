// mha — the one matrix product of the library, c (+)= op(a) · op(b), through which every product of
// every pass goes: the projections, the attention tiles and their backward.
//
// Each distinct operand type of an Eigen product compiles a GEMM and a GEMV of its own (the packing,
// the kernel, the small-size path), and the passes used to multiply a dozen kinds of blocks, maps and
// transposes: most of a translation unit's compile time. Here every operand is one view type, a
// column-major map with an outer stride, read as it is or transposed, so a scalar type compiles
// three products (a·b, a·bᵀ, aᵀ·b), whatever the callers hold.
#pragma once

#include <mha/detail/packed_gemm.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cassert>
#include <cstddef>

namespace mha {
namespace detail {

/// Room for the packed blocks of Eigen's products, kept from one product to the next by one
/// thread (in a workspace, or for the tiles of one attention call): a product whose blocks would
/// not fit on the stack (Eigen allocates them on the heap for each product above
/// EIGEN_STACK_ALLOCATION_LIMIT, 128 KiB) packs them here instead, grown when it needs more. Smaller
/// ones stay on the stack, where Eigen puts them.
template <typename Scalar>
struct PackingSpace {
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> lhs, rhs;  ///< aligned as Eigen's own blocks are
};

/// Grows each of the spaces space_of(0) … space_of(count − 1) to the largest blocks any of them
/// holds. After a pass whose products some threads did not get (the tasks go to threads as they
/// come), each thread then has room for any product of the next pass of the same shapes.
template <typename SpaceOf>
void grow_to_largest(std::size_t count, const SpaceOf& space_of) {
  Eigen::Index lhs = 0, rhs = 0;
  for (std::size_t t = 0; t < count; ++t) {
    lhs = std::max(lhs, space_of(t).lhs.size());
    rhs = std::max(rhs, space_of(t).rhs.size());
  }
  for (std::size_t t = 0; t < count; ++t) {
    if (space_of(t).lhs.size() < lhs) space_of(t).lhs.resize(lhs);
    if (space_of(t).rhs.size() < rhs) space_of(t).rhs.resize(rhs);
  }
}

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

/// Where a product packs a block of `size` numbers: into `room` (one of a PackingSpace's, grown to
/// it) when the block is too large for the stack (Eigen's EIGEN_STACK_ALLOCATION_LIMIT) and a room
/// is given, else nullptr: the stack, or a block allocated for the product.
template <typename Scalar>
Scalar* kept_block(Eigen::Matrix<Scalar, Eigen::Dynamic, 1>* room, Eigen::Index size) {
  if (!room || static_cast<std::size_t>(size) * sizeof(Scalar) <= EIGEN_STACK_ALLOCATION_LIMIT) return nullptr;
  if (room->size() < size) room->resize(size);
  return room->data();
}

/// Eigen's blocking of one product (a block of rows, of columns and of the depth), its packed
/// blocks in `space` when they are too large for the stack and a space is given.
template <typename Scalar>
class KeptBlocking : public Eigen::internal::gemm_blocking_space<Eigen::ColMajor, Scalar, Scalar, Eigen::Dynamic,
                                                                 Eigen::Dynamic, Eigen::Dynamic, 1, false> {
  using Base = Eigen::internal::gemm_blocking_space<Eigen::ColMajor, Scalar, Scalar, Eigen::Dynamic, Eigen::Dynamic,
                                                    Eigen::Dynamic, 1, false>;

 public:
  KeptBlocking(Eigen::Index m, Eigen::Index n, Eigen::Index depth, PackingSpace<Scalar>* space)
      : Base(m, n, depth, 1, true) {
    if (Scalar* kept = kept_block(space ? &space->lhs : nullptr, this->mc() * this->kc())) this->m_blockA = kept;
    if (Scalar* kept = kept_block(space ? &space->rhs : nullptr, this->kc() * this->nc())) this->m_blockB = kept;
  }
  /// The space's blocks are its own: the base, which frees the blocks it holds, holds none.
  ~KeptBlocking() { this->m_blockA = this->m_blockB = nullptr; }
  KeptBlocking(const KeptBlocking&) = delete;
  KeptBlocking& operator=(const KeptBlocking&) = delete;
};

/// c = op(a) · op(b), or c += op(a) · op(b) with `accumulate`. c must not overlap a or b. For
/// `=`, c is zeroed and then added to, which is what Eigen's own GEMM does for an assignment.
///
/// When op(a) is one row or op(b) one column it calls Eigen's GEMV. Otherwise, with 32 vector
/// registers (AVX-512), mha's own packed kernel (packed_gemm.hpp: 1.1–1.4x Eigen's there); with
/// 16 (AVX2, SSE2), where Eigen's kernel measured as fast or faster, Eigen's GEMM (packing and the
/// gebp kernel) with Eigen's blocking. Every product runs on the calling thread (mha's threads are
/// its own, and products stay bit-identical for any thread count).
///
/// Eigen's kernels are called directly, through Eigen 3.4's interface that its own BLAS calls:
/// Eigen's product expression compiles, for each of the three forms, those kernels and also its
/// coefficient-based path for tiny products and the expression machinery around them; calling the
/// kernels compiles only them: −3 s and −10 MB of a user's translation unit with g++ -O2.
/// The packed blocks go on the stack when they are small, else into `space` where one is given
/// (PackingSpace), else into blocks allocated for the product.
/// With EIGEN_USE_BLAS, Eigen's specialisations of the same kernels call the BLAS instead.
template <typename Scalar>
void gemm(const Operand<Scalar>& a, const Operand<Scalar>& b, typename Operand<Scalar>::Result c,
          bool accumulate = false, PackingSpace<Scalar>* space = nullptr) {
  using Eigen::ColMajor;
  using Eigen::Index;
  using Eigen::RowMajor;
  namespace internal = Eigen::internal;
  assert(a.op_cols() == b.op_rows() && c.rows() == a.op_rows() && c.cols() == b.op_cols());
  if (!accumulate) {
    // A contiguous c (a tile of scores, one row of them when decoding) is zeroed as one array: as a
    // view with an outer stride, a 1 × 512 row would be zeroed one column, one float, at a time,
    // which cost a decode step with grouped-query attention a fifth of its time.
    if (c.outerStride() == c.rows())
      Eigen::Map<Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>>(c.data(), c.rows(), c.cols()).setZero();
    else
      c.setZero();
  }
  const Index m = c.rows(), n = c.cols(), k = a.op_cols();
  if (m == 0 || n == 0 || k == 0) return;
  using ColMapper = internal::const_blas_data_mapper<Scalar, Index, ColMajor>;
  using RowMapper = internal::const_blas_data_mapper<Scalar, Index, RowMajor>;
  // y += op(x) · v, the GEMV: x stored with `stride`, v with `v_step` between its numbers, y with
  // `y_step`. A stored x is read by the column-major kernel, whose y must be contiguous; a
  // transposed one by the row-major kernel, whose v must be. A strided one is copied to the stack
  // first (Eigen's own product does the same), and a strided y added to afterwards.
  const auto gemv = [](const Operand<Scalar>& x, const Scalar* v, Index v_step, Scalar* y, Index y_step) {
    const Index rows = x.op_rows(), cols = x.op_cols();
    if (!x.transposed) {
      ei_declare_aligned_stack_constructed_variable(Scalar, sum, rows, y_step == 1 ? y : nullptr);
      if (y_step != 1) std::fill_n(sum, rows, Scalar(0));
      internal::general_matrix_vector_product<Index, Scalar, ColMapper, ColMajor, false, Scalar, RowMapper, false>::run(
          rows, cols, ColMapper(x.data, x.stride), RowMapper(v, v_step), sum, 1, Scalar(1));
      if (y_step != 1)
        for (Index i = 0; i < rows; ++i) y[i * y_step] += sum[i];
    } else {
      ei_declare_aligned_stack_constructed_variable(Scalar, packed, cols,
                                                    v_step == 1 ? const_cast<Scalar*>(v) : nullptr);
      if (v_step != 1)
        for (Index j = 0; j < cols; ++j) packed[j] = v[j * v_step];
      internal::general_matrix_vector_product<Index, Scalar, RowMapper, RowMajor, false, Scalar, ColMapper, false>::run(
          rows, cols, RowMapper(x.data, x.stride), ColMapper(packed, 1), y, y_step, Scalar(1));
    }
  };
  // The step between the numbers of op(x)'s first row, and of its first column.
  const auto row_step = [](const Operand<Scalar>& x) { return x.transposed ? Index(1) : x.stride; };
  const auto col_step = [](const Operand<Scalar>& x) { return x.transposed ? x.stride : Index(1); };
  if (n == 1 || m == 1) {  // c's one column is op(a) · op(b)'s; or c's one row, transposed, op(b)ᵀ · op(a)ᵀ
    if (n == 1)
      gemv(a, b.data, col_step(b), c.data(), 1);
    else
      gemv(b.t(), a.data, row_step(a), c.data(), c.outerStride());
    return;
  }
#if defined(EIGEN_VECTORIZE_AVX512) && !defined(EIGEN_USE_BLAS)
  // Under AVX-512 (32 vector registers), mha's own kernel (packed_gemm.hpp), which reads any
  // transposition as it is stored. Its packed blocks as Eigen's: on the stack when small, else in
  // `space`, else allocated for the product.
  {
    // View steps: between rows (down a column), between columns (along a row).
    const packed::View<Scalar> a_view{a.data, col_step(a), row_step(a)}, b_view{b.data, col_step(b), row_step(b)};
    const Index lhs_size = packed::lhs_size<Scalar>(m, k), rhs_size = packed::rhs_size<Scalar>(k, n);
    ei_declare_aligned_stack_constructed_variable(Scalar, lhs, lhs_size,
                                                  kept_block(space ? &space->lhs : nullptr, lhs_size));
    ei_declare_aligned_stack_constructed_variable(Scalar, rhs, rhs_size,
                                                  kept_block(space ? &space->rhs : nullptr, rhs_size));
    packed::multiply(m, n, k, a_view, b_view, c.data(), c.outerStride(), lhs, rhs);
  }
#else
  if (a.transposed && b.transposed) {
    // aᵀ · bᵀ, which no pass needs: (a copy of aᵀ) · bᵀ, so that a fourth product is never compiled
    gemm(operand(Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>(a.stored().transpose())), b, c, true);
    return;
  }
  // Eigen's product, its packed blocks on the stack when they are small, else in `space` (or,
  // without one, in blocks Eigen allocates for it).
  KeptBlocking<Scalar> blocking(m, n, k, space);
  if (a.transposed)
    internal::general_matrix_matrix_product<Index, Scalar, RowMajor, false, Scalar, ColMajor, false, ColMajor, 1>::run(
        m, n, k, a.data, a.stride, b.data, b.stride, c.data(), 1, c.outerStride(), Scalar(1), blocking, nullptr);
  else if (b.transposed)
    internal::general_matrix_matrix_product<Index, Scalar, ColMajor, false, Scalar, RowMajor, false, ColMajor, 1>::run(
        m, n, k, a.data, a.stride, b.data, b.stride, c.data(), 1, c.outerStride(), Scalar(1), blocking, nullptr);
  else
    internal::general_matrix_matrix_product<Index, Scalar, ColMajor, false, Scalar, ColMajor, false, ColMajor, 1>::run(
        m, n, k, a.data, a.stride, b.data, b.stride, c.data(), 1, c.outerStride(), Scalar(1), blocking, nullptr);
#endif
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
