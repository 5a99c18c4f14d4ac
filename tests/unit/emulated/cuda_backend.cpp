// tests/cuda/test_cuda_backend.cu (every DeviceBackend method of the CUDA backend against the
// reference kernels) on the CPU emulator: the same file the GPU runs, compiled by the host compiler.
#include "../cuda_emulator.hpp"
// after the emulator
#include "../../cuda/test_cuda_backend.cu"
