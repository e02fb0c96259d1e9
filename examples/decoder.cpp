// decoder — "You're now ready to build your own transformer decoder": a tiny one, generating text
// one character at a time with a key/value cache, checked against the same decoder without one.
//
// A decoder writes a sequence left to right: each new token is chosen from what causal attention
// makes of every token before it, then appended, and the next step attends over one token more.
// The model, one row per token as in the lecture (vocabulary: space and a … z):
//     x_t      = E[token_t]                          1 × d_model   token embedding (E: vocab × d_model)
//     a_t      = row t of attention(x_0 … x_t)       1 × d_model   causal multi-head self-attention
//     logits_t = (x_t + a_t) W_out                   1 × vocab     residual, then the read-out
//     token_{t+1} = argmax logits_t                                greedy decoding
// The weights are random (seeded), never trained: the text it writes is gibberish. The point is
// the cache's mechanics, and that they change nothing but the time.
//
// Without a cache, step t computes attention(x_0 … x_t) in full: it projects the keys and values
// of all t + 1 tokens, which are the same as the step before, and attends t + 1 queries of which
// only the last is new. The key/value cache keeps every earlier token's projected (and rotated)
// keys and values, so a step projects the new token alone and attends its one query to the cache:
// O(t·d_model) per step instead of O(t·d_model² + t²·d_model). The output rows are the same.
//
// This program prefills the cache with the prompt (one decode call over all its tokens), generates
// token by token, printing each step, then generates again without the cache (a full causal
// forward pass over everything at every step) and compares. It exits with 1 if the two disagree by
// more than 1e-4 relative to the largest output, or choose a different token anywhere. Last, it
// feeds the same tokens to a cache and projection weights kept in bfloat16 (half the bytes, the
// arithmetic still in float), and exits with 1 if their outputs stray more than 1e-2 from float's.

#include <mha/mha.hpp>

#include <Eigen/Core>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace {

using Matrix = Eigen::MatrixXf;
using Index = Eigen::Index;
using Clock = std::chrono::steady_clock;

const std::string kVocabulary = " abcdefghijklmnopqrstuvwxyz";  // token t is character kVocabulary[t]
constexpr Index kModelWidth = 64;                               // d_model
constexpr Index kGenerated = 24;                                // tokens generated after the prompt
constexpr double kTolerance = 1e-4;                             // relative, cached against uncached

double microseconds(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }

/// Uniform in [−a, a) from the engine's bits (reproducible everywhere, like the module's weights).
Matrix uniform(Index rows, Index cols, double a, std::mt19937_64& engine) {
  Matrix m(rows, cols);
  for (Index j = 0; j < cols; ++j)
    for (Index i = 0; i < rows; ++i)
      m(i, j) = static_cast<float>((2.0 * static_cast<double>(engine() >> 11) * 0x1.0p-53 - 1.0) * a);
  return m;
}

struct Decoder {
  explicit Decoder(std::mt19937_64& engine)
      : attention(config()),
        embedding(uniform(static_cast<Index>(kVocabulary.size()), kModelWidth, 1.0, engine)),
        w_out(uniform(kModelWidth, static_cast<Index>(kVocabulary.size()),
                      std::sqrt(6.0 / static_cast<double>(kModelWidth + static_cast<Index>(kVocabulary.size()))),
                      engine)) {
    // Sliding window: each token sees itself and the 15 tokens before it, no further back (as in
    // Mistral). The prompt and the text are longer than that, so the window matters here; the cache
    // still keeps every token.
    options.window = 16;
  }

  static mha::MultiHeadAttentionConfig config() {
    mha::MultiHeadAttentionConfig c;
    c.d_model = kModelWidth;
    c.num_heads = 4;     // h = 4 query heads, d_k = d_v = 64 / 4 = 16
    c.num_kv_heads = 2;  // grouped-query attention: the 4 query heads share 2 heads of keys and values
                         // (heads 0 and 1 read KV head 0, heads 2 and 3 KV head 1): half the cache
    c.rotary = true;     // rotary position embeddings: each head's queries and keys are rotated by
                         // angles proportional to their positions, so a score depends on how far
                         // apart two tokens are; the only position information this model has
    c.seed = 7;
    return c;
  }

