"""``transformers``: fuse two Vision Transformers and two character-level GPTs.

Two pairs of parents trained from different seeds (:mod:`otfuse.zoo_transformers`):

* two small ViTs on Fashion-MNIST (test accuracy), and
* two character-level GPTs on Debian's ``fortunes`` corpus (:mod:`otfuse.text`; validation loss
  and next-character accuracy per token).

For each pair: the parents, their prediction ensemble, vanilla averaging, the paper's OT fusion
(``wts`` and ``acts``), the ``data`` and ``data-free`` recipes one-shot; then vanilla averaging,
the paper's two and both recipes fine-tuned for 10% of one parent's training steps (and, for
reference, parent A trained for the same extra steps); for the GPTs, the data recipe's model and
parent A also at longer budgets (20% and 30%), to show how much training the fused model needs to
reach the better parent. The targets of the Transformers issue are
checked from the measured numbers:

.. math::

    \\text{ViT: } \\frac{\\text{acc(fused)}}{\\overline{\\text{acc}}_{\\text{parents}}} \\ge 95\\%
    \\text{ (data)},\\ 85\\% \\text{ (data-free)}; \\qquad
    \\text{GPT: } \\frac{L(\\text{data})}{\\overline{L}_{\\text{parents}}} \\le 1.05,\\
    L(\\text{data, fine-tuned}) \\le \\min(L_A, L_B).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import otfuse
from otfuse.data import Dataset, load_dataset, sample_inputs
from otfuse.experiments.common import Row, evaluate_row, train_or_load
from otfuse.experiments.methods import baselines, run_options
from otfuse.experiments.report import (
    Target,
    bar_chart,
    run_info,
    table,
    timed,
    write_report,
    write_results,
)
from otfuse.experiments.two_models import header
from otfuse.text import text_datasets
from otfuse.training import TrainConfig, finetune

# label -> (recipe, passes the unlabeled sample as data)
FUSIONS = {
    "OT wts (paper)": ("paper-wts", False),
    "OT acts (paper)": ("paper-acts", True),
    "recipe: data-free": ("data-free", False),
    "recipe: data": ("data", True),
}
FINETUNED = ("vanilla average", "OT wts (paper)", "OT acts (paper)", "recipe: data-free",
             "recipe: data")  # fmt: skip
REFERENCE = "parent A, trained further"  # given the same extra steps as the fine-tuned models


@dataclass(frozen=True)
class PairSpec:
    """One pair of parents: architecture, training, data sizes, and the fine-tuning budget."""

    name: str  # section title
    arch: str  # zoo name
    arch_kwargs: dict
    train: TrainConfig  # the parents' training (seed replaced per parent)
    train_examples: int  # ViT: first N training images; GPT: training windows (steps x batch)
    test_examples: int | None  # ViT: first N test images; GPT: validation windows
    sample_size: int  # unlabeled training inputs for fusion
    finetune_share: float = 0.1  # fine-tuning steps, as a share of one parent's
    finetune_lr_share: float = 0.3  # fine-tuning's peak lr, as a share of the parents'
    finetune_warmup: float = 0.2  # share of the fine-tuning steps with a linear lr warmup
    budget_shares: tuple[float, ...] = ()  # longer budgets for the data recipe and parent A
    text: bool = False  # a language model (validation loss per token) or a classifier

    def config(self, seed: int) -> TrainConfig:
        return replace(self.train, seed=seed)

    def finetune_config(self) -> TrainConfig:
        lr = self.train.lr * self.finetune_lr_share
        return replace(self.train, epochs=1, lr=lr, seed=0, warmup=self.finetune_warmup)


_ADAMW = dict(optimizer="adamw", schedule="cosine")
FULL = (
    PairSpec("ViT", "vit", {"patch": 7, "dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 2},
             TrainConfig(epochs=5, batch_size=128, lr=2e-3, weight_decay=0.05, **_ADAMW),
             60_000, None, 400),
    PairSpec("char-GPT", "chargpt", {"context": 64, "dim": 128, "depth": 4, "heads": 4},
             TrainConfig(epochs=1, batch_size=32, lr=3e-3, weight_decay=0.1, warmup=0.1, **_ADAMW),
             32 * 800, 512, 400, budget_shares=(0.2, 0.3), text=True),
)  # fmt: skip
QUICK = (
    PairSpec("ViT", "vit", {"patch": 7, "dim": 32, "depth": 2, "heads": 2, "mlp_ratio": 2},
             TrainConfig(epochs=1, batch_size=64, lr=3e-3, weight_decay=0.05, **_ADAMW),
             4000, 2000, 100),
    PairSpec("char-GPT", "chargpt", {"context": 32, "dim": 32, "depth": 2, "heads": 2},
             TrainConfig(epochs=1, batch_size=32, lr=3e-3, weight_decay=0.1, warmup=0.1, **_ADAMW),
             32 * 60, 128, 100, budget_shares=(0.2,), text=True),
)  # fmt: skip


@dataclass(frozen=True)
class PairData:
    train: Dataset
    test: Dataset  # ViT: the test split; GPT: validation windows
    sample: torch.Tensor  # unlabeled training inputs for fusion
    finetune: Dataset  # the first finetune_share of the training examples


def load_pair_data(spec: PairSpec, data_dir: str | Path | None) -> PairData:
    """The pair's data: Fashion-MNIST (ViT) or fortunes windows (GPT), and its fusion sample."""
    if spec.text:
        context = spec.arch_kwargs["context"]
        train, test = text_datasets(
            context=context,
            train_windows=spec.train_examples,
            validation_windows=spec.test_examples,
        )
    else:
        train = _first(load_dataset("fashion-mnist", "train", data_dir), spec.train_examples)
        test = _first(load_dataset("fashion-mnist", "test", data_dir), spec.test_examples)
    sample = sample_inputs(train, spec.sample_size, 0)
    return PairData(train, test, sample, finetune_data(spec, train, spec.finetune_share))


