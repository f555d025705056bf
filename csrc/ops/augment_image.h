// Per-image arithmetic of augment_images (flip, 3x3 Gaussian blur, colour
// jitter), compiled for host and device: the CPU kernel runs it with
// bag_recursion.h's SoloTeam, the CUDA kernel with a thread block (BlockTeam),
// so the CPU tests check the arithmetic the GPU runs.
//
// Formulas are torchvision's (transforms.v2.functional) for float images:
//   brightness  x * f, clamped to [0, 1]
//   contrast    x * f + (1 - f) * mean(gray(x)), clamped
//   saturation  x * f + (1 - f) * gray(x), clamped
//   hue         RGB -> HSV (Pillow's formulas), h += shift mod 1, HSV -> RGB
//   blur        3x3 kernel exp(-d^2 / (2 sigma^2)) normalised, reflect padding
// with gray = 0.2989 r + 0.587 g + 0.114 b. (torchvision computes hue in float32
// whatever the dtype; here it is computed in the image's dtype.)
#pragma once

#include <cstdint>
#include <type_traits>

#include "host_device.h"  // MLELLP_HD, m_exp, SoloTeam

namespace mlellp {
namespace detail {

// Jitter operations, as numbered in augment_images' jitter_order.
enum JitterOp : int64_t { kBrightness = 0, kContrast = 1, kSaturation = 2, kHue = 3 };
constexpr int kNumJitterOps = 4;

template <typename T> MLELLP_HD T clamp01(T v) {
  // NaN passes through, as torch.clamp
  return v < T(0) ? T(0) : (v > T(1) ? T(1) : v);
}

template <typename T> MLELLP_HD T gray(T r, T g, T b) {
  return T(0.2989) * r + T(0.587) * g + T(0.114) * b;
}

// Reflect padding of one pixel (torch's "reflect"); a side of one pixel repeats it.
MLELLP_HD int64_t reflect_index(int64_t i, int64_t n) {
  if (i < 0) return n > 1 ? -i : 0;
  if (i >= n) return n > 1 ? 2 * (n - 1) - i : 0;
  return i;
}

// Branch-free (values chosen by ?:, no choice between computations) so that the host compiler vectorises the loop over pixels (with
// -fno-trapping-math, which lets it compute both sides of a choice).
template <typename T> MLELLP_HD void hue_pixel(T& r, T& g, T& b, T shift) {
  // 0, or NaN that the result carries if any channel is NaN (the comparisons
  // below would otherwise pass over a NaN channel, as if the pixel were grey)
  const T nan_if_nan = (r + g + b) * T(0);
  // RGB -> HSV
  const T maxc = r > g ? (r > b ? r : b) : (g > b ? g : b);
  const T minc = r < g ? (r < b ? r : b) : (g < b ? g : b);
  const T span = maxc - minc;
  const bool eqc = span == T(0);
  // Denominators 1 where eqc, by arithmetic: a ?: choice would be folded into
  // a branch around the division, which the vectoriser does not take.
  const T one_if_eqc = eqc ? T(1) : T(0), zero_if_eqc = T(1) - one_if_eqc;
  const T s = span / (one_if_eqc + zero_if_eqc * maxc);
  const T inv = T(1) / (one_if_eqc + zero_if_eqc * span);
  const T hr = (g - b) * inv, hg = (b - r) * inv + T(2), hb = (r - g) * inv + T(4);
  T h = maxc == r ? hr : (maxc == g ? hg : hb);
  h = eqc ? T(0) : h;
  h = h / T(6) + T(1);  // in [5/6, 11/6]: fmod(h, 1) is h - 1 where h >= 1, exactly
  h -= h >= T(1) ? T(1) : T(0);
  // h + shift, mod 1 (torch.remainder), for shift in [-0.5, 0.5]
  h = h + shift;
  h += h < T(0) ? T(1) : (h >= T(1) ? T(-1) : T(0));
  // HSV -> RGB. Channel n (r 5, g 3, b 1) is v (1 - s c), c = clamp(min(k, 4 - k), 0, 1),
  // k = (n + 6 h) mod 6: Pillow's six sectors (v, p = v (1 - s), q = v (1 - s f),
  // t = v (1 - s (1 - f))) without a choice among them, so that it vectorises;
  // it differs from torchvision's sector form by rounding only.
  const T h6 = h * T(6);  // in [0, 6]
  T out[3];
  for (int j = 0; j < 3; ++j) {
    T k = T(5 - 2 * j) + h6;
    k -= k >= T(6) ? T(6) : T(0);
    T c = k < T(4) - k ? k : T(4) - k;
    c = c < T(1) ? c : T(1);
    c = c > T(0) ? c : T(0);
    out[j] = clamp01(maxc * (T(1) - s * c)) + nan_if_nan;
  }
  r = out[0];
  g = out[1];
  b = out[2];
}

// One image, planes r, g, b of hw pixels each, in place. Loops are strided by
// the team (a constant 1 for SoloTeam, so the host compiler vectorises them).
template <typename Team, typename T>
MLELLP_HD void scale_pixels(const Team& team, T* x, int64_t count, T f) {
  for (int64_t p = team.rank(); p < count; p += team.size()) x[p] = clamp01(x[p] * f);
}

template <typename Team, typename T>
MLELLP_HD void blend_gray_pixels(const Team& team, T* r, T* g, T* b, int64_t hw, T f, bool use_mean, T mean) {
  const T keep = T(1) - f;
  for (int64_t p = team.rank(); p < hw; p += team.size()) {
    const T other = keep * (use_mean ? mean : gray(r[p], g[p], b[p]));
    r[p] = clamp01(r[p] * f + other);
    g[p] = clamp01(g[p] * f + other);
    b[p] = clamp01(b[p] * f + other);
  }
}

template <typename Team, typename T>
MLELLP_HD T mean_gray(const Team& team, const T* r, const T* g, const T* b, int64_t hw) {
  double sum[1] = {0.0};
  for (int64_t p = team.rank(); p < hw; p += team.size()) sum[0] += static_cast<double>(gray(r[p], g[p], b[p]));
  team.reduce(sum, 1, [](int, double a, double c) { return a + c; });
  return static_cast<T>(sum[0] / static_cast<double>(hw));
}

// A source value in [0, 1]: uint8 images are divided by 255 (torchvision's
// to_dtype(..., scale=True)), floating ones taken as they are.
template <typename T, typename S> MLELLP_HD T to_unit(S v) {
  if constexpr (std::is_same_v<S, uint8_t>) {
    return static_cast<T>(v) / T(255);
  } else {
    return static_cast<T>(v);
  }
}

// 3x3 blur (weights side, centre, side in both directions) of one plane at
// source columns cl, cc, cr of rows up, mid, down: rows first, then columns.
template <typename T, typename S>
MLELLP_HD T blur_at(const S* up, const S* mid, const S* down, int64_t cl, int64_t cc, int64_t cr, T side,
                        T centre) {
  const T a = side * to_unit<T>(up[cl]) + centre * to_unit<T>(up[cc]) + side * to_unit<T>(up[cr]);
  const T m = side * to_unit<T>(mid[cl]) + centre * to_unit<T>(mid[cc]) + side * to_unit<T>(mid[cr]);
  const T d = side * to_unit<T>(down[cl]) + centre * to_unit<T>(down[cc]) + side * to_unit<T>(down[cr]);
  return side * a + centre * m + side * d;
}

// Output pixel x of a row, flipped if flip and blurred if blur: the source
// columns of x and of its neighbours in the (flipped) image, reflect-padded.
template <typename T, typename S>
MLELLP_HD T load_pixel(const S* up, const S* mid, const S* down, int64_t w, int64_t x, bool flip, bool blur,
                           T side, T centre) {
  const int64_t cc = flip ? w - 1 - x : x;
  if (!blur) return to_unit<T>(mid[cc]);
  const int64_t xl = reflect_index(x - 1, w), xr = reflect_index(x + 1, w);
  return blur_at(up, mid, down, flip ? w - 1 - xl : xl, cc, flip ? w - 1 - xr : xr, side, centre);
}

// The flipped and blurred image into dst, by any team: pixel p = y * w + x of
// every plane, (y, x) advanced by the team's stride without a division per pixel.
template <typename Team, typename T, typename S>
MLELLP_HD void load_image(const Team& team, const S* src, T* dst, int64_t h, int64_t w, bool flip, bool blur,
                              T side, T centre) {
  const int64_t hw = h * w;
  const int64_t step_y = team.size() / w, step_x = team.size() - step_y * w;
  int64_t y = team.rank() / w, x = team.rank() - (team.rank() / w) * w;
  for (int64_t p = team.rank(); p < hw; p += team.size()) {
    const int64_t up = reflect_index(y - 1, h) * w, mid = y * w, down = reflect_index(y + 1, h) * w;
    for (int c = 0; c < 3; ++c) {
      const S* plane = src + c * hw;
      dst[c * hw + p] = load_pixel(plane + up, plane + mid, plane + down, w, x, flip, blur, side, centre);
    }
    x += step_x;
    y += step_y;
    if (x >= w) {
      x -= w;
      ++y;
    }
  }
}

// The same values by one thread, row by row: the interior of a row (no
// reflection) is a loop the host compiler vectorises.
template <typename T, typename S>
MLELLP_HD void load_image(const SoloTeam&, const S* src, T* dst, int64_t h, int64_t w, bool flip, bool blur,
                              T side, T centre) {
  const int64_t hw = h * w;
  for (int c = 0; c < 3; ++c) {
    for (int64_t y = 0; y < h; ++y) {
      const S* plane = src + c * hw;
      const S* up = plane + reflect_index(y - 1, h) * w;
      const S* mid = plane + y * w;
      const S* down = plane + reflect_index(y + 1, h) * w;
      T* out = dst + c * hw + y * w;
      if (!blur) {
        if (flip) {
          for (int64_t x = 0; x < w; ++x) out[x] = to_unit<T>(mid[w - 1 - x]);
        } else {
          for (int64_t x = 0; x < w; ++x) out[x] = to_unit<T>(mid[x]);
        }
        continue;
      }
      out[0] = load_pixel(up, mid, down, w, 0, flip, true, side, centre);
      if (w > 1) out[w - 1] = load_pixel(up, mid, down, w, w - 1, flip, true, side, centre);
      // interior: the columns load_pixel would take, without reflection
      if (flip) {
        for (int64_t x = 1; x < w - 1; ++x) out[x] = blur_at(up, mid, down, w - x, w - 1 - x, w - 2 - x, side, centre);
      } else {
        for (int64_t x = 1; x < w - 1; ++x) out[x] = blur_at(up, mid, down, x - 1, x, x + 1, side, centre);
      }
    }
  }
}

// src (3, h, w) of T, or of uint8 (divided by 255), and dst (3, h, w) of T,
// distinct. flip mirrors columns; sigma > 0 blurs (sigma == 0 does not);
// order[k] in {-1, 0..3} lists the jitter operations in the order applied (-1:
// none); factors = (brightness, contrast, saturation, hue shift). The caller
// has checked the values.
template <typename Team, typename T, typename S>
MLELLP_HD void augment_image(const Team& team, const S* src, T* dst, int64_t h, int64_t w, bool flip, T sigma,
                                 const int64_t* order, const T* factors) {
  const int64_t hw = h * w;
  const bool blur = sigma > T(0);
  const T tap = blur ? m_exp(T(-1) / (T(2) * sigma * sigma)) : T(0);  // offsets -1, +1; the centre has 1
  const T norm = T(1) + T(2) * tap;
  load_image(team, src, dst, h, w, flip, blur, tap / norm, T(1) / norm);
  team.sync();  // the jitter reads pixels other members wrote
  T* r = dst;
  T* g = dst + hw;
  T* b = dst + 2 * hw;
  for (int k = 0; k < kNumJitterOps; ++k) {
    switch (order[k]) {
      case kBrightness:
        scale_pixels(team, dst, 3 * hw, factors[kBrightness]);
        break;
      case kContrast: {
        const T mean = mean_gray(team, r, g, b, hw);  // reduce() also orders the reads before the writes
        blend_gray_pixels(team, r, g, b, hw, factors[kContrast], true, mean);
        break;
      }
      case kSaturation:
        blend_gray_pixels(team, r, g, b, hw, factors[kSaturation], false, T(0));
        break;
      case kHue:
        for (int64_t p = team.rank(); p < hw; p += team.size()) hue_pixel(r[p], g[p], b[p], factors[kHue]);
        break;
      default:
        break;
    }
    team.sync();
  }
}

}  // namespace detail
}  // namespace mlellp
