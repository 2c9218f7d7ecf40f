"""Layer-wise least-squares refit (stages=("bn_reset", "repair", "refit"))."""

import pytest
import torch
from helpers import fuse, max_state_diff
from models import FIXTURES, build, example

import otfuse
from otfuse.capture import GraphCache
from otfuse.discovery import discover
from otfuse.refit import (
    RIDGES,
    Moments,
    Rows,
    _squared_error,
    fewer_rows_than_features,
    fit_points,
    gram,
    layer_rows,
    refit_layers,
    selected_rows,
    solve_layer,
    solve_layer_held_out,
    solve_split,
)
from otfuse.repair import reset_batchnorm


def refit_to(student, teacher, x, **options):
    """Refit ``student`` to the single ``teacher`` on ``x``."""
    cache = GraphCache(x[:2])
    refit_layers(cache.graph(student), [cache.graph(teacher)], [1.0], x, **options)
    return student.eval()


# every parameterised layer of these fixtures is refitted, so one teacher can be reproduced exactly
EXACT = [name for name in FIXTURES if name != "depthwise"]


def sample(name, n=160, seed=21):
    return example(name, n=n, seed=seed)


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_solve_layer_recovers_a_linear_map():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(500, 7), torch.randn(3, 7), torch.randn(3)
    w, b = solve_layer(x, x @ weight.T + bias, torch.zeros(3, 7), intercept=True, ridge=1e-9)
    torch.testing.assert_close(w.float(), weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.float(), bias, atol=1e-5, rtol=1e-5)


def test_solve_layer_keeps_the_start_where_the_inputs_say_nothing():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(200, 2), torch.zeros(200, 1)], dim=1)  # third feature never varies
    w0 = torch.randn(4, 3)
    w, _ = solve_layer(x, torch.randn(200, 4), w0, intercept=True, ridge=1e-3)
    torch.testing.assert_close(w[:, 2].float(), w0[:, 2])


def test_pooled_moments_solve_the_centred_ridge_problem():
    torch.manual_seed(0)
    x, z, w0 = torch.randn(300, 6).double() + 2.0, torch.randn(300, 3).double(), torch.randn(3, 6)
    xc, zc = x - x.mean(0), z - z.mean(0)
    lam = 0.05 * (xc * xc).sum() / 6 + 1e-12
    expected = torch.linalg.solve(xc.T @ xc + lam * torch.eye(6), xc.T @ zc + lam * w0.double().T).T
    shift = x.mean(0), z.mean(0)
    first = torch.arange(300) < 100
    pooled = Moments.of(x[first], z[first], shift) + Moments.of(
        x[~first], z[~first], shift, chunk=7
    )
    weight, bias = pooled.solve(w0, intercept=True, ridge=0.05)
    torch.testing.assert_close(weight, expected)
    torch.testing.assert_close(bias, z.mean(0) - expected @ x.mean(0))


def test_moments_solve_each_ridge_as_if_alone():
    """The centred system is formed once per moments; each ridge still solves its own problem,
    whatever was solved before (with or without intercept)."""
    torch.manual_seed(1)
    x, z, w0 = torch.randn(200, 5).double() + 1.0, torch.randn(200, 2).double(), torch.randn(2, 5)
    shift = x.mean(0), z.mean(0)
    reused = Moments.of(x, z, shift)
    for ridge in (1e-3, 1.0, 1e-5):
        got = reused.solve(w0, intercept=True, ridge=ridge)
        fresh = Moments.of(x, z, shift).solve(w0, intercept=True, ridge=ridge)
        torch.testing.assert_close(got, fresh, rtol=0, atol=0)
        expected, bias = exact_ridge(x, z, w0, True, ridge)
        torch.testing.assert_close(got[0], expected)
        torch.testing.assert_close(got[1], bias)
    assert torch.equal(reused.xx, Moments.of(x, z, shift).xx)  # the sums are left as they were


