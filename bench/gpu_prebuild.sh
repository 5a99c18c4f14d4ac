#!/usr/bin/env bash
# bench/gpu_prebuild.sh: builds the GPU check's four binaries (moa_cuda_tests, moa_cuda_device_tests,
# bench_cuda, bench_cuda_lm) here, where nvcc compiles for the GPU without one, into .gpu-prebuilt/
# (ignored by git) with SOURCE, a hash of the source they were built from. Carried to the GPU machine
# with .gpu-deps/, bench/gpu_check.sh runs them instead of building when the hash still matches.
#
#   bash bench/gpu_deps.sh && bash bench/gpu_prebuild.sh     (here: about 5 minutes on 2 cores)
#   then on the GPU machine: bash bench/gpu_check.sh          (carry .gpu-deps and .gpu-prebuilt)
#
#   bash bench/gpu_prebuild.sh --source-hash                  prints the hash of the current source
set -euo pipefail
cd "$(dirname "$0")/.."

# Every source file the four binaries are built from (also present in the device's copy of the tree).
# The CUDA architecture is part of it: binaries for another one do not match.
source_hash() {
  { echo "arch ${MOA_CUDA_ARCH:-90}"
    find include tests bench examples cmake CMakeLists.txt -type f \
      \( -name '*.hpp' -o -name '*.cuh' -o -name '*.cu' -o -name '*.cpp' -o -name '*.h' -o -name 'CMakeLists.txt' \
         -o -name '*.cmake' -o -name '*.in' \) -print0 | LC_ALL=C sort -z | xargs -0 sha1sum
  } | sha1sum | cut -c1-16
}
if [ "${1:-}" = --source-hash ]; then
  source_hash
  exit
fi

build=build-gpu-prebuild
hash=$(source_hash)  # before building: an edit made during the build leaves the binaries unmatched
# As on a bare GPU machine: only .gpu-deps/ and the CUDA toolkit, not this machine's /usr packages.
MOA_GPU_CHECK_BUILD_ONLY=1 MOA_GPU_BUILD_TIMEOUT=${MOA_GPU_BUILD_TIMEOUT:-1800} MOA_GPU_CMAKE_ARGS="${MOA_GPU_CMAKE_ARGS:--DCMAKE_SYSTEM_IGNORE_PREFIX_PATH=/usr}" \
  bash bench/gpu_check.sh "$build"
rm -rf .gpu-prebuilt
mkdir -p .gpu-prebuilt
for t in moa_cuda_tests moa_cuda_device_tests bench_cuda bench_cuda_lm; do
  # the newest, should the folder hold both a wrapper-project and a full-tree build
  bin=$(find "$build" -name "$t" -type f -perm -u+x -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2-)
  [ -n "$bin" ] || { echo "gpu_prebuild: $t was not built" >&2; exit 1; }
  cp "$bin" .gpu-prebuilt/
done
echo "$hash" >.gpu-prebuilt/SOURCE
ls -l .gpu-prebuilt
echo "gpu_prebuild: built from source $(cat .gpu-prebuilt/SOURCE)"
