"""Purify every layer of a designed LeNet-5 (MNIST) / small VGG (CIFAR-10) network.

``jaxpurify run multilayer-mnist [--quick]`` and ``jaxpurify run multilayer-cifar10``
(measured: LeNet-5, 8 epochs, 82 s of training on 2 CPU cores; small VGG, 20 epochs with
flips and 4-pixel crops, 39 s on an H200 and about an hour on 2 CPU cores, so
``--set codes=PATH`` evaluates codes trained elsewhere):

1. train the designed network (every conv/dense layer stores ``[w_u; b_u] = A_l theta_u``;
   only ``theta`` is trained, with Adam: the subspace holds for any optimizer);
2. clean test accuracy (full test set);
3. contaminate every layer (sparse gross errors, laws ``gaussian`` and ``heavy_tailed``,
   magnitude 10 x the leaf's std; and random single-bit flips) at several fractions, purify
   every layer (one batched L1 regression per layer), evaluate;
4. time the purification (cold: with compilation; warm) and HiGHS on a sample of the
   per-unit L1 problems (extrapolated to every unit);
5. measure the data row-space alternative: the rank of each layer's input-patch span at
   several data sizes, and, on a tiny plain-SGD run, the span the trajectory needs.

Writes ``metrics.json`` (``rows``: one per (noise, fraction)), ``accuracy.png``, and the
trained codes ``codes.npz`` with ``codes.json`` (training time and device); ``codes=PATH``
loads such codes instead of training (train on an accelerator, evaluate anywhere).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments._common import with_options
from jaxpurify import contamination as C
from jaxpurify import multilayer as ML
from jaxpurify.data import default_data_dir, load_cifar10, load_mnist
from jaxpurify.phase_transition import critical_fraction

#: Per experiment: model, data, training, and the sweep (full and quick).
CONFIGS = {
    "multilayer-mnist": {
        "dataset": "mnist", "loader": load_mnist, "model": "LeNet5", "ratio": 4.0,
        "epochs": 8, "lr": 3e-3, "batch_size": 128, "hflip": False, "crop": 0,
        "fractions": (0.0, 0.05, 0.1, 0.2, 0.3, 0.4),
        "laws": ("gaussian", "heavy_tailed", "bit_flips"),
        "row_space_sizes": (1, 10, 100, 1000), "trajectory": True,
        "highs_sample": 4, "highs_max_rows": None, "limit_train": None, "limit_test": None,
        "codes": None,
        "quick": {"epochs": 1.0, "limit_train": 20_000, "fractions": (0.0, 0.1, 0.2, 0.3),
                  "row_space_sizes": (1, 10, 100), "highs_sample": 2},
    },
    "multilayer-cifar10": {
        "dataset": "cifar10", "loader": load_cifar10, "model": "SmallVGG", "ratio": 4.0,
        "epochs": 20, "lr": 2e-3, "batch_size": 128, "hflip": True, "crop": 4,
        "fractions": (0.0, 0.05, 0.1, 0.2, 0.3, 0.4),
        "laws": ("gaussian", "heavy_tailed", "bit_flips"),
        "row_space_sizes": (1, 10, 100), "trajectory": False,
        "highs_sample": 2, "highs_max_rows": None, "limit_train": None, "limit_test": None,
        "codes": None,
        "quick": {"epochs": 1.0, "limit_train": 2_560, "limit_test": 1_000,
                  "fractions": (0.0, 0.1), "laws": ("gaussian", "bit_flips"),
                  "row_space_sizes": (1, 10), "highs_sample": 1, "highs_max_rows": 600},
    },
}

MODELS = {"LeNet5": ML.LeNet5, "SmallVGG": ML.SmallVGG}
LAW_IDS = {"gaussian": 1, "heavy_tailed": 2, "bit_flips": 3}


def _config(name: str, quick: bool) -> dict:
    if name not in CONFIGS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(CONFIGS)}")
    cfg = dict(CONFIGS[name])
    if quick:
        cfg.update(cfg["quick"])
    cfg.pop("quick")
    return cfg


def _load(cfg):
    return cfg["loader"](default_data_dir(), limit_train=cfg["limit_train"],
                         limit_test=cfg["limit_test"])


def contaminate(plain, key, law: str, fraction: float):
    """Every leaf of every layer: ``round(fraction * size)`` corrupted entries."""
    if fraction == 0:
        return plain, jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, bool), plain)
    if law == "bit_flips":
        return C.bit_flips(plain, key, fraction=fraction)
    return C.sparse_gross_errors(plain, key, fraction=fraction, law=law)


def load_codes(model, path) -> tuple[dict, dict]:
    """Trained code params from a ``codes.npz`` written by :func:`run` (and the training
    record ``codes.json`` beside it: seconds, device, last loss)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trained codes at {path}: pass the codes.npz that an "
                                "earlier run of this experiment wrote into its --out folder")
    with np.load(path) as z:
        params = {k: jnp.asarray(z[k]) for k in z.files}
    model.materialize(params)  # checks layer names and shapes, with a clear error
    record = path.with_name("codes.json")
    trained = (json.loads(record.read_text()) if record.is_file()
               else {"seconds": float("nan"), "device": "unknown", "loss_last": float("nan")})
    return params, trained


