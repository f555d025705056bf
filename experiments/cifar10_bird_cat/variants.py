"""EM variants tried on the CIFAR-10 1,000-bag setting (docs/experiments/cifar10-bird-cat.md);
none is part of the package, since none closed the gap to supervised.

Each variant is a training method registered under its own name in the
application's method registry (mlellp_ext.app.methods.register_method) and run
by its trainer (the same data, split, backbone, Adam, augmentation and cosine
schedule as `mlellp train`), on one thread, without --resume (the checkpoints
do not hold a variant's own state, such as cotrain's second network). Run from
the project root:

    python experiments/cifar10_bird_cat/variants.py te --weight 10 --seed 0 --out runs/v/te10
    python experiments/cifar10_bird_cat/variants.py cotrain --seed 0 --out runs/v/cotrain
    python experiments/cifar10_bird_cat/variants.py restart --phi-from runs/v/plain/checkpoint.pt --seed 0 --out runs/v/restart
    python experiments/cifar10_bird_cat/variants.py labels --fraction 0.335 --seed 0 --out runs/v/labels0.335
    python experiments/cifar10_bird_cat/variants.py plain --seed 0 --out runs/v/plain
    python experiments/cifar10_bird_cat/variants.py fixmatch --weight 1 --seed 0 --out runs/v/fixmatch
    python experiments/cifar10_bird_cat/variants.py rotnet --epochs 15 --seed 0 --out runs/v/rotnet
    python experiments/cifar10_bird_cat/variants.py plain --init runs/v/rotnet/body.pt --seed 0 --out runs/v/rot-mle
    python experiments/cifar10_bird_cat/variants.py supervised --init runs/v/rotnet/body.pt --seed 0 --out runs/v/rot-sup
    python experiments/cifar10_bird_cat/variants.py plain --rotation-weight 1 --seed 0 --out runs/v/s4l-mle
    python experiments/cifar10_bird_cat/variants.py supervised --rotation-weight 1 --seed 0 --out runs/v/s4l-sup

* te       EM plus temporal-ensembling consistency (Laine & Aila 2017): weight *
           exp(-5 (1 - t/20)^2) * mean (sigmoid(z) - Z)^2, Z the bias-corrected
           moving average (0.6) of the instance's recorded probabilities.
* cotrain  two networks (different initialisations), each trained on the E-step
           targets computed from the *other* network's recorded logits; the
           first is the one evaluated.
* restart  EM from a freshly initialised network and optimiser, with the targets
           phi of a finished run's checkpoint instead of y/n.
* labels   supervised on a random --fraction of the training instances' labels
           (0.335: the share of label information that the counts of bags of
           2..12 carry, sum of H(Binomial(n, 1/2)) over sum of n bits).
* fixmatch EM plus FixMatch-style consistency (Sohn et al. 2020): each minibatch
           also goes through a strong view (RandAugment 2 ops at magnitude 10,
           flip, translation, cutout), trained with weight * BCE against the hard
           label of instances whose phi is beyond --threshold (0.95) either way;
           about 3x the time of plain.
* rotnet   self-supervised pretraining (Gidaris et al. 2018): the backbone learns to
           tell which of 0, 90, 180, 270 degrees each (weakly augmented) training
           instance was rotated by, from the training bags' images alone (no
           labels, no counts, no test images), dropout off; writes body.pt (the layers before
           the head) and metrics.csv (rotation loss and accuracy per epoch).
* plain    `mlellp train --method mle --estep recorded`, for comparison.
* supervised  `mlellp train --method supervised`, for comparison.
  --init BODY.pt starts plain or supervised from rotnet's body (a fresh head).
  --rotation-weight W adds, to plain or supervised, rotation prediction as an
           auxiliary task all through training (S4L-Rotation, Zhai et al. 2019):
           each minibatch also goes through the body as a copy rotated by a
           random multiple of 90 degrees, and a separate linear head (own Adam,
           same schedule) is trained with w * cross-entropy on the rotation,
           w = W * exp(-5 (1 - t/20)^2) ramped up over the first 20 epochs as
           te's (with w = W from the start both tasks stayed at chance for 14
           epochs); about 2x the time of plain.
"""
import argparse
import functools
import math
import time

