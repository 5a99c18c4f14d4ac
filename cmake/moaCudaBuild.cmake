# cmake/moaCudaBuild.cmake: the CUDA parts of this build (not of the installed package, whose
# moa::cuda target is defined in the top-level CMakeLists.txt): the option MOA_CUDA, the CUDA
# language, and moa_cuda_flags, the nvcc flags and libraries for the .cu files we compile (the CUDA
# tests, benchmarks and the backend translation unit of the moa tool).
#
# MOA_CUDA defaults to ON where CMake finds both nvcc and the CUDA toolkit; CPU-only machines need
# neither. Where it is ON, CI compiles and links every CUDA test and benchmark (a build failure in
# CUDA code fails CI) and runs `ctest -LE cuda`. Included once (guarded), from the top level or from
# tests/cuda/CMakeLists.txt when that folder is built on its own (bench/gpu_check.sh's wrapper).
if(TARGET moa_cuda_flags OR DEFINED _moa_cuda_build_done)
  return()
endif()
set(_moa_cuda_build_done ON)

include(CheckLanguage)
check_language(CUDA)
find_package(CUDAToolkit QUIET)
if(CMAKE_CUDA_COMPILER AND CUDAToolkit_FOUND)
  set(_moa_cuda_default ON)
else()
  set(_moa_cuda_default OFF)
endif()
option(MOA_CUDA "Build the CUDA backend into the moa tool, and the CUDA tests and benchmarks (needs nvcc and the CUDA toolkit)" ${_moa_cuda_default})

if(NOT MOA_CUDA)
  message(STATUS "moa: CUDA off (MOA_CUDA=OFF or no CUDA compiler/toolkit): the moa tool is CPU-only")
  return()
endif()
if(NOT CMAKE_CUDA_COMPILER OR NOT CUDAToolkit_FOUND)
  message(FATAL_ERROR "MOA_CUDA is ON but CMake found no CUDA compiler or toolkit")
endif()

# Compute capability 9.0 (H100/H200) unless the user chose (-DCMAKE_CUDA_ARCHITECTURES=80;90).
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES 90 CACHE STRING "CUDA architectures for moa's CUDA code")
endif()
enable_language(CUDA)

# CMake 3.25 cannot give nvcc C++20 through CUDA_STANDARD: pass -std=c++20 ourselves (targets using
# these flags set CUDA_STANDARD_REQUIRED OFF so the C++20 feature of moa::moa does not fail them).
add_library(moa_cuda_flags INTERFACE)
target_compile_options(moa_cuda_flags INTERFACE
  $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20 --expt-relaxed-constexpr -Xcompiler=-Wall>)
target_link_libraries(moa_cuda_flags INTERFACE CUDA::cudart CUDA::cublas CUDA::cublasLt)

# The backend translation unit, compiled once: link moa_cuda_backend into any program of this build
# whose tensors go to Device::cuda (it registers the CUDA kernels at start-up).
add_library(moa_cuda_backend OBJECT ${CMAKE_CURRENT_LIST_DIR}/../examples/cuda_backend.cu)
target_include_directories(moa_cuda_backend PRIVATE ${CMAKE_CURRENT_LIST_DIR}/../include)
target_link_libraries(moa_cuda_backend PUBLIC moa_cuda_flags)
set_target_properties(moa_cuda_backend PROPERTIES CUDA_STANDARD_REQUIRED OFF)
