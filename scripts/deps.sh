#!/usr/bin/env bash
# Installs, with apt-get, the Debian 12 packages that moa's build, tests and benchmarks need, when
# any of them is missing (as root, or through sudo).
#   bash scripts/deps.sh          install what is missing
#   bash scripts/deps.sh --list   print the package names, one a line
set -euo pipefail

packages=(
  cmake g++ make            # the toolchain: CMake 3.25, GCC 12
  doctest-dev               # unit tests
  libbenchmark-dev          # bench/: Google Benchmark
  libopenblas-dev           # bench/: the OpenBLAS baseline
  libeigen3-dev             # bench/: the Eigen baseline
  libomp-dev                # LLVM OpenMP, for clang builds (GCC brings its own libgomp)
  nlohmann-json3-dev        # JSON (safetensors headers, HF configs and tokenizers, datasets)
  libcli11-dev              # examples/: the moa command line
  zlib1g-dev                # gzip-published datasets (moa/data/prepare.hpp)
)

if [[ ${1:-} == --list ]]; then
  printf '%s\n' "${packages[@]}"
  exit 0
fi

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$package")
  fi
done
((${#missing[@]} == 0)) && exit 0

echo "deps.sh: installing ${missing[*]}"
sudo=()
if ((EUID != 0)); then
  command -v sudo >/dev/null || { echo "deps.sh: run as root to install ${missing[*]}" >&2; exit 1; }
  sudo=(sudo)
fi
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
