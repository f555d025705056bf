"""mlellp_ext.sklearn: EM around scikit-learn estimators (binary and multi-class
counts, uncertain counts, Pipelines, DataFrames), its errors, and scikit-learn's own
estimator checks where they apply."""
import itertools
import os
import re
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from sklearn import config_context
from sklearn.base import clone
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mlellp_ext import count_weights
from mlellp_ext.sklearn import EMClassifier, ProportionClassifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tree fits synchronise their OpenMP threads thousands of times per fit: on a
    # loaded 2-core machine one thread is several times faster.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def make_bags(rng, n, low, high):
    """Random bags of low..high rows (the last one may be smaller), rows shuffled."""
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(low, high + 1)))
    bags = np.repeat(np.arange(len(sizes)), sizes)[:n]
    rng.shuffle(bags)
    return bags


def make_data(rng, n, n_classes=2, n_features=6, scale=2.0):
    """Gaussian features; labels from a softmax of a random linear map plus a
    non-linear term (so trees and linear models both learn something)."""
    X = rng.normal(size=(n, n_features))
    W = rng.normal(size=(n_features, n_classes)) * scale / np.sqrt(n_features)
    z = X @ W
    z[:, -1] += 1.5 * np.sin(2 * X[:, 0])
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = (rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1)
    return X, y


def bag_counts(bags, y, n_classes=2):
    n_bags = bags.max() + 1
    if n_classes == 2:
        return np.bincount(bags, weights=y, minlength=n_bags).astype(np.int64)
    return np.stack([np.bincount(bags, weights=y == c, minlength=n_bags) for c in range(n_classes)], 1).astype(int)


def auc(model, X, y):
    return roc_auc_score(y, model.predict_proba(X)[:, 1])


class Recorder(LogisticRegression):
    """LogisticRegression that keeps the sample weights of every fit (one per fitted clone)."""
    seen = []

    def fit(self, X, y, sample_weight=None):
        Recorder.seen.append((np.array(X), np.array(y), np.array(sample_weight)))
        return super().fit(X, y, sample_weight=sample_weight)


def brute_force_posterior(p, count):
    """P(h_i = 1 | sum h = count) by enumerating every labelling of the bag."""
    num, den = np.zeros(len(p)), 0.0
    for h in itertools.product([0, 1], repeat=len(p)):
        if sum(h) == count:
            w = np.prod([pi if hi else 1 - pi for pi, hi in zip(p, h)])
            num += w * np.array(h)
            den += w
    return num / den


def test_e_step_feeds_m_step_exact_posteriors(rng):
    # Bags of up to 7 rows, interleaved in X: the second fit's weights must be the
    # brute-force posteriors of the first model's predictions, row by row.
    X, y = make_data(rng, 60)
    bags = make_bags(rng, 60, 2, 7)
    counts = bag_counts(bags, y)
    Recorder.seen = []
    em = EMClassifier(Recorder(), max_iter=1, cross_fit=False).fit(X, counts, bags=bags)
    assert len(Recorder.seen) == 2 and em.n_iter_ == 1
    X0, y0, w0 = Recorder.seen[0]
    np.testing.assert_allclose(w0[60:], counts[bags] / np.bincount(bags)[bags])  # labels 1 first: proportions
    first = LogisticRegression().fit(X0, y0, sample_weight=w0)
    p = first.predict_proba(X)[:, 1]
    want = np.empty(60)
    for b in range(bags.max() + 1):
        rows = np.flatnonzero(bags == b)
        want[rows] = brute_force_posterior(p[rows], counts[b])
    _, y1, w1 = Recorder.seen[1]
    assert (y1 == np.repeat([0, 1], 60)).all()
    np.testing.assert_allclose(w1[60:], want, atol=1e-8)
    np.testing.assert_allclose(w1[:60], 1 - want, atol=1e-8)
    log_lik = np.mean([np.log(sum(np.prod([q if h else 1 - q for q, h in zip(p[bags == b], hs)])
                                  for hs in itertools.product([0, 1], repeat=int((bags == b).sum()))
                                  if sum(hs) == counts[b])) for b in range(bags.max() + 1)])
    np.testing.assert_allclose(em.log_likelihood_[0], log_lik, rtol=1e-6)


@pytest.mark.parametrize("estimator", [LogisticRegression(), HistGradientBoostingClassifier(max_iter=20),
                                       RandomForestClassifier(n_estimators=20, min_samples_leaf=5, random_state=0),
                                       make_pipeline(StandardScaler(), LogisticRegression())],
                         ids=["logistic", "hgb", "forest", "pipeline"])
