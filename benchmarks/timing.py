"""Wall-clock timing shared by the benchmark scripts."""

from __future__ import annotations

import math
import time

import jax


def best_ms(fn, repeats: int = 3) -> float:
    """Best of ``repeats`` timed calls of ``fn`` in milliseconds, after one untimed call that
    compiles (every shape the call will see); results are waited for (``block_until_ready``)."""
    jax.block_until_ready(fn())
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best * 1e3