def _rel_error(a, b) -> float:
    """``||a - b|| / ||b||`` over all leaves (float64 on the host; inf for NaN/Inf)."""
    la = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(a)]
    lb = [np.asarray(y, np.float64) for y in jax.tree_util.tree_leaves(b)]
    num = sum(float(np.sum((x - y) ** 2)) for x, y in zip(la, lb, strict=True))
    den = sum(float(np.sum(y**2)) for y in lb)
    return float(np.sqrt(num / den)) if np.isfinite(num) else float("inf")


def _detection(report, mask, clean, contaminated) -> dict:
    """Detected vs planted corrupted entries (all layers).

    ``missed_max_change``: the largest ``|w_c - w|`` over missed entries, relative to the
    layer's ``max|w|`` (bit flips of low mantissa bits change an entry by ~1e-7: harmless
    and not detectable).
    """
    tp = fp = fn = 0
    missed = 0.0
    for name, r in report.layers.items():
        if not r.designed:
            continue
        for leaf in ("kernel", "bias"):
            truth = np.asarray(mask[name][leaf])
            det = np.asarray(r.corrupted[leaf])
            tp += int(np.sum(truth & det))
            fp += int(np.sum(~truth & det))
            fn += int(np.sum(truth & ~det))
            if np.any(truth & ~det):
                change = np.abs(np.asarray(contaminated[name][leaf], np.float64)
                                - np.asarray(clean[name][leaf], np.float64))[truth & ~det]
                scale = float(np.max(np.abs(np.asarray(clean[name][leaf]))))
                missed = max(missed, float(np.max(change)) / scale)
    return {"true_positives": tp, "false_positives": fp, "false_negatives": fn,
            "missed_max_change": missed}


def _highs_timing(model, plain_c, report, sample: int, seed: int,
                  max_rows: int | None = None) -> dict:
    """HiGHS (scipy linprog) on ``sample`` units per layer; extrapolated to every unit.

    Layers with more than ``max_rows`` rows are skipped (quick runs: one HiGHS solve of the
    2049 x 513 VGG readout problem takes about a minute).
    """
    try:
        import scipy.sparse as sp
        from scipy.optimize import linprog
    except ImportError:  # pragma: no cover - scipy is a test/benchmark extra
        return {"skipped": "scipy not installed"}
    rng = np.random.default_rng(seed)
    designs = model.designs(jnp.float32)
    out, total = {}, 0.0
    for info in model.layer_info():
        if not info.designed:
            continue
        if max_rows is not None and info.rows > max_rows:
            out[info.name] = {"skipped": f"{info.rows} rows > highs_max_rows={max_rows}"}
            continue
        a = np.asarray(designs[info.name], np.float64)
        v = np.asarray(ML.layer_vectors(plain_c[info.name]), np.float64)
        v = np.where(np.isfinite(v), v, 0.0)
        m, n = a.shape
        c = np.concatenate([np.zeros(n), np.ones(m)])
        eye = sp.eye_array(m, format="csc")
        a_s = sp.csc_array(a)
        a_ub = sp.block_array([[a_s, -eye], [-a_s, -eye]], format="csc")
        bounds = [(None, None)] * n + [(0, None)] * m
        units = rng.choice(info.units, size=min(sample, info.units), replace=False)
        secs, ok = [], 0
        for u in units:
            t0 = time.perf_counter()
            res = linprog(c, A_ub=a_ub, b_ub=np.concatenate([v[u], -v[u]]), bounds=bounds,
                          method="highs")
            secs.append(time.perf_counter() - t0)
            ok += int(res.status == 0)
        per = float(np.mean(secs))
        ours = report.layers[info.name].seconds
        out[info.name] = {"problems": info.units, "m": m, "n": n, "sampled": len(units),
                          "highs_solved": ok, "highs_seconds_per_problem": per,
                          "highs_seconds_extrapolated": per * info.units,
                          "ours_seconds_warm": ours}
        total += per * info.units
    timed = [k for k, v in out.items() if "highs_seconds_extrapolated" in v]
    out["total_highs_seconds_extrapolated"] = total
    out["total_ours_seconds_warm"] = sum(report.layers[k].seconds for k in timed)
    out["layers_timed"] = timed
    return out


