// mha — the key/value cache of a decoder: each sequence's projected keys and values so far, so that
// a decode step projects only its new tokens instead of recomputing everything.
#pragma once

#include <mha/config.hpp>
#include <mha/detail/decode_workspace.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace mha {

template <typename Scalar>
class MultiHeadAttention;

namespace detail {

/// Who decoded the tokens a cache holds: a module's identity and the window and scale its queries
/// attended with; or, with `cross`, the module that projected a cross-attention memory into it
/// (MultiHeadAttention::make_cross_cache), which decode_cross reads and nothing appends to.
struct CacheOwner {
  std::uint64_t module = 0;
  Eigen::Index window = 0;
  double scale = 0;
  bool cross = false;
};

}  // namespace detail

/// The keys K W^K (+ b^K, turned by their positions with rotary embeddings) and values V W^V (+ b^V)
/// of the tokens a decoder has seen, per sequence of a batch and per key/value head: keys(b, j) is
/// held(b) × d_k and values(b, j) held(b) × d_v, each head's tokens contiguous (head-major), so
/// that a decode step reads each head's keys and values as one stream. With grouped-query attention
/// (num_kv_heads < num_heads) the cache is num_heads / num_kv_heads times smaller.
///
/// Storage is the type the numbers are kept in: Scalar, or Eigen::bfloat16 or Eigen::half for a
/// cache of half the bytes (a decode step reads every cached number, so it runs up to twice as
/// fast). Decoding converts them back to Scalar in registers and computes and accumulates in Scalar:
/// only the rounding of each stored number differs (bfloat16: 8 significant bits, relative 2^-9;
/// half: 11 bits, 2^-12, and numbers above 65504 overflow to infinity).
///
/// MultiHeadAttention::decode appends to it; reset() and truncate() roll it back. Storage grows by
/// doubling (amortised O(1) per token; the tokens held are copied once per doubling) unless
/// max_length fixes the capacity, which is then allocated at once, and a decode step that would
/// exceed it throws, leaving the cache unchanged. A rolling cache (KVCache::rolling, for a sliding
/// window of W keys) keeps only what the next step can see, about the last W tokens of each
/// sequence, in memory allocated once: length(b) counts every token decoded, held(b) those kept.
/// The tokens it holds belong to one module (one layer of a model) and were attended with one
/// window and scale: its owner(), which a decode step by anyone else is refused for.
template <typename Scalar, typename Storage = Scalar>
class KVCache {
  static_assert(std::is_same<Storage, Scalar>::value || std::is_same<Storage, Eigen::bfloat16>::value ||
                    std::is_same<Storage, Eigen::half>::value,
                "mha::KVCache: Storage must be the Scalar, Eigen::bfloat16 or Eigen::half");

 public:
  /// Row-major: a head's token rows, each d_k (or d_v) contiguous numbers, one after another.
  using Matrix = Eigen::Matrix<Storage, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Index = Eigen::Index;
  using StorageType = Storage;

  /// An empty cache for `sequences` sequences of a module configured by `config`, holding up to
  /// `max_length` tokens per sequence (0: no limit). Throws mha::invalid_argument on a bad argument.
  explicit KVCache(const MultiHeadAttentionConfig& config, Index sequences = 1, Index max_length = 0)
      : KVCache(config, sequences, max_length, 0) {}

  /// An empty rolling cache for decoding with options.window = `window` (or any smaller window):
  /// each sequence keeps only its last tokens (at least window − 1 before a step, which is all the
  /// step's first new token can see), in `window` + max(window/8, 16) rows per head allocated at once, so
  /// that decoding never allocates. A step of more new tokens than that (a long prompt) grows it.
  static KVCache rolling(const MultiHeadAttentionConfig& config, Index window, Index sequences = 1) {
    if (window < 1) detail::fail("KVCache::rolling: window must be >= 1, got ", window);
    // Its room, window + max(window/8, 16) rows, must be a number of rows.
    if (window > std::numeric_limits<Index>::max() / 2)
      detail::fail("KVCache::rolling: window ", window, " is too large");
    return KVCache(config, sequences, 0, window);
  }