import torch
import torch.nn.functional as F

from mlellp_ext import EMTargets
from mlellp_ext.app.batches import Preprocess
from mlellp_ext.app.methods import EM, Method, construct, gradient_step, register_method
from mlellp_ext.app.methods.baselines import Supervised
from mlellp_ext.app.methods.common import epoch_stats, mean_log_likelihood
from mlellp_ext.app.models import LLPGANCNN, build_backbone
from mlellp_ext.app.train import TrainConfig, load_data, lr_factor, train


class PlainEM(EM):
    """`mlellp train --method mle --estep recorded --tol 0`, which the variants extend."""

    def __init__(self, offsets, counts, batch_size):
        super().__init__(offsets, counts, batch_size, estep="recorded", tol=0.0)


class TemporalEnsembling(PlainEM):
    def __init__(self, offsets, counts, batch_size, weight, rampup=20, alpha=0.6):
        super().__init__(offsets, counts, batch_size)
        self.weight, self.rampup, self.alpha = weight, rampup, alpha
        self.Z = torch.zeros_like(self.em.phi)

    def epoch(self, *, model, optimizer, batches, inputs, world, progress):
        t0 = time.perf_counter()
        it = self.em.iterations
        w = self.weight * math.exp(-5 * (1 - min(it / self.rampup, 1.0)) ** 2) if it else 0.0
        target = self.Z / (1 - self.alpha ** it) if it else self.Z
        model.train()
        recorded, total = torch.empty(batches.num_instances), 0.0
        for pos in progress(batches.instances(), "te"):
            z = model(inputs(pos, train=True)).float()
            loss = F.binary_cross_entropy_with_logits(z, self.em.targets(pos))
            if w:
                loss = loss + w * ((torch.sigmoid(z) - target[pos]) ** 2).mean()
            gradient_step(loss, optimizer, world, model)
            recorded[pos] = z.detach()
            total += loss.item() * pos.numel()
        self.Z = self.alpha * self.Z + (1 - self.alpha) * torch.sigmoid(recorded)
        L = self.em.update(recorded)
        return epoch_stats(total / recorded.numel(), L, t0)


class CoTraining(PlainEM):
    def __init__(self, offsets, counts, batch_size, image_shape, width, lr, seed, device):
        super().__init__(offsets, counts, batch_size)
        torch.manual_seed(seed + 12345)
        self.other = build_backbone("cnn", image_shape[0], 1, width).to(device)
        self.other_optimizer = torch.optim.Adam(self.other.parameters(), lr=lr)
        self.own_optimizers = (self.other_optimizer,)
        self.other_em = EMTargets(offsets, counts, tol=0.0)

    def epoch(self, *, model, optimizer, batches, inputs, world, progress):
        t0 = time.perf_counter()
        nets = ((model, optimizer, self.em), (self.other, self.other_optimizer, self.other_em))
        recorded = [torch.empty(batches.num_instances) for _ in nets]
        total = 0.0
        for net, _, _ in nets:
            net.train()
        for pos in progress(batches.instances(), "cotrain"):
            for k, (net, opt, em) in enumerate(nets):
                z = net(inputs(pos, train=True)).float()
                loss = F.binary_cross_entropy_with_logits(z, em.targets(pos))
                gradient_step(loss, opt, world, net)
                recorded[k][pos] = z.detach()
                total += loss.item() * pos.numel() if k == 0 else 0.0
        self.em.update(recorded[1])  # the evaluated network learns from the other's posterior
        L = self.other_em.update(recorded[0])
        return epoch_stats(total / batches.num_instances, L, t0)


