// C++ test (CTest): the shared per-bag arithmetic against brute-force
// enumeration, and the registered ops through the dispatcher, without Python.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <random>
#include <thread>
#include <type_traits>
#include <vector>

#include "augment_image.h"
#include "bag_recursion.h"
#include "checks.h"
#include "multiclass_recursion.h"

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
  test_multiclass_plan();
  test_weighted_against_enumeration();
  test_header_against_enumeration();
  test_header_at_extreme_magnitudes();
  test_phi_jvp_against_enumeration();
  test_dispatcher();
  std::printf("%s: %d failures\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
