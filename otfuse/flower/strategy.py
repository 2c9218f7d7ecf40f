"""Flower strategies: :class:`OTFusion` fuses the clients' models with otfuse instead of averaging.

A round of :class:`OTFusion` (Flower's Message API, ``flwr.serverapp.strategy``) is FedAvg's round
with a different aggregation:

.. math::

    \\theta_{\\text{global}} = \\operatorname{fuse}\\big(\\theta_1, \\dots, \\theta_K;\\;
        w_k = n_k / \\textstyle\\sum_j n_j\\big),

where :math:`n_k` is the ``num-examples`` a client reports and ``fuse`` is :func:`otfuse.fuse` with
any recipe (``data-free`` by default; ``data`` with a small unlabeled server-side sample). Every
client is aligned to the anchor, the accepted client with the most examples among those of the
global model's architecture; clients of other widths of the same zoo family are aligned into the
anchor's widths (their ``otfuse_config`` travels in the reply's ``ConfigRecord`` "model").

Before fusing, every reply is checked; a client is left out of the round, with its reason in the
round's :class:`RoundReport`, the log and the metrics (``excluded-<reason>`` counts), when it

* ``failed``: replied with an error (its ClientApp raised);
* ``timeout``: was sent the round's model but did not reply within the round's timeout;
* ``malformed``: its reply lacks one ArrayRecord, or a positive ``num-examples`` (or, with
  ``targets="coverage"``, its ``class-counts``: the examples of each class it trained on);
* ``non-finite``: its weights hold NaN or Inf;
* ``architecture``: its model is not of the global model's family (or its weights do not fit).

With inputs to compare on (the server's sample, or inputs synthesised from the clients' models),
a guard keeps FedAvg's average instead of the fused model when the average is closer to the
clients' prediction ensemble on a held-out share of those inputs (``kept-average`` in the
metrics); it never looks at labels.

The round is fused when at least ``min_fused_nodes`` clients remain (default: Flower's
``min_train_nodes``); otherwise, or when the fusion fails or gives non-finite weights,
``aggregate_train`` returns no arrays and Flower keeps the previous global model: the server never
writes a model it could not fuse. :class:`MeteredFedAvg` is Flower's FedAvg with the same
communication metrics (``bytes-down``, ``bytes-up``), the baseline of the experiments.

>>> strategy = OTFusion(zoo.create("mlpnet"), "data-free", fraction_evaluate=0.0)
>>> result = strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=3)
"""

from __future__ import annotations

import copy
import json
import math
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from otfuse import zoo
from otfuse.baselines import vanilla_average
from otfuse.config import FusionConfig, resolve
from otfuse.distill import teacher_log_probs
from otfuse.errors import OtfuseError
from otfuse.pipeline import fuse, synthesized_inputs
from otfuse.synthesis import can_synthesize
from otfuse.validation import first_non_finite, sample_inputs

__all__ = [
    "MODEL_KEY",
    "REASONS",
    "ClientOutcome",
    "FlowerSetupError",
    "MeteredFedAvg",
    "OTFusion",
    "RoundReport",
    "model_record",
]

MODEL_KEY = "model"  # the reply's ConfigRecord holding the client's architecture
ARCH_FIELD = "otfuse-config"  # in it: the zoo model's otfuse_config as JSON
REASONS = ("failed", "timeout", "malformed", "non-finite", "architecture")
GUARD_SHARE = 0.25  # share of the fusion's inputs held out for the guard
# with targets="coverage" the train message's config asks (True) and the reply's metrics give (a list
# of numbers) the examples of each class the client trained on: label histograms, no labels
COUNTS_KEY = "class-counts"
WIDTH_FIELDS = ("width", "hidden")  # zoo arguments that may differ between clients of one family


class FlowerSetupError(OtfuseError):
    """A federated strategy or app is configured in a way that cannot run."""


