"""``federated``: one-shot and multi-round federated learning on Flower, OT fusion against FedAvg.

Ten clients hold Dirichlet(:math:`\\alpha`) parts of Fashion-MNIST's training set
(:mod:`otfuse.flower.partition`) and train the zoo's MLPNet with :mod:`otfuse.flower.apps`'
ClientApp; the server aggregates with Flower's FedAvg (:class:`~otfuse.flower.MeteredFedAvg`) or
with :class:`~otfuse.flower.OTFusion` (weights proportional to the clients' examples).

**(a) One-shot** (one round of long local training): for clients from different initialisations
and from a common one, and :math:`\\alpha \\in` :data:`ALPHAS`, the clients train once; their
replies (the same Flower messages for every method) go to each strategy's ``aggregate_train``:
FedAvg, and OT fusion with the recipes ``paper-wts``, ``data-free`` and ``data`` (an unlabeled
server-side sample of :data:`NUM_SAMPLES` training images), the last two with refit's class-score
targets ``average``, ``ensemble`` and ``coverage`` (from the examples of each class every client
reports, :mod:`otfuse.coverage`); against the best client and the example-weighted prediction
ensemble of all clients (ten times the cost). The clients run in this process (the same ClientApp
the engine runs), so that every method fuses the very same models.

**(b) Several rounds** on Flower's simulation engine (Ray backend, :func:`otfuse.flower.simulate`):
ten clients, :math:`\\alpha = 0.5`, a common initialisation, one local epoch per round; FedAvg and
the otfuse strategy (``data-free``, and ``data`` on the server's sample); test accuracy of the
global model after every round and the bytes sent each way.

Writes ``report.md``, ``results.json``, ``oneshot.png`` and ``rounds.png``; the targets of issue 14
are checked from the numbers (:func:`check_targets`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import otfuse
from otfuse import zoo
from otfuse.data import Dataset
from otfuse.flower import require_flower

require_flower()  # one line, not a traceback, when Flower is missing

from flwr.app import ArrayRecord, Message  # noqa: E402

from otfuse.experiments.report import (  # noqa: E402
    Target,
    bar_chart,
    line_chart,
    run_info,
    table,
    write_report,
    write_results,
)
from otfuse.flower.apps import build_strategy  # noqa: E402
from otfuse.flower.settings import FederatedSettings  # noqa: E402
from otfuse.flower.simulation import client_replies, simulate  # noqa: E402
from otfuse.training import predict_logits  # noqa: E402

CLIENTS = 10
MIN_FUSED = 2  # a round is aggregated when this many clients' replies pass the checks
ALPHAS = (0.1, 0.5, 100.0)
INITS = ("different", "common")
INIT_TITLES = {"different": "different initialisations", "common": "a common initialisation"}
NUM_SAMPLES = 400  # unlabeled training images the server holds for the data recipe
TARGET_ALPHA = 0.5
# label -> (recipe, targets); the data recipe reads the server's sample
OT_METHODS = {
    "OT paper-wts": ("paper-wts", "average"),
    "OT data-free, targets average": ("data-free", "average"),
    "OT data-free, targets ensemble": ("data-free", "ensemble"),
    "OT data, targets average": ("data", "average"),
    "OT data, targets ensemble": ("data", "ensemble"),
    # each client trusted on the classes it trained on (the class-counts its reply carries)
    "OT data-free, targets coverage": ("data-free", "coverage"),
    "OT data, targets coverage": ("data", "coverage"),
}
CHECKED = ("OT data-free, targets ensemble", "OT data, targets ensemble")  # issue 14's targets
# multi-round strategies: label -> settings changes
ROUND_STRATEGIES = {
    "FedAvg": {"strategy": "fedavg"},
    "otfuse data-free, targets ensemble": {"recipe": "data-free", "targets": "ensemble"},
    "otfuse data, targets ensemble": {
        "recipe": "data", "targets": "ensemble", "server_samples": NUM_SAMPLES,
    },
    "otfuse data, targets average": {
        "recipe": "data", "targets": "average", "server_samples": NUM_SAMPLES,
    },
}  # fmt: skip


@dataclass(frozen=True)
class Setup:
    """Sizes of a run."""

    width: float  # MLPNet width
    limit: int  # training examples (first N; 0: all 60,000)
    oneshot_epochs: int  # local epochs of the one-shot round
    rounds: int  # rounds of part (b)
    round_epochs: int  # local epochs per round in part (b)
    synthesize: int  # data-free: synthesised inputs (0: the recipe's 256)
    lr: float = 0.05
    batch_size: int = 64


FULL = Setup(width=1.0, limit=0, oneshot_epochs=5, rounds=10, round_epochs=1, synthesize=0)
QUICK = Setup(width=0.5, limit=10000, oneshot_epochs=5, rounds=3, round_epochs=1, synthesize=64)


def base_settings(setup: Setup, data_dir: str | Path | None) -> FederatedSettings:
    return FederatedSettings(
        width=setup.width, limit=setup.limit, partition="dirichlet", lr=setup.lr,
        batch_size=setup.batch_size, synthesize=setup.synthesize,
        data_dir=str(data_dir) if data_dir else "", server_samples=NUM_SAMPLES,
        min_train_nodes=MIN_FUSED, min_available_nodes=CLIENTS,
    )  # fmt: skip


def accuracy(model: nn.Module, test: Dataset) -> float:
    return (
        100.0 * (predict_logits(model, test.images).argmax(1) == test.labels).float().mean().item()
    )


# --------------------------------------------------------------------------------------------------
# (a) one-shot


def client_models(settings: FederatedSettings, replies: Sequence[Message]) -> list[nn.Module]:
    models = []
    for msg in replies:
        arch = json.loads(msg.content["model"]["otfuse-config"])
        model = zoo.create(**arch)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        models.append(model.eval())
    return models


def aggregate(
    settings: FederatedSettings, replies: Sequence[Message], test: Dataset
) -> dict[str, float]:
    """Test accuracy and seconds of the global model a strategy makes from ``replies``."""
    model = settings.global_model()
    strategy = build_strategy(settings, model)
    start = time.perf_counter()
    arrays, metrics = strategy.aggregate_train(1, list(replies))
    seconds = time.perf_counter() - start
    kept = int(metrics.get("kept-average", 0))
    if arrays is None:
        return {"accuracy": float("nan"), "seconds": seconds, "kept_average": kept}
    model.load_state_dict(arrays.to_torch_state_dict())
    return {"accuracy": accuracy(model, test), "seconds": seconds, "kept_average": kept}


def oneshot_case(
    settings: FederatedSettings, test: Dataset, *, progress: bool = True, desc: str = ""
) -> dict:
    """Train the clients once, then every method on the same replies."""
    start = time.perf_counter()
    initial = ArrayRecord(settings.global_model().state_dict())
    replies = client_replies(settings, CLIENTS, initial, ask_counts=True)  # for targets coverage
    train_seconds = time.perf_counter() - start
    models = client_models(settings, replies)
    examples = [int(m.content["metrics"]["num-examples"]) for m in replies]
    clients = [accuracy(m, test) for m in models]
    weights = [n / sum(examples) for n in examples]
    methods = {
        "best client": {"accuracy": max(clients), "seconds": 0.0},
        "mean client": {"accuracy": sum(clients) / len(clients), "seconds": 0.0},
        "prediction ensemble": {
            "accuracy": accuracy(otfuse.ensemble(models, weights), test), "seconds": 0.0,
        },
        "FedAvg": aggregate(settings.replace(strategy="fedavg"), replies, test),
    }  # fmt: skip
    for label in tqdm(OT_METHODS, desc=desc, disable=not progress, leave=False):
        recipe, targets = OT_METHODS[label]
        methods[label] = aggregate(settings.replace(recipe=recipe, targets=targets), replies, test)
    return {
        "examples": examples,
        "clients": clients,
        "train_seconds": train_seconds,
        "methods": methods,
    }


def run_oneshot(
    setup: Setup, data_dir: str | Path | None, test: Dataset, progress: bool
) -> dict[str, dict[str, dict]]:
    """init -> alpha -> :func:`oneshot_case`."""
    base = base_settings(setup, data_dir).replace(local_epochs=setup.oneshot_epochs, rounds=1)
    out: dict[str, dict[str, dict]] = {}
    for init in INITS:
        for alpha in ALPHAS:
            settings = base.replace(init=init, alpha=alpha)
            desc = f"one-shot, {init} init, alpha {alpha:g}"
            if progress:
                print(f"{desc} ...", flush=True)
            out.setdefault(init, {})[f"{alpha:g}"] = oneshot_case(
                settings, test, progress=progress, desc=desc
            )
    return out


# --------------------------------------------------------------------------------------------------
# (b) several rounds on the simulation engine


def rounds_case(settings: FederatedSettings) -> dict:
    """One multi-round run on Flower's simulation engine (Ray)."""
    run = simulate(settings, CLIENTS)
    metrics = run.train_metrics
    return {
        "accuracy": {str(r): a for r, a in sorted(run.accuracy.items())},
        "bytes_down": {str(r): int(m.get("bytes-down", 0)) for r, m in metrics.items()},
        "bytes_up": {str(r): int(m.get("bytes-up", 0)) for r, m in metrics.items()},
        "fusion_seconds": {str(r): float(m.get("fusion-seconds", 0.0)) for r, m in metrics.items()},
        "fused": {str(r): int(m.get("fused", 1)) for r, m in metrics.items()},
        "kept_average": {str(r): int(m.get("kept-average", 0)) for r, m in metrics.items()},
        "clients_fused": {str(r): int(m.get("clients-fused", CLIENTS)) for r, m in metrics.items()},
        "seconds": run.seconds,
    }


