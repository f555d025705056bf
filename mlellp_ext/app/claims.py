"""The seed paper's claims (a..g) beside what `mlellp reproduce` measured, each with a
verdict by rules fixed before the runs (:func:`claims`)."""
from __future__ import annotations

import math
import statistics

LABELS = {"supervised": "supervised", "dllp": "DLLP", "llpgan": "LLP-GAN", "mle": "MLE-LLP"}


def mean_std(values):
    """(mean, standard deviation) of the values that are numbers (NaN, NaN if none; sd 0 for one)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def clear(a, b):
    """Two standard errors of the difference of two means of independent samples
    (mean, sd, n): a difference beyond it is taken as real, not noise."""
    return 2 * math.sqrt(a[1] ** 2 / a[2] + b[1] ** 2 / b[2])


def claims(curves_rows, bags_rows, timing_rows, methods):
    """Each claim of the seed paper (a..g), our measurement and a verdict, by rules fixed
    before the runs: final accuracies are the last epoch's mean ± sd over repetitions,
    and a difference counts only beyond two standard errors (:func:`clear`)."""
    final = {}
    for m in methods:
        last = max(int(r["epoch"]) for r in curves_rows if r["method"] == m)
        values = [r["test_accuracy"] for r in curves_rows if r["method"] == m and int(r["epoch"]) == last]
        final[m] = (*mean_std(values), len(values))
    timing = {r["method"]: r for r in timing_rows}
    acc = lambda m: f"{LABELS[m]} {final[m][0]:.3f} ± {final[m][1]:.3f}"  # noqa: E731
    out = []

    def claim(key, text, measured, verdict):
        out.append({"claim": key, "seed paper": text, "measured": measured, "verdict": verdict})

    llp = [m for m in ("dllp", "llpgan", "mle") if m in methods]
    if "supervised" in methods and llp:
        below = [final["supervised"][0] - final[m][0] > clear(final["supervised"], final[m]) for m in llp]
        above = [final[m][0] - final["supervised"][0] > clear(final["supervised"], final[m]) for m in llp]
        claim("a", "every LLP method below supervised", "; ".join(acc(m) for m in ["supervised"] + llp),
              "holds" if all(below) else "does not hold" if any(above) else "cannot tell at this budget")
    if {"mle", "dllp"} <= set(methods):
        d = final["mle"][0] - final["dllp"][0]
        # "Comparable": within 2 points (the paper's tables differ by about that).
        verdict = ("holds" if abs(d) <= 0.02 else "does not hold" if abs(d) > clear(final["mle"], final["dllp"])
                   else "cannot tell at this budget")
        claim("b", "MLE-LLP and DLLP comparable in final accuracy (within 2 points)",
              f"{acc('mle')}; {acc('dllp')}; difference {d:+.3f}", verdict)
        e_mle, e_dllp = timing["mle"]["epochs_to_99pct"], timing["dllp"]["epochs_to_99pct"]
        ratio = e_mle / e_dllp
        claim("c", "MLE-LLP reaches its final accuracy in about half DLLP's epochs",
              f"epochs to 99% of final mean accuracy (mean curve): MLE-LLP {e_mle}, DLLP {e_dllp} (ratio {ratio:.2f})",
              "holds" if ratio <= 0.6 else "does not hold" if ratio >= 1 else "partly: fewer, not half")
    if "llpgan" in methods and len(methods) > 1:
        others = [m for m in methods if m != "llpgan"]
        lowest = min(others, key=lambda m: final[m][0])
        d = final[lowest][0] - final["llpgan"][0]
        margin = clear(final[lowest], final["llpgan"])
        claim("d", "LLP-GAN the least accurate on CIFAR", "; ".join(acc(m) for m in methods),
              "holds" if d > margin else "does not hold" if -d > margin else "cannot tell at this budget")
    if {"llpgan", "mle"} <= set(methods):
        ratio = timing["llpgan"]["epoch_seconds"] / timing["mle"]["epoch_seconds"]
        claim("e", "an LLP-GAN epoch several (≥ 2) times an MLE-LLP epoch",
              f"{timing['llpgan']['epoch_seconds']:.2f} s against {timing['mle']['epoch_seconds']:.2f} s "
              f"(ratio {ratio:.1f})", "holds" if ratio >= 2 else "does not hold")
    if "supervised" in methods and llp and bags_rows:
        ms = sorted({int(r["train_bags"]) for r in bags_rows})
        acc_at = lambda m, k: statistics.fmean(r["test_accuracy"] for r in bags_rows  # noqa: E731
                                               if r["method"] == m and int(r["train_bags"]) == k)
        gaps = {m: [acc_at("supervised", k) - acc_at(m, k) for k in ms] for m in llp}
        # One repetition per m: a change of the gap counts only beyond 2 points.
        shrink = [g[0] - g[-1] > 0.02 for g in gaps.values()]
        grow = [g[-1] - g[0] > 0.02 for g in gaps.values()]
        claim("f", f"the gap to supervised shrinks as the training bags m grow ({ms[0]}..{ms[-1]})",
              "; ".join(f"{LABELS[m]} " + " → ".join(f"{x:.3f}" for x in g) for m, g in gaps.items()),
              "holds" if all(shrink) else "does not hold" if any(grow) else "cannot tell at this budget")
    if {"mle", "dllp"} <= set(methods):
        from scipy.stats import f as f_dist

        (_, s_mle, n_mle), (_, s_dllp, n_dllp) = final["mle"], final["dllp"]
        # One-sided F test of the variances at 5%: with 3 repetitions a ratio of sds must
        # pass sqrt(19) = 4.4 to count.
        critical = math.sqrt(f_dist.ppf(0.95, n_dllp - 1, n_mle - 1)) if min(n_mle, n_dllp) > 1 else math.inf
        verdict = ("holds" if s_dllp > critical * s_mle else "does not hold" if s_mle > critical * s_dllp
                   else "cannot tell at this budget")
        claim("g", "MLE-LLP's variance over repetitions smaller than DLLP's",
              f"sd of final accuracy: MLE-LLP {s_mle:.3f}, DLLP {s_dllp:.3f} ({n_mle} repetitions; "
              f"a ratio must pass {critical:.1f})", verdict)
    return out

