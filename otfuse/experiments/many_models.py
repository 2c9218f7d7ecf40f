"""``many-models``: fuse K = 2, 4, 6, 8 models (Tables 2-3 of Singh & Jaggi, 2020).

For MLPNet and VGG11 on Fashion-MNIST, K models trained from seeds 0..K-1 (seeds 0 and 1 are the
cached parents of ``two-models``) are compared, for each K: the mean and the best parent, their
prediction ensemble, vanilla averaging and every applicable fusion method of
:mod:`otfuse.experiments.methods` (aligning to the running average only for K > 2) one-shot; then
vanilla averaging, paper OT (``wts``) and the data recipe fine-tuned with the budget of
``two-models``. Each row carries its inference cost (:mod:`otfuse.experiments.costs`): a fused model
costs one model, the ensemble K models.

The target of the repair/refinement issue checked here: with the data recipe, fusing K = 4 models
costs at most 2 points of accuracy against K = 2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from torch import nn

from otfuse.experiments.common import ParentSpec, Row, evaluate_row, markdown_table, parent_specs
from otfuse.experiments.costs import model_cost
from otfuse.experiments.report import (
    Target,
    line_chart,
    run_info,
    table,
    write_report,
    write_results,
)
from otfuse.experiments.two_models import (
    NAMES,
    Data,
    budget,
    data_settings,
    describe_parents,
    finetune_note,
    finetune_rows,
    header,
    load_data,
    one_shot,
    target_lines,
    train_parents,
)
from otfuse.training import TrainConfig

ARCHS = ("mlpnet", "vgg11")
FULL_KS = (2, 4, 6, 8)
QUICK_KS = (2, 4)
# K per architecture in the full run: eight VGG11 parents do not fit this CPU's budget (~6 min each)
FULL_KS_BY_ARCH = {"mlpnet": FULL_KS, "vgg11": (2, 4)}
FINETUNED = ("vanilla average", "OT wts (paper)", "recipe: data")
SUMMARY = ("mean parent", "best parent")


def ks(quick: bool) -> tuple[int, ...]:
    return QUICK_KS if quick else FULL_KS


def summary_rows(parent_rows: Sequence[Row]) -> list[Row]:
    """The mean parent (mean accuracy, loss and training time) and the most accurate parent."""
    n = len(parent_rows)
    mean = Row(
        "mean parent",
        sum(r.accuracy for r in parent_rows) / n,
        sum(r.loss for r in parent_rows) / n,
        sum(r.seconds for r in parent_rows) / n,
        parent_rows[0].params,
    )
    best = max(parent_rows, key=lambda r: r.accuracy)
    return [mean, Row("best parent", best.accuracy, best.loss, best.seconds, best.params)]


def run_k(
    parents: Sequence[nn.Module],
    parent_rows: Sequence[Row],
    data: Data,
    config: TrainConfig,
    *,
    progress: bool,
    name: str,
) -> dict:
    """One-shot rows with their costs, and the fine-tuned rows, for the first K parents."""
    k = len(parents)
    rows = summary_rows(parent_rows[:k])
    fused, models = one_shot(parents, data, progress=progress, desc=f"{name} K={k}: fuse")
    rows += fused
    example = data.test.images[:1]
    single = model_cost(parents[0], example)
    costs = {label: model_cost(model, example) for label, model in models.items()}
    costs.update(dict.fromkeys(SUMMARY, single))
    tuned = finetune_rows(
        {label: models[label] for label in FINETUNED if label in models},
        {r.method: r for r in rows},
        data,
        config,
        progress=progress,
        desc=f"{name} K={k}: fine-tune",
    )
    return {
        "k": k,
        "rows": [{**asdict(r), "macs": costs[r.method].macs} for r in rows],
        "finetuned": tuned,
    }


def accuracy_by_k(by_k: Sequence[dict], key: str = "rows") -> dict[str, dict[int, float]]:
    """method -> K -> accuracy, from the one-shot ``rows`` or the ``finetuned`` entries."""
    out: dict[str, dict[int, float]] = {}
    for entry in reversed(by_k):  # methods in the order of the largest K, which has them all
        for r in entry[key]:
            out.setdefault(r["method"], {})[entry["k"]] = r["accuracy"]
    return {method: dict(sorted(acc.items())) for method, acc in out.items()}


def targets(by_k: Sequence[dict]) -> list[Target]:
    """With the data recipe, K = 4 keeps accuracy within 2 points of K = 2 (when both were run)."""
    acc = accuracy_by_k(by_k).get("recipe: data", {})
    if 2 not in acc or 4 not in acc:
        return []
    return [Target("data recipe: accuracy at K=4 minus at K=2 (points)", acc[4] - acc[2], -2.0)]


def run_arch(
    spec: ParentSpec, data: Data, config: TrainConfig, ks: Sequence[int], *, progress: bool
) -> dict:
    """Train max(ks) parents (cached), then fuse the first K of them for each K."""
    name = NAMES.get(spec.arch, spec.arch)
    parents, seconds = train_parents(spec, data, range(max(ks)), progress=progress)
    parent_rows = [
        evaluate_row(f"parent (seed {seed})", model, data.test, s)
        for seed, (model, s) in enumerate(zip(parents, seconds))
    ]
    by_k = [run_k(parents[:k], parent_rows, data, config, progress=progress, name=name) for k in ks]
    return {
        "arch": spec.arch,
        "name": name,
        "arch_kwargs": spec.arch_kwargs,
        "parent_training": {k: v for k, v in asdict(spec.config(0)).items() if k != "seed"},
        "parents": [asdict(r) for r in parent_rows],
        "by_k": by_k,
        "targets": [t.as_dict() for t in targets(by_k)],
    }


def overview_table(by_k: Sequence[dict]) -> str:
    """Accuracy of every method (rows) for every K (columns): one-shot, and fine-tuned."""
    one, tuned = accuracy_by_k(by_k), accuracy_by_k(by_k, "finetuned")
    k_values = [e["k"] for e in by_k]
    rows = [[m, *(acc.get(k) for k in k_values)] for m, acc in one.items()]
    rows += [[f"{m}, fine-tuned", *(acc.get(k) for k in k_values)] for m, acc in tuned.items()]
    return table(["test acc (%)", *(f"K={k}" for k in k_values)], rows)


def k_table(entry: dict) -> str:
    """Rows of one K with their cost (MACs per example) and accuracy after fine-tuning."""
    fields = Row.__dataclass_fields__
    rows = [Row(**{f: v for f, v in r.items() if f in fields}) for r in entry["rows"]]
    tuned = {e["method"]: e["accuracy"] for e in entry["finetuned"]}
    return markdown_table(
        rows,
        extra={
            "MACs / example": [f"{r['macs']:,}" for r in entry["rows"]],
            "fine-tuned acc (%)": [
                f"{tuned[r.method]:.2f}" if r.method in tuned else "-" for r in rows
            ],
        },
    )


def arch_section(result: dict, data: Data, config: TrainConfig) -> str:
    parents = ", ".join(f"{r['accuracy']:.2f}" for r in result["parents"])
    seeds = f"0..{len(result['parents']) - 1}"
    parts = [
        f"## {result['name']}",
        f"{describe_parents(result, data, seeds)} Parents' test accuracies (%): {parents}. "
        f"Fine-tuning: {finetune_note(data, config)}.",
        "### Accuracy against K",
        overview_table(result["by_k"]),
    ]
    for entry in result["by_k"]:
        parts += [
            f"### K = {entry['k']}",
            "Time: training (parents; 0 = loaded from cache) or fusion. MACs: multiply-accumulates "
            "of the Linear and Conv layers for one input (the ensemble runs all K models).",
            k_table(entry),
        ]
    parts += [
        "### Target (repair/refinement issue, one-shot)",
        target_lines(result) or "- not checked: needs K = 2 and K = 4",
    ]
    return "\n\n".join(parts)


def plot(path: Path, archs: Mapping[str, dict]) -> Path:
    panels = {}
    for result in archs.values():
        series = accuracy_by_k(result["by_k"])
        tuned = accuracy_by_k(result["by_k"], "finetuned")
        series.update({f"{m}, fine-tuned": acc for m, acc in tuned.items()})
        panels[result["name"]] = series
    return line_chart(
        path,
        panels,
        xlabel="number of models K",
        ylabel="test accuracy (%)",
        title="Fusing K models on Fashion-MNIST",
    )


def run(
    *,
    quick: bool = False,
    out: str | Path = "runs/many-models",
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Run the experiment, print its tables, write ``out/report.md``, ``results.json`` and
    ``accuracy_vs_k.png``; return the results."""
    out, plan, k_values = Path(out), budget(quick), ks(quick)
    data = load_data(plan, data_dir)
    info = run_info("otfuse experiment many-models" + (" --quick" if quick else ""))
    what = (
        f"K = {', '.join(map(str, k_values))} models trained from different seeds on Fashion-MNIST, "
        "fused one-shot by every method, then fine-tuned, with the inference cost of each "
        "(Tables 2-3 of Singh & Jaggi, 2020)."
    )
    sections, archs = [header(what, quick, info)], {}
    for arch in ARCHS:
        spec = parent_specs(quick)[arch]
        arch_ks = k_values if quick else FULL_KS_BY_ARCH.get(arch, k_values)
        archs[arch] = run_arch(spec, data, plan.finetune, arch_ks, progress=progress)
        section = arch_section(archs[arch], data, plan.finetune)
        print("\n" + section + "\n", flush=True)
        sections.append(section)
    files = {
        "report": out / "report.md",
        "results": out / "results.json",
        "plot": out / "accuracy_vs_k.png",
    }
    sections.append(f"![accuracy against K]({files['plot'].name})")
    results = {
        "experiment": "many-models",
        "quick": quick,
        "run": info,
        "ks": list(k_values),
        "settings": data_settings(data, plan),
        "archs": archs,
        "files": {k: str(v) for k, v in files.items()},
    }
    plot(files["plot"], archs)
    write_results(files["results"], results)
    write_report(files["report"], "many-models: fusing K models", sections)
    print(f"wrote {', '.join(str(p) for p in files.values())}")
    return results
