"""otfuse fuse: what it writes, what it prints, what reaches otfuse.fuse."""

from __future__ import annotations

import importlib
import json
import re

import pytest
import safetensors.torch
import torch

import otfuse
from otfuse import cli, zoo
from otfuse.checkpoints import load_state_dict, save_model, sha256_file
from otfuse.config import FusionConfig
from otfuse.data import load_dataset
from otfuse.synthesis import AUTO_BUDGET
from otfuse.training import evaluate

from .util import call, call_ok, mlp, one_line_error, save, succeeded


def test_fusing_a_permuted_copy_gives_back_the_same_weights(work, results):
    report = json.loads(succeeded(results["fuse permuted"]).stdout)
    fused = load_state_dict(work / "junk.safetensors")  # --force replaced the junk file
    original = load_state_dict(work / "a.safetensors").state_dict
    for key, value in original.items():
        torch.testing.assert_close(fused.state_dict[key], value, atol=1e-5, rtol=1e-5)
    assert report["output"] == "junk.safetensors"
    assert [(c["path"], c["sha256"]) for c in report["checkpoints"]] == [
        (name, sha256_file(work / name)) for name in ("a.safetensors", "a_perm.safetensors")
    ]
    assert report["given"] == {}
    assert report["config"]["recipe"] == "data-free"  # the library's default without data
    assert FusionConfig.from_recipe("data-free").synthesize == "auto"
    assert report["config"]["synthesize"] == AUTO_BUDGET["classes"][0]  # what ran: no BatchNorm
    assert report["config"]["synthesis_steps"] == AUTO_BUDGET["classes"][1]
    assert report["inputs"] in ("synthesized", "none")  # no --data
    assert report["data"] is None
    assert report["costs"][0] == {}  # the anchor
    assert set(report["costs"][1]) == {"features.0", "features.2"}
    assert all(abs(c) < 1e-3 for c in report["costs"][1].values())  # 0 up to float32
    assert fused.metadata["arch"]["hidden"] == [16, 8]  # the sidecar, read back
    assert fused.metadata["config"] == report["config"]


def test_fuse_with_data_evaluates_and_writes_pt(work, results):
    proc = succeeded(results["fuse with data"])
    assert "ensemble" in proc.stdout and "OT fusion" in proc.stdout
    assert "vanilla average" in proc.stdout and "wrote fused.pt and fused.pt.json" in proc.stdout
    assert "with recipe data on 50 inputs of fashion-mnist train" in proc.stdout
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
    assert ckpt.metadata["config"]["recipe"] == "data"
    assert ckpt.metadata["config"]["num_samples"] == 50
    assert ckpt.metadata["inputs"] == "data" and ckpt.metadata["sample"] == 50
    assert ckpt.metadata["data"] == {"name": "fashion-mnist", "split": "train"}
    assert ckpt.metadata["evaluation"]["data"] == {"name": "fashion-mnist", "split": "test"}
    model = zoo.create(**ckpt.metadata["arch"])
    model.load_state_dict(ckpt.state_dict)
    test_set = load_dataset("fashion-mnist", "test")
    assert evaluate(model, test_set).accuracy == pytest.approx(rows[-1]["accuracy"], abs=1e-6)


def test_timings_are_the_librarys_and_add_up_to_the_wall_time(work, results):
    metadata = load_state_dict(work / "fused.pt").metadata
    steps = metadata["command_seconds"]  # up to writing the file
    assert set(steps) == {"data", "load", "fusion", "evaluation", "other", "total"}
    parts = sum(v for k, v in steps.items() if k != "total")
    assert parts == pytest.approx(steps["total"], abs=1e-6)
    assert metadata["seconds"] <= steps["fusion"] + 1e-6  # the library's, within the command's
    assert isinstance(metadata["timings"], dict) and metadata["timings"]
    stdout = results["fuse with data"].stdout
    assert f"fused 2 models in {metadata['seconds']:.2f} s" in stdout
    printed = re.search(r"^time: (.*); total ([\d.]+) s$", stdout, re.M)
    shown = dict(part.rsplit(" ", 2)[:2] for part in printed.group(1).split(", "))
    assert set(shown) >= {"data", "load", "fusion", "evaluation", "writing"}
    assert sum(map(float, shown.values())) == pytest.approx(float(printed.group(2)), abs=0.03)


def test_quiet_prints_the_results_only(work, results):
    proc = succeeded(results["quiet"])
    assert proc.stderr == ""  # no progress, no warnings
    assert proc.stdout.startswith("fused 2 models in ")
    assert "OT fusion" in proc.stdout and "wrote" not in proc.stdout
    assert (work / "quiet.safetensors").exists()


def test_fuse_models_of_different_widths_with_weights(work, monkeypatch, capsys):
    args = ["a.safetensors", "wide.safetensors", "--recipe", "paper-wts", "--solver", "exact"]
    status, out, err = call(work, monkeypatch, capsys, "fuse", *args, "--weights", "2,1", "-o",
                            "widths.safetensors", "--quiet")  # fmt: skip
    assert status == 0 and err == ""  # --quiet
    assert "wrote" not in out
    ckpt = load_state_dict(work / "widths.safetensors")
    assert ckpt.state_dict["features.0.weight"].shape == (16, 784)  # the anchor's widths
    assert ckpt.metadata["weights"] == pytest.approx([2 / 3, 1 / 3])
    assert ckpt.metadata["config"]["solver"] == "exact"
    assert ckpt.metadata["config"]["weights"] == [2.0, 1.0]
    assert ckpt.metadata["given"] == {
        "recipe": "paper-wts",
        "solver": "exact",
        "weights": [2.0, 1.0],
    }


