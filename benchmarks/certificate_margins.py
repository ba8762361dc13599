"""How far from exact are the rows an L1 recovery counts as fit? (The certificate's margin.)

For every recovery problem of the adaptive-edit experiment's 27 attacks (one dataset per
run), solved as :func:`jaxpurify.purify` solves it, this records per problem whose solution
the solver calls interpolated on more than ``n`` rows: whether the solution is the clean unit
(max error <= 1e-5), the solver's count, the largest residual among those rows in roundings
``|r_i| / (eps (|y_i| + (|A||x|)_i))``, and how many rows fall within 1, 2, 4, 8 and 16
roundings. It is the measurement behind ``jaxpurify.purify.ROUNDING_FACTOR``: clean problems'
rows sit within a few roundings, the extra rows of wrong vertices farther out.

    python benchmarks/certificate_margins.py mnist   --out benchmarks/results  # ~10 min
    python benchmarks/certificate_margins.py cifar10 --out benchmarks/results  # ~15 min

writes ``certificate_margins_<dataset>.json`` and prints the summary that
``benchmarks/results/certificate_margins.txt`` holds.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from pathlib import Path

import jax
import numpy as np

FACTORS = (1, 2, 4, 8, 16)


def _problems(prob, vectors, clean, solve) -> list[dict]:
    recovered, sol = solve(prob, vectors)[:2]
    right = np.max(np.abs(np.asarray(recovered) - np.asarray(clean)).reshape(
        vectors.shape[0], -1), axis=1) <= 1e-5
    a = np.asarray(prob.design, np.float64)
    m, n = a.shape[-2:]
    a = np.broadcast_to(a, (vectors.shape[0], m, n)) if a.ndim == 2 else a.reshape(-1, m, n)
    y = np.asarray(vectors - prob.offset, np.float64).reshape(-1, m)
    off = np.abs(np.asarray(prob.offset, np.float64)).reshape(-1, m)
    x = np.asarray(sol.x, np.float64).reshape(-1, n)
    r = np.abs(np.asarray(sol.residual, np.float64)).reshape(-1, m)
    eps = np.finfo(np.asarray(vectors).dtype).eps
    ratio = r / (eps * (np.abs(y) + off + np.einsum("bmn,bn->bm", np.abs(a), np.abs(x))))
    interp = np.asarray(sol.interpolated).reshape(-1, m)
    return [{"right": bool(right[i]), "n": int(n), "count": int(interp[i].sum()),
             "max_ratio": float(ratio[i][interp[i]].max()),
             **{f"within_{f}": int((interp[i] & (ratio[i] <= f)).sum()) for f in FACTORS}}
            for i in range(ratio.shape[0]) if interp[i].sum() > n]


def measure(dataset: str) -> list[dict]:
    """The problems of every attack of the adaptive-edit grid (see the module doc)."""
    from experiments._common import with_options
    from experiments.adaptive_edit import TARGET, _config
    from experiments.backdoor import _load, _Model
    from jaxpurify import attacks as A
    from jaxpurify import subspaces as S
    from jaxpurify.purify import _solve

    cfg = with_options(_config(dataset, False), {})
    ds, mean, std = _load(dataset, cfg)
    x_tr, y_tr = np.asarray(ds.x_train), np.asarray(ds.y_train)
    trigger = functools.partial(A.apply_trigger, kind="badnets",
                                value=A.pixel_value(1.0, mean, std))
    order = np.asarray(jax.random.permutation(jax.random.PRNGKey(7), len(x_tr)))
    xa, ya = x_tr[order[-cfg["edit_images"]:]], y_tr[order[-cfg["edit_images"]:]]
    solve = functools.partial(_solve, method="admm", tol=None, max_iters=20_000,
                              check_every=None)
    out = []
    for coding in ("per-unit", "joint-readout"):
        joint = ("readout",) if coding == "joint-readout" else ()
        model = _Model("one-hidden", dataset, {**cfg, "joint": joint}, x_tr.shape[1:])
        m = model.module
        w = model.train(x_tr, y_tr, 0)
        pc = S._params(w)
        for knowledge in [k for c, k in cfg["settings"] if c == coding]:
            designs = m.designs() if knowledge == "designs" else None
            for filters, conc in itertools.product(cfg["edit_filters"], cfg["concentrations"]):
                edited, _ = A.subspace_edit(m, w, xa, ya, target=TARGET, trigger=trigger,
                                            filters=filters, concentration=conc,
                                            steps=cfg["edit_steps"], designs=designs)
                p = S._params(edited)
                probs = S.designed(m.designs(), p)
                shape = {k: probs[k].offset.shape for k in probs}
                problems = (
                    _problems(probs["conv"], S.filter_vectors(p).reshape(shape["conv"]),
                              S.filter_vectors(pc).reshape(shape["conv"]), solve)
                    + _problems(probs["readout"], S.readout_vectors(p).reshape(shape["readout"]),
                                S.readout_vectors(pc).reshape(shape["readout"]), solve))
                out.append({"coding": coding, "knowledge": knowledge, "filters": filters,
                            "concentration": conc, "problems": problems})
                print(coding, knowledge, filters, conc, len(problems), "problems", flush=True)
    return out


def summary(dataset: str, rows: list[dict]) -> str:
    probs = [s for r in rows for s in r["problems"]]
    right = [s for s in probs if s["right"]]
    wrong = [s for s in probs if not s["right"]]
    lines = [f"{dataset}: {len(probs)} problems interpolating more than n rows (solver's test): "
             f"{len(right)} the clean unit, {len(wrong)} not",
             f"  clean units: largest residual among the interpolated rows "
             f"{max(s['max_ratio'] for s in right):.2f} roundings; fewest rows within 4 "
             f"roundings above n: {min(s['within_4'] - s['n'] for s in right)}"]
    for f in FACTORS:
        above = sum(s[f"within_{f}"] > s["n"] for s in wrong)
        lost = sum(s[f"within_{f}"] <= s["n"] for s in right)
        lines.append(f"  counting rows within {f:>2} roundings: wrong problems still above n "
                     f"{above:3d} of {len(wrong)}, clean problems at or below n {lost}")
    dropped = sorted(s["max_ratio"] for s in wrong if s["within_4"] <= s["n"])
    if dropped:
        lines.append(f"  wrong problems dropped at 4 roundings: {len(dropped)}, their largest "
                     f"interpolated residual {dropped[0]:.1f}-{dropped[-1]:.1f} roundings")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=("mnist", "cifar10"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows = measure(args.dataset)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"certificate_margins_{args.dataset}.json").write_text(json.dumps(rows))
    print(summary(args.dataset, rows))


if __name__ == "__main__":
    main()
