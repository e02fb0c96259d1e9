// Hostile input: what an adversarial caller can do with sizes, options, masks, caches and tapes
// gives mha::invalid_argument naming the argument (or the right result), leaves every object as
// it was, and never overflows, reads freed memory or terminates. Each test is one way in that
// once did otherwise; the safetensors reader's are in test_safetensors and test_pytorch_io, the
// allocation failures in test_memory.
#include <mha/mha.hpp>

#include "test_util.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using mha_test::config;
using mha_test::decoder_config;
using mha_test::error_of;
using mha_test::random_matrix;
using Index = Eigen::Index;
using Matrix = Eigen::MatrixXd;
using MatrixF = Eigen::MatrixXf;

/// Passes when `message` contains `part`.
::testing::AssertionResult says(const std::string& message, const std::string& part) {
  if (message.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "the message \"" << message << "\" does not say \"" << part << "\"";
}

constexpr Index kMaxIndex = std::numeric_limits<Index>::max();

// Row 1 of the audit: lengths whose sum wraps around to the row count passed the check and the
// batch then wrote out of bounds.
TEST(HostileInput, BatchLengthsWhoseSumWrapsAroundAreRejected) {
  const mha::MultiHeadAttention<double> attn(config(8, 2));
  const Matrix x = random_matrix<double>(10, 8, 1);
  // max + max + 12 wraps to 10 in two's complement.
  const std::vector<Index> wrapping = {kMaxIndex, kMaxIndex, 12};
  EXPECT_TRUE(says(error_of([&] { attn.forward_batch(x, wrapping); }),
                   "query_lengths add up to more than the 10 rows of query (sequence 0 has " +
                       std::to_string(kMaxIndex) + " after 0 rows before it)"));
  EXPECT_TRUE(says(error_of([&] { attn.forward_batch(x, x, x, {10}, wrapping); }),
                   "query_lengths has 1 sequences but key_lengths has 3"));
  EXPECT_TRUE(says(error_of([&] {
                     attn.forward_batch(x, x, x, {4, 6, 0}, wrapping);
                   }),
                   "key_lengths add up to more than the 10 rows of key (sequence 0"));
  EXPECT_TRUE(says(error_of([&] {
                     attn.forward_batch(x, {5, kMaxIndex - 2, 7});
                   }),
                   "(sequence 1 has " + std::to_string(kMaxIndex - 2) + " after 5 rows before it)"));
}

TEST(HostileInput, DecodeLengthsWhoseSumWrapsAroundAreRejectedAndLeaveTheCache) {
  const mha::MultiHeadAttention<double> attn(config(8, 2));
  auto cache = attn.make_cache(3);
  attn.decode_batch(random_matrix<double>(3, 8, 2), {1, 1, 1}, cache);
  const Matrix x = random_matrix<double>(10, 8, 3);
  EXPECT_TRUE(says(error_of([&] {
                     attn.decode_batch(x, {kMaxIndex, kMaxIndex, 12}, cache);
                   }),
                   "new_lengths add up to more than the 10 rows of x"));
  for (Index b = 0; b < 3; ++b) EXPECT_EQ(cache.length(b), 1);
  // A fixed capacity is checked without overflow too.
  auto fixed = attn.make_cache(1, 4);
  attn.decode(random_matrix<double>(2, 8, 4), fixed);
  EXPECT_TRUE(says(error_of([&] { attn.decode(random_matrix<double>(3, 8, 5), fixed); }),
                   "holds 2 of at most 4 tokens; 3 more do not fit"));
  EXPECT_EQ(fixed.length(), 2);
}

// Row 4: h·d_k overflowed (undefined behaviour), giving a module with a 4 × 0 W^Q.
TEST(HostileInput, ConfigurationsWhoseParametersOverflowAnIndexAreRejected) {
  auto huge_heads = config(4, 4, Index(1) << 62, Index(1) << 62);
  EXPECT_EQ(error_of([&] { huge_heads.resolved(); }),
            "mha: num_heads · d_k = 4 · 4611686018427387904 is too large: the parameters would not fit in memory "
            "(more than 2^63 bytes)");
  EXPECT_TRUE(says(error_of([&] { mha::MultiHeadAttention<float> attn(huge_heads); }), "num_heads · d_k"));
  auto huge_model = config(Index(1) << 40, 8);
  EXPECT_EQ(error_of([&] { mha::MultiHeadAttention<float> attn(huge_model); }),
            "mha: d_model · num_heads·d_k = 1099511627776 · 1099511627776 is too large: the parameters would not "
            "fit in memory (more than 2^63 bytes)");
  auto wide_values = config(8, 2, 4, Index(1) << 61);
  EXPECT_TRUE(says(error_of([&] { wide_values.resolved(); }), "num_kv_heads · d_v"));
  auto wide_keys = config(8, 2);
  wide_keys.kdim = Index(1) << 60;
  EXPECT_TRUE(says(error_of([&] { wide_keys.resolved(); }), "kdim · num_kv_heads·d_k"));
  // The gradients, the cache and the parameters are made from the same checked configuration.
  EXPECT_TRUE(says(error_of([&] { mha::AttentionParameters<double> p(huge_heads); }), "num_heads · d_k"));
  EXPECT_TRUE(says(error_of([&] { mha::KVCache<double> c(huge_heads); }), "num_heads · d_k"));
}

// Row 7: a scale finite in double but not in float made every output NaN.
TEST(HostileInput, AScaleThatOverflowsTheModulesScalarIsRejected) {
  const mha::MultiHeadAttention<float> attn(config(8, 2));
  const MatrixF x = random_matrix<float>(5, 8, 6);
  mha::AttentionOptions o;
  o.scale = 1e39;
  EXPECT_TRUE(
      says(error_of([&] { attn.forward(x, o); }), "options.scale = 1e+39 is not finite in the module's scalar type"));
  EXPECT_TRUE(
      says(error_of([&] { mha::scaled_dot_product_attention(x, x, x, o); }), "options.scale = 1e+39 is not finite"));
  auto cache = attn.make_cache();
  EXPECT_TRUE(says(error_of([&] { attn.decode(x, cache, o); }), "options.scale = 1e+39"));
  EXPECT_EQ(cache.length(), 0);
  // In double it is a (huge) finite scale, and finite inputs give finite outputs.
  const mha::MultiHeadAttention<double> attn_d(config(8, 2));
  EXPECT_TRUE(attn_d.forward(x.cast<double>(), o).allFinite());
}

// Row 8: a window near the largest index overflowed in the visibility arithmetic (UBSan) under
// bottom-right alignment with more queries than keys. A window wider than every distance hides
// nothing: the result is the unwindowed one.
TEST(HostileInput, AHugeWindowIsNoWindow) {
  const mha::MultiHeadAttention<double> attn(config(8, 2));
  const Matrix query = random_matrix<double>(9, 8, 7), keys = random_matrix<double>(4, 8, 8);
  for (const bool causal : {false, true})
    for (const auto alignment : {mha::CausalAlignment::top_left, mha::CausalAlignment::bottom_right}) {
      mha::AttentionOptions plain;
      plain.causal = causal;
      plain.alignment = alignment;
      const Matrix expected = attn.forward(query, keys, keys, plain);
      for (const Index window : {kMaxIndex, kMaxIndex - 1, kMaxIndex - 9, Index(13)}) {
        auto o = plain;
        o.window = window;
        EXPECT_EQ(attn.forward(query, keys, keys, o), expected) << window;
        EXPECT_EQ(mha::scaled_dot_product_attention(query, keys, keys, o),
                  mha::scaled_dot_product_attention(query, keys, keys, plain))
            << window;
      }
    }
  // Decoding: one token and several tokens per step.
  const mha::MultiHeadAttention<double> decoder(config(8, 2));
  auto windowed = decoder.make_cache(), plain = decoder.make_cache();
  mha::AttentionOptions huge;
  huge.window = kMaxIndex;
  for (const Index n : {Index(3), Index(1), Index(5)}) {
    const Matrix x = random_matrix<double>(n, 8, 10 + static_cast<std::uint64_t>(n));
    EXPECT_EQ(decoder.decode(x, windowed, huge), decoder.decode(x, plain));
  }
}

// Row 9: a denormal rotary base gave infinite frequencies and NaN outputs.
TEST(HostileInput, RotaryBasesWhoseFrequenciesOverflowAreRejected) {
  auto c = config(128, 2);  // d_k = 64: the last frequency is base^(−62/64)
  c.rotary = true;
  for (const double base : {1e-320, 1e-300}) {
    c.rotary_base = base;
    EXPECT_TRUE(says(error_of([&] { c.resolved(); }), "whose angles overflow")) << base;
  }
  // A small base whose frequencies and angles stay finite is a (strange) valid one.
  c.rotary_base = 1e-30;
  EXPECT_NO_THROW(c.resolved());
  auto narrow = config(8, 2);  // d_k = 4: the frequencies are 1 and base^(−1/2)
  narrow.rotary = true;
  narrow.rotary_base = 1e-320;
  const mha::MultiHeadAttention<double> attn(narrow);
  EXPECT_TRUE(attn.forward(random_matrix<double>(6, 8, 9)).allFinite());
}

// Row 10: a tape recorded with dropout, differentiated by another module of the same shape
// without it, gave silently wrong gradients.
TEST(HostileInput, BackwardRefusesATapeAnotherModuleRecorded) {
  auto c = config(8, 2);
  c.dropout = 0.5;
  const mha::MultiHeadAttention<double> dropping(c);
  const mha::MultiHeadAttention<double> other(config(8, 2));
  const Matrix x = random_matrix<double>(5, 8, 11);
  mha::AttentionOptions training;
  training.training = true;
  mha::Tape<double> tape;
  dropping.forward(x, training, tape);
  auto grads = other.zero_gradients();
  EXPECT_EQ(error_of([&] { other.backward(tape, x, grads); }),
            "mha: MultiHeadAttention::backward: the tape was recorded by another module of the same shape; call "
            "backward() on the module whose forward() recorded it");
  EXPECT_EQ(grads.w_q().norm(), 0.0);
  // A copy is another module; a moved-to module is the same one.
  const mha::MultiHeadAttention<double> copy = dropping;
  EXPECT_TRUE(says(error_of([&] { copy.backward(tape, x, grads); }), "recorded by another module"));
  mha::MultiHeadAttention<double> source(c);
  mha::Tape<double> moved_tape;
  source.forward(x, training, moved_tape);
  const mha::MultiHeadAttention<double> moved = std::move(source);
  EXPECT_NO_THROW(moved.backward(moved_tape, x, grads));
}

// Row 11: a module passed as its own gradients changed W^O while the backward read it.
TEST(HostileInput, AModuleIsNotItsOwnGradients) {
  mha::MultiHeadAttention<double> attn(config(8, 2));
  const Matrix x = random_matrix<double>(5, 8, 12);
  mha::Tape<double> tape;
  attn.forward(x, {}, tape);
  const Matrix w_o = attn.w_o();
  EXPECT_EQ(error_of([&] { attn.backward(tape, x, attn); }),
            "mha: MultiHeadAttention::backward: gradients is this module itself, whose weights the backward reads; "
            "pass the gradients zero_gradients() made");
  EXPECT_EQ(Matrix(attn.w_o()), w_o);
}

mha_test::BoolMatrix causal_blocked(Index n) {
  mha_test::BoolMatrix m(n, n);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < n; ++j) m(i, j) = j > i;
  return m;
}

