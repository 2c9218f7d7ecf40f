"""Alignment's speed paths compute what the plain paths compute: solves in flight together, tied
weights transported and averaged once, the fused model built without copying the anchor first."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import build, example
from torch import nn
from transformer_models import TinyGPT, randomize_norms

import otfuse
import otfuse.alignment
from otfuse.baselines import average_states, build_model
from otfuse.capture import GraphCache
from otfuse.config import FusionConfig


def _align(models, x, **options):
    cache = GraphCache(x)
    graphs = [cache.graph(m) for m in models]
    states = [m.state_dict() for m in models]
    config = FusionConfig().replace(**options)
    return otfuse.alignment.align_state(states[1], graphs[1], states[0], graphs[0], config)


@pytest.mark.parametrize("name", ["vgg", "resnet", "gpt"])
@pytest.mark.parametrize("solver", ["auto", "exact"])
def test_solves_in_flight_give_the_plans_of_one_space_at_a_time(name, solver, monkeypatch):
    if name == "gpt":
        models = [randomize_norms(TinyGPT(width=32, heads=4)) for _ in range(2)]
        x = torch.randint(0, 11, (2, 8))
    else:
        models, x = [build(name, seed=s) for s in range(2)], example(name)
    monkeypatch.setattr(otfuse.alignment, "_ASIDE", 10**12)  # every plan solved in place
    state_inline, plans_inline = _align(models, x, solver=solver)
    monkeypatch.setattr(otfuse.alignment, "_ASIDE", 0)  # every plan solved on the pool
    state_aside, plans_aside = _align(models, x, solver=solver)
    assert list(plans_aside) == list(plans_inline)  # in visiting order
    for space, plan in plans_inline.items():
        np.testing.assert_array_equal(plans_aside[space].matrix, plan.matrix)
    assert all(torch.equal(state_aside[k], v) for k, v in state_inline.items())


def test_tied_weights_are_transported_once_and_stay_tied():
    torch.manual_seed(0)
    models = [randomize_norms(TinyGPT()) for _ in range(2)]
    state, _ = _align(models, torch.randint(0, 11, (2, 8)))
    assert state["head.weight"] is state["wte.weight"]
    fused = otfuse.fuse(models, "paper-wts", example_input=torch.randint(0, 11, (2, 8))).model
    assert fused.head.weight is fused.wte.weight


class SharedLayer(nn.Module):
    """Two Linear layers holding one weight Parameter (``l2.weight = l1.weight``): the rows and
    columns of that weight, so the units before, between and after them, are one space."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.l1, self.l2, self.out = (
            nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        )  # fmt: skip
        self.l2.weight = self.l1.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l1(torch.relu(self.inp(x))))
        return self.out(torch.relu(self.l2(h)))


def test_a_parameter_shared_by_two_layers_ties_their_spaces_and_stays_shared():
    from helpers import permuted

    torch.manual_seed(0)
    a, b = SharedLayer().eval(), SharedLayer().eval()
    x = torch.randn(64, 5)
    graph = otfuse.spaces(a, x[:2])
    assert len(graph.transportable()) == 1  # inp, l1 and l2 write the same units
    aligned = otfuse.align(b, a, example_input=x[:2])
    assert aligned.l2.weight is aligned.l1.weight
    torch.testing.assert_close(aligned(x), b(x), atol=1e-5, rtol=1e-5)  # was off by 0.1
    planted, _ = permuted(a, x[:2], seed=3)
    assert not torch.equal(planted.inp.weight, a.inp.weight)
    fused = otfuse.fuse([a, planted], "paper-wts", example_input=x[:2]).model
    torch.testing.assert_close(fused(x), a(x), atol=1e-5, rtol=1e-5)
    # the data recipe leaves the shared layers to the others (one REPAIR or refit would change
    # both uses); it failed with a KeyError before
    fused = otfuse.fuse([a, b], data=x).model
    assert fused.l2.weight is fused.l1.weight
    assert torch.isfinite(fused(x)).all()
    itself = otfuse.fuse([a, planted], data=x).model
    torch.testing.assert_close(itself(x), a(x), atol=1e-4, rtol=1e-4)


