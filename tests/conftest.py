"""Session-wide set-up: the tests' own modules on the path, torch's thread count, and how the
tests are shared out between parallel workers.

``make test`` runs the suite in parallel (pytest-xdist, one worker per core, ``--dist loadfile``):
each worker gets its share of the cores as torch threads, so that the workers do not oversubscribe
the CPU; a serial run (``pytest``, or ``-n 0``) keeps every core. The tests of one file run on one
worker (their module fixtures are built once), the command-line tests all on one worker (they share
one session fixture: a batch of subprocess runs), and the files with the longest fixtures start
first, so that no worker is left with a long file at the end while the other idles.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# files whose fixtures take longest (the experiments' quick runs, the Ray engine, the CLI batch):
# seconds measured serially on a 2-core machine; started first
LONGEST_FIRST = (
    "tests/test_exp_two_many.py",  # 65 s
    "tests/cli",  # 45 s
    "tests/test_exp_skill_widths_timing.py",  # 50 s
    "tests/test_flower.py",  # 27 s
    "tests/test_transformers_hf.py",  # 25 s
    "tests/test_discovery.py",  # 25 s
    "tests/test_experiment_transformers.py",  # 20 s
    "tests/test_real_data.py",  # 16 s
)


def pytest_configure(config: pytest.Config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _scope(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return "tests/cli" if path.startswith("tests/cli/") else path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a parallel worker, the files of ``LONGEST_FIRST`` first (in that order), then the rest
    in their usual order; every worker collects the same order, which the scheduler keeps."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        rank = {scope: i for i, scope in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(_scope(item.nodeid), len(rank)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadfile`` with the command-line tests as one unit, in collection order."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedCommandLineFixtures(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    config.option.loadscopereorder = False  # keep the collection's order (longest first)
    return SharedCommandLineFixtures(config, log)
