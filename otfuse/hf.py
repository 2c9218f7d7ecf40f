"""Hugging Face ``transformers`` models on disk: read a model directory safely, make an input to
capture it with, fuse several, and write the result as ``save_pretrained`` does.

A *model directory* is what ``model.save_pretrained(dir)`` writes: ``config.json``, whose
``architectures`` names the model class (``GPT2LMHeadModel``), and the weights in
``model.safetensors`` (or the shards that ``model.safetensors.index.json`` lists).

Reading one runs nothing from it and fetches nothing:

* the class is looked up by name among ``transformers``' own classes (never a directory's own code:
  ``auto_map`` is ignored and ``trust_remote_code`` is never set);
* the weights are read from safetensors files only (a directory holding only the pickle
  ``pytorch_model.bin`` is refused);
* ``from_pretrained(dir, local_files_only=True, use_safetensors=True)`` reads the local files and
  never the Hub; it also undoes the renames some architectures apply to checkpoint keys, and ties
  tied weights. Every missing, unexpected or mis-shaped tensor is an error, not a silent random init.

Models are loaded in float32 and eval mode with ``use_cache=False`` (decoders would otherwise return
their key/value cache); the fused model is written in the parents' stored dtype with the anchor's
config (``use_cache`` as it was).

Fusion sees a model through a small wrapper whose output is the Hugging Face output's ``logits``
(one tensor), so the recipes work as they do for any classifier: the ``data`` recipe chooses its
alignment by closeness to the parents' ensemble, and the ``data-free`` recipe synthesises inputs for
models of floating-point inputs with class outputs (ViT). Text models take token ids, for which
nothing can be synthesised: without data the ``data-free`` recipe then runs weight matching
(:func:`otfuse.fuse`'s fallback), and ``paper-wts`` is the one-shot method of the paper.

>>> from otfuse.hf import fuse_pretrained
>>> result = fuse_pretrained(["gpt2-a/", "gpt2-b/"], "fused/", "paper-wts")
>>> transformers.GPT2LMHeadModel.from_pretrained("fused/")  # a plain Hugging Face model
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
from torch import nn

from otfuse.checkpoints import check_finite, sha256_file
from otfuse.config import FusionConfig
from otfuse.errors import ArchitectureMismatchError, CheckpointError, DataError, OtfuseError

__all__ = [
    "CONFIG_FILE",
    "METADATA_FILE",
    "WEIGHTS_FILE",
    "WEIGHTS_INDEX",
    "InputKind",
    "Pretrained",
    "check_not_input",
    "check_output_dir",
    "check_same_architecture",
    "check_token_ids",
    "example_input",
    "fuse_models",
    "fusion_metadata",
    "fuse_pretrained",
    "input_kind",
    "is_model_dir",
    "load_pretrained",
    "load_token_ids",
    "max_positions",
    "require_transformers",
    "save_pretrained",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
METADATA_FILE = "otfuse.json"
DEFAULT_SEQ_LEN = 32
InputKind = Literal["tokens", "pixels"]
_HOW = (
    "a Hugging Face model directory (config.json and model.safetensors, as save_pretrained writes)"
)
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F64": torch.float64}  # fmt: skip


def require_transformers() -> ModuleType:
    """The ``transformers`` module, or a one-line :class:`OtfuseError` saying how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise OtfuseError(
            "Hugging Face models need the transformers package: pip install 'otfuse[hf]' "
            "(or pip install transformers)"
        ) from exc
    return transformers


def is_model_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding a ``config.json``."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file()


@dataclass
class Pretrained:
    """A model read from a Hugging Face model directory by :func:`load_pretrained`.

    Attributes:
        path: the directory as given.
        model: the model (float32, eval mode, ``config.use_cache`` False where the config has it).
        architecture: the class name from ``config.json`` (``GPT2LMHeadModel``).
        model_type: the config's ``model_type`` (``gpt2``).
        dtype: the dtype of the stored floating-point weights (the fused model is written in it).
        use_cache: the config's ``use_cache`` as stored (None when it has none), restored on saving.
        files: SHA-256 of ``config.json`` and every weights file (and the shards' index), by
            file name.
    """

    path: Path
    model: nn.Module
    architecture: str
    model_type: str | None
    dtype: torch.dtype
    use_cache: bool | None
    files: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """What a fusion's ``otfuse.json`` says about this parent."""
        return {
            "path": str(self.path),
            "architecture": self.architecture,
            "model_type": self.model_type,
            "dtype": str(self.dtype).replace("torch.", ""),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "sha256": dict(self.files),
        }