class _Excluded(Exception):
    """A reply that is left out of the round, with its reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class ClientOutcome:
    """What happened to one client's reply in a round."""

    node_id: int
    examples: float = 0.0  # its num-examples (the weight of its model)
    reason: str | None = None  # one of REASONS when left out, else None
    detail: str = ""  # the one-line explanation of ``reason``

    @property
    def accepted(self) -> bool:
        return self.reason is None


@dataclass
class RoundReport:
    """One round of :class:`OTFusion`: which clients were fused or left out and why, and costs."""

    server_round: int
    clients: list[ClientOutcome] = field(default_factory=list)
    fused: bool = False
    anchor: int | None = None  # node id of the anchor
    failure: str = ""  # why no global model was written, when ``fused`` is False
    seconds: float = 0.0  # fusion time
    bytes_down: int = 0  # the global model sent to the sampled clients
    bytes_up: int = 0  # the models the clients sent back
    distance_to_average: float = float("nan")  # ||fused - FedAvg|| / ||FedAvg|| (same widths)
    kept_average: bool = False  # the guard kept FedAvg's average (closer to the ensemble)
    kl_fused: float = float("nan")  # KL(clients' ensemble || fused) on the held-out inputs
    kl_average: float = float("nan")  # KL(clients' ensemble || FedAvg's average) on them

    def excluded(self) -> dict[str, int]:
        """Count of left-out clients per reason (every reason, zeros included)."""
        counts = dict.fromkeys(REASONS, 0)
        for client in self.clients:
            if client.reason is not None:
                counts[client.reason] += 1
        return counts

    def metrics(self) -> dict[str, float | int]:
        """The round's numbers as MetricRecord values."""
        accepted = sum(c.accepted for c in self.clients)
        out: dict[str, float | int] = {
            "fused": int(self.fused),
            "clients-fused": accepted if self.fused else 0,
            "clients-excluded": len(self.clients) - accepted,
            "fusion-seconds": self.seconds,
            "bytes-down": self.bytes_down,
            "bytes-up": self.bytes_up,
            "distance-to-average": self.distance_to_average,
            "kept-average": int(self.kept_average),
            "kl-fused": self.kl_fused,
            "kl-average": self.kl_average,
        }
        out.update({f"excluded-{reason}": n for reason, n in self.excluded().items()})
        return out


def model_record(model: nn.Module) -> ConfigRecord:
    """The ConfigRecord a client adds to its reply (key :data:`MODEL_KEY`) so that the server can
    build its architecture: the zoo model's ``otfuse_config`` as JSON (empty for other models)."""
    config = getattr(model, "otfuse_config", None)
    return ConfigRecord({ARCH_FIELD: json.dumps(config) if config else ""})


# --------------------------------------------------------------------------------------------------
# FedAvg that counts its communication


