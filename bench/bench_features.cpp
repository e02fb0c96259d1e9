// bench_features — what the PyTorch-parity features cost: ragged vs padded batches, masks, returned
// attention weights and dropout. f32, d_model = 512, h = 8 (d_k = d_v = 64), one thread.
//
//   BM_BatchRagged/{full,causal}      forward_batch over B = 8 self-attention sequences of lengths
//                                     64, 128, …, 512, stacked by rows with their true lengths
//   BM_BatchPadded/{full,causal}      the same sequences each padded (zero rows) to 512, as
//                                     PyTorch's (B, S, E) tensor: equal lengths and a B × S
//                                     key_padding_mask (blocked); the padded query rows are
//                                     computed too, as PyTorch computes them
//   BM_Unmasked/N                     forward(x) at N = 512, 2048
//   BM_Masked/N                       forward(x) with an N × N boolean mask, ~50% of the entries
//                                     blocked at random (no tile is wholly blocked: nothing to skip)
//   BM_MaskedBlockSparse/N/band       a mask that blocks whole key tiles: query i sees key j iff
//                                     |i / T − j / T| ≤ band, T = the kernel's key tile (512), so
//                                     the tiles outside the band are skipped
//   BM_Weights/{none,averaged,per_head}/N
//                                     forward vs forward_with_weights, averaged or per head
//   BM_Dropout/{inference,training}/N config.dropout = 0.1; training = options.training
//
// The counter "FLOPS" is the rate of useful flops per call, summed over the sequences b:
//   full:   8·N_b·d² (the Q, K, V and output projections) + 4·L_b·S_b·d (Q_i K_iᵀ and P V_i, all heads),
//   causal: 8·N_b·d² + 2·N_b·(N_b+1)·d (only the unmasked, lower-triangular half of the scores).
// A padded batch counts only its real tokens' work (N_b the true length, not the padded one), so
// BM_BatchRagged and BM_BatchPadded count the same flops for the same useful result, and their
// FLOPS compare the work done to get it. The masks do not change the count (N × N, as unmasked),
// so there FLOPS compares directly with BM_Unmasked (the inverse of the time ratio); the counter
// "visible_fraction" says which share of the scores the mask leaves.
//
//   bench_features --benchmark_out=features.json --benchmark_out_format=json
//                  --benchmark_repetitions=3 --benchmark_report_aggregates_only=true

#include "bench_common.hpp"

#include <mha/mha.hpp>

#include <benchmark/benchmark.h>
#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace {

using mha_bench::random_matrix;

using Matrix = Eigen::MatrixXf;
using BoolMatrix = Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic>;
using Index = Eigen::Index;
constexpr Index kDModel = 512;
constexpr Index kHeads = 8;

/// Useful flops of self-attention over sequences of the given (true) lengths.
double useful_flops(const std::vector<Index>& lengths, bool causal) {
  const double d = static_cast<double>(kDModel);
  double flops = 0;
  for (const Index length : lengths) {
    const double n = static_cast<double>(length);
    flops += 8.0 * n * d * d + (causal ? 2.0 * n * (n + 1.0) * d : 4.0 * n * n * d);
  }
  return flops;
}

