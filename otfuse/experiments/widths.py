"""``widths``: fuse models of different widths, and compress a model into a narrower one with OT.

(a) *Different widths.* Two models of one family whose hidden layers differ in width (MLPNet
400-200-100 and 200-100-50; VGG11 at 2x and 1x the experiments' standard width) are fused into
either one's architecture (the anchor). With unequal widths the transport plans are not
permutations: each anchor unit receives a convex combination of the other model's units. Vanilla
averaging is impossible (the parameter shapes differ); the prediction ensemble is shown for
reference.

(b) *Compression.* A trained MLPNet is compressed to a fraction of its hidden units. The anchor is
the model magnitude-pruned to that width (:mod:`otfuse.experiments.pruning`); OT compression is

.. math::

    \\theta = \\operatorname{align}(\\theta_{\\text{wide}} \\to \\theta_{\\text{pruned}}),

i.e. ``fuse([pruned, wide], weights=[0, 1], anchor=0)``: every unit of the wide model is transported
onto the anchor's units and the result is the wide model projected by OT (the anchor's own weights
only shape the plans). It is compared with magnitude pruning alone, each one-shot and after a short
fine-tune.

Writes ``report.md``, ``results.json`` and ``compression.png``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import otfuse
from otfuse.data import Dataset, load_dataset, sample_inputs
from otfuse.errors import OtfuseError
from otfuse.experiments.common import (
    QUICK_TRAIN_EXAMPLES,
    ParentSpec,
    count_params,
    parent_specs,
    train_or_load,
)
from otfuse.experiments.methods import run_options
from otfuse.experiments.plots import (
    Panel,
    Series,
    describe,
    grid,
    line_plot,
    write_json,
    write_markdown,
)
from otfuse.experiments.pruning import magnitude_prune
from otfuse.training import TrainConfig, evaluate, finetune, predict_logits

NUM_SAMPLES = 400  # unlabeled training inputs for the data recipe
FULL_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)
QUICK_FRACTIONS = (0.0, 0.5, 0.9)
QUICK_TEST_EXAMPLES = 1000  # quick runs score on the first 1000 test images
FINETUNE = TrainConfig(epochs=1, lr=0.01, seed=0)  # the short fine-tune of the compressed models
QUICK_MLP_EPOCHS = 5  # quick MLPNets train this long (one epoch of 4000 images leaves them at ~40%)

# label -> options of otfuse.fuse; recipe "data" is given the unlabeled sample
FUSION_METHODS = {
    "OT data-free": {"recipe": "data-free"},
    "OT data": {"recipe": "data"},
    "OT paper-wts (exact)": {"recipe": "paper-wts", "solver": "exact"},
    "OT data-free, outgoing sum": {"recipe": "data-free", "outgoing": "sum"},
    "OT data, outgoing sum": {"recipe": "data", "outgoing": "sum"},
}
COMPRESSION_METHODS = (
    "magnitude pruning",
    "OT data-free",
    "OT data",
    "OT data-free, outgoing sum",
    "OT data, outgoing sum",
)


@dataclass(frozen=True)
class WidthPair:
    """Two widths of one architecture, trained with ``spec``'s budget (wide: seed 0, narrow: 1);
    ``wide_lr``, when set, replaces the budget's learning rate for the wide model."""

    spec: ParentSpec
    wide: float  # zoo width multiplier of the wide model
    narrow: float
    wide_lr: float | None = None


def mlp_spec(quick: bool) -> ParentSpec:
    """The standard MLPNet parents, or the quick ones trained for :data:`QUICK_MLP_EPOCHS`."""
    spec = parent_specs(quick)["mlpnet"]
    return replace(spec, epochs=max(spec.epochs, QUICK_MLP_EPOCHS)) if quick else spec


def width_pairs(quick: bool) -> list[WidthPair]:
    """MLPNet at width 1 and 0.5 (quick: 0.25 and 0.125); VGG11 at 2x and 1x the standard width."""
    mlp, vgg = mlp_spec(quick), parent_specs(quick)["vgg11"]
    mlp_width, vgg_width = mlp.arch_kwargs.get("width", 1.0), vgg.arch_kwargs["width"]
    return [
        WidthPair(mlp, mlp_width, mlp_width / 2),
        # VGG11 x0.5 without BatchNorm diverged here at the standard lr 0.05 (step 196, 2 threads)
        WidthPair(vgg, 2 * vgg_width, vgg_width, wide_lr=None if quick else 0.02),
    ]


