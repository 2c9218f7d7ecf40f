"""``two-models``: fuse two models trained from different seeds (Table 1 of Singh & Jaggi, 2020).

For MLPNet, VGG11 (no BatchNorm) and ResNet-18 (BatchNorm) on Fashion-MNIST: parents A (seed 0) and
B (seed 1), their prediction ensemble, vanilla averaging and every fusion method of
:mod:`otfuse.experiments.methods` one-shot (paper OT, each addition of the repair/refinement issue
alone, the two recipes); then vanilla averaging, paper OT (``wts``, ``acts``) and both recipes
fine-tuned with one budget. Each fused model's accuracy is also given as the share it keeps of the
mean parent accuracy,

.. math::

    \\text{kept} = 100 \\cdot \\frac{\\text{acc(fused)}}{(\\text{acc}(A) + \\text{acc}(B)) / 2},

and the targets of the repair/refinement issue are checked from the measured numbers.

The pieces shared with ``many-models`` (:class:`Budget`, :func:`load_data`, :func:`one_shot`,
:func:`finetune_rows`) live here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from otfuse.data import Dataset, load_dataset, sample_inputs
from otfuse.experiments.common import (
    QUICK_TRAIN_EXAMPLES,
    ParentSpec,
    Row,
    evaluate_row,
    markdown_table,
    parent_specs,
    train_parent,
)
from otfuse.experiments.methods import METHODS, baselines
from otfuse.experiments.report import (
    Target,
    bar_chart,
    run_info,
    table,
    timed,
    write_report,
    write_results,
)
from otfuse.training import TrainConfig, finetune

ARCHS = ("mlpnet", "vgg11", "resnet18")
NAMES = {"mlpnet": "MLPNet", "vgg11": "VGG11", "resnet18": "ResNet-18"}
# fused models fine-tuned with the same budget
FINETUNED = (
    "vanilla average",
    "OT wts (paper)",
    "OT acts (paper)",
    "recipe: data-free",
    "recipe: data",
)


@dataclass(frozen=True)
class Budget:
    """Data sizes of a run and the fine-tuning budget given to every fused model."""

    train_examples: int | None  # parents' training images (first N); None: all 60,000
    test_examples: int | None  # test images (first N); None: all 10,000
    sample_size: int  # unlabeled training images for activations and repair
    sample_seed: int  # seed of that sample
    finetune_examples: int | None  # fine-tuning images (first N of the parents' data); None: all
    finetune: TrainConfig  # fine-tuning schedule (same for every model)


FULL = Budget(None, None, 400, 0, None, TrainConfig(epochs=1, lr=0.01, schedule="cosine"))
QUICK = Budget(QUICK_TRAIN_EXAMPLES, 1000, 100, 0, 512, TrainConfig(epochs=1, lr=0.01))


def budget(quick: bool) -> Budget:
    return QUICK if quick else FULL


@dataclass(frozen=True)
class Data:
    train: Dataset  # the parents' training set
    test: Dataset
    sample: torch.Tensor  # (sample_size, C, H, W) unlabeled training inputs for fusion
    finetune: Dataset
    quick: bool = False  # a --quick run (fewer synthesised inputs for data-free fusion)


def _first(dataset: Dataset, n: int | None) -> Dataset:
    return dataset if n is None or n >= len(dataset) else dataset.subset(torch.arange(n))


def load_data(budget: Budget, data_dir: str | Path | None) -> Data:
    """Fashion-MNIST cut to ``budget``, and the seeded fusion sample from the training images."""
    train = _first(load_dataset("fashion-mnist", "train", data_dir), budget.train_examples)
    test = _first(load_dataset("fashion-mnist", "test", data_dir), budget.test_examples)
    sample = sample_inputs(train, budget.sample_size, budget.sample_seed)
    return Data(train, test, sample, _first(train, budget.finetune_examples), budget == QUICK)


def data_settings(data: Data, budget: Budget) -> dict:
    return {
        "dataset": "fashion-mnist",
        "train_examples": len(data.train),
        "test_examples": len(data.test),
        "sample_size": len(data.sample),
        "sample_seed": budget.sample_seed,
        "finetune_examples": len(data.finetune),
        "finetune": asdict(budget.finetune),
    }


def train_parents(
    spec: ParentSpec, data: Data, seeds: Sequence[int], *, progress: bool
) -> tuple[list[nn.Module], list[float]]:
    """Parents of ``spec`` for each seed (cached) and the seconds each took to train (0: cached)."""
    models, seconds = [], []
    for seed in seeds:
        model, s = train_parent(spec, data.train, seed, progress=progress)
        models.append(model)
        seconds.append(s)
    return models, seconds


def one_shot(
    parents: Sequence[nn.Module], data: Data, *, progress: bool, desc: str
) -> tuple[list[Row], dict[str, nn.Module]]:
    """Rows of the baselines and of every applicable fusion method, and the models by label.

    A row's time is the fusion time (0 for the baselines' construction, which is trivial).
    """
    jobs: list[tuple[str, Callable[[], nn.Module]]] = [
        (label, lambda m=model: m) for label, model in baselines(parents).items()
    ]
    jobs += [
        (m.label, lambda m=m: m.build(parents, data.sample, quick=data.quick))
        for m in METHODS
        if m.applies(parents)
    ]
    rows, models = [], {}
    for label, make in tqdm(jobs, desc=desc, disable=not progress, leave=False):
        model, seconds = timed(make)
        rows.append(evaluate_row(label, model, data.test, seconds))
        models[label] = model
    return rows, models


def finetune_rows(
    models: Mapping[str, nn.Module],
    before: Mapping[str, Row],
    data: Data,
    config: TrainConfig,
    *,
    progress: bool,
    desc: str,
) -> list[dict]:
    """Fine-tune a copy of each model with ``config`` on ``data.finetune``; before and after."""
    out = []
    for label, model in tqdm(models.items(), desc=desc, disable=not progress, leave=False):
        result, seconds = timed(lambda m=model: finetune(m, data.finetune, config, progress=False))
        after = evaluate_row(label, result.model, data.test, seconds)
        out.append(
            {
                "method": label,
                "one_shot_accuracy": before[label].accuracy,
                "one_shot_loss": before[label].loss,
                "accuracy": after.accuracy,
                "loss": after.loss,
                "seconds": seconds,
            }
        )
    return out


def finetune_table(entries: Sequence[dict]) -> str:
    return table(
        [
            "method",
            "one-shot acc (%)",
            "one-shot loss",
            "fine-tuned acc (%)",
            "fine-tuned loss",
            "time (s)",
        ],
        [
            [
                e["method"],
                e["one_shot_accuracy"],
                f"{e['one_shot_loss']:.4f}",
                e["accuracy"],
                f"{e['loss']:.4f}",
                e["seconds"],
            ]
            for e in entries
        ],
    )


def finetune_note(data: Data, config: TrainConfig) -> str:
    return (
        f"same budget for every model: {config.epochs} epoch(s), SGD lr {config.lr:g} "
        f"({config.schedule}), batch {config.batch_size}, on {len(data.finetune):,} training images"
    )


def kept(accuracy: float, parent_accuracies: Sequence[float]) -> float:
    """Percentage of the mean parent accuracy that ``accuracy`` keeps."""
    return 100.0 * accuracy / (sum(parent_accuracies) / len(parent_accuracies))


def targets(arch: str, accuracy: Mapping[str, float], parents: Sequence[float]) -> list[Target]:
    """The repair/refinement issue's one-shot targets for a pair of ``arch`` models."""
    data, free = accuracy.get("recipe: data"), accuracy.get("recipe: data-free")
    out = []
    if arch == "mlpnet":
        gap = None if data is None else data - max(parents)
        out.append(Target("data recipe: accuracy minus the better parent's (points)", gap, -1.0))
    else:
        value = None if data is None else kept(data, parents)
        out.append(Target("data recipe: share of the mean parent accuracy kept", value, 95.0, "%"))
    value = None if free is None else kept(free, parents)
    out.append(Target("data-free recipe: share of the mean parent accuracy kept", value, 85.0, "%"))
    return out


