"""The skill-transfer, widths and timing experiments in --quick mode; magnitude pruning by hand."""

import json

import pytest
import torch

from otfuse import zoo
from otfuse.data import load_dataset
from otfuse.errors import DataError, OtfuseError
from otfuse.experiments import run_experiment
from otfuse.experiments.pruning import kept_count, kept_units, magnitude_prune
from otfuse.experiments.skill_transfer import BASELINES, CHECKED, OT_METHODS
from otfuse.experiments.splits import class_counts, dirichlet_split
from otfuse.experiments.timing import SOLVERS
from otfuse.experiments.widths import COMPRESSION_METHODS, FUSION_METHODS


@pytest.fixture(scope="module")
def run_quick(tmp_path_factory):
    """Runs one experiment in quick mode with an isolated parent cache; returns (results, out)."""
    try:
        load_dataset("fashion-mnist", "test")
    except DataError as err:
        pytest.skip(f"Fashion-MNIST is not installed: {err}")
    root = tmp_path_factory.mktemp("experiments")

    def run(name):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OTFUSE_CACHE", str(root / "cache"))
            results = run_experiment(name, quick=True, out=root / "runs", progress=False)
        return results, root / "runs" / name

    return run


@pytest.fixture(scope="module")
def skill(run_quick):
    return run_quick("skill-transfer")


@pytest.fixture(scope="module")
def widths(run_quick):
    return run_quick("widths")


@pytest.fixture(scope="module")
def timing(run_quick):
    return run_quick("timing")


def check_outputs(results, out, pngs):
    assert (out / "report.md").read_text().startswith("# ")
    assert json.loads((out / "results.json").read_text())["experiment"] == results["experiment"]
    for png in pngs:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def in_range(accuracy):
    return 0.0 <= accuracy <= 100.0


# --------------------------------------------------------------------------------------------------
# skill-transfer


def test_skill_transfer_writes_its_outputs_and_sweeps_every_method(skill):
    results, out = skill
    check_outputs(results, out, ["sweep_4.png", "dirichlet.png"])
    assert list(results["pairs"]) == ["4"]  # quick: one special class
    pair = results["pairs"]["4"]
    assert results["weights_a"] == [0.0, 0.5, 1.0]
    assert set(pair["sweep"]) == {*OT_METHODS, *BASELINES}
    for entries in pair["sweep"].values():
        assert [e["w_a"] for e in entries] == [0.0, 0.5, 1.0]
        assert all(in_range(e["accuracy"]) and in_range(e["special_accuracy"]) for e in entries)
    assert set(pair["parents"]) == {"parent A", "parent B"}
    # B never saw the special class; A saw all of it
    assert pair["parents"]["parent B"]["special_accuracy"] == 0.0
    assert pair["parents"]["parent A"]["special_accuracy"] > 50.0
    report = (out / "report.md").read_text()
    assert "## Targets" in report and "Dirichlet(0.1)" in report


def test_skill_transfer_weight_one_on_a_gives_back_a(skill):
    pair = skill[0]["pairs"]["4"]
    parent_a = pair["parents"]["parent A"]
    for label, entries in pair["sweep"].items():
        at_one = entries[-1]
        assert at_one["accuracy"] == pytest.approx(parent_a["accuracy"], abs=0.01), label
        assert at_one["special_accuracy"] == pytest.approx(
            parent_a["special_accuracy"], abs=0.01
        ), label


def test_skill_transfer_weight_zero_on_a_gives_back_b_reordered(skill):
    """Without repair, w_A = 0 is B with its units permuted onto A's: the same function."""
    pair = skill[0]["pairs"]["4"]
    parent_b = pair["parents"]["parent B"]
    for label in ("OT paper-wts", "vanilla average", "logit average", "prediction ensemble"):
        assert pair["sweep"][label][0]["accuracy"] == pytest.approx(
            parent_b["accuracy"], abs=0.01
        ), label


