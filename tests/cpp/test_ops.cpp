// C++ test (CTest): the shared per-bag arithmetic against brute-force
// enumeration, and the registered ops through the dispatcher, without Python.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <type_traits>
#include <vector>

#include "augment_image.h"
#include "bag_group.h"
#include "checks.h"
#include "log_pmf_bag.h"
#include "multiclass_recursion.h"
#include "phi_jvp_bag.h"
#include "posterior_bag.h"
#include "posterior_weighted_bag.h"

namespace {

int failures = 0;

void expect_near(double got, double want, double tol, const char* what, int bag) {
  if (!(std::fabs(got - want) <= tol)) {
    std::printf("FAIL %s (bag %d): got %.17g, want %.17g\n", what, bag, got, want);
    ++failures;
  }
}

// log sigmoid(x) without overflow at any magnitude.
double log_sigmoid(double x) { return x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x)); }

// log P(S = y) and phi by enumerating all 2^n labelings (double, log-space weights).
void enumerate(const std::vector<double>& z, int y, double* log_lik, std::vector<double>* phi) {
  const int n = static_cast<int>(z.size());
  std::vector<double> lw;
  std::vector<unsigned> masks;
  for (unsigned m = 0; m < (1u << n); ++m) {
    if (__builtin_popcount(m) != y) continue;
    double s = 0;
    for (int i = 0; i < n; ++i) s += log_sigmoid(((m >> i) & 1u) ? z[i] : -z[i]);
    lw.push_back(s);
    masks.push_back(m);
  }
  double mx = -INFINITY;
  for (double v : lw) mx = std::max(mx, v);
  double total = 0;
  for (double v : lw) total += std::exp(v - mx);
  *log_lik = mx + std::log(total);
  phi->assign(n, 0.0);
  for (size_t r = 0; r < lw.size(); ++r)
    for (int i = 0; i < n; ++i)
      if ((masks[r] >> i) & 1u) (*phi)[i] += std::exp(lw[r] - *log_lik);
}

void test_header_against_enumeration() {
  std::mt19937_64 rng(1234);
  std::normal_distribution<double> normal(0.0, 3.0);
  for (int bag = 0; bag < 500; ++bag) {
    const int n = 1 + bag % 12;
    const int y = static_cast<int>(rng() % (n + 1));
    std::vector<double> z(n);
    for (double& v : z) v = normal(rng);
    std::vector<double> ws(mlellp::detail::posterior_workspace(n, y, y)), phi(n);
    double ll = 0;
    mlellp::detail::posterior_bag(mlellp::detail::SoloTeam(), z.data(), n, y, y, phi.data(), &ll, ws.data());
    double ref_ll;
    std::vector<double> ref_phi;
    enumerate(z, y, &ref_ll, &ref_phi);
    expect_near(ll, ref_ll, 1e-10, "log_lik", bag);
    for (int i = 0; i < n; ++i) expect_near(phi[i], ref_phi[i], 1e-10, "phi", bag);
  }
}

