// A structure-aware libFuzzer harness for the safetensors reader and the PyTorch import. The first
// byte chooses how the others are read: as a whole file, given to the reader as it is, or as the
// choices of a generator that writes a file whose header it then mutates. The generator writes
// tensors with nn.MultiheadAttention's state_dict names (packed or with kdim and vdim, biases,
// bias_k and bias_v) or other names, of F32, F16, BF16, F64, BOOL, I64, U8, F4 and unknown dtypes;
// the mutations nest values deeply, write huge, negative and fractional numbers, wrong types,
// missing, extra and repeated keys, repeated names, offsets out of range or overlapping, wrong
// header lengths, truncated data and broken JSON.
// Properties checked, besides "no crash and no sanitizer report":
//   - SafeTensors::parse, matrix_size, matrix and from_state_dict throw only mha::invalid_argument;
//   - a file written without mutations is accepted and reads back as written: names, dtypes,
//     shapes, bytes and metadata; one nesting deeper than the reader's bound is rejected for that;
//   - every tensor accepted holds the bytes its shape and dtype need; matrix() reads exactly the
//     ranks and dtypes it documents, at the size matrix_size() gives, F32 and F64 bit for bit, BOOL
//     (whose bytes the generator makes all 0 or 1 by choice) as 0 and 1 exactly when every byte is
//     0 or 1; matrix<bool>() reads exactly those BOOL tensors, byte for byte;
//   - a module from_state_dict builds holds one parameter per value of its file (every weight
//     comes from the file: a small file cannot make a big module), and a valid state_dict is
//     accepted by every num_heads that divides its width;
//   - error messages stay short: values from the file are quoted only in part.
// Built with clang's -fsanitize=fuzzer; fuzz_replay.cpp runs the same function over the committed
// corpus_safetensors in every build, so each input the fuzzer ever found becomes a regression test.
#include <mha/io/pytorch.hpp>
#include <mha/io/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace {

using Bytes = std::vector<unsigned char>;

/// Reads choices from the fuzzer's bytes; past the end, every read gives 0.
class Choices {
 public:
  Choices(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}

