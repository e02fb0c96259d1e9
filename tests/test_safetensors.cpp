// Reading .safetensors files with mha::io::SafeTensors: files built in memory by the tests (and one
// written to a temporary file for load()), read back exactly; F16 and BF16 conversions of chosen
// and of all bit patterns; BOOL tensors as masks and as 0 and 1, other bytes rejected; every kind of malformed file
// rejected with a message naming the file, the tensor and the problem; truncated and corrupted files never read out of
// bounds.
#include <mha/io/safetensors.hpp>

#include "test_util.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace {

using mha::io::SafeTensors;
using mha_test::Matrix;
using Bytes = std::vector<unsigned char>;

/// The little-endian bytes of `values`.
template <typename T>
Bytes bytes_of(std::initializer_list<T> values) {
  Bytes bytes(values.size() * sizeof(T));
  std::size_t i = 0;
  for (T v : values) std::memcpy(bytes.data() + sizeof(T) * i++, &v, sizeof(T));
  return bytes;
}

/// A file: the header length, `header` padded with spaces to a multiple of 8 bytes (as the
/// reference writer pads it), then `data`.
Bytes file_with(std::string header, const Bytes& data = {}) {
  header.append((8 - header.size() % 8) % 8, ' ');
  Bytes file;
  for (int i = 0; i < 8; ++i) file.push_back(static_cast<unsigned char>(std::uint64_t{header.size()} >> (8 * i)));
  file.insert(file.end(), header.begin(), header.end());
  file.insert(file.end(), data.begin(), data.end());
  return file;
}

/// A tensor for file_of().
struct Entry {
  std::string name;
  std::string dtype;
  std::vector<std::int64_t> shape;
  Bytes bytes;
};

/// A well-formed file of `entries`, their bytes one after another in the data buffer.
Bytes file_of(const std::vector<Entry>& entries, const std::map<std::string, std::string>& metadata = {}) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  Bytes data;
  for (const Entry& e : entries) {
    header[e.name] = {
        {"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {data.size(), data.size() + e.bytes.size()}}};
    data.insert(data.end(), e.bytes.begin(), e.bytes.end());
  }
  return file_with(header.dump(), data);
}

/// A file whose header entry for tensor "w" is `entry` (a JSON object's contents), with `data`.
Bytes file_with_entry(const std::string& entry, const Bytes& data = Bytes(16)) {
  return file_with("{\"w\":{" + entry + "}}", data);
}

/// The message of the mha::invalid_argument that f() throws, or "no exception"; any other
/// exception fails the test.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const mha::invalid_argument& e) {
    return e.what();
  }
  return "no exception";
}

/// The message of parsing `file`.
std::string parse_error(const Bytes& file) {
  return error_of([&] { SafeTensors::parse(file); });
}

/// The bits of `f`.
std::uint32_t bits_of(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, sizeof f);
  return bits;
}