def run_rounds(setup: Setup, data_dir: str | Path | None, progress: bool) -> dict[str, dict]:
    base = base_settings(setup, data_dir).replace(
        alpha=TARGET_ALPHA, init="common", local_epochs=setup.round_epochs, rounds=setup.rounds,
        server_samples=0,
    )  # fmt: skip
    out = {}
    for label, changes in ROUND_STRATEGIES.items():
        if progress:
            print(f"{setup.rounds} rounds, {label} (Ray simulation) ...", flush=True)
        out[label] = rounds_case(base.replace(**changes))
    return out


# --------------------------------------------------------------------------------------------------
# targets


def rounds_to_reach(curve: Mapping[str, float], level: float) -> int | None:
    """The first round (>= 1) whose accuracy is at least ``level``, or None."""
    for r, acc in sorted(((int(k), v) for k, v in curve.items()), key=lambda t: t[0]):
        if r >= 1 and acc >= level:
            return r
    return None


def check_targets(results: Mapping) -> list[Target]:
    """Issue 14's one-shot targets on each method of :data:`CHECKED`, and its multi-round targets
    on every otfuse strategy of part (b)."""
    targets = []
    alpha = f"{TARGET_ALPHA:g}"
    for label in CHECKED:
        different = results["oneshot"]["different"][alpha]["methods"]
        common = results["oneshot"]["common"][alpha]["methods"]
        fused = different[label]["accuracy"]
        targets += [
            Target(f"{label}: one-shot, different inits, alpha {alpha}: fused - FedAvg",
                   fused - different["FedAvg"]["accuracy"], 20.0, " points"),
            Target(f"{label}: one-shot, different inits, alpha {alpha}: fused - best client",
                   fused - different["best client"]["accuracy"], 0.0, " points"),
            Target(f"{label}: one-shot, common init, alpha {alpha}: fused - FedAvg",
                   common[label]["accuracy"] - common["FedAvg"]["accuracy"], 2.0, " points"),
        ]  # fmt: skip
    for label in results.get("rounds", {}):  # every otfuse strategy of part (b)
        if label != "FedAvg":
            targets += rounds_targets(results, label)
    return targets


