"""One-hidden-layer CNN purification on real MNIST / CIFAR-10, per subspace source.

``jaxpurify run mnist [--quick]`` and ``jaxpurify run cifar10 [--quick]``. For every subspace
source of :mod:`jaxpurify.subspaces` that can serve at the data size it is given:

* **designed**: a :class:`~jaxpurify.models.DesignedOneHiddenLayerCNN` trained (Adam: the
  code parameterization holds for any optimizer) on the training set; its materialized plain
  params are contaminated and purified with ``subspace="designed"``. Exact at any data size.
* **row_space**: a plain :class:`~jaxpurify.models.OneHiddenLayerCNN` with one whole-image
  patch (``k = 1``, ``d + 1 = H W C + 1``) trained on only ``N < d + 1`` images, two-stage
  (SGD with momentum: the filters with the readout frozen, then the readout with the filters
  frozen), float64. The filters stay in ``w_0 + span{[x_s; 1]}`` and the readout in
  ``beta_0 + span{h(x_s)}``: exact, but the clean accuracy is that of an ``N``-image model.
  At the designed model's data size it cannot serve: its training patches span all of
  ``R^{d+1}`` (the rank is measured and written to ``metrics.json``).
* **lazy**: one unknown per (training sample, class), ``N C`` for ``J (d + 1)`` parameters,
  exact only while no ReLU activation pattern flips on the training inputs and the readout
  stays at init. At the designed model's data size it has more unknowns than parameters. A
  probe trains a small filters-only network at several step sizes and counts the pattern
  flips; the full run purifies the largest step without flips (exact, but the network has
  barely moved from init) and a normal step (patterns flip: the clean filters leave the
  subspace, recovery is approximate and not certified). ``--quick`` runs only the probe.

Each trained network is contaminated at corrupted fractions from 0 to past the
Donoho-Tanner critical fraction of its layers (``jaxpurify.phase_transition``), with the
noise laws sparse ``gaussian`` and ``heavy_tailed`` gross errors (10x the leaf's std),
``sign_flip`` and random single ``bit_flips``, purified, and evaluated on the test set:
accuracy clean / contaminated / purified, the number of test predictions where the
purified network differs from the clean one, the parameter relative error and the report's
certificate (converged and certified for every layer).

``--quick`` (about two minutes on 2 CPU cores): the designed model is smaller (128 filters) and
trained for 300-400 Adam steps on 20 000 (MNIST) / 10 000 (CIFAR-10) images, the row-space
model uses N = 32 images and 128 filters, fewer laws and fractions, a 1000-iteration solver
budget, and the lazy source runs only its probe. The test set is always the full one.

Fraction 0 is one row per source (``noise="none"``); ``worst_problem_fraction`` is the largest
corrupted fraction of a single filter / readout column, which is what breaks first. A solver
budget (``max_iters``) too small for a problem shows as ``converged: false``.

Writes ``metrics.json`` (``rows``: one per (source, noise, fraction); ``sources``: setting,
clean accuracy, whether and why each source can serve) and ``accuracy_vs_fraction.png``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments._common import pyplot, save_fig, write_metrics
from jaxpurify import contamination as C
from jaxpurify import subspaces as S
from jaxpurify.data import default_data_dir, load_cifar10, load_mnist
from jaxpurify.models import DesignedOneHiddenLayerCNN, OneHiddenLayerCNN, extract_patches
from jaxpurify.purify import purify
from jaxpurify.training import fit, sgd

SOURCES = ("designed", "row_space", "lazy")
LAWS = ("gaussian", "heavy_tailed", "sign_flip", "bit_flips")
LAW_IDS = {law: i + 1 for i, law in enumerate(LAWS)}
FIGURE = "accuracy_vs_fraction.png"

_FULL_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_LAZY_PROBE = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3)

#: Per dataset: each source's setting (full run) and the overrides of ``--quick``. Each
#: source may carry its own ``laws`` / ``fractions``; ``max_iters`` is the L1 solver's budget.
CONFIGS = {
    "mnist": {
        "loader": load_mnist,
        "designed": {"patch": 14, "filters": 256, "code_ratio": 4.0, "readout_code": 64,
                     "steps": 3000, "batch_size": 128, "lr": 3e-3, "limit_train": None,
                     "laws": LAWS, "fractions": _FULL_FRACTIONS},
        "row_space": {"limit_train": 64, "filters": 256, "steps": 300, "lr": 0.1,
                      "laws": LAWS, "fractions": _FULL_FRACTIONS},
        "lazy": {"limit_train": 16, "filters": 64, "steps": 100, "lr": 1e-3,
                 "probe_lrs": _LAZY_PROBE, "purify": True, "laws": ("gaussian",),
                 "fractions": (0.0, 0.1, 0.3, 0.5)},
        "limit_test": None,
        "max_iters": 5000,
        "quick": {
            "designed": {"filters": 128, "readout_code": 32, "steps": 400,
                         "limit_train": 20_000, "fractions": (0.0, 0.1, 0.2, 0.3, 0.5)},
            "row_space": {"limit_train": 32, "filters": 128, "laws": ("gaussian", "bit_flips"),
                          "fractions": (0.0, 0.1, 0.2, 0.4)},
            "lazy": {"purify": False, "probe_lrs": (1e-7, 1e-5)},
            "max_iters": 1000,
        },
    },
    "cifar10": {
        "loader": load_cifar10,
        "designed": {"patch": 8, "filters": 256, "code_ratio": 4.0, "readout_code": 64,
                     "steps": 4000, "batch_size": 128, "lr": 3e-3, "limit_train": None,
                     "laws": LAWS, "fractions": _FULL_FRACTIONS},
        "row_space": {"limit_train": 64, "filters": 256, "steps": 100, "lr": 0.01,
                      "laws": LAWS, "fractions": _FULL_FRACTIONS},
        "lazy": {"limit_train": 16, "filters": 64, "steps": 100, "lr": 1e-3,
                 "probe_lrs": _LAZY_PROBE, "purify": True, "laws": ("gaussian",),
                 "fractions": (0.0, 0.1, 0.3, 0.5)},
        "limit_test": None,
        "max_iters": 5000,
        "quick": {
            "designed": {"filters": 128, "readout_code": 32, "steps": 300,
                         "limit_train": 10_000, "fractions": (0.0, 0.1, 0.2, 0.3, 0.5)},
            "row_space": {"limit_train": 32, "filters": 128, "laws": ("gaussian", "sign_flip"),
                          "fractions": (0.0, 0.1, 0.2, 0.4)},
            "lazy": {"purify": False, "probe_lrs": (1e-7, 1e-5)},
            "max_iters": 1000,
        },
    },
}


def _config(name: str, quick: bool, overrides: dict) -> dict:
    if name not in CONFIGS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(CONFIGS)}")
    base = CONFIGS[name]
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items() if k != "quick"}
    if quick:
        for k, v in base["quick"].items():
            if isinstance(v, dict):
                cfg[k].update(v)
            else:
                cfg[k] = v
    for k, v in overrides.items():
        if v is None:
            continue
        if k in ("steps", "limit_train"):  # the designed model's training budget
            cfg["designed"][k] = v
        elif k in ("laws", "fractions"):  # every source
            for s in SOURCES:
                cfg[s][k] = tuple(v)
        elif k in SOURCES:
            cfg[k].update(v)
        else:
            cfg[k] = v
    for s in SOURCES:
        bad = set(cfg[s]["laws"]) - set(LAWS)
        if bad:
            raise ValueError(f"unknown noise laws {sorted(bad)}; choose from {LAWS}")
    return cfg


# --------------------------------------------------------------------------- helpers


def _finite_or_none(v):
    v = float(v)
    return v if math.isfinite(v) else None


def _rel_error(a, b) -> float:
    """Relative error ``||a - b|| / ||b||`` over all leaves (inf if ``a`` is not finite)."""
    da = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(a)])
    db = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(b)])
    if not np.all(np.isfinite(da)):
        return math.inf
    return float(np.linalg.norm(da - db) / np.linalg.norm(db))


def contaminate(params, key, law: str, fraction: float):
    """``(contaminated, mask)``: ``fraction`` of every leaf's entries get ``law``."""
    if law == "none" or fraction == 0:
        return params, jax.tree_util.tree_map(lambda v: np.zeros(np.shape(v), bool), params)
    if law == "bit_flips":
        return C.bit_flips(params, key, fraction=fraction)
    return C.sparse_gross_errors(params, key, fraction=fraction, law=law, magnitude=10.0)