def test_held_out_errors_in_float32_match_float64_ones():
    """The held-out error that ranks ridges, taken in the rows' float32 about the moments' shift,
    is the float64 one to about 1e-5 (asserted: 1e-4), even where the rows' mean (300) dwarfs their spread (1)
    and the residuals are small; without a shift, float64 rows are summed exactly."""
    torch.manual_seed(2)
    x = torch.randn(3000, 40) + 300.0
    weight, bias = torch.randn(6, 40).double(), torch.randn(6).double()
    z = (x.double() @ weight.T + bias + 1e-3 * torch.randn(3000, 6).double()).float()
    exact = float((x.double() @ weight.T + bias - z.double()).square().sum())
    about = (x.mean(0).double(), z.mean(0).double())  # exact in float32, as the moments' shifts
    got = _squared_error(x, z, weight, bias, chunk=700, about=about)
    assert got == pytest.approx(exact, rel=1e-4)  # 1.4e-2 off without the shift
    plain = float((x.double() @ weight.T - z.double()).square().sum())
    assert _squared_error(x.double(), z, weight, None, chunk=4096) == pytest.approx(
        plain, rel=1e-12
    )


def exact_ridge(x, z, w0, intercept, ridge):
    """The ridge problem solved in float64 from the (d, d) normal equations."""
    x, z, w0 = x.double(), z.double(), w0.double()
    mean_x, mean_z = x.mean(0), z.mean(0)
    if intercept:
        x, z = x - mean_x, z - mean_z
    gram = x.T @ x
    lam = ridge * gram.diagonal().sum() / len(gram) + 1e-12
    weight = torch.linalg.solve(gram + lam * torch.eye(len(gram)).double(), x.T @ z + lam * w0.T).T
    return weight, (mean_z - weight @ mean_x) if intercept else None


@pytest.mark.parametrize("intercept", [True, False])
@pytest.mark.parametrize("ridge", [1e-5, 1e-2, 1.0])
def test_fewer_rows_than_features_are_solved_in_row_space_exactly(intercept, ridge):
    """A wide layer on few rows (30 rows, 100 inputs): the (rows, rows) solve gives the normal
    equations' solution to float64 precision, where float32 Gram products lose up to 2% at the
    smallest ridge."""
    torch.manual_seed(0)
    x, z, w0 = torch.randn(30, 100) * 2 + 1, torch.randn(30, 7) + 3, torch.randn(7, 100)
    weight, bias = exact_ridge(x, z, w0, intercept, ridge)
    for w, b in (Rows.of(x, z).solve(w0, intercept=intercept, ridge=ridge),
                 solve_layer(x, z, w0, intercept=intercept, ridge=ridge)):  # fmt: skip
        torch.testing.assert_close(w, weight, rtol=1e-9, atol=1e-9)
        if intercept:
            torch.testing.assert_close(b, bias, rtol=1e-9, atol=1e-9)
        else:
            assert b is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "count, features, by_blocks",
    [(300, 1, False), (300, 7, False), (300, 300, False), (50, 700, False), (300, 700, True),
     (260, 2100, True)],
)  # fmt: skip
def test_the_block_gram_is_the_products_matrix(count, features, by_blocks, dtype):
    torch.manual_seed(0)
    rows = torch.randn(count, features, dtype=dtype)
    result = gram(rows)
    assert result.dtype == dtype and result.shape == (features, features)
    if by_blocks:  # exactly symmetric
        assert torch.equal(result, result.T)
    exact = rows.double().T @ rows.double()
    torch.testing.assert_close(result.double(), exact, rtol=1e-5, atol=1e-3)
    assert torch.equal(gram(rows[:, :0]), rows.new_zeros(0, 0))
    # a strided view (a transposed matrix's columns, as Rows forms its kernel) gives the same
    torch.testing.assert_close(gram(rows.T.contiguous().T), result, rtol=1e-5, atol=1e-3)


def test_the_row_path_takes_fits_with_under_three_rows_in_four_features():
    assert [fewer_rows_than_features(n, 100) for n in (0, 1, 74, 75, 100, 200)] == [
        False, True, True, False, False, False,
    ]  # fmt: skip


@pytest.mark.parametrize("rows", [0, 1])
def test_a_fit_on_no_row_or_one_row_keeps_the_start(rows):
    torch.manual_seed(0)
    x, z, w0 = torch.randn(rows, 10), torch.randn(rows, 3), torch.randn(3, 10)
    weight, bias = solve_layer(x, z, w0, intercept=True, ridge=1e-2)
    torch.testing.assert_close(weight, w0.double())
    assert torch.isfinite(bias).all()


