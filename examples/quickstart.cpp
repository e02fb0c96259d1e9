// quickstart — multi-head attention, step by step, on a four-word sentence.
//
// Multi-head attention applies the attention mechanism several times in parallel, each time to a
// different set of queries, keys and values obtained by linearly transforming the original
// embeddings; the number of sets is the number of heads h. With two heads you need two sets of
// queries, keys and values. The steps are:
//
//   1. The inputs are the query, key and value matrices Q, K, V: one row per word of the sequence,
//      d_model columns (the embedding size). In self-attention all three are the same matrix X.
//   2. Each head i transforms them with its own learnable matrices W_i^Q, W_i^K (d_model × d_k) and
//      W_i^V (d_model × d_v):  Q_i = Q W_i^Q,  K_i = K W_i^K,  V_i = V W_i^V.
//   3. Each head applies scaled dot-product attention to its own set:
//          head_i = softmax(Q_i K_iᵀ / √d_k) V_i          (rows of Q) × d_v
//   4. The heads are concatenated horizontally:  [head_1 … head_h]       (rows of Q) × h·d_v
//   5. A last learnable linear transformation W^O ((h·d_v) × d_model) gives the output context
//      vectors, one row of d_model columns per original query.
//
// With d_k = d_v = d_model / h, as in "Attention Is All You Need", h heads cost about what one
// full-width head costs. This program performs the steps one by one with mha's building blocks
// and then checks that MultiHeadAttention::forward computes the same thing in one call.

#include <mha/mha.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

using Matrix = Eigen::MatrixXf;
using Index = Eigen::Index;

/// Prints `m` one row per line, each row led by its label (a word) and indented.
void print_rows(const Matrix& m, const std::vector<std::string>& labels) {
  for (Index r = 0; r < m.rows(); ++r) {
    std::printf("    %-6s", labels[static_cast<std::size_t>(r)].c_str());
    for (Index c = 0; c < m.cols(); ++c) std::printf("%7.2f", static_cast<double>(m(r, c)));
    std::printf("\n");
  }
}

std::string shape(const Matrix& m) { return std::to_string(m.rows()) + " x " + std::to_string(m.cols()); }

}  // namespace

int main() {
  // A tiny "sentence" and a fixed embedding table: word r is row r of X.
  const std::vector<std::string> words = {"she", "reads", "the", "book"};
  const Index L = static_cast<Index>(words.size());
  const Index d_model = 8;
  Matrix x(L, d_model);
  x << 0.9f, -0.2f, 0.4f, 0.1f, -0.5f, 0.3f, 0.0f, 0.7f,  // she
      0.1f, 0.8f, -0.6f, 0.5f, 0.2f, -0.1f, 0.9f, -0.3f,  // reads
      -0.4f, 0.1f, 0.2f, -0.8f, 0.6f, 0.5f, -0.2f, 0.1f,  // the
      0.3f, -0.7f, 0.5f, 0.6f, 0.1f, 0.9f, -0.4f, -0.2f;  // book

  // The module: two heads with d_k = d_v = d_model / h = 4 (left at 0, the default), and
  // deterministic Xavier-uniform weights drawn from the seed.
  mha::MultiHeadAttentionConfig config;
  config.d_model = d_model;
  config.num_heads = 2;
  config.seed = 42;
  const mha::MultiHeadAttention<float> attn(config);
  const Index h = attn.num_heads(), d_k = attn.d_k(), d_v = attn.d_v();

  std::printf("Multi-head attention on the sentence \"she reads the book\": L = %ld words,\n", static_cast<long>(L));
  std::printf("d_model = %ld (embedding size), h = %ld heads, d_k = d_v = d_model / h = %ld.\n\n",
              static_cast<long>(d_model), static_cast<long>(h), static_cast<long>(d_k));

  // Step 1: the inputs. Self-attention: queries, keys and values all come from the same sentence.
  std::printf("Step 1. Inputs Q = K = V = X, %s (rows = words, columns = d_model):\n", shape(x).c_str());
  print_rows(x, words);

  // Steps 2 and 3, head by head. Each head writes its output into its own column block of concat.
  Matrix concat(L, h * d_v);
  for (Index i = 0; i < h; ++i) {
    const long n = static_cast<long>(i + 1);  // heads are numbered from 1 in the text
    // Step 2: this head's own representations of the queries, keys and values.
    const Matrix w_q = attn.w_q(i), w_k = attn.w_k(i), w_v = attn.w_v(i);
    const Matrix q_i = x * w_q;  // L × d_k
    const Matrix k_i = x * w_k;  // L × d_k
    const Matrix v_i = x * w_v;  // L × d_v
    std::printf(
        "\nStep 2, head %ld. W_%ld^Q %s, W_%ld^K %s, W_%ld^V %s "
        "(d_model x d_k, d_model x d_k, d_model x d_v)\n",
        n, n, shape(w_q).c_str(), n, shape(w_k).c_str(), n, shape(w_v).c_str());
    std::printf("        Q_%ld = Q W_%ld^Q %s, K_%ld = K W_%ld^K %s, V_%ld = V W_%ld^V %s\n", n, n, shape(q_i).c_str(),
                n, n, shape(k_i).c_str(), n, n, shape(v_i).c_str());

    // Step 3: scaled dot-product attention on this head's set. The weights are shown to see which
    // word looks at which; scaled_dot_product_attention computes the head without forming them.
    const Matrix weights = mha::softmax_rows(q_i * k_i.transpose() / std::sqrt(static_cast<float>(d_k)));
    const Matrix head = mha::scaled_dot_product_attention(q_i, k_i, v_i);
    std::printf("Step 3, head %ld. weights = softmax(Q_%ld K_%ld^T / sqrt(d_k)), %s, each row sums to 1:\n", n, n, n,
                shape(weights).c_str());
    std::printf("          ");
    for (const auto& w : words) std::printf("%7s", w.c_str());
    std::printf("\n");
    print_rows(weights, words);
    std::printf("        head_%ld = weights V_%ld, %s (rows of Q x d_v):\n", n, n, shape(head).c_str());
    print_rows(head, words);
    concat.middleCols(i * d_v, d_v) = head;
  }

  // Step 4: concatenate the heads horizontally; step 5: the output transformation W^O.
  std::printf("\nStep 4. concat = [head_1 head_2], %s (rows of Q x h*d_v)\n", shape(concat).c_str());
  const Matrix w_o = attn.w_o();
  const Matrix output = concat * w_o;
  std::printf("Step 5. output = concat W^O, W^O %s, output %s: one context vector per word:\n", shape(w_o).c_str(),
              shape(output).c_str());
  print_rows(output, words);

  // The module does all of this in one call (all heads' projections as single matrix products).
  const Matrix forward = attn.forward(x);
  const double max_difference = static_cast<double>((forward - output).cwiseAbs().maxCoeff());
  std::printf("\nattn.forward(x) gives %s; max |forward - step by step| = %.1e (float rounding).\n",
              shape(forward).c_str(), max_difference);
  return max_difference < 1e-5 ? 0 : 1;
}
