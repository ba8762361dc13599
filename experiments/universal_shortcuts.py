r"""How far a network is from a universal shortcut toward each class, clean and poisoned.

The universal unlearning (:func:`jaxpurify.adversarial_unlearning.universal_unlearning`)
tells a backdoor apart by its size: the target's universal perturbation moves ``fool_level``
of the benign images at a radius where no class's does on a clean network. This diagnostic
measures that premise on the backdoor experiment's networks. For the clean network and each
poisoned one (``attacks`` at poison ``rate``), on the backdoor experiment's benign draw
(``budget``) and with its key, it finds at every candidate radius of both balls
(:data:`~jaxpurify.adversarial_unlearning.RADIUS_FRACTIONS` of the benign images' RMS L2
norm, :data:`~jaxpurify.adversarial_unlearning.SPARSE_RADIUS_FRACTIONS` of their RMS L1 norm)
one targeted universal perturbation per class, as the radius rule does, and records the
fraction of the benign images not predicted as the class that it sends there,

.. math::

    s_c(\varepsilon) = \frac{|\{x : f(x) \ne c,\; f(x + \delta_c) = c\}|}
                            {|\{x : f(x) \ne c\}|},
    \qquad \lVert\delta_c\rVert \le \varepsilon,

``delta_c`` found by the radius rule's projected ascent toward ``c`` (the same key and steps).
It also measures each trigger's own size in both norms (the mean over the benign images of
the stamp's change), so the curves show whether the backdoor's shortcut stands out at the
trigger's size or the clean network already has one there.

Writes ``metrics.json`` (``rows``: one per network, ball and radius, with ``success`` per
class; ``networks``: each network's test ACC and ASR per trigger; ``triggers``: the
triggers' sizes; ``summary``: per network and ball the smallest fraction at which the
target's and any class's success reaches ``fool_level``), ``tables.md`` and
``shortcuts.png``. ``--set networks=DIR`` loads the networks the backdoor experiment
stored there; ``--set "model='lenet5'"`` (or ``'small-vgg'``) measures the deep model.
``universal-shortcuts-row-space-mnist|cifar10`` measures the row-space experiment's networks
instead (:mod:`experiments.row_space_backdoor`: the one-hidden CNN trained by SGD from its
known init; ``--set patch=14``, 16 on CIFAR-10, for four patches per image), trained again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import backdoor as B
from experiments import row_space_backdoor as R
from experiments._common import environment, pyplot, save_fig, write_metrics
from jaxpurify import adversarial_unlearning as AU
from jaxpurify import attacks as A
from jaxpurify.defenses import network

#: The grid's settings this experiment replaces (one model, rate and budget).
_GRID_KEYS = ("models", "rates", "budgets", "ks", "probe_steps", "defenses")

#: Each ball's candidate radii, as fractions of the benign images' RMS norm in that norm.
BALLS = {"l2": AU.RADIUS_FRACTIONS, "l1": AU.SPARSE_RADIUS_FRACTIONS}


def _config(dataset: str, quick: bool) -> dict:
    cfg = {k: v for k, v in B._config(dataset, quick).items() if k not in _GRID_KEYS}
    cfg.update(model="one-hidden", rate=0.1, budget=0.01, ascent_steps=50, fool_level=0.9)
    return cfg


def _row_space_config(dataset: str, quick: bool) -> dict:
    """The row-space experiment's configuration (its SGD-trained one-hidden CNN; ``patch``
    for four patches per image), one rate and budget instead of its grid."""
    cfg = {k: v for k, v in R._config(dataset, quick).items() if k not in ("rates", "budgets")}
    cfg.update(rate=0.1, budget=0.01, ascent_steps=50, fool_level=0.9)
    return cfg


def _check_attacks(cfg: dict) -> None:
    if isinstance(cfg["attacks"], str) or set(cfg["attacks"]) - set(B.DATA_ATTACKS):
        raise ValueError(f"attacks must be a tuple of {list(B.DATA_ATTACKS)}; got "
                         f"{cfg['attacks']!r}")


def _check(cfg: dict, dataset: str) -> None:
    B.check_setting(cfg, dataset)
    _check_attacks(cfg)


def _row_space_check(cfg: dict, dataset: str) -> None:
    R.check_setting(cfg, dataset)
    _check_attacks(cfg)


class _Networks(NamedTuple):
    """Where the measured networks come from.

    Attributes:
        module: the model (every network is this model with other params).
        name: the rows' ``model``.
        train: ``train(attack) -> (params, seconds)``: the network poisoned by ``attack`` at
            the configuration's rate, or the clean one for ``attack`` None.
        setup: what ``metrics["setup"]`` adds for this source.
    """

    module: object
    name: str
    train: Callable
    setup: dict


def _backdoor_networks(cfg: dict, dataset: str, data, seed: int) -> _Networks:
    """The backdoor experiment's networks (trained, or loaded from ``networks``)."""
    model = B._Model(cfg["model"], dataset, cfg, data.x_tr.shape[1:])
    networks = {"dir": str(cfg["networks"])}  # what each train() loaded or trained, added

    def train(attack):
        if attack is None:
            return model.trained(data.x_tr, data.y_tr, seed, store=cfg["networks"],
                                 record=networks)
        xp, yp = data.poison(attack, cfg["rate"])
        return model.trained(np.asarray(xp), np.asarray(yp), seed, store=cfg["networks"],
                             poisoning=(attack, cfg["rate"]), record=networks)

    return _Networks(model.module, cfg["model"], train,
                     {"networks": networks} if cfg["networks"] else {})


