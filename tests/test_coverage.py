"""``targets="coverage"``: each parent trusted on the classes it was trained on (otfuse.coverage)."""

import argparse
import json

import pytest
import torch
from helpers import max_state_diff
from models import build, example

import otfuse
from otfuse.cli import options
from otfuse.config import ConfigError, FusionConfig
from otfuse.coverage import ClassCountsError, coverage_log_probs
from otfuse.distill import teacher_log_probs
from otfuse.errors import OtfuseError
from otfuse.refit import CONFIDENCE_SHARPNESS

STAGES = ("bn_reset", "repair", "refit")


def logits_of(*rows):
    """Class scores whose softmax is each row of probabilities."""
    return torch.tensor(rows, dtype=torch.float64).log()


def test_equal_counts_give_the_confident_mixture():
    torch.manual_seed(0)
    scores, weights = [3 * torch.randn(40, 6), 3 * torch.randn(40, 6)], [0.3, 0.7]
    counts = [[5, 500, 50, 7, 90, 1]] * 2  # uneven classes, alike for both parents
    coverage = teacher_log_probs(scores, weights, "coverage", counts)
    torch.testing.assert_close(coverage, teacher_log_probs(scores, weights, "confident"))


def test_one_parent_alone_keeps_its_own_probabilities():
    torch.manual_seed(1)
    scores = [torch.randn(30, 4), torch.randn(30, 4)]
    counts = [[500, 20, 7, 90], [0, 300, 300, 300]]
    alone = teacher_log_probs(scores, [1.0, 0.0], "coverage", counts)
    torch.testing.assert_close(alone, torch.log_softmax(scores[0], -1))


def test_a_class_one_parent_never_saw_is_decided_by_the_parent_that_did():
    # A saw classes 0-2, B never saw class 0. On this input A says class 0 (0.9); B, which cannot
    # know class 0, is sure of class 1. The ensemble and the confident mixture follow B.
    a, b = logits_of([0.9, 0.05, 0.05]), logits_of([1e-4, 0.99, 0.0099])
    counts, weights = [[100, 100, 100], [0, 100, 100]], [0.5, 0.5]
    for rule in ("ensemble", "confident"):
        assert int(teacher_log_probs([a, b], weights, rule).argmax()) == 1
    mixture = teacher_log_probs([a, b], weights, "coverage", counts).exp()
    assert int(mixture.argmax()) == 0
    torch.testing.assert_close(mixture.sum(-1), torch.ones(1))


def test_parents_of_disjoint_classes_keep_the_split_their_weights_and_confidence_give():
    torch.manual_seed(3)
    scores = [torch.randn(30, 4), torch.randn(30, 4)]
    counts = [[100, 7, 0, 0], [0, 0, 3, 300]]  # A saw classes 0-1, B classes 2-3
    short = coverage_log_probs(scores, [0.7, 0.3], counts, CONFIDENCE_SHARPNESS, iterations=30)
    long = coverage_log_probs(scores, [0.7, 0.3], counts, CONFIDENCE_SHARPNESS, iterations=300)
    torch.testing.assert_close(short, long)  # no drift towards either group
    almost = coverage_log_probs(scores, [1.0, 1e-9], counts, CONFIDENCE_SHARPNESS)
    assert float(almost[:, 2:].exp().max()) < 1e-6  # B with (almost) no weight takes no mass
    towards_b = coverage_log_probs(scores, [0.3, 0.7], counts, CONFIDENCE_SHARPNESS)
    assert bool((towards_b[:, 2:].exp().sum(-1) > short[:, 2:].exp().sum(-1)).all())