// Logits of any magnitude (log-uniform in 1e-2..1e4, both signs), counts biased to
// the edges: where the scaled path's rows can fall far below the previous row's
// maximum (y = n - 1 with z = -900 in a bag of -400s). Against enumeration, float32
// on the logits as float32 holds them.
void test_header_at_extreme_magnitudes() {
  std::mt19937_64 rng(4321);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  for (int bag = 0; bag < 3000; ++bag) {
    const int n = 1 + bag % 10;
    const int pick = static_cast<int>(rng() % 5);
    const int y = pick == 0 ? 0 : pick == 1 ? n : pick == 2 ? n - 1 : pick == 3 ? 1 : static_cast<int>(rng() % (n + 1));
    std::vector<double> z(n);
    for (double& v : z) v = (uniform(rng) < 0.5 ? -1 : 1) * std::pow(10.0, uniform(rng) * 6 - 2);
    if (bag == 0) z = {-400.0, -900.0, -400.0};  // the reported case: phi[1] was NaN
    const int yy = bag == 0 ? 2 : y;
    const int64_t nn = static_cast<int64_t>(z.size());
    std::vector<double> ws(mlellp::detail::posterior_workspace(nn, yy, yy)), phi(nn);
    double ll = 0;
    mlellp::detail::posterior_bag(mlellp::detail::SoloTeam(), z.data(), nn, yy, yy, phi.data(), &ll, ws.data());
    double ref_ll;
    std::vector<double> ref_phi;
    enumerate(z, yy, &ref_ll, &ref_phi);
    expect_near(ll, ref_ll, 1e-12 * std::fabs(ref_ll) + 1e-9, "extreme log_lik", bag);
    for (int64_t i = 0; i < nn; ++i) expect_near(phi[i], ref_phi[i], 1e-9, "extreme phi", bag);
    std::vector<float> zf(z.begin(), z.end()), wsf(mlellp::detail::posterior_workspace(nn, yy, yy)), phif(nn);
    float llf = 0;
    mlellp::detail::posterior_bag(mlellp::detail::SoloTeam(), zf.data(), nn, yy, yy, phif.data(), &llf, wsf.data());
    std::vector<double> zr(zf.begin(), zf.end());  // the same logits as float32 holds them
    enumerate(zr, yy, &ref_ll, &ref_phi);
    // log space adds log-probabilities of size |z|: an error of eps |z| is inherent
    double zmax = 0;
    for (double v : zr) zmax = std::max(zmax, std::fabs(v));
    const double tol = 1e-6 + 16 * 5.96e-8 * zmax;
    for (int64_t i = 0; i < nn; ++i) expect_near(phif[i], ref_phi[i], tol, "extreme phi (float32)", bag);
  }
}

// multiclass::plan_bag (the CUDA kernel's check of each bag, as a flag) agrees with
// check_multiclass_values_host (the error the op raises) on valid and broken
// count vectors: negative, above n, a wrong sum, over the state budget.
void test_multiclass_plan() {
  std::mt19937_64 rng(77);
  int disagreements = 0;
  for (int trial = 0; trial < 4000; ++trial) {
    const int64_t C = 2 + static_cast<int64_t>(rng() % 5), n = static_cast<int64_t>(rng() % 9);
    std::vector<int64_t> y(C, 0);
    for (int64_t i = 0; i < n; ++i) ++y[rng() % C];
    const int breakage = static_cast<int>(rng() % 5);
    if (breakage == 1) y[rng() % C] = -1;
    if (breakage == 2) y[rng() % C] += 1;           // wrong sum
    if (breakage == 3) y[rng() % C] = n + 1;         // above n
    const int64_t max_states = breakage == 4 ? 1 + static_cast<int64_t>(rng() % 8) : (int64_t(1) << 24);
    const int64_t offsets[2] = {0, n};
    bool host_ok = true;
    try {
      mlellp::check_multiclass_values_host("posterior_multiclass", offsets, 1, n, y.data(), C, max_states);
    } catch (const c10::Error&) {
      host_ok = false;
    }
    int64_t bytes = -1;
    const bool device_ok = mlellp::multiclass::plan_bag<float>(y.data(), C, n, max_states, &bytes);
    if (device_ok != host_ok || (device_ok ? bytes <= 0 : bytes != 0)) {
      if (++disagreements <= 5) std::printf("FAIL multiclass plan, trial %d: plan %d, host check %d\n", trial, device_ok, host_ok);
      ++failures;
    }
  }
}

// Cov(h | S = y) u by enumeration, against phi_jvp_bag (bags up to 14, one checkpoint block; the Python tests take larger bags).
void test_phi_jvp_against_enumeration() {
  std::mt19937_64 rng(99);
  std::normal_distribution<double> normal(0.0, 2.0);
  for (int bag = 0; bag < 300; ++bag) {
    const int n = 1 + bag % 14;
    const int y = static_cast<int>(rng() % (n + 1));
    std::vector<double> z(n), u(n), out(n);
    for (double& v : z) v = normal(rng);
    for (double& v : u) v = normal(rng);
    std::vector<double> ws(mlellp::detail::phi_jvp_workspace(n, y));
    mlellp::detail::phi_jvp_bag(z.data(), u.data(), n, y, out.data(), ws.data());
    // E[h_i T] - phi_i E[T] over the labelings with y positives
    double log_lik;
    std::vector<double> phi;
    enumerate(z, y, &log_lik, &phi);
    std::vector<double> eht(n, 0.0);
    double et = 0;
    for (unsigned m = 0; m < (1u << n); ++m) {
      if (__builtin_popcount(m) != y) continue;
      double lw = 0, t = 0;
      for (int i = 0; i < n; ++i) {
        const bool on = (m >> i) & 1u;
        lw += on ? -std::log1p(std::exp(-z[i])) : -std::log1p(std::exp(z[i]));
        t += on ? u[i] : 0.0;
      }
      const double w = std::exp(lw - log_lik);
      et += w * t;
      for (int i = 0; i < n; ++i)
        if ((m >> i) & 1u) eht[i] += w * t;
    }
    for (int i = 0; i < n; ++i) expect_near(out[i], eht[i] - phi[i] * et, 1e-10, "phi_jvp", bag);
  }
}

