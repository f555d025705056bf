// CUDA kernel of posterior_multiclass: one thread per bag over a global-memory
// workspace, the arithmetic in multiclass_recursion.h (the same code the CPU
// kernel runs). Bags are planned on the device (multiclass::plan_bag: each
// bag's validity and workspace, placed by a prefix sum); the offsets' check,
// the workspace's total, the number of bad bags and the largest bag's bytes
// come back in one small device-to-host copy. Only when a bag is bad do the
// offsets and counts come to the host, for the error that names it. Bags run
// in chunks of about kChunkBytes of workspace, each chunk a launch over all
// bags in which the bags outside it return at once.
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

namespace mlellp {
namespace {

constexpr int kThreads = 64;
constexpr int64_t kChunkBytes = int64_t(1) << 30;
constexpr int64_t kAlign = 256;

inline unsigned int blocks_for(int64_t work) {
  return static_cast<unsigned int>((work + kThreads - 1) / kThreads);
}

// Each bag's workspace (aligned to kAlign; 0 for a bad bag) and whether it is bad.
// The offsets are not checked yet: a bag whose offsets fall outside 0..N is bad.
template <typename T>
__global__ void multiclass_plan_kernel(const int64_t* __restrict__ off, const int64_t* __restrict__ counts,
                                       int64_t num_classes, int64_t num_instances, int64_t max_states,
                                       int64_t* __restrict__ need, int64_t* __restrict__ bad, int64_t num_bags) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= num_bags) return;
  const int64_t start = off[b], end = off[b + 1];
  int64_t bytes = 0;
  const bool ok = start >= 0 && end >= start && end <= num_instances &&
                  multiclass::plan_bag<T>(counts + b * num_classes, num_classes, end - start, max_states, &bytes);
  need[b] = ok ? (bytes + kAlign - 1) / kAlign * kAlign : 0;
  bad[b] = ok ? 0 : 1;
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
  log_lik[b] = multiclass::posterior_bag<T>(z + start * num_classes, n, num_classes, lattice, work + (ws_off[b] - lo),
                                            phi + start * num_classes);
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

  at::Tensor need, ws_end, totals;
  if (num_bags > 0) {
    need = at::empty({num_bags}, off.options());
    auto bad = at::empty({num_bags}, off.options());
    AT_DISPATCH_FLOATING_TYPES(dtype, "mlellp_posterior_multiclass_plan", [&] {
      multiclass_plan_kernel<scalar_t><<<blocks_for(num_bags), kThreads, 0, stream>>>(
          off.data_ptr<int64_t>(), cnt.data_ptr<int64_t>(), num_classes, num_instances, max_states,
          need.data_ptr<int64_t>(), bad.data_ptr<int64_t>(), num_bags);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    ws_end = at::cumsum(need, 0);
    // (a total past 2^62 bytes, possible only with max_states near 2^40, would wrap the sums)
    const auto too_much = (need.to(at::kDouble).sum() > 4.0e18).to(at::kLong);
    totals = at::stack({ws_end[-1], bad.sum(), need.max(), too_much});
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
      }
    });
  });
  if (phi.scalar_type() != logits.scalar_type()) phi = phi.to(logits.scalar_type());
  return {phi, log_lik};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlellp, CUDA, m) { m.impl("posterior_multiclass", &posterior_multiclass_cuda); }

}  // namespace mlellp
