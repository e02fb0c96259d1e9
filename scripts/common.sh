# Shared by scripts/test and scripts/demo: installing what the build needs, and building it.
# Sourced, not run.

# The Debian packages that building and testing mha needs.
MHA_PACKAGES=(cmake make g++ libeigen3-dev libgtest-dev libbenchmark-dev nlohmann-json3-dev libcairo2-dev
  libopenmpi-dev openmpi-bin libopenblas-dev)
# And those that `scripts/test --full` adds: clang with its sanitizer, libFuzzer and OpenMP runtimes,
# and clang-format for the style check.
MHA_FULL_PACKAGES=(clang libclang-rt-14-dev libomp-dev clang-format)

# Installs the packages among "$@" that are missing, with apt-get; runs `apt-get update` first only
# when something is missing, and nothing at all when everything is there.
ensure_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  echo "==> installing missing Debian packages: ${missing[*]}"
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "error: need root (or sudo) to install ${missing[*]}" >&2; exit 1; }
    sudo=(sudo)
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
}

jobs_count() { nproc 2>/dev/null || echo 2; }

# Configures and builds the project in build/ (Release), with extra CMake arguments "$@".
configure_and_build() {
  echo "==> configuring and building in build/"
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "$@"
  cmake --build build --parallel "$(jobs_count)"
}

# variant_build NAME COMPILER [CMAKE ARGS…] [--target T…]: a build in build/NAME with that
# compiler, optimised with debug information, warnings as errors, no benchmarks.
variant_build() {
  local name=$1 compiler=$2 args=() targets=()
  shift 2
  while (($#)); do
    if [ "$1" = --target ]; then shift; targets=("$@"); break; fi
    args+=("$1"); shift
  done
  cmake -S . -B "build/$name" -DCMAKE_CXX_COMPILER="$compiler" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DMHA_WERROR=ON -DMHA_BUILD_BENCHMARKS=OFF -DMHA_PRECOMPILED=ON "${args[@]}" >/dev/null
  cmake --build "build/$name" --parallel "$(jobs_count)" ${targets[@]:+--target "${targets[@]}"}
}

# consumer COMPILER STANDARD HOW: builds and runs tests/consumer with mha::mha found as an installed
# package (HOW = installed, from build/install), mha::precompiled from the same (precompiled), mha::mha
# added with add_subdirectory (subdirectory), or with include/ copied alone into the consumer and
# compiled by hand (copied-include).
consumer() {
  local compiler=$1 standard=$2 how=$3 dir="build/consumer-${1%++}-$2-$3"
  rm -rf "$dir"
  case "$how" in
    installed)
      cmake -S tests/consumer -B "$dir" -DCMAKE_CXX_COMPILER="$compiler" -DCMAKE_CXX_STANDARD="$standard" \
        -DCMAKE_PREFIX_PATH="$PWD/build/install" >/dev/null
      cmake --build "$dir" >/dev/null ;;
    precompiled)
      cmake -S tests/consumer -B "$dir" -DCMAKE_CXX_COMPILER="$compiler" -DCMAKE_CXX_STANDARD="$standard" \
        -DCMAKE_PREFIX_PATH="$PWD/build/install" -DMHA_CONSUMER_TARGET=mha::precompiled >/dev/null
      cmake --build "$dir" >/dev/null ;;
    subdirectory)
      cmake -S tests/consumer -B "$dir" -DCMAKE_CXX_COMPILER="$compiler" -DCMAKE_CXX_STANDARD="$standard" \
        -DMHA_SOURCE_DIR="$PWD" >/dev/null
      cmake --build "$dir" >/dev/null ;;
    copied-include)
      mkdir -p "$dir" && cp -r include "$dir/include"
      "$compiler" -std=c++"$standard" -O2 -Wall -Wextra -Wpedantic -Werror -I "$dir/include" \
        -isystem /usr/include/eigen3 tests/consumer/main.cpp -o "$dir/consumer" ;;
  esac
  printf '    %-8s C++%s %-15s ' "$compiler" "$standard" "$how"
  "$dir/consumer"
}
