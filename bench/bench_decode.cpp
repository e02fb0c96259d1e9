// bench_decode — the cost of generating tokens one at a time with a key/value cache, f32, d_model =
// 512, h = 8 (d_k = d_v = 64), causal self-attention, in one run. One thread unless a name says
// threads.
//
//   BM_GenerateCached/tokens           1024 tokens from an empty cache, one decode(x_t) per token
//   BM_GenerateRecompute/tokens        the same 1024 outputs without a cache: at step t the full causal
//                                      forward over tokens 0 … t, as a decoder without a cache must
//                                      (one iteration per repetition: it takes seconds)
//   BM_DecodeStep/h_kv/cache           one decode step over a cache of `cache` tokens (the cache
//                                      filled before the timing, truncated back after each step),
//                                      h_kv = 8 (multi-head), 2 (grouped-query), 1 (multi-query)
//   BM_DecodeStepStorage/h_kv/cache/storage   one decode step over a cache of float (storage 0),
//                                      bfloat16 (1) or half (2), caches of 1k to 32k tokens; and
//                                      with the projection weights rounded too (make_decode_weights):
//                                      bfloat16 cache and weights (3), half cache and weights (4)
//   BM_DecodeStepThreads/h_kv/cache/threads   the same, h_kv = 8, on 1 and 2 threads (wall clock)
//   BM_DecodeAttention/h_kv/cache/storage     the attention alone of one decode step (one query per
//                                      head over the cached keys and values, no projection)
//   BM_StreamRead/bytes                a vectorised sum over a float buffer of `bytes` bytes: the
//                                      rate one core reads at from a buffer of that size, in this
//                                      run, beside which the decode cases' bytes_per_second read
//                                      (the buffer sizes are those of the caches above)
//
// The model is one attention layer, so the token fed at step t is simply row t of a fixed random
// matrix, not the embedding of what step t − 1 chose. Both generations produce the same 1024 output
// rows (decode's rows equal the causal forward's: tested in tests/).
//
// Counters:
//   tokens_per_second  generated tokens per second (the generation cases)
//   FLOPS              useful flops per second. A decode step at position p (p tokens cached)
//                      costs 2·d·(h·d_k) + 2·d·(2·h_kv·d_k) + 2·(h·d_v)·d for the four projections of
//                      one row and 4·(p + 1)·d for its query against p + 1 keys; a cached generation
//                      of T tokens adds these up, which for h_kv = h is exactly the causal forward of T
//                      tokens, 8·T·d² + 2·T·(T+1)·d. The recompute case counts the flops of the
//                      forward passes it does run, Σ_{n=1…T} 8·n·d² + 2·n·(n+1)·d: its rate is
//                      comparable with bench_forward's, its waste is in the time.
//   bytes_per_second   (decode steps) the bytes a step must read at least, the projection matrices
//                      (4 B × d·(2·h·d_k + 2·h_kv·d_k)) and the cached keys and values
//                      (4 B × (p + 1)·h_kv·2·d_k), per second: one token is a matrix-vector
//                      product, bound by memory, not by flops.
//                      BM_DecodeAttention counts only the cached keys and values, cache tokens of
//                      2·h_kv·d_k numbers each, and BM_StreamRead its buffer.
//   cache_MiB          cache.bytes() / 2^20: the cache made with room for exactly `cache` + 1 tokens
//
// The cache is filled before the timing with random keys and values appended after one decoded
// token (a prefill of 32k tokens through decode would take most of the run); a step's time does not
// depend on the numbers cached.
//
//   bench_decode --benchmark_out=decode.json --benchmark_out_format=json
//                --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
//                --benchmark_enable_random_interleaving=true
//   python3 bench/plot_decode.py decode.json --out decode.png --summary decode_summary.md

#include "bench_common.hpp"

#include <mha/mha.hpp>

#include <benchmark/benchmark.h>
#include <Eigen/Core>

#include <cstdint>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using mha_bench::random_matrix;
using Matrix = Eigen::MatrixXf;
using Index = Eigen::Index;

constexpr Index kDModel = 512;
constexpr Index kHeads = 8;
constexpr Index kHeadWidth = kDModel / kHeads;  // d_k = d_v = 64

