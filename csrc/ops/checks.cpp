#include "checks.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <string>

namespace mlellp {

at::ScalarType compute_dtype(at::ScalarType dtype) {
  return (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
}

static bool is_floating(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16;
}

void check_bag_layout(const char* op, const at::Tensor& logits, const at::Tensor& offsets,
                      const at::Tensor* counts) {
  TORCH_CHECK_VALUE(logits.defined(), op, ": logits is required, got None");
  TORCH_CHECK_VALUE(offsets.defined(), op, ": offsets is required, got None");
  TORCH_CHECK_VALUE(counts == nullptr || counts->defined(), op, ": counts is required, got None");
  TORCH_CHECK_VALUE(logits.dim() == 1, op, ": logits must be 1-D (all instances of all bags, flat), got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(is_floating(logits.scalar_type()), op, ": logits must be float32, float64, float16 or bfloat16, got ",
                    logits.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1, op, ": offsets must be 1-D of length num_bags + 1, got shape ",
                    offsets.sizes());
  TORCH_CHECK_VALUE(offsets.scalar_type() == at::kLong, op, ": offsets must be int64, got ", offsets.scalar_type());
  TORCH_CHECK_VALUE(offsets.numel() >= 1, op, ": offsets must have at least one element (offsets[0] = 0), got an empty tensor");
  TORCH_CHECK_VALUE(offsets.device() == logits.device(), op, ": offsets is on ", offsets.device(),
                    " but logits is on ", logits.device());
  if (counts != nullptr) {
    TORCH_CHECK_VALUE(counts->dim() == 1, op, ": counts must be 1-D of length num_bags, got shape ", counts->sizes());
    TORCH_CHECK_VALUE(counts->scalar_type() == at::kLong, op, ": counts must be int64, got ", counts->scalar_type());
    TORCH_CHECK_VALUE(counts->numel() == offsets.numel() - 1, op, ": counts must have num_bags = len(offsets) - 1 = ",
                      offsets.numel() - 1, " elements, got ", counts->numel());
    TORCH_CHECK_VALUE(counts->device() == logits.device(), op, ": counts is on ", counts->device(),
                      " but logits is on ", logits.device());
  }
}

void check_backward_layout(const char* op, const at::Tensor& grad_log_lik, const at::Tensor& phi,
                           const at::Tensor& logits, const at::Tensor& offsets) {
  check_bag_layout(op, logits, offsets, nullptr);
  const int64_t num_bags = offsets.numel() - 1;
  TORCH_CHECK_VALUE(grad_log_lik.defined(), op, ": grad_log_likelihood is required, got None");
  TORCH_CHECK_VALUE(phi.defined(), op, ": phi is required, got None");
  TORCH_CHECK_VALUE(grad_log_lik.dim() == 1 && grad_log_lik.numel() == num_bags, op,
                    ": grad_log_likelihood must have shape [", num_bags, "], got ", grad_log_lik.sizes());
  TORCH_CHECK_VALUE(phi.sizes() == logits.sizes(), op, ": phi must have the shape of logits ", logits.sizes(),
                    ", got ", phi.sizes());
  TORCH_CHECK_VALUE(is_floating(grad_log_lik.scalar_type()), op,
                    ": grad_log_likelihood must be float32, float64, float16 or bfloat16, got ",
                    grad_log_lik.scalar_type());
  TORCH_CHECK_VALUE(is_floating(phi.scalar_type()), op, ": phi must be float32, float64, float16 or bfloat16, got ",
                    phi.scalar_type());
  TORCH_CHECK_VALUE(grad_log_lik.device() == logits.device(), op, ": grad_log_likelihood is on ",
                    grad_log_lik.device(), " but logits is on ", logits.device());
  TORCH_CHECK_VALUE(phi.device() == logits.device(), op, ": phi is on ", phi.device(), " but logits is on ",
                    logits.device());
}

void check_phi_jvp_layout(const char* op, const at::Tensor& tangent, const at::Tensor& logits,
                          const at::Tensor& offsets, const at::Tensor& counts) {
  check_bag_layout(op, logits, offsets, &counts);
  TORCH_CHECK_VALUE(tangent.defined(), op, ": tangent is required, got None");
  TORCH_CHECK_VALUE(tangent.sizes() == logits.sizes(), op, ": tangent must have the shape of logits ", logits.sizes(),
                    ", got ", tangent.sizes());
  TORCH_CHECK_VALUE(is_floating(tangent.scalar_type()), op,
                    ": tangent must be float32, float64, float16 or bfloat16, got ", tangent.scalar_type());
  TORCH_CHECK_VALUE(tangent.device() == logits.device(), op, ": tangent is on ", tangent.device(),
                    " but logits is on ", logits.device());
}

void check_weighted_layout(const char* op, const at::Tensor& logits, const at::Tensor& offsets,
                           const at::Tensor& count_log_weights) {
  check_bag_layout(op, logits, offsets, nullptr);
  TORCH_CHECK_VALUE(count_log_weights.defined(), op, ": count_log_weights is required, got None");
  const int64_t expected = logits.numel() + offsets.numel() - 1;
  TORCH_CHECK_VALUE(count_log_weights.dim() == 1, op,
                    ": count_log_weights must be 1-D (log w_b(k) at offsets[b] + b + k, k = 0..n_b), got shape ",
                    count_log_weights.sizes());
  TORCH_CHECK_VALUE(is_floating(count_log_weights.scalar_type()), op,
                    ": count_log_weights must be float32, float64, float16 or bfloat16, got ",
                    count_log_weights.scalar_type());
  TORCH_CHECK_VALUE(count_log_weights.numel() == expected, op,
                    ": count_log_weights must have len(logits) + num_bags = ", logits.numel(), " + ",
                    offsets.numel() - 1, " = ", expected, " elements (n_b + 1 per bag), got ",
                    count_log_weights.numel());
  TORCH_CHECK_VALUE(count_log_weights.device() == logits.device(), op, ": count_log_weights is on ",
                    count_log_weights.device(), " but logits is on ", logits.device());
}

void check_augment_layout(const char* op, const at::Tensor& images, const at::Tensor& flip,
                          const at::Tensor& blur_sigma, const at::Tensor& jitter_order,
                          const at::Tensor& jitter_factors) {
  TORCH_CHECK_VALUE(images.defined(), op, ": images is required, got None");
  TORCH_CHECK_VALUE(images.dim() == 4 && images.size(1) == 3, op,
                    ": images must be (B, 3, H, W) RGB images, got shape ", images.sizes());
  TORCH_CHECK_VALUE(images.scalar_type() == at::kByte || is_floating(images.scalar_type()), op,
                    ": images must be uint8 (0..255) or float32, float64, float16 or bfloat16 (in [0, 1]), got ",
                    images.scalar_type());
  const int64_t n = images.size(0);
  enum Kind { kBoolKind, kLongKind, kFloatingKind };
  const struct {
    const char* name;
    const at::Tensor& t;
    int64_t cols;  // 0: 1-D of length B
    Kind kind;
  } params[] = {{"flip", flip, 0, kBoolKind},
                {"blur_sigma", blur_sigma, 0, kFloatingKind},
                {"jitter_order", jitter_order, 4, kLongKind},
                {"jitter_factors", jitter_factors, 4, kFloatingKind}};
  for (const auto& p : params) {
    TORCH_CHECK_VALUE(p.t.defined(), op, ": ", p.name, " is required, got None");
    const bool shape_ok = p.cols == 0 ? (p.t.dim() == 1 && p.t.size(0) == n)
                                      : (p.t.dim() == 2 && p.t.size(0) == n && p.t.size(1) == p.cols);
    TORCH_CHECK_VALUE(shape_ok, op, ": ", p.name, " must have shape ",
                      p.cols == 0 ? "[" + std::to_string(n) + "]"
                                  : "[" + std::to_string(n) + ", " + std::to_string(p.cols) + "]",
                      " (one ", p.cols == 0 ? "value" : "row", " per image), got ", p.t.sizes());
    const auto dt = p.t.scalar_type();
    const bool dtype_ok = p.kind == kBoolKind ? dt == at::kBool : p.kind == kLongKind ? dt == at::kLong : is_floating(dt);
    TORCH_CHECK_VALUE(dtype_ok, op, ": ", p.name, " must be ",
                      p.kind == kBoolKind   ? "bool"
                      : p.kind == kLongKind ? "int64"
                                            : "float32, float64, float16 or bfloat16",
                      ", got ", dt);
    // (parameters on the CPU are checked there, and copied to the device without a sync)
    TORCH_CHECK_VALUE(p.t.device() == images.device() || p.t.device().is_cpu(), op, ": ", p.name, " is on ",
                      p.t.device(), " but images is on ", images.device(),
                      " (the parameters may be on the images' device or on the CPU)");
  }
}

void check_augment_values_host(const char* op, int64_t n, const double* blur_sigma, const int64_t* jitter_order,
                               const double* jitter_factors, bool in_float32) {
  static const char* names[] = {"brightness", "contrast", "saturation", "hue"};
  // finite in the dtype the kernel computes in, not only in float64
  const double largest = in_float32 ? static_cast<double>(std::numeric_limits<float>::max())
                                    : std::numeric_limits<double>::max();
  const char* within = " is beyond float32's range, the dtype these images are computed in";
  for (int64_t i = 0; i < n; ++i) {
    const double s = blur_sigma[i];
    TORCH_CHECK_VALUE(std::isfinite(s) && s >= 0, op, ": blur_sigma[", i,
                      "] must be finite and >= 0 (0: no blur), got ", s);
    TORCH_CHECK_VALUE(s <= largest, op, ": blur_sigma[", i, "] = ", s, within);
    const int64_t* o = jitter_order + 4 * i;
    bool seen[4] = {false, false, false, false};
    for (int k = 0; k < 4; ++k) {
      const bool ok = o[k] >= -1 && o[k] <= 3 && (o[k] < 0 || !seen[o[k]]);
      TORCH_CHECK_VALUE(ok, op, ": jitter_order[", i, "] = [", o[0], ", ", o[1], ", ", o[2], ", ", o[3],
                        "]: each entry must be -1 (none) or an operation 0..3 (brightness, contrast, saturation, "
                        "hue), each operation at most once");
      if (o[k] >= 0) seen[o[k]] = true;
    }
    const double* f = jitter_factors + 4 * i;
    for (int k = 0; k < 3; ++k) {
      TORCH_CHECK_VALUE(std::isfinite(f[k]) && f[k] >= 0, op, ": jitter_factors[", i, ", ", k, "] (", names[k],
                        ") must be finite and >= 0, got ", f[k]);
      TORCH_CHECK_VALUE(f[k] <= largest, op, ": jitter_factors[", i, ", ", k, "] (", names[k], ") = ", f[k], within);
    }
    TORCH_CHECK_VALUE(f[3] >= -0.5 && f[3] <= 0.5, op, ": jitter_factors[", i,
                      ", 3] (hue shift) must be in [-0.5, 0.5], got ", f[3]);
  }
}

void check_bag_values_host(const char* op, const int64_t* offsets, int64_t num_bags, int64_t num_instances,
                           const int64_t* counts) {
  TORCH_CHECK_VALUE(offsets[0] == 0, op, ": offsets[0] must be 0, got ", offsets[0]);
  for (int64_t b = 0; b < num_bags; ++b) {
    TORCH_CHECK_VALUE(offsets[b + 1] >= offsets[b], op, ": offsets must be non-decreasing, got offsets[", b + 1,
                      "] = ", offsets[b + 1], " < offsets[", b, "] = ", offsets[b]);
  }
  TORCH_CHECK_VALUE(offsets[num_bags] == num_instances, op, ": offsets[-1] must equal len(logits) = ", num_instances,
                    ", got offsets[", num_bags, "] = ", offsets[num_bags]);
  if (counts == nullptr) return;
  for (int64_t b = 0; b < num_bags; ++b) {
    const int64_t n = offsets[b + 1] - offsets[b];
    TORCH_CHECK_VALUE(counts[b] >= 0 && counts[b] <= n, op, ": counts[", b, "] = ", counts[b],
                      " is outside [0, n_b] = [0, ", n, "] for bag ", b);
  }
}

std::vector<int64_t> check_bag_values(const char* op, const at::Tensor& offsets, const at::Tensor* counts,
                                      int64_t num_instances, const at::Tensor& extras) {
  const int64_t num_bags = offsets.numel() - 1;
  if (offsets.device().is_cpu()) {
    auto off = offsets.contiguous();
    at::Tensor cnt = counts != nullptr ? counts->contiguous() : at::Tensor();
    check_bag_values_host(op, off.data_ptr<int64_t>(), num_bags, num_instances,
                          counts != nullptr ? cnt.data_ptr<int64_t>() : nullptr);
    if (!extras.defined()) return {};
    auto host = extras.to(at::kCPU, at::kLong).contiguous();
    return std::vector<int64_t>(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + host.numel());
  }
  // Device tensors: reduce every condition to one small tensor, copy it once.
  auto sizes = offsets.slice(0, 1) - offsets.slice(0, 0, num_bags);
  auto zero = at::zeros({}, offsets.options());
  std::vector<at::Tensor> parts = {
      offsets[0] != 0,
      offsets[num_bags] != num_instances,
      (sizes < 0).any(),
      counts != nullptr ? ((*counts < 0) | (*counts > sizes)).any() : zero.to(at::kBool),
  };
  std::vector<at::Tensor> as_long;
  for (auto& t : parts) as_long.push_back(t.to(at::kLong).reshape({1}));
  if (extras.defined()) as_long.push_back(extras.reshape({-1}).to(at::kLong));
  auto host = at::cat(as_long).cpu();
  auto h = host.data_ptr<int64_t>();
  if (h[0] || h[1] || h[2] || h[3]) {
    // Error path only: redo the checks on the host for a precise message.
    auto off = offsets.cpu();
    at::Tensor cnt = counts != nullptr ? counts->cpu() : at::Tensor();
    check_bag_values_host(op, off.data_ptr<int64_t>(), num_bags, num_instances,
                          counts != nullptr ? cnt.data_ptr<int64_t>() : nullptr);
    TORCH_CHECK(false, op, ": invalid offsets or counts (device check failed, host re-check passed)");
  }
  return std::vector<int64_t>(h + 4, h + host.numel());
}

void check_multiclass_layout(const char* op, const at::Tensor& logits, const at::Tensor& offsets,
                             const at::Tensor& counts, int64_t max_states) {
  TORCH_CHECK_VALUE(logits.defined(), op, ": logits is required, got None");
  TORCH_CHECK_VALUE(offsets.defined(), op, ": offsets is required, got None");
  TORCH_CHECK_VALUE(counts.defined(), op, ": counts is required, got None");
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D (num_instances, num_classes), got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) >= 2, op, ": logits must have at least 2 classes (columns), got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(is_floating(logits.scalar_type()), op,
                    ": logits must be float32, float64, float16 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1, op, ": offsets must be 1-D of length num_bags + 1, got shape ",
                    offsets.sizes());
  TORCH_CHECK_VALUE(offsets.scalar_type() == at::kLong, op, ": offsets must be int64, got ", offsets.scalar_type());
  TORCH_CHECK_VALUE(offsets.numel() >= 1, op,
                    ": offsets must have at least one element (offsets[0] = 0), got an empty tensor");
  TORCH_CHECK_VALUE(offsets.device() == logits.device(), op, ": offsets is on ", offsets.device(),
                    " but logits is on ", logits.device());
  TORCH_CHECK_VALUE(counts.dim() == 2, op, ": counts must be 2-D (num_bags, num_classes), got shape ",
                    counts.sizes());
  TORCH_CHECK_VALUE(counts.scalar_type() == at::kLong, op, ": counts must be int64, got ", counts.scalar_type());
  TORCH_CHECK_VALUE(counts.size(0) == offsets.numel() - 1, op, ": counts must have num_bags = len(offsets) - 1 = ",
                    offsets.numel() - 1, " rows, got shape ", counts.sizes());
  TORCH_CHECK_VALUE(counts.size(1) == logits.size(1), op, ": counts must have one column per class of logits (",
                    logits.size(1), "), got shape ", counts.sizes());
  TORCH_CHECK_VALUE(counts.device() == logits.device(), op, ": counts is on ", counts.device(), " but logits is on ",
                    logits.device());
  // 2^40 states (16 TiB of tables) is beyond any machine, and keeps the workspace's
  // byte counts far from int64 overflow.
  TORCH_CHECK_VALUE(max_states >= 1 && max_states <= (int64_t(1) << 40), op,
                    ": max_states must be between 1 and 2^40 = 1099511627776, got ", max_states);
}

