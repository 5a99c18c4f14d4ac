// moa/core/profile.hpp: where a device's time goes. ProfilingBackend wraps a device kind's backend
// and times every kernel call: it waits for the device before and after each one, so each entry is
// that call's own device time plus one synchronisation (a few microseconds on a GPU; the profiled
// run is slower than a plain one, the split between the entries is what it is for). Products are
// keyed by shape and precision and also report their rate; everything else by method name.
//
//   {
//     moa::DeviceProfile profile(moa::Device::cuda());   // every cuda call goes through it now
//     run_one_step();
//     std::fputs(profile.report(15).c_str(), stdout);     // the 15 largest entries, a Markdown table
//   }                                                     // the backend is the plain one again
//
// Memory calls (allocate, release, copies) are forwarded, not timed; uploads and downloads show in
// the gaps between entries (report() says how much of the wall time the entries cover). Copies and
// explicit synchronisations are counted (transfers()): on a GPU every download waits for all the
// work queued before it, so a step's downloads are the points where the host stops running ahead.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "moa/core/backend.hpp"
#include "moa/core/error.hpp"

namespace moa {

class ProfilingBackend final : public DeviceBackend {
 public:
  struct Entry {
    std::string name;
    int64_t calls = 0;
    double seconds = 0;
    double flops = 0;  // products only
  };
  // Copies between host and device and within a device, and explicit synchronize() calls.
  struct Transfers {
    int64_t uploads = 0, upload_bytes = 0;             // copy_to_device
    int64_t downloads = 0, download_bytes = 0;         // copy_to_host, sum_squares_all: each waits
    int64_t device_copies = 0, device_copy_bytes = 0;  // copy_device
    int64_t synchronizes = 0;                          // synchronize()
  };

  ProfilingBackend(DeviceBackend& inner, int device) : inner_(inner), device_(device) {}

  // Entries, the largest total time first.
  std::vector<Entry> entries() const {
    std::vector<Entry> out;
    for (const auto& [name, e] : entries_) out.push_back(e);
    std::sort(out.begin(), out.end(), [](const Entry& a, const Entry& b) { return a.seconds > b.seconds; });
    return out;
  }
  double total_seconds() const {
    double t = 0;
    for (const auto& [name, e] : entries_) t += e.seconds;
    return t;
  }
  const Transfers& transfers() const { return transfers_; }
  void reset() {
    entries_.clear();
    transfers_ = {};
  }

  std::string name() const override { return inner_.name(); }
  int device_count() const override { return inner_.device_count(); }
  void synchronize(int device) override {
    ++transfers_.synchronizes;
    inner_.synchronize(device);
  }
  void* allocate(std::size_t nbytes, int device) override { return inner_.allocate(nbytes, device); }
  DeviceBackend& memory_backend() override { return inner_.memory_backend(); }
  void release(void* p, std::size_t nbytes, int device) noexcept override { inner_.release(p, nbytes, device); }
  void empty_cache(int device) override { inner_.empty_cache(device); }
  std::int64_t device_malloc_count(int device) const override { return inner_.device_malloc_count(device); }
  void copy_to_device(void* dst, const void* src, std::size_t n, int device) override {
    ++transfers_.uploads;
    transfers_.upload_bytes += static_cast<int64_t>(n);
    inner_.copy_to_device(dst, src, n, device);
  }
  void copy_to_host(void* dst, const void* src, std::size_t n, int device) override {
    ++transfers_.downloads;
    transfers_.download_bytes += static_cast<int64_t>(n);
    inner_.copy_to_host(dst, src, n, device);
  }
  void copy_device(void* dst, const void* src, std::size_t n, int device) override {
    ++transfers_.device_copies;
    transfers_.device_copy_bytes += static_cast<int64_t>(n);
    inner_.copy_device(dst, src, n, device);
  }

