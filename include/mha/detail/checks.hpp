// mha — the argument checks every public entry point shares, and their messages.
#pragma once

#include <mha/error.hpp>

#include <Eigen/Core>

#include <cstddef>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace mha {
namespace detail {

/// Throws mha::invalid_argument with "mha: " followed by the streamed parts.
template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
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

/// \returns `x` itself when its coefficients can be read in place (a matrix, map or block, of either
/// storage order), else `x` evaluated once into a matrix, so that taking blocks of it is cheap.
template <typename Derived>
decltype(auto) evaluated(const Eigen::MatrixBase<Derived>& x) {
  if constexpr (bool(Derived::Flags & Eigen::DirectAccessBit))
    return x.derived();
  else
    return typename Derived::PlainObject(x);
}

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