# --------------------------------------------------------------------------------------------------
# Reading


def load_pretrained(path: str | os.PathLike) -> Pretrained:
    """Read a Hugging Face model directory safely (see the module's docstring) into a model.

    Raises:
        CheckpointError: a missing or corrupt directory, config or weights file; an architecture
            ``transformers`` does not have; weights that do not fit the config; NaN or Inf values.
        OtfuseError: ``transformers`` is not installed.
    """
    path = Path(path)
    config_dict = _read_config(path)
    transformers = require_transformers()
    name = _architecture_name(path, config_dict)
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(
            f"{path}: config.json names the architecture '{name}', which transformers "
            f"{transformers.__version__} does not have (otfuse never runs code from a model "
            "directory); use a model class of transformers"
        )
    if config_dict.get("quantization_config"):
        raise CheckpointError(
            f"{path} holds a quantized model; fuse the unquantized weights (float32, float16 or "
            "bfloat16)"
        )
    if (path / "adapter_config.json").is_file():
        raise CheckpointError(
            f"{path} holds an adapter (adapter_config.json); merge it into the model and save the "
            "merged model with save_pretrained"
        )
    weights = _weights_files(path)
    dtype = _stored_dtype(path, weights)
    with _quiet_transformers(transformers):
        try:
            model, info = cls.from_pretrained(
                str(path), local_files_only=True, use_safetensors=True, torch_dtype=torch.float32,
                output_loading_info=True, ignore_mismatched_sizes=True,  # reported below
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a corrupt file or config: one line, whatever it is
            raise CheckpointError(
                f"{path} cannot be loaded as {name} ({_one_line(exc)}); check that it is {_HOW}"
            ) from None
    _check_loading_info(path, name, info)
    check_finite(model.state_dict(), str(path))
    config = model.config
    use_cache = getattr(config, "use_cache", None)
    if use_cache is not None:
        config.use_cache = False
    model.eval()
    files = {CONFIG_FILE: sha256_file(path / CONFIG_FILE)}
    if (path / WEIGHTS_INDEX).is_file() and not (path / WEIGHTS_FILE).is_file():
        files[WEIGHTS_INDEX] = sha256_file(path / WEIGHTS_INDEX)
    files.update({f.name: sha256_file(f) for f in weights})
    return Pretrained(
        path, model, name, getattr(config, "model_type", None), dtype, use_cache, files
    )


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give {_HOW}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; give {_HOW}")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{path} holds no config.json; give {_HOW}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{config_file} is not valid JSON ({_one_line(exc)}); re-save the model with "
            "save_pretrained"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} holds a {type(config).__name__}, not a JSON object")
    return config


def _architecture_name(path: Path, config: Mapping[str, Any]) -> str:
    names = config.get("architectures")
    if not names or not isinstance(names, list) or not isinstance(names[0], str):
        raise CheckpointError(
            f"{path}/config.json names no architecture (its 'architectures' field); save the model "
            "with save_pretrained of a model class such as GPT2LMHeadModel"
        )
    if len(names) > 1:
        raise CheckpointError(
            f"{path}/config.json names {len(names)} architectures ({', '.join(map(str, names))}); "
            "keep the one the weights are for"
        )
    return names[0]


def _weights_files(path: Path) -> list[Path]:
    """The safetensors files of a directory (one file, or the shards of the index)."""
    single, index = path / WEIGHTS_FILE, path / WEIGHTS_INDEX
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted({str(v) for v in weight_map.values()})
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                AttributeError) as exc:  # fmt: skip
            raise CheckpointError(f"{index} is not a valid index ({_one_line(exc)})") from None
        files = [path / s for s in shards]
        missing = [f.name for f in files if not f.is_file() or f.parent != path]
        if not files or missing:
            raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    if any((path / p).is_file() for p in PICKLE_WEIGHTS):
        raise CheckpointError(
            f"{path} holds pytorch_model.bin, a pickle, which otfuse does not load (it can run "
            "code); re-save the model with save_pretrained, which writes model.safetensors"
        )
    raise CheckpointError(f"{path} holds no {WEIGHTS_FILE}; give {_HOW}")


