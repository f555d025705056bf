// Schema of log_pmf. Kernels: cpu/log_pmf_cpu.cpp, cuda/log_pmf_cuda.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mlellp, m) {
  // Flat log-PMF of every bag's count: log P(S_b = k) at offsets[b] + b + k, k = 0..n_b.
  m.def("log_pmf(Tensor logits, Tensor offsets) -> Tensor");
}
