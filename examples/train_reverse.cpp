// train_reverse — multi-head attention that learns: a small model learns to reverse a sequence.
//
// Every linear transformation in multi-head attention contains a set of learnable parameters —
// W_i^Q, W_i^K and W_i^V of each head, and W^O — so the library must be able to learn them. The
// other examples run a module with its seeded initial weights; this one learns them with the
// library's backward pass, on a task that needs attention:
//     input    x_0  x_1  …  x_{n−1}          n = 12 tokens of a vocabulary of 16 (shown as 0…9 a…f)
//     target   x_{n−1}  …  x_1  x_0          the output at position i is the input at n − 1 − i
// In this model nothing but attention moves information from one position to another, so to
// succeed the heads must learn queries and keys under which position i attends to position n−1−i:
// their attention weights become the anti-diagonal.
//
// The model, one row per token as in the lecture; a batch of B sequences is N = B·n stacked rows:
//     X      = E[x] + P              N × d_model   token embedding (E: vocab × d_model) plus the
//                                                  learned embedding of the position (P: n × d_model)
//     A      = MultiHeadAttention(X)  N × d_model   self-attention, each sequence on its own
//     logits = A W_out + b_out        N × vocab     read-out (W_out: d_model × vocab, b_out: 1 × vocab)
//     loss   = mean over the rows of −log softmax(logits)[target]     (cross-entropy)
// The gradient flows back the same way: the loss gives dlogits, the read-out gives dW_out, db_out
// and dA, the library's backward turns dA into the gradients of W^Q, W^K, W^V, W^O and dX, and
// dX lands in the rows of E and P that were read. Adam then moves every parameter a little.
//
// Usage: train_reverse [picture.png]   (default training.png): the loss curve and each head's
// attention weights on one held-out sequence. Exits with 1 if the held-out token accuracy misses
// the target.

#include <mha/mha.hpp>

#include <Eigen/Core>

// Cairo (Debian: libcairo2-dev) draws the picture and writes it as PNG.
#include <cairo.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace {

using Matrix = Eigen::MatrixXf;
using Index = Eigen::Index;

// The task and the model.
constexpr Index kVocabulary = 16;  // tokens 0 … 15
constexpr Index kLength = 12;      // n, tokens per sequence
constexpr Index kModelWidth = 64;  // d_model
constexpr Index kHeads = 4;        // h; d_k = d_v = 64 / 4 = 16
// The training.
constexpr Index kBatch = 32;  // sequences per step: N = 32 · 12 = 384 rows
constexpr int kSteps = 1000;
constexpr int kReportEvery = 50;        // steps between two printed lines
constexpr int kPlotEvery = 10;          // steps between two points of the plotted loss curve
constexpr float kLearningRate = 1e-3f;  // Adam's step at the start; it decays to a tenth of it
// The test.
constexpr Index kHeldOut = 2000;  // fresh sequences, never trained on (2000 · 12 = 24 000 tokens)
constexpr double kTargetAccuracy = 0.99;
const double kPi = std::acos(-1.0);

/// A batch of sequences: tokens(b, i) is token i of sequence b; B × n.
using Tokens = Eigen::Matrix<int, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// B random sequences of n tokens; the same for a given engine state on every platform (the low
/// bits of a 64-bit Mersenne Twister, not a std distribution, whose algorithm varies).
Tokens random_sequences(Index batch, std::mt19937_64& engine) {
  Tokens tokens(batch, kLength);
  for (Index b = 0; b < batch; ++b)
    for (Index i = 0; i < kLength; ++i) tokens(b, i) = static_cast<int>(engine() % kVocabulary);
  return tokens;
}

/// The target of each sequence: the sequence reversed (each row of `tokens` read right to left).
Tokens reversed(const Tokens& tokens) { return tokens.rowwise().reverse(); }

/// A token as one character: 0 … 9, a … f.
char symbol(int token) { return "0123456789abcdef"[token]; }

/// Uniform in [−a, a) from the engine's bits (reproducible everywhere, like the module's weights).
Matrix uniform(Index rows, Index cols, double a, std::mt19937_64& engine) {
  Matrix m(rows, cols);
  for (Index j = 0; j < cols; ++j)
    for (Index i = 0; i < rows; ++i)
      m(i, j) = static_cast<float>((2.0 * static_cast<double>(engine() >> 11) * 0x1.0p-53 - 1.0) * a);
  return m;
}

