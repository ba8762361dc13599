r"""Exact recovery: a trained one-hidden-layer CNN is purified back to machine precision.

Setup. Gaussian images ``x`` (``N x 16 x 16 x C``), a random teacher
:class:`~jaxpurify.models.OneHiddenLayerCNN` with a few filters gives the targets, and a
float64 student (``param_dtype=jnp.float64``, mean pooling) is trained by gradient descent
from a seeded init ``w_0``. The student's weights are then contaminated -- sparse gross
errors under several laws (gaussian, heavy-tailed Student-t, sign flips, constant +-10 std)
and float32 bit flips -- on the filters ``W``, the biases ``b`` and the readout ``beta``, and
:func:`jaxpurify.purify.purify` recovers them.

Why two-stage training. For the filters, every (S)GD/momentum update is a combination of the
augmented training patches ``[P_i x_s; 1]`` whatever the readout does, so ``[W_j; b_j]`` stays
in ``w_0 + span(patches)`` (the data row-space). The readout is different: its gradient is
a combination of the hidden features ``h(x_s)`` *at the filters of that step*, so when the
filters move while the readout trains (joint training) ``beta - beta_0`` collects features of
every intermediate filter, and it leaves the span of the final features that
``readout_row_space`` can build from the deployed network. Training the filters with the
readout frozen, then the readout with the filters frozen (two-stage), keeps ``beta`` in
``beta_0 + span(h(x_s); final filters)`` exactly, so both layers are recoverable.

Cases (one row each in ``metrics.json``):

* ``row_space``: the two-stage student, every law x every fraction, purified with
  ``subspace="row_space"`` (filters ratio ``(d+1)/(N k)``, readout ratio ``J/N``).
* ``designed``: a :class:`~jaxpurify.models.DesignedOneHiddenLayerCNN` trained jointly in
  its code parameterization, materialized to plain weights, contaminated and purified with
  ``subspace="designed"``.
* ``lazy``: filters moved by a few tiny GD steps with the readout frozen, so that no ReLU
  activation pattern on the training patches flips (checked at every step, reported), and
  purified with ``subspace="lazy"`` (one problem for all filters together, ``N`` unknowns).
* ``past``: a student trained on more images (filter ratio about 2, readout ratio 4)
  contaminated beyond the Donoho-Tanner threshold (30% and 45%) next to a control case
  inside it: there ``report.ok`` must be False (the certificate refuses). (With
  ``past_samples``/``past_channels`` equal to the main ones, the main student is reused.)

Each row records the relative error of every recovered tensor (and relative to the trained
update ``w - w_0``), the largest output difference on fresh test inputs, ``report.ok``,
whether the detected corruption mask equals the true one, and the purify seconds. A case is
*inside* the recovery region when its fraction is at most 0.6 times the Donoho-Tanner
critical fraction of every layer's ratio, *past* when it exceeds the critical fraction of
some layer, and *near* otherwise.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments._common import environment, pyplot, save_fig, write_metrics

#: Contamination laws of the sparse gross errors, plus ``"bit_flips"``.
LAWS = ("gaussian", "heavy_tailed", "sign_flip", "constant", "bit_flips")
#: Target on the relative error of every recovered tensor inside the recovery region.
REL_TOL = 1e-8
#: Target on ``max |f_recovered(x) - f_clean(x)| / max |f_clean(x)|`` on test inputs.
OUT_TOL = 1e-8
#: ``fraction <= INSIDE * critical_fraction(ratio)`` for every layer: inside the region.
INSIDE = 0.5

#: Quick setting. Filters: d + 1 = 8*8*2 + 1 = 129 entries, N k = 4 * 4 = 16 training
#: patches (ratio 8.06, critical fraction 0.57); readout: J = 32 entries, N = 4 samples
#: (ratio 8). The filter stage is short so that the readout stage has work left to do.
#: ``purify_tol`` is the ``tol`` passed to ``purify`` (None: its default).
QUICK = {"image": 16, "channels": 2, "patch": 8, "samples": 4, "filters": 32,
         "teacher_filters": 4, "filter_steps": 20, "readout_steps": 200, "designed_steps": 200,
         "lr": 0.05, "fractions": (0.05, 0.1, 0.2), "seeds": 1, "past_channels": 1,
         "past_samples": 8, "past_fractions": (0.05, 0.3, 0.45), "designed_codes": (16, 4),
         "lazy_steps": 5, "lazy_lr": 0.05, "test_inputs": 64, "purify_tol": None}
#: Full setting: 3 channels (filter ratio 12.1), 64 filters (readout ratio 16), a 30% fraction
#: and three contamination seeds per case.
FULL = {**QUICK, "channels": 3, "filters": 64, "designed_steps": 400, "readout_steps": 400,
        "fractions": (0.05, 0.1, 0.2, 0.3), "seeds": 3, "designed_codes": (24, 8),
        "test_inputs": 256}
#: Case kinds, in the order they run.
KINDS = ("row_space", "designed", "lazy", "past")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(np.float64).tiny))


def _leaves(tree) -> dict[str, np.ndarray]:
    """``{"conv.kernel": array, ...}`` for a params dict."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[".".join(str(getattr(k, "key", k)) for k in path)] = np.asarray(leaf)
    return out


