// CUDA kernels of posterior and posterior_backward. One thread per bag; the
// arithmetic is bag_recursion.h, shared with the CPU kernels, so this file
// only adds indexing, workspace placement and launches (on the current stream).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../posterior_bag.h"
#include "bag_launch.cuh"
#include "block_team.cuh"

namespace mlellp {
namespace {

constexpr int kThreads = 128;
using cuda_detail::BlockTeam;
using cuda_detail::kBlockMinWidth;
using cuda_detail::wide_scatter_kernel;
using cuda_detail::kBlockThreads;

inline unsigned int blocks_for(int64_t work) { return cuda_detail::blocks_for(work, kThreads); }

__device__ __forceinline__ bool is_wide(int64_t n, int64_t y) {
  return detail::Band{n, y, y}.width() >= kBlockMinWidth;
}

// Small bags: one thread each (wide bags are left to posterior_block_kernel).
template <typename T>
__global__ void posterior_kernel(const T* __restrict__ z, const int64_t* __restrict__ off,
                                 const int64_t* __restrict__ cnt, const int64_t* __restrict__ ws_off, T* ws,
                                 T* __restrict__ phi, T* __restrict__ log_lik, int64_t num_bags) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= num_bags) return;
  const int64_t start = off[b], n = off[b + 1] - start, y = cnt[b];
  if (is_wide(n, y)) return;
  detail::posterior_bag(detail::SoloTeam(), z + start, n, y, y, phi + start, log_lik + b, ws + ws_off[b]);
}

// Wide bags: one block each, the count dimension spread over its threads.
// wide_bags lists them (compacted on the device); its length is the grid.
template <typename T>
__global__ void posterior_block_kernel(const T* __restrict__ z, const int64_t* __restrict__ off,
                                       const int64_t* __restrict__ cnt, const int64_t* __restrict__ ws_off, T* ws,
                                       T* __restrict__ phi, T* __restrict__ log_lik,
                                       const int64_t* __restrict__ wide_bags) {
  __shared__ double shared[3 * kBlockThreads];
  const int64_t b = wide_bags[blockIdx.x];
  const int64_t start = off[b], n = off[b + 1] - start, y = cnt[b];
  detail::posterior_bag(BlockTeam(shared), z + start, n, y, y, phi + start, log_lik + b, ws + ws_off[b]);
}

// Marks wide bags (1) and others (0); the caller's inclusive prefix sum of the
// marks, zeroed at unmarked bags, places each wide bag in the compacted list.
__global__ void wide_mark_kernel(const int64_t* __restrict__ off, const int64_t* __restrict__ cnt,
                                 int64_t* __restrict__ mark, int64_t num_bags) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= num_bags) return;
  const int64_t n = off[b + 1] - off[b], y = cnt[b];
  mark[b] = (n >= 0 && y >= 0 && y <= n && is_wide(n, y)) ? 1 : 0;
}

// Workspace of each bag, from the same function the CPU uses (invalid
// counts get 0; the launch never happens for them).
__global__ void workspace_kernel(const int64_t* __restrict__ off, const int64_t* __restrict__ cnt,
                                 int64_t* __restrict__ need, int64_t num_bags) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= num_bags) return;
  const int64_t n = off[b + 1] - off[b], y = cnt[b];
  need[b] = (n >= 0 && y >= 0 && y <= n) ? detail::posterior_workspace(n, y, y) : 0;
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

  // Workspace of each bag, placed by an exclusive prefix sum. Its total
  // comes back in the validation sync.
  auto stream = c10::cuda::getCurrentCUDAStream();
  // Wide bags are compacted into a list for the block kernel; its length
  // comes back in the same sync.
  at::Tensor need, ws_end, totals, mark_end;
  if (num_bags > 0) {
    need = at::empty({num_bags}, off.options());
    workspace_kernel<<<blocks_for(num_bags), kThreads, 0, stream>>>(off.data_ptr<int64_t>(), cnt.data_ptr<int64_t>(),
                                                                    need.data_ptr<int64_t>(), num_bags);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto mark = at::empty({num_bags}, off.options());
    wide_mark_kernel<<<blocks_for(num_bags), kThreads, 0, stream>>>(off.data_ptr<int64_t>(), cnt.data_ptr<int64_t>(),
                                                                    mark.data_ptr<int64_t>(), num_bags);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ws_end = at::cumsum(need, 0);
    mark_end = at::cumsum(mark, 0);
    totals = at::stack({ws_end[-1], mark_end[-1]});
    mark_end = at::where(mark.to(at::kBool), mark_end, at::zeros_like(mark_end));
  }
  const auto extras = check_bag_values("posterior", off, &cnt, num_instances, totals);
  const int64_t ws_total = extras.empty() ? 0 : extras[0];
  const int64_t num_wide = extras.empty() ? 0 : extras[1];

  const auto z = logits.to(compute_dtype(logits.scalar_type())).contiguous();
  auto phi = at::empty_like(z);
  auto log_lik = at::empty({num_bags}, z.options());
  if (num_bags == 0) return {phi.to(logits.scalar_type()), log_lik};
  const auto ws_off = ws_end - need;
  auto ws = at::empty({ws_total}, z.options());

  at::Tensor wide_bags;
  if (num_wide > 0) {
    wide_bags = at::empty({num_wide}, off.options());
    wide_scatter_kernel<<<blocks_for(num_bags), kThreads, 0, stream>>>(
        mark_end.data_ptr<int64_t>(), wide_bags.data_ptr<int64_t>(), num_bags);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlellp_posterior_cuda", [&] {
    posterior_kernel<scalar_t><<<blocks_for(num_bags), kThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), cnt.data_ptr<int64_t>(), ws_off.data_ptr<int64_t>(),
        ws.data_ptr<scalar_t>(), phi.data_ptr<scalar_t>(), log_lik.data_ptr<scalar_t>(), num_bags);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (num_wide > 0) {
      posterior_block_kernel<scalar_t><<<static_cast<unsigned int>(num_wide), kBlockThreads, 0, stream>>>(
          z.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), cnt.data_ptr<int64_t>(), ws_off.data_ptr<int64_t>(),
          ws.data_ptr<scalar_t>(), phi.data_ptr<scalar_t>(), log_lik.data_ptr<scalar_t>(),
          wide_bags.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {phi.to(logits.scalar_type()), log_lik};
}

at::Tensor posterior_backward_cuda(const at::Tensor& grad_log_lik, const at::Tensor& phi, const at::Tensor& logits,
                                   const at::Tensor& offsets) {
  check_backward_layout("posterior_backward", grad_log_lik, phi, logits, offsets);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t num_bags = offsets.numel() - 1;
  // The op is public: offsets from a caller index the kernel, so their values are checked
  // (one small device-to-host copy, as in the forward).
  check_bag_values("posterior_backward", offsets, nullptr, logits.numel(), at::Tensor());
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
