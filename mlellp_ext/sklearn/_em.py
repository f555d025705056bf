"""EMClassifier and ProportionClassifier: LLP around any scikit-learn estimator."""
from __future__ import annotations

import numbers

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone, is_regressor
from sklearn.linear_model import LogisticRegression
from sklearn.utils import _safe_indexing, check_random_state, get_tags
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from .. import posterior, posterior_multiclass, posterior_multiclass_approx, posterior_weighted
from ..bags import lattice_states
from ._inputs import bag_data, final_step, first_nan, fit_weighted, request_sample_weight, takes_sample_weight

# Model families whose in-sample predictions are about as good as out-of-sample ones
# (few parameters per row): EM on them needs no cross-fitting.
_RIGID_MODULES = ("sklearn.linear_model", "sklearn.naive_bayes", "sklearn.discriminant_analysis")
_MAX_STATES = 1 << 24  # posterior_multiclass's default state budget per bag


def _has(attr):
    return lambda self: self.m_step != "soft" and hasattr(self.estimator_ if hasattr(self, "estimator_")
                                                           else self._base(), attr)


class ProportionClassifier(ClassifierMixin, BaseEstimator):
    """The common LLP baseline: each row's bag proportion as its soft label, one fit.

    Same ``fit`` as :class:`EMClassifier`. With uncertain counts the soft label is the
    count's posterior mean under a binomial prior (the first E-step of EM with every
    probability 1/2) over the bag size; with exact counts it is the proportion itself.

    Parameters:
        estimator: a scikit-learn classifier (default ``LogisticRegression()``), cloned.
        m_step: ``"weights"`` (each row once per class, weighted by its soft label; needs
            ``sample_weight``), ``"soft"`` (``fit(X, soft labels)``: a regressor, or any
            estimator that takes soft labels) or ``"auto"`` (soft for a regressor,
            weights otherwise).
    """

    def __init__(self, estimator=None, *, m_step="auto"):
        self.estimator = estimator
        self.m_step = m_step

    # -- fitting ---------------------------------------------------------------
    def fit(self, X, counts=None, *, bags=None, proportions=None, count_log_weights=None):
        """Fit on bags' label counts.

        Args:
            X: (n_samples, n_features) array-like, sparse matrix or DataFrame (passed
                to the estimator as it is, so a Pipeline may select columns by name).
            counts: (n_bags,) positives per bag, or (n_bags, n_classes) count vectors
                (columns in class order; ``classes_`` is ``arange(n_classes)``).
            bags: (n_samples,) integers in [0, n_bags): the bag of each row, any order.
            proportions: instead of counts, (n_bags,) or (n_bags, n_classes) fractions
                that times the bag's size are whole numbers (llp-learn's input).
            count_log_weights: instead of counts, binary counts known up to a
                likelihood, (n_samples + n_bags,) in posterior_weighted's layout for
                ``sizes = np.bincount(bags)`` (:mod:`mlellp_ext.count_weights`).
        """
        where = f"{type(self).__name__}.fit"
        X = self._check_X(X, reset=True)
        data = bag_data(X.shape[0], counts, bags, proportions, count_log_weights, where)
        self._check_params(where)
        self.classes_ = np.arange(data.n_classes)
        phi, _ = self._e_step(np.zeros((X.shape[0], data.n_classes)), data)  # proportions, or E[S | o] / n
        phi = self._iterate(X, data, phi, where)
        self.estimator_ = self._fit_one(X, phi)
        return self

    def _iterate(self, X, data, phi, where):
        return phi  # the baseline: no E-step after the first

    def _base(self):
        return LogisticRegression() if self.estimator is None else self.estimator

    def _check_params(self, where):
        if self.m_step not in ("auto", "weights", "soft"):
            raise ValueError(f"{where}: m_step must be 'auto', 'weights' or 'soft', got {self.m_step!r}")
        base = self._base()
        regressor = is_regressor(final_step(base))
        if self.m_step == "weights" or (self.m_step == "auto" and not regressor):
            if not takes_sample_weight(base):
                raise ValueError(
                    f"{where}: estimator {base!r} does not take sample_weight in fit, which the M-step needs "
                    f"(each row once per class, weighted by its posterior); use an estimator that does, or "
                    f"m_step='soft' with one that fits soft labels (a regressor)")
        self._soft = self.m_step == "soft" or (self.m_step == "auto" and regressor)

    def _check_X(self, X, reset):
        if not hasattr(X, "iloc"):  # DataFrames go to the estimator as they are (column names, dtypes)
            X = check_array(X, accept_sparse=["csr", "csc"], ensure_all_finite=False, dtype=None)
        validate_data(self, X, skip_check_array=True, reset=reset)
        base = self.estimator_ if hasattr(self, "estimator_") and not reset else self._base()
        if not get_tags(base).input_tags.allow_nan:
            at = first_nan(X)
            if at is not None:
                raise ValueError(f"{type(self).__name__}: X[{at[0]}, {at[1]}] is NaN, which estimator "
                                 f"{type(final_step(base)).__name__} refuses; impute it (a Pipeline with "
                                 f"SimpleImputer) or use an estimator that takes NaN (HistGradientBoostingClassifier)")
        return X

    def _fit_one(self, X, phi, rows=None):
        """The M-step: a fresh clone fitted to soft labels phi (n, C) of rows ``rows``."""
        estimator = request_sample_weight(clone(self._base()))
        if rows is not None:
            X, phi = _safe_indexing(X, rows), phi[rows]
        n, n_classes = phi.shape
        if self._soft:
            return estimator.fit(X, phi[:, 1] if n_classes == 2 else phi)
        # Each row once per class, weighted by its posterior: the weighted log-loss is the
        # cross-entropy against phi, which any weighted classifier's fit minimises.
        return fit_weighted(estimator, _safe_indexing(X, np.tile(np.arange(n), n_classes)),
                            np.repeat(np.arange(n_classes), n), phi.T.ravel())

    def _proba(self, estimator, X, n_classes):
        """(n, C) class probabilities of a fitted M-step estimator."""
        if self._soft and not hasattr(estimator, "predict_proba"):
            p = np.clip(np.asarray(estimator.predict(X), dtype=np.float64), 0.0, 1.0)
            p = np.stack([1 - p, p], 1) if n_classes == 2 else p.reshape(len(p), -1)
            return p / np.maximum(p.sum(1, keepdims=True), 1e-300)
        if hasattr(estimator, "predict_proba"):
            return np.asarray(estimator.predict_proba(X), dtype=np.float64)
        z = np.asarray(estimator.decision_function(X), dtype=np.float64)  # read as logits
        z = np.stack([np.zeros_like(z), z], 1) if z.ndim == 1 else z
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def _e_step(self, proba, data):
        """phi (n, C) and the mean log-likelihood per bag, from probabilities in row order."""
        p = torch.from_numpy(np.clip(proba[data.order], 1e-12, 1.0))
        if data.n_classes == 2:
            z = torch.log(p[:, 1]) - torch.log(p[:, 0])  # the clip keeps logits within about +-28
            if data.log_weights is not None:
                phi, log_lik = posterior_weighted(z, data.offsets, data.log_weights)
            else:
                phi, log_lik = posterior(z, data.offsets, data.counts)
            phi = torch.stack([1 - phi, phi], 1)
        elif bool((lattice_states(data.counts) <= _MAX_STATES).all()):
            phi, log_lik = posterior_multiclass(torch.log(p), data.offsets, data.counts)
        else:  # bags with too many count vectors for the exact E-step
            phi, log_lik = posterior_multiclass_approx(torch.log(p), data.offsets, data.counts)
        out = np.empty(phi.shape)
        out[data.order] = phi.detach().numpy()
        return out, float(log_lik.detach().mean())

    # -- prediction ------------------------------------------------------------
    def predict_proba(self, X):
        """(n, n_classes) class probabilities, columns in ``classes_`` order."""
        check_is_fitted(self)
        return self._proba(self.estimator_, self._check_X(X, reset=False), len(self.classes_))

    def predict(self, X):
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), 1)]

    @available_if(_has("decision_function"))
    def decision_function(self, X):
        """The fitted estimator's decision_function (log-odds for LogisticRegression)."""
        check_is_fitted(self)
        return self.estimator_.decision_function(self._check_X(X, reset=False))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        base = get_tags(self._base())
        tags.input_tags.allow_nan = base.input_tags.allow_nan
        tags.input_tags.sparse = base.input_tags.sparse
        return tags