void test_dispatcher() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("mlellp::posterior", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  auto logits = at::tensor({0.3, -1.2, 2.0, 0.5, 0.1}, at::kDouble);
  auto offsets = at::tensor({0, 3, 5}, at::kLong);
  auto counts = at::tensor({1, 2}, at::kLong);
  auto [phi, ll] = op.call(logits, offsets, counts);
  std::vector<double> z0 = {0.3, -1.2, 2.0}, ref_phi;
  double ref_ll;
  enumerate(z0, 1, &ref_ll, &ref_phi);
  expect_near(ll[0].item<double>(), ref_ll, 1e-12, "dispatcher log_lik", 0);
  for (int i = 0; i < 3; ++i) expect_near(phi[i].item<double>(), ref_phi[i], 1e-12, "dispatcher phi", 0);
  expect_near(phi[3].item<double>(), 1.0, 0.0, "y = n gives phi 1", 1);
  // Bad input raises.
  bool raised = false;
  try {
    op.call(logits, offsets, at::tensor({4, 2}, at::kLong));
  } catch (const c10::Error& e) {
    raised = std::string(e.what()).find("counts[0] = 4") != std::string::npos;
  }
  if (!raised) {
    std::printf("FAIL bad counts did not raise the expected error\n");
    ++failures;
  }
}

// posterior_weighted_bag: interval weights [lo, hi] (log w = 0 inside) against the
// enumeration summed over the counts inside; one-hot weights against posterior_bag.
void test_weighted_against_enumeration() {
  std::mt19937 rng(11);
  std::normal_distribution<double> normal(0.0, 2.0);
  mlellp::detail::SoloTeam solo;
  for (int n = 1; n <= 10; ++n) {
    std::vector<double> z(n);
    for (auto& v : z) v = normal(rng);
    const int lo = static_cast<int>(rng() % (n + 1));
    const int hi = lo + static_cast<int>(rng() % (n - lo + 1));
    std::vector<double> logw(n + 1, -INFINITY);
    for (int k = lo; k <= hi; ++k) logw[k] = 0.0;
    std::vector<double> phi(n), ws(mlellp::detail::weighted_workspace(n, lo, hi));
    double ll;
    mlellp::detail::posterior_weighted_bag(solo, z.data(), n, logw.data(), phi.data(), &ll, ws.data());
    double total = -INFINITY;
    std::vector<double> mix(n, 0.0);
    std::vector<double> lls(hi - lo + 1);
    std::vector<std::vector<double>> phis(hi - lo + 1);
    for (int k = lo; k <= hi; ++k) {
      enumerate(z, k, &lls[k - lo], &phis[k - lo]);
      const double m = std::max(total, lls[k - lo]);
      total = m + std::log(std::exp(total - m) + std::exp(lls[k - lo] - m));
    }
    for (int k = lo; k <= hi; ++k)
      for (int i = 0; i < n; ++i) mix[i] += std::exp(lls[k - lo] - total) * phis[k - lo][i];
    expect_near(ll, total, 1e-10, "weighted log_lik (interval)", n);
    for (int i = 0; i < n; ++i) expect_near(phi[i], mix[i], 1e-10, "weighted phi (interval)", n);
  }
}

// augment_image.h as the GPU runs it: a team of threads striding over pixels
// and reducing through shared memory (here std::threads with a barrier),
// against the one-thread path of the CPU kernel: loading (flip, blur) must
// agree bit for bit, the contrast mean (summed in another order) to rounding.
struct ThreadTeam {
  std::barrier<>* bar;
  std::vector<double>* shared;
  int members, me;
  int rank() const { return me; }
  int size() const { return members; }
  void sync() const { bar->arrive_and_wait(); }
  template <typename T, typename Op>
  void reduce(T* values, int count, Op op) const {
    for (int j = 0; j < count; ++j) (*shared)[j * members + me] = static_cast<double>(values[j]);
    sync();
    for (int j = 0; j < count; ++j) {
      double acc = (*shared)[j * members];
      for (int t = 1; t < members; ++t) acc = op(j, acc, (*shared)[j * members + t]);
      values[j] = static_cast<T>(acc);
    }
    sync();  // the buffer is reused by the next reduction
  }
};

