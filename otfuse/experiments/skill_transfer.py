"""``skill-transfer``: fuse two models trained on different data (Singh & Jaggi 2020, section 5.2).

Model A sees every training example of one special class plus 10% of the other classes; model B sees
the remaining 90% of the other classes and none of the special class; they start from different
initialisations. One-shot fusion with weight :math:`w_A` on A and :math:`1 - w_A` on B (A is the
anchor),

.. math::

    \\theta(w_A) = w_A \\, \\theta_A + (1 - w_A) \\operatorname{align}(\\theta_B \\to \\theta_A),

is swept over :math:`w_A \\in \\{0, 0.1, \\dots, 1\\}` for OT fusion (recipes ``data-free``,
``data`` and the paper's ``paper-wts``) and for vanilla averaging (no alignment) and the prediction
ensemble at the same weights. Each model is scored on the whole test set and on the special class's
test examples. At :math:`w_A = 1` OT fusion gives back A exactly (B has weight 0); at
:math:`w_A = 0` it gives B with its units reordered, hence B's accuracy (for hard plans).

Writes ``report.md``, ``results.json`` and one plot per architecture (``sweep_<arch>.png``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import otfuse
from otfuse.data import Dataset, load_dataset, sample_inputs, split_special_class
from otfuse.experiments.common import QUICK_TRAIN_EXAMPLES, ParentSpec, parent_specs, train_parent
from otfuse.experiments.methods import run_options
from otfuse.experiments.plots import (
    Panel,
    Series,
    describe,
    grid,
    line_plot,
    percent,
    write_json,
    write_markdown,
)
from otfuse.training import evaluate

SPECIAL_CLASS = 4  # Fashion-MNIST "coat"
FRAC_OTHERS_A = 0.1  # share of the other classes' examples that model A sees
NUM_SAMPLES = 400  # unlabeled training inputs for the data recipe
FULL_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))
QUICK_WEIGHTS = (0.0, 0.5, 1.0)
QUICK_EPOCHS = 5

# label -> options of otfuse.fuse; "data" is given the unlabeled sample
OT_METHODS = {
    "OT data-free": {"recipe": "data-free"},
    "OT data": {"recipe": "data"},
    "OT paper-wts": {"recipe": "paper-wts"},
}
BASELINES = ("vanilla average", "prediction ensemble")


@dataclass(frozen=True)
class Score:
    accuracy: float  # percent, whole test set
    special_accuracy: float  # percent, test examples of the special class
    seconds: float  # training (parents; 0 when cached) or fusion time


def score(model: nn.Module, test: Dataset, special_test: Dataset, seconds: float) -> Score:
    return Score(evaluate(model, test).accuracy, evaluate(model, special_test).accuracy, seconds)


def fused_model(
    label: str, parents: list[nn.Module], w_a: float, sample: torch.Tensor, quick: bool = False
) -> tuple[nn.Module, float]:
    """The model of method ``label`` at weight ``w_a`` on A, and the seconds it took to build."""
    weights = [w_a, 1.0 - w_a]
    start = time.perf_counter()
    if label == "vanilla average":
        model = otfuse.vanilla_average(parents, weights)
    elif label == "prediction ensemble":
        model = otfuse.ensemble(parents, weights)
    else:
        options = run_options(OT_METHODS[label], quick)
        data = sample if options["recipe"] == "data" else None
        model = otfuse.fuse(
            parents, weights=weights, anchor=0, data=data, example_input=sample[:2], **options
        ).model
    return model, time.perf_counter() - start


def sweep(
    parents: list[nn.Module],
    weights_a: tuple[float, ...],
    sample: torch.Tensor,
    test: Dataset,
    special_test: Dataset,
    *,
    progress: bool = True,
    desc: str = "sweep",
    quick: bool = False,
) -> dict[str, list[dict]]:
    """Method label -> one entry per weight:
    ``{"w_a", "accuracy", "special_accuracy", "seconds"}``."""
    labels = [*OT_METHODS, *BASELINES]
    series: dict[str, list[dict]] = {label: [] for label in labels}
    jobs = [(w, label) for w in weights_a for label in labels]
    for w_a, label in tqdm(jobs, desc=desc, disable=not progress, leave=False):
        model, seconds = fused_model(label, parents, w_a, sample, quick)
        series[label].append({"w_a": w_a, **asdict(score(model, test, special_test, seconds))})
    return series


def split_data(train: Dataset, special: int) -> tuple[Dataset, Dataset]:
    """Model A's and model B's training sets (see :func:`otfuse.data.split_special_class`)."""
    idx_a, idx_b = split_special_class(train.labels, special, FRAC_OTHERS_A, seed=0)
    return train.subset(idx_a), train.subset(idx_b)


def run_arch(
    spec: ParentSpec,
    train: Dataset,
    test: Dataset,
    special: int,
    weights_a: tuple[float, ...],
    *,
    progress: bool = True,
    quick: bool = False,
) -> dict:
    """Train (or load) A and B of ``spec``, score them and their ensemble, and sweep the fusions."""
    data_a, data_b = split_data(train, special)
    special_test = test.subset(torch.nonzero(test.labels == special).flatten())
    model_a, sec_a = train_parent(spec, data_a, 0, progress=progress, label=f"{spec.arch} A")
    model_b, sec_b = train_parent(spec, data_b, 1, progress=progress, label=f"{spec.arch} B")
    parents = [model_a, model_b]
    sample = sample_inputs(train, NUM_SAMPLES, seed=0)
    scores = {
        "parent A": score(model_a, test, special_test, sec_a),
        "parent B": score(model_b, test, special_test, sec_b),
        "prediction ensemble (0.5/0.5)": score(otfuse.ensemble(parents), test, special_test, 0.0),
    }
    return {
        "arch": spec.arch,
        "arch_kwargs": spec.arch_kwargs,
        "epochs": spec.epochs,
        "lr": spec.lr,
        "examples": {"A": len(data_a), "B": len(data_b), "special test": len(special_test)},
        "parents": {label: asdict(s) for label, s in scores.items()},
        "sweep": sweep(
            parents,
            weights_a,
            sample,
            test,
            special_test,
            progress=progress,
            desc=spec.arch,
            quick=quick,
        ),
    }


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
    special: int = SPECIAL_CLASS,
    archs: tuple[str, ...] = ("mlpnet",),
) -> dict:
    """Run the experiment for each architecture in ``archs`` (parents of
    :data:`~otfuse.experiments.common.STANDARD_PARENTS`, or the quick ones); write ``out/``.

    The default is MLPNet alone, so the full skill-transfer, widths and timing runs fit in about
    15 minutes here; ``archs=("mlpnet", "vgg11")`` adds VGG11 (about 4 more minutes).
    """
    start = time.perf_counter()
    train = load_dataset("fashion-mnist", "train", data_dir)
    test = load_dataset("fashion-mnist", "test", data_dir)
    if quick:
        train = train.subset(torch.arange(QUICK_TRAIN_EXAMPLES))
    weights_a = QUICK_WEIGHTS if quick else FULL_WEIGHTS
    models = {
        arch: run_arch(
            parent_spec(arch, quick),
            train,
            test,
            special,
            weights_a,
            progress=progress,
            quick=quick,
        )
        for arch in archs
    }
    results = {
        "experiment": "skill-transfer",
        "quick": quick,
        "dataset": "fashion-mnist",
        "train_examples": len(train),
        "test_examples": len(test),
        "special_class": special,
        "special_class_name": test.classes[special],
        "frac_others_a": FRAC_OTHERS_A,
        "weights_a": list(weights_a),
        "torch_threads": torch.get_num_threads(),
        "models": models,
        "seconds": time.perf_counter() - start,
    }
    write_outputs(Path(out), results)
    return results


# --------------------------------------------------------------------------------------------------
# Tables, plots, report


def parents_table(result: dict) -> str:
    rows = [
        [label, percent(s["accuracy"]), percent(s["special_accuracy"]), f"{s['seconds']:.1f}"]
        for label, s in result["parents"].items()
    ]
    return grid(["model", "test acc (%)", "special class acc (%)", "train time (s)"], rows)


def sweep_table(result: dict) -> str:
    """One row per w_A; each cell 'whole test set / special class'."""
    series = result["sweep"]
    labels = list(series)
    rows = []
    for i, entry in enumerate(series[labels[0]]):
        cells = [f"{entry['w_a']:.1f}"]
        for label in labels:
            e = series[label][i]
            cells.append(f"{percent(e['accuracy'])} / {percent(e['special_accuracy'])}")
        rows.append(cells)
    return grid(["w_A", *labels], rows)


def plot(path: Path, result: dict, special_name: str) -> Path:
    panels = []
    for key, title in [("accuracy", "whole test set"), ("special_accuracy", f"'{special_name}'")]:
        series = [
            Series(
                label,
                [e["w_a"] for e in entries],
                [e[key] for e in entries],
                linestyle=":" if label == "prediction ensemble" else "-",
            )
            for label, entries in result["sweep"].items()
        ]
        refs = {label: result["parents"][label][key] for label in ("parent A", "parent B")}
        panels.append(Panel(title, series, "weight of model A (w_A)", "test accuracy (%)", refs))
    return line_plot(path, panels, title=f"Skill transfer, {result['arch']} on Fashion-MNIST")


def write_outputs(out: Path, results: dict) -> None:
    """Print the tables; write the plots, ``report.md`` and ``results.json``."""
    command = "otfuse experiment skill-transfer" + (" --quick" if results["quick"] else "")
    name = results["special_class_name"]
    sections = [
        f"Regenerate with `{command}`. Fashion-MNIST, {results['train_examples']} training images; "
        f"special class {results['special_class']} ('{name}'). Model A: every '{name}' image plus "
        f"{results['frac_others_a']:.0%} of the others; model B: the rest, no '{name}'. Different "
        "seeds (initialisations). A is the anchor; OT recipes `data-free`, `data` (unlabeled "
        f"sample of {NUM_SAMPLES} training images) and `paper-wts`. Cells are accuracy on the "
        f"whole test set / on the {name} test images (%). torch threads: "
        f"{results['torch_threads']}; total {results['seconds']:.0f} s.",
    ]
    for arch, result in results["models"].items():
        png = plot(out / f"sweep_{arch}.png", result, name)
        header = (
            f"## {describe(arch, result['arch_kwargs'])}, {result['epochs']} epochs, lr "
            f"{result['lr']}\n\n"
            f"Training images: A {result['examples']['A']}, B {result['examples']['B']}."
        )
        text = f"{header}\n\n{parents_table(result)}\n\n{sweep_table(result)}"
        print(f"\nskill-transfer, {arch}\n\n{parents_table(result)}\n\n{sweep_table(result)}")
        sections.append(f"{text}\n\n![accuracy against w_A]({png.name})")
    write_markdown(
        out / "report.md", "Skill transfer: fusing models trained on different data", sections
    )
    write_json(out / "results.json", results)
