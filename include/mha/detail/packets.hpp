// mha — two helpers of the register-blocked kernels (the GEMM's micro-kernel, a decode step's
// reads of the cache): keeping small arrays of packets in registers with GCC.
#pragma once

// The block kernels keep small arrays of packets (sums, a row's packets) in registers. GCC 12 keeps
// them there only once their loops are unrolled early: MHA_UNROLL asks for it (without it, the
// sums of a decode step's add_weighted_row_block lived on the stack, 1.3x slower).
#if defined(__GNUC__)
#define MHA_UNROLL _Pragma("GCC unroll 16")
#else
#define MHA_UNROLL
#endif

namespace mha {
namespace detail {

/// Makes the compiler hold `packet` in a register from here on: GCC otherwise folds a packet loaded
/// once for several multiply-adds back into each of them as a memory operand, which loads it again
/// each time (20 loads per 16 multiply-adds instead of 8, more than the load units sustain).
/// Eigen's own kernels do the same (EIGEN_OPTIMIZATION_BARRIER).
template <typename Packet>
inline void keep_in_register([[maybe_unused]] Packet& packet) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && defined(__SSE2__)
  __asm__("" : "+v"(packet));
#endif
}

}  // namespace detail
}  // namespace mha
