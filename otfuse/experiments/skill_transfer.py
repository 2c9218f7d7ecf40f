"""``skill-transfer``: fuse models trained on different data (Singh & Jaggi 2020, section 5.2).

**Two parents per special class** (:data:`SPECIAL_CLASSES`: coat and shirt). Model A sees every
training example of the special class plus 10% of the other classes; model B sees the remaining 90%
of the other classes and none of the special class; they start from different initialisations.
Every method is built with weight :math:`w_A` on A and :math:`1 - w_A` on B (A is the anchor),

.. math::

    \\theta(w_A) = w_A \\, \\theta_A + (1 - w_A) \\operatorname{align}(\\theta_B \\to \\theta_A),

swept over :math:`w_A \\in \\{0, 0.1, \\dots, 1\\}`:

* the prediction ensemble :math:`\\sum_k w_k \\operatorname{softmax}(z_k)` and the logit average
  :math:`\\sum_k w_k z_k` (both K times the cost of one model), vanilla averaging (no alignment);
* OT fusion by the paper's ``paper-wts``, and by the recipes ``data`` (an unlabeled sample of
  :data:`NUM_SAMPLES` training images; ``data 10k``: :data:`POOL_SAMPLES`, and ``+ distill`` the
  stage :mod:`otfuse.distill` after refit) and ``data-free`` (no data), each with refit's class-score
  targets ``average`` (the logit average), ``ensemble`` (the log of the prediction ensemble) and
  ``confident`` (of the ensemble with each parent weighted per input by its confidence,
  :math:`\\pi_k(x) \\propto w_k e^{-\\beta H(p_k(x))}`, the layers before the class scores
  fitted to the parents' equal average; :mod:`otfuse.refit`) and ``coverage`` (``confident``
  with each parent's probabilities moved to the pooled label prior and each parent trusted on the
  classes it was trained on, from the number of examples of each class in its training set:
  the label histograms, no images; :mod:`otfuse.coverage`).

Each model is scored on the whole test set and on the special class's test images (its recall).
The inputs that ``data-free`` synthesises depend on the parents alone, so they are made once per set
of parents (:func:`synthesized`) and serve every weight and every target (the same fused models as
fusing without data; their times leave the synthesis out).

**Four parents of a Dirichlet split** (:func:`otfuse.experiments.splits.dirichlet_split`,
concentration :data:`DIRICHLET_ALPHA`): each mostly sees a few classes. The same methods fuse them
with equal weights and with weights proportional to the examples each saw.

The targets of issue 13 are checked from the numbers (:func:`check_targets`). Writes ``report.md``,
``results.json``, ``sweep_<class>.png`` per special class and ``dirichlet.png``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import otfuse
from otfuse.config import FusionConfig
from otfuse.data import Dataset, load_dataset, sample_inputs, split_special_class
from otfuse.experiments.common import QUICK_TRAIN_EXAMPLES, ParentSpec, parent_specs, train_parent
from otfuse.experiments.methods import LogitAverage, run_options
from otfuse.experiments.plots import (
    Panel,
    Series,
    describe,
    distinct_colours,
    grid,
    line_plot,
    percent,
)
from otfuse.experiments.report import Target, bar_chart, write_report, write_results
from otfuse.experiments.splits import class_counts, dirichlet_split
from otfuse.pipeline import synthesized_inputs
from otfuse.refit import CONFIDENCE_SHARPNESS
from otfuse.training import predict_logits

SPECIAL_CLASSES = (4, 6)  # Fashion-MNIST "coat", "shirt"
QUICK_SPECIAL_CLASSES = (4,)  # --quick: one pair, to stay under a minute
FRAC_OTHERS_A = 0.1  # share of the other classes' examples that model A sees
NUM_SAMPLES = 400  # unlabeled training inputs for the data recipe
# unlabeled training inputs for the methods that say so (distillation needs more than refit); the
# first NUM_SAMPLES of them are the data recipe's sample
POOL_SAMPLES = 10000
_DISTILL = ("bn_reset", "repair", "refit", "distill")
# the distill stage's steps on the pool: 600 of 128 inputs, about 7.7 passes over it (measured on
# the coat and shirt pairs, w_A 0.5 / 0.8: 300 steps on 5,000 inputs gave 87.29 / 86.79% and
# 86.84 / 86.37%, 600 steps on 10,000 gave 87.65 / 87.07% and 86.68 / 86.66%)
DISTILL_STEPS = 600
FULL_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))
QUICK_WEIGHTS = (0.0, 0.5, 1.0)
QUICK_EPOCHS = 5
DIRICHLET_PARENTS = 4
DIRICHLET_ALPHA = 0.1

# label -> options of otfuse.fuse; recipe "data" is given the unlabeled sample
OT_METHODS = {
    "OT data 10k + distill, targets coverage": {
        "recipe": "data",
        "targets": "coverage",
        "num_samples": POOL_SAMPLES,
        "stages": _DISTILL,
        "distill_steps": DISTILL_STEPS,
    },
    "OT data, targets coverage": {"recipe": "data", "targets": "coverage"},
    "OT data 10k + distill, targets confident": {
        "recipe": "data",
        "targets": "confident",
        "num_samples": POOL_SAMPLES,
        "stages": _DISTILL,
        "distill_steps": DISTILL_STEPS,
    },
    "OT data 10k, targets confident": {
        "recipe": "data",
        "targets": "confident",
        "num_samples": POOL_SAMPLES,
    },
    "OT data, targets confident": {"recipe": "data", "targets": "confident"},
    "OT data, targets ensemble": {"recipe": "data", "targets": "ensemble"},
    "OT data, targets average": {"recipe": "data", "targets": "average"},
    "OT data-free, targets confident": {"recipe": "data-free", "targets": "confident"},
    "OT data-free, targets ensemble": {"recipe": "data-free", "targets": "ensemble"},
    "OT data-free, targets average": {"recipe": "data-free", "targets": "average"},
    "OT paper-wts": {"recipe": "paper-wts"},
}
BASELINES = ("prediction ensemble", "logit average", "vanilla average")
CHECKED = "OT data 10k + distill, targets coverage"  # the method the targets are checked on


def synthesized(parents: Sequence[nn.Module], sample: torch.Tensor, quick: bool) -> torch.Tensor:
    """The inputs that the ``data-free`` recipe synthesises from ``parents`` (as
    :func:`otfuse.fuse` does without data). They depend on the parents alone, not on the weights or
    the targets, so one batch serves every data-free fusion of these parents: given as ``data`` with
    ``num_samples`` their number, the fusion is the one ``fuse`` makes without data."""
    options = run_options({"recipe": "data-free"}, quick)
    config = FusionConfig.from_recipe(options.pop("recipe")).replace(**options)
    return synthesized_inputs(parents, sample[:2], config)


def build(
    label: str,
    parents: Sequence[nn.Module],
    weights: Sequence[float],
    sample: torch.Tensor,
    quick: bool = False,
    synthetic: torch.Tensor | None = None,
    counts: Sequence[Sequence[int]] | None = None,
) -> tuple[nn.Module, float]:
    """The model of method ``label`` with ``weights`` (parent 0 is the anchor), and the seconds it
    took to build (for ``data-free``, without the synthesis when ``synthetic`` inputs from
    :func:`synthesized` are given). ``counts``: the examples of each class in each parent's
    training set (a row per parent), for the ``coverage`` targets."""
    start = time.perf_counter()
    if label == "prediction ensemble":
        model = otfuse.ensemble(parents, weights)
    elif label == "logit average":
        model = LogitAverage(parents, weights)
    elif label == "vanilla average":
        model = otfuse.vanilla_average(parents, weights)
    else:
        options = run_options(OT_METHODS[label], quick)
        pool = sample[: options.get("num_samples", NUM_SAMPLES)]
        data = {"data": pool, "data-free": synthetic}.get(options["recipe"])
        if options["recipe"] == "data-free" and synthetic is not None:
            options["num_samples"] = len(synthetic)
        if options.get("targets") == "coverage":
            options["class_counts"] = counts
        model = otfuse.fuse(
            parents, weights=list(weights), anchor=0, data=data, example_input=sample[:2], **options
        ).model
    return model, time.perf_counter() - start


def _synthetic(
    labels: Sequence[str], parents: Sequence[nn.Module], sample: torch.Tensor, quick: bool
) -> torch.Tensor | None:
    """:func:`synthesized` inputs when a method of ``labels`` is a data-free fusion, else None."""
    if any(OT_METHODS.get(label, {}).get("recipe") == "data-free" for label in labels):
        return synthesized(parents, sample, quick)
    return None


def score(model: nn.Module, test: Dataset, special: int | None = None) -> dict[str, float]:
    """Accuracy (%) on the whole test set and, given a ``special`` class, its recall (%)."""
    correct = predict_logits(model, test.images).argmax(1) == test.labels
    out = {"accuracy": 100.0 * correct.float().mean().item()}
    if special is not None:
        out["special_accuracy"] = 100.0 * correct[test.labels == special].float().mean().item()
    return out


# --------------------------------------------------------------------------------------------------
# Two parents: one special class against the rest


def split_data(train: Dataset, special: int) -> tuple[Dataset, Dataset]:
    """Model A's and model B's training sets (see :func:`otfuse.data.split_special_class`)."""
    idx_a, idx_b = split_special_class(train.labels, special, FRAC_OTHERS_A, seed=0)
    return train.subset(idx_a), train.subset(idx_b)


def sweep(
    parents: list[nn.Module],
    weights_a: Sequence[float],
    sample: torch.Tensor,
    test: Dataset,
    special: int,
    *,
    progress: bool = True,
    desc: str = "sweep",
    quick: bool = False,
    methods: Sequence[str] = (*BASELINES, *OT_METHODS),
    counts: Sequence[Sequence[int]] | None = None,
) -> dict[str, list[dict]]:
    """Method label (of ``methods``) -> one entry per weight:
    ``{"w_a", "accuracy", "special_accuracy", "seconds"}``. ``counts``: the parents' class
    counts (:func:`build`)."""
    labels = list(methods)
    series: dict[str, list[dict]] = {label: [] for label in labels}
    synthetic = _synthetic(labels, parents, sample, quick)
    jobs = [(w, label) for w in weights_a for label in labels]
    for w_a, label in tqdm(jobs, desc=desc, disable=not progress, leave=False):
        model, seconds = build(label, parents, [w_a, 1.0 - w_a], sample, quick, synthetic, counts)
        series[label].append({"w_a": w_a, **score(model, test, special), "seconds": seconds})
    return series


def run_pair(
    spec: ParentSpec,
    train: Dataset,
    test: Dataset,
    special: int,
    weights_a: Sequence[float],
    *,
    progress: bool = True,
    quick: bool = False,
    methods: Sequence[str] = (*BASELINES, *OT_METHODS),
) -> dict:
    """Train (or load) A and B for ``special``, score them, and sweep ``methods``."""
    data_a, data_b = split_data(train, special)
    name = test.classes[special]
    model_a, sec_a = train_parent(spec, data_a, 0, progress=progress, label=f"{name} A")
    model_b, sec_b = train_parent(spec, data_b, 1, progress=progress, label=f"{name} B")
    parents = [model_a, model_b]
    sample = sample_inputs(train, POOL_SAMPLES, seed=0)
    counts = [_histogram(d, train.num_classes) for d in (data_a, data_b)]
    return {
        "special_class": special,
        "special_class_name": name,
        "examples": {"A": len(data_a), "B": len(data_b)},
        "class_counts": counts,
        "special_test_examples": int((test.labels == special).sum()),
        "parents": {
            "parent A": {**score(model_a, test, special), "seconds": sec_a},
            "parent B": {**score(model_b, test, special), "seconds": sec_b},
        },
        "sweep": sweep(
            parents,
            weights_a,
            sample,
            test,
            special,
            progress=progress,
            desc=name,
            quick=quick,
            methods=methods,
            counts=counts,
        ),
    }


def _histogram(data: Dataset, classes: int) -> list[int]:
    return torch.bincount(data.labels, minlength=classes).tolist()


# --------------------------------------------------------------------------------------------------
# Four parents: a Dirichlet split


def run_dirichlet(
    spec: ParentSpec,
    train: Dataset,
    test: Dataset,
    *,
    progress: bool = True,
    quick: bool = False,
    methods: Sequence[str] = (*BASELINES, *OT_METHODS),
) -> dict:
    """Train (or load) :data:`DIRICHLET_PARENTS` parents on a Dirichlet split and fuse them with
    equal weights and with weights proportional to their examples."""
    parts = dirichlet_split(train.labels, DIRICHLET_PARENTS, DIRICHLET_ALPHA, seed=0)
    parents, rows = [], {}
    for k, part in enumerate(parts):
        model, seconds = train_parent(
            spec, train.subset(part), k, progress=progress, label=f"Dirichlet parent {k}"
        )
        parents.append(model)
        rows[f"parent {k}"] = {**score(model, test), "seconds": seconds}
    sizes = [len(p) for p in parts]
    weightings = {
        "equal weights": [1.0 / len(parts)] * len(parts),
        "weights by examples": _shares(sizes),
    }
    sample = sample_inputs(train, POOL_SAMPLES, seed=0)
    counts = class_counts(train.labels, parts, train.num_classes)
    fused: dict[str, dict[str, dict]] = {}
    synthetic = _synthetic(methods, parents, sample, quick)
    jobs = [(w, label) for w in weightings for label in methods]
    for weighting, label in tqdm(jobs, desc="Dirichlet", disable=not progress, leave=False):
        model, seconds = build(
            label, parents, weightings[weighting], sample, quick, synthetic, counts
        )
        fused.setdefault(weighting, {})[label] = {**score(model, test), "seconds": seconds}
    return {
        "alpha": DIRICHLET_ALPHA,
        "examples": sizes,
        "class_counts": counts,
        "weights": weightings,
        "parents": rows,
        "fused": fused,
    }


def _shares(sizes: Sequence[int]) -> list[float]:
    total = sum(sizes)
    return [s / total for s in sizes]


# --------------------------------------------------------------------------------------------------
# The run


def parent_spec(arch: str, quick: bool) -> ParentSpec:
    """The standard parents; in quick mode the quick ones trained for at least
    :data:`QUICK_EPOCHS` epochs, since A's share of the quick set is only a few hundred images."""
    spec = parent_specs(quick)[arch]
    return replace(spec, epochs=max(spec.epochs, QUICK_EPOCHS)) if quick else spec


