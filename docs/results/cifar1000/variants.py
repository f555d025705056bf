"""EM variants tried on the CIFAR-10 1,000-bag setting (README, "Training"); none is
part of the package, since none closed the gap to supervised.

Each variant is a method object for mlellp_ext.train (the same data, split,
backbone, Adam, augmentation and cosine schedule as `mlellp train`), run on
one thread, without --resume (the checkpoints do not hold a variant's own
state, such as cotrain's second network). Run from the project root:

    python docs/results/cifar1000/variants.py te --weight 10 --seed 0 --out runs/v/te10
    python docs/results/cifar1000/variants.py cotrain --seed 0 --out runs/v/cotrain
    python docs/results/cifar1000/variants.py restart --phi-from runs/v/plain/checkpoint.pt --seed 0 --out runs/v/restart
    python docs/results/cifar1000/variants.py labels --fraction 0.335 --seed 0 --out runs/v/labels0.335
    python docs/results/cifar1000/variants.py plain --seed 0 --out runs/v/plain
    python docs/results/cifar1000/variants.py fixmatch --weight 1 --seed 0 --out runs/v/fixmatch
    python docs/results/cifar1000/variants.py rotnet --epochs 15 --seed 0 --out runs/v/rotnet
    python docs/results/cifar1000/variants.py plain --init runs/v/rotnet/body.pt --seed 0 --out runs/v/rot-mle
    python docs/results/cifar1000/variants.py supervised --init runs/v/rotnet/body.pt --seed 0 --out runs/v/rot-sup
    python docs/results/cifar1000/variants.py plain --rotation-weight 1 --seed 0 --out runs/v/s4l-mle
    python docs/results/cifar1000/variants.py supervised --rotation-weight 1 --seed 0 --out runs/v/s4l-sup

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
import math
import time

import torch
import torch.nn.functional as F

import mlellp_ext.train as T
from mlellp_ext.baselines import Supervised
from mlellp_ext.batches import Preprocess
from mlellp_ext.em import EM, e_step


class TemporalEnsembling(EM):
    def __init__(self, trainer, weight, rampup=20, alpha=0.6):
        super().__init__(trainer, estep="recorded", tol=0.0)
        self.weight, self.rampup, self.alpha = weight, rampup, alpha
        self.Z = torch.zeros_like(self.phi)

    def epoch(self, trainer):
        t0 = time.perf_counter()
        model, bags, it = trainer.model, trainer.train_bags, self.iterations
        w = self.weight * math.exp(-5 * (1 - min(it / self.rampup, 1.0)) ** 2) if it else 0.0
        target = self.Z / (1 - self.alpha ** it) if it else self.Z
        model.train()
        recorded, total = torch.empty(bags.index.numel()), 0.0
        for pos in trainer.instance_batches():
            z = model(trainer.preprocess(bags.index[pos], train=True)).float()
            loss = F.binary_cross_entropy_with_logits(z, self.phi[pos])
            if w:
                loss = loss + w * ((torch.sigmoid(z) - target[pos]) ** 2).mean()
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainer.optimizer.step()
            recorded[pos] = z.detach()
            total += loss.item() * pos.numel()
        self.Z = self.alpha * self.Z + (1 - self.alpha) * torch.sigmoid(recorded)
        self.phi, L = e_step(recorded, bags.offsets, bags.counts)
        self.iterations += 1
        return _stats(total / recorded.numel(), L, t0)


class CoTraining(EM):
    def __init__(self, trainer):
        super().__init__(trainer, estep="recorded", tol=0.0)
        torch.manual_seed(trainer.cfg.seed + 12345)
        self.other = T.build_backbone(trainer.cfg.backbone, trainer.data.x.shape[1], 1,
                                      trainer.cfg.width).to(trainer.device)
        self.other_optimizer = torch.optim.Adam(self.other.parameters(), lr=trainer.cfg.lr)
        self.own_optimizers = (self.other_optimizer,)
        self.other_phi = self.phi.clone()

    def epoch(self, trainer):
        t0 = time.perf_counter()
        bags = trainer.train_bags
        nets = ((trainer.model, trainer.optimizer, self.phi), (self.other, self.other_optimizer, self.other_phi))
        recorded = [torch.empty(bags.index.numel()) for _ in nets]
        total = 0.0
        for net, _, _ in nets:
            net.train()
        for pos in trainer.instance_batches():
            for k, (net, opt, phi) in enumerate(nets):
                z = net(trainer.preprocess(bags.index[pos], train=True)).float()
                loss = F.binary_cross_entropy_with_logits(z, phi[pos])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                recorded[k][pos] = z.detach()
                total += loss.item() * pos.numel() if k == 0 else 0.0
        self.phi, _ = e_step(recorded[1], bags.offsets, bags.counts)  # the evaluated network learns from the other's posterior
        self.other_phi, L = e_step(recorded[0], bags.offsets, bags.counts)
        self.iterations += 1
        return _stats(total / bags.index.numel(), L, t0)


class StrongAugment(Preprocess):
    """FixMatch's strong view (Sohn et al. 2020): RandAugment (2 ops, magnitude 10),
    flip, reflect-pad-4 translation, then a cutout of up to a quarter of the image."""

    def __init__(self, x, device):
        from torchvision.transforms import v2

        super().__init__(x, is_rgb=True, augment=True, device=device)
        self.augment = v2.Compose([v2.RandAugment(num_ops=2, magnitude=10), v2.RandomHorizontalFlip(),
                                   v2.RandomCrop(x.shape[-1], padding=4, padding_mode="reflect")])
        self.erase = v2.RandomErasing(p=1.0, scale=(0.02, 0.25), value=0)

    def __call__(self, index):
        return torch.stack([self.erase(img) for img in super().__call__(index, train=True)])


class FixMatch(EM):
    def __init__(self, trainer, weight, threshold):
        super().__init__(trainer, estep="recorded", tol=0.0)
        self.weight, self.threshold = weight, threshold
        self.strong = StrongAugment(trainer.data.x, trainer.device)

    def epoch(self, trainer):
        t0 = time.perf_counter()
        model, bags = trainer.model, trainer.train_bags
        model.train()
        recorded, total = torch.empty(bags.index.numel()), 0.0
        for pos in trainer.instance_batches():
            idx, phi = bags.index[pos], self.phi[pos]
            z = model(torch.cat([trainer.preprocess(idx, train=True), self.strong(idx)])).float()
            weak, strong = z[: pos.numel()], z[pos.numel():]
            # Strong view against the hard label of instances whose posterior is confident
            # (from the start: every instance of a bag whose count is 0 or its size).
            mask = ((phi > self.threshold) | (phi < 1 - self.threshold)).float()
            consistency = (F.binary_cross_entropy_with_logits(strong, (phi > 0.5).float(), reduction="none")
                           * mask).mean()
            loss = F.binary_cross_entropy_with_logits(weak, phi) + self.weight * consistency
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainer.optimizer.step()
            recorded[pos] = weak.detach()
            total += loss.item() * pos.numel()
        self.phi, L = e_step(recorded, bags.offsets, bags.counts)
        self.iterations += 1
        return _stats(total / recorded.numel(), L, t0)


class SupervisedFraction(EM):
    def __init__(self, trainer, fraction):
        super().__init__(trainer, estep="recorded", tol=0.0)
        n = trainer.train_bags.index.numel()
        self.subset = torch.randperm(n, generator=torch.Generator().manual_seed(trainer.cfg.seed + 99))[
            : int(round(fraction * n))]
        self.y = trainer.data.y[trainer.train_bags.index].float()

    def epoch(self, trainer):
        t0 = time.perf_counter()
        model, bags = trainer.model, trainer.train_bags
        model.train()
        total = 0.0
        order = self.subset[torch.randperm(self.subset.numel(), generator=trainer.generator)]
        for pos in order.split(trainer.cfg.batch_size):
            z = model(trainer.preprocess(bags.index[pos], train=True)).float()
            loss = F.binary_cross_entropy_with_logits(z, self.y[pos])
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainer.optimizer.step()
            total += loss.item() * pos.numel()
        self.iterations += 1
        return _stats(total / self.subset.numel(), float("nan"), t0)


class RotationAux:
    """The auxiliary rotation head and its optimiser, shared by RotationEM and
    RotationSupervised."""

    def __init__(self, trainer, weight, rampup=20):
        width = trainer.model.head.in_features
        torch.manual_seed(trainer.cfg.seed + 777)
        self.head = torch.nn.Linear(width, 4).to(trainer.device)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=trainer.cfg.lr)
        self.weight, self.rampup = weight, rampup
        self.generator = torch.Generator().manual_seed(trainer.cfg.seed + 778)

    def m_step(self, trainer, targets, epoch):
        """em.m_step plus the rotation loss; returns (mean loss, recorded logits)."""
        model, bags = trainer.model, trainer.train_bags
        weight = self.weight * math.exp(-5 * (1 - min(epoch / self.rampup, 1.0)) ** 2)
        model.train()
        recorded, total = torch.empty(bags.index.numel()), 0.0
        for pos in trainer.instance_batches():
            x = trainer.preprocess(bags.index[pos], train=True)
            k = torch.randint(4, (pos.numel(),), generator=self.generator)
            rotated = torch.stack([torch.rot90(img, int(r), dims=(1, 2)) for img, r in zip(x, k)])
            features = model.features(torch.cat([x, rotated]))
            z = model.head(features[: pos.numel()]).squeeze(1).float()
            rotation = F.cross_entropy(self.head(features[pos.numel():]), k)
            loss = F.binary_cross_entropy_with_logits(z, targets[pos]) + weight * rotation
            trainer.optimizer.zero_grad(set_to_none=True)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainer.optimizer.step()
            self.optimizer.step()
            recorded[pos] = z.detach()
            total += loss.item() * pos.numel()
        return total / recorded.numel(), recorded


class RotationEM(EM):
    def __init__(self, trainer, weight):
        super().__init__(trainer, estep="recorded", tol=0.0)
        self.aux = RotationAux(trainer, weight)
        self.own_optimizers = (self.aux.optimizer,)

    def epoch(self, trainer):
        t0 = time.perf_counter()
        loss, recorded = self.aux.m_step(trainer, self.phi, self.iterations)
        bags = trainer.train_bags
        self.phi, L = e_step(recorded, bags.offsets, bags.counts)
        self.iterations += 1
        return _stats(loss, L, t0)


class RotationSupervised(Supervised):
    def __init__(self, trainer, weight):
        super().__init__(trainer)
        self.aux = RotationAux(trainer, weight)
        self.own_optimizers = (self.aux.optimizer,)
        self.iterations = 0

    def epoch(self, trainer):
        t0 = time.perf_counter()
        loss, recorded = self.aux.m_step(trainer, self.targets, self.iterations)
        self.iterations += 1
        return self._result(trainer, loss, recorded, t0)


def rotnet(a):
    """Rotation-prediction pretraining of the cnn body on the training bags' images."""
    import csv
    import os

    from mlellp_ext.models import LLPGANCNN

    torch.manual_seed(a.seed)
    cfg = T.TrainConfig(out=a.out, dataset="npz", data_root=a.data_root, num_bags=1000, width=0.5, seed=a.seed)
    dataset = T.load_data(cfg)  # the same bags and split as the runs it initialises
    index = dataset.train.index
    preprocess = Preprocess(dataset.data.x, is_rgb=True, augment=True, device=torch.device("cpu"))
    net = LLPGANCNN(3, 4, cfg.width)
    for m in net.modules():  # without dropout: with it the rotation accuracy was 38% after 4 epochs
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    opt = torch.optim.Adam(net.parameters(), lr=a.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: T.lr_factor("cosine", e, a.epochs))
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


