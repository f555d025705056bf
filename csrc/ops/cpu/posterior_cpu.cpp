// CPU kernels of posterior and posterior_backward: parallel over bags, the
// arithmetic is bag_recursion.h (the same code the CUDA kernels run).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "../checks.h"
#include "../posterior_bag.h"
#include "lanes.h"
#include "thread_team.h"

#if defined(__GNUC__)
#define MLELLP_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define MLELLP_ALWAYS_INLINE inline
#endif

namespace mlellp {
namespace {

using cpu::SpinBarrier;
using cpu::ThreadTeam;

// Bags per task of posterior_backward: a bag costs a few ns per instance,
// so tasks need many of them.
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

// ---- the work of one call
//
// Bags with rows >= team_min_width() run first, each by all threads as a
// team. The rest is a queue of work items that the threads claim one at a
// time (dynamic scheduling on top of at::parallel_for): first every bag of at
// least kOwnItemCells cells (n * W), costliest first, then windows of
// kWindowBags consecutive bags. A mix of many small bags and a few large ones
// thus keeps every thread busy until the queue is empty. Which thread runs a
// bag never changes its result.
constexpr int64_t kWindowBags = 2048;      // ~14,000 instances of bags of 2..12
constexpr int64_t kOwnItemCells = 1 << 15;  // ~30 us of work, a fraction of a window's

template <typename T>
struct Work {
  const T* z;
  const int64_t* off;
  const int64_t* cnt;
  T* phi;
  T* log_lik;
  int64_t num_bags;
  int threads;
  int64_t team_width;
  bool lanes;
  std::vector<int64_t> own;  // bags that are work items of their own, costliest first
  std::atomic<int64_t> next{0};

