"""Alignment and fusion: planted permutations, function preservation, marginals, widths, K models."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import fuse, max_state_diff, permuted
from models import FIXTURES, build, example

import otfuse
from otfuse.errors import ArchitectureMismatchError, DataError, OtfuseError

NAMES = list(FIXTURES)


def data_for(name: str, n: int = 64) -> torch.Tensor:
    return example(name, n=n, seed=7)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode, solver", [("wts", "auto"), ("wts", "exact"), ("acts", "auto")])
def test_planted_permutation_is_recovered_exactly(name, mode, solver):
    model, x = build(name), example(name)
    other, planted = permuted(model, x, seed=11)
    result = fuse([model, other], mode=mode, solver=solver, data=data_for(name), example_input=x)
    assert max_state_diff(result.model, model) < 1e-5
    for space, perm in planted.items():
        np.testing.assert_array_equal(result.plans[1][space].permutation, np.argsort(perm))


@pytest.mark.parametrize("name", NAMES)
def test_align_with_hard_plans_preserves_function(name):
    """A different random model aligned to the anchor computes exactly what it computed before."""
    anchor, model, x = build(name, seed=0), build(name, seed=1), example(name)
    aligned = otfuse.align(model, anchor, example_input=x)
    assert max_state_diff(aligned, model) > 1e-3  # something moved
    torch.testing.assert_close(aligned(x), model(x), atol=1e-5, rtol=1e-5)
    aligned_acts = otfuse.align(model, anchor, mode="acts", data=data_for(name))
    torch.testing.assert_close(aligned_acts(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_fusing_a_model_with_itself_returns_it(name):
    model, x = build(name), example(name)
    for mode in ("wts", "acts"):
        result = fuse([model, model], mode=mode, data=data_for(name), example_input=x)
        assert max_state_diff(result.model, model) < 1e-6
        torch.testing.assert_close(result.model(x), model(x))


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
@pytest.mark.parametrize("marginals", ["uniform", "l1", "l2"])
def test_plans_have_the_requested_marginals(solver, marginals):
    anchor, model = build("mlp", seed=0), build("mlp", seed=1, width=32)
    result = fuse([anchor, model], solver=solver, marginals=marginals, example_input=example("mlp"))
    plan = result.plans[1]["fc1"]
    assert plan.shape == (32, 24)
    norms = {
        "uniform": (np.ones(32), np.ones(24)),
        "l1": (
            model.fc1.weight.detach().norm(p=1, dim=1),
            anchor.fc1.weight.detach().norm(p=1, dim=1),
        ),
        "l2": (model.fc1.weight.detach().norm(dim=1), anchor.fc1.weight.detach().norm(dim=1)),
    }[marginals]
    mu, nu = (np.asarray(torch.as_tensor(v, dtype=torch.float64)) for v in norms)
    tol = 1e-6 if solver == "exact" else 1e-3
    np.testing.assert_allclose(plan.matrix.sum(1), mu / mu.sum(), atol=tol)
    np.testing.assert_allclose(plan.matrix.sum(0), nu / nu.sum(), atol=tol)
    np.testing.assert_allclose(plan.corrected.sum(0), 1.0, atol=1e-9)
    for plans in result.plans[1].values():
        assert abs(plans.matrix.sum() - 1.0) < 1e-6


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["wts", "acts"])
def test_different_widths_give_an_anchor_shaped_model(name, mode):
    kwargs = {"resmlp": {"width": 24, "hidden": 48}}.get(name, {"width": 12})
    anchor, wide, x = build(name, seed=0), build(name, seed=1, **kwargs), example(name)
    result = fuse([anchor, wide], mode=mode, data=data_for(name), example_input=x)
    for key, value in result.model.state_dict().items():
        assert value.shape == anchor.state_dict()[key].shape, key
    assert torch.isfinite(result.model(x)).all()
    assert any(p.shape[0] != p.shape[1] for p in result.plans[1].values())


@pytest.mark.parametrize("name", ["mlp", "resnet", "depthwise"])
def test_four_models_with_weights(name):
    model, x = build(name), example(name)
    copies = [permuted(model, x, seed=s)[0] for s in range(3)]
    result = fuse([model, *copies], weights=[1, 2, 3, 4], anchor=2, example_input=x)
    assert max_state_diff(result.model, copies[1]) < 1e-5  # the anchor's unit order
    torch.testing.assert_close(result.model(x), model(x), atol=1e-5, rtol=1e-5)
    assert result.weights == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert len(result.plans) == 4 and result.plans[2] == {}
    others = [build(name, seed=s) for s in range(4)]
    mixed = fuse(others, example_input=x)
    assert torch.isfinite(mixed.model(x)).all()


def test_fused_state_dict_loads_without_otfuse():
    anchor, model, x = build("resnet", seed=0), build("resnet", seed=1), example("resnet")
    fused = fuse([anchor, model], example_input=x).model
    assert type(fused) is type(anchor)
    fresh = type(anchor)()
    fresh.load_state_dict(fused.state_dict())
    torch.testing.assert_close(fresh.eval()(x), fused(x))


def test_one_shot_fusion_is_closer_to_parents_than_vanilla_averaging():
    """Two permuted copies: vanilla averaging destroys the function, OT fusion keeps it."""
    model, x = build("mlp"), example("mlp", n=32)
    other, _ = permuted(model, x, seed=5)
    ot_out = fuse([model, other], example_input=x).model(x)
    vanilla_out = otfuse.vanilla_average([model, other])(x)
    assert (ot_out - model(x)).abs().max() < 1e-5
    assert (vanilla_out - model(x)).abs().max() > 1e-2


def test_baselines():
    model, x = build("vgg"), example("vgg")
    assert max_state_diff(otfuse.vanilla_average([model, model]), model) == 0
    ens = otfuse.ensemble([model, build("vgg", seed=1)], weights=[1, 0])
    torch.testing.assert_close(ens(x), torch.log_softmax(model(x), -1), atol=1e-5, rtol=1e-5)
    with pytest.raises(OtfuseError, match="identical shapes"):
        otfuse.vanilla_average([model, build("vgg", width=4)])


def test_sinkhorn_plans_are_soft_and_fusion_runs():
    anchor, model, x = build("vgg", seed=0), build("vgg", seed=1), example("vgg")
    result = fuse([anchor, model], solver="sinkhorn", reg=0.05, example_input=x)
    plan = next(iter(result.plans[1].values()))
    assert plan.permutation is None and (plan.matrix > 1e-6).sum() > plan.shape[0]
    assert torch.isfinite(result.model(x)).all()


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda m, x: fuse([], example_input=x), OtfuseError, "at least two models"),
        (lambda m, x: fuse([m], example_input=x), OtfuseError, "at least two models"),
        (lambda m, x: fuse(m, example_input=x), OtfuseError, "list of nn.Module"),
        (lambda m, x: fuse([m, "model"], example_input=x), OtfuseError, "not an nn.Module"),
        (lambda m, x: fuse([m, m], mode="acts", example_input=x), DataError, "needs data"),
        (
            lambda m, x: fuse([m, m], mode="bogus", example_input=x),
            OtfuseError,
            "unknown mode",
        ),
        (
            lambda m, x: fuse([m, m], solver="bogus", example_input=x),
            OtfuseError,
            "unknown solver",
        ),
        (
            lambda m, x: fuse([m, m], cost="bogus", example_input=x),
            OtfuseError,
            "unknown cost",
        ),
        (
            lambda m, x: fuse([m, m], weights=[1], example_input=x),
            OtfuseError,
            "1 weights for 2",
        ),
        (
            lambda m, x: fuse([m, m], weights=[1, -1], example_input=x),
            OtfuseError,
            "non-negative",
        ),
        (
            lambda m, x: fuse([m, m], weights=[0, 0], example_input=x),
            OtfuseError,
            "positive",
        ),
        (lambda m, x: fuse([m, m], anchor=2, example_input=x), OtfuseError, "anchor"),
        (lambda m, x: fuse([m, m]), OtfuseError, "example_input"),
        (
            lambda m, x: fuse([m, build("vgg")], example_input=x),
            OtfuseError,
            "does not fit|different",
        ),
        (
            lambda m, x: fuse([m, m], solver="assignment", marginals="l2", example_input=x),
            OtfuseError,
            "assignment",
        ),
    ],
)
def test_bad_input_is_a_clear_one_line_error(call, error, pattern):
    model, x = build("mlp"), example("mlp")
    with pytest.raises(error, match=pattern) as err:
        call(model, x)
    assert "\n" not in str(err.value)


def test_architectures_that_differ_are_refused():
    class Deeper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(64, 24, bias=False), torch.nn.Linear(24, 12)
            self.extra, self.fc3 = torch.nn.Linear(12, 12), torch.nn.Linear(12, 5)

        def forward(self, x):
            x = torch.flatten(x, 1).relu()
            return self.fc3(self.extra(self.fc2(self.fc1(x).relu()).relu()).relu())

    with pytest.raises(ArchitectureMismatchError, match="different architectures"):
        fuse([build("mlp"), Deeper()], example_input=example("mlp"))


class Activated(torch.nn.Module):
    """Two models of this class with the same parameters compute differently by ``act``."""

    def __init__(self, act, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.act = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("mode", ["wts", "acts"])
def test_models_whose_functions_differ_are_refused(mode):
    """Same class, same parameters, a different activation function held as an attribute: the
    anchor's graph must not stand for the other model (its activations, its fused function)."""
    relu, tanh, x = Activated(torch.relu), Activated(torch.tanh, seed=1), torch.randn(16, 8)
    message = "'torch.relu' where another model runs 'torch.tanh'"
    with pytest.raises(ArchitectureMismatchError, match=message):
        fuse([relu, tanh], mode=mode, data=x, example_input=x)