def run(
    *,
    quick: bool = False,
    out: str | Path = "runs/skill-transfer",
    data_dir: str | Path | None = None,
    progress: bool = True,
    special_classes: Sequence[int] | None = None,
    arch: str = "mlpnet",
) -> dict:
    """Run the experiment on parents of ``arch`` (:data:`~otfuse.experiments.common.STANDARD_PARENTS`
    or the quick ones) for ``special_classes`` (default :data:`SPECIAL_CLASSES`, quick:
    :data:`QUICK_SPECIAL_CLASSES`); write ``out/``."""
    if special_classes is None:
        special_classes = QUICK_SPECIAL_CLASSES if quick else SPECIAL_CLASSES
    start = time.perf_counter()
    train = load_dataset("fashion-mnist", "train", data_dir)
    test = load_dataset("fashion-mnist", "test", data_dir)
    if quick:
        train = train.subset(torch.arange(QUICK_TRAIN_EXAMPLES))
    weights_a = QUICK_WEIGHTS if quick else FULL_WEIGHTS
    spec = parent_spec(arch, quick)
    pairs = {
        str(c): run_pair(spec, train, test, c, weights_a, progress=progress, quick=quick)
        for c in special_classes
    }
    dirichlet = run_dirichlet(spec, train, test, progress=progress, quick=quick)
    results = {
        "experiment": "skill-transfer",
        "quick": quick,
        "dataset": "fashion-mnist",
        "arch": arch,
        "arch_kwargs": spec.arch_kwargs,
        "epochs": spec.epochs,
        "lr": spec.lr,
        "train_examples": len(train),
        "test_examples": len(test),
        "frac_others_a": FRAC_OTHERS_A,
        "num_samples": NUM_SAMPLES,
        "pool_samples": POOL_SAMPLES,
        "weights_a": list(weights_a),
        "torch_threads": torch.get_num_threads(),
        "pairs": pairs,
        "dirichlet": dirichlet,
    }
    results["targets"] = [t.as_dict() for t in check_targets(results)]
    results["seconds"] = time.perf_counter() - start
    write_outputs(Path(out), results)
    return results


