#!/usr/bin/env bash
# bench/gpu_check.sh: the one GPU check. On a machine with an NVIDIA GPU and the CUDA toolkit it
# configures and builds moa's CUDA tests and benchmark in Release, runs `ctest -L cuda`, runs
# bench/bench_cuda and prints a short table. Meant to finish in well under 8 minutes on an H200
# (build ~1 min on 16 cores, tests < 1 min, benchmark < 1 min).
#
#   bash bench/gpu_check.sh [build-dir]        (default build-gpu/; MOA_CUDA_ARCH=90 by default)
#
# A bare GPU machine (CUDA, CMake and a compiler, nothing fetched) lacks doctest, nlohmann-json and
# zlib's headers: run `bash bench/gpu_deps.sh` first where Debian's mirrors are reachable and carry
# .gpu-deps/ along; this script unpacks them into the build folder. MOA_GPU_CHECK_BUILD_ONLY=1
# configures and builds without a GPU (a check of the script itself), MOA_GPU_CMAKE_ARGS adds
# configure arguments (e.g. -DCMAKE_SYSTEM_IGNORE_PREFIX_PATH=/usr to build as on a bare machine).
#
# `bash bench/gpu_prebuild.sh` here builds the four binaries into .gpu-prebuilt/ beforehand (nvcc
# needs no GPU); carried along, they are run without a build when they match the source (saves the
# build's minutes of device time).
#
# It configures the moa tree itself when tests/CMakeLists.txt includes tests/cuda; otherwise (or
# when the full tree cannot configure here, e.g. a dependency of the CPU build is missing) it uses a
# small wrapper project that includes only tests/cuda/CMakeLists.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
build=${1:-build-gpu}
arch=${MOA_CUDA_ARCH:-90}
jobs=$(nproc 2>/dev/null || echo 4)
export PATH=/usr/local/cuda/bin:$PATH
t0=$(date +%s)

step() { printf '\n== %s (%ds)\n' "$1" $(( $(date +%s) - t0 )); }

build_only=${MOA_GPU_CHECK_BUILD_ONLY:-0}  # 1: configure and build only (checks the script without a GPU)
build_timeout=${MOA_GPU_BUILD_TIMEOUT:-300}  # seconds per build command (bench/gpu_prebuild.sh on 2 cores needs more)
extra_cmake_args=(${MOA_GPU_CMAKE_ARGS:-})
if [ "$build_only" != 1 ]; then
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU visible (nvidia-smi); nothing to check" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
fi

