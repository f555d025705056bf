// Per-bag arithmetic of the multi-class E-step (posterior_multiclass), shared
// by the CPU and the CUDA kernels.
//
// Instance i of a bag has class probabilities p_i = softmax(z_i) over C
// classes, labels independent; the bag's observation is its count vector y
// (y_c instances of class c, sum_c y_c = n). Over the partial count vectors
// k <= y (componentwise), with |k| = sum_c k_c:
//
//   forward   a(k) = P(the labels of instances 1..|k| have counts k)
//             a(k) = sum_{c: k_c > 0} a(k - e_c) p_{|k|, c},        a(0) = 1
//   backward  g(k) = P(the labels of instances |k|+1..n have counts y - k)
//             g(k) = sum_{c: k_c < y_c} p_{|k|+1, c} g(k + e_c),    g(y) = 1
//
// P(y) = a(y) and
//   phi_ic = P(h_i = c | y) = sum_{|k| = i-1, k_c < y_c} a(k) p_ic g(k + e_c) / P(y).
//
// Every k <= y lies in exactly one layer |k|, so one table of
// S = prod_c (y_c + 1) entries holds a whole pass. k is stored at the
// mixed-radix index sum_c k_c stride_c, so k - e_c comes before k: a pass in
// index order (the backward one in reverse) meets every state after the
// states it reads. A bag costs O(S * A) time and 2 S entries of memory, with A
// the number of classes whose count is positive (the "active" classes; the
// others get no table dimension and phi = 0).
//
// Two arithmetic policies, chosen per bag:
//  * plain probabilities in double: no exp or log per state (~10x cheaper).
//    Used only when no labeling's probability can underflow: every product of
//    n probabilities is at least exp(-bound) with
//    bound = sum_i max_{c active} -log p_ic, so bound <= kPlainBound keeps every
//    term, and every sum of terms, above DBL_MIN (and all are <= 1).
//  * log-probabilities in the compute dtype, with log-sum-exp per state: exact
//    for any logits, +-inf included.
// A NaN logit, or a row of all -inf (no distribution), makes its bag's phi and
// log-likelihood NaN; a count vector that infinite logits make impossible gives
// log-likelihood -inf and NaN phi, in that bag only (the binary op's contract).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MLELLP_MC_HD __host__ __device__ __forceinline__
#else
#define MLELLP_MC_HD inline
#endif

