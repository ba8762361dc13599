"""Render the results page, docs/results.md, from ``RUNS_DIR/*/metrics.json``.

    python -m experiments._report RUNS_DIR [--page docs/results.md]

For every run folder (``RUNS_DIR/NAME/metrics.json``, the demo first, then by name) it writes
the command and wall time of the run, its headline numbers, its table of rows (grouped by
subspace source when there are several), the sources it could / could not serve, an
experiment's own ``tables.md`` when it wrote one, and links to its figures; before the runs,
one summary of every backdoor run's verdicts (:func:`backdoor_targets`). The section goes
between ``<!-- results:start -->`` and ``<!-- results:end -->`` on the page (the markers are
appended at the end when absent); everything else on the page (its introduction, how the runs
were made) is kept. No number is written by hand: rerun the experiments and this script to
refresh them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple

#: The page, and its section, that gives the measured reason for every missed backdoor
#: verdict (linked from the glance; ``tests/test_docs.py`` keeps it complete).
ROOT = Path(__file__).resolve().parents[1]
REASONS = ROOT / "docs" / "backdoors.md"
REASONS_ANCHOR = "every-missed-verdict-and-its-reason"
#: The page the results section is written to (the README links to it).
PAGE = REASONS.parent / "results.md"

START = "<!-- results:start -->"
END = "<!-- results:end -->"

#: Preferred column order for row tables; other scalar columns follow, up to MAX_COLUMNS.
COLUMNS = ("dataset", "model", "subspace", "attack", "defense", "variant", "noise", "law",
           "fraction", "worst_problem_fraction", "rho", "ratio", "acc_clean",
           "acc_contaminated", "acc_purified", "acc", "asr", "differing_predictions",
           "param_rel_error", "report_ok", "ok", "certified", "converged", "seconds")
MAX_COLUMNS = 13
MAX_ROWS = 80
#: Columns never shown in row tables (long or redundant).
HIDDEN = {"source_key", "model", "dataset"}


def _is_scalar(v) -> bool:
    return v is None or isinstance(v, bool | int | float | str)


def fmt(v, key: str = "") -> str:
    """A table cell: floats to 4 significant places, tiny/huge ones in scientific notation."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if key.startswith("acc") or key in ("asr", "fraction"):
            return f"{v:.4f}".rstrip("0").rstrip(".") if key == "fraction" else f"{v:.4f}"
        if ("seconds" in key or key.endswith("_s")) and abs(v) >= 0.1:
            return f"{v:.1f}"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.1e}"
        return f"{v:.4g}"
    text = str(v).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 90 else text[:87] + "..."


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def wall_seconds(m: dict) -> float | None:
    """The run's wall time, from whichever field its experiment records."""
    for path in (("wall_seconds",), ("seconds",), ("seconds", "total"),
                 ("environment", "seconds"), ("timings", "total")):
        v = m
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
    return None


def command(name: str, m: dict) -> str:
    """The command that produced the run (recorded, else rebuilt from its fields)."""
    if isinstance(m.get("command"), str):
        return m["command"]
    if name == "demo" or "experiment" not in m:
        return "jaxpurify demo" if name == "demo" else f"jaxpurify run {name}"
    cmd = f"jaxpurify run {m['experiment']}"
    if m.get("quick"):
        cmd += " --quick"
    if m.get("seed"):
        cmd += f" --seed {m['seed']}"
    codes = (m.get("config") or {}).get("codes")
    if codes:  # evaluated from codes trained elsewhere (multilayer)
        cmd += f" --set codes={codes}"
    return cmd


def _headline(m: dict) -> list[str]:
    skip = {"command", "experiment", "wall_seconds", "figure", "figures", "seconds"}
    items = [(k, v) for k, v in m.items() if _is_scalar(v) and k not in skip]
    # One level of nested summaries (e.g. ``timing``, ``fifty_percent_summary``): their
    # scalar entries, named ``outer.inner``.
    for k, v in m.items():
        if isinstance(v, dict) and k not in skip | {"environment", "config", "sources"}:
            for k2, v2 in v.items():
                if _is_scalar(v2) and not isinstance(v2, str):
                    items.append((f"{k}.{k2}", v2))
                elif isinstance(v2, dict):  # a list of scalars there is a setting: shown
                    items += [(f"{k}.{k2}.{k3}", ", ".join(map(str, v3)) or None
                               if isinstance(v3, list) else v3) for k3, v3 in v2.items()
                              if (_is_scalar(v3) and not isinstance(v3, str))
                              or (isinstance(v3, list) and all(map(_is_scalar, v3)))]
    if not items:
        return []
    return _table(["quantity", "value"], [[k, fmt(v, k.rsplit(".", 1)[-1])]
                                          for k, v in items[:40]]) + [""]


