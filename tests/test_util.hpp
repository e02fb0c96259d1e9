// Helpers shared by the tests: tolerances, seeded random matrices, closeness checks,
// configurations and options, and the thread count.
#pragma once

#include <mha/config.hpp>
#include <mha/threads.hpp>

#include <gtest/gtest.h>

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace mha_test {

template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

/// The scalar types every typed test runs over.
using Scalars = ::testing::Types<float, double>;

/// Names the typed tests by their scalar type ("Softmax/float.…"): TYPED_TEST_SUITE(X, Scalars,
/// ScalarNames), which also gives the macro the argument clang's -Wpedantic asks for.
struct ScalarNames {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same<T, float>::value ? "float" : "double";
  }
};

/// Relative tolerance of a result against the reference: ‖a − b‖∞ ≤ tol · ‖b‖∞.
template <typename Scalar>
constexpr double tolerance();
template <>
constexpr double tolerance<float>() {
  return 1e-5;
}
template <>
constexpr double tolerance<double>() {
  return 1e-10;
}

/// A rows × cols matrix of U(−1, 1) entries from a seeded engine (the same on every platform).
template <typename Scalar>
Matrix<Scalar> random_matrix(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed) {
  std::mt19937_64 engine(seed);
  Matrix<Scalar> m(rows, cols);
  for (Eigen::Index j = 0; j < cols; ++j)
    for (Eigen::Index i = 0; i < rows; ++i)
      m(i, j) = static_cast<Scalar>(2.0 * (static_cast<double>(engine() >> 11) * 0x1.0p-53) - 1.0);
  return m;
}

/// ‖actual − expected‖∞ / max(‖expected‖∞, smallest normal): the error the tolerances bound.
template <typename A, typename B>
double relative_error(const Eigen::MatrixBase<A>& actual, const Eigen::MatrixBase<B>& expected) {
  if (actual.size() == 0) return 0.0;
  const double diff = (actual.template cast<double>() - expected.template cast<double>()).cwiseAbs().maxCoeff();
  const double scale = expected.template cast<double>().cwiseAbs().maxCoeff();
  return diff / std::max(scale, 1e-300);
}

/// Asserts equal shapes and a relative error within `tol`.
template <typename A, typename B>
::testing::AssertionResult close(const Eigen::MatrixBase<A>& actual, const Eigen::MatrixBase<B>& expected, double tol) {
  if (actual.rows() != expected.rows() || actual.cols() != expected.cols())
    return ::testing::AssertionFailure() << "shape " << actual.rows() << " x " << actual.cols()
                                         << " != " << expected.rows() << " x " << expected.cols();
  const double err = relative_error(actual, expected);
  if (err <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "relative error " << err << " > tolerance " << tol;
}

/// A boolean matrix, for masks.
using BoolMatrix = Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic>;

/// A module configuration; d_k = d_v = 0 mean d_model / num_heads.
inline mha::MultiHeadAttentionConfig config(Eigen::Index d_model, Eigen::Index num_heads, Eigen::Index d_k = 0,
                                            Eigen::Index d_v = 0, std::uint64_t seed = 0) {
  mha::MultiHeadAttentionConfig c;
  c.d_model = d_model;
  c.num_heads = num_heads;
  c.d_k = d_k;
  c.d_v = d_v;
  c.seed = seed;
  return c;
}

/// A module configuration for decoding: h heads over h_kv key/value heads (0: h).
inline mha::MultiHeadAttentionConfig decoder_config(Eigen::Index d_model, Eigen::Index h, Eigen::Index h_kv,
                                                    Eigen::Index d_k = 0, Eigen::Index d_v = 0,
                                                    std::uint64_t seed = 0) {
  mha::MultiHeadAttentionConfig c = config(d_model, h, d_k, d_v, seed);
  c.num_kv_heads = h_kv;
  return c;
}

/// The configuration with rotary position embeddings of the given pairs and base.
inline mha::MultiHeadAttentionConfig rotary(mha::MultiHeadAttentionConfig c, mha::RotaryPairs pairs,
                                            double base = 10000.0) {
  c.rotary = true;
  c.rotary_pairs = pairs;
  c.rotary_base = base;
  return c;
}

/// Options with `causal` set as given.
inline mha::AttentionOptions causal_if(bool causal) {
  mha::AttentionOptions options;
  options.causal = causal;
  return options;
}

/// Options with causal, its alignment (which places the queries even without causal) and a window.
inline mha::AttentionOptions options_of(bool causal, mha::CausalAlignment alignment, Eigen::Index window = 0) {
  mha::AttentionOptions o;
  o.causal = causal;
  o.alignment = alignment;
  o.window = window;
  return o;
}

/// Sets mha's thread count and forgets the largest team seen so far, so that the test can check
/// afterwards, with mha::detail::largest_team(), that its calls really ran on that many threads:
/// below mha::detail::kMinFlopsPerThread per thread a loop stays on fewer, and a thread-count test
/// whose work never split would pass whatever the threads did.
inline void use_threads(int threads) {
  mha::set_num_threads(threads);
  mha::detail::largest_team() = 0;
}

/// The message of the std::invalid_argument that f() throws, or "no exception".
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "no exception";
}

}  // namespace mha_test

/// Skips a test of thread counts in a build without OpenMP, where every loop runs on the calling
/// thread whatever mha::set_num_threads says: such a test would compare one thread with itself. A
/// macro, since GTEST_SKIP() returns from the test body.
#ifdef _OPENMP
#define MHA_TEST_SKIP_WITHOUT_OPENMP() static_cast<void>(0)
#else
#define MHA_TEST_SKIP_WITHOUT_OPENMP() \
  GTEST_SKIP() << "built without OpenMP: every loop runs on the calling thread, so there is no thread count to vary"
#endif
