"""Timing shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, so importable as ``timing``)."""

import time

import numpy as np


def median_time(fn, repeats: int) -> float:
    """Seconds per call of ``fn``: one warm-up call (JAX compiles there), then the median of ``repeats``."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
