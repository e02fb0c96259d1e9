// Ring attention's forward pass equals the single-process forward pass of the whole sequence, on
// every rank's rows, for every layout, option and module the ring supports.
#include <mha/distributed/ring_attention.hpp>
#include <mha/mha.hpp>

#include "mpi_test_util.hpp"
#include "test_util.hpp"

#include <gtest/gtest.h>

#include <string>

namespace {

using mha::AttentionOptions;
using mha::CausalAlignment;
using mha::MultiHeadAttention;
using mha::distributed::RingAttention;
using mha::distributed::SequenceLayout;
using mha_test::LayoutKind;
using mha_test::Matrix;

template <typename Scalar>
class RingForward : public ::testing::Test {};
TYPED_TEST_SUITE(RingForward, mha_test::Scalars, mha_test::ScalarNames);

/// Runs self-attention of x (N × d_model, the same on every rank) through the ring in `layout` and
/// in one process, and checks this rank's rows.
template <typename Scalar>
::testing::AssertionResult ring_matches_one_process(const MultiHeadAttention<Scalar>& module, const Matrix<Scalar>& x,
                                                    const SequenceLayout& layout, const AttentionOptions& options) {
  RingAttention<Scalar> ring(module, MPI_COMM_WORLD);
  const Matrix<Scalar> local = ring.forward(layout.local_rows(x, ring.rank()), layout, options);
  const Matrix<Scalar> expected = layout.local_rows(module.forward(x, options), ring.rank());
  return mha_test::close(local, expected, mha_test::ring_tolerance<Scalar>());
}

TYPED_TEST(RingForward, SelfAttentionEqualsOneProcessForEveryLayout) {
  using Scalar = TypeParam;
  const MultiHeadAttention<Scalar> module(mha_test::config(16, 4, 0, 0, 7));
  // N = 1100: several query blocks (256) and key tiles (512) per rank at P = 1 and 2.
  for (const Eigen::Index N : {1100, 37})
    for (const LayoutKind kind : {LayoutKind::even, LayoutKind::uneven, LayoutKind::zigzag})
      for (const bool causal : {false, true}) {
        const Matrix<Scalar> x = mha_test::random_matrix<Scalar>(N, 16, 11);
        EXPECT_TRUE(ring_matches_one_process(module, x, mha_test::make_layout(kind, N, mha_test::world_size()),
                                             mha_test::causal_if(causal)))
            << "N = " << N << ", layout " << mha_test::name_of(kind) << ", causal " << causal;
      }
}

TYPED_TEST(RingForward, SlidingWindowsEqualOneProcess) {
  using Scalar = TypeParam;
  const MultiHeadAttention<Scalar> module(mha_test::config(16, 2, 0, 0, 3));
  const Eigen::Index N = 700;
  const Matrix<Scalar> x = mha_test::random_matrix<Scalar>(N, 16, 5);
  for (const LayoutKind kind : {LayoutKind::even, LayoutKind::uneven, LayoutKind::zigzag})
    for (const bool causal : {false, true})
      for (const Eigen::Index window : {1, 40, 300}) {
        const AttentionOptions options = mha_test::options_of(causal, CausalAlignment::top_left, window);
        EXPECT_TRUE(
            ring_matches_one_process(module, x, mha_test::make_layout(kind, N, mha_test::world_size()), options))
            << "layout " << mha_test::name_of(kind) << ", causal " << causal << ", window " << window;
      }
}

TYPED_TEST(RingForward, KeyPaddingEqualsOneProcess) {
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
      EXPECT_TRUE(ring_matches_one_process(module, x, mha_test::make_layout(kind, N, mha_test::world_size()), options))
          << "layout " << mha_test::name_of(kind) << ", causal " << causal;
    }
}

TYPED_TEST(RingForward, GroupedQueryRotaryAndBiasesEqualOneProcess) {
  using Scalar = TypeParam;
  // Rotary positions must be the global ones: a rank's first row is not at position 0.
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
        EXPECT_TRUE(ring_matches_one_process(module, x, mha_test::make_layout(kind, N, mha_test::world_size()),
                                             mha_test::causal_if(causal)))
            << "layout " << mha_test::name_of(kind) << ", causal " << causal;
  }
}

TYPED_TEST(RingForward, CrossAttentionEqualsOneProcessInBothAlignments) {
  using Scalar = TypeParam;
  mha::MultiHeadAttentionConfig c = mha_test::config(16, 4, 6, 5, 13);
  c.kdim = 12;
  c.vdim = 10;
  const MultiHeadAttention<Scalar> module(c);
  const int P = mha_test::world_size();
  for (const auto& [L, S] : {std::pair<Eigen::Index, Eigen::Index>{300, 700}, {700, 300}}) {
    const Matrix<Scalar> query = mha_test::random_matrix<Scalar>(L, 16, 1);
    const Matrix<Scalar> key = mha_test::random_matrix<Scalar>(S, 12, 2);
    const Matrix<Scalar> value = mha_test::random_matrix<Scalar>(S, 10, 3);
    for (const CausalAlignment alignment : {CausalAlignment::top_left, CausalAlignment::bottom_right})
      for (const bool causal : {false, true}) {
        const AttentionOptions options = mha_test::options_of(causal, alignment, causal ? 0 : 90);
        const SequenceLayout queries = mha_test::make_layout(LayoutKind::zigzag, L, P);
        const SequenceLayout keys = mha_test::make_layout(LayoutKind::uneven, S, P);
        RingAttention<Scalar> ring(module, MPI_COMM_WORLD);
        const Matrix<Scalar> local =
            ring.forward(queries.local_rows(query, ring.rank()), keys.local_rows(key, ring.rank()),
                         keys.local_rows(value, ring.rank()), queries, keys, options);
        const Matrix<Scalar> expected = queries.local_rows(module.forward(query, key, value, options), ring.rank());
        EXPECT_TRUE(mha_test::close(local, expected, mha_test::ring_tolerance<Scalar>()))
            << "L = " << L << ", S = " << S << ", bottom-right " << (alignment == CausalAlignment::bottom_right)
            << ", causal " << causal;
      }
  }
}