  /// X = E[tokens]: one row per token, tokens.size() × d_model.
  Matrix embed(const std::vector<int>& tokens) const {
    Matrix x(static_cast<Index>(tokens.size()), kModelWidth);
    for (std::size_t t = 0; t < tokens.size(); ++t) x.row(static_cast<Index>(t)) = embedding.row(tokens[t]);
    return x;
  }

  /// The next token after the row whose embedding is x_t (1 × d_model) and attention output a_t.
  int next_token(const Matrix& x_t, const Matrix& a_t) const {
    const Matrix logits = (x_t + a_t) * w_out;  // 1 × vocab
    Index best;
    logits.row(0).maxCoeff(&best);
    return static_cast<int>(best);
  }

  mha::MultiHeadAttention<float> attention;
  mha::AttentionOptions options;  // decode is always causal; the full forward pass must be told
  Matrix embedding;               // E: vocab × d_model, row t is token t
  Matrix w_out;                   // d_model × vocab
};

std::vector<int> tokenize(const std::string& text) {
  std::vector<int> tokens;
  for (char c : text) tokens.push_back(static_cast<int>(kVocabulary.find(c)));
  return tokens;
}

std::string text_of(const std::vector<int>& tokens) {
  std::string text;
  for (int t : tokens) text += kVocabulary[static_cast<std::size_t>(t)];
  return text;
}

}  // namespace

