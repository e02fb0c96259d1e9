// Runs the fuzz harness's function over files, without libFuzzer: every build (gcc, sanitizers)
// replays the committed corpus, so each input found by the fuzzer stays a regression test.
//   usage: fuzz_replay FILE_OR_DIRECTORY...
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace {

void replay(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t count = 0;
  for (int i = 1; i < argc; ++i) {
    const std::filesystem::path path(argv[i]);
    if (std::filesystem::is_directory(path)) {
      for (const auto& entry : std::filesystem::directory_iterator(path))
        if (entry.is_regular_file()) replay(entry.path()), ++count;
    } else {
      replay(path), ++count;
    }
  }
  if (count == 0) {
    std::cerr << "fuzz_replay: no input files\n";
    return 1;
  }
  std::cout << "fuzz_replay: " << count << " inputs, all properties held\n";
  return 0;
}