// Row 12: a mask made from a temporary viewed freed memory (ASan: heap-use-after-free).
TEST(HostileInput, AMaskMadeFromATemporaryKeepsItsOwnCopy) {
  const mha::MultiHeadAttention<double> attn(config(8, 2));
  const Matrix x = random_matrix<double>(6, 8, 13);
  const mha_test::BoolMatrix named = causal_blocked(6);
  mha::AttentionOptions viewing;
  viewing.mask = mha::AttentionMask::blocked(named);
  mha::AttentionOptions owning;
  owning.mask = mha::AttentionMask::blocked(causal_blocked(6));                   // the temporary dies here
  const mha_test::BoolMatrix reuse = mha_test::BoolMatrix::Constant(6, 6, true);  // may take its memory
  mha::AttentionOptions additive;
  additive.mask = mha::AttentionMask::additive(Matrix(named.cast<double>() * -1e300));
  EXPECT_EQ(attn.forward(x, owning), attn.forward(x, viewing));
  EXPECT_TRUE(mha_test::close(attn.forward(x, additive), attn.forward(x, viewing), 1e-12));
  EXPECT_TRUE(reuse.all());
}

// Row 12, the tape: a mask whose matrix is gone before the backward pass.
TEST(HostileInput, ATapeKeepsTheMasksItsBackwardReads) {
  const mha::MultiHeadAttention<double> attn(config(8, 2));
  const Matrix x = random_matrix<double>(6, 8, 14), dy = random_matrix<double>(6, 8, 15);
  const mha_test::BoolMatrix kept = causal_blocked(6);
  mha::AttentionOptions o;
  o.mask = mha::AttentionMask::blocked(kept);
  mha::Tape<double> expected_tape;
  attn.forward(x, o, expected_tape);
  auto expected = attn.zero_gradients();
  const Matrix expected_dq = attn.backward(expected_tape, dy, expected).query;

  mha::Tape<double> tape;
  {
    auto scoped = std::make_unique<mha_test::BoolMatrix>(kept);
    mha::AttentionOptions scoped_options;
    scoped_options.mask = mha::AttentionMask::blocked(*scoped);  // views *scoped
    attn.forward(x, scoped_options, tape);
    scoped->setConstant(false);  // what the forward read is no longer there…
    scoped.reset();              // …and then not at all
  }
  auto grads = attn.zero_gradients();
  EXPECT_EQ(attn.backward(tape, dy, grads).query, expected_dq);
  EXPECT_EQ(grads.w_q(), expected.w_q());
}

