"""--arch per checkpoint, the input shape from a checkpoint's record, and ARCH's syntax."""

from __future__ import annotations

import json

import pytest

from otfuse import cli
from otfuse.checkpoints import load_state_dict
from otfuse.cli.models import parse_arch

from .util import call_ok, succeeded


def test_two_widths_of_a_custom_architecture_one_arch_each(work, results):
    """widthnet is importable only through PYTHONPATH (it is not in the working folder)."""
    proc = succeeded(results["fuse widths by arch"])
    assert "fused 2 models" in proc.stdout
    ckpt = load_state_dict(work / "widths_user.safetensors")
    assert ckpt.state_dict["1.weight"].shape == (16, 64)  # the anchor's width
    assert ckpt.metadata["arch"] == {
        "callable": "widthnet:make_net",
        "kwargs": {"width": 16},
        "in_shape": [1, 8, 8],
    }
    widths = [c["arch"]["kwargs"]["width"] for c in ckpt.metadata["checkpoints"]]
    assert widths == [16, 12]


def test_the_input_shape_and_arguments_come_from_the_record(work, monkeypatch, capsys):
    # rec16/rec12 record usernet:make_net with their width and in_shape 1x8x8: no --in-shape
    call_ok(work, monkeypatch, capsys, "fuse", "rec16.safetensors", "rec12.safetensors", "--arch",
            "usernet:make_net", "--recipe", "paper-wts", "-o", "rec.safetensors", "-q")  # fmt: skip
    ckpt = load_state_dict(work / "rec.safetensors")
    assert ckpt.state_dict["1.weight"].shape == (16, 64)
    assert ckpt.metadata["arch"]["in_shape"] == [1, 8, 8]
    out = call_ok(work, monkeypatch, capsys, "inspect", "rec.safetensors", "--arch",
                  "usernet:make_net", "--json")  # fmt: skip
    report = json.loads(out)
    assert report["in_shape"] == [1, 8, 8]
    assert [s["size"] for s in report["spaces"] if not s["fixed"]] == [16]


def test_arch_parsing():
    spec = parse_arch("vgg11:width=0.5,batch_norm=true,in_shape=1x28x28")
    assert spec.is_zoo and spec.kwargs == {
        "width": 0.5,
        "batch_norm": True,
        "in_shape": (1, 28, 28),
    }
    assert spec.in_shape == (1, 28, 28)
    assert parse_arch("mlpnet:hidden=(16,8),bias=no").kwargs == {"hidden": (16, 8), "bias": False}
    spec = parse_arch("mypkg.models:make_net:width=2,name=wide")
    assert not spec.is_zoo and spec.target == "mypkg.models:make_net"
    assert spec.kwargs == {"width": 2, "name": "wide"}
    assert str(spec) == "mypkg.models:make_net:width=2,name=wide"
    assert parse_arch("mypkg.models:make_net").kwargs == {}
    model = parse_arch("mlpnet:hidden=[4]").build({"in_shape": (3, 4, 4), "num_classes": 5})
    assert model.otfuse_config["in_shape"] == [3, 4, 4] and model.otfuse_config["num_classes"] == 5
    with pytest.raises(cli.UsageError):
        parse_arch("mlpnet:width")
