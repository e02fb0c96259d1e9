// mha — reading tensors, e.g. trained weights, from .safetensors files (Hugging Face's format).
// Optional: this header alone needs nlohmann/json (CMake target nlohmann_json::nlohmann_json);
// the rest of mha does not, and mha/mha.hpp does not include it.
//
// The format: an unsigned 64-bit little-endian N, then N bytes of UTF-8 JSON (the header), then
// the data buffer. The header is an object that maps each tensor's name to
//   {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}
// where [begin, end) are byte offsets into the data buffer, holding the elements in row-major (C)
// order, little-endian; an optional entry "__metadata__" maps strings to strings. Tensors may lie
// in the buffer in any order and with gaps, but not overlap. A name given twice in the header
// counts once, with its last entry (as the reference implementation reads it).
//
// Files are untrusted input: whatever is wrong with one (truncated, malformed JSON, sizes that
// disagree or overflow) throws mha::invalid_argument naming the file, the tensor and the problem.
// Nothing is allocated that the bytes present do not account for: a header above
// detail::kMaxHeaderLength bytes is rejected before it is read, and one that nests arrays or
// objects deeper than detail::kMaxHeaderDepth levels while it is parsed, so that no walk over a
// value of the file (an error message quoting it, its destruction) can run out of stack.
// The host must be little-endian, as every platform mha runs on is.
#pragma once

#include <mha/config.hpp>

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <ios>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "mha/io/safetensors.hpp reads little-endian elements in place: it needs a little-endian host"
#endif

namespace mha {
namespace io {

/// One tensor of a safetensors file.
struct Tensor {
  std::string dtype;                 ///< the element type as the file names it: "F32", "BF16", "I64", ...
  std::vector<std::int64_t> shape;   ///< the size of each dimension, outermost first; {} for a scalar
  std::vector<unsigned char> bytes;  ///< the elements in row-major (C) order, little-endian
};

}  // namespace io

namespace detail {

static_assert(std::numeric_limits<float>::is_iec559 && std::numeric_limits<double>::is_iec559,
              "mha/io/safetensors.hpp reads F32 and F64 as IEEE 754 float and double");

/// A dtype of the format and the bits of one of its elements.
struct Dtype {
  const char* name;  ///< as the header spells it
  unsigned bits;     ///< per element: 4 and 6 for the packed F4 and F6 types
};

/// Every dtype the format defines.
inline constexpr Dtype kDtypes[] = {{"BOOL", 8}, {"F4", 4},      {"F6_E2M3", 6}, {"F6_E3M2", 6}, {"U8", 8},
                                    {"I8", 8},   {"F8_E5M2", 8}, {"F8_E4M3", 8}, {"F8_E8M0", 8}, {"I16", 16},
                                    {"U16", 16}, {"F16", 16},    {"BF16", 16},   {"I32", 32},    {"U32", 32},
                                    {"F32", 32}, {"C64", 64},    {"F64", 64},    {"I64", 64},    {"U64", 64}};

/// \returns the bits of one element of `dtype`, or 0 if the format defines no such dtype.
inline unsigned dtype_bits(const std::string& dtype) {
  for (const Dtype& d : kDtypes)
    if (dtype == d.name) return d.bits;
  return 0;
}

/// "BOOL, F4, ...": the names of every dtype, for error messages.
inline std::string dtype_names() {
  std::string names;
  for (const Dtype& d : kDtypes) names += (names.empty() ? "" : ", ") + std::string(d.name);
  return names;
}

/// The longest header read, in bytes: the reference implementation's limit (100 MB), far above
/// any real header (about 100 bytes per tensor), so that a corrupt length cannot make the reader
/// allocate and parse gigabytes.
inline constexpr std::uint64_t kMaxHeaderLength = 100'000'000;

/// The deepest nesting of JSON arrays and objects read. A header nests 3 levels (itself, a
/// tensor's entry, its shape and data_offsets); the few levels more still let a mistyped field be
/// reported as what it is, while every recursion over a value of the header stays this shallow.
inline constexpr int kMaxHeaderDepth = 8;

/// The most characters of a value from the file that an error message quotes.
inline constexpr std::size_t kQuoted = 40;

/// The most characters of nlohmann/json's message for a header that is not JSON that an error
/// message quotes: its start says where and why parsing stopped, its end quotes the token it
/// stopped at, which can be as long as the header.
inline constexpr std::size_t kQuotedParseError = 200;

/// \returns the length of the longest prefix of `s` of at most `n` bytes that ends between two
/// UTF-8 characters.
inline std::size_t utf8_prefix(const std::string& s, std::size_t n) {
  if (n >= s.size()) return s.size();
  while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xc0) == 0x80) --n;  // s[n] continues a character
  return n;
}

