// Reads the PyTorch parity fixtures written by tests/fixtures/generate_fixtures.py.
//
// Format: lines starting with '#' and blank lines are skipped. The first other line holds
// `key value` pairs of integers (d_model 16 num_heads 4 causal 1 ...). Then come matrices, each a
// line `matrix NAME ROWS COLS` followed by ROWS lines of COLS numbers; a number may also be `inf`,
// `-inf` or `nan` (masks, and PyTorch's NaN rows).
//
// Also what the feature and gradient fixtures (features/, gradients/) share: the module
// configuration of their header, their parameters loaded into a module, and the attention options
// their masks make.
#pragma once

#include <mha/config.hpp>
#include <mha/mask.hpp>

#include <Eigen/Core>

#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace mha_test {

/// One fixture: the header's integers and the matrices by name.
struct Fixture {
  std::string path;
  std::map<std::string, long> header;
  std::map<std::string, Eigen::MatrixXd> matrices;

  /// \returns the header value `key`; throws std::runtime_error if the header lacks it.
  long value(const std::string& key) const {
    const auto it = header.find(key);
    if (it == header.end()) throw std::runtime_error(path + ": header has no key '" + key + "'");
    return it->second;
  }

  /// \returns the matrix `name`; throws std::runtime_error if the fixture lacks it.
  const Eigen::MatrixXd& matrix(const std::string& name) const {
    const auto it = matrices.find(name);
    if (it == matrices.end()) throw std::runtime_error(path + ": no matrix '" + name + "'");
    return it->second;
  }

  /// \returns the matrix `name`, which must be rows × cols; throws std::runtime_error if the
  /// fixture lacks it or it has another shape.
  const Eigen::MatrixXd& matrix(const std::string& name, Eigen::Index rows, Eigen::Index cols) const {
    const Eigen::MatrixXd& m = matrix(name);
    if (m.rows() != rows || m.cols() != cols)
      throw std::runtime_error(path + ": " + name + " is " + std::to_string(m.rows()) + " x " +
                               std::to_string(m.cols()) + ", expected " + std::to_string(rows) + " x " +
                               std::to_string(cols));
    return m;
  }

  /// \returns whether the fixture holds the matrix `name`.
  bool has(const std::string& name) const { return matrices.count(name) != 0; }
};

namespace detail {

/// Reads the next line that is neither blank nor a '#' comment; false at end of file.
inline bool next_content_line(std::istream& in, std::string& line, long& line_number) {
  while (std::getline(in, line)) {
    ++line_number;
    const auto first = line.find_first_not_of(" \t\r");
    if (first != std::string::npos && line[first] != '#') return true;
  }
  return false;
}

/// Reads one number: a decimal as `>>` reads it, or inf, +inf, -inf, nan (which `>>` does not read).
inline bool read_number(std::istream& in, double& x) {
  std::string word;
  if (!(in >> word)) return false;
  if (word == "inf" || word == "+inf" || word == "-inf") {
    x = word[0] == '-' ? -std::numeric_limits<double>::infinity() : std::numeric_limits<double>::infinity();
    return true;
  }
  if (word == "nan" || word == "+nan" || word == "-nan") {
    x = std::numeric_limits<double>::quiet_NaN();
    return true;
  }
  std::istringstream number(word);
  return number >> x && (number >> std::ws).eof();
}

/// True if nothing but whitespace is left in `in`.
inline bool at_end(std::istringstream& in) {
  in >> std::ws;
  return in.eof();
}

}  // namespace detail

/// Loads the fixture at `path`; throws std::runtime_error naming the path (and the line) if the
/// file cannot be opened or its content is malformed.
inline Fixture load_fixture(const std::string& path) {
  std::ifstream file(path);
  if (!file) throw std::runtime_error("cannot open fixture file " + path);
  Fixture fixture;
  fixture.path = path;
  long line_number = 0;
  const auto fail = [&](const std::string& what) {
    throw std::runtime_error(path + ":" + std::to_string(line_number) + ": " + what);
  };

  std::string line;
  if (!detail::next_content_line(file, line, line_number)) fail("empty fixture (no header line)");
  {
    std::istringstream in(line);
    std::string key;
    while (in >> key) {
      long value = 0;
      if (!(in >> value)) fail("header key '" + key + "' has no integer value");
      if (!fixture.header.emplace(key, value).second) fail("header key '" + key + "' repeated");
    }
  }

  while (detail::next_content_line(file, line, line_number)) {
    std::istringstream in(line);
    std::string word, name;
    long rows = -1, cols = -1;
    if (!(in >> word >> name >> rows >> cols) || word != "matrix" || rows < 0 || cols < 0 || !detail::at_end(in))
      fail("expected 'matrix NAME ROWS COLS', got '" + line + "'");
    if (fixture.matrices.count(name) != 0) fail("matrix '" + name + "' repeated");
    Eigen::MatrixXd m(rows, cols);
    for (long r = 0; r < rows; ++r) {
      if (!detail::next_content_line(file, line, line_number))
        fail("matrix '" + name + "' ends after " + std::to_string(r) + " of " + std::to_string(rows) + " rows");
      std::istringstream row(line);
      for (long c = 0; c < cols; ++c)
        if (!detail::read_number(row, m(r, c)))
          fail("row " + std::to_string(r) + " of matrix '" + name + "' has fewer than " + std::to_string(cols) +
               " numbers");
      if (!detail::at_end(row))
        fail("row " + std::to_string(r) + " of matrix '" + name + "' has more than " + std::to_string(cols) +
             " numbers");
    }
    fixture.matrices.emplace(name, std::move(m));
  }
  if (fixture.matrices.empty()) fail("fixture holds no matrices");
  return fixture;
}