def train_width(
    spec: ParentSpec, width: float, seed: int, train: Dataset, progress: bool
) -> tuple[nn.Module, float]:
    """``spec``'s model at ``width`` (the cache entry of ``spec``'s parents when widths agree)."""
    kwargs = spec.arch_kwargs
    if kwargs.get("width", 1.0) != width:
        kwargs = {**kwargs, "width": width}
    label = f"{spec.arch} width {width:g} (seed {seed})"
    return train_or_load(
        spec.arch, kwargs, train, spec.config(seed), progress=progress, label=label
    )


def fusion_rows(
    pair: WidthPair,
    train: Dataset,
    test: Dataset,
    sample: torch.Tensor,
    progress: bool,
    quick: bool = False,
) -> list[dict]:
    """Parents, ensemble, vanilla averaging (impossible) and OT fusion into either width."""
    wide_spec = replace(pair.spec, lr=pair.wide_lr) if pair.wide_lr else pair.spec
    wide, sec_w = train_width(wide_spec, pair.wide, 0, train, progress)
    narrow, sec_n = train_width(pair.spec, pair.narrow, 1, train, progress)
    names = [f"wide (x{pair.wide:g})", f"narrow (x{pair.narrow:g})"]
    models = [wide, narrow]
    rows = [
        row(f"parent {names[0]}", "-", wide, test, sec_w),
        row(f"parent {names[1]}", "-", narrow, test, sec_n),
        row("prediction ensemble", "-", otfuse.ensemble(models), test, 0.0),
        vanilla_row(models),
    ]
    jobs = [(label, anchor) for anchor in (0, 1) for label in FUSION_METHODS]
    for label, anchor in tqdm(jobs, desc=pair.spec.arch, disable=not progress, leave=False):
        options = run_options(FUSION_METHODS[label], quick)
        data = sample if options["recipe"] == "data" else None
        start = time.perf_counter()
        fused = otfuse.fuse(
            models, anchor=anchor, data=data, example_input=sample[:2], **options
        ).model
        rows.append(row(label, names[anchor], fused, test, time.perf_counter() - start))
    return rows


def scores(model: nn.Module, test: Dataset) -> dict[str, float]:
    """Test accuracy (%), mean cross-entropy and the standard deviation of the logits (the scale of
    the model's outputs), from one pass over ``test``."""
    logits = predict_logits(model, test.images)
    return {
        "accuracy": 100.0 * (logits.argmax(1) == test.labels).float().mean().item(),
        "loss": F.cross_entropy(logits, test.labels).item(),
        "logit_std": logits.std().item(),
    }


def row(method: str, anchor: str, model: nn.Module, test: Dataset, seconds: float) -> dict:
    return {
        "method": method,
        "anchor": anchor,
        **scores(model, test),
        "params": count_params(model),
        "seconds": seconds,
        "note": "",
    }


def vanilla_row(models: list[nn.Module]) -> dict:
    """Vanilla averaging is attempted; it must fail because the parameter shapes differ."""
    try:
        otfuse.vanilla_average(models)
        note = "unexpectedly possible"
    except OtfuseError as err:
        note = f"impossible: {err}"
    return {
        "method": "vanilla average",
        "anchor": "-",
        "accuracy": None,
        "loss": None,
        "logit_std": None,
        "params": None,
        "seconds": None,
        "note": note,
    }


# --------------------------------------------------------------------------------------------------
# (b) Compression


def compress(
    method: str, wide: nn.Module, fraction: float, sample: torch.Tensor, quick: bool = False
) -> nn.Module:
    """``wide`` compressed to ``1 - fraction`` of its hidden units by ``method``."""
    pruned = magnitude_prune(wide, fraction)
    if method == "magnitude pruning":
        return pruned
    options = run_options(FUSION_METHODS[method], quick)
    data = sample if options["recipe"] == "data" else None
    return otfuse.fuse(
        [pruned, wide], weights=[0.0, 1.0], anchor=0, data=data, example_input=sample[:2], **options
    ).model


