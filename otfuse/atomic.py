"""Atomic writing of any file: an interrupted run leaves the old file (or none), never half of one.

:func:`atomic_path` yields a temporary path beside the target and renames it over the target when the
block succeeds; :func:`atomic_write_text` and :func:`atomic_write_bytes` use it. Everything here is
also importable from :mod:`otfuse.checkpoints`.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from otfuse.errors import OtfuseError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, move it onto ``path``.

    The temporary file keeps the target's suffix (``.plot.png.x1y2.tmp.png``), so writers that pick
    a format from the name work. On success it is fsynced and renamed over ``path`` with
    :func:`os.replace` (atomic); on any exception, Ctrl-C included, it is removed and ``path`` is
    left as it was. Missing parent directories are created. Raises :class:`OtfuseError` if the file
    cannot be written.

    Example::

        with atomic_path("plot.png") as tmp:
            fig.savefig(tmp)
    """
    target = Path(path)
    tmp = _make_temp(target)
    try:
        yield tmp
        _commit(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(target.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); return ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); return ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def _make_temp(target: Path) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}"
        )
    except OSError as exc:
        raise _write_error(target, exc) from exc
    os.close(fd)
    return Path(name)


def _commit(tmp: Path, target: Path) -> None:
    """Flush ``tmp`` to disk, give it the usual permissions and rename it onto ``target``."""
    try:
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except OSError as exc:
        raise _write_error(target, exc) from exc


def fsync_path(path: Path) -> None:
    """Flush a file or a folder to disk (a folder: its renames) where the platform allows it
    (POSIX); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_error(target: Path, exc: OSError) -> OtfuseError:
    return OtfuseError(
        f"cannot write {target}: {exc.strerror or exc}; choose a writable location with free space"
    )