void set_flop_counter(benchmark::State& state, double flops) {
  // Shown as e.g. "FLOPS=120.9G/s"; the JSON holds flops per second.
  state.counters["FLOPS"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

mha::MultiHeadAttention<float> make_module(double dropout = 0.0) {
  mha::MultiHeadAttentionConfig config;
  config.d_model = kDModel;
  config.num_heads = kHeads;
  config.dropout = dropout;
  config.seed = 1;
  return mha::MultiHeadAttention<float>(config);
}

/// Self-attention forward(x, options) on N = state.range(0) tokens, with the dense flop counter.
void run_forward(benchmark::State& state, const mha::MultiHeadAttention<float>& attn,
                 const mha::AttentionOptions& options) {
  const Index n = state.range(0);
  const Matrix x = random_matrix(n, kDModel, 2);
  for (auto _ : state) {
    Matrix y = attn.forward(x, options);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_flop_counter(state, useful_flops({n}, false));
}

// ---- 1. Ragged vs padded batches -------------------------------------------------------------

/// The batch: B = 8 sequences of 64, 128, …, 512 tokens (Σ = 2304 of the padded 8 × 512 = 4096).
std::vector<Index> batch_lengths() {
  std::vector<Index> lengths;
  for (Index b = 1; b <= 8; ++b) lengths.push_back(64 * b);
  return lengths;
}

void set_batch_counters(benchmark::State& state, const std::vector<Index>& lengths, Index computed_rows, bool causal) {
  const Index real = std::accumulate(lengths.begin(), lengths.end(), Index(0));
  const Index padded = static_cast<Index>(lengths.size()) * *std::max_element(lengths.begin(), lengths.end());
  set_flop_counter(state, useful_flops(lengths, causal));
  // A property of the batch, the same in both layouts: the share of the padded B × S tokens that
  // are padding. "computed_rows" is how many query rows the call actually projects and attends.
  state.counters["padded_tokens_fraction"] = 1.0 - static_cast<double>(real) / static_cast<double>(padded);
  state.counters["computed_rows"] = static_cast<double>(computed_rows);
}

void BM_BatchRagged(benchmark::State& state, bool causal) {
  const auto attn = make_module();
  const std::vector<Index> lengths = batch_lengths();
  const Matrix x = random_matrix(std::accumulate(lengths.begin(), lengths.end(), Index(0)), kDModel, 2);
  mha::AttentionOptions options;
  options.causal = causal;
  for (auto _ : state) {
    Matrix y = attn.forward_batch(x, x, x, lengths, lengths, options);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_batch_counters(state, lengths, x.rows(), causal);
}

void BM_BatchPadded(benchmark::State& state, bool causal) {
  const auto attn = make_module();
  const std::vector<Index> lengths = batch_lengths();
  const Index batch = static_cast<Index>(lengths.size());
  const Index S = *std::max_element(lengths.begin(), lengths.end());
  const Matrix ragged = random_matrix(std::accumulate(lengths.begin(), lengths.end(), Index(0)), kDModel, 2);
  // The same tokens as BM_BatchRagged, sequence b in rows b·S …, zero rows after its L_b tokens.
  Matrix x = Matrix::Zero(batch * S, kDModel);
  BoolMatrix padding = BoolMatrix::Constant(batch, S, false);  // true = padding (blocked)
  for (Index b = 0, from = 0; b < batch; from += lengths[static_cast<std::size_t>(b)], ++b) {
    const Index length = lengths[static_cast<std::size_t>(b)];
    x.middleRows(b * S, length) = ragged.middleRows(from, length);
    padding.row(b).tail(S - length).setConstant(true);
  }
  const std::vector<Index> padded_lengths(static_cast<std::size_t>(batch), S);
  mha::AttentionOptions options;
  options.causal = causal;
  options.key_padding_mask = mha::AttentionMask::blocked(padding);

  // Honesty check, outside the timing: the real rows of the padded result are the ragged result.
  {
    mha::AttentionOptions ragged_options;
    ragged_options.causal = causal;
    const Matrix expected = attn.forward_batch(ragged, ragged, ragged, lengths, lengths, ragged_options);
    const Matrix got = attn.forward_batch(x, x, x, padded_lengths, padded_lengths, options);
    float worst = 0;
    for (Index b = 0, from = 0; b < batch; from += lengths[static_cast<std::size_t>(b)], ++b) {
      const Index length = lengths[static_cast<std::size_t>(b)];
      worst =
          std::max(worst, (got.middleRows(b * S, length) - expected.middleRows(from, length)).cwiseAbs().maxCoeff());
    }
    if (!(worst <= 1e-4f * std::max(1.0f, expected.cwiseAbs().maxCoeff()))) {
      state.SkipWithError(("padded and ragged results differ by " + std::to_string(worst)).c_str());
      return;
    }
  }

  for (auto _ : state) {
    Matrix y = attn.forward_batch(x, x, x, padded_lengths, padded_lengths, options);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_batch_counters(state, lengths, x.rows(), causal);
}

BENCHMARK_CAPTURE(BM_BatchRagged, full, false)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_BatchPadded, full, false)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_BatchRagged, causal, true)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_BatchPadded, causal, true)->Unit(benchmark::kMillisecond);

// ---- 2. Masks --------------------------------------------------------------------------------

void set_visible_fraction(benchmark::State& state, const BoolMatrix& blocked) {
  state.counters["visible_fraction"] = 1.0 - static_cast<double>(blocked.count()) / static_cast<double>(blocked.size());
}

void BM_Unmasked(benchmark::State& state) {
  run_forward(state, make_module(), {});
  state.counters["visible_fraction"] = 1.0;
}

/// Arg {N}: an N × N mask, each entry blocked with probability 1/2 (fixed seed).
void BM_Masked(benchmark::State& state) {
  const Index n = state.range(0);
  std::mt19937_64 engine(3);
  BoolMatrix blocked(n, n);
  for (Index c = 0; c < n; ++c)
    for (Index r = 0; r < n; ++r) blocked(r, c) = (engine() >> 63) != 0;
  mha::AttentionOptions options;
  options.mask = mha::AttentionMask::blocked(blocked);  // views `blocked`, which outlives the runs
  run_forward(state, make_module(), options);
  set_visible_fraction(state, blocked);
}

/// Args {N, band}: query i sees key j iff their key tiles are at most `band` tiles apart, so every
/// (query block, key tile) pair outside the band is wholly blocked and skipped by the kernel.
void BM_MaskedBlockSparse(benchmark::State& state) {
  const Index n = state.range(0), band = state.range(1);
  const Index tile = mha::detail::kKeyBlock;  // the kernel's key tile; query blocks divide it
  BoolMatrix blocked(n, n);
  for (Index c = 0; c < n; ++c)
    for (Index r = 0; r < n; ++r) blocked(r, c) = std::abs(r / tile - c / tile) > band;
  mha::AttentionOptions options;
  options.mask = mha::AttentionMask::blocked(blocked);
  run_forward(state, make_module(), options);
  set_visible_fraction(state, blocked);
}

BENCHMARK(BM_Unmasked)->ArgName("N")->Arg(512)->Arg(2048)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Masked)->ArgName("N")->Arg(512)->Arg(2048)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_MaskedBlockSparse)
    ->Args({2048, 0})
    ->Args({2048, 1})
    ->ArgNames({"N", "band"})
    ->Unit(benchmark::kMillisecond);

