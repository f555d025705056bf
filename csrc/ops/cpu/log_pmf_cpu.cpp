// CPU kernel of log_pmf: parallel over bags, arithmetic in bag_recursion.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../log_pmf_bag.h"

namespace mlellp {
namespace {

at::Tensor log_pmf_cpu(const at::Tensor& logits, const at::Tensor& offsets) {
  check_bag_layout("log_pmf", logits, offsets, nullptr);
  const int64_t num_bags = offsets.numel() - 1;
  const int64_t num_instances = logits.numel();
  check_bag_values("log_pmf", offsets, nullptr, num_instances, at::Tensor());

  const auto off = offsets.contiguous();
  const auto z = logits.to(compute_dtype(logits.scalar_type())).contiguous();
  auto out = at::empty({num_instances + num_bags}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlellp_log_pmf_cpu", [&] {
    const scalar_t* z_ptr = z.data_ptr<scalar_t>();
    const int64_t* off_ptr = off.data_ptr<int64_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_bags, 512, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t start = off_ptr[b], n = off_ptr[b + 1] - start;
        detail::log_pmf_bag<scalar_t>(z_ptr + start, n, out_ptr + start + b);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mlellp, CPU, m) { m.impl("log_pmf", &log_pmf_cpu); }

}  // namespace mlellp
