// Ring attention's forward pass over MPI, timed: run it with mpirun -np P. One float self-attention
// forward of N tokens, h = 8, d_model = 512, causal or full, contiguous or zigzag layout; rank 0
// prints the time of the slowest rank, the compute and the waiting on communication per step, and
// the peak resident memory of each rank.
//
//   mpirun -np 2 bench_ring 16384 causal zigzag [repeats]
#include <mha/distributed/ring_attention.hpp>
#include <mha/mha.hpp>

#include <mpi.h>
#include <sys/resource.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  int rank = 0, P = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  const Eigen::Index N = argc > 1 ? std::atol(argv[1]) : 16384;
  const bool causal = argc > 2 && std::string(argv[2]) == "causal";
  const bool zigzag = argc > 3 && std::string(argv[3]) == "zigzag";
  const int repeats = argc > 4 ? std::atoi(argv[4]) : 2;

  mha::MultiHeadAttentionConfig config;
  config.d_model = 512;
  config.num_heads = 8;
  const mha::MultiHeadAttention<float> module(config);
  const auto layout =
      zigzag ? mha::distributed::SequenceLayout::zigzag(N, P) : mha::distributed::SequenceLayout::contiguous(N, P);
  // Only this rank's rows exist here: the memory measured is the rank's own.
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(layout.rows(rank), 512);
  mha::AttentionOptions options;
  options.causal = causal;
  mha::distributed::RingAttention<float> ring(module, MPI_COMM_WORLD);

  double best = 1e300;
  mha::distributed::RingStatistics stats;
  for (int r = 0; r < repeats; ++r) {
    MPI_Barrier(MPI_COMM_WORLD);
    const double start = MPI_Wtime();
    const Eigen::MatrixXf y = ring.forward(x, layout, options);
    double mine = MPI_Wtime() - start, slowest = 0;
    MPI_Allreduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (slowest < best) {
      best = slowest;
      stats = ring.statistics();
    }
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  std::vector<long> peaks(static_cast<std::size_t>(P));
  long peak = usage.ru_maxrss;  // KiB
  MPI_Gather(&peak, 1, MPI_LONG, peaks.data(), 1, MPI_LONG, 0, MPI_COMM_WORLD);
  // Each rank's per-step compute and wait, printed by rank 0 in rank order.
  std::vector<double> steps(2 * static_cast<std::size_t>(P)), all(steps.size() * static_cast<std::size_t>(P));
  for (std::size_t s = 0; s < stats.steps.size(); ++s) {
    steps[2 * s] = stats.steps[s].compute_seconds;
    steps[2 * s + 1] = stats.steps[s].wait_seconds;
  }
  MPI_Gather(steps.data(), static_cast<int>(steps.size()), MPI_DOUBLE, all.data(), static_cast<int>(steps.size()),
             MPI_DOUBLE, 0, MPI_COMM_WORLD);
  if (rank == 0) {
    std::printf("P = %d, N = %ld, %s, %s: %.3f s (slowest rank, best of %d)\n", P, static_cast<long>(N),
                causal ? "causal" : "full", zigzag ? "zigzag" : "contiguous", best, repeats);
    for (int r = 0; r < P; ++r) {
      std::printf("  rank %d: peak RSS %.0f MiB; per step compute / wait (ms):", r,
                  static_cast<double>(peaks[static_cast<std::size_t>(r)]) / 1024.0);
      for (int s = 0; s < P; ++s)
        std::printf(" %.0f / %.1f", 1e3 * all[static_cast<std::size_t>(r * 2 * P + 2 * s)],
                    1e3 * all[static_cast<std::size_t>(r * 2 * P + 2 * s + 1)]);
      std::printf("\n");
    }
  }
  MPI_Finalize();
  return 0;
}
