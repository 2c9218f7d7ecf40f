"""--data with the user's own inputs: a .pt, an .npy and a folder of images, for fuse, eval and
interpolate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from otfuse import zoo
from otfuse.checkpoints import load_state_dict
from otfuse.data import Dataset, load_dataset
from otfuse.training import evaluate

from .util import call_ok, succeeded


def model_of(work, name: str):
    ckpt = load_state_dict(work / name)
    model = zoo.create(**ckpt.metadata["arch"])
    model.load_state_dict(ckpt.state_dict)
    return model


def first_test_images(n: int) -> Dataset:
    return load_dataset("fashion-mnist", "test").subset(torch.arange(n))


def test_fuse_with_a_pt_file_runs_the_data_recipe_on_it(work, results):
    proc = succeeded(results["fuse own .pt"])
    assert "with recipe data on 60 inputs of own.pt" in proc.stdout
    metadata = json.loads((work / "own_pt.safetensors.json").read_text())["metadata"]
    assert metadata["config"]["recipe"] == "data"
    assert metadata["inputs"] == "data" and metadata["sample"] == 60
    assert metadata["data"] == {
        "path": "own.pt",
        "kind": "tensor file",
        "examples": 300,
        "input_shape": [1, 28, 28],
        "labels": True,
    }
    rows = metadata["evaluation"]["rows"]  # --eval: on the same labelled inputs
    fused = model_of(work, "own_pt.safetensors")
    assert evaluate(fused, first_test_images(300)).accuracy == pytest.approx(rows[-1]["accuracy"])


@pytest.mark.parametrize(
    ("data", "extra", "kind", "examples"),
    [
        ("own.npy", [], "tensor file", 300),
        ("imgs", ["--normalize", "fashion-mnist"], "image folder", 60),
    ],
)
def test_fuse_with_an_npy_file_and_an_image_folder(
    work, monkeypatch, capsys, data, extra, kind, examples
):
    out = f"fused_{kind.split()[0]}.safetensors"
    call_ok(work, monkeypatch, capsys, "fuse", "a.safetensors", "b.safetensors", "--data", data,
            *extra, "--num-samples", "40", "-o", out, "-q")  # fmt: skip
    metadata = json.loads((work / f"{out}.json").read_text())["metadata"]
    assert metadata["config"]["recipe"] == "data" and metadata["inputs"] == "data"
    assert metadata["data"]["path"] == data and metadata["data"]["kind"] == kind
    assert metadata["data"]["examples"] == examples and metadata["sample"] == 40


def test_eval_on_own_files_with_labels(work, monkeypatch, capsys):
    model = model_of(work, "a.safetensors")
    want = evaluate(model, first_test_images(300))
    for args in (["own.pt"], ["own.npy", "--labels", "own_labels.npy"]):
        report = json.loads(call_ok(work, monkeypatch, capsys, "eval", "a.safetensors", "--data",
                                    *args, "--json"))  # fmt: skip
        assert report["accuracy"] == pytest.approx(want.accuracy)
        assert report["loss"] == pytest.approx(want.loss, rel=1e-5)
        assert report["data"]["examples"] == 300 and report["data"]["labels"] is True


def test_eval_on_an_image_folder_reads_labels_from_the_sub_folders(work, monkeypatch, capsys):
    test = first_test_images(60)
    report = json.loads(call_ok(work, monkeypatch, capsys, "eval", "a.safetensors", "--data",
                                "imgs", "--normalize", "fashion-mnist", "--json"))  # fmt: skip
    # the PNGs hold the pixels rounded to bytes: the same images up to 1/255
    model = model_of(work, "a.safetensors")
    pixels = (test.images * 0.3530 + 0.2860).clamp(0, 1).mul(255).round() / 255
    order = np.argsort(test.labels.numpy(), kind="stable")  # files are read class by class
    again = Dataset("imgs", "all", ((pixels - 0.2860) / 0.3530)[order], test.labels[order],
                    test.classes)  # fmt: skip
    want = evaluate(model, again)
    assert report["accuracy"] == pytest.approx(want.accuracy)
    assert report["loss"] == pytest.approx(want.loss, rel=1e-4)
    assert report["data"]["kind"] == "image folder" and report["data"]["examples"] == 60


@pytest.mark.parametrize("data", [["own.pt"], ["imgs", "--normalize", "mean=0.2860,std=0.3530"]])
def test_interpolate_with_own_data(work, monkeypatch, capsys, data):
    folder = f"path_{data[0].split('.')[0]}"
    report = json.loads(call_ok(work, monkeypatch, capsys, "interpolate", "a.safetensors",
                                "a_perm.safetensors", "--data", *data, "--steps", "3", "-o",
                                folder, "--json"))  # fmt: skip
    assert abs(report["aligned"]["loss_barrier"]) < 1e-4  # aligned B is A
    assert report["plain"]["loss_barrier"] > 0.05
    assert report["data"]["path"] == data[0] and report["data"]["labels"] is True
    assert (work / folder / "interpolation.png").exists()
