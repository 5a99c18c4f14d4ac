// moa/kernels/cuda/launch.cuh: the few spellings that differ between nvcc and the CPU emulator
// (tests/unit/cuda_emulator.hpp, which defines MOA_CUDA_EMULATE and its own versions first), so a
// kernel header written with them runs unchanged in both: its kernels and its launchers.
//
//   MOA_CUDA_LAUNCH(kernel, grid, block, smem, stream, args...)   kernel<<<grid, block, smem, stream>>>(args...)
//                                                                  (kernel: one name; alias a template first)
//   MOA_UNROLL                                                     #pragma unroll
//   MOA_CUDA_DYNAMIC_SMEM(name)                                    extern __shared__ unsigned char name[] (128-aligned)
//
// (A template kernel whose arguments hold a comma goes in parentheses: MOA_CUDA_LAUNCH((k<A, B>), ...).)
// It also brings in the CUDA runtime, cuBLAS, cuBLASLt and bf16 headers; under the emulator, nothing: the
// emulator declares the part of those APIs that moa uses (memory, streams, errors, cuBLAS and cuBLASLt
// products).
#pragma once

#ifndef MOA_CUDA_EMULATE

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#define MOA_CUDA_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define MOA_UNROLL _Pragma("unroll")
#define MOA_CUDA_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]

#endif