def finetune_data(spec: PairSpec, train: Dataset, share: float) -> Dataset:
    """The first ``share`` of the examples the parents were trained on (at least one batch)."""
    examples = spec.train.epochs * len(train)
    return _first(train, max(spec.train.batch_size, round(share * examples)))


def _first(dataset: Dataset, n: int | None) -> Dataset:
    return dataset if n is None or n >= len(dataset) else dataset.subset(torch.arange(n))


def fused_models(
    parents: Sequence[nn.Module], data: PairData, *, quick: bool
) -> list[tuple[str, Callable[[], nn.Module]]]:
    """The baselines and the fusions of :data:`FUSIONS`, as (label, builder) in table order."""
    jobs: list[tuple[str, Callable[[], nn.Module]]] = [
        (label, lambda m=model: m) for label, model in baselines(parents).items()
    ]
    for label, (recipe, uses_data) in FUSIONS.items():
        options = run_options({"recipe": recipe}, quick)

        def build(options: dict = options, uses_data: bool = uses_data) -> nn.Module:
            data_arg = data.sample if uses_data else None
            return otfuse.fuse(
                parents, data=data_arg, example_input=data.sample[:2], **options
            ).model

        jobs.append((label, build))
    return jobs


def run_pair(spec: PairSpec, data: PairData, *, quick: bool, progress: bool) -> dict:
    """Parents, one-shot rows, fine-tuned rows and targets of one pair."""
    parents, rows = [], []
    for tag, seed in zip("AB", (0, 1)):
        model, seconds = train_or_load(
            spec.arch, spec.arch_kwargs, data.train, spec.config(seed),
            progress=progress, label=f"{spec.name} seed {seed}",
        )  # fmt: skip
        parents.append(model)
        rows.append(evaluate_row(f"parent {tag} (seed {seed})", model, data.test, seconds))
    models = {}
    jobs = fused_models(parents, data, quick=quick)
    for label, make in tqdm(jobs, desc=f"{spec.name}: fuse", disable=not progress, leave=False):
        model, seconds = timed(make)
        rows.append(evaluate_row(label, model, data.test, seconds))
        models[label] = model
    tuned = finetune_pair(spec, parents[0], models, rows, data, progress=progress)
    budgets = budget_sweep(spec, parents[0], models.get("recipe: data"), tuned, data,
                           progress=progress)  # fmt: skip
    return {
        "name": spec.name,
        "arch": spec.arch,
        "arch_kwargs": spec.arch_kwargs,
        "parent_training": asdict(spec.config(0)),
        "train_examples": len(data.train),
        "test_examples": len(data.test),
        "sample_size": len(data.sample),
        "finetune_examples": len(data.finetune),
        "finetune": asdict(spec.finetune_config()),
        "text": spec.text,
        "rows": [asdict(r) for r in rows],
        "finetuned": tuned,
        "budgets": budgets,
        "targets": [t.as_dict() for t in targets(spec, rows, tuned)],
    }


