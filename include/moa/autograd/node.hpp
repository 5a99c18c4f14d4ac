// moa/autograd/node.hpp: a node of the dynamic graph: one op's backward and edges to its inputs.
//
// Edges point at the nodes that made the inputs (or at the leaf tensors to accumulate into), never
// at intermediate tensors, so activations are freed as soon as nothing but a backward needs them.
// What a backward needs is captured (as detached tensors) in its closure and dropped on release.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "moa/autograd/grad_mode.hpp"
#include "moa/core/tensor_class.hpp"

namespace moa::autograd {

// grads_of_inputs = fn(grad_of_output, which_inputs_need_a_grad); entries for inputs that need no
// gradient may be left undefined, and so may those of inputs that received none (a leaf then
// keeps an undefined grad(), as a PyTorch parameter outside the graph keeps None).
using BackwardFn = std::function<std::vector<Tensor>(const Tensor& grad_out, const std::vector<char>& needs)>;

struct Edge {
  std::shared_ptr<Node> node;                  // the input's producer, or
  std::shared_ptr<::moa::detail::TensorImpl> leaf;    // a leaf that accumulates a gradient
  Shape shape;                                 // the input's shape (checked against the gradient)
  DType dtype = DType::f32;
};

struct Node {
  const char* name = "";
  std::vector<Edge> edges;      // one per op input
  std::vector<char> needs;      // needs[i]: input i wants a gradient
  BackwardFn fn;
  std::uint64_t sequence = 0;   // creation order: later nodes run first in backward
  bool released = false;
  // fn takes its output gradient in any layout (views: permute, narrow; attention reads strided
  // heads). Otherwise the engine hands fn a contiguous gradient, copying a strided one first.
  bool strided_grad = false;

  Node() = default;
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;

  // Drops what the backward saved; a second backward through this node then fails clearly.
  void release() {
    fn = nullptr;
    released = true;
  }

  // Tears down long chains iteratively: recursive destruction of a 100,000-op chain would
  // overflow the stack.
  ~Node() {
    std::vector<std::shared_ptr<Node>> pending;
    auto steal = [&pending](Node& n) {
      for (auto& e : n.edges)
        if (e.node && e.node.use_count() == 1) pending.push_back(std::move(e.node));
      n.edges.clear();
      n.fn = nullptr;
    };
    steal(*this);
    while (!pending.empty()) {
      std::shared_ptr<Node> n = std::move(pending.back());
      pending.pop_back();
      steal(*n);
    }
  }
};

// True while a backward(retain_graph = true) runs (set by the engine): a backward function may
// hand over what it saved (as its input gradients) only when this is false, since a retained graph
// may be gone through again.
inline bool& retaining_graph_slot() {
  thread_local bool on = false;
  return on;
}
inline bool retaining_graph() { return retaining_graph_slot(); }

inline std::uint64_t next_sequence() {
  thread_local std::uint64_t seq = 0;
  return ++seq;
}

// True when an op over `inputs` must record a node: grad mode is on and some input requires grad.
inline bool needs_graph(std::initializer_list<const Tensor*> inputs) {
  if (!is_grad_enabled()) return false;
  for (const Tensor* t : inputs)
    if (t && t->defined() && t->requires_grad()) return true;
  return false;
}
inline bool needs_graph(const std::vector<Tensor>& inputs) {
  if (!is_grad_enabled()) return false;
  for (const Tensor& t : inputs)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

// Attaches a node named `name` to `out` with edges to `inputs` (undefined inputs get no edge).
// Call only when needs_graph(...) is true. `fn` must capture tensors detached (t.detach()).
// strided_grad: fn accepts a non-contiguous output gradient (see Node::strided_grad).
inline void record(const char* name, Tensor& out, const std::vector<Tensor>& inputs, BackwardFn fn,
                   bool strided_grad = false) {
  auto node = std::make_shared<Node>();
  node->name = name;
  node->strided_grad = strided_grad;
  node->fn = std::move(fn);
  node->sequence = next_sequence();
  node->edges.resize(inputs.size());
  node->needs.assign(inputs.size(), 0);
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& t = inputs[i];
    if (!t.defined() || !t.requires_grad()) continue;
    node->needs[i] = 1;
    Edge& e = node->edges[i];
    if (t.grad_fn())
      e.node = t.grad_fn();
    else
      e.leaf = t.impl_ptr();
    e.shape = t.shape();
    e.dtype = t.dtype();
  }
  out.impl().grad_fn = std::move(node);
  out.impl().requires_grad = true;
}

}  // namespace moa::autograd