def _stored_dtype(path: Path, files: Sequence[Path]) -> torch.dtype:
    """The dtype of the stored floating-point weights (the most common one), from the files'
    headers; also a first check that every file is safetensors."""
    counts: dict[torch.dtype, int] = {}
    for file in files:
        try:
            with open(file, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                if not 2 <= size <= 100_000_000:
                    raise ValueError("no safetensors header")
                header = json.loads(fh.read(size))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"{file} is not a valid safetensors file ({_one_line(exc)}); re-save the model"
            ) from None
        for key, entry in header.items():
            dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype")) if key != "__metadata__" else None
            if dtype is not None:
                counts[dtype] = counts.get(dtype, 0) + 1
    return max(counts, key=counts.get) if counts else torch.float32


def _check_loading_info(path: Path, name: str, info: Mapping[str, Any]) -> None:
    """Every weight of the model came from the files, and every tensor in them was used."""
    problems = {
        "missing": info.get("missing_keys") or [],
        "unexpected": info.get("unexpected_keys") or [],
        "mis-shaped": info.get("mismatched_keys") or [],
    }
    for what, keys in problems.items():
        if keys:
            keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in keys)
            shown = ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")
            raise CheckpointError(
                f"{path}: {len(keys)} {what} tensor(s) for {name} ({shown}); the weights do not "
                "fit config.json, re-save the model with save_pretrained"
            )
    errors = info.get("error_msgs") or []
    if errors:
        raise CheckpointError(f"{path}: {_one_line(errors[0])}")


@contextlib.contextmanager
def _quiet_transformers(transformers: ModuleType) -> Iterator[None]:
    """No log lines or progress bars from ``transformers`` inside the block."""
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def check_same_architecture(parents: Sequence[Pretrained]) -> None:
    """Raise :class:`ArchitectureMismatchError` naming two parents of different classes."""
    first = parents[0]
    for other in parents[1:]:
        if other.architecture != first.architecture:
            raise ArchitectureMismatchError(
                f"{other.path} is a {other.architecture} but {first.path} a {first.architecture}; "
                "fuse models of one architecture"
            )


# --------------------------------------------------------------------------------------------------
# Inputs


def input_kind(model: nn.Module) -> InputKind:
    """``tokens`` for a model of token ids (``main_input_name`` ``input_ids``), ``pixels`` for one
    of images (``pixel_values``); :class:`OtfuseError` for any other input."""
    name = getattr(model, "main_input_name", None)
    if name == "input_ids":
        return "tokens"
    if name == "pixel_values":
        return "pixels"
    raise OtfuseError(
        f"{type(model).__name__} takes '{name}'; otfuse fuses Hugging Face models of token ids "
        "(input_ids) or images (pixel_values)"
    )


def max_positions(config: Any) -> int | None:
    """The longest sequence a text model's config allows (``n_positions``,
    ``max_position_embeddings``), or None."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def example_input(
    model: nn.Module, *, seq_len: int = DEFAULT_SEQ_LEN, batch: int = 2, seed: int = 0
) -> torch.Tensor:
    """An input to capture ``model`` with: seeded token ids (``batch``, ``seq_len``), the length at
    most the config's positions, for text models; seeded pixels (``batch``, C, H, W) of the config's
    ``num_channels`` and ``image_size`` for image models."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    if input_kind(model) == "tokens":
        vocab = getattr(config, "vocab_size", None)
        if not isinstance(vocab, int) or vocab < 1:
            raise OtfuseError(f"{type(model).__name__}'s config has no vocab_size")
        limit = max_positions(config)
        length = min(seq_len, limit) if limit is not None else seq_len
        return torch.randint(0, vocab, (batch, length), generator=generator)
    size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", 3)
    if isinstance(size, int):
        size = (size, size)
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise OtfuseError(f"{type(model).__name__}'s config has no image_size")
    return torch.randn(batch, channels, *size, generator=generator)


def load_token_ids(path: str | os.PathLike) -> torch.Tensor:
    """Token ids (N, T), int64, from a tensor file (``.pt`` read weights-only, ``.npy``/``.npz``,
    ``.safetensors``; keys as :func:`otfuse.inputs.load_inputs` reads them)."""
    from otfuse.inputs import _read_tensor_file, _split

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; give a tensor file of token ids (N, T)")
    ids, _ = _split(_read_tensor_file(path), path)
    return check_token_ids(ids, str(path))


