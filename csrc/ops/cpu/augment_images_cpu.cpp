// CPU kernel of augment_images: parallel over images, one thread per image;
// the arithmetic is augment_image.h (the code the CUDA kernel runs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../augment_image.h"
#include "../checks.h"

namespace mlellp {
namespace {

// An image of 32x32 takes a few microseconds.
constexpr int64_t kGrainImages = 16;

// The per-pixel loops vectorise; SSE2 (the x86-64 baseline) has no blend
// instruction for their ?: choices, so GCC compiles clones for AVX2 and
// AVX-512 and picks one at load time (measured: hue 5x faster with AVX-512).
// The arithmetic is IEEE and uncontracted in every clone: results are the same.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// flatten: the shared per-pixel functions are inlined into each clone, so that
// they too are compiled for its ISA.
#define MLELLP_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default"), flatten))
#else
#define MLELLP_CPU_CLONES
#endif

template <typename T, typename S>
inline void augment_range(const S* src, T* dst, int64_t h, int64_t w, const bool* flip, const T* sigma,
                          const int64_t* order, const T* factors, int64_t begin, int64_t end) {
  const int64_t size = 3 * h * w;
  detail::SoloTeam solo;
  for (int64_t i = begin; i < end; ++i) {
    detail::augment_image(solo, src + i * size, dst + i * size, h, w, flip[i], sigma[i], order + 4 * i,
                          factors + 4 * i);
  }
}

// One clone set per (source, result) type (target_clones takes plain functions, not templates).
#define MLELLP_AUGMENT_RANGE(S, T)                                                                             \
  MLELLP_CPU_CLONES void augment_range_any(const S* src, T* dst, int64_t h, int64_t w, const bool* flip,       \
                                           const T* sigma, const int64_t* order, const T* factors,             \
                                           int64_t begin, int64_t end) {                                        \
    augment_range(src, dst, h, w, flip, sigma, order, factors, begin, end);                                     \
  }
MLELLP_AUGMENT_RANGE(uint8_t, float)
MLELLP_AUGMENT_RANGE(float, float)
MLELLP_AUGMENT_RANGE(double, double)
#undef MLELLP_AUGMENT_RANGE

template <typename T, typename S>
void run_augment(const S* src, at::Tensor& out, const at::Tensor& flip, const at::Tensor& sigma,
                 const at::Tensor& order, const at::Tensor& factors, int64_t h, int64_t w) {
  T* dst = out.data_ptr<T>();
  const bool* flip_ptr = flip.data_ptr<bool>();
  const T* sigma_ptr = sigma.data_ptr<T>();
  const int64_t* order_ptr = order.data_ptr<int64_t>();
  const T* factor_ptr = factors.data_ptr<T>();
  at::parallel_for(0, out.size(0), kGrainImages, [&](int64_t begin, int64_t end) {
    augment_range_any(src, dst, h, w, flip_ptr, sigma_ptr, order_ptr, factor_ptr, begin, end);
  });
}

at::Tensor augment_images_cpu(const at::Tensor& images, const at::Tensor& flip, const at::Tensor& blur_sigma,
                              const at::Tensor& jitter_order, const at::Tensor& jitter_factors) {
  const char* op = "augment_images";
  check_augment_layout(op, images, flip, blur_sigma, jitter_order, jitter_factors);
  const int64_t n = images.size(0), h = images.size(2), w = images.size(3);
  // uint8 images are read as they are (divided by 255 in the kernel) into float32
  const bool bytes = images.scalar_type() == at::kByte;
  const auto dtype = bytes ? at::kFloat : compute_dtype(images.scalar_type());
  const auto sigma64 = blur_sigma.to(at::kDouble).contiguous();
  const auto order = jitter_order.contiguous();
  const auto factors64 = jitter_factors.to(at::kDouble).contiguous();
  check_augment_values_host(op, n, sigma64.data_ptr<double>(), order.data_ptr<int64_t>(),
                            factors64.data_ptr<double>(), dtype == at::kFloat);
  const auto x = bytes ? images.contiguous() : images.to(dtype).contiguous();
  auto out = at::empty(x.sizes(), x.options().dtype(dtype));
  if (n == 0 || h * w == 0) return bytes ? out : out.to(images.scalar_type());
  const auto flip_c = flip.contiguous();
  const auto sigma = blur_sigma.to(dtype).contiguous();
  const auto factors = jitter_factors.to(dtype).contiguous();
  if (bytes) {
    run_augment<float>(x.data_ptr<uint8_t>(), out, flip_c, sigma, order, factors, h, w);
  } else {
    AT_DISPATCH_FLOATING_TYPES(dtype, "mlellp_augment_images_cpu", [&] {
      run_augment<scalar_t>(x.data_ptr<scalar_t>(), out, flip_c, sigma, order, factors, h, w);
    });
  }
  if (bytes) return out;
  return out.scalar_type() == images.scalar_type() ? out : out.to(images.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mlellp, CPU, m) { m.impl("augment_images", &augment_images_cpu); }

}  // namespace mlellp
