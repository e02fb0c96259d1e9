// bench_forward — the cost of one multi-head self-attention forward pass, f32, d_model = 512,
// for h ∈ {1, 2, 4, 8, 16} heads (d_k = d_v = d_model / h) and N from 64 to 4096 tokens, beside
// the GEMM roof and the literal reference, all in one run. One thread unless a name says threads.
//
//   BM_FmaPeak                     one core's FMA peak: multiply-adds on registers only, the
//                                  limit every rate below is a fraction of
//   BM_GemmRoof/N                  Eigen's (N × 512)·(512 × 512) product: the best rate a dense
//                                  product of this shape reaches here, the roof for the rest
//   BM_ProjectionBlocks/N/mha      the same product in the projections' 256-row blocks, through
//                                  Eigen's product (mha:0) and through mha's detail::gemm (mha:1)
//   BM_MultiHeadAttention/h/N      mha::MultiHeadAttention<float>::forward(x)
//   BM_MultiHeadAttentionCausal    the same with AttentionOptions::causal
//   BM_MultiHeadAttentionWorkspace(Causal)/h/N  forward(x, y, workspace, options): into the same
//                                  output and workspace at every iteration, allocating nothing;
//                                  the forwards' counter "faults" is the page faults per forward
//   BM_MultiHeadAttentionThreads   h = 8, N = 1024, 2048, 4096 on 1 and 2 threads (wall clock)
//   BM_Attention/h/N               the attention alone: mha::scaled_dot_product_attention of each
//                                  of h heads (d_k = 512 / h) of given Q, K, V, no projections
//   BM_AttentionCausal/h/N         the same, causal
//   BM_TileExponentials/eigen      the exponentials of one 256 × 512 tile of scores, column by
//                                  column, as the attention takes them (eigen:0, mha's own exp) and
//                                  as Eigen's flushed exp takes them (eigen:1); per_number is the time of one
//   BM_Reference/h/N               the literal reference (tests/reference/reference_attention.hpp):
//                                  per-head products, the full N × N score matrix, a scalar softmax
//
// The counter "FLOPS" is the rate of useful flops per forward pass,
//   full:   8·N·d² (the Q, K, V and output projections) + 4·N²·d (Q_i K_iᵀ and P V_i, all heads),
//   causal: 8·N·d² + 2·N·(N+1)·d (only the unmasked, lower-triangular half of the scores),
// whatever the implementation actually computes; for BM_Attention(Causal) only the second term.
//
//   bench_forward --benchmark_out=bench.json --benchmark_out_format=json
//                 --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
//                 --benchmark_enable_random_interleaving=true
//   python3 bench/summarize.py bench.json
// Random interleaving runs the repetitions of all cases in shuffled order, so that a load that comes
// and goes on a shared machine spreads over every case instead of skewing a few.

#include "bench_common.hpp"

#include <mha/mha.hpp>
#include <reference/reference_attention.hpp>

#include <benchmark/benchmark.h>
#include <Eigen/Core>

#include <cstdint>
#include <fstream>
#if defined(__unix__) || defined(__APPLE__)
#include <sys/resource.h>
#endif
#include <random>
#include <string>

