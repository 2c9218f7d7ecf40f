"""Layer-wise least-squares refit of a fused model to its aligned parents' average outputs.

REPAIR matches two numbers per unit (mean and spread). Refit matches the whole layer: going through
the fused model in graph order, each Linear / Conv layer's weight :math:`W` and bias :math:`b` are
re-solved so that, on the inputs :math:`X` (rows: samples x positions) that the *fused* model feeds
it, the layer reproduces the weighted average :math:`Z = \\sum_k w_k Z_k` of the aligned parents'
outputs of the same layer (which the alignment has put in the same unit order):

.. math::

    \\min_{W, b}\\; \\lVert X W^\\top + \\mathbf{1} b^\\top - Z \\rVert_F^2
        + \\lambda \\lVert W - W_0 \\rVert_F^2,
    \\qquad \\lambda = \\rho \\, \\operatorname{tr}(X_c^\\top X_c) / d,

a ridge regression towards the averaged weights :math:`W_0` (:math:`X_c`: centred inputs, ``d``
input features, ``rho`` the relative ridge). ``rho`` is chosen per layer among ``RIDGES`` by the
error on the rows of every fifth input, held out, and the chosen one is then fitted on all rows. It
is a closed-form solve per layer on unlabeled inputs, with no labels and no gradient steps; each
layer is fitted on the outputs of the layers already refitted, so errors do not accumulate. A layer
followed only by a BatchNorm (eval mode, an affine map per unit) is fitted to the parents'
*normalised* outputs through that map, and a shift that the layer cannot hold (no bias) goes to
the BatchNorm's bias. The architecture never changes.

Where the model ends in class scores (its output, of shape (N, C), or (N, ..., C) per position as
a language model's next-token logits, is a Linear layer's), the target of that layer can follow
the parents' *prediction ensemble* instead of their average logits (``targets="ensemble"``): the
log of the weighted average of their probabilities, shifted per row to the mean of the average
logits,

.. math::

    Z = \\log \\sum_k w_k \\operatorname{softmax}(Z_k) + c\\,\\mathbf{1}^\\top, \\qquad
    c = \\operatorname{mean}_j \\Big(\\sum_k w_k Z_k - \\log \\sum_k w_k \\operatorname{softmax}(Z_k)\\Big)_j,

whose softmax is exactly the ensemble's (a shift per row changes no probability) and which is the
logit average itself where the parents agree. A parent that never saw a class gives it very low
logits; the average of logits passes them on and erases what another parent knows about that class,
while the average of probabilities keeps it. REPAIR never touches the class scores (their units
are fixed), so this is the one target that changes.

``targets="confident"`` weighs each parent per input by its confidence as well: the mixture's
weights on input :math:`x` are

.. math::

    \\pi_k(x) \\propto w_k \\exp\\big(-\\beta\\, H(p_k(x))\\big), \\qquad
    H(p) = -\\sum_c p_c \\log p_c, \\qquad
    Z = \\log \\sum_k \\pi_k(x) \\operatorname{softmax}(Z_k) + c\\,\\mathbf{1}^\\top,

with :math:`\\beta` = ``CONFIDENCE_SHARPNESS``, so a parent that is unsure of an input (a class it
never saw) gives way to one that is sure, whatever the scalar weights. With parents of equal
confidence it is the prediction ensemble. The weights then say whose *predictions* to trust, and
the layers before the class scores keep every parent's features alike: their targets are the
equal average of the aligned parents with a positive weight,
:math:`Z = \\frac{1}{|\\{k: w_k > 0\\}|} \\sum_{k: w_k > 0} Z_k`, so that a model fused
mostly towards a specialist still holds the generalist's features for the mixture to draw on
(:func:`feature_weights`). With equal weights this is the weighted average as before.

``targets="coverage"`` is ``"confident"`` with each parent's probabilities moved to the pooled label
prior and each trusted only on the classes it was trained on, from ``class_counts``
(:mod:`otfuse.coverage`); the layers before the class scores are fitted as for ``"confident"``.

The idea of merging linear layers by regression on their inputs' statistics is RegMean (Jin et al.,
"Dataless Knowledge Fusion by Merging Weights of Language Models", 2023); here it follows the
alignment and is fitted sequentially on the fused model's own inputs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from otfuse.capture import run_with_hooks
from otfuse.coverage import mixture_of_parents
from otfuse.discovery import SpaceGraph, module_calls, parameter_owners, shares_parameters
from otfuse.modes import evaluating

_FITTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
TargetRule = Literal["average", "ensemble", "confident", "coverage"]
ClassCounts = Sequence[Sequence[float]]
# beta of targets="confident" (the module's docstring). Measured on the skill-transfer experiment's
# pairs (probability rules on the parents' test outputs): beta 0 (the ensemble) / 1 / 2 / 4 / 8.
# 4 is the smallest at which the rule beats both the ensemble and the logit average at every
# weight on both pairs; on i.i.d. pairs every beta is within 0.05 points of the ensemble.
CONFIDENCE_SHARPNESS = 4.0


def mixture_term(scores: torch.Tensor, weight: float, sharpness: float = 0.0) -> torch.Tensor:
    """One parent's term of the log mixture of probabilities, from its class scores (..., C):
    :math:`\\log w + \\log \\operatorname{softmax}(z)`, with ``sharpness`` :math:`\\beta > 0` plus
    :math:`-\\beta H(\\operatorname{softmax}(z))` per row (``targets="confident"``). The
    ``logaddexp`` of the terms is the log of the (unnormalised) mixture."""
    log_p = torch.log_softmax(scores, dim=-1)
    term = log_p + math.log(weight)
    if sharpness:  # times exp(-sharpness * entropy), per row
        p = log_p.exp()
        term = term + sharpness * torch.special.xlogy(p, p).sum(-1, keepdim=True)
    return term


def feature_weights(weights: Sequence[float], targets: TargetRule) -> list[float]:
    """The weights of the parents' rows in the targets of the layers before the class scores:
    ``weights`` itself, or with ``targets="confident"`` equal over the parents with a positive
    weight (the module's docstring). Measured on the skill-transfer experiment (coat pair, w_A
    0.7 / 0.8 / 0.9: 86.64 / 86.64 / 86.15% against 85.95 / 85.52 / 84.67% with the weighted
    average), and on a special class it was not chosen on (T-shirt, w_A 0.8 / 0.9: 86.83 /
    86.21% against 85.17 / 84.47%)."""
    if targets not in ("confident", "coverage"):
        return [float(w) for w in weights]
    used = sum(1 for w in weights if w > 0)
    return [1.0 / used if w > 0 else 0.0 for w in weights]


@dataclass(frozen=True)
class FitPoint:
    """A layer that refit re-solves, and the traced node whose output is its target.

    Attributes:
        node: name of the layer's traced node.
        module: qualified name of the layer.
        target: node whose output is matched (the layer itself, or the BatchNorm that follows it).
        norm: qualified name of that BatchNorm, or None.
        features: the layer's inputs per output unit d (in_features, or in_channels x kernel).
    """

    node: str
    module: str
    target: str
    norm: str | None
    features: int = 0


def fit_points(gm: torch.fx.GraphModule) -> list[FitPoint]:
    """Linear, Conv1d and Conv2d layers (ungrouped, zero padding, called once, parameters not shared)
    in graph order."""
    modules, calls = dict(gm.named_modules()), module_calls(gm)
    owners = parameter_owners(gm)
    points = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or calls[node.target] > 1:
            continue
        module = modules[node.target]
        if not _fittable(module) or shares_parameters(module, owners):
            continue
        norm = _following_batchnorm(node, modules, calls)
        target = next(iter(node.users)).name if norm else node.name
        features = module.weight[0].numel()
        points.append(FitPoint(node.name, node.target, target, norm, features))
    return points


def _fittable(module: nn.Module) -> bool:
    if not isinstance(module, _FITTABLE) or parametrize.is_parametrized(module):
        return False
    if not isinstance(module.weight, nn.Parameter):  # e.g. computed by weight_norm's hook
        return False
    if module.bias is not None and not isinstance(module.bias, nn.Parameter):
        return False
    if isinstance(module, nn.Linear):
        return True
    return (
        module.groups == 1
        and module.padding_mode == "zeros"
        and module.padding != "same"  # "valid" is no padding; "same" can pad unevenly
    )


def _following_batchnorm(node: torch.fx.Node, modules: dict, calls: dict) -> str | None:
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module" or calls[users[0].target] > 1:
        return None
    norm = modules[users[0].target]
    if isinstance(norm, _BatchNorm) and norm.track_running_stats and norm.affine:
        return users[0].target
    return None


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as regression rows (samples x positions, d): patches for a convolution.

    Row order matches :func:`output_rows` of the layer's output.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-1)
    kernel, dilation, stride, padding = _conv_geometry(module)
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def selected_rows(
    module: nn.Module, x: torch.Tensor, rows: torch.Tensor, *, budget: int = 1 << 25
) -> torch.Tensor:
    """``layer_rows(module, x)[rows]`` without unfolding the whole input: a convolution's chosen
    patches are gathered directly from the (padded) input, ``(rows, d)``.

    Row ``r`` of a convolution is output position ``l = r mod L`` of sample ``r div L`` (``L``
    positions per sample); its patch holds ``x_pad[n, c, oh s + kh t, ow s + kw t]`` for every
    channel ``c`` and kernel offset ``(kh, kw)`` (stride ``s``, dilation ``t``), in
    :func:`torch.nn.functional.unfold`'s order. The patches are a strided view (N, oh, ow, c, kh,
    kw) of the padded input, laid out channels-last so that each patch's channels are adjacent in
    memory; indexing it by (sample, oh, ow) copies the chosen rows only. ``budget`` bounds the
    gathered elements per chunk.
    """
    if isinstance(module, nn.Linear):
        return layer_rows(module, x)[rows]
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-1)
    kernel, dilation, stride, padding = _conv_geometry(module)
    span_h, span_w = (dilation[i] * (kernel[i] - 1) + 1 for i in range(2))
    patches = _padded_channels_last(x, padding).unfold(2, span_h, stride[0])
    patches = patches.unfold(3, span_w, stride[1])[..., :: dilation[0], :: dilation[1]]
    patches = patches.permute(0, 2, 3, 1, 4, 5)  # (N, out_h, out_w, channels, kh, kw)
    out_h, out_w = patches.shape[1], patches.shape[2]
    per_row = x.shape[1] * kernel[0] * kernel[1]
    chunk = max(1, budget // max(per_row, 1))
    parts = []
    for start in range(0, len(rows), chunk):
        r = rows[start : start + chunk].to(x.device)
        sample, position = r // (out_h * out_w), r % (out_h * out_w)
        picked = patches[sample, position // out_w, position % out_w]
        parts.append(picked.reshape(len(r), per_row))
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts) if parts else x.new_zeros(0, per_row)


def _padded_channels_last(x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """``x`` (N, C, H, W) zero-padded by ``padding`` (rows, columns) on both sides, in
    channels-last memory (x itself when it already is and needs no padding)."""
    pad_h, pad_w = padding
    if pad_h == pad_w == 0 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    n, c, h, w = x.shape
    padded = x.new_zeros(n, h + 2 * pad_h, w + 2 * pad_w, c).permute(0, 3, 1, 2)
    padded[:, :, pad_h : pad_h + h, pad_w : pad_w + w] = x
    return padded


def _conv_geometry(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """Kernel, dilation, stride and padding of a Conv1d / Conv2d as 2-D pairs (Conv1d's second
    dimension is a unit one)."""
    padding = (0,) * len(module.kernel_size) if module.padding == "valid" else module.padding
    if isinstance(module, nn.Conv1d):
        return (
            (module.kernel_size[0], 1),
            (module.dilation[0], 1),
            (module.stride[0], 1),
            (padding[0], 0),
        )
    return module.kernel_size, module.dilation, module.stride, tuple(padding)


def output_rows(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A layer's output (or its BatchNorm's) as rows (samples x positions, units)."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.movedim(1, -1).reshape(-1, y.shape[1])


RIDGES: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def product_dtype(rows: torch.Tensor) -> torch.dtype:
    """The dtype of the per-chunk products X^T X and X^T Z: the rows' own precision, at least
    float32. The rows are centred about their mean (rounded to this precision) first and the
    chunks' products are added up in float64, so float32 products lose little (and take a third
    of float64's time)."""
    return torch.promote_types(rows.dtype, torch.float32)


