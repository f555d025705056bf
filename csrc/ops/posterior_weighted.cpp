// Schema of the E-step under uncertain counts. Kernels: cpu/posterior_weighted_cpu.cpp,
// cuda/posterior_weighted_cuda.cu; arithmetic: bag_recursion.h (posterior_weighted_bag).
// Autograd and fake kernels are registered from Python (mlellp_ext/ops/weighted.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mlellp, m) {
  // (phi, log_likelihood): bag b's observation has likelihood w_b(k) = P(o_b | S_b = k),
  // given as log w_b(k) at count_log_weights[offsets[b] + b + k], k = 0..n_b (log_pmf's
  // layout); phi[i] = P(h_i = 1 | o_b) and log_likelihood[b] = log sum_k w_b(k) P(S_b = k).
  m.def("posterior_weighted(Tensor logits, Tensor offsets, Tensor count_log_weights) -> (Tensor, Tensor)");
}