// Row 13: a cache filled with a window, then decoded without it, gave rows no forward pass gives;
// a second layer decoding into the first layer's cache mixed both layers' keys.
TEST(HostileInput, ACacheBelongsToTheModuleAndWindowThatFilledIt) {
  const mha::MultiHeadAttention<double> layer1(decoder_config(8, 2, 1)), layer2(decoder_config(8, 2, 1));
  const Matrix x = random_matrix<double>(4, 8, 16), next = random_matrix<double>(1, 8, 17);
  auto cache = layer1.make_cache();
  mha::AttentionOptions windowed;
  windowed.window = 3;
  layer1.decode(x, cache, windowed);
  EXPECT_EQ(error_of([&] { layer1.decode(next, cache); }),
            "mha: MultiHeadAttention::decode: the cache holds tokens decoded with options.window = 3; "
            "options.window = 0 would attend over other keys than theirs (reset() the cache to change it)");
  EXPECT_EQ(error_of([&] { layer2.decode(next, cache, windowed); }),
            "mha: MultiHeadAttention::decode: the cache holds tokens that another module decoded; a cache belongs to "
            "one module (one layer): make one per layer with make_cache(), or reset() it");
  mha::AttentionOptions rescaled = windowed;
  rescaled.scale = 0.25;
  EXPECT_TRUE(says(error_of([&] { layer1.decode(next, cache, rescaled); }),
                   "the cache holds tokens decoded with the scale 0.5; options.scale gives 0.25"));
  EXPECT_EQ(cache.length(), 4);
  // The same module and window go on; an emptied cache can be filled anew by anyone.
  EXPECT_NO_THROW(layer1.decode(next, cache, windowed));
  EXPECT_EQ(cache.length(), 5);
  cache.reset();
  EXPECT_NO_THROW(layer2.decode(next, cache));
  cache.truncate(0);
  EXPECT_NO_THROW(layer1.decode(next, cache, windowed));
}

// Row 3, the mechanism: an exception on a worker thread of an OpenMP region reached
// std::terminate. It is carried to the calling thread and rethrown there.
TEST(HostileInput, AnExceptionOnAWorkerThreadReachesTheCaller) {
#ifndef _OPENMP
  GTEST_SKIP() << "built without OpenMP: every task runs on the calling thread";
#else
  mha::set_num_threads(2);
  int team = 0;
  const auto run = [&](bool throw_in_scratch) {
    mha::detail::parallel_tasks(
        64, 1e12,
        [&] {
          if (omp_get_thread_num() == 1) {
            team = omp_get_num_threads();
            if (throw_in_scratch) throw std::bad_alloc();
          }
          return 0;
        },
        [&](Index t, int) {
          if (t == 5 && !throw_in_scratch) throw mha::invalid_argument("task 5");
        });
  };
  bool caught = false;
  try {
    run(true);
  } catch (const std::bad_alloc&) {
    caught = true;
  }
  EXPECT_TRUE(caught);
  EXPECT_EQ(team, 2) << "the region must really run on two threads";
  EXPECT_EQ(error_of([&] { run(false); }), "task 5");
  mha::set_num_threads(0);
#endif
}

}  // namespace
