// Per-bag arithmetic of the E-step, shared by the CPU and the CUDA kernels.
//
// A bag holds n instances with logits z_1..z_n, h_i ~ Bernoulli(sigmoid(z_i))
// independent, S = sum h_i. The caller observes that S lies in [ylo, yhi]
// (a single count y is ylo = yhi = y). Two recursions over the count k:
//
//   forward   a_i(k) = P(h_1 + .. + h_i = k)
//             a_i(k) = q_i a_{i-1}(k) + p_i a_{i-1}(k-1),          a_0 = [1]
//   backward  g_i(k) = P(k + h_{i+1} + .. + h_n in [ylo, yhi])
//             g_{i-1}(k) = q_i g_i(k) + p_i g_i(k+1),          g_n(k) = 1{k in [ylo, yhi]}
//
// with p_i = sigmoid(z_i), q_i = 1 - p_i. Then P(obs) = g_0(0) and
//   phi_i = P(h_i = 1 | obs)
//         = sum_k a_{i-1}(k) p_i g_i(k+1) / sum_k a_{i-1}(k) g_{i-1}(k).
// Because phi_i is a ratio of two sums over the same rows, no global scale
// enters it: rows may be rescaled freely. Only counts k that can still reach
// [ylo, yhi] are kept (the band lo(i)..hi(i)), so a bag costs O(n * W) with
// W = min(yhi, n - ylo) + 1 <= min(y, n - y) + 1.
//
// Two arithmetic paths:
//  * scaled: plain probabilities, each row rescaled by an exact power of two
//    (frexp) so its maximum lies in [0.5, 1). Everything is a sum of
//    non-negative products, so relative error stays O(n eps) *as long as no
//    entry underflows*. The path verifies that (every kept entry >= kTiny) and
//    reports failure otherwise. It is ~10x cheaper than log space (no
//    exp/log per cell), which is why it is tried first.
//  * log: log-probabilities with log-add-exp per cell. Exact for any logits,
//    including +-1e4 and +-inf; used when the scaled path reports failure or
//    the bag holds an infinite logit.
//
// The target set is given as [ylo, yhi] so that ops conditioning on a set of
// counts can reuse this file unchanged; the posterior op passes ylo = yhi.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

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

// Smallest row entry (relative to a row maximum in [0.5, 1)) the scaled path
// accepts. Products of such an entry with any p_i or q_i that matters stay
// normal numbers, and anything lost to underflow is below eps relative to
// what it is added to (see the argument at the top of the file).
template <typename T> MLELLP_HD T tiny_value();
template <> MLELLP_HD float tiny_value<float>() { return 1.0e-30f; }    // 2^24 * FLT_MIN ~ 2e-31
template <> MLELLP_HD double tiny_value<double>() { return 1.0e-290; }  // 2^53 * DBL_MIN ~ 2e-292

// log(exp(a) + exp(b)) with -inf handled exactly (lae(-inf, b) == b bitwise).
template <typename T> MLELLP_HD T log_add_exp(T a, T b) {
  if (a == -inf_value<T>()) return b;
  if (b == -inf_value<T>()) return a;
  return a > b ? a + m_log1p(m_exp(b - a)) : b + m_log1p(m_exp(a - b));
}

// p = sigmoid(z), q = sigmoid(-z) without cancellation; exact 0/1 at +-inf.
template <typename T> MLELLP_HD void sigmoid_pair(T z, T* p, T* q) {
  T e = m_exp(z >= T(0) ? -z : z);  // in (0, 1]
  T big = T(1) / (T(1) + e);
  T small = e * big;
  *p = z >= T(0) ? big : small;
  *q = z >= T(0) ? small : big;
}

// log sigmoid(z), log sigmoid(-z).
template <typename T> MLELLP_HD void log_sigmoid_pair(T z, T* lp, T* lq) {
  T a = z >= T(0) ? z : -z;
  T l = m_log1p(m_exp(-a));  // log(1 + e^-|z|)
  *lp = (z >= T(0) ? T(0) : z) - l;
  *lq = (z >= T(0) ? -z : T(0)) - l;
}

// ---- band of counts kept after i instances
struct Band {
  int64_t n, ylo, yhi;
  MLELLP_HD int64_t lo(int64_t i) const { return imax(0, ylo - (n - i)); }
  MLELLP_HD int64_t hi(int64_t i) const { return imin(i, yhi); }
  // Widest row: hi - lo <= yhi and hi - lo <= n - ylo.
  MLELLP_HD int64_t width() const { return imin(yhi, n - ylo) + 1; }
};

