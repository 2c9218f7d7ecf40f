"""Optimal-transport plans between the units of two models.

Given masses :math:`\\mu` (n_b,) and :math:`\\nu` (n_a,) and a cost :math:`C` (n_b, n_a), a plan is

.. math::

    T^\\star = \\arg\\min_{T \\ge 0,\\ T\\mathbf 1 = \\mu,\\ T^\\top \\mathbf 1 = \\nu} \\langle T, C\\rangle
    \\;(- \\varepsilon H(T) \\text{ for Sinkhorn}).

Solvers: ``exact`` (network simplex, POT's ``ot.emd``), ``sinkhorn`` (log-domain entropic OT, POT),
``assignment`` (a linear assignment solver: the exact plan when n_a == n_b with uniform masses, which
is then a permutation scaled by 1/n), ``auto`` (assignment when it applies, else exact).
A plan restricted to ``groups`` blocks is block-diagonal: units never leave their group.

The assignment is solved by the Jonker-Volgenant solvers of the ``lap`` module (from the ``lapx``
package; 2.5-3.5x faster than ``scipy.optimize.linear_sum_assignment`` on the costs of fusion, and
they release Python's lock, so that solves on :func:`solver_pool` overlap the caller's work), or by
SciPy's when ``lap`` cannot be imported; :data:`ASSIGNMENT_BACKEND` says which. ``lap`` solves
the cost less its row minima and then its column minima (:func:`_reduced`: the same optimum, reached
about twice as fast on the costs of fusion), in the cost's own precision: the float32 costs of
:func:`otfuse.cost.ground_cost` of width >= :data:`FLOAT32_KERNEL_FROM` in float32, others in
float64. ``lap.lapjvr`` (Rust; float64 potentials and distances) solves them all but the float32
costs of :data:`LAPJVS_FROM` units or more, which go to ``lap.lapjvs``'s float32 kernel. On the
costs of fusion (one thread) ``lapjvr`` solved six VGG11's 40 spaces of 64-512 units in 89 ms
against 195 ms for float64 ``lapjv``, float32 MLP costs of 1024 / 2048 / 3072 units in 0.6 / 0.74
/ 0.68 of ``lapjvs``'s time, and of 4096 units in 1.08 of it, each time to the same assignment.
The float64 solves return an optimal assignment; the float32 ones one that is optimal up to
float32 rounding (assignments whose costs differ by less than a few float32 ulps of the costs may
swap; the costs themselves are float32 products with that rounding). On every cost of fusion
compared (MLP, GPT-2 and random-feature costs of width 1024-4096) they returned the float64
optimum itself. When several are optimal (tied costs) the solvers may pick different ones.
A permutation plan stores the permutation only; its dense matrix is built on first access.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment

from otfuse.errors import OtfuseError, TransportError
from otfuse.threads import lasting_pool

try:  # the faster exact assignment solvers; SciPy's when they are missing
    from lap import lapjvr as _lapjvr
    from lap import lapjvs as _lapjvs
except ImportError:  # pragma: no cover - lap is a dependency; a platform without a wheel falls back
    _lapjvr = _lapjvs = None

SolverName = Literal["auto", "exact", "sinkhorn", "assignment"]
SOLVERS: tuple[str, ...] = ("auto", "exact", "sinkhorn", "assignment")
ASSIGNMENT_BACKEND: str = "lap" if _lapjvr is not None else "scipy"
#: float32 costs of this width and more are solved in float32; smaller ones take milliseconds
FLOAT32_KERNEL_FROM = 1024
#: float32 costs of this width and more go to ``lapjvs`` rather than ``lapjvr`` (see the module)
LAPJVS_FROM = 4096


class TransportPlan:
    """A transport plan from the units of model B to those of anchor A.

    Attributes:
        matrix: the plan T, shape (n_b, n_a), entries summing to 1 (built on first access for a
            permutation plan, which stores ``permutation`` only).
        cost: the ground cost C it was solved on, shape (n_b, n_a).
        solver: which solver produced it.
        permutation: when T is a scaled permutation, ``permutation[j]`` is the unit of B sent to unit j
            of A; else None.
    """

    def __init__(
        self,
        matrix: np.ndarray | None,
        cost: np.ndarray,
        solver: str,
        permutation: np.ndarray | None = None,
    ) -> None:
        if matrix is None and permutation is None:
            raise ValueError("a transport plan needs its matrix or its permutation")
        self._matrix = matrix
        self.cost = cost
        self.solver = solver
        self.permutation = permutation
        self._corrected: np.ndarray | None = None

    def __repr__(self) -> str:
        kind = "permutation" if self.permutation is not None else "plan"
        return f"TransportPlan({kind}, shape={self.shape}, solver={self.solver!r})"

    @property
    def matrix(self) -> np.ndarray:
        if self._matrix is None:
            self._matrix = _permutation_matrix(self.permutation)
        return self._matrix

    @property
    def value(self) -> float:
        """Transport cost :math:`\\langle T, C\\rangle`."""
        if self._matrix is None:  # a permutation: the mean of the chosen costs
            n = len(self.permutation)
            chosen = self.cost[self.permutation, np.arange(n)]
            return float(chosen.sum(dtype=np.float64) / n)
        return float((self._matrix * self.cost).sum())

    @property
    def corrected(self) -> np.ndarray:
        """:math:`\\hat T = T\\,\\mathrm{diag}(1/\\nu)`, shape (n_b, n_a): every column sums to 1, so each
        unit of A receives a convex combination of B's units."""
        if self._corrected is None:
            matrix = self.matrix
            col = matrix.sum(0, keepdims=True)
            self._corrected = matrix / np.maximum(col, 1e-300)
        return self._corrected

    @property
    def split(self) -> np.ndarray:
        """:math:`\\mathrm{diag}(1/\\mu)\\,T`, shape (n_b, n_a): every row sums to 1, so each unit of B
        splits its outgoing weights over the units of A it is sent to."""
        matrix = self.matrix
        return matrix / np.maximum(matrix.sum(1, keepdims=True), 1e-300)

    @property
    def shape(self) -> tuple[int, int]:
        if self._matrix is None:
            return (len(self.permutation), len(self.permutation))
        return self._matrix.shape