def compression(
    spec: ParentSpec,
    train: Dataset,
    test: Dataset,
    sample: torch.Tensor,
    fractions: tuple[float, ...],
    progress: bool,
    quick: bool = False,
) -> dict:
    """Accuracy of each compression method at each fraction removed, one-shot and fine-tuned."""
    wide, seconds = train_width(spec, spec.arch_kwargs.get("width", 1.0), 0, train, progress)
    series: dict[str, list[dict]] = {m: [] for m in COMPRESSION_METHODS}
    jobs = [(f, m) for f in fractions for m in COMPRESSION_METHODS]
    for fraction, method in tqdm(jobs, desc="compression", disable=not progress, leave=False):
        start = time.perf_counter()
        model = compress(method, wide, fraction, sample, quick)
        build = time.perf_counter() - start
        tuned = finetune(model, train, FINETUNE, progress=False).model
        series[method].append(
            {
                "fraction": fraction,
                "hidden": [m.out_features for m in model.features if isinstance(m, nn.Linear)],
                "params": count_params(model),
                **scores(model, test),
                "finetuned_accuracy": evaluate(tuned, test).accuracy,
                "seconds": build,
            }
        )
    return {
        "arch": spec.arch,
        "arch_kwargs": spec.arch_kwargs,
        "epochs": spec.epochs,
        "wide": {
            **scores(wide, test),
            "params": count_params(wide),
            "seconds": seconds,
        },
        "finetune": {"epochs": FINETUNE.epochs, "lr": FINETUNE.lr, "examples": len(train)},
        "fractions": list(fractions),
        "series": series,
    }


