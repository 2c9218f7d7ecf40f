"""Refit's ensemble-faithful targets (``targets="ensemble"``): at the class scores, the log of the
parents' weighted prediction ensemble instead of their average logits."""

import argparse

import pytest
import torch
from helpers import max_state_diff
from models import build, example
from torch import nn

import otfuse
from otfuse import cli
from otfuse.capture import GraphCache
from otfuse.cli import options
from otfuse.cli.common import UsageError
from otfuse.config import RECIPES, ConfigError, FusionConfig
from otfuse.discovery import discover_exported
from otfuse.refit import (
    CONFIDENCE_SHARPNESS,
    class_scores,
    ensemble_target,
    feature_weights,
    fit_points,
    layer_targets,
)
from otfuse.repair import correction_points, reset_batchnorm

REFIT = ("bn_reset", "repair", "refit")
HEADS = {"mlp": "fc3", "vgg": "classifier", "resnet": "fc", "cat": "fc", "resmlp": "head"}


def confident(name, seed):
    """A fixture classifier whose logits are 30 times larger: confident, and unlike another seed's."""
    model = build(name, seed=seed)
    with torch.no_grad():
        getattr(model, HEADS[name]).weight.mul_(30.0)
    return model


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def kl_to_ensemble(model, parents, weights, x):
    """Mean KL(ensemble || model) on ``x``."""
    target = torch.log_softmax(outputs(otfuse.ensemble(parents, weights), x), -1)
    fused = torch.log_softmax(outputs(model, x), -1)
    return float((target.exp() * (target - fused)).sum(-1).mean())


def test_the_target_is_the_log_of_the_weighted_ensemble_at_the_average_logits_mean():
    torch.manual_seed(0)
    z1, z2, w = 5 * torch.randn(50, 7), 5 * torch.randn(50, 7), (0.3, 0.7)
    ensemble = w[0] * z1.softmax(-1) + w[1] * z2.softmax(-1)
    average = w[0] * z1 + w[1] * z2
    target = ensemble_target(ensemble.double().log(), average)
    torch.testing.assert_close(target.softmax(-1), ensemble)  # exactly the ensemble's probabilities
    torch.testing.assert_close(target.mean(-1), average.mean(-1))  # where the average is
    assert target.dtype == average.dtype
    same = ensemble_target(torch.log_softmax(z1.double(), -1), z1)  # one parent: its own logits
    torch.testing.assert_close(same, z1)


@pytest.mark.parametrize("name", ["mlp", "vgg"])
def test_the_class_scores_target_is_the_ensemble_and_the_others_the_average(name):
    a, b, x = build(name, seed=0), build(name, seed=1), example(name, n=40)
    cache, w = GraphCache(x[:2]), (0.25, 0.75)
    graphs = [cache.graph(m) for m in (a, b)]
    gm = cache.graph(build(name, seed=2)).graph_module
    with torch.no_grad():
        average = layer_targets(gm, graphs, w, x)
        ensemble = layer_targets(gm, graphs, w, x, targets="ensemble")
    head = class_scores(gm, fit_points(gm)).node
    assert head == HEADS[name]
    want = w[0] * outputs(a, x).softmax(-1) + w[1] * outputs(b, x).softmax(-1)
    torch.testing.assert_close(ensemble.values[head].softmax(-1), want)
    torch.testing.assert_close(average.values[head], w[0] * outputs(a, x) + w[1] * outputs(b, x))
    for node, value in average.values.items():
        if node != head:
            assert torch.equal(ensemble.values[node], value)
            assert torch.equal(ensemble.rows[node], average.rows[node])


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet"])
def test_refit_to_the_ensemble_follows_the_ensemble_by_a_clear_margin(name):
    parents, x, w = [confident(name, 0), confident(name, 1)], example(name, n=200), [0.7, 0.3]
    kl = {}
    for targets in ("average", "ensemble"):
        fused = otfuse.fuse(
            parents, data=x, weights=w, stages=REFIT, targets=targets, example_input=x[:2]
        ).model
        kl[targets] = kl_to_ensemble(fused, parents, w, x)
    assert kl["ensemble"] < 0.5 * kl["average"], kl


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet", "resmlp"])
def test_fusing_a_model_with_itself_changes_nothing_with_ensemble_targets(name):
    model, x = build(name), example(name, n=160, seed=21)
    reset_batchnorm(model, x, batch_size=len(x))
    result = otfuse.fuse(
        [model, model], data=x, stages=REFIT, targets="ensemble", example_input=x[:2]
    )
    assert max_state_diff(result.model, model) < 1e-3


