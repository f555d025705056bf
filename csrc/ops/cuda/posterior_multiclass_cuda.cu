// CUDA kernel of posterior_multiclass: one thread per bag over a global-memory
// workspace, arithmetic in multiclass_recursion.h (what the CPU kernel runs).
// Offsets and counts come to the host once: for the checks (which name the bad
// bag) and for each bag's workspace size. Bags run in chunks whose workspace
// stays within kChunkBytes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../checks.h"
#include "../multiclass_recursion.h"

namespace mlellp {
namespace {

constexpr int kThreads = 64;
constexpr int64_t kChunkBytes = int64_t(1) << 30;

template <typename T, typename In>
__global__ void posterior_multiclass_kernel(const In* __restrict__ z, const int64_t* __restrict__ off,
                                            const int64_t* __restrict__ counts, int64_t num_classes,
                                            int64_t max_states, const int64_t* __restrict__ work_off,
                                            unsigned char* work, int64_t first_bag, int64_t num_bags, T* phi,
                                            T* log_lik) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= num_bags) return;
  const int64_t b = first_bag + j;
  const int64_t start = off[b], n = off[b + 1] - start;
  multiclass::Lattice lattice;
  multiclass::make_lattice(counts + b * num_classes, num_classes, max_states, &lattice);  // checked on the host
  log_lik[b] = multiclass::posterior_bag<T>(z + start * num_classes, n, num_classes, lattice, work + work_off[j],
                                            phi + start * num_classes);
}

std::tuple<at::Tensor, at::Tensor> posterior_multiclass_cuda(const at::Tensor& logits, const at::Tensor& offsets,
                                                             const at::Tensor& counts, int64_t max_states) {
  const char* op = "posterior_multiclass";
  check_multiclass_layout(op, logits, offsets, counts, max_states);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t num_bags = offsets.numel() - 1;
  const int64_t num_classes = logits.size(1);
  const auto off = offsets.contiguous();
  const auto cnt = counts.contiguous();
  const auto off_host = off.cpu();
  const auto cnt_host = cnt.cpu();
  const int64_t* off_h = off_host.data_ptr<int64_t>();
  const int64_t* cnt_h = cnt_host.data_ptr<int64_t>();
  check_multiclass_values_host(op, off_h, num_bags, logits.size(0), cnt_h, num_classes, max_states);

  const auto dtype = compute_dtype(logits.scalar_type());
  const auto z = logits.contiguous();
  auto phi = at::empty(logits.sizes(), logits.options().dtype(dtype));
  auto log_lik = at::empty({num_bags}, logits.options().dtype(dtype));
  if (num_bags == 0) return {phi.to(logits.scalar_type()), log_lik};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(dtype, "mlellp_posterior_multiclass_cuda", [&] {
    using T = scalar_t;
    // Each bag's workspace, 256-byte aligned, packed into chunks of at most
    // kChunkBytes (a bag larger than that runs alone).
    std::vector<int64_t> bytes(num_bags);
    for (int64_t b = 0; b < num_bags; ++b) {
      multiclass::Lattice lattice;
      multiclass::make_lattice(cnt_h + b * num_classes, num_classes, max_states, &lattice);
      const int64_t n = off_h[b + 1] - off_h[b];
      bytes[b] = (multiclass::workspace_bytes<T>(n, num_classes, lattice.states) + 255) / 256 * 256;
    }
    int64_t first = 0;
    while (first < num_bags) {
      int64_t last = first, total = 0;
      std::vector<int64_t> work_off;
      while (last < num_bags && (last == first || total + bytes[last] <= kChunkBytes)) {
        work_off.push_back(total);
        total += bytes[last++];
      }
      at::Tensor work;
      try {
        work = at::empty({total}, logits.options().dtype(at::kByte));
      } catch (const c10::OutOfMemoryError& e) {
        // A chunk of one bag names that bag; a chunk of many small ones (at most
        // kChunkBytes) says so: lowering max_states would not help there.
        TORCH_CHECK_WITH(OutOfMemoryError, last - first == 1, op, ": the workspace of bags ", first, "..", last - 1,
                         " (", total, " bytes in all) could not be allocated on ", logits.device(), " (",
                         e.what_without_backtrace(), ")");
        multiclass::Lattice lattice;
        multiclass::make_lattice(cnt_h + first * num_classes, num_classes, max_states, &lattice);
        raise_workspace_unavailable(op, first, cnt_h + first * num_classes, num_classes, lattice.states, bytes[first],
                                    logits.device().str(), e.what_without_backtrace());
      }
      auto work_off_dev = at::tensor(work_off, off.options().device(at::kCPU)).to(logits.device());
      const int64_t count = last - first;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "mlellp_posterior_multiclass_in", [&] {
        posterior_multiclass_kernel<T, scalar_t>
            <<<static_cast<unsigned int>((count + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
                z.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), cnt.data_ptr<int64_t>(), num_classes, max_states,
                work_off_dev.data_ptr<int64_t>(), work.data_ptr<unsigned char>(), first, count, phi.data_ptr<T>(),
                log_lik.data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      first = last;
    }
  });
  if (phi.scalar_type() != logits.scalar_type()) phi = phi.to(logits.scalar_type());
  return {phi, log_lik};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlellp, CUDA, m) { m.impl("posterior_multiclass", &posterior_multiclass_cuda); }

}  // namespace mlellp
