"""One run of each parent records what the stages read: the same values as their own runs."""

import pytest
import torch
from models import FIXTURES, build, example

from otfuse.activations import collect_activations_at, unit_rows
from otfuse.capture import GraphCache
from otfuse.observation import Wanted, observe
from otfuse.refit import fit_points, layer_targets
from otfuse.repair import correction_points, point_statistics


@pytest.mark.parametrize("name", list(FIXTURES))
def test_the_record_equals_the_stages_own_runs(name):
    x = example(name, n=96, seed=3)
    models = [build(name, seed=s) for s in range(2)]
    cache = GraphCache(x[:2])
    graphs = [cache.graph(m) for m in models]
    points = correction_points(graphs[0])
    fits = fit_points(graphs[0].graph_module)
    wanted = Wanted(("pre", "post"), tuple(points), tuple(fits), outputs=True, seed=5)
    records, chosen = observe(graphs, x, wanted)
    goal = layer_targets(graphs[0].graph_module, graphs, [1.0, 0.0], x, seed=5)
    for graph, model, record in zip(graphs, models, records):
        acts = collect_activations_at(graph, x, ("pre", "post"), seed=5)
        for p in ("pre", "post"):
            assert record.activations[p].keys() == acts[p].keys()
            for index, value in acts[p].items():
                torch.testing.assert_close(record.activations[p][index], value)
        stats = point_statistics(graph, points, x)
        for node, (mean, std) in stats.items():
            torch.testing.assert_close(record.statistics[node][0], mean)
            torch.testing.assert_close(record.statistics[node][1], std)
        with torch.no_grad():
            torch.testing.assert_close(record.output, model(x))
    for fit in fits:  # the first parent's rows, drawn as refit draws them
        assert torch.equal(chosen.rows[fit.node], goal.rows[fit.node])
        assert torch.equal(chosen.samples[fit.node], goal.samples[fit.node])
        torch.testing.assert_close(records[0].rows[fit.node], goal.values[fit.node])


def test_activation_columns_are_gathered_as_the_moved_rows_would_be():
    value = torch.randn(7, 5, 6, 4)
    for axis in range(1, 4):
        moved = value.movedim(axis, 0).reshape(value.shape[axis], -1)
        gen = torch.Generator().manual_seed(2)
        keep = torch.randperm(moved.shape[1], generator=gen)[:50].sort().values
        assert torch.equal(unit_rows(value, axis, max_columns=50, seed=2), moved[:, keep])
        assert torch.equal(unit_rows(value, axis, max_columns=10_000), moved)


class InPlaceMLP(torch.nn.Module):
    """Linear -> [an aliasing module] -> ReLU(inplace=True) -> Linear: the first layer's output is
    changed in place, directly or through ``nn.Identity`` / eval-mode ``nn.Dropout`` (which return
    their input)."""

    def __init__(self, alias: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(6, 12), torch.nn.Linear(12, 3)
        self.alias = alias if alias is not None else torch.nn.Sequential()
        self.act = torch.nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.alias(self.fc1(x))))


@pytest.mark.parametrize("alias", [None, torch.nn.Identity(), torch.nn.Dropout(0.5)])
def test_pre_activations_are_recorded_before_an_in_place_relu_changes_them(alias):
    torch.manual_seed(0)
    models, x = [InPlaceMLP(alias).eval() for _ in range(2)], torch.randn(40, 6)
    cache = GraphCache(x[:2])
    graphs = [cache.graph(m) for m in models]
    records, _ = observe(graphs, x, Wanted(("pre",)))
    by_run = collect_activations_at(graphs[0], x, ("pre",), batch_size=16)["pre"]
    with torch.no_grad():
        pre = models[0].fc1(x).T
    assert (pre < 0).any()
    for acts in (records[0].activations["pre"], by_run):
        (rows,) = [a for a in acts.values() if a.shape[0] == 12]
        torch.testing.assert_close(rows, pre)
