"""How well a finished run fits its training bags (docs/experiments/cifar10-bird-cat.md).

For each run folder given (one that `mlellp train` wrote, with checkpoint.pt),
prints the network's accuracy on the training instances and on the test
instances (eval mode, no augmentation) and, for EM runs, how many of the E-step's
soft targets phi fall on the side of 0.5 of the true label. Run from the
project root:
    python experiments/cifar10_bird_cat/fit.py runs/cifar-mle runs/cifar-supervised
"""
import json
import os
import sys

import torch

from mlellp_ext.app.batches import Preprocess
from mlellp_ext.app.models import build_backbone
from mlellp_ext.app.train import TrainConfig, bag_metrics, load_data


def main(runs):
    for run in runs:
        with open(os.path.join(run, "config.json")) as f:
            cfg = TrainConfig(**json.load(f))
        dataset = load_data(cfg)  # the same data, bags and split, from the config
        data = dataset.data
        state = torch.load(os.path.join(run, "checkpoint.pt"), map_location="cpu", weights_only=True)
        # The network alone (one logit: EM, supervised and every variant here), not the run's method,
        # so that runs of methods registered by variants.py load too.
        model = build_backbone(cfg.backbone, data.x.shape[1], 1, cfg.width)
        model.load_state_dict(state["model"])
        preprocess = Preprocess(data.x, data.is_rgb, augment=False, device=torch.device("cpu"))
        train, _, _ = bag_metrics(model, preprocess, data, dataset.train, 256)
        test, _, _ = bag_metrics(model, preprocess, data, dataset.test, 256)
        line = (f"{run} (epoch {int(state['epoch']) + 1}): train accuracy {train['accuracy']:.3f}, "
                f"test accuracy {test['accuracy']:.3f}")
        phi = state["method"].get("phi")
        if phi is not None:
            right = float(((phi > 0.5).long() == data.y[dataset.train.index]).float().mean())
            line += f", E-step targets on the true label's side of 0.5: {right:.3f}"
        print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