/// A file on disk, removed again at the end of the test.
class TempFile {
 public:
  explicit TempFile(const Bytes& contents)
      : path_(::testing::TempDir() + "mha_test_safetensors_" +
              ::testing::UnitTest::GetInstance()->current_test_info()->name() + "_" +
              std::to_string(std::random_device{}()) + ".safetensors") {
    std::ofstream out(path_, std::ios::binary);
    out.write(reinterpret_cast<const char*>(contents.data()), static_cast<std::streamsize>(contents.size()));
  }
  ~TempFile() { std::remove(path_.c_str()); }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

template <typename Scalar>
class SafeTensorsTyped : public ::testing::Test {};
TYPED_TEST_SUITE(SafeTensorsTyped, mha_test::Scalars, mha_test::ScalarNames);

TYPED_TEST(SafeTensorsTyped, ReadsF32AndF64MatricesInRowMajorOrder) {
  const std::initializer_list<float> f = {0.5f, -1.25f, 3.0f, 1e-3f, -7e5f, 0.1f};
  const std::initializer_list<double> d = {0.1, -2.5, 1e-300, 3.0, -1e300, 1.0 / 3};
  const SafeTensors st = SafeTensors::parse(file_of({{"f", "F32", {2, 3}, bytes_of(f)},
                                                     {"d", "F64", {3, 2}, bytes_of(d)},
                                                     {"f1", "F32", {6}, bytes_of(f)},
                                                     {"d1", "F64", {6}, bytes_of(d)}}));
  const Matrix<TypeParam> mf = st.matrix<TypeParam>("f"), md = st.matrix<TypeParam>("d");
  const Matrix<TypeParam> mf1 = st.matrix<TypeParam>("f1"), md1 = st.matrix<TypeParam>("d1");
  ASSERT_EQ(mf.rows(), 2);
  ASSERT_EQ(mf.cols(), 3);
  ASSERT_EQ(md.rows(), 3);
  ASSERT_EQ(md.cols(), 2);
  ASSERT_EQ(mf1.rows(), 1);
  ASSERT_EQ(mf1.cols(), 6);
  ASSERT_EQ(md1.rows(), 1);
  ASSERT_EQ(md1.cols(), 6);
  for (int k = 0; k < 6; ++k) {
    const TypeParam fk = static_cast<TypeParam>(f.begin()[k]), dk = static_cast<TypeParam>(d.begin()[k]);
    EXPECT_EQ(mf(k / 3, k % 3), fk) << "k = " << k;  // element k of a 2 x 3 tensor is (k / 3, k % 3)
    EXPECT_EQ(md(k / 2, k % 2), dk) << "k = " << k;
    EXPECT_EQ(mf1(0, k), fk) << "k = " << k;
    EXPECT_EQ(md1(0, k), dk) << "k = " << k;
  }
  EXPECT_EQ(st.matrix<TypeParam>("f", 2, 3), mf);
  EXPECT_EQ(st.matrix<TypeParam>("d1", 1, 6), md1);
}

TYPED_TEST(SafeTensorsTyped, ConvertsChosenF16BitPatternsExactly) {
  const TypeParam inf = std::numeric_limits<TypeParam>::infinity();
  const std::initializer_list<std::uint16_t> bits = {0x3c00, 0xc100, 0x0001, 0x03ff, 0x0400, 0x7bff, 0x3555,
                                                     0x0000, 0x8000, 0x7c00, 0xfc00, 0x7e00, 0xfc01};
  const TypeParam expected[] = {1,
                                -2.5,
                                static_cast<TypeParam>(std::ldexp(1.0, -24)),     // smallest subnormal
                                static_cast<TypeParam>(std::ldexp(1023.0, -24)),  // largest subnormal
                                static_cast<TypeParam>(std::ldexp(1.0, -14)),     // smallest normal
                                65504,                                            // largest normal
                                static_cast<TypeParam>(1365.0 / 4096),
                                0,
                                0,
                                inf,
                                -inf};
  const Matrix<TypeParam> m = SafeTensors::parse(file_of({{"h", "F16", {13}, bytes_of(bits)}})).matrix<TypeParam>("h");
  ASSERT_EQ(m.rows(), 1);
  ASSERT_EQ(m.cols(), 13);
  for (int k = 0; k < 11; ++k) EXPECT_EQ(m(0, k), expected[k]) << "k = " << k;
  EXPECT_FALSE(std::signbit(m(0, 7)));
  EXPECT_TRUE(std::signbit(m(0, 8)));
  EXPECT_TRUE(std::isnan(m(0, 11)));
  EXPECT_TRUE(std::isnan(m(0, 12)));
  EXPECT_TRUE(std::signbit(m(0, 12)));
}

TYPED_TEST(SafeTensorsTyped, ConvertsChosenBF16BitPatternsExactly) {
  const TypeParam inf = std::numeric_limits<TypeParam>::infinity();
  const std::initializer_list<std::uint16_t> bits = {0x3f80, 0xc020, 0x0001, 0x0080, 0x7f7f, 0x3eab,
                                                     0x0000, 0x8000, 0x7f80, 0xff80, 0x7fc0};
  const TypeParam expected[] = {1,
                                -2.5,
                                static_cast<TypeParam>(std::ldexp(1.0, -133)),   // smallest subnormal
                                static_cast<TypeParam>(std::ldexp(1.0, -126)),   // smallest normal
                                static_cast<TypeParam>(std::ldexp(255.0, 120)),  // largest normal
                                static_cast<TypeParam>(std::ldexp(171.0, -9)),
                                0,
                                0,
                                inf,
                                -inf};
  const Matrix<TypeParam> m = SafeTensors::parse(file_of({{"b", "BF16", {11}, bytes_of(bits)}})).matrix<TypeParam>("b");
  for (int k = 0; k < 10; ++k) EXPECT_EQ(m(0, k), expected[k]) << "k = " << k;
  EXPECT_TRUE(std::signbit(m(0, 7)));
  EXPECT_TRUE(std::isnan(m(0, 10)));
}

TYPED_TEST(SafeTensorsTyped, F16And2DBF16AreRowMajorToo) {
  const SafeTensors st =
      SafeTensors::parse(file_of({{"h", "F16", {2, 2}, bytes_of<std::uint16_t>({0x3c00, 0x4000, 0x4200, 0x4400})},
                                  {"b", "BF16", {2, 2}, bytes_of<std::uint16_t>({0x3f80, 0x4000, 0x4040, 0x4080})}}));
  Matrix<TypeParam> expected(2, 2);
  expected << 1, 2, 3, 4;
  EXPECT_EQ(st.matrix<TypeParam>("h"), expected);
  EXPECT_EQ(st.matrix<TypeParam>("b"), expected);
}

TEST(SafeTensors, EveryF16BitPatternMatchesItsDefinition) {
  Bytes bytes;
  for (unsigned b = 0; b < 65536; ++b) {
    bytes.push_back(static_cast<unsigned char>(b & 0xff));
    bytes.push_back(static_cast<unsigned char>(b >> 8));
  }
  const SafeTensors st = SafeTensors::parse(file_of({{"h", "F16", {65536}, bytes}, {"b", "BF16", {65536}, bytes}}));
  const Matrix<float> h = st.matrix<float>("h"), bf = st.matrix<float>("b");
  for (unsigned b = 0; b < 65536; ++b) {
    const unsigned exponent = (b >> 10) & 0x1f, mantissa = b & 0x3ff;
    const double sign = (b & 0x8000) ? -1.0 : 1.0;
    // (−1)^s · 2^(e − 15) · 1.m for normal halves, (−1)^s · 2^−14 · 0.m for subnormal ones.
    if (exponent == 31) {
      EXPECT_TRUE(mantissa ? std::isnan(h(0, b)) : h(0, b) == sign * std::numeric_limits<double>::infinity()) << b;
    } else {
      const double value = exponent ? sign * std::ldexp(1024.0 + mantissa, int(exponent) - 25)
                                    : sign * std::ldexp(double(mantissa), -24);
      EXPECT_EQ(double(h(0, b)), value) << b;
      EXPECT_EQ(std::signbit(h(0, b)), (b & 0x8000) != 0) << b;
    }
    if (exponent == 31 && mantissa) {  // NaN payloads are kept
      EXPECT_EQ(bits_of(h(0, b)), (b & 0x8000u) << 16 | 0x7f800000u | mantissa << 13) << b;
    }
    EXPECT_EQ(bits_of(bf(0, b)), b << 16) << b;  // NaN payloads too
  }
}

TEST(SafeTensors, NamesContainsTensorAndMetadata) {
  const Bytes i64 = bytes_of<std::int64_t>({-3, 1LL << 40});
  const SafeTensors st = SafeTensors::parse(file_of(
      {{"layer.weight", "F32", {1, 1}, bytes_of({2.0f})}, {"b", "I64", {2}, i64}, {"a.mask", "BOOL", {3}, {1, 0, 1}}},
      {{"format", "pt"}, {"note", "\xc3\xbc and \"quotes\""}}));
  EXPECT_EQ(st.names(), (std::vector<std::string>{"a.mask", "b", "layer.weight"}));
  EXPECT_TRUE(st.contains("b"));
  EXPECT_FALSE(st.contains("c"));
  EXPECT_EQ(st.metadata(), (std::map<std::string, std::string>{{"format", "pt"}, {"note", "\xc3\xbc and \"quotes\""}}));
  const mha::io::Tensor& b = st.tensor("b");
  EXPECT_EQ(b.dtype, "I64");
  EXPECT_EQ(b.shape, (std::vector<std::int64_t>{2}));
  EXPECT_EQ(b.bytes, i64);
  EXPECT_EQ(st.tensor("a.mask").bytes, (Bytes{1, 0, 1}));
  EXPECT_EQ(&st.expect_shape("layer.weight", {1, 1}), &st.tensor("layer.weight"));
  EXPECT_TRUE(SafeTensors::parse(file_of({})).metadata().empty());
  EXPECT_TRUE(SafeTensors::parse(file_of({})).names().empty());
}

TEST(SafeTensors, ReadsTheReferenceWritersOutput) {
  // The bytes huggingface/safetensors' own serializer tests expect for a tensor "attn.0", F32 of
  // shape [1, 2, 3] holding 0 … 5, and for no tensors with metadata {"framework": "pt"}.
  const std::string header = R"({"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}})";
  Bytes file = {64, 0, 0, 0, 0, 0, 0, 0};
  file.insert(file.end(), header.begin(), header.end());
  const Bytes data = {0, 0, 0, 0, 0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0, 160, 64};
  file.insert(file.end(), data.begin(), data.end());
  const SafeTensors st = SafeTensors::parse(file);
  EXPECT_EQ(st.tensor("attn.0").shape, (std::vector<std::int64_t>{1, 2, 3}));
  EXPECT_EQ(st.tensor("attn.0").bytes, bytes_of({0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f}));

  const std::string empty = "{\"__metadata__\":{\"framework\":\"pt\"}}     ";
  Bytes file2 = {40, 0, 0, 0, 0, 0, 0, 0};
  file2.insert(file2.end(), empty.begin(), empty.end());
  const SafeTensors st2 = SafeTensors::parse(file2);
  EXPECT_TRUE(st2.names().empty());
  EXPECT_EQ(st2.metadata().at("framework"), "pt");
}

