// Schema of phi_jvp. Kernels: cpu/phi_jvp_cpu.cpp, cuda/phi_jvp_cuda.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mlellp, m) {
  // Jacobian of posterior's phi times tangent: out[i] = sum_j Cov(h_i, h_j | S_b = counts[b]) tangent[j]
  // over bag b of i. The Jacobian is symmetric: it serves both forward and reverse mode.
  m.def("phi_jvp(Tensor tangent, Tensor logits, Tensor offsets, Tensor counts) -> Tensor");
}