  int64_t size(int64_t b) const { return off[b + 1] - off[b]; }
  int64_t cells(int64_t b) const { return size(b) * detail::Band{size(b), cnt[b], cnt[b]}.width(); }
  bool team(int64_t b) const {
    return threads > 1 && detail::Band{size(b), cnt[b], cnt[b]}.width() >= team_width;
  }
  bool own_item(int64_t b) const { return !team(b) && cells(b) >= kOwnItemCells; }
  bool elsewhere(int64_t b) const { return team(b) || own_item(b); }  // not part of a window
  int64_t items() const { return static_cast<int64_t>(own.size()) + (num_bags + kWindowBags - 1) / kWindowBags; }
};

// MLELLP_CPU_LANES=0 runs every bag alone (the tests compare the two).
bool lanes_enabled() {
  const char* env = std::getenv("MLELLP_CPU_LANES");
  return env == nullptr || std::string(env) != "0";
}

// ---- small bags in SIMD lanes (detail::posterior_lanes)
//
// Within a window, bags of 1..kLaneMaxInstances instances are bucketed by
// (n, y) with a counting sort and each group of up to L bags of one bucket
// runs in lock-step, one bag per vector lane (spare lanes of a short group get
// logits 0, results unused). Logits are gathered into the lane layout, and
// results scattered back, in the bags' own order: memory is read and written
// in sequence, and only the window's lane buffers (in cache) are accessed out
// of order. The window's other bags run alone, in order. The lane code is
// compiled for AVX2 and for the baseline ISA and chosen at run time.
#ifdef MLELLP_HAVE_LANES
using detail::kLaneMaxInstances;

// Cache-line alignment, so that lane buffers can be read as vectors.
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(size_t count) { return static_cast<T*>(::operator new(count * sizeof(T), kAlign)); }
  void deallocate(T* ptr, size_t) { ::operator delete(ptr, kAlign); }
  bool operator==(const AlignedAllocator&) const { return true; }
  bool operator!=(const AlignedAllocator&) const { return false; }
};

// One window's bags in lane groups, with the lane buffers; reused across windows.
template <typename T, int L>
struct Window {
  static constexpr int64_t kStride = kLaneMaxInstances + 1;  // key = n * kStride + y
  std::vector<int32_t> bucket_start, bucket_fill, bucket_group;
  static constexpr int32_t kAlone = -1, kElsewhere = -2;  // keys of bags outside the lanes
  std::vector<int32_t> key, lane_of;                // per bag of the window: (n, y) key, group * L + lane
  std::vector<int64_t> group_n, group_y, group_at;  // per group; group_at: offset in z_lanes / phi_lanes
  std::vector<T, AlignedAllocator<T>> z_lanes, phi_lanes;  // [group][i][lane], read as vectors
  std::vector<T> log_lik;
  std::unique_ptr<bool[]> ok;  // per group and lane
  int64_t ok_size = 0;
  detail::LaneWorkspace<T, L> ws;
};

template <typename T, int L, typename Alone>
MLELLP_ALWAYS_INLINE void run_window(int64_t begin, int64_t end, const Work<T>& work, Alone alone, Window<T, L>& w) {
  constexpr int64_t K = Window<T, L>::kStride * Window<T, L>::kStride;
  const int64_t* off = work.off;
  const int64_t bags = end - begin;
  w.bucket_start.assign(K + 1, 0);
  w.key.resize(static_cast<size_t>(bags));
  w.lane_of.resize(static_cast<size_t>(bags));
  for (int64_t b = begin; b < end; ++b) {  // keys and bucket sizes
    const int64_t n = off[b + 1] - off[b];
    int32_t key = Window<T, L>::kAlone;
    if (work.elsewhere(b)) {
      key = Window<T, L>::kElsewhere;
    } else if (n >= 1 && n <= kLaneMaxInstances) {
      key = static_cast<int32_t>(n * Window<T, L>::kStride + work.cnt[b]);
      ++w.bucket_start[key + 1];
    }
    w.key[b - begin] = key;
  }
  // Groups bucket by bucket; bucket_start becomes the first slot of each key.
  w.bucket_group.resize(K);
  w.group_n.clear();
  w.group_y.clear();
  w.group_at.clear();
  int64_t at = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int32_t size = w.bucket_start[k + 1];
    w.bucket_start[k + 1] = w.bucket_start[k] + size;
    w.bucket_group[k] = static_cast<int32_t>(w.group_n.size());
    const int64_t n = k / Window<T, L>::kStride, y = k % Window<T, L>::kStride;
    for (int32_t g = 0; g < size; g += L) {
      w.group_n.push_back(n);
      w.group_y.push_back(y);
      w.group_at.push_back(at);
      at += n * L;
    }
  }
  const auto groups = static_cast<int64_t>(w.group_n.size());
  w.z_lanes.assign(static_cast<size_t>(at), T(0));  // spare lanes keep logit 0
  w.phi_lanes.resize(static_cast<size_t>(at));
  w.log_lik.resize(static_cast<size_t>(groups * L));
  if (w.ok_size < groups * L) {
    w.ok_size = groups * L;
    w.ok = std::make_unique<bool[]>(static_cast<size_t>(w.ok_size));
  }
  // Gather in bag order; the window's other bags run now.
  w.bucket_fill.assign(w.bucket_start.begin(), w.bucket_start.end() - 1);
  for (int64_t b = begin; b < end; ++b) {
    const int32_t key = w.key[b - begin];
    if (key < 0) {
      if (key == Window<T, L>::kAlone) alone(b);
      continue;
    }
    const int32_t rank = w.bucket_fill[key]++ - w.bucket_start[key];
    const int32_t group = w.bucket_group[key] + rank / L, lane = rank % L;
    w.lane_of[b - begin] = group * L + lane;
    const int64_t n = w.group_n[group];
    T* dst = w.z_lanes.data() + w.group_at[group] + lane;
    const T* src = work.z + off[b];
    for (int64_t i = 0; i < n; ++i) dst[i * L] = src[i];
  }
  for (int64_t g = 0; g < groups; ++g) {
    detail::posterior_lanes<T, L>(w.group_n[g], w.group_y[g], w.z_lanes.data() + w.group_at[g],
                                  w.phi_lanes.data() + w.group_at[g], w.log_lik.data() + g * L, &w.ok[g * L], w.ws);
  }
  // Scatter in bag order; a lane whose scaled path failed (or whose logits
  // are not all finite) reruns its bag alone.
  for (int64_t b = begin; b < end; ++b) {
    if (w.key[b - begin] < 0) continue;
    const int32_t id = w.lane_of[b - begin], group = id / L, lane = id % L;
    if (!w.ok[id]) {
      alone(b);
      continue;
    }
    const int64_t n = w.group_n[group];
    const T* src = w.phi_lanes.data() + w.group_at[group] + lane;
    T* dst = work.phi + off[b];
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i * L];
    work.log_lik[b] = w.log_lik[id];
  }
}
#endif  // MLELLP_HAVE_LANES

