#!/usr/bin/env bash
# What a user's translation unit costs to compile: one file calling forward, backward and decode for
# float (bench/compile_time_user.cpp), compiled as a user would, header-only (mha::mha) and against
# mha::precompiled; and mha::precompiled itself, once. Prints wall-clock seconds and peak memory.
#
#   bench/compile_time.sh [CXX] [FLAGS…]     defaults: g++, -O2
#
# Run it on a quiet machine: it measures the compiler, which shares the cores with anything else.
set -euo pipefail
cd "$(dirname "$0")/.."
cxx=${1:-g++}
shift || true
flags=("$@")
((${#flags[@]})) || flags=(-O2)
eigen=$(pkg-config --cflags eigen3 2>/dev/null || echo -I/usr/include/eigen3)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# measure NAME COMMAND…: runs the command under /usr/bin/time, prints seconds and peak MB.
measure() {
  local name=$1
  shift
  /usr/bin/time -f '%e %M' -o "$out/time" "$@"
  read -r seconds kb <"$out/time"
  printf '%-52s %7.1f s %7.0f MB\n' "$name" "$seconds" "$((kb / 1024))"
}

echo "$("$cxx" --version | head -n 1), flags: ${flags[*]}"
common=(-std=c++17 "${flags[@]}" -Iinclude $eigen -c)
measure "Eigen alone (one product; the floor)" "$cxx" "${common[@]}" bench/compile_time_eigen.cpp -o "$out/e.o"
measure "header-only, with OpenMP (mha::mha)" "$cxx" "${common[@]}" -fopenmp bench/compile_time_user.cpp -o "$out/h.o"
measure "against mha::precompiled (MHA_PRECOMPILED)" "$cxx" "${common[@]}" -DMHA_PRECOMPILED \
  bench/compile_time_user.cpp -o "$out/p.o"
measure "mha::precompiled itself (float and double, once)" "$cxx" "${common[@]}" -fopenmp src/precompiled.cpp \
  -o "$out/lib.o"
"$cxx" -fopenmp "$out/p.o" "$out/lib.o" -o "$out/program"
"$out/program" >/dev/null && echo "(the precompiled program links and runs)"
