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
// thread per bag; a CPU thread team or a CUDA block for wide bags).
// posterior_lanes (CPU only) runs ScaledArith's recursion on L small bags of
// the same n and y at once, one per SIMD lane, operation for operation as the
// skeleton does, so its results are bitwise the skeleton's.
//
// The target set is given as [ylo, yhi] so that ops conditioning on a set of
// counts can reuse this file unchanged; the posterior op passes ylo = yhi.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

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
template <typename T> MLELLP_HD T min_normal();
template <> MLELLP_HD float min_normal<float>() { return 1.17549435e-38f; }
template <> MLELLP_HD double min_normal<double>() { return 2.2250738585072014e-308; }

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
template <typename T> MLELLP_HD T unit_roundoff();
template <> MLELLP_HD float unit_roundoff<float>() { return 5.9604645e-8f; }
template <> MLELLP_HD double unit_roundoff<double>() { return 1.1102230246251565e-16; }

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

// ---------------------------------------------------------------------------
// Teams: who runs the skeleton. Every loop over counts k is strided by
// team.size(), and team.reduce() combines per-member partial values (it also
// orders memory: after it returns, every member's earlier writes are visible).
//   SoloTeam    one thread per bag (CPU, and CUDA for small bags);
//   a CPU thread team (cpu/posterior_cpu.cpp) and a CUDA thread block
//   (cuda/posterior_cuda.cu) for large bags, whose rows are wide.
// Reductions combine partials in a fixed order, so results are deterministic
// for a given team size.
struct SoloTeam {
  MLELLP_HD constexpr int rank() const { return 0; }
  MLELLP_HD constexpr int size() const { return 1; }
  MLELLP_HD void sync() const {}
  template <typename T, typename Op>
  MLELLP_HD void reduce(T* /*values*/, int /*count*/, Op /*op*/) const {}
};

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
// Lanes: L small bags with the same n and y in lock-step (CPU SIMD).
// posterior_recursion's scaled path for one-block bags, with every row entry
// a vector of L lanes (layout [row][k][lane]; GCC/Clang vector extensions,
// host only). Counts are uniform across lanes, so the band logic stays
// scalar. Entries outside a row's band read a zero vector, and c * 0 is the
// literal zero posterior_recursion adds there: every lane runs exactly the
// operations of posterior_recursion in the same order, so its phi and
// log P(obs) are bitwise those of posterior_bag (the tests check this),
// whichever bags share its group. A lane whose scaled arithmetic cannot vouch
// for its result gets ok = false; the caller runs that bag through
// posterior_bag (which falls back to LogArith).
#if !defined(__CUDACC__) && !defined(__HIPCC__) && defined(__GNUC__)
#define MLELLP_HAVE_LANES 1
constexpr int64_t kLaneMaxInstances = 32;
constexpr int64_t kLaneMaxWidth = kLaneMaxInstances / 2 + 1;

template <typename T> struct LaneBits;  // the integer type of T's bits, its exponent field
template <> struct LaneBits<float> {
  using type = uint32_t;
  static constexpr int kMantissa = 23, kBias = 127;
  static constexpr uint32_t kMask = 0xffu;
};
template <> struct LaneBits<double> {
  using type = uint64_t;
  static constexpr int kMantissa = 52, kBias = 1023;
  static constexpr uint64_t kMask = 0x7ffu;
};

template <typename T, int L>
struct LaneTypes {  // vectors of L floating values, of their bits, of signed integers
  typedef T V __attribute__((vector_size(sizeof(T) * L)));
  typedef typename LaneBits<T>::type U __attribute__((vector_size(sizeof(T) * L)));
  typedef std::make_signed_t<typename LaneBits<T>::type> S __attribute__((vector_size(sizeof(T) * L)));
};

// Scratch rows of posterior_lanes.
template <typename T, int L>
struct alignas(sizeof(T) * L) LaneWorkspace {
  T p[kLaneMaxInstances * L], q[kLaneMaxInstances * L];
  T rows[kLaneMaxInstances * kLaneMaxWidth * L];  // forward rows 0..n-1
  T g[2][kLaneMaxWidth * L];                      // two backward rows
};

