r"""How far a backdoor verdict is from the draw behind it: one setting's defenses, repeated.

The backdoor experiment (:mod:`experiments.backdoor`) measures every defense once per
setting, on one benign draw (the first ``n`` images of a seeded order of the training set)
with one PRNG key (where trigger inversion starts, the minibatch order). Where a judged row
lands at the target's edge (the 10-epoch small VGG: NC's ``consistency`` 5.34% ASR on
BadNets 10%, ``consistency-top`` 5.02% on Blended 10%, against ASR < 5%), one run cannot tell
a defense that misses from a draw that missed. This experiment runs the defenses of one
setting (``model``, ``attack``, poison ``rate``, benign ``budget``) ``repeats`` times on the
same poisoned network (trained once, or loaded from ``networks`` where the backdoor
experiment stored it):

* repeat 0 is the backdoor experiment's own draw and key, so its rows are that
  experiment's rows (measured: equal to the digit);
* repeat ``r > 0`` draws afresh what ``vary`` names: ``"benign"``, another ``n`` clean
  training images (a seeded permutation of the images outside the weight-edit attacker's;
  never the test set), and ``"key"``, another key (``fold_in(key, r)``).

``backdoor-repeats-row-space-mnist|cifar10`` does the same for the row-space experiment
(:mod:`experiments.row_space_backdoor`): its one-hidden CNN trained by SGD from a known init
(``--set patch=14``, 16 on CIFAR-10: four patches per image), its defenses (the jaxpurify
variants ``benign-row-space``, ``benign-projection``, ``benign-principal``; FT, FP, ANP; the
universal unlearning with ``defenses`` naming ``universal``) and its verdict's judged
variants. Repeat 0 is that experiment's draw and key; a fresh benign draw never takes its
probe images (the last ``PROBE_IMAGES`` = 256 of the seeded order, the attacker's above).

For each defense row it reports the mean, standard deviation, min and max of ACC and ASR over
the repeats, in how many the row has ASR < 5% with an ACC drop < 2 pt
(:func:`experiments.backdoor.small_enough`), and, for jaxpurify's and NC's rows when FT or FP
run too, in how many no FT or FP row of the same repeat beats it on both
(:func:`experiments.backdoor.better_on_both`); and in how many repeats the verdict, judged
on that repeat alone, is met. A diagnostic, not a verdict: the backdoor
experiment's verdicts keep its own draw, and this run writes no ``targets``.

Writes ``metrics.json`` (``rows``: the grid experiment's rows with ``repeat``,
``benign_draw`` and ``key_draw``; ``summary``: one entry per defense row; ``verdicts``: in
how many repeats some judged row meets the target, :func:`verdicts`), ``tables.md``
and ``repeats.png`` (ASR against ACC drop, one point per repeat, the target's box shaded).
``--set networks=DIR`` loads the poisoned network the backdoor experiment stored there (the
same key: dataset, model, seed, poisoning, training settings and code).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from experiments import backdoor as B
from experiments import row_space_backdoor as R
from experiments._common import environment, pyplot, save_fig, write_metrics
from jaxpurify import attacks as A

#: What a later repeat may draw afresh (``vary``).
VARIABLES = ("benign", "key")

#: The grid's settings this experiment replaces by one setting (``model``, ``attack``,
#: ``rate``, ``budget``).
_GRID_KEYS = ("models", "rates", "budgets", "ks", "attacks", "probe_steps")


def _config(dataset: str, quick: bool) -> dict:
    """The backdoor experiment's configuration (so a stored network's key matches), one
    setting instead of its grid, and NC's judged one-round rows as the defenses."""
    cfg = {k: v for k, v in B._config(dataset, quick).items() if k not in _GRID_KEYS}
    cfg.update(model="one-hidden" if quick else cfg["deep"], attack="badnets", rate=0.1,
               budget=0.01, repeats=3 if quick else 5, vary=VARIABLES, defenses=("nc",),
               nc_variants=("consistency", "consistency-top"))
    return cfg