def test_row_space_and_gram_solves_agree_with_more_rows_than_features():
    torch.manual_seed(0)
    x, z, w0 = torch.randn(300, 20) + 2.0, torch.randn(300, 4), torch.randn(4, 20)
    shift = x.double().mean(0), z.double().mean(0)
    by_rows = (Rows.of(x[:100], z[:100]) + Rows.of(x[100:], z[100:])).solve(
        w0, intercept=True, ridge=0.01
    )
    by_moments = Moments.of(x, z, shift).solve(w0, intercept=True, ridge=0.01)
    for a, b in zip(by_rows, by_moments, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_held_out_ridge_on_few_rows_is_the_exact_problems_best():
    """solve_split on 32 + 8 rows of 64 inputs: the ridge it picks has the least held-out error
    among its neighbours on the exact solutions, and the returned fit is the exact one on all
    rows."""
    torch.manual_seed(3)
    x, w0 = torch.randn(40, 64), torch.zeros(2, 64)
    z = x[:, :5] @ torch.randn(5, 2) + 0.3 * torch.randn(40, 2)
    fit, held = (x[:32], z[:32]), (x[32:], z[32:])
    weight, bias, ridge = solve_split(fit, held, w0, intercept=True, ridges=RIDGES)

    def error(r):
        w, b = exact_ridge(*fit, w0, True, r)
        return float(((x[32:].double() @ w.T + b) - z[32:].double()).square().sum())

    i = RIDGES.index(ridge)
    assert all(error(ridge) <= error(RIDGES[j]) for j in (i - 1, i + 1) if 0 <= j < len(RIDGES))
    expected_w, expected_b = exact_ridge(x, z, w0, True, ridge)
    torch.testing.assert_close(weight, expected_w, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(bias, expected_b, rtol=1e-9, atol=1e-9)


def test_a_large_offset_in_the_inputs_costs_no_precision():
    torch.manual_seed(0)
    x = torch.randn(500, 5).double() + 1e6  # centring by subtraction of sums would lose it all
    weight, bias = torch.randn(2, 5).double(), torch.randn(2).double()
    w, b = solve_layer(x, x @ weight.T + bias, torch.zeros(2, 5), intercept=True, ridge=1e-12)
    torch.testing.assert_close(w, weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x @ w.T + b, x @ weight.T + bias, atol=1e-4, rtol=1e-9)


@pytest.mark.parametrize("x_dtype, z_dtype", [(torch.float32, torch.float64),
                                              (torch.float32, torch.float32),
                                              (torch.float64, torch.float64)])  # fmt: skip
def test_the_held_out_ridge_does_not_depend_on_the_rows_precisions(x_dtype, z_dtype):
    """Rows with means far from zero, in mixed precisions (a float32 layer fitted through a
    BatchNorm has float64 targets): pure noise keeps the largest ridge, a linear map the least."""
    torch.manual_seed(1)
    x, held = torch.randn(600, 20) + 4.0, torch.arange(600) % 5 == 0
    noise, linear = torch.randn(600, 3) + 7.0, x @ torch.randn(20, 3) + 7.0
    for z, expected in ((noise, max(RIDGES)), (linear, min(RIDGES))):
        *_, ridge = solve_layer_held_out(
            x.to(x_dtype), z.to(z_dtype), torch.zeros(3, 20), intercept=True, ridges=RIDGES,
            held=held,
        )  # fmt: skip
        assert ridge == expected


def test_the_held_out_ridge_follows_what_the_inputs_predict():
    torch.manual_seed(0)
    x, held = torch.randn(400, 30), torch.arange(400) % 5 == 0
    linear = x @ torch.randn(30, 4) + 0.01 * torch.randn(400, 4)
    *_, ridge = solve_layer_held_out(
        x, linear, torch.zeros(4, 30), intercept=True, ridges=RIDGES, held=held
    )
    assert ridge == min(RIDGES)  # the inputs explain the target: barely any ridge
    *_, ridge = solve_layer_held_out(
        x, torch.randn(400, 4), torch.zeros(4, 30), intercept=True, ridges=RIDGES, held=held
    )
    assert ridge == max(RIDGES)  # pure noise: stay at the start
    *_, ridge = solve_layer_held_out(
        x, linear, torch.zeros(4, 30), intercept=True, ridges=RIDGES, held=torch.zeros(400) > 0
    )
    assert ridge == RIDGES[len(RIDGES) // 2]  # nothing held out: the middle candidate


@pytest.mark.parametrize("name", EXACT)
def test_refit_to_one_teacher_reproduces_it(name):
    student, teacher, x = build(name, seed=1), build(name, seed=0), sample(name)
    assert (outputs(student, x) - outputs(teacher, x)).abs().max() > 0.1
    refit_to(student, teacher, x, ridge=1e-9)
    fresh = sample(name, n=32, seed=5)  # the fit is exact, not just on its sample
    torch.testing.assert_close(
        outputs(student, fresh), outputs(teacher, fresh), atol=1e-3, rtol=1e-3
    )


def test_layers_it_cannot_refit_are_left_alone():
    gm = discover(build("depthwise"), example("depthwise")).graph_module
    fitted = {p.module for p in fit_points(gm)}
    assert fitted == {"stem", "pointwise", "head"}  # not the depthwise or grouped convolutions


@pytest.mark.parametrize("name", list(FIXTURES))
def test_refit_brings_the_fused_model_closer_to_the_parents_average(name):
    anchor, other, x = build(name, seed=0), build(name, seed=1), sample(name)
    aligned = otfuse.align(other, anchor, example_input=x[:2])
    target = 0.5 * (outputs(anchor, x) + outputs(aligned, x))
    errors = {}
    stages = {"repair": ("bn_reset", "repair"), "refit": ("bn_reset", "repair", "refit")}
    for name, chosen in stages.items():
        fused = fuse([anchor, other], data=x, stages=chosen, example_input=x[:2]).model
        errors[name] = float((outputs(fused, x) - target).pow(2).mean())
    assert errors["refit"] < 0.5 * errors["repair"]


@pytest.mark.parametrize("name", list(FIXTURES))
def test_refitting_the_fusion_of_a_model_with_itself_changes_nothing(name):
    model, x = build(name), sample(name)
    reset_batchnorm(model, x, batch_size=len(x))
    stages = ("bn_reset", "repair", "refit")
    result = fuse([model, model], data=x, stages=stages, example_input=x[:2])
    assert max_state_diff(result.model, model) < 1e-3


def test_refit_is_the_data_recipe_default():
    model, x = build("mlp"), sample("mlp")
    result = otfuse.fuse([model, build("mlp", seed=1)], data=x, example_input=x[:2])
    assert result.config.stages[-1] == "refit" and "refit" in result.timings


def test_rows_are_the_same_when_unfolded_in_chunks():
    conv, x = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.randn(7, 3, 9, 9)
    full = layer_rows(conv, x)
    rows = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))[:50].sort().values
    torch.testing.assert_close(selected_rows(conv, x, rows, budget=100), full[rows])


def test_layers_whose_weights_are_computed_are_not_refitted():
    # fusion refuses such models (discovery names the module); refit's own check stands alone
    model = build("mlp")
    torch.nn.utils.parametrizations.weight_norm(model.fc2)
    gm = torch.fx.GraphModule(model, discover(build("mlp"), example("mlp")).graph_module.graph)
    assert "fc2" not in {p.module for p in fit_points(gm)}
    assert "fc1" in {p.module for p in fit_points(gm)}


def test_parents_come_back_in_their_own_modes():
    teacher, student, x = build("vgg", seed=0).train(), build("vgg", seed=1), sample("vgg")
    refit_to(student, teacher, x)
    assert all(m.training for m in teacher.modules())


def test_double_precision_models_are_refitted_in_double_precision():
    student, teacher = build("vgg", seed=1).double(), build("vgg", seed=0).double()
    x = sample("vgg").double()
    refit_to(student, teacher, x, ridge=1e-12)
    assert (outputs(student, x) - outputs(teacher, x)).abs().max() < 1e-9


def test_valid_padding_is_refitted():
    torch.manual_seed(0)
    student, teacher = (
        torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding="valid"), torch.nn.Flatten())
        for _ in range(2)
    )
    x = torch.randn(40, 2, 6, 6)
    assert fit_points(discover(student, x[:2]).graph_module)
    refit_to(student, teacher, x, ridge=1e-9)
    torch.testing.assert_close(outputs(student, x), outputs(teacher, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "conv, shape",
    [
        (torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), (7, 3, 9, 9)),
        (
            torch.nn.Conv2d(2, 5, (3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1)),
            (3, 2, 8, 7),
        ),
        (torch.nn.Conv2d(4, 4, 1), (2, 4, 5, 6)),
        (torch.nn.Conv2d(3, 2, 3, padding="valid"), (2, 3, 6, 6)),
        (torch.nn.Conv1d(3, 4, 5, stride=2, padding=2, dilation=1), (4, 3, 17)),
        (torch.nn.Conv1d(2, 3, 3, dilation=3), (2, 2, 12)),
    ],
)
def test_gathered_patches_are_the_unfolded_rows(conv, shape):
    x = torch.randn(*shape)
    full = layer_rows(conv, x)
    rows = torch.randperm(len(full), generator=torch.Generator().manual_seed(1))[:40].sort().values
    torch.testing.assert_close(selected_rows(conv, x, rows, budget=64), full[rows])
    torch.testing.assert_close(selected_rows(conv, x, torch.arange(len(full))), full)
    if x.ndim == 4:  # the layout the data stages run in: the same rows
        last = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(selected_rows(conv, last, rows, budget=64), full[rows])