// ScaledArith::normalize on a row of len vectors: pow2_normalizer per lane by
// bit operations; lanes whose maximum is below row_floor or infinite fail.
template <typename T, int L>
__attribute__((always_inline)) inline void normalize_lanes(typename LaneTypes<T, L>::V* row, int64_t len,
                                                           const typename LaneTypes<T, L>::V& row_max,
                                                           typename LaneTypes<T, L>::U* ok,
                                                           typename LaneTypes<T, L>::V* exponent) {
  using V = typename LaneTypes<T, L>::V;
  using U = typename LaneTypes<T, L>::U;
  using B = LaneBits<T>;
  *ok &= (U)(row_max >= row_floor<T>()) & (U)(row_max != inf_value<T>());
  const U e = ((U)row_max >> B::kMantissa) & B::kMask;  // biased exponent; e - (bias - 1) unbiased
  const V scale = (V)(((U{} + (2 * B::kBias - 1)) - e) << B::kMantissa);
  if (exponent != nullptr) {
    using S = typename LaneTypes<T, L>::S;
    *exponent += __builtin_convertvector((S)e - (B::kBias - 1), V);
  }
  const V tiny = V{} + tiny_value<T>();
  for (int64_t k = 0; k < len; ++k) {
    const V v = row[k] * scale;
    row[k] = v >= tiny ? v : V{};
  }
}

// The recursion of L bags of n instances (1 <= n <= kLaneMaxInstances) with
// count y. z_in: [n][L] logits, aligned to a vector; outputs phi_out: [n][L]
// (aligned), log_lik and ok: [L]; ok is false for a lane with a non-finite
// logit too.
template <typename T, int L>
__attribute__((always_inline)) inline void posterior_lanes(int64_t n, int64_t y, const T* z_in, T* phi_out,
                                                           T* log_lik, bool* lane_ok, LaneWorkspace<T, L>& ws) {
  using V = typename LaneTypes<T, L>::V;
  using U = typename LaneTypes<T, L>::U;
  const Band band{n, y, y};
  const int64_t W = band.width();
  const V overlap_floor = V{} + tiny_value<T>() * T(2 * n * W) / unit_roundoff<T>();
  const V zero{};
  V* p = reinterpret_cast<V*>(ws.p);
  V* q = reinterpret_cast<V*>(ws.q);
  V* rows = reinterpret_cast<V*>(ws.rows);
  V* phi = reinterpret_cast<V*>(phi_out);
  U ok = ~U{};
  // sigmoid_pair per lane: exp stays a scalar libm call (a vector exp would
  // round differently); the rest, selects included, is vector code (a branch
  // on the sign of z mispredicts half the time).
  for (int64_t j = 0; j < n * L; ++j) ws.p[j] = m_exp(z_in[j] >= T(0) ? -z_in[j] : z_in[j]);
  for (int64_t i = 0; i < n; ++i) {
    const V z = reinterpret_cast<const V*>(z_in)[i];
    const V e = p[i];
    const V big = T(1) / (T(1) + e);
    const V small = e * big;
    p[i] = z >= T(0) ? big : small;
    q[i] = z >= T(0) ? small : big;
    ok &= (U)(z - z == T(0));  // NaN and +-inf give NaN
  }
  V exponent{};
  rows[0] = V{} + T(1);
  for (int64_t i = 1; i < n; ++i) {  // forward rows 1..n-1 (row n is not needed)
    const int64_t lo = band.lo(i), hi = band.hi(i);
    const int64_t plo = band.lo(i - 1), phi_ = band.hi(i - 1);
    const V* prev = rows + (i - 1) * W;
    V* cur = rows + i * W;
    const V c1 = p[i - 1], c0 = q[i - 1];
    V row_max{};
    for (int64_t k = lo; k <= hi; ++k) {
      const V stay = k <= phi_ ? prev[k - plo] : zero;
      const V step = k - 1 >= plo ? prev[k - 1 - plo] : zero;
      const V v = c0 * stay + c1 * step;
      cur[k - lo] = v;
      row_max = v > row_max ? v : row_max;
    }
    normalize_lanes<T, L>(cur, hi - lo + 1, row_max, &ok, nullptr);
  }
  V* g_cur = reinterpret_cast<V*>(ws.g[0]);
  V* g_next = reinterpret_cast<V*>(ws.g[1]);
  for (int64_t k = band.lo(n); k <= band.hi(n); ++k) g_cur[k - band.lo(n)] = V{} + T(1);
  for (int64_t i = n; i >= 1; --i) {
    const int64_t lo = band.lo(i), hi = band.hi(i);
    const int64_t plo = band.lo(i - 1), phi_ = band.hi(i - 1);
    const V* a = rows + (i - 1) * W;
    const V c1 = p[i - 1], c0 = q[i - 1];
    V num{}, den{}, g_max{};
    for (int64_t k = plo; k <= phi_; ++k) {
      const V g_k = (k >= lo && k <= hi) ? g_cur[k - lo] : zero;
      const V g_k1 = (k + 1 >= lo && k + 1 <= hi) ? g_cur[k + 1 - lo] : zero;
      const V t1 = c1 * g_k1;
      const V g_new = c0 * g_k + t1;
      num = num + a[k - plo] * t1;
      den = den + a[k - plo] * g_new;
      g_next[k - plo] = g_new;
      g_max = g_new > g_max ? g_new : g_max;
    }
    ok &= (U)(den >= overlap_floor * g_max);
    phi[i - 1] = num / den;
    normalize_lanes<T, L>(g_next, phi_ - plo + 1, g_max, &ok, &exponent);
    V* t = g_cur;
    g_cur = g_next;
    g_next = t;
  }
  T g0[L], e[L];
  typename LaneBits<T>::type flags[L];
  std::memcpy(g0, &g_cur[0], sizeof g0);
  std::memcpy(e, &exponent, sizeof e);
  std::memcpy(flags, &ok, sizeof flags);
  for (int l = 0; l < L; ++l) {
    log_lik[l] = m_log(g0[l]) + e[l] * static_cast<T>(0.69314718055994530942);
    lane_ok[l] = flags[l] != 0;
  }
}
#endif  // lanes

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

