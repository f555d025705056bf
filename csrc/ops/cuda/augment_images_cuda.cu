// CUDA kernel of augment_images: one thread block per image (BlockTeam), the
// arithmetic in augment_image.h (what the CPU kernel runs). The per-image
// parameters are checked on the host (see below).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "../augment_image.h"
#include "../checks.h"
#include "block_team.cuh"

namespace mlellp {
namespace {

using cuda_detail::BlockTeam;
using cuda_detail::kBlockThreads;

template <typename T, typename S>
__global__ void augment_images_kernel(const S* __restrict__ src, T* __restrict__ dst, int64_t h, int64_t w,
                                      const bool* __restrict__ flip, const T* __restrict__ sigma,
                                      const int64_t* __restrict__ order, const T* __restrict__ factors) {
  __shared__ double shared[kBlockThreads];
  const int64_t i = blockIdx.x;
  const int64_t size = 3 * h * w;
  detail::augment_image(BlockTeam(shared), src + i * size, dst + i * size, h, w, flip[i], sigma[i], order + 4 * i,
                        factors + 4 * i);
}

at::Tensor augment_images_cuda(const at::Tensor& images, const at::Tensor& flip, const at::Tensor& blur_sigma,
                               const at::Tensor& jitter_order, const at::Tensor& jitter_factors) {
  const char* op = "augment_images";
  check_augment_layout(op, images, flip, blur_sigma, jitter_order, jitter_factors);
  TORCH_CHECK_VALUE(images.size(0) <= int64_t(0x7fffffff), op, ": at most 2^31 - 1 images per call, got ",
                    images.size(0));
  c10::cuda::CUDAGuard guard(images.device());
  const int64_t n = images.size(0), h = images.size(2), w = images.size(3);
  // uint8 images are read as they are (divided by 255 in the kernel) into float32
  const bool bytes = images.scalar_type() == at::kByte;
  const auto dtype = bytes ? at::kFloat : compute_dtype(images.scalar_type());
  // The values are checked on the host: parameters given on the CPU are checked
  // there and then copied to the device through pinned memory, without waiting
  // for the stream; parameters on the device cost a copy back, which waits.
  {
    const auto sigma64 = blur_sigma.to(at::kDouble).cpu();
    const auto order_h = jitter_order.contiguous().cpu();
    const auto factors64 = jitter_factors.to(at::kDouble).contiguous().cpu();
    check_augment_values_host(op, n, sigma64.data_ptr<double>(), order_h.data_ptr<int64_t>(),
                              factors64.data_ptr<double>(), dtype == at::kFloat);
  }
  auto on_device = [&](const at::Tensor& t, at::ScalarType type) {
    const auto c = t.to(type).contiguous();
    return c.is_cuda() ? c : c.pin_memory().to(images.device(), /*non_blocking=*/true);
  };
  const auto x = bytes ? images.contiguous() : images.to(dtype).contiguous();
  auto out = at::empty(x.sizes(), x.options().dtype(dtype));
  if (n == 0 || h * w == 0) return bytes ? out : out.to(images.scalar_type());
  const auto flip_c = on_device(flip, at::kBool);
  const auto order = on_device(jitter_order, at::kLong);
  const auto sigma = on_device(blur_sigma, dtype);
  const auto factors = on_device(jitter_factors, dtype);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](const auto* src, auto* dst) {
    using S = std::remove_cv_t<std::remove_pointer_t<decltype(src)>>;
    using T = std::remove_pointer_t<decltype(dst)>;
    augment_images_kernel<T, S><<<static_cast<unsigned int>(n), kBlockThreads, 0, stream>>>(
        src, dst, h, w, flip_c.data_ptr<bool>(), sigma.data_ptr<T>(), order.data_ptr<int64_t>(),
        factors.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (bytes) {
    launch(x.data_ptr<uint8_t>(), out.data_ptr<float>());
  } else {
    AT_DISPATCH_FLOATING_TYPES(dtype, "mlellp_augment_images_cuda",
                               [&] { launch(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>()); });
  }
  if (bytes) return out;
  return out.scalar_type() == images.scalar_type() ? out : out.to(images.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mlellp, CUDA, m) { m.impl("augment_images", &augment_images_cuda); }

}  // namespace mlellp
