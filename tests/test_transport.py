"""OT solvers: plans, permutations, groups and clear errors when a solver cannot deliver."""

import numpy as np
import ot
import pytest
import torch
from models import build, example

import otfuse
from otfuse import transport
from otfuse.cost import ground_cost
from otfuse.errors import TransportError
from otfuse.transport import solve


def random_problem(nb=6, na=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((nb, na)), np.full(nb, 1 / nb), np.full(na, 1 / na)


@pytest.mark.parametrize("solver", ["auto", "exact", "assignment"])
def test_equal_widths_give_the_optimal_permutation(solver):
    cost, mu, nu = random_problem()
    plan = solve(cost, mu, nu, solver=solver)
    assert plan.permutation is not None
    best = ot.emd2(mu, nu, cost)
    assert plan.value == pytest.approx(best)
    np.testing.assert_allclose(plan.corrected[plan.permutation, np.arange(6)], 1.0)


def test_groups_keep_units_in_their_group():
    cost, mu, nu = random_problem(8, 8)
    plan = solve(cost, mu, nu, groups=2)
    assert (plan.matrix[:4, 4:] == 0).all() and (plan.matrix[4:, :4] == 0).all()
    assert plan.matrix.sum() == pytest.approx(1.0)


def test_exact_ot_that_does_not_converge_is_an_error(monkeypatch):
    def stuck(a, b, M, numItermax, log):
        return np.zeros_like(M), {"result_code": 3, "warning": "numItermax reached"}

    monkeypatch.setattr(ot, "emd", stuck)
    cost, mu, nu = random_problem(5, 4)
    with pytest.raises(TransportError, match="did not reach an optimum"):
        solve(cost, mu, nu, solver="exact")


def test_sinkhorn_that_does_not_converge_is_an_error():
    cost, mu, nu = random_problem(30, 20, seed=3)
    with pytest.raises(TransportError, match="did not converge"):
        solve(cost * 1e4, mu, nu, solver="sinkhorn", reg=1e-9)


def test_untraceable_model_through_fuse_is_a_clear_error():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.mean() > 0 else -self.fc(x)

    with pytest.raises(otfuse.OtfuseError, match="cannot trace Branchy"):
        otfuse.fuse([Branchy(), Branchy()], example_input=torch.zeros(2, 4))


# -- the assignment solver and permutation plans ---------------------------------------------------
def _scipy_permutation(cost):
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(cost), dtype=np.int64)
    perm[cols] = rows
    return perm


@pytest.mark.parametrize("n", [1, 2, 7, 64, 301])
def test_assignment_is_scipys_optimum(n):
    cost = np.random.default_rng(n).random((n, n))
    perm = transport.assignment(cost)
    assert perm.dtype == np.int64 and sorted(perm) == list(range(n))
    np.testing.assert_array_equal(perm, _scipy_permutation(cost))  # a unique optimum


@pytest.mark.parametrize(
    "cost",
    [
        np.zeros((40, 40)),
        np.random.default_rng(0).integers(0, 3, (120, 120)).astype(float),
        np.repeat(np.random.default_rng(1).random((30, 60)), 2, axis=0),  # duplicated units
        np.random.default_rng(2).uniform(0, 1e-10, (80, 80)),
    ],
    ids=["zeros", "integers", "duplicates", "tiny"],
)
@pytest.mark.parametrize(
    "precision, kernel", [("float64", None), ("float32", 2), ("float32", 10**9)]
)  # float32 costs go to lapjvs from LAPJVS_FROM units (here 2), else to lapjvr
def test_assignment_with_ties_is_optimal(cost, precision, kernel, monkeypatch):
    if precision == "float32":
        monkeypatch.setattr(transport, "FLOAT32_KERNEL_FROM", 2)
        monkeypatch.setattr(transport, "LAPJVS_FROM", kernel)
        cost = cost.astype(np.float32).astype(np.float64)  # the values the float32 kernel sees
        perm = transport.assignment(cost.astype(np.float32))
    else:
        perm = transport.assignment(cost)
    best = _scipy_permutation(cost)
    n = len(cost)
    assert sorted(perm) == list(range(n))
    assert cost[perm, np.arange(n)].sum() == pytest.approx(
        cost[best, np.arange(n)].sum(), rel=1e-12
    )


@pytest.mark.parametrize("n", [64, 301, 1024])
def test_large_float32_costs_are_solved_in_float32_to_the_float64_optimum(n, monkeypatch):
    # optimal up to float32 rounding in general; on these random-feature costs, the optimum itself
    calls = []
    kernel = transport._lapjvs
    monkeypatch.setattr(transport, "_lapjvs", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    monkeypatch.setattr(transport, "FLOAT32_KERNEL_FROM", min(n, transport.FLOAT32_KERNEL_FROM))
    monkeypatch.setattr(transport, "LAPJVS_FROM", min(n, transport.LAPJVS_FROM))
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, 32, generator=g), torch.randn(n, 32, generator=g)
    cost = ground_cost(x, y, "euclidean")  # float32, with the near-ties of random features
    perm = transport.assignment(cost)
    assert calls == [1]
    assert sorted(perm) == list(range(n))
    np.testing.assert_array_equal(perm, _scipy_permutation(cost.astype(np.float64)))
    assert transport.assignment(cost.astype(np.float64)).tolist() == perm.tolist()  # float64 kernel
    assert calls == [1]


