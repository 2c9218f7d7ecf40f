"""Neuron-space discovery: the spaces found, and clear errors for what is not understood."""

import pytest
import torch
import torch.nn.functional as F
from helpers import permuted
from models import FIXTURES, build, example
from torch import nn

import otfuse
from otfuse.errors import OtfuseError, UnsupportedOpError


def test_mlp_spaces_and_fixed_ends():
    graph = otfuse.spaces(build("mlp"), example("mlp"))
    hidden = graph.transportable()
    assert [s.size for s in hidden] == [24, 12]
    assert {m.param for m in hidden[0].members} == {"fc1.weight", "fc2.weight"}
    assert {(m.param, m.axis, m.role) for m in hidden[1].members} == {
        ("fc2.weight", 0, "producer"),
        ("fc2.bias", 0, "producer"),
        ("fc3.weight", 1, "consumer"),
    }
    assert graph.spaces[-1].fixed and graph.spaces[-1].name == "fc3"
    assert "24 units" in str(graph)


def test_residual_stream_is_one_space_and_shortcut_opens_a_new_one():
    graph = otfuse.spaces(build("resnet"), example("resnet"))
    stream = next(s for s in graph.spaces if s.name == "conv1")
    params = {m.param for m in stream.members}
    assert {"layer1.0.conv2.weight", "layer1.1.conv2.weight", "bn1.running_var"} <= params
    stage2 = next(
        s
        for s in graph.spaces
        if "layer2.0.shortcut.0.weight" in {m.param for m in s.members if m.axis == 0}
    )
    assert {"layer2.1.conv2.weight", "fc.weight"} <= {m.param for m in stage2.members}
    assert len(graph.transportable()) == 6


def test_flatten_repeats_channels_and_cat_concatenates():
    vgg = otfuse.spaces(build("vgg"), example("vgg"))
    last = vgg.transportable()[-1]
    consumer = next(m for m in last.members if m.param == "classifier.weight")
    assert consumer.layout.segments[0].inner == 4  # 2x2 positions per channel
    cat = otfuse.spaces(build("cat"), example("cat"))
    mix = next(m for s in cat.spaces for m in s.members if m.param == "mix.weight" and m.axis == 1)
    assert [seg.space for seg in mix.layout.segments] == [
        next(s.index for s in cat.spaces if s.name == n) for n in ("left", "right", "stem")
    ]


def test_group_norm_and_grouped_conv_constrain_groups():
    graph = otfuse.spaces(build("depthwise"), example("depthwise"))
    by_name = {s.name: s for s in graph.spaces}
    assert by_name["pointwise"].groups == 4 and by_name["grouped"].groups == 4
    assert "depthwise.weight" in {m.param for m in by_name["stem"].members}


@pytest.mark.parametrize("name", list(FIXTURES))
def test_random_permutation_of_discovered_spaces_preserves_function(name):
    """If discovery missed a member axis, permuting its space would change the outputs."""
    model, x = build(name), example(name)
    other, _ = permuted(model, x, seed=3)
    torch.testing.assert_close(other(x), model(x), atol=1e-5, rtol=1e-5)


def test_discovery_leaves_batchnorm_statistics_and_mode_alone():
    model = build("vgg").train()
    before = model.features[1].running_mean.clone()
    otfuse.spaces(model, example("vgg"))
    assert model.training
    torch.testing.assert_close(model.features[1].running_mean, before)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return x


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.rnn(x)[0])


class SplitsUnits(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.fc(x)[:, :4])


class UnknownOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.cumsum(self.fc(x), dim=1))


def test_untraceable_model_is_a_clear_error():
    with pytest.raises(OtfuseError, match="cannot trace Untraceable"):
        otfuse.spaces(Untraceable(), torch.randn(2, 4))


