// Schema of augment_images. Kernels: cpu/augment_images_cpu.cpp,
// cuda/augment_images_cuda.cu; arithmetic: augment_image.h. The fake kernel is
// registered from Python (mlellp_ext/ops/image.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mlellp, m) {
  // images (B, 3, H, W) RGB in [0, 1] -> augmented copy (B, 3, H, W), per image i:
  // flip[i] mirrors columns, blur_sigma[i] > 0 blurs with a 3x3 Gaussian (0: no
  // blur), then the jitter operations jitter_order[i, 0..3] (0 brightness, 1
  // contrast, 2 saturation, 3 hue; -1 none) are applied in that order with
  // jitter_factors[i] = (brightness, contrast, saturation, hue shift).
  m.def("augment_images(Tensor images, Tensor flip, Tensor blur_sigma, Tensor jitter_order, "
        "Tensor jitter_factors) -> Tensor");
}