def _stats(loss, L, t0):
    return {"train_loss": loss, "L": L, "m_step_seconds": time.perf_counter() - t0,
            "inference_seconds": None, "e_step_seconds": None}


def main():
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
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.init and a.variant not in ("plain", "supervised"):
        p.error(f"--init {a.init}: applies to plain and supervised only, not {a.variant}")
    if a.rotation_weight is not None and a.variant not in ("plain", "supervised"):
        p.error(f"--rotation-weight {a.rotation_weight}: applies to plain and supervised only, not {a.variant}")
    if a.rotation_weight is not None and not a.rotation_weight > 0:
        p.error(f"--rotation-weight must be positive, got {a.rotation_weight}")
    torch.set_num_threads(1)
    if a.variant == "rotnet":
        return rotnet(a)
    package_method = T.make_method

    def make(cfg, trainer):
        if a.init:
            trainer.model.body.load_state_dict(torch.load(a.init, weights_only=True))  # in place: the optimiser keeps its parameters
        if a.rotation_weight:
            cls = RotationSupervised if a.variant == "supervised" else RotationEM
            return cls(trainer, a.rotation_weight)
        if a.variant == "supervised":
            return package_method(cfg, trainer)
        if a.variant == "te":
            return TemporalEnsembling(trainer, a.weight)
        if a.variant == "cotrain":
            return CoTraining(trainer)
        if a.variant == "fixmatch":
            return FixMatch(trainer, a.weight, a.threshold)
        if a.variant == "labels":
            return SupervisedFraction(trainer, a.fraction)
        method = EM(trainer, estep="recorded", tol=0.0)
        if a.variant == "restart":
            method.phi = torch.load(a.phi_from, weights_only=True)["method"]["phi"].clone()
        return method

    T.make_method = make
    method = "supervised" if a.variant == "supervised" else "mle"
    T.train(T.TrainConfig(out=a.out, dataset="npz", data_root=a.data_root, num_bags=1000, method=method, width=0.5,
                          epochs=a.epochs, batch_size=32, lr=a.lr, lr_schedule="cosine", estep="recorded",
                          tol=0.0, seed=a.seed))


if __name__ == "__main__":
    main()
