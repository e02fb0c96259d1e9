// causal_self_attention — decoder-style (causal) multi-head self-attention.
//
// In a decoder each token may attend only to itself and the tokens before it: when the model
// predicts token r + 1 it must not see tokens r + 1, r + 2, … . Causal attention hides those keys
// by setting their scores to −∞ before the softmax, so their weights are exactly 0:
//     head_i = softmax(Q_i K_iᵀ / √d_k + M) V_i,   M(r, j) = 0 if j ≤ r, −∞ if j > r.
// With mha this is one option: AttentionOptions::causal = true.
//
// This program runs causal self-attention over six tokens, prints the (lower-triangular) attention
// weights of one head and the output, then demonstrates the causal property: changing the last
// token leaves every earlier output row unchanged, while without the mask every row changes.

#include <mha/mha.hpp>

#include <Eigen/Core>

#include <cstdint>
#include <cstdio>
#include <random>

namespace {

using Matrix = Eigen::MatrixXf;
using Index = Eigen::Index;

/// A rows × cols matrix of numbers uniform in [−1, 1), the same for a given seed on every platform.
Matrix random_embeddings(Index rows, Index cols, std::uint64_t seed) {
  std::mt19937_64 engine(seed);
  Matrix m(rows, cols);
  for (Index r = 0; r < rows; ++r)
    for (Index c = 0; c < cols; ++c)
      m(r, c) = static_cast<float>(2.0 * static_cast<double>(engine() >> 11) * 0x1.0p-53 - 1.0);
  return m;
}

/// Prints the first `cols` columns of `m`, one row per token, rows labelled t0, t1, ….
void print_rows(const Matrix& m, Index cols) {
  for (Index r = 0; r < m.rows(); ++r) {
    std::printf("    t%-3ld", static_cast<long>(r));
    for (Index c = 0; c < cols; ++c) std::printf("%7.2f", static_cast<double>(m(r, c)));
    std::printf("\n");
  }
}

}  // namespace

int main() {
  const Index L = 6, d_model = 16;
  mha::MultiHeadAttentionConfig config;
  config.d_model = d_model;
  config.num_heads = 4;  // d_k = d_v = 16 / 4 = 4
  config.seed = 7;
  const mha::MultiHeadAttention<float> attn(config);

  mha::AttentionOptions causal;
  causal.causal = true;              // query r sees keys j <= r
  const mha::AttentionOptions full;  // every query sees every key

  // The embeddings of the six tokens, one row each.
  const Matrix x = random_embeddings(L, d_model, 1);
  std::printf("Causal self-attention: L = %ld tokens, d_model = %ld, h = %ld heads, d_k = d_v = %ld.\n",
              static_cast<long>(L), static_cast<long>(d_model), static_cast<long>(attn.num_heads()),
              static_cast<long>(attn.d_k()));

  // The attention weights of head 1. Attending over the identity matrix as values returns the
  // weights themselves (row r of softmax(…) · I is row r of softmax(…)).
  const Matrix q_1 = x * attn.w_q(0), k_1 = x * attn.w_k(0);
  const Matrix weights = mha::scaled_dot_product_attention(q_1, k_1, Matrix::Identity(L, L), causal);
  std::printf(
      "\nHead 1 weights softmax(Q_1 K_1^T / sqrt(d_k) + mask), %ld x %ld: token r only looks at\n"
      "tokens 0..r, so everything above the diagonal is 0 and each row still sums to 1.\n        ",
      static_cast<long>(L), static_cast<long>(L));
  for (Index j = 0; j < L; ++j) std::printf("     t%ld", static_cast<long>(j));
  std::printf("\n");
  print_rows(weights, L);

  const Matrix y = attn.forward(x, causal);
  std::printf("\nOutput attn.forward(x, causal): %ld x %ld (first 8 columns shown):\n", static_cast<long>(y.rows()),
              static_cast<long>(y.cols()));
  print_rows(y, 8);

  // Change the last token and run again, with and without the mask.
  Matrix x_changed = x;
  x_changed.row(L - 1) = random_embeddings(1, d_model, 2);
  const Matrix y_full = attn.forward(x, full);
  const Matrix change_causal = (attn.forward(x_changed, causal) - y).cwiseAbs();
  const Matrix change_full = (attn.forward(x_changed, full) - y_full).cwiseAbs();
  std::printf(
      "\nReplace the last token t%ld by a different embedding and run again.\n"
      "Max |change| of each output row:\n      row     causal  non-causal\n",
      static_cast<long>(L - 1));
  bool earlier_rows_unchanged = true, every_row_changed = true;
  for (Index r = 0; r < L; ++r) {
    const float c = change_causal.row(r).maxCoeff(), f = change_full.row(r).maxCoeff();
    if (r < L - 1 && c != 0.0f) earlier_rows_unchanged = false;
    if (f == 0.0f) every_row_changed = false;
    std::printf("    t%-3ld %10.1e %11.1e\n", static_cast<long>(r), static_cast<double>(c), static_cast<double>(f));
  }
  std::printf("\nCausal: rows t0..t%ld are %s; only t%ld, which attends to the new token, moves.\n",
              static_cast<long>(L - 2), earlier_rows_unchanged ? "exactly unchanged" : "CHANGED (unexpected)",
              static_cast<long>(L - 1));
  std::printf("Non-causal: every query sees every key, so %s.\n",
              every_row_changed ? "every row changes" : "some row did not change (unexpected)");
  return earlier_rows_unchanged && every_row_changed ? 0 : 1;
}