TEST(SafeTensors, AcceptsAnyOrderGapsEmptyTensorsAndScalars) {
  // "b" lies before "a", a gap of 4 bytes between them and 1 unused byte at the end.
  const Bytes data = {1, 0, 0, 0, 9, 9, 9, 9, 0, 0, 0x80, 0x3f, 0, 0, 0, 0x40, 0, 0, 0x40, 0x40, 7, 7, 7};
  const SafeTensors st = SafeTensors::parse(file_with(
      R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[8,20]},"b":{"dtype":"I32","shape":[],"data_offsets":[0,4]},)"
      R"("e":{"dtype":"F32","shape":[0,3],"data_offsets":[10,10]},"z":{"dtype":"F64","shape":[2,-0,3],"data_offsets":[0,0]},)"
      R"("f4":{"dtype":"F4","shape":[2,2],"data_offsets":[20,22]},"big":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[4,4]}})",
      data));
  EXPECT_EQ(st.matrix<float>("a"), (Matrix<float>(1, 3) << 1, 2, 3).finished());
  EXPECT_EQ(st.tensor("b").shape, std::vector<std::int64_t>{});
  EXPECT_EQ(st.tensor("b").bytes, (Bytes{1, 0, 0, 0}));
  const Matrix<double> e = st.matrix<double>("e");
  EXPECT_EQ(e.rows(), 0);
  EXPECT_EQ(e.cols(), 3);
  EXPECT_EQ(st.tensor("z").shape, (std::vector<std::int64_t>{2, 0, 3}));
  EXPECT_EQ(st.tensor("f4").bytes, (Bytes{7, 7}));
  EXPECT_TRUE(st.tensor("big").bytes.empty());
}

TEST(SafeTensors, EmptyTensorsOfHugeSizesAreReadWithoutVisitingTheirRows) {
  // 2^62 rows of 0 elements: matrix() looped over every (empty) row, for ever, on a 100-byte file.
  const SafeTensors st = SafeTensors::parse(
      file_with(R"({"rows":{"dtype":"F32","shape":[4611686018427387904,0],"data_offsets":[0,0]},)"
                R"("cols":{"dtype":"F16","shape":[0,4611686018427387904],"data_offsets":[0,0]},)"
                R"("squeezed":{"dtype":"BF16","shape":[1,4611686018427387904,0],"data_offsets":[0,0]}})"));
  const Matrix<float> rows = st.matrix<float>("rows");
  EXPECT_EQ(rows.rows(), Eigen::Index{1} << 62);
  EXPECT_EQ(rows.cols(), 0);
  EXPECT_EQ(st.matrix<double>("cols").cols(), Eigen::Index{1} << 62);
  EXPECT_EQ(st.matrix<double>("squeezed").rows(), Eigen::Index{1} << 62);
  EXPECT_EQ(st.matrix_size("squeezed"), (std::pair<Eigen::Index, Eigen::Index>{Eigen::Index{1} << 62, 0}));
}

TEST(SafeTensors, ANameGivenTwiceCountsWithItsLastEntry) {
  const Bytes file = file_with(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                               R"("w":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}})",
                               {5, 6, 7});
  const SafeTensors st = SafeTensors::parse(file.data(), file.size());
  EXPECT_EQ(st.names(), std::vector<std::string>{"w"});
  EXPECT_EQ(st.tensor("w").bytes, (Bytes{6, 7}));
}