  /// \returns the configuration of the module the cache was made for, resolved.
  const MultiHeadAttentionConfig& config() const { return config_; }
  /// \returns whether no sequence holds a token.
  bool empty() const {
    return std::all_of(held_.begin(), held_.end(), [](Index n) { return n == 0; });
  }
  /// \returns the number of sequences.
  Index sequences() const { return static_cast<Index>(lengths_.size()); }
  /// \returns the number of tokens decoded into `sequence`: the position of its next token.
  Index length(Index sequence = 0) const { return lengths_[checked(sequence, "length")]; }
  /// \returns the number of tokens of `sequence` the cache holds, the last ones decoded: length()
  /// but in a rolling cache, which forgets tokens no window can see any more.
  Index held(Index sequence = 0) const { return held_[checked(sequence, "held")]; }
  /// \returns the tokens `sequence` can hold before its storage grows (a decode step that fits
  /// allocates nothing).
  Index capacity(Index sequence = 0) const { return keys_[slot(sequence, 0, "capacity")].rows(); }
  /// \returns the most tokens a sequence may hold, 0 for no limit.
  Index max_length() const { return max_length_; }
  /// \returns the window of a rolling cache, 0 for a cache that keeps every token.
  Index window() const { return window_; }
  /// \returns h_kv·d_k, the width of the keys a decode step appends (every head's, side by side).
  Index key_width() const { return config_.num_kv_heads * config_.d_k; }
  /// \returns h_kv·d_v, the width of the values a decode step appends.
  Index value_width() const { return config_.num_kv_heads * config_.d_v; }

  /// \returns the number of key/value heads, h_kv.
  Index kv_heads() const { return config_.num_kv_heads; }

  /// \returns the cached keys of `sequence` for key/value head `kv_head`: held × d_k, one
  /// contiguous row-major block, oldest token first.
  auto keys(Index sequence, Index kv_head) const {
    return keys_[slot(sequence, kv_head, "keys")].topRows(held_[static_cast<std::size_t>(sequence)]);
  }
  /// \returns the cached values of `sequence` for key/value head `kv_head`: held × d_v.
  auto values(Index sequence, Index kv_head) const {
    return values_[slot(sequence, kv_head, "values")].topRows(held_[static_cast<std::size_t>(sequence)]);
  }

  /// \returns the bytes the cache has allocated for keys and values (its capacity, not only its
  /// length; not the few its decode steps work in).
  std::size_t bytes() const {
    std::size_t n = 0;
    for (std::size_t s = 0; s < keys_.size(); ++s)
      n += static_cast<std::size_t>(keys_[s].size() + values_[s].size()) * sizeof(Storage);
    return n;
  }

  /// Forgets every token of every sequence; the memory is kept for the next ones.
  void reset() {
    std::fill(lengths_.begin(), lengths_.end(), Index(0));
    std::fill(held_.begin(), held_.end(), Index(0));
  }

  /// Keeps only the first `length` tokens of sequence 0 (see truncate(sequence, length)).
  void truncate(Index length) { truncate(0, length); }

  /// Keeps only the first `length` tokens of `sequence`: the rollback of speculative decoding (the
  /// draft tokens that were rejected) or of a beam search. The next decode step continues at
  /// position `length`. A rolling cache can go back only as far as it still holds what the next
  /// step would see (window − 1 tokens before it).
  void truncate(Index sequence, Index length) {
    const std::size_t b = checked(sequence, "truncate");
    if (length < 0 || length > lengths_[b])
      detail::fail("KVCache::truncate: sequence ", sequence, " holds ", lengths_[b], " tokens; cannot truncate it to ",
                   length);
    const Index forgotten = lengths_[b] - held_[b];
    if (length - forgotten < std::min(length, window_ - 1))
      detail::fail("KVCache::truncate: sequence ", sequence, " of this rolling cache (window ", window_,
                   ") holds its tokens from position ", forgotten, " on; truncated to ", length,
                   " tokens, it would no longer hold the window − 1 before the next one");
    lengths_[b] = length;
    held_[b] = length - forgotten;
  }