/// Appends `j` as JSON to `out`, stopping once `out` is longer than `limit` characters, so that
/// only about `limit` characters of a value are ever written, however wide it is. Recurses once per
/// level of `j`: at most kMaxHeaderDepth.
inline void append_json(const nlohmann::json& j, std::string& out, std::size_t limit) {
  // A string's first limit + 1 bytes are enough to fill the rest.
  const auto append_string = [&](const std::string& s) {
    out += nlohmann::json(s.substr(0, utf8_prefix(s, limit + 1))).dump();
  };
  if (out.size() > limit) return;
  if (j.is_string()) {
    append_string(j.get_ref<const std::string&>());
  } else if (j.is_array() || j.is_object()) {
    out += j.is_array() ? '[' : '{';
    for (auto it = j.begin(); it != j.end() && out.size() <= limit; ++it) {
      if (it != j.begin()) out += ',';
      if (j.is_object()) {
        append_string(it.key());
        out += ':';
      }
      append_json(*it, out, limit);
    }
    out += j.is_array() ? ']' : '}';
  } else {
    out += j.dump();  // a number, true, false or null: a few characters
  }
}

/// `s`, or its first `n` bytes (not splitting a UTF-8 character) and "..." if it is longer.
inline std::string cut(const std::string& s, std::size_t n) {
  return s.size() <= n ? s : s.substr(0, utf8_prefix(s, n)) + "...";
}

/// `j` as JSON, cut after kQuoted characters with "...": how error messages quote a value from the
/// file.
inline std::string quoted(const nlohmann::json& j) {
  std::string s;
  append_json(j, s, kQuoted);
  return cut(s, kQuoted);
}

/// Sets `value` and \returns true if `j` is an integer ≥ 0 (JSON "-0" included), else \returns false.
inline bool non_negative_integer(const nlohmann::json& j, std::uint64_t& value) {
  if (j.is_number_unsigned()) {
    value = j.get<std::uint64_t>();
    return true;
  }
  if (j.is_number_integer() && j.get<std::int64_t>() >= 0) {
    value = static_cast<std::uint64_t>(j.get<std::int64_t>());
    return true;
  }
  return false;
}

/// "[2, 3]": a shape as the error messages print it.
inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/// The float whose IEEE 754 bit pattern is `bits`.
inline float float_from_bits(std::uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

/// The value of the IEEE 754 binary16 (F16) `bits`, exactly: every half is a float, subnormals,
/// ±0, ±∞ and NaNs (payload kept) included.
inline float half_to_float(std::uint16_t bits) {
  const std::uint32_t sign = static_cast<std::uint32_t>(bits >> 15) << 31;
  const std::uint32_t exponent = (bits >> 10) & 0x1fu;
  const std::uint32_t mantissa = bits & 0x3ffu;
  if (exponent == 0) {  // ±0 and subnormals: ±mantissa · 2^−24
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 0x1f) return float_from_bits(sign | 0x7f800000u | mantissa << 13);  // ±∞, NaN
  return float_from_bits(sign | (exponent + 127 - 15) << 23 | mantissa << 13);
}

/// The value of the bfloat16 (BF16) `bits`: the upper half of a float's bits, so exact.
inline float bfloat16_to_float(std::uint16_t bits) { return float_from_bits(static_cast<std::uint32_t>(bits) << 16); }

/// Fills `m` row by row from `bytes`, little-endian elements of type Raw, each passed through
/// `convert`; `bytes` holds exactly m.size() elements.
template <typename Raw, typename Scalar, typename Convert>
void fill_row_major(const std::vector<unsigned char>& bytes, Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>& m,
                    Convert convert) {
  if (m.size() == 0) return;  // a [2^62, 0] tensor would loop over 2^62 empty rows
  const unsigned char* p = bytes.data();
  for (Eigen::Index r = 0; r < m.rows(); ++r)
    for (Eigen::Index c = 0; c < m.cols(); ++c, p += sizeof(Raw)) {
      Raw raw;
      std::memcpy(&raw, p, sizeof raw);
      m(r, c) = static_cast<Scalar>(convert(raw));
    }
}

}  // namespace detail