// ---------------------------------------------------------------------------
// One bag of the posterior op, run by `team` (every member calls it).
// z: n logits; counts condition S in [ylo, yhi] (0 <= ylo <= yhi <= n,
// validated by the caller). ws: posterior_workspace() entries.
// Outputs: phi[0..n) = P(h_i = 1 | obs), *log_lik = log P(obs).
// NaN logit -> NaN everywhere in the bag; impossible observation (only with
// infinite logits) -> log_lik = -inf and phi = NaN.
template <typename Team, typename T>
MLELLP_HD void posterior_bag(const Team& team, const T* z, int64_t n, int64_t ylo, int64_t yhi, T* phi,
                             T* log_lik, T* ws) {
  if (n == 0) {
    if (team.rank() == 0) *log_lik = T(0);
    return;
  }
  T* p = ws;
  T* q = ws + n;
  T* rows = ws + 2 * n;
  bool any_inf;
  if (load_logits(team, z, n, p, q, phi, log_lik, &any_inf)) return;
  bool done = false;
  if (!any_inf) {
    // Large bags: tilt the logits so that the target count is the expected
    // one (see tilt_towards); phi is unchanged by a tilt, log P(obs) is
    // corrected below.
    const bool tilt = n > kTiltMinInstances && ylo > 0 && ylo == yhi && yhi < n;
    const T lambda = tilt ? tilt_towards(team, z, n, static_cast<double>(ylo)) : T(0);
    if (tilt) {
      for (int64_t i = team.rank(); i < n; i += team.size()) sigmoid_pair(z[i] + lambda, p + i, q + i);
      team.sync();
    }
    ScaledArith<T> scaled(p, q, n, Band{n, ylo, yhi}.width());
    done = posterior_recursion(team, scaled, n, ylo, yhi, phi, log_lik, rows);
    if (tilt) {
      const T correction = tilt_correction(team, z, n, lambda, ylo);
      if (done && team.rank() == 0) *log_lik += correction;
    }
  }
  if (!done) {
    team.sync();
    for (int64_t i = team.rank(); i < n; i += team.size()) log_sigmoid_pair(z[i], p + i, q + i);
    team.sync();
    LogArith<T> logs(p, q);
    posterior_recursion(team, logs, n, ylo, yhi, phi, log_lik, rows);
  }
  team.sync();
  if (*log_lik == -inf_value<T>()) {
    for (int64_t i = team.rank(); i < n; i += team.size()) phi[i] = nan_value<T>();
  }
  team.sync();  // the next bag may reuse the workspace
}

// ---------------------------------------------------------------------------
// One bag of posterior_weighted: the observation o has likelihood w(k) =
// P(o | S = k), given as log w(k) for k = 0..n (logw; -inf allowed), and
//   P(o) = sum_k w(k) P(S = k),   phi_i = P(h_i = 1 | o).
// That is the recursion above with the backward pass started from g_n = w
// instead of the indicator of a count: over the band of w's support
// [ylo, yhi] (its first and last finite entries), so a bag costs
// O(n * (min(yhi, n - ylo) + 1)), as posterior does for a count in it.
// Weights are scaled to a maximum of one (log: maximum 0), and the maximum is
// added back to log P(o). A support of one count is posterior_bag exactly
// (the same row of ones; tilting included), plus that count's log-weight.
// NaN in z or in logw, or a log-weight of +inf: phi and log_lik NaN. All
// weights -inf (no count possible), or none where the logits allow mass:
// log_lik = -inf and phi NaN.
// ws: weighted_workspace(n, ylo, yhi) entries, found by weight_support.

