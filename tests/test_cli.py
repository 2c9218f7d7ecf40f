"""Tests of the otfuse command line, run as users run it: ``python -m otfuse.cli ...`` in a subprocess.

Every command runs on tiny MLPNets written to a temporary folder. Each subprocess costs an
interpreter and ``import otfuse`` (about 2 s of CPU), so the independent runs go in one batch that
runs concurrently (one worker per core) and the tests assert on their results. Every bad input runs
in-process through ``cli.main`` (the console script's entry point); a representative set of them
also runs as a subprocess, and all of them with ``pytest -m slow``. A few in-process tests cover
the helpers, the interpolation math and the wiring of ``demo`` / ``experiment``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from helpers import permuted
from torch import nn

import otfuse
from otfuse import cli, zoo
from otfuse.checkpoints import load_state_dict, save_model, sha256_file
from otfuse.data import load_dataset
from otfuse.interpolation import PathPoint, accuracy_drop, interpolate, loss_barrier, mix
from otfuse.training import TrainConfig, evaluate, train

ARCH = "mlpnet:hidden=(16,8)"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
USER_MODULE = """
from torch import nn

def make_net(width=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 3))
"""


class RunsCode:
    """Unpickling this creates ``marker`` through os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def mlp(seed: int, hidden=(16, 8)) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.create("mlpnet", hidden=hidden)


def save(path: Path, model: nn.Module, record_arch: bool = True) -> None:
    metadata = {"arch": model.otfuse_config} if record_arch else {}
    save_model(path, model, metadata)


