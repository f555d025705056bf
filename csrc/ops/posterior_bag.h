// The posterior op's per-bag functions (host and device): the E-step of one
// bag, and the gradient of its log-likelihood.
#pragma once

#include "bag_recursion.h"

namespace mlellp {
namespace detail {

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