mha::MultiHeadAttention<float> make_module(Index kv_heads) {
  mha::MultiHeadAttentionConfig config;
  config.d_model = kDModel;
  config.num_heads = kHeads;
  config.num_kv_heads = kv_heads;
  config.seed = 1;
  return mha::MultiHeadAttention<float>(config);
}

/// Useful flops of one decode step whose token sits at position p (p tokens already cached).
double step_flops(double p, double kv_heads) {
  const double d = kDModel, q_width = kHeads * kHeadWidth, kv_width = kv_heads * kHeadWidth;
  return 2.0 * d * q_width + 4.0 * d * kv_width + 2.0 * q_width * d + 4.0 * (p + 1.0) * q_width;
}

/// Bytes a decode step at position p must read: the four projection matrices (numbers of `weight`
/// bytes) and p + 1 cached keys and values of `stored` bytes each.
double step_bytes(double p, double kv_heads, double stored = sizeof(float), double weight = sizeof(float)) {
  const double d = kDModel, q_width = kHeads * kHeadWidth, kv_width = kv_heads * kHeadWidth;
  return weight * (2.0 * d * q_width + 2.0 * d * kv_width) + stored * (p + 1.0) * 2.0 * kv_width;
}

/// Useful flops of the causal forward pass over n tokens (bench_forward's formula).
double forward_flops(double n) {
  const double d = kDModel;
  return 8.0 * n * d * d + 2.0 * n * (n + 1.0) * d;
}