  std::uint8_t byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  /// An integer in [lo, hi].
  int in(int lo, int hi) { return lo + static_cast<int>(byte() % static_cast<unsigned>(hi - lo + 1)); }
  /// True once in `n` times.
  bool one_in(int n) { return in(0, n - 1) == 0; }
  /// One of the `n` strings at `options`.
  template <std::size_t N>
  const char* pick(const char* const (&options)[N]) {
    return options[byte() % N];
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
};

[[noreturn]] void violated(const char* property, const std::string& detail = "") {
  std::fprintf(stderr, "fuzz_safetensors: property violated: %s %s\n", property, detail.c_str());
  std::abort();
}

/// The deepest nesting the reader accepts (the bound the reader documents).
constexpr int kMaxDepth = mha::detail::kMaxHeaderDepth;

/// `depth` arrays, one inside the other, around 1.
std::string nested(int depth) { return std::string(depth, '[') + "1" + std::string(depth, ']'); }

/// A tensor as the generator wrote it.
struct Written {
  std::string name;
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;
  /// The header's fields of its entry, in order: key and JSON text of the value.
  std::vector<std::pair<std::string, std::string>> fields;
  std::string entry;      ///< the whole entry's JSON text, when a mutation replaced it
  bool plain = true;      ///< no mutation touched it: it must read back as written
  bool shadowed = false;  ///< a later entry has the same name, and counts instead
};

/// What the generator wrote, and what it knows the reader must do with it.
struct Generated {
  Bytes file;
  std::vector<Written> tensors;
  std::map<std::string, std::string> metadata;
  bool valid = true;        ///< a well-formed file: must be accepted
  int depth = 0;            ///< the deepest nesting in the bytes the header length covers
  bool state_dict = false;  ///< a valid nn.MultiheadAttention state_dict of width E
  std::int64_t E = 0;       ///< the width of the state_dict
  std::uint64_t data = 0;   ///< where the data buffer begins, by the header length written
};

/// A tensor `name` of shape `shape`, its dtype and place chosen later.
Written written(const std::string& name, std::vector<std::int64_t> shape) {
  Written w;
  w.name = name;
  w.shape = std::move(shape);
  return w;
}

/// The tensors of a state_dict of width E: packed (in_proj_weight) or with kdim and vdim; biases
/// and bias_k, bias_v by choice.
std::vector<Written> state_dict(Choices& in, std::int64_t E) {
  std::vector<Written> t;
  if (in.one_in(2)) {
    t.push_back(written("in_proj_weight", {3 * E, E}));
  } else {
    t.push_back(written("q_proj_weight", {E, E}));
    t.push_back(written("k_proj_weight", {E, in.in(1, 6)}));
    t.push_back(written("v_proj_weight", {E, in.in(1, 6)}));
  }
  t.push_back(written("out_proj.weight", {E, E}));
  if (in.one_in(2)) {
    t.push_back(written("in_proj_bias", {3 * E}));
    t.push_back(written("out_proj.bias", {E}));
  }
  if (in.one_in(3)) {
    t.push_back(written("bias_k", {1, 1, E}));
    t.push_back(written("bias_v", {1, 1, E}));
  }
  return t;
}

/// Tensors of other names, ranks 0 to 3 and sizes 0 to 6.
std::vector<Written> other_tensors(Choices& in) {
  static const char* const kNames[] = {
      "w", "", "a.b", "\"quoted\"", "\xc3\xbc", "__metadata", "in_proj_weight", "out_proj.weight", "bias_k", "x"};
  std::vector<Written> t(static_cast<std::size_t>(in.in(0, 4)));
  for (Written& w : t) {
    w.name = in.pick(kNames);
    w.shape.resize(static_cast<std::size_t>(in.in(0, 3)));
    for (std::int64_t& n : w.shape) n = in.in(0, 6);
  }
  return t;
}

/// A JSON number or other value where a size or offset belongs: huge, negative, fractional, of the
/// wrong type, or nested.
std::string odd_number(Choices& in) {
  static const char* const kOdd[] = {"-1",
                                     "1.5",
                                     "4.0",
                                     "-0",
                                     "1e400",
                                     "18446744073709551615",
                                     "18446744073709551616",
                                     "9223372036854775807",
                                     "9223372036854775808",
                                     "4294967296",
                                     "2305843009213693952",
                                     "\"4\"",
                                     "null",
                                     "true",
                                     "[4]",
                                     "{\"n\":4}",
                                     "-9223372036854775808",
                                     "0"};
  return in.pick(kOdd);
}

/// The JSON text of a list of numbers.
template <typename T>
std::string json_list(const std::vector<T>& values) {
  std::string s = "[";
  for (std::size_t i = 0; i < values.size(); ++i) s += (i ? "," : "") + std::to_string(values[i]);
  return s + "]";
}

/// The JSON text of the field `key` of `w`'s entry, or nullptr if a mutation removed it.
std::string* field(Written& w, const std::string& key) {
  for (auto& [k, value] : w.fields)
    if (k == key) return &value;
  return nullptr;
}

/// The deepest nesting of arrays and objects in the JSON `text`, strings skipped: the harness's own
/// count, to judge the reader's.
int nesting(const std::string& text) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (const char c : text) {
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return deepest;
}

/// The little-endian 8-byte header length n.
void append_length(Bytes& file, std::uint64_t n) {
  for (int i = 0; i < 8; ++i) file.push_back(static_cast<unsigned char>(n >> (8 * i)));
}

/// A file from the choices `in` makes, with what the reader must make of it.
Generated generate(Choices& in) {
  static const char* const kFloatDtypes[] = {"F32", "F16", "BF16", "F64"};
  static const char* const kAnyDtypes[] = {"F32", "F16",     "BF16", "F64",     "BOOL", "I64", "U8", "F4",
                                           "I32", "F8_E4M3", "C64",  "F6_E2M3", "F128", "f32", ""};
  Generated g;
  g.state_dict = !in.one_in(4);
  g.E = in.in(1, 8);
  g.tensors = g.state_dict ? state_dict(in, g.E) : other_tensors(in);
  const std::string common = in.pick(kFloatDtypes);
  const bool mixed = in.one_in(4);
  for (Written& w : g.tensors) w.dtype = mixed || !g.state_dict ? in.pick(kAnyDtypes) : common;
  if (mixed) g.state_dict = false;

  // Each tensor's bytes, one after another in the buffer (or in the reverse order), now and then
  // with a gap.
  std::uint64_t size = 0;
  std::vector<std::size_t> order(g.tensors.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  if (in.one_in(3)) std::reverse(order.begin(), order.end());
  for (std::size_t i : order) {
    Written& w = g.tensors[i];
    const unsigned bits = mha::detail::dtype_bits(w.dtype);
    std::uint64_t elements = 1;
    for (std::int64_t n : w.shape) elements *= static_cast<std::uint64_t>(n);
    if (bits == 0 || elements * bits % 8 != 0) g.valid = false;  // an unknown dtype, or part of a byte
    if (in.one_in(4)) size += static_cast<std::uint64_t>(in.in(1, 4));
    w.begin = size;
    w.end = size += (elements * bits + 7) / 8;
  }
  for (Written& w : g.tensors)
    w.fields = {{"dtype", nlohmann::json(w.dtype).dump()},
                {"shape", json_list(w.shape)},
                {"data_offsets", json_list(std::vector<std::uint64_t>{w.begin, w.end})}};
  if (in.one_in(4)) g.metadata = {{"format", "pt"}, {in.one_in(2) ? "\xc3\xbc" : "num_heads", "2"}};
  std::string metadata_text;
  if (!g.metadata.empty()) metadata_text = nlohmann::json(g.metadata).dump();

  // Mutations of the header, and of the lengths around it.
  std::int64_t length_change = 0;
  std::uint64_t forced_length = 0;
  std::int64_t data_change = 0;
  bool syntax_broken = false, deep_root = false;
  std::size_t corrupt_at = 0;
  const int mutations = in.one_in(2) ? 0 : in.in(1, 3);
  for (int m = 0; m < mutations; ++m) {
    Written* w = g.tensors.empty() ? nullptr : &g.tensors[in.byte() % g.tensors.size()];
    const int kind = in.in(0, 13);
    if (kind <= 8 && w == nullptr) continue;  // kinds 0 to 8 change a tensor's entry
    if (kind <= 6) w->plain = false;
    bool harmless = false;  // the file stays well-formed
    switch (kind) {
      case 0: {  // a size of the shape: odd, or sizes whose product overflows
        if (in.one_in(2) || w->shape.empty()) {
          std::vector<std::string> dims;
          for (std::int64_t n : w->shape) dims.push_back(std::to_string(n));
          if (dims.empty() || in.one_in(3))
            dims.push_back(odd_number(in));
          else
            dims[in.byte() % dims.size()] = odd_number(in);
          std::string text = "[";
          for (std::size_t i = 0; i < dims.size(); ++i) text += (i ? "," : "") + dims[i];
          if (std::string* f = field(*w, "shape")) *f = text + "]";
        } else {
          if (std::string* f = field(*w, "shape"))
            *f = in.one_in(2) ? "[4294967296,4294967296]" : "[2305843009213693951,8]";
        }
        break;
      }
      case 1:  // data_offsets: odd values, out of range, reversed, wrong count
        if (std::string* f = field(*w, "data_offsets")) {
          const std::string begin = std::to_string(w->begin), end = std::to_string(w->end);
          switch (in.in(0, 4)) {
            case 0:
              *f = "[" + odd_number(in) + "," + end + "]";
              break;
            case 1:
              *f = "[" + begin + "," + odd_number(in) + "]";
              break;
            case 2:
              *f = "[" + end + "," + begin + "]";
              break;
            case 3:
              *f = "[" + begin + "," + std::to_string(w->end + static_cast<std::uint64_t>(in.in(1, 300))) + "]";
              break;
            default:
              *f = in.one_in(2) ? "[0]" : "[0,0,0]";
              break;
          }
        }
        break;
      case 2:  // dtype of the wrong type
        if (std::string* f = field(*w, "dtype")) *f = in.one_in(2) ? odd_number(in) : "\"F32\\u0000\"";
        break;
      case 3:  // a key missing
        if (!w->fields.empty()) w->fields.erase(w->fields.begin() + in.byte() % w->fields.size());
        break;
      case 4:  // a key twice (the last counts) or one the format does not have
        if (in.one_in(2))
          w->fields.push_back({"shape", json_list(std::vector<int>{in.in(0, 9)})});
        else
          w->fields.push_back({"extra", odd_number(in)});
        break;
      case 5:  // the entry is not an object
        w->entry = odd_number(in);
        break;
      case 6:  // deep nesting in a field, in the entry, or in the metadata
      {
        static const int kDepths[] = {kMaxDepth - 3, kMaxDepth - 2, kMaxDepth - 1, kMaxDepth, 64, 5000, 100000};
        const int depth = kDepths[in.byte() % 7];
        static const char* const kFields[] = {"dtype", "shape", "data_offsets", ""};
        const std::string where = in.pick(kFields);
        if (where.empty())
          w->entry = nested(depth);
        else if (std::string* f = field(*w, where))
          *f = nested(depth);
        break;
      }
      case 7:  // another tensor's name: the earlier entry of the two no longer counts
        if (g.tensors.size() > 1) {
          Written& other = g.tensors[in.byte() % g.tensors.size()];
          other.name = w->name;
          harmless = true;
        }
        break;
      case 8:  // overlapping bytes
        if (g.tensors.size() > 1) {
          Written& other = g.tensors[in.byte() % g.tensors.size()];
          other.end = w->begin + (other.end - other.begin);
          other.begin = w->begin;
          if (std::string* f = field(other, "data_offsets"))
            *f = json_list(std::vector<std::uint64_t>{other.begin, other.end});
        }
        break;
      case 9:  // the header length
        if (in.one_in(3))
          forced_length = in.one_in(2) ? ~std::uint64_t{0} : mha::detail::kMaxHeaderLength + 1;
        else
          length_change = in.one_in(2) ? in.in(1, 9) : -in.in(1, 9);
        break;
      case 10:  // the data buffer: truncated, or with bytes after the last tensor
        data_change = in.one_in(2) ? -in.in(1, 4) : in.in(1, 4);
        harmless = data_change > 0;
        break;
      case 11:  // metadata that is not an object of strings, or deeply nested
        switch (in.in(0, 3)) {
          case 0:
            metadata_text = "{\"a\":" + odd_number(in) + "}";
            break;
          case 1:
            metadata_text = odd_number(in);
            break;
          default: {
            const int depth = in.one_in(2) ? in.in(kMaxDepth - 3, kMaxDepth) : 100000;
            metadata_text = "{\"a\":" + nested(depth) + "}";
          }
        }
        g.metadata.clear();
        break;
      case 12:  // the header is deeply nested arrays
        deep_root = true;
        break;
      default:  // a byte of the header broken
        syntax_broken = true;
        corrupt_at = in.byte();
        break;
    }
    if (!harmless) g.valid = false;
  }

  // The header's text, padded with spaces (as the reference writer pads it) or not.
  std::string header = "{";
  if (!metadata_text.empty() || in.one_in(8))
    header += "\"__metadata__\":" + (metadata_text.empty() ? "{}" : metadata_text);
  for (const Written& w : g.tensors) {
    if (header.size() > 1) header += ",";
    header += nlohmann::json(w.name).dump() + ":";
    if (!w.entry.empty()) {
      header += w.entry;
      continue;
    }
    header += "{";
    for (std::size_t i = 0; i < w.fields.size(); ++i)
      header += (i ? "," : "") + nlohmann::json(w.fields[i].first).dump() + ":" + w.fields[i].second;
    header += "}";
  }
  header += "}";
  if (deep_root) header = nested(kMaxDepth + 1 + in.in(0, 3));
  if (in.one_in(2)) header.append((8 - header.size() % 8) % 8, ' ');
  if (syntax_broken) {
    static const char kBreakers[] = "{}[]\",:\\0-.e \x80\xff";
    header[corrupt_at % header.size()] = kBreakers[in.byte() % (sizeof kBreakers - 1)];
  }
  // Repeated names: each counts with its last entry (a later mutation may have renamed any).
  for (std::size_t i = 0; i < g.tensors.size(); ++i)
    for (std::size_t j = i + 1; j < g.tensors.size(); ++j)
      if (g.tensors[i].name == g.tensors[j].name) g.tensors[i].shadowed = true;
  // Overlaps among the tensors that count make the file invalid (a renamed one may overlap).
  for (const Written& a : g.tensors)
    for (const Written& b : g.tensors)
      if (&a != &b && !a.shadowed && !b.shadowed && a.begin < b.end && b.begin < a.end) g.valid = false;

  const std::uint64_t length =
      forced_length ? forced_length : header.size() + static_cast<std::uint64_t>(length_change);
  append_length(g.file, length);
  g.data = 8 + length;
  if (syntax_broken || length != header.size())  // the reader does not read the entries as written
    for (Written& w : g.tensors) w.plain = false;
  g.file.insert(g.file.end(), header.begin(), header.end());
  if (data_change < 0 && size < static_cast<std::uint64_t>(-data_change))
    data_change = -static_cast<std::int64_t>(size);
  const std::uint64_t data_size = size + static_cast<std::uint64_t>(data_change);
  for (std::uint64_t i = 0; i < data_size; ++i) g.file.push_back(static_cast<unsigned char>(in.byte() ^ (i * 37)));
  // BOOL tensors whose every byte is 0 or 1, as the format wants them, by choice.
  for (const Written& w : g.tensors)
    if (w.dtype == "BOOL" && in.one_in(2))
      for (std::uint64_t i = g.data + w.begin; i < g.data + w.end && i < g.file.size(); ++i) g.file[i] &= 1;
  if (length <= g.file.size() - 8)
    g.depth = nesting(std::string(g.file.begin() + 8, g.file.begin() + 8 + static_cast<std::ptrdiff_t>(length)));
  g.state_dict = g.state_dict && g.valid && std::all_of(g.tensors.begin(), g.tensors.end(), [](const Written& w) {
                   return w.plain && !w.shadowed;
                 });
  return g;
}

/// \returns whether f() ran without throwing; aborts on anything but mha::invalid_argument.
template <typename F>
bool accepted(const char* what, F&& f) {
  try {
    f();
    return true;
  } catch (const mha::invalid_argument&) {
    return false;
  } catch (const std::exception& e) {
    violated(what, std::string("threw something other than mha::invalid_argument: ") + e.what());
  } catch (...) {
    violated(what, "threw something other than mha::invalid_argument");
  }
}

/// Reads every tensor of `st` as matrices and checks them against its shape and dtype.
template <typename Scalar>
void check_matrices(const mha::io::SafeTensors& st) {
  for (const std::string& name : st.names()) {
    const mha::io::Tensor& t = st.tensor(name);
    std::uint64_t elements = 1;  // no overflow past a size 0: its tensor has no bytes
    for (std::int64_t n : t.shape) elements *= static_cast<std::uint64_t>(n);
    if (t.bytes.size() * 8 != elements * mha::detail::dtype_bits(t.dtype))
      violated("a tensor holds the bytes its shape and dtype need", name);
    const bool rank_read =
        t.shape.size() == 1 || t.shape.size() == 2 ||
        (t.shape.size() > 2 && std::all_of(t.shape.begin(), t.shape.end() - 2, [](std::int64_t n) { return n == 1; }));
    const bool zero_one =
        t.dtype == "BOOL" && std::all_of(t.bytes.begin(), t.bytes.end(), [](unsigned char b) { return b <= 1; });
    const bool dtype_read = t.dtype == "F32" || t.dtype == "F64" || t.dtype == "F16" || t.dtype == "BF16" || zero_one;
    std::pair<Eigen::Index, Eigen::Index> size{};
    if (accepted("matrix_size", [&] { size = st.matrix_size(name); }) != rank_read)
      violated("matrix_size reads ranks 1 and 2, and higher ones whose leading sizes are 1", name);
    Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> m;
    if (accepted("matrix", [&] { m = st.matrix<Scalar>(name); }) != (rank_read && dtype_read))
      violated("matrix reads the ranks and the dtypes it documents", name);
    Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic> mask;
    if (accepted("matrix<bool>", [&] { mask = st.matrix<bool>(name); }) != (rank_read && zero_one))
      violated("matrix<bool> reads BOOL tensors of 0 and 1 bytes, of the ranks matrix reads", name);
    if (!(rank_read && dtype_read)) continue;
    if (m.rows() != size.first || m.cols() != size.second || static_cast<std::uint64_t>(m.size()) != elements)
      violated("a matrix has the tensor's size", name);
    if (zero_one) {  // BOOL: each byte, row by row, as 0 or 1 and as false or true
      if (mask.rows() != m.rows() || mask.cols() != m.cols()) violated("a matrix<bool> has the tensor's size", name);
      // Not row by row when empty: a shape of (2^62, 0) has no element, and 2^62 empty rows.
      for (Eigen::Index r = 0; r < (m.size() > 0 ? m.rows() : 0); ++r)
        for (Eigen::Index c = 0; c < m.cols(); ++c) {
          const unsigned char b = t.bytes[static_cast<std::size_t>(r * m.cols() + c)];
          if (m(r, c) != static_cast<Scalar>(b) || mask(r, c) != (b == 1))
            violated("matrix and matrix<bool> read BOOL bytes in row-major order, as 0 and 1", name);
        }
    }
    // F32 and F64 elements in row-major order, bit for bit, when Scalar is their type.
    const std::size_t width = sizeof(Scalar);
    if (m.size() > 0 && ((t.dtype == "F32" && width == 4) || (t.dtype == "F64" && width == 8)))
      for (Eigen::Index r = 0; r < m.rows(); ++r)
        for (Eigen::Index c = 0; c < m.cols(); ++c)
          if (std::memcmp(&m(r, c), t.bytes.data() + width * static_cast<std::size_t>(r * m.cols() + c), width) != 0)
            violated("matrix reads the elements in row-major order, exactly", name);
  }
}

/// Builds modules from the state_dict in `st` with several head counts.
void check_import(const mha::io::SafeTensors& st, const Generated* g, std::size_t file_size, Choices& in) {
  const int heads[] = {1, 2, in.in(-1, 9)};
  for (const int h : heads) {
    const auto build = [&](auto scalar) {
      using Scalar = decltype(scalar);
      std::optional<mha::MultiHeadAttention<Scalar>> module;
      const bool ok = accepted("from_state_dict", [&] { module.emplace(mha::io::from_state_dict<Scalar>(st, h)); });
      if (g && g->state_dict && h > 0 && g->E % h == 0 && !ok)
        violated("a valid state_dict is accepted with any num_heads dividing E");
      if (!ok) return;
      std::size_t parameters = 0;
      for (const auto& p : module->parameters()) parameters += static_cast<std::size_t>(p.value.size());
      // One parameter per value of the file, which holds each in 1 byte (BOOL) or more.
      if (parameters > file_size) violated("a module holds no more parameters than its file has values");
      if (module->d_model() != st.matrix_size("out_proj.weight").second)
        violated("the module's width is out_proj.weight's");
    };
    build(float{});
    if (h == 2) build(double{});
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Choices in(data, size);
  if (size > 0 && in.byte() % 8 == 0) {  // a whole file, as it is
    const Bytes file(data + 1, data + size);
    std::optional<mha::io::SafeTensors> st;
    if (!accepted("parse", [&] { st.emplace(mha::io::SafeTensors::parse(file, "fuzz")); })) return 0;
    check_matrices<float>(*st);
    check_matrices<double>(*st);
    check_import(*st, nullptr, file.size(), in);
    return 0;
  }
  const Generated g = generate(in);
  std::optional<mha::io::SafeTensors> st;
  std::string message;
  const bool ok = accepted("parse", [&] {
    try {
      st.emplace(mha::io::SafeTensors::parse(g.file, "fuzz"));
    } catch (const mha::invalid_argument& e) {
      message = e.what();
      throw;
    }
  });
  if (g.valid && !ok) violated("a well-formed file is accepted", message);
  // Deeper than the bound: rejected while parsing, for that or for bad JSON before it is reached.
  const bool for_depth = message.find("levels deep") != std::string::npos;
  if (g.depth > kMaxDepth && !for_depth && message.find("not valid JSON") == std::string::npos)
    violated("a header nested deeper than the bound is rejected while it is parsed", message);
  if (g.depth <= kMaxDepth && for_depth) violated("a header within the bound is not rejected for its depth", message);
  if (message.size() > 1000) violated("error messages quote only the start of a value", message.substr(0, 1000));
  if (!ok) return 0;
  if (g.valid) {
    std::vector<std::string> names;
    for (const Written& w : g.tensors)
      if (!w.shadowed) names.push_back(w.name);
    std::sort(names.begin(), names.end());
    if (st->names() != names) violated("the names are the tensors written");
    if (st->metadata() != g.metadata) violated("the metadata is what was written");
  }
  for (const Written& w : g.tensors) {
    if (!w.plain || w.shadowed || !st->contains(w.name)) continue;
    const mha::io::Tensor& t = st->tensor(w.name);
    const auto first = g.file.begin() + static_cast<std::ptrdiff_t>(g.data + w.begin);
    const Bytes bytes(first, first + static_cast<std::ptrdiff_t>(w.end - w.begin));
    if (t.dtype != w.dtype || t.shape != w.shape || t.bytes != bytes)
      violated("a tensor reads back with the dtype, shape and bytes written", w.name);
  }
  check_matrices<float>(*st);
  check_matrices<double>(*st);
  check_import(*st, &g, g.file.size(), in);
  return 0;
}
