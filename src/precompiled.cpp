// mha::precompiled: the module's passes and scaled_dot_product_attention, compiled once for float
// and double, with mha's threads (OpenMP) when the compiler has it. A program linking this library
// compiles only the thin public functions of the headers (MHA_PRECOMPILED makes them extern).
#ifndef MHA_PRECOMPILED
#define MHA_PRECOMPILED  // what CMake defines for this target and its users (compiled by hand too)
#endif

#include <mha/mha.hpp>

namespace mha {

template class MultiHeadAttention<float>;
template class MultiHeadAttention<double>;
MHA_DECODING_PASSES_OF(, float)
MHA_DECODING_PASSES_OF(, double)

namespace detail {
template Matrix<float> scaled_dot_product_attention(const Input<float>&, const Input<float>&, const Input<float>&,
                                                    const AttentionOptions&);
template Matrix<double> scaled_dot_product_attention(const Input<double>&, const Input<double>&, const Input<double>&,
                                                     const AttentionOptions&);
}  // namespace detail

void set_num_threads(int threads) { detail::store_thread_setting(threads); }
int num_threads() { return detail::thread_count(); }

}  // namespace mha
