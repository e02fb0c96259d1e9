// Reads the PyTorch parity fixtures written by tests/fixtures/generate_fixtures.py.
//
// Format: lines starting with '#' and blank lines are skipped. The first other line holds
// `key value` pairs of integers (d_model 16 num_heads 4 causal 1 ...). Then come matrices, each a
// line `matrix NAME ROWS COLS` followed by ROWS lines of COLS numbers; a number may also be `inf`,
// `-inf` or `nan` (masks, and PyTorch's NaN rows).
#pragma once

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
    if (!(in >> word >> name >> rows >> cols) || word != "matrix" || rows < 0 || cols < 0 ||
        !detail::at_end(in))
      fail("expected 'matrix NAME ROWS COLS', got '" + line + "'");
    if (fixture.matrices.count(name) != 0) fail("matrix '" + name + "' repeated");
    Eigen::MatrixXd m(rows, cols);
    for (long r = 0; r < rows; ++r) {
      if (!detail::next_content_line(file, line, line_number))
        fail("matrix '" + name + "' ends after " + std::to_string(r) + " of " + std::to_string(rows) + " rows");
      std::istringstream row(line);
      for (long c = 0; c < cols; ++c)
        if (!detail::read_number(row, m(r, c)))
          fail("row " + std::to_string(r) + " of matrix '" + name + "' has fewer than " +
               std::to_string(cols) + " numbers");
      if (!detail::at_end(row))
        fail("row " + std::to_string(r) + " of matrix '" + name + "' has more than " +
             std::to_string(cols) + " numbers");
    }
    fixture.matrices.emplace(name, std::move(m));
  }
  if (fixture.matrices.empty()) fail("fixture holds no matrices");
  return fixture;
}

}  // namespace mha_test
