"""``timing``: how long fusion takes, against width (per solver) and against the number of models K.

* *Width.* Two 2-hidden-layer MLPs (784-w-w-10, random weights) are fused for w = 64, 128, ...,
  4096 with each solver: ``assignment`` (what ``auto`` picks for equal widths), ``exact`` (network
  simplex) and ``sinkhorn``. A solver is not run at larger widths once one of its runs exceeds
  :data:`SLOW_SECONDS`, nor at a width where cubic growth from its last time predicts more than
  :data:`SKIP_PREDICTED_SECONDS`.
* *K.* K = 2, 4, 6, 8 VGG11s (width 1, CIFAR layout 3x32x32, random initialisation) fused at once;
  K = 6 is the paper's "six VGG11" figure.

Every fusion uses ``recipe="paper-wts"`` (one greedy pass, no refinement, no data), so the time is
that of tracing, cost matrices, transport and averaging. Each time is the median of
:data:`REPEATS` runs after one untimed warm-up; the number of torch threads is recorded.

Writes ``report.md``, ``results.json``, ``time_vs_width.png`` and ``time_vs_k.png``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import otfuse
from otfuse import zoo
from otfuse.experiments.plots import Panel, Series, grid, line_plot, write_json, write_markdown
from otfuse.transport import TransportError

SOLVERS = {"assignment (auto)": "auto", "exact": "exact", "sinkhorn": "sinkhorn"}
FULL_WIDTHS = (64, 128, 256, 512, 1024, 2048, 4096)
QUICK_WIDTHS = (64, 128, 256, 512)
FULL_KS = (2, 4, 6, 8)
QUICK_KS = (2, 3)
FULL_VGG_WIDTH = 1.0
QUICK_VGG_WIDTH = 0.125
REPEATS = 3  # runs per point (quick: 1); the median is reported
SLOW_SECONDS = 20.0  # a solver stops growing the width after a run this long
SKIP_PREDICTED_SECONDS = 120.0  # ... or when the next width is predicted to take longer than this
MLP_INPUT = (1, 28, 28)
VGG_INPUT = (3, 32, 32)


def random_models(arch: str, k: int, **kwargs) -> list[nn.Module]:
    """``k`` zoo models with random weights from seeds 0..k-1."""
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(zoo.create(arch, **kwargs).eval())
    return models


def time_fusion(models: list[nn.Module], example: torch.Tensor, repeats: int, **options) -> list:
    """Wall-clock seconds of ``repeats`` runs of ``fuse(models, recipe="paper-wts", **options)``;
    stops early after a run longer than :data:`SLOW_SECONDS`."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        otfuse.fuse(models, recipe="paper-wts", example_input=example, **options)
        runs.append(time.perf_counter() - start)
        if runs[-1] > SLOW_SECONDS:
            break
    return runs


def width_sweep(widths: tuple[int, ...], repeats: int, progress: bool) -> dict[str, list[dict]]:
    """Solver label -> one entry per width: ``{"width", "runs", "median", "status"}``."""
    example = torch.zeros(2, *MLP_INPUT)
    warm = random_models("mlpnet", 2, in_shape=MLP_INPUT, hidden=(widths[0], widths[0]))
    for solver in SOLVERS.values():
        otfuse.fuse(warm, recipe="paper-wts", solver=solver, example_input=example)
    series: dict[str, list[dict]] = {label: [] for label in SOLVERS}
    stopped: dict[str, str] = {}
    for width in tqdm(widths, desc="width", disable=not progress, leave=False):
        models = random_models("mlpnet", 2, in_shape=MLP_INPUT, hidden=(width, width))
        for label, solver in SOLVERS.items():
            entry = {"width": width, "runs": [], "median": None, "status": stopped.get(label, "")}
            if not entry["status"]:
                entry["status"] = predicted_too_slow(series[label], width)
            if not entry["status"]:
                measure(entry, models, example, repeats, solver)
                if entry["runs"] and max(entry["runs"]) > SLOW_SECONDS:
                    stopped[label] = f"skipped: a run at width {width} took > {SLOW_SECONDS:g} s"
                elif entry["status"].startswith("failed"):
                    stopped[label] = f"skipped: failed at width {width}"
            series[label].append(entry)
    return series


def measure(entry: dict, models: list[nn.Module], example, repeats: int, solver: str) -> None:
    try:
        entry["runs"] = time_fusion(models, example, repeats, solver=solver)
        entry["median"] = statistics.median(entry["runs"])
        entry["status"] = "ok"
    except TransportError as err:
        entry["status"] = f"failed: {err}"


def predicted_too_slow(done: list[dict], width: int) -> str:
    """Why to skip ``width`` when cubic growth from the last measured width predicts a long run."""
    measured = [e for e in done if e["median"] is not None]
    if not measured:
        return ""
    last = measured[-1]
    predicted = last["median"] * (width / last["width"]) ** 3
    if predicted > SKIP_PREDICTED_SECONDS:
        return f"skipped: predicted {predicted:.0f} s (> {SKIP_PREDICTED_SECONDS:g} s)"
    return ""


