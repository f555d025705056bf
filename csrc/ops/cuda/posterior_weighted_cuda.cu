// CUDA kernels of posterior_weighted, on the binary op's machinery (posterior_cuda.cu):
// each bag's workspace is sized on the device (from its weights' support, by the
// function the CPU uses) and placed by a prefix sum; bags whose band is wide get
// a thread block each (BlockTeam), the others a thread each. The offsets' check
// and the plan's totals come back in one small device-to-host copy; no weight and
// no per-bag size crosses to the host. Bags run in chunks of about kChunkBytes of
// workspace, each chunk a launch in which the bags outside it return at once. The arithmetic is bag_recursion.h's
// posterior_weighted_bag, what the CPU kernel runs (its team form is tested on
// the CPU through a thread team in tests/cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../checks.h"
#include "../posterior_weighted_bag.h"
#include "bag_launch.cuh"
#include "block_team.cuh"

namespace mlellp {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kChunkBytes = int64_t(1) << 30;
using cuda_detail::BlockTeam;
using cuda_detail::kBlockMinWidth;
using cuda_detail::wide_scatter_kernel;
using cuda_detail::kBlockThreads;

inline unsigned int blocks_for(int64_t work) { return cuda_detail::blocks_for(work, kThreads); }

// Workspace entries of each bag and whether it is wide (1) or not (0). The
// offsets are not checked yet (that happens in the sync after this): a bag
// whose offsets fall outside 0..N reads nothing and gets 0 and 0.
template <typename T>
__global__ void weighted_plan_kernel(const int64_t* __restrict__ off, const T* __restrict__ logw,
                                     int64_t num_instances, int64_t* __restrict__ need, int64_t* __restrict__ mark,
                                     int64_t num_bags) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= num_bags) return;
  const int64_t start = off[b], end = off[b + 1], n = end - start;
  need[b] = 0;
  mark[b] = 0;
  if (start < 0 || n < 0 || end > num_instances) return;
  int64_t ylo, yhi;
  bool bad;
  if (!detail::weight_support(logw + start + b, n, &ylo, &yhi, &bad)) return;
  need[b] = detail::weighted_workspace(n, ylo, yhi);
  mark[b] = n > 0 && detail::Band{n, ylo, yhi}.width() >= kBlockMinWidth ? 1 : 0;
}

// Whether bag b runs in the chunk of workspace [lo, hi), and where its workspace is
// (a bag that needs none runs in the first chunk and gets the chunk's start).
__device__ __forceinline__ bool in_chunk(const int64_t* ws_off, const int64_t* need, int64_t b, int64_t lo,
                                         int64_t hi, int64_t* at) {
  *at = need[b] == 0 ? 0 : ws_off[b] - lo;
  return need[b] == 0 ? lo == 0 : ws_off[b] >= lo && ws_off[b] < hi;
}

// Small bags: one thread each (wide bags are left to weighted_block_kernel).
template <typename T>
__global__ void weighted_kernel(const T* __restrict__ z, const int64_t* __restrict__ off,
                                const T* __restrict__ logw, const int64_t* __restrict__ ws_off,
                                const int64_t* __restrict__ need, const int64_t* __restrict__ mark, T* ws,
                                int64_t lo, int64_t hi, T* __restrict__ phi, T* __restrict__ log_lik,
                                int64_t num_bags) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  int64_t at;
  if (b >= num_bags || mark[b] != 0 || !in_chunk(ws_off, need, b, lo, hi, &at)) return;
  const int64_t start = off[b], n = off[b + 1] - start;
  detail::posterior_weighted_bag(detail::SoloTeam(), z + start, n, logw + start + b, phi + start, log_lik + b,
                                 ws + at);
}

// Wide bags: one block each, the count dimension spread over its threads (a
// block whose bag is in another chunk returns as a whole).
template <typename T>
__global__ void weighted_block_kernel(const T* __restrict__ z, const int64_t* __restrict__ off,
                                      const T* __restrict__ logw, const int64_t* __restrict__ ws_off,
                                      const int64_t* __restrict__ need, T* ws, int64_t lo, int64_t hi,
                                      T* __restrict__ phi, T* __restrict__ log_lik,
                                      const int64_t* __restrict__ wide_bags) {
  __shared__ double shared[3 * kBlockThreads];
  const int64_t b = wide_bags[blockIdx.x];
  int64_t at;
  if (!in_chunk(ws_off, need, b, lo, hi, &at)) return;
  const int64_t start = off[b], n = off[b + 1] - start;
  detail::posterior_weighted_bag(BlockTeam(shared), z + start, n, logw + start + b, phi + start, log_lik + b,
                                 ws + at);
}