template <typename T, typename S>
void augment_team_case(std::mt19937& rng, int64_t h, int64_t w, int members, bool flip, double sigma,
                       const int64_t* order, bool exact) {
  const int64_t size = 3 * h * w;
  std::vector<S> src(size);
  std::uniform_real_distribution<double> unit(0, 1);
  for (auto& v : src) {
    if constexpr (std::is_same_v<S, uint8_t>) {
      v = static_cast<uint8_t>(rng() % 256);
    } else {
      v = static_cast<S>(unit(rng));
    }
  }
  const T factors[4] = {T(1.1), T(0.9), T(1.2), T(0.13)};
  std::vector<T> solo(size, T(-7)), team(size, T(-7));
  mlellp::detail::augment_image(mlellp::detail::SoloTeam{}, src.data(), solo.data(), h, w, flip, T(sigma), order,
                                factors);
  std::barrier<> bar(members);
  std::vector<double> shared(members);
  std::vector<std::thread> threads;
  for (int r = 0; r < members; ++r) {
    threads.emplace_back([&, r] {
      mlellp::detail::augment_image(ThreadTeam{&bar, &shared, members, r}, src.data(), team.data(), h, w, flip,
                                    T(sigma), order, factors);
    });
  }
  for (auto& t : threads) t.join();
  for (int64_t i = 0; i < size; ++i) {
    const double d = std::fabs(static_cast<double>(solo[i]) - static_cast<double>(team[i]));
    if (!(exact ? d == 0 : d <= 1e-5)) {
      std::printf("FAIL augment team (h %ld, w %ld, %d threads, flip %d, sigma %g) pixel %ld: %g vs %g\n",
                  static_cast<long>(h), static_cast<long>(w), members, flip, sigma, static_cast<long>(i),
                  static_cast<double>(solo[i]), static_cast<double>(team[i]));
      ++failures;
      return;
    }
  }
}

// bag_recursion.h's team algorithm as a GPU block runs it (posterior_bag and
// posterior_weighted_bag over one shared workspace, reductions through shared
// memory), here with std::threads and a barrier, against the one-thread path:
// teams of 1..64 on bags up to 600 (checkpointed and tilted past 256), counts,
// ranges of counts and Laplace-like weights. Reductions sum in another order,
// so the agreement is to rounding, not bit for bit.
template <typename Fn>
void run_team(int members, Fn fn) {
  std::barrier<> bar(members);
  std::vector<double> shared(4 * members);
  std::vector<std::thread> threads;
  for (int r = 0; r < members; ++r) threads.emplace_back([&, r] { fn(ThreadTeam{&bar, &shared, members, r}); });
  for (auto& t : threads) t.join();
}

