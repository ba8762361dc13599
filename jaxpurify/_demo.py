"""``jaxpurify demo``: train a small CNN, contaminate 10% of every weight, purify, compare.

The stages:

1. data: real MNIST from the data directory (``--data-dir``, else ``$JAXPURIFY_DATA_DIR``,
   else ``../shared/data`` beside a source checkout when it holds ``mnist/``); with none, a
   clearly labeled *synthetic* teacher-student task (random images labeled by a random
   network of the student's family);
2. train a :class:`~jaxpurify.models.DesignedOneHiddenLayerCNN` (14x14 patches, 64 filters,
   every filter with its bias stored as ``A_W theta_j``, code ratio 4) with Adam, float64;
3. deploy it (plain filter/readout weights) and contaminate 10% of the entries of every weight
   array with gross errors (Gaussian, 10x the array's std);
4. purify: one batched L1 regression per layer onto the known code subspace;
5. evaluate clean / contaminated / purified on the test set, print a table, and write
   ``metrics.json`` and ``demo.png`` (accuracy bars and a few filters before/after).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

PATCH = 14
FILTERS = 64
CODE_RATIO = 4
FRACTION = 0.10
MAGNITUDE = 10.0
STEPS = 600
BATCH = 128
LR = 3e-3
SYNTH_TRAIN, SYNTH_TEST = 20_000, 5_000


def _load_mnist(data_dir):
    from jaxpurify.data import load_mnist

    ds = load_mnist(data_dir=data_dir, dtype="float64", normalize=True, source="files")
    return {"x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test,
            "y_test": ds.y_test, "name": "MNIST (real data)", "synthetic": False,
            "data_dir": str(data_dir)}


def _synthetic(model, seed: int):
    """Random 28x28 images labeled by a random teacher of the student's family (10 classes).

    The teacher is ``model`` (the designed CNN, same code matrices) at random codes, so the
    student can represent it exactly.
    """
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(seed + 12345)
    kx, kt = jax.random.split(key)
    x = jax.random.normal(kx, (SYNTH_TRAIN + SYNTH_TEST, 28, 28, 1), jnp.float64)
    teacher = model
    tp = teacher.init(kt, x[:1])["params"]
    logits = teacher.apply({"params": tp}, x)
    y = np.asarray(jnp.argmax(logits - logits.mean(0), -1), np.int32)  # balance the classes
    x = np.asarray(x)
    return {"x_train": x[:SYNTH_TRAIN], "y_train": y[:SYNTH_TRAIN],
            "x_test": x[SYNTH_TRAIN:], "y_test": y[SYNTH_TRAIN:],
            "name": "SYNTHETIC teacher-student task (no data directory set)",
            "synthetic": True, "data_dir": None}


def _train(model, x, y, seed: int, bar):
    """Adam on the code params, minibatches; a jitted step in a Python loop (for the bar)."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxpurify.training import cross_entropy_loss

    key = jax.random.PRNGKey(seed)
    params = model.init(key, jnp.asarray(x[:1]))["params"]
    tx = optax.adam(LR)
    opt_state = tx.init(params)
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def step(params, opt_state, idx):
        def loss(p):
            return cross_entropy_loss(model.apply({"params": p}, xj[idx]), yj[idx])

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    rng = np.random.default_rng(seed)
    n = x.shape[0]
    perm, pos, value = rng.permutation(n), 0, None
    for _ in range(STEPS):
        if pos + BATCH > n:
            perm, pos = rng.permutation(n), 0
        params, opt_state, value = step(params, opt_state, jnp.asarray(perm[pos:pos + BATCH]))
        pos += BATCH
        bar.update(1)
        if bar.n % 50 == 0:
            bar.set_postfix(loss=f"{float(value):.3f}")
    return params, float(value)


def _predict(plain, params, x, batch: int = 2500) -> np.ndarray:
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda p, xb: jnp.argmax(plain.apply({"params": p}, xb), -1))
    return np.concatenate([np.asarray(f(params, x[i:i + batch]))
                           for i in range(0, x.shape[0], batch)])


def _rel_error(a, b) -> float:
    import jax

    la = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(a)])
    lb = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(b)])
    return float(np.linalg.norm(la - lb) / np.linalg.norm(lb))


