// CUDA kernel of posterior_multiclass, the arithmetic in multiclass_recursion.h
// (the same code the CPU kernel runs): a thread per bag for small lattices, a
// thread block per bag (posterior_bag_team, layer by layer) for lattices of
// kTeamMinStates states or more. Bags are planned on the device
// (multiclass::plan_bag: each bag's validity, workspace and state count, placed
// by a prefix sum; the large ones compacted into a list); the offsets' check,
// the workspace's total, the number of bad and of large bags and the largest
// bag's bytes come back in one small device-to-host copy. Only when a bag is
// bad do the offsets and counts come to the host, for the error that names it.
// Bags run in chunks of about kChunkBytes of workspace, each chunk a launch over
// all bags in which the bags outside it return at once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../checks.h"
#include "../multiclass_recursion.h"
#include "bag_launch.cuh"
#include "block_team.cuh"

namespace mlellp {
namespace {

constexpr int kThreads = 64;
constexpr int64_t kChunkBytes = int64_t(1) << 30;
constexpr int64_t kAlign = 256;
// A lattice this large gets a block: one thread would walk its states alone
// while a block's threads share each layer (C = 10, bags of 16: ~10^4 states).
constexpr int64_t kTeamMinStates = 512;
constexpr int kTeamThreads = 128;  // a power of two (BlockTeam's tree reductions)

using cuda_detail::wide_scatter_kernel;

inline unsigned int blocks_for(int64_t work) { return cuda_detail::blocks_for(work, kThreads); }

// Each bag's workspace (aligned to kAlign; 0 for a bad bag), whether it is bad,
// and whether its lattice takes a block. The offsets are not checked yet: a
// bag whose offsets fall outside 0..N is bad.
template <typename T>
__global__ void multiclass_plan_kernel(const int64_t* __restrict__ off, const int64_t* __restrict__ counts,
                                       int64_t num_classes, int64_t num_instances, int64_t max_states,
                                       int64_t* __restrict__ need, int64_t* __restrict__ bad,
                                       int64_t* __restrict__ large, int64_t num_bags) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= num_bags) return;
  const int64_t start = off[b], end = off[b + 1];
  int64_t bytes = 0, states = 0;
  const bool ok = start >= 0 && end >= start && end <= num_instances &&
                  multiclass::plan_bag<T>(counts + b * num_classes, num_classes, end - start, max_states, &bytes,
                                          &states);
  need[b] = ok ? (bytes + kAlign - 1) / kAlign * kAlign : 0;
  bad[b] = ok ? 0 : 1;
  large[b] = states >= kTeamMinStates ? 1 : 0;
}

// The bags whose workspace starts in [lo, hi); their workspace at work + ws_off[b] - lo.
template <typename T, typename In>
__global__ void posterior_multiclass_kernel(const In* __restrict__ z, const int64_t* __restrict__ off,
                                            const int64_t* __restrict__ counts, int64_t num_classes,
                                            int64_t max_states, const int64_t* __restrict__ ws_off,
                                            unsigned char* work, int64_t lo, int64_t hi, T* phi, T* log_lik,
                                            int64_t num_bags) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= num_bags || ws_off[b] < lo || ws_off[b] >= hi) return;
  const int64_t start = off[b], n = off[b + 1] - start;
  multiclass::Lattice lattice;
  multiclass::make_lattice(counts + b * num_classes, num_classes, max_states, &lattice);  // planned above
  if (lattice.states >= kTeamMinStates) return;  // multiclass_team_kernel's
  log_lik[b] = multiclass::posterior_bag<T>(z + start * num_classes, n, num_classes, lattice, work + (ws_off[b] - lo),
                                            phi + start * num_classes);
}

// The large bags (large_bags: their numbers) whose workspace starts in [lo, hi), a block each.
template <typename T, typename In>
__global__ void __launch_bounds__(kTeamThreads) multiclass_team_kernel(
    const In* __restrict__ z, const int64_t* __restrict__ off, const int64_t* __restrict__ counts,
    int64_t num_classes, int64_t max_states, const int64_t* __restrict__ ws_off, unsigned char* work, int64_t lo,
    int64_t hi, T* phi, T* log_lik, const int64_t* __restrict__ large_bags) {
  __shared__ double shared[multiclass::kTeamReduce * kTeamThreads];
  const int64_t b = large_bags[blockIdx.x];
  if (ws_off[b] < lo || ws_off[b] >= hi) return;
  const int64_t start = off[b], n = off[b + 1] - start;
  multiclass::Lattice lattice;
  multiclass::make_lattice(counts + b * num_classes, num_classes, max_states, &lattice);
  const T ll = multiclass::posterior_bag_team(cuda_detail::BlockTeam(shared), z + start * num_classes, n,
                                              num_classes, lattice, work + (ws_off[b] - lo),
                                              phi + start * num_classes);
  if (threadIdx.x == 0) log_lik[b] = ll;
}