namespace io {

/// The tensors and metadata of one safetensors file, read into memory and checked.
class SafeTensors {
 public:
  /// Reads the file at `path`, each tensor straight into its own buffer, so that memory peaks at
  /// about the file's size, not twice it. Throws mha::invalid_argument if it cannot be read or is
  /// malformed.
  static SafeTensors load(const std::string& path) {
    SafeTensors st("file \"" + path + "\"");
    std::ifstream file(path, std::ios::binary | std::ios::ate);
    if (!file) st.fail("cannot be opened");
    const std::streamoff size = file.tellg();
    if (size < 0) st.fail("cannot be read: its size is unknown");
    const auto read = [&](std::uint64_t offset, unsigned char* out, std::uint64_t count) {
      if (count == 0) return;
      file.seekg(static_cast<std::streamoff>(offset));
      file.read(reinterpret_cast<char*>(out), static_cast<std::streamsize>(count));
      if (!file) st.fail("cannot read ", count, " bytes at offset ", offset);
    };
    const auto file_size = static_cast<std::uint64_t>(size);
    st.check_size(file_size);
    unsigned char prefix[8];
    read(0, prefix, 8);
    const std::uint64_t n = st.header_length(prefix, file_size);
    std::vector<unsigned char> header(n);
    read(8, header.data(), n);
    const std::map<std::string, Span> spans = st.read_header(header.data(), header.size(), file_size - 8 - n);
    for (auto& [name, tensor] : st.tensors_) {
      const Span& span = spans.at(name);
      tensor.bytes.resize(span.end - span.begin);
      read(8 + n + span.begin, tensor.bytes.data(), tensor.bytes.size());
    }
    return st;
  }

  /// Reads a whole file's `size` bytes from memory at `data`; `what` names them in error messages.
  /// Throws mha::invalid_argument if they are malformed.
  static SafeTensors parse(const unsigned char* data, std::size_t size, const std::string& what = "buffer") {
    SafeTensors st(what);
    st.check_size(size);
    const std::uint64_t n = st.header_length(data, size);
    const std::map<std::string, Span> spans = st.read_header(data + 8, n, size - 8 - n);
    const unsigned char* buffer = data + 8 + n;
    for (auto& [name, tensor] : st.tensors_) {
      const Span& span = spans.at(name);
      tensor.bytes.assign(buffer + span.begin, buffer + span.end);
    }
    return st;
  }

  /// Reads a whole file held in memory; `what` names it in error messages.
  /// Throws mha::invalid_argument if it is malformed.
  static SafeTensors parse(const std::vector<unsigned char>& file_bytes, const std::string& what = "buffer") {
    return parse(file_bytes.data(), file_bytes.size(), what);
  }

  /// \returns whether the file has a tensor called `name`.
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }

  /// \returns the names of all tensors, in lexicographic order.
  std::vector<std::string> names() const {
    std::vector<std::string> names;
    names.reserve(tensors_.size());
    for (const auto& entry : tensors_) names.push_back(entry.first);
    return names;
  }

  /// \returns the tensor called `name`; throws mha::invalid_argument, listing the names there
  /// are, if there is none.
  const Tensor& tensor(const std::string& name) const {
    const auto it = tensors_.find(name);
    if (it == tensors_.end()) fail("no tensor \"", name, "\"; ", contents());
    return it->second;
  }

  /// \returns the tensor called `name` after checking that its shape is `shape`; throws
  /// mha::invalid_argument naming both shapes otherwise.
  const Tensor& expect_shape(const std::string& name, const std::vector<std::int64_t>& shape) const {
    const Tensor& t = tensor(name);
    if (t.shape != shape)
      fail("tensor \"", name, "\" has shape ", detail::shape_string(t.shape), ", expected ",
           detail::shape_string(shape));
    return t;
  }

