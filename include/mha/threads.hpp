// mha — how many threads mha's own loops use, and the one loop that uses them.
#pragma once

#include <mha/detail/checks.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <atomic>
#include <exception>
#include <optional>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace mha {
namespace detail {

inline std::atomic<int>& thread_setting() {
  static std::atomic<int> setting{0};  // 0: OpenMP's default
  return setting;
}

}  // namespace detail

namespace detail {

inline void store_thread_setting(int threads) {
  if (threads < 0) fail("set_num_threads: threads must be >= 0 (0 = OpenMP's default), got ", threads);
  thread_setting().store(threads, std::memory_order_relaxed);
}

inline int thread_count() {
#ifdef _OPENMP
  const int setting = thread_setting().load(std::memory_order_relaxed);
  return setting > 0 ? setting : omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace detail

#ifdef MHA_PRECOMPILED
// With mha::precompiled, mha's loops run inside that library, compiled with OpenMP whether or not
// the program's own code is: these two are defined there, so that the program and the library agree.
void set_num_threads(int threads);
int num_threads();
#else
/// Sets how many threads mha's own loops use: the heads × query blocks of attention, the heads of
/// its backward pass, the heads × key parts of a decode step and the row blocks of the projections.
/// 0 restores the default, OpenMP's (OMP_NUM_THREADS, else one per core). Without OpenMP (the code
/// compiled without -fopenmp, and not linking mha::precompiled) mha always runs on the calling
/// thread. Results are bit-identical for every thread count.
inline void set_num_threads(int threads) { detail::store_thread_setting(threads); }

/// \returns the number of threads mha's loops use (1 without OpenMP).
inline int num_threads() { return detail::thread_count(); }
#endif

namespace detail {

/// The largest number of threads a parallel loop called from this thread has run on since this
/// was last set to 0: what a test reads to check that its work really was split.
inline int& largest_team() {
  thread_local int threads = 0;
  return threads;
}

/// The number of the calling thread in the team of the parallel_tasks loop it runs (0 on the calling
/// thread).
inline int& thread_slot() {
  thread_local int slot = 0;
  return slot;
}
/// \returns the number of the calling thread among those of the parallel_tasks loop it runs, 0 …
/// threads − 1 (0 when it runs on the calling thread alone): what a scratch kept across calls, one
/// per thread, is indexed by. Not OpenMP's thread number, which inside a user's own parallel region
/// would be the user's.
inline int thread_index() { return thread_slot(); }

/// Flops below which a thread is not worth starting: about 30 µs of work. Small problems stay on
/// the calling thread, where waking and joining threads would cost more than it saves (and where,
/// on a machine busy with other threads, OpenMP's spinning barriers cost far more).
constexpr double kMinFlopsPerThread = 4e6;

/// Runs task(t, scratch) for t = 0 … count − 1, worth about `flops` in all, on up to num_threads()
/// threads, each with a scratch of its own made by make_scratch(). Every task must write only its
/// own part of the result, so the outcome does not depend on which thread runs which task:
/// bit-identical for any thread count.
///
/// An exception thrown by a task or by make_scratch() (std::bad_alloc, say) must not leave an
/// OpenMP region, where it would call std::terminate: the first one is caught, the tasks not yet
/// started are skipped, and it is rethrown on the calling thread once the region has ended, as
/// the serial loop would have thrown it.
///
/// Eigen's matrix products inside the tasks run serially: every product goes through detail::gemm,
/// which calls Eigen's kernels on the calling thread (no product expression, which Eigen would
/// parallelise outside a region of two or more threads). A loop worth one thread runs on the
/// calling thread without a region; in a region, each thread also sets its own nested thread count
/// to one (this lasts only as long as the region).
template <typename MakeScratch, typename Task>
void parallel_tasks(Eigen::Index count, double flops, const MakeScratch& make_scratch, const Task& task) {
  if (count <= 0) return;
#ifdef _OPENMP
  const auto worth = static_cast<Eigen::Index>(flops / kMinFlopsPerThread);
  const int threads =
      static_cast<int>(std::max<Eigen::Index>(1, std::min<Eigen::Index>({num_threads(), count, worth})));
  largest_team() = std::max(largest_team(), threads);
  if (threads == 1) {
    // On the calling thread: an OpenMP region of one thread would cost a team, which libgomp
    // allocates for each region (a decode step into a cache with room allocates nothing).
    const int slot = std::exchange(thread_slot(), 0);
    try {
      auto scratch = make_scratch();
      for (Eigen::Index t = 0; t < count; ++t) task(t, scratch);
    } catch (...) {
      thread_slot() = slot;
      throw;
    }
    thread_slot() = slot;
    return;
  }
  const int outer_slot = thread_slot();  // the calling thread's, restored after the region
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  const auto keep_first_error = [&] {
#pragma omp critical(mha_parallel_tasks_error)
    if (!error) error = std::current_exception();
    failed.store(true, std::memory_order_relaxed);
  };
#pragma omp parallel num_threads(threads)
  {
    omp_set_num_threads(1);  // the nested thread count of this implicit task only
    thread_slot() = omp_get_thread_num();
    std::optional<decltype(make_scratch())> scratch;
    try {
      scratch.emplace(make_scratch());
    } catch (...) {
      keep_first_error();
    }
    // Every thread reaches the loop, even one whose scratch failed: a work-sharing loop must be
    // met by the whole team.
#pragma omp for schedule(dynamic, 1)
    for (Eigen::Index t = 0; t < count; ++t) {
      if (failed.load(std::memory_order_relaxed)) continue;
      try {
        task(t, *scratch);
      } catch (...) {
        keep_first_error();
      }
    }
  }
  thread_slot() = outer_slot;
  if (error) std::rethrow_exception(error);
#else
  (void)flops;
  largest_team() = std::max(largest_team(), 1);
  thread_slot() = 0;
  auto scratch = make_scratch();
  for (Eigen::Index t = 0; t < count; ++t) task(t, scratch);
#endif
}

}  // namespace detail
}  // namespace mha