def _trajectory_row_space(model, x, y, seed: int, *, n: int = 32, steps: int = 100) -> dict:
    """Plain-weights SGD (momentum) on ``n`` images, full batch, from the model's init.

    Every update of layer ``l`` lies in the span of its input patches at the features of
    that step; the union over the trajectory is the exact row-space subspace of the deep
    network. Reports per layer the rank of the patch span at the init features, at the
    final features, and of the union over all steps (against ``fan_in + 1``), and how far
    the actual update ``w_T - w_0`` is from the final-features span (relative residual).
    """
    p0 = model.materialize(jax.jit(model.init)(jax.random.PRNGKey(seed + 7),
                                               jnp.zeros((1, *model.input_shape)))["params"])
    xs, ys = jnp.asarray(x[:n]), jnp.asarray(y[:n])
    tx = optax.sgd(0.05, momentum=0.9)

    @jax.jit
    def step(p, s):
        def loss(p):
            logits = model.apply_plain(p, xs, check=False)
            return optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()

        value, g = jax.value_and_grad(loss)(p)
        upd, s = tx.update(g, s, p)
        return optax.apply_updates(p, upd), s, value

    union, _ = ML.patch_grams(model, p0, xs)
    init_gram = dict(union)
    p, s = p0, tx.init(p0)
    for _ in range(steps):
        p, s, value = step(p, s)
        g, _ = ML.patch_grams(model, p, xs)
        union = {k: union[k] + g[k] for k in union}
    final_gram = g
    acc = float(jnp.mean(jnp.argmax(model.apply_plain(p, xs), -1) == ys))
    out = {"images": n, "steps": steps, "final_loss": float(value), "train_accuracy": acc,
           "layers": {}}
    for info in model.layer_info():
        delta = np.asarray(ML.layer_vectors(p[info.name]) - ML.layer_vectors(p0[info.name]),
                           np.float64)
        basis = ML.principal_directions(final_gram[info.name])[1][
            :, :ML.gram_rank(final_gram[info.name])]
        resid = delta - (delta @ basis) @ basis.T
        out["layers"][info.name] = {
            "dim": info.rows,
            "rank_init_features": ML.gram_rank(init_gram[info.name]),
            "rank_final_features": ML.gram_rank(final_gram[info.name]),
            "rank_union_trajectory": ML.gram_rank(union[info.name]),
            "update_residual_off_final_span": float(np.linalg.norm(resid)
                                                    / max(np.linalg.norm(delta), 1e-30)),
        }
    return out


