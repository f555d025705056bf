// Candidate kernels for the small-bag posterior, timed against the shipped op by
// bench/cuda_variants.py (JIT-built there; part of `make gpu-check`). Each variant
// runs the same per-bag function of bag_recursion.h as the shipped kernel, so its
// outputs must equal the op's bit for bit; only where the workspace lives and how
// many registers a thread may use change. See docs/gpu.md for the predictions.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "bag_group.h"
#include "posterior_bag.h"

namespace {

constexpr int kThreads = 128;
constexpr int64_t kBlockMinWidth = 64;  // as posterior_cuda.cu: wider bags are not this harness's business
constexpr int kLocal = 160;             // workspace entries kept per thread: a bag of n <= 12 needs <= 129

__device__ __forceinline__ bool is_small(int64_t n, int64_t y) {
  return mlellp::detail::Band{n, y, y}.width() < kBlockMinWidth;
}

__global__ void workspace_sizes_kernel(const int64_t* off, const int64_t* cnt, int64_t* need, int64_t num_bags) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= num_bags) return;
  need[b] = mlellp::detail::posterior_workspace(off[b + 1] - off[b], cnt[b], cnt[b]);
}

// variant 0: the shipped kernel's body (workspace in global memory at per-bag offsets).
// variant 1: the workspace in a per-thread array (local memory, interleaved across threads).
// variant 2: variant 1 with at most 64 registers a thread (8 blocks of 128 per SM).
// variant 3: a warp per 32 consecutive bags (bag_group.h): logits staged through
//            shared memory by coalesced loads, phi stored back the same way,
//            each lane's workspace in a local array.
template <typename T, int Variant>
__device__ __forceinline__ void small_bag(const T* z, const int64_t* off, const int64_t* cnt, const int64_t* ws_off,
                                          T* ws, T* phi, T* log_lik, int64_t num_bags) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= num_bags) return;
  const int64_t start = off[b], n = off[b + 1] - start, y = cnt[b];
  if (!is_small(n, y)) return;
  if (Variant == 0) {
    mlellp::detail::posterior_bag(mlellp::detail::SoloTeam(), z + start, n, y, y, phi + start, log_lik + b,
                                  ws + ws_off[b]);
  } else {
    T local[kLocal];
    T* w = mlellp::detail::posterior_workspace(n, y, y) <= kLocal ? local : ws + ws_off[b];
    mlellp::detail::posterior_bag(mlellp::detail::SoloTeam(), z + start, n, y, y, phi + start, log_lik + b, w);
  }
}

template <typename T>
__global__ void variant0(const T* z, const int64_t* off, const int64_t* cnt,
                         const int64_t* ws_off, T* ws, T* phi, T* ll, int64_t nb) {
  small_bag<T, 0>(z, off, cnt, ws_off, ws, phi, ll, nb);
}
template <typename T>
__global__ void variant1(const T* z, const int64_t* off, const int64_t* cnt,
                         const int64_t* ws_off, T* ws, T* phi, T* ll, int64_t nb) {
  small_bag<T, 1>(z, off, cnt, ws_off, ws, phi, ll, nb);
}
template <typename T>
__global__ void __launch_bounds__(kThreads, 8) variant2(const T* z, const int64_t* off, const int64_t* cnt,
                                                        const int64_t* ws_off, T* ws, T* phi, T* ll, int64_t nb) {
  small_bag<T, 1>(z, off, cnt, ws_off, ws, phi, ll, nb);
}

// The team of bag_group.h on the GPU: the 32 lanes of a warp.
struct WarpTeam {
  __device__ int rank() const { return threadIdx.x % 32; }
  __device__ int size() const { return 32; }
  __device__ void sync() const { __syncwarp(); }
};

constexpr int64_t kStage = 512;  // staged logits per warp: 32 bags of up to 16 on average

template <typename T>
__global__ void variant3(const T* z, const int64_t* off, const int64_t* cnt, T* phi, T* ll, int64_t nb) {
  __shared__ T stage[kThreads / 32][2 * kStage];
  const int64_t b0 = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32 * 32;
  if (b0 >= nb) return;  // (a whole warp: b0 is the same for its lanes)
  const int64_t b1 = b0 + 32 < nb ? b0 + 32 : nb;
  mlellp::detail::posterior_group(WarpTeam(), z, off, cnt, b0, b1, kBlockMinWidth, stage[threadIdx.x / 32], kStage,
                                  phi, ll);
}

// Workspace sizes per bag (the shipped op computes the same on the device before its checks).
torch::Tensor workspace_sizes(torch::Tensor offsets, torch::Tensor counts) {
  const c10::cuda::CUDAGuard guard(offsets.device());
  const int64_t num_bags = counts.numel();
  auto need = torch::empty({num_bags}, offsets.options());
  if (num_bags == 0) return need;
  workspace_sizes_kernel<<<(num_bags + kThreads - 1) / kThreads, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      offsets.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), need.data_ptr<int64_t>(), num_bags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return need;
}

// One launch of a variant into preallocated outputs: no checks, no prefix sums, no sync,
// so that its time is the kernel's alone. Inputs must be valid and contiguous.
void run_variant(int64_t variant, torch::Tensor logits, torch::Tensor offsets, torch::Tensor counts,
                 torch::Tensor ws_off, torch::Tensor ws, torch::Tensor phi, torch::Tensor log_lik) {
  TORCH_CHECK(variant >= 0 && variant <= 3, "variant must be 0, 1, 2 or 3, got ", variant);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t nb = counts.numel();
  if (nb == 0) return;
  const unsigned int blocks = static_cast<unsigned int>((nb + kThreads - 1) / kThreads);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cuda_variants", [&] {
    const auto* z = logits.data_ptr<scalar_t>();
    const auto* off = offsets.data_ptr<int64_t>();
    const auto* cnt = counts.data_ptr<int64_t>();
    const auto* wo = ws_off.data_ptr<int64_t>();
    auto* w = ws.data_ptr<scalar_t>();
    auto* ph = phi.data_ptr<scalar_t>();
    auto* ll = log_lik.data_ptr<scalar_t>();
    if (variant == 0) variant0<scalar_t><<<blocks, kThreads, 0, stream>>>(z, off, cnt, wo, w, ph, ll, nb);
    if (variant == 1) variant1<scalar_t><<<blocks, kThreads, 0, stream>>>(z, off, cnt, wo, w, ph, ll, nb);
    if (variant == 2) variant2<scalar_t><<<blocks, kThreads, 0, stream>>>(z, off, cnt, wo, w, ph, ll, nb);
    if (variant == 3) variant3<scalar_t><<<blocks, kThreads, 0, stream>>>(z, off, cnt, ph, ll, nb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("workspace_sizes", &workspace_sizes);
  m.def("run_variant", &run_variant);
}
