// mha — the key/value cache of a decoder: each sequence's projected keys and values so far, so that
// a decode step projects only its new tokens instead of recomputing everything.
#pragma once

#include <mha/config.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace mha {

/// The keys K W^K (+ b^K, turned by their positions with rotary embeddings) and values V W^V (+ b^V)
/// of every token a decoder has seen, per sequence of a batch: length(b) × (h_kv·d_k) and
/// length(b) × (h_kv·d_v), key/value head j in column block j. With grouped-query attention
/// (num_kv_heads < num_heads) the cache is num_heads / num_kv_heads times smaller.
/// MultiHeadAttention::decode appends to it; reset() and truncate() roll it back. Storage grows by
/// doubling (amortised O(1) per token) unless max_length fixes the capacity, which is then
/// allocated at once, and a decode step that would exceed it throws, leaving the cache unchanged.
/// The tokens it holds belong to one module (one layer of a model) and were attended with one
/// window and scale: its owner(), which a decode step by anyone else is refused for.
template <typename Scalar>
class KVCache {
 public:
  /// Row-major: a decode step appends whole rows, each one contiguous write.
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Index = Eigen::Index;

  /// An empty cache for `sequences` sequences of a module configured by `config`, holding up to
  /// `max_length` tokens per sequence (0: no limit). Throws mha::invalid_argument on a bad argument.
  explicit KVCache(const MultiHeadAttentionConfig& config, Index sequences = 1, Index max_length = 0)
      : config_(config.resolved()), max_length_(max_length) {
    if (sequences < 1) detail::fail("KVCache: sequences must be >= 1, got ", sequences);
    if (max_length < 0) detail::fail("KVCache: max_length must be >= 0 (0 = no limit), got ", max_length);
    const auto count = static_cast<std::size_t>(sequences);
    keys_.resize(count);
    values_.resize(count);
    for (std::size_t b = 0; b < count; ++b) {
      keys_[b].resize(max_length, key_width());
      values_[b].resize(max_length, value_width());
    }
    lengths_.assign(count, 0);
  }

  /// \returns the configuration of the module the cache was made for, resolved.
  const MultiHeadAttentionConfig& config() const { return config_; }
  /// \returns whether no sequence holds a token.
  bool empty() const {
    return std::all_of(lengths_.begin(), lengths_.end(), [](Index n) { return n == 0; });
  }
  /// \returns the number of sequences.
  Index sequences() const { return static_cast<Index>(lengths_.size()); }
  /// \returns the number of tokens cached for `sequence`.
  Index length(Index sequence = 0) const { return lengths_[checked(sequence, "length")]; }
  /// \returns the most tokens a sequence may hold, 0 for no limit.
  Index max_length() const { return max_length_; }
  /// \returns h_kv·d_k, the width of a cached key row.
  Index key_width() const { return config_.num_kv_heads * config_.d_k; }
  /// \returns h_kv·d_v, the width of a cached value row.
  Index value_width() const { return config_.num_kv_heads * config_.d_v; }

  /// \returns the cached keys of `sequence`, length × (h_kv·d_k), key/value head j in column block j.
  auto keys(Index sequence = 0) const {
    return keys_[checked(sequence, "keys")].topRows(lengths_[static_cast<std::size_t>(sequence)]);
  }
  /// \returns the cached values of `sequence`, length × (h_kv·d_v).
  auto values(Index sequence = 0) const {
    return values_[checked(sequence, "values")].topRows(lengths_[static_cast<std::size_t>(sequence)]);
  }

  /// \returns the bytes the cache has allocated (its capacity, not only its length).
  std::size_t bytes() const {
    std::size_t n = 0;
    for (std::size_t b = 0; b < keys_.size(); ++b)
      n += static_cast<std::size_t>(keys_[b].size() + values_[b].size()) * sizeof(Scalar);
    return n;
  }

  /// Forgets every token of every sequence; the memory is kept for the next ones.
  void reset() { std::fill(lengths_.begin(), lengths_.end(), Index(0)); }

  /// Keeps only the first `length` tokens of sequence 0 (see truncate(sequence, length)).
  void truncate(Index length) { truncate(0, length); }

  /// Keeps only the first `length` tokens of `sequence`: the rollback of speculative decoding (the
  /// draft tokens that were rejected) or of a beam search. The next decode step continues at
  /// position `length`.
  void truncate(Index sequence, Index length) {
    const std::size_t b = checked(sequence, "truncate");
    if (length < 0 || length > lengths_[b])
      detail::fail("KVCache::truncate: sequence ", sequence, " holds ", lengths_[b], " tokens; cannot truncate it to ",
                   length);
    lengths_[b] = length;
  }

