"""Benchmark jaxpurify's L1 regression against HiGHS and MPAX on the same instances.

Usage::

    python benchmarks/bench_l1.py            # full grid (slow: run it on a quiet machine)
    python benchmarks/bench_l1.py --quick    # reduced grid, < 3 minutes
    python benchmarks/bench_l1.py --out DIR  # write DIR/bench_l1.{json,md} (default
                                             # benchmarks/results/)

See ``benchmarks/README.md`` for what every column means and how the peers are configured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from instances import LAWS, make_instances  # noqa: E402
from peers import highs_l1, highs_l1_dual, mpax_l1_batch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

SUCCESS_TOL = {"float64": 1e-8, "float32": 1e-4}
#: sizes above this many rows use a sample of problems for the (slow) peers
LARGE_M = 1000
#: memory budget (bytes) for one MPAX vmapped chunk; MPAX keeps ~4 dense copies of the
#: ``2m x (n+m)`` LP matrix per problem
MPAX_CHUNK_BYTES = 3e9


@dataclass
class Grid:
    sizes: list
    fractions: list
    laws: list
    designs: list
    batch: int
    peer_sample: int
    mpax_eps_small: list
    mpax_eps_large: list
    highs_dual: bool
    scaling_m: list
    scaling_n: list
    scaling_n_m: int
    scaling_batches: list
    scaling_size: tuple
    repeats: int


FULL = Grid(
    sizes=[(400, 100), (2000, 200)],
    fractions=[0.1, 0.2, 0.3],
    laws=list(LAWS),
    designs=["shared", "separate"],
    batch=64,
    peer_sample=8,
    mpax_eps_small=[1e-4, 1e-8],
    mpax_eps_large=[1e-4],
    highs_dual=True,
    scaling_m=[400, 800, 1600, 3200],
    scaling_n=[25, 50, 100, 200, 400],
    scaling_n_m=2000,
    scaling_batches=[1, 8, 64, 256],
    scaling_size=(400, 100),
    repeats=3,
)

QUICK = Grid(
    sizes=[(400, 100)],
    fractions=[0.2],
    laws=list(LAWS),
    designs=["shared", "separate"],
    batch=16,
    peer_sample=8,
    mpax_eps_small=[1e-4],
    mpax_eps_large=[1e-4],
    highs_dual=True,
    scaling_m=[400, 800],
    scaling_n=[50, 100],
    scaling_n_m=400,
    scaling_batches=[1, 16],
    scaling_size=(400, 100),
    repeats=2,
)


@dataclass
class Row:
    size: str
    m: int
    n: int
    design: str
    fraction: float
    law: str
    solver: str
    dtype: str
    batch: int
    timed: int  # problems actually solved and timed (sample for slow peers)
    ms_per_problem: float = math.nan
    speedup_vs_highs: float = math.nan
    median_rel_err: float = math.nan
    max_rel_err: float = math.nan
    success_rate: float = math.nan
    max_obj_rel_diff: float = math.nan
    compile_s: float = math.nan
    iterations_median: float = math.nan
    iterations_max: float = math.nan
    converged_rate: float = math.nan  # solver's own flag (MPAX: status OPTIMAL)
    error: str = ""
    notes: list = field(default_factory=list)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _design(A, i):
    return A if A.ndim == 2 else A[i]


def _objectives(A, Y, X):
    """float64 ``||A_i x_i - y_i||_1`` for the first ``len(X)`` problems."""
    A = np.asarray(A, np.float64)
    X = np.asarray(X, np.float64)
    Y = np.asarray(Y, np.float64)[: len(X)]
    AX = X @ A.T if A.ndim == 2 else np.einsum("bmn,bn->bm", A[: len(X)], X)
    return np.abs(AX - Y).sum(axis=1)


def _rel_err(X, X_true):
    X = np.asarray(X, np.float64)
    X_true = X_true[: len(X)]
    return np.linalg.norm(X - X_true, axis=1) / np.linalg.norm(X_true, axis=1)


def _fill_accuracy(row, X, inst, highs_obj, tol):
    err = _rel_err(X, inst.X_true)
    err = np.where(np.isfinite(err), err, np.inf)
    row.median_rel_err = float(np.median(err))
    row.max_rel_err = float(np.max(err))
    row.success_rate = float(np.mean(err <= tol))
    if highs_obj is not None:
        k = min(len(highs_obj), len(X))
        obj = _objectives(inst.A, inst.Y, np.asarray(X)[:k])
        row.max_obj_rel_diff = float(np.max((obj - highs_obj[:k]) / highs_obj[:k]))


def _divisor_at_most(total, cap):
    cap = max(1, min(total, int(cap)))
    return max(d for d in range(1, cap + 1) if total % d == 0)


def _mpax_chunk(m, n, count, shared):
    per_problem = 4 * 8 * (2 * m) * (n + m)
    cap = MPAX_CHUNK_BYTES // per_problem
    if not shared:
        cap = min(cap, 8)  # measured faster than one 64-wide vmap for separate designs
    return _divisor_at_most(count, cap)


def _ours_available():
    try:
        import jaxpurify  # noqa: F401
        import jaxpurify.recovery  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the checkout
        return None, f"{type(exc).__name__}: {exc}"
    return jaxpurify, ""


def _time_ours(jp, method, A, Y, A_warm, Y_warm, repeats):
    """(solution, best seconds, first-call seconds) with jit warm-up on fresh data."""
    A_warm, Y_warm = jnp.asarray(A_warm), jnp.asarray(Y_warm)
    A, Y = jnp.asarray(A), jnp.asarray(Y)
    t0 = time.perf_counter()
    jax.block_until_ready(jp.l1_regression(A_warm, Y_warm, method=method, throw=False))
    first = time.perf_counter() - t0
    best = math.inf
    sol = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        sol = jp.l1_regression(A, Y, method=method, throw=False)
        jax.block_until_ready(sol)
        best = min(best, time.perf_counter() - t0)
    return sol, best, first


def _cast(inst, dtype):
    return np.asarray(inst.A, dtype), np.asarray(inst.Y, dtype)


# --------------------------------------------------------------------------------------
# main comparison
# --------------------------------------------------------------------------------------


def _settings(grid):
    for si, (m, n) in enumerate(grid.sizes):
        for di, design in enumerate(grid.designs):
            for fi, frac in enumerate(grid.fractions):
                for li, law in enumerate(grid.laws):
                    yield (si, di, fi, li), (m, n, design, frac, law)


def _solvers_for(grid, m, methods):
    out = ["highs"]
    if grid.highs_dual:
        out.append("highs-dual")
    eps_list = grid.mpax_eps_small if m <= LARGE_M else grid.mpax_eps_large
    out += [f"mpax eps={eps:.0e}" for eps in eps_list]
    for method in methods:
        out += [f"jaxpurify {method} f64", f"jaxpurify {method} f32"]
    return out


def run_comparison(grid, jp, methods, seed, pbar):
    rows = []
    for idx, (m, n, design, frac, law) in _settings(grid):
        rng = np.random.default_rng(np.random.SeedSequence([seed, *idx]))
        shared = design == "shared"
        inst = make_instances(rng, grid.batch, m, n, frac, law, shared, np.float64)
        warm = make_instances(rng, grid.batch, m, n, frac, law, shared, np.float64)
        sample = grid.batch if m <= LARGE_M else min(grid.peer_sample, grid.batch)
        base = dict(size=f"{m}x{n}", m=m, n=n, design=design, fraction=frac, law=law)
        highs_obj = None
        highs_ms = math.nan
        for solver in _solvers_for(grid, m, methods):
            pbar.set_postfix_str(f"{m}x{n} {design} {frac} {law} {solver}", refresh=False)
            dtype = "float32" if solver.endswith("f32") else "float64"
            row = Row(**base, solver=solver, dtype=dtype, batch=grid.batch, timed=grid.batch)
            try:
                if solver.startswith("highs"):
                    fn = highs_l1 if solver == "highs" else highs_l1_dual
                    row.timed = sample
                    X = np.empty((sample, n))
                    total = 0.0
                    for i in range(sample):
                        X[i], sec = fn(_design(inst.A, i), inst.Y[i])
                        total += sec
                    row.ms_per_problem = 1e3 * total / sample
                    if solver == "highs":
                        highs_obj = _objectives(inst.A, inst.Y, X)
                        highs_ms = row.ms_per_problem
                    _fill_accuracy(row, X, inst, highs_obj, SUCCESS_TOL[dtype])
                elif solver.startswith("mpax"):
                    eps = float(solver.split("=")[1])
                    row.timed = sample
                    A = inst.A if shared else inst.A[:sample]
                    chunk = _mpax_chunk(m, n, sample, shared)
                    X, sec, info = mpax_l1_batch(
                        A, inst.Y[:sample], eps, chunk=chunk, return_info=True
                    )
                    row.ms_per_problem = 1e3 * sec / sample
                    row.compile_s = info["compile_seconds"]
                    row.iterations_median = float(np.median(info["iterations"]))
                    row.iterations_max = float(np.max(info["iterations"]))
                    row.converged_rate = float(np.mean(info["status"] == 2))
                    row.notes.append(f"vmap chunk {chunk}")
                    _fill_accuracy(row, X, inst, highs_obj, SUCCESS_TOL[dtype])
                else:
                    method = solver.split()[1]
                    np_dtype = np.float32 if dtype == "float32" else np.float64
                    A, Y = _cast(inst, np_dtype)
                    Aw, Yw = _cast(warm, np_dtype)
                    sol, sec, first = _time_ours(jp, method, A, Y, Aw, Yw, grid.repeats)
                    row.ms_per_problem = 1e3 * sec / grid.batch
                    row.compile_s = first
                    it = np.asarray(sol.iterations)
                    row.iterations_median = float(np.median(it))
                    row.iterations_max = float(np.max(it))
                    row.converged_rate = float(np.mean(np.asarray(sol.converged)))
                    res = np.asarray(sol.result)
                    if np.any(res != 0):
                        codes, counts = np.unique(res[res != 0], return_counts=True)
                        row.notes.append(
                            "result codes "
                            + ", ".join(f"{c}:{k}" for c, k in zip(codes, counts, strict=True))
                        )
                    _fill_accuracy(row, np.asarray(sol.x), inst, highs_obj, SUCCESS_TOL[dtype])
            except Exception as exc:  # keep going: a crash is a result too
                row.error = f"{type(exc).__name__}: {exc}"[:500]
                traceback.print_exc(file=sys.stderr)
            if solver != "highs" and np.isfinite(highs_ms):
                row.speedup_vs_highs = highs_ms / row.ms_per_problem
            elif solver == "highs":
                row.speedup_vs_highs = 1.0
            rows.append(row)
            pbar.update(1)
    return rows


def count_comparison_jobs(grid, methods):
    return sum(len(_solvers_for(grid, m, methods)) for _, (m, *_r) in _settings(grid))


# --------------------------------------------------------------------------------------
# scaling of the default method
# --------------------------------------------------------------------------------------


def _scaling_points(grid):
    pts = []
    for m in grid.scaling_m:
        pts.append(("m", m, 100, grid.batch, "separate"))
    for n in grid.scaling_n:
        pts.append(("n", grid.scaling_n_m, n, grid.batch, "separate"))
    for design in grid.designs:
        for b in grid.scaling_batches:
            pts.append(("batch", *grid.scaling_size, b, design))
    return [(ax, m, n, b, d, dt) for ax, m, n, b, d in pts for dt in ("float64", "float32")]


def run_scaling(grid, jp, method, seed, pbar):
    rows = []
    for k, (axis, m, n, b, design, dtype) in enumerate(_scaling_points(grid)):
        pbar.set_postfix_str(f"scaling {axis}: {m}x{n} B={b} {design} {dtype}", refresh=False)
        rng = np.random.default_rng(np.random.SeedSequence([seed, 99, k]))
        shared = design == "shared"
        inst = make_instances(rng, b, m, n, 0.2, "gaussian", shared, np.float64)
        warm = make_instances(rng, b, m, n, 0.2, "gaussian", shared, np.float64)
        np_dtype = np.float32 if dtype == "float32" else np.float64
        rec = dict(axis=axis, m=m, n=n, batch=b, design=design, dtype=dtype, method=method)
        try:
            A, Y = _cast(inst, np_dtype)
            Aw, Yw = _cast(warm, np_dtype)
            sol, sec, first = _time_ours(jp, method, A, Y, Aw, Yw, grid.repeats)
            err = _rel_err(np.asarray(sol.x), inst.X_true)
            rec.update(
                ms_per_problem=1e3 * sec / b,
                ms_per_batch=1e3 * sec,
                first_call_s=first,
                median_rel_err=float(np.median(err)),
                success_rate=float(np.mean(err <= SUCCESS_TOL[dtype])),
                iterations_max=float(np.max(np.asarray(sol.iterations))),
                error="",
            )
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"[:500]
            traceback.print_exc(file=sys.stderr)
        rows.append(rec)
        pbar.update(1)
    return rows


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------


def _fmt(x, kind):
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a" if x is None or np.isnan(x) else str(x)
    if kind == "ms":
        return f"{x:.3g}" if x < 1000 else f"{x:,.0f}"
    if kind == "x":
        return f"{x:.3g}x"
    if kind == "e":
        return f"{x:.1e}"
    if kind == "pct":
        return f"{100 * x:.0f}%"
    return str(x)


def _jsonable(obj):
    if isinstance(obj, float) and not np.isfinite(obj):
        return None if np.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    return obj


def write_markdown(path, meta, rows, scaling):
    L = []
    L.append("# L1 regression benchmark: jaxpurify vs HiGHS vs MPAX\n")
    L.append(f"- date: {meta['date']}, mode: {'quick' if meta['quick'] else 'full'}")
    L.append(
        f"- machine: {meta['machine']}, {meta['cpu_count']} CPUs, JAX backend {meta['jax_backend']}"
    )
    L.append("- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    L.append(f"- batch {meta['batch']} per setting; seed {meta['seed']}")
    if meta.get("ours_missing"):
        L.append(f"- **jaxpurify solver not available** ({meta['ours_missing']}); peers only")
    L.append(
        "- HiGHS, HiGHS-dual and MPAX rows marked `k/B` timed a sample of the first k of "
        "the B problems (per-problem time extrapolated); their accuracy columns are over "
        "that sample. Objective rel-diff is always over the HiGHS sample."
    )
    L.append(
        "- timings are wall clock; ours and MPAX exclude compilation (column `compile/first "
        "s`: MPAX ahead-of-time compile, ours first jitted call on other data of the same "
        "shape). Success: rel err <= 1e-8 (float64) / 1e-4 (float32)."
    )
    L.append("")
    head = (
        "| size | design | fraction | law | solver | ms/problem | speedup vs HiGHS | "
        "median rel err | success rate | max obj rel-diff vs HiGHS | compile/first s | "
        "notes |"
    )
    L.append(head)
    L.append("|" + "---|" * 12)
    for r in rows:
        notes = list(r.notes)
        if r.timed != r.batch:
            notes.insert(0, f"sampled {r.timed}/{r.batch}")
        if r.error:
            notes.append("ERROR: " + r.error.replace("|", "/").replace("\n", " ")[:120])
        if np.isfinite(r.iterations_max):
            notes.append(f"iters med/max {r.iterations_median:.0f}/{r.iterations_max:.0f}")
        if r.solver.startswith("jaxpurify") and np.isfinite(r.converged_rate):
            if r.converged_rate < 1:
                notes.append(f"converged {100 * r.converged_rate:.0f}%")
        if r.solver.startswith("mpax") and np.isfinite(r.converged_rate):
            if r.converged_rate < 1:
                notes.append(f"OPTIMAL {100 * r.converged_rate:.0f}%")
        L.append(
            f"| {r.size} | {r.design} | {r.fraction} | {r.law} | {r.solver} | "
            f"{_fmt(r.ms_per_problem, 'ms')} | {_fmt(r.speedup_vs_highs, 'x')} | "
            f"{_fmt(r.median_rel_err, 'e')} | {_fmt(r.success_rate, 'pct')} | "
            f"{_fmt(r.max_obj_rel_diff, 'e')} | {_fmt(r.compile_s, 'ms')} | "
            f"{'; '.join(notes)} |"
        )
    if scaling:
        L.append("")
        L.append(f"## Scaling of the default method (`{scaling[0]['method']}`)\n")
        L.append("fraction 0.2, gaussian errors; ms/problem = best of repeats / batch.\n")
        for axis, title in (
            ("m", "vs m (n = 100)"),
            ("n", "vs n (m fixed)"),
            ("batch", "vs batch size"),
        ):
            sub = [s for s in scaling if s["axis"] == axis]
            if not sub:
                continue
            L.append(f"### {title}\n")
            L.append(
                "| m | n | batch | design | dtype | ms/problem | ms/batch | first call s | "
                "median rel err | success rate | max iters |"
            )
            L.append("|" + "---|" * 11)
            for s in sub:
                if s.get("error"):
                    L.append(
                        f"| {s['m']} | {s['n']} | {s['batch']} | {s['design']} | "
                        f"{s['dtype']} | ERROR: {s['error'][:80]} |||||"
                    )
                    continue
                L.append(
                    f"| {s['m']} | {s['n']} | {s['batch']} | {s['design']} | {s['dtype']} | "
                    f"{_fmt(s['ms_per_problem'], 'ms')} | {_fmt(s['ms_per_batch'], 'ms')} | "
                    f"{s['first_call_s']:.2f} | {_fmt(s['median_rel_err'], 'e')} | "
                    f"{_fmt(s['success_rate'], 'pct')} | {s['iterations_max']:.0f} |"
                )
            L.append("")
    Path(path).write_text("\n".join(L) + "\n")


def _versions():
    out = {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__}
    for mod in ("scipy", "highspy", "mpax", "jaxpurify"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod)
        except Exception:
            out[mod] = "?"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced grid (< 3 minutes)")
    ap.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results"),
        help="output directory (default benchmarks/results/)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-scaling", action="store_true", help="skip the scaling section")
    ap.add_argument("--no-ours", action="store_true", help="peers only")
    ap.add_argument("--sizes", nargs="+", metavar="MxN",
                    help="only these sizes of the grid, e.g. --sizes 400x100")
    args = ap.parse_args(argv)

    grid = QUICK if args.quick else FULL
    if args.sizes:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
        grid = dataclasses.replace(grid, sizes=sizes)
    jp, missing = (None, "--no-ours") if args.no_ours else _ours_available()
    methods = tuple(jp.recovery.METHODS) if jp is not None else ()
    if jp is None:
        print(f"[bench_l1] jaxpurify solver not available ({missing}); peers only", file=sys.stderr)

    # warm scipy/HiGHS once so the first timed solve does not pay for imports
    A0, Y0, _, _ = make_instances(123, 1, 40, 5, 0.2, "gaussian", True)
    highs_l1(A0, Y0[0])
    highs_l1_dual(A0, Y0[0])

    scaling_points = 0 if (jp is None or args.no_scaling) else len(_scaling_points(grid))
    total = count_comparison_jobs(grid, methods) + scaling_points
    t_start = time.perf_counter()
    with tqdm(total=total, desc="bench_l1", dynamic_ncols=True) as pbar:
        rows = run_comparison(grid, jp, methods, args.seed, pbar)
        scaling = []
        if scaling_points:
            scaling = run_scaling(grid, jp, methods[0], args.seed, pbar)

    meta = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "seed": args.seed,
        "batch": grid.batch,
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "versions": _versions(),
        "grid": asdict(grid),
        "methods": list(methods),
        "ours_missing": missing if jp is None else "",
        "success_tol": SUCCESS_TOL,
        "wall_seconds": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": [asdict(r) for r in rows], "scaling": scaling}
    (out / "bench_l1.json").write_text(json.dumps(_jsonable(payload), indent=1) + "\n")
    write_markdown(out / "bench_l1.md", meta, rows, scaling)
    print(
        f"[bench_l1] wrote {out / 'bench_l1.json'} and {out / 'bench_l1.md'} "
        f"in {meta['wall_seconds']:.0f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
