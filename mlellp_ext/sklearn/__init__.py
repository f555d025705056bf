"""scikit-learn estimators for learning from label proportions.

* :class:`EMClassifier`: MLE-LLP by EM around any scikit-learn estimator (a Pipeline
  too): the exact E-step of the library's ops, the M-step a fit with sample weights
  (or soft labels), a cross-fitted E-step for flexible models.
* :class:`ProportionClassifier`: the baseline, each row's bag proportion as its soft label.

``fit(X, counts, *, bags)``: ``bags`` gives each row's bag; ``counts`` is (n_bags,)
positives or (n_bags, n_classes) count vectors; ``proportions=`` or
``count_log_weights=`` (uncertain counts) instead. See docs/sklearn.md.
"""
from ._em import EMClassifier, ProportionClassifier

__all__ = ["EMClassifier", "ProportionClassifier"]