/// The module configuration in the header of a feature or gradient fixture (keys d_model
/// num_heads d_k d_v kdim vdim bias add_bias_kv add_zero_attn). The seed is arbitrary: the
/// parameters come from the fixture (load_parameters).
inline mha::MultiHeadAttentionConfig module_config(const Fixture& f) {
  mha::MultiHeadAttentionConfig cfg;
  cfg.d_model = f.value("d_model");
  cfg.num_heads = f.value("num_heads");
  cfg.d_k = f.value("d_k");
  cfg.d_v = f.value("d_v");
  cfg.kdim = f.value("kdim");
  cfg.vdim = f.value("vdim");
  cfg.bias = f.value("bias") != 0;
  cfg.add_bias_kv = f.value("add_bias_kv") != 0;
  cfg.add_zero_attn = f.value("add_zero_attn") != 0;
  cfg.seed = 1;
  return cfg;
}

/// Writes the fixture's w_q w_k w_v w_o, and b_q b_k b_v b_o (config.bias) and bias_k bias_v
/// (config.add_bias_kv), into `module` through its writable views; throws std::runtime_error if
/// one is missing or not shaped as the view.
template <typename Module>
void load_parameters(const Fixture& f, Module& module) {
  using Scalar = typename Module::Scalar;
  const auto load = [&f](const std::string& name, auto&& view) {
    view = f.matrix(name, view.rows(), view.cols()).template cast<Scalar>();
  };
  load("w_q", module.w_q());
  load("w_k", module.w_k());
  load("w_v", module.w_v());
  load("w_o", module.w_o());
  if (module.config().bias) {
    load("b_q", module.b_q());
    load("b_k", module.b_k());
    load("b_v", module.b_v());
    load("b_o", module.b_o());
  }
  if (module.config().add_bias_kv) {
    load("bias_k", module.bias_k());
    load("bias_v", module.bias_v());
  }
}

/// The attention options of a feature or gradient fixture: causal and its alignment from the
/// header, and the masks it holds, in `Scalar`. The options made by options() view the masks here.
template <typename Scalar>
struct FixtureOptions {
  using BoolMatrix = Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic>;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

  bool causal = false, bottom_right = false;
  BoolMatrix attn_mask_bool, key_padding_bool;  // empty when the fixture has none
  Matrix attn_mask_float, key_padding_float;    // likewise

  /// Reads the header's causal and bottom_right and the matrices attn_mask_bool or
  /// attn_mask_float (L × S or h·L × S) and key_padding_mask or key_padding_mask_float (B × S);
  /// throws std::runtime_error on a mask of another shape.
  void read(const Fixture& f) {
    causal = f.value("causal") != 0;
    bottom_right = f.value("bottom_right") != 0;
    const Eigen::Index h = f.value("num_heads"), L = f.value("L"), S = f.value("S"), B = f.value("batch");
    const auto mask = [&](const std::string& name) -> const Eigen::MatrixXd& {
      const Eigen::MatrixXd& m = f.matrix(name);
      if (m.cols() != S || (m.rows() != L && m.rows() != h * L))
        throw std::runtime_error(f.path + ": " + name + " is " + std::to_string(m.rows()) + " x " +
                                 std::to_string(m.cols()) + ", expected L x S or h*L x S");
      return m;
    };
    if (f.has("attn_mask_bool")) attn_mask_bool = mask("attn_mask_bool").array() != 0.0;
    if (f.has("attn_mask_float")) attn_mask_float = mask("attn_mask_float").template cast<Scalar>();
    if (f.has("key_padding_mask")) key_padding_bool = f.matrix("key_padding_mask", B, S).array() != 0.0;
    if (f.has("key_padding_mask_float"))
      key_padding_float = f.matrix("key_padding_mask_float", B, S).template cast<Scalar>();
  }

  /// The options the fixture describes: causal and alignment, attn_mask_bool as blocked or
  /// attn_mask_float as additive, key_padding_mask as blocked or key_padding_mask_float as additive.
  mha::AttentionOptions options() const {
    mha::AttentionOptions o;
    o.causal = causal;
    o.alignment = bottom_right ? mha::CausalAlignment::bottom_right : mha::CausalAlignment::top_left;
    if (attn_mask_bool.size() > 0) o.mask = mha::AttentionMask::blocked(attn_mask_bool);
    if (attn_mask_float.size() > 0) o.mask = mha::AttentionMask::additive(attn_mask_float);
    if (key_padding_bool.size() > 0) o.key_padding_mask = mha::AttentionMask::blocked(key_padding_bool);
    if (key_padding_float.size() > 0) o.key_padding_mask = mha::AttentionMask::additive(key_padding_float);
    return o;
  }
};

}  // namespace mha_test
