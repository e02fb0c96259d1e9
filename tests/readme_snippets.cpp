// Build-time tool: extracts the C++ code blocks of README.md and of the documentation pages given
// after it, so that the build proves they compile and the tests run them. The one block holding
// `int main` (in README.md) is written out as a program of its own; every other block is a fragment.
// The fragments of each file are joined, in order, into a scope of their own in the body of one
// main(), so that a page may use what its earlier blocks made but not what another page made.
// #line directives make the compiler's messages name the Markdown file and line.
//   usage: readme_snippets README.md program.cpp fragments.cpp [page.md ...]
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

/// A C++ code block: its text and the line of the file where that text starts.
struct Block {
  std::string text;
  int first_line = 0;
};

/// \returns whether `path` could be read; its C++ blocks are appended to `programs` (those holding
/// `int main`) and `fragments` (the others).
bool read_blocks(const std::string& path, std::vector<Block>& programs, std::vector<Block>& fragments) {
  std::ifstream file(path);
  if (!file) return false;
  std::string line;
  Block block;
  bool in_cpp = false;
  for (int number = 1; std::getline(file, line); ++number) {
    if (!in_cpp && line == "```cpp") {
      in_cpp = true;
      block = {"", number + 1};
    } else if (in_cpp && line == "```") {
      in_cpp = false;
      (block.text.find("int main") != std::string::npos ? programs : fragments).push_back(block);
    } else if (in_cpp) {
      block.text += line + "\n";
    }
  }
  return true;
}

/// \returns `block` preceded by a #line directive naming `path` and the block's first line.
std::string with_line(const Block& block, const std::string& path) {
  return "#line " + std::to_string(block.first_line) + " \"" + path + "\"\n" + block.text;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: readme_snippets README.md program.cpp fragments.cpp [page.md ...]\n";
    return 2;
  }
  std::vector<std::string> pages = {argv[1]};
  for (int i = 4; i < argc; ++i) pages.emplace_back(argv[i]);

  std::ostringstream body;
  Block program;
  for (std::size_t i = 0; i < pages.size(); ++i) {
    const std::string& page = pages[i];
    std::vector<Block> programs, fragments;
    if (!read_blocks(page, programs, fragments)) {
      std::cerr << "readme_snippets: cannot read " << page << "\n";
      return 1;
    }
    const std::size_t programs_expected = i == 0 ? 1 : 0;  // README.md's complete example
    if (programs.size() != programs_expected || fragments.empty()) {
      std::cerr << "readme_snippets: expected " << programs_expected << " complete program(s) and some fragments in "
                << page << ", found " << programs.size() << " and " << fragments.size() << "\n";
      return 1;
    }
    if (programs_expected == 1) program = programs.front();
    body << "{  // " << page << "\n";
    for (const Block& fragment : fragments) body << with_line(fragment, page);
    body << "}\n";
  }

  std::ofstream(argv[2]) << "// Generated from README.md: its complete example.\n" << with_line(program, pages.front());
  std::ofstream out(argv[3]);
  out << "// Generated from README.md and the documentation pages: their C++ blocks, page by page.\n"
         "#include <mha/io/huggingface.hpp>\n#include <mha/io/pytorch.hpp>\n#include <mha/io/safetensors.hpp>\n"
         "#include <mha/mha.hpp>\n\n"
         "#include <fstream>\n#include <iostream>\n#include <stdexcept>\n#include <vector>\n\n"
         "int main() {\n"
      << body.str() << "}\n";
  return 0;
}