# Rows per regression: at most ROWS_PER_FEATURE times the layer's input features d (and at least
# MIN_ROWS), within ``max_rows``. None: ``max_rows`` alone.
ROWS_PER_FEATURE: int | None = 8
MIN_ROWS = 4096


def row_budget(features: int, max_rows: int) -> int:
    """How many rows enter a layer's regression with ``features`` inputs (see ROWS_PER_FEATURE)."""
    if ROWS_PER_FEATURE is None:
        return max_rows
    return min(max_rows, max(ROWS_PER_FEATURE * features, MIN_ROWS))


@dataclass
class Moments:
    """Sums over regression rows, in float64, taken about a fixed ``shift`` of the rows (their mean
    when an intercept is fitted, so that centring loses no precision; zeros otherwise): enough to
    solve a ridge regression of ``z`` on ``x``. ``a + b`` pools the rows of both (same shift).
    The first :meth:`solve` keeps the centred system for the next ridges: the sums are not to be
    changed after it (``+`` makes new moments)."""

    count: int
    shift_x: torch.Tensor  # (d,)
    shift_z: torch.Tensor  # (out,)
    sum_x: torch.Tensor  # (d,), sum of x - shift_x
    sum_z: torch.Tensor  # (out,)
    xx: torch.Tensor  # (d, d), (X - shift)^T (X - shift)
    xz: torch.Tensor  # (d, out)
    # per intercept: the system and right-hand side before the ridge, formed once for every ridge
    _systems: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def of(
        cls,
        x: torch.Tensor,
        z: torch.Tensor,
        shift: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        chunk: int = 4096,
        overwrite: bool = False,
    ) -> Moments:
        """The moments of rows ``x`` (rows, d) and ``z`` (rows, out), summed chunk by chunk (no
        float64 copy of all the rows).
        ``overwrite``: rows already in the products' precision are centred in place."""
        f64, dev, products = torch.float64, x.device, product_dtype(x)
        if shift is None:
            shift = (
                torch.zeros(x.shape[1], dtype=f64, device=dev),
                torch.zeros(z.shape[1], dtype=f64, device=dev),
            )
        # the shift is rounded to the products' precision, where the rows are centred: exactly
        # the shift the sums are taken about
        low_x, low_z = shift[0].to(products), shift[1].to(products)
        moments = cls(
            0,
            low_x.to(f64),
            low_z.to(f64),
            torch.zeros(x.shape[1], dtype=f64, device=dev),
            torch.zeros(z.shape[1], dtype=f64, device=dev),
            torch.zeros(x.shape[1], x.shape[1], dtype=f64, device=dev),
            torch.zeros(x.shape[1], z.shape[1], dtype=f64, device=dev),
        )
        for start in range(0, len(x), chunk):
            xc, zc = x[start : start + chunk], z[start : start + chunk]
            xp, zp = _centred(xc, low_x, overwrite), _centred(zc, low_z, overwrite)
            moments.count += len(xp)
            moments.sum_x += _column_sums(xp)
            moments.sum_z += _column_sums(zp)
            moments.xx += gram(xp).to(f64)
            moments.xz += (xp.T @ zp).to(f64)
        return moments

    def __add__(self, other: Moments) -> Moments:
        if not (
            torch.equal(self.shift_x, other.shift_x) and torch.equal(self.shift_z, other.shift_z)
        ):
            raise ValueError("moments about different shifts cannot be pooled")
        return Moments(
            self.count + other.count,
            self.shift_x,
            self.shift_z,
            self.sum_x + other.sum_x,
            self.sum_z + other.sum_z,
            self.xx + other.xx,
            self.xz + other.xz,
        )

    def _system(self, intercept: bool) -> tuple[torch.Tensor, ...]:
        """The Gram matrix and cross products (centred with ``intercept``) and the means of the
        shifted rows (None without intercept)."""
        if intercept not in self._systems:
            system, cross, m_x, m_z = self.xx, self.xz, None, None
            if intercept:  # centre: X_c^T X_c = S^T S - n m m^T, S = X - shift, m its mean
                m_x, m_z = self.sum_x / max(self.count, 1), self.sum_z / max(self.count, 1)
                system = system - self.count * torch.outer(m_x, m_x)
                cross = cross - self.count * torch.outer(m_x, m_z)
            elif self.shift_x.any() or self.shift_z.any():
                raise ValueError("a fit without intercept needs moments about zero")
            self._systems[intercept] = (system, cross, m_x, m_z)
        return self._systems[intercept]

    def solve(
        self, w0: torch.Tensor, *, intercept: bool, ridge: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ridge solution towards ``w0`` (out, d): the weight (out, d) and, with ``intercept``,
        the bias (out,); :math:`\\lambda` = ``ridge`` times the mean diagonal of the (centred)
        Gram matrix. Without ``intercept`` the shift must be zero."""
        unridged, cross, m_x, m_z = self._system(intercept)
        lam = ridge * unridged.diagonal().sum() / unridged.shape[0] + 1e-12
        system = unridged.clone()
        system.diagonal().add_(lam)
        weight = _solve_spd(system, cross + lam * w0.to(torch.float64).T).T
        if not intercept:
            return weight, None
        return weight, (self.shift_z + m_z) - weight @ (self.shift_x + m_x)


@dataclass
class Rows:
    """The regression rows themselves, in float64, for fits with far fewer rows than input
    features (a wide layer on few inputs; :func:`fewer_rows_than_features`): :meth:`solve` gives
    :meth:`Moments.solve`'s solution from the (rows, rows) kernel rather than the (d, d) Gram
    matrix. With :math:`X_c` (n, d) and
    :math:`Z_c` the centred rows and :math:`R = Z_c - X_c W_0^\\top` the residual of the averaged
    weights, the push-through identity

    .. math::

        (X_c^\\top X_c + \\lambda I)^{-1} X_c^\\top = X_c^\\top (X_c X_c^\\top + \\lambda I)^{-1}

    turns the normal equations into

    .. math::

        W^\\top = W_0^\\top + X_c^\\top (X_c X_c^\\top + \\lambda I)^{-1} R,

    an n x n solve (:math:`O(n^2 d)`) instead of a d x d one (:math:`O(d^3)`): for VGG11-BN x0.5
    on 32 synthesised inputs, layers of 2304 inputs fitted on 25-288 rows, 0.25 s -> a few ms
    per ridge. ``a + b`` pools the rows of both."""

    x: torch.Tensor  # (n, d)
    z: torch.Tensor  # (n, out)
    # per intercept: the centred rows, their means and the kernel, formed once for every ridge
    _systems: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, x: torch.Tensor, z: torch.Tensor) -> Rows:
        return cls(x.double(), z.double())

    def _system(self, intercept: bool) -> tuple[torch.Tensor, ...]:
        """The rows (centred with ``intercept``), their means (or None) and the kernel (n, n)."""
        if intercept not in self._systems:
            x, z, mean_x, mean_z = self.x, self.z, None, None
            if intercept:
                mean_x, mean_z = x.mean(0), z.mean(0)
                x, z = x - mean_x, z - mean_z
            self._systems[intercept] = (x, z, mean_x, mean_z, gram(x.T))
        return self._systems[intercept]

    def __add__(self, other: Rows) -> Rows:
        return Rows(torch.cat([self.x, other.x]), torch.cat([self.z, other.z]))

    def solve(
        self, w0: torch.Tensor, *, intercept: bool, ridge: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`Moments.solve`: the weight (out, d) and, with ``intercept``, the bias (out,);
        :math:`\\lambda` = ``ridge`` times the mean diagonal of the centred Gram matrix
        (:math:`\\lVert X_c \\rVert_F^2 / d`)."""
        x, z, mean_x, mean_z, kernel = self._system(intercept)
        lam = ridge * float(kernel.diagonal().sum()) / max(x.shape[1], 1) + 1e-12
        w0 = w0.to(torch.float64)
        system = kernel.clone()
        system.diagonal().add_(lam)
        weight = w0 + (x.T @ _solve_spd(system, z - x @ w0.T)).T
        if not intercept:
            return weight, None
        return weight, mean_z - weight @ mean_x


def fewer_rows_than_features(rows: int, features: int) -> bool:
    """Whether a fit on ``rows`` rows of ``features`` inputs is solved in row space
    (:class:`Rows`) rather than from the Gram matrix (:class:`Moments`, which also takes a fit
    on no rows: the start ``w0`` itself): below three rows in four features, where the (n, n)
    solves cost less than the (d, d) ones (near n = d the float64 kernel and the extra product
    per ridge make the row path about 1.5 times slower)."""
    return 0 < rows and 4 * rows < 3 * features


#: columns per block of :func:`gram` (about; at most GRAM_MAX_BLOCKS blocks)
GRAM_BLOCK_COLUMNS = 256
GRAM_MAX_BLOCKS = 8


def gram(rows: torch.Tensor) -> torch.Tensor:
    """:math:`X^\\top X` (d, d) of ``rows`` X (n, d), in X's dtype, from its upper block triangle.

    With X split into k column blocks :math:`X_1 .. X_k` (about GRAM_BLOCK_COLUMNS columns each),
    block row i is :math:`X_i^\\top [X_i .. X_k]` and the blocks below the diagonal are the
    transposes of those above: :math:`(k + 1) / 2k` of the products of ``X.T @ X`` (torch has no
    symmetric rank-k product), and the result is exactly symmetric (each diagonal block's upper
    triangle mirrored). On two threads: (9216, 1152) float32 rows 126 -> 91 ms, (32768, 4608)
    7.0 -> 4.1 s. Below 384 columns, or on fewer rows than GRAM_BLOCK_COLUMNS (where the copies
    would cost more than the products saved), it is ``X.T @ X`` itself."""
    n, d = rows.shape
    blocks = min(GRAM_MAX_BLOCKS, max(1, round(d / GRAM_BLOCK_COLUMNS)))
    if blocks == 1 or n < GRAM_BLOCK_COLUMNS:
        return rows.T @ rows
    out = rows.new_empty(d, d)
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    for start, stop in zip(edges[:-1], edges[1:]):
        upper = rows[:, start:stop].T @ rows[:, start:]
        out[start:, start:stop] = upper.T
        out[start:stop, stop:] = upper[:, stop - start :]
        diagonal = upper[:, : stop - start]  # its own upper triangle mirrored
        out[start:stop, start:stop] = diagonal.triu() + diagonal.triu(1).T
    return out


def _column_sums(rows: torch.Tensor) -> torch.Tensor:
    """Column sums (d,) of ``rows`` (n, d) as float64, added in the rows' precision (at least
    float32; torch sums in blocks, so the error stays near float32's rounding of the total): a
    float64 reduction of float32 rows is an order of magnitude slower."""
    return rows.sum(0, dtype=product_dtype(rows)).double()


def _centred(rows: torch.Tensor, shift: torch.Tensor, overwrite: bool) -> torch.Tensor:
    """``rows - shift`` in ``shift``'s dtype; in place when allowed and the dtypes agree."""
    if overwrite and rows.dtype == shift.dtype:
        return rows.sub_(shift)
    return rows.to(shift.dtype) - shift


def _solve_spd(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``matrix^{-1} rhs`` for a symmetric positive definite ``matrix`` (d, d) and ``rhs`` (d, out):
    by Cholesky (half the work of an LU solve), or by LU when rounding left it indefinite."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.solve(matrix, rhs)


def _shift(x: torch.Tensor, z: torch.Tensor, intercept: bool):
    """The rows' means as the moments' shift when an intercept is fitted, else None (zero)."""
    if not intercept:
        return None
    return _column_sums(x) / max(len(x), 1), _column_sums(z) / max(len(z), 1)


def solve_layer(
    x: torch.Tensor,
    z: torch.Tensor,
    w0: torch.Tensor,
    *,
    intercept: bool,
    ridge: float,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ridge regression of ``z`` (rows, out) on ``x`` (rows, d) towards ``w0`` (out, d).

    Returns the weight (out, d) and, with ``intercept``, the bias (out,), in float64.
    """
    if fewer_rows_than_features(len(x), x.shape[1]):
        return Rows.of(x, z).solve(w0, intercept=intercept, ridge=ridge)
    moments = Moments.of(x, z, _shift(x, z, intercept), chunk=chunk)
    return moments.solve(w0, intercept=intercept, ridge=ridge)


def solve_layer_held_out(
    x: torch.Tensor,
    z: torch.Tensor,
    w0: torch.Tensor,
    *,
    intercept: bool,
    ridges: Sequence[float],
    held: torch.Tensor,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """:func:`solve_layer` with the relative ridge chosen among ``ridges`` by held-out error.

    Each candidate is fitted on the rows not ``held`` (a boolean mask over rows) and scored by its
    squared error on the ``held`` rows; the chosen one is then fitted on all rows. Returns the weight,
    the bias and the ridge. Without rows on both sides, the middle candidate is used.
    """
    ridges = list(ridges)
    if held.all() or not held.any():
        ridge = _middle(ridges)
        return (*solve_layer(x, z, w0, intercept=intercept, ridge=ridge, chunk=chunk), ridge)
    fit, scored = (x[~held], z[~held]), (x[held], z[held])
    return solve_split(
        fit, scored, w0, intercept=intercept, ridges=ridges, chunk=chunk, overwrite=True
    )


def solve_split(
    fit: tuple[torch.Tensor, torch.Tensor],
    held: tuple[torch.Tensor, torch.Tensor],
    w0: torch.Tensor,
    *,
    intercept: bool,
    ridges: Sequence[float],
    chunk: int = 4096,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """:func:`solve_layer_held_out` on rows given apart: ``fit`` = (x, z) fits each candidate,
    ``held`` = (x, z) scores it (both non-empty); the chosen ridge is fitted on both.
    ``overwrite``: the fitting rows may be centred in place (the caller's own copies; the held
    rows are never changed)."""
    ridges = list(ridges)
    (x_fit, z_fit), (x_held, z_held) = fit, held
    fitting: Moments | Rows
    scoring: Moments | Rows
    if fewer_rows_than_features(len(x_fit) + len(x_held), x_fit.shape[1]):
        fitting, scoring = Rows.of(x_fit, z_fit), Rows.of(x_held, z_held)
    else:
        shift = None
        if intercept:  # the mean of all rows
            n = len(x_fit) + len(x_held)
            shift = (
                (_column_sums(x_fit) + _column_sums(x_held)) / n,
                (_column_sums(z_fit) + _column_sums(z_held)) / n,
            )
        scoring = Moments.of(x_held, z_held, shift, chunk=chunk)
        fitting = Moments.of(x_fit, z_fit, shift, chunk=chunk, overwrite=overwrite)

    # the moments' own shift (the rows' mean with an intercept; without one it is zero)
    about = (
        (scoring.shift_x, scoring.shift_z) if intercept and isinstance(scoring, Moments) else None
    )

    def held_out_error(ridge: float) -> float:
        weight, bias = fitting.solve(w0, intercept=intercept, ridge=ridge)
        return _squared_error(x_held, z_held, weight, bias, chunk, about=about)

    ridge = ridges[_descend(held_out_error, ridges)]
    return (*(fitting + scoring).solve(w0, intercept=intercept, ridge=ridge), ridge)


def _squared_error(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    chunk: int,
    *,
    about: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """:math:`\\lVert X W^\\top + b - Z \\rVert_F^2` over rows ``x`` (n, d) and ``z`` (n, out),
    a chunk at a time, the products in the rows' precision (:func:`product_dtype`, no float64
    copy of the rows) and the sum in float64. With ``about`` = (s_x, s_z), shifts exact in that
    precision (the moments' own), the rows are taken about them,

    .. math::

        (X - s_x) W^\\top + (b + W s_x - s_z) - (Z - s_z),

    so that float32 rounds products of the rows' spread rather than of their mean. It only ranks
    candidate ridges: rounding can swap two whose errors nearly agree (either is then as good)."""
    dtype = product_dtype(x)
    weight_t = weight.T.to(dtype)
    offset = bias if bias is not None else weight.new_zeros(weight.shape[0])
    if about is not None:
        offset = offset + weight @ about[0].to(weight) - about[1].to(weight)
    offset = offset.to(dtype)
    low = None if about is None else (about[0].to(dtype), about[1].to(dtype))
    error = 0.0
    for start in range(0, len(x), chunk):
        rows, goal = x[start : start + chunk].to(dtype), z[start : start + chunk].to(dtype)
        if low is not None:
            rows, goal = rows - low[0], goal - low[1]
        residual = torch.addmm(offset, rows, weight_t).sub_(goal)
        error += float(residual.square_().sum(dtype=torch.float64))
    return error


def _middle(ridges: Sequence[float]) -> float:
    """The candidate used when no rows can be held out (and where the descent starts)."""
    return list(ridges)[len(ridges) // 2]


def _descend(error: Callable[[float], float], ridges: Sequence[float]) -> int:
    """The index of a ridge of locally least ``error``, reached by descent from the middle
    candidate: step to the better neighbour until neither neighbour is better. The held-out error
    of a ridge regression usually falls and then rises with the ridge (variance, then bias); then
    this is the grid's minimum, found with about half the solves of trying every candidate. It
    chose as trying every candidate does on every layer of the experiments' VGG11 and ResNet-18
    pairs and of the test Transformers; on one layer of 11 of a random-weight test ResNet it
    stopped at a local minimum (1e-2 against 1e-5)."""
    errors: dict[int, float] = {}

    def at(i: int) -> float:
        if i not in errors:
            errors[i] = error(ridges[i])
        return errors[i]

    i = len(ridges) // 2
    while True:
        best = min((j for j in (i - 1, i, i + 1) if 0 <= j < len(ridges)), key=at)
        if best == i:
            return i
        i = best


def class_scores(gm: torch.fx.GraphModule, points: Sequence[FitPoint]) -> FitPoint | None:
    """The fit point whose target is the model's output when that output is class scores: a
    single tensor of shape (N, C), or per position (N, ..., C) as a language model's next-token
    logits, C >= 2, from a Linear layer; else None. A graph captured by ``torch.export`` returns
    its one output in a tuple, which is looked through."""
    value = output_scores(gm)
    if value is None:
        return None
    modules = dict(gm.named_modules())
    for point in points:
        if point.target == value.name and isinstance(modules[point.module], nn.Linear):
            return point
    return None


def linear_scores(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The node of the model's output when it is class scores (:func:`output_scores`) computed
    by an ``nn.Linear`` (whose weight may be shared, e.g. tied to an embedding), else None."""
    value = output_scores(gm)
    if value is None or value.op != "call_module":
        return None
    return value if isinstance(gm.get_submodule(value.target), nn.Linear) else None


def output_scores(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The node of the model's one output (a graph captured by ``torch.export`` returns it in a
    tuple, which is looked through) when its shape is (N, ..., C), C >= 2, else None."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    value = output.args[0]
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if not isinstance(value, torch.fx.Node):
        return None
    shape = getattr(value.meta.get("tensor_meta"), "shape", None)
    return value if shape is not None and len(shape) >= 2 and shape[-1] >= 2 else None


def ensemble_target(log_mixture: torch.Tensor, average: torch.Tensor) -> torch.Tensor:
    """The ensemble's target logits (rows, C): ``log_mixture`` (the log of the weighted average of
    the parents' probabilities) shifted per row to the mean of ``average`` (their weighted average
    logits), in ``average``'s dtype (see the module's docstring)."""
    shift = average.double().mean(-1, keepdim=True) - log_mixture.mean(-1, keepdim=True)
    return (log_mixture + shift).to(average.dtype)


@dataclass
class LayerTargets:
    """What refit fits each layer to, per fit point (keyed by the layer's node name).

    Attributes:
        rows: the seeded rows (samples x positions) of the point's target node, sorted (rows,).
        samples: the input sample each of those rows comes from (rows,).
        values: the target rows (rows, units): the weighted average of the aligned parents' rows
            (with ``targets="confident"``, before the class scores, the equal average:
            :func:`feature_weights`), or at the class scores with ``targets="ensemble"`` or
            ``"confident"`` :func:`ensemble_target`.
    """

    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)


def layer_targets(
    gm: torch.fx.GraphModule,
    parents: Sequence[SpaceGraph],
    weights: Sequence[float],
    inputs: torch.Tensor,
    *,
    max_rows: int = 32768,
    seed: int = 0,
    targets: TargetRule = "average",
    class_counts: ClassCounts | None = None,
) -> LayerTargets:
    """Run every aligned parent on ``inputs`` and collect the targets of the fit points of ``gm``
    (the fused model's graph): at most ``max_rows`` rows per point, drawn with ``seed`` on the first
    parent's run. Rows are sample-major: the batch dimension comes first in every layer's output.
    ``targets="ensemble"``: the class scores' target follows the prediction ensemble;
    ``"confident"``: the confident mixture, and the layers before it the parents' equal average
    (:func:`feature_weights`); ``"coverage"``: as ``"confident"`` with the coverage mixture of
    ``class_counts`` (:mod:`otfuse.coverage`). The parents run in eval mode, without gradients."""
    points = fit_points(gm)
    collector = target_collector(
        gm, points, len(inputs), max_rows=max_rows, seed=seed, targets=targets,
        class_counts=class_counts,
    )  # fmt: skip
    features = collector.feature_weights(weights, targets)
    with torch.no_grad(), evaluating([p.graph_module for p in parents]):
        for parent, weight, feature in zip(parents, weights, features, strict=True):
            collector.run(parent, weight, inputs, feature)
    return collector.finish()


def target_collector(
    gm: torch.fx.GraphModule,
    points: Sequence[FitPoint],
    count: int,
    *,
    max_rows: int = 32768,
    seed: int = 0,
    targets: TargetRule = "average",
    chosen: LayerTargets | None = None,
    class_counts: ClassCounts | None = None,
) -> _Collector:
    """What adds up the targets of ``points`` over ``count`` inputs (:func:`layer_targets`);
    ``chosen``: rows already drawn (its ``rows`` and ``samples``), else drawn on the first parent's
    values with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    scores = class_scores(gm, points) if targets != "average" else None
    out = LayerTargets(dict(chosen.rows), dict(chosen.samples)) if chosen else LayerTargets()
    return _Collector(
        {p.target: p for p in points},
        lambda rows, features: _row_choice(rows, row_budget(features, max_rows), generator),
        max(1, count),
        scores.node if scores else None,
        out,
        sharpness=CONFIDENCE_SHARPNESS if targets in ("confident", "coverage") else 0.0,
        class_counts=class_counts if targets == "coverage" else None,
    )


@dataclass
class _Collector:
    """Adds up the parents' rows at every target node, one parent's run at a time, and at the
    ``scores`` node (None: no ensemble target) the log of their weighted probabilities, each
    parent's weight times ``exp(-sharpness * entropy)`` per row (0: the prediction ensemble)."""

    points: dict[str, FitPoint]  # by target node
    choose: Callable[[int, int], torch.Tensor]  # (rows, features) -> the rows chosen
    count: int  # input samples
    scores: str | None
    out: LayerTargets = field(default_factory=LayerTargets)
    # float64 (rows, C): log sum_k pi_k p_k with pi_k unnormalised; ensemble_target's shift per
    # row removes the normaliser
    log_mixture: torch.Tensor | None = None
    sharpness: float = 0.0
    # targets="coverage": the class counts, and each parent's (weight, class-score rows) until the
    # last parent's are in (the coverage mixture needs them all at once)
    class_counts: ClassCounts | None = None
    parts: list[tuple[float, torch.Tensor]] = field(default_factory=list)

    def feature_weights(self, weights: Sequence[float], targets: TargetRule) -> list[float]:
        """Each parent's weight in the targets before the class scores (:func:`feature_weights`;
        ``weights`` when the model has no class scores)."""
        return feature_weights(weights, targets) if self.scores else [float(w) for w in weights]

    def run(
        self, parent: SpaceGraph, weight: float, inputs: torch.Tensor, feature: float | None = None
    ) -> None:
        """Add ``parent``'s rows on ``inputs``: ``weight`` at the class scores, ``feature``
        (default ``weight``) before them."""
        modules = dict(parent.graph_module.named_modules())

        def hook(node: torch.fx.Node, value: torch.Tensor) -> None:
            point = self.points[node.name]
            rows = output_rows(modules[point.module], value.detach())
            self.add(point, rows, weight, feature)

        run_with_hooks(parent.graph_module, inputs, after=dict.fromkeys(self.points, hook))

    def pick(self, point: FitPoint, every: int) -> torch.Tensor:
        """The rows of ``point`` that enter its regression, out of ``every`` rows (the first call
        draws them)."""
        rows = self.out.rows
        if point.node not in rows:
            rows[point.node] = self.choose(every, point.features)
            self.out.samples[point.node] = rows[point.node] // max(1, every // self.count)
        return rows[point.node]

    def add(
        self, point: FitPoint, every: torch.Tensor, weight: float, feature: float | None = None
    ) -> None:
        """Add a parent's chosen rows of ``every`` (all rows of the target) (:meth:`accumulate`)."""
        self.accumulate(point, every[self.pick(point, len(every))], weight, feature)

    def accumulate(
        self, point: FitPoint, chosen: torch.Tensor, weight: float, feature: float | None = None
    ) -> None:
        """Add a parent's ``chosen`` rows (rows, units) of ``point``'s target, times ``weight`` at
        the class scores and ``feature`` (default ``weight``) before them."""
        values = self.out.values
        own = weight if feature is None or point.node == self.scores else feature
        scaled = own * chosen  # in the model's own precision
        values[point.node] = scaled if point.node not in values else values[point.node] + scaled
        if point.node == self.scores and self.class_counts is not None:
            self.parts.append((weight, chosen))
        elif point.node == self.scores and weight > 0:
            term = mixture_term(chosen.double(), weight, self.sharpness)
            mixture = self.log_mixture
            self.log_mixture = term if mixture is None else torch.logaddexp(mixture, term)

    def finish(self) -> LayerTargets:
        if self.parts:
            weights, rows = zip(*self.parts, strict=True)
            self.log_mixture = mixture_of_parents(rows, weights, self.class_counts, self.sharpness)
        if self.log_mixture is not None:
            values = self.out.values
            values[self.scores] = ensemble_target(self.log_mixture, values[self.scores])
        return self.out


def _refit_layer(modules, point: FitPoint, x: torch.Tensor, target, rows, ridge, samples) -> None:
    """Re-solve ``point``'s layer on the input ``x`` the fused model feeds it. With candidate
    ridges, the rows of every fifth sample are held out to choose one (gathered apart from the
    others, so that neither set is copied out of the other)."""
    layer = modules[point.module]
    norm = modules[point.norm] if point.norm else None
    held = None if isinstance(ridge, numbers.Real) else samples % 5 == 0
    split = held is not None and bool(held.any()) and not bool(held.all())
    groups = [~held, held] if split else [slice(None)]
    parts = [
        (inputs := selected_rows(layer, x, rows[g]), _through_norm(layer, norm, inputs, target[g]))
        for g in groups
    ]
    has_bias = layer.bias is not None
    w0 = layer.weight.reshape(layer.weight.shape[0], -1)
    intercept = has_bias or norm is not None
    if split:
        weight, bias, _ = solve_split(
            parts[0], parts[1], w0, intercept=intercept, ridges=ridge, overwrite=True
        )
    else:
        chosen = ridge if held is None else _middle(ridge)
        weight, bias = solve_layer(*parts[0], w0, intercept=intercept, ridge=chosen)
    layer.weight.copy_(weight.reshape(layer.weight.shape).to(layer.weight.dtype))
    if has_bias:
        layer.bias.copy_(bias.to(layer.bias.dtype))
    elif bias is not None:  # no bias in the layer: the BatchNorm's bias takes the shift
        scale, _ = _norm_map(norm)
        norm.bias.add_((scale * bias).to(norm.bias.dtype))


def _norm_map(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as the affine map ``y = scale * x + shift`` per unit (float64)."""
    scale = norm.weight.double() / (norm.running_var.double() + norm.eps).sqrt()
    return scale, norm.bias.double() - scale * norm.running_mean.double()


def _through_norm(layer, norm, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The layer's target rows: ``target`` itself, or with a following BatchNorm the output that
    the BatchNorm maps to ``target`` (where its scale is too small to invert, the layer's current
    output on ``inputs``)."""
    if norm is None:
        return target
    scale, shift = _norm_map(norm)
    usable = scale.abs() > 1e-6 * scale.abs().max().clamp_min(1e-30)
    mapped = (target - shift) / scale.where(usable, 1.0)
    if bool(usable.all()):
        return mapped
    flat = layer.weight.reshape(layer.weight.shape[0], -1)
    return torch.where(usable, mapped, F.linear(inputs, flat, layer.bias).double())


def _row_choice(count: int, max_rows: int, generator: torch.Generator) -> torch.Tensor:
    if count <= max_rows:
        return torch.arange(count)
    return torch.randperm(count, generator=generator)[:max_rows].sort().values


def refit_layers(
    fused: SpaceGraph,
    parents: Sequence[SpaceGraph] | None,
    weights: Sequence[float],
    inputs: torch.Tensor,
    *,
    ridge: float | Sequence[float] = RIDGES,
    max_rows: int = 32768,
    seed: int = 0,
    targets: TargetRule = "average",
    goal: LayerTargets | None = None,
    class_counts: ClassCounts | None = None,
) -> None:
    """Refit every fittable layer of the fused model to the weighted average of the aligned
    ``parents``' outputs on ``inputs`` (N, ...), in graph order (see the module's docstring).

    ``fused`` and ``parents`` are traced graphs (:class:`otfuse.capture.GraphCache`); the parents
    are aligned to the fused model's widths and unit order. At most ``max_rows`` rows (samples x
    positions) per layer, drawn with ``seed``, enter each regression. ``ridge``: one relative ridge
    for every layer, or candidates to choose from per layer by held-out error. ``targets="ensemble"``:
    where the model ends in class scores (:func:`class_scores`), their target is the log of the
    parents' weighted prediction ensemble (:func:`ensemble_target`); ``"confident"``: of that
    ensemble with each parent weighted per input by its confidence, and the layers before them
    the equal average of the parents with a positive weight (the module's docstring);
    ``"coverage"``: as ``"confident"`` with the coverage mixture of ``class_counts`` (a row per
    parent, :mod:`otfuse.coverage`); elsewhere,
    and for models without class scores, the weighted average. ``goal``: those targets when the
    caller has them (from :func:`targets_from_rows`; then ``parents`` is not run, and
    ``max_rows``, ``seed`` and ``targets`` are those the goal was made with). Modifies the fused
    model's parameters in place.
    """
    gm = fused.graph_module
    points = fit_points(gm)
    if not points:
        return
    with torch.no_grad(), evaluating([gm, *(p.graph_module for p in parents or ())]):
        if goal is None:
            goal = layer_targets(
                gm, parents, weights, inputs, max_rows=max_rows, seed=seed, targets=targets,
                class_counts=class_counts,
            )  # fmt: skip
        modules, by_node = dict(gm.named_modules()), {p.node: p for p in points}

        def refit(node: torch.fx.Node, args: tuple) -> None:
            p, rows, samples = by_node[node.name], goal.rows, goal.samples
            _refit_layer(
                modules, p, args[0], goal.values[p.node], rows[p.node], ridge, samples[p.node]
            )

        run_with_hooks(gm, inputs, before=dict.fromkeys(by_node, refit))


def targets_from_rows(
    gm: torch.fx.GraphModule,
    chosen: LayerTargets,
    parent_rows: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    orders: Sequence[Mapping[str, torch.Tensor | None]],
    *,
    targets: TargetRule = "average",
    class_counts: ClassCounts | None = None,
) -> LayerTargets:
    """Refit's targets (:func:`layer_targets`) from each parent's own rows: ``parent_rows[k][node]``
    holds parent k's target rows (rows, units) of the fit point at layer ``node``, on the rows
    ``chosen`` (its ``rows`` and ``samples``), in the parent's unit order; aligned unit j is unit
    ``orders[k][node][j]`` (None: the order is kept). Equal to running the aligned parents when the
    plans are permutations."""
    points = fit_points(gm)
    collector = target_collector(
        gm, points, 1, targets=targets, chosen=chosen, class_counts=class_counts
    )
    features = collector.feature_weights(weights, targets)
    for rows, weight, feature, order in zip(parent_rows, weights, features, orders, strict=True):
        for point in points:
            values, permutation = rows[point.node], order.get(point.node)
            if permutation is not None:
                values = values[:, permutation.to(values.device)]
            collector.accumulate(point, values, weight, feature)
    return collector.finish()