def _contaminate(params, key, law: str, fraction: float):
    from jaxpurify import contamination as C

    if law == "bit_flips":
        return C.bit_flips(params, key, fraction=fraction, bits="any")
    return C.sparse_gross_errors(params, key, fraction=fraction, law=law, magnitude=10.0)


def _data(cfg, key, samples):
    """Gaussian training and test images and the random teacher's targets."""
    from jaxpurify.models import OneHiddenLayerCNN

    kx, kt, ktest = jax.random.split(key, 3)
    shape = (cfg["image"], cfg["image"], cfg["channels"])
    x = jax.random.normal(kx, (samples, *shape), jnp.float64)
    x_test = jax.random.normal(ktest, (cfg["test_inputs"], *shape), jnp.float64)
    teacher = OneHiddenLayerCNN(cfg["teacher_filters"], cfg["patch"], param_dtype=jnp.float64)
    tp = teacher.init(kt, x)["params"]
    return x, teacher.apply({"params": tp}, x), x_test


def _two_stage_student(cfg, key, samples):
    """Filters trained with the readout frozen, then the readout with the filters frozen."""
    from jaxpurify.models import OneHiddenLayerCNN
    from jaxpurify.training import fit, sgd

    kd, ks = jax.random.split(key)
    x, y, x_test = _data(cfg, kd, samples)
    model = OneHiddenLayerCNN(cfg["filters"], cfg["patch"], pool="mean",
                              param_dtype=jnp.float64)
    p0 = model.init(ks, x)["params"]
    opt = sgd(cfg["lr"], momentum=0.9)
    p1, h1 = fit(model, p0, x, y, optimizer=opt, steps=cfg["filter_steps"],
                 trainable=("conv",))
    p2, h2 = fit(model, p1, x, y, optimizer=opt, steps=cfg["readout_steps"],
                 trainable=("readout",))
    losses = [float(h1.loss[0]), float(h1.loss[-1]), float(h2.loss[-1])]
    return {"model": model, "init": p0, "clean": p2, "x": x, "x_test": x_test,
            "purify": {"init_params": p0, "inputs": x, "subspace": "row_space"},
            "train": {"loss_initial": losses[0], "loss_after_filters": losses[1],
                      "loss_final": losses[2], "samples": samples}}


def _designed_student(cfg, key):
    """A designed CNN trained jointly (any training keeps W = A_W theta), then materialized."""
    from jaxpurify.models import DesignedOneHiddenLayerCNN
    from jaxpurify.training import fit, sgd

    kd, ks = jax.random.split(key)
    x, y, x_test = _data(cfg, kd, cfg["samples"])
    r_w, r_beta = cfg["designed_codes"]
    dmodel = DesignedOneHiddenLayerCNN(cfg["filters"], cfg["patch"], cfg["channels"], r_w, r_beta,
                                       pool="mean", design_seed=7, param_dtype=jnp.float64)
    c0 = dmodel.init(ks, x)["params"]
    c1, h = fit(dmodel, c0, x, y, optimizer=sgd(cfg["lr"], momentum=0.9),
                steps=cfg["designed_steps"])
    clean = dmodel.materialize(c1)
    plain = dmodel.plain_model()
    gap = float(jnp.max(jnp.abs(plain.apply({"params": clean}, x) - dmodel.apply({"params": c1},
                                                                                  x))))
    return {"model": plain, "init": None, "clean": clean, "x": x, "x_test": x_test,
            "purify": {"subspace": "designed", "designs": dmodel.designs(jnp.float64)},
            "train": {"loss_initial": float(h.loss[0]), "loss_final": float(h.loss[-1]),
                      "materialize_output_gap": gap, "code_dims": [r_w, r_beta]}}


