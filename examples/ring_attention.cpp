// ring_attention — one sequence's attention computed by several processes (run: mpirun -np 2 ring_attention).
//
// Attention over N tokens costs N² work and, kept whole, memory that grows with N: past some length
// one machine is not enough. Ring attention (Liu, Zaharia & Abbeel 2023) splits the sequence's rows
// over P processes ("ranks"). Each rank projects its own rows into Q_r, K_r, V_r. The key/value
// blocks then travel around a ring: at step s rank r holds the block of rank r − s, computes
//     head_i(its queries, that block) = softmax(Q_i K_iᵀ / √d_k) V_i   with its log-sum-exp per row,
// and passes the block on while computing. The partial results merge exactly, because a softmax
// over all keys is the softmax over each block reweighted by e^(lse_block − lse_all). Finally each
// rank applies W^O to its own rows.
//
// Causal attention would leave rank 0 idle (its queries see only its own keys) while the last rank
// does most of the work; the zigzag layout gives rank i chunks i and 2P − 1 − i of 2P, one early and
// one late, so that every rank has the same share of the triangle.
//
// Training runs the ring again backwards: each block travels with the gradient of its keys and
// values, every rank adding its queries' part, until it is home; one MPI_Allreduce then sums the
// weights' gradients, so that every rank can take the same optimiser step.
//
// Generation prefills a cache with the prompt through the same ring: each rank keeps the keys and
// values it projected for its own rows, a shard of the cache (ShardedCache), and every new token
// then attends to each shard on its rank, one collective merging the parts by log-sum-exp.
//
// This program computes causal self-attention over 1000 tokens on every rank of the ring in the
// zigzag layout, and its backward pass; it gathers the output and ∂loss/∂x and prints their
// difference, and that of the weights' gradients, to the single-process passes. Then it prefills a
// sharded cache with the first 992 tokens and decodes the last 8 one at a time, and prints the
// difference to one process's decoding with one whole cache (KVCache).

#include <mha/distributed/ring_attention.hpp>
#include <mha/distributed/sharded_cache.hpp>
#include <mha/mha.hpp>

#include <mpi.h>
#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdio>

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);  // only this thread calls MPI
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);

  mha::MultiHeadAttentionConfig config;
  config.d_model = 64;
  config.num_heads = 4;  // d_k = d_v = 16
  config.seed = 1;       // the same weights on every rank
  const mha::MultiHeadAttention<double> attention(config);

  // The whole sequence exists on every rank here only to compare with one process; a real
  // program gives each rank its own rows and never holds the rest.
  const Eigen::Index N = 1000;
  Eigen::MatrixXd x(N, 64);  // N tokens, one per row
  for (Eigen::Index r = 0; r < N; ++r)
    for (Eigen::Index c = 0; c < 64; ++c) x(r, c) = std::sin(0.01 * static_cast<double>(r * 64 + c));
  mha::AttentionOptions causal;
  causal.causal = true;

  // The zigzag layout: rank i holds chunks i and 2P − 1 − i of the 2P chunks of the sequence.
  const auto layout = mha::distributed::SequenceLayout::zigzag(N, ranks);
  const Eigen::MatrixXd my_rows = layout.local_rows(x, rank);  // rows(rank) × 64
  mha::distributed::RingAttention<double> ring(attention, MPI_COMM_WORLD);
  mha::distributed::RingTape<double> tape;  // what the backward needs: this rank's rows only
  const Eigen::MatrixXd my_output = ring.forward(my_rows, layout, causal, tape);  // rows(rank) × 64

  // The backward of loss = Σ output ∘ d_output: each rank passes its rows of d_output.
  const Eigen::MatrixXd d_output = Eigen::MatrixXd::Constant(N, 64, 0.01);
  auto gradients = attention.zero_gradients();  // the same on every rank afterwards
  const Eigen::MatrixXd my_dx = ring.backward(tape, layout.local_rows(d_output, rank), gradients).self_attention();

  // One process, for comparison.
  mha::Tape<double> whole;
  const Eigen::MatrixXd expected = attention.forward(x, causal, whole);
  auto expected_gradients = attention.zero_gradients();
  const Eigen::MatrixXd expected_dx = attention.backward(whole, d_output, expected_gradients).self_attention();

  const auto max_difference = [](const Eigen::MatrixXd& a, const Eigen::MatrixXd& b) {
    return (a - b).cwiseAbs().maxCoeff();
  };
  const double difference = max_difference(mha::distributed::gather_rows(my_output, layout, MPI_COMM_WORLD), expected);
  const double dx_difference =
      max_difference(mha::distributed::gather_rows(my_dx, layout, MPI_COMM_WORLD), expected_dx);
  const double dw_difference = max_difference(gradients.w_q(), expected_gradients.w_q());

  // Generation: a prompt of 992 tokens prefilled through the ring, in the zigzag layout; each rank
  // keeps its rows' keys and values. Then 8 tokens decoded one at a time, every rank passing the
  // same token and getting the same output.
  const Eigen::Index prompt_length = N - 8;
  const Eigen::MatrixXd prompt = x.topRows(prompt_length);
  const auto prompt_layout = mha::distributed::SequenceLayout::zigzag(prompt_length, ranks);
  mha::distributed::ShardedCache<double> cache(attention, MPI_COMM_WORLD);
  const Eigen::MatrixXd my_prompt_output = cache.prefill(prompt_layout.local_rows(prompt, rank), prompt_layout);
  auto whole_cache = attention.make_cache();  // one process: one cache of every token
  double decode_difference =
      max_difference(mha::distributed::gather_rows(my_prompt_output, prompt_layout, MPI_COMM_WORLD),
                     attention.decode(prompt, whole_cache));
  for (Eigen::Index t = prompt_length; t < N; ++t)
    decode_difference =
        std::max(decode_difference, max_difference(cache.decode(x.row(t)), attention.decode(x.row(t), whole_cache)));
  if (rank == 0) {
    std::printf("ring attention over %d ranks, N = %ld tokens, causal, zigzag layout\n", ranks, static_cast<long>(N));
    for (int r = 0; r < ranks; ++r) {
      std::printf("  rank %d holds rows", r);
      for (const auto& range : layout.ranges(r))
        std::printf(" %ld-%ld", static_cast<long>(range.begin), static_cast<long>(range.end() - 1));
      std::printf("\n");
    }
    std::printf("max |ring - single process|: output %.3g, d_x %.3g, d_W^Q %.3g\n", difference, dx_difference,
                dw_difference);
    std::printf("prefill of %ld tokens, %ld decoded; tokens per rank:", static_cast<long>(prompt_length),
                static_cast<long>(N - prompt_length));
    for (const Eigen::Index n : cache.shard_lengths()) std::printf(" %ld", static_cast<long>(n));
    std::printf("; max |sharded cache - one cache| %.3g\n", decode_difference);
  }
  MPI_Finalize();
  return std::max({difference, dx_difference, dw_difference, decode_difference}) < 1e-12 ? 0 : 1;
}
