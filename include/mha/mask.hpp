// mha — attention masks: which keys a query may attend to, or a bias added to its scores.
#pragma once

#include <Eigen/Core>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>

namespace mha {

/// A mask over the scores of attention, L × S (one for every head) or h·L × S (head i in row
/// block i, as PyTorch's (N·h, L, S) for one sequence). Three conventions, each with its own
/// constructor so that a call site says which one it means:
///   - AttentionMask::blocked(m):  boolean, true = this query may NOT attend to this key
///                                 (PyTorch nn.MultiheadAttention's attn_mask and key_padding_mask);
///   - AttentionMask::allowed(m):  boolean, true = this query MAY attend to this key
///                                 (PyTorch F.scaled_dot_product_attention's boolean attn_mask);
///   - AttentionMask::additive(m): numbers added to the scaled scores (0 keeps a key, −∞ removes
///                                 it, anything between biases it), float or double.
/// A mask made from a named matrix (an lvalue: a matrix, a map over the caller's buffer) views it,
/// without a copy, and that matrix must outlive the attention calls that read it. Made from anything
/// else (a temporary, an expression such as `ids.array() == 0`, a block) it keeps its own copy, so
/// that it can never dangle. A tape (MultiHeadAttention::forward(…, tape)) keeps its own copy of the
/// masks it recorded, since its backward pass may come after the caller's matrix is gone.
class AttentionMask {
 public:
  /// No mask.
  AttentionMask() = default;

  /// A boolean mask, true = may NOT attend (PyTorch nn.MultiheadAttention's convention).
  template <typename M>
  static AttentionMask blocked(M&& mask) {
    return boolean(std::forward<M>(mask), Kind::blocked);
  }
  /// A boolean mask, true = may attend (PyTorch F.scaled_dot_product_attention's convention).
  template <typename M>
  static AttentionMask allowed(M&& mask) {
    return boolean(std::forward<M>(mask), Kind::allowed);
  }
  /// Numbers added to the scaled scores: 0 keeps a key, −∞ removes it.
  template <typename M>
  static AttentionMask additive(M&& mask) {
    using T = typename std::decay_t<M>::Scalar;
    static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                  "mha::AttentionMask::additive takes a float or double matrix");
    return make(std::forward<M>(mask), Kind::additive);
  }

  /// \returns this mask, holding its own copy of the entries if it views a caller's matrix.
  AttentionMask owning() const {
    if (owned_ || kind_ == Kind::none) return *this;
    AttentionMask m = *this;
    switch (element_) {
      case Element::boolean:
        m.copy_entries<bool>();
        break;
      case Element::f32:
        m.copy_entries<float>();
        break;
      case Element::f64:
        m.copy_entries<double>();
        break;
    }
    return m;
  }

  /// \returns whether there is no mask.
  bool empty() const { return kind_ == Kind::none; }
  /// \returns the number of rows of the mask (0 when empty).
  Eigen::Index rows() const { return rows_; }
  /// \returns the number of columns of the mask (0 when empty).
  Eigen::Index cols() const { return cols_; }

  /// \returns the whole mask as an additive matrix of `Scalar`: 0 or −∞ for the boolean
  /// conventions, the numbers themselves for an additive mask; read once per attention call.
  template <typename Scalar>
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> additive_matrix() const {
    Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> out;
    additive_matrix(out);
    return out;
  }
  /// The same into `out`, resized unless it has the mask's shape already (then allocating nothing).
  template <typename Scalar>
  void additive_matrix(Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>& out) const {
    constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
    out.resize(rows_, cols_);
    const auto copy = [&](const auto* data, const auto& value_of) {
      for (Eigen::Index c = 0; c < cols_; ++c)
        for (Eigen::Index r = 0; r < rows_; ++r) out(r, c) = value_of(data[r * row_stride_ + c * col_stride_]);
    };
    // Boolean masks are read through a two-entry table: a branch on random bits mispredicts half
    // the time, which made the conversion ten times slower than the table.
    const Scalar blocked_table[2] = {Scalar(0), minus_infinity}, allowed_table[2] = {minus_infinity, Scalar(0)};
    switch (kind_) {
      case Kind::blocked:
        copy(static_cast<const bool*>(data_), [&](bool b) { return blocked_table[b]; });
        break;
      case Kind::allowed:
        copy(static_cast<const bool*>(data_), [&](bool b) { return allowed_table[b]; });
        break;
      case Kind::additive:
        if (element_ == Element::f32)
          copy(static_cast<const float*>(data_), [](float x) { return static_cast<Scalar>(x); });
        else
          copy(static_cast<const double*>(data_), [](double x) { return static_cast<Scalar>(x); });
        break;
      case Kind::none:
        break;
    }
  }

 private:
  enum class Kind { none, blocked, allowed, additive };
  enum class Element { boolean, f32, f64 };

  template <typename M>
  static AttentionMask boolean(M&& mask, Kind kind) {
    static_assert(std::is_same<typename std::decay_t<M>::Scalar, bool>::value,
                  "mha::AttentionMask::blocked and ::allowed take a bool matrix (e.g. ids.array() == 0)");
    return make(std::forward<M>(mask), kind);
  }

  template <typename M>
  static AttentionMask make(M&& mask, Kind kind) {
    using Derived = std::decay_t<M>;
    static_assert(std::is_base_of<Eigen::DenseBase<Derived>, Derived>::value,
                  "mha::AttentionMask is made from an Eigen matrix or expression");
    using T = typename Derived::Scalar;
    AttentionMask m;
    m.kind_ = kind;
    m.element_ = std::is_same<T, bool>::value    ? Element::boolean
                 : std::is_same<T, float>::value ? Element::f32
                                                 : Element::f64;
    m.rows_ = mask.rows();
    m.cols_ = mask.cols();
    if constexpr (std::is_lvalue_reference<M>::value && bool(Derived::Flags & Eigen::DirectAccessBit)) {
      m.data_ = mask.data();
      m.row_stride_ = mask.rowStride();
      m.col_stride_ = mask.colStride();
    } else {
      m.own(Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>(std::forward<M>(mask)));
    }
    return m;
  }

  /// Makes the mask read its own column-major copy of the entries it views (of element type T).
  template <typename T>
  void copy_entries() {
    std::shared_ptr<T[]> copy(new T[static_cast<std::size_t>(rows_ * cols_)]);
    const T* from = static_cast<const T*>(data_);
    for (Eigen::Index c = 0; c < cols_; ++c)
      for (Eigen::Index r = 0; r < rows_; ++r) copy[r + c * rows_] = from[r * row_stride_ + c * col_stride_];
    data_ = copy.get();
    row_stride_ = 1;
    col_stride_ = rows_;
    owned_ = std::move(copy);
  }

  /// Makes the mask read its own column-major copy of `entries`.
  template <typename T>
  void own(Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> entries) {
    auto owned = std::make_shared<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>>(std::move(entries));
    data_ = owned->data();
    row_stride_ = 1;
    col_stride_ = rows_;
    owned_ = std::move(owned);
  }

  Kind kind_ = Kind::none;
  Element element_ = Element::boolean;
  const void* data_ = nullptr;
  Eigen::Index rows_ = 0, cols_ = 0;
  std::ptrdiff_t row_stride_ = 0, col_stride_ = 0;
  std::shared_ptr<const void> owned_;
};

}  // namespace mha
