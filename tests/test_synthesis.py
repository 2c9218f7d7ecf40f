"""Inputs synthesised from BatchNorm statistics (data-free repair and refit)."""

import pytest
import torch
from helpers import max_state_diff
from models import build, example
from test_layout import _ViewsItsActivations
from torch import nn

import otfuse
from otfuse.errors import OtfuseError
from otfuse.repair import reset_batchnorm
from otfuse.synthesis import (
    AUTO_BUDGET,
    AUTO_FEWEST_INPUTS,
    AUTO_SYNTHESIS_FLOPS,
    AUTO_UNCOUNTED_INPUTS,
    affordable_inputs,
    budget,
    can_synthesize,
    channel_moments,
    forward_flops,
    statistics_loss,
    synthesize_inputs,
    tracked_batchnorms,
)


def batch_loss(models, x):
    seen = []
    hooks = [
        bn.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0])))
        for m in models
        for bn in tracked_batchnorms(m)
    ]
    with torch.no_grad():
        for m in models:
            m.eval()(x)
    for h in hooks:
        h.remove()
    return float(statistics_loss(seen))


def trained_like(name, seeds=(0, 1)):
    """Fixture models whose BatchNorm statistics were computed on one input distribution, as
    after training (the fixtures' own statistics are random and need not be reachable)."""
    data = 2.0 * example(name, n=256, seed=9) + 1.0
    return [reset_batchnorm(build(name, seed=s), data) for s in seeds]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_synthesized_inputs_match_the_batchnorm_statistics(name, precision):
    models, x = trained_like(name), example(name)
    noise = torch.randn(64, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    synthetic = synthesize_inputs(models, x, num_samples=64, steps=150, precision=precision)
    assert synthetic.dtype == torch.float32
    assert synthetic.shape == noise.shape
    assert batch_loss(models, synthetic) < 0.1 * batch_loss(models, noise)


def test_synthesis_leaves_the_models_as_they_were():
    model = build("resnet").train()
    model.fc.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    synthesize_inputs([model], example("resnet"), num_samples=8, steps=3)
    assert model.training and not model.fc.weight.requires_grad
    assert model.conv1.weight.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_synthesis_is_seeded():
    models, x = [build("resnet")], example("resnet")
    first = synthesize_inputs(models, x, num_samples=8, steps=5, seed=3)
    assert torch.equal(first, synthesize_inputs(models, x, num_samples=8, steps=5, seed=3))
    assert not torch.equal(first, synthesize_inputs(models, x, num_samples=8, steps=5, seed=4))


def test_classifiers_get_inputs_they_recognise_as_the_assigned_classes():
    models = [build("mlp", seed=0)]  # no BatchNorm: the class term
    x = example("mlp")
    # light smoothing: this untrained fixture's class directions are pixel noise, which the default
    # CLASS_SMOOTHNESS (chosen on trained models) smooths away
    synthetic = synthesize_inputs(models, x, num_samples=50, steps=60, smoothness=0.05)
    noise = torch.randn(synthetic.shape, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(50) % 5
    for model in models:
        with torch.no_grad():
            assert (model(synthetic).argmax(1) == labels).float().mean() > 0.95
            assert (model(noise).argmax(1) == labels).float().mean() < 0.5


def test_models_with_nothing_to_synthesise_from_are_refused():
    torch.manual_seed(0)
    regressors = [nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1)) for _ in range(2)]
    x = torch.randn(4, 6)
    assert not can_synthesize(regressors, x)
    with pytest.raises(OtfuseError, match="BatchNorm running statistics or output class scores"):
        synthesize_inputs(regressors, x)
    assert not can_synthesize([build("resnet")], (example("resnet"),))
    assert not can_synthesize([build("mlp")], example("mlp").long())
    assert can_synthesize([build("mlp"), build("resnet")], example("resnet")) is False