def check_targets(results: Mapping) -> list[Target]:
    """Issue 13's targets, on :data:`CHECKED`: at every weight, accuracy >= the logit average's and
    >= the prediction ensemble's less 1 point; the best fused model >= the best ensemble less 1 point
    with the special class's recall >= 70%; four Dirichlet parents, fused >= best parent + 5."""
    targets = []
    for pair in results["pairs"].values():
        name, sweep_ = pair["special_class_name"], pair["sweep"]
        fused = sweep_[CHECKED]
        for baseline, threshold in (("logit average", 0.0), ("prediction ensemble", -1.0)):
            gaps = [f["accuracy"] - b["accuracy"] for f, b in zip(fused, sweep_[baseline])]
            worst = min(range(len(gaps)), key=gaps.__getitem__)
            label = f"{name}: lowest over w_A of fused - {baseline} (at w_A {fused[worst]['w_a']})"
            targets.append(Target(label, gaps[worst], threshold, " points"))
        best = max(fused, key=lambda e: e["accuracy"])
        best_ensemble = max(e["accuracy"] for e in sweep_["prediction ensemble"])
        targets.append(
            Target(
                f"{name}: best fused (w_A {best['w_a']}) - best prediction ensemble",
                best["accuracy"] - best_ensemble,
                -1.0,
                " points",
            )
        )
        label = f"{name}: recall of the special class of that best fused model"
        targets.append(Target(label, best["special_accuracy"], 70.0, "%"))
    dirichlet = results.get("dirichlet")
    if not dirichlet:
        return targets
    best_parent = max(p["accuracy"] for p in dirichlet["parents"].values())
    for weighting, methods in dirichlet["fused"].items():
        label = f"Dirichlet({dirichlet['alpha']:g}), {weighting}: fused - best parent"
        targets.append(Target(label, methods[CHECKED]["accuracy"] - best_parent, 5.0, " points"))
    return targets


