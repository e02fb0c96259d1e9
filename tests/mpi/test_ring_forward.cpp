// Ring attention's layouts, its schedule of messages, and gathering a whole output. That the forward
// pass equals one process's for every layout, option and module is checked beside the backward's,
// on the same cases, in test_ring_backward.cpp.
#include <mha/distributed/ring_attention.hpp>
#include <mha/mha.hpp>

#include "mpi_test_util.hpp"
#include "test_util.hpp"

#include <gtest/gtest.h>

#include <string>

namespace {

using mha::MultiHeadAttention;
using mha::distributed::RingAttention;
using mha::distributed::SequenceLayout;
using mha_test::LayoutKind;
using mha_test::Matrix;

template <typename Scalar>
class RingForward : public ::testing::Test {};
TYPED_TEST_SUITE(RingForward, mha_test::Scalars, mha_test::ScalarNames);

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
