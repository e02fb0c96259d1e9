// bench_training — the cost of training multi-head self-attention: one forward pass recording a
// tape and its backward pass, beside the inference forward pass, f32, d_model = 512, h = 8, in one
// run. One thread unless a name says threads.
//
//   BM_Forward/h/N/causal          mha::MultiHeadAttention<float>::forward(x): inference
//   BM_ForwardTape/h/N/causal      forward(x, options, tape): what training runs forward
//   BM_Backward/h/N/causal         backward(tape, d_output, gradients), the tape recorded once
//   BM_BackwardThreads/h/N/causal/threads   the same on 1 and 2 threads (wall-clock time)
//
// "FLOPS" counts useful flops: the forward's 8·N·d² + 4·N²·d (causal: 2·N·(N+1)·d for the
// attention), the backward's 16·N·d² (each projection's input and weight gradient) + 10·N²·d
// (five products per tile: Q Kᵀ again, dO Vᵀ, Pᵀ dO, dSᵀ Q, dS K; causal: 5·N·(N+1)·d). The ratio
// the README quotes is backward time ÷ inference forward time (FlashAttention-2 reports ≈ 2.5 in
// flops).
//
//   bench_training --benchmark_out=training.json --benchmark_out_format=json
//                  --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
//                  --benchmark_enable_random_interleaving=true

#include "bench_common.hpp"

#include <mha/mha.hpp>

#include <benchmark/benchmark.h>
#include <Eigen/Core>

#include <string>

namespace {

using mha_bench::random_matrix;
using Matrix = Eigen::MatrixXf;
constexpr Eigen::Index kDModel = 512;

double attention_flops(double n, double d, bool causal) { return causal ? 2.0 * n * (n + 1.0) * d : 4.0 * n * n * d; }

/// Useful flops of the forward pass (backward = false) or of the backward pass.
double useful_flops(const benchmark::State& state, bool backward) {
  const double n = static_cast<double>(state.range(1)), d = static_cast<double>(kDModel);
  const bool causal = state.range(2) != 0;
  return backward ? 16.0 * n * d * d + 2.5 * attention_flops(n, d, causal)
                  : 8.0 * n * d * d + attention_flops(n, d, causal);
}

void set_flop_counter(benchmark::State& state, bool backward) {
  state.counters["FLOPS"] = benchmark::Counter(
      useful_flops(state, backward), benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

/// The module, input, upstream gradient and options of args {h, N, causal}.
struct Setup {
  explicit Setup(const benchmark::State& state)
      : attn(config(state.range(0))),
        x(random_matrix(state.range(1), kDModel, 2)),
        d_output(random_matrix(state.range(1), kDModel, 3)) {
    options.causal = state.range(2) != 0;
  }
  static mha::MultiHeadAttentionConfig config(Eigen::Index heads) {
    mha::MultiHeadAttentionConfig c;
    c.d_model = kDModel;
    c.num_heads = heads;
    c.seed = 1;
    return c;
  }
  mha::MultiHeadAttention<float> attn;
  Matrix x, d_output;
  mha::AttentionOptions options;
};

void BM_Forward(benchmark::State& state) {
  const Setup s(state);
  for (auto _ : state) {
    Matrix y = s.attn.forward(s.x, s.options);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_flop_counter(state, false);
}

void BM_ForwardTape(benchmark::State& state) {
  const Setup s(state);
  mha::Tape<float> tape;
  for (auto _ : state) {
    Matrix y = s.attn.forward(s.x, s.options, tape);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["tape_MiB"] = static_cast<double>(tape.bytes()) / (1 << 20);
  set_flop_counter(state, false);
}

void run_backward(benchmark::State& state) {
  const Setup s(state);
  mha::Tape<float> tape;
  s.attn.forward(s.x, s.options, tape);
  auto gradients = s.attn.zero_gradients();
  for (auto _ : state) {
    auto d = s.attn.backward(tape, s.d_output, gradients);
    benchmark::DoNotOptimize(d.query.data());
    benchmark::ClobberMemory();
  }
  set_flop_counter(state, true);
}

void BM_Backward(benchmark::State& state) { run_backward(state); }

void BM_BackwardThreads(benchmark::State& state) {
  mha::set_num_threads(static_cast<int>(state.range(3)));
  run_backward(state);
  mha::set_num_threads(1);
}

void BM_ForwardThreads(benchmark::State& state) {
  mha::set_num_threads(static_cast<int>(state.range(3)));
  BM_Forward(state);
  mha::set_num_threads(1);
}

void grid(benchmark::internal::Benchmark* b) {
  for (int n : {1024, 4096})
    for (int causal : {0, 1}) b->Args({8, n, causal});
  b->Args({1, 1024, 0});
}

BENCHMARK(BM_Forward)->Apply(grid)->ArgNames({"h", "N", "causal"})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ForwardTape)->Apply(grid)->ArgNames({"h", "N", "causal"})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Backward)->Apply(grid)->ArgNames({"h", "N", "causal"})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ForwardThreads)
    ->Args({8, 4096, 0, 1})
    ->Args({8, 4096, 0, 2})
    ->ArgNames({"h", "N", "causal", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_BackwardThreads)
    ->Args({8, 4096, 0, 1})
    ->Args({8, 4096, 0, 2})
    ->ArgNames({"h", "N", "causal", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  return mha_bench::run(argc, argv, {{"d_model", std::to_string(kDModel)}, {"scalar", "float"}});
}