def run(
    *,
    quick: bool = False,
    out: str | Path = "runs/widths",
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Run (a) and (b) on Fashion-MNIST and write ``out/``."""
    start = time.perf_counter()
    train = load_dataset("fashion-mnist", "train", data_dir)
    test = load_dataset("fashion-mnist", "test", data_dir)
    if quick:
        train = train.subset(torch.arange(QUICK_TRAIN_EXAMPLES))
        test = test.subset(torch.arange(QUICK_TEST_EXAMPLES))
    sample = sample_inputs(train, NUM_SAMPLES, seed=0)
    different = {}
    for pair in width_pairs(quick):
        different[pair.spec.arch] = {
            "arch_kwargs": pair.spec.arch_kwargs,
            "widths": {"wide": pair.wide, "narrow": pair.narrow},
            "epochs": pair.spec.epochs,
            "lr": pair.spec.lr,
            "wide_lr": pair.wide_lr or pair.spec.lr,
            "rows": fusion_rows(pair, train, test, sample, progress, quick),
        }
    fractions = QUICK_FRACTIONS if quick else FULL_FRACTIONS
    results = {
        "experiment": "widths",
        "quick": quick,
        "dataset": "fashion-mnist",
        "train_examples": len(train),
        "test_examples": len(test),
        "torch_threads": torch.get_num_threads(),
        "different_widths": different,
        "compression": compression(
            mlp_spec(quick), train, test, sample, fractions, progress, quick
        ),
        "seconds": time.perf_counter() - start,
    }
    write_outputs(Path(out), results)
    return results


# --------------------------------------------------------------------------------------------------
# Tables, plot, report


def _cell(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def widths_table(result: dict) -> str:
    rows = [
        [
            r["method"],
            r["anchor"],
            _cell(r["accuracy"], ".2f"),
            _cell(r["logit_std"], ".2f"),
            _cell(r["params"], ","),
            _cell(r["seconds"], ".2f"),
            r["note"],
        ]
        for r in result["rows"]
    ]
    headers = ["method", "anchor", "test acc (%)", "logit std", "params", "time (s)", "note"]
    return grid(headers, rows)


def compression_table(result: dict) -> str:
    rows = []
    for i, fraction in enumerate(result["fractions"]):
        first = result["series"][COMPRESSION_METHODS[0]][i]
        cells = [f"{fraction:g}", "-".join(map(str, first["hidden"])), f"{first['params']:,}"]
        for method in COMPRESSION_METHODS:
            e = result["series"][method][i]
            cells.append(f"{e['accuracy']:.2f} / {e['finetuned_accuracy']:.2f}")
        cells += [f"{result['series'][m][i]['logit_std']:.2f}" for m in COMPRESSION_METHODS]
        rows.append(cells)
    scales = [f"logit std: {m}" for m in COMPRESSION_METHODS]
    return grid(["fraction removed", "hidden", "params", *COMPRESSION_METHODS, *scales], rows)


def plot(path: Path, result: dict) -> Path:
    series = []
    for key, style, suffix in [("accuracy", "-", ""), ("finetuned_accuracy", "--", " + fine-tune")]:
        for i, (method, entries) in enumerate(result["series"].items()):
            xs, ys = [e["fraction"] for e in entries], [e[key] for e in entries]
            series.append(Series(method + suffix, xs, ys, linestyle=style, color=f"C{i}"))
    panel = Panel(
        f"{result['arch']} compressed",
        series,
        "fraction of hidden units removed",
        "test accuracy (%)",
        {"wide model": result["wide"]["accuracy"]},
    )
    return line_plot(path, [panel], title="Compression: OT projection vs magnitude pruning")


def without_width(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k != "width"}


def write_outputs(out: Path, results: dict) -> None:
    """Print the tables; write ``compression.png``, ``report.md`` and ``results.json``."""
    command = "otfuse experiment widths" + (" --quick" if results["quick"] else "")
    sections = [
        f"Regenerate with `{command}`. Fashion-MNIST, {results['train_examples']} training images, "
        f"{results['test_examples']} test images. torch threads: {results['torch_threads']}; "
        f"total {results['seconds']:.0f} s.",
        "## (a) Fusing models of different widths\n\nBoth models are fused with equal weights into "
        "the anchor's architecture. The data recipe uses an unlabeled sample of "
        f"{NUM_SAMPLES} training images. Time: training (0 = cached) or fusion. Logit std: the "
        "standard deviation of the model's logits on the test set, the scale of its outputs. With "
        "unequal widths the plans are not permutations and every axis of a unit, incoming and "
        "outgoing, is contracted with the column-normalised plan (the paper's T diag(1/nu)): a unit"
        " split into several keeps its full outgoing weight in each copy, units merged into one "
        "average theirs, so the outputs grow or shrink by about the width ratio per layer. Without "
        "biases this leaves the arg-max unchanged but not the loss or fine-tuning.",
    ]
    for arch, result in results["different_widths"].items():
        lr = f"lr {result['lr']}"
        if result.get("wide_lr", result["lr"]) != result["lr"]:
            lr += f"; wide model lr {result['wide_lr']}"
        title = (
            f"### {describe(arch, without_width(result['arch_kwargs']))} at widths "
            f"x{result['widths']['wide']:g} "
            f"and x{result['widths']['narrow']:g}, {result['epochs']} epochs ({lr})"
        )
        sections.append(f"{title}\n\n{widths_table(result)}")
        print(f"\nwidths: {arch}\n\n{widths_table(result)}")
    comp = results["compression"]
    png = plot(out / "compression.png", comp)
    wide = comp["wide"]
    sections.append(
        f"## (b) Compression of {describe(comp['arch'], comp['arch_kwargs'])}, "
        f"{comp['epochs']} epochs\n\n"
        f"The wide model: {wide['accuracy']:.2f}% with {wide['params']:,} parameters, logit std "
        f"{wide['logit_std']:.2f}. Accuracy cells: "
        f"one-shot / after fine-tuning ({comp['finetune']['epochs']} epoch, lr "
        f"{comp['finetune']['lr']}, {comp['finetune']['examples']} images), test accuracy (%). OT: "
        "`fuse([pruned, wide], weights=[0, 1], anchor=0)` with the recipe named.\n\n"
        f"{compression_table(comp)}\n\n![accuracy against fraction removed]({png.name})"
    )
    print(f"\ncompression\n\n{compression_table(comp)}")
    write_markdown(out / "report.md", "Widths: fusing different widths, and compression", sections)
    write_json(out / "results.json", results)
