// CPU kernels of posterior and posterior_backward: parallel over bags, the
// arithmetic is bag_recursion.h (the same code the CUDA kernels run).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <thread>
#include <vector>

#include "../bag_recursion.h"
#include "../checks.h"

namespace mlellp {
namespace {

// Bags per task: small bags cost ~100 ns, so tasks need many of them.
constexpr int64_t kGrainBags = 512;
// A bag whose rows are at least this wide is run by all threads together
// (a ThreadTeam), so that one huge bag does not leave the other cores idle.
// A team synchronises a few times per row; on a machine whose cores are busy
// with other work a descheduled member stalls every row (measured: a bag of
// 10,000 instances 30x slower under load), so only rows this wide, whose
// per-row work dwarfs that risk, use it. MLELLP_TEAM_MIN_WIDTH overrides it
// (the tests use it to check teams against single threads).
int64_t team_min_width() {
  const char* env = std::getenv("MLELLP_TEAM_MIN_WIDTH");
  return env != nullptr ? std::atoll(env) : 32768;
}

// A barrier that spins briefly before yielding: a team synchronises a few
// times per row, every few microseconds, which a sleeping barrier (futex
// wake-up) would dominate.
class SpinBarrier {
 public:
  explicit SpinBarrier(int count) : count_(count) {}
  void arrive_and_wait() {
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == count_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins > 2000) std::this_thread::yield();
    }
  }

 private:
  const int count_;
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
};

// The CPU team of bag_recursion.h: `size` std::threads with a barrier.
// Reductions go through a shared double buffer (two halves used in turn, so
// one barrier per reduction suffices) and combine members in rank order.
class ThreadTeam {
 public:
  static constexpr int kMaxValues = 3;
  ThreadTeam(int rank, int size, SpinBarrier* barrier, double* buffer)
      : rank_(rank), size_(size), barrier_(barrier), buffer_(buffer) {}
  int rank() const { return rank_; }
  int size() const { return size_; }
  void sync() const { barrier_->arrive_and_wait(); }
  template <typename T, typename Op>
  void reduce(T* values, int count, Op op) const {
    double* half = buffer_ + parity_ * kMaxValues * size_;
    for (int j = 0; j < count; ++j) half[j * size_ + rank_] = static_cast<double>(values[j]);
    sync();
    for (int j = 0; j < count; ++j) {
      T acc = static_cast<T>(half[j * size_]);
      for (int m = 1; m < size_; ++m) acc = op(j, acc, static_cast<T>(half[j * size_ + m]));
      values[j] = acc;
    }
    parity_ ^= 1;
  }

 private:
  int rank_, size_;
  SpinBarrier* barrier_;
  double* buffer_;
  mutable int parity_ = 0;
};

// Runs one bag with `threads` threads (the caller's among them).
template <typename T>
void posterior_bag_team(int threads, const T* z, int64_t n, int64_t y, T* phi, T* log_lik) {
  std::vector<T> ws(static_cast<size_t>(detail::posterior_workspace(n, y, y)));
  std::vector<double> buffer(2 * ThreadTeam::kMaxValues * threads);
  SpinBarrier barrier(threads);
  auto member = [&](int rank) {
    ThreadTeam team(rank, threads, &barrier, buffer.data());
    detail::posterior_bag(team, z, n, y, y, phi, log_lik, ws.data());
  };
  std::vector<std::thread> others;
  for (int r = 1; r < threads; ++r) others.emplace_back(member, r);
  member(0);
  for (auto& t : others) t.join();
}