def test_rows_are_computed_in_chunks_with_the_same_result(monkeypatch):
    import otfuse.coverage as coverage

    torch.manual_seed(4)
    scores = [torch.randn(3, 50, 7), torch.randn(3, 50, 7)]  # per position, e.g. a language model
    counts = [[10, 0, 5, 80, 3, 3, 9], [1, 40, 0, 8, 30, 3, 9]]
    whole = coverage_log_probs(scores, [0.4, 0.6], counts, CONFIDENCE_SHARPNESS)
    monkeypatch.setattr(coverage, "CHUNK_NUMBERS", 7 * 2 * 9)  # nine rows at a time
    assert whole.shape == (3, 50, 7)
    torch.testing.assert_close(coverage_log_probs(scores, [0.4, 0.6], counts, 4.0), whole)


def test_the_label_prior_of_a_specialist_is_corrected():
    # A was trained on nine times more of class 0 than of class 1, the pooled data hold them alike:
    # A's 0.6 for class 0 is no evidence for it (0.6 / 9 against 0.4 / 1 after the correction).
    a = logits_of([0.6, 0.4])
    mixture = coverage_log_probs([a], [1.0], [[900, 100]], CONFIDENCE_SHARPNESS)
    torch.testing.assert_close(mixture.exp(), logits_of([0.6, 0.4]).exp())  # alone: its own
    pooled = coverage_log_probs(
        [a, logits_of([0.5, 0.5])], [1.0, 1e-9], [[900, 100], [100, 900]], CONFIDENCE_SHARPNESS
    )
    assert int(pooled.argmax()) == 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"class_counts": [1, 2]}, "class_counts must be a list of rows"),
        ({"class_counts": [[1, 2], [3]]}, "one count per class"),
        ({"class_counts": [[1], [3]]}, "2 or more"),
        ({"class_counts": [[1, 2], [3, 4, 5]]}, "all rows as long"),
        ({"class_counts": [[1, -2], [3, 4]]}, "must not be negative"),
        ({"class_counts": [[1, 2], [3, 4]], "weights": [1, 1, 1]}, "2 row"),
    ],
)
def test_bad_class_counts_are_one_line_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message) as caught:
        FusionConfig().replace(**changes)
    assert "\n" not in str(caught.value)


def test_fuse_checks_the_counts_against_the_models_and_their_classes():
    models = [build("mlp", seed=s) for s in (0, 1)]
    x = example("mlp", n=64)
    with pytest.raises(ConfigError, match="targets=coverage needs class_counts"):
        otfuse.fuse(models, data=x, targets="coverage")
    with pytest.raises(ClassCountsError, match="one per model is needed"):
        otfuse.fuse(models, data=x, targets="coverage", class_counts=[[1] * 10])
    with pytest.raises(OtfuseError, match="class scores"):
        otfuse.fuse(models, data=x, stages=STAGES, targets="coverage", class_counts=[[1, 1]] * 2)


def test_coverage_with_equal_counts_fuses_as_confident():
    models = [build("mlp", seed=s) for s in (0, 1)]
    x = example("mlp", n=64)
    classes = models[0](x[:1]).shape[-1]
    common = {"data": x, "stages": STAGES, "weights": [0.7, 0.3]}
    confident = otfuse.fuse(models, targets="confident", **common).model
    coverage = otfuse.fuse(
        models, targets="coverage", class_counts=[[10] * classes] * 2, **common
    ).model
    assert max_state_diff(confident, coverage) < 1e-4


def test_refit_and_distill_follow_the_coverage_mixture():
    torch.manual_seed(0)
    models = [build("mlp", seed=s) for s in (0, 1)]
    x = example("mlp", n=256)
    classes = models[0](x[:1]).shape[-1]
    counts = [[100] * classes, [0] + [100] * (classes - 1)]
    with torch.no_grad():
        goal = teacher_log_probs([m.eval()(x) for m in models], [0.5, 0.5], "coverage", counts)

    def kl(model):
        with torch.no_grad():
            out = torch.log_softmax(model.eval()(x), -1)
        return float((goal.exp() * (goal - out)).sum(-1).mean())

    common = {"data": x, "targets": "coverage", "class_counts": counts, "distill_steps": 60}
    refitted = otfuse.fuse(models, stages=STAGES, **common).model
    distilled = otfuse.fuse(models, stages=(*STAGES, "distill"), **common).model
    averaged = otfuse.fuse(models, stages=STAGES, data=x).model
    assert kl(refitted) < kl(averaged)
    assert kl(distilled) < 0.8 * kl(refitted)


