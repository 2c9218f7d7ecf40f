"""Neuron-space discovery from the model's graph (no hand-written spec per architecture).

Two captures: ``torch.fx`` symbolic tracing with the rules of :mod:`otfuse.discovery.rules` (first,
as before: every model it describes keeps its spaces and results), then, when fx cannot trace the
model or meets an op it does not describe (heads, attention, packed projections), ``torch.export``
with the ATen rules of :mod:`otfuse.discovery.aten`.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from otfuse.discovery.export import discover_exported
from otfuse.discovery.layout import (
    HeadStructure,
    Layout,
    Member,
    NeuronSpace,
    Segment,
    SpaceGraph,
)
from otfuse.discovery.registry import (
    REGISTRY,
    RuleRegistry,
    linear_rule,
    norm_rule,
    register_rule,
    registered_rules,
    rule_for,
    unregister_rule,
)
from otfuse.discovery.rules import Rule, info_of, join, open_space, tracked_input, where
from otfuse.discovery.walker import Feature, Info, ParamRef, SpaceBuilder, copies, trace
from otfuse.errors import OtfuseError, UnsupportedOpError

__all__ = [
    "Feature",
    "HeadStructure",
    "Info",
    "Layout",
    "Member",
    "NeuronSpace",
    "Rule",
    "RuleRegistry",
    "Segment",
    "SpaceBuilder",
    "SpaceGraph",
    "copies",
    "discover",
    "discover_exported",
    "join",
    "linear_rule",
    "module_calls",
    "norm_rule",
    "open_space",
    "register_rule",
    "registered_rules",
    "tracked_input",
    "unregister_rule",
    "parameter_owners",
    "shares_parameters",
]


def module_calls(gm: torch.fx.GraphModule) -> dict[str, int]:
    """How many times the traced graph calls each submodule (by qualified name)."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def shares_parameters(module: nn.Module, owners: dict[int, int]) -> bool:
    """Whether one of ``module``'s own parameters is also another module's (a shared ``Parameter``,
    tied weights); ``owners`` counts the modules owning each parameter (:func:`parameter_owners`)."""
    return any(owners[id(p)] > 1 for p in module.parameters(recurse=False))


def parameter_owners(root: nn.Module) -> dict[int, int]:
    """For every parameter under ``root`` (by ``id``), how many modules hold it as their own."""
    owners: dict[int, int] = {}
    for module in root.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return owners


def refuse_reparametrized(model: nn.Module) -> None:
    """Raise :class:`UnsupportedOpError` when a module's weight is computed from other tensors by
    ``weight_norm`` or ``spectral_norm`` (either API): its ``state_dict`` holds those tensors
    (``parametrizations.weight.original0``, ``weight_g``, ...), not the weight whose units are
    aligned. The message names the module and how to remove the parametrisation."""
    legacy = (WeightNorm, SpectralNorm)
    for name, module in model.named_modules():
        where = f"module '{name or type(model).__name__}' ({type(module).__name__})"
        if parametrize.is_parametrized(module):
            tensors = ", ".join(module.parametrizations)
            raise UnsupportedOpError(
                f"{where} has a parametrised {tensors} (weight_norm, spectral_norm, ...); fuse the "
                f"plain weights: torch.nn.utils.parametrize.remove_parametrizations(module, "
                f"'{next(iter(module.parametrizations))}') on each model first"
            )
        hook = next((h for h in module._forward_pre_hooks.values() if isinstance(h, legacy)), None)
        if hook is not None:
            remove = (
                "remove_weight_norm" if isinstance(hook, WeightNorm) else "remove_spectral_norm"
            )
            raise UnsupportedOpError(
                f"{where} has a {hook.name} computed by {type(hook).__name__}; fuse the plain "
                f"weights: torch.nn.utils.{remove}(module) on each model first"
            )


