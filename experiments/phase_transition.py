r"""Phase transition: recovery probability over (ratio m/n, corrupted fraction) vs Donoho-Tanner.

For a clean vector ``w = w_0 + A theta`` (``A`` is ``m x n``), a fraction ``rho`` of its ``m``
entries gets gross errors (``jaxpurify.contamination.corrupt_vector``, Gaussian law, 10 std)
and ``w_hat = w_0 + A argmin ||w_c - w_0 - A x||_1`` is computed with
:func:`jaxpurify.l1_regression`; a trial succeeds when ``||w_hat - w|| / ||w|| < 1e-6``.
Three design families, all with the same ``m`` so that one solver call covers them:

* ``filters`` -- the data row-space design of a conv filter: ``m = d + 1`` filter entries
  (``d`` pixels and the bias), ``n`` training patches, columns ``[P_i x; 1]`` with Gaussian
  patches (non-overlapping patches of Gaussian images are i.i.d. Gaussian).
* ``features`` -- the readout design: ``m = J`` filters, ``n`` samples, columns the pooled
  ReLU features ``h(x_s) = mean_i relu(W P_i x_s + b)`` of random filters (rows are i.i.d.
  but not centred: every entry is positive).
* ``gaussian`` -- i.i.d. ``N(0, 1)`` design, the setting of the Donoho-Tanner theory.

Everything for one ratio (all families x fractions x trials) is built by one jitted, vmapped
function (no Python loop over trials) and solved by **one** batched ``l1_regression`` call with
separate designs; the trial axis is sharded over every device (``Mesh(jax.devices(),
("trials",))``, ``NamedSharding(mesh, P("trials"))``; the trial count is padded to a multiple
of the device count), so the same script spreads over a multi-GPU/TPU host unchanged.
Each ratio is one array shape, hence one XLA compilation (the solver's heuristics look at
medians of the residual, so problems of different shapes are not padded into one).

The heatmaps carry the theoretical curve :func:`jaxpurify.phase_transition.critical_fraction`
and the empirical 50% points; ``metrics.json`` lists, per ratio, the empirical 50% fraction
beside the theory. A noise sweep adds dense Gaussian noise (std ``sigma`` relative to the
vector's std) on top of 10% gross errors: the error should grow linearly with ``sigma`` and not
at all with the gross error magnitude (also swept). Finally a few problems per ratio are
solved by HiGHS (``scipy.optimize.linprog(method="highs")`` on the LP form) and the HiGHS
time of a Python loop over the whole grid is extrapolated beside the measured grid time.
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments._common import environment, highs_l1, pyplot, save_fig, write_metrics

#: Design families, in the order of the first axis of :func:`run_grid`'s result.
FAMILIES = ("filters", "features", "gaussian")
#: Success threshold on ``||w_hat - w|| / ||w||``.
SUCCESS_TOL = 1e-6
#: First-order iteration budget per problem (a batch runs until its slowest member stops;
#: problems past the transition are the slow ones and fail either way).
MAX_ITERS = 1000

QUICK = {"m": 40, "ratios": (1.25, 16.0, 8), "fractions": (0.025, 0.8, 8), "trials": 16,
         "feature_dim": 8, "feature_patches": 4, "highs_per_column": 3,
         "noise_sigmas": (1e-8, 1e-1, 8), "noise_magnitudes": (1.0, 1e6, 7),
         "noise_fixed_sigma": 1e-4, "noise_ratio": 4.0, "noise_fraction": 0.1,
         "noise_trials": 16, "noise_max_iters": MAX_ITERS}
FULL = {**QUICK, "m": 100, "ratios": (1.2, 20.0, 20), "fractions": (0.02, 0.8, 20),
        "trials": 50, "highs_per_column": 5, "noise_sigmas": (1e-10, 1e-1, 19),
        "noise_magnitudes": (1.0, 1e8, 17), "noise_trials": 50, "noise_max_iters": 20_000}
#: With dense noise the L1 optimum is a vertex with exactly n interpolated rows, which takes
#: the solver a few thousand iterations to certify (measured: 1300-8200 at m = 40, n = 11);
#: ``--quick`` keeps the grid's budget (and its compilation), and the best point it returns
#: has the same error to within ~7% (measured) but is mostly not certified: see
#: ``noise.converged_fraction`` in the metrics.


class GridResult(NamedTuple):
    """Everything :func:`run_grid` measured (arrays are ``(families, R, F, trials)``)."""

    success: np.ndarray
    rel_error: np.ndarray
    converged: np.ndarray
    result: np.ndarray
    ratios: np.ndarray  # actual m / n per column
    n: np.ndarray
    fractions: np.ndarray
    families: tuple
    column_seconds: np.ndarray  # build + solve + errors, including compilation
    warm_solve_seconds: np.ndarray  # the solve alone, compiled (NaN unless warm_repeat)
    num_devices: int  # devices in the mesh
    devices_used: int  # devices holding the solver's output
    trials_padded: int
    highs: list  # per column: dict with seconds, agreement (when sampled)
    n_max: int


# ------------------------------------------------------------------------ problem builder


def _problem(family, key, m: int, n_max: int, n, feature_dim: int, feature_patches: int):
    """One clean problem: design ``A (m, n_max)``, offset ``w0 (m,)``, clean ``w (m,)``.

    ``family`` (an index into :data:`FAMILIES`) and ``n`` may be traced: the design is drawn
    with ``n_max`` columns and only its first ``n`` columns move ``w`` (the caller keeps those),
    so one compilation of the builder serves every ratio and family. Column ``j`` has its own
    key, so a problem does not depend on ``n_max``.
    """
    k_a, k_b, k_x, k_w0, k_theta = jax.random.split(key, 5)
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    cols = jnp.arange(n_max)

    def per_column(k, shape):  # (n_max, *shape), row j drawn from fold_in(k, j)
        return jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(k, j), shape, dtype))(
            cols)

    def gaussian():
        return per_column(k_a, (m,)).T

    def filters():  # n training patches of d = m - 1 Gaussian pixels, plus the bias entry
        patches = per_column(k_a, (m - 1,))
        return jnp.concatenate([patches, jnp.ones((n_max, 1), dtype)], axis=1).T

    def features():  # pooled ReLU features of J = m random filters, one column per sample
        w = jax.random.normal(k_a, (m, feature_dim), dtype) / math.sqrt(feature_dim)
        bias = 0.5 * jax.random.normal(k_b, (m,), dtype)
        x = per_column(k_x, (feature_patches, feature_dim))
        return jax.nn.relu(jnp.einsum("nkd,jd->nkj", x, w) + bias).mean(axis=1).T

    a = jax.lax.switch(family, [filters, features, gaussian])
    theta = per_column(k_theta, ()) * (cols < n)
    w0 = jax.random.normal(k_w0, (m,), dtype) / math.sqrt(m)
    move = a @ theta
    w = w0 + move * (jnp.linalg.norm(w0) / jnp.linalg.norm(move))  # update as large as w0
    return a, w0, w


@partial(jax.jit, static_argnames=("m", "n_max", "feature_dim", "feature_patches", "law",
                                   "sharding"))
def _build(keys, family, fraction, sigma, magnitude, n, *, m, n_max, feature_dim,
           feature_patches, law, sharding):
    """A batch of corrupted problems; every argument but the static ones is ``(B,)``.

    ``family`` indexes :data:`FAMILIES`. Dense relative noise of std ``sigma`` is added
    before the gross errors (``corrupt_vector``, ``magnitude`` x std, law ``law``). Returns
    ``(A (B, m, n_max), w0, w, w_c)`` sharded along the batch over ``sharding``.
    """
    from jaxpurify.contamination import corrupt_vector, dense_noise

    def one(key, fam, frac, s, mag):
        k_p, k_noise, k_c = jax.random.split(key, 3)
        a, w0, w = _problem(fam, k_p, m, n_max, n, feature_dim, feature_patches)
        noisy, _ = dense_noise(w, k_noise, std=s)
        wc, _ = corrupt_vector(noisy, k_c, fraction=frac, magnitude=mag, law=law)
        return a, w0, w, wc

    out = jax.vmap(one)(keys, family, fraction, sigma, magnitude)
    return tuple(jax.lax.with_sharding_constraint(t, sharding) for t in out)


@jax.jit
def _errors(a, w0, w, x):
    w_hat = w0 + jnp.einsum("bmn,bn->bm", a, x)
    return jnp.linalg.norm(w_hat - w, axis=-1) / jnp.linalg.norm(w, axis=-1)


def trial_sharding(devices=None):
    """``NamedSharding`` of the trial (batch) axis over ``devices`` (default: all)."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = jax.devices() if devices is None else list(devices)
    mesh = Mesh(np.array(devices), ("trials",))
    return NamedSharding(mesh, P("trials"))


