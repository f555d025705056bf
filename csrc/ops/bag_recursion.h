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
// Two arithmetic policies run the same skeleton (posterior_recursion):
//  * ScaledArith: plain probabilities, each row rescaled by an exact power of
//    two, entries below tiny_value relative to the row maximum flushed to 0.
//    All terms are non-negative, so the only hazard is what flushing and
//    underflow drop; the path bounds that by the overlap of forward and
//    backward rows and reports failure when it cannot vouch for the result.
//    ~10x cheaper than log space (no exp/log per cell), so it is tried first.
//    Large bags are exponentially tilted first so that forward and backward
//    rows peak at the same counts (see tilt_towards).
//  * LogArith: log-probabilities with log-add-exp per cell. Exact for any
//    logits, including +-1e4 and +-inf; used when the scaled path reports
//    failure or the bag holds an infinite logit.
// Forward rows are checkpointed (memory O((n/s + s) W), s ~ sqrt(n) for large
// bags), and the skeleton is written for a team of threads (SoloTeam: one
// thread per bag; a CPU thread team or a CUDA block for wide bags; see
// host_device.h). cpu/lanes.h runs ScaledArith's recursion on L small bags at
// once, one per SIMD lane. The ops' per-bag functions are beside this file:
// posterior_bag.h, posterior_weighted_bag.h, log_pmf_bag.h, phi_jvp_bag.h.
//
// The target set is given as [ylo, yhi] so that ops conditioning on a set of
// counts can reuse this file unchanged; the posterior op passes ylo = yhi.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "host_device.h"

