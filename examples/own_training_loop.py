"""MLE-LLP by EM in your own training loop, and DLLP beside it, on scikit-learn's digits.

Your model, your DataLoader, your optimiser: mlellp only supplies the E-step
(EMTargets), the DLLP loss and a sampler of whole bags. Task: digit >= 5 from
8x8 images; the training instances come in bags of 2..12 of which only the
number of positives is known; the test instances are scored one by one.

    python examples/own_training_loop.py [--epochs 30] [--seed 0]

Prints the test accuracy of each training.
"""
import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mlellp_ext import BagBatchSampler, EMTargets, dllp_loss, offsets_from_sizes


class Instances(Dataset):
    """Instance i of the bag layout: (its input, its position i)."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i


def digits_in_bags(seed):
    """Training inputs in bag order with offsets and counts; test inputs and labels."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target >= 5, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    n_train = int(0.8 * len(x))
    train, test = order[:n_train], order[n_train:]
    sizes = torch.randint(2, 13, (n_train // 2,), generator=gen)
    sizes = sizes[sizes.cumsum(0) <= n_train]
    sizes = torch.cat([sizes, torch.tensor([n_train - int(sizes.sum())])])  # the rest in a last bag
    offsets = offsets_from_sizes(sizes)
    bag = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    counts = torch.zeros(len(sizes), dtype=torch.long).index_add_(0, bag, y[train])  # all a learner sees
    return x[train], offsets, counts, x[test], y[test]


def make_model():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 1), nn.Flatten(0))


@torch.no_grad()
def predict_logits(model, x):
    model.eval()
    return torch.cat([model(xb) for xb in x.split(512)])


def train_em(x, offsets, counts, epochs):
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(Instances(x), batch_size=32, shuffle=True)
    em = EMTargets(offsets, counts)  # targets start at each bag's proportion
    for epoch in range(epochs):
        model.train()
        for xb, positions in loader:  # M-step: supervised training against the targets
            loss = F.binary_cross_entropy_with_logits(model(xb), em.targets(positions))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        em.update(predict_logits(model, x))  # E-step: exact posteriors given the counts
        if em.converged:
            break
    return model


def train_dllp(x, offsets, counts, epochs, seed):
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sampler = BagBatchSampler(offsets, batch_size=32, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(Instances(x), batch_sampler=sampler)  # batches of whole bags
    for epoch in range(epochs):
        model.train()
        for xb, positions in loader:
            batch_offsets, batch_counts = sampler.bag_layout(positions, counts)
            loss = dllp_loss(model(xb), batch_offsets, batch_counts)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def accuracy(model, x, y):
    return float(((predict_logits(model, x) > 0).long() == y).float().mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    x, offsets, counts, x_test, y_test = digits_in_bags(args.seed)
    print(f"{len(counts)} training bags ({len(x)} instances), {len(x_test)} test instances")
    results = {"EM": accuracy(train_em(x, offsets, counts, args.epochs), x_test, y_test),
               "DLLP": accuracy(train_dllp(x, offsets, counts, args.epochs, args.seed), x_test, y_test)}
    for name, acc in results.items():
        print(f"{name} test accuracy: {acc:.4f}")
    return results


if __name__ == "__main__":
    main()
