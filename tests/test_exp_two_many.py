"""The ``two-models`` and ``many-models`` experiments in quick mode, and inference cost counting.

Both experiments run once per module into a temporary folder, with their own parent cache
(``OTFUSE_CACHE``); ``many-models`` runs second and must reuse the parents ``two-models`` trained.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from otfuse.baselines import ensemble
from otfuse.experiments import common, many_models, two_models
from otfuse.experiments.costs import ModelCost, inference_macs, model_cost
from otfuse.experiments.methods import METHODS
from otfuse.experiments.report import Target, jsonable

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PARENTS = ("parent A (seed 0)", "parent B (seed 1)")
BASELINES = ("prediction ensemble", "vanilla average")


class TrainCounter:
    """Stands in for ``common.train``: counts calls, and trains unless told to fail."""

    def __init__(self, real, *, fail: bool = False):
        self.real, self.fail, self.calls = real, fail, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail:
            raise AssertionError("a cached parent was trained again")
        return self.real(*args, **kwargs)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OTFUSE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield mp, tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def two(env):
    mp, runs = env
    counter = TrainCounter(common.train)
    mp.setattr(common, "train", counter)
    results = two_models.run(quick=True, out=runs / "two-models", progress=False)
    mp.setattr(common, "train", counter.real)
    return results, runs / "two-models", counter.calls


@pytest.fixture(scope="module")
def many(env, two):
    mp, runs = env
    counter = TrainCounter(common.train)
    mp.setattr(common, "train", counter)
    results = many_models.run(quick=True, out=runs / "many-models", progress=False)
    mp.setattr(common, "train", counter.real)
    return results, runs / "many-models", counter.calls


def expected_methods(arch: str, k: int) -> set[str]:
    batchnorm = arch == "resnet18"
    return {
        m.label
        for m in METHODS
        if (batchnorm or not m.batchnorm_only) and (k > 2 or not m.many_only)
    }


def check_outputs(folder, results: dict, plot: str) -> None:
    assert (folder / "report.md").read_text().startswith("# ")
    assert (folder / plot).read_bytes()[:8] == PNG_MAGIC
    assert json.loads((folder / "results.json").read_text()) == jsonable(results)


def check_accuracies(rows: list[dict]) -> None:
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 100.0, r
        assert math.isfinite(r["loss"]), r


# --------------------------------------------------------------------------------------------------
# two-models


def test_two_models_writes_report_results_and_plot(two):
    results, folder, train_calls = two
    check_outputs(folder, results, "accuracy.png")
    assert train_calls == 2 * len(two_models.ARCHS)  # parents A and B of each architecture
    report = (folder / "report.md").read_text()
    for name in ("MLPNet", "VGG11", "ResNet-18", "Fine-tuned", "Targets", "--quick"):
        assert name in report


@pytest.mark.parametrize("arch", two_models.ARCHS)
def test_two_models_rows(two, arch):
    result = two[0]["archs"][arch]
    labels = [r["method"] for r in result["rows"]]
    assert labels[:4] == [*PARENTS, *BASELINES]
    assert set(labels[4:]) == expected_methods(arch, 2)
    check_accuracies(result["rows"])
    by_label = {r["method"]: r for r in result["rows"]}
    assert math.isfinite(by_label["OT wts (paper)"]["accuracy"])
    assert by_label["prediction ensemble"]["params"] == 2 * by_label["parent A (seed 0)"]["params"]
    mean = (by_label[PARENTS[0]]["accuracy"] + by_label[PARENTS[1]]["accuracy"]) / 2
    for r in result["rows"]:
        assert r["kept"] == pytest.approx(100 * r["accuracy"] / mean)


@pytest.mark.parametrize("arch", two_models.ARCHS)
def test_two_models_finetunes_and_checks_targets(two, arch):
    result = two[0]["archs"][arch]
    tuned = result["finetuned"]
    assert [e["method"] for e in tuned] == list(two_models.FINETUNED)
    check_accuracies(tuned)
    rows = {r["method"]: r for r in result["rows"]}
    for e in tuned:
        assert e["one_shot_accuracy"] == rows[e["method"]]["accuracy"]
    targets = {t["name"]: t for t in result["targets"]}
    free = targets["data-free recipe: share of the mean parent accuracy kept"]
    assert free["value"] == pytest.approx(rows["recipe: data-free"]["kept"])
    assert free["met"] == (free["value"] >= 85.0)
    if arch == "mlpnet":
        gap = targets["data recipe: accuracy minus the better parent's (points)"]
        best = max(rows[p]["accuracy"] for p in PARENTS)
        assert gap["value"] == pytest.approx(rows["recipe: data"]["accuracy"] - best)
    else:
        data = targets["data recipe: share of the mean parent accuracy kept"]
        assert data["met"] == (data["value"] >= 95.0)


def test_two_models_second_run_loads_parents_from_cache(env, two, monkeypatch):
    _, runs = env
    monkeypatch.setattr(common, "train", TrainCounter(common.train, fail=True))
    monkeypatch.setattr(two_models, "ARCHS", ("mlpnet",))
    again = two_models.run(quick=True, out=runs / "again", progress=False)
    first, second = two[0]["archs"]["mlpnet"]["rows"], again["archs"]["mlpnet"]["rows"]
    assert [r["seconds"] for r in second[:2]] == [0.0, 0.0]  # loaded, not trained
    assert [r["accuracy"] for r in second[:2]] == [r["accuracy"] for r in first[:2]]


# --------------------------------------------------------------------------------------------------
# many-models


def test_many_models_writes_outputs_and_reuses_two_models_parents(many):
    results, folder, train_calls = many
    check_outputs(folder, results, "accuracy_vs_k.png")
    assert results["ks"] == list(many_models.QUICK_KS)
    # seeds 0 and 1 come from two-models' cache: only seeds 2 and 3 of each architecture are trained
    assert train_calls == 2 * len(many_models.ARCHS)


@pytest.mark.parametrize("arch", many_models.ARCHS)
def test_many_models_rows_costs_and_target(many, arch):
    result = many[0]["archs"][arch]
    assert len(result["parents"]) == max(many_models.QUICK_KS)
    for entry in result["by_k"]:
        k, rows = entry["k"], {r["method"]: r for r in entry["rows"]}
        assert list(rows)[:4] == [*many_models.SUMMARY, *BASELINES]
        assert set(list(rows)[4:]) == expected_methods(arch, k)
        check_accuracies(entry["rows"])
        accuracies = [p["accuracy"] for p in result["parents"][:k]]
        assert rows["best parent"]["accuracy"] == max(accuracies)
        assert rows["mean parent"]["accuracy"] == pytest.approx(sum(accuracies) / k)
        single = rows["vanilla average"]
        assert rows["prediction ensemble"]["macs"] == k * single["macs"]
        assert rows["prediction ensemble"]["params"] == k * single["params"]
        assert rows["recipe: data"]["macs"] == single["macs"] == rows["mean parent"]["macs"]
        assert [e["method"] for e in entry["finetuned"]] == list(many_models.FINETUNED)
        check_accuracies(entry["finetuned"])
    by_k = {e["k"]: {r["method"]: r["accuracy"] for r in e["rows"]} for e in result["by_k"]}
    (target,) = result["targets"]
    assert target["value"] == pytest.approx(by_k[4]["recipe: data"] - by_k[2]["recipe: data"])
    assert target["met"] == (target["value"] >= -2.0)


# --------------------------------------------------------------------------------------------------
# costs


class Tiny(nn.Module):
    """(2, 5, 5) -> conv to (4, 5, 5) -> grouped conv to (4, 3, 3) -> Linear(36, 4) -> BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)  # out 4x5x5 = 100 values, 2*9 = 18 MACs each
        self.grouped = nn.Conv2d(4, 4, 3, groups=2, bias=False)  # out 4x3x3 = 36, 2*9 = 18 each
        self.fc = nn.Linear(36, 4)  # 4 outputs, 36 MACs each
        self.norm = nn.BatchNorm1d(4)  # not counted as compute

    def forward(self, x):
        return self.norm(self.fc(torch.flatten(self.grouped(torch.relu(self.conv(x))), 1)))