std::tuple<at::Tensor, at::Tensor> posterior_weighted_cuda(const at::Tensor& logits, const at::Tensor& offsets,
                                                           const at::Tensor& count_log_weights) {
  const char* op = "posterior_weighted";
  check_weighted_layout(op, logits, offsets, count_log_weights);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t num_bags = offsets.numel() - 1;
  const int64_t num_instances = logits.numel();
  const auto off = offsets.contiguous();
  const auto dtype = compute_dtype(logits.scalar_type());
  const auto z = logits.to(dtype).contiguous();
  const auto w = count_log_weights.to(dtype).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();

  // Workspaces placed by a prefix sum, wide bags compacted into a list; both
  // totals come back with the offsets' check.
  at::Tensor need, mark, ws_end, mark_end, totals;
  if (num_bags > 0) {
    need = at::empty({num_bags}, off.options());
    mark = at::empty({num_bags}, off.options());
    AT_DISPATCH_FLOATING_TYPES(dtype, "mlellp_posterior_weighted_plan", [&] {
      weighted_plan_kernel<scalar_t><<<blocks_for(num_bags), kThreads, 0, stream>>>(
          off.data_ptr<int64_t>(), w.data_ptr<scalar_t>(), num_instances, need.data_ptr<int64_t>(),
          mark.data_ptr<int64_t>(), num_bags);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    ws_end = at::cumsum(need, 0);
    mark_end = at::cumsum(mark, 0);
    totals = at::stack({ws_end[-1], mark_end[-1], need.max()});
    mark_end = at::where(mark.to(at::kBool), mark_end, at::zeros_like(mark_end));
  }
  const auto extras = check_bag_values(op, off, nullptr, num_instances, totals);
  const int64_t ws_total = extras.empty() ? 0 : extras[0];
  const int64_t num_wide = extras.empty() ? 0 : extras[1];
  const int64_t max_need = extras.empty() ? 0 : extras[2];

  auto phi = at::empty(logits.sizes(), z.options());
  auto log_lik = at::empty({num_bags}, z.options());
  if (num_bags == 0) return {phi.to(logits.scalar_type()), log_lik};
  const auto ws_off = ws_end - need;
  // Bags run in chunks of about kChunkBytes of workspace: those whose workspace
  // starts in [lo, lo + chunk), in a buffer that also holds the last one's end.
  const int64_t chunk_entries = kChunkBytes / static_cast<int64_t>(z.element_size());
  const int64_t chunk = ws_total <= chunk_entries ? ws_total : chunk_entries;
  const int64_t buffer = std::min(ws_total, chunk + max_need);
  auto ws = at::empty({buffer > 0 ? buffer : 1}, z.options());
  at::Tensor wide_bags;
  if (num_wide > 0) {
    wide_bags = at::empty({num_wide}, off.options());
    wide_scatter_kernel<<<blocks_for(num_bags), kThreads, 0, stream>>>(mark_end.data_ptr<int64_t>(),
                                                                       wide_bags.data_ptr<int64_t>(), num_bags);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "mlellp_posterior_weighted_cuda", [&] {
    int64_t lo = 0;
    do {  // at least once: bags that need no workspace run in the first chunk
      weighted_kernel<scalar_t><<<blocks_for(num_bags), kThreads, 0, stream>>>(
          z.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), w.data_ptr<scalar_t>(), ws_off.data_ptr<int64_t>(),
          need.data_ptr<int64_t>(), mark.data_ptr<int64_t>(), ws.data_ptr<scalar_t>(), lo, lo + chunk,
          phi.data_ptr<scalar_t>(), log_lik.data_ptr<scalar_t>(), num_bags);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (num_wide > 0) {
        weighted_block_kernel<scalar_t><<<static_cast<unsigned int>(num_wide), kBlockThreads, 0, stream>>>(
            z.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), w.data_ptr<scalar_t>(), ws_off.data_ptr<int64_t>(),
            need.data_ptr<int64_t>(), ws.data_ptr<scalar_t>(), lo, lo + chunk, phi.data_ptr<scalar_t>(),
            log_lik.data_ptr<scalar_t>(), wide_bags.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      lo += chunk;  // in stream order: the next chunk reuses the buffer
    } while (lo < ws_total);
  });
  if (phi.scalar_type() != logits.scalar_type()) phi = phi.to(logits.scalar_type());
  return {phi, log_lik};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlellp, CUDA, m) { m.impl("posterior_weighted", &posterior_weighted_cuda); }

}  // namespace mlellp
