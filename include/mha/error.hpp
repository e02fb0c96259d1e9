// mha — the library's error type.
#pragma once

#include <stdexcept>

namespace mha {

/// The error thrown for bad shapes, options or configurations; its message names the argument and
/// the shapes involved. Checks run in every build type, not only with assertions enabled.
class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

}  // namespace mha