def check_token_ids(
    ids: Any, what: str, *, vocab: int | None = None, positions: int | None = None
) -> torch.Tensor:
    """``ids`` as int64 (N, T) token ids below ``vocab``, T at most ``positions``; a one-line
    :class:`DataError` otherwise."""
    if not isinstance(ids, torch.Tensor):
        raise DataError(f"{what}: the token ids are a {type(ids).__name__}, not a tensor")
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise DataError(
            f"{what} holds {str(ids.dtype).replace('torch.', '')} values; a text model takes "
            "integer token ids (N, T)"
        )
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise DataError(f"{what}: token ids of shape {tuple(ids.shape)}; expected (N, T)")
    ids = ids.long()
    if int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise DataError(f"{what} holds token id {bad}; the model's vocabulary is 0..{vocab - 1}")
    if positions is not None and ids.shape[1] > positions:
        raise DataError(
            f"{what} holds sequences of {ids.shape[1]} tokens; the model takes at most {positions}"
        )
    return ids


# --------------------------------------------------------------------------------------------------
# Fusion


class _Logits(nn.Module):
    """A Hugging Face model whose output is its ``logits`` tensor (the whole output when it has
    none), so fusion's recipes see a plain classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        out = self.model(x)
        logits = getattr(out, "logits", None)
        return logits if isinstance(logits, torch.Tensor) else out


class _Seq2SeqLogits(_Logits):
    """An encoder-decoder (T5, BART) that reads the same token ids (N, T) in its encoder and, as
    the decoder's inputs, in its decoder (teacher forcing on the input sequence), so that one tensor
    of ids captures it and gives activations of both halves for the data recipe."""

    def forward(self, x: torch.Tensor) -> Any:
        mask = torch.ones_like(x)
        out = self.model(input_ids=x, attention_mask=mask, decoder_input_ids=x, use_cache=False)
        return out.logits


_PREFIX = "model."
_WRAPPED_NAME = re.compile(
    r"(?<![\w.])model\.(?=\w)"
)  # 'model.transformer.h.0' -> 'transformer...'


def _unwrapped(result: Any) -> Any:
    """``result`` of a fusion of wrapped models: the fused Hugging Face model, and plan names as
    the model's own parameters are named."""
    plans = [{k.removeprefix(_PREFIX): v for k, v in plans.items()} for plans in result.plans]
    return dataclasses.replace(result, model=result.model.model, plans=plans)


def fuse_models(
    parents: Sequence[Pretrained],
    config: FusionConfig | str | None = None,
    *,
    data: object = None,
    example: torch.Tensor | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    progress: bool = False,
    **overrides: object,
) -> Any:
    """:func:`otfuse.fuse` of loaded parents (see :func:`fuse_pretrained`); returns its
    :class:`~otfuse.FusionResult` with ``model`` the fused Hugging Face model."""
    import otfuse

    if len(parents) < 2:
        raise OtfuseError(f"fusion needs at least two models, got {len(parents)}")
    check_same_architecture(parents)
    anchor_index = _anchor_of(config, overrides)
    anchor = parents[anchor_index if 0 <= anchor_index < len(parents) else 0].model
    seq2seq = bool(getattr(anchor.config, "is_encoder_decoder", False))
    if seq2seq and input_kind(anchor) != "tokens":
        raise OtfuseError(
            f"{parents[0].architecture} is an encoder-decoder model that does not read token ids; "
            "otfuse fuses text encoder-decoders (T5, BART), encoder-only and decoder-only models"
        )
    data = _check_data(anchor, data)
    if example is None and data is not None:
        rows = getattr(data, "images", data)
        example = rows[:2] if isinstance(rows, torch.Tensor) else None
    if example is None:
        example = example_input(anchor, seq_len=seq_len)
    wrapper = _Seq2SeqLogits if seq2seq else _Logits  # both named _Logits in messages
    models = [wrapper(p.model) for p in parents]
    try:
        result = otfuse.fuse(
            models, config, data=data, example_input=example, progress=progress, **overrides
        )
    except OtfuseError as exc:  # say it of the user's model, not of the wrapper
        text = _WRAPPED_NAME.sub("", str(exc))
        for name in (_Seq2SeqLogits.__name__, _Logits.__name__):
            text = text.replace(name, parents[0].architecture)
        raise type(exc)(text) from exc
    return _unwrapped(result)