@pytest.mark.parametrize("name", list(FIXTURES))
@pytest.mark.parametrize("targets", ["average", "ensemble", "confident"])
def test_refit_targets_from_recorded_parent_rows_equal_the_aligned_parents(
    name, targets, monkeypatch
):
    """With permutation plans refit reads each parent's rows recorded in the one run before the
    alignment, reordered by its plans; the fused model is that of running the aligned parents."""
    from otfuse.context import FusionContext

    models, x = [build(name, seed=s) for s in range(3)], sample(name)
    used = []
    original = FusionContext.refit_targets
    monkeypatch.setattr(
        FusionContext, "refit_targets", lambda self, gm: used.append(original(self, gm)) or used[-1]
    )
    options = dict(data=x, example_input=x[:2], targets=targets, weights=[0.6, 0.3, 0.1])
    fast = otfuse.fuse(models, "data", **options)
    assert used and all(u is not None for u in used), "equal widths: permutation plans"
    monkeypatch.setattr(FusionContext, "refit_targets", lambda self, gm: None)
    slow = otfuse.fuse(models, "data", **options)
    assert fast.selected == slow.selected
    # outputs, not weights: a LayerNorm's outputs have a null direction (their mean), along which
    # rounding-level differences of the targets move the next layer's weights freely
    torch.testing.assert_close(outputs(fast.model, x), outputs(slow.model, x), atol=1e-5, rtol=1e-4)