void set_rate(benchmark::State& state, const char* name, double per_iteration) {
  state.counters[name] =
      benchmark::Counter(per_iteration, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

/// Arg {tokens}: decode one token at a time from an empty cache; each iteration is a whole generation.
void BM_GenerateCached(benchmark::State& state) {
  const Index tokens = state.range(0);
  const auto attn = make_module(kHeads);
  const Matrix x = random_matrix(tokens, kDModel, 2);  // row t: the token fed at step t
  auto cache = attn.make_cache(/*sequences=*/1, /*max_length=*/tokens);
  const mha::AttentionOptions options;  // decode is always causal
  for (auto _ : state) {
    cache.reset();
    for (Index t = 0; t < tokens; ++t) {
      Matrix y = attn.decode(x.row(t), cache, options);  // 1 × d_model: the output at position t
      benchmark::DoNotOptimize(y.data());
    }
    benchmark::ClobberMemory();
  }
  double flops = 0;
  for (Index p = 0; p < tokens; ++p) flops += step_flops(static_cast<double>(p), kHeads);
  set_rate(state, "FLOPS", flops);
  set_rate(state, "tokens_per_second", static_cast<double>(tokens));
}

/// Arg {tokens}: the same outputs without a cache, the causal forward over tokens 0 … t at step t.
void BM_GenerateRecompute(benchmark::State& state) {
  const Index tokens = state.range(0);
  const auto attn = make_module(kHeads);
  const Matrix x = random_matrix(tokens, kDModel, 2);
  mha::AttentionOptions causal;
  causal.causal = true;
  for (auto _ : state) {
    for (Index t = 1; t <= tokens; ++t) {
      Matrix y = attn.forward(x.topRows(t), causal);  // t × d_model; a decoder would keep the last row
      benchmark::DoNotOptimize(y.data());
    }
    benchmark::ClobberMemory();
  }
  double flops = 0;
  for (Index n = 1; n <= tokens; ++n) flops += forward_flops(static_cast<double>(n));
  set_rate(state, "FLOPS", flops);
  set_rate(state, "tokens_per_second", static_cast<double>(tokens));
}

/// A cache of `length` tokens decoded by `attn`, its numbers kept as Storage, with room for one more:
/// one token decoded (which makes the cache attn's), then random keys and values appended.
template <typename Storage>
mha::KVCache<float, Storage> filled_cache(const mha::MultiHeadAttention<float>& attn, Index length) {
  auto cache = attn.make_cache<Storage>(/*sequences=*/1, /*max_length=*/length + 1);
  attn.decode(random_matrix(1, kDModel, 2), cache);
  if (length > 1)
    cache.append(cache.owner(), {length - 1}, random_matrix(length - 1, cache.key_width(), 4),
                 random_matrix(length - 1, cache.value_width(), 5));
  return cache;
}

/// One decode step over a cache of `length` tokens, with `kv_heads` heads of keys and values, the
/// cache's numbers kept as Storage, the projection weights the module's (float) or rounded to
/// WeightStorage.
template <typename Storage = float, typename WeightStorage = float>
void run_decode_step(benchmark::State& state, Index kv_heads, Index length) {
  const auto attn = make_module(kv_heads);
  auto cache = filled_cache<Storage>(attn, length);
  const mha::AttentionOptions options;
  const Matrix token = random_matrix(1, kDModel, 3);  // 1 × d_model
  Matrix y;                                           // 1 × d_model
  const auto step = [&](const auto&... weights) {
    for (auto _ : state) {
      attn.decode(token, cache, weights..., y, options);  // allocates nothing
      benchmark::DoNotOptimize(y.data());
      cache.truncate(length);  // back to `length`: every iteration decodes at the same position
      benchmark::ClobberMemory();
    }
  };
  if constexpr (std::is_same<WeightStorage, float>::value)
    step();
  else
    step(attn.make_decode_weights<WeightStorage>());
  const double p = static_cast<double>(length), h_kv = static_cast<double>(kv_heads);
  set_rate(state, "FLOPS", step_flops(p, h_kv));
  state.SetBytesProcessed(static_cast<std::int64_t>(step_bytes(p, h_kv, sizeof(Storage), sizeof(WeightStorage))) *
                          state.iterations());
  state.counters["cache_MiB"] = static_cast<double>(cache.bytes()) / (1 << 20);
}

/// Args {h_kv, cache}.
void BM_DecodeStep(benchmark::State& state) { run_decode_step(state, state.range(0), state.range(1)); }

/// Args {h_kv, cache, storage}: storage 0 float, 1 bfloat16, 2 half (the same run as float, to
/// compare); 3 bfloat16 and 4 half for the weights as well.
void BM_DecodeStepStorage(benchmark::State& state) {
  const Index storage = state.range(2);
  if (storage == 0) run_decode_step<float>(state, state.range(0), state.range(1));
  if (storage == 1) run_decode_step<Eigen::bfloat16>(state, state.range(0), state.range(1));
  if (storage == 2) run_decode_step<Eigen::half>(state, state.range(0), state.range(1));
  if (storage == 3) run_decode_step<Eigen::bfloat16, Eigen::bfloat16>(state, state.range(0), state.range(1));
  if (storage == 4) run_decode_step<Eigen::half, Eigen::half>(state, state.range(0), state.range(1));
}

/// The attention alone of one decode step over a cache of `length` tokens of Storage.
template <typename Storage>
void run_decode_attention(benchmark::State& state, Index kv_heads, Index length) {
  const auto attn = make_module(kv_heads);
  const auto cache = filled_cache<Storage>(attn, length);
  const Matrix q = random_matrix(1, kHeads * kHeadWidth, 3);  // one token's queries, every head's
  const mha::detail::Batch batch({1}, {length});
  const float scale = 1.0f / 8.0f;                // 1/√d_k
  mha::detail::DecodeWorkspace<float> workspace;  // what a decode step keeps in its cache
  for (auto _ : state) {
    const Matrix& concat = mha::detail::ModuleSteps::attend_to_cache(attn, q, batch, cache, scale, workspace);
    benchmark::DoNotOptimize(concat.data());  // 1 × h·d_v
    benchmark::ClobberMemory();
  }
  const double bytes = static_cast<double>(sizeof(Storage)) * static_cast<double>(length) * 2.0 *
                       static_cast<double>(kv_heads * kHeadWidth);
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes) * state.iterations());
}

/// Args {h_kv, cache, storage}: storage 0 float, 1 bfloat16, 2 half.
void BM_DecodeAttention(benchmark::State& state) {
  const Index storage = state.range(2);
  if (storage == 0) run_decode_attention<float>(state, state.range(0), state.range(1));
  if (storage == 1) run_decode_attention<Eigen::bfloat16>(state, state.range(0), state.range(1));
  if (storage == 2) run_decode_attention<Eigen::half>(state, state.range(0), state.range(1));
}