def test_fuse_a_users_own_callable(work, monkeypatch, capsys):
    arch = ["--arch", "usernet:make_net:width=16", "--in-shape", "1x8x8"]
    call_ok(work, monkeypatch, capsys, "fuse", "user_a.safetensors", "user_b.safetensors", *arch,
            "--recipe", "paper-wts", "-o", "user.safetensors")  # fmt: skip
    ckpt = load_state_dict(work / "user.safetensors")
    assert ckpt.metadata["arch"] == {
        "callable": "usernet:make_net",
        "kwargs": {"width": 16},
        "in_shape": [1, 8, 8],
    }
    assert ckpt.state_dict["1.weight"].shape == (16, 64)


def test_the_resolved_config_reaches_fuse(monkeypatch, tmp_path):
    seen = {}

    def fake_fuse(models, config=None, *, data=None, example_input=None, progress=False, **kw):
        seen.update(config=config, data=data, example_input=example_input, progress=progress, **kw)
        raise cli.UsageError("stop here")

    for name in ("a", "b"):
        save(tmp_path / f"{name}.safetensors", mlp(0))
    monkeypatch.setattr(otfuse, "fuse", fake_fuse)
    monkeypatch.chdir(tmp_path)
    status = cli.main(["fuse", "a.safetensors", "b.safetensors", "-o", "f.safetensors", "-q"])
    assert status == 2
    assert seen["config"] == FusionConfig.from_recipe("data-free")
    assert seen["example_input"].shape == (2, 1, 28, 28)  # the recorded input shape
    assert seen["progress"] is False  # -q
    args = ["--solver", "exact", "--no-refine", "--seed", "3", "--stages", "none"]
    cli.main(["fuse", "a.safetensors", "b.safetensors", "-o", "f.safetensors", *args])
    want = FusionConfig.from_recipe("data-free").replace(
        solver="exact", refine=False, seed=3, stages=()
    )
    assert seen["config"] == want and seen["progress"] is True
    assert set(seen) == {"config", "data", "example_input", "progress"}  # no loose options


def test_safetensors_outputs_load_without_otfuse(work, results):
    """The fused file is a plain safetensors file of the anchor's state_dict."""
    succeeded(results["fuse permuted"])
    tensors = safetensors.torch.load_file(str(work / "junk.safetensors"))
    assert set(tensors) == set(mlp(0).state_dict())


def test_device_runs_the_fusion_there_or_fails_in_one_line(work, monkeypatch, capsys):
    args = ["fuse", "a.safetensors", "b.safetensors", "--recipe", "paper-wts", "--quiet"]
    status, _, err = call(work, monkeypatch, capsys, *args, "--device", "auto", "-o", "dev.pt")
    assert status == 0, err
    assert load_state_dict(work / "dev.pt").metadata["config"]["recipe"] == "paper-wts"
    if not torch.cuda.is_available():
        status, _, err = call(work, monkeypatch, capsys, *args, "--device", "cuda", "-o", "x.pt")
        assert status == 2 and not (work / "x.pt").exists()
        one_line_error(err, "--device cuda", "CUDA is not available")


MUTATING_MODULE = """
from torch import nn

class Doubles(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        x.mul_(2.0)  # changes its input in place
        return self.net(x)

def make_net():
    return Doubles()
"""


def test_a_model_that_changes_its_input_is_evaluated_and_fused_on_the_data_as_given(
    tmp_path, monkeypatch, capsys
):
    """The trial run of each model, the fusion and every row of ``--eval`` see the data as the
    user gave it: the same model twice scores the same on every row, and fusing it with itself
    returns it. Before, each run doubled the inputs for the next (91.67% against 100.00%)."""
    (tmp_path / "mutnet.py").write_text(MUTATING_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model = importlib.import_module("mutnet").make_net().eval()
    save_model(tmp_path / "m.safetensors", model)
    inputs = torch.randn(120, 1, 8, 8)
    with torch.no_grad():
        labels = model(inputs.clone()).argmax(1)  # its own predictions: 100% on the data as given
    torch.save({"inputs": inputs, "labels": labels}, tmp_path / "d.pt")
    arch = ["--arch", "mutnet:make_net", "--in-shape", "1x8x8"]
    call_ok(tmp_path, monkeypatch, capsys, "fuse", "m.safetensors", "m.safetensors", *arch,
            "--data", "d.pt", "--eval", "-o", "f.safetensors")  # fmt: skip
    ckpt = load_state_dict(tmp_path / "f.safetensors")
    rows = {r["model"]: r["accuracy"] for r in ckpt.metadata["evaluation"]["rows"]}
    assert set(rows.values()) == {100.0}, rows
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ckpt.state_dict[key], value, atol=1e-5, rtol=1e-5)


def test_an_existing_sidecar_needs_force(work, monkeypatch, capsys):
    (work / "theirs.safetensors.json").write_text('{"mine": 1}')
    args = ["a.safetensors", "b.safetensors", "--recipe", "paper-wts", "-o", "theirs.safetensors"]
    status, _, err = call(work, monkeypatch, capsys, "fuse", *args)
    assert status != 0
    assert one_line_error(err, "theirs.safetensors.json exists", "--force")
    assert (work / "theirs.safetensors.json").read_text() == '{"mine": 1}'
    assert not (work / "theirs.safetensors").exists()
    call_ok(work, monkeypatch, capsys, "fuse", *args, "--force")
    assert load_state_dict(work / "theirs.safetensors").metadata["config"]["recipe"] == "paper-wts"