# Dependencies a bare GPU machine lacks (doctest, nlohmann-json, zlib's headers): the Debian packages
# bench/gpu_deps.sh downloaded into .gpu-deps/, carried along, unpacked into the build folder (not /).
if compgen -G ".gpu-deps/*.deb" >/dev/null; then
  case $build in /*) deps="$build/deps" ;; *) deps="$root/$build/deps" ;; esac
  mkdir -p "$deps"
  for f in .gpu-deps/*.deb; do
    if command -v dpkg-deb >/dev/null; then
      dpkg-deb -x "$f" "$deps"
    else  # a .deb is an ar archive holding data.tar.*
      tmp=$(mktemp -d)
      (cd "$tmp" && ar x "$root/$f" && tar -xf data.tar.* -C "$deps")
      rm -rf "$tmp"
    fi
  done
  # libz.so links to this machine's libz.so.1.x, which may be another version there: drop a dangling
  # link so that the static libz.a of the package is used
  find "$deps" -xtype l -delete
  export CMAKE_PREFIX_PATH="$deps/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
  echo "gpu_check: using the packages of .gpu-deps/ ($(ls .gpu-deps | tr '\n' ' '))"
fi

# Binaries built beforehand by bench/gpu_prebuild.sh (on a machine without a GPU, from this same
# source) are run as they are: no configure or build here. They are skipped when the source differs
# from theirs, or when this machine lacks a library they link (another CUDA version).
prebuilt=${MOA_GPU_PREBUILT:-.gpu-prebuilt}
prebuilt_ok=0
if [ "$build_only" != 1 ] && [ -f "$prebuilt/SOURCE" ]; then
  if [ "$(cat "$prebuilt/SOURCE")" != "$(bash bench/gpu_prebuild.sh --source-hash)" ]; then
    echo "gpu_check: $prebuilt/ was built from other source; building here"
  else
    prebuilt_ok=1
    for t in moa_cuda_tests moa_cuda_device_tests bench_cuda bench_cuda_lm; do
      # (ldd's output captured whole: under pipefail, `ldd | grep -q` fails when grep stops reading early)
      libs=$(ldd "$prebuilt/$t" 2>&1) || true
      if [ ! -x "$prebuilt/$t" ] || [[ $libs == *"not found"* ]]; then
        echo "gpu_check: $prebuilt/$t is missing or needs libraries this machine lacks; building here"
        prebuilt_ok=0
        break
      fi
    done
  fi
fi

if [ "$prebuilt_ok" = 1 ]; then
  echo "gpu_check: running the binaries of $prebuilt/ (built from this source: $(cat "$prebuilt/SOURCE"))"
  build_s=0
  lib_ok=1
  step "moa_cuda_tests and moa_cuda_device_tests"
  tests_rc=0
  for t in moa_cuda_tests moa_cuda_device_tests; do
    timeout 300 "$prebuilt/$t"
    rc=$?
    echo "gpu_check: $t exited with $rc"
    [ "$rc" = 0 ] || tests_rc=$rc  # 77: no CUDA device seen, a skip, not a pass
  done
  bench_bin="$prebuilt/bench_cuda"
  lm_bin="$prebuilt/bench_cuda_lm"
else

step "configure (Release, CUDA architectures $arch)"
configured=0
mkdir -p "$build"
if grep -qs 'add_subdirectory(cuda)' tests/CMakeLists.txt; then
  if timeout 120 cmake -S . -B "$build" "${extra_cmake_args[@]}" -DCMAKE_BUILD_TYPE=Release -DMOA_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" \
      -DMOA_BUILD_EXAMPLES=OFF -DMOA_BUILD_BENCH=OFF -DMOA_HEADER_COMPILE=OFF -DMOA_PACKAGE_TESTS=OFF >"$build/configure.log" 2>&1; then
    configured=1
  else
    echo "gpu_check: the moa tree did not configure here (see $build/configure.log); using the wrapper project"
  fi
fi
if [ "$configured" = 0 ]; then
  wrapper="$build/wrapper-src"
  mkdir -p "$wrapper"
  cat >"$wrapper/CMakeLists.txt" <<CML
cmake_minimum_required(VERSION 3.25)
project(moa_gpu_check LANGUAGES CXX)
enable_testing()
set(PROJECT_SOURCE_DIR "$root")
# The header-only library with what the machine has (moa.hpp needs nlohmann-json and zlib headers).
add_library(moa INTERFACE)
target_include_directories(moa INTERFACE "$root/include")
target_compile_features(moa INTERFACE cxx_std_20)
find_package(nlohmann_json QUIET)
if(nlohmann_json_FOUND)
  target_link_libraries(moa INTERFACE nlohmann_json::nlohmann_json)
endif()
find_package(ZLIB QUIET)
if(ZLIB_FOUND)
  target_link_libraries(moa INTERFACE ZLIB::ZLIB)
endif()
add_subdirectory("$root/tests/cuda" cuda)
CML
  timeout 120 cmake -S "$wrapper" -B "$build" "${extra_cmake_args[@]}" -DCMAKE_BUILD_TYPE=Release -DMOA_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$arch" || { echo "gpu_check: configure failed" >&2; exit 1; }
fi

step "build moa_cuda_tests, moa_cuda_device_tests, bench_cuda and bench_cuda_lm"
tb=$(date +%s)
# The kernel tests and benchmark first: they need nothing but CUDA and doctest.
timeout "$build_timeout" cmake --build "$build" -j"$jobs" --target moa_cuda_tests bench_cuda || { echo "gpu_check: build failed" >&2; exit 1; }
# The library on the GPU (needs the headers of nlohmann-json and zlib as well).
lib_ok=1
timeout "$build_timeout" cmake --build "$build" -j"$jobs" --target moa_cuda_device_tests bench_cuda_lm || {
  lib_ok=0; echo "gpu_check: moa_cuda_device_tests / bench_cuda_lm did not build here (see above)" >&2; }
build_s=$(( $(date +%s) - tb ))
if [ "$build_only" = 1 ]; then
  echo "gpu_check: built in ${build_s}s (MOA_GPU_CHECK_BUILD_ONLY=1: nothing run)"
  [ "$lib_ok" = 1 ]
  exit
fi

step "ctest -L cuda"
ctest_log="$build/ctest-cuda.log"
timeout 240 ctest --test-dir "$build" -L cuda --output-on-failure 2>&1 | tee "$ctest_log"
tests_rc=${PIPESTATUS[0]}
# A skip (exit 77: the binary saw no device) is not a pass on a machine that has a GPU.
if [ "$tests_rc" = 0 ] && grep -q 'Skipped' "$ctest_log"; then tests_rc=77; fi

bench_bin=$(find "$build" -name bench_cuda -type f -perm -u+x | head -1)
lm_bin=$(find "$build" -name bench_cuda_lm -type f -perm -u+x | head -1)
fi  # prebuilt or built here

step "bench_cuda"
bench_out=$(timeout 180 "$bench_bin" 2>&1)
bench_rc=$?
lm_out="(bench_cuda_lm not built)"
lm_rc=1
if [ "$lib_ok" = 1 ]; then
  step "bench_cuda_lm (GPT-2 124M shape, batch 16 x 512)"
  lm_out=$(timeout 240 "$lm_bin" --batch 16 --seq 512 --steps 10 2>&1)
  lm_rc=$?
fi

echo
echo "## moa GPU check ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u +%Y-%m-%d))"
echo
echo "build: ${build_s}s; cuda tests: $([ $tests_rc = 0 ] && echo passed || echo "FAILED (rc $tests_rc)");" \
     "bench: $([ $bench_rc = 0 ] && echo ok || echo "FAILED (rc $bench_rc)");" \
     "bench_cuda_lm: $([ $lm_rc = 0 ] && echo ok || echo "FAILED (rc $lm_rc)"); total $(( $(date +%s) - t0 ))s"
echo
echo "$bench_out"
echo
echo "$lm_out"
[ $tests_rc = 0 ] && [ $bench_rc = 0 ] && [ $lm_rc = 0 ]