def rounds_targets(results: Mapping, label: str) -> list[Target]:
    curves = results.get("rounds", {})
    if label not in curves or "FedAvg" not in curves:
        return []
    ours, fedavg = curves[label]["accuracy"], curves["FedAvg"]["accuracy"]
    gaps = [ours[r] - fedavg[r] for r in fedavg if r in ours and int(r) >= 1]
    final = fedavg[max(fedavg, key=int)]
    reach_ours, reach_fedavg = rounds_to_reach(ours, final), rounds_to_reach(fedavg, final)
    spare = None if reach_ours is None else reach_fedavg - reach_ours
    return [
        Target(f"{label}: rounds: lowest (otfuse - FedAvg) over rounds", min(gaps), -0.5, " points"),
        Target(f"{label}: rounds: rounds FedAvg needs to reach its final accuracy minus "
               "rounds otfuse needs", spare, 0.0, ""),
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# the run


def run(
    *,
    quick: bool = False,
    out: str | Path = "runs/federated",
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Run both parts (:data:`QUICK` or :data:`FULL` sizes) and write ``out/``."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    setup = QUICK if quick else FULL
    test = base_settings(setup, data_dir).test_data()
    results = {
        "experiment": "federated",
        "quick": quick,
        "setup": asdict(setup),
        "clients": CLIENTS,
        "alphas": list(ALPHAS),
        "num_samples": NUM_SAMPLES,
        "info": run_info("otfuse experiment federated" + (" --quick" if quick else "")),
        "oneshot": run_oneshot(setup, data_dir, test, progress),
    }
    results["rounds"] = run_rounds(setup, data_dir, progress)
    results["targets"] = [t.as_dict() for t in check_targets(results)]
    results["seconds"] = time.perf_counter() - start
    write_outputs(Path(out), results)
    return results


# --------------------------------------------------------------------------------------------------
# tables, plots, report


def oneshot_table(results: Mapping) -> str:
    cases = [(init, a) for init in results["oneshot"] for a in results["oneshot"][init]]
    first = results["oneshot"][cases[0][0]][cases[0][1]]["methods"]
    head = ["method", *(f"{init} init, alpha {a}" for init, a in cases)]
    rows = []
    for label in first:
        cells = [_cell(results["oneshot"][i][a]["methods"][label]) for i, a in cases]
        rows.append([label, *cells])
    seconds = [
        max(m["seconds"] for m in results["oneshot"][i][a]["methods"].values()) for i, a in cases
    ]
    rows.append(["slowest aggregation (s)", *seconds])
    return table(head, rows)


def _cell(entry: Mapping) -> str:
    """Accuracy, with '*' when the strategy's guard kept FedAvg's average."""
    return f"{entry['accuracy']:.2f}" + ("*" if entry.get("kept_average") else "")


def rounds_table(results: Mapping) -> str:
    curves = results["rounds"]
    labels = list(curves)
    rounds = sorted({int(r) for c in curves.values() for r in c["accuracy"]})
    head = ["round", *(f"{label}: test acc (%)" for label in labels), "MB down / up per round"]
    rows = []
    for r in rounds:
        cells = [_round_cell(curves[label], str(r)) for label in labels]
        down = curves[labels[0]]["bytes_down"].get(str(r))
        up = curves[labels[0]]["bytes_up"].get(str(r))
        traffic = "-" if down is None else f"{down / 1e6:.2f} / {up / 1e6:.2f}"
        rows.append([str(r), *cells, traffic])
    fusion = [sum(curves[label]["fusion_seconds"].values()) for label in labels]
    rows.append(["aggregation time, all rounds (s)", *fusion, "-"])
    rows.append(["wall time of the run (s)", *(curves[label]["seconds"] for label in labels), "-"])
    return table(head, rows)


def _round_cell(curve: Mapping, r: str) -> str:
    acc = curve["accuracy"].get(r)
    if acc is None:
        return "-"
    cell = f"{acc:.2f}" + ("*" if curve.get("kept_average", {}).get(r) else "")
    if not curve.get("fused", {}).get(r, 1):
        return cell + " (kept)"
    used = curve.get("clients_fused", {}).get(r, CLIENTS)
    return cell + (f" ({used}/{CLIENTS})" if used < CLIENTS else "")


def plot_oneshot(path: Path, results: Mapping) -> Path:
    panels = {
        INIT_TITLES[init]: {
            f"alpha {a}": {label: m["accuracy"] for label, m in case["methods"].items()}
            for a, case in cases.items()
        }
        for init, cases in results["oneshot"].items()
    }
    title = f"One-shot federated fusion of {results['clients']} clients (Fashion-MNIST, MLPNet)"
    return bar_chart(path, panels, xlabel="test accuracy (%)", title=title, xlim=(0, 100))


def plot_rounds(path: Path, results: Mapping) -> Path:
    curves = {
        label: {int(r): a for r, a in c["accuracy"].items()}
        for label, c in results["rounds"].items()
    }
    late = {label: {r: a for r, a in c.items() if r >= 3} for label, c in curves.items()}
    panels = {"every round": curves, "from round 3": late}
    title = f"{results['clients']} clients, Dirichlet({TARGET_ALPHA:g}), common initialisation"
    return line_chart(path, panels, xlabel="round", ylabel="test accuracy (%)", title=title)


def write_outputs(out: Path, results: dict) -> None:
    """Print the tables; write the plots, ``report.md`` and ``results.json``."""
    setup = results["setup"]
    command = results["info"]["command"]
    one, rounds = oneshot_table(results), rounds_table(results)
    png_one = plot_oneshot(out / "oneshot.png", results)
    png_rounds = plot_rounds(out / "rounds.png", results)
    lines = [
        Target(**{k: v for k, v in t.items() if k != "met"}).line() for t in results["targets"]
    ]
    intro = (
        f"Regenerate with `{command}`. Fashion-MNIST ({setup['limit'] or 60000} training images, "
        f"the 10,000 test images), {results['clients']} clients holding Dirichlet(alpha) parts of "
        f"the training set; MLPNet width {setup['width']:g}; SGD lr {setup['lr']:g}, batch "
        f"{setup['batch_size']}. OT fusion weights every client by its examples. The `data` "
        f"recipe reads {results['num_samples']} unlabeled training images the server holds; "
        "`data-free` reads none"
        + (f" (synthesises {setup['synthesize']} inputs)" if setup["synthesize"] else "")
        + f". torch threads: 1; total {results['seconds']:.0f} s."
    )
    sections = [
        intro,
        f"## (a) One-shot: one round of {setup['oneshot_epochs']} local epochs\n\n"
        "Test accuracy (%) of the global model each method makes from the same client replies "
        "(clients run in process with the experiment's ClientApp); `different init`: every client "
        "starts from its own seed, `common init`: from the server's model. The prediction "
        f"ensemble costs {results['clients']} models. `*`: the strategy's guard kept FedAvg's "
        "average (it was closer to the clients' ensemble on held-out inputs)."
        f"\n\n{one}\n\n![one-shot]({png_one.name})",
        f"## (b) {setup['rounds']} rounds on Flower's simulation engine (Ray)\n\n"
        f"{setup['round_epochs']} local epoch per round, alpha {TARGET_ALPHA:g}, common "
        "initialisation; round 0 is the initial model. Every strategy sends and receives the "
        "same bytes. `*`: the guard kept FedAvg's average that round; `(9/10)`: clients "
        "fused that round (the others were left out, e.g. their training diverged); `(kept)`: "
        "the round kept the previous global model."
        f"\n\n{rounds}\n\n![rounds]({png_rounds.name})",
        "## Targets (issue 14)\n\n" + "\n".join(lines),
    ]
    print(f"\nfederated, one-shot\n\n{one}\n\nfederated, rounds\n\n{rounds}\n\n" + "\n".join(lines))
    write_report(out / "report.md", "Federated fusion on Flower", sections)
    write_results(out / "results.json", results)
