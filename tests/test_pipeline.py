"""The pipeline: one trace per architecture, named stages over one context, honest timings."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from helpers import max_state_diff, permuted
from models import build, example

import otfuse
import otfuse.refit
import otfuse.repair
import otfuse.stages
from otfuse.capture import GraphCache, architecture_key, run_with_hooks
from otfuse.stages import STAGES


@pytest.fixture
def count_traces(monkeypatch):
    calls = []
    original = torch.fx.Tracer.trace

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.fx.Tracer, "trace", counting)
    return calls


def test_the_data_recipe_traces_each_architecture_once(count_traces):
    x = example("vgg", n=32)
    models = [build("vgg", seed=s) for s in range(3)]
    result = otfuse.fuse(models, data=x)
    assert len(count_traces) == 1 and result.traces == 1
    assert len(result.selection) == 3  # three candidates, every stage, still one trace


def test_candidates_are_compared_before_refit_which_runs_once_on_the_chosen_one():
    x = example("vgg", n=32)
    models = [build("vgg", seed=s) for s in range(2)]
    stages = []
    result = otfuse.fuse(models, data=x, progress=lambda s, t: stages.append(s))
    runs = [s.rsplit(": ", 1)[-1] for s in stages]  # "candidate 1/3 (...): repair" -> "repair"
    assert runs.count("repair") == 3 and runs.count("refit") == 1
    assert stages[-1].startswith("chosen (") and stages[-1].endswith(": refit")
    chosen = dict(kv.split("=") for kv in result.selected.split(", "))
    alone = otfuse.fuse(models, data=x, **chosen).model  # the chosen candidate, fused on its own
    assert max_state_diff(result.model, alone) < 1e-6


def test_models_of_two_widths_are_two_architectures(count_traces):
    x = example("mlp", n=32)
    result = otfuse.fuse([build("mlp"), build("mlp", seed=1, width=32)], data=x)
    assert result.traces == 2 and len(count_traces) == 2


def test_a_rebound_graph_runs_the_other_models_parameters():
    x = example("resnet")
    a, b = build("resnet"), build("resnet", seed=1)
    cache = GraphCache(x)
    ga, gb = cache.graph(a), cache.graph(b)
    assert cache.traces == 1 and architecture_key(a) == architecture_key(b)
    assert cache.graph(a) is ga  # a model's graph is made once
    torch.testing.assert_close(gb.graph_module(x), b(x))
    torch.testing.assert_close(ga.graph_module(x), a(x))
    assert [s.name for s in gb.spaces] == [s.name for s in ga.spaces]


def test_list_attributes_of_modules_key_the_architecture():
    """A module with a list attribute (Gemma3's ``layer_types``) is keyed, and a list that differs
    makes another architecture (it could change the forward)."""
    a, b, c = build("mlp"), build("mlp", seed=1), build("mlp", seed=2)
    a.kinds, b.kinds, c.kinds = ["full", "sliding"], ["full", "sliding"], ["sliding", "full"]
    assert hash(architecture_key(a)) == hash(architecture_key(b))
    assert architecture_key(a) != architecture_key(c)
    result = otfuse.fuse([a, b], "paper-wts", example_input=example("mlp"))
    assert result.traces == 1


def test_hooks_see_and_replace_node_values():
    x = example("mlp")
    model = build("mlp")
    gm = GraphCache(x).graph(model).graph_module
    seen = {}
    name = next(n.name for n in gm.graph.nodes if n.op == "call_module" and n.target == "fc3")
    out = run_with_hooks(
        gm,
        x,
        before={name: lambda n, args: seen.setdefault("input", args[0])},
        after={name: lambda n, value: torch.zeros_like(value)},
    )
    assert seen["input"].shape == (4, 12) and torch.equal(out, torch.zeros(4, 5))


def test_timings_name_every_stage_and_add_up_to_the_wall_time():
    x = example("vgg", n=32)
    models = [build("vgg"), build("vgg", seed=1)]
    result = otfuse.fuse(models, data=x)
    assert {"prepare", "align", "average", "bn_reset", "repair", "refit", "select"} <= set(
        result.timings
    )
    assert sum(result.timings.values()) == pytest.approx(result.seconds, rel=1e-6)


def test_progress_reports_each_stage_to_a_callback_and_stderr(capsys):
    x = example("vgg", n=16)
    models = [build("vgg"), build("vgg", seed=1)]
    stages = []
    otfuse.fuse(
        models, "paper-acts", data=x, stages=("bn_reset",), progress=lambda s, t: stages.append(s)
    )
    assert stages == ["prepare", "align", "average", "bn_reset"]
    otfuse.fuse(models, "paper-wts", example_input=x[:2], progress=True)
    err = capsys.readouterr().err
    assert "otfuse: align" in err and "otfuse: average" in err and "\r" not in err
    otfuse.fuse(models, "paper-wts", example_input=x[:2])
    assert capsys.readouterr().err == ""


def test_stages_run_in_the_order_the_config_lists_and_each_changes_the_model():
    x = example("vgg", n=32)
    anchor, other = build("vgg"), build("vgg", seed=1)
    plain = otfuse.fuse([anchor, other], "paper-acts", data=x).model
    reset = otfuse.fuse([anchor, other], "paper-acts", data=x, stages=("bn_reset",)).model
    assert max_state_diff(plain, reset) > 1e-3
    assert not torch.allclose(plain.features[1].running_var, reset.features[1].running_var)
    assert all(STAGES[name].needs_data for name in ("bn_reset", "repair", "refit"))
    assert "seed" in STAGES["refit"].reads


def test_the_seed_reaches_the_refit_rows(monkeypatch):
    x = example("vgg", n=16)
    models = [build("vgg"), build("vgg", seed=1)]
    seen = []
    original = otfuse.stages.refit_layers

    def spy(*args, **kwargs):
        seen.append(kwargs["seed"])
        return original(*args, **kwargs)

    monkeypatch.setattr(otfuse.stages, "refit_layers", spy)
    # fewer rows than the layers have (drawn where the parents run: before the alignment)
    monkeypatch.setattr(otfuse.refit, "row_budget", lambda features, max_rows: 50)
    options = dict(data=x, stages=("refit",), num_samples=16)
    a = otfuse.fuse(models, "paper-wts", seed=4, **options).model
    b = otfuse.fuse(models, "paper-wts", seed=4, **options).model
    c = otfuse.fuse(models, "paper-wts", seed=5, **options).model
    assert seen == [4, 4, 5]
    assert max_state_diff(a, b) == 0.0 and max_state_diff(a, c) > 1e-4


def test_fusing_a_permuted_copy_with_the_data_recipe_returns_the_model():
    x = example("resnet", n=32)
    model = build("resnet")
    copy, _ = permuted(model, x[:2], seed=3)
    fused = otfuse.fuse([model, copy], data=x, stages=()).model
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


class ChangesItsInput(torch.nn.Module):
    """Doubles its input in place, then Linear -> ReLU -> Linear with BatchNorm. ``needs_export``:
    an ``if`` on the input's shape, which ``torch.fx`` cannot trace (torch.export captures it)."""

    def __init__(self, needs_export: bool = False) -> None:
        super().__init__()
        self.needs_export = needs_export
        self.fc1, self.norm, self.fc2 = (
            torch.nn.Linear(8, 16),
            torch.nn.BatchNorm1d(16),
            torch.nn.Linear(16, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)
        if self.needs_export and x.shape[0] > 0:
            x = x + 1.0
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


@pytest.mark.parametrize("needs_export", [False, True], ids=["fx", "export"])
def test_a_model_that_changes_its_input_in_place_leaves_the_sample_as_it_was(needs_export):
    """Every run over the sample (tracing, activations, REPAIR, refit, candidate selection) works
    on copies: the caller's data and example input are unchanged, and a model fused with itself
    is returned. Before, each run doubled the sample for the next (self-fusion 0.79 off) and the
    data-free recipe failed on its synthesised batch (in-place change of a leaf)."""
    torch.manual_seed(0)
    data = torch.randn(60, 8)
    model = otfuse.repair.reset_batchnorm(ChangesItsInput(needs_export), data)  # "trained" on it
    kept = data.clone()
    result = otfuse.fuse([model, model], data=data)
    assert torch.equal(data, kept)
    assert result.inputs == "data"
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert (result.model(x.clone()) - model(x.clone())).abs().max() < 1e-5
    example_input = torch.randn(2, 8)
    kept = example_input.clone()
    other = ChangesItsInput(needs_export).eval()
    assert otfuse.fuse([model, other], example_input=example_input).inputs == "synthesized"
    assert torch.equal(example_input, kept)


class ShiftsItsIds(torch.nn.Module):
    """Adds 1 to its token ids in place, then Embedding -> Linear -> ReLU -> Linear, mean over
    positions."""

    def __init__(self, vocabulary: int = 21) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocabulary + 1, 8)
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids.add_(1)
        return self.fc2(torch.relu(self.fc1(self.embed(ids)))).mean(1)


def test_token_ids_changed_in_place_are_checked_and_fused_as_given():
    """The check of ids against the vocabulary runs the model too: it used to shift the user's ids
    once more before tracing (a different fusion, or an index error blamed on the data)."""
    torch.manual_seed(0)
    model = ShiftsItsIds().eval()
    ids = torch.randint(0, 21, (30, 6))
    kept = ids.clone()
    result = otfuse.fuse([model, model], data=ids)
    assert torch.equal(ids, kept)
    fresh = torch.randint(0, 21, (4, 6))
    with torch.no_grad():
        assert (result.model(fresh.clone()) - model(fresh.clone())).abs().max() < 1e-5


class ScalesItsSecondInput(torch.nn.Module):
    """Takes a list of two tensors and triples the second in place."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 3)

    def forward(self, pair: list[torch.Tensor]) -> torch.Tensor:
        x, y = pair
        y.mul_(3.0)
        return self.fc2(torch.relu(self.fc1(x + y)))


def test_tensors_inside_a_list_input_are_left_as_they_were():
    torch.manual_seed(0)
    a, b = torch.randn(2, 8), torch.randn(2, 8)
    kept = b.clone()
    models = [ScalesItsSecondInput(), ScalesItsSecondInput()]
    otfuse.fuse(models, "paper-wts", example_input=([a, b],))
    assert torch.equal(b, kept)


class OptionalMask(torch.nn.Module):
    """``forward(x, mask=None, scale=1.0)``: torch.fx traces ``mask`` as an input, so the branch
    ``if mask is not None`` is taken in the graph, which then fails on ``x * None``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 3)

    def forward(self, x, mask=None, scale: float = 1.0):
        if mask is not None:
            x = x * mask
        return self.fc2(torch.relu(self.fc1(x))) * scale


def test_arguments_left_to_their_defaults_are_traced_as_those_constants():
    torch.manual_seed(0)
    model = OptionalMask().eval()
    assert otfuse.discovery.discover(model, torch.randn(2, 8)).capture == "fx"
    twin, _ = permuted(model, torch.randn(2, 8), seed=1)
    result = otfuse.fuse([model, twin], "paper-wts", example_input=torch.randn(2, 8))
    assert max_state_diff(result.model, model) < 1e-5  # the planted permutation is undone