@partial(jax.jit, static_argnames=("model", "steps"))
def _lazy_gd(model, p0, x, y, lr, steps):
    """Plain GD on the filters (readout frozen); counts pattern flips after every step."""
    from jaxpurify.models import extract_patches
    from jaxpurify.subspaces import filter_vectors
    from jaxpurify.training import mse_loss

    patches = extract_patches(x, model.patch_size)
    aug = jnp.concatenate([patches, jnp.ones(patches.shape[:2] + (1,), patches.dtype)], -1)

    def pattern(p):
        return jnp.einsum("nkt,jt->nkj", aug, filter_vectors(p)) > 0

    init_pattern = pattern(p0)

    def loss(conv, p):
        return mse_loss(model.apply({"params": {**p, "conv": conv}}, x), y)

    def step(p, _):
        g = jax.grad(loss)(p["conv"], p)
        p = {**p, "conv": jax.tree_util.tree_map(lambda w, d: w - lr * d, p["conv"], g)}
        return p, jnp.sum(pattern(p) != init_pattern)

    p, flips = jax.lax.scan(step, p0, None, length=steps)
    margin = jnp.min(jnp.abs(jnp.einsum("nkt,jt->nkj", aug, filter_vectors(p0))))
    return p, flips, margin


def _lazy_student(cfg, key):
    """Filters moved by a few tiny GD steps from the init; no ReLU pattern may flip."""
    from jaxpurify.models import OneHiddenLayerCNN

    kd, ks = jax.random.split(key)
    x, y, x_test = _data(cfg, kd, cfg["samples"])
    model = OneHiddenLayerCNN(cfg["filters"], cfg["patch"], pool="mean",
                              param_dtype=jnp.float64)
    p0 = model.init(ks, x)["params"]
    lr = cfg["lazy_lr"]
    for _ in range(40):  # halve the step until no pattern flips along the whole trajectory
        p, flips, margin = _lazy_gd(model, p0, x, y, lr, cfg["lazy_steps"])
        if int(jnp.max(flips)) == 0:
            break
        lr /= 2
    moved = _rel(p["conv"]["kernel"], p0["conv"]["kernel"])
    return {"model": model, "init": p0, "clean": p, "x": x, "x_test": x_test,
            "purify": {"init_params": p0, "inputs": x, "subspace": "lazy"},
            "train": {"lr": lr, "steps": cfg["lazy_steps"],
                      "pattern_flips_per_step": [int(f) for f in np.asarray(flips)],
                      "no_pattern_flipped": bool(int(jnp.max(flips)) == 0),
                      "min_preactivation_margin_at_init": float(margin),
                      "kernel_relative_move": moved}}


def _region(report, fraction: float) -> tuple[str, dict, dict]:
    from jaxpurify.phase_transition import critical_fraction

    ratios = {k: float(r.ratio) for k, r in report.layers.items()}
    crit = {k: float(critical_fraction(r)) if r > 1 else 0.0 for k, r in ratios.items()}
    if all(fraction <= INSIDE * c for c in crit.values()):
        region = "inside"
    elif any(fraction > c for c in crit.values()):
        region = "past"
    else:
        region = "near"
    return region, ratios, crit