  void fill(DType t, void* dst, const Shape& shape, const Strides& strides, double value) override {
    timed("fill", [&] { inner_.fill(t, dst, shape, strides, value); });
  }
  void copy_strided(DType dst_t, void* dst, const Strides& dst_strides, DType src_t, const void* src,
                    const Strides& src_strides, const Shape& shape) override {
    timed("copy_strided", [&] { inner_.copy_strided(dst_t, dst, dst_strides, src_t, src, src_strides, shape); });
  }
  void take(float* out, const float* x, const int32_t* offsets, int64_t n) override {
    timed("take", [&] { inner_.take(out, x, offsets, n); });
  }
  void put_add(float* out, const int32_t* offsets, const float* src, int64_t n) override {
    timed("put_add", [&] { inner_.put_add(out, offsets, src, n); });
  }
  void binary(BinaryOp op, float* out, const Shape& shape, const float* a, const Strides& as, const float* b,
              const Strides& bs) override {
    timed("binary", [&] { inner_.binary(op, out, shape, a, as, b, bs); });
  }
  void unary(UnaryOp op, double p, float* y, const float* x, int64_t n) override {
    timed("unary", [&] { inner_.unary(op, p, y, x, n); });
  }
  void unary_backward(UnaryOp op, double p, float* gx, const float* g, const float* x, const float* y,
                      int64_t n) override {
    timed("unary_backward", [&] { inner_.unary_backward(op, p, gx, g, x, y, n); });
  }
  void swiglu_forward(float* y, const float* g, const float* u, int64_t n) override {
    timed("swiglu_forward", [&] { inner_.swiglu_forward(y, g, u, n); });
  }
  void swiglu_backward(float* dg, float* du, const float* dy, const float* g, const float* u, int64_t n) override {
    timed("swiglu_backward", [&] { inner_.swiglu_backward(dg, du, dy, g, u, n); });
  }
  void sum_rows(float* out, const float* x, int64_t rows, int64_t cols, double scale) override {
    timed("sum_rows", [&] { inner_.sum_rows(out, x, rows, cols, scale); });
  }
  double sum_squares_all(const std::vector<std::pair<const float*, int64_t>>& buffers) override {
    ++transfers_.downloads;  // its value comes back to the host: a wait, like a download
    transfers_.download_bytes += static_cast<int64_t>(sizeof(double));
    double r = 0;
    timed("sum_squares_all", [&] { r = inner_.sum_squares_all(buffers); });
    return r;
  }
  static const char* precision_name(MatmulPrecision p) {
    static const char* const names[] = {"f32", "tf32", "bf16"};
    return names[static_cast<int>(p) % 3];
  }
  void gemm(bool ta, bool tb, int64_t batch, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
            int64_t sa, const float* B, int64_t ldb, int64_t sb, float beta, float* C, int64_t ldc, int64_t sc,
            MatmulPrecision precision) override {
    const std::string key =
        detail::cat("gemm ", precision_name(precision), " ", batch > 1 ? detail::cat(batch, "x ") : "", M, "x", N, "x",
                    K, ta ? " A^T" : "", tb ? " B^T" : "");
    timed(key, [&] { inner_.gemm(ta, tb, batch, M, N, K, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, precision); },
          2.0 * double(batch) * double(M) * double(N) * double(K));
  }
  void gemm_bias(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, const float* bias, float* C, int64_t ldc, MatmulPrecision precision) override {
    const std::string key = detail::cat("gemm+bias ", precision_name(precision), " ", M, "x", N, "x", K,
                                        ta ? " A^T" : "", tb ? " B^T" : "");
    timed(
        key, [&] { inner_.gemm_bias(ta, tb, M, N, K, A, lda, B, ldb, bias, C, ldc, precision); },
        2.0 * double(M) * double(N) * double(K));
  }
  void softmax_forward(bool log, float* y, const float* x, int64_t N, int64_t C) override {
    timed("softmax_forward", [&] { inner_.softmax_forward(log, y, x, N, C); });
  }
  void softmax_backward(bool log, float* dx, const float* dy, const float* y, int64_t N, int64_t C) override {
    timed("softmax_backward", [&] { inner_.softmax_backward(log, dx, dy, y, N, C); });
  }
  void cross_entropy_forward(float* loss, float* lse, const float* logits, const int32_t* targets, int64_t N,
                             int64_t V, int32_t ignore) override {
    timed("cross_entropy_forward", [&] { inner_.cross_entropy_forward(loss, lse, logits, targets, N, V, ignore); });
  }
  void cross_entropy_rows(float* loss_rows, float* dlogits, const float* logits, const int32_t* targets, int64_t N,
                          int64_t V, int32_t ignore, float scale) override {
    timed("cross_entropy_rows",
          [&] { inner_.cross_entropy_rows(loss_rows, dlogits, logits, targets, N, V, ignore, scale); });
  }
  void cross_entropy_backward(float* dlogits, const float* dloss, const float* logits, const float* lse,
                              const int32_t* targets, int64_t N, int64_t V, int32_t ignore) override {
    timed("cross_entropy_backward",
          [&] { inner_.cross_entropy_backward(dlogits, dloss, logits, lse, targets, N, V, ignore); });
  }
  void layer_norm_forward(float* out, float* mean, float* rstd, const float* x, const float* w, const float* b,
                          int64_t N, int64_t C, float eps) override {
    timed("layer_norm_forward", [&] { inner_.layer_norm_forward(out, mean, rstd, x, w, b, N, C, eps); });
  }
  void layer_norm_backward(float* dx, float* dw, float* db, const float* dout, const float* x, const float* w,
                           const float* mean, const float* rstd, int64_t N, int64_t C) override {
    timed("layer_norm_backward", [&] { inner_.layer_norm_backward(dx, dw, db, dout, x, w, mean, rstd, N, C); });
  }
  void rms_norm_forward(float* out, float* rstd, const float* x, const float* w, int64_t N, int64_t C,
                        float eps) override {
    timed("rms_norm_forward", [&] { inner_.rms_norm_forward(out, rstd, x, w, N, C, eps); });
  }
  void rms_norm_backward(float* dx, float* dw, const float* dout, const float* x, const float* w, const float* rstd,
                         int64_t N, int64_t C) override {
    timed("rms_norm_backward", [&] { inner_.rms_norm_backward(dx, dw, dout, x, w, rstd, N, C); });
  }
  void embedding_forward(float* out, const int32_t* ids, const float* w, int64_t N, int64_t C) override {
    timed("embedding_forward", [&] { inner_.embedding_forward(out, ids, w, N, C); });
  }
  void embedding_backward(float* dw, const float* dout, const int32_t* ids, int64_t N, int64_t C) override {
    timed("embedding_backward", [&] { inner_.embedding_backward(dw, dout, ids, N, C); });
  }
  void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                         const AttentionDims& d, float scale) override {
    timed("attention_forward", [&] { inner_.attention_forward(out, lse, q, k, v, d, scale); },
          4.0 * double(d.B * d.Hq) * double(d.Tq) * double(d.Tk) * double(d.D) / 2);
  }
  void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                          const float* v, const float* out, const float* lse, const AttentionDims& d,
                          float scale) override {
    timed("attention_backward", [&] { inner_.attention_backward(dq, dk, dv, dout, q, k, v, out, lse, d, scale); },
          2.5 * 4.0 * double(d.B * d.Hq) * double(d.Tq) * double(d.Tk) * double(d.D) / 2);
  }
  void rope_heads(float* y, const HeadLayout& yl, const float* x, const HeadLayout& xl, int64_t B, int64_t H, int64_t T,
                  int64_t D, int64_t start, double theta, int sign) override {
    timed("rope", [&] { inner_.rope_heads(y, yl, x, xl, B, H, T, D, start, theta, sign); });
  }
  void adamw_step(float* w, float* m, float* v, const float* g, int64_t n, double lr, double b1, double b2,
                  double eps, double wd, int64_t step) override {
    timed("adamw_step", [&] { inner_.adamw_step(w, m, v, g, n, lr, b1, b2, eps, wd, step); });
  }
  void adamw_step_all(const std::vector<AdamWBuffers>& params, double lr, double b1, double b2, double eps, double wd,
                      int64_t step) override {
    timed("adamw_step_all", [&] { inner_.adamw_step_all(params, lr, b1, b2, eps, wd, step); });
  }
  void scale_all(const std::vector<std::pair<float*, int64_t>>& buffers, double coef) override {
    timed("scale_all", [&] { inner_.scale_all(buffers, coef); });
  }
  void grouped_lora_forward(float* y, float* h, const float* x, const std::vector<const float*>& A,
                            const std::vector<const float*>& B, const int32_t* rows, const int32_t* seg,
                            const float* w, float scale, const GroupedLoRADims& d, bool unique) override {
    timed("grouped_lora_forward",
          [&] { inner_.grouped_lora_forward(y, h, x, A, B, rows, seg, w, scale, d, unique); });
  }
  void grouped_lora_backward(float* dx, const std::vector<float*>& dA, const std::vector<float*>& dB, float* dw,
                             float* dh, const float* g, const float* x, const float* h,
                             const std::vector<const float*>& A, const std::vector<const float*>& B,
                             const int32_t* rows, const int32_t* seg, const float* w, float scale,
                             const GroupedLoRADims& d, bool unique) override {
    timed("grouped_lora_backward",
          [&] { inner_.grouped_lora_backward(dx, dA, dB, dw, dh, g, x, h, A, B, rows, seg, w, scale, d, unique); });
  }

 private:
  template <class F>
  void timed(const std::string& key, F&& call, double flops = 0) {
    inner_.synchronize(device_);  // what was queued before is not this call's
    const auto t0 = std::chrono::steady_clock::now();
    call();
    inner_.synchronize(device_);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    Entry& e = entries_[key];
    e.name = key;
    ++e.calls;
    e.seconds += s;
    e.flops += flops;
  }

  DeviceBackend& inner_;
  int device_;
  std::map<std::string, Entry> entries_;
  Transfers transfers_;
};