class Restart(PlainEM):
    """EM from a fresh network, with the targets of a finished run's checkpoint."""

    def __init__(self, offsets, counts, batch_size, phi_from):
        super().__init__(offsets, counts, batch_size)
        self.em.phi = torch.load(phi_from, weights_only=True)["method"]["phi"].clone()


class StrongAugment(Preprocess):
    """FixMatch's strong view (Sohn et al. 2020): RandAugment (2 ops, magnitude 10),
    flip, reflect-pad-4 translation, then a cutout of up to a quarter of the image."""

    def __init__(self, x, device):
        from torchvision.transforms import v2

        super().__init__(x, is_rgb=True, augment=True, device=device)
        self.augment = v2.Compose([v2.RandAugment(num_ops=2, magnitude=10), v2.RandomHorizontalFlip(),
                                   v2.RandomCrop(x.shape[-1], padding=4, padding_mode="reflect")])
        self.erase = v2.RandomErasing(p=1.0, scale=(0.02, 0.25), value=0)

    def augment_batch(self, x):
        # torchvision's per-image transforms on uint8 images (RandAugment needs them)
        return (torch.stack([self.augment(img) for img in x]).float() / 255.0).to(self.device)

    def __call__(self, index):
        return torch.stack([self.erase(img) for img in super().__call__(index, train=True)])


class FixMatch(PlainEM):
    def __init__(self, offsets, counts, batch_size, weight, threshold):
        super().__init__(offsets, counts, batch_size)
        self.weight, self.threshold = weight, threshold
        self.strong = None

    def epoch(self, *, model, optimizer, batches, inputs, world, progress):
        t0 = time.perf_counter()
        if self.strong is None:  # the strong view of the same images (inputs: a TrainingInputs)
            self.strong = StrongAugment(inputs.preprocess.x, inputs.preprocess.device)
        model.train()
        recorded, total = torch.empty(batches.num_instances), 0.0
        for pos in progress(batches.instances(), "fixmatch"):
            phi = self.em.targets(pos)
            z = model(torch.cat([inputs(pos, train=True), self.strong(inputs.index[pos])])).float()
            weak, strong = z[: pos.numel()], z[pos.numel():]
            # Strong view against the hard label of instances whose posterior is confident
            # (from the start: every instance of a bag whose count is 0 or its size).
            mask = ((phi > self.threshold) | (phi < 1 - self.threshold)).float()
            consistency = (F.binary_cross_entropy_with_logits(strong, (phi > 0.5).float(), reduction="none")
                           * mask).mean()
            loss = F.binary_cross_entropy_with_logits(weak, phi) + self.weight * consistency
            gradient_step(loss, optimizer, world, model)
            recorded[pos] = weak.detach()
            total += loss.item() * pos.numel()
        L = self.em.update(recorded)
        return epoch_stats(total / recorded.numel(), L, t0)


class SupervisedFraction(Method):
    """Supervised on a random fraction of the training instances' labels."""

    def __init__(self, labels, batch_size, seed, fraction):
        n = labels.numel()
        self.subset = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 99))[: int(round(fraction * n))]
        self.y, self.batch_size = labels.float(), batch_size
        self.order = torch.Generator().manual_seed(seed + 1)

    def epoch(self, *, model, optimizer, batches, inputs, world, progress):
        t0 = time.perf_counter()
        model.train()
        total = 0.0
        order = self.subset[torch.randperm(self.subset.numel(), generator=self.order)]
        for pos in progress(order.split(self.batch_size), "labels"):
            z = model(inputs(pos, train=True)).float()
            loss = F.binary_cross_entropy_with_logits(z, self.y[pos])
            gradient_step(loss, optimizer, world, model)
            total += loss.item() * pos.numel()
        return epoch_stats(total / self.subset.numel(), float("nan"), t0)


