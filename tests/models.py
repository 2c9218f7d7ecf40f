"""Tiny real models for the tests: one of each kind of graph otfuse must understand."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Flatten -> Linear -> ReLU -> Linear -> ReLU -> Linear (functional relu, no first bias)."""

    def __init__(self, width: int = 24, in_features: int = 64, classes: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, width, bias=False)
        self.fc2 = nn.Linear(width, width // 2)
        self.fc3 = nn.Linear(width // 2, classes)

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.fc2(x).relu()
        return self.fc3(x)


class VGGish(nn.Module):
    """Conv-BN-ReLU blocks with max pooling, flattened (C, H, W) into a Linear via x.view."""

    def __init__(self, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(2 * width * 2 * 2, classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """ResNet-18 style: stem, identity blocks and 1x1-conv shortcut blocks, global pooling."""

    def __init__(self, width: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, width, 1))
        self.layer2 = nn.Sequential(
            BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width, 1)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class CatNet(nn.Module):
    """Two branches concatenated along channels (an Inception/DenseNet-style block)."""

    def __init__(self, width: int = 6, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.left = nn.Conv2d(width, width, 1)
        self.right = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.mix = nn.Conv2d(4 * width, width, 1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.left(x)), F.relu(self.right(x)), x], dim=1)
        y = F.relu(self.mix(y))
        return self.fc(y.mean(dim=(2, 3)))


class DepthwiseSeparable(nn.Module):
    """Conv, then depthwise 3x3 + pointwise 1x1 (MobileNet style), a grouped conv and GroupNorm."""

    def __init__(self, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.pointwise = nn.Conv2d(width, 2 * width, 1)
        self.norm = nn.GroupNorm(4, 2 * width)
        self.grouped = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=4)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.pointwise(self.depthwise(x)))
        x = F.relu(self.grouped(F.relu(self.norm(x))))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


class ResidualMLP(nn.Module):
    """Pre-LayerNorm residual MLP blocks with GELU on a (batch, tokens, features) input."""

    def __init__(
        self, width: int = 16, hidden: int = 32, in_features: int = 10, classes: int = 5
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)
            )
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.norm(x).mean(dim=1))


FIXTURES = {
    "mlp": (MLP, (1, 8, 8)),
    "vgg": (VGGish, (3, 8, 8)),
    "resnet": (TinyResNet, (3, 8, 8)),
    "cat": (CatNet, (3, 6, 6)),
    "depthwise": (DepthwiseSeparable, (3, 6, 6)),
    "resmlp": (ResidualMLP, (4, 10)),
}


def build(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """A fixture model with random weights and, for BatchNorm, non-trivial running statistics."""
    cls, in_shape = FIXTURES[name]
    torch.manual_seed(seed)
    model = cls(**kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def example(name: str, n: int = 4, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, *FIXTURES[name][1])
