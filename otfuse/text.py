"""A character-level text corpus for language models: Debian's ``fortunes`` files, read offline.

The Debian package ``fortunes`` installs plain-text English fortune files under
``/usr/share/games/fortunes/``: entries separated by lines holding only ``%`` (the ``.dat`` index
files and the ``.u8`` symlinks beside them are skipped). :func:`read_corpus` reads every such file
of a folder, splits the entries between training and validation with a seeded permutation (the same
split for the same folder, seed and share), and :func:`windows` cuts the text into examples for
next-character prediction:

.. math::

    x = (c_s, \\dots, c_{s+T-1}), \\qquad y = (c_{s+1}, \\dots, c_{s+T}),

as an :class:`otfuse.data.Dataset` whose ``images`` are token ids (N, T) and ``labels`` the next
token ids (N, T), both int64, so that :func:`otfuse.training.train` and ``evaluate`` take it as
they take images (loss and accuracy per token).

The vocabulary is fixed: newline and the 95 printable ASCII characters (:data:`VOCABULARY`, 96
symbols). Tabs become spaces; any other character (backspaces, a few non-ASCII bytes) is dropped.

>>> corpus = read_corpus()
>>> train = windows(corpus.train, context=64, count=20_000, seed=0)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from otfuse.data import Dataset
from otfuse.errors import DataError

__all__ = [
    "FORTUNES_DIR",
    "VOCABULARY",
    "Corpus",
    "TextError",
    "decode",
    "encode",
    "read_corpus",
    "text_datasets",
    "windows",
]

FORTUNES_DIR = Path("/usr/share/games/fortunes")
VOCABULARY = "\n" + "".join(chr(c) for c in range(32, 127))
_INDEX = {ch: i for i, ch in enumerate(VOCABULARY)}
_HINT = "install the Debian package fortunes (apt-get install fortunes) or pass a folder of them"


class TextError(DataError):
    """A text corpus is missing, empty, or too short for the windows asked for."""


@dataclass(frozen=True)
class Corpus:
    """The normalised text of a corpus, split by entries.

    Attributes:
        train, validation: the entries of each split joined by blank lines.
        files: the files read, by name, in order.
        entries: the number of entries in each split, ``(train, validation)``.
    """

    train: str
    validation: str
    files: tuple[str, ...]
    entries: tuple[int, int]


def normalise(text: str) -> str:
    """``text`` in :data:`VOCABULARY`: tabs become spaces, other unknown characters are dropped."""
    text = text.replace("\t", " ")
    return "".join(ch for ch in text if ch in _INDEX)


def encode(text: str) -> torch.Tensor:
    """Token ids (len(text),), int64, of normalised ``text``; an unknown character raises."""
    try:
        return torch.tensor([_INDEX[ch] for ch in text], dtype=torch.long)
    except KeyError as exc:
        raise TextError(f"character {exc.args[0]!r} is not in the vocabulary") from None


def decode(ids: torch.Tensor) -> str:
    """The text of token ids (any shape, read flat)."""
    return "".join(VOCABULARY[i] for i in ids.reshape(-1).tolist())


def _fortune_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise TextError(f"no fortune files: {folder} is not a folder; {_HINT}")
    files = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
    ]
    if not files:
        raise TextError(f"no fortune files in {folder}; {_HINT}")
    return files


def _entries(path: Path) -> list[str]:
    """The non-empty entries of one fortune file (separated by lines holding only '%')."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    entries, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    return [e for e in (normalise(e).strip("\n") for e in entries) if e.strip()]


def read_corpus(
    folder: str | Path | None = None, *, validation_share: float = 0.1, seed: int = 0
) -> Corpus:
    """Every fortune file of ``folder`` (default :data:`FORTUNES_DIR`), its entries split between
    training and validation: a permutation seeded by ``seed`` sends ``validation_share`` of them
    to validation. Raises :class:`TextError` when there is nothing to read."""
    if not 0.0 < validation_share < 1.0:
        raise TextError(f"validation_share must be between 0 and 1, got {validation_share}")
    files = _fortune_files(Path(folder) if folder is not None else FORTUNES_DIR)
    entries = [e for path in files for e in _entries(path)]
    if len(entries) < 2:
        raise TextError(f"the fortune files in {files[0].parent} hold fewer than 2 entries")
    order = torch.randperm(len(entries), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(validation_share * len(entries)))
    val, train = sorted(order[:n_val]), sorted(order[n_val:])
    join = lambda idx: "\n\n".join(entries[i] for i in idx)  # noqa: E731
    return Corpus(join(train), join(val), tuple(p.name for p in files), (len(train), len(val)))


def windows(
    text: str, *, context: int, count: int | None = None, seed: int = 0, name: str = "fortunes"
) -> Dataset:
    """Examples of next-character prediction from ``text``: ``count`` windows of ``context + 1``
    characters starting at seeded random offsets, or with ``count=None`` every non-overlapping
    window in order. ``images`` (N, context) are the ids, ``labels`` (N, context) the next ids."""
    if context < 1:
        raise TextError(f"context must be at least 1, got {context}")
    ids = encode(text)
    if len(ids) < context + 1:
        raise TextError(f"text of {len(ids)} characters is shorter than a window ({context + 1})")
    if count is None:
        starts = torch.arange(0, len(ids) - context, context)
    else:
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(ids) - context, (count,), generator=generator)
    span = starts[:, None] + torch.arange(context + 1)
    chunk = ids[span]
    return Dataset(name, "text", chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous(),
                   tuple(VOCABULARY))  # fmt: skip


def text_datasets(
    *,
    context: int,
    train_windows: int,
    validation_windows: int | None,
    seed: int = 0,
    folder: str | Path | None = None,
) -> tuple[Dataset, Dataset]:
    """Training windows (``train_windows`` at seeded offsets) and validation windows (the first
    ``validation_windows`` non-overlapping ones; None: all) of the fortunes corpus."""
    corpus = read_corpus(folder if folder is not None else os.environ.get("OTFUSE_TEXT_DIR"))
    train = windows(corpus.train, context=context, count=train_windows, seed=seed)
    validation = windows(corpus.validation, context=context)
    if validation_windows is not None and validation_windows < len(validation):
        validation = validation.subset(torch.arange(validation_windows))
    return train, validation
