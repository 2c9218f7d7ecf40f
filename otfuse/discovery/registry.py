"""The rule registry: which rule describes each traced op, and how users teach otfuse their own blocks.

One lookup path, :func:`rule_for`: rules registered with :func:`register_rule` first, then the built-in
tables of :mod:`otfuse.discovery.builtin` (``MODULE_RULES``, ``FUNCTION_RULES``). A registered module
class is also a tracing *leaf*: ``torch.fx`` records one ``call_module`` node for it and does not trace
inside, so its ``forward`` may hold anything (data-dependent control flow, ops otfuse does not know).
A registered plain Python function, called by its global name, is likewise kept whole.

A rule has the signature ``rule(builder, node) -> info`` (see :mod:`otfuse.discovery.walker`); the
factories :func:`linear_rule` and :func:`norm_rule` write the common ones, and
:func:`~otfuse.discovery.rules.tracked_input`, :func:`~otfuse.discovery.rules.open_space` and
:func:`~otfuse.discovery.rules.join` are the building blocks of others::

    register_rule(ScaledLinear, linear_rule(writes={"weight": 0, "scale": 0}, reads={"weight": 1}))

    @register_rule(Gain)
    def gain(b, node):
        x = tracked_input(b, node)          # the units of the input (a Feature), or None
        join(b, node, "gamma", 0, x)        # gamma's axis 0 indexes those units
        return x                            # the output keeps them
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence

import torch.fx
from torch import nn

from otfuse.discovery import builtin
from otfuse.discovery.rules import (
    Rule,
    _module_tensor,
    describe,
    join,
    open_space,
    require_axis,
    tracked_input,
)
from otfuse.discovery.walker import Feature, Info, SpaceBuilder, shape_of
from otfuse.errors import UnsupportedOpError

Target = type | str | Callable


class RuleRegistry:
    """Op rules by target: users' rules, looked up first, over the built-in tables.

    A module rule applies to instances of its class and of subclasses; along a module's class
    hierarchy (MRO) the most derived class with a user rule wins. Function and method rules match
    ``node.target`` exactly (a function object, or a method name such as ``"cumsum"``).
    """

    def __init__(
        self,
        module_rules: Sequence[tuple[tuple[type, ...], Rule]],
        function_rules: Mapping[object, Rule],
    ) -> None:
        self.builtin_modules = module_rules  # the built-in tables themselves, not copies
        self.builtin_functions = function_rules
        self._user: dict[Target, Rule] = {}

    def register(self, target: Target, rule: Rule) -> None:
        _check_target(target)
        if not callable(rule):
            raise TypeError(f"a rule must be callable as rule(builder, node), got {rule!r}")
        self._user[target] = rule

    def unregister(self, target: Target) -> Rule:
        if target not in self._user:
            raise KeyError(f"no user rule is registered for {_name(target)} (built-ins stay)")
        return self._user.pop(target)

    def rules(self, *, builtin: bool = False) -> dict[Target, Rule]:
        table: dict[Target, Rule] = {}
        if builtin:
            table.update({t: rule for types_, rule in self.builtin_modules for t in types_})
            table.update(self.builtin_functions)
        table.update(self._user)
        return table

    def rule_for(self, b: SpaceBuilder, node: torch.fx.Node) -> Rule | None:
        if node.op == "call_module":
            cls = type(b.modules[node.target])
            user = next((self._user[c] for c in cls.__mro__ if c in self._user), None)
            if user is not None:
                return user
            return next((r for types_, r in self.builtin_modules if issubclass(cls, types_)), None)
        try:
            return self._user.get(node.target) or self.builtin_functions.get(node.target)
        except TypeError:  # unhashable target
            return None

    def leaf_types(self) -> tuple[type, ...]:
        """Module classes the tracer keeps whole: those with a user rule."""
        return tuple(t for t in self._user if isinstance(t, type))

    def wrapped_functions(self) -> tuple[Callable, ...]:
        """Plain Python functions with a user rule, kept whole by the tracer."""
        return tuple(t for t in self._user if isinstance(t, types.FunctionType))


REGISTRY = RuleRegistry(builtin.MODULE_RULES, builtin.FUNCTION_RULES)


def register_rule(target: Target, rule: Rule | None = None) -> Callable:
    """Teach otfuse what ``target`` does to neuron spaces; usable directly or as a decorator.

    Args:
        target: an ``nn.Module`` subclass (its instances become tracing leaves: fx does not trace
            inside them), or what ``torch.fx`` records as ``node.target`` for a function or method
            call (e.g. ``torch.cumsum``, or ``"cumsum"`` for ``x.cumsum(...)``).
        rule: ``rule(builder, node) -> info``, e.g. from :func:`linear_rule` or :func:`norm_rule`.
            Omitted: returns a decorator that registers the function it decorates.

    Returns:
        ``rule`` (or the decorator). A user rule overrides any built-in rule for the same target and
        replaces an earlier user rule; :func:`unregister_rule` undoes it.

    >>> register_rule(ScaledLinear, linear_rule(writes={"weight": 0, "scale": 0}, reads={"weight": 1}))
    """
    if rule is None:
        _check_target(target)

        def decorator(fn: Rule) -> Rule:
            REGISTRY.register(target, fn)
            return fn

        return decorator
    REGISTRY.register(target, rule)
    return rule


def unregister_rule(target: Target) -> Rule:
    """Remove the user rule for ``target`` and return it (built-in rules cannot be removed).

    Raises:
        KeyError: no user rule is registered for ``target``.
    """
    return REGISTRY.unregister(target)


def registered_rules(*, builtin: bool = False) -> dict[Target, Rule]:
    """The user rules by target (a copy); with ``builtin=True`` the built-in ones too, as the lookup
    sees them (a module rule is listed under each class it names)."""
    return REGISTRY.rules(builtin=builtin)


def rule_for(b: SpaceBuilder, node: torch.fx.Node) -> Rule | None:
    """The rule for ``node``: a user rule first, then a built-in one; None when there is none."""
    return REGISTRY.rule_for(b, node)


# -- factories for the common custom rules -------------------------------------------------------
def linear_rule(
    writes: Mapping[str, int], reads: Mapping[str, int] | None = None, *, axis: int = -1
) -> Rule:
    """A rule for a module that maps the units of its input to new units, like ``nn.Linear``.

    The module computes :math:`y = f(x; \\theta)` where ``x`` holds :math:`n_{in}` units on axis
    ``axis`` (shape ``(..., n_in)`` for ``axis=-1``, ``(B, n_in, H, W)`` for ``axis=1``) and ``y`` holds
    :math:`n_{out}` new units on the same axis. The rule is right when, for permutations :math:`P` of
    the input units and :math:`Q` of the output units,

    .. math::

        f(x P;\\ \\theta_{P,Q}) = f(x; \\theta)\\, Q

    where :math:`\\theta_{P,Q}` permutes the ``reads`` axes by :math:`P` and the ``writes`` axes by
    :math:`Q`. ``nn.Linear`` is ``linear_rule({"weight": 0, "bias": 0}, {"weight": 1})``; with
    ``axis=1`` the same maps describe ``nn.Conv2d``.

    Args:
        writes: parameter name (relative to the module) -> its axis of length :math:`n_{out}` that
            indexes the output units (producers: weight rows, bias, per-output scale).
        reads: parameter name -> its axis of length :math:`n_{in}` that indexes the input units
            (consumers: weight columns). Only the module's first argument carries units.
        axis: the unit axis of the input and of the output.
    """
    reads = dict(reads or {})

    def rule(b: SpaceBuilder, node: torch.fx.Node) -> Info:
        x = tracked_input(b, node)
        ndim = _output_ndim(b, node)
        if isinstance(x, Feature):
            require_axis(node, x, axis, len(shape_of(node.args[0])), "the registered rule")
            for param, param_axis in reads.items():
                join(b, node, param, param_axis, x, role="consumer")
        elif node.op == "call_module":  # the model's input: these axes read units never moved
            for param, param_axis in reads.items():
                tensor = _module_tensor(b.modules[node.target], param, describe(b, node))
                if tensor is not None:
                    b.add_reader(
                        f"{node.target}.{param}", param_axis % tensor.dim(), x,
                        source=node.args[0],
                    )  # fmt: skip
        out_axis = axis % ndim
        return open_space(b, node, shape_of(node)[out_axis], out_axis, producers=writes)

    rule.__name__ = rule.__qualname__ = f"linear_rule(writes={dict(writes)}, reads={reads})"
    return rule


def norm_rule(params: Mapping[str, int], *, axis: int = -1) -> Rule:
    """A rule for a module that keeps its input's units and holds per-unit parameters (a norm, a
    learned gain or bias).

    The module computes :math:`y = f(x; \\theta)` with the same :math:`n` units on axis ``axis`` of
    ``x`` and ``y`` (shape ``(..., n)`` for ``axis=-1``), and for every permutation :math:`P` of the
    units :math:`f(x P;\\ \\theta_P) = f(x; \\theta)\\, P`, where :math:`\\theta_P` permutes every
    ``params`` axis by :math:`P`: e.g. :math:`y_i = \\gamma_i\\, x_i / \\mathrm{rms}(x) + \\beta_i`.
    ``nn.LayerNorm(n)`` is ``norm_rule({"weight": 0, "bias": 0})``.

    Args:
        params: parameter or buffer name (relative to the module) -> its axis of length :math:`n`.
        axis: the unit axis of the input and the output.
    """
    params = dict(params)

    def rule(b: SpaceBuilder, node: torch.fx.Node) -> Info:
        x = tracked_input(b, node)
        _output_ndim(b, node)
        if isinstance(x, Feature):
            require_axis(node, x, axis, len(shape_of(node.args[0])), "the registered rule")
            for param, param_axis in params.items():
                join(b, node, param, param_axis, x, role="norm")
            b.tag(node, x, "norm")
        return x

    rule.__name__ = rule.__qualname__ = f"norm_rule({params}, axis={axis})"
    return rule


def _output_ndim(b: SpaceBuilder, node: torch.fx.Node) -> int:
    shape = shape_of(node)
    if shape is None or not node.args or shape_of(node.args[0]) is None:
        raise UnsupportedOpError(f"{describe(b, node)}: the rule needs one tensor in and one out")
    return len(shape)


def _check_target(target: object) -> None:
    if isinstance(target, type):
        if not issubclass(target, nn.Module) or target is nn.Module:
            raise TypeError(f"a module rule needs a subclass of nn.Module, got {target!r}")
    elif not (isinstance(target, str) or callable(target)):
        raise TypeError(f"a rule's target is a module class, function or method name: {target!r}")


def _name(target: Target) -> str:
    return (
        repr(target) if isinstance(target, str) else getattr(target, "__qualname__", repr(target))
    )
