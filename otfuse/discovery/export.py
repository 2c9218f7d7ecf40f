"""Capture a model with ``torch.export`` and find its neuron spaces on the ATen graph.

``torch.export.export(model, args, strict=False)`` runs the model's Python once on fake tensors and
records every ATen op, so it captures what ``torch.fx`` symbolic tracing cannot: Hugging Face models,
lengths read from the input's shape, ``nn.MultiheadAttention``. ``ep.module()`` is a ``GraphModule``
whose ``get_attr`` nodes are named as the model's ``state_dict`` (and share its tensors). The batch
axis is exported as dynamic when the model allows it, so the graph also runs on other batch sizes;
every other shape is specialised to the example input.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from io import StringIO

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from otfuse.discovery.aten import aten_rule
from otfuse.discovery.aten_shapes import module_call
from otfuse.discovery.aten_values import (
    TRACKED,
    ParamView,
    aten,
    info_of,
    opaque,
    unsupported_with,
)
from otfuse.discovery.layout import Layout, SpaceGraph
from otfuse.discovery.walker import Feature, SpaceBuilder, TensorShape, copies, shape_of
from otfuse.errors import OtfuseError, UnsupportedOpError
from otfuse.modes import evaluating


def export_graph(model: nn.Module, example_input: torch.Tensor | tuple) -> torch.fx.GraphModule:
    """The ATen graph of ``model`` on ``example_input`` (eval mode), every node's shape annotated
    (from the export's own fake values; by a run of the graph when they do not suffice)."""
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    name = type(model).__name__
    with evaluating([model]), _quiet():
        try:
            gm = _export(model, inputs)
        except Exception as exc:  # noqa: BLE001 - any capture failure is reported the same way
            raise OtfuseError(
                f"cannot capture {name} with torch.export ({_first_line(exc)})"
            ) from None
        if _shapes_from_export(gm):
            return gm
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*copies(inputs))
        except Exception as exc:  # noqa: BLE001
            raise OtfuseError(f"example input does not fit {name}: {_first_line(exc)}") from None
    return gm


def _shapes_from_export(gm: torch.fx.GraphModule) -> bool:
    """Annotate every tensor-valued node with its shape on the example input, read from the fake
    values ``torch.export`` recorded (``node.meta["val"]``; a symbolic size by its hint, the
    example's size), so the model need not run again. False (nothing annotated) when a node whose
    value is used has no recorded value or a size without a hint: then the model is run
    (``ShapeProp``)."""
    shapes: dict[torch.fx.Node, TensorShape] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if "val" not in node.meta:
            if node.users:
                return False
            continue
        val = node.meta["val"]
        if isinstance(val, torch.Tensor):
            sizes = [d if isinstance(d, int) else d.node.hint for d in val.shape]
            if any(not isinstance(d, int) for d in sizes):
                return False
            shapes[node] = TensorShape(torch.Size(sizes), val.dtype)
    for node, shape in shapes.items():
        node.meta["tensor_meta"] = shape
    return True


