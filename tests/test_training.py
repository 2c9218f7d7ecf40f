"""otfuse.training: a tiny model learns Fashion-MNIST, deterministically; evaluation and helpers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from otfuse import zoo
from otfuse.data import Dataset, load_dataset
from otfuse.training import (
    Evaluation,
    TrainConfig,
    TrainConfigError,
    TrainingDivergedError,
    evaluate,
    finetune,
    learning_rate,
    predict_logits,
    seed_everything,
    train,
)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not any(FASHION_DIR.glob("train-images-idx3-ubyte*")),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist, or make data)",
)

# Two epochs of 16 steps on one thread: a fraction of a second.
QUICK = TrainConfig(epochs=2, batch_size=32, lr=0.05, num_threads=1)


@pytest.fixture(scope="module")
def fashion() -> tuple[Dataset, Dataset]:
    """512 training and 1000 test images of Fashion-MNIST."""
    if not any(FASHION_DIR.glob("train-images-idx3-ubyte*")):
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    train_set = load_dataset("fashion-mnist", "train").subset(range(512))
    test_set = load_dataset("fashion-mnist", "test").subset(range(1000))
    return train_set, test_set


def tiny_mlp(seed: int = 0) -> nn.Module:
    seed_everything(seed)
    return zoo.create("mlpnet", hidden=(64,))


@needs_fashion_mnist
def test_training_drives_the_loss_down_and_learns(fashion: tuple[Dataset, Dataset]) -> None:
    train_set, test_set = fashion
    model = tiny_mlp()
    before = evaluate(model, test_set)
    history = train(model, train_set, QUICK, progress=False, eval_dataset=test_set)
    assert [e.epoch for e in history.epochs] == [1, 2]
    assert history.losses[1] < history.losses[0] < math.log(10)
    assert history.accuracies[1] > history.accuracies[0]
    after = evaluate(model, test_set)
    assert after.accuracy > 50 and after.loss < before.loss - 0.5
    assert history.final.eval_accuracy == pytest.approx(after.accuracy)
    assert history.final.lr < QUICK.lr / 10  # cosine schedule ends near 0


@needs_fashion_mnist
def test_same_seed_gives_identical_weights(fashion: tuple[Dataset, Dataset]) -> None:
    train_set, _ = fashion
    runs = []
    for seed in (0, 0, 1):
        model = tiny_mlp()
        config = TrainConfig(epochs=1, batch_size=64, seed=seed, num_threads=1)
        train(model, train_set, config, progress=False)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


@needs_fashion_mnist
def test_finetune_trains_a_copy_and_leaves_the_input_alone(
    fashion: tuple[Dataset, Dataset],
) -> None:
    train_set, test_set = fashion
    model = tiny_mlp()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    result = finetune(model, train_set, QUICK, progress=False)
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    assert result.model is not model and len(result.history.epochs) == 2
    assert evaluate(result.model, test_set).accuracy > evaluate(model, test_set).accuracy + 20


def test_progress_false_prints_nothing_and_threads_are_restored(
    capsys: pytest.CaptureFixture[str],
) -> None:
    images, labels = torch.randn(64, 1, 4, 4), torch.arange(64) % 3
    toy = Dataset("toy", "train", images, labels, ("a", "b", "c"))
    threads = torch.get_num_threads()
    model = zoo.create("mlpnet", in_shape=(1, 4, 4), hidden=(8,), num_classes=3)
    train(model, toy, TrainConfig(epochs=1, batch_size=16, num_threads=1), progress=False)
    assert capsys.readouterr().err == "" and torch.get_num_threads() == threads


def test_evaluate_matches_a_direct_computation_and_restores_the_mode() -> None:
    torch.manual_seed(0)
    images, labels = torch.randn(50, 1, 4, 4), torch.arange(50) % 3
    toy = Dataset("toy", "test", images, labels, ("a", "b", "c"))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.Dropout(0.5)).train()
    result = evaluate(model, toy, batch_size=7)
    assert model.training
    with torch.no_grad():
        logits = model.eval()(images)
    assert isinstance(result, Evaluation)
    assert result.accuracy == pytest.approx(100 * (logits.argmax(1) == labels).float().mean())
    assert result.loss == pytest.approx(F.cross_entropy(logits, labels).item())
    torch.testing.assert_close(predict_logits(model, images, batch_size=8), logits)


def test_learning_rate_schedules() -> None:
    cosine = TrainConfig(lr=0.1, schedule="cosine")
    assert learning_rate(cosine, 0, 100) == pytest.approx(0.1)
    assert learning_rate(cosine, 50, 100) == pytest.approx(0.05)
    step = TrainConfig(lr=0.1, schedule="step")
    lrs = [learning_rate(step, s, 100) for s in (0, 49, 50, 74, 75, 99)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert learning_rate(TrainConfig(lr=0.1, schedule="constant"), 99, 100) == 0.1


def test_warmup_ramps_linearly_then_follows_the_schedule() -> None:
    warm = TrainConfig(lr=0.1, schedule="constant", warmup=0.1)
    lrs = [learning_rate(warm, s, 100) for s in (0, 4, 9, 10, 99)]
    assert lrs == pytest.approx([0.01, 0.05, 0.1, 0.1, 0.1])
    cosine = TrainConfig(lr=0.1, schedule="cosine", warmup=0.2)
    assert learning_rate(cosine, 49, 100) == pytest.approx(
        0.1 * 0.5 * (1 + math.cos(math.pi * 0.49))
    )


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"epochs": 0}, "epochs and batch_size"),
        ({"lr": -1.0}, "lr must be positive"),
        ({"schedule": "linear"}, "unknown schedule 'linear'"),
        ({"warmup": 1.0}, "warmup must be a share"),
        ({"num_threads": 0}, "num_threads"),
    ],
)
def test_bad_train_config_is_refused(kwargs: dict, fragment: str) -> None:
    with pytest.raises(TrainConfigError, match=fragment):
        TrainConfig(**kwargs)


def test_a_diverging_run_stops_with_a_clear_error() -> None:
    torch.manual_seed(0)
    images, labels = torch.randn(256, 1, 28, 28) * 50, torch.randint(0, 10, (256,))
    data = Dataset("noise", "train", images, labels, tuple(str(c) for c in range(10)))
    model = tiny_mlp()
    config = TrainConfig(epochs=3, batch_size=32, lr=1e4, momentum=0.9, num_threads=1)
    with pytest.raises(TrainingDivergedError, match=r"diverged at epoch \d+, step \d+.*lr=10000"):
        train(model, data, config, progress=False)


def test_a_cached_model_with_nan_weights_is_trained_again(tmp_path, monkeypatch) -> None:
    from otfuse.checkpoints import save_model
    from otfuse.experiments import common

    monkeypatch.setenv("OTFUSE_CACHE", str(tmp_path))
    torch.manual_seed(0)
    images, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    data = Dataset("noise", "train", images, labels, tuple(str(c) for c in range(10)))
    config = TrainConfig(epochs=1, batch_size=32, lr=0.01, num_threads=1)
    kwargs = {"hidden": (16,)}
    model, seconds = common.train_or_load("mlpnet", kwargs, data, config, progress=False)
    assert seconds > 0
    (path,) = tmp_path.glob("mlpnet-*.safetensors")
    broken = zoo.create("mlpnet", **kwargs)
    with torch.no_grad():
        broken.classifier.weight.fill_(float("nan"))
    save_model(path, broken, {}, overwrite=True)
    again, seconds = common.train_or_load("mlpnet", kwargs, data, config, progress=False)
    assert seconds > 0  # retrained, not loaded
    assert all(torch.isfinite(v).all() for v in again.state_dict().values())
    assert common.train_or_load("mlpnet", kwargs, data, config, progress=False)[1] == 0.0