def run_arch(spec: ParentSpec, data: Data, config: TrainConfig, *, progress: bool) -> dict:
    """Parents, one-shot rows, fine-tuned rows and targets for one architecture."""
    name = NAMES.get(spec.arch, spec.arch)
    parents, seconds = train_parents(spec, data, (0, 1), progress=progress)
    rows = [
        evaluate_row(f"parent {tag} (seed {seed})", model, data.test, s)
        for tag, seed, model, s in zip("AB", (0, 1), parents, seconds)
    ]
    fused_rows, models = one_shot(parents, data, progress=progress, desc=f"{name}: fuse")
    rows += fused_rows
    parent_acc = [r.accuracy for r in rows[:2]]
    by_label = {r.method: r for r in rows}
    tuned = finetune_rows(
        {label: models[label] for label in FINETUNED if label in models},
        by_label,
        data,
        config,
        progress=progress,
        desc=f"{name}: fine-tune",
    )
    accuracy = {r.method: r.accuracy for r in rows}
    return {
        "arch": spec.arch,
        "name": name,
        "arch_kwargs": spec.arch_kwargs,
        "parent_training": {k: v for k, v in asdict(spec.config(0)).items() if k != "seed"},
        "parent_mean_accuracy": sum(parent_acc) / 2,
        "rows": [{**asdict(r), "kept": kept(r.accuracy, parent_acc)} for r in rows],
        "finetuned": tuned,
        "targets": [t.as_dict() for t in targets(spec.arch, accuracy, parent_acc)],
    }