def _columns(rows: list[dict]) -> list[str]:
    """The standard columns present (:data:`COLUMNS`), then other columns that vary."""
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in keys and _is_scalar(v):
                keys.append(k)
    ordered = [k for k in COLUMNS if k in keys and k not in HIDDEN]
    ordered += [k for k in keys if k not in ordered and k not in HIDDEN
                and len({json.dumps(r.get(k)) for r in rows}) > 1]
    return ordered[:MAX_COLUMNS]


def _constant_fields(rows: list[dict]) -> list[str]:
    out = []
    for k in ("dataset", "model"):
        vals = {r.get(k) for r in rows if _is_scalar(r.get(k))}
        if len(vals) == 1 and None not in vals:
            out.append(f"{k}: {fmt(next(iter(vals)))}")
    return out


def _rows(rows: list[dict]) -> list[str]:
    group_key = next((k for k in ("source_key", "subspace") if len({r.get(k) for r in rows}) > 1),
                     None)
    groups: dict = {}
    for r in rows:
        groups.setdefault(r.get(group_key) if group_key else None, []).append(r)
    lines: list[str] = []
    for g, rs in groups.items():
        if g is not None:
            lines += [f"**{g}**", ""]
        const = _constant_fields(rs)
        if const:
            lines += ["; ".join(const), ""]
        cols = _columns(rs)
        if group_key is not None:  # the group heading already names it
            cols = [c for c in cols if not (c in ("subspace", group_key)
                                            and len({r.get(c) for r in rs}) == 1)]
        body = [[fmt(r.get(c), c) for c in cols] for r in rs[:MAX_ROWS]]
        lines += _table(cols, body)
        if len(rs) > MAX_ROWS:
            lines.append(f"\n({len(rs) - MAX_ROWS} more rows in metrics.json)")
        lines.append("")
    return lines


def _sources(sources: dict) -> list[str]:
    body = []
    for k, s in sources.items():
        if not isinstance(s, dict):
            continue
        served = s.get("served")
        what = s.get("description") or s.get("why") or ""
        if served and s.get("why"):
            what = f"{what} ({s['why']})" if what != s["why"] else what
        body.append([k, fmt(s.get("source", k)), fmt(served), fmt(s.get("acc_clean"), "acc"),
                     fmt(s.get("certified_rows")) + " / " + fmt(s.get("rows"))
                     if served else "—", fmt(what).replace("...", "…")])
    if not body:
        return []
    return (["Subspace sources:", ""]
            + _table(["name", "source", "served", "clean acc", "certified rows", "setting / why"],
                     body) + [""])


def _demo_layers(layers: dict) -> list[str]:
    keys: list[str] = []
    for v in layers.values():
        keys += [k for k in v if k not in keys and _is_scalar(v[k])]
    return _table(["layer"] + keys, [[n] + [fmt(v.get(k), k) for k in keys]
                                     for n, v in layers.items()]) + [""]


def _judged(t: dict) -> str:
    """The defense a verdict judged, as the backdoor tables name it (``nc/consistency``)."""
    defense = t.get("defense") or "jaxpurify"
    return t.get("variant", "?") if defense == "jaxpurify" else f"{defense}/{t.get('variant')}"


def _why_missed(t: dict) -> str:
    """Which part of the data-poisoning target a verdict misses, in a few words."""
    if t["met"]:
        return "met"
    parts = []
    if t["asr"] >= 0.05:
        parts.append(f"ASR {100 * t['asr']:.2f}% >= 5%")
    if 100 * (t["acc_none"] - t["acc"]) >= 2:
        parts.append("ACC drop >= 2 pt")
    if not t.get("dominates_ft_fp", True):
        parts.append("FT or FP better on both")
    return "missed: " + ("; ".join(parts) or "see the run")


