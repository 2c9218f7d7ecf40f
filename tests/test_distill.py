"""The ``distill`` stage: a few label-free Adam steps of the fused model towards the parents'
mixture on the sample (:mod:`otfuse.distill`)."""

import argparse

import pytest
import torch
import torch.fx
from helpers import max_state_diff
from models import build, example
from test_ensemble_targets import confident, outputs
from torch import nn
from transformer_models import TinyGPT

import otfuse
from otfuse import cli
from otfuse import distill as distill_module
from otfuse.capture import GraphCache
from otfuse.cli import options
from otfuse.cli.common import UsageError
from otfuse.config import ConfigError, FusionConfig
from otfuse.distill import _Goal, output_tensor, teacher_log_probs
from otfuse.refit import layer_targets

REFIT = ("bn_reset", "repair", "refit")
DISTILL = (*REFIT, "distill")


def kl(want: torch.Tensor, model: nn.Module, x: torch.Tensor) -> float:
    """Mean KL(q || model) per row, ``want`` being log q (N, C)."""
    got = torch.log_softmax(outputs(model, x), -1)
    return float((want.exp() * (want - got)).sum(-1).mean())


def test_the_teacher_distribution_of_each_rule():
    torch.manual_seed(0)
    z = [3 * torch.randn(20, 6) for _ in range(3)]
    w = (0.5, 0.3, 0.2)
    p = [zk.softmax(-1) for zk in z]
    average = teacher_log_probs(z, w, "average")
    torch.testing.assert_close(average, torch.log_softmax(sum(wk * zk for wk, zk in zip(w, z)), -1))
    ensemble = teacher_log_probs(z, w, "ensemble")
    torch.testing.assert_close(ensemble.exp(), sum(wk * pk for wk, pk in zip(w, p)))
    sure = [wk * torch.exp(4.0 * (pk * pk.log()).sum(-1, keepdim=True)) for wk, pk in zip(w, p)]
    mixture = sum(s * pk for s, pk in zip(sure, p)) / sum(sure)
    confident_ = teacher_log_probs(z, w, "confident")
    torch.testing.assert_close(confident_.exp(), mixture)
    # a parent with weight 0 takes no part
    torch.testing.assert_close(teacher_log_probs(z, (1.0, 0.0, 0.0), "confident").exp(), p[0])


