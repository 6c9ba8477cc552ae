"""Encoders and the heads the CoKe recipe puts on top of them.

The trainer accepts any ``torch.nn.Module`` that maps a batch of images to a batch of feature
vectors. :class:`SmallConvNet` is built in (small images, tests, the default CPU run);
torchvision's ResNets are used when torchvision is installed (``build_encoder("resnet50")``).
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class SmallConvNet(nn.Module):
    """A compact convolutional encoder for small images (8 to 64 pixels a side).

    Three stages of two 3x3 convolutions with BatchNorm and ReLU, each stage but the last
    followed by 2x2 max pooling, then global average pooling. ``out_features`` is the width of
    the last stage.
    """

    def __init__(self, in_channels: int = 3, width: int = 32, out_features: int | None = None):
        super().__init__()
        widths = (width, 2 * width, out_features or 4 * width)
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            layers += [_conv_bn_relu(c, w), _conv_bn_relu(w, w)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            c = w
        self.features = nn.Sequential(*layers)
        self.out_features = c

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


def mlp(dims: Sequence[int], *, last_bn: bool = True) -> nn.Sequential:
    """Linear layers with BatchNorm and ReLU between them and, optionally, BatchNorm (without
    affine parameters) on the output, as CoKe's projection head does."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=last and not last_bn))
        if not last:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)


class CoKeNetwork(nn.Module):
    """Encoder, projection MLP and predictor MLP.

    ``forward`` returns the L2-normalised projection (what the clusterer sees) and the
    L2-normalised prediction (what the loss sees). Empty or None ``projection_dims`` clusters
    the encoder's output itself; empty or None ``predictor_dims`` drops the predictor, and the
    loss then uses the projection.
    """

    def __init__(self, encoder: nn.Module, encoder_dim: int, projection_dims: Sequence[int] | None = (2048, 2048, 128),
                 predictor_dims: Sequence[int] | None = (2048, 128)):
        super().__init__()
        self.encoder = encoder
        projection_dims = tuple(projection_dims or ())
        predictor_dims = tuple(predictor_dims) if predictor_dims else None
        self.projector = mlp([encoder_dim, *projection_dims]) if projection_dims else nn.Identity()
        dim = projection_dims[-1] if projection_dims else encoder_dim
        self.predictor = None if predictor_dims is None else mlp([dim, *predictor_dims], last_bn=False)
        if predictor_dims is not None and predictor_dims[-1] != dim:
            raise ValueError(f"predictor_dims must end at the projection width {dim}, got {tuple(predictor_dims)}")
        self.out_dim = dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.projector(self.encoder(x))
        p = z if self.predictor is None else self.predictor(z)
        return F.normalize(z, dim=1), F.normalize(p, dim=1)


def build_encoder(name: str, in_channels: int = 3, **kwargs) -> tuple[nn.Module, int]:
    """An encoder by name and the width of its output: ``"small"`` (:class:`SmallConvNet`), or
    any torchvision ResNet (``"resnet18"``, ``"resnet50"``, ...) with its classifier removed."""
    if name == "small":
        net = SmallConvNet(in_channels=in_channels, **kwargs)
        return net, net.out_features
    if name.startswith("resnet") or name.startswith("wide_resnet") or name.startswith("resnext"):
        try:
            import torchvision
        except ImportError:
            raise ImportError(f"encoder {name!r} needs torchvision (pip install 'streamcoke[vision]')") from None
        try:
            net = getattr(torchvision.models, name)(weights=None, **kwargs)
        except AttributeError:
            raise ValueError(f"torchvision has no model {name!r}") from None
        dim = net.fc.in_features
        net.fc = nn.Identity()
        if in_channels != 3:
            old = net.conv1
            net.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        return net, dim
    raise ValueError(f"unknown encoder {name!r}; use 'small' or a torchvision ResNet name such as 'resnet50'")
