"""Float32 recovery with full-precision products vs XLA's default precision, same problems.

On GPUs/TPUs XLA's default float32 product is reduced precision (TF32 / bfloat16 passes);
jaxpurify traces its solver under ``jax.default_matmul_precision("highest")``. This compares
``l1_regression`` with ``l1_regression.__wrapped__`` (the same function without that
setting) on one batch, and times float64 alongside. On a CPU both float32 rows agree.

    python benchmarks/bench_precision.py [--out results/precision.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from jaxpurify.recovery import l1_regression


def _instances(batch=64, m=400, n=100, fraction=0.2, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(batch, m, n))
    x = rng.normal(size=(batch, n))
    y = np.einsum("bmn,bn->bm", a, x)
    k = int(fraction * m)
    for b in range(batch):
        idx = rng.choice(m, k, replace=False)
        y[b, idx] += 10 * rng.standard_cauchy(k)
    return a, x, y


def _run(fn, a, y, x):
    fn(a, y, throw=False).x.block_until_ready()  # compile
    t0 = time.perf_counter()
    sol = fn(a, y, throw=False)
    sol.x.block_until_ready()
    seconds = time.perf_counter() - t0
    err = (np.linalg.norm(np.asarray(sol.x, np.float64) - x, axis=1)
           / np.linalg.norm(x, axis=1))
    return {"ms_per_problem": 1e3 * seconds / len(x), "median_rel_err": float(np.median(err)),
            "max_rel_err": float(err.max()), "converged": int(np.sum(np.asarray(sol.converged)))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = ap.parse_args(argv)
    a, x, y = _instances()
    a32, y32 = a.astype(np.float32), y.astype(np.float32)
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "problems": "64 x (400 x 100), 20% Cauchy gross errors"}
    res["full_precision"] = _run(l1_regression, a32, y32, x)
    res["xla_default"] = _run(l1_regression.__wrapped__, a32, y32, x)
    jax.config.update("jax_enable_x64", True)
    res["float64"] = _run(l1_regression, a, y, x)
    for key in ("full_precision", "xla_default", "float64"):
        print(f"{key:15s} {res[key]}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