def test_learns_with_estimator(rng, estimator):
    X, y = make_data(rng, 2400)
    bags = make_bags(rng, 2000, 8, 32)
    counts = bag_counts(bags, y[:2000])
    em = EMClassifier(estimator, max_iter=3, n_folds=3, random_state=0).fit(X[:2000], counts, bags=bags)
    base = ProportionClassifier(estimator).fit(X[:2000], counts, bags=bags)
    assert auc(em, X[2000:], y[2000:]) > max(0.65, auc(base, X[2000:], y[2000:]) - 0.01)  # learns; not below
    assert em.predict_proba(X[:5]).shape == (5, 2) and set(em.predict(X)) <= {0, 1}
    assert em.cross_fit_ == (not isinstance(estimator, LogisticRegression) and not hasattr(estimator, "steps"))
    assert em.n_iter_ == len(em.log_likelihood_) <= 3


def test_em_beats_proportions_with_a_flexible_model(rng):
    # Where the bags' proportions say little about their rows (bags of 32..64), the
    # baseline learns little and EM much more: this fails if the E-step stops
    # informing the M-step (EM would then be the baseline).
    X, y = make_data(rng, 3000, scale=3.0)
    bags = make_bags(rng, 2400, 32, 64)
    counts = bag_counts(bags, y[:2400])
    hgb = HistGradientBoostingClassifier(max_iter=30)
    em = EMClassifier(hgb, max_iter=4, n_folds=3, random_state=0).fit(X[:2400], counts, bags=bags)
    base = ProportionClassifier(hgb).fit(X[:2400], counts, bags=bags)
    assert auc(em, X[2400:], y[2400:]) > auc(base, X[2400:], y[2400:]) + 0.05
    assert em.log_likelihood_[-1] > em.log_likelihood_[0]


def test_example_on_a_real_table():
    # examples/tabular.py: the Fair affairs survey (6,366 rows, shipped inside
    # statsmodels) in random bags of 8..32. Each EM within 0.05 test AUC of the same
    # model trained on instance labels, and EM with the trees well above the
    # proportion baseline (what EM would be if the E-step stopped informing the M-step).
    pytest.importorskip("statsmodels", reason="the real table ships with statsmodels (requirements.txt)")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tree fits on a loaded 2-core machine: see one_thread
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "tabular.py")], capture_output=True,
                         text=True, timeout=600, check=True, env=env).stdout
    found = re.findall(r"^(.+): EM test AUC ([0-9.]+) .*proportions ([0-9.]+), supervised ([0-9.]+)$", out, re.M)
    aucs = {name: tuple(map(float, v)) for name, *v in found}
    assert set(aucs) == {"logistic regression", "gradient boosting"}, out
    for name, (em, proportions, supervised) in aucs.items():
        assert em > supervised - 0.05, out
    em, proportions, _ = aucs["gradient boosting"]
    assert em > proportions + 0.03, out
    assert float(re.search(r"epsilon = 1: EM test AUC ([0-9.]+)", out).group(1)) > 0.65, out


def test_pipeline_with_metadata_routing(rng):
    X, y = make_data(rng, 1200)
    bags = make_bags(rng, 1000, 8, 32)
    pipe = make_pipeline(StandardScaler(), LogisticRegression())
    with config_context(enable_metadata_routing=True):
        em = EMClassifier(pipe, max_iter=3).fit(X[:1000], bag_counts(bags, y[:1000]), bags=bags)
        assert auc(em, X[1000:], y[1000:]) > 0.75
    plain = EMClassifier(pipe, max_iter=3).fit(X[:1000], bag_counts(bags, y[:1000]), bags=bags)
    np.testing.assert_allclose(em.predict_proba(X[1000:]), plain.predict_proba(X[1000:]), rtol=1e-6)


def test_dataframe_with_columns_by_name(rng):
    pd = pytest.importorskip("pandas")
    from sklearn.compose import make_column_transformer

    X, y = make_data(rng, 1000, n_features=3)
    frame = pd.DataFrame(X, columns=["a", "b", "c"]).assign(unused="x")
    pipe = make_pipeline(make_column_transformer((StandardScaler(), ["a", "b", "c"])), LogisticRegression())
    bags = make_bags(rng, 1000, 8, 32)
    em = EMClassifier(pipe, max_iter=2).fit(frame, bag_counts(bags, y), bags=bags)
    assert list(em.feature_names_in_) == ["a", "b", "c", "unused"]
    assert auc(em, frame, y) > 0.7


