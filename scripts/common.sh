# Shared by scripts/test and scripts/demo: installing what the build needs, and configuring it.
# Sourced, not run.

# The Debian packages that building and testing mha needs.
MHA_PACKAGES=(cmake make g++ libeigen3-dev libgtest-dev libbenchmark-dev)

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

# Configures and builds the project in build/ (Release).
configure_and_build() {
  echo "==> configuring and building in build/"
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "$@"
  cmake --build build --parallel "$(nproc 2>/dev/null || echo 2)"
}