void test_posterior_teams() {
  std::mt19937_64 rng(2024);
  std::normal_distribution<double> normal(0.0, 3.0);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  int case_no = 0;
  for (int64_t n : {1, 2, 7, 40, 257, 600}) {
    // (every member syncs twice a row: wide teams on long bags oversubscribe a small CPU)
    for (int members : n <= 40 ? std::vector<int>{1, 3, 8, 64} : std::vector<int>{2, 8}) {
      for (int rep = 0; rep < 3; ++rep, ++case_no) {
        std::vector<double> z(n);
        for (double& v : z) v = uniform(rng) < 0.1 ? normal(rng) * 100 : normal(rng);
        const int64_t y = static_cast<int64_t>(rng() % (n + 1));
        // posterior: one count
        std::vector<double> ws(mlellp::detail::posterior_workspace(n, y, y)), phi(n), phi_t(n);
        double ll = 0, ll_t = 0;
        mlellp::detail::posterior_bag(mlellp::detail::SoloTeam(), z.data(), n, y, y, phi.data(), &ll, ws.data());
        std::vector<double> ws_t(ws.size());
        run_team(members, [&](const ThreadTeam& team) {
          mlellp::detail::posterior_bag(team, z.data(), n, y, y, phi_t.data(), &ll_t, ws_t.data());
        });
        expect_near(ll_t, ll, 1e-12 * std::fabs(ll) + 1e-12, "team log_lik", case_no);
        for (int64_t i = 0; i < n; ++i) expect_near(phi_t[i], phi[i], 1e-11, "team phi", case_no);
        // posterior_weighted: log-weights over a window around y (some -inf), or a single count
        std::vector<double> logw(n + 1, -INFINITY);
        const int64_t half = rep == 0 ? 0 : static_cast<int64_t>(rng() % 6);
        for (int64_t k = std::max<int64_t>(0, y - half); k <= std::min<int64_t>(n, y + half); ++k) {
          logw[k] = -std::fabs(static_cast<double>(k - y)) * (0.5 + uniform(rng));
        }
        int64_t ylo, yhi;
        bool bad;
        mlellp::detail::weight_support(logw.data(), n, &ylo, &yhi, &bad);
        std::vector<double> wws(mlellp::detail::weighted_workspace(n, ylo, yhi)), wws_t(wws.size());
        double wll = 0, wll_t = 0;
        mlellp::detail::posterior_weighted_bag(mlellp::detail::SoloTeam(), z.data(), n, logw.data(), phi.data(), &wll,
                                               wws.data());
        run_team(members, [&](const ThreadTeam& team) {
          mlellp::detail::posterior_weighted_bag(team, z.data(), n, logw.data(), phi_t.data(), &wll_t, wws_t.data());
        });
        expect_near(wll_t, wll, 1e-12 * std::fabs(wll) + 1e-12, "team weighted log_lik", case_no);
        for (int64_t i = 0; i < n; ++i) expect_near(phi_t[i], phi[i], 1e-11, "team weighted phi", case_no);
      }
    }
  }
}

// multiclass_recursion.h's team runner (layer by layer, as a GPU block runs it)
// against its one-thread runner, with teams of 1..64 std::threads: float and
// double, plain and log-space bags (logits up to ~1e3), +-inf logits,
// impossible and NaN bags; and the one-thread runner against enumerating every
// labeling on tiny bags.
template <typename T>
void multiclass_team_case(std::mt19937_64& rng, int64_t n, int64_t C, double scale, int members, int case_no) {
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<T> z(n * C);
  for (auto& v : z) v = static_cast<T>(normal(rng));
  std::vector<int64_t> y(C, 0);
  for (int64_t i = 0; i < n; ++i) ++y[rng() % C];
  const int special = static_cast<int>(rng() % 8);
  if (special == 1 && n > 0) z[rng() % (n * C)] = static_cast<T>(INFINITY);
  if (special == 2 && n > 0) z[rng() % (n * C)] = static_cast<T>(-INFINITY);
  if (special == 3 && n > 0) z[rng() % (n * C)] = static_cast<T>(NAN);
  mlellp::multiclass::Lattice L;
  if (!mlellp::multiclass::make_lattice(y.data(), C, int64_t(1) << 40, &L)) return;
  const int64_t bytes = mlellp::multiclass::workspace_bytes<T>(n, C, L.states);
  std::vector<double> ws(bytes / sizeof(double) + 1), ws_t(ws.size());
  std::vector<T> phi(n * C, T(-7)), phi_t(n * C, T(-7));
  const T ll = mlellp::multiclass::posterior_bag<T>(z.data(), n, C, L, reinterpret_cast<unsigned char*>(ws.data()),
                                                    phi.data());
  std::vector<T> lls(members);
  run_team(members, [&](const ThreadTeam& team) {
    lls[team.rank()] = mlellp::multiclass::posterior_bag_team(team, z.data(), n, C, L,
                                                              reinterpret_cast<unsigned char*>(ws_t.data()), phi_t.data());
  });
  const double eps = std::is_same_v<T, float> ? 2e-6 : 1e-13;
  auto same = [&](double got, double want, double tol, const char* what) {
    if (std::isnan(want) ? !std::isnan(got) : !(got == want || std::fabs(got - want) <= tol)) {
      std::printf("FAIL %s (case %d: n %ld, C %ld, scale %g, %d members): got %.9g, want %.9g\n", what, case_no,
                  static_cast<long>(n), static_cast<long>(C), scale, members, got, want);
      ++failures;
      return false;
    }
    return true;
  };
  for (int r = 0; r < members; ++r) {
    if (!same(lls[r], ll, eps * (1 + std::fabs(static_cast<double>(ll))), "multiclass team log_lik")) return;
  }
  for (int64_t t = 0; t < n * C; ++t) {
    if (!same(phi_t[t], phi[t], std::is_same_v<T, float> ? 1e-5 : 1e-12, "multiclass team phi")) return;
  }
}