  /// \returns the "__metadata__" entries of the header (empty if it has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// \returns the tensor called `name` as a matrix: shape [rows, cols] as rows × cols, and shape [n]
  /// as a 1 × n row vector. F32, F64, F16 and BF16 elements are converted to Scalar (exactly, but for
  /// rounding F64 to float), and BOOL elements to 0 and 1. matrix<bool>() reads BOOL tensors alone,
  /// e.g. masks for AttentionMask::blocked or ::allowed. A BOOL element is one byte, 0 or 1; any other
  /// byte is an error. Throws mha::invalid_argument for other ranks and dtypes, before allocating.
  template <typename Scalar>
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> matrix(const std::string& name) const {
    const Tensor& t = tensor(name);
    const auto [rows, cols] = matrix_shape(name, t);
    constexpr bool kBool = std::is_same<Scalar, bool>::value;
    const bool floating = t.dtype == "F32" || t.dtype == "F64" || t.dtype == "F16" || t.dtype == "BF16";
    if (kBool && t.dtype != "BOOL")
      fail("tensor \"", name, "\" has dtype ", t.dtype, "; matrix<bool>() reads only BOOL");
    if (!kBool && !floating && t.dtype != "BOOL")
      fail("tensor \"", name, "\" has dtype ", t.dtype, "; matrix() reads only F32, F64, F16, BF16 and BOOL");
    if (t.dtype == "BOOL") check_bool(name, t);
    Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> m(rows, cols);
    const auto same = [](auto x) { return x; };
    if (t.dtype == "BOOL")
      detail::fill_row_major<std::uint8_t>(t.bytes, m, [](std::uint8_t b) { return b != 0; });
    else if constexpr (!kBool) {
      if (t.dtype == "F32")
        detail::fill_row_major<float>(t.bytes, m, same);
      else if (t.dtype == "F64")
        detail::fill_row_major<double>(t.bytes, m, same);
      else if (t.dtype == "F16")
        detail::fill_row_major<std::uint16_t>(t.bytes, m, detail::half_to_float);
      else
        detail::fill_row_major<std::uint16_t>(t.bytes, m, detail::bfloat16_to_float);
    }
    return m;
  }

  /// \returns the rows and cols of matrix<Scalar>(name), from the header alone: nothing is converted
  /// or allocated. Throws mha::invalid_argument for ranks matrix() does not read.
  std::pair<Eigen::Index, Eigen::Index> matrix_size(const std::string& name) const {
    return matrix_shape(name, tensor(name));
  }

  /// matrix<Scalar>(name) after checking that it is rows × cols; throws mha::invalid_argument
  /// naming both shapes otherwise.
  template <typename Scalar>
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> matrix(const std::string& name, Eigen::Index rows,
                                                               Eigen::Index cols) const {
    const Tensor& t = tensor(name);
    const auto [actual_rows, actual_cols] = matrix_shape(name, t);
    if (actual_rows != rows || actual_cols != cols)
      fail("tensor \"", name, "\" of shape ", detail::shape_string(t.shape), " is a ", actual_rows, " x ", actual_cols,
           " matrix, expected ", rows, " x ", cols);
    return matrix<Scalar>(name);
  }

 private:
  /// Where a tensor's bytes lie in the data buffer: [begin, end).
  struct Span {
    std::uint64_t begin;
    std::uint64_t end;
  };

  explicit SafeTensors(std::string what) : what_(std::move(what)) {}

  /// Throws mha::invalid_argument with "mha: safetensors <what>: " and the streamed parts.
  template <typename... Parts>
  [[noreturn]] void fail(const Parts&... parts) const {
    detail::fail("safetensors ", what_, ": ", parts...);
  }

  /// Throws unless a file of `size` bytes can hold the header length.
  void check_size(std::uint64_t size) const {
    if (size < 8) fail(size, " bytes long, too short for the 8-byte header length");
  }

  /// \returns N, the header length in the first 8 bytes of a file of `size` ≥ 8 bytes; throws
  /// unless the file holds that many bytes after them and N is at most detail::kMaxHeaderLength.
  std::uint64_t header_length(const unsigned char* prefix, std::uint64_t size) const {
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = n << 8 | prefix[i];
    if (n > size - 8) fail("header length ", n, " exceeds the ", size - 8, " bytes that follow it");
    if (n > detail::kMaxHeaderLength)
      fail("header length ", n, " exceeds the limit of ", detail::kMaxHeaderLength, " bytes");
    return n;
  }

