"""One validation layer: every bad input to the API is an OtfuseError with one line."""

from __future__ import annotations

import pytest
import torch
from models import build, example
from torch.utils.data import DataLoader, TensorDataset

import otfuse
from otfuse.errors import DataError, OtfuseError


def _bad(x: torch.Tensor, **changes) -> torch.Tensor:
    x = x.clone()
    for index, value in changes.items():
        x[int(index[1:])] = value
    return x


GOOD = example("vgg", n=16)

BAD_DATA = {
    "one channel for three": (GOOD[:, :1], "data has 1 channel, the models expect 3"),
    "wrong size": (
        torch.randn(16, 3, 9, 9),
        "data inputs have shape 3x9x9, the models expect 3x8x8",
    ),
    "integer pixels": ((GOOD * 100).to(torch.uint8), "data has dtype uint8"),
    "NaN": (_bad(GOOD, i5=float("nan")), "NaN or Inf values"),
    "Inf": (_bad(GOOD, i0=float("inf")), "NaN or Inf values"),
    "empty": (GOOD[:0], "data holds no inputs"),
    "not data": ("images.png", "data must be a tensor, a dataset or batches"),
    "mixed batches": ([GOOD[:4], GOOD[:4, :, :4]], "different shapes"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_line(case):
    data, message = BAD_DATA[case]
    models = [build("vgg"), build("vgg", seed=1)]
    with pytest.raises(DataError, match=message) as caught:
        otfuse.fuse(models, "paper-acts", data=data, example_input=GOOD[:2])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (GOOD[:, :1], "data has 1 channel, the models expect 3"),  # said of the data, in words
        (torch.randn(16, 3, 3, 3), "data does not fit VGGish: "),
        # one image without its batch dimension was "expected input[1, 32, 32] to have 3 channels"
        (GOOD[0], r"one dimension short of the batches \(N, 3, \.\.\.\) .*data\[None\]"),
    ],
)
def test_data_alone_that_does_not_fit_the_models_is_one_line(data, message):
    """Without an example input the data is traced: its misfit is said of the data."""
    models = [build("vgg"), build("vgg", seed=1)]
    with pytest.raises(DataError, match=message) as caught:
        otfuse.fuse(models, "paper-acts", data=data)
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)


def test_an_example_input_in_another_shape_than_the_data_is_said_so():
    """(N, 1, 28, 28) data against a flattened (N, 784) example input of a Flatten-first model:
    the message names both shapes, not "784 features, the models expect 784"."""
    models = [build("mlp"), build("mlp", seed=1)]
    x = example("mlp", n=16)
    flat = x.flatten(1)[:2]
    with pytest.raises(DataError, match="the same number of values") as caught:
        otfuse.fuse(models, "paper-acts", data=x, example_input=flat)
    assert _shape_words(x) in str(caught.value) and "\n" not in str(caught.value)


def _shape_words(x: torch.Tensor) -> str:
    return "x".join(str(d) for d in x.shape[1:])


def test_data_given_as_inputs_and_labels_reads_the_inputs():
    models = [build("vgg"), build("vgg", seed=1)]
    labels = torch.arange(len(GOOD)) % 10
    paired = otfuse.fuse(models, "paper-acts", data=(GOOD, labels)).model
    alone = otfuse.fuse(models, "paper-acts", data=GOOD).model
    for a, b in zip(paired.state_dict().values(), alone.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_float32_data_aligns_float64_models():
    """``align`` reads inputs in the models' precision, as ``fuse`` does (it refused them)."""
    anchor, model = build("mlp").double(), build("mlp", seed=1).double()
    x = example("mlp", n=32)
    aligned = otfuse.align(model, anchor, mode="acts", data=x)
    torch.testing.assert_close(aligned(x.double()), model(x.double()), atol=1e-10, rtol=1e-10)


def test_float32_data_fuses_float64_models_in_float64():
    models = [build("mlp").double(), build("mlp", seed=1).double()]
    x = example("mlp", n=32)
    fused = otfuse.fuse(models, data=x).model
    assert all(p.dtype == torch.float64 for p in fused.parameters())
    with torch.no_grad():
        assert torch.isfinite(fused(x.double())).all()


def test_num_samples_zero_is_a_config_error():
    models = [build("mlp"), build("mlp", seed=1)]
    x = example("mlp", n=8)
    with pytest.raises(OtfuseError, match="num_samples must be at least 1"):
        otfuse.fuse(models, "paper-acts", data=x, num_samples=0)


def test_models_in_different_precisions_are_one_line():
    # the trace failed inside torch ("Input type (float) and bias type (double) ...")
    models = [build("mlp"), build("mlp", seed=1).double()]
    for call in (
        lambda: otfuse.fuse(models, "paper-wts", example_input=example("mlp")),
        lambda: otfuse.align(models[1], models[0], example_input=example("mlp")),
    ):
        with pytest.raises(
            OtfuseError, match=r"different precisions \(model 0 float32, model 1 float64\)"
        ):
            call()


def test_weights_and_anchor_must_fit_the_models():
    models, x = [build("mlp"), build("mlp", seed=1)], example("mlp")
    with pytest.raises(OtfuseError, match="got 3 weights for 2 models"):
        otfuse.fuse(models, "paper-wts", example_input=x, weights=(1, 1, 1))
    with pytest.raises(OtfuseError, match=r"anchor must be an index in 0..1, got 2"):
        otfuse.fuse(models, "paper-wts", example_input=x, anchor=2)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda x: x,
        lambda x: x.numpy(),
        lambda x: TensorDataset(x, torch.zeros(len(x), dtype=torch.long)),
        lambda x: DataLoader(TensorDataset(x), batch_size=5),
        lambda x: [x[:7], x[7:]],
    ],
    ids=["tensor", "array", "TensorDataset", "DataLoader", "list of batches"],
)
def test_every_kind_of_data_gives_the_same_fusion(wrap):
    models, x = [build("mlp"), build("mlp", seed=1)], example("mlp", n=12)
    reference = otfuse.fuse(models, "paper-acts", data=x).model.state_dict()
    fused = otfuse.fuse(models, "paper-acts", data=wrap(x), num_samples=12).model.state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(fused[key], value)


