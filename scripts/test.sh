#!/usr/bin/env bash
# Builds and runs moa's whole test suite with CTest: unit tests, the header-compile check and the
# package tests. Installs missing Debian packages first (scripts/deps.sh).
# Settings, all optional: MOA_BUILD_DIR (build-release), MOA_BUILD_TYPE (Release),
# MOA_CXX_FLAGS (e.g. sanitizers; .ci/run uses this), MOA_JOBS (all cores), MOA_CMAKE_ARGS (more
# -D options), MOA_CTEST_ARGS (e.g. -LE package; default: -LE cuda on a machine without an NVIDIA GPU,
# where the CUDA tests are built but cannot run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/deps.sh

build_dir=${MOA_BUILD_DIR:-build-release}
jobs=${MOA_JOBS:-$(nproc)}
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE="${MOA_BUILD_TYPE:-Release}" \
      -DCMAKE_CXX_FLAGS="${MOA_CXX_FLAGS:-}" ${MOA_CMAKE_ARGS:-}
cmake --build "$build_dir" -j "$jobs"
default_ctest_args=""
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  default_ctest_args="-LE cuda"
fi
ctest --test-dir "$build_dir" --output-on-failure --no-tests=error -j "$jobs" ${MOA_CTEST_ARGS-$default_ctest_args}