  /// Parses and checks the JSON header at [first, first + length) of a file whose data buffer
  /// has `data_size` bytes; sets tensors_ (without their bytes) and metadata_. \returns where each
  /// tensor's bytes lie.
  std::map<std::string, Span> read_header(const unsigned char* first, std::size_t length, std::uint64_t data_size) {
    // nlohmann/json parses without recursion, but would build a value of any depth, and its
    // dump() recurses: the parser's callback rejects a level too deep before it is built.
    std::optional<std::string> entry;  // the header's key being parsed: where a level too deep is
    const auto bound_depth = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
      using Event = nlohmann::json::parse_event_t;
      if (event == Event::key && depth == 1) entry = parsed.get<std::string>();
      if ((event == Event::object_start || event == Event::array_start) && depth >= detail::kMaxHeaderDepth) {
        std::string where;
        if (entry) where = *entry == "__metadata__" ? " in \"__metadata__\"" : " in tensor \"" + *entry + "\"";
        fail("header nests arrays and objects more than ", detail::kMaxHeaderDepth, " levels deep", where,
             "; a safetensors header nests 3 (the header, a tensor's entry, its shape and data_offsets)");
      }
      return true;
    };
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(first, first + length, bound_depth);
    } catch (const nlohmann::json::exception& e) {
      fail("header is not valid JSON: ", detail::cut(e.what(), detail::kQuotedParseError));
    }
    if (!header.is_object()) fail("header is a JSON ", header.type_name(), ", not an object");
    std::map<std::string, Span> spans;
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__")
        read_metadata(entry);
      else
        spans[name] = read_entry(name, entry, data_size);
    }
    check_overlaps(spans);
    return spans;
  }

  /// Checks the "__metadata__" entry and sets metadata_.
  void read_metadata(const nlohmann::json& entry) {
    if (!entry.is_object()) fail("\"__metadata__\" is a JSON ", entry.type_name(), ", not an object");
    for (const auto& [key, value] : entry.items()) {
      if (!value.is_string())
        fail("\"__metadata__\" maps \"", key, "\" to the JSON ", value.type_name(), " ", detail::quoted(value),
             ", not a string");
      metadata_[key] = value.get<std::string>();
    }
  }

  /// Checks the header's entry for tensor `name`, adds the tensor (without its bytes) to tensors_
  /// and \returns where its bytes lie.
  Span read_entry(const std::string& name, const nlohmann::json& entry, std::uint64_t data_size) {
    if (!entry.is_object()) fail("tensor \"", name, "\" is a JSON ", entry.type_name(), ", not an object");
    const auto field = [&](const char* key) -> const nlohmann::json& {
      const auto it = entry.find(key);
      if (it == entry.end()) fail("tensor \"", name, "\" has no \"", key, "\"");
      return *it;
    };
    Tensor t;
    const nlohmann::json& dtype = field("dtype");
    if (!dtype.is_string()) fail("tensor \"", name, "\": \"dtype\" ", detail::quoted(dtype), " is not a string");
    t.dtype = dtype.get<std::string>();
    const unsigned bits = detail::dtype_bits(t.dtype);
    if (bits == 0)
      fail("tensor \"", name, "\" has unknown dtype \"", t.dtype, "\" (known: ", detail::dtype_names(), ")");

    const nlohmann::json& shape = field("shape");
    if (!shape.is_array()) fail("tensor \"", name, "\": \"shape\" ", detail::quoted(shape), " is not an array");
    std::uint64_t elements = 1;
    bool overflow = false, empty = false;
    for (const nlohmann::json& dim : shape) {
      std::uint64_t size = 0;
      if (!detail::non_negative_integer(dim, size))
        fail("tensor \"", name, "\": \"shape\" ", detail::quoted(shape), " has ",
             dim.is_number_integer() ? "a negative size" : "a size that is not an integer");
      if (size > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        fail("tensor \"", name, "\": \"shape\" ", detail::quoted(shape), " has a size above 2^63 - 1");
      t.shape.push_back(static_cast<std::int64_t>(size));
      empty = empty || size == 0;
      overflow = overflow || !detail::multiply(elements, size, elements);
    }
    std::uint64_t total_bits = 0;
    if (!empty && (overflow || !detail::multiply<std::uint64_t>(elements, bits, total_bits)))
      fail("tensor \"", name, "\" of shape ", detail::shape_string(t.shape), " and dtype ", t.dtype,
           " is too large: 2^61 bytes or more");
    if (total_bits % 8 != 0)
      fail("tensor \"", name, "\" of shape ", detail::shape_string(t.shape), " and dtype ", t.dtype, " is ", total_bits,
           " bits, not a whole number of bytes");

    const nlohmann::json& offsets = field("data_offsets");
    Span span{};
    if (!offsets.is_array() || offsets.size() != 2 || !detail::non_negative_integer(offsets[0], span.begin) ||
        !detail::non_negative_integer(offsets[1], span.end) || span.begin > span.end)
      fail("tensor \"", name, "\": \"data_offsets\" ", detail::quoted(offsets),
           " is not [begin, end] with 0 <= begin <= end");
    if (span.end > data_size)
      fail("tensor \"", name, "\": data_offsets [", span.begin, ", ", span.end, "] run past the end of the ", data_size,
           "-byte data buffer (truncated file?)");
    if (span.end - span.begin != total_bits / 8)
      fail("tensor \"", name, "\": data_offsets [", span.begin, ", ", span.end, "] hold ", span.end - span.begin,
           " bytes, but shape ", detail::shape_string(t.shape), " of ", t.dtype, " needs ", total_bits / 8);
    tensors_[name] = std::move(t);
    return span;
  }

  /// Throws if the bytes of two tensors overlap (empty tensors overlap nothing).
  void check_overlaps(const std::map<std::string, Span>& spans) const {
    std::vector<std::pair<Span, const std::string*>> placed;
    for (const auto& [name, span] : spans)
      if (span.begin != span.end) placed.emplace_back(span, &name);
    std::sort(placed.begin(), placed.end(), [](const auto& a, const auto& b) { return a.first.begin < b.first.begin; });
    for (std::size_t i = 1; i < placed.size(); ++i) {
      const auto& [previous, previous_name] = placed[i - 1];
      const auto& [span, name] = placed[i];
      if (span.begin < previous.end)
        fail("tensors \"", *previous_name, "\" [", previous.begin, ", ", previous.end, "] and \"", *name, "\" [",
             span.begin, ", ", span.end, "] overlap");
    }
  }

  /// Throws unless every byte of the BOOL tensor `t` is 0 or 1 (the format's only values), naming
  /// the first other one.
  void check_bool(const std::string& name, const Tensor& t) const {
    const auto bad = std::find_if(t.bytes.begin(), t.bytes.end(), [](unsigned char b) { return b > 1; });
    if (bad != t.bytes.end())
      fail("tensor \"", name, "\" of dtype BOOL has the byte ", static_cast<unsigned>(*bad), " at element ",
           bad - t.bytes.begin(), " (row-major); a BOOL element is 0 or 1");
  }

  /// \returns rows and cols of tensor `name` read as a matrix (see matrix()): rank 1 is a row,
  /// rank 2 a matrix, and a higher rank whose leading dimensions are all 1 (PyTorch's bias_k is
  /// 1 × 1 × E) the matrix of its last two; anything else throws.
  std::pair<Eigen::Index, Eigen::Index> matrix_shape(const std::string& name, const Tensor& t) const {
    const bool squeezable =
        t.shape.size() > 2 && std::all_of(t.shape.begin(), t.shape.end() - 2, [](std::int64_t n) { return n == 1; });
    if (t.shape.size() != 1 && t.shape.size() != 2 && !squeezable)
      fail("tensor \"", name, "\" has shape ", detail::shape_string(t.shape), " of rank ", t.shape.size(),
           "; matrix() reads only rank 1 (as a row vector), rank 2, and higher ranks whose leading "
           "dimensions are 1");
    const Eigen::Index cols = static_cast<Eigen::Index>(t.shape.back());
    return {t.shape.size() >= 2 ? static_cast<Eigen::Index>(t.shape[t.shape.size() - 2]) : 1, cols};
  }

  /// "its 3 tensors are "a", "b", "c"": what there is, for the message of a missing tensor.
  std::string contents() const {
    if (tensors_.empty()) return "it has no tensors";
    constexpr std::size_t kListed = 10;
    std::string s =
        "its " + std::to_string(tensors_.size()) + " tensors " + (tensors_.size() > kListed ? "begin with " : "are ");
    std::size_t listed = 0;
    for (auto it = tensors_.begin(); it != tensors_.end() && listed < kListed; ++it, ++listed)
      s += (listed ? ", \"" : "\"") + it->first + "\"";
    return s;
  }

  std::string what_;                             ///< the file or buffer, as the error messages name it
  std::map<std::string, Tensor> tensors_;        ///< every tensor, by name
  std::map<std::string, std::string> metadata_;  ///< the "__metadata__" entries
};

}  // namespace io
}  // namespace mha