class _Evaluator:
    """Jitted, batched predictions of a plain one-hidden-layer CNN on a fixed test set."""

    def __init__(self, model: OneHiddenLayerCNN, x, y, batch: int = 2500):
        self.apply = jax.jit(lambda p, xb: jnp.argmax(model.apply({"params": p}, xb), -1))
        self.x, self.y, self.batch = x, np.asarray(y), batch

    def predict(self, params) -> np.ndarray:
        n = self.x.shape[0]
        return np.concatenate([np.asarray(self.apply(params, self.x[i:i + self.batch]))
                               for i in range(0, n, self.batch)])

    def accuracy(self, pred) -> float:
        return float(np.mean(pred == self.y))


def _augmented(x, patch):
    """``(N k, d + 1)``: every training patch with a trailing 1 (the bias input)."""
    p = extract_patches(x, patch)
    p = p.reshape(-1, p.shape[-1])
    return jnp.concatenate([p, jnp.ones((p.shape[0], 1), p.dtype)], axis=1)


def _filter_patterns(params, patches_aug):
    """Activation pattern of every (training patch, filter) at ``params``."""
    return np.asarray(patches_aug @ S.filter_vectors(params).T > 0)


def _span_rank(x, patch, limit: int = 2000) -> tuple[int, int]:
    """Rank of the span of the augmented training patches of ``x[:limit]``, and ``d + 1``."""
    a = np.asarray(_augmented(x[:limit], patch))
    return int(np.linalg.matrix_rank(a)), a.shape[1]