// P(y) and phi of one multi-class bag by enumerating its C^n labelings (double).
void enumerate_multiclass(const std::vector<double>& z, int64_t n, int64_t C, const std::vector<int64_t>& y,
                          double* log_lik, std::vector<double>* phi) {
  std::vector<double> logp(n * C);
  for (int64_t i = 0; i < n; ++i) {
    double mx = -INFINITY, s = 0;
    for (int64_t c = 0; c < C; ++c) mx = std::max(mx, z[i * C + c]);
    for (int64_t c = 0; c < C; ++c) s += std::exp(z[i * C + c] - mx);
    for (int64_t c = 0; c < C; ++c) logp[i * C + c] = z[i * C + c] - mx - std::log(s);
  }
  int64_t total = 1;
  for (int64_t i = 0; i < n; ++i) total *= C;
  std::vector<double> lw;
  std::vector<int64_t> codes;
  for (int64_t code = 0; code < total; ++code) {
    std::vector<int64_t> k(C, 0);
    double w = 0;
    for (int64_t i = 0, r = code; i < n; ++i, r /= C) {
      ++k[r % C];
      w += logp[i * C + r % C];
    }
    if (k == y) lw.push_back(w), codes.push_back(code);
  }
  double mx = -INFINITY, s = 0;
  for (double v : lw) mx = std::max(mx, v);
  for (double v : lw) s += std::exp(v - mx);
  *log_lik = mx + std::log(s);
  phi->assign(n * C, 0.0);
  for (size_t m = 0; m < lw.size(); ++m) {
    for (int64_t i = 0, r = codes[m]; i < n; ++i, r /= C) (*phi)[i * C + r % C] += std::exp(lw[m] - *log_lik);
  }
}

void test_multiclass_teams() {
  std::mt19937_64 rng(4242);
  int case_no = 0;
  for (double scale : {1.0, 8.0, 1000.0}) {
    for (int64_t C : {2, 3, 4, 10}) {
      for (int64_t n : {0, 1, 5, 16, 40}) {
        if (C == 10 && n > 16) continue;  // (a lattice of up to ~1e5 states)
        for (int members : {1, 3, 8, 64}) {
          multiclass_team_case<double>(rng, n, C, scale, members, case_no++);
          multiclass_team_case<float>(rng, n, C, scale, members, case_no++);
        }
      }
    }
  }
  std::normal_distribution<double> normal(0.0, 3.0);
  for (int bag = 0; bag < 200; ++bag) {
    const int64_t C = 2 + bag % 3, n = 1 + bag % 6;
    std::vector<double> z(n * C);
    for (double& v : z) v = normal(rng) * (bag % 4 == 0 ? 40 : 1);
    std::vector<int64_t> y(C, 0);
    for (int64_t i = 0; i < n; ++i) ++y[rng() % C];
    mlellp::multiclass::Lattice L;
    mlellp::multiclass::make_lattice(y.data(), C, 1 << 20, &L);
    std::vector<double> ws(mlellp::multiclass::workspace_bytes<double>(n, C, L.states) / sizeof(double)), phi(n * C);
    const double ll = mlellp::multiclass::posterior_bag<double>(z.data(), n, C, L,
                                                                reinterpret_cast<unsigned char*>(ws.data()), phi.data());
    double ref_ll;
    std::vector<double> ref_phi;
    enumerate_multiclass(z, n, C, y, &ref_ll, &ref_phi);
    expect_near(ll, ref_ll, 1e-10 * (1 + std::fabs(ref_ll)), "multiclass log_lik", bag);
    for (int64_t t = 0; t < n * C; ++t) expect_near(phi[t], ref_phi[t], 1e-10, "multiclass phi", bag);
  }
}

