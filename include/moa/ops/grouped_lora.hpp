// moa/ops/grouped_lora.hpp: the segmented (grouped) LoRA product that serves many experts in one
// batch, as Punica's SGMV: rows are grouped by expert and each expert's two thin products run once
// for all its rows, never as a loop over samples.
//
//   delta[n] = scale * sum over assignments j with rows[j] = n of  w_j * B_e (A_e x[n]),  e = experts[j]
//
// x: (N, In); A_e: (R_e, In); B_e: (Out, R_e); rows, experts: M assignments; weights (M) or none
// (all 1). MoA gives every row one expert with weight 1; token-level MoE-LoRA gives each row its
// top-k experts with gate weights (which then get gradients). Experts without rows get no gradient.
#pragma once

#include <algorithm>
#include <vector>

#include "moa/autograd/grad_mode.hpp"
#include "moa/autograd/node.hpp"
#include "moa/core/tensor.hpp"
#include "moa/kernels/cpu/gemm.hpp"
#include "moa/ops/matmul.hpp"

namespace moa {

namespace detail {

// Assignment indices grouped by expert (stable): order[begin[e] .. begin[e + 1]).
struct ExpertGroups {
  std::vector<int64_t> order;
  std::vector<int64_t> begin;
};

inline ExpertGroups group_by_expert(const std::vector<int32_t>& experts, int64_t E) {
  ExpertGroups g;
  g.begin.assign(static_cast<std::size_t>(E + 1), 0);
  for (int32_t e : experts) ++g.begin[static_cast<std::size_t>(e) + 1];
  for (int64_t e = 0; e < E; ++e) g.begin[e + 1] += g.begin[e];
  g.order.resize(experts.size());
  std::vector<int64_t> fill(g.begin.begin(), g.begin.end() - 1);
  for (std::size_t j = 0; j < experts.size(); ++j) g.order[static_cast<std::size_t>(fill[experts[j]]++)] = static_cast<int64_t>(j);
  return g;
}

// The op's inputs in the order of its gradients: x, weights, A_0..A_{E-1}, B_0..B_{E-1}.
inline std::vector<Tensor> grouped_inputs(const Tensor& x, const Tensor& w, const std::vector<Tensor>& A,
                                          const std::vector<Tensor>& B) {
  std::vector<Tensor> inputs{x, w};
  inputs.insert(inputs.end(), A.begin(), A.end());
  inputs.insert(inputs.end(), B.begin(), B.end());
  return inputs;
}

inline std::vector<Tensor> detached(const std::vector<Tensor>& ts) {
  std::vector<Tensor> out;
  for (const Tensor& t : ts) out.push_back(t.detach());
  return out;
}

// The device copies of one grouping: the assignments' rows in expert order, the segment offsets
// and the order itself (int32 on the device), plus the host offsets the backward needs.
struct DeviceGrouping {
  Tensor rows, seg, order;
  std::vector<int64_t> begin;
  bool unique = true;  // no row has two assignments (then the kernels need no atomics)
};

inline DeviceGrouping upload_grouping(const std::vector<int32_t>& rows, const ExpertGroups& groups, int64_t N,
                                      Device dev) {
  const auto M = static_cast<int64_t>(rows.size());
  std::vector<int32_t> rows_g(static_cast<std::size_t>(M)), order(static_cast<std::size_t>(M)), seg;
  std::vector<char> seen(static_cast<std::size_t>(N), 0);
  DeviceGrouping d;
  for (int64_t j = 0; j < M; ++j) {
    order[j] = static_cast<int32_t>(groups.order[j]);
    rows_g[j] = rows[groups.order[j]];
    d.unique = d.unique && !seen[rows_g[j]];
    seen[rows_g[j]] = 1;
  }
  for (int64_t b : groups.begin) seg.push_back(static_cast<int32_t>(b));
  d.rows = Tensor::from_vector(rows_g).to(dev);
  d.seg = Tensor::from_vector(seg).to(dev);
  d.order = Tensor::from_vector(order).to(dev);
  d.begin = groups.begin;
  return d;
}

}  // namespace detail

// Keeps the device copies of recent groupings, so grouped_lora calls with the same rows, experts
// and expert count on the same device upload them once: the adapted linears of one MoA layer share
// one routing (q, k, v, o, ... : one upload instead of one per linear). Holds at most `capacity`
// groupings (device memory) until cleared or destroyed; the least recently used goes first.
class GroupingCache {
 public:
  explicit GroupingCache(std::size_t capacity = 2) : capacity_(capacity < 1 ? 1 : capacity) {}