class MeteredFedAvg(FedAvg):
    """Flower's :class:`~flwr.serverapp.strategy.FedAvg`, plus the bytes of each round in its
    metrics: ``bytes-down`` (the global model times the sampled clients) and ``bytes-up`` (the
    arrays of every reply)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._sent: dict[int, tuple[list[int], int]] = {}  # round -> (node ids, bytes down)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        nodes = [m.metadata.dst_node_id for m in messages]
        self._sent[server_round] = (nodes, arrays.count_bytes() * len(nodes))
        return messages

    def _bytes(self, server_round: int, replies: Sequence[Message]) -> tuple[int, int]:
        down = self._sent.get(server_round, ([], 0))[1]
        up = sum(
            record.count_bytes()
            for msg in replies
            if msg.has_content()
            for record in msg.content.array_records.values()
        )
        return down, up

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        down, up = self._bytes(server_round, replies)
        metrics = metrics if metrics is not None else MetricRecord()
        metrics["bytes-down"], metrics["bytes-up"] = down, up
        return arrays, metrics


# --------------------------------------------------------------------------------------------------
# OT fusion


class OTFusion(MeteredFedAvg):
    """FedAvg whose aggregation is :func:`otfuse.fuse` of the clients' models (see the module).

    Args:
        model: the global model's architecture (a zoo model, or any module the clients share);
            its weights are not used.
        config: a :class:`~otfuse.FusionConfig` or recipe name (default ``data-free``).
        server_data: unlabeled inputs (N, ...) the server holds, for recipes that read data (the
            ``data`` recipe); None: the recipe must work without data.
        example_input: an input the model accepts, for tracing (default: zeros of the zoo model's
            ``in_shape``, or the first rows of ``server_data``).
        min_fused_nodes: fuse only when at least this many clients remain after the checks
            (default: ``min_train_nodes``); fewer keep the previous global model.
        refit_rounds: refit (the least-squares stage) only in the first ``refit_rounds`` rounds
            (default 1; None: every round). Its weights fit the clients' outputs closely, and
            clients that train on from refitted models round after round diverged (10 clients,
            Dirichlet 0.5: the data recipe with ensemble targets fell to chance by round 5); later
            rounds fuse with the config's other stages.
        guard: keep FedAvg's average instead of the fused model when the average is closer to
            the clients' example-weighted prediction ensemble (KL divergence, no labels) on
            :data:`GUARD_SHARE` of the fusion's inputs held out from the fusion; needs those
            inputs (server data or synthesis) and clients of the global model's widths.
        **fedavg: FedAvg's options (``fraction_train``, ``min_train_nodes``,
            ``min_available_nodes``, ``weighted_by_key``, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        config: FusionConfig | str | None = "data-free",
        *,
        server_data: torch.Tensor | None = None,
        example_input: torch.Tensor | None = None,
        min_fused_nodes: int | None = None,
        guard: bool = True,
        refit_rounds: int | None = 1,
        **fedavg: object,
    ) -> None:
        super().__init__(**fedavg)
        self.template = copy.deepcopy(model).eval()
        self.config = resolve(config, server_data is not None, {})
        if self.config.needs_data and not self.config.synthesize and server_data is None:
            raise FlowerSetupError(
                f"recipe '{self.config.recipe}' needs data: pass server_data=<unlabeled inputs>"
            )
        self.server_data = server_data
        self.example_input = _example_input(self.template, example_input, server_data)
        self.min_fused_nodes = max(1, min_fused_nodes or self.min_train_nodes or 1)
        self.guard = guard
        if refit_rounds is not None and refit_rounds < 0:
            raise FlowerSetupError(f"refit_rounds must be 0 or more, not {refit_rounds}")
        self.refit_rounds = refit_rounds
        self.reports: list[RoundReport] = []
        self._counts: list[list[float] | None] = []  # the accepted clients' class counts
        self._class_count: int | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages; with ``targets="coverage"`` their config asks each client for
        the examples of each class it trains on (``class-counts``)."""
        if self.config.targets == "coverage":
            config = ConfigRecord({**dict(config), COUNTS_KEY: True})
        return super().configure_train(server_round, arrays, config, grid)

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> otfuse: recipe '%s', min fused nodes %d", self.config.recipe,
            self.min_fused_nodes)  # fmt: skip

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply, fuse the accepted clients' models with weights proportional to
        their examples, and return the fused model's arrays (None when the round could not be
        fused) and the round's metrics."""
        replies = list(replies)
        report = RoundReport(server_round)
        self._round = server_round
        report.bytes_down, report.bytes_up = self._bytes(server_round, replies)
        models, accepted = self._check_replies(server_round, replies, report)
        arrays = self._fuse(models, report) if len(models) >= self.min_fused_nodes else None
        if len(models) < self.min_fused_nodes:
            report.failure = (
                f"{len(models)} usable client(s), fewer than min_fused_nodes={self.min_fused_nodes}"
            )
        if report.failure:
            log(WARNING, "aggregate_train: round %d keeps the previous global model: %s",
                server_round, report.failure)  # fmt: skip
        self.reports.append(report)
        return arrays, self._metrics(accepted, report)

    # -- checks ------------------------------------------------------------------------------------
    def _check_replies(
        self, server_round: int, replies: list[Message], report: RoundReport
    ) -> tuple[list[tuple[nn.Module, float]], list[Message]]:
        """(model, examples) of every accepted reply and the accepted messages; every reply's
        outcome (and every sampled client that did not reply) goes to ``report``."""
        models, accepted, self._counts = [], [], []
        for msg in replies:
            outcome = ClientOutcome(msg.metadata.src_node_id)
            try:
                model, outcome.examples = self._client_model(msg)
                counts = self._class_counts(msg)
                models.append((model, outcome.examples))
                accepted.append(msg)
                self._counts.append(counts)
            except _Excluded as excluded:
                outcome.reason, outcome.detail = excluded.reason, excluded.detail
                log(WARNING, "aggregate_train: round %d leaves out node %d (%s): %s",
                    server_round, outcome.node_id, excluded.reason, excluded.detail)  # fmt: skip
            report.clients.append(outcome)
        replied = {m.metadata.src_node_id for m in replies}
        for node in self._sent.get(server_round, ([], 0))[0]:
            if node not in replied:
                detail = "no reply within the round's timeout"
                report.clients.append(ClientOutcome(node, reason="timeout", detail=detail))
                log(WARNING, "aggregate_train: round %d leaves out node %d (timeout): %s",
                    server_round, node, detail)  # fmt: skip
        return models, accepted

    def _client_model(self, msg: Message) -> tuple[nn.Module, float]:
        """The client's model and example count, or :class:`_Excluded` with the reason."""
        if msg.has_error():
            reason = (msg.error.reason or f"error code {msg.error.code}").strip().splitlines()
            raise _Excluded("failed", reason[-1] if reason else "the client failed")
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) < 1:
            raise _Excluded("malformed", "the reply needs one ArrayRecord and a MetricRecord")
        metrics = next(iter(content.metric_records.values()))
        examples = metrics.get(self.weighted_by_key)
        if not isinstance(examples, (int, float)) or not 0 < examples < math.inf:
            raise _Excluded("malformed", f"no positive '{self.weighted_by_key}' in its metrics")
        state = next(iter(content.array_records.values())).to_torch_state_dict()
        broken = first_non_finite(state)
        if broken is not None:
            raise _Excluded("non-finite", f"'{broken}' holds NaN or Inf values")
        return self._build(state, content), float(examples)

    def _class_counts(self, msg: Message) -> list[float] | None:
        """The client's ``class-counts`` when the config's targets need them (else None), or
        :class:`_Excluded`."""
        if self.config.targets != "coverage":
            return None
        metrics = next(iter(msg.content.metric_records.values()))
        counts = metrics.get(COUNTS_KEY)
        numbers = isinstance(counts, list) and all(
            isinstance(v, (int, float)) and 0 <= v < math.inf for v in counts
        )
        if not numbers or len(counts) < 2 or sum(counts) <= 0:
            raise _Excluded(
                "malformed",
                f"targets=coverage needs '{COUNTS_KEY}' (the examples of each class) in its metrics",
            )
        if len(counts) != self._classes():
            raise _Excluded(
                "malformed",
                f"its '{COUNTS_KEY}' has {len(counts)} classes, the model {self._classes()}",
            )
        return [float(v) for v in counts]

    def _classes(self) -> int:
        """The number of class scores of the global model (its output's last axis)."""
        if self._class_count is None:
            with torch.no_grad():
                self._class_count = int(self.template(self.example_input).shape[-1])
        return self._class_count

    def _build(self, state: dict[str, torch.Tensor], content: RecordDict) -> nn.Module:
        """The client's weights in a module of its architecture (a family member of the template)."""
        arch = _client_arch(content)
        template_arch = getattr(self.template, "otfuse_config", None)
        if arch and template_arch and arch != template_arch:
            if not _same_family(arch, template_arch):
                raise _Excluded("architecture", f"its model {_describe(arch)} is not of the "
                                f"global model's family {_describe(template_arch)}")  # fmt: skip
            try:
                model = zoo.create(**arch)
            except OtfuseError as exc:
                raise _Excluded(
                    "architecture", f"its model record cannot be built: {exc}"
                ) from None
        else:
            model = copy.deepcopy(self.template)
        try:
            model.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise _Excluded("architecture", f"its weights do not fit the model: {first}") from None
        return model.eval()

    # -- fusion -------------------------------------------------------------------------------------
    def _fuse(
        self, models: list[tuple[nn.Module, float]], report: RoundReport
    ) -> ArrayRecord | None:
        """The fused model's arrays, or None (with ``report.failure``) when it could not be made."""
        start = time.perf_counter()
        shapes = _shapes(self.template)
        anchors = [i for i, (m, _) in enumerate(models) if _shapes(m) == shapes]
        if not anchors:
            report.failure = "no usable client has the global model's architecture"
            return None
        anchor = max(anchors, key=lambda i: models[i][1])
        accepted = [c for c in report.clients if c.accepted]
        report.anchor = accepted[anchor].node_id
        fused = self._fused_model([m for m, _ in models], [n for _, n in models], anchor, report)
        report.seconds = time.perf_counter() - start
        if fused is None:
            return None
        broken = first_non_finite(fused.state_dict())
        if broken is not None:
            report.failure = f"the fused model's '{broken}' holds NaN or Inf values"
            return None
        report.fused = True
        state = {k: v.detach().contiguous() for k, v in fused.state_dict().items()}
        report.distance_to_average = _distance_to_average(state, models, shapes)
        return ArrayRecord(state)

    def _fused_model(
        self, models: list[nn.Module], examples: list[float], anchor: int, report: RoundReport
    ) -> nn.Module | None:
        if len(models) == 1:
            return models[0]
        weights = [float(n) for n in examples]
        try:
            fusion_inputs, held_out = self._inputs(models)
            options = {"num_samples": len(fusion_inputs)} if fusion_inputs is not None else {}
            if self.config.targets == "coverage":
                options["class_counts"] = self._counts
            result = fuse(
                models, self._round_config(), data=fusion_inputs, example_input=self.example_input,
                weights=weights, anchor=anchor, **options,
            )  # fmt: skip
        except OtfuseError as exc:
            report.failure = f"fusion failed: {exc}"
            return None
        except Exception as exc:  # a server keeps its global model rather than crash mid-run
            log(ERROR, "aggregate_train: fusion raised:\n%s", traceback.format_exc())
            report.failure = f"fusion raised {type(exc).__name__}: {exc}"
            return None
        if held_out is None or any(_shapes(m) != _shapes(self.template) for m in models):
            return result.model
        counts = self._counts if self.config.targets == "coverage" else None
        return _closer(result.model, vanilla_average(models, weights), models, weights, held_out,
                       report, counts)  # fmt: skip

    def _round_config(self) -> FusionConfig:
        """The config of the current round: without ``refit`` after ``refit_rounds`` rounds."""
        late = self.refit_rounds is not None and getattr(self, "_round", 1) > self.refit_rounds
        if not late or "refit" not in self.config.stages:
            return self.config
        return self.config.replace(stages=tuple(s for s in self.config.stages if s != "refit"))

    def _inputs(self, models: list[nn.Module]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The fusion's inputs (the server's sample, or inputs synthesised from the clients'
        models, as :func:`otfuse.fuse` makes them without data; None when the config reads
        neither) and the guard's held-out share of them (None without the guard)."""
        config = self.config
        if self.server_data is not None:
            inputs = sample_inputs(self.server_data, config.num_samples, config.seed)
        elif config.synthesize and can_synthesize(models, self.example_input):
            inputs = synthesized_inputs(models, self.example_input, config)
        else:
            return None, None
        held = int(len(inputs) * GUARD_SHARE) if self.guard and len(inputs) >= 8 else 0
        if not held:
            return inputs, None
        order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(config.seed))
        return inputs[order[held:]], inputs[order[:held]]

    def _metrics(self, accepted: list[Message], report: RoundReport) -> MetricRecord:
        """The accepted clients' own metrics (weighted as FedAvg does) and the round's."""
        metrics = MetricRecord()
        if accepted:
            try:
                metrics = self.train_metrics_aggr_fn(
                    [m.content for m in accepted], self.weighted_by_key
                )
            except (KeyError, TypeError, ValueError, StopIteration) as exc:
                log(WARNING, "aggregate_train: client metrics not aggregated: %s", exc)
        for key, value in report.metrics().items():
            metrics[key] = value
        return metrics


