// CUDA kernels of posterior and posterior_backward. One thread per bag; the
// arithmetic is bag_recursion.h, shared with the CPU kernels, so this file
// only adds indexing, workspace placement and launches (on the current stream).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../bag_recursion.h"
#include "../checks.h"

namespace mlellp {
namespace {

constexpr int kThreads = 128;

inline unsigned int blocks_for(int64_t work) {
  return static_cast<unsigned int>((work + kThreads - 1) / kThreads);
}

template <typename T>
__global__ void posterior_kernel(const T* __restrict__ z, const int64_t* __restrict__ off,
                                 const int64_t* __restrict__ cnt, const int64_t* __restrict__ ws_off, T* ws,
                                 T* __restrict__ phi, T* __restrict__ log_lik, int64_t num_bags) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= num_bags) return;
  const int64_t start = off[b], n = off[b + 1] - start, y = cnt[b];
  detail::posterior_bag<T>(z + start, n, y, y, phi + start, log_lik + b, ws + ws_off[b]);
}

template <typename T>
__global__ void posterior_backward_kernel(const T* __restrict__ g, const T* __restrict__ phi,
                                          const T* __restrict__ z, const int64_t* __restrict__ off,
                                          T* __restrict__ grad, int64_t num_bags) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= num_bags) return;
  for (int64_t i = off[b]; i < off[b + 1]; ++i) grad[i] = detail::log_lik_grad(g[b], phi[i], z[i]);
}

std::tuple<at::Tensor, at::Tensor> posterior_cuda(const at::Tensor& logits, const at::Tensor& offsets,
                                                  const at::Tensor& counts) {
  check_bag_layout("posterior", logits, offsets, &counts);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t num_bags = offsets.numel() - 1;
  const int64_t num_instances = logits.numel();
  const auto off = offsets.contiguous();
  const auto cnt = counts.contiguous();

  // Workspace of each bag (posterior_workspace, vectorised), placed by an
  // exclusive prefix sum. Its total comes back in the validation sync.
  at::Tensor need, ws_end, total;
  if (num_bags > 0) {
    const auto n = off.slice(0, 1) - off.slice(0, 0, num_bags);
    const auto width = at::minimum(cnt, n - cnt) + 1;
    need = at::where(n > 0, 2 * n + n * width + 2 * width, at::zeros_like(n));
    ws_end = at::cumsum(need, 0);
    total = ws_end[-1];
  }
  const int64_t ws_total = check_bag_values("posterior", off, &cnt, num_instances, total);

  const auto z = logits.to(compute_dtype(logits.scalar_type())).contiguous();
  auto phi = at::empty_like(z);
  auto log_lik = at::empty({num_bags}, z.options());
  if (num_bags == 0) return {phi.to(logits.scalar_type()), log_lik};
  const auto ws_off = ws_end - need;
  auto ws = at::empty({ws_total}, z.options());

  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlellp_posterior_cuda", [&] {
    posterior_kernel<scalar_t><<<blocks_for(num_bags), kThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), cnt.data_ptr<int64_t>(), ws_off.data_ptr<int64_t>(),
        ws.data_ptr<scalar_t>(), phi.data_ptr<scalar_t>(), log_lik.data_ptr<scalar_t>(), num_bags);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {phi.to(logits.scalar_type()), log_lik};
}

at::Tensor posterior_backward_cuda(const at::Tensor& grad_log_lik, const at::Tensor& phi, const at::Tensor& logits,
                                   const at::Tensor& offsets) {
  check_bag_layout("posterior_backward", logits, offsets, nullptr);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t num_bags = offsets.numel() - 1;
  TORCH_CHECK_VALUE(grad_log_lik.dim() == 1 && grad_log_lik.numel() == num_bags,
                    "posterior_backward: grad_log_likelihood must have shape [", num_bags, "], got ",
                    grad_log_lik.sizes());
  TORCH_CHECK_VALUE(phi.sizes() == logits.sizes(), "posterior_backward: phi must have the shape of logits ",
                    logits.sizes(), ", got ", phi.sizes());
  TORCH_CHECK_VALUE(grad_log_lik.device() == logits.device() && phi.device() == logits.device(),
                    "posterior_backward: grad_log_likelihood and phi must be on ", logits.device());
  const auto ct = compute_dtype(logits.scalar_type());
  const auto off = offsets.contiguous();
  const auto z = logits.to(ct).contiguous();
  const auto ph = phi.to(ct).contiguous();
  const auto g = grad_log_lik.to(ct).contiguous();
  auto grad = at::empty_like(z);
  if (num_bags > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(ct, "mlellp_posterior_backward_cuda", [&] {
      posterior_backward_kernel<scalar_t><<<blocks_for(num_bags), kThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), ph.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), off.data_ptr<int64_t>(),
          grad.data_ptr<scalar_t>(), num_bags);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return grad.to(logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mlellp, CUDA, m) {
  m.impl("posterior", &posterior_cuda);
  m.impl("posterior_backward", &posterior_backward_cuda);
}

}  // namespace mlellp
