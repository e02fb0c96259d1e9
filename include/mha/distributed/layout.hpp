// mha — how the rows of one sequence are spread over the ranks of a ring: which global rows each
// rank holds, contiguous blocks or the zigzag layout that balances causal attention. Needs no MPI:
// splitting a sequence into a rank's rows, and placing a rank's rows back, are plain copies.
#pragma once

#include <mha/detail/checks.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace mha {
namespace distributed {

namespace detail {

/// FNV-1a over the bytes of values: a 64-bit number that differs, but for a one-in-2^64 chance,
/// between sequences of values that differ, which ranks compare instead of sending the values.
class Fingerprint {
 public:
  /// Adds the bytes of a trivially copyable value.
  template <typename T>
  void add(const T& value) {
    static_assert(std::is_trivially_copyable<T>::value, "Fingerprint::add: T must be trivially copyable");
    unsigned char bytes[sizeof(T)];
    std::memcpy(bytes, &value, sizeof(T));
    for (const unsigned char b : bytes) hash_ = (hash_ ^ b) * 0x100000001b3ull;
  }
  std::uint64_t value() const { return hash_; }

 private:
  std::uint64_t hash_ = 0xcbf29ce484222325ull;
};

}  // namespace detail

/// Global rows begin … begin + size − 1 of a sequence.
struct RowRange {
  Eigen::Index begin = 0, size = 0;
  /// \returns one past the last row.
  Eigen::Index end() const { return begin + size; }
};

/// The rows of a sequence of `length()` tokens held by each of `ranks()` ranks. A rank holds its
/// ranges one after another, in order: its local row 0 is the first row of its first range.
///
/// contiguous: rank r holds one block of consecutive rows (any sizes, even empty ones). Causal
/// attention is then unbalanced: the last rank's queries see every key, the first rank's only its own.
/// zigzag: the sequence is cut into 2P chunks and rank i holds chunks i and 2P − 1 − i, one early
/// and one late, so that every rank has the same share of the causal triangle (Brandon et al.
/// 2023's striped attention and the zigzag of PyTorch's and Megatron's context parallelism).
class SequenceLayout {
 public:
  using Index = Eigen::Index;

  /// Rank r holds the rows_per_rank[r] rows after those of ranks 0 … r − 1 (uneven sizes allowed).
  static SequenceLayout contiguous(const std::vector<Index>& rows_per_rank) {
    if (rows_per_rank.empty())
      mha::detail::fail("SequenceLayout::contiguous: rows_per_rank is empty; a ring needs a rank");
    SequenceLayout layout;
    Index begin = 0;
    for (std::size_t r = 0; r < rows_per_rank.size(); ++r) {
      if (rows_per_rank[r] < 0)
        mha::detail::fail("SequenceLayout::contiguous: rank ", r, " holds ", rows_per_rank[r],
                          " rows; sizes must be >= 0");
      layout.ranges_.push_back({{begin, rows_per_rank[r]}});
      begin += rows_per_rank[r];
    }
    layout.length_ = begin;
    return layout;
  }

  /// `length` rows in `ranks` contiguous blocks as even as can be: rank r holds rows
  /// ⌊r·N/P⌋ … ⌊(r + 1)·N/P⌋ − 1, sizes differing by one at most.
  static SequenceLayout contiguous(Index length, int ranks) {
    check(length, ranks, "SequenceLayout::contiguous");
    std::vector<Index> rows(static_cast<std::size_t>(ranks));
    for (int r = 0; r < ranks; ++r)
      rows[static_cast<std::size_t>(r)] = cut(length, ranks, r + 1) - cut(length, ranks, r);
    return contiguous(rows);
  }

  /// `length` rows in 2·ranks chunks (chunk c is rows ⌊c·N/2P⌋ … ⌊(c + 1)·N/2P⌋ − 1), rank i holding
  /// chunks i and 2P − 1 − i.
  static SequenceLayout zigzag(Index length, int ranks) {
    check(length, ranks, "SequenceLayout::zigzag");
    SequenceLayout layout;
    layout.length_ = length;
    const int chunks = 2 * ranks;
    const auto chunk = [&](int c) {
      return RowRange{cut(length, chunks, c), cut(length, chunks, c + 1) - cut(length, chunks, c)};
    };
    for (int i = 0; i < ranks; ++i) layout.ranges_.push_back({chunk(i), chunk(chunks - 1 - i)});
    return layout;
  }

