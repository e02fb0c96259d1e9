// Included first by the tests that check Eigen's allocations: Eigen's assertions throw, in every
// build type, so that a heap allocation while Eigen::internal::set_is_malloc_allowed(false) holds
// (or a size mismatch) fails the test. These macros change Eigen's inline code, so a program that
// includes this must compile mha's passes itself (tests/CMakeLists.txt: MHA_HEADER_ONLY_TESTS),
// not link mha::precompiled, which was compiled without them.
#pragma once

#include <stdexcept>
#define eigen_assert(condition) \
  ((condition) ? static_cast<void>(0) : throw std::runtime_error("Eigen assertion failed: " #condition))
#define EIGEN_RUNTIME_NO_MALLOC
