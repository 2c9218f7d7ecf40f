"""Shared helpers of the benchmark scripts: repeated timing and peak memory of this process."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path


def rss_mib(field: str = "VmRSS") -> float:
    """Resident memory of this process (``VmRSS``) or its peak since the last reset (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def timed(fn: Callable[[], object], repeats: int) -> tuple[list[float], float]:
    """Run ``fn`` ``repeats`` times; returns the wall times and the peak RSS above the start (MiB)."""
    times, peak = [], 0.0
    for _ in range(repeats):
        reset_peak()
        before = rss_mib()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        peak = max(peak, rss_mib("VmHWM") - before)
    return times, peak


def summary(times: list[float]) -> str:
    return f"median {statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f}, n={len(times)})"