/// A learnable matrix by name, as the module lists its own: a writable view of the storage.
using Named = mha::NamedMatrix<Matrix>;

Named named(const char* name, Matrix& m) { return {name, Eigen::Map<Matrix>(m.data(), m.rows(), m.cols())}; }

/// Adam (Kingma & Ba, 2015): each coefficient moves by its running mean of the gradient m divided
/// by the root of its running mean of squares v, so every parameter — embeddings, W^Q, W^O — takes
/// steps of about the learning rate whatever the scale of its gradient.
class Adam {
 public:
  explicit Adam(const std::vector<Named>& parameters) {
    for (const Named& p : parameters) {
      m_.push_back(Matrix::Zero(p.value.rows(), p.value.cols()));
      v_.push_back(Matrix::Zero(p.value.rows(), p.value.cols()));
    }
  }

  /// Moves parameters[k] against gradients[k]: two lists of the same shapes in the same order.
  void step(std::vector<Named>& parameters, const std::vector<Named>& gradients, float learning_rate) {
    constexpr float beta1 = 0.9f, beta2 = 0.999f, epsilon = 1e-8f;
    ++t_;
    // m and v start at 0, so early on they underestimate; dividing by 1 − β^t undoes that bias.
    const float correction1 = 1.0f - std::pow(beta1, static_cast<float>(t_));
    const float correction2 = 1.0f - std::pow(beta2, static_cast<float>(t_));
    for (std::size_t k = 0; k < parameters.size(); ++k) {
      const auto g = gradients[k].value.array();
      m_[k].array() = beta1 * m_[k].array() + (1.0f - beta1) * g;
      v_[k].array() = beta2 * v_[k].array() + (1.0f - beta2) * g.square();
      parameters[k].value.array() -=
          learning_rate * (m_[k].array() / correction1) / ((v_[k].array() / correction2).sqrt() + epsilon);
    }
  }

 private:
  std::vector<Matrix> m_, v_;  // one of each per parameter, of its shape
  int t_ = 0;
};

/// What one pass over a batch measured.
struct Score {
  double loss = 0;      // mean cross-entropy per token
  double accuracy = 0;  // fraction of tokens whose largest logit is the target
};

/// Cross-entropy of logits (N × vocab) against targets (one per row), and its gradient
/// dloss/dlogits = (softmax(logits) − onehot(target)) / N into `d_logits` when given.
Score cross_entropy(const Matrix& logits, const Tokens& targets, Matrix* d_logits) {
  const Index N = logits.rows();
  const Eigen::Map<const Eigen::VectorXi> target(targets.data(), N);  // row-major: row r = b·n + i
  Score score;
  if (d_logits) *d_logits = mha::softmax_rows(logits);
  for (Index r = 0; r < N; ++r) {
    // −log softmax(z)[t] = log Σ_j e^(z_j − max) − (z_t − max), without overflow or log(0).
    const float max = logits.row(r).maxCoeff();
    score.loss += std::log((logits.row(r).array() - max).exp().sum()) - (logits(r, target(r)) - max);
    Index predicted;
    logits.row(r).maxCoeff(&predicted);
    score.accuracy += predicted == target(r);
    if (d_logits) (*d_logits)(r, target(r)) -= 1.0f;
  }
  if (d_logits) *d_logits /= static_cast<float>(N);
  score.loss /= static_cast<double>(N);
  score.accuracy /= static_cast<double>(N);
  return score;
}

/// The model around the attention module: embeddings in, logits out, and their gradients.
struct ReverseModel {
  explicit ReverseModel(std::mt19937_64& engine)
      : attention(config()),
        // Embeddings uniform in [−1, 1), like the inputs of the other examples; the read-out
        // Xavier-uniform, like the module's own matrices.
        embedding(uniform(kVocabulary, kModelWidth, 1.0, engine)),
        position(uniform(kLength, kModelWidth, 1.0, engine)),
        w_out(uniform(kModelWidth, kVocabulary, std::sqrt(6.0 / (kModelWidth + kVocabulary)), engine)),
        b_out(Matrix::Zero(1, kVocabulary)),
        gradients(attention.zero_gradients()),
        d_embedding(Matrix::Zero(kVocabulary, kModelWidth)),
        d_position(Matrix::Zero(kLength, kModelWidth)),
        d_w_out(Matrix::Zero(kModelWidth, kVocabulary)),
        d_b_out(Matrix::Zero(1, kVocabulary)) {}