def _plot(rows, acc_clean, crit, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    laws = [law for law in LAW_IDS if any(r["noise"] == law for r in rows)] or ["none"]
    fig, axes = plt.subplots(1, len(laws), figsize=(4.2 * len(laws), 3.4), squeeze=False)
    for ax, law in zip(axes[0], laws, strict=True):
        rs = sorted((r for r in rows if r["noise"] in (law, "none")),
                    key=lambda r: r["fraction"])
        f = [r["fraction"] for r in rs]
        ax.axhline(acc_clean, color="k", ls="--", lw=1, label="clean")
        ax.plot(f, [r["acc_contaminated"] for r in rs], "o-", color="tab:red",
                label="contaminated")
        ax.plot(f, [r["acc_purified"] for r in rs], "s-", color="tab:green", label="purified")
        ax.axvline(crit, color="gray", ls=":", lw=1, label=f"DT crit. {crit:.2f}")
        ax.set_title(law)
        ax.set_xlabel("corrupted fraction (every layer)")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(loc="lower left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(*, name: str = "multilayer-mnist", quick: bool = False, out: Path | str = "runs/x",
        seed: int = 0, **options) -> dict:
    """Train, contaminate every layer, purify, evaluate; see the module docstring.

    ``options`` override the config entries (e.g. ``epochs=2``, ``fractions=(0.1,)``).
    """
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = with_options(_config(name, quick), options)

    ds = _load(cfg)
    model = MODELS[cfg["model"]](ratio=cfg["ratio"], design_seed=seed)
    infos = model.layer_info()
    print(f"{name}{' (quick)' if quick else ''}: {cfg['model']} ratio {cfg['ratio']}, "
          f"{model.num_params()['codes']} trained codes for {model.num_params()['plain']} "
          f"deployed parameters; train {ds.x_train.shape[0]}, test {ds.x_test.shape[0]}")

    # ---- train (or load codes trained earlier, e.g. on an accelerator)
    key = jax.random.PRNGKey(seed)
    device = jax.devices()[0].device_kind
    if cfg["codes"] is None:
        params = jax.jit(model.init)(key, jnp.zeros((1, *model.input_shape)))["params"]
        steps = max(1, int(round(cfg["epochs"] * (ds.x_train.shape[0] // cfg["batch_size"]))))
        opt = optax.adam(optax.warmup_cosine_decay_schedule(0.0, cfg["lr"],
                                                            min(200, steps // 10), steps))
        t0 = time.perf_counter()
        params, losses = ML.train(model, params, ds.x_train, ds.y_train,
                                  epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                                  optimizer=opt, key=seed, hflip=cfg["hflip"],
                                  crop=cfg["crop"], desc=f"train {cfg['model']}")
        trained = {"seconds": time.perf_counter() - t0, "device": device,
                   "loss_last": float(np.nanmean(losses[-max(1, len(losses) // 10):]))}
        np.savez(out / "codes.npz", **{k: np.asarray(v) for k, v in params.items()})
        (out / "codes.json").write_text(json.dumps(trained, indent=2))  # provenance
    else:
        params, trained = load_codes(model, cfg["codes"])
        print(f"loaded trained codes from {cfg['codes']} (trained on {trained['device']} in "
              f"{trained['seconds']:.0f} s); skipping training")
    train_seconds = trained["seconds"]
    clean = model.materialize(params)
    t0 = time.perf_counter()
    acc_clean = ML.accuracy(model, clean, ds.x_test, ds.y_test)
    eval_seconds = time.perf_counter() - t0
    print(f"clean test accuracy {acc_clean:.4f} (train {train_seconds:.0f} s, "
          f"eval {eval_seconds:.1f} s)")

    # ---- timing: cold (compiles one solver per layer shape) and warm
    key_t = jax.random.fold_in(key, 999)
    plain_c, _ = contaminate(clean, key_t, "gaussian", 0.1)
    _, rep_cold = ML.purify_layers(model, plain_c)
    _, rep_warm = ML.purify_layers(model, plain_c)
    print("purification at 10% gaussian (warm):\n" + rep_warm.summary())
    timing = {
        "cold_seconds": rep_cold.seconds, "warm_seconds": rep_warm.seconds,
        "per_layer": {k: {"cold_seconds": rep_cold.layers[k].seconds,
                          "warm_seconds": rep_warm.layers[k].seconds,
                          "units": rep_warm.layers[k].units,
                          "m": rep_warm.layers[k].rows, "n": rep_warm.layers[k].code_dim}
                      for k in rep_warm.layers},
    }
    t0 = time.perf_counter()
    highs = _highs_timing(model, plain_c, rep_warm, cfg["highs_sample"], seed,
                          cfg["highs_max_rows"])
    timing["highs"] = highs
    if "skipped" in highs:
        print(f"HiGHS timing skipped: {highs['skipped']}")
    else:
        print(f"HiGHS extrapolated: {highs['total_highs_seconds_extrapolated']:.1f} s for "
              f"every unit of {', '.join(highs['layers_timed'])} vs ours (warm) "
              f"{highs['total_ours_seconds_warm']:.2f} s "
              f"(sampling took {time.perf_counter() - t0:.1f} s)")

    # ---- sweep
    rows = []
    for law in cfg["laws"]:
        for fraction in cfg["fractions"]:
            if fraction == 0 and any(r["fraction"] == 0 for r in rows):
                continue  # fraction 0 is the same for every law
            k = jax.random.fold_in(jax.random.fold_in(key, LAW_IDS[law]),
                                   int(round(fraction * 1000)))
            plain_c, mask = contaminate(clean, k, law, fraction)
            acc_c = ML.accuracy(model, plain_c, ds.x_test, ds.y_test)
            recovered, rep = ML.purify_layers(model, plain_c)
            acc_p = ML.accuracy(model, recovered, ds.x_test, ds.y_test)
            row = {
                "dataset": cfg["dataset"], "model": cfg["model"], "subspace": "designed",
                "noise": law if fraction else "none", "fraction": fraction,
                "acc_clean": acc_clean, "acc_contaminated": acc_c, "acc_purified": acc_p,
                "param_rel_error": _rel_error(recovered, clean),
                "contaminated_rel_error": _rel_error(
                    jax.tree_util.tree_map(lambda a: jnp.where(jnp.isfinite(a), a, 0.0),
                                           plain_c), clean),
                "seconds": rep.seconds, "ok": rep.ok,
                "certified_units": sum(r.num_certified for r in rep.layers.values()),
                "converged_units": sum(r.num_converged for r in rep.layers.values()),
                "units": sum(r.units for r in rep.layers.values()),
                "uncertified_by_layer": {n_: r.units - r.num_certified
                                         for n_, r in rep.layers.items()},
                "detection": _detection(rep, mask, clean, plain_c),
                "layer_seconds": {n_: r.seconds for n_, r in rep.layers.items()},
            }
            rows.append(row)
            print(f"{row['noise']:12s} {fraction:5.2f}  clean {acc_clean:.4f}  "
                  f"contaminated {acc_c:.4f}  purified {acc_p:.4f}  "
                  f"rel.err {row['param_rel_error']:.1e}  certified "
                  f"{row['certified_units']}/{row['units']}  {rep.seconds:.1f} s")

    # ---- the data row-space alternative
    t0 = time.perf_counter()
    ranks = {str(n): ML.row_space_ranks(model, clean, ds.x_train[:n])
             for n in cfg["row_space_sizes"]}
    row_space = {"ranks_by_images": ranks}
    if cfg["trajectory"]:
        row_space["trajectory"] = _trajectory_row_space(model, ds.x_train, ds.y_train, seed)
    row_space["seconds"] = time.perf_counter() - t0
    for n, r in ranks.items():
        print(f"row space, {n:>5s} images: " + ", ".join(
            f"{k} {v['rank']}/{v['dim']}" for k, v in r.items()))

    crit = min(float(critical_fraction(i.ratio)) for i in infos if i.designed)
    metrics = {
        "experiment": name, "quick": quick, "seed": seed,
        "config": {k: (v if not callable(v) else v.__name__) for k, v in cfg.items()},
        "model": {"name": cfg["model"], "layers": [i._asdict() for i in infos],
                  **model.num_params()},
        "acc_clean": acc_clean, "train_seconds": train_seconds,
        "train_device": trained["device"], "device": device,
        "train_loss_last": trained["loss_last"],
        "eval_seconds": eval_seconds, "critical_fraction_min": crit,
        "rows": rows, "timing": timing, "row_space": row_space,
        "seconds": time.perf_counter() - t_start,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    _plot(rows, acc_clean, crit, out / "accuracy.png",
          f"{name}{' (quick)' if quick else ''}: every layer contaminated, designed ratio "
          f"{cfg['ratio']}")
    return metrics


def _json_default(o):
    if isinstance(o, np.generic | jax.Array):
        return np.asarray(o).tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)