TYPED_TEST(RingForward, EveryRankGathersTheWholeOutput) {
  using Scalar = TypeParam;
  const MultiHeadAttention<Scalar> module(mha_test::config(8, 2, 0, 0, 1));
  const Eigen::Index N = 90;
  const Matrix<Scalar> x = mha_test::random_matrix<Scalar>(N, 8, 2);
  const SequenceLayout layout = SequenceLayout::zigzag(N, mha_test::world_size());
  RingAttention<Scalar> ring(module, MPI_COMM_WORLD);
  const Matrix<Scalar> local = ring.forward(layout.local_rows(x, ring.rank()), layout, mha_test::causal_if(true));
  const Matrix<Scalar> whole = mha::distributed::gather_rows(local, layout, MPI_COMM_WORLD);
  EXPECT_TRUE(mha_test::close(whole, module.forward(x, mha_test::causal_if(true)), mha_test::ring_tolerance<Scalar>()));
}

TEST(RingLayout, ZigzagHoldsChunksIAndTwoPMinusOneMinusI) {
  const SequenceLayout layout = SequenceLayout::zigzag(16, 4);  // chunks of 2 rows
  ASSERT_EQ(layout.ranks(), 4);
  for (int i = 0; i < 4; ++i) {
    ASSERT_EQ(layout.ranges(i).size(), 2u);
    EXPECT_EQ(layout.ranges(i)[0].begin, 2 * i);
    EXPECT_EQ(layout.ranges(i)[1].begin, 2 * (7 - i));
    EXPECT_EQ(layout.rows(i), 4);
  }
  // Uneven lengths: every row is held exactly once.
  const SequenceLayout odd = SequenceLayout::zigzag(23, 3);
  std::vector<int> held(23, 0);
  for (int r = 0; r < 3; ++r)
    for (const Eigen::Index row : odd.global_rows(r)) ++held[static_cast<std::size_t>(row)];
  for (const int n : held) EXPECT_EQ(n, 1);
}

TEST(RingLayout, LocalRowsAndPlaceRowsAreInverse) {
  const Matrix<double> x = mha_test::random_matrix<double>(29, 3, 1);
  for (const LayoutKind kind : {LayoutKind::even, LayoutKind::uneven, LayoutKind::zigzag}) {
    const SequenceLayout layout = mha_test::make_layout(kind, 29, 4);
    Matrix<double> back = Matrix<double>::Zero(29, 3);
    for (int r = 0; r < 4; ++r) layout.place_rows(layout.local_rows(x, r), r, back);
    EXPECT_EQ(back, x) << mha_test::name_of(kind);
  }
}

TEST(RingSchedule, CausalBlocksNoLaterRankNeedsAreNeitherComputedNorSent) {
  // Contiguous causal: rank r needs the blocks of ranks ≤ r only, so the last rank never passes a
  // block on (it would go to rank 0), and rank 0 computes only its own.
  const int P = mha_test::world_size();
  const MultiHeadAttention<double> module(mha_test::config(8, 2, 0, 0, 1));
  const Eigen::Index N = 64 * P;
  const Matrix<double> x = mha_test::random_matrix<double>(N, 8, 2);
  const SequenceLayout layout = SequenceLayout::contiguous(N, P);
  RingAttention<double> ring(module, MPI_COMM_WORLD);
  ring.forward(layout.local_rows(x, ring.rank()), layout, mha_test::causal_if(true));
  std::size_t sent = 0;
  for (const auto& step : ring.statistics().steps) sent += step.bytes_sent;
  ASSERT_EQ(ring.statistics().steps.size(), static_cast<std::size_t>(P));
  // Rank r forwards the blocks of ranks 0 … r, each until it reaches rank P − 1.
  const std::size_t block =
      static_cast<std::size_t>(64 * module.num_kv_heads() * (module.d_k() + module.d_v())) * sizeof(double);
  EXPECT_EQ(sent, ring.rank() == P - 1 ? 0 : static_cast<std::size_t>(ring.rank() + 1) * block);
  // The zigzag needs every block on every rank: each sends P − 1 blocks of two chunks.
  const SequenceLayout zigzag = SequenceLayout::zigzag(N, P);
  ring.forward(zigzag.local_rows(x, ring.rank()), zigzag, mha_test::causal_if(true));
  sent = 0;
  for (const auto& step : ring.statistics().steps) sent += step.bytes_sent;
  EXPECT_EQ(sent, static_cast<std::size_t>(P - 1) * block);
}

}  // namespace
