"""A short E-step demo: bags from scikit-learn's bundled digits, counts of digits >= 5.

    python -m mlellp_ext.demo

Builds bags of sizes 2..12, takes logits from a quick logistic regression on
instance labels (just to have a sensible classifier), and shows the E-step's
posterior marginals and bag log-likelihood next to the truth.
"""
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

import mlellp_ext


def main():
    x, digit = load_digits(return_X_y=True)
    y = torch.as_tensor(digit >= 5).long()
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=gen)
    sizes = torch.randint(2, 13, (150,), generator=gen)
    sizes = sizes[torch.cumsum(sizes, 0) <= len(y)]
    idx = perm[: int(sizes.sum())]
    offsets = mlellp_ext.offsets_from_sizes(sizes)
    counts = torch.zeros(len(sizes), dtype=torch.long).index_add_(
        0, torch.repeat_interleave(torch.arange(len(sizes)), sizes), y[idx])
    clf = LogisticRegression(max_iter=200, C=0.01).fit(x[perm[len(idx):]], y[perm[len(idx):]].numpy())
    logits = torch.as_tensor(clf.decision_function(x[idx.numpy()]), dtype=torch.float32)
    phi, ll = mlellp_ext.posterior(logits, offsets, counts)
    print(f"{len(sizes)} bags, {len(idx)} instances; mean bag log-likelihood {ll.mean():.4f}")
    acc_prior = ((torch.sigmoid(logits) > 0.5).long() == y[idx]).float().mean()
    acc_post = ((phi > 0.5).long() == y[idx]).float().mean()
    print(f"instance accuracy from the classifier alone {acc_prior:.3f}; after conditioning on bag counts {acc_post:.3f}")
    for b in range(3):
        s, e = int(offsets[b]), int(offsets[b + 1])
        print(f"bag {b}: count {int(counts[b])} of {e - s}; labels {y[idx[s:e]].tolist()}; "
              f"phi {[round(v, 2) for v in phi[s:e].tolist()]}")


if __name__ == "__main__":
    main()