def _tqdm(enabled: bool):
    if not enabled:
        return lambda it, **_: it
    from tqdm.auto import tqdm

    return lambda it, **kw: tqdm(it, leave=False, file=sys.stderr, **kw)


# --------------------------------------------------------------------------- sources


def _train_designed(c, ds, x_train, seed):
    chans = x_train.shape[-1]
    d1 = c["patch"] ** 2 * chans + 1
    model = DesignedOneHiddenLayerCNN(
        c["filters"], c["patch"], chans, filter_code_dim=round(d1 / c["code_ratio"]),
        readout_code_dim=c["readout_code"], num_classes=ds.num_classes, pool="mean",
        design_seed=seed, param_dtype=jnp.float64)
    n = x_train.shape[0] if c["limit_train"] is None else min(c["limit_train"],
                                                               x_train.shape[0])
    x, y = x_train[:n], jnp.asarray(ds.y_train[:n])
    key = jax.random.PRNGKey(seed)
    code0 = model.init(key, x[:1])["params"]
    t0 = time.perf_counter()
    code, hist = fit(model, code0, x, y, optimizer=optax.adam(c["lr"]), steps=c["steps"],
                     loss="cross_entropy", batch_size=min(c["batch_size"], n),
                     key=jax.random.fold_in(key, 1))
    plain_params = jax.block_until_ready(model.materialize(code))
    seconds = time.perf_counter() - t0
    setting = {"patch": c["patch"], "patches_per_image": (x.shape[1] // c["patch"]) ** 2,
               "d_plus_1": d1, "filters": c["filters"], "filter_code_dim": model.filter_code_dim,
               "readout_code_dim": c["readout_code"], "train_examples": n,
               "optimizer": f"adam({c['lr']})", "steps": c["steps"],
               "batch_size": min(c["batch_size"], n), "final_loss": float(hist.loss[-1])}
    desc = (f"designed CNN, {c['patch']}x{c['patch']}x{chans} patches, J={c['filters']}, "
            f"r_W={model.filter_code_dim}, r_beta={c['readout_code']}")
    return {"model": model, "plain": model.plain_model(), "params": plain_params,
            "purify": {"subspace": "designed"}, "setting": setting, "description": desc,
            "train_seconds": seconds}


def _train_two_stage(c, ds, x_train, seed):
    n = c["limit_train"]
    x, y = x_train[:n], jnp.asarray(ds.y_train[:n])
    size = x.shape[1]
    model = OneHiddenLayerCNN(c["filters"], size, ds.num_classes, pool="mean",
                              param_dtype=jnp.float64)
    p0 = model.init(jax.random.PRNGKey(seed + 7), x[:1])["params"]
    t0 = time.perf_counter()
    opt = sgd(c["lr"], momentum=0.9)
    p1, _ = fit(model, p0, x, y, optimizer=opt, steps=c["steps"], loss="cross_entropy",
                trainable=("conv",))
    p2, h2 = fit(model, p1, x, y, optimizer=opt, steps=c["steps"], loss="cross_entropy",
                 trainable=("readout",))
    jax.block_until_ready(p2)
    seconds = time.perf_counter() - t0
    d1 = size * size * x.shape[-1] + 1
    setting = {"patch": size, "patches_per_image": 1, "d_plus_1": d1, "filters": c["filters"],
               "train_examples": n, "optimizer": f"sgd({c['lr']}, momentum=0.9), full batch",
               "steps": f"{c['steps']} (filters) + {c['steps']} (readout)",
               "final_loss": float(h2.loss[-1]), "unknowns_per_filter": n,
               "unknowns_per_readout_column": n}
    desc = (f"plain CNN, one whole-image patch ({size}x{size}x{x.shape[-1]}), J={c['filters']}, "
            f"N={n} training images, two-stage SGD")
    return {"model": model, "plain": model, "params": p2,
            "purify": {"subspace": "row_space", "init_params": p0, "inputs": x},
            "setting": setting, "description": desc, "train_seconds": seconds}


def _lazy_network(c, ds, x_train, seed):
    n = c["limit_train"]
    x, y = x_train[:n], jnp.asarray(ds.y_train[:n])
    model = OneHiddenLayerCNN(c["filters"], x.shape[1], ds.num_classes, pool="mean",
                              param_dtype=jnp.float64)
    p0 = model.init(jax.random.PRNGKey(seed + 11), x[:1])["params"]
    return model, p0, x, y


def _train_lazy(c, model, p0, x, y, lr):
    """Filters only (readout frozen at init), full-batch SGD; counts the pattern flips."""
    t0 = time.perf_counter()
    p1, h = fit(model, p0, x, y, optimizer=sgd(lr, momentum=0.9), steps=c["steps"],
                loss="cross_entropy", trainable=("conv",))
    jax.block_until_ready(p1)
    seconds = time.perf_counter() - t0
    aug = _augmented(x, x.shape[1])
    flips = int(np.sum(_filter_patterns(p0, aug) != _filter_patterns(p1, aug)))
    return p1, {"lr": lr, "steps": c["steps"], "activation_flips": flips,
                "activation_patterns": int(aug.shape[0] * c["filters"]),
                "final_loss": float(h.loss[-1]), "train_seconds": seconds}


# --------------------------------------------------------------------------- sweep


def _sweep(entry, evaluator, laws, fractions, seed, dataset, source, bar, max_iters):
    clean = entry["params"]
    pred_clean = evaluator.predict(clean)
    acc_clean = evaluator.accuracy(pred_clean)
    entry["acc_clean"] = acc_clean
    rows = []
    # Fraction 0 is the same network for every law: one row, noise "none".
    grid = [("none", 0.0)] if 0 in fractions else []
    grid += [(law, f) for law in laws for f in fractions if f > 0]
    for law, fraction in bar(grid, desc=f"{dataset}/{source}"):
        key = jax.random.fold_in(jax.random.PRNGKey(seed + 1000 * LAW_IDS.get(law, 0)),
                                 round(fraction * 1000))
        contaminated, mask = contaminate(clean, key, law, fraction)
        t0 = time.perf_counter()
        purified, report = purify(entry["model"], contaminated, max_iters=max_iters,
                                   **entry["purify"])
        jax.block_until_ready(purified)
        seconds = time.perf_counter() - t0
        pred_c = evaluator.predict(contaminated)
        pred_p = evaluator.predict(purified)
        layers = report.layers
        worst = {"conv": float(np.max(np.mean(np.asarray(S.filter_vectors(mask)), axis=1))),
                 "readout": float(np.max(np.mean(np.asarray(mask["readout"]["kernel"]),
                                                 axis=0)))}
        planted = np.concatenate([np.ravel(mask[k][leaf]) for k in ("conv", "readout")
                                  for leaf in sorted(mask[k])])
        flagged = np.concatenate([np.ravel(layers[k].corrupted[leaf])
                                  for k in ("conv", "readout")
                                  for leaf in sorted(layers[k].corrupted)])
        rows.append({
            "dataset": dataset, "model": entry["description"], "subspace": source,
            "source_key": entry["key"], "noise": law, "fraction": fraction,
            "acc_clean": acc_clean,
            "acc_contaminated": evaluator.accuracy(pred_c),
            "acc_purified": evaluator.accuracy(pred_p),
            "differing_predictions": int(np.sum(pred_p != pred_clean)),
            "param_rel_error": _finite_or_none(_rel_error(purified, clean)),
            "param_rel_error_contaminated": _finite_or_none(_rel_error(contaminated, clean)),
            "report_ok": bool(report.ok),
            "planted_entries": int(planted.sum()),
            "flagged_entries": int(flagged.sum()),
            "detection_exact": bool(np.array_equal(planted, flagged)),
            "nonfinite_entries": int(sum(r.num_nonfinite for r in layers.values())),
            "worst_problem_fraction": max(worst.values()),
            "layers": {k: {"converged": r.converged, "certified": r.certified,
                           "detected_fraction": r.fraction,
                           "worst_problem_fraction": worst[k], "ratio": r.ratio,
                           "critical_fraction": r.critical_fraction}
                       for k, r in layers.items()},
            "critical_fraction": min(r.critical_fraction for r in layers.values()),
            "seconds": seconds,
        })
    return rows


# --------------------------------------------------------------------------- plot


def _plot(rows, sources: dict, path: Path, title: str) -> None:
    plt = pyplot()
    panels = [(k, v) for k, v in sources.items() if v.get("served") and
              any(r["source_key"] == k for r in rows)]
    if not panels:
        return
    fig, axes = plt.subplots(2, len(panels), figsize=(4.3 * len(panels), 6.6), squeeze=False,
                             sharex=True)
    colors = dict(zip(LAWS, ("C0", "C1", "C2", "C3"), strict=True))
    marks = dict(zip(LAWS, ("o", "s", "^", "D"), strict=True))
    sizes = dict(zip(LAWS, (40, 28, 20, 12), strict=True))
    for col, (key, info) in enumerate(panels):
        ax, ax2 = axes[0, col], axes[1, col]
        sub = [r for r in rows if r["source_key"] == key]
        ax.axhline(info["acc_clean"], color="k", ls="--", lw=1, label="clean")
        for law in LAWS:
            rs = sorted((r for r in sub if r["noise"] in (law, "none")),
                        key=lambda r: r["fraction"])
            if not any(r["noise"] == law for r in rs):
                continue
            f = np.array([r["fraction"] for r in rs])
            ok = np.array([r["report_ok"] for r in rs])
            acc = np.array([r["acc_purified"] for r in rs])
            ax.plot(f, [r["acc_contaminated"] for r in rs], ":", color=colors[law], lw=1.2)
            ax.plot(f, acc, "-", color=colors[law], lw=1.5, label=law)
            ax.scatter(f[ok], acc[ok], color=colors[law], marker=marks[law], s=sizes[law],
                       zorder=3)
            ax.scatter(f[~ok], acc[~ok], facecolor="none", edgecolor=colors[law],
                       marker=marks[law], s=sizes[law] + 8, zorder=3)
            err = [1e2 if r["param_rel_error"] is None else max(r["param_rel_error"], 1e-17)
                   for r in rs]
            ax2.semilogy(f, err, "-", marker=marks[law], color=colors[law], ms=3, lw=1)
        crit = info.get("critical_fraction")
        for a in (ax, ax2):
            if crit is not None:
                a.axvline(crit, color="gray", lw=1, alpha=0.7)
        ax.set_title(f"{info['label']}\nclean test accuracy {info['acc_clean']:.4f}", fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax2.set_ylim(1e-17, 1e2)
        ax2.set_xlabel("corrupted fraction of every weight array")
        if col == 0:
            ax.set_ylabel("test accuracy\n(solid: purified, dotted: contaminated)")
            ax2.set_ylabel("relative error of purified params")
        ax.legend(fontsize=7, loc="best", framealpha=0.6)
    fig.suptitle(f"{title}. Filled marker: certified; open: not certified. Gray line: "
                 "Donoho-Tanner critical fraction (smallest over the layers)", fontsize=9)
    fig.tight_layout()
    save_fig(fig, path.parent, path.name, dpi=110)


# --------------------------------------------------------------------------- run


def run(*, name: str = "mnist", quick: bool = False, out: Path | str = "runs/mnist",
        seed: int = 0, sources: tuple[str, ...] | None = None,
        laws: tuple[str, ...] | None = None, fractions: tuple[float, ...] | None = None,
        limit_train: int | None = None, steps: int | None = None,
        limit_test: int | None = None, designed: dict | None = None,
        row_space: dict | None = None, lazy: dict | None = None,
        max_iters: int | None = None, data_dir: str | None = None,
        progress: bool = True) -> dict:
    """Run the real-data experiment ``name`` (``"mnist"`` or ``"cifar10"``).

    Args:
        name, quick, out, seed: as for every experiment (see :mod:`jaxpurify.cli`).
        sources: subset of :data:`SOURCES` to run (default all).
        laws, fractions: noise laws / corrupted fractions for every source.
        limit_train, steps: training examples / steps of the designed model.
        limit_test: evaluate on the first ``limit_test`` test images (default: all).
        designed, row_space, lazy: overrides of each source's setting (see :data:`CONFIGS`).
        max_iters: the L1 solver's iteration budget per problem.
        data_dir: data folder (default ``$JAXPURIFY_DATA_DIR``, else ``../shared/data``).
        progress: print progress and show tqdm bars.

    Returns:
        The metrics dict, also written to ``out/metrics.json``.
    """
    jax.config.update("jax_enable_x64", True)
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _config(name, quick, {"limit_train": limit_train, "steps": steps,
                                "limit_test": limit_test, "laws": laws,
                                "fractions": fractions, "designed": designed,
                                "row_space": row_space, "lazy": lazy,
                                "max_iters": max_iters})
    sources = tuple(sources or SOURCES)
    bad = set(sources) - set(SOURCES)
    if bad:
        raise ValueError(f"unknown sources {sorted(bad)}; choose from {SOURCES}")
    bar = _tqdm(progress)
    log = print if progress else (lambda *a, **k: None)

    ds = cfg["loader"](data_dir=default_data_dir(data_dir), dtype="float64", normalize=True,
                       limit_test=cfg["limit_test"])
    x_train, x_test = jnp.asarray(ds.x_train), jnp.asarray(ds.x_test)
    image = [int(s) for s in ds.x_train.shape[1:]]
    log(f"{name}: {ds.x_train.shape[0]} training / {ds.x_test.shape[0]} test images {image}")

    info: dict[str, dict] = {}
    rows: list[dict] = []

    def serve(key, source, entry, c):
        log(f"  {key}: {entry['description']} (trained in {entry['train_seconds']:.1f} s)")
        entry["key"] = key
        ev = _Evaluator(entry["plain"], x_test, ds.y_test)
        new = _sweep(entry, ev, c["laws"], c["fractions"], seed, name, source, bar,
                     cfg["max_iters"])
        rows.extend(new)
        ok = [r for r in new if r["report_ok"]]
        info[key] = {
            "source": source, "served": True,
            "label": f"{key}: {entry['setting']['train_examples']} training images",
            "description": entry["description"], "setting": entry["setting"],
            "dtype": "float64", "acc_clean": entry["acc_clean"],
            "train_seconds": entry["train_seconds"],
            "critical_fraction": min(r["critical_fraction"] for r in new) if new else None,
            "ratio": {k: v["ratio"] for k, v in new[0]["layers"].items()} if new else None,
            "rows": len(new), "certified_rows": len(ok),
            "certified_rows_with_identical_predictions": sum(
                r["differing_predictions"] == 0 for r in ok),
            "largest_certified_fraction": {
                law: max((r["fraction"] for r in ok if r["noise"] == law), default=None)
                for law in c["laws"]},
        }
        log(f"    clean accuracy {entry['acc_clean']:.4f}; certified {len(ok)}/{len(new)} "
            f"rows, {info[key]['certified_rows_with_identical_predictions']} of them with "
            "identical test predictions")

    if "designed" in sources:
        c = cfg["designed"]
        entry = _train_designed(c, ds, x_train, seed)
        serve("designed", "designed", entry, c)
        # The other sources at this data size: measured, not assumed.
        n = entry["setting"]["train_examples"]
        rank, d1 = _span_rank(x_train[:n], c["patch"])
        unknowns, params = n * ds.num_classes, c["filters"] * d1
        info["row_space_at_designed_size"] = {
            "source": "row_space", "served": False, "train_examples": n,
            "patch_span_rank": rank, "d_plus_1": d1, "measured_on_images": min(n, 2000),
            "why": (f"the {c['patch']}x{c['patch']} patches of the first {min(n, 2000)} training "
                    f"images already span R^{d1} (rank {rank}): no redundancy, nothing to "
                    "recover" if rank >= d1 else f"patch span rank {rank} < {d1}")}
        info["lazy_at_designed_size"] = {
            "source": "lazy", "served": False, "train_examples": n, "unknowns": unknowns,
            "parameters": params,
            "why": (f"N x classes = {unknowns} unknowns for {params} filter parameters"
                    + (" (more unknowns than parameters: no redundancy)"
                       if unknowns >= params else "")
                    + "; and trained filters leave the lazy regime (see the lazy probe)")}

    if "row_space" in sources:
        c = cfg["row_space"]
        serve("row_space", "row_space", _train_two_stage(c, ds, x_train, seed), c)

    if "lazy" in sources:
        c = cfg["lazy"]
        model, p0, x, y = _lazy_network(c, ds, x_train, seed)
        ev = _Evaluator(model, x_test, ds.y_test)
        acc_init = ev.accuracy(ev.predict(p0))
        probe, trained = [], {}
        for lr in sorted(set(c["probe_lrs"]) | {c["lr"]}):
            p1, rec = _train_lazy(c, model, p0, x, y, lr)
            rec["acc"] = ev.accuracy(ev.predict(p1))
            probe.append(rec)
            trained[lr] = (p1, rec)
        no_flip = [r["lr"] for r in probe if r["activation_flips"] == 0]
        n, d1 = c["limit_train"], int(np.prod(image)) + 1
        info["lazy_probe"] = {
            "source": "lazy", "served": False, "train_examples": n, "filters": c["filters"],
            "unknowns": n * ds.num_classes, "parameters": c["filters"] * d1,
            "acc_init": acc_init, "probe": probe,
            "largest_lr_without_flips": max(no_flip) if no_flip else None,
            "why": ("the lazy subspace is exact only while no activation pattern flips; "
                    + (f"the largest probed step without flips ({max(no_flip):g}) leaves the "
                       f"network at {trained[max(no_flip)][1]['acc']:.3f} test accuracy "
                       f"(init {acc_init:.3f})" if no_flip else "every probed step flips "
                       "patterns")
                    + f", while the step that learns ({c['lr']:g}: accuracy "
                    f"{trained[c['lr']][1]['acc']:.3f}) flips "
                    f"{trained[c['lr']][1]['activation_flips']} of "
                    f"{trained[c['lr']][1]['activation_patterns']} patterns"),
        }
        log(f"  lazy probe: {info['lazy_probe']['why']}")
        variants = ([("lazy", max(no_flip))] if no_flip else []) + [("lazy_learning", c["lr"])]
        for key, lr in variants if c["purify"] else []:
            p1, rec = trained[lr]
            desc = (f"plain CNN, one whole-image patch, J={c['filters']}, N={n}, filters only "
                    f"(readout frozen), SGD step {lr:g}: {rec['activation_flips']} "
                    "activation flips")
            setting = {"patch": image[0], "patches_per_image": 1, "d_plus_1": d1,
                       "filters": c["filters"], "train_examples": n, **rec}
            entry = {"model": model, "plain": model, "params": p1, "description": desc,
                     "purify": {"subspace": "lazy", "init_params": p0, "inputs": x},
                     "setting": setting, "train_seconds": rec["train_seconds"]}
            serve(key, "lazy", entry, c)
            info[key]["label"] = f"lazy, step {lr:g} ({rec['activation_flips']} flips)"

    _plot(rows, info, out / FIGURE, f"{name}, one-hidden-layer CNN")
    metrics = {
        "experiment": name, "dataset": name, "quick": quick, "seed": seed,
        "command": f"jaxpurify run {name}" + (" --quick" if quick else "")
        + (f" --seed {seed}" if seed else ""),
        "train_examples_available": int(ds.x_train.shape[0]),
        "test_examples": int(ds.x_test.shape[0]), "image": image,
        "laws": {s: list(cfg[s]["laws"]) for s in sources},
        "fractions": {s: list(cfg[s]["fractions"]) for s in sources},
        "max_iters": cfg["max_iters"],
        "contamination": "sparse gross errors: 10 x the leaf's std (gaussian, heavy_tailed) or "
                         "w -> -w (sign_flip); bit_flips: one random bit of the float32 "
                         "representation; the fraction applies to every weight array",
        "sources": info, "rows": rows,
        "figures": [FIGURE] if (out / FIGURE).exists() else [],
        "wall_seconds": time.perf_counter() - t_start,
    }
    write_metrics(out, metrics)
    return metrics