TEST(SafeTensors, LoadsAFile) {
  const TempFile file(file_of({{"w", "F32", {2, 2}, bytes_of({1.0f, 2.0f, 3.0f, 4.0f})},
                               {"e", "F64", {0}, {}},
                               {"h", "F16", {1}, bytes_of<std::uint16_t>({0xc100})}},
                              {{"k", "v"}}));
  const SafeTensors st = SafeTensors::load(file.path());
  EXPECT_EQ(st.names(), (std::vector<std::string>{"e", "h", "w"}));
  EXPECT_EQ(st.matrix<double>("w"), (Matrix<double>(2, 2) << 1, 2, 3, 4).finished());
  EXPECT_EQ(st.matrix<float>("h")(0, 0), -2.5f);
  EXPECT_EQ(st.matrix<float>("e").size(), 0);
  EXPECT_EQ(st.metadata().at("k"), "v");
  EXPECT_EQ(error_of([&] { st.tensor("x"); }),
            "mha: safetensors file \"" + file.path() + "\": no tensor \"x\"; its 3 tensors are \"e\", \"h\", \"w\"");
}

TEST(SafeTensors, LoadErrorsNameTheFile) {
  const std::string missing = ::testing::TempDir() + "mha_test_safetensors_no_such_file.safetensors";
  EXPECT_EQ(error_of([&] { SafeTensors::load(missing); }),
            "mha: safetensors file \"" + missing + "\": cannot be opened");

  Bytes truncated = file_of({{"w", "F32", {4}, bytes_of({1.0f, 2.0f, 3.0f, 4.0f})}});
  truncated.resize(truncated.size() - 1);
  const TempFile file(truncated);
  EXPECT_EQ(error_of([&] { SafeTensors::load(file.path()); }),
            "mha: safetensors file \"" + file.path() +
                "\": tensor \"w\": data_offsets [0, 16] run past the end of the 15-byte data buffer (truncated file?)");
  const TempFile tiny(Bytes{1, 2, 3});
  EXPECT_EQ(error_of([&] { SafeTensors::load(tiny.path()); }),
            "mha: safetensors file \"" + tiny.path() + "\": 3 bytes long, too short for the 8-byte header length");
  const TempFile long_header(Bytes{9, 0, 0, 0, 0, 0, 0, 0, '{', '}'});
  EXPECT_EQ(error_of([&] { SafeTensors::load(long_header.path()); }),
            "mha: safetensors file \"" + long_header.path() + "\": header length 9 exceeds the 2 bytes that follow it");
  const std::string directory = ::testing::TempDir();
  EXPECT_EQ(error_of([&] { SafeTensors::load(directory); }).rfind("mha: safetensors file \"" + directory + "\": ", 0),
            0u);
}

TEST(SafeTensors, RejectsFilesTooShortForTheirHeader) {
  EXPECT_EQ(parse_error({}), "mha: safetensors buffer: 0 bytes long, too short for the 8-byte header length");
  EXPECT_EQ(parse_error(Bytes(7)), "mha: safetensors buffer: 7 bytes long, too short for the 8-byte header length");
  EXPECT_EQ(error_of([] { SafeTensors::parse(Bytes(7), "weights"); }),
            "mha: safetensors weights: 7 bytes long, too short for the 8-byte header length");
  EXPECT_EQ(parse_error({20, 0, 0, 0, 0, 0, 0, 0, '{', '}'}),
            "mha: safetensors buffer: header length 20 exceeds the 2 bytes that follow it");
  EXPECT_EQ(parse_error(Bytes(8, 0xff)),
            "mha: safetensors buffer: header length 18446744073709551615 exceeds the 0 bytes that follow it");
  Bytes huge(16, ' ');
  for (int i = 0; i < 8; ++i) huge[i] = i == 7 ? 0x80 : 0;
  EXPECT_EQ(parse_error(huge),
            "mha: safetensors buffer: header length 9223372036854775808 exceeds the 8 bytes that follow it");
}

TEST(SafeTensors, HeaderLengthsAboveTheLimitAreRejectedBeforeReading) {
  // A file of 100 MB + 9 bytes (sparse: written as a few bytes and extended) whose header length,
  // 100 000 001, fits in the file but is above the limit: rejected before the header is allocated.
  const std::uint64_t n = 100000001;
  Bytes prefix;
  for (int i = 0; i < 8; ++i) prefix.push_back(static_cast<unsigned char>(n >> (8 * i)));
  prefix.push_back('{');
  const TempFile file(prefix);
  std::filesystem::resize_file(file.path(), 8 + n);
  EXPECT_EQ(
      error_of([&] { SafeTensors::load(file.path()); }),
      "mha: safetensors file \"" + file.path() + "\": header length 100000001 exceeds the limit of 100000000 bytes");
}

TEST(SafeTensors, RejectsHeadersThatAreNotAJsonObject) {
  // nlohmann/json's own message follows; its exact wording is that library's.
  const std::string prefix = "mha: safetensors buffer: header is not valid JSON: [json.exception.";
  const std::pair<std::string, std::string> cases[] = {
      {"{", "parse_error.101] parse error at line 1, column 9: syntax error while parsing object key"},
      {"", "parse_error.101] parse error at line 1, column 1: syntax error while parsing value"},
      {"{\"w\":1,}", "parse_error.101] parse error at line 1, column 8: syntax error while parsing object key"},
      {"{\"\xff\":{}}",
       "parse_error.101] parse error at line 1, column 3: syntax error while parsing object key - invalid string: "
       "ill-formed UTF-8 byte"},
      {"{\"w\":[1e400]}", "out_of_range.406] number overflow parsing '1e400'"},
      {"{} {}",
       "parse_error.101] parse error at line 1, column 4: syntax error while parsing value - unexpected '{'; expected "
       "end of input"},
      {"{/* comment */}",
       "parse_error.101] parse error at line 1, column 2: syntax error while parsing object key - invalid literal"}};
  for (const auto& [header, message] : cases)
    EXPECT_EQ(parse_error(file_with(header)).rfind(prefix + message, 0), 0u) << parse_error(file_with(header));
  EXPECT_EQ(parse_error(file_with("[1, 2]")), "mha: safetensors buffer: header is a JSON array, not an object");
  EXPECT_EQ(parse_error(file_with("\"w\"")), "mha: safetensors buffer: header is a JSON string, not an object");
  EXPECT_EQ(parse_error(file_with("{\"w\": 3}")),
            "mha: safetensors buffer: tensor \"w\" is a JSON number, not an object");
  EXPECT_EQ(parse_error(file_with("{\"w\": null}")),
            "mha: safetensors buffer: tensor \"w\" is a JSON null, not an object");
}

