// CPU kernel of posterior_multiclass: parallel over bags, the arithmetic is
// multiclass_recursion.h (the same code the CUDA kernel runs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <new>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../multiclass_recursion.h"

namespace mlellp {
namespace {

std::tuple<at::Tensor, at::Tensor> posterior_multiclass_cpu(const at::Tensor& logits, const at::Tensor& offsets,
                                                            const at::Tensor& counts, int64_t max_states) {
  const char* op = "posterior_multiclass";
  check_multiclass_layout(op, logits, offsets, counts, max_states);
  const int64_t num_bags = offsets.numel() - 1;
  const int64_t num_classes = logits.size(1);
  const auto off = offsets.contiguous();
  const auto cnt = counts.contiguous();
  const int64_t* off_ptr = off.data_ptr<int64_t>();
  const int64_t* cnt_ptr = cnt.data_ptr<int64_t>();
  check_multiclass_values_host(op, off_ptr, num_bags, logits.size(0), cnt_ptr, num_classes, max_states);

  const auto dtype = compute_dtype(logits.scalar_type());
  const auto z = logits.contiguous();
  auto phi = at::empty(logits.sizes(), logits.options().dtype(dtype));
  auto log_lik = at::empty({num_bags}, logits.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "mlellp_posterior_multiclass_cpu", [&] {
    using T = scalar_t;
    T* phi_ptr = phi.data_ptr<T>();
    T* ll_ptr = log_lik.data_ptr<T>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "mlellp_posterior_multiclass_in", [&] {
      const scalar_t* z_ptr = z.data_ptr<scalar_t>();
      // A bag costs O(states * classes): small bags go many to a task.
      at::parallel_for(0, num_bags, 16, [&](int64_t begin, int64_t end) {
        std::vector<double> work;  // reused across this task's bags
        for (int64_t b = begin; b < end; ++b) {
          const int64_t start = off_ptr[b], n = off_ptr[b + 1] - start;
          multiclass::Lattice lattice;
          multiclass::make_lattice(cnt_ptr + b * num_classes, num_classes, max_states, &lattice);  // checked above
          const int64_t bytes = multiclass::workspace_bytes<T>(n, num_classes, lattice.states);
          const size_t doubles = static_cast<size_t>((bytes + sizeof(double) - 1) / sizeof(double));
          if (work.size() < doubles) {
            try {
              work.resize(doubles);
            } catch (const std::bad_alloc&) {
              raise_workspace_unavailable(op, b, cnt_ptr + b * num_classes, num_classes, lattice.states, bytes,
                                          "the CPU", "std::bad_alloc");
            }
          }
          ll_ptr[b] = multiclass::posterior_bag<T>(z_ptr + start * num_classes, n, num_classes, lattice,
                                                   reinterpret_cast<unsigned char*>(work.data()),
                                                   phi_ptr + start * num_classes);
        }
      });
    });
  });
  if (phi.scalar_type() != logits.scalar_type()) phi = phi.to(logits.scalar_type());
  return {phi, log_lik};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlellp, CPU, m) { m.impl("posterior_multiclass", &posterior_multiclass_cpu); }

}  // namespace mlellp
