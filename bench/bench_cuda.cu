// bench/bench_cuda.cu: GPU throughput of the CUDA kernels, timed with cudaEvents (no Google
// Benchmark), printed as a Markdown table. Run by bench/gpu_check.sh on a GPU machine.
//   sgemm 4096^3 (float32, cuBLAS, no TF32)          TFLOP/s
//   bf16 GEMM 4096^3 (bf16 in, float32 accumulate)    TFLOP/s
//   grouped LoRA forward and backward, 8192 x 768, rank 16, 4 experts      GB/s (x, y, g, dx traffic)
//   causal attention forward and backward, B 4, H 12, T 512, D 64          TFLOP/s (causal FLOPs)
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "moa/kernels/cuda/allocator.cuh"
#include "moa/kernels/cuda/attention.cuh"
#include "moa/kernels/cuda/check.cuh"
#include "moa/kernels/cuda/elementwise.cuh"
#include "moa/kernels/cuda/gemm.cuh"
#include "moa/kernels/cuda/grouped_lora.cuh"

namespace kc = moa::kernels::cuda;

namespace {

kc::DeviceBuffer<float> random_buffer(std::size_t n, unsigned seed) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(-1.f, 1.f);
  std::vector<float> h(n);
  for (float& x : h) x = d(g);
  kc::DeviceBuffer<float> b(n);
  b.copy_from_host(h.data(), n);
  return b;
}

// Median-free simple timer: warm-up runs, then the mean of `iters` runs, in milliseconds.
double time_ms(const std::function<void()>& f, int warmup = 3, int iters = 20) {
  for (int i = 0; i < warmup; ++i) f();
  cudaEvent_t a, b;
  MOA_CUDA_CHECK(cudaEventCreate(&a));
  MOA_CUDA_CHECK(cudaEventCreate(&b));
  MOA_CUDA_CHECK(cudaEventRecord(a));
  for (int i = 0; i < iters; ++i) f();
  MOA_CUDA_CHECK(cudaEventRecord(b));
  MOA_CUDA_CHECK(cudaEventSynchronize(b));
  float ms = 0.f;
  MOA_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  MOA_CUDA_CHECK(cudaEventDestroy(a));
  MOA_CUDA_CHECK(cudaEventDestroy(b));
  return ms / iters;
}

void row(const std::string& what, double ms, double value, const char* unit) {
  std::printf("| %-58s | %9.3f | %9.1f %-7s |\n", what.c_str(), ms, value, unit);
}

}  // namespace