def finetune_pair(
    spec: PairSpec,
    parent: nn.Module,
    models: dict[str, nn.Module],
    rows: Sequence[Row],
    data: PairData,
    *,
    progress: bool,
) -> list[dict]:
    """Each model of :data:`FINETUNED`, and parent A for reference, trained on ``data.finetune``
    with :meth:`PairSpec.finetune_config`; before and after."""
    config, before = spec.finetune_config(), {r.method: r for r in rows}
    jobs = {label: models[label] for label in FINETUNED if label in models}
    jobs[REFERENCE] = parent
    before[REFERENCE] = rows[0]
    out = []
    for label, model in tqdm(jobs.items(), desc=f"{spec.name}: fine-tune", disable=not progress,
                             leave=False):  # fmt: skip
        result, seconds = timed(lambda m=model: finetune(m, data.finetune, config, progress=False))
        after = evaluate_row(label, result.model, data.test, seconds)
        out.append({
            "method": label, "one_shot_accuracy": before[label].accuracy,
            "one_shot_loss": before[label].loss, "accuracy": after.accuracy, "loss": after.loss,
            "seconds": seconds,
        })  # fmt: skip
    return out


def budget_sweep(
    spec: PairSpec,
    parent: nn.Module,
    fused: nn.Module | None,
    tuned: Sequence[dict],
    data: PairData,
    *,
    progress: bool,
) -> list[dict]:
    """The data recipe's model and parent A fine-tuned at the base share and each of
    ``spec.budget_shares`` of a parent's steps (same lr, schedule and warmup share): how much
    training the fused model needs to reach the better parent, next to what the same training
    gives the parent. Empty without budgets or a data-recipe model."""
    if fused is None or not spec.budget_shares:
        return []
    by = {e["method"]: e for e in tuned}
    config = spec.finetune_config()
    out = [_budget_row(spec.finetune_share, len(data.finetune), config.batch_size,
                       by["recipe: data"], by[REFERENCE])]  # fmt: skip
    for share in tqdm(spec.budget_shares, desc=f"{spec.name}: budgets", disable=not progress,
                      leave=False):  # fmt: skip
        examples = finetune_data(spec, data.train, share)
        tuned_fused, tuned_parent = (
            asdict(evaluate_row(label, finetune(m, examples, config, progress=False).model,
                                data.test, 0.0))
            for label, m in (("recipe: data", fused), (REFERENCE, parent))
        )  # fmt: skip
        out.append(_budget_row(share, len(examples), config.batch_size, tuned_fused, tuned_parent))
    return out


