// mha — the one scheduler of the module's matrix products: each product, and each rotation of
// rows by their positions, cut into blocks of rows that run in parallel.
#pragma once

#include <mha/detail/gemm.hpp>
#include <mha/rotary.hpp>
#include <mha/threads.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <functional>
#include <vector>

namespace mha {
namespace detail {

/// The rotation a job turns its output rows by: none, or `rotary` at row r's positions[r].
struct RowRotation {
  const RotaryEmbedding* rotary = nullptr;
  const Eigen::Index* positions = nullptr;
};

/// Independent products and rotations, collected and then run together on mha's threads. Each is
/// cut into blocks of kRows rows of its output, a fixed count, so that every row is computed the
/// same way whatever the thread count (bit-identical results). The operands of a job must outlive
/// run(): they are kept as views (Operand).
template <typename Scalar>
class RowBlockJobs {
 public:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  /// Output rows per job.
  static constexpr Eigen::Index kRows = 256;

  /// out = lhs · rhs (+ bias, a row added to every row), then each row r turned by `rotation`;
  /// with `accumulate`, out += lhs · rhs instead. `out` has its final size already.
  void product(const Operand<Scalar>& lhs, const Operand<Scalar>& rhs, Eigen::Ref<Matrix> out, bool accumulate = false,
               const RowVector* bias = nullptr, RowRotation rotation = {}) {
    if (bias && bias->size() == 0) bias = nullptr;
    flops_ +=
        2.0 * static_cast<double>(out.rows()) * static_cast<double>(out.cols()) * static_cast<double>(lhs.op_cols());
    for (Eigen::Index first = 0; first < out.rows(); first += kRows)
      jobs_.push_back([lhs, rhs, out, first, accumulate, bias, rotation]() mutable {
        const Eigen::Index rows = std::min(kRows, out.rows() - first);
        auto out_rows = out.middleRows(first, rows);
        gemm(lhs.middle_rows(first, rows), rhs, out_rows, accumulate);
        if (bias)  // a loop per column: the bias is O(rows · cols), beside a product's O(rows · cols · depth)
          for (Eigen::Index c = 0; c < out_rows.cols(); ++c) {
            Scalar* column = out_rows.data() + c * out_rows.outerStride();
            for (Eigen::Index r = 0; r < rows; ++r) column[r] += (*bias)(c);
          }
        if (rotation.rotary) rotation.rotary->rotate(out_rows, rotation.positions + first);
      });
  }

  /// Turns the rows of x back by `rotation` (the backward of a rotated product).
  void rotate_back(Eigen::Ref<Matrix> x, RowRotation rotation) {
    for (Eigen::Index first = 0; first < x.rows(); first += kRows)
      jobs_.push_back([x, first, rotation]() mutable {
        const Eigen::Index rows = std::min(kRows, x.rows() - first);
        rotation.rotary->rotate_back(x.middleRows(first, rows), rotation.positions + first);
      });
  }

  /// Runs every job collected so far, in parallel, and empties the list.
  void run() {
    parallel_tasks(
        static_cast<Eigen::Index>(jobs_.size()), flops_, [] { return 0; },
        [&](Eigen::Index t, int) { jobs_[static_cast<std::size_t>(t)](); });
    jobs_.clear();
    flops_ = 0;
  }

 private:
  std::vector<std::function<void()>> jobs_;
  double flops_ = 0;
};

}  // namespace detail
}  // namespace mha