# --------------------------------------------------------------------------------------------------
# Tables, plots, report


def parents_table(pair: Mapping) -> str:
    rows = [
        [label, percent(s["accuracy"]), percent(s["special_accuracy"]), f"{s['seconds']:.1f}"]
        for label, s in pair["parents"].items()
    ]
    head = ["model", "test acc (%)", f"{pair['special_class_name']} recall (%)", "train time (s)"]
    return grid(head, rows)


def sweep_table(pair: Mapping) -> str:
    """One row per w_A; each cell 'whole test set / special class'."""
    series = pair["sweep"]
    labels = list(series)
    rows = []
    for i, entry in enumerate(series[labels[0]]):
        cells = [f"{entry['w_a']:.1f}"]
        for label in labels:
            e = series[label][i]
            cells.append(f"{percent(e['accuracy'])} / {percent(e['special_accuracy'])}")
        rows.append(cells)
    return grid(["w_A", *labels], rows)


def dirichlet_table(result: Mapping) -> str:
    """Parents (examples, the classes they saw most), then every method at both weightings."""
    rows = []
    for k, (label, s) in enumerate(result["parents"].items()):
        counts = result["class_counts"][k]
        top = sorted(range(len(counts)), key=lambda c: -counts[c])[:3]
        seen = ", ".join(f"{c}: {counts[c]}" for c in top)
        rows.append([label, f"{result['examples'][k]} ({seen})", percent(s["accuracy"]), "-"])
    methods = list(next(iter(result["fused"].values())))
    for label in methods:
        cells = [percent(result["fused"][w][label]["accuracy"]) for w in result["fused"]]
        rows.append([label, "-", *cells])
    weightings = [f"{w}: test acc (%)" for w in result["fused"]]
    return grid(["model", "examples (top classes: count)", *weightings], rows)