class StreamLayer(nn.Module):
    """``h + relu(l2(h))``: both axes of ``l2.weight`` lie in the stream's one space, so the weight is
    transported twice in that space (and ``l1.weight``, of the same shape, just before it)."""

    def __init__(self) -> None:
        super().__init__()
        self.l0, self.l1, self.l2, self.o = (
            nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l1(torch.relu(self.l0(x))))
        return self.o(h + torch.relu(self.l2(h)))


def test_a_weight_with_both_axes_in_one_space_is_transported_right_every_time():
    # the transported tensors were known by their address, and a freed intermediate's address
    # could be reused by the next result: then l2.weight took l1's values, in about half the calls
    from helpers import permuted

    torch.manual_seed(0)
    a, b = StreamLayer().eval(), StreamLayer().eval()
    x = torch.randn(16, 6)
    planted, _ = permuted(a, x[:2], seed=4)
    for _ in range(10):
        torch.testing.assert_close(otfuse.align(b, a, example_input=x[:2])(x), b(x))
        fused = otfuse.fuse([a, planted], "paper-wts", example_input=x[:2]).model
        torch.testing.assert_close(fused(x), a(x))


def test_average_states_is_the_weighted_sum_and_shares_tied_entries():
    torch.manual_seed(0)
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    states = [{"w": a, "tied": a, "n": torch.tensor(3)}, {"w": b, "tied": b, "n": torch.tensor(4)}]
    out = average_states(states, [0.25, 0.75], states[0])
    assert torch.equal(out["w"], sum(w * s["w"] for w, s in zip([0.25, 0.75], states)))
    assert out["tied"] is out["w"] and out["n"].item() == 3


def test_build_model_copies_or_adopts_the_state_and_keeps_the_template():
    template = build("vgg")
    state = {k: v + 1 if v.is_floating_point() else v for k, v in template.state_dict().items()}
    copied, adopted = build_model(template, state), build_model(template, state, adopt=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    for model in (copied, adopted):
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert copied.state_dict()[key].data_ptr() != state[key].data_ptr()
    assert adopted.state_dict()[key].data_ptr() == state[key].data_ptr()
    assert not torch.equal(template.state_dict()[key], state[key])  # the template is untouched
    with pytest.raises(otfuse.OtfuseError, match="does not fit"):
        build_model(template, {**state, key: state[key][:1]})


def test_build_model_loads_modules_whose_state_is_not_their_parameters():
    class Scaled(nn.Linear):  # saves a derived tensor under its weight's name
        def _save_to_state_dict(self, destination, prefix, keep_vars):
            super()._save_to_state_dict(destination, prefix, keep_vars)
            destination[prefix + "weight"] = self.weight.detach() * 1

    template = Scaled(3, 2)
    state = {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}
    model = build_model(template, state)
    assert torch.equal(model.weight, torch.ones(2, 3))


@pytest.mark.parametrize(("name", "recipe"), [("vgg", "paper-wts"), ("resnet", "paper-acts")])
def test_models_aligned_several_at_a_time_give_the_sequential_fusion(name, recipe, monkeypatch):
    import otfuse.stages

    models, x = [build(name, seed=s) for s in range(5)], example(name, n=64, seed=3)
    data = x if recipe == "paper-acts" else None
    results = []
    for workers in (1, 2, 3):
        monkeypatch.setattr(otfuse.stages, "MODEL_WORKERS", workers)
        results.append(otfuse.fuse(models, recipe, data=data, example_input=x[:2]))
    sequential = results[0]
    for parallel in results[1:]:
        for key, value in sequential.model.state_dict().items():
            assert torch.equal(value, parallel.model.state_dict()[key]), key
        for one, other in zip(sequential.plans, parallel.plans, strict=True):
            assert one.keys() == other.keys()
            for space in one:
                np.testing.assert_array_equal(one[space].matrix, other[space].matrix)


def test_align_says_when_soft_plans_only_approximate_the_model(caplog):
    torch.manual_seed(0)
    a, b = StreamLayer().eval(), StreamLayer().eval()
    x = torch.randn(16, 6)
    with caplog.at_level("WARNING", logger="otfuse"):
        exact = otfuse.align(b, a, example_input=x[:2])
    assert not caplog.records
    torch.testing.assert_close(exact(x), b(x))
    with caplog.at_level("WARNING", logger="otfuse"):
        soft = otfuse.align(b, a, example_input=x[:2], solver="sinkhorn")
    assert "not permutations (solver=sinkhorn" in caplog.text
    assert not torch.allclose(soft(x), b(x), atol=1e-3)
