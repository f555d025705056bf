// CUDA kernel of log_pmf: one thread per bag, arithmetic in bag_recursion.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../log_pmf_bag.h"

namespace mlellp {
namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void log_pmf_kernel(const T* __restrict__ z, const int64_t* __restrict__ off, T* out, int64_t num_bags) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= num_bags) return;
  const int64_t start = off[b], n = off[b + 1] - start;
  detail::log_pmf_bag<T>(z + start, n, out + start + b);
}

at::Tensor log_pmf_cuda(const at::Tensor& logits, const at::Tensor& offsets) {
  check_bag_layout("log_pmf", logits, offsets, nullptr);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t num_bags = offsets.numel() - 1;
  const int64_t num_instances = logits.numel();
  const auto off = offsets.contiguous();
  check_bag_values("log_pmf", off, nullptr, num_instances, at::Tensor());
  const auto z = logits.to(compute_dtype(logits.scalar_type())).contiguous();
  auto out = at::empty({num_instances + num_bags}, z.options());
  if (num_bags == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlellp_log_pmf_cuda", [&] {
    log_pmf_kernel<scalar_t><<<static_cast<unsigned int>((num_bags + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), num_bags);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mlellp, CUDA, m) { m.impl("log_pmf", &log_pmf_cuda); }

}  // namespace mlellp