  static mha::MultiHeadAttentionConfig config() {
    mha::MultiHeadAttentionConfig c;
    c.d_model = kModelWidth;
    c.num_heads = kHeads;
    c.seed = 1;
    return c;
  }

  /// Every learnable matrix: the module's, in the order of its parameters(), then ours.
  std::vector<Named> parameters() {
    std::vector<Named> all = attention.parameters();
    all.insert(all.end(), {named("embedding", embedding), named("position", position), named("w_out", w_out),
                           named("b_out", b_out)});
    return all;
  }

  /// The gradient of each, in the same order and of the same shapes.
  std::vector<Named> gradient_list() {
    std::vector<Named> all = gradients.parameters();
    all.insert(all.end(), {named("embedding", d_embedding), named("position", d_position), named("w_out", d_w_out),
                           named("b_out", d_b_out)});
    return all;
  }

  /// X = E[x] + P, one row per token of every sequence: (B·n) × d_model.
  Matrix embed(const Tokens& tokens) const {
    Matrix x(tokens.size(), kModelWidth);
    for (Index b = 0; b < tokens.rows(); ++b)
      for (Index i = 0; i < kLength; ++i) x.row(b * kLength + i) = embedding.row(tokens(b, i)) + position.row(i);
    return x;
  }

  /// logits = A W_out + b_out: (B·n) × vocab.
  Matrix read_out(const Matrix& a) const {
    Matrix logits = a * w_out;
    logits.rowwise() += b_out.row(0);
    return logits;
  }

  /// The logits of a batch, without recording anything for a backward pass.
  Matrix logits(const Tokens& tokens) const {
    const Matrix x = embed(tokens);
    const std::vector<Index> lengths(static_cast<std::size_t>(tokens.rows()), kLength);
    return read_out(attention.forward_batch(x, lengths));
  }

  /// One forward and backward pass over a batch: fills every gradient and returns loss and accuracy.
  Score forward_backward(const Tokens& tokens) {
    const Matrix x = embed(tokens);  // N × d_model
    const std::vector<Index> lengths(static_cast<std::size_t>(tokens.rows()), kLength);
    const Matrix a = attention.forward_batch(x, lengths, {}, tape);  // N × d_model, x recorded once
    Matrix d_logits;                                                 // N × vocab
    const Score score = cross_entropy(read_out(a), reversed(tokens), &d_logits);

    // logits = A W_out + b_out: each gradient is a product with the matrix it was multiplied by.
    d_w_out.noalias() = a.transpose() * d_logits;     // d_model × vocab
    d_b_out = d_logits.colwise().sum();               // 1 × vocab
    const Matrix d_a = d_logits * w_out.transpose();  // N × d_model

    // A = MultiHeadAttention(X): the library adds dloss/dW into `gradients` and returns dloss/dX.
    gradients.set_zero();
    const Matrix d_x = attention.backward(tape, d_a, gradients).self_attention();  // N × d_model

    // X = E[x] + P: row r = b·n + i of X read row x_{b,i} of E and row i of P, so its gradient is
    // added back into exactly those rows (a token seen twice gets both contributions).
    d_embedding.setZero();
    d_position.setZero();
    for (Index b = 0; b < tokens.rows(); ++b)
      for (Index i = 0; i < kLength; ++i) {
        d_embedding.row(tokens(b, i)) += d_x.row(b * kLength + i);
        d_position.row(i) += d_x.row(b * kLength + i);
      }
    return score;
  }

  mha::MultiHeadAttention<float> attention;
  Matrix embedding;                                  // E: vocab × d_model, row t is token t
  Matrix position;                                   // P: n × d_model, row i is position i
  Matrix w_out;                                      // d_model × vocab
  Matrix b_out;                                      // 1 × vocab
  mha::Tape<float> tape;                             // the forward's intermediates, for the backward
  mha::AttentionParameters<float> gradients;         // dloss/dW of the module, shapes as the module's
  Matrix d_embedding, d_position, d_w_out, d_b_out;  // dloss/d of ours, shapes as ours
};

