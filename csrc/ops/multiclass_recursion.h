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
// Each instance's row is first shifted (the per-instance shift): over the
// active classes, q_ic = p_ic / sum_{c' active} p_ic'. A labeling's probability
// is then prod_i q_i,c_i times the bag's constant prod_i sum_active p_ic, so the
// recursions run on q and log P(y) adds log of that constant back; a(k) is then
// a probability under q (at most 1), whatever the logits' size.
//
// Two arithmetic policies, both in the compute type T (float for
// float/half/bfloat16 input, double for double):
//  * plain numbers, no exp or log per state (~10x cheaper), tried first. Every
//    table entry and term is a q-probability, and a row's q sum to 1, so what
//    underflow can drop (at most T's smallest normal number an operation, flush
//    to zero included) does not grow along the recursion: at most about
//    8 S (n + 1) A min_normal in each phi row's sum, whose exact value is a(y).
//    plain_total_ok accepts a(y) when that is below rounding; else
//  * log-probabilities, with log-sum-exp per state: exact for any logits,
//    +-inf included (counts very unlikely under the logits).
// A NaN logit, or a row of all -inf (no distribution), makes its bag's phi and
// log-likelihood NaN; a count vector that infinite logits make impossible gives
// log-likelihood -inf and NaN phi, in that bag only (the binary op's contract).
//
// Two runners over the same workspace and arithmetic: posterior_bag, one
// thread in index order (the CPU, and CUDA for small lattices), and
// posterior_bag_team, a team of threads layer by layer (every state of layer
// |k| = l depends only on layer l - 1), for large lattices on the GPU. Both
// compute the same a and g bit for bit; phi's sums run in another order.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace mlellp {
namespace multiclass {

// More active classes than this would need more than 2^62 states (every
// active class has y_c >= 1): no budget admits them.
constexpr int kMaxActive = 62;
// Whether the plain path's a(y) = total is large enough (see above).
template <typename T>
MLELLP_HD bool plain_total_ok(T total, int64_t states, int64_t n, int active) {
  const double drop = 8.0 * static_cast<double>(states) * static_cast<double>(n + 1) * (active + 1) *
                      static_cast<double>(detail::min_normal<T>());
  return static_cast<double>(total) * static_cast<double>(detail::unit_roundoff<T>()) >= drop;
}
// A team reduces the phi of this many classes at once (its shared buffer).
constexpr int kTeamReduce = 4;

using detail::m_exp;
using detail::m_log;

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

MLELLP_HD bool make_lattice(const int64_t* y, int64_t C, int64_t max_states, Lattice* L) {
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
MLELLP_HD void log_softmax_row(const In* z, int64_t C, T* out) {
  T mx = -detail::inf_value<T>();
  int64_t n_posinf = 0;
  bool nan = false;
  for (int64_t c = 0; c < C; ++c) {
    const T v = static_cast<T>(z[c]);
    if (v != v) nan = true;
    if (v > mx) mx = v;
    if (v == detail::inf_value<T>()) ++n_posinf;
  }
  if (nan || mx == -detail::inf_value<T>()) {
    for (int64_t c = 0; c < C; ++c) out[c] = detail::nan_value<T>();
    return;
  }
  if (n_posinf > 0) {
    const T l = -m_log(static_cast<T>(n_posinf));
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<T>(z[c]) == detail::inf_value<T>() ? l : -detail::inf_value<T>();
    return;
  }
  T s = 0;
  for (int64_t c = 0; c < C; ++c) s += m_exp(static_cast<T>(z[c]) - mx);
  const T ls = m_log(s);
  for (int64_t c = 0; c < C; ++c) out[c] = static_cast<T>(z[c]) - mx - ls;
}

// Row statuses, ordered so that the bag's is the largest of its rows'.
constexpr int kRowOk = 0, kRowImpossible = 1, kRowNan = 2;

// One instance's shifted row (see above): lq[c] = log q_ic at the active
// classes (the others are left as log p_ic, unread); *scale = log sum_active
// p_ic.
// Returns kRowNan for a row without a distribution, kRowImpossible when every
// active class has probability 0.
template <typename T, typename In>
MLELLP_HD int shift_row(const In* z, int64_t C, const Lattice& L, T* lq, double* scale) {
  log_softmax_row<T>(z, C, lq);
  if (lq[0] != lq[0]) return kRowNan;  // log_softmax_row makes a bad row NaN throughout
  T mx = -detail::inf_value<T>();
  for (int j = 0; j < L.active; ++j) mx = lq[L.cls[j]] > mx ? lq[L.cls[j]] : mx;
  if (mx == -detail::inf_value<T>()) return kRowImpossible;
  T sum = 0;
  for (int j = 0; j < L.active; ++j) sum += m_exp(lq[L.cls[j]] - mx);
  const T lse = mx + m_log(sum);
  for (int j = 0; j < L.active; ++j) lq[L.cls[j]] -= lse;
  *scale = static_cast<double>(lse);
  return kRowOk;
}

// Odometer steps over the lattice: k and its layer |k| move to the next
// (previous) mixed-radix index.
MLELLP_HD void next_state(const Lattice& L, int64_t* k, int64_t* layer) {
  int j = 0;
  while (k[j] == L.y[j]) {
    *layer -= k[j];
    k[j] = 0;
    ++j;
  }
  ++k[j];
  ++*layer;
}

MLELLP_HD void previous_state(const Lattice& L, int64_t* k, int64_t* layer) {
  int j = 0;
  while (k[j] == 0) {
    k[j] = L.y[j];
    *layer += L.y[j];
    ++j;
  }
  --k[j];
  --*layer;
}

// One bag with plain probabilities in T. q: n x C shifted probabilities (read
// at the active classes); alpha, beta: S entries each; phi: n x C, accumulated
// (zeroed by the caller). Writes log a(y) (the caller adds the shift back);
// false, with phi untouched, where a(y) fails plain_total_ok.
template <typename T>
MLELLP_HD bool bag_plain(const T* q, int64_t n, int64_t C, const Lattice& L, T* alpha, T* beta, T* phi,
                         T* log_total) {
  const int64_t S = L.states;
  int64_t k[kMaxActive];
  for (int j = 0; j < L.active; ++j) k[j] = 0;
  int64_t layer = 0;
  alpha[0] = 1;
  for (int64_t s = 1; s < S; ++s) {
    next_state(L, k, &layer);
    const T* qi = q + (layer - 1) * C;
    T a = 0;
    for (int j = 0; j < L.active; ++j) {
      if (k[j] > 0) a += alpha[s - L.stride[j]] * qi[L.cls[j]];
    }
    alpha[s] = a;
  }
  const T total = alpha[S - 1];
  if (!plain_total_ok(total, S, n, L.active)) return false;
  // k = y, layer = n here; walk back.
  beta[S - 1] = 1;
  const T inv_total = 1 / total;
  for (int64_t s = S - 2; s >= 0; --s) {
    previous_state(L, k, &layer);
    const T* qi = q + layer * C;
    T* phi_i = phi + layer * C;
    const T w = alpha[s] * inv_total;
    T g = 0;
    for (int j = 0; j < L.active; ++j) {
      if (k[j] < L.y[j]) {
        const T t = qi[L.cls[j]] * beta[s + L.stride[j]];
        g += t;
        phi_i[L.cls[j]] += w * t;
      }
    }
    beta[s] = g;
  }
  *log_total = m_log(total);
  return true;
}

// One bag in log space, in T. logp: n x C; alpha, beta: S entries; phi: n x C
// accumulated (zeroed by the caller). Returns log P(y); -inf leaves phi as the
// caller must then overwrite (NaN).
template <typename T>
MLELLP_HD T bag_log(const T* logp, int64_t n, int64_t C, const Lattice& L, T* alpha, T* beta, T* phi) {
  const int64_t S = L.states;
  int64_t k[kMaxActive];
  T term[kMaxActive];
  for (int j = 0; j < L.active; ++j) k[j] = 0;
  int64_t layer = 0;
  alpha[0] = 0;
  for (int64_t s = 1; s < S; ++s) {
    next_state(L, k, &layer);
    const T* lp = logp + (layer - 1) * C;
    T mx = -detail::inf_value<T>();
    for (int j = 0; j < L.active; ++j) {
      term[j] = k[j] > 0 ? alpha[s - L.stride[j]] + lp[L.cls[j]] : -detail::inf_value<T>();
      if (term[j] > mx) mx = term[j];
    }
    if (mx == -detail::inf_value<T>()) {
      alpha[s] = mx;
      continue;
    }
    T sum = 0;
    for (int j = 0; j < L.active; ++j) sum += m_exp(term[j] - mx);
    alpha[s] = mx + m_log(sum);
  }
  const T total = alpha[S - 1];
  if (total == -detail::inf_value<T>()) return total;
  beta[S - 1] = 0;
  for (int64_t s = S - 2; s >= 0; --s) {
    previous_state(L, k, &layer);
    const T* lp = logp + layer * C;
    T mx = -detail::inf_value<T>();
    for (int j = 0; j < L.active; ++j) {
      term[j] = k[j] < L.y[j] ? lp[L.cls[j]] + beta[s + L.stride[j]] : -detail::inf_value<T>();
      if (term[j] > mx) mx = term[j];
    }
    if (mx == -detail::inf_value<T>()) {
      beta[s] = mx;
      continue;
    }
    T sum = 0;
    for (int j = 0; j < L.active; ++j) {
      term[j] = m_exp(term[j] - mx);  // in [0, 1]
      sum += term[j];
    }
    beta[s] = mx + m_log(sum);
    if (alpha[s] == -detail::inf_value<T>()) continue;
    // a(k) p_ic g(k + e_c) / P(y) = term_j * exp(a(k) + mx - log P(y)), and
    // a(k) + mx <= a(k) + g(k) <= log P(y): the factor is at most 1.
    const T w = m_exp(alpha[s] + mx - total);
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
MLELLP_HD void rows_to_one(T* phi, int64_t n, int64_t C) {
  for (int64_t i = 0; i < n; ++i) {
    double sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += static_cast<double>(phi[i * C + c]);
    if (!(sum > 0)) continue;  // not reached for a possible bag; left as computed
    for (int64_t c = 0; c < C; ++c) phi[i * C + c] = static_cast<T>(static_cast<double>(phi[i * C + c]) / sum);
  }
}

// Workspace of one bag, in bytes: the shifted rows as logarithms and as
// numbers (n x C of T each) and the two tables (S of T each).
template <typename T>
MLELLP_HD int64_t workspace_bytes(int64_t n, int64_t C, int64_t states) {
  return (2 * n * C + 2 * states) * static_cast<int64_t>(sizeof(T));
}

// One bag's plan, where a device can compute it: whether its count vector y (C
// entries) is valid for n instances (each y_c in 0..n, summing to n) with a
// lattice of at most max_states states, its workspace in bytes and its state
// count (0 where not). The checks of check_multiclass_values_host as a flag:
// the host check names what is wrong once a flag is set.
template <typename T>
MLELLP_HD bool plan_bag(const int64_t* y, int64_t C, int64_t n, int64_t max_states, int64_t* bytes,
                           int64_t* states = nullptr) {
  *bytes = 0;
  if (states != nullptr) *states = 0;
  if (n < 0) return false;
  int64_t sum = 0;
  for (int64_t c = 0; c < C; ++c) {
    if (y[c] < 0 || y[c] > n) return false;
    sum += y[c];
  }
  Lattice L;
  if (sum != n || !make_lattice(y, C, max_states, &L)) return false;
  *bytes = workspace_bytes<T>(n, C, L.states);
  if (states != nullptr) *states = L.states;
  return true;
}

// The workspace's parts: shifted log-rows, shifted rows, then the tables.
template <typename T>
struct Workspace {
  T *lq, *q, *alpha, *beta;
  MLELLP_HD Workspace(unsigned char* work, int64_t n, int64_t C, int64_t states)
      : lq(reinterpret_cast<T*>(work)), q(lq + n * C), alpha(q + n * C), beta(alpha + states) {}
};

// A bag that is not computed: its log-likelihood (NaN for a NaN row, -inf for
// an impossible bag), its phi NaN (members [rank, rank + step, ...] of n x C).
template <typename T>
MLELLP_HD T bag_not_computed(int status, int64_t n, int64_t C, T* phi, int64_t rank = 0, int64_t step = 1) {
  for (int64_t t = rank; t < n * C; t += step) phi[t] = detail::nan_value<T>();
  return status == kRowNan ? detail::nan_value<T>() : -detail::inf_value<T>();
}

// The whole E-step of one bag by one thread: z (n x C logits, row-major), its
// lattice L, and a workspace of workspace_bytes<T>(n, C, L.states) bytes
// aligned for T. Writes phi (n x C, in T) and returns log P(y).
template <typename T, typename In>
MLELLP_HD T posterior_bag(const In* z, int64_t n, int64_t C, const Lattice& L, unsigned char* work, T* phi) {
  Workspace<T> ws(work, n, C, L.states);
  double scale = 0;
  int status = kRowOk;
  for (int64_t i = 0; i < n; ++i) {
    double row_scale = 0;
    const int st = shift_row<T>(z + i * C, C, L, ws.lq + i * C, &row_scale);
    status = st > status ? st : status;
    scale += row_scale;
  }
  if (status != kRowOk) return bag_not_computed<T>(status, n, C, phi);
  for (int64_t t = 0; t < n * C; ++t) phi[t] = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int j = 0; j < L.active; ++j) ws.q[i * C + L.cls[j]] = m_exp(ws.lq[i * C + L.cls[j]]);
  }
  T ll;
  if (!bag_plain<T>(ws.q, n, C, L, ws.alpha, ws.beta, phi, &ll)) {
    ll = bag_log<T>(ws.lq, n, C, L, ws.alpha, ws.beta, phi);
    if (ll == -detail::inf_value<T>()) return bag_not_computed<T>(kRowImpossible, n, C, phi);
  }
  rows_to_one(phi, n, C);
  return ll + static_cast<T>(scale);
}

// ---- the team runner: the same arithmetic, layer by layer.
//
// Member r takes the contiguous states [r P, (r + 1) P) (P = ceil(S / size))
// and, at each layer, those of them in that layer (an odometer walk from its
// first state); the team syncs between layers. Team: rank(), size(), sync(),
// reduce(values, count, op(j, a, b)) with count <= kTeamReduce (a
// deterministic order), as bag_recursion.h's teams.

// Decodes state s: its counts k and layer |k|.
MLELLP_HD void decode_state(const Lattice& L, int64_t s, int64_t* k, int64_t* layer) {
  *layer = 0;
  for (int j = 0; j < L.active; ++j) {
    k[j] = (s / L.stride[j]) % (L.y[j] + 1);
    *layer += k[j];
  }
}

// Calls visit(s, k) for each of the member's states in layer l.
template <typename Fn>
MLELLP_HD void visit_layer(const Lattice& L, int64_t s0, int64_t s1, int64_t l, Fn visit) {
  if (s0 >= s1) return;
  int64_t k[kMaxActive];
  int64_t layer;
  decode_state(L, s0, k, &layer);
  for (int64_t s = s0;;) {
    if (layer == l) visit(s, k);
    if (++s == s1) return;
    next_state(L, k, &layer);
  }
}

// a(k) of one state from layer l - 1 (plain or log).
template <typename T>
MLELLP_HD T alpha_at(bool plain, const Lattice& L, const T* alpha, const T* row, int64_t s, const int64_t* k) {
  T term[kMaxActive];
  T mx = -detail::inf_value<T>(), sum = 0;
  for (int j = 0; j < L.active; ++j) {
    if (plain) {
      if (k[j] > 0) sum += alpha[s - L.stride[j]] * row[L.cls[j]];
    } else {
      term[j] = k[j] > 0 ? alpha[s - L.stride[j]] + row[L.cls[j]] : -detail::inf_value<T>();
      mx = term[j] > mx ? term[j] : mx;
    }
  }
  if (plain) return sum;
  if (mx == -detail::inf_value<T>()) return mx;
  for (int j = 0; j < L.active; ++j) sum += m_exp(term[j] - mx);
  return mx + m_log(sum);
}

// g(k) of one state from layer l + 1, adding its phi terms to acc (the same
// terms as bag_plain / bag_log).
template <typename T>
MLELLP_HD T beta_at(bool plain, const Lattice& L, const T* alpha, const T* beta, const T* row, T total, int64_t s,
                       const int64_t* k, T* acc) {
  T term[kMaxActive];
  T mx = -detail::inf_value<T>(), sum = 0;
  for (int j = 0; j < L.active; ++j) {
    if (plain) {
      term[j] = k[j] < L.y[j] ? row[L.cls[j]] * beta[s + L.stride[j]] : T(0);
      sum += term[j];
    } else {
      term[j] = k[j] < L.y[j] ? row[L.cls[j]] + beta[s + L.stride[j]] : -detail::inf_value<T>();
      mx = term[j] > mx ? term[j] : mx;
    }
  }
  if (plain) {
    const T w = alpha[s] * (1 / total);
    for (int j = 0; j < L.active; ++j) acc[j] += w * term[j];
    return sum;
  }
  if (mx == -detail::inf_value<T>()) return mx;
  for (int j = 0; j < L.active; ++j) {
    term[j] = m_exp(term[j] - mx);
    sum += term[j];
  }
  if (alpha[s] != -detail::inf_value<T>()) {
    const T w = m_exp(alpha[s] + mx - total);
    for (int j = 0; j < L.active; ++j) acc[j] += w * term[j];
  }
  return mx + m_log(sum);
}

// Shifts the rows (team-strided) and agrees on the bag's shift and status.
template <typename Team, typename T, typename In>
MLELLP_HD void shift_rows_team(const Team& team, const In* z, int64_t n, int64_t C, const Lattice& L, T* lq,
                               double* stats) {
  stats[0] = 0, stats[1] = kRowOk;  // shift, status
  for (int64_t i = team.rank(); i < n; i += team.size()) {
    double row_scale = 0;
    const int st = shift_row<T>(z + i * C, C, L, lq + i * C, &row_scale);
    stats[1] = st > stats[1] ? st : stats[1];
    stats[0] += row_scale;
  }
  team.reduce(stats, 2, [](int j, double a, double b) { return j == 1 ? (a > b ? a : b) : a + b; });
}

// The whole E-step of one bag by a team; the arguments of posterior_bag. Every
// member returns log P(y).
template <typename Team, typename T, typename In>
MLELLP_HD T posterior_bag_team(const Team& team, const In* z, int64_t n, int64_t C, const Lattice& L,
                                  unsigned char* work, T* phi) {
  Workspace<T> ws(work, n, C, L.states);
  double stats[2];
  shift_rows_team<Team, T>(team, z, n, C, L, ws.lq, stats);
  const int status = static_cast<int>(stats[1]);
  if (status != kRowOk) return bag_not_computed<T>(status, n, C, phi, team.rank(), team.size());
  for (int64_t t = team.rank(); t < n * C; t += team.size()) {
    phi[t] = 0;
    ws.q[t] = m_exp(ws.lq[t]);  // (inactive entries too: unread)
  }
  const int64_t S = L.states, per = (S + team.size() - 1) / team.size();
  const int64_t s0 = team.rank() * per < S ? team.rank() * per : S, s1 = s0 + per < S ? s0 + per : S;
  // Plain first; the log path where a(y) fails plain_total_ok (every member
  // reads the same total, so all agree).
  bool plain = true;
  T total;
  for (;;) {
    const T* rows = plain ? ws.q : ws.lq;
    if (team.rank() == 0) ws.alpha[0] = plain ? T(1) : T(0);
    team.sync();
    for (int64_t l = 1; l <= n; ++l) {
      const T* row = rows + (l - 1) * C;
      visit_layer(L, s0, s1, l, [&](int64_t s, const int64_t* k) { ws.alpha[s] = alpha_at<T>(plain, L, ws.alpha, row, s, k); });
      team.sync();
    }
    total = ws.alpha[S - 1];
    if (!plain || plain_total_ok(total, S, n, L.active)) break;
    plain = false;
    team.sync();  // every member has read total before alpha is rewritten
  }
  const T* rows = plain ? ws.q : ws.lq;
  if (!plain && total == -detail::inf_value<T>()) {  // (phi's zeroing was before the layers' syncs)
    return bag_not_computed<T>(kRowImpossible, n, C, phi, team.rank(), team.size());
  }
  if (team.rank() == 0) ws.beta[S - 1] = plain ? T(1) : T(0);
  team.sync();
  for (int64_t l = n - 1; l >= 0; --l) {
    const T* row = rows + l * C;
    T acc[kMaxActive];
    for (int j = 0; j < L.active; ++j) acc[j] = 0;
    visit_layer(L, s0, s1, l, [&](int64_t s, const int64_t* k) {
      ws.beta[s] = beta_at<T>(plain, L, ws.alpha, ws.beta, row, total, s, k, acc);
    });
    // Every member reduces (a reduction syncs the team, so this layer's beta is
    // written before the next layer reads it).
    for (int j0 = 0; j0 < L.active; j0 += kTeamReduce) {
      const int count = L.active - j0 < kTeamReduce ? L.active - j0 : kTeamReduce;
      team.reduce(acc + j0, count, [](int, T a, T b) { return a + b; });
    }
    if (team.rank() == 0) {
      for (int j = 0; j < L.active; ++j) phi[l * C + L.cls[j]] = acc[j];
    }
  }
  team.sync();
  for (int64_t i = team.rank(); i < n; i += team.size()) rows_to_one(phi + i * C, 1, C);
  return (plain ? m_log(total) : total) + static_cast<T>(stats[0]);
}

}  // namespace multiclass
}  // namespace mlellp
