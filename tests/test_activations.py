"""Activations collected at several points in one run."""

import torch
from models import build, example

from otfuse.discovery import discover


def test_activations_at_several_points_come_from_one_run_and_match_one_point_runs():
    from otfuse.activations import collect_activations, collect_activations_at

    model, x = build("resnet"), example("resnet", n=16, seed=2)
    graph = discover(model, x[:2])
    both = collect_activations_at(graph, x, ("pre", "post"), max_columns=100, seed=3)
    for point in ("pre", "post"):
        alone = collect_activations(graph, x, point=point, max_columns=100, seed=3)
        assert both[point].keys() == alone.keys()
        for index, rows in alone.items():
            torch.testing.assert_close(both[point][index], rows)
