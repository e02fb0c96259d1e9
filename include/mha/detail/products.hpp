// mha — the one scheduler of the module's matrix products: each product, and each rotation of
// rows by their positions, cut into blocks of rows that run in parallel.
#pragma once

#include <mha/detail/gemm.hpp>
#include <mha/rotary.hpp>
#include <mha/threads.hpp>

#include <Eigen/Core>

#include <algorithm>
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
/// run(): they are kept as views (Operand). Collecting the jobs of a decode step (a handful) does
/// not allocate: they are plain values, the first kInline of them kept in the object itself.
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
      add({true, lhs, rhs, out.data(), out.rows(), out.cols(), out.outerStride(), first, accumulate, bias, rotation});
  }

  /// Turns the rows of x back by `rotation` (the backward of a rotated product).
  void rotate_back(Eigen::Ref<Matrix> x, RowRotation rotation) {
    for (Eigen::Index first = 0; first < x.rows(); first += kRows)
      add({false, {}, {}, x.data(), x.rows(), x.cols(), x.outerStride(), first, false, nullptr, rotation});
  }

  /// Jobs that keep their memory (a workspace's): the list's, and each thread's room for the packed
  /// blocks of its products (PackingSpace), from one run to the next. Without, a product's large
  /// blocks are Eigen's to allocate, as they would be in a list made for one run.
  explicit RowBlockJobs(bool keep_packing = false) : keep_packing_(keep_packing) {}

  /// Runs every job collected so far, in parallel, and empties the list.
  void run() {
    if (keep_packing_ && packing_.size() < static_cast<std::size_t>(thread_count()))
      packing_.resize(static_cast<std::size_t>(thread_count()));
    parallel_tasks(
        count_, flops_, [] { return 0; },
        [&](Eigen::Index t, int) {
          run(job(t), keep_packing_ ? &packing_[static_cast<std::size_t>(thread_index())] : nullptr);
        });
    if (keep_packing_)
      grow_to_largest(packing_.size(), [&](std::size_t t) -> PackingSpace<Scalar>& { return packing_[t]; });
    count_ = 0;
    more_.clear();
    flops_ = 0;
  }

  /// \returns the numbers its threads' packing space holds.
  Eigen::Index packing_size() const {
    Eigen::Index size = 0;
    for (const PackingSpace<Scalar>& space : packing_) size += space.lhs.size() + space.rhs.size();
    return size;
  }

 private:
  /// A product's block of output rows, or a block of rows to turn back.
  struct Job {
    bool product;
    Operand<Scalar> lhs, rhs;
    Scalar* out;
    Eigen::Index out_rows, out_cols, out_stride, first;
    bool accumulate;
    const RowVector* bias;
    RowRotation rotation;
  };
  static constexpr Eigen::Index kInline = 8;

  void add(const Job& job) {
    if (count_ < kInline)
      inline_[count_] = job;
    else
      more_.push_back(job);
    ++count_;
  }
  const Job& job(Eigen::Index t) const {
    return t < kInline ? inline_[t] : more_[static_cast<std::size_t>(t - kInline)];
  }

  static void run(const Job& job, PackingSpace<Scalar>* packing) {
    using Map = Eigen::Map<Matrix, 0, Eigen::OuterStride<>>;
    const Eigen::Index rows = std::min(kRows, job.out_rows - job.first);
    Map out_rows(job.out + job.first, rows, job.out_cols, Eigen::OuterStride<>(job.out_stride));
    if (!job.product) {
      job.rotation.rotary->rotate_back(out_rows, job.rotation.positions + job.first);
      return;
    }
    gemm(job.lhs.middle_rows(job.first, rows), job.rhs, out_rows, job.accumulate, packing);
    if (job.bias)  // a loop per column: the bias is O(rows · cols), beside a product's O(rows · cols · depth)
      for (Eigen::Index c = 0; c < out_rows.cols(); ++c) {
        Scalar* column = out_rows.data() + c * out_rows.outerStride();
        for (Eigen::Index r = 0; r < rows; ++r) column[r] += (*job.bias)(c);
      }
    if (job.rotation.rotary) job.rotation.rotary->rotate(out_rows, job.rotation.positions + job.first);
  }

  Job inline_[kInline] = {};
  std::vector<Job> more_;
  bool keep_packing_;
  std::vector<PackingSpace<Scalar>> packing_;  ///< by thread_index(), when keep_packing_
  Eigen::Index count_ = 0;
  double flops_ = 0;
};

}  // namespace detail
}  // namespace mha
