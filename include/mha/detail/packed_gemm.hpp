// mha — the kernel of detail::gemm's products: c += op(a) · op(b) by blocks packed for a
// register-blocked micro-kernel, the loops of the BLIS design (Van Zee and van de Geijn, 2015).
//
// The depth is taken in passes of at most kDepth; each pass packs a block of op(b) (kDepth × up to
// kColumns) into panels of kCols columns, and for each block of op(a)'s rows (up to kRows) packs it
// into panels of kRowsPerPanel rows; then the micro-kernel multiplies one panel of each, its
// kRowsPerPanel × kCols sums in registers, and adds them to c. A panel of op(b) (kDepth × kCols,
// 12 KiB for float under AVX-512) stays in L1 while the block of op(a) (256 KiB) streams from L2.
//
// Why not Eigen's own kernel, which detail::gemm called before: under AVX-512 on an AMD EPYC
// Zen 5 (two 512-bit FMA units, 266 GFLOP/s on one core) Eigen 3.4's 48 × 4 block reached
// 0.66–0.70 of the peak on the projections' products, this 32 × 12 block 0.8–0.85 (its kernel alone
// 0.99); docs/performance.md has the figures on both instruction sets.
//
// Each of c's numbers is the sum over the depth in the same order (each pass's multiply-adds in
// order, the pass added to c), wherever it sits in the blocks and panels: a product's results do
// not depend on how many rows or columns it has beside them.
#pragma once

#include <mha/detail/packets.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>

