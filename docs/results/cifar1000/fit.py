"""How well a finished run fits its training bags (README, "Training").

For each run folder given (one that `mlellp train` wrote, with checkpoint.pt),
prints the network's accuracy on the training instances and on the test
instances (eval mode, no augmentation) and, for EM runs, how many of the E-step's
soft targets phi fall on the side of 0.5 of the true label. Run from the
project root:
    python docs/results/cifar1000/fit.py runs/cifar-mle runs/cifar-supervised
"""
import json
import os
import sys

import torch

from mlellp_ext.batches import infer_logits
from mlellp_ext.train import TrainConfig, Trainer


def accuracy(logits, y):
    return float(((logits > 0).long() == y).float().mean())


def main(runs):
    for run in runs:
        with open(os.path.join(run, "config.json")) as f:
            cfg = TrainConfig(**json.load(f))
        trainer = Trainer(cfg)  # rebuilds the same data, bags and split from the config
        state = torch.load(os.path.join(run, "checkpoint.pt"), map_location="cpu", weights_only=True)
        trainer.model.load_state_dict(state["model"])
        y = trainer.data.y
        train, test = trainer.train_bags.index, trainer.test_bags.index
        z_train = infer_logits(trainer.model, trainer.preprocess, train, 256)
        z_test = infer_logits(trainer.model, trainer.preprocess, test, 256)
        line = (f"{run} (epoch {int(state['epoch']) + 1}): train accuracy {accuracy(z_train, y[train]):.3f}, "
                f"test accuracy {accuracy(z_test, y[test]):.3f}")
        phi = state["method"].get("phi")
        if phi is not None:
            line += f", E-step targets on the true label's side of 0.5: {accuracy(phi - 0.5, y[train]):.3f}"
        print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