int main() {
  int dev = 0;
  if (cudaGetDeviceCount(&dev) != cudaSuccess || dev == 0) {
    std::printf("bench_cuda: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  MOA_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, compute capability %d.%d\n\n", prop.name, prop.multiProcessorCount, prop.major,
              prop.minor);
  std::printf("| %-58s | %9s | %17s |\n", "kernel", "ms", "throughput");
  std::printf("|%s|%s|%s|\n", std::string(60, '-').c_str(), std::string(11, '-').c_str(),
              std::string(19, '-').c_str());

  {  // GEMMs at 4096^3
    const int64_t n = 4096;
    auto A = random_buffer(n * n, 1), B = random_buffer(n * n, 2);
    kc::DeviceBuffer<float> C(n * n);
    const double flops = 2.0 * n * n * n;
    double ms = time_ms([&] { kc::gemm_f32(false, false, n, n, n, 1.f, A.data(), n, B.data(), n, 0.f, C.data(), n); });
    row("sgemm 4096^3 (float32, cuBLAS)", ms, flops / ms * 1e-9, "TFLOP/s");
    kc::DeviceBuffer<__nv_bfloat16> Ah(n * n), Bh(n * n);
    kc::f32_to_bf16(Ah.data(), A.data(), n * n);
    kc::f32_to_bf16(Bh.data(), B.data(), n * n);
    ms = time_ms([&] {
      kc::gemm_bf16_f32(false, false, n, n, n, 1.f, Ah.data(), n, Bh.data(), n, 0.f, C.data(), n);
    });
    row("GEMM 4096^3 (bf16 in, float32 accumulate and out)", ms, flops / ms * 1e-9, "TFLOP/s");
  }

  {  // grouped LoRA: 8192 rows x 768, rank 16, 4 experts of 2048 rows each
    const int64_t N = 8192, In = 768, Out = 768, R = 16, E = 4;
    auto x = random_buffer(N * In, 3), y = random_buffer(N * Out, 4), g = random_buffer(N * Out, 5);
    kc::DeviceBuffer<float> dx(N * In), h(N * R), dh(N * R);
    std::vector<kc::DeviceBuffer<float>> As, Bs, dAs, dBs;
    std::vector<const float*> pA, pB;
    std::vector<float*> pdA, pdB;
    for (int64_t e = 0; e < E; ++e) {
      As.push_back(random_buffer(R * In, 10 + e));
      Bs.push_back(random_buffer(Out * R, 20 + e));
      dAs.emplace_back(R * In);
      dBs.emplace_back(Out * R);
      pA.push_back(As.back().data());
      pB.push_back(Bs.back().data());
      pdA.push_back(dAs.back().data());
      pdB.push_back(dBs.back().data());
    }
    std::vector<int32_t> rows(N), seg(E + 1);
    std::mt19937 gen(7);
    for (int64_t n = 0; n < N; ++n) rows[n] = static_cast<int32_t>(n);
    std::shuffle(rows.begin(), rows.end(), gen);  // rows of an expert scattered over the batch
    for (int64_t e = 0; e <= E; ++e) seg[e] = static_cast<int32_t>(e * N / E);
    kc::DeviceBuffer<const float*> dpA(E), dpB(E);
    kc::DeviceBuffer<float*> dpdA(E), dpdB(E);
    dpA.copy_from_host(pA.data(), E);
    dpB.copy_from_host(pB.data(), E);
    dpdA.copy_from_host(pdA.data(), E);
    dpdB.copy_from_host(pdB.data(), E);
    kc::DeviceBuffer<int32_t> drows(N), dseg(E + 1);
    drows.copy_from_host(rows.data(), N);
    dseg.copy_from_host(seg.data(), E + 1);
    const kc::GroupedLoRAShape s{.N = N, .M = N, .E = E, .In = In, .Out = Out, .R = R};
    double ms = time_ms([&] {
      kc::grouped_lora_forward(y.data(), h.data(), x.data(), dpA.data(), dpB.data(), drows.data(), dseg.data(),
                               nullptr, 2.f, s);
    });
    // Compulsory traffic: read x, read and write y (the adapters and h are small).
    double bytes = 4.0 * (N * In + 2.0 * N * Out);
    row("grouped LoRA forward, 8192 x 768, r 16, 4 experts", ms, bytes / ms * 1e-6, "GB/s");
    ms = time_ms([&] {
      kc::grouped_lora_backward(dx.data(), dpdA.data(), dpdB.data(), nullptr, dh.data(), g.data(), x.data(), h.data(),
                                dpA.data(), dpB.data(), drows.data(), dseg.data(), nullptr, 2.f, s);
    });
    // Read g twice (dh, dB), x once (dA), read and write dx.
    bytes = 4.0 * (2.0 * N * Out + N * In + 2.0 * N * In);
    row("grouped LoRA backward (dx, dA, dB)", ms, bytes / ms * 1e-6, "GB/s");
  }

  {  // causal attention, GPT-2 small heads
    const kc::AttentionShape s{.B = 4, .Hq = 12, .Hkv = 12, .Tq = 512, .Tk = 512, .D = 64};
    const int64_t nq = s.B * s.Hq * s.Tq * s.D, nl = s.B * s.Hq * s.Tq;
    auto q = random_buffer(nq, 30), k = random_buffer(nq, 31), v = random_buffer(nq, 32), g = random_buffer(nq, 33);
    kc::DeviceBuffer<float> out(nq), lse(nl), dq(nq), dk(nq), dv(nq), delta(nl);
    const float scale = 0.125f;
    // Causal: half of the 2 * 2 * T^2 * D multiply-adds per head (QK^T and PV).
    const double flops = 4.0 * s.B * s.Hq * s.Tq * s.Tk * s.D / 2.0;
    double ms = time_ms([&] { kc::attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), s, scale); },
                        2, 5);
    row("attention forward, B 4 H 12 T 512 D 64 (float32)", ms, flops / ms * 1e-9, "TFLOP/s");
    ms = time_ms([&] {
      kc::attention_backward(dq.data(), dk.data(), dv.data(), delta.data(), g.data(), q.data(), k.data(), v.data(),
                             out.data(), lse.data(), s, scale);
    }, 2, 5);
    row("attention backward (2.5x the forward's FLOPs)", ms, 2.5 * flops / ms * 1e-9, "TFLOP/s");
    // The tensor-core kernels (MatmulPrecision::bf16): same shape, same FLOP count.
    ms = time_ms([&] {
      kc::flash_attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), s, scale);
    }, 2, 10);
    row("flash attention forward, same shape (bf16 tensor cores)", ms, flops / ms * 1e-9, "TFLOP/s");
    ms = time_ms(
        [&] {
          kc::attention_delta(delta.data(), g.data(), out.data(), s);
          kc::flash_attention_backward(dq.data(), dk.data(), dv.data(), delta.data(), g.data(), q.data(), k.data(),
                                       v.data(), lse.data(), s, scale);
        },
        2, 10);
    row("flash attention backward (dq; dk, dv; delta)", ms, 2.5 * flops / ms * 1e-9, "TFLOP/s");
  }
  const kc::AllocatorStats st = kc::CachingAllocator::global().stats();
  std::printf("\nallocator: %lld cudaMalloc calls, %.1f MiB peak in use\n", static_cast<long long>(st.malloc_count),
              st.peak_bytes_in_use / 1048576.0);
  return 0;
}