// While alive, every call to `device`'s kind goes through a ProfilingBackend (one device: the
// profile waits for that one). Restores the plain backend when destroyed.
class DeviceProfile {
 public:
  explicit DeviceProfile(Device device)
      : type_(device.type), inner_(&::moa::backend(device)), profiler_(*inner_, device.index),
        start_(std::chrono::steady_clock::now()) {
    MOA_CHECK(device.type != DeviceType::cpu, ValueError, "DeviceProfile: the cpu has no device backend to profile");
    inner_->synchronize(device.index);
    register_backend(type_, &profiler_);
  }
  ~DeviceProfile() { register_backend(type_, inner_); }
  DeviceProfile(const DeviceProfile&) = delete;
  DeviceProfile& operator=(const DeviceProfile&) = delete;

  const ProfilingBackend& backend() const { return profiler_; }
  std::vector<ProfilingBackend::Entry> entries() const { return profiler_.entries(); }
  const ProfilingBackend::Transfers& transfers() const { return profiler_.transfers(); }

  // A Markdown table of the `top` largest entries (ms, share of the timed total, calls, TFLOP/s of
  // the products and attention), then the rest summed, how much of the wall time since the
  // profile began (or the last reset) the timed calls cover, and the copies and synchronisations.
  std::string report(std::size_t top = 15) const {
    const auto es = profiler_.entries();
    const double total = profiler_.total_seconds();
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    std::string out = "| device call | calls | ms | share | TFLOP/s |\n|---|---:|---:|---:|---:|\n";
    char buf[256];
    double rest = 0;
    int64_t rest_calls = 0;
    for (std::size_t i = 0; i < es.size(); ++i) {
      const auto& e = es[i];
      if (i >= top) {
        rest += e.seconds;
        rest_calls += e.calls;
        continue;
      }
      const std::string rate = e.flops > 0 && e.seconds > 0 ? detail::cat(round2(e.flops / e.seconds * 1e-12)) : "";
      std::snprintf(buf, sizeof buf, "| %s | %lld | %.3f | %.1f%% | %s |\n", e.name.c_str(),
                    static_cast<long long>(e.calls), e.seconds * 1e3, total > 0 ? 100 * e.seconds / total : 0.0,
                    rate.c_str());
      out += buf;
    }
    if (rest_calls > 0) {
      std::snprintf(buf, sizeof buf, "| (%zu more) | %lld | %.3f | %.1f%% | |\n", es.size() - top,
                    static_cast<long long>(rest_calls), rest * 1e3, total > 0 ? 100 * rest / total : 0.0);
      out += buf;
    }
    std::snprintf(buf, sizeof buf, "\ntimed device calls: %.3f ms of %.3f ms wall (%.0f%%)\n", total * 1e3, wall * 1e3,
                  wall > 0 ? 100 * total / wall : 0.0);
    out += buf;
    const auto& t = profiler_.transfers();
    std::snprintf(buf, sizeof buf,
                  "copies: %lld uploads (%lld B), %lld downloads (%lld B; each waits for the device), %lld on the "
                  "device (%lld B); %lld explicit synchronizations\n",
                  static_cast<long long>(t.uploads), static_cast<long long>(t.upload_bytes),
                  static_cast<long long>(t.downloads), static_cast<long long>(t.download_bytes),
                  static_cast<long long>(t.device_copies), static_cast<long long>(t.device_copy_bytes),
                  static_cast<long long>(t.synchronizes));
    out += buf;
    return out;
  }

  void reset() {
    profiler_.reset();
    start_ = std::chrono::steady_clock::now();
  }

 private:
  static double round2(double x) { return static_cast<double>(static_cast<long long>(x * 100 + 0.5)) / 100; }

  DeviceType type_;
  DeviceBackend* inner_;
  ProfilingBackend profiler_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace moa
