"""A registry of the models used in the paper's experiments, built by name.

>>> model = create("vgg11", width=0.5, in_shape=(1, 28, 28))
>>> model.otfuse_config
{'name': 'vgg11', 'width': 0.5, 'batch_norm': False, 'bias': False, 'in_shape': [1, 28, 28],
 'num_classes': 10}
>>> same_architecture = create(**model.otfuse_config)

Every model is traceable by ``torch.fx`` (no data-dependent Python control flow), takes inputs of
shape (N, *in_shape) and returns logits of shape (N, num_classes). ``width`` multiplies every hidden
size (rounded, at least 1), which is how the paper fuses models of different widths.

Models:

- ``mlpnet``: the paper's MLPNet, flatten -> 400 -> 200 -> 100 -> classes, ReLU, no biases.
- ``vgg11``: CIFAR-style VGG11 (8 convolutions, 5 max-pools, one linear layer), as in the paper.
- ``resnet18``: CIFAR ResNet-18 (3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2], average pool).
- ``convnet``: two convolutions and a linear classifier, small enough for quick tests.
- ``vit``, ``chargpt``: a small Vision Transformer and a character-level GPT
  (:mod:`otfuse.zoo_transformers`; captured by ``torch.export``, not ``torch.fx``).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from otfuse.errors import OtfuseError
from otfuse.jsonsafe import jsonable

__all__ = [
    "ConvNet",
    "MLPNet",
    "ModelConfigError",
    "ResNet",
    "VGG",
    "create",
    "names",
    "register",
]


class ModelConfigError(OtfuseError):
    """An unknown model name, or keyword arguments the model does not take."""


_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator adding a model builder to the registry under its function name.

    The builder takes keyword arguments only. The decorated function calls :func:`create`, so models
    built directly (``zoo.vgg11(width=2)``) also carry ``otfuse_config``.
    """
    name = builder.__name__
    if name in _REGISTRY:
        raise ValueError(f"model '{name}' is registered twice")
    _REGISTRY[name] = builder

    @functools.wraps(builder)
    def build(**kwargs: object) -> nn.Module:
        return create(name, **kwargs)

    return build


def names() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_REGISTRY)


def create(name: str, **kwargs: object) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs``.

    The model gets an attribute ``otfuse_config``: ``{"name": name, **all keyword arguments}`` with
    defaults filled in and tuples as lists (JSON-friendly), so ``create(**model.otfuse_config)``
    builds the same architecture again (checkpoints record it).
    """
    if name not in _REGISTRY:
        raise ModelConfigError(f"unknown model '{name}': choose one of {', '.join(names())}")
    builder = _REGISTRY[name]
    signature = inspect.signature(builder)
    try:
        bound = signature.bind(**kwargs)
    except TypeError:
        unknown = sorted(set(kwargs) - set(signature.parameters))
        valid = ", ".join(signature.parameters)
        raise ModelConfigError(
            f"model '{name}' takes no argument {', '.join(unknown)}: "
            f"valid keyword arguments are {valid}"
        ) from None
    bound.apply_defaults()
    model = builder(**bound.arguments)
    model.otfuse_config = {"name": name, **{k: jsonable(v) for k, v in bound.arguments.items()}}
    return model


# ----------------------------------------------------------------------------------------------
# Argument checks shared by the builders


def _check_in_shape(in_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(in_shape) if isinstance(in_shape, (tuple, list)) else ()
    if len(shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in shape):
        raise ModelConfigError(f"in_shape must be 3 positive integers (C, H, W), got {in_shape}")
    return shape


def _check_common(width: float, num_classes: int) -> None:
    if not (isinstance(width, (int, float)) and width > 0 and math.isfinite(width)):
        raise ModelConfigError(f"width must be a positive number, got {width}")
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ModelConfigError(f"num_classes must be a positive integer, got {num_classes}")


def _scaled(size: int, width: float) -> int:
    """``size * width`` rounded, at least 1."""
    return max(1, round(size * width))


# ----------------------------------------------------------------------------------------------
# MLPNet


class MLPNet(nn.Module):
    """Flatten, then Linear + ReLU for each hidden size, then a Linear classifier.

    Input (N, *in_shape) -> logits (N, num_classes). The hidden layers are ``features.0``,
    ``features.2``, ... and the last layer is ``classifier``.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, bias: bool):
        super().__init__()
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(n_in, n_out, bias=bias), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(sizes[-1], num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(torch.flatten(x, 1)))


@register
def mlpnet(
    *,
    in_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    width: float = 1.0,
    hidden: Sequence[int] | None = None,
    bias: bool = False,
) -> MLPNet:
    """The paper's MLPNet: hidden sizes (400, 200, 100) times ``width``, or exactly ``hidden``
    (any number of layers, one integer for one layer; ``width`` is then ignored)."""
    shape = _check_in_shape(in_shape)
    _check_common(width, num_classes)
    if hidden is None:
        hidden = tuple(_scaled(h, width) for h in (400, 200, 100))
    elif isinstance(hidden, int) and not isinstance(hidden, bool):
        hidden = (hidden,)  # one hidden layer
    if not isinstance(hidden, (tuple, list)) or not all(
        isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden
    ):
        raise ModelConfigError(
            f"hidden must be positive layer sizes, one integer or several (e.g. (400,200)), "
            f"got {hidden}"
        )
    return MLPNet(math.prod(shape), tuple(hidden), num_classes, bias)


