"""One validation layer for everything a user hands to otfuse: models, weights, inputs.

Each check raises an :class:`~otfuse.errors.OtfuseError` subclass with one line that names the
cause ("data has 1 channel, the models expect 3"), never a torch traceback. The library's entry
points and the command line call the same functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from otfuse.errors import DataError, OtfuseError
from otfuse.modes import evaluating

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def check_models(models: Sequence[nn.Module]) -> list[nn.Module]:
    """At least two ``nn.Module`` on one device with finite floating-point parameters and buffers."""
    if isinstance(models, nn.Module) or not isinstance(models, Iterable):
        raise OtfuseError("models must be a list of nn.Module")
    models = list(models)
    if len(models) < 2:
        raise OtfuseError(f"fusion needs at least two models, got {len(models)}")
    for i, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise OtfuseError(f"model {i} is a {type(model).__name__}, not an nn.Module")
    devices = [model_device(m) for m in models]
    if any(d != devices[0] for d in devices):
        where = ", ".join(f"model {i} on {d}" for i, d in enumerate(devices))
        raise OtfuseError(f"the models are on different devices ({where}); move them to one")
    precisions = [_precision(m) for m in models]
    if any(p != precisions[0] for p in precisions):
        where = ", ".join(
            f"model {i} {str(p).replace('torch.', '')}" for i, p in enumerate(precisions)
        )
        raise OtfuseError(
            f"the models have different precisions ({where}); convert them to one, e.g. with "
            "model.float()"
        )
    for i, model in enumerate(models):
        name = first_non_finite(model.state_dict())
        if name is not None:
            raise OtfuseError(f"model {i} has NaN or Inf values in '{name}'")
    return models


def _precision(model: nn.Module) -> torch.dtype | None:
    """The dtype of ``model``'s first floating-point parameter or buffer (None without one)."""
    return next((t.dtype for t in model.state_dict().values() if t.is_floating_point()), None)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` runs: the device of its first parameter or buffer (the CPU without any)."""
    for tensor in model.state_dict().values():
        return tensor.device
    return torch.device("cpu")  # a model without tensors runs anywhere; inputs stay where they are


def to_device(x: torch.Tensor | tuple | None, device: torch.device) -> torch.Tensor | tuple | None:
    """``x`` (a tensor, a tuple of them, or None) on ``device``; other values as they are."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(to_device(v, device) for v in x)
    return x


def to_model_dtype(x: torch.Tensor | tuple | None, model: nn.Module) -> torch.Tensor | tuple | None:
    """Floating-point inputs in the floating dtype of ``model``'s first floating parameter (float32
    images for a float64 model); integer inputs (token ids), other values and models without
    floating parameters as they are."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, tuple):
        return tuple(to_model_dtype(v, model) for v in x)
    return x


def data_does_not_fit(error: OtfuseError, sample: torch.Tensor, model: nn.Module) -> DataError:
    """The tracing ``error`` of an example input taken from the data, said of the data: in words
    when the first layer says what the models expect (channels, features, a float input)."""
    layer = next((m for m in model.modules() if isinstance(m, _LAYERS)), None)
    if isinstance(sample, torch.Tensor) and layer is not None:
        embeds = any(isinstance(m, nn.Embedding) for m in model.modules())  # token ids are ints
        if not sample.is_floating_point() and not sample.is_complex() and not embeds:
            return DataError(
                f"data holds integers ({sample.dtype}); the models expect float inputs"
            )
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            spatial = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(layer)]
            if sample.ndim == spatial + 1:
                kind = type(layer).__name__
                return DataError(
                    f"data has shape {_shape(tuple(sample.shape))}, one dimension short of the "
                    f"batches (N, {layer.in_channels}, ...) the models' first {kind} takes: give "
                    "a batch dimension first (data[None] for one input, data[:, None] for images "
                    "of one channel)"
                )
            got = sample.shape[1] if sample.ndim == spatial + 2 else None
            if got is not None and got != layer.in_channels:
                unit = "channel" if got == 1 else "channels"
                return DataError(f"data has {got} {unit}, the models expect {layer.in_channels}")
    reason = str(error).split(": ", 1)[-1]
    return DataError(f"data does not fit {type(model).__name__}: {reason}")


def first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point entry of ``state`` holding NaN or Inf, or None."""
    for name, value in state.items():
        # a sum is finite iff every entry is (barring overflow, which the exact check rules out)
        if value.is_floating_point() and not torch.isfinite(value.sum()):
            if not torch.isfinite(value).all():
                return name
    return None


def normalise_weights(weights: Sequence[float] | None, k: int) -> list[float]:
    """``weights`` scaled to sum to one (default: equal), one per model."""
    if weights is None:
        return [1.0 / k] * k
    weights = [float(w) for w in weights]
    if len(weights) != k:
        raise OtfuseError(f"got {len(weights)} weights for {k} models")
    if any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise OtfuseError("weights must be non-negative and sum to a positive number")
    total = sum(weights)
    return [w / total for w in weights]


def check_anchor(anchor: int, k: int) -> int:
    if not 0 <= anchor < k:
        raise OtfuseError(f"anchor must be an index in 0..{k - 1}, got {anchor}")
    return anchor


# -- inputs ---------------------------------------------------------------------------------------
def sample_inputs(data: object, n: int, seed: int) -> torch.Tensor:
    """A seeded sample of at most ``n`` inputs (rows) from ``data``, checked.

    ``data`` may be a tensor or array (N, ...), a pair ``(inputs, labels)`` of them (the labels
    are not read), a dataset with ``.images`` (:mod:`otfuse.data`), a map-style
    ``torch.utils.data.Dataset`` whose items are inputs or (input, label) pairs (e.g. a
    ``TensorDataset``), or an iterable of batches (a ``DataLoader``).
    """
    if n < 1:
        raise DataError(f"the sample needs at least one input, not {n}")
    inputs = _as_tensor(data, n, seed)
    if inputs.ndim == 0 or len(inputs) == 0:
        raise DataError("data holds no inputs")
    if len(inputs) > n:
        gen = torch.Generator().manual_seed(seed)
        inputs = inputs[torch.randperm(len(inputs), generator=gen)[:n]]
    return check_inputs(inputs)


def check_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """Floating-point, finite inputs, or token ids (int64 / int32) as they are."""
    if inputs.dtype in (torch.int64, torch.int32):
        return inputs
    if not inputs.is_floating_point():
        raise DataError(
            f"data has dtype {str(inputs.dtype).replace('torch.', '')}; the models take "
            "floating-point inputs (convert them, e.g. with .float() / 255)"
        )
    bad = ~torch.isfinite(inputs.reshape(len(inputs), -1)).all(1)
    if bad.any():
        raise DataError(
            f"data holds NaN or Inf values (input {int(bad.nonzero()[0])} of the sample)"
        )
    return inputs


def check_one_input(example: torch.Tensor | tuple, reads_data: bool) -> None:
    """A model of several inputs (``example`` a tuple of them) is not fused on data: the stages and
    activations that read data run the models on one tensor of inputs."""
    if reads_data and isinstance(example, (tuple, list)) and len(example) != 1:
        raise DataError(
            f"the models take {len(example)} inputs (example_input is a tuple of {len(example)}); "
            "fusing them on data is not supported: what reads data runs the models on one tensor "
            "of inputs (fuse without data, or with weights alone: recipe='paper-wts')"
        )


def check_fits(inputs: torch.Tensor, example: torch.Tensor | tuple, model: nn.Module) -> None:
    """``inputs`` (N, ...) have the per-input shape of ``example``, in words when they do not."""
    if not isinstance(example, torch.Tensor) or inputs.shape[1:] == example.shape[1:]:
        return
    raise DataError(_mismatch(tuple(inputs.shape[1:]), tuple(example.shape[1:]), model))


def check_token_ids(
    sample: torch.Tensor | None, example: torch.Tensor | tuple, model: nn.Module
) -> None:
    """Where the models look up their input in a vocabulary (the first ``nn.Embedding`` called with
    the example's ids, :func:`input_vocabulary`): ``sample`` holds integers too, and every id of
    both lies in ``0 .. V - 1`` (a lookup outside it fails deep in the model)."""
    size = input_vocabulary(model, example)
    if size is None:
        return
    if sample is not None and not _is_integer(sample):
        raise DataError(
            f"data holds {str(sample.dtype).replace('torch.', '')} values; the models take token "
            "ids (integers), as the example input does"
        )
    for what, ids in (("data", sample), ("example input", example)):
        if ids is None or ids.numel() == 0:
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= size:
            raise DataError(
                f"{what} holds token id {low if low < 0 else high}, outside the models' "
                f"vocabulary of {size} tokens (ids 0..{size - 1})"
            )


class _Found(Exception):
    pass


def input_vocabulary(model: nn.Module, example: torch.Tensor | tuple) -> int | None:
    """The size of the first ``nn.Embedding`` that ``model`` calls with the integer ``example``'s
    own ids (in any shape), found by starting a forward pass that stops at that lookup; None for
    other inputs, or when no embedding reads the input (a class or position table, ids the model
    transforms first)."""
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if not embeddings or not isinstance(example, torch.Tensor) or not _is_integer(example):
        return None
    example = example.clone()  # the model may change its input in place; ``flat`` follows it
    flat = example.reshape(-1)

    def stop_at_lookup(module: nn.Module, args: tuple) -> None:
        ids = args[0] if args else None
        if isinstance(ids, torch.Tensor) and ids.numel() == flat.numel():
            if torch.equal(ids.reshape(-1), flat):
                raise _Found(module.num_embeddings)

    handles = [m.register_forward_pre_hook(stop_at_lookup) for m in embeddings]
    try:
        with torch.no_grad(), evaluating([model]):
            model(example)
    except _Found as found:
        return int(found.args[0])
    except Exception:  # the model fails before any lookup of its input: tracing will say why
        return None
    finally:
        for handle in handles:
            handle.remove()
    return None


def _is_integer(x: torch.Tensor) -> bool:
    return not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool


def _mismatch(got: tuple[int, ...], expected: tuple[int, ...], model: nn.Module) -> str:
    layer = next((m for m in model.modules() if isinstance(m, _LAYERS)), None)
    if len(got) == len(expected) >= 2 and got[1:] == expected[1:] and got[0] != expected[0]:
        unit = "channel" if got[0] == 1 else "channels"
        return f"data has {got[0]} {unit}, the models expect {expected[0]}"
    if np.prod(got) == np.prod(expected):
        return (
            f"data inputs have shape {_shape(got)}, the example input {_shape(expected)} (the "
            "same number of values): give the example input in the data's shape, or leave it out"
        )
    if isinstance(layer, nn.Linear) and len(expected) == 1:
        return f"data has {int(np.prod(got))} features per input, the models expect {expected[0]}"
    return f"data inputs have shape {_shape(got)}, the models expect {_shape(expected)}"


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) or "()"


def _as_tensor(data: object, n: int, seed: int) -> torch.Tensor:
    if hasattr(data, "images"):
        data = data.images
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, torch.Tensor):
        return data
    pair = _inputs_of_labelled_pair(data)
    if pair is not None:
        return pair
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        return _from_dataset(data, n, seed)
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        raise DataError(
            f"data must be a tensor, a dataset or batches of inputs, not {type(data).__name__}"
        )
    return _take_batches(data, n)


def _inputs_of_labelled_pair(data: object) -> torch.Tensor | None:
    """The inputs of ``data = (inputs, labels)``: two tensors or arrays of equal length, the second
    one label per input (1-D), the first with more dimensions or floating-point against integer
    labels. Read as two batches, the pair would be refused (their shapes differ)."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        return None
    inputs, labels = data
    if not all(isinstance(d, (torch.Tensor, np.ndarray)) for d in data):
        return None
    if labels.ndim != 1 or inputs.ndim == 0 or len(inputs) != len(labels):
        return None
    if inputs.ndim >= 2 or (_is_float(inputs) and not _is_float(labels)):
        return torch.from_numpy(inputs) if isinstance(inputs, np.ndarray) else inputs
    return None


def _is_float(x: torch.Tensor | np.ndarray) -> bool:
    if isinstance(x, np.ndarray):
        return np.issubdtype(x.dtype, np.floating)
    return x.is_floating_point()


def _first(item: object) -> object:
    return item[0] if isinstance(item, (tuple, list)) else item


def _from_dataset(dataset: torch.utils.data.Dataset, n: int, seed: int) -> torch.Tensor:
    """``n`` seeded items of a map-style dataset, stacked."""
    count = len(dataset)
    if count == 0:
        raise DataError("data holds no inputs")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(count, generator=gen)[:n].sort().values if count > n else range(count)
    items = [_first(dataset[int(i)]) for i in order]
    if not all(isinstance(x, torch.Tensor) for x in items):
        raise DataError(f"dataset items must be tensors, not {type(items[0]).__name__}")
    try:
        return torch.stack(items)
    except RuntimeError:
        raise DataError("dataset items have different shapes") from None


def _take_batches(data: Iterable, n: int) -> torch.Tensor:
    parts, total = [], 0
    for batch in data:
        x = _first(batch)
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor):
            raise DataError(f"data batches must hold tensors, not {type(x).__name__}")
        parts.append(x)
        total += len(x)
        if total >= n:
            break
    if not parts:
        raise DataError("data holds no inputs")
    if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
        raise DataError("data batches have inputs of different shapes")
    return torch.cat(parts)


def example_input_for(
    model: nn.Module, example_input: torch.Tensor | tuple | None, sample: torch.Tensor | None
) -> torch.Tensor | tuple:
    """The input to trace with: the caller's, two rows of the sample, or zeros of the shape the
    model records (``otfuse_config["in_shape"]``, as zoo models do)."""
    if example_input is not None:
        return example_input
    if sample is not None:
        return sample[:2]
    in_shape = getattr(model, "otfuse_config", {}).get("in_shape")
    if in_shape is not None:
        return torch.zeros(2, *in_shape)
    raise OtfuseError(
        "pass example_input=<a tensor the models accept> (or data) to trace the models"
    )
