"""The folder every command-line test runs in, and the batch of subprocess runs they share."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import permuted
from torch import nn

from otfuse.checkpoints import load_state_dict, save_model
from otfuse.data import load_dataset
from otfuse.training import TrainConfig, train

from .util import ARCH, USER_MODULE, mlp, run_all, save, user_net

WIDTH_MODULE = USER_MODULE  # imported through PYTHONPATH as widthnet


class RunsCode:
    """Unpickling this creates ``marker`` through os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    """Tiny trained MLPNets, a permuted copy, other architectures, users' own data files and
    modules, and every kind of bad file."""
    d = tmp_path_factory.mktemp("cli")
    train_set = load_dataset("fashion-mnist", "train")
    subset = train_set.subset(torch.arange(1000))
    for name, seed in (("a", 0), ("b", 1)):
        model = mlp(seed)
        train(model, subset, TrainConfig(epochs=1, seed=seed, num_threads=1), progress=False)
        save(d / f"{name}.safetensors", model)
    a = mlp(0)
    a.load_state_dict(load_state_dict(d / "a.safetensors").state_dict)
    a_perm, _ = permuted(a, torch.zeros(2, 1, 28, 28), seed=3)
    a_perm.otfuse_config = a.otfuse_config
    save(d / "a_perm.safetensors", a_perm)
    save(d / "wide.safetensors", mlp(2, hidden=(12, 8)))
    torch.manual_seed(0)
    from otfuse import zoo

    save(d / "conv.safetensors", zoo.create("convnet", width=0.125))
    torch.save(a.state_dict(), d / "plain.pt")
    _write_bad_files(d, a)
    _write_user_models(d)
    _write_own_data(d)
    (d / "existing.safetensors").write_bytes(b"keep me")
    (d / "junk.safetensors").write_bytes(b"replace me")
    (d / "bad.yaml").write_text("mdoe: acts\n")
    (d / "good.yaml").write_text(
        "mode: acts\nnum-samples: 20\nweights: [1, 3]\nrefine: true\nstages: bn_reset\n"
    )
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


def _write_user_models(d: Path) -> None:
    """usernet.py in the folder (found from the working directory), widthnet.py elsewhere (found
    through PYTHONPATH); checkpoints without a record, and with one (callable, kwargs, in_shape)."""
    (d / "usernet.py").write_text(USER_MODULE)
    for name, seed in (("user_a", 0), ("user_b", 1)):
        save_model(d / f"{name}.safetensors", user_net(16, seed))
    (d / "mods").mkdir()
    (d / "mods" / "widthnet.py").write_text(USER_MODULE)
    for width, seed in ((16, 0), (12, 1)):
        net = user_net(width, seed)
        save_model(d / f"w{width}.safetensors", net)  # no record: --arch per checkpoint
        record = {"callable": "usernet:make_net", "kwargs": {"width": width}, "in_shape": [1, 8, 8]}
        save_model(d / f"rec{width}.safetensors", net, {"arch": record})


def _write_own_data(d: Path) -> None:
    """The first 300 test images as a .pt (with labels), an .npy (and labels beside it), and the
    first 60 as PNG files in class sub-folders (pixels, not normalised)."""
    from PIL import Image

    test = load_dataset("fashion-mnist", "test").subset(torch.arange(300))
    torch.save({"inputs": test.images, "labels": test.labels}, d / "own.pt")
    np.save(d / "own.npy", test.images.numpy())
    np.save(d / "own_labels.npy", test.labels.numpy())
    pixels = (test.images * 0.3530 + 0.2860).clamp(0, 1).mul(255).round().to(torch.uint8)
    for i in range(60):
        folder = d / "imgs" / str(int(test.labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i, 0].numpy(), "L").save(folder / f"{i:03d}.png")
    small = torch.rand(10, 3, 8, 8)
    torch.save(small, d / "small.pt")  # inputs no MLPNet of 1x28x28 takes
    bad = test.images[:10].numpy().copy()
    bad[0, 0, 0, 0] = np.nan
    np.save(d / "nan.npy", bad)
    np.save(d / "short_labels.npy", test.labels[:5].numpy())
    np.save(d / "objects.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    (d / "broken.pt").write_bytes((d / "own.pt").read_bytes()[:200])


# --------------------------------------------------------------------------------------------------
# The subprocess runs: id -> args, or (args, extra environment)

FAILURE_RUNS = {
    "pickle that runs code": ["fuse", "a.safetensors", "evil.pt", "-o", "out.safetensors"],
    "unknown option": [
        "fuse",
        "a.safetensors",
        "b.safetensors",
        "--bogus",
        "-o",
        "out.safetensors",
    ],
}


def subprocess_runs(work: Path) -> dict:
    widthnet = {
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(work / "mods"), os.environ.get("PYTHONPATH")])
        )
    }
    return {
        "train": ["train", "--arch", ARCH, "--data", "fashion-mnist", "-o", "trained.safetensors",
                  "--subset", "500", "--epochs", "1", "--seed", "4", "--json"],
        "train diverges": ["train", "--arch", ARCH, "--data", "fashion-mnist", "--subset", "200",
                           "--lr", "1e6", "-o", "diverged.safetensors"],
        "fuse permuted": ["fuse", "a.safetensors", "a_perm.safetensors", "-o", "junk.safetensors",
                          "--force", "--json"],
        "fuse with data": ["fuse", "a.safetensors", "b.safetensors", "--data", "fashion-mnist",
                           "--num-samples", "50", "--eval", "--format", "pt", "-o", "fused.pt"],
        "fuse own .pt": ["fuse", "a.safetensors", "b.safetensors", "--data", "own.pt",
                         "--num-samples", "60", "--eval", "-o", "own_pt.safetensors"],
        "fuse widths by arch": (
            ["fuse", "w16.safetensors", "w12.safetensors", "--arch", "widthnet:make_net:width=16",
             "--arch", "widthnet:make_net:width=12", "--in-shape", "1x8x8", "--recipe", "paper-wts",
             "-o", "widths_user.safetensors"],
            widthnet,
        ),
        "quiet": ["fuse", "a.safetensors", "b.safetensors", "--data", "fashion-mnist",
                  "--num-samples", "40", "--eval", "-q", "-o", "quiet.safetensors"],
        "wrong in-shape": ["fuse", "a.safetensors", "b.safetensors", "--in-shape", "3x5x5",
                           "-o", "out.safetensors"],
        "eval": ["eval", "a.safetensors", "--data", "fashion-mnist", "--json"],
        "inspect": ["inspect", "a.safetensors"],
        "interpolate": ["interpolate", "a.safetensors", "a_perm.safetensors", "--data",
                        "fashion-mnist", "--steps", "5", "-o", "path", "--json"],
        **FAILURE_RUNS,
    }  # fmt: skip


@pytest.fixture(scope="session")
def results(work) -> dict[str, subprocess.CompletedProcess]:
    """Every subprocess run, concurrently: id -> finished process."""
    return run_all(work, subprocess_runs(work))