std::tuple<at::Tensor, at::Tensor> posterior_cpu(const at::Tensor& logits, const at::Tensor& offsets,
                                                 const at::Tensor& counts) {
  check_bag_layout("posterior", logits, offsets, &counts);
  const int64_t num_bags = offsets.numel() - 1;
  const int64_t num_instances = logits.numel();
  check_bag_values("posterior", offsets, &counts, num_instances, at::Tensor());

  const auto off = offsets.contiguous();
  const auto cnt = counts.contiguous();
  const auto z = logits.to(compute_dtype(logits.scalar_type())).contiguous();
  auto phi = at::empty_like(z);
  auto log_lik = at::empty({num_bags}, z.options());

  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlellp_posterior_cpu", [&] {
    const scalar_t* z_ptr = z.data_ptr<scalar_t>();
    const int64_t* off_ptr = off.data_ptr<int64_t>();
    const int64_t* cnt_ptr = cnt.data_ptr<int64_t>();
    scalar_t* phi_ptr = phi.data_ptr<scalar_t>();
    scalar_t* ll_ptr = log_lik.data_ptr<scalar_t>();
    const int threads = at::get_num_threads();
    const int64_t min_width = team_min_width();
    auto wide = [&](int64_t b) {
      const int64_t n = off_ptr[b + 1] - off_ptr[b], y = cnt_ptr[b];
      return threads > 1 && detail::Band{n, y, y}.width() >= min_width;
    };
    for (int64_t b = 0; b < num_bags; ++b) {  // huge bags first, all threads on each
      if (!wide(b)) continue;
      const int64_t start = off_ptr[b];
      posterior_bag_team<scalar_t>(threads, z_ptr + start, off_ptr[b + 1] - start, cnt_ptr[b], phi_ptr + start,
                                   ll_ptr + b);
    }
    at::parallel_for(0, num_bags, kGrainBags, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> ws;  // grows to the largest bag of this task, reused
      const detail::SoloTeam solo;
      for (int64_t b = begin; b < end; ++b) {
        if (wide(b)) continue;
        const int64_t start = off_ptr[b], n = off_ptr[b + 1] - start, y = cnt_ptr[b];
        const auto need = static_cast<size_t>(detail::posterior_workspace(n, y, y));
        if (ws.size() < need) ws.resize(need);
        detail::posterior_bag(solo, z_ptr + start, n, y, y, phi_ptr + start, ll_ptr + b, ws.data());
      }
    });
  });
  return {phi.to(logits.scalar_type()), log_lik};
}

at::Tensor posterior_backward_cpu(const at::Tensor& grad_log_lik, const at::Tensor& phi, const at::Tensor& logits,
                                  const at::Tensor& offsets) {
  check_bag_layout("posterior_backward", logits, offsets, nullptr);
  const int64_t num_bags = offsets.numel() - 1;
  TORCH_CHECK_VALUE(grad_log_lik.dim() == 1 && grad_log_lik.numel() == num_bags,
                    "posterior_backward: grad_log_likelihood must have shape [", num_bags, "], got ",
                    grad_log_lik.sizes());
  TORCH_CHECK_VALUE(phi.sizes() == logits.sizes(), "posterior_backward: phi must have the shape of logits ",
                    logits.sizes(), ", got ", phi.sizes());
  const auto ct = compute_dtype(logits.scalar_type());
  const auto off = offsets.contiguous();
  const auto z = logits.to(ct).contiguous();
  const auto ph = phi.to(ct).contiguous();
  const auto g = grad_log_lik.to(ct).contiguous();
  auto grad = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES(ct, "mlellp_posterior_backward_cpu", [&] {
    const scalar_t* z_ptr = z.data_ptr<scalar_t>();
    const scalar_t* phi_ptr = ph.data_ptr<scalar_t>();
    const scalar_t* g_ptr = g.data_ptr<scalar_t>();
    const int64_t* off_ptr = off.data_ptr<int64_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    at::parallel_for(0, num_bags, kGrainBags, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t i = off_ptr[b]; i < off_ptr[b + 1]; ++i) {
          out[i] = detail::log_lik_grad(g_ptr[b], phi_ptr[i], z_ptr[i]);
        }
      }
    });
  });
  return grad.to(logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mlellp, CPU, m) {
  m.impl("posterior", &posterior_cpu);
  m.impl("posterior_backward", &posterior_backward_cpu);
}

}  // namespace mlellp