def test_skill_transfer_fuses_four_parents_of_a_dirichlet_split(skill):
    results = skill[0]
    dirichlet = results["dirichlet"]
    assert sum(dirichlet["examples"]) == results["train_examples"]
    assert [sum(c) for c in dirichlet["class_counts"]] == dirichlet["examples"]
    assert len(dirichlet["parents"]) == 4
    for weighting, weights in dirichlet["weights"].items():
        assert sum(weights) == pytest.approx(1.0)
        assert set(dirichlet["fused"][weighting]) == {*OT_METHODS, *BASELINES}
        assert all(in_range(m["accuracy"]) for m in dirichlet["fused"][weighting].values())


def test_skill_transfer_checks_the_issues_targets_from_its_numbers(skill):
    results = skill[0]
    targets = results["targets"]
    assert len(targets) == 4 * len(results["pairs"]) + len(results["dirichlet"]["fused"])
    pair = results["pairs"]["4"]["sweep"]
    gaps = [
        f["accuracy"] - b["accuracy"] for f, b in zip(pair[CHECKED], pair["prediction ensemble"])
    ]
    assert targets[1]["value"] == pytest.approx(min(gaps))
    assert all(t["met"] == (t["value"] >= t["threshold"]) for t in targets)


def test_dirichlet_split_is_a_seeded_skewed_partition():
    labels = torch.arange(10).repeat_interleave(100)
    parts = dirichlet_split(labels, 4, 0.1, seed=3)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(1000))
    assert all(torch.equal(p, q) for p, q in zip(parts, dirichlet_split(labels, 4, 0.1, seed=3)))
    assert all(torch.equal(p, p.sort().values) and len(p) >= 10 for p in parts)
    counts = torch.tensor(class_counts(labels, parts, 10))  # (parents, classes)
    assert (counts.max(0).values >= 60).float().mean() >= 0.8  # most classes mostly in one parent
    even = torch.tensor(class_counts(labels, dirichlet_split(labels, 4, 1000.0, seed=3), 10))
    assert (even - 25).abs().max() <= 10  # a large concentration splits every class evenly
    with pytest.raises(OtfuseError):
        dirichlet_split(labels, 1, 0.1, seed=0)
    with pytest.raises(OtfuseError):
        dirichlet_split(labels[:20], 4, 0.1, seed=0)


# --------------------------------------------------------------------------------------------------
# widths


def test_widths_fuses_both_ways_and_says_vanilla_is_impossible(widths):
    results, out = widths
    check_outputs(results, out, ["compression.png"])
    assert set(results["different_widths"]) == {"mlpnet", "vgg11"}
    for arch, result in results["different_widths"].items():
        rows = result["rows"]
        parents = [r for r in rows if r["method"].startswith("parent")]
        assert len(parents) == 2
        vanilla = next(r for r in rows if r["method"] == "vanilla average")
        assert vanilla["accuracy"] is None and vanilla["note"].startswith("impossible")
        fused = [r for r in rows if r["method"] in FUSION_METHODS]
        assert len(fused) == 2 * len(FUSION_METHODS), arch
        for r in fused:
            assert in_range(r["accuracy"])
            # the fused model has the anchor's architecture, hence its parameter count
            anchor = next(p for p in parents if p["method"] == f"parent {r['anchor']}")
            assert r["params"] == anchor["params"]
        assert parents[0]["params"] > parents[1]["params"]


def test_compression_series_and_fraction_zero_gives_back_the_wide_model(widths):
    comp = widths[0]["compression"]
    assert comp["fractions"] == [0.0, 0.5, 0.9]
    assert set(comp["series"]) == set(COMPRESSION_METHODS)
    wide = comp["wide"]
    for method, entries in comp["series"].items():
        assert [e["fraction"] for e in entries] == comp["fractions"]
        assert all(in_range(e["accuracy"]) and in_range(e["finetuned_accuracy"]) for e in entries)
        assert entries[0]["params"] == wide["params"]
        assert entries[0]["accuracy"] == pytest.approx(wide["accuracy"], abs=0.1), method
        params = [e["params"] for e in entries]
        assert params == sorted(params, reverse=True)
    pruned = comp["series"]["magnitude pruning"]
    assert pruned[0]["accuracy"] == wide["accuracy"]
    assert pruned[1]["hidden"] == [50, 25, 13]  # quick MLPNet 100-50-25, half removed


