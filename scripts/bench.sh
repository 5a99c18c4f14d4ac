#!/usr/bin/env bash
# The GEMM benchmark table: moa's CPU GEMM against OpenBLAS and Eigen, on two threads.
# Installs missing Debian packages (scripts/deps.sh), builds bench_gemm in Release in
# build-release/ (MOA_BUILD_DIR) and runs it; arguments go to Google Benchmark
# (e.g. --benchmark_filter=...). Results and how to read them: bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/deps.sh

build_dir=${MOA_BUILD_DIR:-build-release}
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS=""
cmake --build "$build_dir" -j "$(nproc)" --target bench_gemm

# Only here: let OpenBLAS pick its own kernels and cache sizes (an environment may pin them for
# reproducible tests), so that moa is measured against OpenBLAS at its best, on the same threads.
exec env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=2 "$build_dir/bench/bench_gemm" "$@"
