"""otfuse.data: IDX and CIFAR-10 readers, their checks, and the Dataset helpers."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from otfuse import data
from otfuse.data import (
    Dataset,
    dataset_names,
    input_shape,
    load_dataset,
    num_classes,
    sample_inputs,
    split_special_class,
)
from otfuse.errors import DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists()
    and not (FASHION_DIR / "train-images-idx3-ubyte").exists(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist, or make data)",
)


@pytest.fixture(autouse=True)
def no_data_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)


# ----------------------------------------------------------------------------------------------
# Helpers writing small files in the real formats


def write_idx(path: Path, magic: int, array: np.ndarray, *, gz: bool = False) -> Path:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_idx_split(folder: Path, split: str, n: int, *, gz: bool = False, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    images_name, labels_name = data.IDX_FILES[split]
    write_idx(folder / images_name, 2051, rng.integers(0, 256, (n, 28, 28)), gz=gz)
    write_idx(folder / labels_name, 2049, np.arange(n) % 10, gz=gz)


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "idx"
    folder.mkdir()
    write_idx_split(folder, "train", 30)
    write_idx_split(folder, "test", 20, seed=1)
    return folder


def write_cifar(folder: Path, n: int = 4, protocol: int = 2) -> Path:
    """A cifar-10-batches-py folder with batches of ``n`` images; image i of a batch is all red
    (255, 0, 0) when i is even and all blue (0, 0, 255) when odd."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = np.zeros((n, 3, 1024), dtype=np.uint8)
    rows[0::2, 0] = 255
    rows[1::2, 2] = 255
    for name in (*data.CIFAR_FILES["train"], *data.CIFAR_FILES["test"]):
        batch = {
            b"batch_label": name.encode(),
            b"labels": [i % 10 for i in range(n)],
            b"data": rows.reshape(n, 3072),
            b"filenames": [f"img{i}.png".encode() for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return folder


def assert_one_line_data_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    assert " --" not in message, "a library error speaks of command-line flags"
    for fragment in fragments:
        assert fragment in message, message


# ----------------------------------------------------------------------------------------------
# Real Fashion-MNIST


@needs_fashion_mnist
def test_fashion_mnist_loads_whole_with_shapes_labels_and_normalisation() -> None:
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.float32
    assert test.images.shape == (10000, 1, 28, 28)
    assert train.labels.dtype == torch.int64 and len(train) == 60000 and len(test) == 10000
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))
    assert int(test.labels.min()) == 0 and int(test.labels.max()) == 9
    assert abs(train.images.mean().item()) < 0.01 and abs(train.images.std().item() - 1) < 0.01
    assert train.classes[0] == "T-shirt/top" and train.num_classes == 10
    assert train.input_shape == (1, 28, 28)


@needs_fashion_mnist
def test_repeated_loads_come_from_the_cache_and_are_independent_copies() -> None:
    first = load_dataset("fashion-mnist", "test")
    hits = data._read_idx_pair_cached.cache_info().hits
    second = load_dataset("fashion-mnist", "test")
    assert data._read_idx_pair_cached.cache_info().hits == hits + 1
    first.images.zero_()
    first.labels.zero_()
    assert torch.equal(second.labels, load_dataset("fashion-mnist", "test").labels)
    assert second.images.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# IDX files: formats and every kind of damage