# ----------------------------------------------------------------------------------------------
# VGG

VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """Convolutions (3x3, padding 1) + [BatchNorm] + ReLU, max-pools, flatten, one Linear,
    initialised like torchvision's VGG (see :func:`_kaiming_init`).

    A max-pool is skipped when the feature map is already 1 pixel high or wide, so small inputs
    work: (1, 28, 28) goes 28 -> 14 -> 7 -> 3 -> 1 and skips the fifth pool; (3, 32, 32) uses all
    five. The classifier sees ``channels * h * w`` features (512 * width for both shapes above).
    """

    def __init__(
        self,
        cfg: Sequence[int | str],
        in_shape: tuple[int, int, int],
        num_classes: int,
        batch_norm: bool,
        bias: bool,
    ):
        super().__init__()
        channels, height, width = in_shape
        layers: list[nn.Module] = []
        for item in cfg:
            if item == "M":
                if height >= 2 and width >= 2:
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                    height, width = height // 2, width // 2
                continue
            layers.append(nn.Conv2d(channels, int(item), kernel_size=3, padding=1, bias=bias))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(item)))
            layers.append(nn.ReLU())
            channels = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * height * width, num_classes, bias=bias)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _kaiming_init(model: nn.Module) -> None:
    """torchvision's VGG initialisation: He-normal (fan-out) convolutions, N(0, 0.01) linear
    weights, zero biases. Without it, a VGG11 without BatchNorm sits at chance for a long time."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            nn.init.zeros_(module.bias)


@register
def vgg11(
    *,
    width: float = 1.0,
    batch_norm: bool = False,
    bias: bool = False,
    in_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
) -> VGG:
    """CIFAR-style VGG11 with channels (64, 128, 256, 256, 512, 512, 512, 512) times ``width``.

    About 9.2M parameters at width 1 on (3, 32, 32) with 10 classes.
    """
    shape = _check_in_shape(in_shape)
    _check_common(width, num_classes)
    cfg = [c if c == "M" else _scaled(int(c), width) for c in VGG11_CFG]
    return VGG(cfg, shape, num_classes, batch_norm, bias)


# ----------------------------------------------------------------------------------------------
# ResNet


def _norm(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x)).

    The shortcut is the identity, or a 1x1 convolution (+ BatchNorm) when the stride or the
    number of channels changes.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, batch_norm: bool, bias: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = _norm(planes, batch_norm)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=bias)
        self.bn2 = _norm(planes, batch_norm)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=bias), _norm(planes, batch_norm)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem conv (no max-pool), four stages of BasicBlocks, global average pool,
    Linear. Stage ``i`` has ``planes[i]`` channels; stages 2-4 start with stride 2."""

    def __init__(
        self,
        blocks: Sequence[int],
        planes: Sequence[int],
        in_shape: tuple[int, int, int],
        num_classes: int,
        batch_norm: bool,
        bias: bool,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_shape[0], planes[0], 3, stride=1, padding=1, bias=bias)
        self.bn1 = _norm(planes[0], batch_norm)
        self.relu = nn.ReLU()
        in_planes = planes[0]
        for i, (n_blocks, n_planes) in enumerate(zip(blocks, planes, strict=True)):
            layer = []
            for j in range(n_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                layer.append(BasicBlock(in_planes, n_planes, stride, batch_norm, bias))
                in_planes = n_planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


@register
def resnet18(
    *,
    width: float = 1.0,
    batch_norm: bool = True,
    bias: bool = False,
    in_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
) -> ResNet:
    """CIFAR ResNet-18, stage widths (64, 128, 256, 512) times ``width``; about 11.2M parameters
    at width 1. Without ``batch_norm`` each BatchNorm is an ``nn.Identity``."""
    shape = _check_in_shape(in_shape)
    _check_common(width, num_classes)
    planes = [_scaled(p, width) for p in (64, 128, 256, 512)]
    return ResNet([2, 2, 2, 2], planes, shape, num_classes, batch_norm, bias)


# ----------------------------------------------------------------------------------------------
# A small ConvNet for quick tests


class ConvNet(nn.Module):
    """Two blocks of conv 3x3 (padding 1) + [BatchNorm] + ReLU + max-pool 2, flatten, one Linear."""

    def __init__(
        self,
        channels: Sequence[int],
        in_shape: tuple[int, int, int],
        num_classes: int,
        batch_norm: bool,
        bias: bool,
    ):
        super().__init__()
        c_in, height, width = in_shape
        layers: list[nn.Module] = []
        for c_out in channels:
            layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=bias))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            c_in, height, width = c_out, height // 2, width // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in * height * width, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register
def convnet(
    *,
    width: float = 1.0,
    batch_norm: bool = False,
    bias: bool = False,
    in_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
) -> ConvNet:
    """Two convolutions with (32, 64) channels times ``width``, then a linear classifier."""
    shape = _check_in_shape(in_shape)
    _check_common(width, num_classes)
    if shape[1] < 4 or shape[2] < 4:
        raise ModelConfigError(f"convnet needs inputs at least 4x4 pixels, got in_shape {in_shape}")
    return ConvNet([_scaled(c, width) for c in (32, 64)], shape, num_classes, batch_norm, bias)


# ----------------------------------------------------------------------------------------------
# Transformers (vit, chargpt) live in their own module; importing it registers them.
from otfuse import zoo_transformers  # noqa: E402, F401