def test_multiclass_count_vectors(rng):
    X, y = make_data(rng, 3000, n_classes=3, scale=3.0)
    bags = make_bags(rng, 2500, 8, 32)
    counts = bag_counts(bags, y[:2500], 3)
    em = EMClassifier(LogisticRegression(), max_iter=8).fit(X[:2500], counts, bags=bags)
    base = ProportionClassifier(LogisticRegression()).fit(X[:2500], counts, bags=bags)
    supervised = LogisticRegression().fit(X[:2500], y[:2500])
    acc = {name: (m.predict(X[2500:]) == y[2500:]).mean() for name, m in
           [("em", em), ("base", base), ("supervised", supervised)]}
    assert em.predict_proba(X[:4]).shape == (4, 3) and list(em.classes_) == [0, 1, 2]
    assert acc["em"] > acc["supervised"] - 0.06 and acc["em"] >= acc["base"] - 0.02, acc
    assert em.log_likelihood_[-1] > em.log_likelihood_[0]


def test_proportions_keyword(rng):
    X, y = make_data(rng, 300)
    bags = make_bags(rng, 300, 4, 10)
    counts = bag_counts(bags, y)
    sizes = np.bincount(bags)
    a = EMClassifier(max_iter=2).fit(X, counts, bags=bags)
    b = EMClassifier(max_iter=2).fit(X, proportions=counts / sizes, bags=bags)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X))
    b = int(np.argmax(sizes % 3 != 0))  # a bag whose size 1/3 of is not whole
    bad = counts / sizes
    bad[b] = 1 / 3
    with pytest.raises(ValueError, match=rf"proportions\[{b}\] = 0.333.* times bag {b}'s size {sizes[b]} is .*not a whole"):
        EMClassifier().fit(X, proportions=bad, bags=bags)


def test_one_hot_weights_equal_exact_counts(rng):
    X, y = make_data(rng, 400)
    bags = make_bags(rng, 400, 4, 16)
    counts = bag_counts(bags, y)
    w = count_weights.exact(torch.from_numpy(counts), torch.from_numpy(np.bincount(bags)))
    a = EMClassifier(max_iter=3).fit(X, counts, bags=bags)
    b = EMClassifier(max_iter=3).fit(X, count_log_weights=w, bags=bags)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), rtol=1e-6)
    np.testing.assert_allclose(a.log_likelihood_, b.log_likelihood_, rtol=1e-6)