class Verdicts(NamedTuple):
    """The backdoor runs' verdicts as the glance tables count them.

    Attributes:
        data: data-poisoning rows, ``(sort key, cells) -> runs holding it``; a verdict that
            several runs hold (a merged run and its source) is one row. ``cells[-1]`` is
            ``"met"`` or says which part of the target is missed.
        edits: weight edits, ``(dataset, model, clean cell, run) -> {k: cell}``; a cell ends
            in ``"met"`` or ``"**missed**"``.
        ks: every edit count ``k`` seen.
    """

    data: dict
    edits: dict
    ks: set

    def missed_runs(self) -> set[str]:
        """The runs holding at least one missed verdict of either kind."""
        return ({n for (_, cells), names in self.data.items() if cells[-1] != "met"
                 for n in names}
                | {run for (*_, run), row in self.edits.items()
                   if any(not c.endswith(" met") for c in row.values())})

    def counts(self) -> dict[str, tuple[int, int]]:
        """``{"data": (met, total), "edits": (met, total)}``."""
        cells = [c for row in self.edits.values() for c in row.values()]
        return {"data": (sum(cells[-1] == "met" for (_, cells) in self.data), len(self.data)),
                "edits": (sum(c.endswith(" met") for c in cells), len(cells))}


def collect_verdicts(runs: list[tuple[str, dict]]) -> Verdicts:
    """Every verdict of ``runs`` (``(name, metrics)`` pairs).

    A verdict is an entry of ``metrics["targets"]`` with ``poison_rate`` (data poisoning: the
    best judged defense at the 1% budget against the undefended network) or ``k`` (a weight
    edit: recovery without data against the clean network).
    """
    order = {"badnets": 0, "blended": 1}
    data: dict[tuple, list] = {}
    edits: dict[tuple, dict] = {}
    ks: set[int] = set()
    for name, m in runs:
        dataset = m.get("dataset") or m.get("experiment", "?").rsplit("-", 1)[-1]
        for t in m.get("targets") or []:
            if not isinstance(t, dict) or "met" not in t:
                continue
            if "poison_rate" in t:
                key = ((dataset, t["model"], order.get(t["attack"], 2), t["poison_rate"]), (
                    dataset, t["model"], t["attack"], f"{100 * t['poison_rate']:g}%",
                    f"{100 * t['acc_none']:.2f} / {100 * t['asr_none']:.2f}", _judged(t),
                    f"{100 * t['acc']:.2f} / {100 * t['asr']:.2f}",
                    f"{100 * (t['acc_none'] - t['acc']):.2f}", _why_missed(t)))
                data.setdefault(key, []).append(name)
            elif "k" in t:
                ks.add(t["k"])
                clean = f"{100 * t['clean_acc']:.2f} / {100 * t['clean_asr']:.2f}"
                edits.setdefault((dataset, t["model"], clean, name), {})[t["k"]] = (
                    f"{100 * t['acc']:.2f} / {100 * t['asr']:.2f} "
                    + ("met" if t["met"] else "**missed**"))
    return Verdicts(data, edits, ks)


