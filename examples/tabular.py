"""Learning from bag counts on a table with scikit-learn: EMClassifier around a linear
model and a gradient-boosted tree model, beside the bag-proportion baseline and
supervised training, then with counts released under label differential privacy.

The table is the Fair affairs survey (6,366 rows; the label: any affair), shipped
inside statsmodels. The training rows are put in random bags of 8..32 and only each
bag's count of positives is kept; the test rows keep their labels for scoring.

    python examples/tabular.py
"""
import numpy as np
import statsmodels.api as sm
import torch
from sklearn.base import clone
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from mlellp_ext import count_weights
from mlellp_ext.sklearn import EMClassifier, ProportionClassifier

frame = sm.datasets.fair.load_pandas().data
y = (frame.pop("affairs").to_numpy() > 0).astype(int)
X = frame.to_numpy()
rng = np.random.default_rng(0)
test = rng.permutation(len(y))[: len(y) // 5]
train = np.setdiff1d(np.arange(len(y)), test)

# Random bags of 8..32 training rows, in no particular order; one count per bag.
sizes = rng.integers(8, 33, size=len(train) // 8)
bags = np.repeat(np.arange(len(sizes)), sizes)[: len(train)]
rng.shuffle(bags)
bags = np.unique(bags, return_inverse=True)[1]  # bags numbered 0..n_bags-1
counts = np.bincount(bags, weights=y[train]).astype(int)


def auc(model):
    return roc_auc_score(y[test], model.predict_proba(X[test])[:, 1])


for name, estimator in [("logistic regression", LogisticRegression(max_iter=1000)),
                        ("gradient boosting", HistGradientBoostingClassifier(max_iter=100))]:
    em = EMClassifier(estimator, random_state=0).fit(X[train], counts, bags=bags)
    baseline = ProportionClassifier(estimator).fit(X[train], counts, bags=bags)
    supervised = clone(estimator).fit(X[train], y[train])
    print(f"{name}: EM test AUC {auc(em):.3f} ({em.n_iter_} iterations, cross-fitted: {em.cross_fit_}), "
          f"proportions {auc(baseline):.3f}, supervised {auc(supervised):.3f}")

# The same counts released with label differential privacy at epsilon = 1: EM
# conditions on what was released, through the noise's likelihood.
sizes = torch.from_numpy(np.bincount(bags))
released = count_weights.privatize(torch.from_numpy(counts), 1.0, generator=torch.Generator().manual_seed(0))
weights = count_weights.laplace(released.double(), 1.0, sizes)
em = EMClassifier(LogisticRegression(max_iter=1000)).fit(X[train], count_log_weights=weights, bags=bags)
print(f"logistic regression, counts at epsilon = 1: EM test AUC {auc(em):.3f}")