def plot(path: Path, pair: Mapping, arch: str) -> Path:
    name = pair["special_class_name"]
    panels = []
    colours = distinct_colours(len(pair["sweep"]))
    for key, title in [("accuracy", "whole test set"), ("special_accuracy", f"'{name}' (recall)")]:
        series = [
            Series(
                label,
                [e["w_a"] for e in entries],
                [e[key] for e in entries],
                linestyle=":" if label in BASELINES else "-",
                color=colour,
            )
            for (label, entries), colour in zip(pair["sweep"].items(), colours, strict=True)
        ]
        refs = {label: pair["parents"][label][key] for label in ("parent A", "parent B")}
        panels.append(Panel(title, series, "weight of model A (w_A)", "test accuracy (%)", refs))
    title = f"Skill transfer, special class '{name}', {arch} on Fashion-MNIST"
    return line_plot(path, panels, title=title, panel_size=(6.5, 5.0))


def plot_dirichlet(path: Path, result: Mapping) -> Path:
    panels = {
        weighting: {"test accuracy": {m: s["accuracy"] for m, s in methods.items()}}
        for weighting, methods in result["fused"].items()
    }
    best = max(p["accuracy"] for p in result["parents"].values())
    return bar_chart(
        path,
        panels,
        xlabel="test accuracy (%) (dashed: best parent)",
        title=f"{len(result['parents'])} parents of a Dirichlet({result['alpha']:g}) split",
        references=dict.fromkeys(panels, best),
        xlim=(0, 100),
    )