# --------------------------------------------------------------------------------------------------
# timing


def test_timing_measures_every_solver_and_k(timing):
    results, out = timing
    check_outputs(results, out, ["time_vs_width.png", "time_vs_k.png"])
    assert results["torch_threads"] == torch.get_num_threads()
    assert set(results["width"]) == set(SOLVERS)
    for label, entries in results["width"].items():
        assert [e["width"] for e in entries] == [64, 128, 256, 512]
        assert all(e["status"] == "ok" and e["median"] > 0 for e in entries), label
    assert [e["k"] for e in results["k"]] == [2, 3]
    assert all(e["median"] > 0 and len(e["runs"]) == 1 for e in results["k"])


# --------------------------------------------------------------------------------------------------
# magnitude pruning, checked by hand


@pytest.fixture
def tiny_mlp():
    """784 -> 4 -> 3 -> 2 shrunk to inputs of 3 values, with hand-set weights and biases."""
    model = zoo.create("mlpnet", in_shape=(1, 1, 3), hidden=(4, 3), num_classes=2, bias=True)
    first, second = model.features[0], model.features[2]
    with torch.no_grad():
        # row norms 1, 3, 2, 0.5: the two largest are units 1 and 2
        first.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 3, 0], [0, 0, 2], [0.5, 0, 0]]))
        first.bias.copy_(torch.tensor([10.0, 11, 12, 13]))
        # row norms 19.1, 3.7, 11.2: the two largest are units 0 and 2
        second.weight.copy_(torch.tensor([[8.0, 9, 10, 11], [0, 1, 2, 3], [4, 5, 6, 7]]))
        second.bias.copy_(torch.tensor([20.0, 21, 22]))
        model.classifier.weight.copy_(torch.tensor([[1.0, 2, 3], [4, 5, 6]]))
        model.classifier.bias.copy_(torch.tensor([30.0, 31]))
    return model


def test_magnitude_prune_keeps_the_largest_units_rows_and_columns(tiny_mlp):
    assert [k.tolist() for k in kept_units(tiny_mlp, 0.5)] == [[1, 2], [0, 2]]
    pruned = magnitude_prune(tiny_mlp, 0.5)
    assert pruned.otfuse_config["hidden"] == [2, 2]
    first, second = pruned.features[0], pruned.features[2]
    assert first.weight.tolist() == [[0, 3, 0], [0, 0, 2]]
    assert first.bias.tolist() == [11, 12]
    assert second.weight.tolist() == [[9, 10], [5, 6]]  # rows 0, 2; columns 1, 2
    assert second.bias.tolist() == [20, 22]
    assert pruned.classifier.weight.tolist() == [[1, 3], [4, 6]]  # columns 0, 2
    assert pruned.classifier.bias.tolist() == [30, 31]
    assert tiny_mlp.features[0].weight.shape == (4, 3)  # the original is untouched


def test_pruning_nothing_gives_the_same_model(tiny_mlp):
    pruned = magnitude_prune(tiny_mlp, 0.0)
    x = torch.randn(5, 1, 1, 3)
    torch.testing.assert_close(pruned(x), tiny_mlp.eval()(x))


def test_kept_count_rounds_half_up_and_keeps_one():
    assert kept_count(400, 0.1) == 360
    assert kept_count(100, 0.9) == 10
    assert kept_count(25, 0.9) == 3
    assert kept_count(3, 0.5) == 2
    assert kept_count(1, 0.9) == 1
    with pytest.raises(OtfuseError):
        kept_count(10, 1.0)
    with pytest.raises(OtfuseError):
        magnitude_prune(zoo.create("convnet"), 0.5)