def _run_case(setup, law: str, fraction: float, key, kind: str, seed: int) -> dict:
    from jaxpurify.purify import purify

    model, clean = setup["model"], setup["clean"]
    dirty, mask = _contaminate(clean, key, law, fraction)
    recovered, report = purify(model, dirty, **setup["purify"], tol=setup["tol"])

    clean_l, rec_l, mask_l = _leaves(clean), _leaves(recovered), _leaves(mask)
    init_l = _leaves(setup["init"]) if setup["init"] is not None else None
    rel = {k: _rel(rec_l[k], clean_l[k]) for k in clean_l}
    # Error relative to the trained update w - w_0 (tensors that did not move are skipped).
    rel_update = {}
    for k in clean_l if init_l is not None else ():
        moved = float(np.linalg.norm(clean_l[k] - init_l[k]))
        if moved > 0:
            rel_update[k] = float(np.linalg.norm(rec_l[k] - clean_l[k])) / moved
    detected = {}
    for layer, lrep in report.layers.items():
        for leaf, m in lrep.corrupted.items():
            detected[f"{layer}.{leaf}"] = np.asarray(m, bool)
    truth = {k: mask_l[k].astype(bool) for k in detected}
    mismatches = {k: int(np.sum(detected[k] != truth[k])) for k in detected}
    false_pos = {k: int(np.sum(detected[k] & ~truth[k])) for k in detected}
    false_neg = {k: int(np.sum(~detected[k] & truth[k])) for k in detected}

    f_clean = np.asarray(model.apply({"params": clean}, setup["x_test"]))
    f_rec = np.asarray(model.apply({"params": recovered}, setup["x_test"]))
    out_diff = float(np.max(np.abs(f_rec - f_clean)))
    region, ratios, crit = _region(report, fraction)
    return {
        "kind": kind, "subspace": setup["purify"]["subspace"], "law": law,
        "fraction": fraction, "seed": seed, "region": region,
        "ratios": ratios, "critical_fractions": crit,
        "rel_error": rel, "max_rel_error": max(rel.values()),
        "rel_error_of_update": rel_update,
        "max_output_diff": out_diff,
        "max_output_diff_relative": out_diff / max(float(np.max(np.abs(f_clean))), 1e-300),
        "ok": bool(report.ok),
        "converged": {k: bool(r.converged) for k, r in report.layers.items()},
        "certified": {k: bool(r.certified) for k, r in report.layers.items()},
        "true_corrupted": {k: int(np.sum(v)) for k, v in mask_l.items()},
        "detected_corrupted": {k: int(np.sum(v)) for k, v in detected.items()},
        "mask_mismatches": mismatches,
        "mask_false_positives": false_pos, "mask_false_negatives": false_neg,
        "mask_agrees": all(v == 0 for v in mismatches.values()),
        "purify_seconds": float(report.seconds),
        "warnings": list(report.warnings),
    }


def _case_list(cfg, kinds, laws, fractions):
    cases = []
    if "row_space" in kinds:
        cases += [("row_space", law, f) for law in laws for f in fractions]
    if "designed" in kinds:
        cases += [("designed", law, 0.1) for law in ("gaussian", "bit_flips") if law in laws]
    if "lazy" in kinds:
        cases += [("lazy", law, 0.1) for law in ("gaussian", "sign_flip") if law in laws]
    if "past" in kinds:
        cases += [("past", "gaussian", f) for f in cfg["past_fractions"]]
    return cases


def _plot(rows, out: Path):
    plt = pyplot()
    colors = {"inside": "tab:green", "near": "tab:orange", "past": "tab:red"}
    markers = {"conv.kernel": "o", "conv.bias": "s", "readout.kernel": "^"}
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(8, 0.42 * len(rows)), 7.5), sharex=True)
    ax.set_ylim(3e-18, 1e4)
    floor = 1e-17  # exact zeros are drawn here
    for i, r in enumerate(rows):
        for leaf, v in r["rel_error"].items():
            ax.scatter(i, max(v, floor), marker=markers.get(leaf, "x"),
                       color=colors[r["region"]], s=30, edgecolor="k", linewidth=0.4)
        ax2.bar(i, max(r["max_output_diff_relative"], floor), color=colors[r["region"]])
        if not r["ok"]:
            ax.annotate("not ok", (i, max(r["max_rel_error"], floor)), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=6, rotation=90)
    for a in (ax, ax2):
        a.set_yscale("log")
        a.axhline(REL_TOL, color="gray", ls="--", lw=1)
        a.grid(True, which="major", axis="y", alpha=0.3)
    ax.set_ylabel("relative error of the recovered tensor")
    ax2.set_ylabel("max |f_rec - f_clean| / max |f_clean|")
    labels = [f"{r['kind']}:{r['law']}@{r['fraction']:g}" + (f"/s{r['seed']}" if r["seed"] else "")
              for r in rows]
    ax2.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    handles = [plt.Line2D([], [], marker=mk, ls="", color="gray", label=leaf)
               for leaf, mk in markers.items()]
    handles += [plt.Line2D([], [], marker="o", ls="", color=c, label=reg)
                for reg, c in colors.items()]
    ax.legend(handles=handles, fontsize=7, ncol=2, loc="center left")
    ax.set_title("Exact recovery of a trained one-hidden-layer CNN (float64); dashed: 1e-8 target")
    return save_fig(fig, out, "rel_error.png")