TEST(SafeTensors, RejectsBadMetadata) {
  EXPECT_EQ(parse_error(file_with(R"({"__metadata__": ["a"]})")),
            "mha: safetensors buffer: \"__metadata__\" is a JSON array, not an object");
  EXPECT_EQ(parse_error(file_with(R"({"__metadata__": {"a": "b", "epoch": 3}})")),
            "mha: safetensors buffer: \"__metadata__\" maps \"epoch\" to the JSON number 3, not a string");
}

TEST(SafeTensors, RejectsEntriesWithMissingOrMistypedFields) {
  const std::string w = "mha: safetensors buffer: tensor \"w\"";
  EXPECT_EQ(parse_error(file_with_entry(R"("shape":[4],"data_offsets":[0,16])")), w + " has no \"dtype\"");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","data_offsets":[0,16])")), w + " has no \"shape\"");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":[4])")), w + " has no \"data_offsets\"");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":32,"shape":[4],"data_offsets":[0,16])")),
            w + ": \"dtype\" 32 is not a string");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F128","shape":[4],"data_offsets":[0,16])")),
            w + " has unknown dtype \"F128\" (known: BOOL, F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, "
                "I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64)");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"f32","shape":[4],"data_offsets":[0,16])"))
                .rfind(w + " has unknown dtype \"f32\"", 0),
            0u);
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":4,"data_offsets":[0,16])")),
            w + ": \"shape\" 4 is not an array");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":{"rows":4},"data_offsets":[0,16])")),
            w + ": \"shape\" {\"rows\":4} is not an array");
}

TEST(SafeTensors, RejectsBadShapes) {
  const std::string w = "mha: safetensors buffer: tensor \"w\"";
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":[4,-1],"data_offsets":[0,16])")),
            w + ": \"shape\" [4,-1] has a negative size");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":[1.5],"data_offsets":[0,16])")),
            w + ": \"shape\" [1.5] has a size that is not an integer");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":[4.0],"data_offsets":[0,16])")),
            w + ": \"shape\" [4.0] has a size that is not an integer");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":["4"],"data_offsets":[0,16])")),
            w + ": \"shape\" [\"4\"] has a size that is not an integer");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":[[4]],"data_offsets":[0,16])")),
            w + ": \"shape\" [[4]] has a size that is not an integer");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":[18446744073709551616],"data_offsets":[0,16])")),
            w + ": \"shape\" [1.8446744073709552e+19] has a size that is not an integer");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,16])")),
            w + ": \"shape\" [9223372036854775808] has a size above 2^63 - 1");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,16])")),
            w + " of shape [4294967296, 4294967296] and dtype U8 is too large: 2^61 bytes or more");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":[2305843009213693952],"data_offsets":[0,16])")),
            w + " of shape [2305843009213693952] and dtype F32 is too large: 2^61 bytes or more");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F4","shape":[3],"data_offsets":[0,2])")),
            w + " of shape [3] and dtype F4 is 12 bits, not a whole number of bytes");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"U8","shape":[2305843009213693952],"data_offsets":[0,16])")),
            w + " of shape [2305843009213693952] and dtype U8 is too large: 2^61 bytes or more");
  // The largest size that does not overflow is let through to the data_offsets check.
  EXPECT_EQ(
      parse_error(file_with_entry(R"("dtype":"U8","shape":[2305843009213693951],"data_offsets":[0,16])")),
      w + ": data_offsets [0, 16] hold 16 bytes, but shape [2305843009213693951] of U8 needs 2305843009213693951");
}

TEST(SafeTensors, RejectsBadDataOffsets) {
  const std::string w = "mha: safetensors buffer: tensor \"w\"";
  const std::string rule = " is not [begin, end] with 0 <= begin <= end";
  for (const std::string offsets :
       {"16", "[16]", "[0,8,16]", "[-1,15]", "[0,16.0]", "[\"0\",16]", "[8,4]", "{\"begin\":0}"})
    EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":[4],"data_offsets":)" + offsets)),
              w + ": \"data_offsets\" " + offsets + rule);
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":[4],"data_offsets":[0,20])")),
            w + ": data_offsets [0, 20] run past the end of the 16-byte data buffer (truncated file?)");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":[0],"data_offsets":[17,17])")),
            w + ": data_offsets [17, 17] run past the end of the 16-byte data buffer (truncated file?)");
  EXPECT_EQ(
      parse_error(file_with_entry(R"("dtype":"F32","shape":[4],"data_offsets":[0,18446744073709551615])")),
      w + ": data_offsets [0, 18446744073709551615] run past the end of the 16-byte data buffer (truncated file?)");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":[2,2],"data_offsets":[0,12])")),
            w + ": data_offsets [0, 12] hold 12 bytes, but shape [2, 2] of F32 needs 16");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F64","shape":[1],"data_offsets":[0,16])")),
            w + ": data_offsets [0, 16] hold 16 bytes, but shape [1] of F64 needs 8");
}

TEST(SafeTensors, RejectsOverlappingTensors) {
  EXPECT_EQ(parse_error(file_with(R"({"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},)"
                                  R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                                  Bytes(16))),
            "mha: safetensors buffer: tensors \"a\" [0, 8] and \"b\" [4, 12] overlap");
  EXPECT_EQ(parse_error(file_with(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                                  R"("b":{"dtype":"U8","shape":[1],"data_offsets":[15,16]}})",
                                  Bytes(16))),
            "mha: safetensors buffer: tensors \"a\" [0, 16] and \"b\" [15, 16] overlap");
  EXPECT_EQ(parse_error(file_with(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                                  R"("b":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
                                  Bytes(16))),
            "mha: safetensors buffer: tensors \"a\" [0, 16] and \"b\" [0, 16] overlap");
}

/// `depth` arrays, one inside the other, around "0".
std::string nested(std::size_t depth) { return std::string(depth, '[') + "0" + std::string(depth, ']'); }