// Workspace (in elements of T) that posterior_bag needs for one bag.
MLELLP_HD int64_t posterior_workspace(int64_t n, int64_t ylo, int64_t yhi) {
  if (n == 0) return 0;
  Band band{n, ylo, yhi};
  int64_t w = band.width();
  return 2 * n + n * w + 2 * w;  // p and q; forward rows 0..n-1; two rolling backward rows
}

// Exponent e with x = f * 2^e, f in [0.5, 1), and the exact factor 2^-e, by
// bit manipulation (frexp/ldexp are library calls on the host and cost ~15%
// of a small bag). x must be a positive normal number not above 2.
MLELLP_HD void pow2_normalizer(float x, int* e, float* scale) {
#ifdef __CUDA_ARCH__
  const uint32_t bits = __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
#endif
  *e = static_cast<int>((bits >> 23) & 0xffu) - 126;
  const uint32_t sbits = static_cast<uint32_t>(127 - *e) << 23;
#ifdef __CUDA_ARCH__
  *scale = __uint_as_float(sbits);
#else
  std::memcpy(scale, &sbits, sizeof sbits);
#endif
}
MLELLP_HD void pow2_normalizer(double x, int* e, double* scale) {
#ifdef __CUDA_ARCH__
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
#endif
  *e = static_cast<int>((bits >> 52) & 0x7ffu) - 1022;
  const uint64_t sbits = static_cast<uint64_t>(1023 - *e) << 52;
#ifdef __CUDA_ARCH__
  *scale = __longlong_as_double(static_cast<long long>(sbits));
#else
  std::memcpy(scale, &sbits, sizeof sbits);
#endif
}
template <typename T> MLELLP_HD T min_normal();
template <> MLELLP_HD float min_normal<float>() { return 1.17549435e-38f; }
template <> MLELLP_HD double min_normal<double>() { return 2.2250738585072014e-308; }

// Rescale row[0..len) by a power of two so its maximum is in [0.5, 1).
// Returns false if the maximum is zero or subnormal or, after rescaling, an
// entry is below tiny_value (a possible loss of precision). *exponent += shift.
template <typename T>
MLELLP_HD bool normalize_row(T* row, int64_t len, T row_max, int64_t* exponent) {
  if (!(row_max >= min_normal<T>()) || row_max > T(2)) return false;
  int e;
  T scale;
  pow2_normalizer(row_max, &e, &scale);
  const T tiny = tiny_value<T>();
  bool ok = true;
  for (int64_t k = 0; k < len; ++k) {
    row[k] *= scale;
    ok &= row[k] >= tiny;
  }
  *exponent += e;
  return ok;
}

// Log-space rows are kept with maximum 0 so that phi, a difference of two
// log-sums, is not computed from numbers of magnitude ~n (float32 would lose
// digits). Returns the shift (0 for an all -inf row, which stays as it is).
template <typename T>
MLELLP_HD T shift_log_row(T* row, int64_t len, T row_max) {
  if (row_max == -inf_value<T>()) return T(0);
  for (int64_t k = 0; k < len; ++k) row[k] -= row_max;
  return row_max;
}

