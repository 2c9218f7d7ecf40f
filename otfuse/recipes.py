"""Named sets of fusion options ("recipes") and how :func:`otfuse.fuse` resolves its defaults.

* ``paper-wts`` / ``paper-acts``: Singh & Jaggi's one-shot OT fusion, data-free or from activations.
* ``data-free``: the best recipe measured here without data (see the README's recipe table): 256
  inputs synthesised from the parents (their BatchNorm statistics, or the classes they recognise),
  then the ``data`` recipe on them; for models where neither applies, weight-matching refinement
  (and alignment to the average for K > 2).
* ``data``: the best recipe measured here given a few hundred unlabeled inputs: the alignment
  (weights, correlation of pre-activations, or post-activations) whose fused model is closest to the
  parents' prediction ensemble on those inputs (no labels needed), then statistics repair and a
  layer-wise least-squares refit to the aligned parents' average outputs (``repair="refit"``).

``fuse`` uses ``data`` when it is given inputs and ``data-free`` otherwise; any option passed
explicitly overrides the recipe's value.
"""

from __future__ import annotations

from typing import Any

from otfuse.errors import OtfuseError

BASE: dict[str, Any] = {
    "mode": "wts",  # wts (data-free) or acts
    "solver": "auto",  # auto, exact, sinkhorn, assignment
    "cost": "euclidean",  # euclidean, sqeuclidean, cosine, correlation
    "marginals": "uniform",  # uniform, l1, l2
    "reg": 0.01,  # Sinkhorn regularisation, relative to the largest cost
    "activations": "pre",  # pre or post (acts mode)
    "num_samples": 200,  # size of the activation / repair sample
    "seed": 0,  # seed of that sample
    "outgoing": "average",  # outgoing weights of merged units: average (paper) or sum (keeps scale)
    "repair": "none",  # none, bn, repair, refit
    "refine": False,  # weight-matching refinement of every plan
    "to_average": False,  # K > 2: align to the running average
    "max_sweeps": 10,  # refinement sweeps / averaging rounds at most
    "select": None,  # candidate alignments to choose from with data (recipes only)
    "synthesize": 0,  # without data: inputs synthesised from the models (BatchNorm stats, classes)
}

RECIPES: dict[str, dict[str, Any]] = {
    "paper-wts": {},
    "paper-acts": {"mode": "acts"},
    "data-free": {"refine": True, "to_average": True, "synthesize": 256},
    "data": {
        "mode": "acts",
        "cost": "correlation",
        "repair": "refit",
        "num_samples": 400,
        # fuse once per candidate, keep the one closest to the parents' ensemble on the sample
        "select": (
            {"mode": "wts", "cost": "euclidean"},
            {"mode": "acts", "cost": "correlation", "activations": "pre"},
            {"mode": "acts", "cost": "euclidean", "activations": "post"},
        ),
    },
}


def recipe_names() -> list[str]:
    return list(RECIPES)


def resolve(recipe: str | None, has_data: bool, **overrides: Any) -> dict[str, Any]:
    """The full option set: ``BASE``, then the recipe, then every override that is not None."""
    if recipe is None:
        recipe = "data" if has_data else "data-free"
    if recipe not in RECIPES:
        raise OtfuseError(f"unknown recipe '{recipe}'; choose one of {', '.join(RECIPES)}")
    unknown = set(overrides) - set(BASE) | ({"select"} & set(overrides))
    if unknown:
        raise OtfuseError(f"unknown fusion option(s): {', '.join(sorted(unknown))}")
    settings = {**BASE, **RECIPES[recipe], "recipe": recipe}
    given = {k: v for k, v in overrides.items() if v is not None}
    settings.update(given)
    count = settings["synthesize"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise OtfuseError(f"synthesize must be a number of inputs (0 or more), got {count!r}")
    if settings["select"] and set(given) & {k for c in settings["select"] for k in c}:
        settings["select"] = None  # the caller chose the alignment
    return settings
