"""train, eval, inspect, interpolate, demo and experiment."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import otfuse
from otfuse import cli, zoo
from otfuse.checkpoints import load_state_dict
from otfuse.data import load_dataset
from otfuse.interpolation import PathPoint, accuracy_drop, interpolate, loss_barrier, mix
from otfuse.training import evaluate

from .util import ARCH, call_ok, mlp, one_line_error, succeeded


def test_train_writes_a_checkpoint_that_eval_scores_the_same(work, results):
    report = json.loads(succeeded(results["train"]).stdout)
    ckpt = load_state_dict(work / "trained.safetensors")
    assert ckpt.metadata["arch"]["hidden"] == [16, 8]
    assert ckpt.metadata["arch"]["in_shape"] == [1, 28, 28]
    assert ckpt.metadata["data"] == {"name": "fashion-mnist", "examples": 500, "subset": 500}
    assert ckpt.metadata["train"]["seed"] == 4 and ckpt.metadata["train"]["epochs"] == 1
    assert report["test_accuracy"] == ckpt.metadata["test_accuracy"]
    model = zoo.create(**ckpt.metadata["arch"])
    model.load_state_dict(ckpt.state_dict)
    scores = evaluate(model, load_dataset("fashion-mnist", "test"))
    assert scores.accuracy == pytest.approx(report["test_accuracy"], abs=1e-6)
    assert scores.accuracy > 15  # better than chance (10%) after 4 SGD steps


def test_a_diverged_training_run_exits_non_zero_and_writes_nothing(work, results):
    proc = results["train diverges"]
    assert proc.returncode == 1
    one_line_error(proc.stderr.splitlines()[-1] + "\n", "training diverged", "lr=1e+06")
    assert proc.stdout == ""
    assert not (work / "diverged.safetensors").exists()


def test_training_progress_is_one_line_per_epoch_off_a_terminal(work, results):
    # the subprocesses' stderr is a pipe: no progress-bar frames, one line per epoch
    stderr = succeeded(results["train"]).stderr
    assert "\r" not in stderr
    assert stderr.startswith("train: epoch 1/1: loss ")
    assert "\r" not in results["fuse with data"].stderr


def test_eval_reports_accuracy_and_loss(work, results, monkeypatch, capsys):
    report = json.loads(succeeded(results["eval"]).stdout)
    assert report["data"] == {"name": "fashion-mnist", "split": "test", "examples": 10000}
    model = mlp(0)
    model.load_state_dict(load_state_dict(work / "a.safetensors").state_dict)
    scores = evaluate(model, load_dataset("fashion-mnist", "test"))
    assert report["accuracy"] == pytest.approx(scores.accuracy, abs=1e-6)
    assert report["loss"] == pytest.approx(scores.loss, rel=1e-6)
    args = ["plain.pt", "--arch", ARCH, "--data", "fashion-mnist"]  # a plain state dict
    text = call_ok(work, monkeypatch, capsys, "eval", *args)
    assert f"accuracy {scores.accuracy:.2f}%" in text


def test_inspect_lists_one_line_per_space(work, results, monkeypatch, capsys):
    lines = succeeded(results["inspect"]).stdout.strip().splitlines()
    assert "2 neuron spaces" in lines[0]
    assert lines[1].startswith("  [0] features.0: 16 units")
    assert lines[2].startswith("  [1] features.2: 8 units")
    assert lines[3].startswith("  [2] classifier: fixed")
    out = call_ok(work, monkeypatch, capsys, "inspect", "conv.safetensors", "--json")
    spaces = json.loads(out)["spaces"]
    sizes = {s["name"]: s["size"] for s in spaces if not s["fixed"]}
    assert sizes == {"features.0": 4, "features.3": 8}  # convnet, width 1/8
    members = {m["param"] for s in spaces for m in s["members"]}
    assert "classifier.weight" in members


def test_interpolating_to_an_aligned_permuted_copy_has_no_barrier(work, results):
    report = json.loads(succeeded(results["interpolate"]).stdout)
    aligned, plain = report["aligned"], report["plain"]
    losses = [p["loss"] for p in aligned["points"]]
    assert max(losses) - min(losses) < 1e-4  # aligned B is A: every point is A
    assert abs(aligned["loss_barrier"]) < 1e-4
    assert plain["loss_barrier"] > 0.1  # the permuted copy, unaligned, is far from A
    with open(work / "path" / "interpolation.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["t"]) for r in rows] == [0, 0.25, 0.5, 0.75, 1]
    assert [float(r["plain_loss"]) for r in rows] == pytest.approx(
        [p["loss"] for p in plain["points"]]
    )
    assert (work / "path" / "interpolation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((work / "path" / "interpolation.json").read_text())
    assert saved["aligned"] == aligned


def test_interpolation_endpoints_are_the_models_and_barrier_math():
    test_set = load_dataset("fashion-mnist", "test").subset(torch.arange(300))
    a, b = mlp(0), mlp(1)
    rows = interpolate(a, b, test_set, steps=3)
    assert [r.t for r in rows] == [0.0, 0.5, 1.0]
    assert rows[0].loss == pytest.approx(evaluate(a, test_set).loss)
    assert rows[-1].loss == pytest.approx(evaluate(b, test_set).loss)
    middle = mix(a, b, 0.5).state_dict()["classifier.weight"]
    torch.testing.assert_close(middle, (a.classifier.weight + b.classifier.weight) / 2)
    path = [PathPoint(0.0, 80.0, 1.0), PathPoint(0.5, 50.0, 2.5), PathPoint(1.0, 70.0, 2.0)]
    assert loss_barrier(path) == pytest.approx(1.0)  # 2.5 - (1.0 + 2.0) / 2
    assert accuracy_drop(path) == pytest.approx(25.0)  # (80 + 70) / 2 - 50
    with pytest.raises(otfuse.OtfuseError):
        interpolate(a, mlp(0, hidden=(12, 8)), test_set)


# --------------------------------------------------------------------------------------------------
# demo and experiment: wired to otfuse.experiments (tested in-process with stand-ins)

needs_experiments = pytest.mark.skipif(
    importlib.util.find_spec("otfuse.experiments") is None,
    reason="otfuse.experiments not there yet",
)


@needs_experiments
def test_demo_calls_the_demo(monkeypatch, capsys):
    import otfuse.experiments.demo as demo

    calls = []
    monkeypatch.setattr(demo, "main", lambda **kw: calls.append(kw) or {"accuracy": 1.0})
    assert cli.main(["demo", "--quick", "--data-dir", "/data", "-q", "--json", "-o", "d"]) == 0
    assert calls == [{"data_dir": "/data", "quick": True, "progress": False, "out": Path("d")}]
    assert json.loads(capsys.readouterr().out)["result"] == {"accuracy": 1.0}


@needs_experiments
def test_experiment_calls_run_experiment_and_refuses_unknown_names(monkeypatch, capsys):
    import otfuse.experiments as experiments

    calls = []
    monkeypatch.setattr(experiments, "names", lambda: ["two-models"])
    monkeypatch.setattr(experiments, "run_experiment", lambda name, **kw: calls.append((name, kw)))
    assert cli.main(["experiment", "two-models", "--quick", "--output", "runs/x"]) == 0
    assert calls == [
        ("two-models", {"quick": True, "data_dir": None, "progress": True, "out": Path("runs/x")})
    ]
    assert cli.main(["experiment", "nope"]) == 2
    assert capsys.readouterr().err.strip() == (
        "otfuse: error: unknown experiment 'nope': choose one of two-models"
    )


def test_demo_without_the_experiments_package_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "otfuse.experiments", None)  # makes the import fail
    monkeypatch.delitem(sys.modules, "otfuse.experiments.demo", raising=False)
    assert cli.main(["demo"]) == 1
    assert capsys.readouterr().err.startswith("otfuse: error: otfuse.experiments.demo is not part")


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "a.safetensors", "--data", "fashion-mnist"],
        ["interpolate", "a.safetensors", "a_perm.safetensors", "--data", "fashion-mnist",
         "--steps", "2", "-o", "dev_path", "--force"],
        ["train", "--arch", ARCH, "--data", "fashion-mnist", "--epochs", "1", "--subset", "64",
         "-o", "dev_train.safetensors", "--force"],
    ],
    ids=["eval", "interpolate", "train"],
)  # fmt: skip
def test_device_flag_runs_each_command_there_or_fails_in_one_line(
    command, work, results, monkeypatch, capsys
):
    from .util import call

    succeeded(results["eval"])  # the checkpoints exist
    call_ok(work, monkeypatch, capsys, *command, "--device", "cpu", "--json")
    if not torch.cuda.is_available():
        status, _, err = call(work, monkeypatch, capsys, *command, "--device", "cuda")
        assert status == 2
        one_line_error(err, "--device cuda", "CUDA is not available")
    status, _, err = call(work, monkeypatch, capsys, *command, "--device", "gpu0")
    assert status == 2 and "not a device" in err