def _plot(path: Path, data_name: str, acc: dict, clean, contaminated, purified,
          flagged) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    show = 6
    fig = plt.figure(figsize=(11, 5.6))
    grid = fig.add_gridspec(4, show + 2, width_ratios=[3, 0.4] + [1] * show)
    ax = fig.add_subplot(grid[:, 0])
    names = list(acc)
    bars = ax.bar(names, [acc[k] for k in names], color=["0.4", "C3", "C2"])
    for b, k in zip(bars, names, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, acc[k] + 0.01, f"{acc[k]:.4f}", ha="center",
                fontsize=9)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{data_name}\n{FRACTION:.0%} of every weight corrupted", fontsize=9)
    rows = (("clean", clean), ("contaminated", contaminated), ("purified", purified),
            ("flagged", None))
    kernels = [np.asarray(p["conv"]["kernel"]) for _, p in rows[:3]]
    lim = np.max(np.abs(kernels[0][..., :show]))
    for i, (label, _) in enumerate(rows):
        for j in range(show):
            a = fig.add_subplot(grid[i, 2 + j])
            if label == "flagged":
                a.imshow(np.asarray(flagged)[:, :, 0, j], cmap="Greys", vmin=0, vmax=1)
            else:
                a.imshow(np.clip(kernels[i][:, :, 0, j], -lim, lim), cmap="RdBu_r", vmin=-lim,
                         vmax=lim)
            a.set_xticks([])
            a.set_yticks([])
            if j == 0:
                a.set_ylabel(label, fontsize=9)
            if i == 0:
                a.set_title(f"filter {j}", fontsize=8)
    fig.text(0.62, 0.98, f"first {show} filters ({PATCH}x{PATCH}); bottom row: entries purify "
             "judged corrupted", ha="center", va="top", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo(out: Path, seed: int = 0, data_dir: str | None = None) -> int:
    """Train, contaminate 10% of every weight, purify; print a table, write out/metrics.json.

    Uses real MNIST when ``data_dir``, ``$JAXPURIFY_DATA_DIR`` or the checkout's
    ``../shared/data`` is available, else a synthetic teacher-student task (printed as such).
    Returns the process exit status (0: the purified network is certified and predicts
    exactly like the clean one).
    """
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from jaxpurify.contamination import sparse_gross_errors
    from jaxpurify.models import DesignedOneHiddenLayerCNN
    from jaxpurify.purify import purify

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from jaxpurify.data import default_data_dir

    data_dir = default_data_dir(data_dir)
    use_real = bool(data_dir)
    stages = ["data", "train", "contaminate", "purify", "evaluate", "plot"]
    bar = tqdm(total=STEPS + len(stages) - 1, desc="demo", unit="step", file=sys.stderr,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}")
    times = {}

    def stage(name):
        bar.set_description(f"demo: {name}")
        times[name] = time.perf_counter()

    def done(name, advance=1):
        times[name] = time.perf_counter() - times[name]
        bar.update(advance)

    model = DesignedOneHiddenLayerCNN(
        FILTERS, PATCH, 1, filter_code_dim=round((PATCH * PATCH + 1) / CODE_RATIO),
        readout_code_dim=FILTERS // CODE_RATIO, num_classes=10, pool="mean",
        design_seed=seed, param_dtype=jnp.float64)

    stage("data")
    data = _load_mnist(data_dir) if use_real else _synthetic(model, seed)
    done("data")

    stage("train")
    code, final_loss = _train(model, data["x_train"], data["y_train"], seed, bar)
    clean = jax.tree_util.tree_map(np.asarray, model.materialize(code))
    plain = model.plain_model()
    done("train", advance=0)

    stage("contaminate")
    contaminated, mask = sparse_gross_errors(clean, jax.random.PRNGKey(seed + 1),
                                             fraction=FRACTION, magnitude=MAGNITUDE)
    done("contaminate")

    stage("purify")
    purified, report = purify(model, contaminated, subspace="designed")
    purified = jax.tree_util.tree_map(lambda v: np.asarray(jax.block_until_ready(v)), purified)
    done("purify")

    stage("evaluate")
    x_test, y_test = jnp.asarray(data["x_test"]), np.asarray(data["y_test"])
    preds = {k: _predict(plain, p, x_test) for k, p in
             (("clean", clean), ("contaminated", contaminated), ("purified", purified))}
    acc = {k: float(np.mean(v == y_test)) for k, v in preds.items()}
    differing = int(np.sum(preds["purified"] != preds["clean"]))
    done("evaluate")

    stage("plot")
    fig = out / "demo.png"
    _plot(fig, data["name"], acc, clean, contaminated, purified,
          report.layers["conv"].corrupted["kernel"])
    done("plot")
    bar.close()

    planted = {k: int(np.sum(np.asarray(m))) for k, m in
               (("conv", np.concatenate([np.ravel(mask["conv"]["kernel"]),
                                         np.ravel(mask["conv"]["bias"])])),
                ("readout", mask["readout"]["kernel"]))}
    layers = {}
    for name, r in report.layers.items():
        if name == "conv":
            truth = np.concatenate([np.ravel(mask["conv"]["kernel"]),
                                    np.ravel(mask["conv"]["bias"])])
            found = np.concatenate([np.ravel(r.corrupted["kernel"]),
                                    np.ravel(r.corrupted["bias"])])
        else:
            truth, found = np.ravel(mask["readout"]["kernel"]), np.ravel(r.corrupted["kernel"])
        layers[name] = {
            "entries": int(truth.size), "planted": planted[name], "flagged": r.num_corrupted,
            "flagged_exactly_the_planted": bool(np.array_equal(truth, found)),
            "ratio": r.ratio, "critical_fraction": r.critical_fraction,
            "converged": r.converged, "certified": r.certified,
        }
    total = time.perf_counter() - t_start
    metrics = {
        "data": data["name"], "synthetic": data["synthetic"], "data_dir": data["data_dir"],
        "train_examples": int(data["x_train"].shape[0]),
        "test_examples": int(data["x_test"].shape[0]),
        "model": {"kind": "DesignedOneHiddenLayerCNN", "patch": PATCH, "filters": FILTERS,
                  "filter_code_dim": model.filter_code_dim,
                  "readout_code_dim": model.readout_code_dim, "dtype": "float64",
                  "optimizer": f"adam({LR})", "steps": STEPS, "batch_size": BATCH,
                  "final_loss": final_loss},
        "contamination": {"law": "gaussian", "fraction": FRACTION, "magnitude": MAGNITUDE,
                          "relative": True},
        "acc_clean": acc["clean"], "acc_contaminated": acc["contaminated"],
        "acc_purified": acc["purified"], "differing_predictions": differing,
        "param_rel_error_contaminated": _rel_error(contaminated, clean),
        "param_rel_error_purified": _rel_error(purified, clean),
        "layers": layers, "report_ok": bool(report.ok), "warnings": report.warnings,
        "seconds": {"data": times["data"], "train": times["train"],
                    "purify": times["purify"], "evaluate": times["evaluate"],
                    "total": total},
        "figure": fig.name,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    ok = report.ok and differing == 0
    print()
    print(f"jaxpurify demo: {data['name']}"
          + (f" from {data['data_dir']}" if data["data_dir"] else ""))
    print(f"  {metrics['train_examples']} training / {metrics['test_examples']} test examples;"
          f" designed one-hidden-layer CNN, {PATCH}x{PATCH} patches, {FILTERS} filters, "
          f"code ratio {CODE_RATIO}, float64")
    print(f"  contamination: {FRACTION:.0%} of the entries of every weight array get a gross "
          f"error (Gaussian, {MAGNITUDE:g}x the array's std)")
    print()
    print(f"  {'network':14s} {'test accuracy':>14s} {'param rel. error':>17s}")
    print(f"  {'clean':14s} {acc['clean']:14.4f} {0.0:17.1e}")
    print(f"  {'contaminated':14s} {acc['contaminated']:14.4f} "
          f"{metrics['param_rel_error_contaminated']:17.1e}")
    print(f"  {'purified':14s} {acc['purified']:14.4f} "
          f"{metrics['param_rel_error_purified']:17.1e}")
    print(f"  test predictions where purified != clean: {differing} of "
          f"{metrics['test_examples']}")
    print()
    print(f"  {'layer':8s} {'entries':>8s} {'planted':>8s} {'flagged':>8s} {'exact':>6s} "
          f"{'ratio':>6s} {'DT crit':>8s} {'certificate':>12s}")
    for name, r in layers.items():
        cert = "certified" if r["converged"] and r["certified"] else "NOT certified"
        print(f"  {name:8s} {r['entries']:8d} {r['planted']:8d} {r['flagged']:8d} "
              f"{'yes' if r['flagged_exactly_the_planted'] else 'no':>6s} {r['ratio']:6.2f} "
              f"{r['critical_fraction']:8.3f} {cert:>12s}")
    for w in report.warnings:
        print(f"  warning: {w}")
    print()
    s = metrics["seconds"]
    print(f"  time: data {s['data']:.1f} s, train {s['train']:.1f} s, purify {s['purify']:.1f} s "
          f"(includes compiling the solver), evaluate {s['evaluate']:.1f} s; "
          f"total {s['total']:.1f} s")
    print(f"  verdict: {'exact recovery, certified' if ok else 'recovery NOT certified'}")
    print(f"  wrote {out / 'metrics.json'} and {fig}")
    return 0 if ok else 1
