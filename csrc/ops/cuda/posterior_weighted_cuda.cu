// CUDA kernel of posterior_weighted: one thread per bag over a global-memory
// workspace, arithmetic in bag_recursion.h (posterior_weighted_bag, what the CPU
// kernel runs). Offsets and weights come to the host once, for the checks and
// for each bag's workspace size (which depends on its weights' support); bags
// run in chunks whose workspace stays within kChunkBytes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../bag_recursion.h"
#include "../checks.h"

namespace mlellp {
namespace {

constexpr int kThreads = 64;
constexpr int64_t kChunkBytes = int64_t(1) << 30;

template <typename T>
__global__ void posterior_weighted_kernel(const T* __restrict__ z, const int64_t* __restrict__ off,
                                          const T* __restrict__ logw, const int64_t* __restrict__ work_off,
                                          T* work, int64_t first_bag, int64_t num_bags, T* phi, T* log_lik) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= num_bags) return;
  const int64_t b = first_bag + j;
  const int64_t start = off[b], n = off[b + 1] - start;
  detail::SoloTeam solo;
  detail::posterior_weighted_bag(solo, z + start, n, logw + start + b, phi + start, log_lik + b, work + work_off[j]);
}

std::tuple<at::Tensor, at::Tensor> posterior_weighted_cuda(const at::Tensor& logits, const at::Tensor& offsets,
                                                           const at::Tensor& count_log_weights) {
  const char* op = "posterior_weighted";
  check_weighted_layout(op, logits, offsets, count_log_weights);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t num_bags = offsets.numel() - 1;
  const auto off = offsets.contiguous();
  const auto off_host = off.cpu();
  const int64_t* off_h = off_host.data_ptr<int64_t>();
  check_bag_values_host(op, off_h, num_bags, logits.numel(), nullptr);

  const auto dtype = compute_dtype(logits.scalar_type());
  const auto z = logits.to(dtype).contiguous();
  const auto w = count_log_weights.to(dtype).contiguous();
  auto phi = at::empty(logits.sizes(), z.options());
  auto log_lik = at::empty({num_bags}, z.options());
  if (num_bags == 0) return {phi.to(logits.scalar_type()), log_lik};
  const auto w_host = w.cpu();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(dtype, "mlellp_posterior_weighted_cuda", [&] {
    using T = scalar_t;
    const T* w_h = w_host.data_ptr<T>();
    // Each bag's workspace (entries of T, rounded up to 32 for alignment),
    // packed into chunks of at most kChunkBytes (a bag larger than that runs alone).
    std::vector<int64_t> entries(num_bags);
    for (int64_t b = 0; b < num_bags; ++b) {
      const int64_t n = off_h[b + 1] - off_h[b];
      int64_t ylo, yhi;
      bool bad;
      const int64_t need = detail::weight_support(w_h + off_h[b] + b, n, &ylo, &yhi, &bad)
                               ? detail::weighted_workspace(n, ylo, yhi) : 0;
      entries[b] = (need + 31) / 32 * 32;
    }
    const int64_t chunk_entries = kChunkBytes / static_cast<int64_t>(sizeof(T));
    int64_t first = 0;
    while (first < num_bags) {
      int64_t last = first, total = 0;
      std::vector<int64_t> work_off;
      while (last < num_bags && (last == first || total + entries[last] <= chunk_entries)) {
        work_off.push_back(total);
        total += entries[last++];
      }
      auto work = at::empty({total > 0 ? total : 1}, z.options());
      auto work_off_dev = at::tensor(work_off, off.options().device(at::kCPU)).to(logits.device());
      const int64_t count = last - first;
      posterior_weighted_kernel<T><<<static_cast<unsigned int>((count + kThreads - 1) / kThreads), kThreads, 0,
                                     stream>>>(z.data_ptr<T>(), off.data_ptr<int64_t>(), w.data_ptr<T>(),
                                               work_off_dev.data_ptr<int64_t>(), work.data_ptr<T>(), first, count,
                                               phi.data_ptr<T>(), log_lik.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      first = last;
    }
  });
  if (phi.scalar_type() != logits.scalar_type()) phi = phi.to(logits.scalar_type());
  return {phi, log_lik};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlellp, CUDA, m) { m.impl("posterior_weighted", &posterior_weighted_cuda); }

}  // namespace mlellp
