// SIMD lanes of the CPU posterior kernel (host only).
#pragma once

#include "../posterior_bag.h"

namespace mlellp {
namespace detail {

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

}  // namespace detail
}  // namespace mlellp
