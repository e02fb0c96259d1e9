// What the benchmark programs share: seeded inputs, and a main() that records the machine and
// pins everything to one thread unless a benchmark says otherwise.
#pragma once

#include <mha/mha.hpp>

#include <benchmark/benchmark.h>
#include <Eigen/Core>

#include <cstdint>
#include <fstream>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace mha_bench {

/// A rows × cols float matrix of numbers uniform in [−1, 1), fixed by the seed.
inline Eigen::MatrixXf random_matrix(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed) {
  std::mt19937_64 engine(seed);
  Eigen::MatrixXf m(rows, cols);
  for (Eigen::Index c = 0; c < cols; ++c)
    for (Eigen::Index r = 0; r < rows; ++r)
      m(r, c) = static_cast<float>(2.0 * static_cast<double>(engine() >> 11) * 0x1.0p-53 - 1.0);
  return m;
}

/// The "model name" line of /proc/cpuinfo, or "" where there is none.
inline std::string cpu_model() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);)
    if (line.rfind("model name", 0) == 0) {
      const auto start = line.find_first_not_of(" \t", line.find(':') + 1);
      return start == std::string::npos ? "" : line.substr(start);
    }
  return "";
}

/// The FMA peak of one core, for scale: independent multiply-adds of Eigen's widest float packet
/// (16 floats with AVX-512, 8 with AVX2, 4 with SSE2) on registers only, kAccumulators chains deep
/// so that the latency of each is hidden (4 cycles × 2 FMA units on current x86 cores need 8). The
/// counter "FLOPS" counts 2 flops per lane per multiply-add. Without FMA (SSE2) pmadd is a multiply
/// and an add, which is that build's peak too.
inline void fma_peak(benchmark::State& state) {
  using Packet = Eigen::internal::packet_traits<float>::type;
  constexpr int kLanes = Eigen::internal::packet_traits<float>::size;
  constexpr int kAccumulators = 12, kSteps = 4096;
  const Packet a = Eigen::internal::pset1<Packet>(0.999999f), b = Eigen::internal::pset1<Packet>(1e-7f);
  Packet acc[kAccumulators];
  for (auto& x : acc) x = Eigen::internal::pset1<Packet>(1.0f);
  for (auto _ : state) {
    for (int step = 0; step < kSteps; ++step) {
#if defined(__GNUC__)
#pragma GCC unroll 12
#endif
      for (int i = 0; i < kAccumulators; ++i) acc[i] = Eigen::internal::pmadd(acc[i], a, b);
    }
    for (auto& x : acc) benchmark::DoNotOptimize(x);
  }
  state.counters["FLOPS"] =
      benchmark::Counter(2.0 * kLanes * kAccumulators * kSteps, benchmark::Counter::kIsIterationInvariantRate,
                         benchmark::Counter::kIs1000);
  state.SetLabel(std::to_string(kLanes) + " floats per packet");
}

/// Runs the registered benchmarks with the CPU model, Eigen's version and SIMD, and `context` in
/// the output's context, on one thread (mha's loops and Eigen's own products).
inline int run(int argc, char** argv, const std::vector<std::pair<std::string, std::string>>& context) {
  const std::string model = cpu_model();
  if (!model.empty()) benchmark::AddCustomContext("cpu_model", model);
  for (const auto& [key, value] : context) benchmark::AddCustomContext(key, value);
  benchmark::AddCustomContext("eigen_version", std::to_string(EIGEN_WORLD_VERSION) + "." +
                                                   std::to_string(EIGEN_MAJOR_VERSION) + "." +
                                                   std::to_string(EIGEN_MINOR_VERSION));
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
  // The widest vector instructions the build uses: Eigen's list names AVX, not AVX2 or FMA, for an
  // AVX2 build (-march=x86-64-v3).
#if defined(__AVX512F__)
  benchmark::AddCustomContext("instruction_set", "AVX-512");
#elif defined(__AVX2__) && defined(__FMA__)
  benchmark::AddCustomContext("instruction_set", "AVX2 + FMA");
#elif defined(__AVX__)
  benchmark::AddCustomContext("instruction_set", "AVX");
#elif defined(__SSE2__)
  benchmark::AddCustomContext("instruction_set", "SSE2");
#endif
#ifdef EIGEN_USE_BLAS
  // mha::blas: the products are the BLAS's (its name from the build, when it gave one).
#ifdef MHA_BENCH_BLAS
  benchmark::AddCustomContext("products", "BLAS (" MHA_BENCH_BLAS ")");
#else
  benchmark::AddCustomContext("products", "BLAS");
#endif
#else
  benchmark::AddCustomContext("products", "Eigen");
#endif
  mha::set_num_threads(1);
  Eigen::setNbThreads(1);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace mha_bench
