// mha — the argument checks every public entry point shares, and their messages.
#pragma once

#include <mha/error.hpp>

#include <Eigen/Core>

#include <cstddef>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace mha {
namespace detail {

/// Throws mha::invalid_argument with "mha: " followed by the streamed parts. They are taken by value,
/// so that string literals decay to pointers and messages of the same kinds of parts share one copy
/// of this function whatever their lengths.
template <typename... Parts>
[[noreturn]] void fail(Parts... parts) {
  std::ostringstream message;
  message << "mha: ";
  (message << ... << parts);
  throw invalid_argument(message.str());
}

/// "R x C", the shape of a matrix as the error messages print it.
template <typename Derived>
std::string shape(const Eigen::EigenBase<Derived>& m) {
  return std::to_string(m.rows()) + " x " + std::to_string(m.cols());
}

/// Sets `product` to a · b and \returns true, or \returns false if a · b overflows T (a, b >= 0).
template <typename T>
bool multiply(T a, T b, T& product) {
  if (a != 0 && b > std::numeric_limits<T>::max() / a) return false;
  product = a * b;
  return true;
}

/// An input matrix at the boundary of the public API, of the module's scalar type: a view of the
/// caller's matrix when it is stored column by column (a matrix, a block or map of one), else that
/// matrix (an expression, a row-major one) evaluated once. Every input type becomes this one, so the
/// passes behind the API are compiled once per scalar type, not once per caller's expression type.
/// It is only ever a function parameter: it may own the evaluated copy, so it is never copied.
template <typename Scalar>
struct Input : Eigen::Ref<const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>> {
  using Base = Eigen::Ref<const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>>;
  template <typename Derived>
  Input(const Eigen::MatrixBase<Derived>& x) : Base(x.derived()) {  // NOLINT: converts implicitly
    static_assert(
        std::is_same<Scalar, typename Derived::Scalar>::value,
        "mha: the inputs must have the scalar type of the module (of the query, for scaled_dot_product_attention)");
  }
  Input(const Input&) = delete;
  Input& operator=(const Input&) = delete;
};

/// Throws unless `input` has `width` columns.
template <typename Derived>
void check_width(const Eigen::MatrixBase<Derived>& input, const char* name, Eigen::Index width, const char* width_name,
                 const char* caller) {
  if (input.cols() != width)
    fail(caller, ": ", name, " is ", shape(input), " but ", width_name, " is ", width, "; ", name, " needs ", width,
         " columns");
}

/// Throws unless the sequence lengths are >= 0 and add up to the rows of the stacked input. The sum
/// is never taken past `rows`, so lengths whose sum would overflow are rejected like any other.
inline void check_lengths_add_up(const std::vector<Eigen::Index>& lengths, Eigen::Index rows, const char* lengths_name,
                                 const char* rows_name, const char* caller) {
  for (const Eigen::Index n : lengths)
    if (n < 0) fail(caller, ": sequence lengths must be >= 0, got ", n);
  Eigen::Index sum = 0;
  for (std::size_t b = 0; b < lengths.size(); ++b) {
    if (lengths[b] > rows - sum)
      fail(caller, ": ", lengths_name, " add up to more than the ", rows, " rows of ", rows_name, " (sequence ", b,
           " has ", lengths[b], " after ", sum, " rows before it)");
    sum += lengths[b];
  }
  if (sum != rows) fail(caller, ": ", lengths_name, " add up to ", sum, " but ", rows_name, " has ", rows, " rows");
}

}  // namespace detail
}  // namespace mha