/// Arg {bytes}: the sum of a float buffer of that size, four packets at a time (independent sums,
/// so that the loop waits on memory, not on the latency of its additions).
void BM_StreamRead(benchmark::State& state) {
  using namespace Eigen::internal;
  using Packet = packet_traits<float>::type;
  constexpr Index n = packet_traits<float>::size;
  const Index count = state.range(0) / static_cast<Index>(sizeof(float)) / (4 * n) * (4 * n);
  const Eigen::VectorXf buffer = Eigen::VectorXf::Random(count);
  for (auto _ : state) {
    Packet sum[4] = {pset1<Packet>(0), pset1<Packet>(0), pset1<Packet>(0), pset1<Packet>(0)};
    for (Index i = 0; i < count; i += 4 * n)
      for (int j = 0; j < 4; ++j) sum[j] = padd(sum[j], ploadu<Packet>(buffer.data() + i + j * n));
    float total = predux(padd(padd(sum[0], sum[1]), padd(sum[2], sum[3])));
    benchmark::DoNotOptimize(total);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(count * static_cast<Index>(sizeof(float))) * state.iterations());
}

/// Args {h_kv, cache, threads}.
void BM_DecodeStepThreads(benchmark::State& state) {
  mha::set_num_threads(static_cast<int>(state.range(2)));
  run_decode_step(state, state.range(0), state.range(1));
  mha::set_num_threads(1);
}

constexpr int kCacheLengths[] = {128, 256, 512, 1024, 2048, 4096, 8192};

void decode_grid(benchmark::internal::Benchmark* b) {
  for (int length : kCacheLengths)
    for (int kv_heads : {8, 2, 1}) b->Args({kv_heads, length});
}

void storage_grid(benchmark::internal::Benchmark* b) {
  for (int length : {1024, 4096, 8192, 32768})
    for (int kv_heads : {8, 2, 1})
      for (int storage : {0, 1, 2}) b->Args({kv_heads, length, storage});
}

void step_storage_grid(benchmark::internal::Benchmark* b) {
  for (int length : {1024, 4096, 8192, 32768})
    for (int kv_heads : {8, 2, 1})
      for (int storage : {0, 1, 2, 3, 4}) b->Args({kv_heads, length, storage});
}

/// The bytes of the keys and values of a cache of `length` tokens with `kv_heads` heads, each number `width` bytes.
std::int64_t cache_bytes(int kv_heads, int length, int width) {
  return std::int64_t{2} * length * kv_heads * kHeadWidth * width;
}

void stream_grid(benchmark::internal::Benchmark* b) {
  std::set<std::int64_t> sizes;  // every cache's of storage_grid, once
  for (int length : {1024, 4096, 8192, 32768})
    for (int kv_heads : {8, 2, 1})
      for (int width : {4, 2}) sizes.insert(cache_bytes(kv_heads, length, width));
  for (std::int64_t bytes : sizes) b->Arg(bytes);
}

void threads_grid(benchmark::internal::Benchmark* b) {
  for (int length : kCacheLengths)
    for (int threads : {1, 2}) b->Args({kHeads, length, threads});
}

BENCHMARK(BM_GenerateCached)->ArgName("tokens")->Arg(1024)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_GenerateRecompute)->ArgName("tokens")->Arg(1024)->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DecodeStep)->Apply(decode_grid)->ArgNames({"h_kv", "cache"})->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_DecodeStepStorage)
    ->Apply(step_storage_grid)
    ->ArgNames({"h_kv", "cache", "storage"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_DecodeAttention)
    ->Apply(storage_grid)
    ->ArgNames({"h_kv", "cache", "storage"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_StreamRead)->Apply(stream_grid)->ArgName("bytes")->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_DecodeStepThreads)
    ->Apply(threads_grid)
    ->ArgNames({"h_kv", "cache", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace

int main(int argc, char** argv) {
  return mha_bench::run(
      argc, argv, {{"d_model", std::to_string(kDModel)}, {"num_heads", std::to_string(kHeads)}, {"scalar", "float"}});
}
