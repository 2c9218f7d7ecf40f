"""otfuse.zoo: every registered model builds, runs, traces, and records its configuration."""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx
from torch import nn

from otfuse import zoo
from otfuse.errors import OtfuseError
from otfuse.zoo import ModelConfigError, create, names

IN_SHAPES = [(1, 28, 28), (3, 32, 32)]
CNNS = ["convnet", "mlpnet", "resnet18", "vgg11"]  # the paper's models (fx-traceable, width=)
TRANSFORMERS = ["chargpt", "vit"]  # otfuse.zoo_transformers, see test_experiment_transformers
WEIGHTED = (nn.Conv2d, nn.Linear)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_the_paper_models() -> None:
    assert names() == sorted(CNNS + TRANSFORMERS)


@pytest.mark.parametrize("in_shape", IN_SHAPES)
@pytest.mark.parametrize("name", CNNS)
def test_every_model_runs_and_traces_to_the_same_function(name: str, in_shape: tuple) -> None:
    torch.manual_seed(0)
    model = create(name, width=0.25, in_shape=in_shape, num_classes=7).eval()
    x = torch.randn(3, *in_shape)
    logits = model(x)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), logits)


@pytest.mark.parametrize("name", ["vgg11", "resnet18", "convnet"])
def test_batch_norm_switch(name: str) -> None:
    with_bn = create(name, width=0.25, batch_norm=True)
    without = create(name, width=0.25, batch_norm=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in without.modules())
    torch.fx.symbolic_trace(with_bn.eval())


def test_parameter_counts_of_the_full_size_models() -> None:
    assert n_params(create("vgg11")) == 9_222_848  # ~9.2M as in the paper's CIFAR-10 VGG11
    assert n_params(create("resnet18")) == 11_173_952  # kuangliu's 11,173,962 minus fc bias
    assert n_params(create("mlpnet")) == 784 * 400 + 400 * 200 + 200 * 100 + 100 * 10


def test_biases_are_off_by_default_and_can_be_switched_on() -> None:
    for name in CNNS:
        layers = [m for m in create(name, width=0.25).modules() if isinstance(m, WEIGHTED)]
        assert layers and all(m.bias is None for m in layers)
    vgg = create("vgg11", width=0.25, bias=True)
    assert all(m.bias is not None for m in vgg.modules() if isinstance(m, WEIGHTED))


def test_width_scales_hidden_sizes() -> None:
    mlp = create("mlpnet", width=0.5)
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [200, 100, 50, 10]
    explicit = create("mlpnet", hidden=[64, 32])
    assert [m.out_features for m in explicit.modules() if isinstance(m, nn.Linear)] == [64, 32, 10]
    tiny = create("vgg11", width=0.001)
    assert all(m.out_channels == 1 for m in tiny.modules() if isinstance(m, nn.Conv2d))
    resnet = create("resnet18", width=0.5)
    assert resnet.linear.in_features == 256


def test_vgg_skips_pools_below_one_pixel() -> None:
    def pools(model: nn.Module) -> int:
        return sum(isinstance(m, nn.MaxPool2d) for m in model.modules())

    small = create("vgg11", width=0.25, in_shape=(1, 28, 28))
    cifar = create("vgg11", width=0.25, in_shape=(3, 32, 32))
    assert pools(small) == 4 and pools(cifar) == 5
    assert small.classifier.in_features == cifar.classifier.in_features == 128


def test_config_is_recorded_json_friendly_and_rebuilds_the_architecture() -> None:
    model = create("vgg11", width=0.5, in_shape=(1, 28, 28))
    assert model.otfuse_config == {
        "name": "vgg11",
        "width": 0.5,
        "batch_norm": False,
        "bias": False,
        "in_shape": [1, 28, 28],
        "num_classes": 10,
    }
    rebuilt = create(**json.loads(json.dumps(model.otfuse_config)))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    assert rebuilt.otfuse_config == model.otfuse_config


def test_builders_called_directly_also_record_their_config() -> None:
    model = zoo.mlpnet(width=0.25, hidden=(8,))
    assert model.otfuse_config["name"] == "mlpnet" and model.otfuse_config["hidden"] == [8]


def test_unknown_model_names_the_valid_ones() -> None:
    with pytest.raises(ModelConfigError) as excinfo:
        create("vgg16")
    message = str(excinfo.value)
    assert "\n" not in message and "vgg16" in message and "mlpnet, resnet18, vgg11" in message
    assert isinstance(excinfo.value, OtfuseError)


def test_unknown_keyword_names_the_valid_ones() -> None:
    with pytest.raises(ModelConfigError) as excinfo:
        create("mlpnet", depth=3)
    message = str(excinfo.value)
    assert "\n" not in message and "depth" in message
    assert "in_shape, num_classes, width, hidden, bias" in message


@pytest.mark.parametrize(
    ("name", "kwargs", "fragment"),
    [
        ("mlpnet", {"width": 0}, "width must be a positive number"),
        ("vgg11", {"in_shape": (28, 28)}, "in_shape must be 3 positive integers"),
        ("resnet18", {"num_classes": 0}, "num_classes must be a positive integer"),
        ("mlpnet", {"hidden": [10, -1]}, "hidden must be positive layer sizes"),
        ("convnet", {"in_shape": (1, 2, 2)}, "at least 4x4"),
    ],
)
def test_bad_values_raise_model_config_errors(name: str, kwargs: dict, fragment: str) -> None:
    with pytest.raises(ModelConfigError, match=fragment):
        create(name, **kwargs)


def test_one_integer_hidden_is_one_hidden_layer() -> None:
    model = create("mlpnet", hidden=3)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in layers] == [(3, 784), (10, 3)]
    with pytest.raises(ModelConfigError, match="positive layer sizes"):
        create("mlpnet", hidden=True)
