// Schema of the multi-class E-step. Kernels: cpu/posterior_multiclass_cpu.cpp,
// cuda/posterior_multiclass_cuda.cu; arithmetic: multiclass_recursion.h.
// Autograd and fake kernels are registered from Python (mlellp_ext/ops/multiclass.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mlellp, m) {
  // (phi, log_likelihood): with h_i ~ Categorical(softmax(logits[i])),
  // phi[i, c] = P(h_i = c | the bag's class counts are counts[b]) and
  // log_likelihood[b] = log P(counts[b]). A bag with more than max_states count
  // vectors below counts[b] (prod(counts[b] + 1)) is an error. The default,
  // 2^24 states, keeps a bag's two tables within 256 MiB.
  m.def("posterior_multiclass(Tensor logits, Tensor offsets, Tensor counts, int max_states=16777216) -> "
        "(Tensor, Tensor)");
}
