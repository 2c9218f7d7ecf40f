"""otfuse.hf: Hugging Face model directories read safely (every bad directory is one line), example
inputs from the config, atomic writing, and fuse_pretrained. Tiny models built from configs, random
weights, nothing downloaded; skipped without ``transformers``."""

from __future__ import annotations

import json
import socket
import sys

import pytest
import safetensors.torch
import torch

from otfuse import hf
from otfuse.errors import ArchitectureMismatchError, CheckpointError, DataError, OtfuseError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()


def gpt2(seed: int = 0, **changes):
    torch.manual_seed(seed)
    config = dict(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                  bos_token_id=0, eos_token_id=0, initializer_range=0.2)  # fmt: skip
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**config, **changes}))


def bert(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=50, max_position_embeddings=16, num_labels=3, hidden_size=16,
        num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def vit(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, num_labels=5, hidden_size=16,
        num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing here may reach the network: every connection attempt is refused and recorded (a
    library that swallows the refusal still fails the test)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("otfuse.hf tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert attempts == []


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    gpt2(0).save_pretrained(d / "g0")
    gpt2(1).save_pretrained(d / "g1")
    bert(0).save_pretrained(d / "b0")
    return d


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


# -- reading ---------------------------------------------------------------------------------------


def test_load_pretrained_gives_the_saved_model_in_eval_mode_without_cache(dirs):
    loaded = hf.load_pretrained(dirs / "g0")
    model = loaded.model
    assert type(model).__name__ == loaded.architecture == "GPT2LMHeadModel"
    assert loaded.model_type == "gpt2" and loaded.dtype == torch.float32
    assert not model.training and model.config.use_cache is False and loaded.use_cache is True
    assert set(loaded.files) == {"config.json", "model.safetensors"}
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as saved
    x = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(logits(model, x), logits(gpt2(0).eval(), x))


def test_sharded_weights_are_read(dirs, tmp_path):
    gpt2(0).save_pretrained(tmp_path / "sharded", max_shard_size="4KB")
    loaded = hf.load_pretrained(tmp_path / "sharded")
    assert "model.safetensors.index.json" in loaded.files and len(loaded.files) > 3
    x = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(logits(loaded.model, x), logits(gpt2(0).eval(), x))


def test_example_inputs_come_from_the_config(dirs):
    model = hf.load_pretrained(dirs / "g0").model
    tokens = hf.example_input(model, seq_len=64)  # capped by n_positions
    assert tokens.shape == (2, 16) and tokens.dtype == torch.int64 and int(tokens.max()) < 50
    assert hf.example_input(model, seq_len=5).shape == (2, 5)
    assert hf.input_kind(bert()) == "tokens"
    pixels = hf.example_input(vit())
    assert pixels.shape == (2, 3, 8, 8) and pixels.is_floating_point()


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _broken(dirs, tmp_path, how: str):
    d = _copy(dirs / "g0", tmp_path / how)
    weights = d / "model.safetensors"
    if how == "no config":
        (d / "config.json").unlink()
    elif how == "bad json":
        (d / "config.json").write_text("{not json")
    elif how == "no architectures":
        config = json.loads((d / "config.json").read_text())
        del config["architectures"]
        (d / "config.json").write_text(json.dumps(config))
    elif how == "unknown class":
        config = json.loads((d / "config.json").read_text())
        config["architectures"] = ["EvilModelThatRunsCode"]
        config["auto_map"] = {"AutoModel": "evil.EvilModelThatRunsCode"}
        (d / "config.json").write_text(json.dumps(config))
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[:300])
    elif how == "missing tensor":
        tensors = safetensors.torch.load_file(weights)
        tensors.pop("transformer.h.0.mlp.c_fc.weight")
        safetensors.torch.save_file(tensors, weights, metadata={"format": "pt"})
    elif how == "wrong shape":
        tensors = safetensors.torch.load_file(weights)
        tensors["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(3, 3)
        safetensors.torch.save_file(tensors, weights, metadata={"format": "pt"})
    elif how == "nan":
        tensors = safetensors.torch.load_file(weights)
        tensors["transformer.h.0.mlp.c_fc.bias"][0] = float("nan")
        safetensors.torch.save_file(tensors, weights, metadata={"format": "pt"})
    elif how == "pickle only":
        torch.save(safetensors.torch.load_file(weights), d / "pytorch_model.bin")
        weights.unlink()
    return d


@pytest.mark.parametrize(
    "how, words",
    [
        ("no config", ["holds no config.json"]),
        ("bad json", ["is not valid JSON"]),
        ("no architectures", ["names no architecture"]),
        ("unknown class", ["EvilModelThatRunsCode", "never runs code"]),
        ("truncated", ["model.safetensors"]),
        ("missing tensor", ["missing", "c_fc.weight"]),
        ("wrong shape", ["c_fc.weight"]),
        ("nan", ["NaN"]),
        ("pickle only", ["pytorch_model.bin", "pickle"]),
    ],
)
def test_a_bad_directory_is_one_line(dirs, tmp_path, how, words):
    with pytest.raises(CheckpointError) as info:
        hf.load_pretrained(_broken(dirs, tmp_path, how))
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    for word in words:
        assert word in message, message


def test_missing_directory_and_missing_transformers(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist"):
        hf.load_pretrained(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    with pytest.raises(OtfuseError, match=r"pip install 'otfuse\[hf\]'"):
        hf.load_pretrained(tmp_path / "d")


def test_different_architectures_are_refused(dirs):
    parents = [hf.load_pretrained(dirs / "g0"), hf.load_pretrained(dirs / "b0")]
    with pytest.raises(ArchitectureMismatchError, match="BertForSequenceClassification"):
        hf.check_same_architecture(parents)


def test_token_ids_are_checked():
    with pytest.raises(DataError, match="integer token ids"):
        hf.check_token_ids(torch.rand(3, 4), "data")
    with pytest.raises(DataError, match="vocabulary is 0..49"):
        hf.check_token_ids(torch.full((3, 4), 50), "data", vocab=50)
    with pytest.raises(DataError, match="at most 16"):
        hf.check_token_ids(torch.zeros(3, 17, dtype=torch.long), "data", positions=16)
    assert hf.check_token_ids(torch.zeros(3, 4, dtype=torch.int32), "data").dtype == torch.int64


# -- writing ---------------------------------------------------------------------------------------


def test_save_is_atomic_and_refuses_to_overwrite(dirs, tmp_path):
    model = hf.load_pretrained(dirs / "g0").model
    out = hf.save_pretrained(model, tmp_path / "out", metadata={"note": "first"}, use_cache=True)
    assert json.loads((out / "otfuse.json").read_text()) == {"note": "first"}
    again = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert again.config.use_cache is True and model.config.use_cache is False  # model untouched
    with pytest.raises(OtfuseError, match="exists; pass --force"):
        hf.save_pretrained(model, out)
    hf.save_pretrained(model, out, metadata={"note": "second"}, overwrite=True)
    assert json.loads((out / "otfuse.json").read_text()) == {"note": "second"}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("do not delete")
    with pytest.raises(OtfuseError, match="not a Hugging Face model directory"):
        hf.save_pretrained(model, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").exists()
    half = hf.save_pretrained(model, tmp_path / "half", dtype=torch.float16)
    assert (
        safetensors.torch.load_file(half / "model.safetensors")["transformer.wte.weight"].dtype
        == torch.float16
    )
    assert hf.load_pretrained(half).dtype == torch.float16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half", "mine", "out"]  # no temp left


def test_a_failed_write_leaves_nothing(dirs, tmp_path, monkeypatch):
    model = hf.load_pretrained(dirs / "g0").model

    def fail(self, folder, **kwargs):
        (tmp_path / "seen").write_text(folder)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", fail)
    with pytest.raises(OtfuseError, match="cannot write .*No space left"):
        hf.save_pretrained(model, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seen"]


# -- fusion ----------------------------------------------------------------------------------------


def test_fusing_a_model_with_itself_gives_it_back(dirs, tmp_path):
    result = hf.fuse_pretrained([dirs / "g0", dirs / "g0"], tmp_path / "out", "paper-wts")
    fused = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, 50, (3, 7))
    torch.testing.assert_close(logits(fused, x), logits(gpt2(0).eval(), x), atol=1e-5, rtol=1e-5)
    assert type(result.model).__name__ == "GPT2LMHeadModel"
    assert all(not k.startswith("model.") for k in result.plans[1])  # the model's own names
    meta = json.loads((tmp_path / "out" / "otfuse.json").read_text())
    assert meta["config"]["recipe"] == "paper-wts" and meta["architecture"] == "GPT2LMHeadModel"
    assert [p["sha256"] for p in meta["parents"]][0] == hf.load_pretrained(dirs / "g0").files
    assert set(meta["timings"]) >= {"prepare", "align", "average"}
    with pytest.raises(OtfuseError, match="one of the models to fuse"):
        hf.fuse_pretrained([dirs / "g0", tmp_path / "out"], tmp_path / "out", overwrite=True)


def t5(seed: int):
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=50, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
        decoder_start_token_id=0, initializer_factor=2.0,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


def test_encoder_decoder_directories_fuse_with_the_decoder_reading_the_same_ids(tmp_path):
    """T5 from directories: the decoder reads the encoder's token ids (teacher forcing on the
    input); self-fusion gives the model back, two seeds fuse with the data recipe, and the result
    is a T5 written the same way."""
    for seed in (0, 1):
        t5(seed).save_pretrained(tmp_path / f"t5-{seed}")
    x = torch.randint(0, 50, (3, 7))
    ids = dict(input_ids=x, decoder_input_ids=x[:, :5])
    hf.fuse_pretrained([tmp_path / "t5-0", tmp_path / "t5-0"], tmp_path / "self", "paper-wts")
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "self").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**ids).logits, t5(0).eval()(**ids).logits)
    data = torch.randint(0, 50, (40, 8), generator=torch.Generator().manual_seed(1))
    dirs = [tmp_path / "t5-0", tmp_path / "t5-1"]
    result = hf.fuse_pretrained(dirs, tmp_path / "out", "data", data=data)
    assert type(result.model).__name__ == "T5ForConditionalGeneration"
    fused = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.isfinite(fused(**ids).logits).all()
