// tests/cuda/test_cuda_ops.cu (the CUDA kernels against the reference kernels, and its main) on the
// CPU emulator: the same file the GPU runs, compiled by the host compiler.
#include "../cuda_emulator.hpp"
// after the emulator
#include "../../cuda/test_cuda_ops.cu"