def _row_space_config(dataset: str, quick: bool) -> dict:
    """The row-space experiment's configuration (:mod:`experiments.row_space_backdoor`: the
    one-hidden CNN trained by SGD from a known init, ``patch`` for four patches per image),
    one setting instead of its grid, its jaxpurify variants, FT and FP as the defenses."""
    cfg = {k: v for k, v in R._config(dataset, quick).items()
           if k not in ("attacks", "rates", "budgets")}
    cfg.update(attack="badnets", rate=0.1, budget=0.01, repeats=3 if quick else 5,
               vary=VARIABLES, defenses=("jaxpurify", "ft", "fp"))
    return cfg


def _check_repeats(cfg: dict) -> None:
    if cfg["attack"] not in B.DATA_ATTACKS:
        raise ValueError(f"unknown attack {cfg['attack']!r}; choose from "
                         f"{list(B.DATA_ATTACKS)}")
    if not isinstance(cfg["repeats"], int) or cfg["repeats"] < 1:
        raise ValueError(f"repeats must be a positive integer (repeat 0 is the grid "
                         f"experiment's own draw); got {cfg['repeats']!r}")
    if isinstance(cfg["vary"], str) or set(cfg["vary"]) - set(VARIABLES):
        raise ValueError(f"vary must be a tuple of {list(VARIABLES)} (empty: every repeat "
                         f"the same, a determinism check); got {cfg['vary']!r}")


def _check(cfg: dict, dataset: str) -> None:
    B.check_defense_options(cfg, dataset)
    B.check_setting(cfg, dataset)
    _check_repeats(cfg)


def _row_space_check(cfg: dict, dataset: str) -> None:
    R.check_setting(cfg, dataset)
    _check_repeats(cfg)


def draws(order: np.ndarray, count: int, held_out: int, seed: int, repeat: int,
          vary) -> tuple[np.ndarray, jax.Array]:
    """Repeat ``repeat``'s benign indices and defense key.

    Repeat 0, and every repeat for what ``vary`` leaves out, takes the grid experiment's:
    the first ``count`` indices of ``order`` and ``PRNGKey(seed + 11)``. A fresh benign draw
    is ``count`` indices of a permutation (keyed by ``seed`` and ``repeat``) of
    ``order[:-held_out]``, never the last ``held_out`` images (the weight-edit attacker's in
    the backdoor experiment, the probe in the row-space one); a fresh key is
    ``fold_in(PRNGKey(seed + 11), repeat)``.
    """
    key = jax.random.PRNGKey(seed + 11)
    idx = order[:count]
    if repeat and "benign" in vary:
        pool = order[:len(order) - held_out]
        pick = jax.random.permutation(jax.random.fold_in(jax.random.PRNGKey(seed + 7), repeat),
                                      len(pool))
        idx = pool[np.asarray(pick)[:count]]
    if repeat and "key" in vary:
        key = jax.random.fold_in(key, repeat)
    return idx, key


def _against_baselines(r) -> bool:
    """A row compared with FT and FP: jaxpurify's and NC's with data (the diagnostics too)."""
    return r["defense"] in B.JUDGED and r["budget"] > 0


def _judged(r, judged: Collection[str]) -> bool:
    """A row the grid experiment's verdict judges: its variant is one of ``judged`` (the
    backdoor experiment's: not NC's diagnostics nor its ``fine-tune``)."""
    return _against_baselines(r) and r["variant"] in judged


