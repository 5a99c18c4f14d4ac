#!/usr/bin/env bash
# bench/gpu_deps.sh: downloads (here, where Debian's mirrors are reachable) the header-only
# dependencies of the GPU check that a bare GPU machine lacks: doctest, nlohmann-json and zlib's
# headers, as Debian packages into .gpu-deps/ (ignored by git). Carry that folder to the GPU machine;
# bench/gpu_check.sh unpacks them into its build folder (never into /) and points CMake at them.
#
#   bash bench/gpu_deps.sh        then, on the GPU machine:   bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu-deps
cd .gpu-deps
rm -f ./*.deb
apt-get download doctest-dev nlohmann-json3-dev zlib1g-dev
ls -l