def write_outputs(out: Path, results: dict) -> None:
    """Print the tables; write the plots, ``report.md`` and ``results.json``."""
    command = "otfuse experiment skill-transfer" + (" --quick" if results["quick"] else "")
    arch = describe(results["arch"], results["arch_kwargs"])
    sections = [
        f"Regenerate with `{command}`. Fashion-MNIST, {results['train_examples']} training images; "
        f"{arch}, {results['epochs']} epochs, lr {results['lr']}. Model A: every image of the "
        f"special class plus {results['frac_others_a']:.0%} of the others; model B: the rest, none "
        "of the special class; different seeds. A is the anchor. Prediction ensemble and logit "
        "average cost two models. OT recipes `data` (unlabeled sample of "
        f"{results['num_samples']} training images) and `data-free`, each with refit's class-score "
        "targets `average` (the logit average), `ensemble` (the log of the prediction "
        "ensemble) and `confident` (the ensemble with each parent weighted per input by "
        f"exp(-{CONFIDENCE_SHARPNESS:g} x the entropy of its prediction), times its weight; the "
        "layers before the class scores fitted to the parents' equal average), `coverage` "
        "(the confident mixture with each parent's probabilities moved to the pooled label prior "
        "and each parent trusted on the classes it was trained on, from the number of training "
        "examples of each class each parent saw, its `class_counts`: label histograms, no "
        "images), and the paper's `paper-wts`. `data 10k`: the data recipe on "
        f"{results.get('pool_samples', POOL_SAMPLES):,} unlabeled training images (the first "
        f"{results['num_samples']} are the others' sample); `+ distill`: then the stage `distill` "
        f"({DISTILL_STEPS} label-free Adam steps of the whole model towards the targets' mixture "
        "on those images). Cells are accuracy on the whole test set / recall "
        "of the special class (%). `data-free` synthesises its inputs once per set of parents, for "
        f"every weight and every target. torch threads: {results['torch_threads']}; total "
        f"{results['seconds']:.0f} s.",
    ]
    for key, pair in results["pairs"].items():
        png = plot(out / f"sweep_{key}.png", pair, results["arch"])
        text = (
            f"## Special class {key} ('{pair['special_class_name']}')\n\n"
            f"Training images: A {pair['examples']['A']}, B {pair['examples']['B']}.\n\n"
            f"{parents_table(pair)}\n\n{sweep_table(pair)}\n\n![accuracy against w_A]({png.name})"
        )
        print(
            f"\nskill-transfer, special class {key}\n\n{parents_table(pair)}\n\n{sweep_table(pair)}"
        )
        sections.append(text)
    dirichlet = results["dirichlet"]
    png = plot_dirichlet(out / "dirichlet.png", dirichlet)
    text = (
        f"## {len(dirichlet['parents'])} parents of a Dirichlet({dirichlet['alpha']:g}) split\n\n"
        "Each class's training images divided among the parents in Dirichlet proportions "
        "(seed 0); parent k trained from seed k. Fused with equal weights, and with weights "
        "proportional to the examples each saw.\n\n"
        f"{dirichlet_table(dirichlet)}\n\n![accuracy of each method]({png.name})"
    )
    print(f"\nskill-transfer, Dirichlet split\n\n{dirichlet_table(dirichlet)}")
    sections.append(text)
    lines = [
        Target(**{k: v for k, v in t.items() if k != "met"}).line() for t in results["targets"]
    ]
    print("\n" + "\n".join(lines))
    sections.append(f"## Targets (issue 13, on '{CHECKED}')\n\n" + "\n".join(lines))
    write_report(
        out / "report.md", "Skill transfer: fusing models trained on different data", sections
    )
    write_results(out / "results.json", results)