def judge_repeats(rows: list[dict], judged: Collection[str] = B._VARIANT_WHY) -> None:
    """Mark each defended row (in place) with ``small_enough`` (ASR < 5%, ACC drop < 2 pt
    from its repeat's undefended row), ``judged`` (a row the verdict judges: its variant is
    one of ``judged``, by default the backdoor experiment's) and, for a jaxpurify, NC or
    universal row where FT or FP rows (published recipes) share its repeat, ``not_beaten``
    (none of them better on both ACC and ASR)."""
    none = next(r for r in rows if r["defense"] == "none")
    for r in rows:
        if r["defense"] == "none" or r["acc"] is None:
            continue
        r["small_enough"] = B.small_enough(r, none)
        r["judged"] = _judged(r, judged)
        base = [b for b in rows if b["repeat"] == r["repeat"] and b["defense"] in ("ft", "fp")
                and b["acc"] is not None and B._published(b)]
        if _against_baselines(r) and base:
            r["not_beaten"] = not any(B.better_on_both(b, r) for b in base)


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per defense row (``defense``, ``variant``) over the repeats: ``n``, mean,
    standard deviation (``ddof=1``; 0 for one repeat), min and max of ``acc`` and ``asr``,
    the mean ACC drop from the undefended row, and counts of the repeats whose row is
    ``small_enough`` and (where judged against FT and FP) also ``not_beaten``."""
    none = next(r for r in rows if r["defense"] == "none")
    out = []
    for defense, variant in dict.fromkeys((r["defense"], r["variant"]) for r in rows
                                          if r["budget"] > 0 and r["acc"] is not None):
        rs = [r for r in rows if (r["defense"], r["variant"]) == (defense, variant)
              and r["budget"] > 0 and r["acc"] is not None]
        entry = {"defense": defense, "variant": variant, "n": len(rs),
                 "repeats": [r["repeat"] for r in rs]}
        for field in ("acc", "asr"):
            v = np.array([r[field] for r in rs], dtype=float)
            entry.update({f"{field}_mean": float(v.mean()),
                          f"{field}_std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                          f"{field}_min": float(v.min()), f"{field}_max": float(v.max())})
        entry["acc_drop_mean"] = none["acc"] - entry["acc_mean"]
        entry["small_enough"] = sum(r["small_enough"] for r in rs)
        if all("not_beaten" in r for r in rs):
            entry["met"] = sum(r["small_enough"] and r["not_beaten"] for r in rs)
        out.append(entry)
    return out


def verdicts(rows: list[dict], judged: Collection[str] = B._VARIANT_WHY) -> dict:
    """What the grid experiment's verdict would say on each repeat alone: ``judged`` (the
    judged rows measured: the variants ``judged`` names), the counts of repeats where some
    judged row is ``small_enough`` and, where every judged row was judged against FT or FP,
    ``met`` (also ``not_beaten``), ``repeats_met`` (those repeats, or the ``small_enough``
    ones where no FT or FP ran) and ``repeats``: how many there were."""
    measured = [r for r in rows if r["budget"] > 0 and r["acc"] is not None
                and _judged(r, judged)]
    small = sorted({r["repeat"] for r in measured if r["small_enough"]})
    out = {"judged": sorted({_name(r["defense"], r["variant"]) for r in measured}),
           "repeats": len({r["repeat"] for r in rows}), "small_enough": len(small),
           "repeats_met": small}
    if measured and all("not_beaten" in r for r in measured):
        out["repeats_met"] = sorted({r["repeat"] for r in measured
                                     if r["small_enough"] and r["not_beaten"]})
        out["met"] = len(out["repeats_met"])
    return out


def _name(defense, variant) -> str:
    return defense if variant is None else f"{defense} {variant}"


def _tables(rows, summary, verdict, none, setting: str) -> str:
    met = (f", and met (no FT or FP row better on both) in {verdict['met']}"
           if "met" in verdict else "")
    lines = [f"## {setting}", "",
             f"The backdoor verdict on each repeat alone: some judged row ("
             f"{', '.join(verdict['judged']) or 'none run'}) has ASR < 5% with an ACC drop "
             f"< 2 pt in {verdict['small_enough']} of {verdict['repeats']} repeats{met}.", "",
             f"Undefended: ACC {100 * none['acc']:.2f}%, ASR {100 * none['asr']:.2f}%. Each "
             "defense row over the repeats (ACC / ASR in %, mean ± standard deviation, "
             "[min, max]); *small* counts the repeats with ASR < 5% and an ACC drop < 2 pt, "
             "*met* those where also no FT or FP row of the same repeat is better on both "
             "(judged rows, where FT or FP ran).", "",
             "| defense | repeats | ACC | ASR | ACC drop (pt) | small | met |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        cells = [f"{100 * s[f + '_mean']:.2f} ± {100 * s[f + '_std']:.2f} "
                 f"[{100 * s[f + '_min']:.2f}, {100 * s[f + '_max']:.2f}]"
                 for f in ("acc", "asr")]
        met = f"{s['met']} of {s['n']}" if "met" in s else "—"
        lines.append(f"| {_name(s['defense'], s['variant'])} | {s['n']} | {cells[0]} | "
                     f"{cells[1]} | {100 * s['acc_drop_mean']:.2f} | "
                     f"{s['small_enough']} of {s['n']} | {met} |")
    lines += ["", "Every repeat (ACC / ASR in %; draws: the benign images and the key, "
              "`grid` where they are the grid experiment's):", "",
              "| repeat | benign | key | defense | ACC / ASR | ACC drop (pt) | seconds |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["budget"] > 0 and r["acc"] is not None:
            lines.append(f"| {r['repeat']} | {r['benign_draw']} | {r['key_draw']} | "
                         f"{_name(r['defense'], r['variant'])} | {100 * r['acc']:.2f} / "
                         f"{100 * r['asr']:.2f} | {100 * (none['acc'] - r['acc']):.2f} | "
                         f"{r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def _plot(rows, none, out: Path, setting: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    pairs = list(dict.fromkeys((r["defense"], r["variant"]) for r in rows
                               if r["budget"] > 0 and r["acc"] is not None))
    drops = []
    floor = 0.1  # ASR % shown on a log axis; 0 is drawn at the floor
    for i, (defense, variant) in enumerate(pairs):
        rs = [r for r in rows if (r["defense"], r["variant"]) == (defense, variant)
              and r["budget"] > 0 and r["acc"] is not None]
        style = {"marker": "os^Dv<>ph*"[i % 10], "color": plt.get_cmap("tab20")(i % 20)}
        for first in (False, True):  # the grid's own draw outlined and larger
            sel = [r for r in rs if (r["repeat"] == 0) == first]
            x = [100 * (none["acc"] - r["acc"]) for r in sel]
            drops += x
            ax.scatter(x, [max(100 * r["asr"], floor) for r in sel], s=46 if first else 22,
                       edgecolors="k" if first else "none", linewidths=0.9, alpha=0.85,
                       label=None if first else _name(defense, variant), **style)
    left = min(min(drops), 0.0) - 0.5
    ax.set_xlim(left, max(max(drops), 2.0) + 0.5)
    _log_asr_axis(ax, floor)
    ax.fill_between([left, 2], floor, 5, color="0.88", zorder=0, lw=0)
    ax.text(left + 0.1, 0.13, "target: ASR < 5%, ACC drop < 2 pt", fontsize=7, color="0.35")
    ax.set_xlabel("ACC drop from the undefended network (pt)")
    ax.set_ylabel(f"ASR % (log; 0 drawn at {floor:g})")
    ax.set_title(f"{setting}\none point per repeat; large, outlined: the backdoor "
                 "experiment's own draw", fontsize=8)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_fig(fig, out, "repeats.png")


def _log_asr_axis(ax, floor: float) -> None:
    """ASR % on a log axis from ``floor`` to 100, ticked where people read it."""
    ax.set_yscale("log")
    ax.set_ylim(floor, 100)
    ticks = [0.1, 0.5, 1, 2, 5, 10, 20, 50, 100]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])


class _Setting(NamedTuple):
    """One setting's poisoned network, ready to be defended on any benign draw.

    Attributes:
        defend: ``defend(idx, key) -> rows``, the defenses on the training images ``idx``
            with the PRNG key ``key``: rows with ``model`` and the defense's fields, the
            undefended one (``seconds``: the training's) and any data-free ones with
            ``budget`` 0 (kept from repeat 0 only).
        held_out: images at the end of the seeded order no fresh draw takes.
        setup: what ``metrics["setup"]`` adds for this source (its ``source`` decides
            which variants the verdict judges, :func:`_judged_variants`).
    """

    defend: Callable
    held_out: int
    setup: dict


def _backdoor_setting(cfg: dict, dataset: str, data, seed: int) -> _Setting:
    """The backdoor experiment's designed network (trained, or loaded from ``networks``)."""
    x_tr, y_tr, x_te, y_te = data.x_tr, data.y_tr, data.x_te, data.y_te
    model = B._Model(cfg["model"], dataset, cfg, x_tr.shape[1:])
    trigger = data.triggers[cfg["attack"]]

    def evaluate(q):
        return (A.accuracy(model.module, q, x_te, y_te),
                A.attack_success_rate(model.module, q, x_te, y_te, B.TARGET, trigger))

    init_plain = model.module.materialize(model.init(seed))
    networks: dict = {}
    xp, yp = data.poison(cfg["attack"], cfg["rate"])
    params, t_train = model.trained(np.asarray(xp), np.asarray(yp), seed,
                                    store=cfg["networks"],
                                    poisoning=(cfg["attack"], cfg["rate"]), record=networks)

    def defend(idx, key):
        rs = B._defend(model, params, lambda _budget: (x_tr[idx], y_tr[idx]),
                       (cfg["budget"],), evaluate, key, init_params=init_plain,
                       row_space=True)
        for r in rs:
            r.pop("_params", None)
            r["model"] = cfg["model"]
            if r["defense"] == "none":
                r["seconds"] = t_train
        return rs

    setup = {"networks": {"dir": str(cfg["networks"]), **networks}} if cfg["networks"] else {}
    return _Setting(defend, cfg["edit_images"], setup)


def _row_space_setting(cfg: dict, dataset: str, data, seed: int) -> _Setting:
    """The row-space experiment's one-hidden CNN, trained by SGD from its known init."""
    x_tr, y_tr, x_te, y_te = data.x_tr, data.y_tr, data.x_te, data.y_te
    net = R.network(cfg, x_tr.shape[1:], seed)
    trigger = data.triggers[cfg["attack"]]

    def evaluate(q):
        return (A.accuracy(net.model, q, x_te, y_te),
                A.attack_success_rate(net.model, q, x_te, y_te, R.TARGET, trigger))

    t = time.perf_counter()
    xp, yp = data.poison(cfg["attack"], cfg["rate"])
    params = net.train(xp, yp)
    acc, asr = evaluate(params)
    none = {"model": net.name, "defense": "none", "variant": None, "budget": 0.0,
            "n_benign": 0, "acc": acc, "asr": asr, "seconds": time.perf_counter() - t,
            "details": {}}
    probe = x_tr[data.order[-R.PROBE_IMAGES:]]

    def defend(idx, key):
        return [none] + [{"model": net.name, **r} for r in R.defend(
            net, cfg, dataset, params, x_tr[idx], y_tr[idx], budget=cfg["budget"],
            attack=cfg["attack"], trigger=trigger, probe=probe, evaluate=evaluate, key=key)]

    setup = {"source": R.SOURCE, "filter_entries": net.filter_entries,
             "patches_per_image": net.patches_per_image}
    return _Setting(defend, R.PROBE_IMAGES, setup)


def run(*, name: str = "backdoor-repeats-mnist", quick: bool = False, out: Path,
        seed: int = 0, **options) -> dict:
    """Run the repeats; see the module docstring. Returns the metrics.

    ``options`` override the configuration: ``model``, ``attack``, ``rate``, ``budget``,
    ``repeats``, ``vary`` and the backdoor experiment's defense and training settings
    (``defenses``, ``nc_variants``, ``jaxpurify_variants``, ``ft_recipes``, ``networks``, ...);
    with ``row-space`` in ``name``, the row-space experiment's (``patch``, ``variants``,
    ``universal_variants``, ``steps``, ...) instead of ``model`` and the backdoor ones.
    """
    t_all = time.perf_counter()
    row_space = R.SOURCE in name
    config, check = (_row_space_config, _row_space_check) if row_space else (_config, _check)
    dataset, cfg, out, data = B.start_setting(name, quick, out, seed, options, config, check)
    count = B.benign_count(cfg["budget"], len(data.x_tr))
    setting = (_row_space_setting if row_space else _backdoor_setting)(cfg, dataset, data,
                                                                      seed)
    rows = []
    for repeat in range(cfg["repeats"]):
        idx, key = draws(data.order, count, setting.held_out, seed, repeat, cfg["vary"])
        fresh = {v: bool(repeat) and v in cfg["vary"] for v in VARIABLES}
        for r in setting.defend(idx, key):
            if r["budget"] == 0 and repeat:  # undefended and data-free: the same every time
                continue
            rows.append({"dataset": dataset, "model": r["model"], "attack": cfg["attack"],
                         "poison_rate": cfg["rate"], "k": None, "repeat": repeat,
                         "benign_draw": f"fresh {repeat}" if fresh["benign"] else "grid",
                         "key_draw": f"fresh {repeat}" if fresh["key"] else "grid",
                         **{k: v for k, v in r.items() if k != "model"}})
        done = [r for r in rows if r["repeat"] == repeat and r["budget"] > 0]
        print(f"[repeat {repeat + 1}/{cfg['repeats']}] " + "; ".join(
            f"{_name(r['defense'], r['variant'])} {B._fmt(r['acc'])} / {B._fmt(r['asr'])}"
            for r in done), flush=True)
    metrics = {
        "experiment": name, "dataset": dataset, "quick": quick, "seed": seed,
        "setup": {"train_size": int(len(data.x_tr)), "test_size": int(len(data.y_te)),
                  "target": B.TARGET, "n_benign": count,
                  "config": {k: v for k, v in cfg.items() if k not in B.NOT_MODEL_CONFIG},
                  **setting.setup},
        "rows": rows}
    _judge_and_write(out, metrics)
    metrics.update(seconds=time.perf_counter() - t_all, environment=environment(t_all))
    write_metrics(out, metrics)
    print((out / "tables.md").read_text())
    return metrics


def _judged_variants(setup: dict) -> Collection[str]:
    """The variants the grid experiment's verdict judges, for a run's ``setup``: the
    row-space experiment's (:func:`experiments.row_space_backdoor.reasons_for` its
    configuration) or the backdoor experiment's."""
    if setup.get("source") == R.SOURCE:
        return R.reasons_for(setup["config"])
    return B._VARIANT_WHY


def _judge_and_write(out: Path, metrics: dict) -> None:
    """Judge ``metrics["rows"]`` (in place: the rows' marks, ``summary``, ``verdicts``) and
    write ``tables.md`` and ``repeats.png``."""
    rows = metrics["rows"]
    for r in rows:  # judged afresh
        for mark in ("small_enough", "judged", "not_beaten"):
            r.pop(mark, None)
    setup = metrics["setup"]
    cfg, judged = setup["config"], _judged_variants(setup)
    judge_repeats(rows, judged)
    metrics["summary"] = summarize(rows)
    metrics["verdicts"] = verdicts(rows, judged)
    none = next(r for r in rows if r["defense"] == "none")
    setting = (f"{metrics['dataset']} {none['model']} {cfg['attack']} "
               f"{100 * cfg['rate']:g}%, {100 * cfg['budget']:g}% budget "
               f"({setup['n_benign']} images)")
    (out / "tables.md").write_text(
        _tables(rows, metrics["summary"], metrics["verdicts"], none, setting))
    _plot(rows, none, out, setting)


def rejudge(out: Path | str) -> dict:
    """Re-derive a finished run's marks, ``summary`` and ``verdicts`` from its stored rows
    (no new measurement) with the current rules; rewrites ``metrics.json`` and ``tables.md``
    and redraws ``repeats.png``. ``python -m experiments.backdoor_repeats --rejudge DIR``."""
    out = Path(out)
    metrics = json.loads((out / "metrics.json").read_text())
    _judge_and_write(out, metrics)
    write_metrics(out, metrics)
    return metrics


#: The unlearning arms of the start / teacher / radius ablations (``docs/backdoors.md``), as
#: ``(defense, variant) -> label``, in the order :func:`compare` draws them: where the
#: unlearning starts, then what it distills toward (or the radii it is given).
UNLEARNING_ARMS = {
    ("universal", "universal-both-each-recheck-unlearned"): "deployed \u2192 deployed",
    ("jaxpurify", "benign-principal+universal-deployed-start"): "deployed \u2192 projected",
    ("jaxpurify", "benign-principal+universal-deployed-at-projected-radii"):
        "deployed, at the projection's radii",
    ("jaxpurify", "benign-principal+universal-deployed-teacher"): "projected \u2192 deployed",
    ("jaxpurify", "benign-principal+universal"): "projected \u2192 projected",
}

_MODEL_LABELS = {"one-hidden": "designed", "one-hidden-4patch": "4-patch SGD",
                 "one-hidden-1patch": "1-patch SGD"}


def compare(runs, out: Path | str, arms: dict = UNLEARNING_ARMS) -> list[dict]:
    """Several repeats runs side by side, by setting and arm: ``OUT/arms.png`` and
    ``OUT/arms.md``.

    The runs' rows at a positive budget are pooled by setting (dataset, model, attack, poison
    rate, budget); a row two runs both measured (the same defense, variant and repeat) must
    agree to the digit and counts once (the runs are deterministic: a disagreement means
    they are not the same draws, and is refused). Per setting and arm (``arms``: ``(defense,
    variant) -> label``; other rows are left out) it reports the mean ASR over the repeats,
    its range, the mean ACC drop from the setting's undefended network, and the draws with
    ASR < 5% at a drop < 2 pt. ``python -m experiments.backdoor_repeats --compare OUT
    RUN...``.

    Returns:
        One dict per (setting, arm) measured: ``dataset``, ``model``, ``attack``,
        ``poison_rate``, ``budget``, ``arm``, ``n``, ``asr_mean``, ``asr_min``, ``asr_max``,
        ``acc_drop_mean`` and ``small_enough`` (fractions, as the rows).

    Raises:
        ValueError: no run, a run without rows, two runs disagreeing on a shared row or on a
            setting's undefended network, or no row of ``arms``.
    """
    pooled: dict = {}
    none: dict = {}
    for run in map(Path, runs):
        for r in json.loads((run / "metrics.json").read_text())["rows"]:
            setting = (r["dataset"], r["model"], r["attack"], r["poison_rate"])
            if r["defense"] == "none":
                if none.setdefault(setting, r["acc"]) != r["acc"]:
                    raise ValueError(f"{run}: another undefended network for {setting}")
                continue
            arm = arms.get((r["defense"], r["variant"]))
            if arm is None or r["budget"] <= 0 or r["acc"] is None:
                continue
            key = (*setting, r["budget"], arm)
            seen = pooled.setdefault(key, {}).setdefault(r["repeat"], r)
            if (seen["acc"], seen["asr"]) != (r["acc"], r["asr"]):
                raise ValueError(f"{run}: repeat {r['repeat']} of {arm} on {setting} differs "
                                 "from another run's: not the same draws")
    if not pooled:
        raise ValueError(f"no row of the arms {sorted(arms.values())} in {list(runs)}")
    order = {label: i for i, label in enumerate(arms.values())}
    summary = []
    for key in sorted(pooled, key=lambda k: (*k[:5], order[k[5]])):
        rows = list(pooled[key].values())
        asr = np.array([r["asr"] for r in rows])
        drop = np.array([none[key[:4]] - r["acc"] for r in rows])
        summary.append(dict(zip(("dataset", "model", "attack", "poison_rate", "budget", "arm"),
                                key, strict=True),
                            n=len(rows), asr_mean=float(asr.mean()), asr_min=float(asr.min()),
                            asr_max=float(asr.max()), acc_drop_mean=float(drop.mean()),
                            small_enough=int(np.sum((asr < 0.05) & (drop < 0.02)))))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "arms.md").write_text(_arms_table(summary, list(arms.values())))
    _plot_arms(summary, list(arms.values()), out)
    return summary