// One thread's share: claim items until none is left. L: lanes per vector.
template <typename T, int L>
MLELLP_ALWAYS_INLINE void work_loop(Work<T>& work) {
  std::vector<T> bag_ws;  // grows to the largest bag run alone, reused
  const detail::SoloTeam solo;
  auto alone = [&](int64_t b) {
    const int64_t start = work.off[b], n = work.off[b + 1] - start, y = work.cnt[b];
    const auto need = static_cast<size_t>(detail::posterior_workspace(n, y, y));
    if (bag_ws.size() < need) bag_ws.resize(need);
    detail::posterior_bag(solo, work.z + start, n, y, y, work.phi + start, work.log_lik + b, bag_ws.data());
  };
#ifdef MLELLP_HAVE_LANES
  std::unique_ptr<Window<T, L>> window;
#endif
  const auto own = static_cast<int64_t>(work.own.size());
  for (int64_t i; (i = work.next.fetch_add(1, std::memory_order_relaxed)) < work.items();) {
    if (i < own) {
      alone(work.own[i]);
      continue;
    }
    const int64_t begin = (i - own) * kWindowBags, end = std::min(begin + kWindowBags, work.num_bags);
#ifdef MLELLP_HAVE_LANES
    if (work.lanes) {
      if (!window) window = std::make_unique<Window<T, L>>();
      run_window<T, L>(begin, end, work, alone, *window);
      continue;
    }
#endif
    for (int64_t b = begin; b < end; ++b) {
      if (!work.elsewhere(b)) alone(b);
    }
  }
}

template <typename T>
void work_baseline(Work<T>& work) {
  work_loop<T, 16 / sizeof(T)>(work);
}

#if defined(MLELLP_HAVE_LANES) && (defined(__x86_64__) || defined(__i386__))
#define MLELLP_HAVE_AVX2_LANES 1
// Without "fma": the compiler may not contract a * b + c, so lanes stay
// bitwise equal to the per-bag path.
template <typename T>
__attribute__((target("avx2"))) void work_avx2(Work<T>& work) {
  work_loop<T, 32 / sizeof(T)>(work);
}
#endif

// AVX2 where the CPU has it; MLELLP_CPU_LANES=sse selects the baseline code
// (the tests run both).
bool use_avx2() {
#ifdef MLELLP_HAVE_AVX2_LANES
  const char* env = std::getenv("MLELLP_CPU_LANES");
  static const bool has = __builtin_cpu_supports("avx2");
  return has && !(env != nullptr && std::string(env) == "sse");
#else
  return false;
#endif
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
    Work<scalar_t> work;
    work.z = z.data_ptr<scalar_t>();
    work.off = off.data_ptr<int64_t>();
    work.cnt = cnt.data_ptr<int64_t>();
    work.phi = phi.data_ptr<scalar_t>();
    work.log_lik = log_lik.data_ptr<scalar_t>();
    work.num_bags = num_bags;
    work.threads = at::get_num_threads();
    work.team_width = team_min_width();
    work.lanes = lanes_enabled();
    for (int64_t b = 0; b < num_bags; ++b) {
      if (work.team(b)) {  // huge bags first, all threads on each
        const int64_t start = work.off[b];
        posterior_bag_team<scalar_t>(work.threads, work.z + start, work.size(b), work.cnt[b], work.phi + start,
                                     work.log_lik + b);
      } else if (work.own_item(b)) {
        work.own.push_back(b);
      }
    }
    std::stable_sort(work.own.begin(), work.own.end(),
                     [&](int64_t a, int64_t b) { return work.cells(a) > work.cells(b); });
#ifdef MLELLP_HAVE_AVX2_LANES
    auto run = use_avx2() ? &work_avx2<scalar_t> : &work_baseline<scalar_t>;
#else
    auto run = &work_baseline<scalar_t>;
#endif
    at::parallel_for(0, std::min<int64_t>(work.threads, work.items()), 1,
                     [&](int64_t, int64_t) { run(work); });
  });
  return {phi.to(logits.scalar_type()), log_lik};
}

at::Tensor posterior_backward_cpu(const at::Tensor& grad_log_lik, const at::Tensor& phi, const at::Tensor& logits,
                                  const at::Tensor& offsets) {
  check_backward_layout("posterior_backward", grad_log_lik, phi, logits, offsets);
  const int64_t num_bags = offsets.numel() - 1;
  // The op is public: offsets from a caller, not only from posterior's autograd, index the loop.
  check_bag_values("posterior_backward", offsets, nullptr, logits.numel(), at::Tensor());
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