@pytest.mark.parametrize("noise", ["interval", "laplace", "gaussian"])
def test_uncertain_counts(rng, noise):
    X, y = make_data(rng, 3000)
    bags = make_bags(rng, 2500, 8, 32)
    counts = bag_counts(bags, y[:2500])
    sizes = torch.from_numpy(np.bincount(bags))
    c = torch.from_numpy(counts)
    if noise == "interval":  # "between y - 1 and y + 1"
        w = count_weights.interval((c - 1).clamp(min=0), torch.minimum(c + 1, sizes), sizes)
    elif noise == "laplace":  # released with label-DP at epsilon = 1
        released = count_weights.privatize(c, 1.0, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
        w = count_weights.laplace(released.double(), 1.0, sizes)
    else:
        w = count_weights.gaussian(c.double() + torch.from_numpy(rng.normal(size=len(c))), 1.0, sizes)
    em = EMClassifier(max_iter=8).fit(X[:2500], count_log_weights=w, bags=bags)
    supervised = LogisticRegression().fit(X[:2500], y[:2500])
    assert auc(em, X[2500:], y[2500:]) > auc(supervised, X[2500:], y[2500:]) - 0.06


def test_soft_m_step_with_a_regressor(rng):
    X, y = make_data(rng, 2400)
    bags = make_bags(rng, 2000, 8, 32)
    em = EMClassifier(HistGradientBoostingRegressor(max_iter=30), max_iter=3, random_state=0)
    em.fit(X[:2000], bag_counts(bags, y[:2000]), bags=bags)
    assert em._soft and not hasattr(em, "decision_function")
    proba = em.predict_proba(X[2000:])
    assert proba.shape == (400, 2) and np.allclose(proba.sum(1), 1) and auc(em, X[2000:], y[2000:]) > 0.75


def test_decision_function_and_params(rng):
    X, y = make_data(rng, 300)
    bags = make_bags(rng, 300, 4, 10)
    em = EMClassifier(LogisticRegression(C=0.5), max_iter=2).fit(X, bag_counts(bags, y), bags=bags)
    np.testing.assert_allclose(em.decision_function(X), em.estimator_.decision_function(X))
    assert 0 <= em.score(X, y) <= 1
    assert not hasattr(EMClassifier(RandomForestClassifier()), "decision_function")
    params = clone(em).set_params(estimator__C=2.0, max_iter=7).get_params()
    assert params["estimator__C"] == 2.0 and params["max_iter"] == 7


def test_errors_name_argument_and_value(rng):
    X, y = make_data(rng, 20)
    bags = np.arange(20) % 4
    counts = bag_counts(bags, y)
    cases = [
        (dict(counts=counts, bags=np.where(bags == 3, 4, bags)), r"bags\[3\] = 4 is outside \[0, n_bags\) = \[0, 4\)"),
        (dict(counts=counts, bags=bags[:-1]), r"bags must have one entry per row of X, shape \(20,\)"),
        (dict(counts=counts, bags=bags + 0.5), r"bags must be whole numbers, got bags\[0\] = 0.5"),
        (dict(counts=np.array([6, 0, 1, 1]), bags=bags), r"counts\[0\] = 6 is more than bag 0's size 5"),
        (dict(counts=counts / 5, bags=bags), r"counts must be whole numbers, .*proportions go in proportions="),
        (dict(counts=np.array([1, -1, 1, 1]), bags=bags), r"counts must be non-negative, got counts\[1\] = -1"),
        (dict(counts=np.array([[2, 3], [1, 4], [5, 1], [0, 5]]), bags=bags),
         r"counts\[2\] = \[5, 1\] sums to 6, but bag 2 holds 5 rows"),
        (dict(counts=counts, proportions=counts / 5, bags=bags), r"exactly one of counts, proportions"),
        (dict(count_log_weights=np.zeros(10), bags=bags), r"count_log_weights must be 1-D .* got shape \[10\]"),
        (dict(counts=counts), r"bags is required"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            EMClassifier().fit(X, **kwargs)
    with pytest.raises(ValueError, match=r"estimator KNeighborsClassifier\(\) does not take sample_weight"):
        EMClassifier(KNeighborsClassifier()).fit(X, counts, bags=bags)
    X[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"X\[7, 2\] is NaN, which estimator LogisticRegression refuses"):
        EMClassifier().fit(X, counts, bags=bags)
    EMClassifier(HistGradientBoostingClassifier(max_iter=5), max_iter=1).fit(X, counts, bags=bags)  # takes NaN
    with pytest.raises(ValueError, match=r"max_iter must be an integer >= 0, got -1"):
        EMClassifier(max_iter=-1).fit(X[:, :2], counts, bags=bags)


class SingletonBags(EMClassifier):
    """EMClassifier on bags of one row each: LLP reduced to supervised learning, so that
    scikit-learn's checks, which all fit on per-row labels y, can run. Labels become
    counts (binary) or one-hot count vectors; classes_ maps back to the labels."""

    def fit(self, X, y):
        from sklearn.preprocessing import LabelEncoder
        from sklearn.utils.multiclass import check_classification_targets

        check_classification_targets(y)
        encoder = LabelEncoder().fit(y)
        codes = encoder.transform(y)
        n_classes = max(len(encoder.classes_), 2)
        counts = codes if n_classes == 2 else np.eye(n_classes, dtype=np.int64)[codes]
        super().fit(X, counts, bags=np.arange(len(codes)))
        self.classes_ = encoder.classes_
        return self


def _checks():
    from sklearn.utils.estimator_checks import parametrize_with_checks

    # check_array_api_input skips itself without SCIPY_ARRAY_API; every other check
    # applies through the reduction and passes. Checks of fit's bag arguments
    # (which no generic check knows) are test_errors_name_argument_and_value.
    return parametrize_with_checks([SingletonBags(max_iter=1)])


@_checks()
def test_sklearn_estimator_checks(estimator, check):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LogisticRegression's convergence warnings on the checks' data
        check(estimator)


def test_tabular_experiment_runs(tmp_path):
    # experiments/tabular/run.py against the current API, on a subsample (its results
    # come from the real run, docs/experiments/tabular.md).
    pytest.importorskip("statsmodels", reason="the real table ships with statsmodels (requirements.txt)")
    import importlib.util

    spec = importlib.util.spec_from_file_location("tabular_run", os.path.join(ROOT, "experiments", "tabular", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        module.main(["--out", str(tmp_path), "--seeds", "1", "--bags", "8-32", "--epsilons", "inf", "1",
                     "--rows", "600", "--em-iterations", "1"])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "summary.md").exists() and (tmp_path / "auc.png").exists()
    assert len((tmp_path / "runs.csv").read_text().splitlines()) == 1 + 2 + 2 * 6