// ---- 3. Returned attention weights -----------------------------------------------------------

enum class Weights { none, averaged, per_head };

void BM_Weights(benchmark::State& state, Weights which) {
  const auto attn = make_module();
  const Index n = state.range(0);
  const Matrix x = random_matrix(n, kDModel, 2);
  for (auto _ : state) {
    if (which == Weights::none) {
      Matrix y = attn.forward(x);
      benchmark::DoNotOptimize(y.data());
    } else {
      auto result = attn.forward_with_weights(
          x, x, x, {}, which == Weights::averaged ? mha::AttentionWeights::averaged : mha::AttentionWeights::per_head);
      benchmark::DoNotOptimize(result.output.data());
      benchmark::DoNotOptimize(result.weights.data());
    }
    benchmark::ClobberMemory();
  }
  set_flop_counter(state, useful_flops({n}, false));
  // The bytes of weights returned per call (h or 1 matrices N × N of float).
  const double matrices = which == Weights::per_head ? kHeads : which == Weights::averaged ? 1 : 0;
  state.counters["weights_bytes"] = benchmark::Counter(matrices * static_cast<double>(n * n) * sizeof(float),
                                                       benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
}

BENCHMARK_CAPTURE(BM_Weights, none, Weights::none)->ArgName("N")->Arg(512)->Arg(2048)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Weights, averaged, Weights::averaged)
    ->ArgName("N")
    ->Arg(512)
    ->Arg(2048)
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Weights, per_head, Weights::per_head)
    ->ArgName("N")
    ->Arg(512)
    ->Arg(2048)
    ->Unit(benchmark::kMillisecond);

// ---- 4. Dropout ------------------------------------------------------------------------------

/// The same module (config.dropout = 0.1) in inference and in training mode.
void BM_Dropout(benchmark::State& state, bool training) {
  mha::AttentionOptions options;
  options.training = training;
  options.dropout_seed = 7;
  run_forward(state, make_module(0.1), options);
}

BENCHMARK_CAPTURE(BM_Dropout, inference, false)->ArgName("N")->Arg(512)->Arg(2048)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Dropout, training, true)->ArgName("N")->Arg(512)->Arg(2048)->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  return mha_bench::run(
      argc, argv, {{"d_model", std::to_string(kDModel)}, {"num_heads", std::to_string(kHeads)}, {"scalar", "float"}});
}