def k_sweep(ks: tuple[int, ...], vgg_width: float, repeats: int, progress: bool) -> list[dict]:
    """One entry per K: ``{"k", "runs", "median"}``."""
    example = torch.zeros(2, *VGG_INPUT)
    models = random_models("vgg11", max(ks), width=vgg_width, in_shape=VGG_INPUT)
    otfuse.fuse(models[:2], recipe="paper-wts", example_input=example)  # warm-up
    entries = []
    for k in tqdm(ks, desc="K", disable=not progress, leave=False):
        runs = time_fusion(models[:k], example, repeats)
        entries.append({"k": k, "runs": runs, "median": statistics.median(runs)})
    return entries


def run(
    *,
    quick: bool = False,
    out: str | Path = "runs/timing",
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Time fusion against width and K; write ``out/``. ``data_dir`` is unused (random weights)."""
    start = time.perf_counter()
    repeats = 1 if quick else REPEATS
    vgg_width = QUICK_VGG_WIDTH if quick else FULL_VGG_WIDTH
    results = {
        "experiment": "timing",
        "quick": quick,
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "recipe": "paper-wts",
        "slow_seconds": SLOW_SECONDS,
        "width": width_sweep(QUICK_WIDTHS if quick else FULL_WIDTHS, repeats, progress),
        "vgg_width": vgg_width,
        "k": k_sweep(QUICK_KS if quick else FULL_KS, vgg_width, repeats, progress),
    }
    results["seconds"] = time.perf_counter() - start
    write_outputs(Path(out), results)
    return results


# --------------------------------------------------------------------------------------------------
# Tables, plots, report


def seconds_cell(entry: dict) -> str:
    if entry["median"] is None:
        return entry["status"] or "-"
    return f"{entry['median']:.3f}"


def width_table(series: dict[str, list[dict]]) -> str:
    labels = list(series)
    rows = []
    for i, first in enumerate(series[labels[0]]):
        rows.append([str(first["width"]), *(seconds_cell(series[label][i]) for label in labels)])
    return grid(["hidden width", *(f"{label} (s)" for label in labels)], rows)


def k_table(entries: list[dict]) -> str:
    rows = [
        [str(e["k"]), f"{e['median']:.3f}", f"{e['median'] / (e['k'] - 1):.3f}"] for e in entries
    ]
    return grid(["K models", "fusion time (s)", "per aligned model (s)"], rows)


def plots(out: Path, results: dict) -> list[Path]:
    series = [
        Series(label, [e["width"] for e in entries], [e["median"] for e in entries])
        for label, entries in results["width"].items()
    ]
    width_png = line_plot(
        out / "time_vs_width.png",
        [Panel("two 784-w-w-10 MLPs", series, "hidden width w", "fusion time (s)", loglog=True)],
        title="Fusion time against width (paper-wts)",
    )
    ks = results["k"]
    k_series = [Series("paper-wts", [e["k"] for e in ks], [e["median"] for e in ks])]
    title = f"K VGG11s (width {results['vgg_width']:g}, 3x32x32)"
    k_png = line_plot(
        out / "time_vs_k.png",
        [Panel(title, k_series, "number of models K", "fusion time (s)")],
        title="Fusion time against K",
    )
    return [width_png, k_png]


def write_outputs(out: Path, results: dict) -> None:
    """Print the tables; write the plots, ``report.md`` and ``results.json``."""
    command = "otfuse experiment timing" + (" --quick" if results["quick"] else "")
    width_png, k_png = plots(out, results)
    six = [e for e in results["k"] if e["k"] == 6]
    six_line = (
        f"**Six VGG11s** (width {results['vgg_width']:g}, random weights) fuse in "
        f"{six[0]['median']:.2f} s (median of {len(six[0]['runs'])})."
        if six
        else "The six-VGG11 figure is measured by the full run only."
    )
    sections = [
        f"Regenerate with `{command}`. Recipe `paper-wts` (no refinement, no data); each time is "
        f"the median of {results['repeats']} run(s) after a warm-up, wall clock, tracing included. "
        f"torch threads: {results['torch_threads']}; total {results['seconds']:.0f} s.",
        "## Time against width\n\nTwo 784-w-w-10 MLPs (no biases, random weights).\n\n"
        f"{width_table(results['width'])}\n\n"
        f"A solver stops at larger widths after a run over {results['slow_seconds']:g} s.\n\n"
        f"![time against width]({width_png.name})",
        f"## Time against K\n\nK VGG11s at width {results['vgg_width']:g}, CIFAR layout "
        f"(3x32x32), random initialisation.\n\n{k_table(results['k'])}\n\n{six_line}\n\n"
        f"![time against K]({k_png.name})",
    ]
    print(f"\ntiming: width\n\n{width_table(results['width'])}")
    print(f"\ntiming: K VGG11s\n\n{k_table(results['k'])}\n\n{six_line}")
    write_markdown(out / "report.md", "Timing: fusion time against width and K", sections)
    write_json(out / "results.json", results)