def test_costs_count_params_and_macs_by_hand():
    model = Tiny().train()
    macs = 100 * 18 + 36 * 18 + 4 * 36  # 1800 + 648 + 144
    params = (4 * 2 * 9 + 4) + (4 * 2 * 9) + (36 * 4 + 4) + (4 + 4)  # 76 + 72 + 148 + 8
    assert model_cost(model, torch.zeros(3, 2, 5, 5)) == ModelCost(params=params, macs=macs)
    assert model.training  # the mode is restored
    assert model_cost(model, torch.zeros(3, 2, 5, 5)).flops == 2 * macs
    both = ensemble([model, Tiny()])
    assert model_cost(both, torch.zeros(1, 2, 5, 5)) == ModelCost(2 * params, 2 * macs)


def test_costs_of_mlpnet_match_its_weights():
    from otfuse import zoo

    model = zoo.create("mlpnet", width=0.25)  # no biases: MACs = weights
    assert inference_macs(model, torch.zeros(2, 1, 28, 28)) == sum(
        p.numel() for p in model.parameters()
    )


# --------------------------------------------------------------------------------------------------
# report helpers


def test_target_checks_both_directions_and_missing_values():
    assert Target("a", 96.0, 95.0).met and not Target("a", 94.0, 95.0).met
    assert Target("b", 1.0, 2.0, at_most=True).met and not Target("b", 3.0, 2.0, at_most=True).met
    assert not Target("c", None, 0.0).met and not Target("c", math.nan, 0.0).met
    assert Target("a", 96.0, 95.0, "%").line() == "- MET: a: 96.00% (target >= 95%)"


def test_jsonable_turns_nan_into_null_and_tuples_into_lists():
    assert jsonable({"x": math.nan, "t": (1, 2), 3: torch.tensor(0.5)}) == {
        "x": None,
        "t": [1, 2],
        "3": 0.5,
    }