def backdoor_targets(runs: list[tuple[str, dict]], reasons: str | None = None) -> list[str]:
    """Every backdoor run's verdicts (:func:`collect_verdicts`) in two tables, data poisoning
    then weight edits; each run links to its section. ``reasons``: a link to the page that
    gives the measured reason for every miss (:data:`REASONS`), when there is one."""
    verdicts = collect_verdicts(runs)
    data, edits, ks = verdicts
    if not data and not edits:
        return []

    def link(names):
        return ", ".join(f"[{n}](#{n})" for n in names)

    lines = ["### Backdoor targets at a glance", "",
             "Every verdict of the backdoor runs below (ACC / ASR in %); which part of its "
             "target a verdict misses is in its row and in its run's Targets list"
             + (f", and why, as measured, in [{REASONS.parent.name}/{REASONS.name}]({reasons})."
                if reasons else ".")]
    if data:
        met, total = verdicts.counts()["data"]
        lines += ["", f"**Data poisoning** ({met} of {total} met): ASR below 5% with an "
                  "ACC drop below 2 pt at the 1% budget, and neither FT nor FP better on both; "
                  "each row is the judged defense (jaxpurify's variants, NC's consistency, the "
                  "universal unlearning) the verdict picked: one that meets it, else the "
                  "lowest ASR within 2 pt of ACC, else the lowest ASR.", ""]
        lines += _table(["dataset", "model", "attack", "poison", "undefended", "judged defense",
                         "defended", "ACC drop (pt)", "target", "runs"],
                        [[*cells, link(names)] for (_, cells), names in sorted(data.items())])
    lines += repeat_verdicts(runs, link)
    if edits:
        met, total = verdicts.counts()["edits"]
        ks_sorted = sorted(ks)
        lines += ["", f"**Weight edits** ({met} of {total} met): recovery without data "
                  "brings ASR back to the clean network's (+1 pt) and ACC within 0.1 pt of it; "
                  "each cell is the recovered network.", ""]
        lines += _table(["dataset", "model", "clean", *[f"k = {k}" for k in ks_sorted], "run"],
                        [[d, mdl, clean, *[row.get(k, "—") for k in ks_sorted], link([name])]
                         for (d, mdl, clean, name), row in sorted(edits.items())])
    return lines + [""]


def repeat_verdicts(runs: list[tuple[str, dict]], link) -> list[str]:
    """The repeats runs (``backdoor-repeats-*``: a ``verdicts`` entry) as one table: per
    setting, in how many repeats the verdict judged on that repeat alone is met, whether
    the grid experiment's own draw (repeat 0) meets it, and the judged row that meets
    it most often (ties: mean ACC drop within 2 pt, then the lowest mean ASR)."""
    out = []
    for name, m in runs:
        v, cfg = m.get("verdicts"), (m.get("setup") or {}).get("config") or {}
        if not isinstance(v, dict) or "repeats" not in v or not m.get("summary"):
            continue
        judged = [s for s in m["summary"] if _row_name(s) in v["judged"]]
        if not judged:
            continue
        # as the verdict ranks: the row meeting the target most often, then within the ACC
        # budget on average, then the lowest mean ASR
        best = min(judged, key=lambda s: (-s.get("met", s["small_enough"]),
                                          s["acc_drop_mean"] >= 0.02, s["asr_mean"]))
        counted = v.get("met", v["small_enough"])
        model = next((r["model"] for r in m.get("rows", ()) if "model" in r),
                     cfg.get("model", "?"))  # row-space runs name it by their patches
        out.append([m.get("dataset", "?"), model, cfg.get("attack", "?"),
                    f"{100 * cfg.get('rate', 0):g}%", ", ".join(cfg.get("vary", [])) or "none",
                    f"{counted} of {v['repeats']}"
                    + ("" if "met" in v else " (ASR and ACC only: no FT or FP ran)"),
                    "met" if 0 in v.get("repeats_met", ()) else "missed", _row_name(best),
                    f"{100 * best['acc_drop_mean']:.2f}",
                    f"{100 * best['asr_mean']:.2f} ± {100 * best['asr_std']:.2f} "
                    f"[{100 * best['asr_min']:.2f}, {100 * best['asr_max']:.2f}]",
                    link([name])])
    if not out:
        return []
    return ["", "**Over fresh draws** (`backdoor-repeats-*`, a diagnostic): the same setting "
            "re-defended on fresh benign images and keys, repeat 0 being the grid "
            "experiment's own draw (`backdoor-*` or `backdoor-row-space-*`); *met in* counts "
            "the repeats whose verdict, judged on that repeat alone, is met; the last columns "
            "are the judged row that meets it most often (ties: mean ACC drop under 2 pt, "
            "then the lowest mean ASR), its mean ACC drop and its ASR (mean ± standard "
            "deviation [min, max], %).", "",
            *_table(["dataset", "model", "attack", "poison", "drawn afresh", "met in",
                     "repeat 0", "judged row", "ACC drop (pt)", "ASR", "run"], sorted(out))]


def _row_name(s: dict) -> str:
    return s["defense"] if s.get("variant") is None else f"{s['defense']} {s['variant']}"