@contextmanager
def _quiet() -> Iterator[None]:
    """No warnings, log lines or printed graphs from torch.export's tracing (a failure is reported
    in one line)."""
    loggers = [logging.getLogger(n) for n in ("torch.fx.experimental.symbolic_shapes", "torch")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), redirect_stderr(StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _export(model: nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    """Export with a batch of any size, else of the example's. torch.export fixes a size of one,
    so an example of one row is captured on two copies of it."""
    dynamic = tuple(
        {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
        for x in inputs
    )
    # guards recorded on a non-contiguous example fail on other inputs (an AttributeError)
    inputs = tuple(x.contiguous() if isinstance(x, torch.Tensor) else x for x in inputs)
    rows = [x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    two = inputs
    if rows and all(len(x) == 1 for x in rows):
        two = tuple(_twice(x) for x in inputs)
    try:
        return torch.export.export(model, two, strict=False, dynamic_shapes=dynamic).module()
    except Exception:  # noqa: BLE001 - a model that needs a static batch
        return torch.export.export(model, inputs, strict=False).module()


def fixed_batch(gm: torch.fx.GraphModule) -> int | None:
    """The batch size a ``torch.export`` graph was specialised to (its first tensor input's first
    size recorded as a number instead of a symbol), else None (any batch; fx graphs)."""
    for node in gm.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            size = value.shape[0]  # a symbol the capture replaced by a number is fixed too
            return size if isinstance(size, int) else size.node.maybe_as_int()
    return None


def _twice(x: object) -> object:
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        return x.expand(2, *x.shape[1:]).clone()
    return x


def modularize(gm: torch.fx.GraphModule, model: nn.Module) -> torch.fx.GraphModule:
    """Calls of the model's ``nn.Linear``, ``nn.Conv1d/2d``, ``nn.LayerNorm`` and (eval-mode)
    ``nn.BatchNorm1d/2d/3d`` become
    ``call_module`` nodes again (same name, same shape annotation), so the stages that work layer
    by layer (repair, refit) find them as in an fx trace. ``gm`` is changed in place and returned."""
    modules = dict(model.named_modules())
    for node in list(gm.graph.nodes):
        path = _module_of(node, modules)
        if path is None:
            continue
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        name = node.name
        gm.graph.erase_node(node)
        call.name = name
        if gm.get_submodule(path) is not modules[path]:
            gm.add_submodule(path, modules[path])
    gm.recompile()
    return gm


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _batch_norm_of(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The BatchNorm module whose eval-mode call ``node`` (``aten.batch_norm(x, weight, bias,
    running_mean, running_var, training=False, momentum, eps, ...)``) is exactly, or None."""
    names = [
        a.target if isinstance(a, torch.fx.Node) and a.op == "get_attr" else a for a in node.args
    ]
    if len(names) < 8 or not isinstance(names[1], str) or names[5] is not False:
        return None
    path = names[1].rsplit(".", 1)[0]
    module = modules.get(path)
    wanted = [f"{path}.{n}" for n in ("weight", "bias", "running_mean", "running_var")]
    if type(module) not in _BATCH_NORMS or names[1:5] != wanted or names[7] != module.eps:
        return None
    return path if module.affine and module.track_running_stats else None


def _module_of(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The module whose call ``node`` is exactly, or None."""
    packet = getattr(node.target, "overloadpacket", None)
    if node.op == "call_function" and packet is aten.batch_norm:
        return _batch_norm_of(node, modules)
    if node.op != "call_function" or packet not in (aten.linear, aten.conv1d, aten.conv2d):
        if packet is not aten.layer_norm:
            return None
    names = [
        a.target if isinstance(a, torch.fx.Node) and a.op == "get_attr" else a for a in node.args
    ]
    params = names[2:4] if packet is aten.layer_norm else names[1:3]
    if not params or not isinstance(params[0], str) or not params[0].endswith(".weight"):
        return None
    path = params[0].rsplit(".", 1)[0]
    module = modules.get(path)
    bias = params[1] if len(params) > 1 else None
    expected_bias = f"{path}.bias" if getattr(module, "bias", None) is not None else None
    if module is None or bias != expected_bias:
        return None
    if packet is aten.linear:
        return path if type(module) is nn.Linear else None
    if packet is aten.layer_norm:
        same = (
            list(module.normalized_shape) == list(node.args[1])
            if hasattr(module, "normalized_shape")
            else False
        )
        eps = node.args[4] if len(node.args) > 4 else 1e-5
        return path if type(module) is nn.LayerNorm and same and eps == module.eps else None
    conv = nn.Conv1d if packet is aten.conv1d else nn.Conv2d
    if (
        type(module) is not conv
        or module.padding_mode != "zeros"
        or isinstance(module.padding, str)
    ):
        return None
    settings = [tuple(a) if isinstance(a, (list, tuple)) else a for a in node.args[3:7]]
    wanted = [module.stride, module.padding, module.dilation, module.groups]
    defaults = [(1,) * len(module.stride), (0,) * len(module.stride), (1,) * len(module.stride), 1]
    settings += defaults[len(settings) :]
    return path if [tuple(x) if isinstance(x, list) else x for x in settings] == wanted else None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if "data-dependent" in text:  # e.g. nn.Transformer checking whether tgt_mask is causal
        line += (
            " (the model branches on a tensor's values; for nn.Transformer's masks pass "
            "tgt_is_causal= / src_is_causal= explicitly)"
        )
    return line


def discover_exported(model: nn.Module, example_input: torch.Tensor | tuple) -> SpaceGraph:
    """The neuron spaces of ``model`` from its ``torch.export`` graph (see :func:`export_graph`).

    Raises:
        UnsupportedOpError: an op with tracked units and no rule, naming the op, node and module.
        OtfuseError: the model cannot be exported or does not accept ``example_input``.
    """
    gm = modularize(export_graph(model, example_input), model)
    b = SpaceBuilder(gm)
    b.know_tied(model)
    b.weights = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for node in gm.graph.nodes:
        b.info[node] = _visit(b, node, b.canonical)
    graph = b.build(capture="export")
    used = opaque(b)
    for space in graph.transportable():
        for member in space.members:
            if member.param in used:
                raise UnsupportedOpError(
                    f"{used[member.param]} is not supported on parameter '{member.param}', whose "
                    f"units are aligned"
                )
    return graph


def _visit(b: SpaceBuilder, node: torch.fx.Node, first: dict[str, str]) -> object:
    if node.op == "placeholder":
        return None
    if node.op == "get_attr":
        target, shape = str(node.target), shape_of(node)
        if target not in b.aliases or shape is None:
            return None  # a constant or a buffer outside the state dict: never transported
        b.params_seen.add(first[target])  # a tied weight by its first name in the state dict
        return ParamView(first[target], tuple(range(len(shape))))
    if node.op == "output":
        for value in held_outputs(b.gm, _flatten(node.args)):
            _fix(b, info_of(b, value))
        return None
    if node.op == "call_module":
        return module_call(b, node)
    rule = aten_rule(node)
    return rule(b, node) if rule is not None else unsupported_with(b, node)


def held_outputs(gm: torch.fx.GraphModule, values: list) -> list:
    """The graph's outputs (``values``, flattened) whose units stay in place: all of them, but of
    a Hugging Face output with ``logits`` not the model's own states (:data:`STATE_FIELDS`: an
    encoder-decoder's ``encoder_last_hidden_state``, hidden states, attentions), which held fixed
    would keep the whole residual stream in place. Predictions next to the logits (a detector's
    ``pred_boxes``) stay held."""
    spec = getattr(gm, "_out_spec", None)
    if spec is None or not getattr(spec.type, "__module__", "").startswith("transformers"):
        return values
    try:
        fields = pytree.tree_unflatten(list(range(len(values))), spec)
    except Exception:  # noqa: BLE001 - another structure than the graph's: hold them all
        return values
    if not isinstance(fields, dict) or not isinstance(fields.get("logits"), int):
        return values
    predictions = [field for key, field in fields.items() if not key.endswith(STATE_FIELDS)]
    return [values[i] for i in pytree.tree_leaves(predictions)]


# the fields of a Hugging Face output that are the model's own states, not predictions
STATE_FIELDS = ("last_hidden_state", "hidden_states", "attentions")


def _fix(b: SpaceBuilder, info: object) -> None:
    """Units that reach the model's output are fixed."""
    if isinstance(info, Feature):
        b.fix(info.layout)
    elif isinstance(info, TRACKED):
        for part in getattr(info, "parts", (info,)):
            if isinstance(part, Feature):
                b.fix(part.layout)
            else:
                b.fix(Layout.of(part.space))


def _flatten(args: object) -> list:
    if isinstance(args, (list, tuple)):
        return [x for a in args for x in _flatten(a)]
    if isinstance(args, dict):
        return [x for a in args.values() for x in _flatten(a)]
    return [args]