// ---- The picture, drawn with Cairo: pixel coordinates, y downwards, text placed by its baseline. ----

struct Rgb {
  double r, g, b;  // 0 … 255
};
constexpr Rgb kWhite{255, 255, 255}, kBlack{0, 0, 0}, kGrey{120, 120, 120}, kLightGrey{225, 225, 225},
    kBlue{31, 89, 160};

void set_colour(cairo_t* cr, Rgb c) { cairo_set_source_rgb(cr, c.r / 255, c.g / 255, c.b / 255); }

/// Fills a rectangle; on whole pixels its edges are crisp.
void fill(cairo_t* cr, double x, double y, double width, double height, Rgb c) {
  set_colour(cr, c);
  cairo_rectangle(cr, x, y, width, height);
  cairo_fill(cr);
}

/// Where a text's x lies: its left end, its centre or its right end (fractions of its width).
constexpr double kLeft = 0, kCentre = 0.5, kRight = 1;

/// Writes `text` in a font of `size` pixels, its baseline at y and its `anchor` point at x.
void text(cairo_t* cr, double x, double y, const std::string& text, Rgb c, double anchor = kLeft, double size = 15) {
  cairo_set_font_size(cr, size);
  cairo_text_extents_t extents;
  cairo_text_extents(cr, text.c_str(), &extents);
  set_colour(cr, c);
  cairo_move_to(cr, x - anchor * extents.x_advance, y);
  cairo_show_text(cr, text.c_str());
}

/// A rectangle of the picture: left, top, width, height in pixels.
struct Box {
  int x, y, width, height;
};

std::string format(const char* pattern, double value) {
  char buffer[128];
  std::snprintf(buffer, sizeof buffer, pattern, value);
  return buffer;
}

/// The loss against the step, log scale, in `box` (the plotting area; labels go around it).
void plot_loss(cairo_t* cr, Box box, const std::vector<std::pair<int, double>>& curve, int last_step) {
  double low = curve.front().second, high = low;
  for (const auto& point : curve) low = std::min(low, point.second), high = std::max(high, point.second);
  const int first_decade = static_cast<int>(std::floor(std::log10(low)));
  const int last_decade = static_cast<int>(std::ceil(std::log10(high)));
  const int bottom = box.y + box.height;
  const auto x_of = [&](double step) { return box.x + step / last_step * box.width; };
  const auto y_of = [&](double loss) {
    return bottom - (std::log10(loss) - first_decade) / (last_decade - first_decade) * box.height;
  };
  // Grid lines and labels: every power of ten on the loss axis, five ticks on the step axis.
  for (int decade = first_decade; decade <= last_decade; ++decade) {
    const double y = std::round(y_of(std::pow(10.0, decade)));
    fill(cr, box.x, y, box.width, 1, kLightGrey);
    text(cr, box.x - 10, y + 5, format("%g", std::pow(10.0, decade)), kBlack, kRight);
  }
  for (int tick = 0; tick <= 5; ++tick) {
    const int step = last_step * tick / 5;
    const double x = std::round(x_of(step));
    fill(cr, x, bottom, 1, 6, kBlack);
    text(cr, x, bottom + 24, std::to_string(step), kBlack, kCentre);
  }
  fill(cr, box.x, box.y, 2, box.height + 1, kBlack);  // loss axis
  fill(cr, box.x, bottom, box.width, 2, kBlack);      // step axis
  text(cr, box.x + box.width / 2.0, bottom + 48, "training step", kBlack, kCentre);
  // Without a current point the first line_to only moves there: the curve starts at its first point.
  cairo_new_path(cr);
  for (const auto& [step, loss] : curve) cairo_line_to(cr, x_of(step), y_of(loss));
  set_colour(cr, kBlue);
  cairo_set_line_width(cr, 2);
  cairo_set_line_join(cr, CAIRO_LINE_JOIN_ROUND);
  cairo_stroke(cr);
}

