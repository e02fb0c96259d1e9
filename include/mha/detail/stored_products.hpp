// mha — the products of a decode step's few rows with weights stored as bfloat16 or half
// (DecodeWeights): each column of a weight matrix read once per row, converted in registers.
#pragma once

#include <mha/detail/cache_reads.hpp>
#include <mha/threads.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <initializer_list>

namespace mha {
namespace detail {

/// The most rows a decode step multiplies by stored weights column by column. A longer step (a
/// prompt) is bound by flops, not by the bytes of the weights: it converts them and runs the
/// module's products.
constexpr Eigen::Index kStoredProductRows = 8;

/// The columns of a weight matrix one task of stored_products computes, for one row.
constexpr Eigen::Index kStoredColumns = 64;

/// One product of stored_products: out = x · w (+ bias, unless it is empty), w stored column-major,
/// so that each of its columns is contiguous. `out` has its final size already.
template <typename Scalar, typename Storage>
struct StoredProduct {
  const Eigen::Matrix<Storage, Eigen::Dynamic, Eigen::Dynamic>* w;
  const Eigen::Matrix<Scalar, 1, Eigen::Dynamic>* bias;
  Matrix<Scalar>* out;
};

/// What stored_products works in: kept by the decode workspace, so that a step allocates nothing.
template <typename Scalar>
struct StoredProductScratch {
  Column<Scalar> rows;     ///< x's rows, each contiguous
  Column<Scalar> results;  ///< each product's outputs, each row's contiguous
};

/// The products x · w_p (+ bias_p) of the few rows of x (≤ kStoredProductRows) with each stored
/// weight matrix: output (r, c) is row r of x dotted with column c of w_p, computed by dot_rows
/// (four columns at a time, each a sum of packets in a fixed order), so the result does not depend
/// on how the tasks, kStoredColumns columns of one row of one product each, fall to the threads.
template <typename Scalar, typename Storage, typename Rows>
void stored_products(const Rows& x, std::initializer_list<StoredProduct<Scalar, Storage>> products,
                     StoredProductScratch<Scalar>& scratch) {
  using Index = Eigen::Index;
  const Index rows = x.rows(), depth = x.cols();
  reserve(scratch.rows, depth * rows);
  Eigen::Map<Matrix<Scalar>>(scratch.rows.data(), depth, rows) = x.transpose();
  Index results = 0, tasks = 0;
  for (const StoredProduct<Scalar, Storage>& p : products) {
    assert(p.w->rows() == depth && p.out->rows() == rows && p.out->cols() == p.w->cols());
    results += rows * p.w->cols();
    tasks += rows * ((p.w->cols() + kStoredColumns - 1) / kStoredColumns);
  }
  reserve(scratch.results, results);
  const auto no_scratch = [] { return nullptr; };
  parallel_tasks(
      tasks, 2.0 * static_cast<double>(depth) * static_cast<double>(results), no_scratch, [&](Index t, std::nullptr_t) {
        // Task t: product p, row r, columns first … first + kStoredColumns − 1.
        Index offset = 0;
        for (const StoredProduct<Scalar, Storage>& p : products) {
          const Index cols = p.w->cols(), chunks = (cols + kStoredColumns - 1) / kStoredColumns;
          if (t >= rows * chunks) {
            t -= rows * chunks;
            offset += rows * cols;
            continue;
          }
          const Index r = t / chunks, first = t % chunks * kStoredColumns;
          dot_rows(scratch.rows.data() + r * depth, p.w->data() + first * depth, std::min(kStoredColumns, cols - first),
                   depth, scratch.results.data() + offset + r * cols + first, false);
          return;
        }
      });
  Index offset = 0;
  for (const StoredProduct<Scalar, Storage>& p : products) {
    const Index cols = p.w->cols();
    *p.out = Eigen::Map<const Matrix<Scalar>>(scratch.results.data() + offset, cols, rows).transpose();
    if (p.bias->size() > 0) p.out->rowwise() += *p.bias;
    offset += rows * cols;
  }
}

}  // namespace detail
}  // namespace mha