/// The message for a header nesting deeper than the reader's bound, `where` ("" or " in ...").
std::string too_deep(const std::string& where) {
  return "mha: safetensors buffer: header nests arrays and objects more than 8 levels deep" + where +
         "; a safetensors header nests 3 (the header, a tensor's entry, its shape and data_offsets)";
}

TEST(SafeTensors, DeeplyNestedMetadataIsRejectedWithoutRecursion) {
  // 100 000 levels: about 200 KB of header. Quoting it in the message (nlohmann's dump() recurses
  // once per level) overflowed the stack; now the parser stops at the ninth level.
  const std::string deep_arrays = "{\"__metadata__\":{\"a\":" + nested(100000) + "}}";
  EXPECT_EQ(parse_error(file_with(deep_arrays)), too_deep(" in \"__metadata__\""));
  std::string deep_objects = "{\"__metadata__\":";
  for (int i = 0; i < 100000; ++i) deep_objects += "{\"a\":";
  deep_objects += "\"b\"" + std::string(100000, '}') + "}";
  EXPECT_EQ(parse_error(file_with(deep_objects)), too_deep(" in \"__metadata__\""));
  // Unclosed: rejected on the way down, before the missing brackets would be noticed.
  EXPECT_EQ(parse_error(file_with("{\"__metadata__\":" + std::string(100000, '['))), too_deep(" in \"__metadata__\""));
}

TEST(SafeTensors, DeeplyNestedFieldsAreRejectedWithoutRecursion) {
  const std::string deep = nested(100000);
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":)" + deep + R"(,"data_offsets":[0,16])")),
            too_deep(" in tensor \"w\""));
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":)" + deep + R"(,"shape":[4],"data_offsets":[0,16])")),
            too_deep(" in tensor \"w\""));
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":[4],"data_offsets":)" + deep)),
            too_deep(" in tensor \"w\""));
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":[4],"data_offsets":[0,16],"extra":)" + deep)),
            too_deep(" in tensor \"w\""));
  EXPECT_EQ(parse_error(file_with("{\"w\":" + deep + "}")), too_deep(" in tensor \"w\""));
  // The entry named is the one being parsed, after a well-formed one.
  EXPECT_EQ(parse_error(file_with(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":)" + deep + "}", {1})),
            too_deep(" in tensor \"b\""));
  EXPECT_EQ(parse_error(file_with(deep)), too_deep(""));
}

TEST(SafeTensors, NestingUpToTheBoundReachesTheUsualChecks) {
  // The header, the entry and the shape are 3 levels: 5 more arrays make 8, the most read.
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":[)" + nested(5) + R"(],"data_offsets":[0,16])")),
            "mha: safetensors buffer: tensor \"w\": \"shape\" [[[[[[0]]]]]] has a size that is not an integer");
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":[)" + nested(6) + R"(],"data_offsets":[0,16])")),
            too_deep(" in tensor \"w\""));
  EXPECT_EQ(parse_error(file_with("{\"__metadata__\":{\"a\":" + nested(6) + "}}")),
            "mha: safetensors buffer: \"__metadata__\" maps \"a\" to the JSON array [[[[[[0]]]]]], not a string");
  EXPECT_EQ(parse_error(file_with("{\"__metadata__\":{\"a\":" + nested(7) + "}}")), too_deep(" in \"__metadata__\""));
}

TEST(SafeTensors, ErrorMessagesQuoteOnlyTheStartOfAValue) {
  // A shape of 100 000 sizes, the last one negative: quoted as its first 40 characters.
  std::string sizes;
  for (int i = 0; i < 100000; ++i) sizes += "1,";
  const std::string w = "mha: safetensors buffer: tensor \"w\"";
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":"F32","shape":[)" + sizes + R"(-1],"data_offsets":[0,16])")),
            w + ": \"shape\" [1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1... has a negative size");
  EXPECT_EQ(
      parse_error(file_with_entry(R"("dtype":"F32","shape":[4],"data_offsets":[0,16,)" + sizes + "0]")),
      w + ": \"data_offsets\" [0,16,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,... is not [begin, end] with 0 <= begin <= end");
  const std::string long_name(100000, 'n');
  EXPECT_EQ(parse_error(file_with_entry(R"("dtype":{")" + long_name + R"(":1},"shape":[4],"data_offsets":[0,16])")),
            w + ": \"dtype\" {\"" + std::string(38, 'n') + "... is not a string");
  // Cut between characters, never inside one: after ["x, 18 "ü" of 2 bytes each fill 39 of the 40.
  std::string umlauts;
  for (int i = 0; i < 50000; ++i) umlauts += "\xc3\xbc";
  EXPECT_EQ(parse_error(file_with(R"({"__metadata__":{"a":["x)" + umlauts + R"("]}})")),
            "mha: safetensors buffer: \"__metadata__\" maps \"a\" to the JSON array [\"x" + umlauts.substr(0, 36) +
                "..., not a string");
  // Values that fit are quoted whole, as before.
  EXPECT_EQ(
      parse_error(file_with(R"({"__metadata__":{"a":{"list":[1,"two",null,true,2.5]}}})")),
      "mha: safetensors buffer: \"__metadata__\" maps \"a\" to the JSON object {\"list\":[1,\"two\",null,true,2.5]}, "
      "not a string");
}

TEST(SafeTensors, ParseErrorsQuoteOnlyTheStartOfTheTokenRead) {
  // nlohmann/json's message ends with the token it stopped at: here a number or a string of 100 000
  // characters (the string padded to 100 008 by file_with). Its first 200 characters are kept.
  const std::string prefix = "mha: safetensors buffer: header is not valid JSON: ";
  const std::pair<std::string, std::string> cases[] = {
      {"{\"w\":[1" + std::string(100000, '0') + "e400]}",
       "[json.exception.out_of_range.406] number overflow parsing '10000"},
      {"{\"w\":\"" + std::string(100000, 'x'),
       "[json.exception.parse_error.101] parse error at line 1, column 100009: syntax error while parsing value - "
       "invalid string: missing closing quote; last read: '\"xxxx"}};
  for (const auto& [header, start] : cases) {
    const std::string message = parse_error(file_with(header));
    EXPECT_EQ(message.rfind(prefix + start, 0), 0u) << message.substr(0, 300);
    EXPECT_EQ(message.size(), prefix.size() + 200 + 3) << message.substr(0, 300);
    EXPECT_EQ(message.substr(message.size() - 3), "...") << message.substr(0, 300);
  }
}