  const detail::DeviceGrouping& get(const std::vector<int32_t>& rows, const std::vector<int32_t>& experts, int64_t E,
                                    int64_t N, Device dev) {
    for (std::size_t i = 0; i < entries_.size(); ++i) {
      const Entry& e = entries_[i];
      if (e.dev == dev && e.E == E && e.N == N && e.rows == rows && e.experts == experts) {
        ++hits_;
        std::rotate(entries_.begin() + static_cast<std::ptrdiff_t>(i),
                    entries_.begin() + static_cast<std::ptrdiff_t>(i) + 1, entries_.end());  // most recent last
        return entries_.back().grouping;
      }
    }
    if (entries_.size() == capacity_) entries_.erase(entries_.begin());
    entries_.push_back({dev, E, N, rows, experts,
                        detail::upload_grouping(rows, detail::group_by_expert(experts, E), N, dev)});
    return entries_.back().grouping;
  }

  void clear() { entries_.clear(); }
  std::size_t size() const { return entries_.size(); }
  int64_t hits() const { return hits_; }  // calls served without an upload

 private:
  struct Entry {
    Device dev;
    int64_t E = 0, N = 0;
    std::vector<int32_t> rows, experts;
    detail::DeviceGrouping grouping;
  };
  std::size_t capacity_;
  std::vector<Entry> entries_;
  int64_t hits_ = 0;
};

namespace detail {

// The linear x W^T + b that grouped_lora_linear's product is added onto: formed inside the op, so
// its weight and bias are the op's last inputs and x gets one gradient (g W, the experts' part
// accumulated onto it).
struct GroupedLinear {
  Tensor weight, bias;  // weight undefined: none
  bool defined() const { return weight.defined(); }
};

// The linear part's gradients: dW = g^T x and db = sum of g's rows into r[first] and r[first + 1],
// and the input gradient's first part g W (N, In), returned (undefined when x needs none).
inline Tensor grouped_linear_grads(const GroupedLinear& lin, const Tensor& g2, const Tensor& xd,
                                   const std::vector<char>& needs, std::size_t first, std::vector<Tensor>& r) {
  if (needs[first]) r[first] = matmul_forward(g2.transpose(0, 1), xd);  // (Out, In)
  if (needs[first + 1]) r[first + 1] = sum(g2, {0});                    // (Out)
  return needs[0] ? matmul_forward(g2, lin.weight) : Tensor();          // (N, In)
}

// The output the product is added onto: zeros (N, Out), or base's values in base's shape (its own
// memory when handed over and held alone, else a copy).
inline Tensor grouped_out(const Tensor& base, bool reuse, int64_t N, int64_t Out, DType dt, Device dev) {
  if (!base.defined()) return Tensor::zeros({N, Out}, dt, dev);
  NoGradGuard no_grad;
  return take_or_clone(base, reuse);
}

// The device path: one segmented product for all experts (DeviceBackend::grouped_lora_*), with the
// assignments sorted by expert on the host and uploaded with the segment offsets (once per routing
// with a GroupingCache).
inline Tensor grouped_lora_device(const Tensor& x, const std::vector<Tensor>& A, const std::vector<Tensor>& B,
                                  const DeviceGrouping& grouping, const Tensor& weights, double scale,
                                  const Tensor& base, bool reuse_base, const GroupedLinear& lin) {
  check_device_f32(x, "grouped_lora");
  const Device dev = x.device();
  const int64_t E = static_cast<int64_t>(A.size()), N = x.size(0), In = x.size(1), Out = B[0].size(0);
  const int64_t R = A[0].size(0), M = grouping.rows.numel();
  for (int64_t e = 0; e < E; ++e) {
    MOA_CHECK(A[e].size(0) == R, ShapeError, "grouped_lora: on ", dev.str(), " every expert needs one rank, got ", R,
              " and ", A[e].size(0), " (expert ", e, ")");
    MOA_CHECK(A[e].device() == dev && B[e].device() == dev, DeviceError, "grouped_lora: expert ", e,
              " is not on ", dev.str());
  }
  const Tensor rows_d = grouping.rows, seg_d = grouping.seg, order_d = grouping.order;
  const bool unique = grouping.unique;
  const Tensor xc = x.contiguous();
  Tensor wg;  // weights in grouped order
  if (weights.defined() && M > 0) {
    NoGradGuard no_grad;
    MOA_CHECK(weights.device() == dev, DeviceError, "grouped_lora: expected weights on ", dev.str());
    const Tensor wc = weights.contiguous();
    wg = Tensor::empty({M}, DType::f32, dev);
    backend(dev).take(wg.data<float>(), wc.data<float>(), order_d.data<int32_t>(), M);
  }
  std::vector<Tensor> Ac, Bc;
  std::vector<const float*> pA, pB;
  for (int64_t e = 0; e < E; ++e) {
    Ac.push_back(A[e].contiguous());
    Bc.push_back(B[e].contiguous());
    pA.push_back(Ac.back().data<float>());
    pB.push_back(Bc.back().data<float>());
  }
  const GroupedLoRADims dims{N, M, E, In, Out, R};
  Tensor out = grouped_out(base, reuse_base, N, Out, DType::f32, dev);
  Tensor h = Tensor::empty({M, R}, DType::f32, dev);
  if (M > 0)
    backend(dev).grouped_lora_forward(out.data<float>(), h.data<float>(), xc.data<float>(), pA, pB,
                                      rows_d.data<int32_t>(), seg_d.data<int32_t>(),
                                      wg.defined() ? wg.data<float>() : nullptr, static_cast<float>(scale), dims, unique);
  const bool has_base = base.defined() && !lin.defined();
  std::vector<Tensor> inputs = grouped_inputs(x, weights, A, B);
  if (has_base) inputs.push_back(base);
  if (lin.defined()) inputs.insert(inputs.end(), {lin.weight, lin.bias});
  if (autograd::needs_graph(inputs)) {
    const std::vector<Tensor> Ad = detached(Ac), Bd = detached(Bc);
    const GroupedLinear lind{lin.defined() ? lin.weight.detach().contiguous() : Tensor(), Tensor()};
    autograd::record(lin.defined() ? "grouped_lora_linear" : "grouped_lora", out, inputs,
                     [xd = xc.detach(), wg, h, Ad, Bd, rows_d, seg_d, order_d, begin = grouping.begin, scale, dims,
                      unique, has_base, lind, n = inputs.size()](const Tensor& g, const std::vector<char>& needs) {
                       const int64_t E = dims.E, M = dims.M;
                       const Device dev = g.device();
                       std::vector<Tensor> r(n);
                       if (has_base && needs[2 + 2 * E]) r[2 + 2 * E] = g;  // d(base + product) / d base
                       if (needs[1]) r[1] = Tensor::zeros({M}, DType::f32, dev);
                       const Tensor g2 = g.contiguous().view({dims.N, dims.Out});
                       // With the linear part, dx starts as g W and the experts' part is accumulated onto it.
                       if (lind.defined()) r[0] = grouped_linear_grads(lind, g2, xd, needs, n - 2, r);
                       if (M == 0) {
                         if (needs[0] && !lind.defined()) r[0] = Tensor::zeros({dims.N, dims.In}, DType::f32, dev);
                         return r;
                       }
                       // dx, dA and dB are written by the backend (GroupedLoRADims::write_grads), not zeroed here
                       // and added into: no fill per expert and none of the full-size dx when every row has one
                       // assignment.
                       if (needs[0] && !lind.defined()) r[0] = Tensor::empty({dims.N, dims.In}, DType::f32, dev);
                       std::vector<float*> dA(static_cast<std::size_t>(E), nullptr),
                           dB(static_cast<std::size_t>(E), nullptr);
                       std::vector<const float*> pA, pB;
                       for (int64_t e = 0; e < E; ++e) {
                         pA.push_back(Ad[e].data<float>());
                         pB.push_back(Bd[e].data<float>());
                         if (begin[e + 1] == begin[e]) continue;  // no rows: no gradient for this expert
                         if (needs[2 + e]) {
                           r[2 + e] = Tensor::empty(Ad[e].shape(), DType::f32, dev);
                           dA[e] = r[2 + e].data<float>();
                         }
                         if (needs[2 + E + e]) {
                           r[2 + E + e] = Tensor::empty(Bd[e].shape(), DType::f32, dev);
                           dB[e] = r[2 + E + e].data<float>();
                         }
                       }
                       GroupedLoRADims written = dims;
                       written.write_grads = true;
                       written.add_dx = lind.defined();
                       Tensor dh = Tensor::empty({M, dims.R}, DType::f32, dev);
                       Tensor dwg = needs[1] ? Tensor::empty({M}, DType::f32, dev) : Tensor();
                       backend(dev).grouped_lora_backward(
                           needs[0] ? r[0].data<float>() : nullptr, dA, dB, dwg.defined() ? dwg.data<float>() : nullptr,
                           dh.data<float>(), g2.data<float>(), xd.data<float>(), h.data<float>(), pA, pB,
                           rows_d.data<int32_t>(), seg_d.data<int32_t>(), wg.defined() ? wg.data<float>() : nullptr,
                           static_cast<float>(scale), written, unique);
                       if (dwg.defined())  // back to the caller's order: dw[order[j]] = dwg[j]
                         backend(dev).put_add(r[1].data<float>(), order_d.data<int32_t>(), dwg.data<float>(), M);
                       return r;
                     });
  }
  return out;
}

}  // namespace detail

namespace detail {

inline Tensor grouped_lora(const Tensor& x, const std::vector<Tensor>& A, const std::vector<Tensor>& B,
                           const std::vector<int32_t>& rows, const std::vector<int32_t>& experts, const Tensor& weights,
                           double scale, GroupingCache* cache, const Tensor& base, bool reuse_base,
                           const GroupedLinear& lin = {}) {
  const int64_t E = static_cast<int64_t>(A.size());
  MOA_CHECK(E >= 1 && B.size() == A.size(), ValueError, "grouped_lora: expected at least one expert and as many B as A, got ",
            A.size(), " A and ", B.size(), " B");
  MOA_CHECK(x.dim() == 2 && is_floating(x.dtype()), ShapeError, "grouped_lora: expected x (N, In) floating, got ",
            shape_str(x.shape()), " ", dtype_name(x.dtype()));
  const int64_t N = x.size(0), In = x.size(1), Out = B[0].dim() == 2 ? B[0].size(0) : -1;
  for (int64_t e = 0; e < E; ++e) {
    MOA_CHECK(A[e].dim() == 2 && A[e].size(1) == In && A[e].dtype() == x.dtype(), ShapeError, "grouped_lora: expert ", e,
              " expected A (R, ", In, ") of dtype ", dtype_name(x.dtype()), ", got ", shape_str(A[e].shape()));
    MOA_CHECK(B[e].dim() == 2 && B[e].size(0) == Out && B[e].size(1) == A[e].size(0) && B[e].dtype() == x.dtype(),
              ShapeError, "grouped_lora: expert ", e, " expected B (", Out, ", ", A[e].size(0), "), got ",
              shape_str(B[e].shape()));
  }
  const int64_t M = static_cast<int64_t>(rows.size());
  MOA_CHECK(experts.size() == rows.size(), ShapeError, "grouped_lora: expected one expert per assignment, got ",
            rows.size(), " rows and ", experts.size(), " experts");
  for (int64_t j = 0; j < M; ++j) {
    MOA_CHECK(rows[j] >= 0 && rows[j] < N, IndexError, "grouped_lora: assignment ", j, " names row ", rows[j],
              ", outside [0, ", N, ")");
    MOA_CHECK(experts[j] >= 0 && experts[j] < E, IndexError, "grouped_lora: assignment ", j, " names expert ",
              experts[j], ", outside [0, ", E, ")");
  }
  if (weights.defined())
    MOA_CHECK(weights.dim() == 1 && weights.size(0) == M && weights.dtype() == x.dtype(), ShapeError,
              "grouped_lora: expected weights (", M, "), got ", shape_str(weights.shape()));
  if (base.defined()) {
    MOA_CHECK(base.dim() >= 1 && base.shape().back() == Out && base.numel() == N * Out && base.dtype() == x.dtype(),
              ShapeError, "grouped_lora_add: expected base (..., ", Out, ") with ", N, " rows of dtype ",
              dtype_name(x.dtype()), ", got ", shape_str(base.shape()), " ", dtype_name(base.dtype()));
    MOA_CHECK(base.device() == x.device(), DeviceError, "grouped_lora_add: expected base on ", x.device().str(),
              ", got ", base.device().str());
  }

  if (on_device(x)) {
    if (cache)
      return detail::grouped_lora_device(x, A, B, cache->get(rows, experts, E, N, x.device()), weights, scale, base,
                                         reuse_base, lin);
    return detail::grouped_lora_device(
        x, A, B, detail::upload_grouping(rows, detail::group_by_expert(experts, E), N, x.device()), weights, scale,
        base, reuse_base, lin);
  }
  const detail::ExpertGroups groups = detail::group_by_expert(experts, E);
  const Tensor xc = x.contiguous();
  const Tensor wc = weights.defined() ? weights.contiguous() : Tensor();
  std::vector<Tensor> Ac, Bc, H(static_cast<std::size_t>(E));
  for (int64_t e = 0; e < E; ++e) {
    Ac.push_back(A[e].contiguous());
    Bc.push_back(B[e].contiguous());
  }
  Tensor out = detail::grouped_out(base, reuse_base, N, Out, x.dtype(), x.device());
  detail::dispatch_float(x.dtype(), "grouped_lora", [&]<class T>() {
    const T* px = xc.data<T>();
    T* po = out.data<T>();
    const T* pw = wc.defined() ? wc.data<T>() : nullptr;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t b = groups.begin[e], m = groups.begin[e + 1] - b, R = Ac[e].size(0);
      if (m == 0) continue;
      Tensor Xe = Tensor::empty({m, In}, x.dtype());          // (m, In) gathered rows
      T* pX = Xe.data<T>();
      for (int64_t i = 0; i < m; ++i) {
        const T* src = px + rows[groups.order[b + i]] * In;
        std::copy(src, src + In, pX + i * In);
      }
      H[e] = Tensor::empty({m, R}, x.dtype());                 // (m, R) = Xe A^T
      kernels::cpu::gemm<T>(false, true, m, R, In, T(1), pX, In, Ac[e].data<T>(), In, T(0), H[e].data<T>(), R);
      Tensor Ye = Tensor::empty({m, Out}, x.dtype());          // (m, Out) = H B^T
      kernels::cpu::gemm<T>(false, true, m, Out, R, T(1), H[e].data<T>(), R, Bc[e].data<T>(), R, T(0), Ye.data<T>(), Out);
      const T* pY = Ye.data<T>();
      for (int64_t i = 0; i < m; ++i) {
        const int64_t j = groups.order[b + i];
        const T s = static_cast<T>(scale) * (pw ? pw[j] : T(1));
        T* dst = po + rows[j] * Out;
        for (int64_t o = 0; o < Out; ++o) dst[o] += s * pY[i * Out + o];
      }
    }
  });