def solver_pool() -> ThreadPoolExecutor:
    """Threads that solve large OT problems while the caller forms the next costs (the solvers run
    in compiled code without Python's lock): one per core but the caller's, at least one, at most
    four; made on first use (:func:`otfuse.threads.lasting_pool`)."""
    return lasting_pool("solve", max(1, min(4, (os.cpu_count() or 1) - 1)))


def solve(
    cost: np.ndarray,
    mu: np.ndarray,
    nu: np.ndarray,
    *,
    solver: SolverName = "auto",
    reg: float = 0.01,
    groups: int = 1,
) -> TransportPlan:
    """Solve the OT problem between masses ``mu`` (n_b,) and ``nu`` (n_a,) with cost (n_b, n_a).

    ``reg`` is Sinkhorn's entropic regularisation relative to the largest cost. ``groups`` > 1 solves
    one problem per diagonal block (each block's masses renormalised to 1/groups).
    """
    if solver not in SOLVERS:
        raise OtfuseError(f"unknown solver '{solver}'; choose one of {', '.join(SOLVERS)}")
    if groups == 1:
        matrix, perm = _solve_block(cost, mu / mu.sum(), nu / nu.sum(), solver, reg)
        return TransportPlan(matrix, cost, solver, perm)
    nb, na = cost.shape[0] // groups, cost.shape[1] // groups
    blocks = []
    for g in range(groups):
        rows, cols = slice(g * nb, (g + 1) * nb), slice(g * na, (g + 1) * na)
        block, perm = _solve_block(
            cost[rows, cols], _normed(mu[rows]), _normed(nu[cols]), solver, reg
        )
        blocks.append((rows, cols, block, perm))
    if all(block is None for *_, block, _ in blocks):  # permutations only: no dense matrix
        perm = np.concatenate([perm + g * nb for g, (*_, perm) in enumerate(blocks)])
        return TransportPlan(None, cost, solver, perm)
    matrix = np.zeros(cost.shape)
    for rows, cols, block, perm in blocks:
        matrix[rows, cols] = (_permutation_matrix(perm) if block is None else block) / groups
    perms = [None if perm is None else perm + g * nb for g, (*_, perm) in enumerate(blocks)]
    perm = None if any(p is None for p in perms) else np.concatenate(perms)
    return TransportPlan(matrix, cost, solver, perm)


def _normed(x: np.ndarray) -> np.ndarray:
    return x / x.sum()


def _is_uniform(x: np.ndarray) -> bool:
    # |x - 1/n| <= 1e-9 / n for every entry (np.allclose with rtol=1e-9, atol=0, without its overhead)
    n = len(x)
    return bool(n == 0 or np.abs(x - 1.0 / n).max() <= 1e-9 / n)