TEST(SafeTensors, MissingTensorsListWhatIsThere) {
  EXPECT_EQ(error_of([] { SafeTensors::parse(file_of({})).tensor("w"); }),
            "mha: safetensors buffer: no tensor \"w\"; it has no tensors");
  std::vector<Entry> entries;
  for (int i = 0; i < 12; ++i) entries.push_back({"t" + std::to_string(100 + i), "U8", {1}, {0}});
  const SafeTensors st = SafeTensors::parse(file_of(entries), "model.safetensors");
  const std::string message =
      "mha: safetensors model.safetensors: no tensor \"w\"; its 12 tensors begin with \"t100\", \"t101\", \"t102\", "
      "\"t103\", \"t104\", \"t105\", \"t106\", \"t107\", \"t108\", \"t109\"";
  EXPECT_EQ(error_of([&] { st.tensor("w"); }), message);
  EXPECT_EQ(error_of([&] { st.matrix<float>("w"); }), message);
  EXPECT_EQ(error_of([&] { st.expect_shape("w", {1}); }), message);
}

TEST(SafeTensors, MatrixRejectsOtherRanksAndDtypes) {
  const SafeTensors st = SafeTensors::parse(file_of({{"s", "F32", {}, bytes_of({1.0f})},
                                                     {"t", "F32", {2, 1, 1}, bytes_of({1.0f, 2.0f})},
                                                     {"i", "I64", {2}, bytes_of<std::int64_t>({1, 2})},
                                                     {"u", "U16", {1}, {0, 0}}}));
  const std::string prefix = "mha: safetensors buffer: tensor ";
  EXPECT_EQ(error_of([&] { st.matrix<float>("s"); }),
            prefix +
                "\"s\" has shape [] of rank 0; matrix() reads only rank 1 (as a row vector), rank 2, and higher ranks "
                "whose leading dimensions are 1");
  EXPECT_EQ(error_of([&] { st.matrix<double>("t"); }),
            prefix +
                "\"t\" has shape [2, 1, 1] of rank 3; matrix() reads only rank 1 (as a row vector), rank 2, and higher "
                "ranks whose leading dimensions are 1");
  EXPECT_EQ(error_of([&] { st.matrix<double>("i"); }),
            prefix + "\"i\" has dtype I64; matrix() reads only F32, F64, F16, BF16 and BOOL");
  EXPECT_EQ(error_of([&] { st.matrix<float>("u"); }),
            prefix + "\"u\" has dtype U16; matrix() reads only F32, F64, F16, BF16 and BOOL");
  EXPECT_EQ(error_of([&] { st.matrix<bool>("t"); }),
            prefix +
                "\"t\" has shape [2, 1, 1] of rank 3; matrix() reads only rank 1 (as a row vector), rank 2, and higher "
                "ranks whose leading dimensions are 1");
  EXPECT_EQ(error_of([&] { st.matrix<bool>("i"); }), prefix + "\"i\" has dtype I64; matrix<bool>() reads only BOOL");
  EXPECT_EQ(error_of([&] { st.matrix<bool>("s"); }),
            prefix +
                "\"s\" has shape [] of rank 0; matrix() reads only rank 1 (as a row vector), rank 2, and higher ranks "
                "whose leading dimensions are 1");
}

TEST(SafeTensors, ReadsBoolTensorsAsMasksAndAsZeroAndOne) {
  // A BOOL element is one byte, 0 or 1, in row-major order like every other dtype.
  const SafeTensors st = SafeTensors::parse(file_of({{"mask", "BOOL", {2, 3}, {1, 0, 0, 1, 1, 0}},
                                                     {"row", "BOOL", {4}, {0, 1, 1, 0}},
                                                     {"squeezed", "BOOL", {1, 1, 2}, {1, 0}},
                                                     {"empty", "BOOL", {0, 5}, {}}}));
  mha_test::BoolMatrix mask(2, 3);
  mask << true, false, false, true, true, false;
  EXPECT_EQ(st.matrix<bool>("mask"), mask);
  EXPECT_EQ(st.matrix<bool>("mask", 2, 3), mask);
  EXPECT_EQ(st.matrix<float>("mask"), mask.cast<float>());
  EXPECT_EQ(st.matrix<double>("mask"), mask.cast<double>());
  EXPECT_EQ(st.matrix<bool>("row"), (mha_test::BoolMatrix(1, 4) << false, true, true, false).finished());
  EXPECT_EQ(st.matrix<double>("row"), (Matrix<double>(1, 4) << 0, 1, 1, 0).finished());
  EXPECT_EQ(st.matrix<bool>("squeezed"), (mha_test::BoolMatrix(1, 2) << true, false).finished());
  EXPECT_EQ(st.matrix_size("mask"), (std::pair<Eigen::Index, Eigen::Index>{2, 3}));
  EXPECT_EQ(st.matrix<bool>("empty").rows(), 0);
  EXPECT_EQ(st.matrix<bool>("empty").cols(), 5);
  EXPECT_EQ(error_of([&] { st.matrix<bool>("mask", 3, 2); }),
            "mha: safetensors buffer: tensor \"mask\" of shape [2, 3] is a 2 x 3 matrix, expected 3 x 2");
}