# --------------------------------------------------------------------------------------------------
# helpers


def _example_input(
    model: nn.Module, given: torch.Tensor | None, data: torch.Tensor | None
) -> torch.Tensor:
    if given is not None:
        return given
    if data is not None:
        return torch.as_tensor(data)[:2]
    shape = (getattr(model, "otfuse_config", None) or {}).get("in_shape")
    if not shape:
        raise FlowerSetupError(
            "cannot tell the model's input shape: pass example_input=<an input it accepts>"
        )
    return torch.zeros(2, *shape)


def _client_arch(content: RecordDict) -> dict | None:
    record = content.config_records.get(MODEL_KEY)
    text = record.get(ARCH_FIELD) if record is not None else None
    if not text:
        return None
    try:
        arch = json.loads(text)
    except (TypeError, ValueError):
        raise _Excluded("architecture", "its model record is not valid JSON") from None
    if not isinstance(arch, dict) or arch.get("name") not in zoo.names():
        raise _Excluded("architecture", "its model record names no zoo model")
    return arch


def _same_family(a: dict, b: dict) -> bool:
    """Same zoo model with the same arguments, widths aside."""
    strip = lambda d: {k: v for k, v in d.items() if k not in WIDTH_FIELDS}  # noqa: E731
    return strip(a) == strip(b)


