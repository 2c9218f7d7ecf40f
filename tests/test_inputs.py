"""Tests of otfuse.inputs: users' own tensor files and image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from otfuse.errors import DataError
from otfuse.inputs import load_inputs

X = torch.rand(6, 1, 4, 4)
Y = torch.tensor([0, 1, 2, 0, 1, 2])


def refused(path, *words, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        load_inputs(path, **kwargs)
    message = str(err.value)
    assert "\n" not in message and " --" not in message  # one line, no command-line words
    for word in words:
        assert word in message, message
    return message


@pytest.mark.parametrize(
    "obj",
    [
        {"inputs": X, "labels": Y},
        {"images": X, "targets": Y},
        {"X": X, "y": Y},
        (X, Y),
        [X, Y],
        {"features": X, "label": Y, "note_count": torch.tensor(3)},
    ],
    ids=["inputs/labels", "images/targets", "X/y", "tuple", "list", "features/label"],
)
def test_pt_files_with_inputs_and_labels(tmp_path, obj):
    torch.save(obj, tmp_path / "d.pt")
    data = load_inputs(tmp_path / "d.pt")
    assert torch.equal(data.inputs, X) and torch.equal(data.labels, Y)
    assert data.kind == "tensor file" and data.input_shape == (1, 4, 4) and data.num_classes == 3
    assert torch.equal(data.dataset().images, X)


def test_a_bare_tensor_and_uint8_pixels(tmp_path):
    torch.save(X, tmp_path / "x.pth")
    data = load_inputs(tmp_path / "x.pth")
    assert torch.equal(data.inputs, X) and data.labels is None
    pixels = (X * 255).round().to(torch.uint8)
    np.save(tmp_path / "p.npy", pixels.numpy())
    scaled = load_inputs(tmp_path / "p.npy").inputs
    assert scaled.dtype == torch.float32 and torch.allclose(scaled, pixels.float() / 255)


def test_npy_npz_and_safetensors(tmp_path):
    np.save(tmp_path / "x.npy", X.numpy())
    np.save(tmp_path / "y.npy", Y.numpy())
    data = load_inputs(tmp_path / "x.npy", labels=tmp_path / "y.npy")
    assert torch.equal(data.inputs, X) and torch.equal(data.labels, Y)
    np.savez(tmp_path / "d.npz", images=X.numpy(), labels=Y.numpy())
    assert torch.equal(load_inputs(tmp_path / "d.npz").labels, Y)
    safetensors.torch.save_file({"inputs": X, "labels": Y}, str(tmp_path / "d.safetensors"))
    assert torch.equal(load_inputs(tmp_path / "d.safetensors").inputs, X)
    safetensors.torch.save_file({"anything": X}, str(tmp_path / "one.safetensors"))
    assert load_inputs(tmp_path / "one.safetensors").labels is None


def test_normalisation_per_channel(tmp_path):
    x = torch.rand(4, 3, 2, 2)
    torch.save(x, tmp_path / "x.pt")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    data = load_inputs(tmp_path / "x.pt", normalize=(mean, std))
    want = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(data.inputs, want)
    refused(tmp_path / "x.pt", "2 mean values for 3 channels", normalize=((0.1, 0.2), (1.0,)))


def write_png(path: Path, array: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def test_image_folder_with_class_sub_folders(tmp_path):
    rng = np.random.default_rng(0)
    grey = [rng.integers(0, 256, (5, 4), dtype=np.uint8) for _ in range(3)]
    write_png(tmp_path / "imgs" / "cat" / "a.png", grey[0], "L")
    write_png(tmp_path / "imgs" / "cat" / "b.png", grey[1], "L")
    write_png(tmp_path / "imgs" / "dog" / "sub" / "c.png", grey[2], "L")
    (tmp_path / "imgs" / "dog" / "readme.txt").write_text("not an image")
    data = load_inputs(tmp_path / "imgs")
    assert data.kind == "image folder" and data.inputs.shape == (3, 1, 5, 4)
    assert data.labels.tolist() == [0, 0, 1] and data.classes == ("cat", "dog")
    assert torch.allclose(data.inputs[2, 0], torch.from_numpy(grey[2]).float() / 255)
    assert data.dataset().classes == ("cat", "dog")


def test_integer_folders_are_labels_and_colour_makes_rgb(tmp_path):
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    write_png(tmp_path / "imgs" / "7" / "a.png", rgb, "RGB")
    write_png(tmp_path / "imgs" / "2" / "b.png", np.full((4, 4), 128, np.uint8), "L")
    data = load_inputs(tmp_path / "imgs")
    assert data.labels.tolist() == [2, 7] and data.num_classes == 8
    assert data.inputs.shape == (2, 3, 4, 4)
    assert torch.allclose(data.inputs[0], torch.full((3, 4, 4), 128 / 255))
    assert data.inputs[1, 0].min() == 1 and data.inputs[1, 1:].max() == 0


def test_unlabelled_folder_and_folder_errors(tmp_path):
    write_png(tmp_path / "flat" / "a.png", np.zeros((3, 3), np.uint8), "L")
    data = load_inputs(tmp_path / "flat")
    assert data.labels is None and data.inputs.shape == (1, 1, 3, 3)
    with pytest.raises(DataError, match="holds no labels"):
        data.dataset()
    write_png(tmp_path / "flat" / "b.png", np.zeros((3, 4), np.uint8), "L")
    refused(tmp_path / "flat", "b.png is 4x3 pixels", "share one size")
    write_png(tmp_path / "mixed" / "a.png", np.zeros((3, 3), np.uint8), "L")
    write_png(tmp_path / "mixed" / "c" / "b.png", np.zeros((3, 3), np.uint8), "L")
    refused(tmp_path / "mixed", "both at its top and in sub-folders")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "no PNG or JPEG")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    refused(tmp_path / "bad", "x.png cannot be read as an image")


def test_bad_files_are_one_line_errors(tmp_path):
    refused(tmp_path / "gone.pt", "does not exist")
    (tmp_path / "notes.txt").write_text("hi")
    refused(tmp_path / "notes.txt", "unknown kind of input file '.txt'")
    torch.save({"inputs": X}, tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:100])
    refused(tmp_path / "cut.pt", "cannot be read as tensors")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    refused(tmp_path / "obj.npy", "Python objects")
    torch.save({"weights": X, "bias": X}, tmp_path / "nokey.pt")
    refused(tmp_path / "nokey.pt", "no inputs under any of the keys")
    torch.save(torch.zeros(0, 3), tmp_path / "empty.pt")
    refused(tmp_path / "empty.pt", "holds no inputs")
    torch.save(torch.arange(5), tmp_path / "flat.pt")
    refused(tmp_path / "flat.pt", "expected (N, ...)")
    torch.save(torch.ones(3, 2, dtype=torch.int64), tmp_path / "ints.pt")
    refused(tmp_path / "ints.pt", "int64", "uint8 pixels")
    nan = X.clone()
    nan[0, 0, 0, 0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    refused(tmp_path / "nan.pt", "1 NaN or infinite")
    torch.save((X, Y[:4]), tmp_path / "short.pt")
    refused(tmp_path / "short.pt", "6 inputs but 4 labels")
    torch.save((X, Y.float()), tmp_path / "floaty.pt")
    refused(tmp_path / "floaty.pt", "labels are float32")
    torch.save((X, -Y), tmp_path / "negative.pt")
    refused(tmp_path / "negative.pt", "labels include -2")