@pytest.mark.parametrize(
    "model, x, pattern",
    [
        (
            WithLSTM(),
            torch.randn(2, 3, 4),
            "module 'rnn' \\(GRU\\) is not supported.*otfuse.register_rule\\(GRU, rule\\)",
        ),
        (SplitsUnits(), torch.randn(2, 4), "indexing selects some of the units"),
        (UnknownOp(), torch.randn(2, 4), "cumsum"),
    ],
)
def test_unsupported_ops_name_the_op(model, x, pattern):
    with pytest.raises(UnsupportedOpError, match=pattern) as err:
        otfuse.spaces(model, x)
    assert "\n" not in str(err.value)


def test_wrong_example_input_is_a_clear_error():
    with pytest.raises(OtfuseError, match="example input does not fit MLP"):
        otfuse.spaces(build("mlp"), torch.randn(2, 3, 5))


def test_functional_calls_and_views_are_understood():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 6, 3)
            self.fc = nn.Linear(6 * 4, 3)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv(x)), 2)
            return self.fc(x.reshape(x.shape[0], -1))

    model, x = Functional(), torch.randn(2, 1, 6, 6)
    graph = otfuse.spaces(model, x)
    assert [s.size for s in graph.transportable()] == [6]
    other, _ = permuted(model, x)
    torch.testing.assert_close(other(x), model(x))


# -- resampling and padding of the positions -------------------------------------------------------
class Resampling(nn.Module):
    """Upsampling and padding of the positions (module and functional forms): units pass through."""

    def __init__(self, pad_units: bool = False) -> None:
        super().__init__()
        self.pad_units = pad_units
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)
        self.pad = nn.ReflectionPad2d(1)
        self.c2 = nn.Conv2d(8, 6, 3)
        self.zero = nn.ZeroPad2d((0, 1, 1, 0))
        self.fc = nn.Linear(8 if pad_units else 6, 4)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = F.relu(self.c2(self.pad(self.up(h))))
        h = F.interpolate(self.zero(h), scale_factor=0.5, mode="bilinear")
        h = F.pad(h, (0, 0, 0, 0, 1, 1) if self.pad_units else (1, 1, 2, 0), value=0.5)
        return self.fc(h.mean((2, 3)))


def _members(graph):
    return sorted(sorted((m.param, m.axis) for m in s.members) for s in graph.transportable())


def test_upsampling_and_padding_of_positions_pass_the_units_through():
    from otfuse.discovery import discover_exported

    torch.manual_seed(0)
    model, x = Resampling().eval(), torch.randn(2, 3, 8, 8)
    graph = otfuse.spaces(model, x)
    assert [s.size for s in graph.transportable()] == [8, 6]
    assert _members(discover_exported(model, x)) == _members(graph)  # the ATen rules agree
    fused = otfuse.fuse([model, permuted(model, x)[0]], "paper-wts", example_input=x).model
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_padding_the_axis_of_the_units_is_refused():
    from otfuse.discovery import discover_exported

    model, x = Resampling(pad_units=True).eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(UnsupportedOpError, match="would add units"):
        otfuse.spaces(model, x)
    with pytest.raises(UnsupportedOpError, match="pads the axis of the units"):
        discover_exported(model, x)


class Decoder(nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=groups)
        self.c2 = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.up(F.relu(self.c1(x))))
        return self.fc(F.relu(self.c2(h)).mean((2, 3)))


def test_transposed_convolution_opens_a_space_on_its_weights_second_axis():
    torch.manual_seed(0)
    model, x = Decoder().eval(), torch.randn(4, 3, 6, 6)
    graph = otfuse.spaces(model, x)
    assert [s.size for s in graph.transportable()] == [8, 6, 4]
    up = next(s for s in graph.transportable() if s.size == 6)
    assert {(m.param, m.axis) for m in up.members} >= {("up.weight", 1), ("up.bias", 0)}
    from otfuse.discovery import discover_exported

    assert _members(discover_exported(model, x)) == _members(graph)  # the ATen rule agrees
    twin = permuted(model, x)[0]
    for recipe in ("paper-wts", "data"):
        fused = otfuse.fuse([model, twin], recipe, example_input=x, data=torch.randn(32, 3, 6, 6))
        torch.testing.assert_close(fused.model(x), model(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(UnsupportedOpError, match="grouped ConvTranspose2d"):
        otfuse.spaces(Decoder(groups=2), x)
