// moa/kernels/cuda/launch.cuh: the few spellings that differ between nvcc and the CPU emulator
// (tests/unit/cuda_emulator.hpp, which defines MOA_CUDA_EMULATE and its own versions first), so a
// kernel header written with them runs unchanged in both: its kernels and its launchers.
//
//   MOA_CUDA_LAUNCH(kernel, grid, block, smem, stream, args...)   kernel<<<grid, block, smem, stream>>>(args...)
//                                                                  (kernel: one name; alias a template first)
//   MOA_UNROLL                                                     #pragma unroll
//   MOA_CUDA_DYNAMIC_SMEM(name)                                    extern __shared__ unsigned char name[] (128-aligned)
#pragma once

#ifndef MOA_CUDA_EMULATE

#include <cuda_runtime.h>

#include "moa/kernels/cuda/check.cuh"

#define MOA_CUDA_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define MOA_UNROLL _Pragma("unroll")
#define MOA_CUDA_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]

#endif
