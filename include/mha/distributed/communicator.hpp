// mha — what the distributed passes need of MPI: a communicator of their own, the MPI type of a
// scalar, gathering a sequence spread over the ranks, and the collective check that makes every
// rank throw the same error instead of one rank throwing while the others wait for it forever.
#pragma once

#include <mha/config.hpp>
#include <mha/detail/checks.hpp>
#include <mha/distributed/layout.hpp>
#include <mha/error.hpp>

#include <mpi.h>
#include <Eigen/Core>

#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace mha {
namespace distributed {
namespace detail {

/// \returns the MPI datatype of float or double.
template <typename Scalar>
MPI_Datatype mpi_type() {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "mha::distributed: float or double");
  return std::is_same<Scalar, float>::value ? MPI_FLOAT : MPI_DOUBLE;
}

/// MPI's count of `n` numbers; a message of 2^31 numbers or more is refused (MPI 3's counts are int).
inline int mpi_count(Eigen::Index n, const char* caller) {
  if (n > Eigen::Index(2147483647))
    mha::detail::fail(caller, ": a message of ", n, " numbers is more than MPI's int count holds; use more ranks");
  return static_cast<int>(n);
}

/// A duplicate of the user's communicator: the passes' messages can never match the user's own.
/// Freed when destroyed, unless MPI has already been finalised.
class Communicator {
 public:
  explicit Communicator(MPI_Comm comm) {
    int initialised = 0;
    MPI_Initialized(&initialised);
    if (!initialised) mha::detail::fail("mha::distributed: MPI is not initialised; call MPI_Init first");
    MPI_Comm_dup(comm, &comm_);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;
  Communicator(Communicator&& other) noexcept { swap(other); }
  Communicator& operator=(Communicator&& other) noexcept {
    swap(other);
    return *this;
  }
  ~Communicator() {
    int finalised = 0;
    MPI_Finalized(&finalised);
    if (comm_ != MPI_COMM_NULL && !finalised) MPI_Comm_free(&comm_);
  }

  MPI_Comm get() const { return comm_; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  /// The rank after this one on the ring, and the one before it.
  int next() const { return (rank_ + 1) % size_; }
  int previous() const { return (rank_ + size_ - 1) % size_; }

 private:
  void swap(Communicator& other) noexcept {
    std::swap(comm_, other.comm_);
    std::swap(rank_, other.rank_);
    std::swap(size_, other.size_);
  }
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
};

/// The collective check of a distributed call's arguments. Each rank runs its own checks through
/// local() (an mha::invalid_argument they throw is kept, not thrown) and names through agree() the
/// values every rank must share (shapes, lengths, options); finish() then exchanges them all in
/// two collectives and, if any rank failed or any value differs between ranks, throws on every rank
/// the same mha::invalid_argument: the first failing rank's message, or the first value on which
/// the ranks disagree with the values of rank 0 and of the first rank that differs. No rank is left
/// waiting on a message from a rank that threw.
class CollectiveCheck {
 public:
  CollectiveCheck(const Communicator& comm, const char* caller) : comm_(comm), caller_(caller) {}

  /// Runs `checks`, keeping the message of the first mha::invalid_argument it throws.
  template <typename Checks>
  void local(const Checks& checks) {
    if (!error_.empty()) return;
    try {
      checks();
    } catch (const mha::invalid_argument& e) {
      error_ = e.what();
      if (error_.rfind("mha: ", 0) == 0) error_.erase(0, 5);
    }
  }

  /// A value every rank must pass the same (in the same order of agree() calls on every rank).
  void agree(std::string name, std::int64_t value) { values_.push_back({std::move(name), value, false}); }
  /// A floating-point value every rank must pass the same, bit for bit.
  void agree(std::string name, double value) {
    std::int64_t bits = 0;
    std::memcpy(&bits, &value, sizeof bits);
    values_.push_back({std::move(name), bits, true});
  }
  void agree(std::string name, bool value) { agree(std::move(name), std::int64_t(value)); }
  /// The entries of a matrix every rank must pass the same, bit for bit (compared through their
  /// fingerprint).
  template <typename Derived>
  void agree_entries(std::string name, const Eigen::DenseBase<Derived>& x) {
    Fingerprint hash;
    for (Eigen::Index j = 0; j < x.cols(); ++j)
      for (Eigen::Index i = 0; i < x.rows(); ++i) hash.add(x.derived().coeff(i, j));
    agree(std::move(name), static_cast<std::int64_t>(hash.value()));
  }
  /// The shape of the module every rank must run: its widths, heads, biases and rotation.
  void agree_module(const MultiHeadAttentionConfig& c) {
    agree("config.d_model", static_cast<std::int64_t>(c.d_model));
    agree("config.num_heads", static_cast<std::int64_t>(c.num_heads));
    agree("config.num_kv_heads", static_cast<std::int64_t>(c.num_kv_heads));
    agree("config.d_k", static_cast<std::int64_t>(c.d_k));
    agree("config.d_v", static_cast<std::int64_t>(c.d_v));
    agree("config.kdim", static_cast<std::int64_t>(c.kdim));
    agree("config.vdim", static_cast<std::int64_t>(c.vdim));
    agree("config.bias", c.bias);
    agree("config.rotary", c.rotary);
    agree("config.rotary_base", c.rotary_base);
    agree("config.rotary_pairs", static_cast<std::int64_t>(c.rotary_pairs));
  }

  /// Collective: throws the same mha::invalid_argument on every rank if any rank failed its checks
  /// or the ranks disagree; returns on every rank otherwise.
  void finish() const {
    const int P = comm_.size();
    // 1. Whether each rank failed, the length of its message and how many values it agrees on.
    const std::int64_t head[3] = {error_.empty() ? 0 : 1, static_cast<std::int64_t>(error_.size()),
                                  static_cast<std::int64_t>(values_.size())};
    std::vector<std::int64_t> heads(static_cast<std::size_t>(3 * P));
    MPI_Allgather(head, 3, MPI_INT64_T, heads.data(), 3, MPI_INT64_T, comm_.get());
    int first_failed = -1;
    for (int r = 0; r < P && first_failed < 0; ++r)
      if (heads[static_cast<std::size_t>(3 * r)]) first_failed = r;
    if (first_failed >= 0) {
      // 2a. The failing ranks' messages, of which every rank throws the first.
      std::vector<int> counts(static_cast<std::size_t>(P)), offsets(static_cast<std::size_t>(P), 0);
      for (int r = 0; r < P; ++r)
        counts[static_cast<std::size_t>(r)] = static_cast<int>(heads[static_cast<std::size_t>(3 * r + 1)]);
      for (int r = 1; r < P; ++r)
        offsets[static_cast<std::size_t>(r)] =
            offsets[static_cast<std::size_t>(r - 1)] + counts[static_cast<std::size_t>(r - 1)];
      std::string all(static_cast<std::size_t>(offsets.back() + counts.back()), '\0');
      MPI_Allgatherv(error_.data(), static_cast<int>(error_.size()), MPI_CHAR, all.data(), counts.data(),
                     offsets.data(), MPI_CHAR, comm_.get());
      const auto f = static_cast<std::size_t>(first_failed);
      mha::detail::fail(all.substr(static_cast<std::size_t>(offsets[f]), static_cast<std::size_t>(counts[f])),
                        " (on rank ", first_failed, " of ", P, ")");
    }
    for (int r = 1; r < P; ++r)
      if (heads[static_cast<std::size_t>(3 * r + 2)] != heads[2])
        mha::detail::fail(caller_, ": rank ", r, " checks ", heads[static_cast<std::size_t>(3 * r + 2)],
                          " values and rank 0 checks ", heads[2], "; do all ranks call the same function?");
    // 2b. The values, compared with rank 0's.
    const std::size_t n = values_.size();
    std::vector<std::int64_t> mine(n), all(n * static_cast<std::size_t>(P));
    for (std::size_t i = 0; i < n; ++i) mine[i] = values_[i].bits;
    MPI_Allgather(mine.data(), static_cast<int>(n), MPI_INT64_T, all.data(), static_cast<int>(n), MPI_INT64_T,
                  comm_.get());
    for (std::size_t i = 0; i < n; ++i)
      for (int r = 1; r < P; ++r) {
        const std::int64_t theirs = all[static_cast<std::size_t>(r) * n + i], first = all[i];
        if (theirs != first)
          mha::detail::fail(caller_, ": the ranks disagree on ", values_[i].name, ": rank 0 has ",
                            show(values_[i], first), " and rank ", r, " has ", show(values_[i], theirs),
                            "; every rank must pass the same");
      }
  }

 private:
  struct Value {
    std::string name;
    std::int64_t bits;
    bool is_double;
  };
  static std::string show(const Value& v, std::int64_t bits) {
    std::ostringstream out;
    if (v.is_double) {
      double d = 0;
      std::memcpy(&d, &bits, sizeof d);
      out << d;
    } else {
      out << bits;
    }
    return out.str();
  }

  const Communicator& comm_;
  const char* caller_;
  std::string error_;
  std::vector<Value> values_;
};

}  // namespace detail

/// Collective: \returns on every rank the whole sequence (layout.length() × width) whose rows
/// are spread over the ranks of `comm` as `layout` says, each rank passing its own rows `local`
/// (layout.rows(rank) × width). For checking and for small outputs: it holds the whole sequence.
template <typename Derived>
Eigen::Matrix<typename Derived::Scalar, Eigen::Dynamic, Eigen::Dynamic> gather_rows(
    const Eigen::MatrixBase<Derived>& local, const SequenceLayout& layout, MPI_Comm comm) {
  using Scalar = typename Derived::Scalar;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  const detail::Communicator ring(comm);
  const char* caller = "mha::distributed::gather_rows";
  detail::CollectiveCheck check(ring, caller);
  check.local([&] {
    if (layout.ranks() != ring.size())
      mha::detail::fail(caller, ": the layout has ", layout.ranks(), " ranks but the communicator ", ring.size());
    if (local.rows() != layout.rows(ring.rank()))
      mha::detail::fail(caller, ": local is ", mha::detail::shape(local), " but the layout gives this rank ",
                        layout.rows(ring.rank()), " rows");
  });
  check.agree("the layout", static_cast<std::int64_t>(layout.fingerprint()));
  check.agree("the width of local", static_cast<std::int64_t>(local.cols()));
  check.finish();
  // Row-major copies, so that each rank's rows are one run of numbers in the gathered buffer.
  using RowMajor = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const RowMajor mine = local;
  const int P = ring.size();
  std::vector<int> counts(static_cast<std::size_t>(P)), offsets(static_cast<std::size_t>(P), 0);
  for (int r = 0; r < P; ++r)
    counts[static_cast<std::size_t>(r)] = detail::mpi_count(layout.rows(r) * local.cols(), caller);
  for (int r = 1; r < P; ++r)
    offsets[static_cast<std::size_t>(r)] =
        offsets[static_cast<std::size_t>(r - 1)] + counts[static_cast<std::size_t>(r - 1)];
  RowMajor stacked(layout.length(), local.cols());  // rank 0's rows, then rank 1's, …
  MPI_Allgatherv(mine.data(), counts[static_cast<std::size_t>(ring.rank())], detail::mpi_type<Scalar>(), stacked.data(),
                 counts.data(), offsets.data(), detail::mpi_type<Scalar>(), ring.get());
  Matrix sequence(layout.length(), local.cols());
  Eigen::Index row = 0;
  for (int r = 0; r < P; ++r) {
    const Eigen::Index n = layout.rows(r);
    auto rows = sequence.topRows(layout.length());  // a block, as place_rows takes
    layout.place_rows(Matrix(stacked.middleRows(row, n)), r, rows);
    row += n;
  }
  return sequence;
}

}  // namespace distributed
}  // namespace mha
