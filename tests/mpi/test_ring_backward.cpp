// Ring attention's forward pass (with and without a tape) and backward pass equal the single-process
// passes of the whole sequence: on every rank's rows of the output and of ∂loss/∂query, ∂loss/∂key
// and ∂loss/∂value, and in the parameters' gradients, which every rank holds, bit for bit the same,
// for every layout, option and module the ring supports.
#include <mha/distributed/ring_attention.hpp>
#include <mha/mha.hpp>

#include "mpi_test_util.hpp"
#include "test_util.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

namespace {

using mha::AttentionOptions;
using mha::CausalAlignment;
using mha::MultiHeadAttention;
using mha::distributed::RingAttention;
using mha::distributed::RingTape;
using mha::distributed::SequenceLayout;
using mha_test::LayoutKind;
using mha_test::Matrix;

template <typename Scalar>
class RingPasses : public ::testing::Test {};
TYPED_TEST_SUITE(RingPasses, mha_test::Scalars, mha_test::ScalarNames);

/// Gradients of `module`'s shape, not zero (the backward adds into them): the same on every rank.
template <typename Scalar>
typename MultiHeadAttention<Scalar>::Gradients starting_gradients(const MultiHeadAttention<Scalar>& module) {
  auto g = module.zero_gradients();
  std::uint64_t seed = 100;
  for (auto& p : g.parameters()) p.value = mha_test::random_matrix<Scalar>(p.value.rows(), p.value.cols(), seed++);
  return g;
}

/// Whether every rank holds the same gradients as rank 0, bit for bit (collective).
template <typename Scalar>
::testing::AssertionResult same_on_every_rank(typename MultiHeadAttention<Scalar>::Gradients& gradients) {
  std::vector<Scalar> mine;
  for (const auto& p : gradients.parameters()) mine.insert(mine.end(), p.value.data(), p.value.data() + p.value.size());
  std::vector<Scalar> first = mine;
  MPI_Bcast(first.data(), static_cast<int>(first.size() * sizeof(Scalar)), MPI_BYTE, 0, MPI_COMM_WORLD);
  const bool same = std::memcmp(first.data(), mine.data(), mine.size() * sizeof(Scalar)) == 0;
  if (mha_test::on_every_rank(same)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "the ranks hold different gradients";
}

/// The ring's backward of L queries over S keys (query, key, value and d_output: the whole
/// sequences, the same on every rank; self-attention when key is empty) against one process's:
/// this rank's rows of the input gradients, and the parameters' gradients on every rank.
template <typename Scalar>
::testing::AssertionResult backward_matches_one_process(const MultiHeadAttention<Scalar>& module,
                                                        const Matrix<Scalar>& query, const Matrix<Scalar>& key,
                                                        const Matrix<Scalar>& value, const SequenceLayout& queries,
                                                        const SequenceLayout& keys, const AttentionOptions& options) {
  const bool self = key.size() == 0;
  const double tol = mha_test::ring_tolerance<Scalar>();
  const Matrix<Scalar> d_output = mha_test::random_matrix<Scalar>(query.rows(), module.d_model(), 77);

  mha::Tape<Scalar> tape;
  const Matrix<Scalar> output =
      self ? module.forward(query, options, tape) : module.forward(query, key, value, options, tape);
  auto expected = starting_gradients(module);
  const mha::InputGradients<Scalar> d_expected = module.backward(tape, d_output, expected);

  RingAttention<Scalar> ring(module, MPI_COMM_WORLD);
  const int rank = ring.rank();
  const Matrix<Scalar> untaped = self ? ring.forward(queries.local_rows(query, rank), queries, options)
                                      : ring.forward(queries.local_rows(query, rank), keys.local_rows(key, rank),
                                                     keys.local_rows(value, rank), queries, keys, options);
  RingTape<Scalar> ring_tape;
  const Matrix<Scalar> local_output =
      self ? ring.forward(queries.local_rows(query, rank), queries, options, ring_tape)
           : ring.forward(queries.local_rows(query, rank), keys.local_rows(key, rank), keys.local_rows(value, rank),
                          queries, keys, options, ring_tape);
  auto gradients = starting_gradients(module);
  const mha::InputGradients<Scalar> d_local = ring.backward(ring_tape, queries.local_rows(d_output, rank), gradients);

  // The gradients' agreement first: it is collective, so every rank must reach it.
  auto result = same_on_every_rank<Scalar>(gradients);
  if (!result) return result;
  if (!(result = mha_test::close(untaped, queries.local_rows(output, rank), tol)))
    return result << " (the forward's output, without a tape)";
  if (!(result = mha_test::close(local_output, queries.local_rows(output, rank), tol)))
    return result << " (the forward's output, with a tape)";
  if (self &&
      !(result = mha_test::close(d_local.self_attention(), queries.local_rows(d_expected.self_attention(), rank), tol)))
    return result << " (d_x)";
  const struct {
    const char* name;
    const Matrix<Scalar>& ring;
    Matrix<Scalar> expected;
  } inputs[] = {{"d_query", d_local.query, queries.local_rows(d_expected.query, rank)},
                {"d_key", d_local.key, keys.local_rows(d_expected.key, rank)},
                {"d_value", d_local.value, keys.local_rows(d_expected.value, rank)}};
  for (const auto& input : inputs)
    if (!(result = mha_test::close(input.ring, input.expected, tol))) return result << " (" << input.name << ")";
  const auto ring_parameters = gradients.parameters();
  const auto expected_parameters = expected.parameters();
  for (std::size_t p = 0; p < ring_parameters.size(); ++p)
    if (!(result = mha_test::close(ring_parameters[p].value, expected_parameters[p].value, tol)))
      return result << " (gradient of " << ring_parameters[p].name << ")";
  return result;
}

/// Self-attention of x through the ring in `layout`, against one process.
template <typename Scalar>
::testing::AssertionResult self_backward_matches(const MultiHeadAttention<Scalar>& module, const Matrix<Scalar>& x,
                                                 const SequenceLayout& layout, const AttentionOptions& options) {
  return backward_matches_one_process(module, x, Matrix<Scalar>(), Matrix<Scalar>(), layout, layout, options);
}

SequenceLayout layout_of(LayoutKind kind, Eigen::Index N) {
  return mha_test::make_layout(kind, N, mha_test::world_size());
}

TYPED_TEST(RingPasses, SelfAttentionEqualsOneProcessForEveryLayout) {
  using Scalar = TypeParam;
  const MultiHeadAttention<Scalar> module(mha_test::config(16, 4, 0, 0, 7));
  // N = 1100: several query blocks (256) and key tiles (512) per rank at P = 1 and 2.
  for (const Eigen::Index N : {1100, 37})
    for (const LayoutKind kind : {LayoutKind::even, LayoutKind::uneven, LayoutKind::zigzag})
      for (const bool causal : {false, true}) {
        const Matrix<Scalar> x = mha_test::random_matrix<Scalar>(N, 16, 11);
        EXPECT_TRUE(self_backward_matches(module, x, layout_of(kind, N), mha_test::causal_if(causal)))
            << "N = " << N << ", layout " << mha_test::name_of(kind) << ", causal " << causal;
      }
}

TYPED_TEST(RingPasses, SlidingWindowsEqualOneProcess) {
  using Scalar = TypeParam;
  const MultiHeadAttention<Scalar> module(mha_test::config(16, 2, 0, 0, 3));
  const Eigen::Index N = 700;
  const Matrix<Scalar> x = mha_test::random_matrix<Scalar>(N, 16, 5);
  for (const LayoutKind kind : {LayoutKind::even, LayoutKind::uneven, LayoutKind::zigzag})
    for (const bool causal : {false, true})
      for (const Eigen::Index window : {1, 2, 40, 300}) {
        const AttentionOptions options = mha_test::options_of(causal, CausalAlignment::top_left, window);
        const SequenceLayout layout = layout_of(kind, N);
        // Causal with a window of 1, each query sees its own key alone: its weight is 1 whatever
        // the scores, so ∂loss/∂Q and ∂loss/∂K are exactly zero, and only rounding noise to
        // compare; the forward is compared alone.
        if (causal && window == 1) {
          RingAttention<Scalar> ring(module, MPI_COMM_WORLD);
          EXPECT_TRUE(mha_test::close(ring.forward(layout.local_rows(x, ring.rank()), layout, options),
                                      layout.local_rows(module.forward(x, options), ring.rank()),
                                      mha_test::ring_tolerance<Scalar>()))
              << "layout " << mha_test::name_of(kind) << ", causal window 1";
          continue;
        }
        EXPECT_TRUE(self_backward_matches(module, x, layout, options))
            << "layout " << mha_test::name_of(kind) << ", causal " << causal << ", window " << window;
      }
}

TYPED_TEST(RingPasses, KeyPaddingEqualsOneProcess) {
  using Scalar = TypeParam;
  const MultiHeadAttention<Scalar> module(mha_test::config(16, 4, 0, 0, 9));
  const Eigen::Index N = 600;
  const Matrix<Scalar> x = mha_test::random_matrix<Scalar>(N, 16, 6);
  // Padding scattered over the sequence, and a run of 300 keys that hides whole tiles and ranks.
  Eigen::Matrix<bool, 1, Eigen::Dynamic> padded = Eigen::Matrix<bool, 1, Eigen::Dynamic>::Constant(N, false);
  for (Eigen::Index j = 0; j < N; j += 7) padded(j) = true;
  padded.segment(200, 300).setConstant(true);
  for (const LayoutKind kind : {LayoutKind::even, LayoutKind::uneven, LayoutKind::zigzag})
    for (const bool causal : {false, true}) {
      AttentionOptions options = mha_test::causal_if(causal);
      options.key_padding_mask = mha::AttentionMask::blocked(padded);
      EXPECT_TRUE(self_backward_matches(module, x, layout_of(kind, N), options))
          << "layout " << mha_test::name_of(kind) << ", causal " << causal;
    }
}

TYPED_TEST(RingPasses, GroupedQueryRotaryAndBiasesEqualOneProcess) {
  using Scalar = TypeParam;
  // Rotary positions are global, in the backward's rotation of the gradients too.
  for (const mha::RotaryPairs pairs : {mha::RotaryPairs::interleaved, mha::RotaryPairs::halves}) {
    mha::MultiHeadAttentionConfig c = mha_test::rotary(mha_test::decoder_config(32, 4, 2, 0, 0, 21), pairs);
    c.bias = true;
    MultiHeadAttention<Scalar> module(c);
    for (auto& p : module.parameters())
      if (p.name[0] == 'b') p.value = mha_test::random_matrix<Scalar>(p.value.rows(), p.value.cols(), 4);
    const Eigen::Index N = 530;
    const Matrix<Scalar> x = mha_test::random_matrix<Scalar>(N, 32, 8);
    for (const LayoutKind kind : {LayoutKind::uneven, LayoutKind::zigzag})
      for (const bool causal : {false, true})
        EXPECT_TRUE(self_backward_matches(module, x, layout_of(kind, N), mha_test::causal_if(causal)))
            << "layout " << mha_test::name_of(kind) << ", causal " << causal;
  }
}

TYPED_TEST(RingPasses, CrossAttentionEqualsOneProcessInBothAlignments) {
  using Scalar = TypeParam;
  for (const bool grouped_with_biases : {false, true}) {
    mha::MultiHeadAttentionConfig c = mha_test::decoder_config(16, 4, grouped_with_biases ? 2 : 4, 6, 5, 13);
    c.kdim = 12;
    c.vdim = 10;
    c.bias = grouped_with_biases;
    const MultiHeadAttention<Scalar> module(c);
    for (const auto& [L, S] : {std::pair<Eigen::Index, Eigen::Index>{300, 700}, {700, 300}}) {
      const Matrix<Scalar> query = mha_test::random_matrix<Scalar>(L, 16, 1);
      const Matrix<Scalar> key = mha_test::random_matrix<Scalar>(S, 12, 2);
      const Matrix<Scalar> value = mha_test::random_matrix<Scalar>(S, 10, 3);
      for (const CausalAlignment alignment : {CausalAlignment::top_left, CausalAlignment::bottom_right})
        for (const bool causal : {false, true}) {
          const AttentionOptions options = mha_test::options_of(causal, alignment, causal ? 0 : 90);
          EXPECT_TRUE(backward_matches_one_process(module, query, key, value, layout_of(LayoutKind::zigzag, L),
                                                   layout_of(LayoutKind::uneven, S), options))
              << "L = " << L << ", S = " << S << ", bottom-right " << (alignment == CausalAlignment::bottom_right)
              << ", causal " << causal << ", grouped with biases " << grouped_with_biases;
        }
    }
  }
}

TYPED_TEST(RingPasses, DropoutDrawsTheSinglePatternOfOneProcess) {
  using Scalar = TypeParam;
  // The pattern is a function of (seed, head, global row, global key): each rank draws its own
  // rows' part of it, in the forward and again in the backward.
  mha::MultiHeadAttentionConfig c = mha_test::decoder_config(16, 4, 2, 0, 0, 5);
  c.dropout = 0.3;
  const MultiHeadAttention<Scalar> module(c);
  const Eigen::Index N = 900;
  const Matrix<Scalar> x = mha_test::random_matrix<Scalar>(N, 16, 12);
  for (const LayoutKind kind : {LayoutKind::even, LayoutKind::uneven, LayoutKind::zigzag})
    for (const bool causal : {false, true}) {
      AttentionOptions options = mha_test::options_of(causal, CausalAlignment::top_left, causal ? 0 : 200);
      options.training = true;
      options.dropout_seed = 1234;
      EXPECT_TRUE(self_backward_matches(module, x, layout_of(kind, N), options))
          << "layout " << mha_test::name_of(kind) << ", causal " << causal;
    }
  // Cross-attention in the bottom-right alignment: the pattern's rows are the queries', not the keys'.
  const Matrix<Scalar> query = mha_test::random_matrix<Scalar>(300, 16, 1);
  AttentionOptions options = mha_test::options_of(true, CausalAlignment::bottom_right);
  options.training = true;
  options.dropout_seed = 99;
  EXPECT_TRUE(backward_matches_one_process(module, query, x, x, layout_of(LayoutKind::uneven, 300),
                                           layout_of(LayoutKind::zigzag, N), options));
}

TEST(RingBackwardSchedule, GradientsTravelWithTheirBlocksAndTheLastRankThatNeedsOneSendsItHome) {
  const int P = mha_test::world_size();
  const MultiHeadAttention<double> module(mha_test::config(8, 2, 0, 0, 1));
  const Eigen::Index N = 64 * P;
  const Matrix<double> x = mha_test::random_matrix<double>(N, 8, 2);
  const Matrix<double> d_output = mha_test::random_matrix<double>(N, 8, 3);
  const std::size_t block =
      static_cast<std::size_t>(64 * module.num_kv_heads() * (module.d_k() + module.d_v())) * sizeof(double);
  RingAttention<double> ring(module, MPI_COMM_WORLD);
  const int r = ring.rank();
  const auto sent_by_backward = [&](const SequenceLayout& layout) {
    RingTape<double> tape;
    ring.forward(layout.local_rows(x, r), layout, mha_test::causal_if(true), tape);
    auto gradients = module.zero_gradients();
    ring.backward(tape, layout.local_rows(d_output, r), gradients);
    std::size_t sent = 0;
    for (const auto& step : ring.statistics().steps) sent += step.bytes_sent;
    EXPECT_EQ(ring.statistics().steps.size(), static_cast<std::size_t>(P));
    return sent;
  };
  // Contiguous causal: the block of rank o is needed by ranks o … P − 1. Rank r < P − 1 passes the
  // blocks of ranks r, r − 1, … 0 on, each with its gradient; rank P − 1 sends the gradients of the
  // P − 1 others home and passes nothing on.
  EXPECT_EQ(sent_by_backward(SequenceLayout::contiguous(N, P)),
            r == P - 1 ? static_cast<std::size_t>(P - 1) * block : static_cast<std::size_t>(r + 1) * 2 * block);
  // The zigzag: every block and gradient goes all the way round, the last hop with the gradient alone.
  EXPECT_EQ(sent_by_backward(SequenceLayout::zigzag(N, P)), P == 1 ? 0 : static_cast<std::size_t>(2 * P - 1) * block);
}

TEST(RingBackwardBuffers, ABackwardAfterAnotherEqualsOneOnAFreshRingBitForBit) {
  // The ring keeps the buffer its block's gradient comes home into from one backward to the next:
  // nothing of the first call may remain in the second.
  const int P = mha_test::world_size();
  const MultiHeadAttention<double> module(mha_test::config(8, 2, 0, 0, 1));
  const Eigen::Index N = 64 * P + 5;
  const Matrix<double> x = mha_test::random_matrix<double>(N, 8, 2);
  const Matrix<double> first = mha_test::random_matrix<double>(N, 8, 3);
  const Matrix<double> second = mha_test::random_matrix<double>(N, 8, 4);
  for (const LayoutKind kind : {LayoutKind::even, LayoutKind::zigzag}) {
    // Contiguous causal: the last rank's block goes nowhere, its gradient stays home.
    const SequenceLayout layout = layout_of(kind, N);
    const AttentionOptions options = mha_test::causal_if(true);
    RingAttention<double> used(module, MPI_COMM_WORLD), fresh(module, MPI_COMM_WORLD);
    const int r = used.rank();
    RingTape<double> tape, fresh_tape;
    used.forward(layout.local_rows(x, r), layout, options, tape);
    fresh.forward(layout.local_rows(x, r), layout, options, fresh_tape);
    auto ignored = module.zero_gradients();
    used.backward(tape, layout.local_rows(first, r), ignored);
    auto g = module.zero_gradients(), expected = module.zero_gradients();
    const auto d = used.backward(tape, layout.local_rows(second, r), g);
    const auto d_expected = fresh.backward(fresh_tape, layout.local_rows(second, r), expected);
    bool same = d.query == d_expected.query && d.key == d_expected.key && d.value == d_expected.value;
    const auto ps = g.parameters(), expected_ps = expected.parameters();
    for (std::size_t i = 0; i < ps.size(); ++i) same = same && ps[i].value == expected_ps[i].value;
    EXPECT_TRUE(mha_test::on_every_rank(same)) << mha_test::name_of(kind);
  }
}

}  // namespace