namespace mha {
namespace detail {
namespace packed {

using Eigen::Index;

/// The register block of the micro-kernel for one scalar type: kRowsPerPanel = two packets of c's
/// rows by kCols columns, 2 × kCols packets of sums. With 32 vector registers (AVX-512) 24 sums,
/// two packets of op(a) and one broadcast number of op(b); with 16 (AVX2, SSE2) 12 sums.
template <typename Scalar>
struct Blocks {
  using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
  static constexpr int kLanes = Eigen::internal::unpacket_traits<Packet>::size;
  static constexpr int kPackets = 2;
  static constexpr Index kRowsPerPanel = kPackets * kLanes;
  static constexpr Index kCols = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 12 : 6;
  static constexpr Index kDepth = 256;                                   ///< of a pass
  static constexpr Index kRows = (256 / kRowsPerPanel) * kRowsPerPanel;  ///< of a packed block of op(a)
  static constexpr Index kColumns = (1024 / kCols) * kCols;              ///< of a packed block of op(b)
};

/// A view of op(x): x's number (i, j) is data[i · row_step + j · col_step].
template <typename Scalar>
struct View {
  const Scalar* data;
  Index row_step, col_step;
  const Scalar* at(Index i, Index j) const { return data + i * row_step + j * col_step; }
};

/// Packs op(a)'s rows [0, rows) over the depth [0, depth) into panels of kRowsPerPanel rows, each
/// the panel's rows for one depth after another, the rows past `rows` zero.
template <typename Scalar>
void pack_rows(const View<Scalar>& a, Index rows, Index depth, Scalar* to) {
  constexpr Index kPanel = Blocks<Scalar>::kRowsPerPanel;
  for (Index first = 0; first < rows; first += kPanel, to += kPanel * depth) {
    const Index count = std::min(kPanel, rows - first);
    if (a.row_step == 1) {  // each depth's rows contiguous
      for (Index p = 0; p < depth; ++p) {
        const Scalar* from = a.at(first, p);
        Scalar* panel = to + p * kPanel;
        std::copy_n(from, count, panel);
        std::fill(panel + count, panel + kPanel, Scalar(0));
      }
    } else {  // each row's depths contiguous
      for (Index i = 0; i < count; ++i) {
        const Scalar* from = a.at(first + i, 0);
        for (Index p = 0; p < depth; ++p) to[p * kPanel + i] = from[p * a.col_step];
      }
      for (Index p = 0; p < depth; ++p) std::fill(to + p * kPanel + count, to + (p + 1) * kPanel, Scalar(0));
    }
  }
}

/// Packs op(b)'s columns [0, cols) over the depth [0, depth) into panels of kCols columns, each
/// the panel's columns for one depth after another, the columns past `cols` zero.
template <typename Scalar>
void pack_cols(const View<Scalar>& b, Index depth, Index cols, Scalar* to) {
  constexpr Index kPanel = Blocks<Scalar>::kCols;
  for (Index first = 0; first < cols; first += kPanel, to += kPanel * depth) {
    const Index count = std::min(kPanel, cols - first);
    if (b.col_step == 1) {  // each depth's columns contiguous
      for (Index p = 0; p < depth; ++p) {
        Scalar* panel = to + p * kPanel;
        std::copy_n(b.at(p, first), count, panel);
        std::fill(panel + count, panel + kPanel, Scalar(0));
      }
    } else {  // each column's depths contiguous
      for (Index j = 0; j < count; ++j) {
        const Scalar* from = b.at(0, first + j);
        for (Index p = 0; p < depth; ++p) to[p * kPanel + j] = from[p * b.row_step];
      }
      for (Index p = 0; p < depth; ++p) std::fill(to + p * kPanel + count, to + (p + 1) * kPanel, Scalar(0));
    }
  }
}

/// c += (a panel of op(a)) · (the first Cols columns of a panel of op(b)) over `depth`, of which
/// c's first `rows` rows and `cols` ≤ Cols columns are kept (c's column j at c + j · c_stride).
/// The last panel of op(b) runs with fewer columns (Cols of 4 or 8 for the 4 or 8 left of 12),
/// so that a product of 64 columns (P · V at d_v = 64) computes 64, not 72.
template <typename Scalar, Index Cols>
void micro_kernel(Index depth, const Scalar* a, const Scalar* b, Scalar* c, Index c_stride, Index rows, Index cols) {
  using namespace Eigen::internal;
  using B = Blocks<Scalar>;
  using Packet = typename B::Packet;
  constexpr int kLanes = B::kLanes, kPackets = B::kPackets;
  Packet sums[Cols][kPackets];
  MHA_UNROLL
  for (int j = 0; j < Cols; ++j) {
    MHA_UNROLL
    for (int r = 0; r < kPackets; ++r) sums[j][r] = pset1<Packet>(Scalar(0));
  }
  for (Index p = 0; p < depth; ++p, a += B::kRowsPerPanel, b += B::kCols) {
    Packet rows_of_a[kPackets];
    MHA_UNROLL
    for (int r = 0; r < kPackets; ++r) {
      rows_of_a[r] = pload<Packet>(a + r * kLanes);
      keep_in_register(rows_of_a[r]);
    }
    MHA_UNROLL
    for (int j = 0; j < Cols; ++j) {
      const Packet number = pset1<Packet>(b[j]);
      MHA_UNROLL
      for (int r = 0; r < kPackets; ++r) sums[j][r] = pmadd(rows_of_a[r], number, sums[j][r]);
    }
  }
  if (rows == B::kRowsPerPanel && cols == Cols) {
    MHA_UNROLL
    for (int j = 0; j < Cols; ++j) {
      MHA_UNROLL
      for (int r = 0; r < kPackets; ++r) {
        Scalar* to = c + j * c_stride + r * kLanes;
        pstoreu(to, padd(ploadu<Packet>(to), sums[j][r]));
      }
    }
    return;
  }
  // A panel at the edge of c: the sums through memory, the ones inside c added.
  EIGEN_ALIGN_MAX Scalar tile[Cols][B::kRowsPerPanel];
  MHA_UNROLL
  for (int j = 0; j < Cols; ++j) {
    MHA_UNROLL
    for (int r = 0; r < kPackets; ++r) pstore(&tile[j][r * kLanes], sums[j][r]);
  }
  for (Index j = 0; j < cols; ++j)
    for (Index i = 0; i < rows; ++i) c[j * c_stride + i] += tile[j][i];
}

/// The packed blocks' sizes of a product of rows × cols over `depth`: op(a)'s and op(b)'s.
template <typename Scalar>
Index lhs_size(Index rows, Index depth) {
  using B = Blocks<Scalar>;
  const Index panels = (std::min(rows, B::kRows) + B::kRowsPerPanel - 1) / B::kRowsPerPanel;
  return panels * B::kRowsPerPanel * std::min(depth, B::kDepth);
}
template <typename Scalar>
Index rhs_size(Index depth, Index cols) {
  using B = Blocks<Scalar>;
  const Index panels = (std::min(cols, B::kColumns) + B::kCols - 1) / B::kCols;
  return panels * B::kCols * std::min(depth, B::kDepth);
}

/// c (m × n, column j at c + j · c_stride) += op(a) (m × k) · op(b) (k × n), packing into
/// `lhs` (lhs_size(m, k) numbers) and `rhs` (rhs_size(k, n)), both aligned as Eigen aligns.
template <typename Scalar>
void multiply(Index m, Index n, Index k, const View<Scalar>& a, const View<Scalar>& b, Scalar* c, Index c_stride,
              Scalar* lhs, Scalar* rhs) {
  using B = Blocks<Scalar>;
  for (Index j0 = 0; j0 < n; j0 += B::kColumns) {
    const Index cols = std::min(B::kColumns, n - j0);
    for (Index p0 = 0; p0 < k; p0 += B::kDepth) {
      const Index depth = std::min(B::kDepth, k - p0);
      pack_cols(View<Scalar>{b.at(p0, j0), b.row_step, b.col_step}, depth, cols, rhs);
      for (Index i0 = 0; i0 < m; i0 += B::kRows) {
        const Index rows = std::min(B::kRows, m - i0);
        pack_rows(View<Scalar>{a.at(i0, p0), a.row_step, a.col_step}, rows, depth, lhs);
        for (Index j = 0; j < cols; j += B::kCols) {
          const Index panel_cols = std::min(B::kCols, cols - j);
          const auto kernel = panel_cols <= B::kCols / 3       ? &micro_kernel<Scalar, B::kCols / 3>
                              : panel_cols <= 2 * B::kCols / 3 ? &micro_kernel<Scalar, 2 * B::kCols / 3>
                                                               : &micro_kernel<Scalar, B::kCols>;
          for (Index i = 0; i < rows; i += B::kRowsPerPanel)
            kernel(depth, lhs + i * depth, rhs + j * depth, c + (i0 + i) + (j0 + j) * c_stride, c_stride,
                   std::min(B::kRowsPerPanel, rows - i), panel_cols);
        }
      }
    }
  }
}

}  // namespace packed
}  // namespace detail
}  // namespace mha