# --------------------------------------------------------------------------------------------------
# The folder of checkpoints, and every command run on it


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Tiny trained MLPNets, a permuted copy, other architectures and every kind of bad file."""
    d = tmp_path_factory.mktemp("cli")
    train_set = load_dataset("fashion-mnist", "train")
    subset = train_set.subset(torch.arange(1000))
    for name, seed in (("a", 0), ("b", 1)):
        model = mlp(seed)
        train(model, subset, TrainConfig(epochs=1, seed=seed), progress=False)
        save(d / f"{name}.safetensors", model)
    a = mlp(0)
    a.load_state_dict(load_state_dict(d / "a.safetensors").state_dict)
    a_perm, _ = permuted(a, torch.zeros(2, 1, 28, 28), seed=3)
    a_perm.otfuse_config = a.otfuse_config
    save(d / "a_perm.safetensors", a_perm)
    save(d / "wide.safetensors", mlp(2, hidden=(12, 8)))
    torch.manual_seed(0)
    save(d / "conv.safetensors", zoo.create("convnet", width=0.125))
    torch.save(a.state_dict(), d / "plain.pt")
    _write_bad_files(d, a)
    (d / "usernet.py").write_text(USER_MODULE)
    for name in ("user_a", "user_b"):
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
        save_model(d / f"{name}.safetensors", net)
    (d / "existing.safetensors").write_bytes(b"keep me")
    (d / "junk.safetensors").write_bytes(b"replace me")
    (d / "bad.yaml").write_text("mdoe: acts\n")
    (d / "good.yaml").write_text("mode: acts\nnum-samples: 20\nweights: [1, 3]\nrefine: true\n")
    return d


def _write_bad_files(d: Path, model: nn.Module) -> None:
    (d / "empty.safetensors").write_bytes(b"")
    data = (d / "a.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    torch.save(model.state_dict(), d / "corrupt.pt")
    raw = bytearray((d / "corrupt.pt").read_bytes())
    raw[len(raw) // 3 : len(raw) // 3 + 4096] = os.urandom(4096)
    (d / "corrupt.pt").write_bytes(bytes(raw[: len(raw) * 2 // 3]))
    (d / "notes.txt").write_text("hello, these are my notes\n")
    torch.save({"w": torch.ones(2), "x": RunsCode(d / "pwned")}, d / "evil.pt")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["features.0.weight"][0, 0] = float("nan")
    save_model(d / "nan.safetensors", state, {"arch": model.otfuse_config})


# id: (arguments, exit status, words the one-line error holds); fuse runs get -o out.safetensors
FAILURES = {
    "missing file": (["fuse", "a.safetensors", "gone.safetensors"], 1, ["gone.safetensors", "does not exist"]),
    "empty file": (["fuse", "a.safetensors", "empty.safetensors"], 1, ["empty"]),
    "truncated file": (["fuse", "a.safetensors", "truncated.safetensors"], 1, ["truncated"]),
    "corrupt file": (["fuse", "a.safetensors", "corrupt.pt"], 1, ["corrupt.pt"]),
    "not a checkpoint": (["fuse", "a.safetensors", "notes.txt"], 1, ["not a checkpoint"]),
    "pickle that runs code": (["fuse", "a.safetensors", "evil.pt"], 1, ["would run code"]),
    "keys/shapes do not fit ARCH": (
        ["fuse", "a.safetensors", "wide.safetensors", "--arch", ARCH], 1, ["wide.safetensors", "shape"]
    ),
    "models differ": (["fuse", "a.safetensors", "conv.safetensors"], 1, ["conv.safetensors and a.safetensors", "'features.3.weight'"]),
    "NaN weights": (["fuse", "a.safetensors", "nan.safetensors"], 1, ["NaN"]),
    "one model": (["fuse", "a.safetensors"], 2, ["at least two"]),
    "weights count": (["fuse", "a.safetensors", "b.safetensors", "--weights", "1,2,3"], 2, ["3 numbers for 2"]),
    "weights sum to zero": (["fuse", "a.safetensors", "b.safetensors", "--weights", "0,0"], 2, ["positive"]),
    "weights not numbers": (["fuse", "a.safetensors", "b.safetensors", "--weights", "1,x"], 2, ["--weights"]),
    "acts without data": (["fuse", "a.safetensors", "b.safetensors", "--mode", "acts"], 2, ["--data"]),
    "recipe needs data": (["fuse", "a.safetensors", "b.safetensors", "--recipe", "data"], 2, ["--data"]),
    "eval without data": (["fuse", "a.safetensors", "b.safetensors", "--eval"], 2, ["--data"]),
    "anchor out of range": (["fuse", "a.safetensors", "b.safetensors", "--anchor", "2"], 2, ["anchor"]),
    "unknown option": (["fuse", "a.safetensors", "b.safetensors", "--bogus"], 2, ["--bogus"]),
    "unknown choice": (["fuse", "a.safetensors", "b.safetensors", "--solver", "magic"], 2, ["magic"]),
    "negative synthesis count": (["fuse", "a.safetensors", "b.safetensors", "--synthesize", "-1"], 2, ["--synthesize", "at least 0"]),
    "unknown zoo name": (["fuse", "a.safetensors", "b.safetensors", "--arch", "resnet9000"], 2, ["resnet9000"]),
    "bad zoo argument": (["fuse", "plain.pt", "plain.pt", "--arch", "mlpnet:depth=3"], 1, ["depth"]),
    "no architecture recorded": (["fuse", "plain.pt", "plain.pt"], 2, ["--arch"]),
    "module cannot be imported": (
        ["fuse", "a.safetensors", "b.safetensors", "--arch", "no_such_pkg.models:make"], 1, ["cannot import"]
    ),
    "callable without input shape": (
        ["fuse", "user_a.safetensors", "user_b.safetensors", "--arch", "usernet:make_net"], 2, ["--in-shape"]
    ),
    "output exists": (["fuse", "a.safetensors", "b.safetensors", "-o", "existing.safetensors"], 1, ["--force"]),
    "format contradicts suffix": (
        ["fuse", "a.safetensors", "b.safetensors", "-o", "x.pt", "--format", "safetensors"], 2, ["suffix"]
    ),
    "output cannot be written": (
        ["fuse", "a.safetensors", "b.safetensors", "-o", "notes.txt/fused.safetensors"], 1, ["cannot write", "not a folder"]
    ),
    "config with an unknown option": (
        ["fuse", "a.safetensors", "b.safetensors", "--config", "bad.yaml"], 2, ["mdoe"]
    ),
    "missing config": (["fuse", "a.safetensors", "b.safetensors", "--config", "nope.yaml"], 1, ["nope.yaml"]),
    "no command": ([], 2, ["COMMAND"]),
    "unknown command": (["fusion"], 2, ["fusion"]),
    "eval needs --data": (["eval", "a.safetensors"], 2, ["--data"]),
    "unknown dataset": (["eval", "a.safetensors", "--data", "imagenet"], 1, ["imagenet"]),
    "dataset files missing": (["eval", "conv.safetensors", "--data", "cifar10"], 1, ["--data-dir"]),
    "model does not fit the data": (
        ["eval", "user_a.safetensors", "--arch", "usernet:make_net", "--data", "fashion-mnist"], 1, ["does not accept fashion-mnist"]
    ),
    "train output exists": (
        ["train", "--arch", ARCH, "--data", "fashion-mnist", "-o", "existing.safetensors"], 1, ["exists"]
    ),
    "interpolate different architectures": (
        ["interpolate", "a.safetensors", "conv.safetensors", "--data", "fashion-mnist", "-o", "ipath"], 1, ["different parameters"]
    ),
}  # fmt: skip

# the bad inputs that also run as subprocesses by default (every one with -m slow)
SUBPROCESS_FAILURES = (
    "pickle that runs code",
    "NaN weights",
    "keys/shapes do not fit ARCH",
    "unknown option",
    "output exists",
)

RUNS = {
    "train": ["train", "--arch", ARCH, "--data", "fashion-mnist", "-o", "trained.safetensors",
              "--subset", "500", "--epochs", "1", "--seed", "4", "--json"],
    "fuse permuted": ["fuse", "a.safetensors", "a_perm.safetensors", "-o", "junk.safetensors",
                      "--force", "--json"],
    "fuse with data": ["fuse", "a.safetensors", "b.safetensors", "--data", "fashion-mnist",
                       "--num-samples", "50", "--eval", "--format", "pt", "-o", "fused.pt"],
    "eval": ["eval", "a.safetensors", "--data", "fashion-mnist", "--json"],
    "inspect": ["inspect", "a.safetensors"],
    "interpolate": ["interpolate", "a.safetensors", "a_perm.safetensors", "--data", "fashion-mnist",
                    "--steps", "5", "-o", "path", "--json"],
}  # fmt: skip


def failure_args(case: str) -> list[str]:
    args = FAILURES[case][0]
    if args[:1] == ["fuse"] and "-o" not in args:
        args = [*args, "-o", "out.safetensors"]
    return args


@pytest.fixture(scope="module")
def results(work) -> dict[str, subprocess.CompletedProcess]:
    """Every run above and the representative failures, concurrently: id -> finished process."""
    return run_all(work, {**RUNS, **{k: failure_args(k) for k in SUBPROCESS_FAILURES}})


def run_all(cwd: Path, jobs: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {k: pool.submit(run, cwd, *args) for k, args in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "otfuse.cli", *args]
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def succeeded(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def call(work: Path, monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``cli.main(args)`` in-process, in ``work``: the exit status, stdout and stderr."""
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", list(sys.path))  # --arch module:callable may extend it
    status = cli.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def call_ok(work: Path, monkeypatch, capsys, *args: str) -> str:
    status, out, err = call(work, monkeypatch, capsys, *args)
    assert status == 0, err
    return out


