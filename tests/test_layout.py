"""Convolutions run channels-last inside the data stages and the synthesis: the same fusion, the
models given back in their own layout, and models that cannot take the layout run as they are."""

from contextlib import nullcontext

import pytest
import torch
from models import build, example
from torch import nn

import otfuse
from otfuse import context as context_module
from otfuse.modes import channels_last, runs_channels_last

# one alignment and every data stage, no choice among candidates (which a rounding could flip)
STAGED = dict(recipe="data", candidates=(), seed=0)


@pytest.mark.parametrize("name", ["resnet", "cat", "depthwise"])
def test_the_data_stages_fuse_the_same_in_either_layout(name, monkeypatch):
    models = [build(name, seed=s) for s in (0, 1)]
    data = example(name, n=64, seed=3)
    assert runs_channels_last(models, lambda m: m(data[:2]))  # so the stages take the layout
    fast = otfuse.fuse(models, data=data, **STAGED).model
    monkeypatch.setattr(context_module, "channels_last", lambda models, **_: nullcontext())
    plain = otfuse.fuse(models, data=data, **STAGED).model
    for (key, a), b in zip(fast.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.parametrize("recipe", ["data", "data-free"])
def test_parents_come_back_unchanged_and_the_fused_model_is_contiguous(recipe):
    models = [build("resnet", seed=s) for s in (0, 1)]
    before = [{k: (v.clone(), v.data_ptr()) for k, v in m.state_dict().items()} for m in models]
    x = example("resnet", n=64, seed=3)
    options = {"data": x} if recipe == "data" else {"example_input": x[:2], "synthesize": 16}
    fused = otfuse.fuse(models, recipe=recipe, synthesis_steps=3, **options).model
    for model, saved in zip(models, before, strict=True):
        for key, value in model.state_dict().items():
            assert torch.equal(value, saved[key][0]) and value.data_ptr() == saved[key][1], key
            assert value.is_contiguous(), key
    assert all(p.is_contiguous() for p in fused.parameters())  # as safetensors wants them
    assert not any(
        p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in fused.parameters()
    )


def test_channels_last_runs_the_same_function_and_gives_the_weights_back():
    model = build("resnet").eval()
    model.extra = model.conv1  # a layer reached twice: its weight is changed and restored once
    weights = {name: (p, p.data_ptr()) for name, p in model.named_parameters()}
    x = example("resnet", n=8).requires_grad_(True)
    expected = model(x)
    (grad,) = torch.autograd.grad(expected.square().sum(), x)
    with channels_last([model, model]):
        assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        out = model(x)
        (grad_cl,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_cl, grad, rtol=1e-4, atol=1e-5)
    for name, p in model.named_parameters():
        assert p is weights[name][0] and p.data_ptr() == weights[name][1]  # the same memory
        assert p.is_contiguous()


class _ViewsItsActivations(nn.Module):
    """A BatchNorm convnet that ``.view``-s a 4-D activation: channels-last cannot give it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 8 * 8, 4)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(h.view(h.shape[0], -1))


def test_a_model_that_cannot_take_the_layout_is_fused_as_it_is():
    torch.manual_seed(0)
    models = [_ViewsItsActivations().eval() for _ in range(2)]
    x = torch.randn(64, 3, 8, 8)
    assert not runs_channels_last(models, lambda m: m(x[:2]))
    assert runs_channels_last([build("resnet")], lambda m: m(x[:2]))
    assert not runs_channels_last([build("vgg")], lambda m: m(x[:2]))  # views its features too
    result = otfuse.fuse(models, data=x, recipe="data")
    assert torch.isfinite(result.model(x)).all()
    free = otfuse.fuse(models, example_input=x[:2], synthesize=16, synthesis_steps=3)
    assert torch.isfinite(free.model(x)).all()


def test_a_weight_written_in_the_block_is_kept():
    model = build("vgg")
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    storage = conv.weight.data_ptr()
    with channels_last([model], keep_writes=True), torch.no_grad():
        conv.weight.mul_(2.0)  # as refit and REPAIR write the fused model's weights
        doubled = conv.weight.detach().clone()
    assert conv.weight.data_ptr() == storage and conv.weight.is_contiguous()
    torch.testing.assert_close(conv.weight.detach(), doubled, rtol=0, atol=0)


class _Blurs(nn.Module):
    """A BatchNorm convnet with a fixed blur kernel expanded over its channels (a weight whose
    values overlap in memory, which no layout copy can be written back into)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blur = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.blur.weight = nn.Parameter(torch.full((1, 1, 3, 3), 1 / 9).expand(8, 1, 3, 3))
        self.blur.weight.requires_grad_(False)
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.b(self.blur(self.a(x))).mean((2, 3)))


@pytest.mark.parametrize("recipe", ["data", "data-free"])
def test_parents_with_an_expanded_kernel_come_back_in_their_own_layout(recipe):
    torch.manual_seed(0)
    models = [_Blurs().eval(), _Blurs().eval()]
    layout = [{k: (v.stride(), v.data_ptr()) for k, v in m.state_dict().items()} for m in models]
    x = torch.randn(32, 3, 8, 8)
    options = {"data": x} if recipe == "data" else {"example_input": x[:2], "synthesize": 8}
    otfuse.fuse(models, recipe=recipe, synthesis_steps=2, **options)
    for model, before in zip(models, layout, strict=True):
        assert {k: (v.stride(), v.data_ptr()) for k, v in model.state_dict().items()} == before


def test_a_weight_moved_by_an_outer_block_is_left_to_it():
    model = build("resnet")
    storage = model.conv1.weight.data_ptr()
    with channels_last([model]):
        moved = model.conv1.weight.data_ptr()
        with channels_last([model]):  # another fusion of a model shared with this one
            assert model.conv1.weight.data_ptr() == moved
        assert model.conv1.weight.data_ptr() == moved
    assert model.conv1.weight.data_ptr() == storage and model.conv1.weight.is_contiguous()


class _ClippedRounding(torch.autograd.Function):
    """Straight-through rounding whose backward ``.view``-s the gradient, which a channels-last
    input gradient does not allow."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 8) / 8

    @staticmethod
    def backward(ctx, g):
        return g.view(g.shape[0], -1).clamp(-1, 1).view(g.shape)


class _Rounds(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.a(_ClippedRounding.apply(x)).mean((2, 3)))


def test_synthesis_runs_a_model_whose_backward_cannot_take_the_layout():
    torch.manual_seed(0)
    models = [_Rounds().eval(), _Rounds().eval()]
    result = otfuse.fuse(models, example_input=torch.randn(2, 3, 8, 8), synthesize=16)
    assert torch.isfinite(result.model(torch.randn(4, 3, 8, 8))).all()
