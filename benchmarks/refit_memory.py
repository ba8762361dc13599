"""Peak memory of the certificate's row-masked re-fits with a shared design.

``purify.fit_count`` and ``purify.second_explanation`` solve L1 problems on a subset of each
problem's rows, zeroing the others: a shared ``(m, n)`` design becomes one masked copy per
problem. Solved as one ``(B, m, n)`` batch that is several copies of ``B m n`` floats inside
the solver (the one-patch CIFAR-10 row-space defense at a 5% budget, 64 x 3073 x 2501 in
float64, was killed by the out-of-memory killer there); ``purify._solves_on_rows`` batches them
under ``_MASKED_BATCH_BYTES``. Each mode runs in its own process (peak RSS is per process):

    python benchmarks/refit_memory.py one-batch   # the former code path
    python benchmarks/refit_memory.py bounded     # purify._solves_on_rows

64 float64 problems, 3073 x 1001 Gaussian design, 80% of rows kept, 200 iterations each.
"""

from __future__ import annotations

import resource
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxpurify import purify as P  # noqa: E402
from jaxpurify.recovery import l1_regression  # noqa: E402

M, N, B, ITERS = 3073, 1001, 64, 200


def main(mode: str) -> None:
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((M, N)))
    y = jnp.asarray(rng.standard_normal((B, N)) @ np.asarray(a).T)
    rows = rng.random((B, M)) < 0.8
    t = time.perf_counter()
    if mode == "one-batch":
        keep = jnp.asarray(rows)
        masked = jnp.where(keep[..., None], jnp.broadcast_to(a, (B, M, N)), 0)
        x = np.asarray(l1_regression(masked, jnp.where(keep, y, 0), throw=False,
                                     max_iters=ITERS).x)
    elif mode == "bounded":
        x = np.concatenate([np.asarray(s.x) for _, s in
                            P._solves_on_rows(a, y, rows, np.arange(B), max_iters=ITERS)])
    else:
        raise SystemExit(f"mode is one-batch or bounded, not {mode!r}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{mode}: {B} x {M} x {N} float64, {time.perf_counter() - t:.1f} s, "
          f"peak RSS {peak:.2f} GB, x {x.shape}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bounded")
