// mha — the one scheduler of the module's matrix products: each product, and each rotation of
// rows by their positions, cut into blocks of rows that run in parallel.
#pragma once

#include <mha/rotary.hpp>
#include <mha/threads.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <functional>
#include <type_traits>
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
/// run(): matrices are kept by reference, expressions over them (a transpose) by value.
template <typename Scalar>
class RowBlockJobs {
 public:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  /// Output rows per job.
  static constexpr Eigen::Index kRows = 256;

  /// out = lhs · rhs (+ bias, a row added to every row), then each row r turned by `rotation`;
  /// with `accumulate`, out += lhs · rhs instead. `out` has its final size already.
  template <typename Lhs, typename Rhs>
  void product(const Lhs& lhs, const Rhs& rhs, Eigen::Ref<Matrix> out, bool accumulate = false,
               const RowVector* bias = nullptr, RowRotation rotation = {}) {
    struct Operands {
      Operand<Lhs> lhs;
      Operand<Rhs> rhs;
    };
    if (bias && bias->size() == 0) bias = nullptr;
    flops_ += 2.0 * static_cast<double>(out.rows()) * static_cast<double>(out.cols()) * static_cast<double>(lhs.cols());
    for (Eigen::Index first = 0; first < out.rows(); first += kRows)
      jobs_.push_back([operands = Operands{lhs, rhs}, out, first, accumulate, bias, rotation]() mutable {
        const Eigen::Index rows = std::min(kRows, out.rows() - first);
        auto out_rows = out.middleRows(first, rows);
        const auto product = operands.lhs.middleRows(first, rows) * operands.rhs;
        if (accumulate)
          out_rows.noalias() += product;
        else
          out_rows.noalias() = product;
        if (bias) out_rows.rowwise() += *bias;
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
  /// A matrix by reference, an expression (a transpose, which views a matrix) by value: what a job
  /// keeps of an operand, so that it neither copies a matrix nor outlives a temporary expression.
  template <typename T>
  using Operand = std::conditional_t<std::is_base_of<Eigen::PlainObjectBase<T>, T>::value, const T&, T>;

  std::vector<std::function<void()>> jobs_;
  double flops_ = 0;
};

}  // namespace detail
}  // namespace mha