class EMClassifier(ProportionClassifier):
    """MLE-LLP by EM around any scikit-learn estimator: the exact E-step of
    :func:`~mlellp_ext.posterior` (count vectors: ``posterior_multiclass``; uncertain
    counts: ``posterior_weighted``), the M-step a fit to the posteriors.

    Parameters:
        estimator: a scikit-learn classifier taking ``sample_weight`` (a Pipeline
            too), default ``LogisticRegression()``; cloned for every fit.
        max_iter: E-steps at most after the first (the bag proportions).
        tol: stop once the mean log-likelihood per bag changes by less than tol.
        cross_fit: ``True``: each bag's E-step from models fitted on the other bags
            (``n_folds`` folds by bag), so that a flexible model cannot memorise its
            own soft targets; ``False``: from the model fitted on all rows; ``"auto"``:
            ``False`` for linear models, naive Bayes and discriminant analysis, else True.
        n_folds: folds of bags for cross-fitting.
        m_step: see :class:`ProportionClassifier`.
        random_state: seeds the folds.
        verbose: print the log-likelihood of each iteration.

    Attributes:
        estimator_: the estimator fitted to the last posteriors, on all rows.
        classes_: ``arange(n_classes)``.
        log_likelihood_: (n_iter_,) mean log P(count_b) per bag at each E-step
            (out-of-fold predictions when cross-fitting).
        n_iter_: E-steps run after the first; converged_: whether tol was reached.
        cross_fit_: the cross_fit used.
    """

    def __init__(self, estimator=None, *, max_iter=10, tol=1e-3, cross_fit="auto", n_folds=5, m_step="auto",
                 random_state=None, verbose=0):
        super().__init__(estimator, m_step=m_step)
        self.max_iter = max_iter
        self.tol = tol
        self.cross_fit = cross_fit
        self.n_folds = n_folds
        self.random_state = random_state
        self.verbose = verbose

    def _check_params(self, where):
        super()._check_params(where)
        for name, low in (("max_iter", 0), ("n_folds", 2)):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
                raise ValueError(f"{where}: {name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.tol, numbers.Real) or not self.tol >= 0:
            raise ValueError(f"{where}: tol must be a number >= 0, got {self.tol!r}")
        if self.cross_fit not in ("auto", True, False):
            raise ValueError(f"{where}: cross_fit must be 'auto', True or False, got {self.cross_fit!r}")
        module = type(final_step(self._base())).__module__
        self.cross_fit_ = (not module.startswith(_RIGID_MODULES)) if self.cross_fit == "auto" else self.cross_fit

    def _iterate(self, X, data, phi, where):
        n_bags = len(data.sizes)
        if self.cross_fit_:
            if n_bags < 2:
                raise ValueError(f"{where}: cross_fit needs at least 2 bags, got {n_bags}; set cross_fit=False")
            k = min(self.n_folds, n_bags)
            bag_fold = check_random_state(self.random_state).permutation(n_bags) % k
            row_fold = np.empty(len(data.order), np.int64)  # fold of each row, via its bag
            row_fold[data.order] = np.repeat(bag_fold, data.sizes)
        self.log_likelihood_, self.converged_ = [], False
        for it in range(self.max_iter):
            if self.cross_fit_:
                proba = np.empty_like(phi)
                for f in range(k):
                    held = np.flatnonzero(row_fold == f)
                    if held.size:
                        model = self._fit_one(X, phi, np.flatnonzero(row_fold != f))
                        proba[held] = self._proba(model, _safe_indexing(X, held), phi.shape[1])
            else:
                proba = self._proba(self._fit_one(X, phi), X, phi.shape[1])
            phi, log_lik = self._e_step(proba, data)
            self.log_likelihood_.append(log_lik)
            if self.verbose:
                print(f"EMClassifier: iteration {it + 1}, mean log-likelihood per bag {log_lik:.6f}")
            if it and abs(log_lik - self.log_likelihood_[-2]) < self.tol:
                self.converged_ = True
                break
        self.log_likelihood_ = np.asarray(self.log_likelihood_)
        self.n_iter_ = len(self.log_likelihood_)
        return phi