// ---------------------------------------------------------------------------
// Scaled path of the posterior. Writes phi[0..n) and *log_lik; returns false
// (outputs then undefined) if it cannot guarantee full relative precision.
// p, q must already hold sigmoid(z), sigmoid(-z).
template <typename T>
MLELLP_HD bool posterior_scaled(const T* p, const T* q, int64_t n, int64_t ylo, int64_t yhi,
                                T* phi, T* log_lik, T* rows, T* g_cur, T* g_next) {
  const Band band{n, ylo, yhi};
  const int64_t W = band.width();
  const T tiny = tiny_value<T>();
  int64_t unused_exponent = 0;

  // Forward rows 0..n-1, row i at rows + i*W, entry k at k - lo(i).
  rows[0] = T(1);
  for (int64_t i = 1; i < n; ++i) {
    const int64_t lo = band.lo(i), hi = band.hi(i);
    const int64_t plo = band.lo(i - 1), phi_ = band.hi(i - 1);
    const T* prev = rows + (i - 1) * W;
    T* cur = rows + i * W;
    const T pi = p[i - 1], qi = q[i - 1];
    T row_max = T(0);
    for (int64_t k = lo; k <= hi; ++k) {
      const T stay = k <= phi_ ? prev[k - plo] : T(0);
      const T step = k - 1 >= plo ? prev[k - 1 - plo] : T(0);
      const T v = qi * stay + pi * step;
      cur[k - lo] = v;
      row_max = v > row_max ? v : row_max;
    }
    if (!normalize_row(cur, hi - lo + 1, row_max, &unused_exponent)) return false;
  }

  // Backward, combining with the stored forward row of each instance.
  int64_t exponent = 0;
  {
    const int64_t lo = band.lo(n), hi = band.hi(n);
    for (int64_t k = lo; k <= hi; ++k) g_cur[k - lo] = T(1);
  }
  for (int64_t i = n; i >= 1; --i) {
    const int64_t lo = band.lo(i), hi = band.hi(i);          // band of g_i
    const int64_t plo = band.lo(i - 1), phi_ = band.hi(i - 1);  // band of a_{i-1}, g_{i-1}
    const T* a = rows + (i - 1) * W;
    const T pi = p[i - 1], qi = q[i - 1];
    T num = T(0), den = T(0), row_max = T(0);
    for (int64_t k = plo; k <= phi_; ++k) {
      const T g_k = (k >= lo && k <= hi) ? g_cur[k - lo] : T(0);
      const T g_k1 = (k + 1 >= lo && k + 1 <= hi) ? g_cur[k + 1 - lo] : T(0);
      // t1 is shared by num and den so that y = n gives phi exactly 1.
      const T t1 = pi * g_k1;
      const T g_new = qi * g_k + t1;
      num += a[k - plo] * t1;
      den += a[k - plo] * g_new;
      g_next[k - plo] = g_new;
      row_max = g_new > row_max ? g_new : row_max;
    }
    // A den this small may have lost terms to underflow.
    if (!(den >= tiny * T(W))) return false;
    phi[i - 1] = num / den;
    if (!normalize_row(g_next, phi_ - plo + 1, row_max, &exponent)) return false;
    T* t = g_cur; g_cur = g_next; g_next = t;
  }
  // g_0(0) * 2^exponent = P(obs); g_0(0) in [0.5, 1).
  *log_lik = m_log(g_cur[0]) + static_cast<T>(exponent) * static_cast<T>(0.69314718055994530942);
  return true;
}

// Log path of the posterior: same recursions in log space. Exact for any
// non-NaN logits. lp, lq hold log sigmoid(z), log sigmoid(-z).
template <typename T>
MLELLP_HD void posterior_log(const T* lp, const T* lq, int64_t n, int64_t ylo, int64_t yhi,
                             T* phi, T* log_lik, T* rows, T* g_cur, T* g_next) {
  const Band band{n, ylo, yhi};
  const int64_t W = band.width();
  const T ninf = -inf_value<T>();

  rows[0] = T(0);
  for (int64_t i = 1; i < n; ++i) {
    const int64_t lo = band.lo(i), hi = band.hi(i);
    const int64_t plo = band.lo(i - 1), phi_ = band.hi(i - 1);
    const T* prev = rows + (i - 1) * W;
    T* cur = rows + i * W;
    const T lpi = lp[i - 1], lqi = lq[i - 1];
    T row_max = ninf;
    for (int64_t k = lo; k <= hi; ++k) {
      const T stay = k <= phi_ ? lqi + prev[k - plo] : ninf;
      const T step = k - 1 >= plo ? lpi + prev[k - 1 - plo] : ninf;
      cur[k - lo] = log_add_exp(stay, step);
      row_max = cur[k - lo] > row_max ? cur[k - lo] : row_max;
    }
    shift_log_row(cur, hi - lo + 1, row_max);
  }

  T log_offset = T(0);  // log of what the backward rows were divided by
  {
    const int64_t lo = band.lo(n), hi = band.hi(n);
    for (int64_t k = lo; k <= hi; ++k) g_cur[k - lo] = T(0);
  }
  for (int64_t i = n; i >= 1; --i) {
    const int64_t lo = band.lo(i), hi = band.hi(i);
    const int64_t plo = band.lo(i - 1), phi_ = band.hi(i - 1);
    const T* a = rows + (i - 1) * W;
    const T lpi = lp[i - 1], lqi = lq[i - 1];
    T num = ninf, den = ninf, row_max = ninf;
    for (int64_t k = plo; k <= phi_; ++k) {
      const T g_k = (k >= lo && k <= hi) ? lqi + g_cur[k - lo] : ninf;
      const T t1 = (k + 1 >= lo && k + 1 <= hi) ? lpi + g_cur[k + 1 - lo] : ninf;
      const T g_new = log_add_exp(g_k, t1);
      num = log_add_exp(num, a[k - plo] + t1);
      den = log_add_exp(den, a[k - plo] + g_new);
      g_next[k - plo] = g_new;
      row_max = g_new > row_max ? g_new : row_max;
    }
    // den == -inf: the observation is impossible; the caller marks phi NaN.
    phi[i - 1] = num == ninf ? (den == ninf ? nan_value<T>() : T(0)) : m_exp(num - den);
    log_offset += shift_log_row(g_next, phi_ - plo + 1, row_max);
    T* t = g_cur; g_cur = g_next; g_next = t;
  }
  *log_lik = g_cur[0] + log_offset;
}

