"""OT solvers: plans, permutations, groups and clear errors when a solver cannot deliver."""

import numpy as np
import ot
import pytest
import torch

import otfuse
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
