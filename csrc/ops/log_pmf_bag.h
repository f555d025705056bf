// The log_pmf op's per-bag function (host and device).
#pragma once

#include "bag_recursion.h"

namespace mlellp {
namespace detail {

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


}  // namespace detail
}  // namespace mlellp