namespace {

using mha_bench::random_matrix;

using Matrix = Eigen::MatrixXf;
constexpr Eigen::Index kDModel = 512;

/// Useful flops of the attention of all heads over n tokens of width d: Q_i K_iᵀ and P V_i.
double attention_flops(double n, double d, bool causal) { return causal ? 2.0 * n * (n + 1.0) * d : 4.0 * n * n * d; }

/// Useful flops of one self-attention forward pass over n tokens of width d: the projections too.
double useful_flops(double n, double d, bool causal) { return 8.0 * n * d * d + attention_flops(n, d, causal); }

mha::MultiHeadAttention<float> make_module(const benchmark::State& state) {
  mha::MultiHeadAttentionConfig config;
  config.d_model = kDModel;
  config.num_heads = state.range(0);
  config.seed = 1;
  return mha::MultiHeadAttention<float>(config);
}

/// The minor page faults of the process so far (0 where getrusage is missing).
long minor_page_faults() {
#if defined(__unix__) || defined(__APPLE__)
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
#else
  return 0;
#endif
}

void set_flop_counter(benchmark::State& state, bool causal) {
  const double n = static_cast<double>(state.range(1)), d = static_cast<double>(kDModel);
  // Shown as e.g. "FLOPS=120.9G/s"; the JSON holds flops per second.
  state.counters["FLOPS"] = benchmark::Counter(
      useful_flops(n, d, causal), benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

/// forward(x, options) returning a new matrix each time, or, with `workspace`, into one output and
/// one workspace kept from an iteration to the next.
void run_library(benchmark::State& state, bool causal, bool workspace = false) {
  const auto attn = make_module(state);
  const Matrix x = random_matrix(state.range(1), kDModel, 2);
  mha::AttentionOptions options;
  options.causal = causal;
  Matrix kept;
  mha::ForwardWorkspace<float> work;
  if (workspace) attn.forward(x, kept, work, options);  // the first forward sizes them: not timed
  const long faults_before = minor_page_faults();
  for (auto _ : state) {
    if (workspace) {
      attn.forward(x, kept, work, options);
      benchmark::DoNotOptimize(kept.data());
    } else {
      Matrix y = attn.forward(x, options);
      benchmark::DoNotOptimize(y.data());
    }
    benchmark::ClobberMemory();
  }
  set_flop_counter(state, causal);
  // Pages the system mapped afresh for the process, per forward: the memory a forward allocates and
  // frees again goes back to the system when the allocator trims its heap, and comes back faulting.
  state.counters["faults"] =
      benchmark::Counter(static_cast<double>(minor_page_faults() - faults_before), benchmark::Counter::kAvgIterations);
}

void BM_MultiHeadAttention(benchmark::State& state) { run_library(state, false); }
void BM_MultiHeadAttentionCausal(benchmark::State& state) { run_library(state, true); }
void BM_MultiHeadAttentionWorkspace(benchmark::State& state) { run_library(state, false, true); }
void BM_MultiHeadAttentionWorkspaceCausal(benchmark::State& state) { run_library(state, true, true); }

/// Args {h, N, threads}: the library on `threads` threads.
void BM_MultiHeadAttentionThreads(benchmark::State& state) {
  mha::set_num_threads(static_cast<int>(state.range(2)));
  run_library(state, false);
  mha::set_num_threads(1);
}

/// Args {h, N}: the attention of h heads of d_k = 512 / h on N × 512 queries, keys and values.
/// Each head's result is copied into its columns of `out`: 1% of the time at h = 8, N = 1024.
void run_attention(benchmark::State& state, bool causal) {
  const Eigen::Index h = state.range(0), n = state.range(1), d_k = kDModel / h;
  const Matrix q = random_matrix(n, kDModel, 2), k = random_matrix(n, kDModel, 3), v = random_matrix(n, kDModel, 4);
  Matrix out(n, kDModel);
  mha::AttentionOptions options;
  options.causal = causal;
  for (auto _ : state) {
    for (Eigen::Index i = 0; i < h; ++i)
      out.middleCols(i * d_k, d_k) = mha::scaled_dot_product_attention(
          q.middleCols(i * d_k, d_k), k.middleCols(i * d_k, d_k), v.middleCols(i * d_k, d_k), options);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["FLOPS"] =
      benchmark::Counter(attention_flops(static_cast<double>(n), static_cast<double>(kDModel), causal),
                         benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

void BM_Attention(benchmark::State& state) { run_attention(state, false); }
void BM_AttentionCausal(benchmark::State& state) { run_attention(state, true); }

/// Arg {eigen}: exp(s − shift) over each column of a kQueryBlock × kKeyBlock tile of scores in
/// [−30, 0], through detail::exp_minus (0) or Eigen's flushed exp, detail::exp_minus_into (1). Each
/// iteration restores the tile first (a copy both variants pay, 0.1 ns a number here).
void BM_TileExponentials(benchmark::State& state) {
  using Column = Eigen::Array<float, Eigen::Dynamic, 1>;
  const Eigen::Index rows = mha::detail::kQueryBlock, cols = mha::detail::kKeyBlock;
  const Matrix scores = 15 * (random_matrix(rows, cols, 4).array() - 1).matrix();
  const Column shift = 0.1f * random_matrix(rows, 1, 5).array();
  Matrix tile(rows, cols);
  for (auto _ : state) {
    tile = scores;
    for (Eigen::Index j = 0; j < cols; ++j) {
      if (state.range(0) == 0) {
        mha::detail::exp_minus(tile.col(j).data(), rows, shift.data(), true);
      } else {
        Eigen::Map<Column> column(tile.col(j).data(), rows);
        mha::detail::exp_minus_into(column, shift, true);
      }
    }
    benchmark::DoNotOptimize(tile.data());
    benchmark::ClobberMemory();
  }
  state.counters["per_number"] = benchmark::Counter(
      static_cast<double>(rows * cols), benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert,
      benchmark::Counter::kIs1000);
}

/// Args {N, mha}: x · W (x of N × 512, W of 512 × 512) in the blocks of RowBlockJobs::kRows rows that
/// each projection multiplies, through Eigen's product of each block (mha:0) or through mha's
/// detail::gemm (mha:1: under AVX-512 mha's packed kernel, else Eigen's kernel), in the same run.
void BM_ProjectionBlocks(benchmark::State& state) {
  const Eigen::Index n = state.range(0), rows = mha::detail::RowBlockJobs<float>::kRows;
  const Matrix x = random_matrix(n, kDModel, 2), w = random_matrix(kDModel, kDModel, 3);
  Matrix y(n, kDModel);
  for (auto _ : state) {
    for (Eigen::Index first = 0; first < n; first += rows) {
      const Eigen::Index count = std::min(rows, n - first);
      if (state.range(1) == 0)
        y.middleRows(first, count).noalias() = x.middleRows(first, count) * w;
      else
        mha::detail::gemm(mha::detail::operand(x.middleRows(first, count)), mha::detail::operand(w),
                          y.middleRows(first, count));
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["FLOPS"] =
      benchmark::Counter(2.0 * static_cast<double>(n) * kDModel * kDModel,
                         benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

/// Arg {N}: x · W with x of N × 512 and W of 512 × 512, the shape of each projection.
void BM_GemmRoof(benchmark::State& state) {
  const Matrix x = random_matrix(state.range(0), kDModel, 2), w = random_matrix(kDModel, kDModel, 3);
  Matrix y(state.range(0), kDModel);
  for (auto _ : state) {
    y.noalias() = x * w;
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["FLOPS"] =
      benchmark::Counter(2.0 * static_cast<double>(state.range(0)) * kDModel * kDModel,
                         benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

void BM_Reference(benchmark::State& state) {
  const auto attn = make_module(state);
  const Matrix x = random_matrix(state.range(1), kDModel, 2);
  for (auto _ : state) {
    Matrix y = mha_reference::multi_head_attention(attn, x, x, x, /*causal=*/false);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_flop_counter(state, false);
}

constexpr int kHeads[] = {1, 2, 4, 8, 16};

/// {h, N} for every h and each N in `lengths`, N outermost.
template <int... lengths>
void grid(benchmark::internal::Benchmark* b) {
  for (int n : {lengths...})
    for (int h : kHeads) b->Args({h, n});
}

BENCHMARK(mha_bench::fma_peak)->Name("BM_FmaPeak");
BENCHMARK(BM_GemmRoof)
    ->ArgName("N")
    ->Arg(16)
    ->Arg(64)
    ->Arg(128)
    ->Arg(256)
    ->Arg(512)
    ->Arg(1024)
    ->Arg(2048)
    ->Arg(4096)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ProjectionBlocks)
    ->ArgsProduct({{256, 1024, 4096}, {0, 1}})
    ->ArgNames({"N", "mha"})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_MultiHeadAttention)
    ->Apply(grid<16, 64, 128, 256, 512, 1024, 2048, 4096>)
    ->ArgNames({"h", "N"})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_MultiHeadAttentionCausal)
    ->Apply(grid<16, 64, 128, 256, 512, 1024, 2048, 4096>)
    ->ArgNames({"h", "N"})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_MultiHeadAttentionWorkspace)
    ->ArgsProduct({{1, 8}, {16, 256, 1024, 4096}})
    ->ArgNames({"h", "N"})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_MultiHeadAttentionWorkspaceCausal)
    ->ArgsProduct({{1, 8}, {16, 256, 1024, 4096}})
    ->ArgNames({"h", "N"})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_MultiHeadAttentionThreads)
    ->Args({8, 1024, 1})
    ->Args({8, 1024, 2})
    ->Args({8, 2048, 1})
    ->Args({8, 2048, 2})
    ->Args({8, 4096, 1})
    ->Args({8, 4096, 2})
    ->ArgNames({"h", "N", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Attention)
    ->ArgsProduct({{1, 8}, {256, 1024, 2048, 4096}})
    ->ArgNames({"h", "N"})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_AttentionCausal)
    ->ArgsProduct({{1, 8}, {256, 1024, 2048, 4096}})
    ->ArgNames({"h", "N"})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_TileExponentials)->ArgName("eigen")->Arg(0)->Arg(1);
BENCHMARK(BM_Reference)->Apply(grid<64, 512>)->ArgNames({"h", "N"})->Unit(benchmark::kMillisecond);
// One forward pass of the reference at N = 2048 takes up to seconds: one iteration per repetition.
BENCHMARK(BM_Reference)->Apply(grid<2048>)->ArgNames({"h", "N"})->Iterations(1)->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  return mha_bench::run(argc, argv, {{"d_model", std::to_string(kDModel)}, {"scalar", "float"}});
}
