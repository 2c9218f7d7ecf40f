"""otfuse fuse DIR DIR -o OUT_DIR on Hugging Face model directories: tiny GPT-2, BERT and ViT built
from configs (random weights, nothing downloaded), run in-process through ``cli.main``. The result
loads with ``from_pretrained``; fusing a model with itself gives its logits back; every bad input is
one ``otfuse: error:`` line. Skipped without ``transformers``."""

from __future__ import annotations

import json
import socket
import sys

import pytest
import torch

from otfuse import cli

from .util import call, one_line_error

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

SMALL = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)


def gpt2(seed: int):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0, initializer_range=0.2,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def bert(seed: int):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=50, max_position_embeddings=16, num_labels=3, initializer_range=0.2, **SMALL
    )
    return transformers.BertForSequenceClassification(config)


def vit(seed: int):
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, num_labels=5, initializer_range=0.2, **SMALL
    )
    return transformers.ViTForImageClassification(config)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """A connection attempt is refused and fails the test: nothing is fetched."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("otfuse tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert attempts == []


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hfdirs")
    for make in (gpt2, bert, vit):
        for seed in (0, 1):
            make(seed).save_pretrained(d / f"{make.__name__}{seed}")
    (d / "plain.safetensors").write_bytes((d / "gpt20" / "model.safetensors").read_bytes())
    (d / "broken").mkdir()
    (d / "broken" / "config.json").write_text((d / "gpt20" / "config.json").read_text())
    (d / "broken" / "model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header"
    )
    torch.save(torch.randint(0, 50, (24, 8)), d / "ids.pt")
    return d


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x).logits


def test_two_gpt2_directories_fuse_into_one(dirs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "fused"
    status, stdout, err = call(
        dirs, monkeypatch, capsys, "fuse", "gpt20", "gpt21", "-o", str(out), "--seq-len", "8",
        "--json",
    )  # fmt: skip
    assert status == 0, err
    report = json.loads(stdout)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "otfuse.json",
    ]  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["fused"]  # no temporary directory left
    fused = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert fused.config.use_cache is True  # as the parents were saved
    x = torch.randint(0, 50, (2, 8))
    assert logits(fused, x).shape == (2, 8, 50)
    meta = json.loads((out / "otfuse.json").read_text())
    # a causal LM without data: sequences sampled from the parents' ensemble, then the data recipe
    assert meta["config"]["recipe"] == "data-free" and meta["inputs"] == "synthesized"
    assert meta["config"]["mode"] == "acts" and meta["selected"]
    assert meta["example_input"] == {"kind": "tokens", "shape": [2, 8]}
    assert [p["path"] for p in meta["parents"]] == ["gpt20", "gpt21"]
    assert report["output"] == str(out) and report["config"] == meta["config"]
    assert set(meta["costs"][1]) >= {"transformer.h.0.mlp.c_fc", "transformer.wte"}


def test_a_bert_fused_with_itself_keeps_its_logits(dirs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "self"
    status, stdout, err = call(
        dirs, monkeypatch, capsys, "fuse", "bert0", "bert0", "-o", str(out), "--recipe",
        "paper-wts", "-q",
    )  # fmt: skip
    assert status == 0, err
    assert "fused 2 models" in stdout and "recipe paper-wts" in stdout
    fused = transformers.BertForSequenceClassification.from_pretrained(out)
    x = torch.randint(0, 50, (3, 10))
    torch.testing.assert_close(logits(fused, x), logits(bert(0), x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_vit_directories_fuse_and_a_vit_with_itself_is_kept(dirs, tmp_path, monkeypatch, capsys):
    for a, b, name in (("vit0", "vit1", "two"), ("vit0", "vit0", "self")):
        status, _, err = call(
            dirs, monkeypatch, capsys, "fuse", a, b, "-o", str(tmp_path / name), "--recipe",
            "paper-wts", "-q",
        )  # fmt: skip
        assert status == 0, err
    x = torch.randn(2, 3, 8, 8)
    fused = transformers.ViTForImageClassification.from_pretrained(tmp_path / "self")
    torch.testing.assert_close(logits(fused, x), logits(vit(0), x), atol=1e-5, rtol=1e-5)
    meta = json.loads((tmp_path / "two" / "otfuse.json").read_text())
    assert meta["example_input"] == {"kind": "pixels", "shape": [2, 3, 8, 8]}


@pytest.mark.slow
def test_token_ids_as_data(dirs, tmp_path, monkeypatch, capsys):
    status, _, err = call(
        dirs, monkeypatch, capsys, "fuse", "gpt20", "gpt21", "-o", str(tmp_path / "acts"),
        "--data", "ids.pt", "--recipe", "paper-acts", "--num-samples", "16", "-q",
    )  # fmt: skip
    assert status == 0, err
    meta = json.loads((tmp_path / "acts" / "otfuse.json").read_text())
    assert meta["inputs"] == "data" and meta["sample"] == 16
    assert meta["example_input"]["shape"] == [2, 8]


@pytest.mark.parametrize(
    "args, status, words",
    [
        (["gpt20", "missing_dir"], 1, ["missing_dir does not exist"]),
        (["gpt20", "broken"], 1, ["broken/model.safetensors is not a valid safetensors file"]),
        (["gpt20", "bert1"], 1, ["BertForSequenceClassification", "GPT2LMHeadModel"]),
        (["gpt20", "plain.safetensors"], 2, ["plain.safetensors is a file"]),
        (["gpt20", "gpt21", "--arch", "mlpnet"], 2, ["--arch does not apply"]),
        (["gpt20", "gpt21", "--in-shape", "1x8"], 2, ["--in-shape does not apply"]),
        (["gpt20", "gpt21", "--recipe", "data"], 2, ["needs data"]),
        (["gpt20", "gpt21", "--data", "fashion-mnist", "--recipe", "paper-acts"], 2,
         ["token ids"]),
        (["gpt20", "gpt21", "-o", "gpt20", "--force"], 1, ["one of the models to fuse"]),
        (["gpt20", "gpt21", "-o", "bert0"], 1, ["bert0 exists; pass --force"]),
    ],
)  # fmt: skip
def test_bad_inputs_are_one_line(dirs, monkeypatch, capsys, args, status, words):
    if "-o" not in args:
        args = [*args, "-o", "never_written"]
    code, out, err = call(dirs, monkeypatch, capsys, "fuse", *args)
    assert code == status, err
    one_line_error(err, *words)
    assert not (dirs / "never_written").exists() and out == ""


def test_without_transformers_is_one_line(dirs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    code, _, err = call(dirs, monkeypatch, capsys, "fuse", "gpt20", "gpt21", "-o", "x")
    assert code == 1
    one_line_error(err, "pip install 'otfuse[hf]'")


def test_print_config_and_help(dirs, monkeypatch, capsys):
    code, out, _ = call(dirs, monkeypatch, capsys, "fuse", "gpt20", "gpt21", "--print-config")
    assert code == 0 and "recipe: data-free" in out
    with pytest.raises(SystemExit):
        cli.main(["fuse", "--help"])
    assert "--seq-len" in capsys.readouterr().out