def test_plain_and_gzipped_idx_files_give_the_same_dataset(idx_dir: Path, tmp_path: Path) -> None:
    gz_dir = tmp_path / "gz"
    gz_dir.mkdir()
    write_idx_split(gz_dir, "train", 30, gz=True)
    plain = load_dataset("mnist", "train", data_dir=idx_dir)
    gzipped = load_dataset("mnist", "train", data_dir=gz_dir)
    assert plain.images.shape == (30, 1, 28, 28)
    assert torch.equal(plain.images, gzipped.images) and torch.equal(plain.labels, gzipped.labels)
    raw = np.random.default_rng(0).integers(0, 256, (30, 28, 28))
    expected = (torch.tensor(raw, dtype=torch.float32) / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(plain.images[:, 0], expected)
    assert plain.labels.tolist() == [i % 10 for i in range(30)]


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        ("bad_magic", ["train-images-idx3-ubyte", "magic number 2049, expected 2051"]),
        ("truncated", ["train-images-idx3-ubyte", "is truncated"]),
        ("trailing", ["train-images-idx3-ubyte", "trailing bytes"]),
        ("short_header", ["train-labels-idx1-ubyte", "no full IDX header"]),
        ("count_mismatch", ["30 images", "29 labels"]),
        ("label_range", ["train-labels-idx1-ubyte", "labels from 0 to 12"]),
        ("missing", ["train-labels-idx1-ubyte (or .gz) is missing", "data_dir"]),
        ("bad_size", ["images of (28, 27)"]),
    ],
)
def test_damaged_idx_files_raise_one_line_data_errors(
    idx_dir: Path, damage: str, fragments: list[str]
) -> None:
    images = idx_dir / "train-images-idx3-ubyte"
    labels = idx_dir / "train-labels-idx1-ubyte"
    if damage == "bad_magic":
        write_idx(images, 2049, np.zeros((30, 28, 28)))
    elif damage == "truncated":
        images.write_bytes(images.read_bytes()[:-100])
    elif damage == "trailing":
        images.write_bytes(images.read_bytes() + b"\0")
    elif damage == "short_header":
        labels.write_bytes(labels.read_bytes()[:5])
    elif damage == "count_mismatch":
        write_idx(labels, 2049, np.zeros(29))
    elif damage == "label_range":
        write_idx(labels, 2049, np.arange(30) % 13)
    elif damage == "missing":
        labels.unlink()
    elif damage == "bad_size":
        write_idx(images, 2051, np.zeros((30, 28, 27)))
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", "train", data_dir=idx_dir)
    assert_one_line_data_error(excinfo, *fragments)


def test_corrupt_gzip_raises_data_error(tmp_path: Path) -> None:
    write_idx_split(tmp_path, "test", 10, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", "test", data_dir=tmp_path)
    assert_one_line_data_error(excinfo, "t10k-images-idx3-ubyte.gz", "cannot read")


def test_a_file_damaged_after_loading_is_noticed(idx_dir: Path) -> None:
    load_dataset("mnist", "test", data_dir=idx_dir)
    images = idx_dir / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-1])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", "test", data_dir=idx_dir)


def test_fashion_mnist_hint_names_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert_one_line_data_error(excinfo, "dataset-fashion-mnist", "data_dir")


# ----------------------------------------------------------------------------------------------
# Choosing the folder


def test_mnist_has_no_default_folder() -> None:
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist")
    assert_one_line_data_error(excinfo, "no default folder", "data_dir")


def test_environment_variable_names_the_folder_or_its_parent(
    idx_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(data.DATA_DIR_ENV, str(idx_dir))
    assert len(load_dataset("mnist", "test")) == 20
    root = idx_dir.parent
    os.rename(idx_dir, root / "mnist")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(root))
    assert len(load_dataset("mnist", "test")) == 20


def test_data_dir_argument_wins_over_the_environment(
    idx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "nowhere"))
    assert len(load_dataset("mnist", "train", data_dir=idx_dir)) == 30
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", "train")


def test_unknown_names_and_splits_are_refused() -> None:
    with pytest.raises(DataError, match="choose one of fashion-mnist, mnist, cifar10"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="unknown split 'val'"):
        load_dataset("mnist", "val")


def test_dataset_facts() -> None:
    assert dataset_names() == ["fashion-mnist", "mnist", "cifar10"]
    assert input_shape("fashion-mnist") == (1, 28, 28) and input_shape("cifar10") == (3, 32, 32)
    assert num_classes("mnist") == 10 and num_classes("CIFAR-10") == 10


# ----------------------------------------------------------------------------------------------
# CIFAR-10


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_folder_in_the_real_format_is_read(tmp_path: Path, protocol: int) -> None:
    folder = write_cifar(tmp_path / "cifar-10-batches-py", n=4, protocol=protocol)
    train = load_dataset("cifar10", "train", data_dir=folder)
    test = load_dataset("cifar10", "test", data_dir=tmp_path)  # the parent folder works too
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.labels.tolist() == [0, 1, 2, 3] * 5
    red, blue = train.images[0, :, 0, 0], train.images[1, :, 0, 0]
    expected_red = (torch.tensor([1.0, 0, 0]) - torch.tensor(data._DATASETS["cifar10"].mean)) / (
        torch.tensor(data._DATASETS["cifar10"].std)
    )
    torch.testing.assert_close(red, expected_red)
    assert blue[2] > 1 and blue[0] < 0
    assert train.classes[0] == "airplane"