def discover(model: nn.Module, example_input: torch.Tensor | tuple) -> SpaceGraph:
    """Find the neuron spaces of ``model`` by tracing it on ``example_input``.

    ``torch.fx`` first: modules and functions with a rule registered by :func:`register_rule` are
    kept whole by the trace and described by their rule. When fx cannot trace the model, or its
    rules do not describe an op, the model is captured with ``torch.export`` instead (ATen ops,
    attention heads; registered rules do not apply there) and ``graph.capture`` says so.

    Args:
        model: a module that ``torch.fx`` or ``torch.export`` (non-strict) can capture.
        example_input: a tensor (or tuple of tensors) the model accepts, e.g. shape (2, 3, 32, 32)
            or token ids (2, 16); the exported graph is specialised to its shapes but the batch.

    Returns:
        The :class:`SpaceGraph`: every space with its size and member parameter axes, in visiting
        order. Spaces reaching the model's output are fixed.

    Raises:
        UnsupportedOpError: an op with tracked units and no rule, naming the op and the node (when
            both captures fail, the fx capture's reason, then torch.export's).
        OtfuseError: the model cannot be traced or does not accept ``example_input``.
    """
    refuse_reparametrized(model)
    try:
        return discover_traced(model, example_input)
    except OtfuseError as fx_error:
        if str(fx_error).startswith("example input does not fit"):
            raise
        try:
            return discover_exported(model, example_input)
        except OtfuseError as export_error:
            config = getattr(model, "config", None)
            if "Cache" in str(export_error) and getattr(config, "use_cache", False):
                raise OtfuseError(
                    f"{type(model).__name__} returns its key/value cache (config.use_cache is "
                    "True), which fusion cannot capture; set model.config.use_cache = False on "
                    "each model first"
                ) from None
            unsupported = UnsupportedOpError in (type(fx_error), type(export_error))
            error = UnsupportedOpError if unsupported else OtfuseError
            raise error(f"{fx_error}; with torch.export: {export_error}") from None


def discover_traced(model: nn.Module, example_input: torch.Tensor | tuple) -> SpaceGraph:
    """Neuron spaces from the ``torch.fx`` trace alone (see :func:`discover`)."""
    gm = trace(
        model,
        example_input,
        leaf_types=REGISTRY.leaf_types(),
        wrapped_functions=REGISTRY.wrapped_functions(),
    )
    builder = SpaceBuilder(gm)
    builder.know_tied(model)
    for node in gm.graph.nodes:
        builder.info[node] = _visit(builder, node)
    return builder.build()


def _visit(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    if node.op == "placeholder":
        return None
    if node.op == "get_attr":
        if str(node.target) not in b.aliases:  # b.know_tied learnt the state dict's names
            return None  # a constant made in forward (fx's _tensor_constant): never transported
        return ParamRef(str(node.target))
    if node.op == "output":
        for arg in _flatten(node.args):
            for info in _flatten(info_of(b, arg)):  # a module's tuple output returned as it is
                if isinstance(info, Feature):
                    b.fix(info.layout)
        return None
    cell = node.op == "call_module" and isinstance(b.modules[node.target], nn.RNNCellBase)
    if (
        node.target not in (operator.getitem, getattr)
        and not cell
        and any(isinstance(b.info.get(a), tuple) for a in node.all_input_nodes)
    ):  # a tuple of values with units (an RNN's output) is only indexed, or an LSTM cell's state
        raise UnsupportedOpError(f"{where(node)}: uses a tuple of values with units as one value")
    rule = rule_for(b, node)
    return rule(b, node) if rule is not None else _unknown(b, node)


def _unknown(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    """An op with no rule: fine only if no tracked units flow into it and it holds no parameters."""
    if node.op == "call_module":
        module = b.modules[node.target]
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            raise UnsupportedOpError(
                f"module '{node.target}' ({type(module).__name__}) is not supported: otfuse does not "
                "know how its parameters relate to the units it reads and writes; teach it with "
                f"otfuse.register_rule({type(module).__name__}, rule)"
            )
        label = f"module '{node.target}' ({type(module).__name__})"
    else:
        label = where(node)
    if any(isinstance(info_of(b, a), (Feature, ParamRef)) for a in node.all_input_nodes):
        raise UnsupportedOpError(f"{label} is not supported on tensors whose units are aligned")
    return None


def _flatten(args: object) -> list:
    if isinstance(args, (list, tuple)):
        return [x for a in args for x in _flatten(a)]
    if isinstance(args, dict):
        return [x for a in args.values() for x in _flatten(a)]
    return [args]