def test_all_the_weight_on_one_parent_gives_it_back():
    a, b, x = confident("mlp", 0), confident("mlp", 1), example("mlp", n=200)
    fused = otfuse.fuse([a, b], data=x, weights=[1, 0], stages=REFIT, targets="ensemble").model
    torch.testing.assert_close(outputs(fused, x), outputs(a, x), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet"])
def test_repair_leaves_the_class_scores_alone(name):
    """REPAIR never rescales the output units, so only refit's target at them changes."""
    graph = GraphCache(example(name)).graph(build(name))
    assert HEADS[name] not in {p.node for p in correction_points(graph)}


def test_models_without_class_scores_are_refitted_to_the_average():
    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()

    x = torch.randn(30, 3, 5, 5)
    assert class_scores(GraphCache(x[:2]).graph(net(0)).graph_module, []) is None
    fused = {
        t: otfuse.fuse([net(0), net(1)], data=x, stages=REFIT, targets=t).model
        for t in ("average", "ensemble")
    }
    assert max_state_diff(fused["average"], fused["ensemble"]) == 0.0


def test_the_confident_target_weighs_each_parent_per_input_by_its_entropy():
    """pi_k(x) ~ w_k exp(-beta H(p_k(x))): checked against the formula on random parents, and on
    inputs where one parent is sure and the other unsure the sure one wins at any weight."""
    a, b, x = build("mlp", seed=0), build("mlp", seed=1), example("mlp", n=40)
    cache, w = GraphCache(x[:2]), (0.8, 0.2)
    graphs = [cache.graph(m) for m in (a, b)]
    gm = cache.graph(build("mlp", seed=2)).graph_module
    with torch.no_grad():
        got = layer_targets(gm, graphs, w, x, targets="confident").values["fc3"].softmax(-1)
    probs = [outputs(m, x).double().softmax(-1) for m in (a, b)]
    entropy = [-(p * p.log()).sum(-1, keepdim=True) for p in probs]
    pi = torch.stack([wk * (-CONFIDENCE_SHARPNESS * h).exp() for wk, h in zip(w, entropy)])
    pi = pi / pi.sum(0)
    torch.testing.assert_close(got, (pi[0] * probs[0] + pi[1] * probs[1]).float())
    ensemble = layer_targets(gm, graphs, w, x, targets="ensemble").values["fc3"].softmax(-1)
    assert (got - ensemble).abs().max() > 1e-3  # not the plain ensemble

    sure, unsure = confident("mlp", 0), build("mlp", seed=1)
    with torch.no_grad():
        unsure.fc3.weight.mul_(1e-3)  # near-uniform probabilities on every input
    graphs = [cache.graph(m) for m in (sure, unsure)]
    for w in ((0.5, 0.5), (0.2, 0.8)):
        with torch.no_grad():
            target = {t: layer_targets(gm, graphs, w, x, targets=t).values["fc3"]
                      for t in ("confident", "ensemble")}  # fmt: skip
        gap = {t: (v.softmax(-1) - outputs(sure, x).softmax(-1)).abs().max() for t, v in
               target.items()}  # fmt: skip
        assert torch.equal(target["confident"].argmax(-1), outputs(sure, x).argmax(-1))
        assert gap["confident"] < 0.3 * gap["ensemble"], gap


def test_refit_to_the_confident_target_keeps_a_parent_that_is_sure():
    """A sure parent at weight 0.2 beside a near-uniform one: the fused model's probabilities stay
    close to the sure parent's with confident targets, not with the ensemble's (KL halves)."""
    sure, unsure, x = confident("mlp", 0), build("mlp", seed=1), example("mlp", n=200)
    with torch.no_grad():
        unsure.fc3.weight.mul_(1e-3)
    kl = {}
    for targets in ("ensemble", "confident"):
        fused = otfuse.fuse([sure, unsure], data=x, weights=[0.2, 0.8], stages=REFIT,
                            targets=targets, example_input=x[:2]).model  # fmt: skip
        want, got = (torch.log_softmax(outputs(m, x), -1) for m in (sure, fused))
        kl[targets] = float((want.exp() * (want - got)).sum(-1).mean())  # KL(sure || fused)
    assert kl["confident"] < 0.5 * kl["ensemble"], kl


def test_the_confident_rule_keeps_every_parents_features_before_the_class_scores():
    """With targets="confident" the weights decide whose predictions to trust: the class scores'
    target is the confident mixture at those weights, and every layer before them targets the
    equal average of the parents with a positive weight (a zero weight still drops a parent)."""
    models, x = [build("mlp", seed=s) for s in range(3)], example("mlp", n=40)
    cache = GraphCache(x[:2])
    graphs = [cache.graph(m) for m in models]
    gm = cache.graph(build("mlp", seed=3)).graph_module
    head = class_scores(gm, fit_points(gm)).node

    def values(weights, targets):
        with torch.no_grad():
            return layer_targets(gm, graphs, weights, x, targets=targets).values

    got = values((0.7, 0.2, 0.1), "confident")
    equal = values((1 / 3, 1 / 3, 1 / 3), "average")
    weighted = values((0.7, 0.2, 0.1), "average")
    for node in equal:
        if node != head:
            torch.testing.assert_close(got[node], equal[node])
            assert (got[node] - weighted[node]).abs().max() > 1e-3
    probs = [outputs(m, x).double().softmax(-1) for m in models]
    entropy = [-(p * p.log()).sum(-1, keepdim=True) for p in probs]
    pi = torch.stack([w * (-CONFIDENCE_SHARPNESS * h).exp()
                      for w, h in zip((0.7, 0.2, 0.1), entropy)])  # fmt: skip
    mixture = (pi / pi.sum(0) * torch.stack(probs)).sum(0)
    torch.testing.assert_close(got[head].softmax(-1), mixture.float())

    dropped = values((0.5, 0.5, 0.0), "confident")
    halves = values((0.5, 0.5, 0.0), "average")
    for node in halves:
        if node != head:
            torch.testing.assert_close(dropped[node], halves[node])
    assert feature_weights([0.9, 0.1, 0.0], "confident") == [0.5, 0.5, 0.0]
    assert feature_weights([0.9, 0.1], "ensemble") == [0.9, 0.1]


def test_the_targets_option_is_validated_and_a_flag():
    assert FusionConfig().targets == "average"
    assert FusionConfig(targets="ensemble").replace(num_samples=3).targets == "ensemble"
    assert RECIPES["data"].targets == RECIPES["data-free"].targets
    with pytest.raises(ConfigError, match="unknown targets 'logits'; choose one of average, ens"):
        FusionConfig(targets="logits")
    parser = cli.build_parser()
    fuse = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    args = fuse.choices["fuse"].parse_args(["--targets", "ensemble"])
    assert options.given_options(args) == {"targets": "ensemble"}
    assert fuse.choices["fuse"].parse_args(["--targets", "confident"]).targets == "confident"
    with pytest.raises(UsageError, match="--targets: 'logits' is not one of average, ensemble"):
        fuse.choices["fuse"].parse_args(["--targets", "logits"])


class TokenClassifier(nn.Module):
    """Token ids (N, T) to per-position class scores (N, T, C), as a language model's head."""

    def __init__(self, seed: int, vocab: int = 11, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)
        with torch.no_grad():
            self.head.weight.mul_(30.0)  # confident, and unlike another seed's

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.embed(ids))))


def test_per_position_class_scores_follow_the_ensemble_too():
    parents, ids, w = (
        [TokenClassifier(0), TokenClassifier(1)],
        torch.randint(0, 11, (60, 8)),
        [0.7, 0.3],
    )
    gm = GraphCache(ids[:2]).graph(parents[0]).graph_module
    assert class_scores(gm, fit_points(gm)).node == "head"
    kl = {}
    for targets in ("average", "ensemble"):
        fused = otfuse.fuse(parents, data=ids, weights=w, stages=REFIT, targets=targets).model
        kl[targets] = kl_to_ensemble(fused, parents, w, ids)
    assert kl["ensemble"] < 0.5 * kl["average"], kl


@pytest.mark.parametrize("name", ["mlp", "vgg"])
def test_the_class_scores_of_an_exported_graph_are_found(name):
    """torch.export's graph returns its output in a one-element tuple; before, the ensemble target
    was silently skipped for every model captured that way (models fx cannot trace)."""
    graph = discover_exported(build(name), example(name, n=2))
    assert graph.capture == "export"
    point = class_scores(graph.graph_module, fit_points(graph.graph_module))
    assert point is not None and point.features > 1