def test_cifar_batches_written_by_numpy_1_are_read(tmp_path: Path) -> None:
    """The real files name numpy.core.multiarray (numpy 2 writes numpy._core.multiarray)."""
    folder = write_cifar(tmp_path / "cifar-10-batches-py", n=2)
    path = folder / "test_batch"
    raw = path.read_bytes().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray" in raw
    path.write_bytes(raw)
    assert load_dataset("cifar10", "test", data_dir=folder).images.shape == (2, 3, 32, 32)


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.mkdir, (str(marker),))

    folder = write_cifar(tmp_path / "cifar-10-batches-py")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Exploit()}, protocol=2))
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", "test", data_dir=folder)
    assert_one_line_data_error(excinfo, "test_batch", "refused to load global")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("batch", "fragment"),
    [
        ({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, "expected (N, 3072)"),
        ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}, "no uint8 'data'"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, "4 images but 3 labels"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [10] * 4}, "labels from 10 to 10"),
        ([1, 2, 3], "holds a list"),
    ],
)
def test_malformed_cifar_batches_raise_data_errors(
    tmp_path: Path, batch: object, fragment: str
) -> None:
    folder = write_cifar(tmp_path / "cifar-10-batches-py")
    (folder / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", "train", data_dir=folder)
    assert_one_line_data_error(excinfo, "data_batch_3", fragment)


def test_truncated_and_missing_cifar_batches_raise_data_errors(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path / "cifar-10-batches-py")
    path = folder / "data_batch_2"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="data_batch_2 is not a valid CIFAR-10 batch"):
        load_dataset("cifar10", "train", data_dir=folder)
    path.unlink()
    with pytest.raises(DataError, match="data_batch_2 .or .gz. is missing"):
        load_dataset("cifar10", "train", data_dir=folder)


def test_cifar_has_no_default_folder() -> None:
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10")


# ----------------------------------------------------------------------------------------------
# Dataset helpers


@pytest.fixture
def small() -> Dataset:
    images = torch.arange(50, dtype=torch.float32).view(50, 1, 1, 1)
    return Dataset("toy", "train", images, torch.arange(50) % 10, tuple("abcdefghij"))


def test_subset_keeps_order_and_metadata(small: Dataset) -> None:
    part = small.subset([4, 2, 9])
    assert part.labels.tolist() == [4, 2, 9] and part.images.flatten().tolist() == [4, 2, 9]
    assert part.classes == small.classes and part.name == "toy"
    assert len(small.subset(torch.tensor([], dtype=torch.long))) == 0


def test_loader_is_deterministic_given_seed_and_covers_every_example(small: Dataset) -> None:
    def epochs(seed: int) -> list[list[int]]:
        loader = small.loader(batch_size=16, shuffle=True, seed=seed)
        return [[int(x) for x, _ in loader for x in x.flatten()] for _ in range(2)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    assert first == again and first != other
    assert sorted(first[0]) == list(range(50)) and first[0] != first[1]
    batches = list(small.loader(batch_size=16, shuffle=False))
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    assert torch.equal(torch.cat([x for x, _ in batches]), small.images)


def test_sample_inputs_is_seeded_and_capped(small: Dataset) -> None:
    a, b, c = (
        sample_inputs(small, 10, seed=3),
        sample_inputs(small, 10, 3),
        sample_inputs(small, 10, 4),
    )
    assert a.shape == (10, 1, 1, 1) and torch.equal(a, b) and not torch.equal(a, c)
    assert len(a.flatten().unique()) == 10
    assert len(sample_inputs(small, 500, seed=0)) == 50
    with pytest.raises(DataError):
        sample_inputs(small, 0, seed=0)


def test_split_special_class_partitions_the_indices() -> None:
    labels = torch.arange(1000) % 10
    idx_a, idx_b = split_special_class(labels, special=3, frac_others_a=0.1, seed=0)
    assert (labels[idx_a] == 3).sum() == 100 and (labels[idx_b] == 3).sum() == 0
    assert len(idx_a) == 100 + 90 and len(idx_b) == 810
    assert torch.equal(torch.cat([idx_a, idx_b]).sort().values, torch.arange(1000))
    again = split_special_class(labels.numpy(), 3, 0.1, 0)
    assert torch.equal(again[0], idx_a) and torch.equal(again[1], idx_b)
    assert not torch.equal(split_special_class(labels, 3, 0.1, seed=1)[0], idx_a)
    with pytest.raises(DataError, match="special label 11"):
        split_special_class(labels, 11)
    with pytest.raises(DataError, match="frac_others_a"):
        split_special_class(labels, 3, 1.5)
