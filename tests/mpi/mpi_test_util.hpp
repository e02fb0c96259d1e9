// Helpers of the MPI tests: this process's rank, the layouts every test runs over, and the
// agreement of a check across ranks.
#pragma once

#include <mha/distributed/layout.hpp>
#include <mha/error.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <functional>
#include <string>
#include <type_traits>
#include <vector>

namespace mha_test {

/// The tolerance of the ring against one process: a different order of the same sums.
template <typename Scalar>
double ring_tolerance() {
  return std::is_same<Scalar, float>::value ? 1e-5 : 1e-12;
}

inline int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

inline int world_size() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

/// The layouts of N rows over P ranks that the tests run over: even blocks, uneven blocks (with
/// an empty rank from P = 3 on), and the zigzag.
enum class LayoutKind { even, uneven, zigzag };

inline const char* name_of(LayoutKind kind) {
  return kind == LayoutKind::even ? "even" : kind == LayoutKind::uneven ? "uneven" : "zigzag";
}

inline mha::distributed::SequenceLayout make_layout(LayoutKind kind, Eigen::Index N, int P) {
  using mha::distributed::SequenceLayout;
  if (kind == LayoutKind::even) return SequenceLayout::contiguous(N, P);
  if (kind == LayoutKind::zigzag) return SequenceLayout::zigzag(N, P);
  // Rank r gets a share of weight 3, 1, 0, 2, 3, 1, … of the rows; the last rank takes what is left.
  const int weights[4] = {3, 1, 0, 2};
  int total = 0;
  for (int r = 0; r < P; ++r) total += weights[r % 4];
  std::vector<Eigen::Index> rows(static_cast<std::size_t>(P));
  Eigen::Index given = 0;
  for (int r = 0; r + 1 < P; ++r) {
    rows[static_cast<std::size_t>(r)] = N * weights[r % 4] / total;
    given += rows[static_cast<std::size_t>(r)];
  }
  rows.back() = N - given;
  return SequenceLayout::contiguous(rows);
}

/// \returns whether `ok` holds on every rank (collective), so that every rank reports a failure.
inline bool on_every_rank(bool ok) {
  int mine = ok ? 1 : 0, all = 0;
  MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return all == 1;
}

/// The message f() throws on this rank ("no exception" if none), and whether every rank threw an
/// mha::invalid_argument with the same message.
struct Outcome {
  std::string message;
  bool same_everywhere = false;
};

inline Outcome outcome_of(const std::function<void()>& f) {
  Outcome o;
  bool threw = false;
  try {
    f();
    o.message = "no exception";
  } catch (const mha::invalid_argument& e) {
    o.message = e.what();
    threw = true;
  }
  // Rank 0's message against everyone's.
  int length = static_cast<int>(o.message.size());
  MPI_Bcast(&length, 1, MPI_INT, 0, MPI_COMM_WORLD);
  std::string first(static_cast<std::size_t>(length), '\0');
  if (mha_test::world_rank() == 0) first = o.message;
  MPI_Bcast(first.data(), length, MPI_CHAR, 0, MPI_COMM_WORLD);
  o.same_everywhere = mha_test::on_every_rank(threw && first == o.message);
  return o;
}

/// The last rank: the one that passes the bad argument in the tests of bad input.
inline bool is_odd_one_out() { return world_rank() == world_size() - 1; }

}  // namespace mha_test
