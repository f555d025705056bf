// The phi_jvp op's per-bag function (host and device).
#pragma once

#include "bag_recursion.h"

namespace mlellp {
namespace detail {

// Jacobian of phi times a tangent u, for one bag with count y:
//   out_i = sum_j d phi_i / d z_j u_j = sum_j Cov(h_i, h_j | S = y) u_j
//         = E[h_i T | S = y] - phi_i E[T | S = y],   T = sum_j h_j u_j.
// The Jacobian is symmetric, so this is both the forward- (jvp) and the
// reverse-mode (vjp) product. Rows carry, beside log a_i(k) (as LogArith), the
// conditional mean m_i(k) = E[T_{<=i} | S_{<=i} = k]; each step mixes the two
// ways into count k with weights that sum to 1,
//   m_i(k) = w0 m_{i-1}(k) + w1 (m_{i-1}(k-1) + u_i),
// so m never overflows; the backward rows carry E[T_{>i} | k + S_{>i} = y] the
// same way. Precision, since out_i is a difference of such means:
//  * u is centred on its bag mean (Cov(h_i, S | S = y) = 0: nothing changes but
//    the rounding);
//  * for y > n / 2 the bag is complemented (h -> 1 - h, z -> -z, y -> n - y; the
//    covariance is the same), so T sums over the fewer positives and its means
//    stay small instead of growing as random walks over most of the bag;
//  * log rows are shifted to a maximum of 0 after each step, and each out_i is
//    normalised by its own sum_k a_{i-1}(k) g_{i-1}(k), so no log-value grows
//    with n (they reach -0.7 n otherwise, and float32 loses all accuracy).
// The kernels run it in float64 whatever the input dtype. Log space throughout
// (exp per cell): this op is for phi's derivatives, rarer than the E-step.
// Forward rows are checkpointed every s = checkpoint_block(n) rows (~sqrt(n), or
// the whole bag up to 256) and recomputed a block at a time in the backward sweep:
// memory O((n / s + s) W), W = min(y, n - y) + 1.
// Workspace entries (of T) phi_jvp_bag needs; 0 where phi is constant (y = 0 or n).
MLELLP_HD int64_t phi_jvp_workspace(int64_t n, int64_t y) {
  if (y <= 0 || y >= n) return 0;
  const int64_t W = imin(y, n - y) + 1, s = checkpoint_block(n);
  return 2 * W * ((n + s - 1) / s + s + 2);
}

// log sigmoid(+-z) of instance i of the possibly complemented bag.
template <typename T>
MLELLP_HD void phi_jvp_logs(T z, bool flip, T* lp, T* lq) {
  if (flip) {
    log_sigmoid_pair(z, lq, lp);
  } else {
    log_sigmoid_pair(z, lp, lq);
  }
}

// Shift a log row to a maximum of 0 (weights within a step and each out_i's
// normaliser do not depend on a row's shift).
template <typename T>
MLELLP_HD void phi_jvp_shift(T* row, int64_t len) {
  T mx = -inf_value<T>();
  for (int64_t k = 0; k < len; ++k) mx = row[k] > mx ? row[k] : mx;
  if (mx == -inf_value<T>() || is_nan(mx)) return;
  for (int64_t k = 0; k < len; ++k) row[k] -= mx;
}

// Row i of the forward recursion from row i - 1 (log a in la, conditional mean in m).
template <typename T>
MLELLP_HD void phi_jvp_forward_row(const Band& band, int64_t i, T lp, T lq, T u, const T* la0, const T* m0,
                                   T* la1, T* m1) {
  const int64_t lo0 = band.lo(i - 1), hi0 = band.hi(i - 1), lo1 = band.lo(i), hi1 = band.hi(i);
  for (int64_t k = lo1; k <= hi1; ++k) {
    const bool off = k >= lo0 && k <= hi0, on = k - 1 >= lo0 && k - 1 <= hi0;  // h_i = 0 / h_i = 1
    const T a0 = off ? lq + la0[k - lo0] : -inf_value<T>();
    const T a1 = on ? lp + la0[k - 1 - lo0] : -inf_value<T>();
    const T l = log_add_exp(a0, a1);
    la1[k - lo1] = l;
    if (l == -inf_value<T>()) {  // count k unreachable: its mean is never weighted
      m1[k - lo1] = T(0);
      continue;
    }
    m1[k - lo1] = (off ? m_exp(a0 - l) * m0[k - lo0] : T(0)) + (on ? m_exp(a1 - l) * (m0[k - 1 - lo0] + u) : T(0));
  }
  phi_jvp_shift(la1, hi1 - lo1 + 1);
}

// Row i - 1 of the backward recursion from row i (left unshifted: the caller
// shifts it once it has used it beside row i).
template <typename T>
MLELLP_HD void phi_jvp_backward_row(const Band& band, int64_t i, T lp, T lq, T u, const T* lg1, const T* n1,
                                    T* lg0, T* n0) {
  const int64_t lo0 = band.lo(i - 1), hi0 = band.hi(i - 1), lo1 = band.lo(i), hi1 = band.hi(i);
  for (int64_t k = lo0; k <= hi0; ++k) {
    const bool off = k >= lo1 && k <= hi1, on = k + 1 >= lo1 && k + 1 <= hi1;
    const T a0 = off ? lq + lg1[k - lo1] : -inf_value<T>();
    const T a1 = on ? lp + lg1[k + 1 - lo1] : -inf_value<T>();
    const T l = log_add_exp(a0, a1);
    lg0[k - lo0] = l;
    if (l == -inf_value<T>()) {
      n0[k - lo0] = T(0);
      continue;
    }
    n0[k - lo0] = (off ? m_exp(a0 - l) * n1[k - lo1] : T(0)) + (on ? m_exp(a1 - l) * (n1[k + 1 - lo1] + u) : T(0));
  }
}

// out[0..n) = Cov(h | S = y) u for one bag (z, u: its n logits and tangents;
// 0 <= y <= n validated by the caller). ws: phi_jvp_workspace(n, y) entries.
// NaN for a bag whose count infinite logits make impossible (phi is NaN there too).
template <typename T>
MLELLP_HD void phi_jvp_bag(const T* z, const T* u_in, int64_t n, int64_t y_in, T* out, T* ws) {
  if (y_in <= 0 || y_in >= n) {  // phi is exactly 0 or 1 whatever the logits
    for (int64_t i = 0; i < n; ++i) out[i] = T(0);
    return;
  }
  const bool flip = 2 * y_in > n;
  const int64_t y = flip ? n - y_in : y_in;
  const Band band{n, y, y};
  const int64_t W = band.width(), s = checkpoint_block(n), num_ck = (n + s - 1) / s;
  T* ck_la = ws;                       // checkpoints: rows 0, s, 2s, ... < n
  T* ck_m = ck_la + num_ck * W;
  T* blk_la = ck_m + num_ck * W;       // one block of forward rows, recomputed
  T* blk_m = blk_la + s * W;
  T* ra = blk_m + s * W;               // two rolling rows (la/lg, m/n) x 2
  T* rb = ra + 2 * W;
  T mean = T(0);
  for (int64_t i = 0; i < n; ++i) mean += u_in[i];
  mean /= static_cast<T>(n);
  // Forward pass to row n: checkpoints, then E[T | S = y].
  ra[0] = T(0);      // row 0: count 0 with probability 1
  ra[W] = T(0);
  for (int64_t i = 0; i < n; ++i) {
    if (i % s == 0) {
      for (int64_t k = 0; k <= band.hi(i) - band.lo(i); ++k) {
        ck_la[(i / s) * W + k] = ra[k];
        ck_m[(i / s) * W + k] = ra[W + k];
      }
    }
    T lp, lq;
    phi_jvp_logs(z[i], flip, &lp, &lq);
    phi_jvp_forward_row(band, i + 1, lp, lq, u_in[i] - mean, ra, ra + W, rb, rb + W);
    T* t = ra; ra = rb; rb = t;
  }
  const T mean_t = ra[W];  // row n holds only count y
  // Backward sweep: g_n = 1 at count y.
  ra[0] = T(0);
  ra[W] = T(0);
  for (int64_t blk = num_ck - 1; blk >= 0; --blk) {
    const int64_t first = blk * s, last = imin(first + s, n);  // forward rows first .. last - 1
    for (int64_t k = 0; k <= band.hi(first) - band.lo(first); ++k) {
      blk_la[k] = ck_la[blk * W + k];
      blk_m[k] = ck_m[blk * W + k];
    }
    for (int64_t r = first + 1; r < last; ++r) {
      T lp, lq;
      phi_jvp_logs(z[r - 1], flip, &lp, &lq);
      phi_jvp_forward_row(band, r, lp, lq, u_in[r - 1] - mean, blk_la + (r - 1 - first) * W,
                          blk_m + (r - 1 - first) * W, blk_la + (r - first) * W, blk_m + (r - first) * W);
    }
    for (int64_t i = last; i > first; --i) {  // instance i (1-based): forward row i - 1, backward rows i, i - 1
      T lp, lq;
      phi_jvp_logs(z[i - 1], flip, &lp, &lq);
      const T u = u_in[i - 1] - mean;
      const T* la = blk_la + (i - 1 - first) * W;
      const T* m = blk_m + (i - 1 - first) * W;
      phi_jvp_backward_row(band, i, lp, lq, u, ra, ra + W, rb, rb + W);
      const int64_t lo0 = band.lo(i - 1), hi0 = band.hi(i - 1), lo1 = band.lo(i), hi1 = band.hi(i);
      // log of sum_k a_{i-1}(k) g_{i-1}(k) = P(S = y) under these rows' shifts
      T log_p = -inf_value<T>();
      for (int64_t k = lo0; k <= hi0; ++k) log_p = log_add_exp(log_p, la[k - lo0] + rb[k - lo0]);
      T acc = T(0);
      for (int64_t k = lo0; k <= hi0; ++k) {
        if (k + 1 < lo1 || k + 1 > hi1) continue;
        const T w = m_exp(la[k - lo0] + lp + ra[k + 1 - lo1] - log_p);  // P(h_i = 1, S_<i = k | S = y)
        if (w != T(0)) acc += w * (m[k - lo0] + u + ra[W + k + 1 - lo1] - mean_t);
      }
      // (complemented: Cov(1 - h_i, 1 - h_j) = Cov(h_i, h_j), so out needs no change)
      // A certain label (infinite logit) has zero covariance with everything: exactly 0,
      // where acc would be a sum of terms that cancel only up to rounding (NaN, as for the
      // whole bag, where the tangent is not finite).
      const bool certain = lp == -inf_value<T>() || lq == -inf_value<T>();
      const bool finite_tangent = !is_nan(mean) && !is_inf(mean);
      out[i - 1] = log_p == -inf_value<T>() ? nan_value<T>()
                   : certain ? (finite_tangent ? T(0) : nan_value<T>()) : acc;
      phi_jvp_shift(rb, hi0 - lo0 + 1);
      T* t = ra; ra = rb; rb = t;
    }
  }
}

}  // namespace detail
}  // namespace mlellp
