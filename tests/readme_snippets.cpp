// Build-time tool: extracts the C++ code blocks of README.md so that the build proves they compile
// and the tests run them. A block holding `int main` is written out as a program of its own; every
// other block is a fragment, and the fragments are joined, in order, into the body of one main().
//   usage: readme_snippets README.md program.cpp fragments.cpp
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: readme_snippets README.md program.cpp fragments.cpp\n";
    return 2;
  }
  std::ifstream readme(argv[1]);
  if (!readme) {
    std::cerr << "readme_snippets: cannot read " << argv[1] << "\n";
    return 1;
  }
  std::vector<std::string> programs, fragments;
  std::string line, block;
  bool in_cpp = false;
  while (std::getline(readme, line)) {
    if (!in_cpp && line == "```cpp") {
      in_cpp = true;
      block.clear();
    } else if (in_cpp && line == "```") {
      in_cpp = false;
      (block.find("int main") != std::string::npos ? programs : fragments).push_back(block);
    } else if (in_cpp) {
      block += line + "\n";
    }
  }
  if (programs.size() != 1 || fragments.empty()) {
    std::cerr << "readme_snippets: expected one complete program and some fragments in " << argv[1] << ", found "
              << programs.size() << " and " << fragments.size() << "\n";
    return 1;
  }
  std::ofstream(argv[2]) << "// Generated from README.md: its complete example.\n" << programs.front();
  std::ofstream out(argv[3]);
  out << "// Generated from README.md: its API tour, fragment after fragment.\n"
         "#include <mha/io/pytorch.hpp>\n#include <mha/io/safetensors.hpp>\n#include <mha/mha.hpp>\n\n"
         "#include <fstream>\n#include <iostream>\n#include <stdexcept>\n#include <vector>\n\n"
         "int main() {\n";
  for (const auto& fragment : fragments) out << fragment;
  out << "}\n";
  return 0;
}
