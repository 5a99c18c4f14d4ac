// moa/autograd/engine.hpp: reverse-mode backward over the dynamic graph.
//
// The graph is walked iteratively (no recursion: a 100,000-op chain is fine), in reverse creation
// order, each node once, after all its consumers have contributed to its gradient.
#pragma once

#include <queue>
#include <unordered_map>
#include <utility>
#include <vector>

#include "moa/autograd/grad_mode.hpp"
#include "moa/autograd/node.hpp"
#include "moa/core/tensor_class.hpp"

namespace moa::autograd {

namespace detail {

// out = a + g elementwise (all contiguous, same shape and dtype); out may be a (in place).
inline void add_to(Tensor& out, const Tensor& a, const Tensor& g) {
  if (on_device(out)) {
    const Strides st = out.strides();
    if (out.numel() > 0)
      backend(out.device()).binary(BinaryOp::add, out.data<float>(), out.shape(), a.data<float>(), st, g.data<float>(), st);
    return;
  }
  ::moa::detail::dispatch_float(out.dtype(), "backward", [&]<class T>() {
    T* o = out.data<T>();
    const T* x = a.data<T>();
    const T* y = g.data<T>();
    const int64_t n = out.numel();
    ::moa::detail::parallel_for(n, 1, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) o[i] = x[i] + y[i];
    });
  });
}

// acc += g elementwise (both contiguous, same shape and dtype), in place.
inline void add_into(Tensor& acc, const Tensor& g) { add_to(acc, acc, g); }

// Whether the engine may keep g as a gradient and add into it in place (else it copies first): a
// copy saved on a transformer's residual stream and every leaf, once a step.
inline bool sole_owner(const Tensor& g) { return ::moa::detail::holds_memory_alone(g); }

// A gradient as an owned contiguous tensor of `shape` (copies when it might alias another).
inline Tensor owned_copy(const Tensor& g) {
  Tensor out = Tensor::empty(g.shape(), g.dtype(), g.device());
  out.copy_(g);
  return out;
}

inline void check_grad(const Node& n, std::size_t i, const Tensor& g) {
  const Edge& e = n.edges[i];
  MOA_CHECK(g.shape() == e.shape, AutogradError, "backward of '", n.name, "': expected a gradient of shape ",
            shape_str(e.shape), " for input ", i, ", got ", shape_str(g.shape()));
  MOA_CHECK(g.dtype() == e.dtype, AutogradError, "backward of '", n.name, "': expected a gradient of dtype ",
            dtype_name(e.dtype), " for input ", i, ", got ", dtype_name(g.dtype()));
}

inline void accumulate_leaf(::moa::detail::TensorImpl& leaf, const Tensor& g) {
  if (!leaf.grad) {
    leaf.grad = sole_owner(g) ? g.impl_ptr() : owned_copy(g).impl_ptr();
  } else {
    Tensor acc(leaf.grad);
    Tensor gc = g.is_contiguous() ? g : owned_copy(g);
    add_into(acc, gc);
  }
}

}  // namespace detail