TEST(SafeTensors, BoolBytesOtherThanZeroAndOneAreErrors) {
  const SafeTensors st = SafeTensors::parse(
      file_of({{"m", "BOOL", {2, 2}, {0, 1, 2, 1}}, {"n", "BOOL", {3}, {255, 0, 0}}, {"f", "F32", {1}, Bytes(4)}}),
      "masks.safetensors");
  const std::string prefix = "mha: safetensors masks.safetensors: tensor ";
  const std::string m =
      prefix + "\"m\" of dtype BOOL has the byte 2 at element 2 (row-major); a BOOL element is 0 or 1";
  EXPECT_EQ(error_of([&] { st.matrix<bool>("m"); }), m);
  EXPECT_EQ(error_of([&] { st.matrix<float>("m"); }), m);
  EXPECT_EQ(error_of([&] { st.matrix<double>("m", 2, 2); }), m);
  EXPECT_EQ(error_of([&] { st.matrix<bool>("n"); }),
            prefix + "\"n\" of dtype BOOL has the byte 255 at element 0 (row-major); a BOOL element is 0 or 1");
  EXPECT_EQ(error_of([&] { st.matrix<bool>("f"); }), prefix + "\"f\" has dtype F32; matrix<bool>() reads only BOOL");
  // The raw bytes are still there, as the file holds them.
  EXPECT_EQ(st.tensor("m").bytes, (Bytes{0, 1, 2, 1}));
}

TEST(SafeTensors, ShapeExpectationsNameBothShapes) {
  const SafeTensors st = SafeTensors::parse(
      file_of({{"w", "F32", {2, 3}, Bytes(24)}, {"v", "F32", {3}, Bytes(12)}, {"t", "F32", {2, 1, 1}, Bytes(8)}}));
  const std::string prefix = "mha: safetensors buffer: tensor ";
  EXPECT_EQ(error_of([&] { st.matrix<float>("w", 3, 2); }),
            prefix + "\"w\" of shape [2, 3] is a 2 x 3 matrix, expected 3 x 2");
  EXPECT_EQ(error_of([&] { st.matrix<float>("v", 3, 1); }),
            prefix + "\"v\" of shape [3] is a 1 x 3 matrix, expected 3 x 1");
  EXPECT_EQ(error_of([&] { st.matrix<float>("t", 2, 1); }),
            prefix +
                "\"t\" has shape [2, 1, 1] of rank 3; matrix() reads only rank 1 (as a row vector), rank 2, and higher "
                "ranks whose leading dimensions are 1");
  EXPECT_EQ(error_of([&] { st.expect_shape("w", {3, 2}); }), prefix + "\"w\" has shape [2, 3], expected [3, 2]");
  EXPECT_EQ(error_of([&] { st.expect_shape("w", {2, 3, 1}); }), prefix + "\"w\" has shape [2, 3], expected [2, 3, 1]");
  EXPECT_EQ(st.expect_shape("t", {2, 1, 1}).bytes.size(), 8u);
}

TEST(SafeTensors, LeadingDimensionsOfOneAreSqueezed) {
  // PyTorch's nn.MultiheadAttention saves bias_k as 1 × 1 × E.
  const SafeTensors st = SafeTensors::parse(file_of(
      {{"bias_k", "F32", {1, 1, 3}, bytes_of({1.0f, 2.0f, 3.0f})}, {"col", "F32", {1, 2, 1}, bytes_of({4.0f, 5.0f})}}));
  Eigen::MatrixXf row(1, 3), col(2, 1);
  row << 1, 2, 3;
  col << 4, 5;
  EXPECT_EQ(st.matrix<float>("bias_k"), row);
  EXPECT_EQ(st.matrix<float>("col"), col);
}

/// Parses `file`: \returns true if it was accepted, after checking that what was read is
/// consistent; false if it was rejected with mha::invalid_argument. Anything else fails the test.
bool parses_consistently(const Bytes& file) {
  try {
    const SafeTensors st = SafeTensors::parse(file);
    for (const std::string& name : st.names()) {
      const mha::io::Tensor& t = st.tensor(name);
      std::uint64_t elements = 1;  // wraps only if a size is 0, and then ends 0 all the same
      for (std::int64_t d : t.shape) elements *= static_cast<std::uint64_t>(d);
      EXPECT_EQ(t.bytes.size() * 8, elements * mha::detail::dtype_bits(t.dtype)) << name;
      if (t.shape.size() == 1 || t.shape.size() == 2)
        error_of([&] { EXPECT_EQ(std::uint64_t(st.matrix<double>(name).size()), elements); });
    }
    return true;
  } catch (const mha::invalid_argument&) {
    return false;
  }
}

TEST(SafeTensors, EveryTruncationIsRejected) {
  const Bytes file =
      file_of({{"w", "F32", {2, 2}, bytes_of({1.0f, 2.0f, 3.0f, 4.0f})}, {"h", "F16", {1}, Bytes(2)}}, {{"k", "v"}});
  ASSERT_TRUE(parses_consistently(file));
  for (std::size_t size = 0; size < file.size(); ++size)
    EXPECT_FALSE(parses_consistently(Bytes(file.begin(), file.begin() + static_cast<std::ptrdiff_t>(size)))) << size;
}

TEST(SafeTensors, CorruptedFilesAreRejectedOrReadConsistently) {
  const Bytes file = file_of({{"w", "F32", {2, 2}, bytes_of({1.0f, 2.0f, 3.0f, 4.0f})},
                              {"h", "F16", {3}, Bytes(6)},
                              {"b", "BF16", {1, 1}, Bytes(2)}},
                             {{"k", "v"}});
  std::mt19937_64 engine(7);
  int accepted = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    Bytes corrupted = file;
    const int flips = 1 + static_cast<int>(engine() % 3);
    for (int f = 0; f < flips; ++f) {
      // Mostly the header, where a flip changes the meaning; digits more often than other bytes.
      const std::size_t at = engine() % (trial % 4 == 0 ? corrupted.size() : corrupted.size() - 20);
      corrupted[at] = static_cast<unsigned char>(engine() % 2 ? '0' + engine() % 10 : engine() % 256);
    }
    accepted += parses_consistently(corrupted);
  }
  EXPECT_GT(accepted, 0);  // some corruptions (in the data, in names) leave a well-formed file
  EXPECT_LT(accepted, 3000);
}

}  // namespace