def _setting_label(s: dict) -> str:
    return (f"{_MODEL_LABELS.get(s['model'], s['model'])} {s['attack']} "
            f"{100 * s['poison_rate']:g}%")


def _arms_table(summary: list[dict], labels: list[str]) -> str:
    settings = list(dict.fromkeys((s["dataset"], _setting_label(s), s["budget"])
                                  for s in summary))
    cell = {(s["dataset"], _setting_label(s), s["budget"], s["arm"]): s for s in summary}
    present = [a for a in labels if any(s["arm"] == a for s in summary)]
    lines = ["Mean ASR % over the draws [min, max], (mean ACC drop in pt), and the draws with "
             "ASR < 5% at a drop < 2 pt, of n.", "",
             "| dataset | setting | budget | " + " | ".join(present) + " |",
             "|---|---|---|" + "---|" * len(present)]
    for dataset, label, budget in settings:
        cells = []
        for arm in present:
            s = cell.get((dataset, label, budget, arm))
            cells.append("—" if s is None else
                         f"{100 * s['asr_mean']:.2f} [{100 * s['asr_min']:.2f}, "
                         f"{100 * s['asr_max']:.2f}] ({100 * s['acc_drop_mean']:.2f}) "
                         f"{s['small_enough']} of {s['n']}")
        lines.append(f"| {dataset} | {label} | {100 * budget:g}% | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot_arms(summary: list[dict], labels: list[str], out: Path) -> Path:
    plt = pyplot()
    datasets = list(dict.fromkeys(s["dataset"] for s in summary))
    present = [a for a in labels if any(s["arm"] == a for s in summary)]
    width = max(len({_setting_label(s) for s in summary if s["dataset"] == d})
                for d in datasets)
    fig, axes = plt.subplots(len(datasets), 1, squeeze=False, layout="constrained",
                             figsize=(max(7.0, 0.75 * width + 3), 3.6 * len(datasets)))
    floor = 0.1
    for ax, dataset in zip(axes[:, 0], datasets, strict=True):
        rows = [s for s in summary if s["dataset"] == dataset]
        settings = list(dict.fromkeys(_setting_label(s) for s in rows))
        for i, arm in enumerate(present):
            sel = [s for s in rows if s["arm"] == arm]
            x = np.array([settings.index(_setting_label(s)) for s in sel], float)
            x += (i - (len(present) - 1) / 2) * 0.8 / len(present)
            mean = np.array([max(100 * s["asr_mean"], floor) for s in sel])
            lo = mean - np.array([max(100 * s["asr_min"], floor) for s in sel])
            hi = np.array([max(100 * s["asr_max"], floor) for s in sel]) - mean
            ax.errorbar(x, mean, yerr=[lo, hi], fmt="os^Dv"[i % 5], ms=4.5, lw=0.9, capsize=0,
                        color=plt.get_cmap("tab10")(i), label=arm)
        ax.axhline(5, color="0.4", lw=0.8, ls="--")
        _log_asr_axis(ax, floor)
        ax.set_xticks(range(len(settings)), settings, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(f"{dataset}: ASR %")
        ax.grid(axis="y", color="0.92", lw=0.6)
    axes[0, 0].set_title("Mean ASR over the draws (bars: min to max; dashed: the 5% target); "
                         "arms named start \u2192 teacher", fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_fig(fig, out, "arms.png")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m experiments.backdoor_repeats",
        description="Re-derive the summary and verdict counts of a repeats run, or draw "
                    "several runs' unlearning arms side by side.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--rejudge", type=Path, metavar="DIR",
                      help="a folder written by `jaxpurify run backdoor-repeats-*`")
    what.add_argument("--compare", nargs="+", type=Path, metavar=("OUT", "RUN"),
                      help="write OUT/arms.png and OUT/arms.md from the RUN folders' rows "
                           "(the arms of UNLEARNING_ARMS)")
    args = parser.parse_args()
    if args.rejudge is not None:
        rejudge(args.rejudge)
        print((args.rejudge / "tables.md").read_text())
    else:
        if len(args.compare) < 2:
            parser.error("--compare needs OUT and at least one RUN folder")
        compare(args.compare[1:], args.compare[0])
        print((args.compare[0] / "arms.md").read_text())