  /// \returns the number of rows of the whole sequence.
  Index length() const { return length_; }
  /// \returns the number of ranks the sequence is spread over.
  int ranks() const { return static_cast<int>(ranges_.size()); }
  /// \returns the global row ranges rank `rank` holds, in the order of its local rows.
  const std::vector<RowRange>& ranges(int rank) const { return ranges_[checked(rank, "ranges")]; }
  /// \returns the number of rows rank `rank` holds.
  Index rows(int rank) const {
    Index n = 0;
    for (const RowRange& range : ranges(rank)) n += range.size;
    return n;
  }
  /// \returns the global row of each of rank `rank`'s local rows.
  std::vector<Index> global_rows(int rank) const {
    std::vector<Index> rows;
    for (const RowRange& range : ranges(rank))
      for (Index i = 0; i < range.size; ++i) rows.push_back(range.begin + i);
    return rows;
  }

  /// \returns rank `rank`'s rows of `sequence` (length() × any width), in its local order.
  template <typename Derived>
  Eigen::Matrix<typename Derived::Scalar, Eigen::Dynamic, Eigen::Dynamic> local_rows(
      const Eigen::MatrixBase<Derived>& sequence, int rank) const {
    if (sequence.rows() != length_)
      mha::detail::fail("SequenceLayout::local_rows: sequence is ", mha::detail::shape(sequence),
                        " but the layout has ", length_, " rows");
    Eigen::Matrix<typename Derived::Scalar, Eigen::Dynamic, Eigen::Dynamic> local(rows(rank), sequence.cols());
    Index row = 0;
    for (const RowRange& range : ranges(rank)) {
      local.middleRows(row, range.size) = sequence.middleRows(range.begin, range.size);
      row += range.size;
    }
    return local;
  }

  /// Writes rank `rank`'s local rows `local` into their global rows of `sequence` (length() × width).
  template <typename DerivedLocal, typename DerivedSequence>
  void place_rows(const Eigen::MatrixBase<DerivedLocal>& local, int rank,
                  Eigen::MatrixBase<DerivedSequence>& sequence) const {
    if (local.rows() != rows(rank) || sequence.rows() != length_ || sequence.cols() != local.cols())
      mha::detail::fail("SequenceLayout::place_rows: local is ", mha::detail::shape(local), " and sequence ",
                        mha::detail::shape(sequence), " but rank ", rank, " holds ", rows(rank), " of the layout's ",
                        length_, " rows");
    Index row = 0;
    for (const RowRange& range : ranges(rank)) {
      sequence.middleRows(range.begin, range.size) = local.middleRows(row, range.size);
      row += range.size;
    }
  }

  /// \returns a number that differs, but for a one-in-2^64 chance, between layouts that differ:
  /// what the ranks compare to check that they all use the same layout.
  std::uint64_t fingerprint() const {
    detail::Fingerprint hash;
    hash.add(length_);
    for (const auto& rank : ranges_) {
      hash.add(static_cast<Index>(rank.size()));
      for (const RowRange& range : rank) {
        hash.add(range.begin);
        hash.add(range.size);
      }
    }
    return hash.value();
  }

  bool operator==(const SequenceLayout& other) const {
    if (length_ != other.length_ || ranges_.size() != other.ranges_.size()) return false;
    for (std::size_t r = 0; r < ranges_.size(); ++r) {
      if (ranges_[r].size() != other.ranges_[r].size()) return false;
      for (std::size_t i = 0; i < ranges_[r].size(); ++i)
        if (ranges_[r][i].begin != other.ranges_[r][i].begin || ranges_[r][i].size != other.ranges_[r][i].size)
          return false;
    }
    return true;
  }
  bool operator!=(const SequenceLayout& other) const { return !(*this == other); }

 private:
  SequenceLayout() = default;

  static void check(Index length, int ranks, const char* caller) {
    if (ranks < 1) mha::detail::fail(caller, ": ranks must be >= 1, got ", ranks);
    if (length < 0) mha::detail::fail(caller, ": length must be >= 0, got ", length);
  }
  /// ⌊part·length / parts⌋ without overflowing for any length an Eigen::Index holds.
  static Index cut(Index length, int parts, int part) {
    return (length / parts) * part + (length % parts) * part / parts;
  }
  std::size_t checked(int rank, const char* accessor) const {
    if (rank < 0 || rank >= ranks())
      mha::detail::fail("SequenceLayout::", accessor, "(", rank, "): rank out of range; the layout has ", ranks(),
                        " ranks");
    return static_cast<std::size_t>(rank);
  }

  Index length_ = 0;
  std::vector<std::vector<RowRange>> ranges_;  ///< per rank, its global ranges in local order
};

}  // namespace distributed
}  // namespace mha
