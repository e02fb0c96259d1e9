// Ring attention over MPI, timed: run it with mpirun -np P. One float self-attention forward of N
// tokens, h = 8, d_model = 512, causal or full, contiguous or zigzag layout, and with "train" the
// forward recording a tape and the backward after it; rank 0 prints the time of the slowest rank,
// the compute and the waiting on communication per step, and the peak resident memory of each rank;
// with "train", also each rank's wait at the backward's last step in every repeat (the gradient of
// its own block coming home), the first call's apart from the others'.
//
//   mpirun -np 2 bench_ring 16384 causal zigzag [repeats] [train]
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
  const bool train = argc > 5 && std::string(argv[5]) == "train";

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

  // One timed phase: the slowest rank's time (collective).
  const auto slowest = [](double start) {
    double mine = MPI_Wtime() - start, all = 0;
    MPI_Allreduce(&mine, &all, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return all;
  };
  double best = 1e300, best_backward = 0;
  mha::distributed::RingStatistics stats, backward_stats;
  mha::distributed::RingTape<float> tape;
  auto gradients = module.zero_gradients();
  const Eigen::MatrixXf d_output = Eigen::MatrixXf::Random(layout.rows(rank), 512);
  std::vector<double> last_waits;  // this rank's backward's last-step wait, per repeat
  for (int r = 0; r < repeats; ++r) {
    MPI_Barrier(MPI_COMM_WORLD);
    double start = MPI_Wtime();
    const Eigen::MatrixXf y = train ? ring.forward(x, layout, options, tape) : ring.forward(x, layout, options);
    const double forward = slowest(start);
    const mha::distributed::RingStatistics forward_stats = ring.statistics();
    double backward = 0;
    if (train) {
      MPI_Barrier(MPI_COMM_WORLD);
      start = MPI_Wtime();
      ring.backward(tape, d_output, gradients);
      backward = slowest(start);
      last_waits.push_back(ring.statistics().steps.back().wait_seconds);
    }
    if (forward + backward < best + best_backward) {
      best = forward;
      best_backward = backward;
      stats = forward_stats;
      backward_stats = ring.statistics();
    }
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  std::vector<long> peaks(static_cast<std::size_t>(P));
  long peak = usage.ru_maxrss;  // KiB
  MPI_Gather(&peak, 1, MPI_LONG, peaks.data(), 1, MPI_LONG, 0, MPI_COMM_WORLD);
  // Each rank's per-step compute and wait, printed by rank 0 in rank order (collective).
  const auto print_steps = [&](const char* phase, const mha::distributed::RingStatistics& phase_stats) {
    std::vector<double> steps(2 * static_cast<std::size_t>(P)), all(steps.size() * static_cast<std::size_t>(P));
    for (std::size_t s = 0; s < phase_stats.steps.size(); ++s) {
      steps[2 * s] = phase_stats.steps[s].compute_seconds;
      steps[2 * s + 1] = phase_stats.steps[s].wait_seconds;
    }
    MPI_Gather(steps.data(), static_cast<int>(steps.size()), MPI_DOUBLE, all.data(), static_cast<int>(steps.size()),
               MPI_DOUBLE, 0, MPI_COMM_WORLD);
    if (rank != 0) return;
    for (int r = 0; r < P; ++r) {
      std::printf("  rank %d %s: per step compute / wait (ms):", r, phase);
      for (int s = 0; s < P; ++s)
        std::printf(" %.0f / %.1f", 1e3 * all[static_cast<std::size_t>(r * 2 * P + 2 * s)],
                    1e3 * all[static_cast<std::size_t>(r * 2 * P + 2 * s + 1)]);
      std::printf("\n");
    }
  };
  if (rank == 0) {
    std::printf("P = %d, N = %ld, %s, %s: forward %.3f s", P, static_cast<long>(N), causal ? "causal" : "full",
                zigzag ? "zigzag" : "contiguous", best);
    if (train) std::printf(", backward %.3f s, both %.3f s", best_backward, best + best_backward);
    std::printf(" (slowest rank, best of %d)\n", repeats);
    for (int r = 0; r < P; ++r)
      std::printf("  rank %d: peak RSS %.0f MiB\n", r,
                  static_cast<double>(peaks[static_cast<std::size_t>(r)]) / 1024.0);
  }
  print_steps("forward", stats);
  if (train) {
    print_steps("backward", backward_stats);
    std::vector<double> all(last_waits.size() * static_cast<std::size_t>(P));
    MPI_Gather(last_waits.data(), repeats, MPI_DOUBLE, all.data(), repeats, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    for (int r = 0; r < P && rank == 0; ++r) {
      std::printf("  rank %d backward: last step's wait per repeat (ms):", r);
      for (int i = 0; i < repeats; ++i) std::printf(" %.1f", 1e3 * all[static_cast<std::size_t>(r * repeats + i)]);
      std::printf("\n");
    }
  }
  MPI_Finalize();
  return 0;
}