std::tuple<at::Tensor, at::Tensor> posterior_multiclass_cuda(const at::Tensor& logits, const at::Tensor& offsets,
                                                             const at::Tensor& counts, int64_t max_states) {
  const char* op = "posterior_multiclass";
  check_multiclass_layout(op, logits, offsets, counts, max_states);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t num_bags = offsets.numel() - 1;
  const int64_t num_classes = logits.size(1);
  const int64_t num_instances = logits.size(0);
  const auto off = offsets.contiguous();
  const auto cnt = counts.contiguous();
  const auto dtype = compute_dtype(logits.scalar_type());
  auto stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor need, ws_end, large_end, totals;
  if (num_bags > 0) {
    need = at::empty({num_bags}, off.options());
    auto bad = at::empty({num_bags}, off.options());
    auto large = at::empty({num_bags}, off.options());
    AT_DISPATCH_FLOATING_TYPES(dtype, "mlellp_posterior_multiclass_plan", [&] {
      multiclass_plan_kernel<scalar_t><<<blocks_for(num_bags), kThreads, 0, stream>>>(
          off.data_ptr<int64_t>(), cnt.data_ptr<int64_t>(), num_classes, num_instances, max_states,
          need.data_ptr<int64_t>(), bad.data_ptr<int64_t>(), large.data_ptr<int64_t>(), num_bags);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    ws_end = at::cumsum(need, 0);
    large_end = at::cumsum(large, 0) * large;  // wide_scatter_kernel's positions
    // (a total past 2^62 bytes, possible only with max_states near 2^40, would wrap the sums)
    const auto too_much = (need.to(at::kDouble).sum() > 4.0e18).to(at::kLong);
    totals = at::stack({ws_end[-1], bad.sum(), need.max(), too_much, large.sum()});
  }
  // The offsets' own check (its messages) and the plan's totals, in one copy.
  const auto extras = check_bag_values(op, off, nullptr, num_instances, totals);
  if (!extras.empty() && extras[1] > 0) {  // the error path: name the bad bag as the CPU kernel does
    const auto off_host = off.cpu();
    const auto cnt_host = cnt.cpu();
    check_multiclass_values_host(op, off_host.data_ptr<int64_t>(), num_bags, num_instances,
                                 cnt_host.data_ptr<int64_t>(), num_classes, max_states);
    TORCH_INTERNAL_ASSERT(false, op, ": the device found a bad bag the host check did not");
  }

  const auto z = logits.contiguous();
  auto phi = at::empty(logits.sizes(), logits.options().dtype(dtype));
  auto log_lik = at::empty({num_bags}, logits.options().dtype(dtype));
  if (num_bags == 0) return {phi.to(logits.scalar_type()), log_lik};
  TORCH_CHECK_WITH(OutOfMemoryError, extras[3] == 0, op, ": the ", num_bags,
                   " bags need more than 2^62 bytes of workspace in all; lower max_states");
  const int64_t ws_total = extras[0], max_need = extras[2];
  const auto ws_off = ws_end - need;
  const int64_t num_large = extras[4];
  at::Tensor large_bags;
  if (num_large > 0) {
    large_bags = at::empty({num_large}, off.options());
    wide_scatter_kernel<<<blocks_for(num_bags), kThreads, 0, stream>>>(large_end.data_ptr<int64_t>(),
                                                                       large_bags.data_ptr<int64_t>(), num_bags);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // One chunk if everything fits in kChunkBytes; else chunks of bags starting in
  // [j K, (j + 1) K), whose workspace ends before (j + 1) K + max_need.
  const int64_t chunk = ws_total <= kChunkBytes ? ws_total : kChunkBytes;
  const int64_t buffer = std::min(ws_total, chunk + max_need);
  at::Tensor work;
  try {
    work = at::empty({buffer > 0 ? buffer : 1}, logits.options().dtype(at::kByte));
  } catch (const c10::OutOfMemoryError& e) {
    // The largest bag names the failure when it alone is most of the buffer;
    // else the chunk of many small bags says so (lowering max_states would not help).
    TORCH_CHECK_WITH(OutOfMemoryError, 2 * max_need >= buffer, op, ": the workspace of ", num_bags, " bags (",
                     buffer, " bytes at once, ", ws_total, " in all) could not be allocated on ", logits.device(),
                     " (", e.what_without_backtrace(), ")");
    const int64_t big = need.argmax().item<int64_t>();
    const auto row = cnt[big].cpu();
    multiclass::Lattice lattice;
    multiclass::make_lattice(row.data_ptr<int64_t>(), num_classes, max_states, &lattice);
    raise_workspace_unavailable(op, big, row.data_ptr<int64_t>(), num_classes, lattice.states, max_need,
                                logits.device().str(), e.what_without_backtrace());
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "mlellp_posterior_multiclass_cuda", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "mlellp_posterior_multiclass_in", [&] {
      // Every valid bag needs at least kAlign bytes (its tables hold a state or more),
      // so each workspace starts inside exactly one chunk.
      for (int64_t lo = 0; lo < ws_total; lo += chunk) {  // in stream order: each chunk reuses the buffer
        posterior_multiclass_kernel<T, scalar_t><<<blocks_for(num_bags), kThreads, 0, stream>>>(
            z.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), cnt.data_ptr<int64_t>(), num_classes, max_states,
            ws_off.data_ptr<int64_t>(), work.data_ptr<unsigned char>(), lo, lo + chunk, phi.data_ptr<T>(),
            log_lik.data_ptr<T>(), num_bags);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (num_large > 0) {
          multiclass_team_kernel<T, scalar_t><<<static_cast<unsigned int>(num_large), kTeamThreads, 0, stream>>>(
              z.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), cnt.data_ptr<int64_t>(), num_classes, max_states,
              ws_off.data_ptr<int64_t>(), work.data_ptr<unsigned char>(), lo, lo + chunk, phi.data_ptr<T>(),
              log_lik.data_ptr<T>(), large_bags.data_ptr<int64_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    });
  });
  if (phi.scalar_type() != logits.scalar_type()) phi = phi.to(logits.scalar_type());
  return {phi, log_lik};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlellp, CUDA, m) { m.impl("posterior_multiclass", &posterior_multiclass_cuda); }

}  // namespace mlellp