def render_run(run_dir: Path, page_dir: Path, m: dict | None = None) -> list[str]:
    """Markdown for one run folder (``m``: its metrics.json, when already read)."""
    if m is None:
        m = json.loads((run_dir / "metrics.json").read_text())
    name = run_dir.name
    lines = [f"### {name}", ""]
    secs = wall_seconds(m)
    lines.append(f"Command: `{command(name, m)}`" + (f"; wall time {secs:.1f} s" if secs
                                                      is not None else "") + ".")
    lines.append("")
    lines += _headline(m)
    if isinstance(m.get("layers"), dict) and all(isinstance(v, dict)
                                                  for v in m["layers"].values()):
        lines += _demo_layers(m["layers"])
    if isinstance(m.get("sources"), dict):
        lines += _sources(m["sources"])
    own = run_dir / "tables.md"
    if own.is_file():
        text = re.sub(r"^(#+)", r"\1##", own.read_text().strip(), flags=re.MULTILINE)
        lines += [text, ""]
    elif isinstance(m.get("rows"), list) and m["rows"] and isinstance(m["rows"][0], dict):
        lines += _rows(m["rows"])
    figs = m.get("figures") or ([m["figure"]] if isinstance(m.get("figure"), str) else [])
    figs = [f for f in figs if (run_dir / f).is_file()] or sorted(
        p.name for p in run_dir.glob("*.png"))
    for f in figs:
        rel = Path(os.path.relpath(run_dir / f, page_dir)).as_posix()
        lines += [f"![{name}: {f}]({rel})", ""]
    return lines


def render(runs_dir: Path, page_dir: Path) -> str:
    """The whole results section (markers included)."""
    runs = sorted((p.parent for p in Path(runs_dir).glob("*/metrics.json")),
                  key=lambda p: (p.name != "demo", p.name))
    runs_dir = Path(runs_dir).resolve()
    # the command as typed in the repository root; the page's links are relative to the page
    shown = (runs_dir.relative_to(ROOT) if runs_dir.is_relative_to(ROOT) else runs_dir).as_posix()
    lines = [START, "## The runs", "",
             f"Generated by `python -m experiments._report {shown}` from "
             f"`{shown}/*/metrics.json` (do not edit by hand; rerun the commands below and "
             "this script to refresh).", ""]
    if not runs:
        lines += [f"(no runs with a metrics.json under `{shown}` yet)", ""]
    metrics = {}
    for run_dir in runs:
        try:
            metrics[run_dir] = json.loads((run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            pass  # render_run reads it again and the error is reported in its place
    reasons = (Path(os.path.relpath(REASONS, page_dir)).as_posix() + "#" + REASONS_ANCHOR
               if REASONS.is_file() else None)
    lines += backdoor_targets([(d.name, m) for d, m in metrics.items()], reasons)
    for run_dir in runs:
        try:
            lines += render_run(run_dir, page_dir, metrics.get(run_dir))
        except (OSError, ValueError, KeyError, TypeError) as err:
            lines += [f"### {run_dir.name}", "", f"(could not render: {type(err).__name__}: "
                      f"{err})", ""]
    lines.append(END)
    return "\n".join(lines)


def update_page(page: Path, section: str) -> str:
    """The page's text with the results section replaced (or appended with its markers)."""
    text = page.read_text() if page.exists() else ""
    if START in text and END in text and text.index(START) < text.index(END):
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        return head + section + tail
    if START in text or END in text:
        raise ValueError(f"{page}: found only one of the markers {START} / {END}, or in the "
                         "wrong order; fix them by hand")
    return text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments._report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", type=Path, help="folder holding NAME/metrics.json runs")
    parser.add_argument("--page", type=Path, default=PAGE,
                        help="markdown page to update (default: docs/results.md)")
    args = parser.parse_args(argv)
    if not args.runs_dir.is_dir():
        print(f"{args.runs_dir}: not a directory", file=sys.stderr)
        return 2
    section = render(args.runs_dir, args.page.resolve().parent)
    try:
        text = update_page(args.page, section)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    args.page.write_text(text)
    n = sum(1 for _ in args.runs_dir.glob("*/metrics.json"))
    print(f"{args.page}: results section updated from {n} run(s) in {args.runs_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