def _anchor_of(config: FusionConfig | str | None, overrides: Mapping[str, object]) -> int:
    anchor = overrides.get("anchor")
    if isinstance(anchor, int):
        return anchor
    return config.anchor if isinstance(config, FusionConfig) else 0


def _check_data(model: nn.Module, data: object) -> object:
    """Token ids checked against the text model's vocabulary and positions (other data is checked
    by :func:`otfuse.fuse`)."""
    if data is None or input_kind(model) != "tokens":
        return data
    if hasattr(data, "images"):
        data = data.images
    return check_token_ids(
        data, "data", vocab=model.config.vocab_size, positions=max_positions(model.config)
    )


def fuse_pretrained(
    dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: FusionConfig | str | None = None,
    *,
    data: object = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    overwrite: bool = False,
    progress: bool = False,
    **overrides: object,
) -> Any:
    """Fuse the Hugging Face models in ``dirs`` and write the result to ``out_dir``.

    Every directory is read with :func:`load_pretrained`; the models must share one architecture
    class. They are fused by :func:`otfuse.fuse` (``config``: a :class:`~otfuse.FusionConfig` or a
    recipe name, default as :func:`otfuse.fuse` chooses; ``overrides``: its fields), captured on
    ``data[:2]`` when ``data`` is given, else on :func:`example_input` (token ids of ``seq_len``
    for text models). ``data``: token ids (N, T) for text models, pixels (N, C, H, W) for image
    models. ``out_dir`` gets ``config.json`` and ``model.safetensors`` (the anchor's config, the
    parents' dtype) and ``otfuse.json`` (the config that ran, the parents' hashes, costs, timings),
    written atomically (:func:`save_pretrained`; ``overwrite`` to replace an existing one).

    Returns:
        The :class:`~otfuse.FusionResult`; ``result.model`` is the fused Hugging Face model (float32,
        eval mode), ``result.plans`` named as its parameters.

    Raises:
        OtfuseError: a bad directory, data or option, or models that cannot be fused, in one line.
    """
    start = time.perf_counter()
    check_output_dir(out_dir, overwrite)
    check_not_input(out_dir, dirs)
    parents = [load_pretrained(d) for d in dirs]
    result = fuse_models(
        parents, config, data=data, seq_len=seq_len, progress=progress, **overrides
    )
    metadata = fusion_metadata(parents, result)
    metadata["seconds_total"] = time.perf_counter() - start
    anchor = parents[result.anchor]
    save_pretrained(
        result.model, out_dir, metadata=metadata, overwrite=overwrite, dtype=anchor.dtype,
        use_cache=anchor.use_cache,
    )  # fmt: skip
    return result


def check_not_input(out_dir: str | os.PathLike, dirs: Sequence[str | os.PathLike]) -> None:
    """Refuse to write the result over one of the models being fused."""
    out = Path(out_dir).resolve()
    for d in dirs:
        if Path(d).resolve() == out:
            raise OtfuseError(f"{out_dir} is one of the models to fuse; write the result elsewhere")


def fusion_metadata(parents: Sequence[Pretrained], result: Any) -> dict[str, Any]:
    """What ``otfuse.json`` records: the parents, the config that ran, costs and timings."""
    import otfuse

    ran = result.config
    return {
        "otfuse_version": otfuse.__version__,
        "format": "huggingface",
        "architecture": parents[result.anchor].architecture,
        "model_type": parents[result.anchor].model_type,
        "parents": [p.record() for p in parents],
        "inputs": result.inputs,
        "config": ran.to_dict() if ran is not None else None,
        "selection": dict(result.selection),
        "selected": result.selected,
        "weights": list(result.weights),
        "anchor": result.anchor,
        "costs": result.costs(),
        "seconds": result.seconds,
        "timings": dict(result.timings),
    }


def _one_line(exc: BaseException | str, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# the writing half lives in otfuse.hf_save (it imports the reading half above)
from otfuse.hf_save import check_output_dir, save_pretrained  # noqa: E402
