// Input validation shared by every op and backend. Errors name the argument
// and the offending value and are raised as Python ValueError.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace mlellp {

// Ranks, dtypes, lengths and devices; reads no tensor data.
// counts may be nullptr for ops without counts (log_pmf).
void check_bag_layout(const char* op, const at::Tensor& logits, const at::Tensor& offsets,
                      const at::Tensor* counts);

// posterior_backward's inputs: check_bag_layout of (logits, offsets), then
// grad_log_likelihood (B,) and phi (shape of logits), both floating and on
// logits' device. Reads no tensor data.
void check_backward_layout(const char* op, const at::Tensor& grad_log_lik, const at::Tensor& phi,
                           const at::Tensor& logits, const at::Tensor& offsets);

// phi_jvp's inputs: check_bag_layout of (logits, offsets, counts), then tangent
// (shape of logits, floating, on logits' device). Reads no tensor data.
void check_phi_jvp_layout(const char* op, const at::Tensor& tangent, const at::Tensor& logits,
                          const at::Tensor& offsets, const at::Tensor& counts);

// Values of offsets (0 first, non-decreasing, N last) and counts (0 <= c_b <= n_b),
// from host pointers. counts may be nullptr.
void check_bag_values_host(const char* op, const int64_t* offsets, int64_t num_bags,
                           int64_t num_instances, const int64_t* counts);

// The same for tensors on any device. On a GPU it costs one device-to-host
// copy, which also brings back `extras` (a 1-D int64 tensor on the same
// device, may be undefined) so that a caller can fetch, say, a workspace size
// in the same sync. Returns extras' values (empty if undefined).

std::vector<int64_t> check_bag_values(const char* op, const at::Tensor& offsets, const at::Tensor* counts,
                                      int64_t num_instances, const at::Tensor& extras);

// posterior_multiclass's inputs: logits (N, C) floating with C >= 2, offsets as
// above, counts (B, C) int64, all on logits' device; max_states >= 1. Reads no
// tensor data.
void check_multiclass_layout(const char* op, const at::Tensor& logits, const at::Tensor& offsets,
                             const at::Tensor& counts, int64_t max_states);

// Values, from host pointers: offsets as check_bag_values_host; counts (B x C,
// row-major) non-negative with row b summing to bag b's size, and every bag's
// lattice within max_states states (the error names the bag, its counts and its
// state count).
void check_multiclass_values_host(const char* op, const int64_t* offsets, int64_t num_bags, int64_t num_instances,
                                  const int64_t* counts, int64_t num_classes, int64_t max_states);

// A bag's posterior_multiclass workspace could not be allocated: raises
// torch.OutOfMemoryError naming the bag, its counts, states and bytes.
[[noreturn]] void raise_workspace_unavailable(const char* op, int64_t bag, const int64_t* counts_row,
                                              int64_t num_classes, int64_t states, int64_t bytes,
                                              const std::string& device, const char* reason);

// posterior_weighted's inputs: check_bag_layout of (logits, offsets), then
// count_log_weights 1-D floating of length N + B on logits' device. Reads no tensor data.
void check_weighted_layout(const char* op, const at::Tensor& logits, const at::Tensor& offsets,
                           const at::Tensor& count_log_weights);

// augment_images' inputs: images (B, 3, H, W) uint8 or floating; flip (B,) bool;
// blur_sigma (B,) floating; jitter_order (B, 4) int64; jitter_factors (B, 4)
// floating; the parameters on images' device, or on the CPU. Reads no tensor data.
void check_augment_layout(const char* op, const at::Tensor& images, const at::Tensor& flip,
                          const at::Tensor& blur_sigma, const at::Tensor& jitter_order,
                          const at::Tensor& jitter_factors);

// Values, from host pointers (n images): blur_sigma finite and >= 0; each row of
// jitter_order holds -1 or operations 0..3, each at most once; brightness,
// contrast and saturation factors finite and >= 0; hue shifts in [-0.5, 0.5].
// in_float32: the kernel computes in float32, so values must also be finite there.
void check_augment_values_host(const char* op, int64_t n, const double* blur_sigma, const int64_t* jitter_order,
                               const double* jitter_factors, bool in_float32);

// float for float16/bfloat16, else the dtype itself (float32/float64).
at::ScalarType compute_dtype(at::ScalarType dtype);

}  // namespace mlellp