# --------------------------------------------------------------------------------------------------
# Bad input: one line, the right status, no traceback, nothing written


def assert_refused(work: Path, case: str, status: int, stdout: str, stderr: str) -> None:
    """The exit status of ``case``; one error line holding its words; nothing on stdout or disk."""
    assert status == FAILURES[case][1], (status, stderr)
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("otfuse: error: "), stderr
    for word in FAILURES[case][2]:
        assert word in lines[0], lines[0]
    assert stdout == ""
    assert not (work / "out.safetensors").exists()


@pytest.mark.parametrize("case", list(FAILURES))
def test_bad_input_is_one_line_and_writes_nothing(work, case, monkeypatch, capsys):
    assert_refused(work, case, *call(work, monkeypatch, capsys, *failure_args(case)))


@pytest.mark.parametrize("case", SUBPROCESS_FAILURES)
def test_bad_input_through_the_real_command_line(work, results, case):
    proc = results[case]
    assert_refused(work, case, proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.slow
def test_every_bad_input_through_the_real_command_line(work):
    procs = run_all(work, {k: failure_args(k) for k in FAILURES})
    for case, proc in procs.items():
        assert_refused(work, case, proc.returncode, proc.stdout, proc.stderr)


def test_failures_leave_no_partial_files(work, results):
    assert (work / "existing.safetensors").read_bytes() == b"keep me"
    assert not list(work.glob(".*tmp*")), "a temporary file was left behind"
    assert not (work / "pwned").exists(), "the malicious pickle ran"
    assert not (work / "ipath").exists()
    for name in ("never.safetensors", "x.pt"):
        assert not (work / name).exists()


# --------------------------------------------------------------------------------------------------
# fuse


def test_fusing_a_permuted_copy_gives_back_the_same_weights(work, results):
    report = json.loads(succeeded(results["fuse permuted"]).stdout)
    fused = load_state_dict(work / "junk.safetensors")  # --force replaced the junk file
    original = load_state_dict(work / "a.safetensors").state_dict
    for key, value in original.items():
        torch.testing.assert_close(fused.state_dict[key], value, atol=1e-6, rtol=1e-5)
    assert report["output"] == "junk.safetensors"
    assert report["inputs"] == [
        {"path": name, "sha256": sha256_file(work / name)}
        for name in ("a.safetensors", "a_perm.safetensors")
    ]
    assert report["requested"] == {"checkpoints": ["a.safetensors", "a_perm.safetensors"]}
    assert report["settings"]["recipe"] == "data-free"  # the library's default, not the CLI's
    assert report["costs"][0] == {}  # the anchor
    assert set(report["costs"][1]) == {"features.0", "features.2"}
    assert all(abs(c) < 1e-3 for c in report["costs"][1].values())  # 0 up to float32
    assert fused.metadata["arch"]["hidden"] == [16, 8]  # the sidecar, read back
    assert fused.metadata["settings"] == report["settings"]


def test_fuse_with_data_evaluates_and_writes_pt(work, results):
    proc = succeeded(results["fuse with data"])
    assert "ensemble" in proc.stdout and "OT fusion" in proc.stdout
    assert "vanilla average" in proc.stdout and "wrote fused.pt and fused.pt.json" in proc.stdout
    assert (work / "fused.pt").read_bytes()[:2] == b"PK"  # a torch.save zip
    ckpt = load_state_dict(work / "fused.pt")
    rows = ckpt.metadata["evaluation"]["rows"]
    assert [r["model"] for r in rows] == [
        "a.safetensors",
        "b.safetensors",
        "ensemble",
        "vanilla average",
        "OT fusion",
    ]
    assert ckpt.metadata["settings"]["recipe"] == "data"
    assert ckpt.metadata["settings"]["num_samples"] == 50
    assert ckpt.metadata["data"] == {"name": "fashion-mnist", "split": "train"}
    model = zoo.create(**ckpt.metadata["arch"])
    model.load_state_dict(ckpt.state_dict)
    test_set = load_dataset("fashion-mnist", "test")
    assert evaluate(model, test_set).accuracy == pytest.approx(rows[-1]["accuracy"], abs=1e-6)


def test_fuse_models_of_different_widths_with_weights(work, monkeypatch, capsys):
    args = ["a.safetensors", "wide.safetensors", "--recipe", "paper-wts", "--solver", "exact"]
    status, _, err = call(work, monkeypatch, capsys, "fuse", *args, "--weights", "2,1", "-o",
                          "widths.safetensors", "--quiet")  # fmt: skip
    assert status == 0 and err == ""  # --quiet
    ckpt = load_state_dict(work / "widths.safetensors")
    assert ckpt.state_dict["features.0.weight"].shape == (16, 784)  # the anchor's widths
    assert ckpt.metadata["settings"]["weights"] == pytest.approx([2 / 3, 1 / 3])
    assert ckpt.metadata["settings"]["solver"] == "exact"
    assert ckpt.metadata["requested"]["recipe"] == "paper-wts"


def test_fuse_a_users_own_callable(work, monkeypatch, capsys):
    arch = ["--arch", "usernet:make_net:width=16", "--in-shape", "1x8x8"]
    call_ok(work, monkeypatch, capsys, "fuse", "user_a.safetensors", "user_b.safetensors", *arch,
            "-o", "user.safetensors")  # fmt: skip
    ckpt = load_state_dict(work / "user.safetensors")
    assert ckpt.metadata["arch"] == {"callable": "usernet:make_net", "kwargs": {"width": 16}}
    assert ckpt.state_dict["1.weight"].shape == (16, 64)


def test_print_config_merges_config_and_flags_and_reads_back(work, monkeypatch, capsys):
    args = ["a.safetensors", "b.safetensors", "--config", "good.yaml", "--mode", "wts"]
    out = call_ok(work, monkeypatch, capsys, "fuse", *args, "-o", "never.safetensors",
                  "--print-config")  # fmt: skip
    config = yaml.safe_load(out)
    assert config == {
        "checkpoints": ["a.safetensors", "b.safetensors"],
        "output": "never.safetensors",
        "mode": "wts",  # the flag overrides the file
        "num_samples": 20,
        "refine": True,
        "weights": [1.0, 3.0],
    }
    assert "# not given, so otfuse.fuse takes them from recipe 'data-free'" in out
    assert "get 256 synthesised inputs and the data recipe's options" in out
    (work / "printed.yaml").write_text(out)  # what it prints is a config it reads back
    again = call_ok(work, monkeypatch, capsys, "fuse", "--config", "printed.yaml", "--print-config")
    assert again == out
    assert not (work / "never.safetensors").exists()


def test_only_given_options_reach_fuse(monkeypatch, tmp_path):
    seen = {}

    def fake_fuse(models, progress=True, **kwargs):
        seen.update(kwargs)  # every fusion option; progress only follows --quiet
        raise cli.UsageError("stop here")

    for name in ("a", "b"):
        save(tmp_path / f"{name}.safetensors", mlp(0))
    monkeypatch.setattr(otfuse, "fuse", fake_fuse)
    monkeypatch.chdir(tmp_path)
    status = cli.main(["fuse", "a.safetensors", "b.safetensors", "-o", "f.safetensors", "-q"])
    assert status == 2 and seen == {}
    args = ["--solver", "exact", "--no-refine", "--seed", "3", "--in-shape", "1x28x28"]
    cli.main(["fuse", "a.safetensors", "b.safetensors", "-o", "f.safetensors", "-q", *args])
    assert set(seen) == {"solver", "refine", "seed", "example_input"}
    assert seen["refine"] is False and seen["example_input"].shape == (2, 1, 28, 28)


# --------------------------------------------------------------------------------------------------
# train, eval, inspect


def test_train_writes_a_checkpoint_that_eval_scores_the_same(work, results):
    report = json.loads(succeeded(results["train"]).stdout)
    ckpt = load_state_dict(work / "trained.safetensors")
    assert ckpt.metadata["arch"]["hidden"] == [16, 8]
    assert ckpt.metadata["data"] == {"name": "fashion-mnist", "examples": 500, "subset": 500}
    assert ckpt.metadata["train"]["seed"] == 4 and ckpt.metadata["train"]["epochs"] == 1
    assert report["test_accuracy"] == ckpt.metadata["test_accuracy"]
    model = zoo.create(**ckpt.metadata["arch"])
    model.load_state_dict(ckpt.state_dict)
    scores = evaluate(model, load_dataset("fashion-mnist", "test"))
    assert scores.accuracy == pytest.approx(report["test_accuracy"], abs=1e-6)
    assert scores.accuracy > 15  # better than chance (10%) after 4 SGD steps


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


# --------------------------------------------------------------------------------------------------
# interpolate


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
# Parsing ARCH


def test_arch_parsing():
    spec = cli.ArchSpec.parse("vgg11:width=0.5,batch_norm=true,in_shape=1x28x28")
    assert spec.is_zoo and spec.kwargs == {
        "width": 0.5,
        "batch_norm": True,
        "in_shape": (1, 28, 28),
    }
    assert cli.ArchSpec.parse("mlpnet:hidden=(16,8),bias=no").kwargs == {
        "hidden": (16, 8),
        "bias": False,
    }
    spec = cli.ArchSpec.parse("mypkg.models:make_net:width=2,name=wide")
    assert not spec.is_zoo and spec.target == "mypkg.models:make_net"
    assert spec.kwargs == {"width": 2, "name": "wide"}
    assert cli.ArchSpec.parse("mypkg.models:make_net").kwargs == {}
    model = cli.ArchSpec.parse("mlpnet:hidden=[4]").build({"in_shape": (3, 4, 4), "num_classes": 5})
    assert model.otfuse_config["in_shape"] == [3, 4, 4] and model.otfuse_config["num_classes"] == 5
    with pytest.raises(cli.UsageError):
        cli.ArchSpec.parse("mlpnet:width")


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
    assert cli.main(["demo", "--quick", "--data-dir", "/data", "-q", "--json"]) == 0
    assert calls == [{"data_dir": "/data", "quick": True, "progress": False}]
    assert json.loads(capsys.readouterr().out)["result"] == {"accuracy": 1.0}


@needs_experiments
def test_experiment_calls_run_experiment_and_refuses_unknown_names(monkeypatch, capsys):
    import otfuse.experiments as experiments

    calls = []
    monkeypatch.setattr(experiments, "names", lambda: ["two-models"])
    monkeypatch.setattr(experiments, "run_experiment", lambda name, **kw: calls.append((name, kw)))
    assert cli.main(["experiment", "two-models", "--quick", "--out", "runs/x"]) == 0
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


def test_safetensors_outputs_load_without_otfuse(work, results):
    """The fused file is a plain safetensors file of the anchor's state_dict."""
    succeeded(results["fuse permuted"])
    tensors = safetensors.torch.load_file(str(work / "junk.safetensors"))
    assert set(tensors) == set(mlp(0).state_dict())