  const bool has_base = base.defined() && !lin.defined();
  std::vector<Tensor> inputs = detail::grouped_inputs(x, weights, A, B);
  if (has_base) inputs.push_back(base);
  if (lin.defined()) inputs.insert(inputs.end(), {lin.weight, lin.bias});
  if (autograd::needs_graph(inputs)) {
    const std::vector<Tensor> Ad = detail::detached(Ac), Bd = detail::detached(Bc);
    const detail::GroupedLinear lind{lin.defined() ? lin.weight.detach().contiguous() : Tensor(), Tensor()};
    autograd::record(
        lin.defined() ? "grouped_lora_linear" : "grouped_lora", out, inputs,
        [xd = xc.detach(), wd = wc.defined() ? wc.detach() : Tensor(), Ad, Bd, H, groups, rows, scale, E, N, In, Out,
         has_base, lind, n = inputs.size()](const Tensor& g_in, const std::vector<char>& needs) {
          std::vector<Tensor> r(n);
          const Tensor g = g_in.contiguous().view({N, Out});
          if (has_base && needs[2 + 2 * E]) r[2 + 2 * E] = g_in;  // d(base + product) / d base
          const bool need_x = needs[0], need_w = needs[1];
          // With the linear part, dx starts as g W and the experts' part is accumulated onto it.
          if (lind.defined()) r[0] = detail::grouped_linear_grads(lind, g, xd, needs, n - 2, r);
          if (need_x && !lind.defined()) r[0] = Tensor::zeros({N, In}, g.dtype());
          if (need_w) r[1] = Tensor::zeros({static_cast<int64_t>(rows.size())}, g.dtype());
          detail::dispatch_float(g.dtype(), "grouped_lora", [&]<class T>() {
            const T* pg = g.data<T>();
            const T* px = xd.data<T>();
            const T* pw = wd.defined() ? wd.data<T>() : nullptr;
            for (int64_t e = 0; e < E; ++e) {
              const int64_t b = groups.begin[e], m = groups.begin[e + 1] - b, R = Ad[e].size(0);
              if (m == 0) continue;  // no rows: no gradient for this expert
              Tensor Ge = Tensor::empty({m, Out}, g.dtype());  // (m, Out) scaled output gradients
              T* pG = Ge.data<T>();
              for (int64_t i = 0; i < m; ++i) {
                const int64_t j = groups.order[b + i];
                const T s = static_cast<T>(scale) * (pw ? pw[j] : T(1));
                const T* src = pg + rows[j] * Out;
                for (int64_t o = 0; o < Out; ++o) pG[i * Out + o] = s * src[o];
              }
              const T* pH = H[e].data<T>();
              if (need_w) {  // dw_j = scale * <g[row_j], B H_j>
                Tensor Ye = Tensor::empty({m, Out}, g.dtype());
                kernels::cpu::gemm<T>(false, true, m, Out, R, T(1), pH, R, Bd[e].data<T>(), R, T(0), Ye.data<T>(), Out);
                T* pdw = r[1].data<T>();
                const T* pY = Ye.data<T>();
                for (int64_t i = 0; i < m; ++i) {
                  const int64_t j = groups.order[b + i];
                  const T* src = pg + rows[j] * Out;
                  T acc = 0;
                  for (int64_t o = 0; o < Out; ++o) acc += src[o] * pY[i * Out + o];
                  pdw[j] += static_cast<T>(scale) * acc;
                }
              }
              if (needs[2 + E + e]) {  // dB = Ge^T H  (Out, R)
                r[2 + E + e] = Tensor::empty({Out, R}, g.dtype());
                kernels::cpu::gemm<T>(true, false, Out, R, m, T(1), pG, Out, pH, R, T(0), r[2 + E + e].data<T>(), R);
              }
              if (!needs[2 + e] && !need_x) continue;
              Tensor dH = Tensor::empty({m, R}, g.dtype());  // (m, R) = Ge B
              kernels::cpu::gemm<T>(false, false, m, R, Out, T(1), pG, Out, Bd[e].data<T>(), R, T(0), dH.data<T>(), R);
              if (needs[2 + e]) {  // dA = dH^T Xe  (R, In)
                Tensor Xe = Tensor::empty({m, In}, g.dtype());
                T* pX = Xe.data<T>();
                for (int64_t i = 0; i < m; ++i) {
                  const T* src = px + rows[groups.order[b + i]] * In;
                  std::copy(src, src + In, pX + i * In);
                }
                r[2 + e] = Tensor::empty({R, In}, g.dtype());
                kernels::cpu::gemm<T>(true, false, R, In, m, T(1), dH.data<T>(), R, pX, In, T(0), r[2 + e].data<T>(), In);
              }
              if (need_x) {  // dx[row] += dH A
                Tensor dXe = Tensor::empty({m, In}, g.dtype());
                kernels::cpu::gemm<T>(false, false, m, In, R, T(1), dH.data<T>(), R, Ad[e].data<T>(), In, T(0),
                                      dXe.data<T>(), In);
                T* pdx = r[0].data<T>();
                const T* pdX = dXe.data<T>();
                for (int64_t i = 0; i < m; ++i) {
                  T* dst = pdx + rows[groups.order[b + i]] * In;
                  for (int64_t k = 0; k < In; ++k) dst[k] += pdX[i * In + k];
                }
              }
            }
          });
          return r;
        });
  }
  return out;
}

}  // namespace detail

