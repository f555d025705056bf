// CPU kernel of posterior_weighted: parallel over bags, one thread per bag; the
// arithmetic is bag_recursion.h's posterior_weighted_bag (the code the CUDA kernel runs).
// (posterior's SIMD lanes and thread teams are not used: a bag's cost here
// depends on its weights' support, and these bags are typically small.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../checks.h"
#include "../posterior_weighted_bag.h"

namespace mlellp {
namespace {

std::tuple<at::Tensor, at::Tensor> posterior_weighted_cpu(const at::Tensor& logits, const at::Tensor& offsets,
                                                          const at::Tensor& count_log_weights) {
  const char* op = "posterior_weighted";
  check_weighted_layout(op, logits, offsets, count_log_weights);
  const int64_t num_bags = offsets.numel() - 1;
  check_bag_values(op, offsets, nullptr, logits.numel(), at::Tensor());
  const auto dtype = compute_dtype(logits.scalar_type());
  const auto off = offsets.contiguous();
  const auto z = logits.to(dtype).contiguous();
  const auto w = count_log_weights.to(dtype).contiguous();
  auto phi = at::empty(logits.sizes(), z.options());
  auto log_lik = at::empty({num_bags}, z.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "mlellp_posterior_weighted_cpu", [&] {
    using T = scalar_t;
    const T* z_ptr = z.data_ptr<T>();
    const T* w_ptr = w.data_ptr<T>();
    const int64_t* off_ptr = off.data_ptr<int64_t>();
    T* phi_ptr = phi.data_ptr<T>();
    T* ll_ptr = log_lik.data_ptr<T>();
    at::parallel_for(0, num_bags, 64, [&](int64_t begin, int64_t end) {
      std::vector<T> ws;  // reused across this task's bags
      detail::SoloTeam solo;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t start = off_ptr[b], n = off_ptr[b + 1] - start;
        const T* logw = w_ptr + start + b;
        int64_t ylo, yhi;
        bool bad;
        const int64_t need = detail::weight_support(logw, n, &ylo, &yhi, &bad)
                                 ? detail::weighted_workspace(n, ylo, yhi) : 0;
        if (static_cast<int64_t>(ws.size()) < need) ws.resize(static_cast<size_t>(need));
        detail::posterior_weighted_bag(solo, z_ptr + start, n, logw, phi_ptr + start, ll_ptr + b, ws.data());
      }
    });
  });
  if (phi.scalar_type() != logits.scalar_type()) phi = phi.to(logits.scalar_type());
  return {phi, log_lik};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlellp, CPU, m) { m.impl("posterior_weighted", &posterior_weighted_cpu); }

}  // namespace mlellp
