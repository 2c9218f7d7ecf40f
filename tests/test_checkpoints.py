"""Tests of otfuse.checkpoints: safe reading, one-line refusals, atomic writing."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from otfuse import zoo
from otfuse.checkpoints import (
    Architecture,
    ArchitectureUnknownError,
    Checkpoint,
    architecture_record,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    check_finite,
    check_fits,
    load_into,
    load_model,
    load_state_dict,
    read_architecture,
    recorded_in_shape,
    save_model,
    sha256_file,
)
from otfuse.errors import CheckpointError, OtfuseError


@pytest.fixture
def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def fresh_model() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def assert_same_weights(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)  # safetensors stores names sorted
    for key in want:
        assert torch.equal(got[key], want[key]), key


def assert_computes_like(model: nn.Module, ckpt: Checkpoint) -> None:
    """A fresh model loaded from ``ckpt`` gives the same outputs as ``model``."""
    other = load_into(fresh_model(), ckpt)
    x = torch.randn(5, 4)
    assert torch.equal(other(x), model(x))


def refused(path: Path, *words: str) -> str:
    """Loading ``path`` raises a one-line CheckpointError naming the file and holding ``words``."""
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    message = str(err.value)
    assert "\n" not in message
    assert " --" not in message, "a library error speaks of command-line flags"
    assert str(path) in message
    for word in words:
        assert word in message, message
    return message


class RunsCode:
    """Unpickling this creates ``marker`` through os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# --------------------------------------------------------------------------------------------------
# Round trips


def test_safetensors_round_trip_with_sidecar_metadata(tmp_path, model):
    out = tmp_path / "fused.safetensors"
    meta = {"epoch": 3, "source": tmp_path / "a.pt", "pair": (1, 2), "acc": np.float64(0.5)}
    assert save_model(out, model, meta) == out
    ckpt = load_state_dict(out)
    assert ckpt.format == "safetensors"
    assert_same_weights(ckpt.state_dict, model.state_dict())
    assert ckpt.metadata == {
        "epoch": 3,
        "source": str(tmp_path / "a.pt"),
        "pair": [1, 2],
        "acc": 0.5,
    }
    assert ckpt.sha256 == sha256_file(out) == hashlib.sha256(out.read_bytes()).hexdigest()
    sidecar = json.loads((tmp_path / "fused.safetensors.json").read_text())
    assert sidecar["sha256"] == ckpt.sha256 and sidecar["metadata"]["epoch"] == 3
    assert_computes_like(model, ckpt)


def test_pt_round_trip_is_a_plain_state_dict(tmp_path, model):
    out = tmp_path / "fused.pt"
    save_model(out, model, {"epoch": 1})
    ckpt = load_state_dict(out)
    assert ckpt.format == "pt" and ckpt.metadata == {"epoch": 1}
    assert_same_weights(ckpt.state_dict, model.state_dict())
    assert list(ckpt.state_dict) == list(model.state_dict())  # .pt keeps the model's order
    plain = torch.load(out, weights_only=True)  # readable by anyone, no otfuse needed
    assert_same_weights(plain, model.state_dict())


def test_format_is_told_by_content_not_suffix(tmp_path, model):
    save_model(tmp_path / "weights", model)  # no suffix: safetensors
    torch.save(model.state_dict(), tmp_path / "weights.tar")
    torch.save(model.state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert load_state_dict(tmp_path / "weights").format == "safetensors"
    for name in ("weights.tar", "legacy.pth"):
        ckpt = load_state_dict(tmp_path / name)
        assert ckpt.format == "pt"
        assert_same_weights(ckpt.state_dict, model.state_dict())


def test_tied_and_non_contiguous_tensors_are_saved(tmp_path):
    weight = torch.randn(3, 4)
    state = {"a": weight, "b": weight, "t": weight.t()}  # shared storage, a transposed view
    save_model(tmp_path / "tied.safetensors", state)
    assert_same_weights(load_state_dict(tmp_path / "tied.safetensors").state_dict, state)


def test_safetensors_header_metadata_is_read(tmp_path, model):
    path = tmp_path / "hub.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path), metadata={"format": "pt"})
    assert load_state_dict(path).metadata == {"format": "pt"}


# --------------------------------------------------------------------------------------------------
# Wrapped checkpoints and prefixes


@pytest.mark.parametrize("key", ["model_state_dict", "state_dict", "model"])
def test_wrapped_checkpoint_keeps_plain_values_as_metadata(tmp_path, model, key):
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()  # its state now holds tensors: not metadata
    path = tmp_path / "otfusion.checkpoint"
    args = argparse.Namespace(dataset="mnist", widths=(400, 200), lr=0.01)
    torch.save(
        {
            "args": args,
            "test_accuracy": torch.tensor(97.5),
            "epoch": 10,
            "best": np.float64(0.9),
            key: model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
        },
        path,
    )
    ckpt = load_state_dict(path)
    assert_same_weights(ckpt.state_dict, model.state_dict())
    assert ckpt.metadata == {
        "args": {"dataset": "mnist", "widths": [400, 200], "lr": 0.01},
        "test_accuracy": 97.5,
        "epoch": 10,
        "best": 0.9,
    }


def test_plain_values_beside_a_plain_state_dict_are_metadata(tmp_path, model):
    torch.save({**model.state_dict(), "epoch": 4}, tmp_path / "m.pt")
    ckpt = load_state_dict(tmp_path / "m.pt")
    assert_same_weights(ckpt.state_dict, model.state_dict())
    assert ckpt.metadata == {"epoch": 4}


def test_data_parallel_prefix_is_stripped(tmp_path, model):
    torch.save(nn.DataParallel(model).state_dict(), tmp_path / "ddp.pt")
    ckpt = load_state_dict(tmp_path / "ddp.pt")
    assert_same_weights(ckpt.state_dict, model.state_dict())


@pytest.mark.parametrize(
    "prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."]
)
def test_wrapper_prefixes_are_stripped(tmp_path, model, prefix):
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, tmp_path / "m.pt")
    assert_same_weights(load_state_dict(tmp_path / "m.pt").state_dict, model.state_dict())


