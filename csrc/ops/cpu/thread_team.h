// The CPU team of the shared headers (see host_device.h): std::threads with a
// spinning barrier. The CPU posterior kernel runs one huge bag with it. (The
// C++ tests use a sleeping std::barrier instead: they run teams of up to 64
// threads on a couple of cores.)
#pragma once

#include <atomic>
#include <thread>

namespace mlellp {
namespace cpu {

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

}  // namespace cpu
}  // namespace mlellp