def _budget_row(share: float, examples: int, batch: int, fused: dict, reference: dict) -> dict:
    return {
        "share": share, "steps": -(-examples // batch),
        "data_loss": fused["loss"], "data_accuracy": fused["accuracy"],
        "reference_loss": reference["loss"], "reference_accuracy": reference["accuracy"],
    }  # fmt: skip


def targets(spec: PairSpec, rows: Sequence[Row], tuned: Sequence[dict]) -> list[Target]:
    """The Transformers issue's targets for one pair (see the module's docstring)."""
    by = {r.method: r for r in rows}
    parents = rows[:2]
    data, free = by.get("recipe: data"), by.get("recipe: data-free")
    if not spec.text:
        mean = sum(p.accuracy for p in parents) / 2
        share = lambda r: None if r is None else 100.0 * r.accuracy / mean  # noqa: E731
        return [
            Target("data recipe: share of the mean parent accuracy kept", share(data), 95.0, "%"),
            Target("data-free recipe: share of the mean parent accuracy kept", share(free), 85.0,
                   "%"),
        ]  # fmt: skip
    mean = sum(p.loss for p in parents) / 2
    best = min(p.loss for p in parents)
    tuned_data = next((e["loss"] for e in tuned if e["method"] == "recipe: data"), None)
    return [
        Target("data recipe: validation loss, share of the parents' mean", None if data is None
               else 100.0 * data.loss / mean, 105.0, "%", at_most=True),
        Target("data recipe fine-tuned (10% of a parent's steps): loss minus the better parent's",
               None if tuned_data is None else tuned_data - best, 0.0, "", at_most=True),
    ]  # fmt: skip


# -- the report -----------------------------------------------------------------------------------
def _metric_names(result: dict) -> tuple[str, str]:
    if result["text"]:
        return "val acc (%, next char)", "val loss (nats/char)"
    return "test acc (%)", "test loss"


def one_shot_table(result: dict) -> str:
    acc, loss = _metric_names(result)
    rows = result["rows"]
    return table(
        ["method", acc, loss, "time (s)", "params"],
        [[r["method"], r["accuracy"], f"{r['loss']:.4f}", r["seconds"], r["params"]] for r in rows],
    )


def finetune_table(result: dict) -> str:
    acc, loss = _metric_names(result)
    return table(
        ["method", f"one-shot {acc}", f"one-shot {loss}", f"fine-tuned {acc}",
         f"fine-tuned {loss}", "time (s)"],
        [[e["method"], e["one_shot_accuracy"], f"{e['one_shot_loss']:.4f}", e["accuracy"],
          f"{e['loss']:.4f}", e["seconds"]] for e in result["finetuned"]],
    )  # fmt: skip


def budget_section(result: dict) -> str:
    """The fine-tuning budget table and the smallest budget at which the data recipe's model is
    no worse than the better parent (empty without budgets)."""
    budgets = result.get("budgets") or []
    if not budgets:
        return ""
    best = min(r["loss"] for r in result["rows"][:2])
    acc, loss = _metric_names(result)
    rows = [[f"{100 * b['share']:.0f}%", b["steps"], f"{b['data_loss']:.4f}", b["data_accuracy"],
             f"{b['reference_loss']:.4f}", b["reference_accuracy"]] for b in budgets]  # fmt: skip
    reached = [b for b in budgets if b["data_loss"] <= best]
    verdict = (
        f"The data recipe's model reaches the better parent ({best:.4f}) after "
        f"{100 * reached[0]['share']:.0f}% of a parent's steps ({reached[0]['data_loss']:.4f})."
        if reached
        else f"The data recipe's model does not reach the better parent ({best:.4f}) within "
        f"{100 * budgets[-1]['share']:.0f}% of a parent's steps."
    )
    return "\n\n".join([
        "### Fine-tuning budget",
        "The data recipe's model and parent A fine-tuned for longer, with the same lr, schedule "
        "and warmup share, on the first examples the parents saw. " + verdict,
        table(["share of a parent's steps", "steps", f"recipe: data, {loss}",
               f"recipe: data, {acc}", f"{REFERENCE}, {loss}", f"{REFERENCE}, {acc}"], rows),
    ])  # fmt: skip


def describe(result: dict) -> str:
    t, f = result["parent_training"], result["finetune"]
    kwargs = ", ".join(f"{k}={v}" for k, v in result["arch_kwargs"].items())
    unit = "windows of text" if result["text"] else "images"
    steps = -(-result["train_examples"] // t["batch_size"]) * t["epochs"]
    tune_steps = -(-result["finetune_examples"] // f["batch_size"])
    test = "validation windows" if result["text"] else "test images"
    params = result["rows"][0]["params"]
    return (
        f'Parents: `zoo.create("{result["arch"]}", {kwargs})` ({params:,} parameters), seeds 0 '
        f"and 1, {t['optimizer']} lr {t['lr']:g} ({t['schedule']}), weight decay "
        f"{t['weight_decay']:g}, batch {t['batch_size']}, {t['epochs']} epoch(s) over "
        f"{result['train_examples']:,} {unit} ({steps:,} steps). Evaluated on "
        f"{result['test_examples']:,} {test}. Fusion sample: {result['sample_size']} unlabeled "
        f"training {unit}. Fine-tuning: {tune_steps} steps ({result['finetune_examples']:,} "
        f"{unit}, lr {f['lr']:g}, {f['schedule']}, linear warmup over the first "
        f"{100 * f.get('warmup', 0.0):.0f}% of the steps). Time: training (0 = loaded from cache), "
        "fusion or fine-tuning."
    )


def target_lines(result: dict) -> str:
    return "\n".join(
        Target(**{k: v for k, v in d.items() if k != "met"}).line() for d in result["targets"]
    )


def pair_section(result: dict) -> str:
    return "\n\n".join([
        f"## {result['name']}", describe(result), "### One-shot", one_shot_table(result),
        "### Fine-tuned", finetune_table(result), *filter(None, [budget_section(result)]),
        "### Targets", target_lines(result),
    ])  # fmt: skip


def plot(path: Path, result: dict) -> Path:
    text = result["text"]
    key = "loss" if text else "accuracy"
    one_shot = {r["method"]: r[key] for r in result["rows"]}
    tuned = {e["method"]: e[key] for e in result["finetuned"]}
    mean = sum(r[key] for r in result["rows"][:2]) / 2
    return bar_chart(
        path,
        {result["name"]: {"one-shot": one_shot, "fine-tuned": tuned}},
        xlabel=("validation loss (nats/char)" if text else "test accuracy (%)")
        + "; dashed: mean parent",
        references={result["name"]: mean},
        xlim=None if text else (0, 100),
    )


def run(
    *,
    quick: bool = False,
    out: str | Path = "runs/transformers",
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Run the experiment, print its tables, write ``out/report.md``, ``results.json``,
    ``vit_accuracy.png`` and ``gpt_loss.png``; return the results."""
    out = Path(out)
    info = run_info("otfuse experiment transformers" + (" --quick" if quick else ""))
    sections = [header(
        "Two Vision Transformers (Fashion-MNIST) and two character-level GPTs (Debian's fortunes "
        "corpus), each pair trained from different seeds, fused one-shot, then fine-tuned.",
        quick, info,
    )]  # fmt: skip
    pairs, files = {}, {"report": out / "report.md", "results": out / "results.json"}
    for spec in QUICK if quick else FULL:
        data = load_pair_data(spec, data_dir)
        pairs[spec.arch] = run_pair(spec, data, quick=quick, progress=progress)
        section = pair_section(pairs[spec.arch])
        print("\n" + section + "\n", flush=True)
        plot_path = out / ("gpt_loss.png" if spec.text else "vit_accuracy.png")
        plot(plot_path, pairs[spec.arch])
        files[spec.arch] = plot_path
        sections += [section, f"![{spec.name}]({plot_path.name})"]
    results = {
        "experiment": "transformers",
        "quick": quick,
        "run": info,
        "pairs": pairs,
        "files": {k: str(v) for k, v in files.items()},
    }
    write_results(files["results"], results)
    write_report(files["report"], "transformers: fusing ViTs and character-level GPTs", sections)
    print(f"wrote {', '.join(str(p) for p in files.values())}")
    return results