class RotationAux:
    """The auxiliary rotation head and its optimiser, shared by RotationEM and
    RotationSupervised."""

    def __init__(self, model, lr, seed, device, weight, rampup=20):
        width = model.head.in_features
        torch.manual_seed(seed + 777)
        self.head = torch.nn.Linear(width, 4).to(device)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=lr)
        self.weight, self.rampup = weight, rampup
        self.generator = torch.Generator().manual_seed(seed + 778)

    def fit(self, model, optimizer, targets, batches, inputs, progress, epoch):
        """fit_targets plus the rotation loss; returns (mean loss, recorded logits)."""
        weight = self.weight * math.exp(-5 * (1 - min(epoch / self.rampup, 1.0)) ** 2)
        model.train()
        recorded, total = torch.empty(batches.num_instances), 0.0
        for pos in progress(batches.instances(), "rotation"):
            x = inputs(pos, train=True)
            k = torch.randint(4, (pos.numel(),), generator=self.generator)
            rotated = torch.stack([torch.rot90(img, int(r), dims=(1, 2)) for img, r in zip(x, k)])
            features = model.features(torch.cat([x, rotated]))
            z = model.head(features[: pos.numel()]).squeeze(1).float()
            rotation = F.cross_entropy(self.head(features[pos.numel():]), k)
            loss = F.binary_cross_entropy_with_logits(z, targets(pos)) + weight * rotation
            optimizer.zero_grad(set_to_none=True)
            self.optimizer.zero_grad(set_to_none=True)
            # one backward into both heads (one process: nothing to sync); under --amp fp16
            # through the network optimiser's gradient scaler, which steps both
            scaler = getattr(optimizer, "grad_scaler", None)
            if scaler is None:
                loss.backward()
                optimizer.step()
                self.optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.step(self.optimizer)
                scaler.update()
            recorded[pos] = z.detach()
            total += loss.item() * pos.numel()
        return total / recorded.numel(), recorded


class RotationEM(PlainEM):
    def __init__(self, offsets, counts, batch_size, model, lr, seed, device, weight):
        super().__init__(offsets, counts, batch_size)
        self.aux = RotationAux(model, lr, seed, device, weight)
        self.own_optimizers = (self.aux.optimizer,)

    def epoch(self, *, model, optimizer, batches, inputs, world, progress):
        t0 = time.perf_counter()
        loss, recorded = self.aux.fit(model, optimizer, self.em.targets, batches, inputs, progress,
                                      self.em.iterations)
        return epoch_stats(loss, self.em.update(recorded), t0)


class RotationSupervised(Supervised):
    def __init__(self, offsets, counts, labels, model, lr, seed, device, weight):
        super().__init__(offsets, counts, labels)
        self.aux = RotationAux(model, lr, seed, device, weight)
        self.own_optimizers = (self.aux.optimizer,)
        self.iterations = 0

    def epoch(self, *, model, optimizer, batches, inputs, world, progress):
        t0 = time.perf_counter()
        loss, recorded = self.aux.fit(model, optimizer, lambda pos: self.labels[pos], batches, inputs, progress,
                                      self.iterations)
        self.iterations += 1
        return epoch_stats(loss, mean_log_likelihood(recorded, self.offsets, self.counts, world), t0)


def with_body(cls, path):
    """``cls``, built after loading rotnet's body.pt into the network, in place (the
    optimiser keeps its parameters)."""
    def build(model, **offered):
        model.body.load_state_dict(torch.load(path, weights_only=True))
        return construct(cls, dict(offered, model=model))
    return build