class TinyLM(torch.nn.Module):
    """Token ids (N, T) to next-token scores (N, T, 13), with a position table larger than the
    vocabulary (as nanoGPT's ``wpe``), looked up after the tokens."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.positions = torch.nn.Embedding(32, 8)
        self.embed, self.hidden = torch.nn.Embedding(13, 8), torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 13)

    def forward(self, ids):
        h = self.embed(ids) + self.positions(torch.arange(ids.shape[1]))
        return self.head(torch.relu(self.hidden(h)))


class ImagesWithAPositionTable(torch.nn.Module):
    """uint8 pixels (N, 16) and a learned table indexed by position: not token ids."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.table, self.fc1, self.fc2 = (
            torch.nn.Embedding(16, 1), torch.nn.Linear(16, 8), torch.nn.Linear(8, 3)
        )  # fmt: skip

    def forward(self, x):
        h = x.float() / 255 + self.table(torch.arange(16)).squeeze(1)
        return self.fc2(torch.relu(self.fc1(h)))


def test_integer_inputs_that_no_embedding_looks_up_are_not_token_ids():
    models, x = [ImagesWithAPositionTable(0), ImagesWithAPositionTable(1)], torch.full((2, 16), 250)
    fused = otfuse.fuse(models, "paper-wts", example_input=x.to(torch.uint8)).model
    assert fused(x.to(torch.uint8)).shape == (2, 3)
    # torch.fx makes the arange a constant of the traced graph, which every parent's graph reads
    twin = otfuse.fuse([models[0], models[0]], "paper-wts", example_input=x.to(torch.uint8))
    torch.testing.assert_close(twin.model(x.to(torch.uint8)), models[0](x.to(torch.uint8)))


@pytest.mark.parametrize(
    ("data", "example_ids", "message"),
    [
        (torch.randn(16, 5), None, "data holds float32 values; the models take token ids"),
        (torch.randint(13, 20, (16, 5)), None, "data holds token id 1[3-9], outside the models' "
         r"vocabulary of 13 tokens \(ids 0..12\)"),
        (torch.full((16, 5), -1), None, "data holds token id -1, outside"),
        (None, torch.randint(13, 20, (2, 5)), "example input holds token id 1[3-9], outside"),
    ],
)  # fmt: skip
def test_token_ids_outside_the_vocabulary_or_floats_are_one_line(data, example_ids, message):
    models = [TinyLM(0), TinyLM(1)]
    x = torch.randint(0, 13, (2, 5)) if example_ids is None else example_ids
    for call in (
        lambda: otfuse.fuse(models, "paper-wts", data=data, example_input=x),
        lambda: otfuse.align(models[1], models[0], data=data, example_input=x),
    ):
        with pytest.raises(DataError, match=message):
            call()
    ok = otfuse.fuse(models, "data", data=torch.randint(0, 13, (16, 5)), example_input=x[:2] % 13)
    assert ok.model(x % 13).shape == (2, 5, 13)


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image, self.extra = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(4, 8)
        self.out = torch.nn.Linear(8, 5)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.image(image)).mean((2, 3)) + torch.relu(self.extra(meta)))


def test_models_of_two_inputs_fuse_without_data_and_refuse_data_in_one_line():
    # data for them was a torch.fx RuntimeError (the data stages run the models on one tensor)
    torch.manual_seed(0)
    models = [TwoInputs().eval() for _ in range(2)]
    x = (torch.randn(16, 3, 8, 8), torch.randn(16, 4))
    fused = otfuse.fuse(models, "paper-wts", example_input=x).model
    assert fused(*x).shape == (16, 5)
    itself = otfuse.fuse([models[0], models[0]], example_input=x).model  # the no-data default
    torch.testing.assert_close(itself(*x), models[0](*x))
    items = [(torch.randn(3, 8, 8), torch.randn(4)) for _ in range(32)]
    for call in (otfuse.fuse, lambda ms, **kw: otfuse.align(ms[1], ms[0], mode="acts", **kw)):
        with pytest.raises(DataError, match="take 2 inputs .* not supported") as error:
            call(models, example_input=x, data=items)
        assert "\n" not in str(error.value)
    # data that nothing reads is no reason to refuse
    fused = otfuse.fuse(models, "paper-wts", example_input=x, data=items).model
    assert fused(*x).shape == (16, 5)
    assert otfuse.align(models[1], models[0], example_input=x, data=items)(*x).shape == (16, 5)
