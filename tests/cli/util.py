"""Helpers of the command-line tests: running ``otfuse`` in a subprocess or in-process, and the
tiny models and files they run on.

Each subprocess costs an interpreter and ``import otfuse`` (about 2 s of CPU), so the tests that need
one (the real console entry, PYTHONPATH, exit codes, what reaches stderr) share one batch that runs
concurrently (one worker per core, one torch thread each); everything else runs in-process through
``cli.main``, the console script's entry point.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from otfuse import cli, zoo
from otfuse.checkpoints import save_model

ARCH = "mlpnet:hidden=(16,8)"
THREADS = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}
ENV = {**os.environ, **THREADS}
USER_MODULE = """
from torch import nn

def make_net(width=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 3))
"""


def mlp(seed: int, hidden=(16, 8)) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.create("mlpnet", hidden=hidden)


def save(path: Path, model: nn.Module, record_arch: bool = True) -> None:
    metadata = {"arch": model.otfuse_config} if record_arch else {}
    save_model(path, model, metadata)


def user_net(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 3))


def run(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "otfuse.cli", *args]
    return subprocess.run(
        command, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=300
    )


def run_all(cwd: Path, jobs: dict) -> dict[str, subprocess.CompletedProcess]:
    """Run every job concurrently: id -> args, or id -> (args, extra environment)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {}
        for key, job in jobs.items():
            args, extra = job if isinstance(job, tuple) else (job, {})
            futures[key] = pool.submit(run, cwd, *args, env={**ENV, **extra})
        return {k: f.result() for k, f in futures.items()}


def succeeded(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def one_line_error(stderr: str, *words: str) -> str:
    """The single ``otfuse: error:`` line of ``stderr``, holding ``words``; no traceback."""
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("otfuse: error: "), stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def call(work: Path, monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``cli.main(args)`` in-process, in ``work``: the exit status, stdout and stderr."""
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", list(sys.path))  # --arch module:callable may extend it
    status = cli.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def call_ok(work: Path, monkeypatch, capsys, *args: str) -> str:
    status, out, err = call(work, monkeypatch, capsys, *args)
    assert status == 0, err
    return out