static std::string row_text(const int64_t* row, int64_t num_classes) {
  std::string text = "[";
  for (int64_t c = 0; c < num_classes; ++c) text += (c ? ", " : "") + std::to_string(row[c]);
  return text + "]";
}

void raise_workspace_unavailable(const char* op, int64_t bag, const int64_t* counts_row, int64_t num_classes,
                                 int64_t states, int64_t bytes, const std::string& device, const char* reason) {
  TORCH_CHECK_WITH(OutOfMemoryError, false, op, ": bag ", bag, " with counts ", row_text(counts_row, num_classes),
                   " has ", states, " count-vector states and needs ", bytes, " bytes (",
                   static_cast<double>(bytes) / (1 << 30), " GiB) of workspace, which could not be allocated on ",
                   device, " (", reason, "); lower max_states so that such bags are refused up front, or use "
                   "the approximate E-step (mlellp_ext.posterior_multiclass_approx) for them");
}

void check_multiclass_values_host(const char* op, const int64_t* offsets, int64_t num_bags, int64_t num_instances,
                                  const int64_t* counts, int64_t num_classes, int64_t max_states) {
  check_bag_values_host(op, offsets, num_bags, num_instances, nullptr);
  for (int64_t b = 0; b < num_bags; ++b) {
    const int64_t* row = counts + b * num_classes;
    const int64_t n = offsets[b + 1] - offsets[b];
    int64_t sum = 0;
    // The state count saturates at max_states + 1 (the exact product may overflow int64).
    int64_t states = 1;
    for (int64_t c = 0; c < num_classes; ++c) {
      TORCH_CHECK_VALUE(row[c] >= 0, op, ": counts must be non-negative, got counts[", b, ", ", c, "] = ", row[c]);
    }
    for (int64_t c = 0; c < num_classes; ++c) {
      TORCH_CHECK_VALUE(row[c] <= n, op, ": counts[", b, "] = ", row_text(row, num_classes), " has ", row[c],
                        " in class ", c, " but bag ", b, " has ", n, " instances");
      sum += row[c];
      if (states <= max_states) {
        states = states > max_states / (row[c] + 1) ? max_states + 1 : states * (row[c] + 1);
      }
    }
    TORCH_CHECK_VALUE(sum == n, op, ": counts[", b, "] = ", row_text(row, num_classes), " sums to ", sum,
                      " but bag ", b, " has ", n, " instances (offsets[", b + 1, "] - offsets[", b, "])");
    if (states > max_states) {
      // The exact count, in floating point, for the message.
      double exact = 1;
      for (int64_t c = 0; c < num_classes; ++c) exact *= static_cast<double>(row[c] + 1);
      TORCH_CHECK_VALUE(false, op, ": bag ", b, " with counts ", row_text(row, num_classes), " has ", exact,
                        " count-vector states (prod(counts + 1)), over max_states = ", max_states,
                        "; raise max_states if its tables (16 bytes per state) fit in memory, or use the "
                        "approximate E-step (mlellp_ext.posterior_multiclass_approx) for such bags");
    }
  }
}

}  // namespace mlellp