// ---------------------------------------------------------------------------
// One bag of the posterior op. z: n logits; counts condition S in [ylo, yhi]
// (0 <= ylo <= yhi <= n, validated by the caller). ws: posterior_workspace().
// Outputs: phi[0..n) = P(h_i = 1 | obs), *log_lik = log P(obs).
// NaN logit -> NaN everywhere in the bag; impossible observation (only with
// infinite logits) -> log_lik = -inf and phi = NaN.
template <typename T>
MLELLP_HD void posterior_bag(const T* z, int64_t n, int64_t ylo, int64_t yhi, T* phi, T* log_lik,
                             T* ws) {
  if (n == 0) {
    *log_lik = T(0);
    return;
  }
  const int64_t W = Band{n, ylo, yhi}.width();
  T* p = ws;
  T* q = ws + n;
  T* rows = ws + 2 * n;
  T* g0 = rows + n * W;
  T* g1 = g0 + W;

  bool any_nan = false, any_inf = false;
  for (int64_t i = 0; i < n; ++i) {
    const T zi = z[i];
    any_nan |= is_nan(zi);
    any_inf |= is_inf(zi);
    sigmoid_pair(zi, p + i, q + i);
  }
  if (any_nan) {
    for (int64_t i = 0; i < n; ++i) phi[i] = nan_value<T>();
    *log_lik = nan_value<T>();
    return;
  }
  if (any_inf || !posterior_scaled(p, q, n, ylo, yhi, phi, log_lik, rows, g0, g1)) {
    for (int64_t i = 0; i < n; ++i) log_sigmoid_pair(z[i], p + i, q + i);
    posterior_log(p, q, n, ylo, yhi, phi, log_lik, rows, g0, g1);
  }
  if (*log_lik == -inf_value<T>()) {
    for (int64_t i = 0; i < n; ++i) phi[i] = nan_value<T>();
  }
}

// One bag of log_pmf: out[k] = log P(S = k), k = 0..n. The recursion runs in
// place in out, so no workspace is needed.
template <typename T>
MLELLP_HD void log_pmf_bag(const T* z, int64_t n, T* out) {
  T* row = out;
  bool any_nan = false, any_inf = false;
  for (int64_t i = 0; i < n; ++i) {
    any_nan |= is_nan(z[i]);
    any_inf |= is_inf(z[i]);
  }
  if (any_nan) {
    for (int64_t k = 0; k <= n; ++k) out[k] = nan_value<T>();
    return;
  }
  if (!any_inf) {
    // Scaled path: the row is updated in place, highest k first.
    bool ok = true;
    int64_t exponent = 0;
    row[0] = T(1);
    for (int64_t i = 1; i <= n && ok; ++i) {
      T pi, qi;
      sigmoid_pair(z[i - 1], &pi, &qi);
      row[i] = pi * row[i - 1];
      T row_max = row[i];
      for (int64_t k = i - 1; k >= 1; --k) {
        row[k] = qi * row[k] + pi * row[k - 1];
        row_max = row[k] > row_max ? row[k] : row_max;
      }
      row[0] = qi * row[0];
      row_max = row[0] > row_max ? row[0] : row_max;
      ok = normalize_row(row, i + 1, row_max, &exponent);
    }
    if (ok) {
      const T shift = static_cast<T>(exponent) * static_cast<T>(0.69314718055994530942);
      for (int64_t k = 0; k <= n; ++k) row[k] = m_log(row[k]) + shift;
      return;
    }
  }
  // Log path.
  row[0] = T(0);
  for (int64_t i = 1; i <= n; ++i) {
    T lpi, lqi;
    log_sigmoid_pair(z[i - 1], &lpi, &lqi);
    row[i] = lpi + row[i - 1];
    for (int64_t k = i - 1; k >= 1; --k) row[k] = log_add_exp(lqi + row[k], lpi + row[k - 1]);
    row[0] = lqi + row[0];
  }
}

// Gradient of log P(obs) w.r.t. the logits: g * (phi_i - sigmoid(z_i)).
// For +-inf logits sigmoid is exactly 0/1 and so is phi, giving 0.
template <typename T>
MLELLP_HD T log_lik_grad(T grad_out, T phi, T z) {
  T p, q;
  sigmoid_pair(z, &p, &q);
  return grad_out * (phi - p);
}

}  // namespace detail
}  // namespace mlellp