def _solve_block(
    cost: np.ndarray, mu: np.ndarray, nu: np.ndarray, solver: str, reg: float
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The block's plan and, when it is a scaled permutation, the permutation; an assignment
    returns no matrix (None), only its permutation."""
    nb, na = cost.shape
    hard_applies = nb == na and _is_uniform(mu) and _is_uniform(nu)
    if solver == "assignment" and not hard_applies:
        raise OtfuseError(
            "solver 'assignment' needs equal widths and uniform marginals; use 'exact' or 'sinkhorn'"
        )
    if solver == "assignment" or (solver == "auto" and hard_applies):
        return None, assignment(cost)
    if solver == "sinkhorn":
        return _sinkhorn(cost, mu, nu, reg), None
    return _exact(cost, mu, nu)


def assignment(cost: np.ndarray) -> np.ndarray:
    """The optimal assignment of a square cost (n, n) as ``perm`` (n,): ``perm[j]`` is the row
    assigned to column j, minimising ``cost[perm, arange(n)].sum()``.

    Solved by ``lap``'s Jonker-Volgenant solvers when they are installed, on the reduced cost
    (:func:`_reduced`): a float32 cost of width >= :data:`FLOAT32_KERNEL_FROM` in float32 (optimal
    up to float32 rounding), any other in float64; by ``lapjvs`` from :data:`LAPJVS_FROM` units
    in float32, else by ``lapjvr``. Without ``lap``, by SciPy's ``linear_sum_assignment``. Costs
    with NaN or infinite entries always go to SciPy, which reports them.
    """
    n = cost.shape[0]
    if _lapjvr is not None and n > 1 and np.isfinite(cost.sum(dtype=np.float64)):
        in_float32 = cost.dtype == np.float32 and n >= FLOAT32_KERNEL_FROM
        reduced = _reduced(cost if in_float32 else cost.astype(np.float64, copy=False))
        if in_float32 and n >= LAPJVS_FROM:
            _, rows_of_cols = _lapjvs(reduced, jvx_like=False, return_cost=False)
            return rows_of_cols.astype(np.int64)
        rows, cols = _lapjvr(reduced, return_cost=False)
    else:
        rows, cols = linear_sum_assignment(cost)
    perm = np.empty(n, dtype=np.int64)
    perm[cols] = rows
    return perm


def _reduced(cost: np.ndarray) -> np.ndarray:
    """:math:`C_{ij} - \\min_k C_{ik} - \\min_l (C_{lj} - \\min_k C_{lk})`, a new (n, n) array.

    Subtracting a constant from a row or a column changes every assignment's cost by the same
    amount, so the optimum is the same (up to the rounding of the subtractions in the cost's
    precision). Jonker-Volgenant reaches it 35-60% faster from the reduced cost on the costs of
    fusion (Euclidean distances of high-dimensional features, where a few units are near many and
    some far from all: VGG11's 512-unit spaces 2x, 3072-4096-unit MLP spaces 1.6x), and at about
    the same speed on others.
    """
    reduced = cost - cost.min(axis=1, keepdims=True)
    reduced -= reduced.min(axis=0, keepdims=True)
    return np.ascontiguousarray(reduced)


def _permutation_matrix(perm: np.ndarray) -> np.ndarray:
    n = len(perm)
    matrix = np.zeros((n, n))
    matrix[perm, np.arange(n)] = 1.0 / n
    return matrix


def _exact(
    cost: np.ndarray, mu: np.ndarray, nu: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """Network simplex with an iteration budget that grows with the problem; no convergence is an error."""
    import ot  # POT imports SciPy's statistics; load it only when a plan needs it

    nb, na = cost.shape
    budget = max(100_000, 50 * (nb + na) ** 2)
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    matrix, log = ot.emd(mu, nu, cost, numItermax=budget, log=True)
    if log.get("result_code") != 1:
        raise TransportError(
            f"exact OT on a {nb}x{na} problem did not reach an optimum ({log.get('warning')}); "
            "try solver='sinkhorn'"
        )
    return matrix, _as_permutation(matrix)


def _sinkhorn(cost: np.ndarray, mu: np.ndarray, nu: np.ndarray, reg: float) -> np.ndarray:
    """Log-domain Sinkhorn on the cost scaled to [0, 1]; a plan off its marginals is an error."""
    import ot

    cost = cost.astype(np.float64, copy=False)
    scale = cost.max() if cost.max() > 0 else 1.0
    matrix = ot.sinkhorn(
        mu, nu, cost / scale, reg, method="sinkhorn_log", numItermax=5000, stopThr=1e-9, warn=False
    )
    err = np.abs(matrix.sum(1) - mu).sum() + np.abs(matrix.sum(0) - nu).sum()
    if not np.isfinite(matrix).all() or err > 1e-3:
        raise TransportError(
            f"Sinkhorn with reg={reg} did not converge (marginal error {err:.2g}); raise reg or use "
            "solver='exact'"
        )
    return matrix


def _as_permutation(matrix: np.ndarray) -> np.ndarray | None:
    """``perm`` with matrix[perm[j], j] the only non-zero of column j, if T is a scaled permutation."""
    nb, na = matrix.shape
    if nb != na:
        return None
    nonzero = matrix > 1e-12
    if not (nonzero.sum(0) == 1).all() or not (nonzero.sum(1) == 1).all():
        return None
    return nonzero.argmax(0)
