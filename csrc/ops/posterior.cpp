// Schema of the E-step ops. Kernels: cpu/posterior_cpu.cpp, cuda/posterior_cuda.cu.
// Autograd and fake (meta) kernels are registered from Python (mlellp_ext/ops/binary.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mlellp, m) {
  // (phi, log_likelihood): phi[i] = P(h_i = 1 | S_b = counts[b]),
  // log_likelihood[b] = log P(S_b = counts[b]).
  m.def("posterior(Tensor logits, Tensor offsets, Tensor counts) -> (Tensor, Tensor)");
  // Gradient of log_likelihood w.r.t. logits: grad[b] * (phi[i] - sigmoid(logits[i])).
  m.def("posterior_backward(Tensor grad_log_likelihood, Tensor phi, Tensor logits, Tensor offsets) -> Tensor");
}
