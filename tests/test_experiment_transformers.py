"""The zoo's Transformers (vit, chargpt), training on token windows, token sequences sampled from
language models for data-free fusion, and ``otfuse experiment transformers --quick`` end to end."""

import json

import pytest
import torch
from transformer_models import align_on, max_diff, plant, randomize_norms

import otfuse
from otfuse import zoo
from otfuse.data import load_dataset
from otfuse.errors import DataError
from otfuse.experiments import run_experiment
from otfuse.experiments.transformers import FINETUNED, FUSIONS, REFERENCE
from otfuse.synthesis import can_synthesize, is_causal_lm, sample_sequences
from otfuse.text import FORTUNES_DIR, normalise, windows
from otfuse.training import TrainConfig, evaluate, train

TOKENS = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(0))
IMAGES = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
TINY = {
    "vit": ({"dim": 16, "depth": 2, "heads": 2}, IMAGES),
    "chargpt": ({"dim": 16, "depth": 2, "heads": 2, "context": 16}, TOKENS),
}


def make(arch, seed=0):
    torch.manual_seed(seed)
    return randomize_norms(zoo.create(arch, **TINY[arch][0]))


@pytest.mark.parametrize("arch", list(TINY))
def test_zoo_transformers_are_captured_with_heads_and_a_planted_permutation_is_recovered(arch):
    model, x = make(arch), TINY[arch][1]
    assert model.otfuse_config["name"] == arch
    graph = otfuse.spaces(model, x)
    assert graph.capture == "export"
    assert sum(1 for s in graph.spaces if s.heads is not None and s.heads.count == 2) >= 2
    planted = plant(model, graph, seed=1)
    assert max_diff(planted, model) > 0.1
    torch.testing.assert_close(planted(x), model(x), atol=1e-5, rtol=1e-5)
    assert max_diff(align_on(graph, planted, model), model) < 1e-6


def test_output_shapes_and_bad_sizes():
    assert make("vit")(IMAGES).shape == (3, 10)
    assert make("chargpt")(TOKENS).shape == (3, 16, 96)
    with pytest.raises(zoo.ModelConfigError, match="multiple of heads"):
        zoo.create("vit", dim=10, heads=4)


def test_training_on_token_windows_is_per_position():
    text = normalise("the cat sat on the mat. " * 40)
    data = windows(text, context=16, count=256, seed=0)
    model = make("chargpt")
    before = evaluate(model, data)
    train(model, data, TrainConfig(epochs=3, batch_size=32, lr=3e-3, optimizer="adamw"),
          progress=False)  # fmt: skip
    after = evaluate(model, data)
    assert after.loss < before.loss - 0.5 and after.accuracy > before.accuracy


def test_sequences_are_sampled_from_causal_language_models_only():
    gpts = [make("chargpt", 0), make("chargpt", 1)]
    assert is_causal_lm(gpts[0], TOKENS) and can_synthesize(gpts, TOKENS)
    assert not is_causal_lm(make("vit"), IMAGES)
    bidirectional = make("chargpt")
    for block in bidirectional.blocks:
        block.attn.causal = False
    assert not is_causal_lm(bidirectional, TOKENS)
    x = sample_sequences(gpts, 16, num_samples=5, seed=2)
    assert x.shape == (5, 16) and x.dtype == torch.long and int(x.max()) < 96
    assert torch.equal(x, sample_sequences(gpts, 16, num_samples=5, seed=2))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    try:
        load_dataset("fashion-mnist", "test")
    except DataError as err:
        pytest.skip(f"Fashion-MNIST is not installed: {err}")
    if not FORTUNES_DIR.is_dir():
        pytest.skip("the Debian package fortunes is not installed (apt-get install fortunes)")
    root = tmp_path_factory.mktemp("transformers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OTFUSE_CACHE", str(root / "cache"))
        results = run_experiment("transformers", quick=True, out=root / "runs", progress=False)
    return results, root / "runs" / "transformers"