  /// Who decoded the tokens the cache holds (detail::CacheOwner).
  using Owner = detail::CacheOwner;

  /// \returns who decoded the tokens the cache holds (meaningful while it holds any).
  const Owner& owner() const { return owner_; }

  /// Throws mha::invalid_argument, naming `caller`, unless sequence b can take lengths[b] more
  /// tokens decoded by `owner` for every b: they fit max_length, the window fits a rolling
  /// cache's, and the cache is empty or already `owner`'s.
  void check_append(const Owner& owner, const std::vector<Index>& lengths, const char* caller) const {
    if (static_cast<Index>(lengths.size()) != sequences())
      detail::fail(caller, ": new_lengths has ", lengths.size(), " sequences but the cache holds ", sequences());
    for (std::size_t b = 0; b < lengths.size(); ++b)
      if (max_length_ > 0 && lengths[b] > max_length_ - lengths_[b])
        detail::fail("KVCache: sequence ", b, " holds ", lengths_[b], " of at most ", max_length_, " tokens; ",
                     lengths[b], " more do not fit (make the cache with a larger max_length, or truncate it)");
    if (window_ > 0 && (owner.window < 1 || owner.window > window_))
      detail::fail(caller, ": this rolling cache keeps what a window of at most ", window_,
                   " keys sees; options.window = ", owner.window, " would need older keys (set options.window to ",
                   window_, ", or make the cache with make_cache())");
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
  /// rows are the next rows of `keys` (ΣL_new × h_kv·d_k) and `values` (ΣL_new × h_kv·d_v), rounded
  /// to Storage. Storage grows by doubling where needed; a rolling cache first forgets the tokens
  /// the window has passed. Throws, leaving the cache unchanged, as check_append does, or
  /// std::bad_alloc.
  template <typename Keys, typename Values>
  void append(const Owner& owner, const std::vector<Index>& lengths, const Keys& keys, const Values& values) {
    check_append(owner, lengths, "KVCache::append");
    if (keys.rows() != values.rows() || keys.cols() != key_width() || values.cols() != value_width())
      detail::fail("KVCache::append: keys are ", detail::shape(keys), " and values ", detail::shape(values),
                   " but the cache holds rows of ", key_width(), " and ", value_width());
    // Grow first, then write: nothing changes the lengths before every allocation is done. A
    // sequence's heads grow together (all allocated, then swapped in), so that they keep one
    // capacity, which the rolling cache's choice to forget below reads.
    const Index h_kv = kv_heads();
    for (std::size_t b = 0; b < lengths.size(); ++b) {
      const std::size_t first_slot = b * static_cast<std::size_t>(h_kv),
                        end_slot = first_slot + static_cast<std::size_t>(h_kv);
      const Index capacity = keys_[first_slot].rows(), needed = rows_needed(b, lengths[b]);
      if (needed <= capacity) continue;
      // A rolling cache grows to what this step needs (its next steps forget again); others double.
      const Index rows = window_ > 0 ? needed : std::max<Index>({needed, 2 * capacity, 16});
      std::vector<Matrix> grown;
      for (std::size_t s = first_slot; s < end_slot; ++s)
        for (const Matrix* storage : {&keys_[s], &values_[s]}) {
          grown.emplace_back(rows, storage->cols());
          // Row-major: the tokens held are the first held × width numbers.
          std::copy_n(storage->data(), held_[b] * storage->cols(), grown.back().data());
        }
      std::size_t g = 0;
      for (std::size_t s = first_slot; s < end_slot; ++s)
        for (Matrix* storage : {&keys_[s], &values_[s]}) storage->swap(grown[g++]);
    }
    // Rows first … first + count − 1 of head j's columns of `from` after the `at` rows of `to`.
    const auto write = [](const auto& from, Index first, Index count, Index j, Matrix& to, Index at) {
      const Index width = to.cols();
      for (Index r = 0; r < count; ++r)
        for (Index c = 0; c < width; ++c) to(at + r, c) = static_cast<Storage>(from(first + r, j * width + c));
    };
    Index row = 0;
    for (std::size_t b = 0; b < lengths.size(); ++b) {
      const std::size_t first_slot = b * static_cast<std::size_t>(h_kv);
      if (window_ > 0 && held_[b] + lengths[b] > keys_[first_slot].rows()) {
        // Forget all but the last window − 1 tokens: moved to the front of each head's rows.
        const Index keep = std::min(held_[b], window_ - 1);
        for (std::size_t s = first_slot; s < first_slot + static_cast<std::size_t>(h_kv); ++s)
          for (Matrix* storage : {&keys_[s], &values_[s]})
            std::copy_n(storage->data() + (held_[b] - keep) * storage->cols(), keep * storage->cols(), storage->data());
        held_[b] = keep;
      }
      for (Index j = 0; j < h_kv; ++j) {
        const std::size_t s = first_slot + static_cast<std::size_t>(j);
        write(keys, row, lengths[b], j, keys_[s], held_[b]);
        write(values, row, lengths[b], j, values_[s], held_[b]);
      }
      held_[b] += lengths[b];
      lengths_[b] += lengths[b];
      row += lengths[b];
    }
    owner_ = owner;
  }

 private:
  friend class MultiHeadAttention<Scalar>;

  KVCache(const MultiHeadAttentionConfig& config, Index sequences, Index max_length, Index window)
      : config_(config.resolved()), max_length_(max_length), window_(window) {
    if (sequences < 1) detail::fail("KVCache: sequences must be >= 1, got ", sequences);
    if (max_length < 0) detail::fail("KVCache: max_length must be >= 0 (0 = no limit), got ", max_length);
    if (sequences > std::numeric_limits<Index>::max() / config_.num_kv_heads)
      detail::fail("KVCache: ", sequences, " sequences of ", config_.num_kv_heads, " key/value heads are too many");
    const Index capacity = window > 0 ? window + std::max<Index>(window / 8, 16) : max_length;
    const auto count = static_cast<std::size_t>(sequences * config_.num_kv_heads);
    keys_.resize(count);
    values_.resize(count);
    for (std::size_t slot = 0; slot < count; ++slot) {
      keys_[slot].resize(capacity, config_.d_k);
      values_[slot].resize(capacity, config_.d_v);
    }
    lengths_.assign(static_cast<std::size_t>(sequences), 0);
    held_ = lengths_;
  }

  /// The rows sequence b's heads need to take `more` tokens: the tokens held and the new ones; in a
  /// rolling cache where they would not fit, the window − 1 it keeps and the new ones.
  Index rows_needed(std::size_t b, Index more) const {
    const Index capacity = keys_[b * static_cast<std::size_t>(kv_heads())].rows();
    if (window_ > 0 && held_[b] + more > capacity) return std::min(held_[b], window_ - 1) + more;
    return held_[b] + more;
  }

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
  Index window_;  ///< of a rolling cache; 0 for one that keeps every token
  /// Per sequence b and key/value head j, at b·h_kv + j: capacity × d_k (d_v), the first held(b)
  /// rows used.
  std::vector<Matrix> keys_, values_;
  std::vector<Index> lengths_;  ///< tokens decoded per sequence
  std::vector<Index> held_;     ///< of which held: the last ones
  /// What decode steps into the cache work in (MultiHeadAttention::run_decode).
  detail::DecodeWorkspace<Scalar> workspace_;
};

/// What MultiHeadAttention::decode_cross(x, memory, out, workspace) and decode_cross_batch(…, out,
/// workspace) work in: the new tokens' queries, the tasks, the parts' outputs and every thread's
/// scratch. A cross-attention memory is only read, and may serve several steps at once (one per
/// thread of the caller's, each with its own workspace), so it keeps no workspace as a self-attention
/// cache does: the caller keeps this one. A step sizes it for its new tokens and the memory's
/// lengths, and the steps after it with no more new tokens, over memories no longer, allocate
/// nothing. Its contents mean nothing
/// between steps, and it belongs to no module or memory; a copy starts empty.
template <typename Scalar>
class CrossDecodeWorkspace {
 public:
  CrossDecodeWorkspace() = default;

 private:
  friend class MultiHeadAttention<Scalar>;
  detail::DecodeWorkspace<Scalar> work;
};

}  // namespace mha