def _row_space_networks(cfg: dict, dataset: str, data, seed: int) -> _Networks:
    """The row-space experiment's one-hidden CNN, trained by SGD from its known init."""
    net = R.network(cfg, data.x_tr.shape[1:], seed)

    def train(attack):
        x, y = (data.x_tr, data.y_tr) if attack is None else data.poison(attack, cfg["rate"])
        t = time.perf_counter()
        return net.train(x, y), time.perf_counter() - t

    return _Networks(net.model, net.name, train,
                     {"source": R.SOURCE, "patches_per_image": net.patches_per_image})


def trigger_size(trigger, x) -> dict:
    """The mean L2 and L1 norm over ``x`` of the change ``trigger`` stamps on each image,
    and each as a fraction of the images' RMS norm (:func:`~jaxpurify.adversarial_unlearning.
    benign_scale`), the unit of the radius rule's candidates."""
    change = (np.asarray(trigger(jnp.asarray(x)), np.float64)
              - np.asarray(x, np.float64)).reshape(len(x), -1)
    l2 = float(np.mean(np.sqrt(np.sum(change ** 2, axis=1))))
    l1 = float(np.mean(np.sum(np.abs(change), axis=1)))
    return {"l2": l2, "l1": l1, "l2_fraction": l2 / AU.benign_scale(x, "l2"),
            "l1_fraction": l1 / AU.benign_scale(x, "l1")}


def shortcuts(module, params, x, key, *, ascent_steps: int = 50, report=None) -> list[dict]:
    """Per ball and candidate radius, every class's targeted universal perturbation's
    success on ``x`` (the radius rule's measurement, :func:`~jaxpurify.
    adversarial_unlearning.universal_perturbations` with the same key and steps);
    ``report(row)`` is called on each row as it is measured."""
    num_classes = int(jax.eval_shape(network(module).apply, params, x[:1]).shape[-1])
    rows = []
    for norm, fractions in BALLS.items():
        scale = AU.benign_scale(x, norm)
        ball = {"norm": norm, **({"bound": float(x.max() - x.min())} if norm == "l1" else {})}
        for fraction in fractions:
            t = time.perf_counter()
            found = AU.universal_perturbations(module, params, x,
                                               [fraction * scale] * num_classes,
                                               targets=range(num_classes), steps=ascent_steps,
                                               key=key, **ball)
            success = [float(s) for s in found.fooled]
            rows.append({"norm": norm, "fraction": float(fraction),
                         "radius": float(fraction * scale), "success": success,
                         "target_success": success[B.TARGET],
                         "top_class": int(np.argmax(success)), "top_success": max(success),
                         "seconds": time.perf_counter() - t})
            if report is not None:
                report(rows[-1])
    return rows