// bag_group.h's warp runner (variant 3 of bench/cuda_variants.cu) with host
// thread teams of 1..32 against posterior_bag bag by bag, bit for bit: groups
// staged and not (a buffer too small), bags it does not own (wide bands, large
// workspaces) left alone, +-inf and large logits.
void test_posterior_groups() {
  std::mt19937_64 rng(515);
  std::normal_distribution<double> normal(0.0, 3.0);
  for (int trial = 0; trial < 60; ++trial) {
    const int members = std::vector<int>{1, 5, 16, 32}[trial % 4];
    const int64_t num_bags = 1 + static_cast<int64_t>(rng() % 100);
    std::vector<int64_t> off(1, 0), cnt;
    for (int64_t b = 0; b < num_bags; ++b) {
      const int64_t n = rng() % 10 == 0 ? 150 + static_cast<int64_t>(rng() % 40) : static_cast<int64_t>(rng() % 13);
      off.push_back(off.back() + n);
      cnt.push_back(static_cast<int64_t>(rng() % (n + 1)));
    }
    std::vector<float> z(off.back());
    for (float& v : z) v = static_cast<float>(rng() % 20 == 0 ? normal(rng) * 100 : normal(rng));
    if (!z.empty() && trial % 3 == 0) z[rng() % z.size()] = INFINITY;
    std::vector<float> phi(z.size(), -7.f), ll(num_bags, -7.f), phi_g(z.size(), -7.f), ll_g(num_bags, -7.f);
    const int64_t cap = trial % 2 == 0 ? 512 : 8;
    std::vector<float> stage(2 * cap);
    for (int64_t b0 = 0; b0 < num_bags; b0 += members) {
      const int64_t b1 = std::min(num_bags, b0 + members);
      run_team(members, [&](const ThreadTeam& team) {
        mlellp::detail::posterior_group(team, z.data(), off.data(), cnt.data(), b0, b1, 64, stage.data(), cap,
                                        phi_g.data(), ll_g.data());
      });
    }
    for (int64_t b = 0; b < num_bags; ++b) {
      const int64_t n = off[b + 1] - off[b];
      if (!mlellp::detail::is_group_bag(n, cnt[b], 64)) {
        if (ll_g[b] != -7.f) std::printf("FAIL group wrote a bag it does not own (trial %d)\n", trial), ++failures;
        continue;
      }
      std::vector<float> ws(mlellp::detail::posterior_workspace(n, cnt[b], cnt[b]));
      mlellp::detail::posterior_bag(mlellp::detail::SoloTeam(), z.data() + off[b], n, cnt[b], cnt[b],
                                    phi.data() + off[b], ll.data() + b, ws.data());
      bool same = std::memcmp(&ll[b], &ll_g[b], sizeof(float)) == 0 &&
                  (n == 0 || std::memcmp(phi.data() + off[b], phi_g.data() + off[b], n * sizeof(float)) == 0);
      if (!same) {
        std::printf("FAIL group bag %ld (trial %d, %d members, cap %ld): log_lik %g vs %g\n", static_cast<long>(b),
                    trial, members, static_cast<long>(cap), ll_g[b], ll[b]);
        ++failures;
        break;
      }
    }
  }
}

void test_augment_teams() {
  std::mt19937 rng(7);
  const int64_t no_contrast[4] = {3, 0, 2, -1};  // hue, brightness, saturation: no reduction
  const int64_t all_ops[4] = {1, 3, 0, 2};       // contrast first: its mean is a reduction
  for (int64_t h : {1, 2, 3, 17, 33}) {
    for (int64_t w : {1, 2, 5, 33, 300}) {
      for (int members : {3, 8, 64}) {
        for (int flip = 0; flip < 2; ++flip) {
          for (double sigma : {0.0, 0.7}) {
            augment_team_case<float, float>(rng, h, w, members, flip, sigma, no_contrast, true);
            augment_team_case<float, uint8_t>(rng, h, w, members, flip, sigma, no_contrast, true);
            augment_team_case<double, double>(rng, h, w, members, flip, sigma, all_ops, false);
          }
        }
      }
    }
  }
}

}  // namespace

int main() {
  test_augment_teams();
  test_posterior_teams();
  test_multiclass_teams();
  test_posterior_groups();
  test_multiclass_plan();
  test_weighted_against_enumeration();
  test_header_against_enumeration();
  test_header_at_extreme_magnitudes();
  test_phi_jvp_against_enumeration();
  test_dispatcher();
  std::printf("%s: %d failures\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
