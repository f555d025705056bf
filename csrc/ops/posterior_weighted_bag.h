// The posterior_weighted op's per-bag function (host and device).
#pragma once

#include "posterior_bag.h"

namespace mlellp {
namespace detail {

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


}  // namespace detail
}  // namespace mlellp