@pytest.mark.parametrize("targets", ["ensemble", "confident"])
def test_the_teacher_distribution_is_refits_class_score_target(targets):
    """Distillation aims where refit's class scores aim (same rule, same weights)."""
    a, b, x = build("mlp", seed=0), build("mlp", seed=1), example("mlp", n=40)
    cache, w = GraphCache(x[:2]), (0.7, 0.3)
    graphs = [cache.graph(m) for m in (a, b)]
    gm = cache.graph(build("mlp", seed=2)).graph_module
    with torch.no_grad():
        refit_target = layer_targets(gm, graphs, w, x, targets=targets).values["fc3"]
    want = teacher_log_probs([outputs(a, x), outputs(b, x)], w, targets)
    torch.testing.assert_close(torch.log_softmax(refit_target, -1), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("targets", ["average", "confident"])
def test_distillation_brings_the_fused_model_closer_to_the_mixture(targets):
    parents, x, w = [confident("mlp", 0), confident("mlp", 1)], example("mlp", n=400), [0.7, 0.3]
    want = teacher_log_probs([outputs(m, x) for m in parents], w, targets)
    gaps = {}
    for stages in (REFIT, DISTILL):
        fused = otfuse.fuse(parents, data=x, weights=w, stages=stages, targets=targets,
                            num_samples=400, example_input=x[:2]).model  # fmt: skip
        gaps[stages[-1]] = kl(want, fused, x)
    assert gaps["distill"] < 0.7 * gaps["refit"], gaps


def test_fusing_a_model_with_itself_and_distilling_returns_it():
    model, x = build("mlp"), example("mlp", n=200, seed=21)
    result = otfuse.fuse([model, model], data=x, stages=DISTILL, targets="confident")
    assert max_state_diff(result.model, model) < 1e-3
    torch.testing.assert_close(outputs(result.model, x), outputs(model, x), atol=1e-3, rtol=1e-3)


def test_a_transformer_is_distilled_per_token_and_its_tied_weights_stay_tied():
    torch.manual_seed(0)
    parents = [TinyGPT(), TinyGPT()]
    x = torch.randint(0, 11, (128, 8))
    w = [0.5, 0.5]
    want = teacher_log_probs([outputs(m, x) for m in parents], w, "ensemble")
    gaps = {}
    for stages in (REFIT, DISTILL):
        fused = otfuse.fuse(parents, data=x, weights=w, stages=stages, targets="ensemble",
                            example_input=x[:2]).model  # fmt: skip
        got = torch.log_softmax(outputs(fused, x), -1)
        gaps[stages[-1]] = float((want.exp() * (want - got)).sum(-1).mean())
        assert fused.head.weight is fused.wte.weight  # still one tensor
    assert gaps["distill"] < 0.2 * gaps["refit"], gaps


def test_models_without_class_scores_are_distilled_to_the_average_output():
    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()

    parents, x = [net(0), net(1)], torch.randn(60, 3, 5, 5)
    average = 0.5 * (outputs(parents[0], x) + outputs(parents[1], x))
    errors = {}
    for stages in (("repair",), ("repair", "distill")):
        fused = otfuse.fuse(parents, data=x, stages=stages, distill_lr=1e-2).model
        errors[stages[-1]] = float((outputs(fused, x) - average).pow(2).mean())
    assert errors["distill"] < 0.7 * errors["repair"], errors


def test_the_distill_options_are_validated_and_flags():
    assert "distill" in FusionConfig(stages=DISTILL).stages
    for bad in ({"distill_lr": 0.0}, {"distill_steps": 0}, {"distill_batch": 0}):
        with pytest.raises(ConfigError):
            FusionConfig(**bad)
    parser = cli.build_parser()
    fuse = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    args = fuse.choices["fuse"].parse_args(
        ["--stages", "refit,distill", "--distill-steps", "5", "--distill-lr", "0.001"]
    )
    given = options.given_options(args)
    assert given == {"stages": ("refit", "distill"), "distill_steps": 5, "distill_lr": 0.001}
    with pytest.raises(UsageError):
        fuse.choices["fuse"].parse_args(["--stages", "refit,distil"])


def test_output_tensor_reads_model_outputs():
    t = torch.zeros(2, 3)
    assert output_tensor(t) is t
    assert output_tensor({"loss": None, "logits": t}) is t
    assert output_tensor((t, None)) is t
    with pytest.raises(TypeError):
        output_tensor({"a": 1})


def test_a_student_that_already_matches_is_left_as_it_is():
    """All the weight on one parent: refit gives it back, and distillation does not move it (Adam
    would turn a zero gradient's rounding noise into full steps)."""
    a, b, x = build("mlp", seed=0), build("mlp", seed=1), example("mlp", n=200)
    fused = {
        stages[-1]: otfuse.fuse(
            [a, b], data=x, weights=[1, 0], stages=stages, targets="confident", example_input=x[:2]
        ).model
        for stages in (REFIT, DISTILL)
    }
    assert max_state_diff(fused["distill"], fused["refit"]) == 0.0


def test_the_loss_is_the_kl_from_the_mixture_to_the_student():
    """KL(q || student), not the reverse: checked against the formula."""
    torch.manual_seed(0)
    out, q = torch.randn(6, 5), torch.randn(6, 5).softmax(-1)
    goal = _Goal([], [], "ensemble", scores=True)
    want = (q * (q.log() - torch.log_softmax(out, -1))).sum(-1).mean()
    torch.testing.assert_close(goal.loss(out, q.log()), want)
    assert _Goal([], [], "average", scores=True).loss(out, q).item() == pytest.approx(
        float((out - q).pow(2).mean())
    )  # average targets: squared error to the average output


@pytest.mark.parametrize("cached", [True, False])
def test_a_batchnorm_net_is_distilled_in_eval_mode(cached, monkeypatch):
    """BatchNorm keeps its statistics (eval mode) and the model gets closer to the mixture, with
    the teachers' outputs kept or recomputed per batch."""
    if not cached:
        monkeypatch.setattr(distill_module, "CACHED_TARGET_NUMBERS", 0)
    parents, x, w = [confident("vgg", 0), confident("vgg", 1)], example("vgg", n=256), [0.6, 0.4]
    want = teacher_log_probs([outputs(m, x) for m in parents], w, "confident")
    fused = {}
    for stages in (REFIT, DISTILL):
        fused[stages[-1]] = otfuse.fuse(parents, data=x, weights=w, stages=stages,
                                        targets="confident", num_samples=256,
                                        example_input=x[:2]).model  # fmt: skip
    buffers = {n: b for n, b in fused["refit"].named_buffers() if "running" in n}
    assert buffers
    for name, value in fused["distill"].named_buffers():
        if name in buffers:
            assert torch.equal(value, buffers[name]), name
    assert kl(want, fused["distill"], x) < 0.8 * kl(want, fused["refit"], x)


def test_half_precision_and_frozen_parents_are_distilled():
    """bfloat16 parameters are trained through float32 copies (a 3e-4 step on bfloat16 would round
    away) and frozen ones are trained too, their flags given back."""
    parents, x, w = [confident("mlp", 0), confident("mlp", 1)], example("mlp", n=400), [0.7, 0.3]
    for m in parents:
        m.to(torch.bfloat16).requires_grad_(False)
    xb = x.to(torch.bfloat16)
    want = teacher_log_probs([outputs(m, xb).float() for m in parents], w, "confident")
    fused = {}
    for stages in (REFIT, DISTILL):
        fused[stages[-1]] = otfuse.fuse(parents, data=xb, weights=w, stages=stages,
                                        targets="confident", num_samples=400,
                                        example_input=xb[:2]).model  # fmt: skip
    model = fused["distill"]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())
    gap = {k: kl(want, m, xb) for k, m in fused.items()}
    assert gap["distill"] < 0.8 * gap["refit"], gap