/// One head's attention weights (n × n, rows sum to 1) as a heatmap of cell × cell squares, white
/// for 0 to dark blue for 1, columns labelled with the input tokens and rows with the outputs.
void plot_weights(cairo_t* cr, int x, int y, int cell, const Matrix& weights, const std::string& inputs,
                  const std::string& outputs) {
  for (Index i = 0; i < weights.rows(); ++i)
    for (Index j = 0; j < weights.cols(); ++j) {
      const double w = std::clamp(static_cast<double>(weights(i, j)), 0.0, 1.0);
      const auto shade = [&](double to) { return 255 + w * (to - 255); };
      fill(cr, x + static_cast<double>(j * cell), y + static_cast<double>(i * cell), cell, cell,
           {shade(8), shade(48), shade(107)});
    }
  // A frame one pixel wide: centred on half pixels, it covers whole ones.
  const double size = cell * static_cast<double>(weights.rows());
  cairo_rectangle(cr, x + 0.5, y + 0.5, size, size);
  set_colour(cr, kGrey);
  cairo_set_line_width(cr, 1);
  cairo_stroke(cr);
  for (std::size_t k = 0; k < inputs.size(); ++k) {
    const double offset = static_cast<double>(k) * cell + cell / 2.0;
    text(cr, x + offset, y - 6, std::string(1, inputs[k]), kBlack, kCentre);
    text(cr, x - 10, y + offset + 5, std::string(1, outputs[k]), kBlack, kCentre);
  }
}