def test_class_counts_may_be_arrays_and_bad_ones_say_so_briefly():
    import numpy as np

    config = FusionConfig().replace(class_counts=np.array([[1, 2], [3, 4]], dtype=np.int64))
    assert config.class_counts == ((1.0, 2.0), (3.0, 4.0))
    assert FusionConfig().replace(class_counts=torch.ones(2, 3)).class_counts == ((1.0,) * 3,) * 2
    with pytest.raises(ConfigError) as caught:
        FusionConfig().replace(class_counts=np.arange(1000))
    assert len(str(caught.value)) < 200 and "\n" not in str(caught.value)
    with pytest.raises(ClassCountsError, match="needs class_counts"):
        teacher_log_probs([torch.zeros(2, 3)], [1.0], "coverage", None)


def test_the_command_line_reads_class_counts(tmp_path):
    assert options.parse_rows("1,2;3,4") == ((1.0, 2.0), (3.0, 4.0))
    path = tmp_path / "counts.json"
    path.write_text(json.dumps([[5, 6], [7, 8]]))
    assert options.parse_rows(f"@{path}") == ((5.0, 6.0), (7.0, 8.0))
    for bad in ("1,,2;3,4", ";", "1,x;2,3"):
        with pytest.raises(argparse.ArgumentTypeError):
            options.parse_rows(bad)
    path.write_text("[[1" + "0" * 400 + ", 2], [3, 4]]")
    with pytest.raises(argparse.ArgumentTypeError, match="too large"):
        options.parse_rows(f"@{path}")
    path.write_text("{not json")
    with pytest.raises(argparse.ArgumentTypeError, match="not valid JSON"):
        options.parse_rows(f"@{path}")


def test_a_parent_alone_keeps_its_probabilities_even_of_classes_it_never_saw():
    torch.manual_seed(2)
    scores = [torch.randn(20, 4), torch.randn(20, 4)]
    counts = [[100, 100, 100, 100], [0, 100, 100, 100]]
    alone = teacher_log_probs(scores, [0.0, 1.0], "coverage", counts)  # B alone never saw class 0
    torch.testing.assert_close(alone, torch.log_softmax(scores[1], -1))
    tiny = [torch.tensor([[0.0, -800.0]]), torch.tensor([[0.0, -900.0]])]  # underflows in float64
    assert torch.isfinite(teacher_log_probs(tiny, [0.5, 0.5], "coverage", [[1, 1], [1, 1]])).all()


def test_all_the_weight_on_the_parent_that_never_saw_a_class_gives_it_back():
    models = [build("mlp", seed=s) for s in (0, 1)]
    x = example("mlp", n=128)
    classes = models[0](x[:1]).shape[-1]
    counts = [[100] * classes, [0] + [100] * (classes - 1)]
    fused = otfuse.fuse(
        models, data=x, stages=(*STAGES, "distill"), weights=[0.0, 1.0], targets="coverage",
        class_counts=counts, distill_steps=20,
    ).model  # fmt: skip
    with torch.no_grad():
        out, want = fused.eval()(x), models[1].eval()(x)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)  # B itself, reordered


def test_counts_that_nothing_reads_are_warned_about(caplog):
    models = [build("mlp", seed=s) for s in (0, 1)]
    x = example("mlp", n=32)
    counts = [[1] * models[0](x[:1]).shape[-1]] * 2
    with caplog.at_level("WARNING", logger="otfuse"):
        otfuse.fuse(models, recipe="paper-wts", example_input=x, class_counts=counts)
    assert "class_counts are read only with targets=coverage" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="otfuse"):
        otfuse.fuse(models, data=x, stages=STAGES, targets="coverage", class_counts=counts)
    assert "class_counts" not in caplog.text
