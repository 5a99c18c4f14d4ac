// examples/cuda_backend.cu: the one CUDA translation unit of the moa tool (and of the GPU benchmark
// and device tests): including <moa/cuda.cuh> compiles the CUDA kernels and registers them as the
// backend of Device::cuda at static initialisation. Everything else stays plain C++ (g++).
#include <moa/cuda.cuh>

namespace moa::cuda {
// Referenced from C++ so the linker keeps this file's registration in any link order.
bool linked() { return detail::registered || true; }
}  // namespace moa::cuda