@pytest.mark.parametrize("n", [64, 301])
def test_float32_costs_below_the_lapjvs_width_are_solved_by_lapjvr(n, monkeypatch):
    calls = []
    kernel = transport._lapjvr
    monkeypatch.setattr(transport, "_lapjvr", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    monkeypatch.setattr(transport, "FLOAT32_KERNEL_FROM", 2)  # reduced in float32, as if wide
    g = torch.Generator().manual_seed(n + 1)
    x, y = torch.randn(n, 32, generator=g), torch.randn(n, 32, generator=g)
    cost = ground_cost(x, y, "euclidean")
    perm = transport.assignment(cost)
    assert calls == [1]
    np.testing.assert_array_equal(perm, _scipy_permutation(cost.astype(np.float64)))


def test_a_float32_cost_plan_reports_its_value_in_float64():
    cost = np.random.default_rng(7).random((50, 50)).astype(np.float32)
    plan = solve(cost, np.full(50, 0.02), np.full(50, 0.02), solver="assignment")
    assert plan.value == pytest.approx(cost[plan.permutation, np.arange(50)].astype(float).mean())
    exact = solve(cost, np.full(50, 0.02), np.full(50, 0.02), solver="exact")
    assert exact.matrix.dtype == np.float64 and exact.value == pytest.approx(plan.value, rel=1e-7)
    grouped = solve(cost, np.full(50, 0.02), np.full(50, 0.02), solver="sinkhorn", groups=2)
    assert grouped.matrix.dtype == np.float64


def test_assignment_without_lap_uses_scipy(monkeypatch):
    cost = np.random.default_rng(3).random((50, 50))
    monkeypatch.setattr(transport, "_lapjvr", None)
    np.testing.assert_array_equal(transport.assignment(cost), _scipy_permutation(cost))


def test_assignment_of_a_cost_with_nan_is_an_error():
    cost = np.random.default_rng(4).random((10, 10))
    cost[3, 4] = np.nan
    with pytest.raises(ValueError):
        transport.assignment(cost)


def test_permutation_plan_builds_its_matrix_on_demand():
    cost, mu, nu = random_problem(9, 9, seed=5)
    plan = solve(cost, mu, nu, solver="assignment")
    perm = plan.permutation
    value = plan.value  # from the permutation, before any matrix exists
    dense = np.zeros((9, 9))
    dense[perm, np.arange(9)] = 1 / 9
    np.testing.assert_array_equal(plan.matrix, dense)
    assert plan.shape == (9, 9) and value == pytest.approx((dense * cost).sum(), rel=1e-14)
    np.testing.assert_allclose(plan.corrected, dense * 9)
    np.testing.assert_allclose(plan.split, dense * 9)
    assert value == pytest.approx(ot.emd2(mu, nu, cost))


def test_grouped_assignment_is_a_permutation_within_groups():
    cost, mu, nu = random_problem(12, 12, seed=6)
    plan = solve(cost, mu, nu, solver="assignment", groups=3)
    perm = plan.permutation
    assert sorted(perm) == list(range(12))
    assert all(perm[j] // 4 == j // 4 for j in range(12))
    assert plan.matrix.sum() == pytest.approx(1.0)
    assert (plan.matrix[:4, 4:] == 0).all()


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine", "correlation"])
def test_ground_cost_is_the_plain_expression_bit_for_bit(metric):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 50, generator=g), torch.randn(257, 50, generator=g)
    x[:4] = y[:4]  # zero distances
    if metric in ("cosine", "correlation"):
        xc, yc = x, y
        if metric == "correlation":
            xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
        xn = xc / xc.norm(dim=1, keepdim=True).clamp_min(1e-12)
        yn = yc / yc.norm(dim=1, keepdim=True).clamp_min(1e-12)
        expected = (1.0 - xn @ yn.T).clamp_min(0.0)
    else:
        xx, yy = (torch.linalg.vector_norm(t, dim=1).square() for t in (x, y))
        expected = (xx[:, None] + yy[None, :] - 2.0 * (x @ y.T)).clamp_min(0)
        expected = expected.sqrt() if metric == "euclidean" else expected
    cost = ground_cost(x, y, metric)
    assert cost.dtype == np.float32
    np.testing.assert_array_equal(cost, expected.numpy())


@pytest.mark.parametrize("name", ["vgg", "resnet", "depthwise"])
def test_fusion_is_the_same_with_either_assignment_backend(name, monkeypatch):
    models, x = [build(name, seed=s) for s in range(3)], example(name)
    fast = otfuse.fuse(models, "paper-wts", example_input=x)
    monkeypatch.setattr(transport, "_lapjvr", None)  # SciPy's solver
    slow = otfuse.fuse(models, "paper-wts", example_input=x)
    for key, value in fast.model.state_dict().items():
        assert torch.equal(value, slow.model.state_dict()[key]), key
    for plans_fast, plans_slow in zip(fast.plans, slow.plans):
        for space, plan in plans_fast.items():
            np.testing.assert_array_equal(plan.permutation, plans_slow[space].permutation)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine", "correlation"])
def test_features_given_as_column_blocks_cost_what_their_concatenation_costs(metric):
    from otfuse.cost import unit_masses

    g = torch.Generator().manual_seed(0)
    wide = torch.randn(40, 9, generator=g)  # a weight whose units are its columns: a strided view
    xb = [torch.randn(9, 5, generator=g), wide.T, torch.randn(9, 3, 2, generator=g).flatten(1)]
    yb = [torch.randn(7, 5, generator=g), torch.randn(40, 7, generator=g).T, torch.randn(7, 6)]
    joined_x, joined_y = torch.cat(xb, dim=1), torch.cat(yb, dim=1)
    np.testing.assert_allclose(
        ground_cost(xb, yb, metric), ground_cost(joined_x, joined_y, metric), rtol=1e-4, atol=1e-4
    )
    for kind in ("uniform", "l1", "l2"):
        np.testing.assert_allclose(unit_masses(xb, kind), unit_masses(joined_x, kind), rtol=1e-10)