def test_confident_targets_without_class_scores_keep_the_weighted_features():
    """The equal-feature rule needs class scores to act on: without them confident targets are the
    weighted average everywhere."""

    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()

    x = torch.randn(30, 3, 5, 5)
    cache = GraphCache(x[:2])
    graphs = [cache.graph(net(s)) for s in (0, 1)]
    gm = cache.graph(net(2)).graph_module
    with torch.no_grad():
        got = layer_targets(gm, graphs, (0.8, 0.2), x, targets="confident").values
        want = layer_targets(gm, graphs, (0.8, 0.2), x, targets="average").values
    assert got.keys() == want.keys()
    for node in want:
        assert torch.equal(got[node], want[node])


def test_bfloat16_steps_smaller_than_its_rounding_still_add_up():
    """Adam at lr 1e-3 on a bfloat16 weight of 1.0 (spacing 2**-7 there): each step alone rounds
    away; the float32 copies add them up."""
    student = nn.Linear(4, 3, bias=False).to(torch.bfloat16)
    teacher = nn.Linear(4, 3, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        student.weight.fill_(1.0)
        teacher.weight.zero_()
    graphs = [torch.fx.symbolic_trace(m) for m in (student, teacher)]
    x = torch.randn(64, 4).to(torch.bfloat16)
    losses = distill_module.distill(graphs[0], list(student.parameters()), graphs[1:], [1.0], x,
                                    steps=20, lr=1e-3, batch_size=64)  # fmt: skip
    assert len(losses) == 20
    assert float(student.weight.detach().float().max()) < 0.99


def test_targets_that_cannot_apply_are_said(caplog):
    """Confident targets on a model whose output is not class scores: refit and distill say that
    they aim at the weighted average instead."""

    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()

    x = torch.randn(40, 3, 5, 5)
    with caplog.at_level("WARNING", logger="otfuse"):
        otfuse.fuse([net(0), net(1)], data=x, stages=("refit", "distill"), targets="confident",
                    distill_steps=2)  # fmt: skip
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("refit aims at the weighted average" in m for m in said), said
    assert any("distill fits the weighted average" in m for m in said), said
    caplog.clear()
    a, b, xs = build("mlp", seed=0), build("mlp", seed=1), example("mlp", n=40)
    with caplog.at_level("WARNING", logger="otfuse"):
        otfuse.fuse([a, b], data=xs, stages=("refit", "distill"), targets="confident",
                    distill_steps=2)  # fmt: skip
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