def test_data_free_recipe_synthesises_when_it_can():
    x = example("resnet")
    resnets = [build("resnet", seed=0), build("resnet", seed=1)]
    result = otfuse.fuse(resnets, example_input=x, synthesize=32)
    assert result.config.recipe == "data-free" and result.inputs == "synthesized"
    assert result.config.stages == ("bn_reset", "repair", "refit")
    assert result.config.num_samples == 32 and "synthesize" in result.timings
    off = otfuse.fuse(resnets, example_input=x, synthesize=0)
    assert off.inputs == "none" and off.config.stages == () and off.config.refine
    mlps = otfuse.fuse([build("mlp"), build("mlp", seed=1)], example_input=example("mlp"))
    assert mlps.inputs == "synthesized"
    torch.manual_seed(0)
    regressors = [nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1)) for _ in range(2)]
    plain = otfuse.fuse(regressors, example_input=torch.randn(4, 6))
    assert plain.inputs == "none" and plain.config.refine and plain.config.mode == "wts"


def test_synthesis_steps_and_step_size_reach_the_optimisation(monkeypatch):
    import otfuse.pipeline

    seen = []
    original = otfuse.pipeline.synthesize_inputs

    def spy(*args, **kwargs):
        seen.append((kwargs["steps"], kwargs["lr"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(otfuse.pipeline, "synthesize_inputs", spy)
    resnets = [build("resnet", seed=0), build("resnet", seed=1)]
    x = example("resnet")
    few = otfuse.fuse(resnets, example_input=x, synthesize=16, synthesis_steps=3)
    more = otfuse.fuse(resnets, example_input=x, synthesize=16, synthesis_steps=6, synthesis_lr=0.1)
    default_lr = otfuse.FusionConfig().synthesis_lr
    assert seen == [(3, default_lr), (6, 0.1)] and few.config.synthesis_steps == 3
    assert max_state_diff(few.model, more.model) > 0  # other inputs, another fused model


def test_a_model_passed_twice_comes_back_as_it_was():
    model = build("mlp").train()
    synthesize_inputs([model, model], example("mlp"), num_samples=4, steps=2)
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_the_automatic_budget_follows_the_objective_and_records_what_ran(monkeypatch):
    import otfuse.pipeline

    seen = []
    original = otfuse.pipeline.synthesize_inputs

    def spy(models, example_input, **kwargs):
        out = original(models, example_input, **{**kwargs, "steps": 2})  # the fixtures: fast
        seen.append((kwargs["num_samples"], kwargs["steps"], len(out)))
        return out

    monkeypatch.setattr(otfuse.pipeline, "synthesize_inputs", spy)
    resnets = [build("resnet", seed=0), build("resnet", seed=1)]  # BatchNorm statistics
    mlps = [build("mlp", seed=0), build("mlp", seed=1)]  # the class term
    assert otfuse.FusionConfig.from_recipe("data-free").synthesis_steps == "auto"
    stats = otfuse.fuse(resnets, example_input=example("resnet")).config
    classes = otfuse.fuse(mlps, example_input=example("mlp")).config
    given = otfuse.fuse(mlps, example_input=example("mlp"), synthesize=16).config
    count, steps = AUTO_BUDGET["statistics"]  # the fixtures are cheap: the full budget
    assert (count, steps) == (128, 60)
    assert AUTO_BUDGET["classes"] == (192, 30)
    assert seen == [(count, steps, count), (192, 30, 192), (16, 30, 16)]
    assert (stats.synthesize, stats.synthesis_steps, stats.num_samples) == (count, steps, count)
    assert (classes.synthesize, classes.synthesis_steps, classes.num_samples) == (192, 30, 192)
    assert (given.synthesize, given.synthesis_steps) == (16, 30)


def wide_batchnorm_net(seed: int, channels: int) -> nn.Module:
    """A BatchNorm CNN with ``channels`` channels on 32 x 32 inputs: two 3x3 convolutions cost
    4 * 9 * channels**2 * 1024 FLOPs per input."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10),
    )  # fmt: skip


def test_forward_flops_count_every_model_per_input_row_and_leave_them_as_they_were():
    nets = [wide_batchnorm_net(0, 16).train(), wide_batchnorm_net(1, 16).eval()]
    before = [{k: v.clone() for k, v in net.state_dict().items()} for net in nets]
    convolutions = 2 * 9 * (3 * 16 + 16 * 16) * 1024  # multiply-adds x 2, per input
    assert forward_flops(nets, torch.randn(5, 3, 32, 32)) == 2 * (convolutions + 2 * 16 * 10)
    assert [net.training for net in nets] == [True, False]  # modes restored
    for net, saved in zip(nets, before, strict=True):
        assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())


class NeedsFourRows(nn.Module):
    """A BatchNorm CNN that folds its batch in fours: it runs on 4, 8, ... rows, not on two."""

    def __init__(self, seed: int):
        super().__init__()
        self.net = wide_batchnorm_net(seed, 128)

    def forward(self, x):
        h = self.net[0](x)
        return self.net[1:](h.view(-1, 4, *h.shape[1:]).flatten(0, 1))


def test_models_the_flop_count_cannot_run_get_the_budget_of_unknown_cost():
    models, x = [NeedsFourRows(0), NeedsFourRows(1)], torch.randn(8, 3, 32, 32)
    assert forward_flops(models, x) is None
    steps = AUTO_BUDGET["statistics"][1]
    uncounted = AUTO_UNCOUNTED_INPUTS["statistics"]
    assert budget(models, x) == (uncounted, steps)
    for kind, fewest in AUTO_FEWEST_INPUTS.items():
        assert fewest <= AUTO_UNCOUNTED_INPUTS[kind] <= AUTO_BUDGET[kind][0]
    assert synthesize_inputs(models, x, steps=1).shape == (uncounted, 3, 32, 32)


def test_affordable_inputs_shrink_with_the_cost_between_the_floor_and_the_ceiling():
    most = AUTO_BUDGET["statistics"][0]
    cheap = AUTO_SYNTHESIS_FLOPS / (60 * 1000)
    assert affordable_inputs(cheap, 60, most) == most
    assert affordable_inputs(AUTO_SYNTHESIS_FLOPS / (60 * 50), 60, most) == 48  # a multiple of 8
    assert affordable_inputs(AUTO_SYNTHESIS_FLOPS, 60, most) == AUTO_FEWEST_INPUTS["statistics"]
    assert affordable_inputs(AUTO_SYNTHESIS_FLOPS, 60, most, fewest=100) == 100
    assert affordable_inputs(AUTO_SYNTHESIS_FLOPS, 60, 16) == 16  # never above the ceiling
    costs = [AUTO_SYNTHESIS_FLOPS / (60 * n) for n in range(10, 100, 7)]
    counts = [affordable_inputs(c, 60, most) for c in costs]
    assert counts == sorted(counts)  # cheaper models: never fewer inputs


def test_an_accelerator_gets_the_budget_of_uncounted_cost():
    """Off the CPU the FLOPs are not counted (the device's rate is unknown): 64 inputs in 60 steps
    for the statistics, 128 in 30 for the class term (checked with the device-less ``meta``
    tensors, as no accelerator is at hand)."""
    models = [wide_batchnorm_net(0, 8), wide_batchnorm_net(1, 8)]
    x = torch.randn(2, 3, 32, 32, device="meta")
    assert budget(models, x, kind="statistics") == (AUTO_UNCOUNTED_INPUTS["statistics"], 60)
    assert budget(models, x, kind="classes") == (AUTO_UNCOUNTED_INPUTS["classes"], 30)
    assert budget(models, x, kind="statistics", num_samples=96) == (96, 60)


def test_costly_models_synthesise_fewer_inputs_unless_the_caller_says():
    """Two 128-channel nets at 32 x 32 cost about 600 MFLOP per input; the fixtures' nets little."""
    costly = [wide_batchnorm_net(0, 128), wide_batchnorm_net(1, 128)]
    x = torch.randn(2, 3, 32, 32)
    most, steps = AUTO_BUDGET["statistics"]
    cheap = [wide_batchnorm_net(0, 8), wide_batchnorm_net(1, 8)]
    assert budget(costly, x) == (AUTO_FEWEST_INPUTS["statistics"], steps)
    assert budget(costly, x, num_samples=64) == (64, steps)
    assert budget(cheap, x) == (most, steps)
    # the class term: its whole budget when cheap, never below the count it had before the rule
    assert budget(cheap, x, kind="classes") == AUTO_BUDGET["classes"]
    assert budget(costly, x, kind="classes") == (AUTO_FEWEST_INPUTS["classes"], 30)


@pytest.mark.parametrize("count", [-1, 2.5, True, "many"])
def test_a_bad_synthesis_count_is_a_clear_error(count):
    with pytest.raises(OtfuseError, match="synthesize must be a (whole|number)|or auto"):
        otfuse.fuse(
            [build("mlp"), build("mlp", seed=1)], example_input=example("mlp"), synthesize=count
        )


@pytest.mark.parametrize("shape", [(64, 5, 7, 6), (64, 5), (32, 5, 9)])
def test_channel_moments_equal_the_mean_and_variance_per_channel(shape):
    torch.manual_seed(0)
    z = (torch.randn(shape) * 3 + 50).requires_grad_(True)  # a large mean: no cancellation
    dims = [0, *range(2, len(shape))]
    mean, var = channel_moments(z, torch.full((5,), 49.0))
    torch.testing.assert_close(mean, z.mean(dims))
    torch.testing.assert_close(var, z.var(dims, unbiased=False), rtol=1e-4, atol=1e-4)
    (mean.sum() + var.sum()).backward()  # differentiable, as the synthesis needs
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "auto"])
def test_synthesis_runs_the_models_in_the_precision_asked(precision):
    from otfuse.synthesis import native_bfloat16

    model, x = build("resnet"), example("resnet")
    seen = []
    hook = model.conv1.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    synthesize_inputs([model], x, num_samples=4, steps=2, precision=precision)
    hook.remove()
    bf16 = precision == "bfloat16" or (precision == "auto" and native_bfloat16(x.device))
    # the last two calls are the optimisation steps (checks before them run in float32)
    assert seen[-2:] == [torch.bfloat16 if bf16 else torch.float32] * 2
    with pytest.raises(OtfuseError, match="unknown precision"):
        synthesize_inputs([model], x, num_samples=4, steps=2, precision="half")


def test_the_synthesis_precision_is_an_option_of_the_fusion(monkeypatch):
    import otfuse.pipeline

    asked = []
    real = otfuse.pipeline.synthesize_inputs
    monkeypatch.setattr(
        otfuse.pipeline,
        "synthesize_inputs",
        lambda *a, **k: asked.append(k["precision"]) or real(*a, **k),
    )
    models, x = trained_like("vgg"), example("vgg")
    otfuse.fuse(models, example_input=x, synthesize=8, synthesis_steps=2)
    otfuse.fuse(
        models, example_input=x, synthesize=8, synthesis_steps=2, synthesis_precision="float32"
    )
    assert asked == ["auto", "float32"]


def test_batchnorm_models_whose_output_is_not_one_tensor_are_synthesised_for():
    class Features(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.bn(self.conv(x))
            return {"features": h, "pooled": h.mean((2, 3))}

    models = [reset_batchnorm(Features(), 2.0 * torch.randn(64, 3, 8, 8) + 1.0) for _ in range(2)]
    for precision in ("float32", "bfloat16"):
        x = synthesize_inputs(models, torch.zeros(2, 3, 8, 8), num_samples=8, steps=3,
                              precision=precision)  # fmt: skip
        assert x.shape == (8, 3, 8, 8) and torch.isfinite(x).all()


class TinyAttentionClassifier(nn.Module):
    """Tokens from an image's rows, one self-attention layer, class scores."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.qkv, self.head = nn.Linear(8, 16), nn.Linear(16, 48), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.flatten(1, 2))  # (N, 8 rows, 16)
        q, k, v = self.qkv(h).view(len(x), 8, 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(h + a.transpose(1, 2).flatten(2)).mean(1)


def test_attention_runs_in_float32_inside_bfloat16_synthesis_and_the_rest_in_bfloat16():
    """On the CPU, autocast's bfloat16 attention backward is several times slower than float32's
    (README, Speed): synthesis keeps attention in float32, the Linear layers in bfloat16."""
    from otfuse.synthesis import _autocast

    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 17, 16).bfloat16() for _ in range(3))
    x = torch.randn(4, 1, 8, 8)
    with _autocast(x, "bfloat16"):
        out = sdpa(q, k, v, is_causal=True)
        assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, sdpa(q.float(), k.float(), v.float(), is_causal=True).bfloat16())
    with _autocast(x, "bfloat16"):  # keyword arguments, and nn.MultiheadAttention's path
        by_name = sdpa(query=q, key=k, value=v, is_causal=True)
        attention = nn.MultiheadAttention(16, 2, batch_first=True).eval()
        tokens = torch.randn(3, 17, 16)
        mixed, _ = attention(tokens, tokens, tokens, need_weights=False)
    assert torch.equal(by_name, out)
    assert torch.equal(mixed, attention(tokens, tokens, tokens, need_weights=False)[0])
    model = TinyAttentionClassifier().eval()
    synthetic = synthesize_inputs([model], x, num_samples=8, steps=3, precision="bfloat16")
    assert synthetic.dtype == torch.float32 and torch.isfinite(synthetic).all()


def test_the_smoothing_weight_follows_the_objective():
    """TV weighs CLASS_SMOOTHNESS with the class term alone and STATISTICS_SMOOTHNESS with the
    BatchNorm statistics, unless given."""
    from otfuse.synthesis import CLASS_SMOOTHNESS, STATISTICS_SMOOTHNESS

    assert CLASS_SMOOTHNESS > STATISTICS_SMOOTHNESS
    for name, weight in (("mlp", CLASS_SMOOTHNESS), ("resnet", STATISTICS_SMOOTHNESS)):
        models, x = [build(name, seed=0), build(name, seed=1)], example(name, n=2)
        if name == "resnet":
            for model in models:
                reset_batchnorm(model, example(name, n=32), batch_size=32)
        runs = {
            s: synthesize_inputs(models, x, num_samples=6, steps=3, smoothness=s,
                                 precision="float32")
            for s in (None, weight, 10 * weight)
        }  # fmt: skip
        assert torch.equal(runs[None], runs[weight]), name
        assert not torch.equal(runs[None], runs[10 * weight]), name


def test_channel_moments_have_autograds_gradient():
    z = torch.randn(6, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: channel_moments(t, shift), (z,))
    zl = z.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    mean, var = channel_moments(zl, shift)  # channels-last activations: the same moments
    torch.testing.assert_close(mean, z.mean((0, 2, 3)))
    torch.testing.assert_close(var, z.var((0, 2, 3), unbiased=False))


def test_synthesis_runs_a_model_that_cannot_take_channels_last_as_it_is():
    from otfuse.modes import channels_last

    torch.manual_seed(0)
    models = [_ViewsItsActivations(), _ViewsItsActivations()]
    x = torch.randn(16, 3, 8, 8)
    with pytest.raises(RuntimeError, match="view"), channels_last(models):
        models[0](x)  # what the synthesis meets
    for m in models:
        reset_batchnorm(m, 2 * x + 1)
    synthetic = synthesize_inputs(models, x[:2], num_samples=16, steps=40)
    assert batch_loss(models, synthetic) < 0.1 * batch_loss(models, torch.randn(16, 3, 8, 8))
    assert all(m.conv1.weight.is_contiguous() for m in models)