def _describe(arch: dict) -> str:
    args = ", ".join(f"{k}={v}" for k, v in arch.items() if k != "name")
    return f"{arch.get('name')}({args})"


def _log_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model.eval()(x), dim=-1)


def _closer(
    fused: nn.Module,
    average: nn.Module,
    models: list[nn.Module],
    weights: list[float],
    x: torch.Tensor,
    report: RoundReport,
    counts: list[list[float]] | None = None,
) -> nn.Module:
    """``fused`` or ``average``, whichever is closer to the models' prediction ensemble on ``x``:

    .. math::

        \\mathrm{KL}(\\bar p \\,\\Vert\\, p), \\qquad
        \\bar p = \\textstyle\\sum_k w_k \\operatorname{softmax}(f_k(x)),

    ``x`` of shape (n, ...) held out from the fusion; ``weights`` normalised here. Given the
    clients' class ``counts`` (``targets="coverage"``), :math:`\\bar p` is their coverage mixture
    (:mod:`otfuse.coverage`), the distribution the fusion aimed at."""
    total = sum(weights)
    if counts is not None:
        scores = [_log_probs(m, x) for m in models]
        target = teacher_log_probs(scores, weights, "coverage", counts).exp()
    else:
        target = sum(w / total * _log_probs(m, x).exp() for w, m in zip(weights, models))
    log_target = torch.log(target.clamp_min(1e-30))

    def kl(model: nn.Module) -> float:
        return float((target * (log_target - _log_probs(model, x))).sum(-1).mean())

    report.kl_fused, report.kl_average = kl(fused), kl(average)
    report.kept_average = report.kl_average < report.kl_fused
    return average if report.kept_average else fused


def _distance_to_average(
    state: dict[str, torch.Tensor], models: list[tuple[nn.Module, float]], shapes: dict
) -> float:
    """:math:`\\lVert \\theta - \\bar\\theta \\rVert / \\lVert \\bar\\theta \\rVert` with
    :math:`\\bar\\theta` FedAvg's example-weighted average of the models (all of the global
    model's widths; else NaN): 0 when the fusion averaged without moving any unit."""
    if any(_shapes(m) != shapes for m, _ in models):
        return float("nan")
    total = sum(n for _, n in models)
    states = [(m.state_dict(), n / total) for m, n in models]
    diff = norm = 0.0
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        average = sum(w * s[key].double() for s, w in states)
        diff += float((value.double() - average).pow(2).sum())
        norm += float(average.pow(2).sum())
    return (diff / norm) ** 0.5 if norm > 0 else float("nan")


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
