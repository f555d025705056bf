// CUDA kernel of phi_jvp: one thread per bag, arithmetic in bag_recursion.h;
// this file adds only workspace placement and the launch (on the current stream).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../phi_jvp_bag.h"

namespace mlellp {
namespace {

constexpr int kThreads = 128;

unsigned int blocks_for(int64_t num_bags) { return static_cast<unsigned int>((num_bags + kThreads - 1) / kThreads); }

// Workspace of each bag, from the function the CPU uses (invalid counts get 0;
// no launch happens for them).
__global__ void phi_jvp_workspace_kernel(const int64_t* __restrict__ off, const int64_t* __restrict__ cnt,
                                         int64_t* __restrict__ need, int64_t num_bags) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= num_bags) return;
  const int64_t n = off[b + 1] - off[b], y = cnt[b];
  need[b] = (n >= 0 && y >= 0 && y <= n) ? detail::phi_jvp_workspace(n, y) : 0;
}

template <typename T>
__global__ void phi_jvp_kernel(const T* __restrict__ u, const T* __restrict__ z, const int64_t* __restrict__ off,
                               const int64_t* __restrict__ cnt, const int64_t* __restrict__ ws_off, T* ws,
                               T* __restrict__ out, int64_t num_bags) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= num_bags) return;
  const int64_t start = off[b], n = off[b + 1] - start;
  detail::phi_jvp_bag(z + start, u + start, n, cnt[b], out + start, ws + ws_off[b]);
}

at::Tensor phi_jvp_cuda(const at::Tensor& tangent, const at::Tensor& logits, const at::Tensor& offsets,
                        const at::Tensor& counts) {
  check_phi_jvp_layout("phi_jvp", tangent, logits, offsets, counts);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t num_bags = offsets.numel() - 1;
  const int64_t num_instances = logits.numel();
  const auto off = offsets.contiguous();
  const auto cnt = counts.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  // Each bag's workspace is placed by a prefix sum; the total comes back in the validation sync.
  at::Tensor need = at::zeros({num_bags}, off.options());
  at::Tensor ws_end, total;
  if (num_bags > 0) {
    phi_jvp_workspace_kernel<<<blocks_for(num_bags), kThreads, 0, stream>>>(
        off.data_ptr<int64_t>(), cnt.data_ptr<int64_t>(), need.data_ptr<int64_t>(), num_bags);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ws_end = at::cumsum(need, 0);
    total = ws_end.slice(0, num_bags - 1);
  }
  const auto extras = check_bag_values("phi_jvp", off, &cnt, num_instances, total);
  // float64 whatever the input: out is a difference of conditional means (see bag_recursion.h).
  const auto z = logits.to(at::kDouble).contiguous();
  const auto u = tangent.to(at::kDouble).contiguous();
  auto out = at::empty({num_instances}, z.options());
  if (num_bags == 0) return out.to(logits.scalar_type());
  const auto ws_off = ws_end - need;
  auto ws = at::empty({extras[0]}, z.options());
  phi_jvp_kernel<double><<<blocks_for(num_bags), kThreads, 0, stream>>>(
      u.data_ptr<double>(), z.data_ptr<double>(), off.data_ptr<int64_t>(), cnt.data_ptr<int64_t>(),
      ws_off.data_ptr<int64_t>(), ws.data_ptr<double>(), out.data_ptr<double>(), num_bags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.to(logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mlellp, CUDA, m) { m.impl("phi_jvp", &phi_jvp_cuda); }

}  // namespace mlellp
