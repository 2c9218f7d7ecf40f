"""The public rule registry: a user teaches otfuse a block that fx cannot trace inside."""

import copy

import pytest
import torch
from helpers import permuted
from torch import nn

import otfuse
from otfuse.discovery import (
    join,
    linear_rule,
    module_calls,
    norm_rule,
    register_rule,
    registered_rules,
    rules,
    tracked_input,
    unregister_rule,
)
from otfuse.errors import OtfuseError, UnsupportedOpError


class ScaledLinear(nn.Module):
    """y = scale * (x W^T), rescaled when it grows large: data-dependent control flow, so fx cannot
    trace inside. weight has shape (out, in), scale (out,)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.scale = nn.Parameter(torch.rand(n_out) + 0.5)

    def forward(self, x):
        y = x @ self.weight.T
        if y.abs().max() > 1e3:
            y = y / y.abs().max()
        return y * self.scale


class RMSGain(nn.Module):
    """y_i = gain_i * x_i / rms(x); checks its input's rank, which fx cannot trace."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        if x.dim() != 2:
            raise ValueError("RMSGain expects (batch, units)")
        return self.gain * x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.block = ScaledLinear(8, 6)
        self.norm = RMSGain(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.block(torch.relu(self.fc1(x))))))


def soft_clip(x):
    """Elementwise, but data-dependent: fx cannot trace inside."""
    return x.clamp(-5, 5) if x.abs().max() > 5 else x


class Clipped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(soft_clip(self.fc1(x)))


SCALED_LINEAR = linear_rule(writes={"weight": 0, "scale": 0}, reads={"weight": 1})
RMS_GAIN = norm_rule({"gain": 0})


def net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


@pytest.fixture
def x():
    return torch.randn(16, 5, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def restore_registry():
    """Every test leaves the registry as it found it."""
    before = registered_rules()
    yield
    for target in registered_rules():
        unregister_rule(target)
    for target, rule in before.items():
        register_rule(target, rule)


@pytest.fixture
def registered():
    register_rule(ScaledLinear, SCALED_LINEAR)
    register_rule(RMSGain, RMS_GAIN)


def permute_hidden(model: Net, seed: int = 1) -> Net:
    """``model`` with its 8 and 6 hidden units permuted, by hand: the same function."""
    g = torch.Generator().manual_seed(seed)
    p1, p2 = torch.randperm(8, generator=g), torch.randperm(6, generator=g)
    s = {k: v.clone() for k, v in model.state_dict().items()}
    s["fc1.weight"], s["fc1.bias"] = s["fc1.weight"][p1], s["fc1.bias"][p1]
    s["block.weight"], s["block.scale"] = s["block.weight"][p2][:, p1], s["block.scale"][p2]
    s["norm.gain"], s["fc2.weight"] = s["norm.gain"][p2], s["fc2.weight"][:, p2]
    out = copy.deepcopy(model)
    out.load_state_dict(s)
    return out


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


def test_unregistered_blocks_are_clear_errors_naming_them(x):
    with pytest.raises(OtfuseError, match=r"inside module 'block' \(ScaledLinear\)") as err:
        otfuse.discover(net(0), x)
    assert "register_rule" in str(err.value) and "\n" not in str(err.value)
    register_rule(ScaledLinear, SCALED_LINEAR)
    with pytest.raises(OtfuseError, match=r"inside module 'norm' \(RMSGain\)"):
        otfuse.discover(net(0), x)


@pytest.mark.usefixtures("registered")
def test_registered_blocks_are_leaves_with_their_members(x):
    graph = otfuse.discover(net(0), x)
    assert {"block", "norm"} <= set(module_calls(graph.graph_module))
    first, second = graph.transportable()
    assert (first.size, second.size) == (8, 6)
    assert {(m.param, m.axis, m.role) for m in first.members} == {
        ("fc1.weight", 0, "producer"),
        ("fc1.bias", 0, "producer"),
        ("block.weight", 1, "consumer"),
    }
    assert {(m.param, m.axis, m.role) for m in second.members} == {
        ("block.weight", 0, "producer"),
        ("block.scale", 0, "producer"),
        ("norm.gain", 0, "norm"),
        ("fc2.weight", 1, "consumer"),
    }
    assert second.name == "block" and ("norm", "norm", 1) in second.nodes


@pytest.mark.usefixtures("registered")
def test_planted_permutation_is_recovered_exactly(x):
    model = net(0)
    shuffled = permute_hidden(model)
    torch.testing.assert_close(shuffled(x), model(x), atol=1e-5, rtol=1e-5)
    assert not torch.equal(shuffled.block.weight, model.block.weight)
    aligned = otfuse.align(shuffled, model, example_input=x)
    assert_same_state(aligned, model)


@pytest.mark.usefixtures("registered")
def test_alignment_preserves_function_and_fusion_runs(x):
    a, b = net(0), net(1)
    aligned = otfuse.align(b, a, example_input=x)
    torch.testing.assert_close(aligned(x), b(x), atol=1e-5, rtol=1e-5)
    fused = otfuse.fuse([a, b], recipe="paper-wts", example_input=x).model
    assert isinstance(fused.block, ScaledLinear) and torch.isfinite(fused(x)).all()
    itself = otfuse.fuse([a, copy.deepcopy(a)], recipe="paper-wts", example_input=x).model
    assert_same_state(itself, a)
    recovered = otfuse.fuse([a, permute_hidden(a)], recipe="paper-wts", example_input=x).model
    assert_same_state(recovered, a)


def test_unregister_restores_the_error(x):
    register_rule(ScaledLinear, SCALED_LINEAR)
    register_rule(RMSGain, RMS_GAIN)
    otfuse.discover(net(0), x)
    assert unregister_rule(RMSGain) is RMS_GAIN
    assert RMSGain not in registered_rules()
    with pytest.raises(OtfuseError, match=r"'norm' \(RMSGain\)"):
        otfuse.discover(net(0), x)
    with pytest.raises(KeyError, match="RMSGain"):
        unregister_rule(RMSGain)


def test_decorator_form_with_building_blocks(x):
    register_rule(ScaledLinear, SCALED_LINEAR)

    @register_rule(RMSGain)
    def rms_gain(b, node):
        units = tracked_input(b, node)
        join(b, node, "gain", 0, units)
        return units

    assert registered_rules()[RMSGain] is rms_gain
    model = net(0)
    graph = otfuse.discover(model, x)
    assert "norm.gain" in {m.param for m in graph.transportable()[1].members}
    other, _ = permuted(model, x, seed=2)
    torch.testing.assert_close(other(x), model(x), atol=1e-5, rtol=1e-5)


def test_user_rules_take_precedence_and_follow_the_class_hierarchy(x):
    class Wide(nn.Linear):
        pass

    calls = []

    def counting(b, node):
        calls.append(node.target)
        return rules.linear(b, node)

    assert registered_rules(builtin=True)[nn.Linear] is rules.linear
    register_rule(nn.Linear, counting)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), Wide(4, 3))
    otfuse.discover(model, x)
    assert calls == ["0", "2"]
    register_rule(Wide, rules.linear)  # the most derived class with a rule wins
    otfuse.discover(model, x)
    assert calls == ["0", "2", "0"]