def _rows(result: dict) -> list[Row]:
    fields = Row.__dataclass_fields__
    return [Row(**{k: v for k, v in r.items() if k in fields}) for r in result["rows"]]


def describe_parents(result: dict, data: Data, seeds: str) -> str:
    """How the parents were built and trained, and the data sizes, as one paragraph."""
    t = result["parent_training"]
    kwargs = ", ".join(f"{k}={v}" for k, v in result["arch_kwargs"].items())
    return (
        f'Parents: `zoo.create("{result["arch"]}", {kwargs})`, {t["epochs"]} epoch(s), SGD lr '
        f"{t['lr']:g} ({t['schedule']}), batch {t['batch_size']}, seeds {seeds}, on "
        f"{len(data.train):,} training images. Test set: {len(data.test):,} images. Fusion sample: "
        f"{len(data.sample)} unlabeled training images."
    )


def target_lines(result: dict) -> str:
    return "\n".join(
        Target(**{k: v for k, v in d.items() if k != "met"}).line() for d in result["targets"]
    )


def arch_section(result: dict, data: Data, config: TrainConfig) -> str:
    kept_cells = [f"{r['kept']:.1f}" for r in result["rows"]]
    return "\n\n".join(
        [
            f"## {result['name']}",
            describe_parents(result, data, "0 and 1")
            + " Time: training (0 = loaded from cache) or fusion. kept = accuracy / mean parent "
            f"accuracy ({result['parent_mean_accuracy']:.2f}%).",
            "### One-shot",
            markdown_table(_rows(result), extra={"kept (%)": kept_cells}),
            f"### Fine-tuned ({finetune_note(data, config)})",
            finetune_table(result["finetuned"]),
            "### Targets (repair/refinement issue, one-shot)",
            target_lines(result),
        ]
    )


def header(what: str, quick: bool, info: dict) -> str:
    """The report's opening: what was run, the command that regenerates it, and the machine."""
    command = f"`{info['command']}`"
    lines = [
        what,
        f"Regenerate with {command}. Run {info['date']} on {info['machine']}, torch {info['torch']} "
        f"with {info['torch_threads']} thread(s).",
    ]
    if quick:
        lines.append(
            "**Quick mode**: tiny models and data that check the pipeline runs; the numbers say "
            "nothing about the method. Run without `--quick` for the real results."
        )
    return "\n\n".join(lines)


def plot(path: Path, archs: Mapping[str, dict]) -> Path:
    panels, references = {}, {}
    for result in archs.values():
        one_shot_acc = {r["method"]: r["accuracy"] for r in result["rows"]}
        tuned = {e["method"]: e["accuracy"] for e in result["finetuned"]}
        panels[result["name"]] = {"one-shot": one_shot_acc, "fine-tuned": tuned}
        references[result["name"]] = result["parent_mean_accuracy"]
    return bar_chart(
        path,
        panels,
        xlabel="test accuracy (%); dashed: mean parent",
        title="Fusing two models on Fashion-MNIST",
        references=references,
        xlim=(0, 100),
    )


def run(
    *,
    quick: bool = False,
    out: str | Path = "runs/two-models",
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Run the experiment, print its tables, write ``out/report.md``, ``results.json`` and
    ``accuracy.png``; return the results."""
    out, plan = Path(out), budget(quick)
    data = load_data(plan, data_dir)
    info = run_info("otfuse experiment two-models" + (" --quick" if quick else ""))
    archs = {}
    sections = [
        header(
            "Two models trained from different seeds on Fashion-MNIST, fused one-shot by every "
            "method, then fine-tuned (Table 1 of Singh & Jaggi, 2020).",
            quick,
            info,
        )
    ]
    for arch in ARCHS:
        spec = parent_specs(quick)[arch]
        archs[arch] = run_arch(spec, data, plan.finetune, progress=progress)
        section = arch_section(archs[arch], data, plan.finetune)
        print("\n" + section + "\n", flush=True)
        sections.append(section)
    files = {
        "report": out / "report.md",
        "results": out / "results.json",
        "plot": out / "accuracy.png",
    }
    sections.append(f"![accuracy per method]({files['plot'].name})")
    results = {
        "experiment": "two-models",
        "quick": quick,
        "run": info,
        "settings": data_settings(data, plan),
        "archs": archs,
        "files": {k: str(v) for k, v in files.items()},
    }
    plot(files["plot"], archs)
    write_results(files["results"], results)
    write_report(files["report"], "two-models: fusing two models", sections)
    print(f"wrote {', '.join(str(p) for p in files.values())}")
    return results
