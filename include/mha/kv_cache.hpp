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
/// of every token a decoder has seen, per sequence of a batch and per key/value head: keys(b, j) is
/// length(b) × d_k and values(b, j) length(b) × d_v, each head's tokens contiguous (head-major), so
/// that a decode step reads each head's keys and values as one stream. With grouped-query attention
/// (num_kv_heads < num_heads) the cache is num_heads / num_kv_heads times smaller.
/// MultiHeadAttention::decode appends to it; reset() and truncate() roll it back. Storage grows by
/// doubling (amortised O(1) per token; the tokens held are copied once per doubling) unless
/// max_length fixes the capacity, which is then allocated at once, and a decode step that would
/// exceed it throws, leaving the cache unchanged.
/// The tokens it holds belong to one module (one layer of a model) and were attended with one
/// window and scale: its owner(), which a decode step by anyone else is refused for.
template <typename Scalar>
class KVCache {
 public:
  /// Row-major: a head's token rows, each d_k (or d_v) contiguous numbers, one after another.
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Index = Eigen::Index;

  /// An empty cache for `sequences` sequences of a module configured by `config`, holding up to
  /// `max_length` tokens per sequence (0: no limit). Throws mha::invalid_argument on a bad argument.
  explicit KVCache(const MultiHeadAttentionConfig& config, Index sequences = 1, Index max_length = 0)
      : config_(config.resolved()), max_length_(max_length) {
    if (sequences < 1) detail::fail("KVCache: sequences must be >= 1, got ", sequences);
    if (max_length < 0) detail::fail("KVCache: max_length must be >= 0 (0 = no limit), got ", max_length);
    const auto count = static_cast<std::size_t>(sequences * config_.num_kv_heads);
    keys_.resize(count);
    values_.resize(count);
    for (std::size_t slot = 0; slot < count; ++slot) {
      keys_[slot].resize(max_length, config_.d_k);
      values_[slot].resize(max_length, config_.d_v);
    }
    lengths_.assign(static_cast<std::size_t>(sequences), 0);
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
  /// \returns h_kv·d_k, the width of the keys a decode step appends (every head's, side by side).
  Index key_width() const { return config_.num_kv_heads * config_.d_k; }
  /// \returns h_kv·d_v, the width of the values a decode step appends.
  Index value_width() const { return config_.num_kv_heads * config_.d_v; }

  /// \returns the number of key/value heads, h_kv.
  Index kv_heads() const { return config_.num_kv_heads; }

  /// \returns the cached keys of `sequence` for key/value head `kv_head`: length × d_k, one
  /// contiguous row-major block.
  auto keys(Index sequence, Index kv_head) const {
    return keys_[slot(sequence, kv_head, "keys")].topRows(lengths_[static_cast<std::size_t>(sequence)]);
  }
  /// \returns the cached values of `sequence` for key/value head `kv_head`: length × d_v.
  auto values(Index sequence, Index kv_head) const {
    return values_[slot(sequence, kv_head, "values")].topRows(lengths_[static_cast<std::size_t>(sequence)]);
  }

  /// \returns the bytes the cache has allocated (its capacity, not only its length).
  std::size_t bytes() const {
    std::size_t n = 0;
    for (std::size_t s = 0; s < keys_.size(); ++s)
      n += static_cast<std::size_t>(keys_[s].size() + values_[s].size()) * sizeof(Scalar);
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
  /// queries attended with; or, with `cross`, the module that projected a cross-attention memory
  /// into it (MultiHeadAttention::make_cross_cache), which decode_cross reads and nothing appends to.
  struct Owner {
    std::uint64_t module = 0;
    Index window = 0;
    double scale = 0;
    bool cross = false;
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
    if (owner_.cross || owner.cross)
      detail::fail(caller,
                   ": the cache holds a cross-attention memory (make_cross_cache), which decode_cross reads and "
                   "nothing appends to; decode appends to a cache made with make_cache()");
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
    // Grow first (each head's keys and values on their own, so that a growth that threw leaves
    // every head usable), then write: nothing changes the lengths before every allocation is done.
    const Index h_kv = kv_heads();
    for (std::size_t b = 0; b < lengths.size(); ++b)
      for (std::size_t s = b * static_cast<std::size_t>(h_kv); s < (b + 1) * static_cast<std::size_t>(h_kv); ++s)
        for (Matrix* storage : {&keys_[s], &values_[s]}) {
          const Index needed = lengths_[b] + lengths[b];
          if (needed <= storage->rows()) continue;
          // Row-major: the tokens held are the first length × width numbers.
          Matrix grown(std::max<Index>({needed, 2 * storage->rows(), 16}), storage->cols());
          std::copy_n(storage->data(), lengths_[b] * storage->cols(), grown.data());
          storage->swap(grown);
        }
    // Rows first … first + count − 1 of head j's columns of `from` after the `at` rows of `to`.
    const auto write = [](const auto& from, Index first, Index count, Index j, Matrix& to, Index at) {
      const Index width = to.cols();
      for (Index r = 0; r < count; ++r)
        for (Index c = 0; c < width; ++c) to(at + r, c) = from(first + r, j * width + c);
    };
    Index row = 0;
    for (std::size_t b = 0; b < lengths.size(); ++b) {
      for (Index j = 0; j < h_kv; ++j) {
        const std::size_t s = b * static_cast<std::size_t>(h_kv) + static_cast<std::size_t>(j);
        write(keys, row, lengths[b], j, keys_[s], lengths_[b]);
        write(values, row, lengths[b], j, values_[s], lengths_[b]);
      }
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
  /// Where head `kv_head` of `sequence` is kept in keys_ and values_.
  std::size_t slot(Index sequence, Index kv_head, const char* accessor) const {
    const std::size_t b = checked(sequence, accessor);
    if (kv_head < 0 || kv_head >= kv_heads())
      detail::fail("KVCache::", accessor, ": kv_head ", kv_head, " out of range; the cache holds ", kv_heads(),
                   " key/value heads");
    return b * static_cast<std::size_t>(kv_heads()) + static_cast<std::size_t>(kv_head);
  }

  MultiHeadAttentionConfig config_;  ///< of the module it was made for
  Owner owner_;
  Index max_length_;
  /// Per sequence b and key/value head j, at b·h_kv + j: capacity × d_k (d_v), the first length(b)
  /// rows used.
  std::vector<Matrix> keys_, values_;
  std::vector<Index> lengths_;
};

}  // namespace mha
