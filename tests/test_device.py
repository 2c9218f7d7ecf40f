"""Everything runs where the models are: costs, plans and averages on the tensors' device, the
command line's ``--device``. The suite runs on the CPU; a fake CUDA device (``FakeTensorMode``:
tensors with a device and no memory) and the ``meta`` device show that no step falls back to the
CPU on the way (mixing devices is an error on both)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import otfuse
from otfuse.baselines import average_states, build_model
from otfuse.cli.common import UsageError, parse_device
from otfuse.cost import _sq_distances
from otfuse.discovery import Layout, Member, Segment
from otfuse.plans import transport_member
from otfuse.transport import TransportPlan
from otfuse.validation import check_models, to_device


def _plans(n: int) -> list[TransportPlan]:
    perm = np.random.default_rng(0).permutation(n)
    dense = np.full((n, n), 1.0 / n**2)
    return [
        TransportPlan(None, np.zeros((n, n)), "assignment", perm),
        TransportPlan(dense, dense, "x"),
    ]


def test_plans_are_applied_on_the_tensors_device():
    plain = Member("w", 1, Layout.of(0), "consumer")
    split = Member("w", 0, Layout((Segment(0), Segment(1)), outer=2), "producer")
    sizes = {0: 4, 1: 4}
    with FakeTensorMode():
        w = torch.empty(16, 4, device="cuda")
        for plan in _plans(4):
            assert transport_member(w, plain, 0, plan, sizes).device.type == "cuda"
    w = torch.empty(16, 4, device="meta")  # a layout's slices: on a device without memory
    for plan in _plans(4):
        out = transport_member(w, split, 0, plan, sizes)
        assert out.device.type == "meta" and out.shape == (16, 4)
        assert transport_member(w, plain, 0, plan, sizes).device.type == "meta"


def test_costs_and_averages_are_formed_on_the_tensors_device():
    x, y = torch.empty(6, 5, device="meta"), torch.empty(7, 5, device="meta")
    assert _sq_distances(x, y).device.type == "meta"
    states = [{"w": torch.empty(3, 2, device="meta")} for _ in range(2)]
    assert average_states(states, [0.5, 0.5], states[0])["w"].device.type == "meta"


def test_a_built_model_keeps_the_templates_device():
    template = nn.Linear(3, 2, device="meta")
    model = build_model(template, {"weight": torch.ones(2, 3), "bias": torch.zeros(2)})
    assert model.weight.device.type == "meta" and isinstance(model.weight, nn.Parameter)


def test_models_on_two_devices_are_refused_in_one_line():
    with pytest.raises(otfuse.OtfuseError, match="different devices") as err:
        check_models([nn.Linear(3, 2), nn.Linear(3, 2, device="meta")])
    assert "\n" not in str(err.value)


def test_inputs_follow_the_models():
    x = (torch.zeros(2), torch.ones(1))
    moved = to_device(x, torch.device("meta"))
    assert all(t.device.type == "meta" for t in moved) and to_device(None, "meta") is None


def test_device_flag_names_an_available_device_or_fails_in_one_line():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(UsageError, match="not a device"):
        parse_device("gpu0")
    with pytest.raises(UsageError, match="otfuse runs on"):
        parse_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available") as err:
            parse_device("cuda:1")
        assert "\n" not in str(err.value)
