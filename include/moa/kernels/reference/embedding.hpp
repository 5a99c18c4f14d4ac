// moa/kernels/reference/embedding.hpp: naive embedding lookup (row gather) and its backward
// (scatter-add into the table), on raw row-major buffers. The fast kernels are tested against these.
#pragma once

#include <cstdint>

namespace moa::kernels::reference {

// out[n, :] = weight[ids[n], :].  out: (N, C); ids: (N), each in [0, V) (the caller checks);
// weight: (V, C).
template <class T>
void embedding_forward(T* out, const int32_t* ids, const T* weight, int64_t N, int64_t C) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) out[n * C + c] = weight[static_cast<int64_t>(ids[n]) * C + c];
}

// dweight[ids[n], :] += dout[n, :] for every n, in order (accumulated).  dweight: (V, C); dout: (N, C).
template <class T>
void embedding_backward(T* dweight, const T* dout, const int32_t* ids, int64_t N, int64_t C) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) dweight[static_cast<int64_t>(ids[n]) * C + c] += dout[n * C + c];
}

}  // namespace moa::kernels::reference
