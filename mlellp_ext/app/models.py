"""Backbones: networks mapping an image batch to one logit per instance.

* ``cnn``: the CIFAR-10 discriminator of LLP-GAN (Liu et al., 2019, Table 3),
  with a ``width`` multiplier so that CPU runs stay practical.
* ``resnet18``: torchvision's ResNet-18 with one output, random init (or local
  weights via ``weights=PATH``), for larger crops such as 96x120 faces.

Both return logits of shape (N,) for ``num_outputs=1`` (a binary problem) and
(N, K) otherwise (K classes), and expose ``features(x)`` (the pooled features
before the last layer) and ``class_logits(x)``, always (N, K).
"""
from __future__ import annotations

import torch
from torch import nn

from .data import DataError

BACKBONES = ("cnn", "resnet18")


def _conv(cin, cout, k, stride=1):
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2), nn.LeakyReLU(0.2)]


class Backbone(nn.Module):
    """A network seen as a body (``features``) and a linear ``head``: ``class_logits``
    are the head's outputs, ``forward`` the same with one output squeezed to (N,)."""

    head: nn.Module
    num_outputs: int

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.class_logits(x)
        return out.squeeze(1) if self.num_outputs == 1 else out


class LLPGANCNN(Backbone):
    """Dropout 0.2; conv3x3 64, 64, 64/2; Dropout 0.5; conv3x3 128, 128, 128/2;
    Dropout 0.5; conv3x3 256, conv1x1 128, conv1x1 64; global average pool; linear."""

    def __init__(self, in_channels: int = 3, num_outputs: int = 1, width: float = 1.0):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        c = lambda n: max(1, int(round(n * width)))  # noqa: E731
        self.body = nn.Sequential(
            nn.Dropout(0.2),
            *_conv(in_channels, c(64), 3), *_conv(c(64), c(64), 3), *_conv(c(64), c(64), 3, stride=2),
            nn.Dropout(0.5),
            *_conv(c(64), c(128), 3), *_conv(c(128), c(128), 3), *_conv(c(128), c(128), 3, stride=2),
            nn.Dropout(0.5),
            *_conv(c(128), c(256), 3), *_conv(c(256), c(128), 1), *_conv(c(128), c(64), 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(c(64), num_outputs)
        self.num_outputs = num_outputs
        # He initialisation for LeakyReLU(0.2), zero biases. With PyTorch's default
        # init each layer shrinks its input's variation (gain about 1/sqrt(3)), so after
        # nine layers and the average pool the features of different images differ by
        # ~1e-5 relative to their size: the network starts with one output for every
        # image. A loss on bag means (DLLP, LLP-GAN) then sees no image-dependent
        # gradient and stayed at chance on CIFAR (docs/experiments/reproduction.md).
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ResNet18(Backbone):
    def __init__(self, in_channels: int = 3, num_outputs: int = 1, weights: str | None = None):
        super().__init__()
        import torchvision

        net = torchvision.models.resnet18(weights=None)
        if weights is not None:
            # Local file only: a state_dict of torchvision's resnet18 (its fc is replaced below).
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            missing, unexpected = net.load_state_dict(state, strict=False)
            bad = [k for k in missing if not k.startswith("fc.")]
            if bad or unexpected:
                raise DataError(f"--weights {weights}: not a resnet18 state_dict "
                                 f"(missing {bad[:3]}, unexpected {list(unexpected)[:3]})")
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        net.fc = nn.Identity()
        self.net = net
        self.head = nn.Linear(512, num_outputs)
        self.num_outputs = num_outputs

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TwoClassLogit(nn.Module):
    """A K = 2 class network (e.g. LLP-GAN's discriminator, whose fake class is an
    implicit logit fixed at 0) seen as a binary classifier: forward gives
    z_1 - z_0, so sigmoid(forward) = P(class 1 | real) and thresholding it at
    0.5 is the argmax over the two real classes."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.class_logits(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        return z[:, 1] - z[:, 0]


def build_backbone(name: str, in_channels: int, num_outputs: int = 1, width: float = 1.0,
                   weights: str | None = None) -> nn.Module:
    """The backbone called ``name`` (one of BACKBONES). num_outputs=2 gives a
    TwoClassLogit (still one logit per instance from forward): a network with two
    outputs is the binary problem seen as K = 2 classes (LLP-GAN's discriminator).
    A C-class problem (C >= 3) has num_outputs=C and forward gives (N, C)."""
    if num_outputs == 2:
        return TwoClassLogit(_raw_backbone(name, in_channels, 2, width, weights))
    return _raw_backbone(name, in_channels, num_outputs, width, weights)


def _raw_backbone(name, in_channels, num_outputs, width, weights):
    if name == "cnn":
        if weights is not None:
            raise ValueError("--weights applies to resnet18 only")
        return LLPGANCNN(in_channels, num_outputs, width)
    if name == "resnet18":
        return ResNet18(in_channels, num_outputs, weights)
    raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