def test_function_attributes_with_other_arguments_are_refused_and_equal_ones_share_a_trace():
    """A ``functools.partial`` made per instance (Gemma's GELUTanh) keys by its function and
    arguments: equal ones share one trace, a different slope is refused."""
    x = torch.randn(16, 8)
    slopes = [Activated(functools.partial(F.leaky_relu, negative_slope=s)) for s in (0.01, 0.5)]
    with pytest.raises(ArchitectureMismatchError, match="0.01.* where another model runs .*0.5"):
        fuse(slopes, mode="acts", data=x, example_input=x)
    gelus = [Activated(functools.partial(F.gelu, approximate="tanh"), seed=s) for s in (0, 1)]
    assert fuse(gelus, mode="acts", data=x, example_input=x).traces == 1


def test_models_with_the_same_function_attribute_fuse_with_one_trace():
    models = [Activated(torch.tanh, seed=s) for s in (0, 1)]
    x = torch.randn(32, 8)
    result = fuse(models, mode="acts", data=x, example_input=x)
    assert result.model.act is torch.tanh and result.traces == 1
    itself = fuse([models[1], models[1]], mode="acts", data=x, example_input=x).model
    torch.testing.assert_close(itself(x), models[1](x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad):
    model, other = build("mlp"), build("mlp", seed=1)
    with torch.no_grad():
        other.fc2.weight[0, 0] = bad
    with pytest.raises(OtfuseError, match="model 1 has NaN or Inf values in 'fc2.weight'"):
        fuse([model, other], example_input=example("mlp"))


def test_defaults_follow_the_recipes():
    model, x = build("resnet"), example("resnet")
    free = otfuse.fuse([model, model], example_input=x, synthesize=8)
    assert free.config.recipe == "data-free" and free.inputs == "synthesized"
    with_data = otfuse.fuse([model, build("resnet", seed=1)], data=data_for("resnet"))
    chosen = with_data.config
    assert chosen.recipe == "data" and chosen.stages == ("bn_reset", "repair", "refit")
    scores = with_data.selection
    assert len(scores) == 3 and scores[with_data.selected] == min(scores.values())
    assert chosen.candidates == ()  # the config that ran is the chosen candidate's
    picked = dict(part.split("=") for part in with_data.selected.split(", "))
    assert all(str(getattr(chosen, k)) == v for k, v in picked.items())
    explicit = otfuse.fuse([model, model], data=data_for("resnet"), mode="acts")
    assert explicit.selected is None and explicit.config.mode == "acts"
    overridden = otfuse.fuse([model, model], data=data_for("resnet"), stages=(), mode="wts")
    assert overridden.config.stages == () and overridden.config.mode == "wts"
    with pytest.raises(OtfuseError, match="unknown recipe"):
        otfuse.fuse([model, model], recipe="magic", example_input=x)


def _duplicated(model):
    """A model of twice the width that computes exactly what ``model`` computes: every hidden unit
    appears twice, with half the outgoing weight."""
    wide = type(model)(width=48)
    a, w = model.state_dict(), {}
    w["fc1.weight"] = a["fc1.weight"].repeat_interleave(2, 0)
    w["fc2.weight"] = a["fc2.weight"].repeat_interleave(2, 0).repeat_interleave(2, 1) / 2
    w["fc2.bias"] = a["fc2.bias"].repeat_interleave(2, 0)
    w["fc3.weight"] = a["fc3.weight"].repeat_interleave(2, 1) / 2
    w["fc3.bias"] = a["fc3.bias"]
    wide.load_state_dict(w)
    return wide.eval()


def test_outgoing_sum_merges_duplicated_units_exactly():
    model, x = build("mlp"), example("mlp")
    wide = _duplicated(model)
    torch.testing.assert_close(wide(x), model(x))
    merged = otfuse.align(wide, model, solver="exact", outgoing="sum", example_input=x)
    torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)
    averaged = otfuse.align(wide, model, solver="exact", example_input=x)  # the paper's rule
    assert (averaged(x) - model(x)).abs().max() > 1e-2


@pytest.mark.parametrize("anchor", [0, 1])
def test_repair_targets_across_widths_are_what_the_parents_compute(anchor):
    """Both parents compute one function; the paper's outgoing rule distorts the aligned wide (or
    narrow) model, but refit targets what the parents compute, so the fusion computes it too."""
    model = build("mlp")
    wide, x = _duplicated(model), example("mlp", n=200, seed=3)
    fused = otfuse.fuse(
        [model, wide],
        anchor=anchor,
        data=x,
        recipe="paper-acts",
        stages=("bn_reset", "repair", "refit"),
        solver="exact",
    ).model
    with torch.no_grad():
        error = (fused(x) - model(x)).abs().max() / model(x).abs().max()
    assert error < 0.02