// cache (optional): on a device, reuse the uploaded grouping of an earlier call with the same rows
// and experts (see GroupingCache); ignored on the cpu.
inline Tensor grouped_lora(const Tensor& x, const std::vector<Tensor>& A, const std::vector<Tensor>& B,
                           const std::vector<int32_t>& rows, const std::vector<int32_t>& experts, const Tensor& weights,
                           double scale, GroupingCache* cache = nullptr) {
  return detail::grouped_lora(x, A, B, rows, experts, weights, scale, cache, Tensor(), false);
}

// base + grouped_lora(x, ...) in base's shape (..., Out), N rows: the product added onto a copy of
// base, with no zero-filled buffer and no separate add. Given base as an rvalue, onto base's own
// memory when nothing else holds it (an adapter's base output: no copy at all).
inline Tensor grouped_lora_add(const Tensor& base, const Tensor& x, const std::vector<Tensor>& A,
                               const std::vector<Tensor>& B, const std::vector<int32_t>& rows,
                               const std::vector<int32_t>& experts, const Tensor& weights, double scale,
                               GroupingCache* cache = nullptr) {
  MOA_CHECK(base.defined(), ValueError, "grouped_lora_add: expected a defined base");
  return detail::grouped_lora(x, A, B, rows, experts, weights, scale, cache, base, false);
}
inline Tensor grouped_lora_add(Tensor&& base, const Tensor& x, const std::vector<Tensor>& A,
                               const std::vector<Tensor>& B, const std::vector<int32_t>& rows,
                               const std::vector<int32_t>& experts, const Tensor& weights, double scale,
                               GroupingCache* cache = nullptr) {
  MOA_CHECK(base.defined(), ValueError, "grouped_lora_add: expected a defined base");
  return detail::grouped_lora(x, A, B, rows, experts, weights, scale, cache, base, true);
}