  /// Who decoded the tokens a cache holds: a module's identity and the window and scale its
  /// queries attended with.
  struct Owner {
    std::uint64_t module = 0;
    Index window = 0;
    double scale = 0;
  };

  /// \returns who decoded the tokens the cache holds (meaningful while it holds any).
  const Owner& owner() const { return owner_; }

  /// Throws mha::invalid_argument, naming `caller`, unless sequence b can take lengths[b] more
  /// tokens decoded by `owner` for every b: they fit max_length, and the cache is empty or
  /// already `owner`'s.
  void check_append(const Owner& owner, const std::vector<Index>& lengths, const char* caller) const {
    if (static_cast<Index>(lengths.size()) != sequences())
      detail::fail(caller, ": new_lengths has ", lengths.size(), " sequences but the cache holds ", sequences());
    for (std::size_t b = 0; b < lengths.size(); ++b)
      if (max_length_ > 0 && lengths[b] > max_length_ - lengths_[b])
        detail::fail("KVCache: sequence ", b, " holds ", lengths_[b], " of at most ", max_length_, " tokens; ",
                     lengths[b], " more do not fit (make the cache with a larger max_length, or truncate it)");
    if (empty()) return;
    // Tokens of another module, or earlier tokens that saw other keys, would give rows that no
    // forward pass gives.
    if (owner_.module != owner.module)
      detail::fail(caller,
                   ": the cache holds tokens that another module decoded; a cache belongs to one module "
                   "(one layer): make one per layer with make_cache(), or reset() it");
    if (owner_.window != owner.window)
      detail::fail(caller, ": the cache holds tokens decoded with options.window = ", owner_.window,
                   "; options.window = ", owner.window,
                   " would attend over other keys than theirs (reset() the "
                   "cache to change it)");
    if (owner_.scale != owner.scale)
      detail::fail(caller, ": the cache holds tokens decoded with the scale ", owner_.scale, "; options.scale gives ",
                   owner.scale, " (reset() the cache to change it)");
  }

  /// Appends one decode step's keys and values, decoded by `owner`: sequence b's lengths[b] new
  /// rows are the next rows of `keys` (ΣL_new × h_kv·d_k) and `values` (ΣL_new × h_kv·d_v). Storage
  /// grows by doubling where needed. Throws, leaving the cache unchanged, as check_append does, or
  /// std::bad_alloc.
  template <typename Keys, typename Values>
  void append(const Owner& owner, const std::vector<Index>& lengths, const Keys& keys, const Values& values) {
    check_append(owner, lengths, "KVCache::append");
    if (keys.rows() != values.rows() || keys.cols() != key_width() || values.cols() != value_width())
      detail::fail("KVCache::append: keys are ", detail::shape(keys), " and values ", detail::shape(values),
                   " but the cache holds rows of ", key_width(), " and ", value_width());
    // Grow first (the keys and the values each on its own, so that a growth that threw leaves
    // both usable), then write: nothing changes the lengths before every allocation is done.
    for (std::size_t b = 0; b < lengths.size(); ++b)
      for (Matrix* storage : {&keys_[b], &values_[b]}) {
        const Index needed = lengths_[b] + lengths[b];
        if (needed <= storage->rows()) continue;
        // Row-major: the tokens held are the first length × width numbers.
        Matrix grown(std::max<Index>({needed, 2 * storage->rows(), 16}), storage->cols());
        std::copy_n(storage->data(), lengths_[b] * storage->cols(), grown.data());
        storage->swap(grown);
      }
    const auto write = [](const auto& from, Index first, Index count, Matrix& to, Index at) {
      for (Index r = 0; r < count; ++r)
        for (Index c = 0; c < to.cols(); ++c) to(at + r, c) = from(first + r, c);
    };
    Index row = 0;
    for (std::size_t b = 0; b < lengths.size(); ++b) {
      write(keys, row, lengths[b], keys_[b], lengths_[b]);
      write(values, row, lengths[b], values_[b], lengths_[b]);
      lengths_[b] += lengths[b];
      row += lengths[b];
    }
    owner_ = owner;
  }

 private:
  std::size_t checked(Index sequence, const char* accessor) const {
    if (sequence < 0 || sequence >= sequences())
      detail::fail("KVCache::", accessor, ": sequence ", sequence, " out of range; the cache holds ", sequences(),
                   " sequences");
    return static_cast<std::size_t>(sequence);
  }

  MultiHeadAttentionConfig config_;  ///< of the module it was made for
  Owner owner_;
  Index max_length_;
  std::vector<Matrix> keys_, values_;  ///< per sequence: capacity × width, the first length rows used
  std::vector<Index> lengths_;
};

}  // namespace mha