def test_quick_experiment_writes_its_report_with_every_row(quick):
    results, out = quick
    assert (out / "report.md").read_text().startswith("# transformers")
    assert json.loads((out / "results.json").read_text())["experiment"] == "transformers"
    for png in ("vit_accuracy.png", "gpt_loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expected = ["parent A (seed 0)", "parent B (seed 1)", "prediction ensemble",
                "vanilla average", *FUSIONS]  # fmt: skip
    for pair in results["pairs"].values():
        assert [r["method"] for r in pair["rows"]] == expected
        assert [e["method"] for e in pair["finetuned"]] == [*FINETUNED, REFERENCE]
        assert len(pair["targets"]) == 2
        assert all(0.0 <= r["accuracy"] <= 100.0 for r in pair["rows"])
    vit, gpt = results["pairs"]["vit"], results["pairs"]["chargpt"]
    assert vit["budgets"] == []
    tuned = {e["method"]: e["loss"] for e in gpt["finetuned"]}
    base, longer = gpt["budgets"]  # the base share (from the fine-tuned table), then 20%
    assert (base["share"], longer["share"]) == (0.1, 0.2) and longer["steps"] == 2 * base["steps"]
    assert (base["data_loss"], base["reference_loss"]) == (tuned["recipe: data"], tuned[REFERENCE])
    best = min(r["loss"] for r in gpt["rows"][:2])
    reached = [b["share"] for b in gpt["budgets"] if b["data_loss"] <= best]
    verdict = f"reaches the better parent ({best:.4f}) after {100 * reached[0]:.0f}%" if reached \
        else f"does not reach the better parent ({best:.4f}) within 20%"  # fmt: skip
    assert "### Fine-tuning budget" in (out / "report.md").read_text()
    assert verdict in (out / "report.md").read_text()


def test_data_recipe_on_briefly_trained_char_gpts_beats_vanilla_averaging(quick):
    results, _ = quick
    loss = {r["method"]: r["loss"] for r in results["pairs"]["chargpt"]["rows"]}
    assert loss["recipe: data"] < loss["vanilla average"] - 0.1
    assert loss["recipe: data-free"] < loss["vanilla average"] - 0.1  # on sampled sequences


def test_refit_on_token_rows_reproduces_a_teacher_gpt():
    """Every Linear of an exported char-GPT (qkv, proj, MLP, head) is refitted with one row per
    token: a student whose Linear weights were perturbed is brought back to its teacher."""
    from otfuse.capture import GraphCache
    from otfuse.refit import fit_points, refit_layers

    teacher = make("chargpt")
    student = zoo.create("chargpt", **TINY["chargpt"][0])
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        for module in student.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
    x = torch.randint(0, 96, (64, 16), generator=torch.Generator().manual_seed(1))
    cache = GraphCache(x[:2])
    graph = cache.graph(student.eval())
    assert len(fit_points(graph.graph_module)) == 2 * 4 + 1
    before = (student(x) - teacher(x)).abs().max().item()
    refit_layers(graph, [cache.graph(teacher)], [1.0], x, ridge=1e-8)
    after = (student(x) - teacher(x)).abs().max().item()
    assert before > 0.1 and after < 1e-3 * before


def test_candidates_on_synthesized_inputs_are_compared_at_a_temperature(monkeypatch):
    """Synthesised inputs are classified confidently by construction: the data-free recipe scores
    its candidates on softened probabilities (temperature tau > 1); data keeps tau = 1."""
    from models import build, example

    import otfuse.pipeline as pipeline

    temperatures = []
    original = pipeline._log_probs

    def spy(model, x, tau=1.0, **kwargs):
        temperatures.append(tau)
        return original(model, x, tau, **kwargs)

    monkeypatch.setattr(pipeline, "_log_probs", spy)
    mlps, x = [build("mlp", seed=0), build("mlp", seed=1)], example("mlp")
    candidates = otfuse.FusionConfig.from_recipe("data").candidates  # all three
    free = otfuse.fuse(mlps, example_input=x, synthesize=16, candidates=candidates)
    assert free.inputs == "synthesized" and len(free.selection) == 3
    assert pipeline.SYNTHESIZED_TEMPERATURE > 1
    assert set(temperatures) == {pipeline.SYNTHESIZED_TEMPERATURE} and len(temperatures) == 5
    temperatures.clear()
    otfuse.fuse(mlps, data=torch.randn(32, *x.shape[1:]), num_samples=32)
    assert set(temperatures) == {1.0}
    temperatures.clear()
    default = otfuse.fuse(mlps, example_input=x, synthesize=16)  # the two activation-based ones
    assert len(default.selection) == 2 and all("mode=acts" in c for c in default.selection)
    assert set(temperatures) == {pipeline.SYNTHESIZED_TEMPERATURE}
