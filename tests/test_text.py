"""The fortunes corpus reader: entries, a deterministic split, a fixed vocabulary, windows."""

import os

import pytest
import torch

from otfuse.errors import DataError
from otfuse.text import (
    FORTUNES_DIR,
    VOCABULARY,
    TextError,
    decode,
    encode,
    normalise,
    read_corpus,
    text_datasets,
    windows,
)


@pytest.fixture
def folder(tmp_path):
    """Two fortune files (with their .dat index and .u8 symlink, to be skipped), 20 entries."""
    for name, start in (("alpha", 0), ("beta", 10)):
        entries = [
            f"Fortune number {i}:\n\tsay {'ab' * (i + 1)}\x08!" for i in range(start, start + 10)
        ]
        (tmp_path / name).write_text("\n%\n".join(entries) + "\n%\n")
        (tmp_path / f"{name}.dat").write_bytes(bytes(range(256)))
        os.symlink(tmp_path / name, tmp_path / f"{name}.u8")
    return tmp_path


def entry_set(text):
    return set(text.split("\n\n")) if text else set()


def test_entries_are_split_deterministically_and_disjointly(folder):
    corpus = read_corpus(folder, validation_share=0.2, seed=3)
    assert corpus.files == ("alpha", "beta")
    assert corpus.entries == (16, 4)
    assert read_corpus(folder, validation_share=0.2, seed=3) == corpus
    train, val = entry_set(corpus.train), entry_set(corpus.validation)
    assert len(train) == 16 and len(val) == 4 and not train & val
    other = read_corpus(folder, validation_share=0.2, seed=4)
    assert entry_set(other.validation) != val


def test_the_vocabulary_covers_the_normalised_text(folder):
    corpus = read_corpus(folder, validation_share=0.2)
    text = corpus.train + corpus.validation
    assert "\t" not in text and "\x08" not in text and "%" not in text
    assert set(text) <= set(VOCABULARY) and len(VOCABULARY) == 96
    assert decode(encode(corpus.train)) == corpus.train
    assert normalise("a\tb\x08c\u00e9") == "a bc"


def test_windows_predict_the_next_character():
    text = normalise("The quick brown fox jumps over the lazy dog.\n" * 3)
    data = windows(text, context=8, count=50, seed=1)
    assert data.images.shape == data.labels.shape == (50, 8)
    assert data.images.dtype == data.labels.dtype == torch.long
    assert torch.equal(data.images[:, 1:], data.labels[:, :-1])
    assert torch.equal(windows(text, context=8, count=50, seed=1).images, data.images)
    every = windows(text, context=8)  # non-overlapping, in order
    assert decode(every.images[0]) == text[:8] and decode(every.images[1]) == text[8:16]


def test_bad_input_is_one_line_error(tmp_path):
    for call, match in [
        (lambda: read_corpus(tmp_path / "missing"), "not a folder"),
        (lambda: read_corpus(tmp_path), "no fortune files"),
        (lambda: windows("short", context=8), "shorter than a window"),
        (lambda: encode("caf\u00e9"), "not in the vocabulary"),
        (lambda: read_corpus(tmp_path, validation_share=1.5), "validation_share"),
    ]:
        with pytest.raises(TextError, match=match) as info:
            call()
        assert isinstance(info.value, DataError) and "\n" not in str(info.value)


@pytest.mark.skipif(
    not FORTUNES_DIR.is_dir(),
    reason="Debian package fortunes is not installed (apt-get install fortunes)",
)
def test_the_installed_fortunes_corpus():
    corpus = read_corpus()
    assert "fortunes" in corpus.files and not any(f.endswith((".dat", ".u8")) for f in corpus.files)
    assert corpus.entries[0] > 10_000 and len(corpus.train) > 1_000_000
    train, val = text_datasets(context=32, train_windows=100, validation_windows=20)
    assert train.images.shape == (100, 32) and val.images.shape == (20, 32)
    assert int(train.images.max()) < len(VOCABULARY)