inline void run_backward(const Tensor& root, const Tensor& root_grad, bool retain_graph) {
  struct Retaining {  // retaining_graph() for the backward functions, restored however this ends
    bool before = retaining_graph_slot();
    ~Retaining() { retaining_graph_slot() = before; }
  } retaining;
  retaining_graph_slot() = retain_graph;
  MOA_CHECK(root.requires_grad(), AutogradError,
            "backward: the tensor does not require grad (no input of the ops that made it has requires_grad set)");
  Tensor g0 = root_grad;
  if (!g0.defined()) {
    MOA_CHECK(root.numel() == 1, AutogradError,
              "backward: expected a scalar (one element) when no gradient is given, got shape ",
              shape_str(root.shape()));
    g0 = Tensor::ones(root.shape(), root.dtype(), root.device());
  } else {
    MOA_CHECK(g0.shape() == root.shape(), ShapeError, "backward: expected a gradient of shape ",
              shape_str(root.shape()), ", got ", shape_str(g0.shape()));
    MOA_CHECK(g0.dtype() == root.dtype(), ValueError, "backward: expected a gradient of dtype ",
              dtype_name(root.dtype()), ", got ", dtype_name(g0.dtype()));
    MOA_CHECK(g0.device() == root.device(), DeviceError, "backward: expected a gradient on ", root.device().str(),
              " (where the tensor is), got one on ", g0.device().str());
  }
  NoGradGuard no_grad;
  if (!root.grad_fn()) {  // a leaf
    detail::accumulate_leaf(root.impl(), g0);
    return;
  }

  // Count, for every node reachable from the root, how many edges lead into it.
  std::unordered_map<Node*, int> pending;
  {
    std::vector<Node*> stack{root.grad_fn().get()};
    pending[root.grad_fn().get()] = 0;
    while (!stack.empty()) {
      Node* n = stack.back();
      stack.pop_back();
      for (std::size_t i = 0; i < n->edges.size(); ++i) {
        Node* child = n->edges[i].node.get();
        if (!child || !n->needs[i]) continue;
        auto [it, inserted] = pending.try_emplace(child, 0);
        ++it->second;
        if (inserted) stack.push_back(child);
      }
    }
  }

  // Ready nodes run latest-created first, which makes the order (and float sums) deterministic.
  auto later_first = [](Node* a, Node* b) { return a->sequence < b->sequence; };
  std::priority_queue<Node*, std::vector<Node*>, decltype(later_first)> ready(later_first);
  std::unordered_map<Node*, Tensor> grads;
  grads[root.grad_fn().get()] = g0;
  ready.push(root.grad_fn().get());
  std::vector<Node*> done;
  done.reserve(pending.size());

  while (!ready.empty()) {
    Node* n = ready.top();
    ready.pop();
    MOA_CHECK(!n->released && n->fn, AutogradError, "backward: the graph through '", n->name,
              "' was already freed by an earlier backward(); pass retain_graph = true to the first "
              "backward() to go through it twice");
    auto found = grads.find(n);
    if (found == grads.end()) {
      // No consumer sent this node a gradient (an op may return none for an input it did not
      // use, e.g. an expert that got no rows): nothing flows further, but its inputs' counts drop.
      done.push_back(n);
      for (std::size_t i = 0; i < n->edges.size(); ++i)
        if (n->needs[i] && n->edges[i].node && --pending[n->edges[i].node.get()] == 0) ready.push(n->edges[i].node.get());
      continue;
    }
    Tensor g = std::move(found->second);
    grads.erase(found);
    if (!g.is_contiguous() && !n->strided_grad) g = detail::owned_copy(g);
    std::vector<Tensor> in_grads = n->fn(g, n->needs);
    g = Tensor();  // an input gradient that is g itself (or a view of it) is then owned by in_grads alone
    MOA_CHECK(in_grads.size() == n->edges.size(), AutogradError, "backward of '", n->name, "': expected ",
              n->edges.size(), " input gradients, got ", in_grads.size());
    done.push_back(n);
    for (std::size_t i = 0; i < n->edges.size(); ++i) {
      if (!n->needs[i]) continue;
      const Edge& e = n->edges[i];
      if (!in_grads[i].defined()) {  // no gradient for this input (see above)
        if (e.node && --pending[e.node.get()] == 0) ready.push(e.node.get());
        continue;
      }
      detail::check_grad(*n, i, in_grads[i]);
      if (e.node) {
        Node* child = e.node.get();
        auto it = grads.find(child);
        if (it == grads.end()) {
          grads.emplace(child, std::move(in_grads[i]));
        } else {
          Tensor gi = in_grads[i].is_contiguous() ? in_grads[i] : detail::owned_copy(in_grads[i]);
          if (detail::sole_owner(it->second)) {
            detail::add_into(it->second, gi);
          } else {  // out of place: the stored gradient may alias another node's
            const Tensor a = it->second.is_contiguous() ? it->second : detail::owned_copy(it->second);
            Tensor sum = Tensor::empty(a.shape(), a.dtype(), a.device());
            detail::add_to(sum, a, gi);
            it->second = std::move(sum);
          }
        }
        if (--pending[child] == 0) ready.push(child);
      } else if (e.leaf) {
        detail::accumulate_leaf(*e.leaf, in_grads[i]);
      }
    }
  }
  if (!retain_graph)
    for (Node* n : done) n->release();
}

}  // namespace moa::autograd

namespace moa {

inline void Tensor::backward(const Tensor& grad, bool retain_graph) const {
  autograd::run_backward(*this, grad, retain_graph);
}

// Free-function spelling: moa::backward(loss).
inline void backward(const Tensor& root, const Tensor& grad = Tensor(), bool retain_graph = false) {
  autograd::run_backward(root, grad, retain_graph);
}

}  // namespace moa
