"""A/B of batch compaction: the same batch solved eagerly with ``compact=True`` (default) and
``compact=False`` (one vmapped loop that runs until its slowest member), beside HiGHS on a
sample, in one process.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_compaction.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from instances import make_instances  # noqa: E402
from peers import highs_l1  # noqa: E402
from timing import best_ms  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jaxpurify as jp  # noqa: E402

SETTINGS = [("heavy_tailed", 0.3), ("heavy_tailed", 0.1), ("gaussian", 0.3)]


def main(m=400, n=100, batch=64, highs_sample=8):
    print(f"{m}x{n}, batch {batch}, separate designs, float64; ms/problem (best of 3)")
    for law, frac in SETTINGS:
        inst = make_instances(0, batch, m, n, frac, law, False)
        a, y = jnp.asarray(inst.A), jnp.asarray(inst.Y)
        row = {}
        for compact in (True, False):
            ms = best_ms(lambda a=a, y=y, c=compact: jp.l1_regression(a, y, throw=False,
                                                                        compact=c))
            row[compact] = ms / batch
        t0 = time.perf_counter()
        for i in range(highs_sample):
            highs_l1(inst.A[i], inst.Y[i])
        highs = (time.perf_counter() - t0) / highs_sample * 1e3
        print(f"{law:>12} {frac:.1f}: compact {row[True]:.2f}  one loop {row[False]:.2f}  "
              f"HiGHS {highs:.1f}  -> compaction {row[False] / row[True]:.2f}x, "
              f"vs HiGHS {highs / row[True]:.1f}x (one loop {highs / row[False]:.1f}x)")


if __name__ == "__main__":
    main()