def run(*, name: str = "exact-recovery", quick: bool = False, out: Path = Path("runs/er"),
        seed: int = 0, kinds=KINDS, laws=LAWS, fractions=None, config: dict | None = None,
        progress: bool = True) -> dict:
    """Train, contaminate and purify; write ``out/metrics.json`` and ``out/rel_error.png``.

    Args:
        name, quick, out, seed: as given by ``jaxpurify run``.
        kinds: subset of :data:`KINDS` to run (tests use fewer).
        laws: subset of :data:`LAWS`.
        fractions: corrupted fractions of the ``row_space`` cases (default from the config).
        config: overrides of the quick/full configuration (see ``QUICK``).
        progress: show a tqdm bar over the cases.
    """
    jax.config.update("jax_enable_x64", True)
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    out = Path(out)
    cfg = {**(QUICK if quick else FULL), **(config or {})}
    fractions = tuple(cfg["fractions"] if fractions is None else fractions)
    root = jax.random.PRNGKey(seed)
    k_main, k_designed, k_lazy, k_past, k_cont = jax.random.split(root, 5)

    builders = {
        "row_space": lambda: _two_stage_student(cfg, k_main, cfg["samples"]),
        "designed": lambda: _designed_student(cfg, k_designed),
        "lazy": lambda: _lazy_student(cfg, k_lazy),
        "past": lambda: _two_stage_student({**cfg, "channels": cfg["past_channels"]}, k_past,
                                           cfg["past_samples"]),
    }
    if (cfg["past_samples"], cfg["past_channels"]) == (cfg["samples"], cfg["channels"]):
        builders["past"] = lambda: setups.get("row_space") or builders["row_space"]()
    cases = _case_list(cfg, kinds, laws, fractions)
    setups, warm, rows = {}, set(), []
    bar = tqdm(total=len(cases) * cfg["seeds"], desc=name, disable=not progress)
    for i, (kind, law, fraction) in enumerate(cases):
        if kind not in setups:
            bar.set_postfix_str(f"training {kind}")
            setups[kind] = {**builders[kind](), "tol": cfg["purify_tol"]}
        for s in range(cfg["seeds"]):
            key = jax.random.fold_in(jax.random.fold_in(k_cont, i), s)
            if id(setups[kind]["clean"]) not in warm:  # compile first: warm purify_seconds
                bar.set_postfix_str(f"compiling {kind}")
                _run_case(setups[kind], law, fraction, key, kind, s)
                warm.add(id(setups[kind]["clean"]))
            bar.set_postfix_str(f"{kind} {law} {fraction:g}")
            rows.append(_run_case(setups[kind], law, fraction, key, kind, s))
            bar.update()
    bar.close()

    inside = [r for r in rows if r["region"] == "inside"]
    past = [r for r in rows if r["region"] == "past"]
    exact = [r["max_rel_error"] <= REL_TOL and r["max_output_diff_relative"] <= OUT_TOL
             for r in inside]
    metrics = {
        "experiment": name, "quick": quick, "seed": seed, "config": cfg,
        "targets": {"rel_error": REL_TOL, "output_diff_relative": OUT_TOL,
                    "inside_factor_of_critical_fraction": INSIDE},
        "rows": rows,
        "num_inside": len(inside), "num_past": len(past),
        "all_exact_inside_region": bool(inside) and all(exact),
        "all_ok_inside_region": bool(inside) and all(r["ok"] for r in inside),
        "all_masks_agree_inside_region": bool(inside) and all(r["mask_agrees"] for r in inside),
        "max_rel_error_inside_region": max((r["max_rel_error"] for r in inside), default=None),
        "max_output_diff_relative_inside_region": max(
            (r["max_output_diff_relative"] for r in inside), default=None),
        "none_ok_past_region": bool(past) and not any(r["ok"] for r in past),
        "min_rel_error_past_region": min((r["max_rel_error"] for r in past), default=None),
        "not_ok_inside_region": [
            {"kind": r["kind"], "law": r["law"], "fraction": r["fraction"], "seed": r["seed"],
             "warnings": r["warnings"]} for r in inside if not r["ok"]],
        "training": {k: v["train"] for k, v in setups.items()},
    }
    _plot(rows, out)
    metrics["environment"] = environment(t0)
    write_metrics(out, metrics)
    return metrics