def test_refit_runs_the_aligned_parents_across_widths(monkeypatch):
    """Different widths: the recorded rows are not the aligned parents' (split units), so refit
    runs them."""
    from otfuse.context import FusionContext

    x = sample("mlp")
    models = [build("mlp", seed=0), build("mlp", seed=1, width=32)]
    used = []
    original = FusionContext.refit_targets
    monkeypatch.setattr(
        FusionContext, "refit_targets", lambda self, gm: used.append(original(self, gm)) or used[-1]
    )
    otfuse.fuse(models, "data", data=x, example_input=x[:2])
    assert used == [None]


@pytest.mark.parametrize("name, recorded", [("TinyGPT", False), ("TinyLlama", True)])
def test_recorded_refit_targets_on_transformers(name, recorded, monkeypatch):
    """Heads, rotary dims, residual streams: refit from the recorded rows (where every fit point's
    units lie in one space) fuses what running the aligned parents fuses."""
    import transformer_models

    from otfuse.context import FusionContext

    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(transformer_models.randomize_norms(getattr(transformer_models, name)()))
    x = torch.randint(0, 11, (32, 12), generator=torch.Generator().manual_seed(0))
    original, used = FusionContext.refit_targets, []
    monkeypatch.setattr(
        FusionContext, "refit_targets", lambda self, gm: used.append(original(self, gm)) or used[-1]
    )
    fast = otfuse.fuse(models, "data", data=x, example_input=x[:2])
    monkeypatch.setattr(FusionContext, "refit_targets", lambda self, gm: None)
    slow = otfuse.fuse(models, "data", data=x, example_input=x[:2])
    assert fast.selected == slow.selected
    torch.testing.assert_close(outputs(fast.model, x), outputs(slow.model, x), atol=1e-4, rtol=1e-4)
    # TinyGPT's packed qkv output holds the units of several spaces: its rows are not reordered
    assert [u is not None for u in used] == [recorded]