def rotnet(a):
    """Rotation-prediction pretraining of the cnn body on the training bags' images."""
    import csv
    import os

    torch.manual_seed(a.seed)
    cfg = TrainConfig(out=a.out, dataset="npz", data_root=a.data_root, num_bags=a.num_bags, width=0.5, seed=a.seed)
    dataset = load_data(cfg)  # the same bags and split as the runs it initialises
    index = dataset.train.index
    preprocess = Preprocess(dataset.data.x, is_rgb=True, augment=True, device=torch.device("cpu"))
    net = LLPGANCNN(3, 4, cfg.width)
    for m in net.modules():  # without dropout: with it the rotation accuracy was 38% after 4 epochs
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    opt = torch.optim.Adam(net.parameters(), lr=a.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor("cosine", e, a.epochs))
    gen = torch.Generator().manual_seed(a.seed + 1)
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for epoch in range(1, a.epochs + 1):
        t0, total, right, seen = time.perf_counter(), 0.0, 0, 0
        net.train()
        for pos in torch.randperm(index.numel(), generator=gen).split(32):
            x = preprocess(index[pos], train=True)
            x = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
            r = torch.arange(4).repeat_interleave(pos.numel())
            z = net(x)
            loss = F.cross_entropy(z, r)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * r.numel()
            right += int((z.argmax(1) == r).sum())
            seen += r.numel()
        sched.step()
        rows.append({"epoch": epoch, "rotation_loss": total / seen, "rotation_accuracy": right / seen,
                     "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
        with open(os.path.join(a.out, "metrics.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        torch.save(net.body.state_dict(), os.path.join(a.out, "body.pt"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variant", choices=("te", "cotrain", "restart", "labels", "plain", "supervised", "fixmatch",
                                        "rotnet"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight", type=float, default=10.0, help="te, fixmatch: consistency weight")
    p.add_argument("--threshold", type=float, default=0.95, help="fixmatch: confidence of phi for a hard label")
    p.add_argument("--phi-from", help="restart: checkpoint.pt of a finished mle run")
    p.add_argument("--fraction", type=float, default=0.335, help="labels: share of labelled instances")
    p.add_argument("--init", help="plain, supervised: body.pt written by rotnet")
    p.add_argument("--rotation-weight", type=float, help="plain, supervised: weight of an auxiliary rotation loss")
    p.add_argument("--data-root", default="../shared/data/cifar10_bird_cat_train.npz")
    p.add_argument("--num-bags", type=int, default=1000)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.init and a.variant not in ("plain", "supervised"):
        p.error(f"--init {a.init}: applies to plain and supervised only, not {a.variant}")
    if a.rotation_weight is not None and a.variant not in ("plain", "supervised"):
        p.error(f"--rotation-weight {a.rotation_weight}: applies to plain and supervised only, not {a.variant}")
    if a.rotation_weight is not None and not a.rotation_weight > 0:
        p.error(f"--rotation-weight must be positive, got {a.rotation_weight}")
    torch.set_num_threads(1)
    if a.variant == "rotnet":
        return rotnet(a)
    variants = {"plain": PlainEM, "supervised": Supervised, "cotrain": CoTraining,
                "te": functools.partial(TemporalEnsembling, weight=a.weight),
                "restart": functools.partial(Restart, phi_from=a.phi_from),
                "fixmatch": functools.partial(FixMatch, weight=a.weight, threshold=a.threshold),
                "labels": functools.partial(SupervisedFraction, fraction=a.fraction)}
    cls = variants[a.variant]
    if a.rotation_weight:
        cls = functools.partial(RotationSupervised if a.variant == "supervised" else RotationEM,
                                weight=a.rotation_weight)
    if a.init:
        cls = with_body(cls, a.init)
    name = f"variant-{a.variant}"
    register_method(name, cls, f"experiments/cifar10_bird_cat/variants.py {a.variant}",
                    needs_labels=a.variant in ("supervised", "labels"), replace=True)
    train(TrainConfig(out=a.out, dataset="npz", data_root=a.data_root, num_bags=a.num_bags, method=name, width=0.5,
                      epochs=a.epochs, batch_size=32, lr=a.lr, lr_schedule="cosine", estep="recorded",
                      tol=0.0, seed=a.seed))


if __name__ == "__main__":
    main()