int main() {
  // One thread: a step here is a few thousand flops, far too little to share out.
  mha::set_num_threads(1);
  Eigen::setNbThreads(1);
  std::mt19937_64 engine(2024);
  Decoder model(engine);
  const std::string prompt = "attention is all you need";
  const std::vector<int> prompt_tokens = tokenize(prompt);
  const Index prompt_length = static_cast<Index>(prompt_tokens.size());
  const Index total = prompt_length + kGenerated;

  std::printf(
      "A one-layer decoder, d_model = %ld, %ld query heads sharing %ld key/value heads (d_k = %ld),\n"
      "rotary positions, a window of %ld tokens, vocabulary of %zu characters; random weights.\n\n",
      static_cast<long>(kModelWidth), static_cast<long>(model.attention.num_heads()),
      static_cast<long>(model.attention.num_kv_heads()), static_cast<long>(model.attention.d_k()),
      static_cast<long>(model.options.window), kVocabulary.size());

  // ---- With the cache. ----
  mha::KVCache<float> cache = model.attention.make_cache(/*sequences=*/1, /*max_length=*/total);
  std::vector<int> tokens = prompt_tokens;
  Matrix cached(total, kModelWidth);  // a_t of every position t, as the cached steps produced them

  // The prefill: the whole prompt in one call, its keys and values into the cache.
  auto start = Clock::now();
  const Matrix x_prompt = model.embed(prompt_tokens);  // prompt_length × d_model
  cached.topRows(prompt_length) = model.attention.decode(x_prompt, cache, model.options);
  tokens.push_back(model.next_token(x_prompt.bottomRows(1), cached.row(prompt_length - 1)));
  double cached_us = microseconds(Clock::now() - start);
  std::printf("prefill \"%s\" (%ld tokens) in one decode call: %.0f us, cache length %ld\n\n", prompt.c_str(),
              static_cast<long>(prompt_length), cached_us, static_cast<long>(cache.length()));

  std::printf("  position  token  cache length  us\n");
  for (Index t = prompt_length; t < total; ++t) {
    start = Clock::now();
    const Matrix x_t = model.embed({tokens.back()});                    // 1 × d_model: the token just chosen
    cached.row(t) = model.attention.decode(x_t, cache, model.options);  // its keys and values join the cache
    if (t + 1 < total) tokens.push_back(model.next_token(x_t, cached.row(t)));
    const double us = microseconds(Clock::now() - start);
    cached_us += us;
    const char symbol = kVocabulary[static_cast<std::size_t>(tokens[static_cast<std::size_t>(t)])];
    std::printf("  %8ld    '%c'  %12ld  %4.0f\n", static_cast<long>(t), symbol, static_cast<long>(cache.length()), us);
  }
  std::printf("\n\"%s\" + \"%s\"  (random weights: it means nothing)\n", prompt.c_str(),
              text_of({tokens.begin() + prompt_length, tokens.end()}).c_str());
  std::printf("cache: %ld key/value heads (not h = %ld), each keys %ld x %ld and values %ld x %ld, %zu bytes\n\n",
              static_cast<long>(cache.kv_heads()), static_cast<long>(model.attention.num_heads()),
              static_cast<long>(cache.keys(0, 0).rows()), static_cast<long>(cache.keys(0, 0).cols()),
              static_cast<long>(cache.values(0, 0).rows()), static_cast<long>(cache.values(0, 0).cols()),
              static_cast<std::size_t>(cache.bytes()));

  // ---- Without the cache: every step recomputes the causal forward pass over all tokens so far. ----
  mha::AttentionOptions full = model.options;
  full.causal = true;
  std::vector<int> recomputed_tokens = prompt_tokens;
  Matrix recomputed(total, kModelWidth);
  double recomputed_us = 0;
  for (Index t = prompt_length; t <= total; ++t) {
    start = Clock::now();
    const Matrix x = model.embed(recomputed_tokens);    // t × d_model
    const Matrix a = model.attention.forward(x, full);  // t × d_model, of which the last row is new
    if (t == prompt_length)
      recomputed.topRows(t) = a;
    else
      recomputed.row(t - 1) = a.bottomRows(1);
    if (t < total) recomputed_tokens.push_back(model.next_token(x.bottomRows(1), a.bottomRows(1)));
    recomputed_us += microseconds(Clock::now() - start);
  }

  const double largest = static_cast<double>(recomputed.cwiseAbs().maxCoeff());
  const double difference = static_cast<double>((cached - recomputed).cwiseAbs().maxCoeff());
  const bool same_tokens = tokens == recomputed_tokens;
  std::printf("without the cache (%ld full causal forward passes of %ld … %ld tokens):\n",
              static_cast<long>(kGenerated + 1), static_cast<long>(prompt_length), static_cast<long>(total));
  std::printf("  the same %ld tokens: %s\n", static_cast<long>(total), same_tokens ? "yes" : "NO");
  std::printf("  max |cached - uncached| over all %ld x %ld outputs = %.1e, %.1e relative to the largest (%.2f)\n",
              static_cast<long>(total), static_cast<long>(kModelWidth), difference, difference / largest, largest);
  std::printf("  time: %.0f us with the cache, %.0f us without (%.1fx)\n", cached_us, recomputed_us,
              recomputed_us / cached_us);

  if (!same_tokens || !(difference <= kTolerance * largest)) {
    std::printf("FAILED: the cached decoder must reproduce the full forward pass (tolerance %.0e relative).\n",
                kTolerance);
    return 1;
  }

  // ---- In 16 bits: the cache and the projection weights kept as bfloat16, half the bytes each,
  //      fed the same tokens; the products still compute and accumulate in float. ----
  auto small_cache = model.attention.make_cache<Eigen::bfloat16>(/*sequences=*/1, /*max_length=*/total);
  const auto weights = model.attention.make_decode_weights<Eigen::bfloat16>();  // W^Q, W^K, W^V, W^O rounded once
  Matrix reduced(total, kModelWidth);
  reduced.topRows(prompt_length) = model.attention.decode(x_prompt, small_cache, weights, model.options);
  for (Index t = prompt_length; t < total; ++t)
    reduced.row(t) =
        model.attention.decode(model.embed({tokens[static_cast<std::size_t>(t)]}), small_cache, weights, model.options);
  const double reduced_difference = static_cast<double>((reduced - cached).cwiseAbs().maxCoeff()) / largest;
  std::printf("\nbfloat16 cache (%zu bytes) and weights (%zu bytes), the same tokens fed:\n",
              static_cast<std::size_t>(small_cache.bytes()), weights.bytes());
  std::printf("  max |bfloat16 - float| = %.1e relative to the largest output\n", reduced_difference);
  if (!(reduced_difference <= 1e-2)) {
    std::printf("FAILED: bfloat16 storage must stay within 1e-2 of float.\n");
    return 1;
  }
  return 0;
}