namespace mlellp {
namespace multiclass {

// More active classes than this would need more than 2^62 states (every
// active class has y_c >= 1): no budget admits them.
constexpr int kMaxActive = 62;
// Largest bound (see above) for the plain path: exp(-650) ~ 5e-283 > DBL_MIN
// with room for the sums' rounding.
constexpr double kPlainBound = 650.0;

template <typename T> MLELLP_MC_HD T mc_exp(T x);
template <> MLELLP_MC_HD float mc_exp<float>(float x) { return ::expf(x); }
template <> MLELLP_MC_HD double mc_exp<double>(double x) { return ::exp(x); }
template <typename T> MLELLP_MC_HD T mc_log(T x);
template <> MLELLP_MC_HD float mc_log<float>(float x) { return ::logf(x); }
template <> MLELLP_MC_HD double mc_log<double>(double x) { return ::log(x); }
template <typename T> MLELLP_MC_HD T mc_inf() { return static_cast<T>(INFINITY); }
template <typename T> MLELLP_MC_HD T mc_nan() { return static_cast<T>(NAN); }

// The active classes of count vector y (C entries): their indices, counts and
// mixed-radix strides. Returns the state count S = prod (y_c + 1), or -1 when
// it exceeds max_states (the caller raises; nothing is computed then).
struct Lattice {
  int active;
  int cls[kMaxActive];
  int64_t y[kMaxActive];
  int64_t stride[kMaxActive];
  int64_t states;
};

MLELLP_MC_HD bool make_lattice(const int64_t* y, int64_t C, int64_t max_states, Lattice* L) {
  L->active = 0;
  int64_t states = 1;
  for (int64_t c = 0; c < C; ++c) {
    if (y[c] <= 0) continue;
    if (L->active == kMaxActive || states > max_states / (y[c] + 1)) return false;
    L->cls[L->active] = static_cast<int>(c);
    L->y[L->active] = y[c];
    L->stride[L->active] = states;
    states *= y[c] + 1;
    ++L->active;
  }
  L->states = states;
  return states <= max_states;
}

// log softmax of one row of C logits, in T. A row holding m > 0 entries of +inf
// puts log(1/m) on them and -inf elsewhere (a certain class); a row of all -inf
// or holding a NaN has no distribution: NaN everywhere (its bag becomes NaN).
template <typename T, typename In>
MLELLP_MC_HD void log_softmax_row(const In* z, int64_t C, T* out) {
  T mx = -mc_inf<T>();
  int64_t n_posinf = 0;
  bool nan = false;
  for (int64_t c = 0; c < C; ++c) {
    const T v = static_cast<T>(z[c]);
    if (v != v) nan = true;
    if (v > mx) mx = v;
    if (v == mc_inf<T>()) ++n_posinf;
  }
  if (nan || mx == -mc_inf<T>()) {
    for (int64_t c = 0; c < C; ++c) out[c] = mc_nan<T>();
    return;
  }
  if (n_posinf > 0) {
    const T l = -mc_log<T>(static_cast<T>(n_posinf));
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<T>(z[c]) == mc_inf<T>() ? l : -mc_inf<T>();
    return;
  }
  T s = 0;
  for (int64_t c = 0; c < C; ++c) s += mc_exp<T>(static_cast<T>(z[c]) - mx);
  const T ls = mc_log<T>(s);
  for (int64_t c = 0; c < C; ++c) out[c] = static_cast<T>(z[c]) - mx - ls;
}

// Whether the bag's log-probabilities (n x C) hold a NaN; and the plain path's
// bound, sum_i max_{c active} -log p_ic (+inf when some active p_ic is 0).
template <typename T>
MLELLP_MC_HD bool scan_bag(const T* logp, int64_t n, int64_t C, const Lattice& L, double* bound) {
  double b = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T* lp = logp + i * C;
    if (lp[0] != lp[0]) return true;  // log_softmax_row makes a bad row NaN throughout
    double worst = 0;
    for (int j = 0; j < L.active; ++j) {
      const double v = -static_cast<double>(lp[L.cls[j]]);
      if (v > worst) worst = v;
    }
    b += worst;
  }
  *bound = b;
  return false;
}

// Odometer steps over the lattice: k and its layer |k| move to the next
// (previous) mixed-radix index.
MLELLP_MC_HD void next_state(const Lattice& L, int64_t* k, int64_t* layer) {
  int j = 0;
  while (k[j] == L.y[j]) {
    *layer -= k[j];
    k[j] = 0;
    ++j;
  }
  ++k[j];
  ++*layer;
}

MLELLP_MC_HD void previous_state(const Lattice& L, int64_t* k, int64_t* layer) {
  int j = 0;
  while (k[j] == 0) {
    k[j] = L.y[j];
    *layer += L.y[j];
    ++j;
  }
  --k[j];
  --*layer;
}

// One bag with plain probabilities in double. p: n x C probabilities (exp of
// logp); alpha, beta: S entries each; phi: n x C, accumulated (zeroed by the
// caller). Returns log P(y).
MLELLP_MC_HD double bag_plain(const double* p, int64_t n, int64_t C, const Lattice& L, double* alpha, double* beta,
                              double* phi) {
  const int64_t S = L.states;
  int64_t k[kMaxActive];
  for (int j = 0; j < L.active; ++j) k[j] = 0;
  int64_t layer = 0;
  alpha[0] = 1.0;
  for (int64_t s = 1; s < S; ++s) {
    next_state(L, k, &layer);
    const double* pi = p + (layer - 1) * C;
    double a = 0;
    for (int j = 0; j < L.active; ++j) {
      if (k[j] > 0) a += alpha[s - L.stride[j]] * pi[L.cls[j]];
    }
    alpha[s] = a;
  }
  const double total = alpha[S - 1];
  // k = y, layer = n here; walk back.
  beta[S - 1] = 1.0;
  const double inv_total = 1.0 / total;
  for (int64_t s = S - 2; s >= 0; --s) {
    previous_state(L, k, &layer);
    const double* pi = p + layer * C;
    double* phi_i = phi + layer * C;
    const double w = alpha[s] * inv_total;
    double g = 0;
    for (int j = 0; j < L.active; ++j) {
      if (k[j] < L.y[j]) {
        const double t = pi[L.cls[j]] * beta[s + L.stride[j]];
        g += t;
        phi_i[L.cls[j]] += w * t;
      }
    }
    beta[s] = g;
  }
  return ::log(total);
}

// One bag in log space, in T. logp: n x C; alpha, beta: S entries; phi: n x C
// accumulated (zeroed by the caller). Returns log P(y); -inf leaves phi as the
// caller must then overwrite (NaN).
template <typename T>
MLELLP_MC_HD T bag_log(const T* logp, int64_t n, int64_t C, const Lattice& L, T* alpha, T* beta, T* phi) {
  const int64_t S = L.states;
  int64_t k[kMaxActive];
  T term[kMaxActive];
  for (int j = 0; j < L.active; ++j) k[j] = 0;
  int64_t layer = 0;
  alpha[0] = 0;
  for (int64_t s = 1; s < S; ++s) {
    next_state(L, k, &layer);
    const T* lp = logp + (layer - 1) * C;
    T mx = -mc_inf<T>();
    for (int j = 0; j < L.active; ++j) {
      term[j] = k[j] > 0 ? alpha[s - L.stride[j]] + lp[L.cls[j]] : -mc_inf<T>();
      if (term[j] > mx) mx = term[j];
    }
    if (mx == -mc_inf<T>()) {
      alpha[s] = mx;
      continue;
    }
    T sum = 0;
    for (int j = 0; j < L.active; ++j) sum += mc_exp<T>(term[j] - mx);
    alpha[s] = mx + mc_log<T>(sum);
  }
  const T total = alpha[S - 1];
  if (total == -mc_inf<T>()) return total;
  beta[S - 1] = 0;
  for (int64_t s = S - 2; s >= 0; --s) {
    previous_state(L, k, &layer);
    const T* lp = logp + layer * C;
    T mx = -mc_inf<T>();
    for (int j = 0; j < L.active; ++j) {
      term[j] = k[j] < L.y[j] ? lp[L.cls[j]] + beta[s + L.stride[j]] : -mc_inf<T>();
      if (term[j] > mx) mx = term[j];
    }
    if (mx == -mc_inf<T>()) {
      beta[s] = mx;
      continue;
    }
    T sum = 0;
    for (int j = 0; j < L.active; ++j) {
      term[j] = mc_exp<T>(term[j] - mx);  // in [0, 1]
      sum += term[j];
    }
    beta[s] = mx + mc_log<T>(sum);
    if (alpha[s] == -mc_inf<T>()) continue;
    // a(k) p_ic g(k + e_c) / P(y) = term_j * exp(a(k) + mx - log P(y)), and
    // a(k) + mx <= a(k) + g(k) <= log P(y): the factor is at most 1.
    const T w = mc_exp<T>(alpha[s] + mx - total);
    T* phi_i = phi + layer * C;
    for (int j = 0; j < L.active; ++j) phi_i[L.cls[j]] += w * term[j];
  }
  return total;
}

// phi_ic = num_ic / P(y) with sum_c num_ic = P(y) exactly: dividing each row by
// its own sum instead is the same value, and rows then sum to 1 to rounding and
// no entry exceeds 1 (in log space each num_ic carries a relative error of about
// eps |log P(y)|, which the shared P(y) would pass on to the row sums).
template <typename T>
MLELLP_MC_HD void rows_to_one(T* phi, int64_t n, int64_t C) {
  for (int64_t i = 0; i < n; ++i) {
    double sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += static_cast<double>(phi[i * C + c]);
    if (!(sum > 0)) continue;  // not reached for a possible bag; left as computed
    for (int64_t c = 0; c < C; ++c) phi[i * C + c] = static_cast<T>(static_cast<double>(phi[i * C + c]) / sum);
  }
}

// Workspace of one bag, in bytes: logp (n x C of T), p and phi in double (n x C
// each), and two tables of S doubles (which also hold the log path's T tables).
template <typename T>
MLELLP_MC_HD int64_t workspace_bytes(int64_t n, int64_t C, int64_t states) {
  return n * C * static_cast<int64_t>(sizeof(T) + 2 * sizeof(double)) + 2 * states * static_cast<int64_t>(sizeof(double));
}

// One bag's plan, where a device can compute it: whether its count vector y (C
// entries) is valid for n instances (each y_c in 0..n, summing to n) with a
// lattice of at most max_states states, and its workspace in bytes (0 where
// not). The checks of check_multiclass_values_host as a flag: the host check
// names what is wrong once a flag is set.
template <typename T>
MLELLP_MC_HD bool plan_bag(const int64_t* y, int64_t C, int64_t n, int64_t max_states, int64_t* bytes) {
  *bytes = 0;
  if (n < 0) return false;
  int64_t sum = 0;
  for (int64_t c = 0; c < C; ++c) {
    if (y[c] < 0 || y[c] > n) return false;
    sum += y[c];
  }
  Lattice L;
  if (sum != n || !make_lattice(y, C, max_states, &L)) return false;
  *bytes = workspace_bytes<T>(n, C, L.states);
  return true;
}

// The whole E-step of one bag: z (n x C logits, row-major), its lattice L, and
// a workspace of workspace_bytes<T>(n, C, L.states) bytes aligned for double.
// Writes phi (n x C, in T) and returns log P(y).
template <typename T, typename In>
MLELLP_MC_HD T posterior_bag(const In* z, int64_t n, int64_t C, const Lattice& L, unsigned char* work, T* phi) {
  double* p = reinterpret_cast<double*>(work);
  double* phid = p + n * C;
  double* tables = phid + n * C;
  T* logp = reinterpret_cast<T*>(tables + 2 * L.states);
  for (int64_t i = 0; i < n; ++i) log_softmax_row<T>(z + i * C, C, logp + i * C);
  double bound = 0;
  if (scan_bag<T>(logp, n, C, L, &bound)) {
    for (int64_t t = 0; t < n * C; ++t) phi[t] = mc_nan<T>();
    return mc_nan<T>();
  }
  if (bound <= kPlainBound) {
    for (int64_t t = 0; t < n * C; ++t) {
      p[t] = ::exp(static_cast<double>(logp[t]));
      phid[t] = 0;
    }
    const double ll = bag_plain(p, n, C, L, tables, tables + L.states, phid);
    rows_to_one(phid, n, C);
    for (int64_t t = 0; t < n * C; ++t) phi[t] = static_cast<T>(phid[t]);
    return static_cast<T>(ll);
  }
  T* alpha = reinterpret_cast<T*>(tables);
  T* beta = alpha + L.states;
  for (int64_t t = 0; t < n * C; ++t) phi[t] = 0;
  const T ll = bag_log<T>(logp, n, C, L, alpha, beta, phi);
  if (ll == -mc_inf<T>()) {
    for (int64_t t = 0; t < n * C; ++t) phi[t] = mc_nan<T>();
  } else {
    rows_to_one(phi, n, C);
  }
  return ll;
}

}  // namespace multiclass
}  // namespace mlellp
