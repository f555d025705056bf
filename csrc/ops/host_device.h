// What the per-bag and per-image arithmetic shared by the CPU and the CUDA
// kernels needs beside itself: the host/device marker, math helpers with
// explicit float/double overloads, and the one-thread team.
//
// Teams: who runs a cooperative algorithm (bag_recursion.h's skeleton,
// multiclass_recursion.h's team runner, augment_image.h). Every member calls the
// function; loops are strided by size(), and reduce() combines per-member
// partial values in a fixed order (deterministic for a given team size; it also
// orders memory: after it returns, every member's earlier writes are visible).
//   SoloTeam            one thread (the CPU kernels; CUDA for small bags);
//   ThreadTeam          std::threads with a barrier (cpu/thread_team.h; the C++
//                       tests run every team algorithm with threads too);
//   BlockTeam           a CUDA thread block (cuda/block_team.cuh).
#pragma once

#include <cmath>
#include <cstdint>

// Force-inlined on the device; inline on the host, where a kernel compiled in
// per-ISA clones flattens them into each clone (cpu/augment_images_cpu.cpp).
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MLELLP_HD __host__ __device__ __forceinline__
#else
#define MLELLP_HD inline
#endif

namespace mlellp {
namespace detail {

// ---- small math helpers with explicit float/double overloads (host and device)
MLELLP_HD float m_exp(float x) { return ::expf(x); }
MLELLP_HD double m_exp(double x) { return ::exp(x); }
MLELLP_HD float m_log(float x) { return ::logf(x); }
MLELLP_HD double m_log(double x) { return ::log(x); }
MLELLP_HD float m_log1p(float x) { return ::log1pf(x); }
MLELLP_HD double m_log1p(double x) { return ::log1p(x); }

template <typename T> MLELLP_HD T inf_value() { return static_cast<T>(INFINITY); }
template <typename T> MLELLP_HD T nan_value() { return static_cast<T>(NAN); }
template <typename T> MLELLP_HD bool is_nan(T x) { return x != x; }
template <typename T> MLELLP_HD bool is_inf(T x) { return x == inf_value<T>() || x == -inf_value<T>(); }
MLELLP_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
MLELLP_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
template <typename T> MLELLP_HD T min_normal();
template <> MLELLP_HD float min_normal<float>() { return 1.17549435e-38f; }
template <> MLELLP_HD double min_normal<double>() { return 2.2250738585072014e-308; }
template <typename T> MLELLP_HD T unit_roundoff();
template <> MLELLP_HD float unit_roundoff<float>() { return 5.9604645e-8f; }
template <> MLELLP_HD double unit_roundoff<double>() { return 1.1102230246251565e-16; }

struct SoloTeam {
  MLELLP_HD constexpr int rank() const { return 0; }
  MLELLP_HD constexpr int size() const { return 1; }
  MLELLP_HD void sync() const {}
  template <typename T, typename Op>
  MLELLP_HD void reduce(T* /*values*/, int /*count*/, Op /*op*/) const {}
};

}  // namespace detail
}  // namespace mlellp
