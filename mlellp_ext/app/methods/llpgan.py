"""LLP-GAN (Liu et al., NeurIPS 2019), the GAN baseline for learning from label proportions.

Discriminator: the ``cnn`` backbone with K real-class logits l_1..l_K (K = 2
for a binary problem, K = C for C classes) and the fake class as an implicit
logit fixed at 0 (Salimans et al. 2016), so P(fake | x) = 1 / (1 + sum_k exp(l_k)).
Its loss on a minibatch of whole real bags and as many generated images:
  * bag-proportion cross-entropy between the bag's proportions and the bag
    mean of the real-class softmax (as DLLP);
  * real/fake terms: -log(1 - P(fake | real)) - log P(fake | G(noise)),
    weighted by ``gan_weight`` (1 in the paper and its re-implementations).
Generator (LLP-GAN's CIFAR-10 generator): noise -> linear 4x4x512, batch norm,
ReLU -> three 5x5 transposed convolutions 512 -> 256 -> 128 -> C doubling the
size each time (to 32x32), batch norm and ReLU between, tanh at the end (the
data are normalised to [-1, 1]); other image sizes are resized to the data's.
Its loss is feature matching: squared distance between the mean pooled
discriminator features of real and generated images.
Instances are predicted by argmax over the K real classes: for K = 2 the sign
of l_2 - l_1 (models.TwoClassLogit).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ...losses import dllp_loss
from ..distributed import instance_mean
from .common import LogitRecorder, Method, epoch_stats, gradient_step, mean_log_likelihood

NOISE_DIM = 100
# The default weight of the real/fake terms. See docs/experiments/reproduction.md:
# chosen on a validation split of CIFAR training images only.
GAN_WEIGHT = 0.3


class Generator(nn.Module):
    def __init__(self, out_channels: int = 3, out_size=(32, 32), width: float = 1.0, noise_dim: int = NOISE_DIM):
        super().__init__()
        c = lambda n: max(1, int(round(n * width)))  # noqa: E731
        self.noise_dim, self.out_size, self.c0 = noise_dim, tuple(out_size), c(512)
        self.fc = nn.Sequential(nn.Linear(noise_dim, 4 * 4 * c(512)), nn.BatchNorm1d(4 * 4 * c(512)), nn.ReLU())
        up = lambda i, o: nn.ConvTranspose2d(i, o, 5, stride=2, padding=2, output_padding=1)  # noqa: E731
        self.body = nn.Sequential(
            up(c(512), c(256)), nn.BatchNorm2d(c(256)), nn.ReLU(),
            up(c(256), c(128)), nn.BatchNorm2d(c(128)), nn.ReLU(),
            up(c(128), out_channels), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.body(self.fc(z).view(-1, self.c0, 4, 4))
        if x.shape[-2:] != self.out_size:
            x = F.interpolate(x, size=self.out_size, mode="bilinear", align_corners=False)
        return x


def real_fake_terms(class_logits: torch.Tensor):
    """(log P(real | x), log P(fake | x)) with the fake logit fixed at 0."""
    lse = torch.logsumexp(class_logits, dim=1)
    return lse - F.softplus(lse), -F.softplus(lse)


def _instance_logits(class_logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The logits the rest of the library reads: l_2 - l_1 for a binary problem
    (counts (B,)), all K real-class logits for K >= 3 (counts (B, K))."""
    return class_logits[:, 1] - class_logits[:, 0] if counts.dim() == 1 else class_logits


class LLPGAN(Method):
    name = "llpgan"

    def __init__(self, offsets, counts, image_shape, width: float, lr: float, device, gan_weight: float = GAN_WEIGHT):
        self.offsets, self.counts, self.gan_weight = offsets, counts, gan_weight
        channels, *size = image_shape
        self.generator = Generator(channels, size, width).to(device)
        self.g_optimizer = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=(0.5, 0.999))
        self.own_optimizers = (self.g_optimizer,)

    def state_dict(self):
        return {"generator": self.generator.state_dict(), "g_optimizer": self.g_optimizer.state_dict()}

    def load_state_dict(self, state):
        self.generator.load_state_dict(state["generator"])
        self.g_optimizer.load_state_dict(state["g_optimizer"])

    def epoch(self, *, model, optimizer, batches, inputs, world, progress):
        t0 = time.perf_counter()
        disc = model
        disc.train()
        self.generator.train()
        recorder = LogitRecorder(batches.num_instances)
        total, seen = 0.0, 0
        for batch in progress(batches.bags(), self.name):
            real = inputs(batch.positions, train=True)
            device = real.device
            noise = torch.randn(real.shape[0], self.generator.noise_dim, device=device)

            # Discriminator: bag proportions + real/fake.
            logits = disc.class_logits(real)
            offsets, counts = batch.offsets.to(device), batch.counts.to(device)
            # The bag-proportion loss on the K real classes: DLLP's loss of their logits
            # (for K = 2, softmax over (l_1, l_2) is sigmoid(l_2 - l_1): the binary loss).
            loss_prop = dllp_loss(_instance_logits(logits, counts), offsets, counts)
            log_real, _ = real_fake_terms(logits)
            _, log_fake = real_fake_terms(disc.class_logits(self.generator(noise).detach()))
            loss_d = loss_prop - self.gan_weight * (log_real.mean() + log_fake.mean())
            gradient_step(loss_d, optimizer, world, disc)

            # Generator: feature matching on the discriminator's pooled features.
            with torch.no_grad():
                real_features = disc.features(real).mean(0)
            fake_features = disc.features(self.generator(noise)).mean(0)
            loss_g = (real_features - fake_features).pow(2).mean()
            gradient_step(loss_g, self.g_optimizer, world, self.generator)

            recorder(batch.positions, _instance_logits(logits, counts))
            total += loss_d.item() * batch.counts.shape[0]
            seen += batch.counts.shape[0]
        L = mean_log_likelihood(recorder.result(), self.offsets, self.counts, world)
        return epoch_stats(instance_mean(world, total, seen), L, t0)
