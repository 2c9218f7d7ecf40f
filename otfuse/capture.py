"""A model's graph, captured once per architecture, and runs of that graph with hooks at its nodes.

Capture (``torch.fx`` with shape propagation, or ``torch.export`` where fx does not suffice: see
:func:`otfuse.discovery.discover`) and neuron-space discovery depend only on the architecture, so :class:`GraphCache` does them once for every architecture in a fusion call and
*rebinds* the result to each further model of that architecture: a new ``GraphModule`` over a copy of
the same graph (node shapes included) whose submodules and parameters are the other model's.

:func:`run_with_hooks` runs a traced graph on inputs and calls a function before or after chosen
nodes: the one interpreter behind activation recording, statistics repair and refit.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx
from torch import nn

from otfuse.discovery import SpaceGraph, discover
from otfuse.discovery.export import fixed_batch
from otfuse.errors import UnsupportedOpError

BeforeHook = Callable[[torch.fx.Node, tuple], None]
AfterHook = Callable[[torch.fx.Node, Any], Any]
_SIMPLE = (bool, int, float, str, type(None))
_FUNCTIONS = (
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    functools.partial,
)


def architecture_key(model: nn.Module) -> tuple:
    """What must agree for two models to share one traced graph: the class, every submodule's class
    and simple attributes (flags such as ``residual=True``), and every parameter's and buffer's name,
    shape and dtype."""
    modules = []
    for name, module in model.named_modules():
        flags = tuple(
            (k, _flag(v))
            for k, v in sorted(vars(module).items())
            if not k.startswith("_") and k != "training" and _is_flag(v)
        )
        modules.append((name, type(module), flags))
    tensors = tuple(
        (name, tuple(t.shape), t.dtype) for name, t in model.state_dict(keep_vars=True).items()
    )
    return (type(model), tuple(modules), tensors)


def _is_simple(value: object) -> bool:
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, _SIMPLE) for v in value)
    return isinstance(value, _SIMPLE)


def _is_flag(value: object) -> bool:
    """Attributes that can change what ``forward`` computes without changing a parameter: simple
    values and plain functions (``self.act = F.relu`` against ``torch.tanh``)."""
    return _is_simple(value) or isinstance(value, _FUNCTIONS)


def _flag(value: object) -> object:
    """``value`` as a hashable key: lists as tuples (Gemma3's ``layer_types``), functions by what
    they compute (:func:`_function_key`)."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, _FUNCTIONS):
        return _function_key(value)
    return value


def _function_key(fn: object) -> object:
    """What a function attribute computes, equal across models that hold equal functions: a bound
    method as its function (each model binds its own), a ``functools.partial`` as its function and
    arguments (Gemma's ``GELUTanh`` makes one per instance, and a deep copy makes another), a
    Python function as its code, defaults and closure values (a lambda made per model); anything
    unhashable in them leaves the object itself (that model is then traced on its own)."""
    if isinstance(fn, types.MethodType):
        return _function_key(fn.__func__)
    if isinstance(fn, functools.partial):
        key = (_function_key(fn.func), fn.args, tuple(sorted(fn.keywords.items())))
    elif isinstance(fn, types.FunctionType):
        cells = tuple(_cell_value(c) for c in fn.__closure__ or ())
        key = (fn.__code__, fn.__defaults__, cells)
    else:
        return fn
    try:
        hash(key)
    except TypeError:
        return fn
    return key


def _cell_value(cell: types.CellType) -> object:
    try:
        value = cell.cell_contents
    except ValueError:  # an empty cell
        return None
    return _function_key(value) if isinstance(value, _FUNCTIONS) else value


def rebind(graph: SpaceGraph, model: nn.Module) -> SpaceGraph:
    """``graph`` (traced from another model of the same architecture) over ``model``'s modules.

    An exported graph names parameters as the ``state_dict`` does and holds helpers of its own
    (constants, a guard module): those come from the original graph module, the parameters and
    buffers from ``model``."""
    copied = torch.fx.Graph()
    values: dict[torch.fx.Node, torch.fx.Node] = {}
    out = copied.graph_copy(graph.graph_module.graph, values)
    copied.output(out)
    original = graph.graph_module
    own = graph.capture == "fx" and all(_has_attr(model, n.target) for n in _attrs_read(original))
    root = model if own else _exported_root(original, model)
    gm = torch.fx.GraphModule(root, copied, class_name=type(model).__name__)
    return SpaceGraph(graph.spaces, gm, set(graph.param_names), graph.capture)


def protect_inputs(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make ``gm`` work on copies of its tensor inputs: every later run (activations, REPAIR,
    refit, candidate selection) then leaves the caller's sample as it was, and sees it as it was,
    even when the model changes its input in place (``x.mul_(2)``, ``nn.ReLU(inplace=True)`` on
    the input), where each run would otherwise change the sample for the next. Inserted after
    discovery, which never sees the copies; ``gm`` is changed in place and returned."""
    graph = gm.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder" and _is_tensor(n) and n.users]
    for node in inputs:
        with graph.inserting_after(node):
            copy = graph.call_function(torch.clone, (node,))
        copy.meta = dict(node.meta)
        node.replace_all_uses_with(copy, delete_user_cb=lambda user, copy=copy: user is not copy)
    if inputs:
        gm.recompile()
    return gm


def _is_tensor(node: torch.fx.Node) -> bool:
    """Whether a traced node held a tensor (its recorded shape, or an exported graph's value)."""
    return "tensor_meta" in node.meta or isinstance(node.meta.get("val"), torch.Tensor)


def _attrs_read(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "get_attr"]


def _has_attr(module: nn.Module, target: str) -> bool:
    try:
        _attr(module, target)
    except AttributeError:
        return False
    return True


def _exported_root(original: torch.fx.GraphModule, model: nn.Module) -> dict[str, Any]:
    """Every attribute the graph reads: ``model``'s tensors, else the original's (an exported
    graph's helpers, or the constants torch.fx made of tensors created in ``forward``, such as
    ``_tensor_constant0`` for a ``torch.arange``)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    root: dict[str, Any] = {}
    for node in original.graph.nodes:
        if node.op == "get_attr":
            root[node.target] = tensors.get(node.target)
            if root[node.target] is None:
                root[node.target] = _attr(original, node.target)
        elif node.op == "call_module":
            try:
                root[node.target] = model.get_submodule(node.target)
            except AttributeError:  # the exported graph's own helpers
                root[node.target] = original.get_submodule(node.target)
    return root


def _attr(module: nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


class GraphCache:
    """Neuron spaces of each architecture met in one fusion call, traced once on ``example_input``.

    ``traces`` counts the models actually traced (one per architecture).
    """

    def __init__(self, example_input: torch.Tensor | tuple) -> None:
        self.example_input = example_input
        self.traces = 0
        self._graphs: dict[tuple, SpaceGraph] = {}
        self._bound: dict[int, tuple[nn.Module, SpaceGraph]] = {}

    def graph(self, model: nn.Module) -> SpaceGraph:
        """The neuron spaces of ``model``, with a graph module that runs ``model``'s parameters."""
        bound = self._bound.get(id(model))
        if bound is not None:  # the cache holds the model, so its id is not reused
            return bound[1]
        key = architecture_key(model)
        known = self._graphs.get(key)
        if known is None:
            graph = discover(model, self.example_input)
            protect_inputs(graph.graph_module)
            self.traces += 1
            self._graphs[key] = graph
        else:
            graph = rebind(known, model)
        self._bound[id(model)] = (model, graph)
        return graph


def run_with_hooks(
    gm: torch.fx.GraphModule,
    *inputs: Any,
    before: Mapping[str, BeforeHook] | None = None,
    after: Mapping[str, AfterHook] | None = None,
) -> Any:
    """Run ``gm`` on ``inputs``; call ``before[name](node, args)`` before node ``name`` runs and
    ``after[name](node, value)`` after it (a hook that returns something other than None replaces
    the node's value for the rest of the run). Returns the graph's output.

    Raises :class:`~otfuse.errors.UnsupportedOpError` when ``gm`` holds its batch size fixed
    (:func:`fixed_batch`) and ``inputs`` have another."""
    fixed = fixed_batch(gm)
    first = next((x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0), None)
    if fixed is not None and first is not None and len(first) != fixed:
        raise UnsupportedOpError(
            f"the model's graph (captured by torch.export) has its batch size fixed at {fixed}, "
            f"so it cannot run on {len(first)} inputs: the model reads its batch size as a Python "
            "number (len(x), int(x.size(0)); x.shape[0] keeps it free); recipe='paper-wts' runs "
            "no inputs"
        )
    # torch.export's guards read the strides of a non-contiguous input as None (AttributeError)
    inputs = tuple(x.contiguous() if isinstance(x, torch.Tensor) else x for x in inputs)
    return _Hooked(gm, before or {}, after or {}).run(*inputs)


class _Hooked(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, before: Mapping, after: Mapping) -> None:
        super().__init__(gm)
        self.before, self.after = before, after

    def run_node(self, n: torch.fx.Node) -> Any:
        hook = self.before.get(n.name)
        if hook is not None:
            args, _ = self.fetch_args_kwargs_from_env(n)
            hook(n, args)
        out = super().run_node(n)
        hook = self.after.get(n.name)
        if hook is not None:
            replaced = hook(n, out)
            if replaced is not None:
                out = replaced
        return out