def summarize(rows: list[dict], fool_level: float) -> list[dict]:
    """Per network and ball, the smallest fraction at which the target's success reaches
    ``fool_level`` and the one at which any class's does (``None``: no candidate)."""
    out = []
    for trained, norm in dict.fromkeys((r["network"], r["norm"]) for r in rows):
        rs = sorted((r for r in rows if (r["network"], r["norm"]) == (trained, norm)),
                    key=lambda r: r["fraction"])
        first = {field: next((r["fraction"] for r in rs if r[field] >= fool_level), None)
                 for field in ("target_success", "top_success")}
        out.append({"network": trained, "norm": norm, "target_reaches": first["target_success"],
                    "some_class_reaches": first["top_success"]})
    return out


def _measure(key: str) -> str:  # "acc" -> "ACC", "asr_badnets" -> "ASR badnets"
    return "ACC" if key == "acc" else key.replace("asr_", "ASR ")


def _fraction(v) -> str:
    return "none of the candidates" if v is None else f"{v:g}"


def _tables(rows, evaluated, triggers, summary, setting: str, fool_level: float) -> str:
    lines = [f"## {setting}", "", "The networks (test ACC and ASR, %): " + "; ".join(
        f"{name} " + ", ".join(f"{_measure(k)} {100 * v:.2f}" for k, v in e.items())
        for name, e in evaluated.items()) + ".",
             "", "Each trigger's size (mean over the benign images of the "
             "stamp's change; in brackets as a fraction of the benign images' RMS norm, the "
             "radius rule's unit):", "", "| trigger | L2 | L1 |", "|---|---|---|"]
    lines += [f"| {name} | {t['l2']:.3g} ({t['l2_fraction']:.3f}) | {t['l1']:.3g} "
              f"({t['l1_fraction']:.3f}) |" for name, t in triggers.items()]
    lines += ["", f"The smallest candidate fraction at which a perturbation reaches "
              f"{fool_level:g} (the target class {B.TARGET}'s; any class's):", "",
              "| network | ball | target reaches | some class reaches |", "|---|---|---|---|"]
    lines += [f"| {s['network']} | {s['norm']} | {_fraction(s['target_reaches'])} | "
              f"{_fraction(s['some_class_reaches'])} |" for s in summary]
    lines += ["", f"Success toward the target (class {B.TARGET}) and the most successful "
              "class, % of the benign images not predicted as it:", "",
              "| network | ball | fraction | radius | target | top class | top |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['network']} | {r['norm']} | {r['fraction']:g} | {r['radius']:.3g} | "
              f"{100 * r['target_success']:.1f} | {r['top_class']} | "
              f"{100 * r['top_success']:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"


def _plot(rows, triggers, out: Path, setting: str, fool_level: float) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    networks = list(dict.fromkeys(r["network"] for r in rows))
    colors = {n: plt.get_cmap("tab10")(i) for i, n in enumerate(networks)}
    for ax, norm in zip(axes, BALLS, strict=True):
        for trained in networks:
            rs = sorted((r for r in rows if (r["network"], r["norm"]) == (trained, norm)),
                        key=lambda r: r["fraction"])
            f = [r["fraction"] for r in rs]
            ax.plot(f, [100 * r["target_success"] for r in rs], "o-", color=colors[trained],
                    label=f"{trained}: toward class {B.TARGET}")
            ax.plot(f, [100 * r["top_success"] for r in rs], ":", color=colors[trained],
                    label=f"{trained}: most successful class")
        for name, t in triggers.items():
            ax.axvline(t[f"{norm}_fraction"], color=colors.get(name, "0.5"), ls="--", lw=0.9)
            ax.text(t[f"{norm}_fraction"], 3, f" {name} trigger ({t[f'{norm}_fraction']:.3g})",
                    rotation=90, fontsize=7, color="0.3", va="bottom")
        ax.axhline(100 * fool_level, color="0.6", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks(BALLS[norm], [f"{t:g}" for t in BALLS[norm]], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel(f"radius, fraction of the benign images' RMS {norm.upper()} norm")
        ax.set_title(f"{'L2' if norm == 'l2' else 'sparse (L1 within the pixel range)'} ball",
                     fontsize=9)
    axes[0].set_ylabel("benign images sent to the class (%)")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"{setting}: universal targeted shortcuts; dashed: the triggers' sizes",
                 fontsize=9)
    return save_fig(fig, out, "shortcuts.png")


def run(*, name: str = "universal-shortcuts-mnist", quick: bool = False, out: Path,
        seed: int = 0, **options) -> dict:
    """Measure the shortcuts; see the module docstring. Returns the metrics.

    ``options`` override the configuration: ``model``, ``attacks``, ``rate``, ``budget``,
    ``ascent_steps``, ``fool_level`` and the backdoor experiment's training settings
    (``networks``, ``train_limit``, ``steps``, ...); with ``row-space`` in ``name`` the
    row-space experiment's (``patch``, ``steps``, ...) instead of ``model`` and those.
    """
    t_all = time.perf_counter()
    row_space = R.SOURCE in name
    config, check = (_row_space_config, _row_space_check) if row_space else (_config, _check)
    dataset, cfg, out, data = B.start_setting(name, quick, out, seed, options, config, check)
    x_tr = data.x_tr
    xb = jnp.asarray(x_tr[data.order[:B.benign_count(cfg["budget"], len(x_tr))]])
    key = jax.random.PRNGKey(seed + 11)  # the backdoor experiment's defense key
    nets = (_row_space_networks if row_space else _backdoor_networks)(cfg, dataset, data, seed)
    module, model_name = nets.module, nets.name
    triggers = {a: trigger_size(data.triggers[a], xb) for a in cfg["attacks"]}
    rows, timings, evaluated = [], {}, {}
    for attack in (None, *cfg["attacks"]):
        trained = attack or "clean"
        params, timings[f"train-{trained}"] = nets.train(attack)
        evaluated[trained] = {"acc": A.accuracy(module, params, data.x_te, data.y_te)}
        for a in cfg["attacks"]:
            evaluated[trained][f"asr_{a}"] = A.attack_success_rate(
                module, params, data.x_te, data.y_te, B.TARGET, data.triggers[a])

        def report(r, trained=trained):  # each candidate as it is measured (minutes apiece)
            print(f"[{trained}] {r['norm']} {r['fraction']:g}: toward {B.TARGET} "
                  f"{100 * r['target_success']:.1f}%, top class {r['top_class']} "
                  f"{100 * r['top_success']:.1f}% ({r['seconds']:.0f} s)", flush=True)

        for r in shortcuts(module, params, xb, key, ascent_steps=cfg["ascent_steps"],
                           report=report):
            rows.append({"dataset": dataset, "model": model_name, "network": trained,
                         "poison_rate": None if attack is None else cfg["rate"], **r})
    summary = summarize(rows, cfg["fool_level"])
    setting = (f"{dataset} {model_name}, poison rate {cfg['rate']:g}, "
               f"{len(xb)} benign images")
    metrics = {"experiment": name, "dataset": dataset, "quick": quick, "seed": seed,
               "setup": {"model": model_name, "attacks": list(cfg["attacks"]),
                         "rate": cfg["rate"], "budget": cfg["budget"], "n_benign": len(xb),
                         "target": B.TARGET, "ascent_steps": cfg["ascent_steps"],
                         "fool_level": cfg["fool_level"], **nets.setup},
               "networks": evaluated, "triggers": triggers, "summary": summary, "rows": rows,
               "timings": timings,
               "seconds": time.perf_counter() - t_all}
    metrics["environment"] = environment(t_all)
    write_metrics(out, metrics)
    tables = _tables(rows, evaluated, triggers, summary, setting, cfg["fool_level"])
    (out / "tables.md").write_text(tables)
    _plot(rows, triggers, out, setting, cfg["fool_level"])
    print(tables)
    return metrics