// The adapted layer linear(x, weight, bias) + grouped_lora(x, ...) as one op: the experts' product
// is added onto the linear's output in its memory, and x gets one gradient, g W with the experts'
// part accumulated onto it by the backend (where grouped_lora_add would leave the engine two (N, In)
// gradients to add). x (..., In) with N rows, weight (Out, In), bias (Out) or undefined
// -> (..., Out). rows, experts, weights, scale and cache as for grouped_lora.
inline Tensor grouped_lora_linear(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                  const std::vector<Tensor>& A, const std::vector<Tensor>& B,
                                  const std::vector<int32_t>& rows, const std::vector<int32_t>& experts,
                                  const Tensor& weights, double scale, GroupingCache* cache = nullptr) {
  MOA_CHECK(x.defined() && weight.defined(), ValueError, "grouped_lora_linear: expected defined x and weight");
  MOA_CHECK(weight.dim() == 2, ShapeError, "grouped_lora_linear: expected weight (Out, In), got ",
            shape_str(weight.shape()));
  for (std::size_t e = 0; e < B.size(); ++e)
    MOA_CHECK(B[e].dim() == 2 && B[e].size(0) == weight.size(0), ShapeError, "grouped_lora_linear: expected expert ", e,
              "'s B (", weight.size(0), ", R) for weight ", shape_str(weight.shape()), ", got ",
              shape_str(B[e].shape()));
  Tensor base;
  {
    NoGradGuard no_grad;
    base = linear(x, weight, bias);  // checks x, weight and bias
  }
  return detail::grouped_lora(x.reshape({-1, weight.size(1)}), A, B, rows, experts, weights, scale, cache, base, true,
                              detail::GroupedLinear{weight, bias});
}

}  // namespace moa