def test_prefix_kept_unless_every_key_has_it(tmp_path):
    state = {"module.w": torch.ones(1), "head.w": torch.ones(1)}
    torch.save(state, tmp_path / "m.pt")
    assert list(load_state_dict(tmp_path / "m.pt").state_dict) == ["module.w", "head.w"]


# --------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_that_runs_code_is_refused_and_never_run(tmp_path, legacy):
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(RunsCode(control)))  # the payload is real: plain pickle runs it
    assert control.exists()
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    payload = {"w": torch.ones(2), "x": RunsCode(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    message = refused(path, "would run code on load", "system", "re-save it as a plain state_dict")
    assert message.endswith("re-save it as a plain state_dict or safetensors")
    assert not marker.exists()


def test_pickled_module_is_refused(tmp_path, model):
    torch.save(model, tmp_path / "whole.pt")
    refused(tmp_path / "whole.pt", "would run code on load", "Sequential")


def _zip_cut_in_half(path: Path) -> None:
    torch.save({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _legacy_cut_in_half(path: Path) -> None:
    torch.save({"w": torch.randn(64, 64)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _safetensors_cut_in_half(path: Path) -> None:
    safetensors.torch.save_file({"w": torch.randn(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _safetensors_broken_header(path: Path) -> None:
    safetensors.torch.save_file({"w": torch.randn(4)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"{not json" + data[17:])


def _safetensors_huge_header(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 10**12) + b'{"w": {}}')


BAD_FILES = {
    "missing": ("m.pt", lambda p: None, ["does not exist"]),
    "empty": ("m.pt", lambda p: p.write_bytes(b""), ["empty"]),
    "directory": ("m.pt", lambda p: p.mkdir(), ["is a directory"]),
    "zip cut in half": ("m.pt", _zip_cut_in_half, ["truncated or corrupt"]),
    "legacy cut in half": ("m.pt", _legacy_cut_in_half, ["truncated or corrupt"]),
    "safetensors cut in half": ("m.safetensors", _safetensors_cut_in_half, ["not a valid"]),
    "safetensors broken header": ("m.safetensors", _safetensors_broken_header, ["not a valid"]),
    "safetensors huge header": ("m.safetensors", _safetensors_huge_header, ["not a valid"]),
    "text": ("m.pt", lambda p: p.write_text("hello, world\n"), ["not a checkpoint", "hello"]),
    "text without suffix": ("notes", lambda p: p.write_text("x" * 100), ["not a checkpoint"]),
    "git lfs pointer": (
        "m.bin",
        lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\n"),
        ["Git LFS pointer", "git lfs pull"],
    ),
    "torch.save of a list": ("m.pt", lambda p: torch.save([1, 2, 3], p), ["holds a list"]),
    "bare pickle of a list": ("m.pt", lambda p: p.write_bytes(pickle.dumps([1, 2])), ["pickle"]),
    "old pickle protocol": (
        "m.pt",
        lambda p: p.write_bytes(pickle.dumps([1, 2], protocol=2)),
        ["pickle"],
    ),
    "dict without tensors": (
        "m.pt",
        lambda p: torch.save({"epoch": 3, "acc": 0.9}, p),
        ["holds no tensors", "'epoch'", "model_state_dict"],
    ),
    "state dict with a non-tensor": (
        "m.pt",
        lambda p: torch.save({"state_dict": {"w": torch.ones(1), "b": [1]}}, p),
        ["'b'", "list"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_refused_in_one_line(tmp_path, case):
    name, build, words = BAD_FILES[case]
    path = tmp_path / name
    build(path)
    refused(path, *words)


def test_check_finite_names_the_first_bad_tensor(model):
    state = model.state_dict()
    check_finite(state, "a.pt")
    state["2.weight"] = state["2.weight"].clone()
    state["2.weight"][0, 0] = float("nan")
    state["2.weight"][1, 0] = float("inf")
    with pytest.raises(CheckpointError) as err:
        check_finite({**state, "steps": torch.tensor([5])}, "a.pt")
    message = str(err.value)
    assert "\n" not in message
    assert "a.pt: tensor '2.weight' holds 1 NaN and 1 Inf values" in message


def test_check_fits_names_missing_and_unexpected_keys(model):
    state = dict(model.state_dict())
    state["extra.weight"] = state.pop("2.weight")
    with pytest.raises(CheckpointError) as err:
        check_fits(state, model, "a.pt")
    message = str(err.value)
    assert "\n" not in message
    assert "missing '2.weight'" in message and "unexpected 'extra.weight'" in message


def test_check_fits_names_a_shape_mismatch(model):
    wide = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(CheckpointError) as err:
        load_into(model, wide.state_dict())
    message = str(err.value)
    assert "\n" not in message
    assert "'0.weight' has shape (5, 4) in the checkpoint but (3, 4) in the model" in message


def test_load_into_loads_a_fitting_checkpoint(tmp_path, model):
    save_model(tmp_path / "m.safetensors", model)
    assert_computes_like(model, load_state_dict(tmp_path / "m.safetensors"))


# --------------------------------------------------------------------------------------------------
# Writing


def test_existing_output_is_refused_without_overwrite(tmp_path, model):
    out = tmp_path / "fused.safetensors"
    save_model(out, model, {"run": 1})
    before = out.read_bytes()
    with pytest.raises(CheckpointError) as err:
        save_model(out, fresh_model(), {"run": 2})
    assert str(err.value) == f"{out} exists; pass overwrite=True to replace it"
    assert out.read_bytes() == before
    save_model(out, fresh_model(), {"run": 2}, overwrite=True)
    ckpt = load_state_dict(out)
    assert ckpt.metadata == {"run": 2}
    assert_same_weights(ckpt.state_dict, fresh_model().state_dict())


def test_an_existing_sidecar_is_refused_without_overwrite(tmp_path, model):
    """``OUT.json`` is the checkpoint's too: a file of the user's by that name is not replaced."""
    out = tmp_path / "fused.safetensors"
    Path(f"{out}.json").write_text('{"mine": 1}')
    with pytest.raises(CheckpointError, match="fused.safetensors.json exists"):
        save_model(out, model)
    assert Path(f"{out}.json").read_text() == '{"mine": 1}' and not out.exists()


def test_a_sidecar_that_cannot_be_written_leaves_no_weights(tmp_path, model):
    out = tmp_path / "fused.safetensors"
    Path(f"{out}.json").mkdir()  # a folder where the sidecar goes
    with pytest.raises(OtfuseError, match="cannot write"):
        save_model(out, model, overwrite=True)
    assert not out.exists()  # was: the weights without their sidecar


def _fail_midway(tensors, filename, *args, **kwargs):
    Path(filename).write_bytes(b"half a checkpoint")
    raise RuntimeError("disk on fire")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_failure_while_saving_leaves_no_file(tmp_path, model, monkeypatch, suffix):
    monkeypatch.setattr(safetensors.torch, "save_file", _fail_midway)
    monkeypatch.setattr(torch, "save", _fail_midway)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_model(tmp_path / f"fused{suffix}", model, {"epoch": 1})
    assert list(tmp_path.iterdir()) == []


def test_failure_while_overwriting_keeps_the_old_file(tmp_path, model, monkeypatch):
    out = tmp_path / "fused.safetensors"
    save_model(out, model)
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir())
    monkeypatch.setattr(safetensors.torch, "save_file", _fail_midway)
    with pytest.raises(RuntimeError):
        save_model(out, fresh_model(), overwrite=True)
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir()) == before


def test_metadata_that_is_not_json_is_refused_before_writing(tmp_path, model):
    with pytest.raises(CheckpointError) as err:
        save_model(tmp_path / "m.safetensors", model, {"model": model})
    message = str(err.value)
    assert "\n" not in message and "'model'" in message and "Sequential" in message
    assert list(tmp_path.iterdir()) == []


def test_format_must_agree_with_suffix(tmp_path, model):
    with pytest.raises(CheckpointError, match="suffix .pt"):
        save_model(tmp_path / "m.pt", model, format="safetensors")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        save_model(tmp_path / "m", model, format="onnx")
    save_model(tmp_path / "m", model, format="pt")
    assert load_state_dict(tmp_path / "m").format == "pt"


def test_sidecar_named_after_the_stem_is_read(tmp_path, model):
    out = tmp_path / "fused.safetensors"
    save_model(out, model, {"epoch": 2})
    (tmp_path / "fused.safetensors.json").rename(tmp_path / "fused.json")
    assert load_state_dict(out).metadata == {"epoch": 2}


def test_unrelated_or_stale_sidecars_are_ignored(tmp_path, model):
    out = tmp_path / "fused.safetensors"
    save_model(out, model, {"epoch": 2})
    (tmp_path / "fused.json").write_text('{"accuracy": 0.9}')  # someone else's results file
    safetensors.torch.save_file(fresh_model().state_dict(), str(out))  # weights changed since
    with pytest.warns(UserWarning, match="older fused.safetensors"):
        ckpt = load_state_dict(out)
    assert ckpt.metadata == {}


# --------------------------------------------------------------------------------------------------
# Atomic writing of any file


def test_atomic_writes_create_parents_and_usual_permissions(tmp_path):
    out = atomic_write_text(tmp_path / "a" / "b" / "result.json", '{"ok": true}\n')
    assert out.read_text() == '{"ok": true}\n'
    atomic_write_bytes(out, b"\x89PNG")
    assert out.read_bytes() == b"\x89PNG"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.json"]


def test_atomic_path_keeps_the_suffix_and_replaces_on_success(tmp_path):
    out = tmp_path / "plot.png"
    out.write_bytes(b"old")
    with atomic_path(out) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp != out
        tmp.write_bytes(b"new")
        assert out.read_bytes() == b"old"  # nothing visible until the block succeeds
    assert out.read_bytes() == b"new"
    assert sorted(tmp_path.iterdir()) == [out]


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_atomic_path_cleans_up_on_failure(tmp_path, error):
    out = tmp_path / "table.csv"
    with pytest.raises(error):
        with atomic_path(out) as tmp:
            tmp.write_text("a,b\n1,")
            raise error()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Architectures recorded in checkpoints

CHECKPOINT_NET = """
from torch import nn

def make(width=3):
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))
"""


def test_a_zoo_model_records_its_config_and_builds_without_importing(tmp_path):
    torch.manual_seed(0)
    model = zoo.create("mlpnet", hidden=(6,), in_shape=(1, 4, 4), num_classes=3)
    record = architecture_record(model)
    assert record == model.otfuse_config and record["in_shape"] == [1, 4, 4]
    save_model(tmp_path / "m.safetensors", model, {"arch": record})
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.architecture.target == "mlpnet" and loaded.in_shape == (1, 4, 4)
    assert not loaded.model.training
    x = torch.rand(2, 1, 4, 4)
    assert torch.equal(loaded.model(x), model.eval()(x))


def test_a_callable_is_recorded_but_imported_only_when_asked(tmp_path, monkeypatch):
    (tmp_path / "checkpoint_net.py").write_text(CHECKPOINT_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    arch = Architecture("checkpoint_net:make", {"width": 5})
    model = arch.build()
    record = architecture_record(model, arch, in_shape=(4,))
    assert record == {"callable": "checkpoint_net:make", "kwargs": {"width": 5}, "in_shape": [4]}
    assert read_architecture({"arch": record}) == Architecture(
        "checkpoint_net:make", {"width": 5}, (4,)
    )
    assert recorded_in_shape({"arch": record}) == (4,)
    save_model(tmp_path / "c.safetensors", model, {"arch": record})
    with pytest.raises(ArchitectureUnknownError) as err:
        load_model(tmp_path / "c.safetensors")  # a file never makes otfuse import code
    assert err.value.recorded.target == "checkpoint_net:make"
    assert " --" not in str(err.value)
    assert load_model(tmp_path / "c.safetensors", allow_import=True).in_shape == (4,)
    # the same callable given without arguments: the record's fill them in
    loaded = load_model(tmp_path / "c.safetensors", Architecture("checkpoint_net:make"))
    assert loaded.model[0].out_features == 5 and loaded.architecture.kwargs == {"width": 5}


def test_no_record_and_broken_builders_are_one_line_errors(tmp_path, monkeypatch, model):
    save_model(tmp_path / "bare.safetensors", model)
    with pytest.raises(ArchitectureUnknownError) as err:
        load_model(tmp_path / "bare.safetensors")
    assert err.value.recorded is None and "records no architecture" in str(err.value)
    assert read_architecture({}) is None and recorded_in_shape({"arch": "x"}) is None
    with pytest.raises(OtfuseError, match="cannot import no_such_module"):
        Architecture("no_such_module:make").build()
    (tmp_path / "raising_net.py").write_text("def make():\n    raise ValueError('bad width')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(OtfuseError, match="raised ValueError: bad width"):
        Architecture("raising_net:make").build()
    assert architecture_record(model) == {"class": "torch.nn.modules.container.Sequential"}