def test_parameters_registered_as_none_are_skipped(x):
    class Plain(nn.Linear):
        pass

    register_rule(Plain, linear_rule({"weight": 0, "bias": 0}, {"weight": 1}))
    model = nn.Sequential(Plain(5, 4, bias=False), nn.ReLU(), nn.Linear(4, 3))
    hidden = otfuse.discover(model, x).transportable()[0]
    assert {m.param for m in hidden.members} == {"0.weight", "2.weight"}


def test_registered_function_is_kept_whole(x):
    with pytest.raises(OtfuseError, match="cannot trace Clipped"):
        otfuse.discover(Clipped(), x)
    register_rule(soft_clip, rules.nonlinearity)
    model = Clipped()
    graph = otfuse.discover(model, x)
    assert [s.size for s in graph.transportable()] == [7]
    other, _ = permuted(model, x)
    torch.testing.assert_close(other(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "rule, pattern",
    [
        (linear_rule(writes={"weight": 1}), r"axis 1 of 'weight' has length 8, but .* are 6"),
        (linear_rule(writes={"bias": 0}), "has no parameter or buffer 'bias'"),
        (linear_rule(writes={"weight": 0}, reads={"scale": 0}), "'scale' has length 6"),
        (linear_rule(writes={"weight": 0}, axis=0), "acts on axis 0 but the units lie on axis 1"),
    ],
)
def test_wrong_rules_are_clear_errors_naming_the_module(x, rule, pattern):
    register_rule(ScaledLinear, rule)
    register_rule(RMSGain, RMS_GAIN)
    with pytest.raises(UnsupportedOpError, match=pattern) as err:
        otfuse.discover(net(0), x)
    assert "block" in str(err.value)


def test_bad_targets_are_refused():
    with pytest.raises(TypeError):
        register_rule(nn.Module, SCALED_LINEAR)
    with pytest.raises(TypeError):
        register_rule(int, SCALED_LINEAR)
    with pytest.raises(TypeError):
        register_rule(ScaledLinear, "not a rule")
