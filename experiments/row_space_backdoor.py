r"""Backdoor removal by the benign row-space, in the regime where it applies.

(S)GD or momentum from a known init moves each filter of the one-hidden-layer CNN only along
the augmented training patches ``[P_i x; 1]``. A defender with a benign budget models the
filters as ``w_0 + span{benign patches} + e`` and removes ``e``: whatever training added
outside the span of the benign patches, which includes the trigger's pixels where benign
images never show it (BadNets' corner). That needs fewer benign patches than filter entries.
The backdoor experiment's CNN (4 patches of 14x14 per MNIST image, filters of 197 entries;
trained in a designed parameterization) never has that: 60 benign images already give 240
patches. Here the CNN has one patch per image (a filter of ``28*28+1 = 785`` entries on
MNIST, ``32*32*3+1 = 3073`` on CIFAR-10: the same model class with ``patch_size`` the image)
and is trained plainly by SGD with momentum from a seeded init ``w_0``, which the defender
knows (the row-space source's assumption). ``--set patch=14`` (MNIST; 16 on CIFAR-10) trains
the theorem's own model instead, four non-overlapping patches per image, by the same SGD: its
rows carry ``model`` ``one-hidden-4patch``. There the benign patches span every filter
direction from 49 images on, so only the principal projection applies, and every patch
position's weights also see the other three quadrants' pixels at that position.

Grid: BadNets and Blended (the backdoor experiment's triggers and target), poison rates
1/5/10 %, benign budgets 0.1/1/5 % of the training set (nested draws of clean training images,
never the test set). Defenses: ``none``; ``jaxpurify`` variants ``benign-row-space`` (L1
recovery, :func:`jaxpurify.defenses.row_space_defense`) and ``benign-projection`` (the
orthogonal projection onto the same span, ``robust=False``), run where the benign patches leave
redundancy, and ``benign-principal`` (the projection onto only the leading principal
directions of the benign patches, rank chosen on benign accuracy,
:func:`jaxpurify.defenses.principal_projection`), run at every budget, and with ``--set
"variants=(...)"`` naming it ``benign-principal+universal`` (that projection, then the
backdoor experiment's universal unlearning ``THEN_UNLEARNED`` from the projected network and
toward its logits, :func:`experiments.backdoor.unlearned_after`), or its teacher ablation
(:data:`experiments.backdoor.JAXPURIFY_DIAGNOSTICS`: measured, never judged); ``ft``, ``fp`` and
``anp`` (the backdoor experiment's recipes; ``--set "ft_recipes=('backdoorbench',)"`` adds FT
rows with BackdoorBench's recipe, judged like FT, and ``fp_recipes`` the same for FP); and, when
``defenses`` names ``universal``, the backdoor experiment's universal unlearning (judged; its
variants by ``universal_variants``, default ``universal-targeted``). Writes
``metrics.json`` (``rows`` with ``dataset, model, attack, poison_rate, defense, budget, acc,
asr, seconds``; ``targets``: the data-poisoning verdict at the 1 % budget, judged as in the
backdoor experiment; ``setup.trigger_outside_benign_span``: per trigger and budget, the share
of the trigger's patch change the projection removes, :func:`trigger_outside_span`),
``tables.md`` and ``backdoor.png``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp

from experiments import backdoor as B
from experiments._common import environment, with_options, write_metrics
from jaxpurify import adversarial_unlearning as AU
from jaxpurify import attacks as A
from jaxpurify import defenses as D
from jaxpurify.models import OneHiddenLayerCNN

TARGET = 0
#: The probe images (the last of the seeded order, never in a benign draw) the trigger's share
#: outside the benign directions is measured on.
PROBE_IMAGES = 256
#: What an experiment name holds when it runs on this experiment's networks
#: (``backdoor-repeats-row-space-mnist``), and the ``setup.source`` its metrics record.
SOURCE = "row-space"
#: Each dataset's image side: a ``patch`` must divide it.
IMAGE_SIDE = {"mnist": 28, "cifar10": 32}
#: The defenses this experiment runs (the backdoor experiment's, less Neural Cleanse).
ROW_SPACE_DEFENSES = ("jaxpurify", "ft", "fp", "anp", "universal")
#: The judged jaxpurify variants and why each may fail (the verdict's reason).
REASONS = {
    "benign-row-space": "L1 recovery onto w_0 + span(benign patches): the rest of the clean "
                        "training's updates is dense, not sparse, so L1 trades some of it for "
                        "a sparse residual",
    "benign-projection": "orthogonal projection onto w_0 + span(benign patches): removes every "
                         "update direction the benign images do not span, the trigger's and "
                         "the unseen clean images' alike",
    "benign-principal": "projection onto the benign patches' leading principal directions "
                        "(rank chosen on benign ACC): removes what benign images vary little "
                        "along, the trigger's share there and the clean updates' alike",
    "benign-principal+universal": B._VARIANT_WHY["benign-principal+universal"],
}
#: The variants a run measures unless ``--set "variants=(...)"`` says otherwise: the
#: projections (``benign-principal+universal`` adds a universal unlearning per budget).
DEFAULT_VARIANTS = ("benign-row-space", "benign-projection", "benign-principal")


def _config(dataset: str, quick: bool) -> dict:
    cfg = {"filters": 64, "steps": 4000, "learning_rate": 0.05, "momentum": 0.9,
           "batch_size": 128, "attacks": ("badnets", "blended"), "rates": (0.01, 0.05, 0.1),
           "budgets": (0.001, 0.01, 0.05), "defenses": ("jaxpurify", "ft", "fp", "anp"),
           "variants": DEFAULT_VARIANTS, "ft_recipes": (), "fp_recipes": (),
           "universal_variants": ("universal-targeted",), "patch": None,
           "anp_iterations": 2000, "max_iters": 5000, "train_limit": None, "test_limit": None}
    if quick:
        cfg.update(train_limit=4000, test_limit=1000, steps=300, attacks=("badnets",),
                   rates=(0.1,), budgets=(0.01, 0.5), defenses=("jaxpurify", "ft"),
                   max_iters=1000)
    return cfg


def trigger_outside_span(model, triggers: dict, x_benign, x_probe, *,
                         rank: int | None = None) -> dict:
    r"""Share of each trigger's patch change outside the span of the benign patches.

    .. math:: \|(I - QQ^\top) d\|_2 / \|d\|_2, \qquad
              d = \operatorname{mean}_{x \in \text{probe}} [P(\tau(x)) - P(x); 0]

    with ``Q`` the orthonormal basis of the augmented benign patches (the defense's subspace,
    computed once for all triggers) and ``tau`` a trigger: the part of the direction every
    poisoned filter update shares that the projection removes. A diagnostic of the attack; the
    defense never sees it. ``triggers``: ``{name: tau}``; returns ``{name: share}``. With
    ``rank``, ``Q`` holds only the leading ``rank`` principal directions of the benign patches
    (what :func:`jaxpurify.defenses.principal_projection` keeps at that rank).
    """
    from jaxpurify import subspaces as S
    from jaxpurify.models import extract_patches

    q = S.principal_row_basis(S.augmented_patches(model, jnp.asarray(x_benign)))
    q = q if rank is None else q[:, :rank]  # with rank, applies where the span is full too
    x = jnp.asarray(x_probe)
    patches = extract_patches(x, model.patch_size)
    shares = {}
    for name, trigger in triggers.items():
        change = extract_patches(trigger(x), model.patch_size) - patches
        d = jnp.append(jnp.mean(change.reshape(-1, change.shape[-1]), axis=0), 0.0)
        d = d.astype(q.dtype)
        shares[name] = float(jnp.linalg.norm(d - q @ (q.T @ d)) / jnp.linalg.norm(d))
    return shares


def model_name(patches_per_image: int) -> str:
    """The ``model`` the rows carry: ``one-hidden-1patch`` (the filter sees the whole image),
    ``one-hidden-4patch`` (the theorem's non-overlapping patches, trained by SGD)."""
    return f"one-hidden-{patches_per_image}patch"


def check_config(cfg: dict, dataset: str) -> None:
    """Refuse, before any data is loaded or folder made, a configuration naming an unknown
    jaxpurify variant, defense, universal variant or FT/FP recipe, or a ``patch`` that does
    not tile the dataset's images (the error lists what there is)."""
    B.refuse_unknown(cfg, (("variants", (*REASONS, *B.JAXPURIFY_DIAGNOSTICS),
                            "jaxpurify variants"),
                           ("defenses", ROW_SPACE_DEFENSES, "defenses"),
                           ("universal_variants", B.UNIVERSAL_VARIANTS, "universal variants")))
    B.recipe_runs(cfg, dataset)
    side = IMAGE_SIDE[dataset]
    if side % (cfg["patch"] or side):
        raise ValueError(f"patch={cfg['patch']} does not tile the {side}x{side} images; choose "
                         f"a divisor of {side} (the image's side gives one patch per image)")


def check_setting(cfg: dict, dataset: str) -> None:
    """:func:`check_config` for a one-setting experiment on these networks
    (``backdoor-repeats-row-space-*``, ``universal-shortcuts-row-space-*``), whose ``rate``
    and ``budget`` must also be fractions in (0, 1)."""
    check_config(cfg, dataset)
    B.check_fractions(cfg)


def reasons_for(cfg: dict) -> dict:
    """The judged variants of a configuration and why each may fail: the jaxpurify variants'
    :data:`REASONS` and the universal unlearning's (when ``defenses`` names ``universal``)."""
    return {**REASONS, **{v: B._VARIANT_WHY[v] for v in universal_variants(cfg)}}


def universal_variants(cfg: dict) -> tuple:
    """The universal unlearning variants a configuration runs (none unless ``defenses``
    names ``universal``)."""
    return tuple(cfg["universal_variants"]) if "universal" in cfg["defenses"] else ()


class RowSpaceNetwork(NamedTuple):
    """The one-hidden CNN of this experiment, its known init and how it is trained.

    Attributes:
        model: the :class:`~jaxpurify.models.OneHiddenLayerCNN` (``patch`` x ``patch``
            patches, mean pooling).
        init_params: ``w_0``, the seeded init training starts from (the defender knows it).
        name: the rows' ``model`` (:func:`model_name`).
        patches_per_image: non-overlapping patches per image.
        filter_entries: entries of one augmented filter, ``patch * patch * channels + 1``.
        train: ``train(x, y) -> params``, SGD with momentum from ``init_params``.
    """

    model: OneHiddenLayerCNN
    init_params: dict
    name: str
    patches_per_image: int
    filter_entries: int
    train: Callable


def network(cfg: dict, image_shape: tuple, seed: int) -> RowSpaceNetwork:
    """The configuration's CNN for images of ``image_shape`` (height, width, channels),
    initialized from ``PRNGKey(seed)`` and trained from there with ``PRNGKey(seed + 1)``."""
    from jaxpurify.training import fit, sgd

    height, width, channels = image_shape
    patch = cfg["patch"] or height
    model = OneHiddenLayerCNN(cfg["filters"], (patch, patch), num_classes=10, pool="mean")
    w0 = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *image_shape)))["params"]
    per_image = (height // patch) * (width // patch)

    def train(x, y):
        p, _ = fit(model, w0, jnp.asarray(x), jnp.asarray(y),
                   optimizer=sgd(cfg["learning_rate"], momentum=cfg["momentum"]),
                   steps=cfg["steps"], loss="cross_entropy", batch_size=cfg["batch_size"],
                   key=jax.random.PRNGKey(seed + 1))
        return jax.block_until_ready(p)

    return RowSpaceNetwork(model, w0, model_name(per_image), per_image,
                           patch * patch * channels + 1, train)


def defend(net: RowSpaceNetwork, cfg: dict, dataset: str, params, xb, yb, *, budget: float,
           attack: str, trigger, probe, evaluate, key) -> list[dict]:
    """Every defense of ``cfg`` at one benign draw ``(xb, yb)``: one row each (``defense,
    variant, budget, n_benign, acc, asr, seconds, details``; ``acc`` and ``asr`` ``None``
    where a variant does not apply).

    Args:
        net: the network (:func:`network`); ``params`` its poisoned weights.
        budget: the benign draw's share of the training set (the rows' ``budget``).
        attack, trigger: the attack and its trigger (``trigger_outside_kept``, a diagnostic).
        probe: clean training images outside every benign draw, for that diagnostic.
        evaluate: ``evaluate(params) -> (acc, asr)`` on the test set.
        key: the defenses' PRNG key.
    """
    model, filter_len, per_image = net.model, net.filter_entries, net.patches_per_image
    rows = []

    def add(defense, variant, q, info, **extra):
        acc, asr = (None, None) if q is None else evaluate(q)
        rows.append({"defense": defense, "variant": variant, "budget": budget,
                     "n_benign": int(len(xb)), "acc": acc, "asr": asr,
                     "seconds": 0.0 if info is None else info.seconds,
                     "details": {**({} if info is None else B._details(info)), **extra}})

    if "jaxpurify" in cfg["defenses"]:
        rank = f"{min(per_image * len(xb), filter_len)}/{filter_len}"
        for robust, variant in ((True, "benign-row-space"), (False, "benign-projection")):
            if variant not in cfg["variants"]:
                continue
            if per_image * len(xb) + 1 >= filter_len:  # they span every direction
                add("jaxpurify", variant, None, None, benign_patch_rank=rank)
                continue
            q, info = D.row_space_defense(model, params, xb, init_params=net.init_params,
                                          robust=robust, max_iters=cfg["max_iters"])
            extra = {k: info.details[k] for k in ("removed_energy", "fraction")
                     if k in info.details}
            if "fraction" in extra:
                extra["removed_fraction"] = extra.pop("fraction")
            add("jaxpurify", variant, q, info, benign_patch_rank=rank, **extra)
        principal = [v for v in B.PRINCIPAL_ROWS if v in cfg["variants"]]
        if principal:  # applies at every budget
            q, info = D.principal_projection(model, params, xb, yb,
                                             init_params=net.init_params)
            outside_kept = trigger_outside_span(model, {attack: trigger}, xb, probe,
                                                rank=info.details["rank"])[attack]
            kept = {"benign_patch_rank": rank, **B.principal_details(info),
                    "trigger_outside_kept": outside_kept}
            earlier = {}
            for variant in principal:
                add("jaxpurify", variant,
                    *B.principal_row(model, variant, q, info, xb, deployed=params, key=key,
                                     augmentation=B._augmentation_for(net.name, dataset),
                                     earlier=earlier),
                    **kept)
    baselines = {"ft": D.fine_tune, "fp": D.fine_prune,
                 "anp": functools.partial(D.anp, iterations=cfg["anp_iterations"])}
    for defense, fn in baselines.items():
        if defense in cfg["defenses"]:
            add(defense, None, *fn(model, params, xb, yb, key=key))
    for defense, name, fn, kw in B.recipe_runs(cfg, dataset):  # other published recipes
        add(defense, name, *fn(model, params, xb, yb, key=key, **kw))
    for variant in universal_variants(cfg):
        add("universal", variant,
            *AU.universal_unlearning(model, params, xb, key=key,
                                     **B.UNIVERSAL_VARIANTS[variant],
                                     **B._augmentation_for(net.name, dataset)))
    return rows


def _targets(rows, clean: dict, reasons: dict) -> list[dict]:
    """The data-poisoning verdicts of ``rows``, one per attack and poison rate in their order
    (:func:`experiments.backdoor._poisoning_targets` with this experiment's ``reasons``)."""
    out = []
    for attack, rate in dict.fromkeys((r["attack"], r["poison_rate"]) for r in rows):
        rs = [r for r in rows if (r["attack"], r["poison_rate"]) == (attack, rate)]
        out += B._poisoning_targets(rs[0]["model"], attack, rate, rs,
                                    clean_asr=clean[f"asr_{attack}"], reasons=reasons)
    return out


def rejudge(out: Path | str) -> list[dict]:
    """Recompute a finished run's verdicts from its stored rows (no new measurement) with the
    current rules and reasons (its configuration's judged variants, :func:`reasons_for`);
    rewrites ``targets`` in ``metrics.json`` and ``tables.md`` and redraws ``backdoor.png``.
    ``python -m experiments.row_space_backdoor --rejudge DIR``."""
    return B.rejudge(out, judge=lambda metrics: _targets(
        metrics["rows"], metrics["clean"], reasons_for(metrics["setup"]["model_config"])))


def run(*, name: str = "backdoor-row-space-mnist", quick: bool = False, out: Path,
        seed: int = 0, **options) -> dict:
    """Run the experiment; see the module docstring. Returns the metrics.

    ``options`` override entries of the configuration (``rates``, ``budgets``, ``defenses``,
    ``variants`` (the jaxpurify variants, any of :data:`REASONS`; default
    :data:`DEFAULT_VARIANTS`),
    ``universal_variants``, ``patch`` (the patch side, default the image's), ``steps``,
    ``max_iters``, ...).
    """
    from tqdm.auto import tqdm

    t_all = time.perf_counter()
    dataset = "cifar10" if name.endswith("cifar10") else "mnist"
    cfg = with_options(_config(dataset, quick), options)
    check_config(cfg, dataset)  # an unknown name or a bad patch fails before anything runs
    reasons = reasons_for(cfg)
    data = B._poisoning(dataset, cfg, seed)
    x_tr, y_tr, x_te, y_te = data.x_tr, data.y_tr, data.x_te, data.y_te
    triggers, order, n = data.triggers, data.order, len(x_tr)
    net = network(cfg, x_tr.shape[1:], seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def evaluate(p, attack):
        return (A.accuracy(net.model, p, x_te, y_te),
                A.attack_success_rate(net.model, p, x_te, y_te, TARGET, triggers[attack]))

    t = time.perf_counter()
    w_clean = net.train(x_tr, y_tr)
    clean = {"seconds": time.perf_counter() - t}
    clean["acc"], clean["asr_badnets"] = evaluate(w_clean, "badnets")
    clean["asr_blended"] = evaluate(w_clean, "blended")[1]

    # the triggers' shares outside each budget's benign span, on training images outside
    # every budget (the reason a trigger survives the projection or not)
    probe, outside = x_tr[order[-PROBE_IMAGES:]], {attack: {} for attack in triggers}
    for budget in cfg["budgets"]:
        k = B.benign_count(budget, n)
        if net.patches_per_image * k + 1 < net.filter_entries:
            shares = trigger_outside_span(net.model, triggers, x_tr[order[:k]], probe)
            for attack, share in shares.items():
                outside[attack][str(budget)] = share
    key = jax.random.PRNGKey(seed + 11)
    settings = [(a, r) for a in cfg["attacks"] for r in cfg["rates"]]
    bar = tqdm(total=len(settings) * len(cfg["budgets"]), desc=name)
    rows, targets = [], []
    for attack, rate in settings:
        t = time.perf_counter()
        xp, yp = data.poison(attack, rate)
        w_bd = net.train(xp, yp)
        base = {"dataset": dataset, "model": net.name, "attack": attack, "poison_rate": rate}
        acc, asr = evaluate(w_bd, attack)
        rs = [{**base, "defense": "none", "variant": None, "budget": 0.0, "n_benign": 0,
               "acc": acc, "asr": asr, "seconds": time.perf_counter() - t, "details": {}}]
        for budget in cfg["budgets"]:
            idx = order[:B.benign_count(budget, n)]
            rs += [{**base, **r} for r in defend(
                net, cfg, dataset, w_bd, x_tr[idx], y_tr[idx], budget=budget, attack=attack,
                trigger=triggers[attack], probe=probe,
                evaluate=functools.partial(evaluate, attack=attack), key=key)]
            bar.update()
        for r in rs:
            bar.write(f"[{attack} {100 * rate:g}%] {r['defense']:9s} {r['variant'] or '':17s} "
                      f"budget={r['budget']:<6g} ACC "
                      + ("n/a" if r["acc"] is None else
                         f"{100 * r['acc']:.2f}% ASR {100 * r['asr']:.2f}%")
                      + f" ({r['seconds']:.1f} s)")
        rows += rs
        targets += _targets(rs, clean, reasons)
    bar.close()
    metrics = {
        "experiment": name, "dataset": dataset, "quick": quick, "seed": seed,
        "setup": {"train_size": n, "test_size": int(len(y_te)), "target": TARGET,
                  "filter_entries": net.filter_entries,
                  "patches_per_image": net.patches_per_image,
                  "trigger_outside_benign_span": outside,
                  "model_config": {k: (list(v) if isinstance(v, tuple) else v)
                                   for k, v in cfg.items()}},
        "clean": clean, "rows": rows, "targets": targets,
        "seconds": time.perf_counter() - t_all,
    }
    metrics["environment"] = environment(t_all)
    write_metrics(out, metrics)
    tables = B._write_tables(out, rows, targets, dataset)
    B._plot(rows, out / "backdoor.png", dataset)
    print()
    print(tables)
    for attack, shares in outside.items():
        print(f"{attack} trigger outside the benign span: "
              + ", ".join(f"{float(b):g}: {v:.3f}" for b, v in shares.items()))
    for t in targets:
        print(f"- {'MET' if t['met'] else 'MISSED'}: {t['attack']} {100 * t['poison_rate']:g}%: "
              f"{t['reason']}")
    return metrics


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m experiments.row_space_backdoor",
        description="Re-derive the target verdicts of a row-space backdoor run.")
    parser.add_argument("--rejudge", type=Path, metavar="DIR", required=True,
                        help="a folder written by `jaxpurify run backdoor-row-space-*`")
    for t in rejudge(parser.parse_args().rejudge):
        print(B._verdict_line(t))