@jax.jit
def _trial_keys(key, family_ids, n, fraction_ids, trial_ids):
    """``(families * fractions * trials,)`` keys, family-major then fraction then trial.

    A trial's key depends only on its family, its column ``n``, its fraction index and its
    trial index (not on the other columns, the padding or the devices).
    """

    def k(f, r, j, t):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
            jax.random.fold_in(key, f), r), j), t)

    fam, frac, tr = jnp.meshgrid(family_ids, fraction_ids, trial_ids, indexing="ij")
    return jax.vmap(k, in_axes=(0, None, 0, 0))(fam.ravel(), n, frac.ravel(), tr.ravel())


def columns(m: int, ratios) -> np.ndarray:
    """Distinct numbers of unknowns ``n = round(m / ratio)`` (``1 <= n < m``), descending."""
    n = np.clip(np.round(m / np.asarray(ratios, float)).astype(int), 1, m - 1)
    return np.array(sorted(set(n.tolist()), reverse=True))


def _solve_column(a, w0, wc, max_iters):
    import jaxpurify as jp

    sol = jp.l1_regression(a, wc - w0, throw=False, max_iters=max_iters)
    return sol


def run_grid(ratios, fractions, trials: int, m: int, key, *, families=FAMILIES,
             magnitude: float = 10.0, law: str = "gaussian", max_iters: int = MAX_ITERS,
             threshold: float = SUCCESS_TOL, devices=None, feature_dim: int = 8,
             feature_patches: int = 4, highs_per_column: int = 0, progress: bool = False,
             details: bool = False, warm_repeat: bool = False):
    """Success of L1 recovery over a (ratio x fraction) grid, ``trials`` problems per cell.

    Args:
        ratios: target ratios ``m / n``; ``n = round(m / ratio)`` (duplicates dropped), so
            the actual ratios are ``m / n`` (``GridResult.ratios``).
        fractions: corrupted fractions (``round(fraction * m)`` entries per problem).
        trials: random problems per cell (padded internally to a multiple of the devices).
        m: vector length (filter entries ``d + 1`` / readout entries ``J``).
        key: PRNG key; a trial's problem depends only on its family, ``n``, fraction index
            and trial index, so results do not depend on the other ratios, the padding or
            the device count.
        families: subset of :data:`FAMILIES`.
        magnitude, law: gross errors (``corrupt_vector``; relative to the vector's std).
        max_iters, threshold: solver budget and success threshold on the relative error.
        devices: devices to shard the trials over (default ``jax.devices()``).
        feature_dim, feature_patches: patch size and patches per sample of ``features``.
        highs_per_column: solve this many problems of each column with HiGHS too.
        progress: tqdm bar over the columns.
        details: return a :class:`GridResult` instead of the success array.
        warm_repeat: solve every column a second time and record that (compiled) time too.

    Returns:
        Boolean ``(len(families), R, len(fractions), trials)`` success array (``R`` distinct
        ratios, ascending), or a :class:`GridResult`.
    """
    from tqdm.auto import tqdm

    families = tuple(families)
    fractions = np.asarray(fractions, float)
    ns = columns(m, ratios)
    sharding = trial_sharding(devices)
    ndev = len(sharding.mesh.devices.ravel())
    t_pad = -(-trials // ndev) * ndev
    nf, nfam = len(fractions), len(families)
    fam_ids = np.array([FAMILIES.index(f) for f in families])
    n_max = int(ns.max())
    fam_b = jnp.asarray(np.repeat(fam_ids, nf * t_pad))
    frac_b = jnp.asarray(np.tile(np.repeat(fractions, t_pad), nfam))
    zeros = jnp.zeros_like(frac_b)
    mags = jnp.full_like(frac_b, magnitude)
    rng = np.random.default_rng(0)
    shape = (nfam, len(ns), nf, t_pad)
    err, conv, res = np.zeros(shape), np.zeros(shape, bool), np.zeros(shape, np.int32)
    seconds, warm, highs, used = np.zeros(len(ns)), np.full(len(ns), np.nan), [], 0
    bar = tqdm(ns, desc="phase-transition grid", disable=not progress)
    for r, n in enumerate(bar):
        bar.set_postfix_str(f"m/n = {m}/{n}")
        t0 = time.perf_counter()
        keys = _trial_keys(key, jnp.asarray(fam_ids), int(n), jnp.arange(nf),
                           jnp.arange(t_pad))
        a, w0, w, wc = _build(keys, fam_b, frac_b, zeros, mags, jnp.asarray(n), m=m,
                              n_max=n_max, feature_dim=feature_dim,
                              feature_patches=feature_patches, law=law, sharding=sharding)
        a = a[:, :, :n]
        sol = _solve_column(a, w0, wc, max_iters)
        used = max(used, len(sol.x.sharding.device_set))
        e = _errors(a, w0, w, sol.x)
        err[:, r] = np.asarray(e).reshape(nfam, nf, t_pad)
        conv[:, r] = np.asarray(sol.converged).reshape(nfam, nf, t_pad)
        res[:, r] = np.asarray(sol.result).reshape(nfam, nf, t_pad)
        seconds[r] = time.perf_counter() - t0
        if warm_repeat:
            t1 = time.perf_counter()
            jax.block_until_ready(_solve_column(a, w0, wc, max_iters).x)
            warm[r] = time.perf_counter() - t1
        if highs_per_column:
            highs.append(_highs_sample(a, w0, w, wc, sol, rng, highs_per_column, threshold,
                                       nfam * nf * trials, nf, t_pad, trials))
    bar.close()
    err, conv, res = err[..., :trials], conv[..., :trials], res[..., :trials]
    success = err < threshold
    if not details:
        return success
    return GridResult(success, err, conv, res, m / ns, ns, fractions, families, seconds, warm,
                      ndev, used, t_pad, highs, n_max)


def _highs_sample(a, w0, w, wc, sol, rng, count, threshold, problems, nf, t_pad, trials):
    """HiGHS on ``count`` random real (non-padding) problems of one column."""
    nfam = a.shape[0] // (nf * t_pad)
    picks = []
    for _ in range(count):
        fam, j, t = rng.integers(nfam), rng.integers(nf), rng.integers(trials)
        picks.append(int((fam * nf + j) * t_pad + t))
    times, agree, obj_gap = [], 0, []
    for i in picks:
        ai, w0i, wi, yi = (np.asarray(v[i]) for v in (a, w0, w, wc))
        x, obj, sec = highs_l1(ai, yi - w0i)
        times.append(sec)
        ok_h = np.linalg.norm(w0i + ai @ x - wi) / np.linalg.norm(wi) < threshold
        ok_o = (np.linalg.norm(w0i + ai @ np.asarray(sol.x[i]) - wi) / np.linalg.norm(wi)
                < threshold)
        agree += int(ok_h == ok_o)
        ours = float(np.sum(np.abs(yi - w0i - ai @ np.asarray(sol.x[i]))))
        obj_gap.append(abs(ours - obj) / max(obj, 1e-300))
    mean = float(np.mean(times))
    return {"problems": problems, "sampled": len(picks), "seconds_per_problem": mean,
            "extrapolated_seconds": mean * problems, "success_agreement": agree / len(picks),
            "max_relative_objective_difference": float(np.max(obj_gap))}


# ------------------------------------------------------------------------ analysis


def fifty_percent_fraction(fractions, prob) -> float | None:
    """First crossing of ``prob`` (success vs fraction) below 0.5, linearly interpolated.

    ``None`` when the probability never reaches 0.5 from above inside the grid.
    """
    fractions, prob = np.asarray(fractions, float), np.asarray(prob, float)
    if prob[0] < 0.5:
        return None
    below = np.nonzero(prob < 0.5)[0]
    if below.size == 0:
        return None
    i = int(below[0])
    f0, f1, p0, p1 = fractions[i - 1], fractions[i], prob[i - 1], prob[i]
    return float(f0 + (p0 - 0.5) / (p0 - p1) * (f1 - f0))


def _noise_sweep(cfg, key, sharding, max_iters, n, n_max, batch: int = 0):
    """Recovery error vs dense noise ``sigma`` (gross magnitude 10) and vs gross magnitude.

    The batch is padded to ``batch`` problems when that is larger (a grid column's batch:
    the solver then reuses that column's compilation).
    """
    m, tn = cfg["m"], cfg["noise_trials"]
    sigmas = np.geomspace(*cfg["noise_sigmas"][:2], cfg["noise_sigmas"][2])
    mags = np.geomspace(*cfg["noise_magnitudes"][:2], cfg["noise_magnitudes"][2])
    s_all = np.concatenate([sigmas, np.full(len(mags), cfg["noise_fixed_sigma"])])
    g_all = np.concatenate([np.full(len(sigmas), 10.0), mags])
    ndev = len(sharding.mesh.devices.ravel())
    total = len(s_all) * tn
    b = max(-(-total // ndev) * ndev, batch)
    pad = b - total
    s_b = np.concatenate([np.repeat(s_all, tn), np.full(pad, s_all[0])])
    g_b = np.concatenate([np.repeat(g_all, tn), np.full(pad, g_all[0])])
    keys = jax.random.split(key, b)
    t0 = time.perf_counter()
    fam = jnp.full((b,), FAMILIES.index("filters"))
    a, w0, w, wc = _build(keys, fam, jnp.full((b,), cfg["noise_fraction"]), jnp.asarray(s_b),
                          jnp.asarray(g_b), jnp.asarray(n), m=m, n_max=n_max,
                          feature_dim=cfg["feature_dim"],
                          feature_patches=cfg["feature_patches"], law="gaussian",
                          sharding=sharding)
    a = a[:, :, :n]
    sol = _solve_column(a, w0, wc, max_iters)
    e = np.asarray(_errors(a, w0, w, sol.x))[:total].reshape(len(s_all), tn)
    conv = np.asarray(sol.converged)[:total].reshape(len(s_all), tn)
    seconds = time.perf_counter() - t0
    es, eg = e[: len(sigmas)], e[len(sigmas):]
    med_s = np.median(es, axis=1)
    pos = med_s > 0
    slope = float(np.polyfit(np.log10(sigmas[pos]), np.log10(med_s[pos]), 1)[0])
    med_g = np.median(eg, axis=1)
    return {
        "ratio": m / n, "n": int(n), "fraction": cfg["noise_fraction"], "trials": tn,
        "sigmas": sigmas, "median_rel_error_vs_sigma": med_s,
        "max_rel_error_vs_sigma": es.max(axis=1),
        "error_over_sigma": med_s / sigmas,
        "loglog_slope_error_vs_sigma": slope,
        "gross_magnitudes": mags, "fixed_sigma": cfg["noise_fixed_sigma"],
        "median_rel_error_vs_magnitude": med_g, "max_rel_error_vs_magnitude": eg.max(axis=1),
        "magnitude_sweep_spread": float(med_g.max() / med_g.min()),
        "converged_fraction": float(conv.mean()), "max_iters": max_iters, "seconds": seconds,
    }


# ------------------------------------------------------------------------ plots


def _edges(values, log: bool):
    v = np.log(values) if log else np.asarray(values, float)
    mid = (v[1:] + v[:-1]) / 2
    e = np.concatenate([[v[0] - (mid[0] - v[0])], mid, [v[-1] + (v[-1] - mid[-1])]])
    return np.exp(e) if log else e


def _plot_grid(g: GridResult, fifty, out: Path, m: int):
    from matplotlib.ticker import NullFormatter

    from jaxpurify.phase_transition import critical_fraction

    plt = pyplot()
    titles = {"filters": "W: filter row-space design (m = d+1, n = patches)",
              "features": "beta: ReLU-feature design (m = J, n = samples)",
              "gaussian": "reference: Gaussian design"}
    fig, axes = plt.subplots(1, len(g.families), figsize=(5.2 * len(g.families), 4.4),
                             sharey=True, squeeze=False)
    xs, ys = _edges(g.ratios, True), _edges(g.fractions, False)
    dense = np.geomspace(min(g.ratios.min(), 1.01), g.ratios.max() * 1.1, 200)
    curve = np.asarray(critical_fraction(dense))
    for i, (fam, ax) in enumerate(zip(g.families, axes[0], strict=True)):
        prob = g.success[i].mean(axis=-1)  # (R, F)
        mesh = ax.pcolormesh(xs, ys, prob.T, cmap="viridis", vmin=0, vmax=1, shading="flat")
        ax.plot(dense, curve, "w-", lw=2.2)
        ax.plot(dense, curve, "r--", lw=1.4, label="Donoho-Tanner $\\rho^*(m/n)$")
        pts = [(r, f) for r, f in zip(g.ratios, fifty[fam], strict=True) if f is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o", color="orange", mec="k", ms=5,
                    label="empirical 50%")
        ax.set_xscale("log")
        ticks = [t for t in (1.25, 2, 3, 5, 8, 12, 20) if xs[0] <= t <= xs[-1]]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(xs[0], xs[-1])
        ax.set_ylim(ys[0], ys[-1])
        ax.set_xlabel("overparameterization ratio m/n")
        ax.set_title(titles.get(fam, fam), fontsize=9)
        if i == 0:
            ax.set_ylabel("corrupted fraction")
        ax.legend(fontsize=7, loc="upper left")
    fig.colorbar(mesh, ax=axes[0].tolist(), label="P(success)", shrink=0.9)
    fig.suptitle(f"L1 recovery, m = {m}, {g.success.shape[-1]} trials per cell", fontsize=10)
    return save_fig(fig, out, "phase_transition.png")


def _plot_noise(nz, out: Path):
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    s = np.asarray(nz["sigmas"])
    a1.loglog(s, nz["median_rel_error_vs_sigma"], "o-", label="median")
    a1.loglog(s, nz["max_rel_error_vs_sigma"], "s:", label="max")
    c = float(np.median(np.asarray(nz["error_over_sigma"])))
    a1.loglog(s, c * s, "k--", lw=1, label=f"{c:.2g} x sigma")
    a1.set_xlabel("dense noise std sigma (relative)")
    a1.set_ylabel("||w_hat - w|| / ||w||")
    a1.set_title(f"+ {nz['fraction']:.0%} gross errors (10 std), ratio {nz['ratio']:.2f}",
                 fontsize=9)
    a1.legend(fontsize=8)
    g = np.asarray(nz["gross_magnitudes"])
    a2.loglog(g, nz["median_rel_error_vs_magnitude"], "o-", label="median")
    a2.loglog(g, nz["max_rel_error_vs_magnitude"], "s:", label="max")
    a2.set_xlabel("gross error magnitude (x std)")
    a2.set_title(f"sigma = {nz['fixed_sigma']:g}: error does not grow with the gross errors",
                 fontsize=9)
    a2.set_ylim(min(a1.get_ylim()[0], a2.get_ylim()[0]), max(a1.get_ylim()[1], 1.0))
    a2.legend(fontsize=8)
    for a in (a1, a2):
        a.grid(True, which="both", alpha=0.3)
    return save_fig(fig, out, "noise.png")


# ------------------------------------------------------------------------ entry point


def run(*, name: str = "phase-transition", quick: bool = False,
        out: Path = Path("runs/phase-transition"), seed: int = 0, config: dict | None = None,
        progress: bool = True) -> dict:
    """Run the grid, the noise sweep and the HiGHS comparison; write metrics and plots."""
    jax.config.update("jax_enable_x64", True)
    from jaxpurify.phase_transition import critical_fraction

    t0 = time.perf_counter()
    out = Path(out)
    cfg = {**(QUICK if quick else FULL), **(config or {})}
    m = cfg["m"]
    ratios = np.geomspace(*cfg["ratios"][:2], cfg["ratios"][2])
    fractions = np.linspace(*cfg["fractions"][:2], cfg["fractions"][2])
    k_grid, k_noise = jax.random.split(jax.random.PRNGKey(seed))

    g = run_grid(ratios, fractions, cfg["trials"], m, k_grid,
                 feature_dim=cfg["feature_dim"], feature_patches=cfg["feature_patches"],
                 highs_per_column=cfg["highs_per_column"], progress=progress, details=True,
                 warm_repeat=True)
    grid_seconds = float(g.column_seconds.sum())

    theory = np.asarray(critical_fraction(g.ratios))
    prob = g.success.mean(axis=-1)  # (families, R, F)
    fifty = {fam: [fifty_percent_fraction(g.fractions, prob[i, r]) for r in range(len(g.n))]
             for i, fam in enumerate(g.families)}
    per_ratio = []
    for r in range(len(g.n)):
        row = {"ratio": float(g.ratios[r]), "n": int(g.n[r]), "theory": float(theory[r])}
        for fam in g.families:
            f = fifty[fam][r]
            row[f"empirical_50_{fam}"] = f
            row[f"empirical_minus_theory_{fam}"] = None if f is None else f - float(theory[r])
        per_ratio.append(row)
    summary = {}
    for fam in g.families:
        d = [row[f"empirical_minus_theory_{fam}"] for row in per_ratio
             if row[f"empirical_minus_theory_{fam}"] is not None]
        summary[fam] = {"mean_empirical_minus_theory": float(np.mean(d)) if d else None,
                        "mean_abs_empirical_minus_theory": float(np.mean(np.abs(d)))
                        if d else None, "ratios_with_a_50_crossing": len(d)}

    # Noise sweep at the grid column closest to the noise ratio (same shape: no new compile).
    n_noise = int(g.n[np.argmin(np.abs(np.log(g.ratios / cfg["noise_ratio"])))])
    noise = _noise_sweep(cfg, k_noise, trial_sharding(), cfg["noise_max_iters"], n_noise,
                         g.n_max,
                         batch=len(g.families) * len(g.fractions) * g.trials_padded)

    highs_total = float(sum(h["extrapolated_seconds"] for h in g.highs)) if g.highs else None
    problems = int(g.success.size)
    metrics = {
        "experiment": name, "quick": quick, "seed": seed, "config": cfg,
        "m": m, "families": list(g.families), "ratios": g.ratios, "n": g.n,
        "fractions": g.fractions, "trials": cfg["trials"], "trials_padded": g.trials_padded,
        "num_devices": g.num_devices, "devices_used": g.devices_used,
        "success_tol": SUCCESS_TOL, "max_iters": MAX_ITERS,
        "success_probability": {fam: prob[i] for i, fam in enumerate(g.families)},
        "nonconverged_fraction": {fam: float(1 - g.converged[i].mean())
                                  for i, fam in enumerate(g.families)},
        "rank_deficient_problems": {fam: int(np.sum(g.result[i] == 3))
                                    for i, fam in enumerate(g.families)},
        "fifty_percent_line": per_ratio,
        "fifty_percent_summary": summary,
        "timing": {
            "problems": problems,
            "grid_seconds": grid_seconds,
            "column_seconds": g.column_seconds,
            "note": ("grid_seconds: build + solve of every column, including one XLA "
                     "compilation per column (the first one also compiles the builder); "
                     "warm_solve_seconds: the batched solves again, already compiled; HiGHS: "
                     "mean time of the sampled problems of a column x that column's problems"),
            "seconds_per_problem": grid_seconds / problems,
            "warm_solve_seconds": float(np.sum(g.warm_solve_seconds)),
            "warm_column_solve_seconds": g.warm_solve_seconds,
            "warm_seconds_per_problem": float(np.sum(g.warm_solve_seconds)) / problems,
            "highs_sampled_problems": int(sum(h["sampled"] for h in g.highs)),
            "highs_seconds_per_problem": (highs_total / problems) if highs_total else None,
            "highs_extrapolated_grid_seconds": highs_total,
            "speedup_vs_highs_loop": (highs_total / grid_seconds) if highs_total else None,
            "warm_speedup_vs_highs_loop": (highs_total / float(np.sum(g.warm_solve_seconds))
                                           if highs_total else None),
            "highs_success_agreement": (float(np.mean([h["success_agreement"]
                                                       for h in g.highs]))
                                        if g.highs else None),
            "highs_max_relative_objective_difference": (
                float(max(h["max_relative_objective_difference"] for h in g.highs))
                if g.highs else None),
            "highs_per_column": g.highs,
        },
        "noise": noise,
    }
    _plot_grid(g, fifty, out, m)
    _plot_noise(noise, out)
    metrics["environment"] = environment(t0)
    write_metrics(out, metrics)
    return metrics