namespace mlellp {
namespace detail {


// Smallest row entry (relative to a row maximum in [0.5, 1)) the scaled path
// accepts; smaller ones are flushed to 0. What flushing, and products of such
// entries with a tiny p_i or q_i that underflow (see row_floor), can cost is
// bounded by the overlap test (see ScaledArith).
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

// Smallest maximum of a freshly computed row, relative to the row it came from
// (whose maximum is in [0.5, 1]), that ScaledArith accepts. A row's maximum
// falls far only where the band forces a label of tiny probability (y = n - 1
// in a bag of logits -400, -900, -400; in float32, any p_i below ~1e-13, i.e.
// |z_i| > ~30). Its entries are sums of two products c * x that may be
// subnormal; with p_i itself possibly subnormal (exp's and the sigmoid's own
// rounding, 2 ulp for CUDA's expf), an entry's absolute error stays below
// 12 u min_normal. At or above this floor that is below tiny_value relative to
// the row, so the flushing bound covers it, and the overlap test's
// den = sum_k a(k) g(k), a product of two such rows, keeps a relative error
// below u / n instead of underflowing to 0 (which made 0 / 0).
// Needed: floor >= 12 u min_normal / tiny = 3.0e-33 (double), 8.4e-15 (float);
// the values below leave a factor of over 10. This assumes gradual underflow
// (the default): with flush-to-zero (torch.set_flush_denormal(True)) a product
// may lose up to min_normal, the overlap test still refuses a 0 / 0, but the
// float32 precision bound is then ~1e-25 relative per entry instead of tiny.
template <typename T> MLELLP_HD T row_floor();
template <> MLELLP_HD float row_floor<float>() { return 1.0e-13f; }
template <> MLELLP_HD double row_floor<double>() { return 1.0e-31; }

// Rescale row[0..len) by a power of two so its maximum is in [0.5, 1), for
// log_pmf, whose every entry must keep full relative precision. Returns false
// if the maximum is zero, subnormal or not finite, or if an entry ends below
// tiny_value. *exponent += shift. (The posterior's ScaledArith flushes such
// entries instead and bounds their effect.)
template <typename T>
MLELLP_HD bool normalize_row(T* row, int64_t len, T row_max, int64_t* exponent) {
  if (!(row_max >= min_normal<T>()) || is_inf(row_max)) return false;
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

// ---------------------------------------------------------------------------
// Arithmetic policies of the recursion skeleton below: the same code runs on
// probabilities (ScaledArith) and on log-probabilities (LogArith).
//
// ScaledArith rescales rows by powers of two and flushes entries below
// tiny_value (relative to the row maximum) to zero. What flushing or
// underflow can cost is bounded: an entry error d_j(k) at row j changes
// P(obs) = sum_k a_j(k) g_j(k) by d_j(k) g_j(k) (the recursion preserves that
// pairing), so the total relative error is at most
//   2 n W tiny / min_j overlap_j,  overlap_j = sum_k a_j(k) g_j(k) / (max a_j * max g_j).
// Each overlap is the `den` of one backward step, so the path checks
// overlap_j >= overlap_floor = 2 n W tiny / eps and reports failure (the bag
// then takes LogArith) otherwise. Typical bags pass with a wide margin.
// Underflow within a row is kept below tiny as well: a row whose maximum falls
// under row_floor (see there) fails too.

template <typename T>
struct ScaledArith {
  const T* p;  // sigmoid(z)
  const T* q;  // sigmoid(-z)
  T overlap_floor;
  int64_t exponent;  // backward rows were multiplied by 2^-exponent in total

  MLELLP_HD ScaledArith(const T* p_, const T* q_, int64_t n, int64_t W)
      : p(p_), q(q_), overlap_floor(tiny_value<T>() * T(2 * n * W) / unit_roundoff<T>()), exponent(0) {}
  MLELLP_HD T zero() const { return T(0); }
  MLELLP_HD T one() const { return T(1); }
  MLELLP_HD T pos(int64_t i) const { return p[i]; }
  MLELLP_HD T neg(int64_t i) const { return q[i]; }
  MLELLP_HD T mul(T a, T b) const { return a * b; }
  MLELLP_HD T add(T a, T b) const { return a + b; }
  // Every team member calls this with the same row_max and scales its own
  // strided entries; all reach the same verdict and exponent.
  template <typename Team>
  MLELLP_HD bool normalize(const Team& team, T* row, int64_t len, T row_max, bool backward) {
    if (!(row_max >= row_floor<T>()) || is_inf(row_max)) return false;
    int e;
    T scale;
    pow2_normalizer(row_max, &e, &scale);
    const T tiny = tiny_value<T>();
    for (int64_t k = team.rank(); k < len; k += team.size()) {
      const T v = row[k] * scale;
      row[k] = v >= tiny ? v : T(0);  // flushing also avoids slow subnormal arithmetic
    }
    if (backward) exponent += e;
    return true;
  }
  MLELLP_HD bool ratio(T num, T den, T g_max, T* out) const {
    if (!(den >= overlap_floor * g_max)) return false;
    *out = num / den;
    return true;
  }
  MLELLP_HD T log_lik(T g0) const {
    return m_log(g0) + static_cast<T>(exponent) * static_cast<T>(0.69314718055994530942);
  }
};

// LogArith keeps rows with maximum 0 so that phi, a difference of two
// log-sums, is not computed from numbers of magnitude ~n (float32 would lose
// digits). Exact for any non-NaN logits, +-inf included.
template <typename T>
struct LogArith {
  const T* lp;  // log sigmoid(z)
  const T* lq;  // log sigmoid(-z)
  T offset;     // log of what the backward rows were divided by

  MLELLP_HD LogArith(const T* lp_, const T* lq_) : lp(lp_), lq(lq_), offset(T(0)) {}
  MLELLP_HD T zero() const { return -inf_value<T>(); }
  MLELLP_HD T one() const { return T(0); }
  MLELLP_HD T pos(int64_t i) const { return lp[i]; }
  MLELLP_HD T neg(int64_t i) const { return lq[i]; }
  MLELLP_HD T mul(T a, T b) const { return a + b; }
  MLELLP_HD T add(T a, T b) const { return log_add_exp(a, b); }
  template <typename Team>
  MLELLP_HD bool normalize(const Team& team, T* row, int64_t len, T row_max, bool backward) {
    if (row_max == -inf_value<T>()) return true;  // an impossible observation stays -inf
    for (int64_t k = team.rank(); k < len; k += team.size()) row[k] -= row_max;
    if (backward) offset += row_max;
    return true;
  }
  MLELLP_HD bool ratio(T num, T den, T /*g_max*/, T* out) const {
    // den == -inf: the observation is impossible; the caller marks phi NaN.
    *out = num == -inf_value<T>() ? (den == -inf_value<T>() ? nan_value<T>() : T(0)) : m_exp(num - den);
    return true;
  }
  MLELLP_HD T log_lik(T g0) const { return g0 + offset; }
};

// ---------------------------------------------------------------------------
// Rows per checkpoint block (see posterior_recursion).
MLELLP_HD int64_t checkpoint_block(int64_t n) {
  if (n <= 256) return n > 0 ? n : 1;
  int64_t s = static_cast<int64_t>(::sqrt(static_cast<double>(n)));
  while (s * s < n) ++s;
  return s;
}

// Workspace (in elements of T) that posterior_bag needs for one bag.
MLELLP_HD int64_t posterior_workspace(int64_t n, int64_t ylo, int64_t yhi) {
  if (n == 0) return 0;
  const int64_t W = Band{n, ylo, yhi}.width();
  const int64_t s = checkpoint_block(n);
  const int64_t blocks = (n + s - 1) / s;
  return 2 * n + (blocks + s) * W + 2 * W;  // p, q; checkpoints; one block of rows; two backward rows
}


// Forward row i (after instance i) from row i-1.
template <typename Team, typename A, typename T>
MLELLP_HD bool forward_row(const Team& team, A& ar, const Band& band, int64_t i, const T* prev, T* cur) {
  const int64_t lo = band.lo(i), hi = band.hi(i);
  const int64_t plo = band.lo(i - 1), phi_ = band.hi(i - 1);
  const T c1 = ar.pos(i - 1), c0 = ar.neg(i - 1);
  T row_max[1] = {ar.zero()};
  for (int64_t k = lo + team.rank(); k <= hi; k += team.size()) {
    const T stay = k <= phi_ ? ar.mul(c0, prev[k - plo]) : ar.zero();
    const T step = k - 1 >= plo ? ar.mul(c1, prev[k - 1 - plo]) : ar.zero();
    const T v = ar.add(stay, step);
    cur[k - lo] = v;
    row_max[0] = v > row_max[0] ? v : row_max[0];
  }
  team.reduce(row_max, 1, [](int, T a, T b) { return a > b ? a : b; });
  const bool ok = ar.normalize(team, cur, hi - lo + 1, row_max[0], false);
  team.sync();  // the next row reads entries other members wrote
  return ok;
}

template <typename Team, typename T>
MLELLP_HD void copy_row(const Team& team, const T* from, T* to, int64_t len) {
  for (int64_t k = team.rank(); k < len; k += team.size()) to[k] = from[k];
  team.sync();
}

// Both recursions for one bag; phi[0..n), *log_lik. Returns false where the
// arithmetic policy cannot vouch for the result (ScaledArith only); every
// team member returns the same.
//
// Forward rows are checkpointed every `block` rows and recomputed block by
// block during the backward pass, so a bag needs (n / block + block) * W
// entries instead of n * W: small bags (n <= 256) are one block (no
// recomputation); larger ones use block ~ sqrt(n), at the price of one more
// forward pass. A bag of 100,000 instances with y = 50,000 needs 3.2e7
// entries (~250 MB in float64) instead of 5e9.
//
// g_init, if given, is the last backward row g_n(k), k = ylo..yhi, in the
// policy's arithmetic (posterior_weighted: the count's weights w(k), scaled to
// a maximum of one); else g_n(k) = 1 on [ylo, yhi].
template <typename Team, typename A, typename T>
MLELLP_HD bool posterior_recursion(const Team& team, A& ar, int64_t n, int64_t ylo, int64_t yhi, T* phi,
                                   T* log_lik, T* ws, const T* g_init = nullptr) {
  const Band band{n, ylo, yhi};
  const int64_t W = band.width();
  const int64_t s = checkpoint_block(n);
  const int64_t blocks = (n + s - 1) / s;
  T* ckpt = ws;                  // forward rows 0, s, 2s, ...
  T* block = ckpt + blocks * W;  // forward rows of the block being combined
  T* g_cur = block + s * W;
  T* g_next = g_cur + W;

  if (team.rank() == 0) ckpt[0] = ar.one();
  team.sync();
  if (blocks > 1) {  // s >= 16 here, so block has room for two rolling rows
    const T* prev = ckpt;
    for (int64_t i = 1; i <= (blocks - 1) * s; ++i) {
      T* cur = block + (i & 1) * W;
      if (!forward_row(team, ar, band, i, prev, cur)) return false;
      if (i % s == 0) copy_row(team, cur, ckpt + (i / s) * W, W);
      prev = cur;
    }
  }

  {
    const int64_t lo = band.lo(n), hi = band.hi(n);
    for (int64_t k = lo + team.rank(); k <= hi; k += team.size()) {
      g_cur[k - lo] = g_init != nullptr ? g_init[k - lo] : ar.one();
    }
  }
  for (int64_t c = blocks - 1; c >= 0; --c) {
    const int64_t start = c * s, end = start + s < n ? start + s : n;  // rows start..end-1
    copy_row(team, ckpt + c * W, block, W);
    for (int64_t r = start + 1; r < end; ++r) {
      if (!forward_row(team, ar, band, r, block + (r - 1 - start) * W, block + (r - start) * W)) return false;
    }
    for (int64_t i = end; i > start; --i) {  // instance i (1-based) pairs a_{i-1} with g_i
      const int64_t lo = band.lo(i), hi = band.hi(i);            // band of g_i
      const int64_t plo = band.lo(i - 1), phi_ = band.hi(i - 1);  // band of a_{i-1}, g_{i-1}
      const T* a = block + (i - 1 - start) * W;
      const T c1 = ar.pos(i - 1), c0 = ar.neg(i - 1);
      T acc[3] = {ar.zero(), ar.zero(), ar.zero()};  // num, den, max of g_{i-1}
      for (int64_t k = plo + team.rank(); k <= phi_; k += team.size()) {
        const T g_k = (k >= lo && k <= hi) ? g_cur[k - lo] : ar.zero();
        const T g_k1 = (k + 1 >= lo && k + 1 <= hi) ? g_cur[k + 1 - lo] : ar.zero();
        // t1 is shared by num and den so that y = n gives phi exactly 1.
        const T t1 = ar.mul(c1, g_k1);
        const T g_new = ar.add(ar.mul(c0, g_k), t1);
        acc[0] = ar.add(acc[0], ar.mul(a[k - plo], t1));
        acc[1] = ar.add(acc[1], ar.mul(a[k - plo], g_new));
        g_next[k - plo] = g_new;
        acc[2] = g_new > acc[2] ? g_new : acc[2];
      }
      team.reduce(acc, 3, [&ar](int j, T x, T y) { return j < 2 ? ar.add(x, y) : (x > y ? x : y); });
      T phi_i;
      if (!ar.ratio(acc[0], acc[1], acc[2], &phi_i)) return false;
      if (team.rank() == 0) phi[i - 1] = phi_i;
      if (!ar.normalize(team, g_next, phi_ - plo + 1, acc[2], true)) return false;
      team.sync();
      T* t = g_cur;
      g_cur = g_next;
      g_next = t;
    }
  }
  if (team.rank() == 0) *log_lik = ar.log_lik(g_cur[0]);
  return true;
}

// ---------------------------------------------------------------------------
// Exponential tilting for large bags. Adding lambda to every logit multiplies
// the probability of each labeling by exp(lambda * S) / prod_i (q_i + p_i e^lambda),
// which leaves P(h_i = 1 | S in [ylo, yhi]) unchanged when ylo = yhi and moves
// the count distribution's mass to the target. Then the forward and backward
// rows of a large bag peak at the same counts, their overlap (ScaledArith)
// stays of order one, and the cheap scaled path suffices even where the
// observed count is far in the untilted tail (say y = n/10 with p ~ 0.5).
// For a range of counts (ylo < yhi) a tilt would reweight counts inside the
// range, so it is applied only for a single count.
constexpr int64_t kTiltMinInstances = 256;

// lambda with sum_i sigmoid(z_i + lambda) ~= target (0 < target < n), by
// safeguarded Newton in double. Any lambda is exact; a good one is only faster.
template <typename Team, typename T>
MLELLP_HD T tilt_towards(const Team& team, const T* z, int64_t n, double target) {
  double zmax[1] = {0.0};
  for (int64_t i = team.rank(); i < n; i += team.size()) {
    const double a = ::fabs(static_cast<double>(z[i]));
    zmax[0] = a > zmax[0] ? a : zmax[0];
  }
  team.reduce(zmax, 1, [](int, double a, double b) { return a > b ? a : b; });
  double a = -zmax[0] - 40.0, b = zmax[0] + 40.0, lam = 0.0;
  for (int it = 0; it < 100; ++it) {
    double f[2] = {0.0, 0.0};  // sum p_i, sum p_i q_i
    for (int64_t i = team.rank(); i < n; i += team.size()) {
      double pi, qi;
      sigmoid_pair(static_cast<double>(z[i]) + lam, &pi, &qi);
      f[0] += pi;
      f[1] += pi * qi;
    }
    team.reduce(f, 2, [](int, double x, double y) { return x + y; });
    const double excess = f[0] - target;
    if (::fabs(excess) < 0.25) break;
    if (excess > 0) b = lam; else a = lam;
    const double newton = f[1] > 0 ? lam - excess / f[1] : 0.5 * (a + b);
    lam = (newton > a && newton < b) ? newton : 0.5 * (a + b);
  }
  return static_cast<T>(lam);
}

template <typename T>
MLELLP_HD T softplus(T x) {
  return (x > T(0) ? x : T(0)) + m_log1p(m_exp(x > T(0) ? -x : x));
}

// log P_untilted(S = y) - log P_tilted(S = y) = sum_i [softplus(z_i + lambda) - softplus(z_i)] - lambda y,
// summed in double: n terms of O(1) would cost float32 digits of log P.
template <typename Team, typename T>
MLELLP_HD T tilt_correction(const Team& team, const T* z, int64_t n, T lambda, int64_t y) {
  const double lam = static_cast<double>(lambda);
  double sum[1] = {0.0};
  for (int64_t i = team.rank(); i < n; i += team.size()) {
    const double zi = static_cast<double>(z[i]);
    sum[0] += softplus(zi + lam) - softplus(zi);
  }
  team.reduce(sum, 1, [](int, double x, double y2) { return x + y2; });
  return static_cast<T>(sum[0] - lam * static_cast<double>(y));
}

// p, q = sigmoid(+-z) of a bag's n logits, and whether any is infinite. A NaN
// logit makes the whole bag NaN: phi and *log_lik are written and it returns
// true. Every team member calls it.
template <typename Team, typename T>
MLELLP_HD bool load_logits(const Team& team, const T* z, int64_t n, T* p, T* q, T* phi, T* log_lik, bool* any_inf) {
  T flags[2] = {T(0), T(0)};  // any NaN, any infinite logit
  for (int64_t i = team.rank(); i < n; i += team.size()) {
    const T zi = z[i];
    flags[0] = is_nan(zi) ? T(1) : flags[0];
    flags[1] = is_inf(zi) ? T(1) : flags[1];
    sigmoid_pair(zi, p + i, q + i);
  }
  team.reduce(flags, 2, [](int, T a, T b) { return a > b ? a : b; });
  *any_inf = flags[1] != T(0);
  if (flags[0] == T(0)) return false;
  for (int64_t i = team.rank(); i < n; i += team.size()) phi[i] = nan_value<T>();
  if (team.rank() == 0) *log_lik = nan_value<T>();
  return true;
}

}  // namespace detail
}  // namespace mlellp
