// Bad arguments on any rank throw the same mha::invalid_argument on every rank, before any message
// of the ring is sent: never a hang, never an MPI abort, and the ring works again afterwards.
#include <mha/distributed/ring_attention.hpp>
#include <mha/mha.hpp>

#include "mpi_test_util.hpp"
#include "test_util.hpp"

#include <gtest/gtest.h>

#include <string>

namespace {

using mha::AttentionOptions;
using mha::MultiHeadAttention;
using mha::distributed::RingAttention;
using mha::distributed::SequenceLayout;
using mha_test::is_odd_one_out;
using mha_test::Matrix;
using mha_test::Outcome;
using mha_test::outcome_of;

class RingChecks : public ::testing::Test {
 protected:
  const MultiHeadAttention<double> module{mha_test::config(8, 2, 0, 0, 3)};
  const Eigen::Index N = 40;
  const Matrix<double> x = mha_test::random_matrix<double>(N, 8, 1);
  const SequenceLayout layout = SequenceLayout::contiguous(N, mha_test::world_size());
  RingAttention<double> ring{module, MPI_COMM_WORLD};
  Matrix<double> local() const { return layout.local_rows(x, ring.rank()); }

  /// After a refused call the ring must still work: no rank has a message left in flight.
  void expect_ring_still_works() {
    const Matrix<double> out = ring.forward(local(), layout);
    EXPECT_TRUE(mha_test::close(out, layout.local_rows(module.forward(x), ring.rank()), 1e-12));
  }
};

TEST_F(RingChecks, AWrongWidthOnOneRankThrowsTheSameOnEveryRank) {
  const Outcome o = outcome_of([&] {
    const Matrix<double> bad = is_odd_one_out() ? Matrix<double>(local().leftCols(7)) : local();
    ring.forward(bad, layout);
  });
  EXPECT_TRUE(o.same_everywhere) << o.message;
  const int last = mha_test::world_size() - 1;
  EXPECT_NE(o.message.find("x_local is " + std::to_string(layout.rows(last)) + " x 7 but d_model is 8"),
            std::string::npos)
      << o.message;
  EXPECT_NE(o.message.find("on rank " + std::to_string(last) + " of " + std::to_string(mha_test::world_size())),
            std::string::npos)
      << o.message;
  expect_ring_still_works();
}

TEST_F(RingChecks, RowsThatDoNotMatchTheLayoutThrowOnEveryRank) {
  const Outcome o = outcome_of([&] {
    const Matrix<double> rows = local();
    ring.forward(is_odd_one_out() ? Matrix<double>(rows.topRows(rows.rows() - 1)) : rows, layout);
  });
  EXPECT_TRUE(o.same_everywhere) << o.message;
  EXPECT_NE(o.message.find("but the layout gives this rank"), std::string::npos) << o.message;
  expect_ring_still_works();
}

TEST_F(RingChecks, RanksThatDisagreeOnOptionsThrowOnEveryRank) {
  if (mha_test::world_size() == 1) GTEST_SKIP() << "one rank cannot disagree with itself";
  const Outcome causal = outcome_of([&] { ring.forward(local(), layout, mha_test::causal_if(is_odd_one_out())); });
  EXPECT_TRUE(causal.same_everywhere) << causal.message;
  EXPECT_NE(causal.message.find("the ranks disagree on options.causal: rank 0 has 0 and rank " +
                                std::to_string(mha_test::world_size() - 1) + " has 1"),
            std::string::npos)
      << causal.message;

  AttentionOptions window;
  window.window = is_odd_one_out() ? 5 : 4;
  const Outcome w = outcome_of([&] { ring.forward(local(), layout, window); });
  EXPECT_TRUE(w.same_everywhere) << w.message;
  EXPECT_NE(w.message.find("options.window"), std::string::npos) << w.message;

  // The same shape of key padding, hiding other keys on one rank.
  Eigen::Matrix<bool, 1, Eigen::Dynamic> padded = Eigen::Matrix<bool, 1, Eigen::Dynamic>::Constant(N, false);
  padded(is_odd_one_out() ? 3 : 2) = true;
  AttentionOptions padding;
  padding.key_padding_mask = mha::AttentionMask::blocked(padded);
  const Outcome p = outcome_of([&] { ring.forward(local(), layout, padding); });
  EXPECT_TRUE(p.same_everywhere) << p.message;
  EXPECT_NE(p.message.find("options.key_padding_mask's entries"), std::string::npos) << p.message;
  expect_ring_still_works();
}

TEST_F(RingChecks, RanksThatDisagreeOnTheLayoutOrTheModuleThrowOnEveryRank) {
  if (mha_test::world_size() == 1) GTEST_SKIP() << "one rank cannot disagree with itself";
  const int P = mha_test::world_size();
  // Zigzag on the last rank, contiguous elsewhere: its rows are checked against its own layout,
  // and the layouts against each other.
  const SequenceLayout mine = is_odd_one_out() ? SequenceLayout::zigzag(N, P) : layout;
  const Outcome l = outcome_of([&] { ring.forward(mine.local_rows(x, ring.rank()), mine, AttentionOptions{}); });
  EXPECT_TRUE(l.same_everywhere) << l.message;
  EXPECT_NE(l.message.find("the ranks disagree on the query layout"), std::string::npos) << l.message;

  // A module of another shape on one rank.
  const MultiHeadAttention<double> other(mha_test::config(8, is_odd_one_out() ? 4 : 2, 0, 0, 3));
  RingAttention<double> odd(other, MPI_COMM_WORLD);
  const Outcome m = outcome_of([&] { odd.forward(local(), layout); });
  EXPECT_TRUE(m.same_everywhere) << m.message;
  EXPECT_NE(m.message.find("the ranks disagree on config.num_heads"), std::string::npos) << m.message;
  expect_ring_still_works();
}

TEST_F(RingChecks, UnsupportedOptionsAreRefusedOnEveryRank) {
  AttentionOptions masked;
  masked.mask = mha::AttentionMask::additive(Matrix<double>::Zero(N, N));
  const Outcome mask = outcome_of([&] { ring.forward(local(), layout, masked); });
  EXPECT_TRUE(mask.same_everywhere) << mask.message;
  EXPECT_NE(mask.message.find("options.mask (40 x 40) is not supported"), std::string::npos) << mask.message;

  AttentionOptions wrong_padding;
  wrong_padding.key_padding_mask = mha::AttentionMask::blocked(Eigen::Matrix<bool, 1, Eigen::Dynamic>::Zero(N - 1));
  const Outcome p = outcome_of([&] { ring.forward(local(), layout, wrong_padding); });
  EXPECT_TRUE(p.same_everywhere) << p.message;
  EXPECT_NE(p.message.find("options.key_padding_mask is 1 x 39 but must be 1 x S = 1 x 40"), std::string::npos)
      << p.message;

  // Dropout in training runs (tests/mpi/test_ring_backward.cpp), but every rank must draw the same
  // pattern.
  if (mha_test::world_size() > 1) {
    mha::MultiHeadAttentionConfig c = mha_test::config(8, 2);
    c.dropout = 0.1;
    const MultiHeadAttention<double> dropping(c);
    RingAttention<double> ring_dropping(dropping, MPI_COMM_WORLD);
    AttentionOptions training;
    training.training = true;
    training.dropout_seed = is_odd_one_out() ? 2 : 1;
    const Outcome d = outcome_of([&] { ring_dropping.forward(local(), layout, training); });
    EXPECT_TRUE(d.same_everywhere) << d.message;
    EXPECT_NE(d.message.find("the ranks disagree on options.dropout_seed"), std::string::npos) << d.message;
  }

  const SequenceLayout too_few = SequenceLayout::contiguous(N, mha_test::world_size() + 1);
  const Outcome r = outcome_of([&] { ring.forward(local(), too_few); });
  EXPECT_TRUE(r.same_everywhere) << r.message;
  EXPECT_NE(r.message.find("spreads the sequence over " + std::to_string(mha_test::world_size() + 1) + " ranks"),
            std::string::npos)
      << r.message;
  expect_ring_still_works();
}

TEST_F(RingChecks, ARefusedForwardLeavesTheTapeUnchanged) {
  mha::distributed::RingTape<double> tape;
  const Outcome o = outcome_of([&] {
    const Matrix<double> bad = is_odd_one_out() ? Matrix<double>(local().leftCols(7)) : local();
    ring.forward(bad, layout, AttentionOptions{}, tape);
  });
  EXPECT_TRUE(o.same_everywhere) << o.message;
  EXPECT_TRUE(tape.empty());
}

// ---- The backward pass ----

class RingBackwardChecks : public RingChecks {
 protected:
  const Matrix<double> d_output = mha_test::random_matrix<double>(N, 8, 2);
  Matrix<double> local_d_output() const { return layout.local_rows(d_output, ring.rank()); }
  mha::distributed::RingTape<double> record(const AttentionOptions& options = {}) {
    mha::distributed::RingTape<double> tape;
    ring.forward(local(), layout, options, tape);
    return tape;
  }
  /// Gradients that are not zero, to see that a refused backward leaves them unchanged.
  MultiHeadAttention<double>::Gradients gradients() const {
    auto g = module.zero_gradients();
    for (auto& p : g.parameters()) p.value.setConstant(0.5);
    return g;
  }
  /// After a refused backward the ring's backward must still work: no message left in flight.
  void expect_backward_still_works(const mha::distributed::RingTape<double>& tape) {
    auto g = module.zero_gradients();
    const auto d = ring.backward(tape, local_d_output(), g);
    mha::Tape<double> whole;
    module.forward(x, AttentionOptions{}, whole);
    auto expected = module.zero_gradients();
    const auto d_expected = module.backward(whole, d_output, expected);
    EXPECT_TRUE(
        mha_test::close(d.self_attention(), layout.local_rows(d_expected.self_attention(), ring.rank()), 1e-12));
    EXPECT_TRUE(mha_test::close(g.w_q(), expected.w_q(), 1e-12));
  }
  static bool unchanged(MultiHeadAttention<double>::Gradients& g) {
    for (const auto& p : g.parameters())
      if (!(p.value.array() == 0.5).all()) return false;
    return true;
  }
};

TEST_F(RingBackwardChecks, AWrongDOutputOnOneRankThrowsTheSameOnEveryRankAndChangesNothing) {
  const auto tape = record();
  auto g = gradients();
  const Outcome o = outcome_of([&] {
    const Matrix<double> rows = local_d_output();
    ring.backward(tape, is_odd_one_out() ? Matrix<double>(rows.leftCols(7)) : rows, g);
  });
  EXPECT_TRUE(o.same_everywhere) << o.message;
  const int last = mha_test::world_size() - 1;
  EXPECT_NE(o.message.find("RingAttention::backward: d_output is " + std::to_string(layout.rows(last)) +
                           " x 7 but this rank's output of the forward was " + std::to_string(layout.rows(last)) +
                           " x 8 (on rank " + std::to_string(last)),
            std::string::npos)
      << o.message;
  EXPECT_TRUE(unchanged(g));
  // Rows missing on one rank.
  const Outcome rows = outcome_of([&] {
    const Matrix<double> d = local_d_output();
    ring.backward(tape, is_odd_one_out() ? Matrix<double>(d.topRows(d.rows() - 1)) : d, g);
  });
  EXPECT_TRUE(rows.same_everywhere) << rows.message;
  EXPECT_NE(rows.message.find("d_output is"), std::string::npos) << rows.message;
  EXPECT_TRUE(unchanged(g));
  expect_backward_still_works(tape);
}

TEST_F(RingBackwardChecks, ATapeOfAnotherCallOnOneRankThrowsOnEveryRank) {
  if (mha_test::world_size() == 1) GTEST_SKIP() << "one rank cannot disagree with itself";
  const auto first = record(mha_test::causal_if(true));
  const auto second = record();
  auto g = gradients();
  const Outcome o = outcome_of([&] { ring.backward(is_odd_one_out() ? first : second, local_d_output(), g); });
  EXPECT_TRUE(o.same_everywhere) << o.message;
  EXPECT_NE(o.message.find("the ranks disagree on the forward call the tape recorded"), std::string::npos) << o.message;
  EXPECT_TRUE(unchanged(g));
  expect_backward_still_works(second);
}

TEST_F(RingBackwardChecks, AnEmptyTapeATapeOfAnotherRingOrGradientsOfAnotherShapeThrowOnEveryRank) {
  const auto tape = record();
  auto g = gradients();
  const mha::distributed::RingTape<double> empty;
  const Outcome e = outcome_of([&] { ring.backward(is_odd_one_out() ? empty : tape, local_d_output(), g); });
  EXPECT_TRUE(e.same_everywhere) << e.message;
  EXPECT_NE(e.message.find("the tape is empty"), std::string::npos) << e.message;

  RingAttention<double> other(module, MPI_COMM_WORLD);
  const Outcome r = outcome_of([&] { other.backward(tape, local_d_output(), g); });
  EXPECT_TRUE(r.same_everywhere) << r.message;
  EXPECT_NE(r.message.find("the tape was recorded by another RingAttention"), std::string::npos) << r.message;

  const MultiHeadAttention<double> wider(mha_test::config(8, 4));
  auto wrong = wider.zero_gradients();
  const Outcome s = outcome_of([&] { ring.backward(tape, local_d_output(), is_odd_one_out() ? wrong : g); });
  EXPECT_TRUE(s.same_everywhere) << s.message;
  EXPECT_NE(s.message.find("gradients are for a module of another shape"), std::string::npos) << s.message;
  EXPECT_TRUE(unchanged(g));
  expect_backward_still_works(tape);
}

}  // namespace