// The support [*ylo, *yhi] of logw[0..n]; false (and *bad set) if it has
// NaN or +inf (*bad = true) or no finite entry (*bad = false).
template <typename T>
MLELLP_HD bool weight_support(const T* logw, int64_t n, int64_t* ylo, int64_t* yhi, bool* bad) {
  *ylo = -1;
  *yhi = -1;
  *bad = false;
  for (int64_t k = 0; k <= n; ++k) {
    const T w = logw[k];
    if (is_nan(w) || w == inf_value<T>()) {
      *bad = true;
      return false;
    }
    if (w != -inf_value<T>()) {
      if (*ylo < 0) *ylo = k;
      *yhi = k;
    }
  }
  return *ylo >= 0;
}

MLELLP_HD int64_t weighted_workspace(int64_t n, int64_t ylo, int64_t yhi) {
  return n == 0 ? 0 : posterior_workspace(n, ylo, yhi) + (yhi - ylo + 1);
}

template <typename Team, typename T>
MLELLP_HD void posterior_weighted_bag(const Team& team, const T* z, int64_t n, const T* logw, T* phi, T* log_lik,
                                      T* ws) {
  int64_t ylo, yhi;
  bool bad;
  const bool any = weight_support(logw, n, &ylo, &yhi, &bad);
  T wmax = -inf_value<T>();
  for (int64_t k = ylo; any && k <= yhi; ++k) wmax = logw[k] > wmax ? logw[k] : wmax;
  if (!any) {  // NaN/+inf weights or a NaN logit: NaN; else no possible count: -inf (phi NaN either way)
    bool nan_logit = false;
    for (int64_t i = 0; i < n; ++i) nan_logit |= is_nan(z[i]);
    for (int64_t i = team.rank(); i < n; i += team.size()) phi[i] = nan_value<T>();
    if (team.rank() == 0) *log_lik = bad || nan_logit ? nan_value<T>() : -inf_value<T>();
    team.sync();
    return;
  }
  if (n == 0) {  // S = 0 surely
    if (team.rank() == 0) *log_lik = logw[0];
    team.sync();
    return;
  }
  if (ylo == yhi) {  // one count: the posterior op's path, bit for bit
    posterior_bag(team, z, n, ylo, yhi, phi, log_lik, ws);
    if (team.rank() == 0) *log_lik += logw[ylo];
    team.sync();
    return;
  }
  T* p = ws;
  T* q = ws + n;
  T* rows = ws + 2 * n;
  T* init = ws + posterior_workspace(n, ylo, yhi);
  const int64_t len = yhi - ylo + 1;
  bool any_inf;
  if (load_logits(team, z, n, p, q, phi, log_lik, &any_inf)) {
    team.sync();
    return;
  }
  bool done = false;
  if (!any_inf) {
    // Weights as probabilities with maximum one; those below tiny_value are
    // flushed, an entry error that ScaledArith's overlap check bounds as it
    // does the rows' own flushing.
    const T tiny = tiny_value<T>();
    for (int64_t k = team.rank(); k < len; k += team.size()) {
      const T v = m_exp(logw[ylo + k] - wmax);
      init[k] = v >= tiny ? v : T(0);
    }
    team.sync();
    ScaledArith<T> scaled(p, q, n, Band{n, ylo, yhi}.width());
    done = posterior_recursion(team, scaled, n, ylo, yhi, phi, log_lik, rows, init);
  }
  if (!done) {
    team.sync();
    for (int64_t i = team.rank(); i < n; i += team.size()) log_sigmoid_pair(z[i], p + i, q + i);
    for (int64_t k = team.rank(); k < len; k += team.size()) init[k] = logw[ylo + k] - wmax;
    team.sync();
    LogArith<T> logs(p, q);
    posterior_recursion(team, logs, n, ylo, yhi, phi, log_lik, rows, init);
  }
  team.sync();
  if (team.rank() == 0) *log_lik += wmax;
  team.sync();
  if (*log_lik == -inf_value<T>()) {
    for (int64_t i = team.rank(); i < n; i += team.size()) phi[i] = nan_value<T>();
  }
  team.sync();
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

// ---------------------------------------------------------------------------
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
