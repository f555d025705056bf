// CPU kernels of posterior and posterior_backward: parallel over bags, the
// arithmetic is bag_recursion.h (the same code the CUDA kernels run).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../bag_recursion.h"
#include "../checks.h"

namespace mlellp {
namespace {

// Bags per task: small bags cost ~100 ns, so tasks need many of them.
constexpr int64_t kGrainBags = 512;

std::tuple<at::Tensor, at::Tensor> posterior_cpu(const at::Tensor& logits, const at::Tensor& offsets,
                                                 const at::Tensor& counts) {
  check_bag_layout("posterior", logits, offsets, &counts);
  const int64_t num_bags = offsets.numel() - 1;
  const int64_t num_instances = logits.numel();
  check_bag_values("posterior", offsets, &counts, num_instances, at::Tensor());

  const auto off = offsets.contiguous();
  const auto cnt = counts.contiguous();
  const auto z = logits.to(compute_dtype(logits.scalar_type())).contiguous();
  auto phi = at::empty_like(z);
  auto log_lik = at::empty({num_bags}, z.options());

  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlellp_posterior_cpu", [&] {
    const scalar_t* z_ptr = z.data_ptr<scalar_t>();
    const int64_t* off_ptr = off.data_ptr<int64_t>();
    const int64_t* cnt_ptr = cnt.data_ptr<int64_t>();
    scalar_t* phi_ptr = phi.data_ptr<scalar_t>();
    scalar_t* ll_ptr = log_lik.data_ptr<scalar_t>();
    at::parallel_for(0, num_bags, kGrainBags, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> ws;  // grows to the largest bag of this task, reused
      for (int64_t b = begin; b < end; ++b) {
        const int64_t start = off_ptr[b], n = off_ptr[b + 1] - start, y = cnt_ptr[b];
        const auto need = static_cast<size_t>(detail::posterior_workspace(n, y, y));
        if (ws.size() < need) ws.resize(need);
        detail::posterior_bag<scalar_t>(z_ptr + start, n, y, y, phi_ptr + start, ll_ptr + b, ws.data());
      }
    });
  });
  return {phi.to(logits.scalar_type()), log_lik};
}

at::Tensor posterior_backward_cpu(const at::Tensor& grad_log_lik, const at::Tensor& phi, const at::Tensor& logits,
                                  const at::Tensor& offsets) {
  check_bag_layout("posterior_backward", logits, offsets, nullptr);
  const int64_t num_bags = offsets.numel() - 1;
  TORCH_CHECK_VALUE(grad_log_lik.dim() == 1 && grad_log_lik.numel() == num_bags,
                    "posterior_backward: grad_log_likelihood must have shape [", num_bags, "], got ",
                    grad_log_lik.sizes());
  TORCH_CHECK_VALUE(phi.sizes() == logits.sizes(), "posterior_backward: phi must have the shape of logits ",
                    logits.sizes(), ", got ", phi.sizes());
  const auto ct = compute_dtype(logits.scalar_type());
  const auto off = offsets.contiguous();
  const auto z = logits.to(ct).contiguous();
  const auto ph = phi.to(ct).contiguous();
  const auto g = grad_log_lik.to(ct).contiguous();
  auto grad = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES(ct, "mlellp_posterior_backward_cpu", [&] {
    const scalar_t* z_ptr = z.data_ptr<scalar_t>();
    const scalar_t* phi_ptr = ph.data_ptr<scalar_t>();
    const scalar_t* g_ptr = g.data_ptr<scalar_t>();
    const int64_t* off_ptr = off.data_ptr<int64_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    at::parallel_for(0, num_bags, kGrainBags, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t i = off_ptr[b]; i < off_ptr[b + 1]; ++i) {
          out[i] = detail::log_lik_grad(g_ptr[b], phi_ptr[i], z_ptr[i]);
        }
      }
    });
  });
  return grad.to(logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mlellp, CPU, m) {
  m.impl("posterior", &posterior_cpu);
  m.impl("posterior_backward", &posterior_backward_cpu);
}

}  // namespace mlellp
