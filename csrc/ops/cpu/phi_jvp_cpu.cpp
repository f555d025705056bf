// CPU kernel of phi_jvp: parallel over bags, arithmetic in bag_recursion.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../phi_jvp_bag.h"

namespace mlellp {
namespace {

at::Tensor phi_jvp_cpu(const at::Tensor& tangent, const at::Tensor& logits, const at::Tensor& offsets,
                       const at::Tensor& counts) {
  check_phi_jvp_layout("phi_jvp", tangent, logits, offsets, counts);
  const int64_t num_bags = offsets.numel() - 1;
  const int64_t num_instances = logits.numel();
  check_bag_values("phi_jvp", offsets, &counts, num_instances, at::Tensor());

  const auto off = offsets.contiguous();
  const auto cnt = counts.contiguous();
  // float64 whatever the input: out is a difference of conditional means (see bag_recursion.h).
  const auto z = logits.to(at::kDouble).contiguous();
  const auto u = tangent.to(at::kDouble).contiguous();
  auto out = at::empty({num_instances}, z.options());
  const double* z_ptr = z.data_ptr<double>();
  const double* u_ptr = u.data_ptr<double>();
  const int64_t* off_ptr = off.data_ptr<int64_t>();
  const int64_t* cnt_ptr = cnt.data_ptr<int64_t>();
  double* out_ptr = out.data_ptr<double>();
  at::parallel_for(0, num_bags, 64, [&](int64_t begin, int64_t end) {
    std::vector<double> ws;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = off_ptr[b], n = off_ptr[b + 1] - start;
      ws.resize(static_cast<size_t>(detail::phi_jvp_workspace(n, cnt_ptr[b])));
      detail::phi_jvp_bag<double>(z_ptr + start, u_ptr + start, n, cnt_ptr[b], out_ptr + start, ws.data());
    }
  });
  return out.to(logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mlellp, CPU, m) { m.impl("phi_jvp", &phi_jvp_cpu); }

}  // namespace mlellp