/// Writes the picture to `path` as PNG: the loss curve on the left, each head's weights on the
/// held-out example on the right. False when it could not be written.
bool write_picture(const std::string& path, const std::vector<std::pair<int, double>>& curve,
                   const std::vector<Matrix>& head_weights, const std::string& inputs, const std::string& outputs,
                   double accuracy) {
  constexpr int width = 1220, height = 720, cell = 18, map = cell * static_cast<int>(kLength);
  cairo_surface_t* surface = cairo_image_surface_create(CAIRO_FORMAT_RGB24, width, height);
  cairo_t* cr = cairo_create(surface);
  fill(cr, 0, 0, width, height, kWhite);  // a new surface is black
  // Cairo's simple text API: whatever font fontconfig gives for sans-serif (Debian: DejaVu Sans).
  cairo_select_font_face(cr, "sans-serif", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
  text(cr, 30, 45, "multi-head attention learns to reverse a sequence", kBlack, kLeft, 28);
  text(cr, 30, 78,
       "d_model " + std::to_string(kModelWidth) + ", " + std::to_string(kHeads) + " heads, vocabulary " +
           std::to_string(kVocabulary) + ", length " + std::to_string(kLength) +
           format("; held-out token accuracy %.2f%%", 100 * accuracy),
       kGrey);
  text(cr, 110, 125, "cross-entropy loss (log scale)", kBlack);
  plot_loss(cr, {110, 140, 440, 400}, curve, kSteps);
  for (std::size_t head = 0; head < head_weights.size(); ++head) {
    const int left = 700 + static_cast<int>(head % 2) * (map + 60), top = 130 + static_cast<int>(head / 2) * (map + 80);
    text(cr, left + map / 2.0, top - 28, "head " + std::to_string(head + 1), kBlack, kCentre, 17);
    plot_weights(cr, left, top, cell, head_weights[head], inputs, outputs);
  }
  text(cr, 30, 680,
       "right: each head's attention weights on one held-out sequence (each row sums to 1; white 0, blue 1)", kGrey);
  text(cr, 30, 702,
       "column j: input token j; row i: output token i, which is input token " + std::to_string(kLength - 1) +
           " - i: the anti-diagonal",
       kGrey);
  // A surface that could not be made ignores the drawing; writing it then reports the failure.
  const bool written = cairo_surface_write_to_png(surface, path.c_str()) == CAIRO_STATUS_SUCCESS;
  cairo_destroy(cr);
  cairo_surface_destroy(surface);
  return written;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string picture = argc > 1 ? argv[1] : "training.png";
  // One thread: a step's products are 384 × 64 by 64 × 64, about 2 ms of work in all, too little to
  // share out; threads would only add waiting (and, on a busy machine, a great deal of it).
  mha::set_num_threads(1);
  Eigen::setNbThreads(1);
  const auto start = std::chrono::steady_clock::now();

  std::mt19937_64 engine(2024);
  ReverseModel model(engine);
  std::vector<Named> parameters = model.parameters();
  const std::vector<Named> gradients = model.gradient_list();  // views: filled by each backward pass
  Adam adam(parameters);

  Index count = 0;
  for (const Named& p : parameters) count += p.value.size();
  std::printf(
      "Learning to reverse sequences of %ld tokens (vocabulary %ld) with one multi-head attention\n"
      "layer: d_model = %ld, h = %ld, d_k = d_v = %ld; %ld parameters, Adam, %ld sequences per step.\n\n",
      static_cast<long>(kLength), static_cast<long>(kVocabulary), static_cast<long>(kModelWidth),
      static_cast<long>(kHeads), static_cast<long>(kModelWidth / kHeads), static_cast<long>(count),
      static_cast<long>(kBatch));
  std::printf("   step    loss   accuracy   (means over the last %d steps' batches)\n", kReportEvery);

  std::vector<std::pair<int, double>> curve;  // (step, mean loss of the kPlotEvery steps up to it)
  Score recent;
  double plotted = 0;
  for (int step = 1; step <= kSteps; ++step) {
    // The learning rate decays along a half cosine to a tenth: big steps to find the anti-diagonal,
    // small ones to sharpen it.
    const double progress = static_cast<double>(step - 1) / kSteps;
    const float learning_rate = kLearningRate * static_cast<float>(0.1 + 0.45 * (1 + std::cos(kPi * progress)));
    const Score score = model.forward_backward(random_sequences(kBatch, engine));
    adam.step(parameters, gradients, learning_rate);
    recent.loss += score.loss / kReportEvery;
    recent.accuracy += score.accuracy / kReportEvery;
    plotted += score.loss / kPlotEvery;
    if (step % kPlotEvery == 0) {
      curve.emplace_back(step, plotted);
      plotted = 0;
    }
    if (step % kReportEvery == 0) {
      std::printf("  %5d  %6.4f     %5.1f%%\n", step, recent.loss, 100 * recent.accuracy);
      recent = {};
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  // The test: sequences drawn from an engine the training never used.
  std::mt19937_64 held_out_engine(7);
  const Tokens held_out = random_sequences(kHeldOut, held_out_engine);
  const Matrix held_out_logits = model.logits(held_out);
  const Score test = cross_entropy(held_out_logits, reversed(held_out), nullptr);
  Index whole = 0;  // sequences reversed without a single wrong token
  for (Index b = 0; b < kHeldOut; ++b) {
    bool right = true;
    for (Index i = 0; i < kLength; ++i) {
      Index predicted;
      held_out_logits.row(b * kLength + i).maxCoeff(&predicted);
      right = right && predicted == held_out(b, kLength - 1 - i);
    }
    whole += right;
  }
  std::printf(
      "\nTrained in %.1f s. On %ld held-out sequences: loss %.4f, token accuracy %.2f%% (target %.0f%%),\n"
      "%.2f%% of the sequences reversed without an error.\n",
      seconds, static_cast<long>(kHeldOut), test.loss, 100 * test.accuracy, 100 * kTargetAccuracy,
      100.0 * static_cast<double>(whole) / static_cast<double>(kHeldOut));

  // One held-out sequence: its reversal by the model, and where each head looked.
  const Tokens example = held_out.topRows(1);
  const Matrix x = model.embed(example);  // n × d_model
  const mha::AttentionResult<float> result =
      model.attention.forward_with_weights(x, x, x, {}, mha::AttentionWeights::per_head);
  std::string inputs, outputs;
  const Matrix example_logits = model.read_out(result.output);
  for (Index i = 0; i < kLength; ++i) {
    Index predicted;
    example_logits.row(i).maxCoeff(&predicted);
    inputs += symbol(example(0, i));
    outputs += symbol(static_cast<int>(predicted));
  }
  std::printf("\nFor example:  input %s  ->  output %s\n", inputs.c_str(), outputs.c_str());

  if (!write_picture(picture, curve, result.weights, inputs, outputs, test.accuracy)) {
    std::fprintf(stderr, "error: could not write %s\n", picture.c_str());
    return 1;
  }
  std::printf("Wrote %s: the loss curve and the attention weights of each head.\n", picture.c_str());

  if (test.accuracy < kTargetAccuracy) {
    std::printf("FAILED: held-out token accuracy %.2f%% is below the target %.0f%%.\n", 100 * test.accuracy,
                100 * kTargetAccuracy);
    return 1;
  }
  return 0;
}
