"""The results page (experiments/_report.py, docs/results.md) is rendered from metrics.json only."""

from __future__ import annotations

import json

import pytest

report = pytest.importorskip("experiments._report")


def _run(tmp_path, name, metrics, figure=True):
    d = tmp_path / "runs" / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    if figure:
        (d / "accuracy.png").write_bytes(b"\x89PNG")
    return d


def test_command_recorded_or_rebuilt():
    assert report.command("x", {"command": "jaxpurify run x --set a=1"}) == (
        "jaxpurify run x --set a=1")
    assert report.command("mnist", {"experiment": "mnist", "quick": True, "seed": 2}) == (
        "jaxpurify run mnist --quick --seed 2")
    rebuilt = report.command("multilayer-cifar10", {
        "experiment": "multilayer-cifar10", "config": {"codes": "results/c/codes.npz"}})
    assert rebuilt == "jaxpurify run multilayer-cifar10 --set codes=results/c/codes.npz"
    assert report.command("demo", {}) == "jaxpurify demo"


def test_section_has_commands_times_rows_and_figures(tmp_path):
    rows = [{"dataset": "mnist", "noise": "gaussian", "fraction": f, "acc_clean": 0.98,
             "acc_purified": 0.98 if f < 0.3 else 0.5, "seconds": 1.5} for f in (0.1, 0.3)]
    _run(tmp_path, "mnist", {"experiment": "mnist", "quick": True, "seconds": 12.0,
                             "acc_clean": 0.98, "rows": rows})
    _run(tmp_path, "demo", {"seconds": 3.0, "acc_clean": 0.9}, figure=False)
    section = report.render(tmp_path / "runs", tmp_path)
    assert section.startswith(report.START) and section.endswith(report.END)
    assert section.index("### demo") < section.index("### mnist")  # the demo first
    assert "Command: `jaxpurify run mnist --quick`; wall time 12.0 s." in section
    assert "0.3" in section and "gaussian" in section
    assert "(runs/mnist/accuracy.png)" in section


def test_update_replaces_only_between_the_markers(tmp_path):
    page = tmp_path / "results.md"
    page.write_text(f"intro\n{report.START}\nold\n{report.END}\noutro\n")
    new = report.update_page(page, f"{report.START}\nnew\n{report.END}")
    assert new == f"intro\n{report.START}\nnew\n{report.END}\noutro\n"
    page.write_text(f"intro\n{report.END}\n")
    with pytest.raises(ValueError, match="markers"):
        report.update_page(page, "x")


def _data_verdict(**kw):
    t = {"model": "lenet5", "attack": "badnets", "poison_rate": 0.1, "target": "budget 1%",
         "defense": "nc", "variant": "consistency", "acc": 0.9676, "asr": 0.0052,
         "acc_none": 0.9679, "asr_none": 0.9947, "asr_clean": 0.003, "met": True,
         "asr_acc_met": True, "dominates_ft_fp": True, "reason": "long text"}
    return {**t, **kw}


def test_backdoor_targets_one_row_per_verdict_with_what_it_misses():
    edit = {"model": "lenet5", "attack": "weight-edit", "k": 10, "acc": 0.9735, "asr": 0.0037,
            "clean_acc": 0.9735, "clean_asr": 0.0037, "met": True}
    missed = _data_verdict(attack="blended", defense=None, variant="benign-readout",
                           acc=0.9451, asr=0.0615, met=False, asr_acc_met=False,
                           dominates_ft_fp=False)
    merged = {"dataset": "mnist", "targets": [_data_verdict(), missed, edit,
                                              {**edit, "k": 100, "asr": 0.2, "met": False}]}
    source = {"experiment": "backdoor-mnist", "targets": [_data_verdict()]}
    lines = report.backdoor_targets([("merged", merged), ("source", source),
                                     ("other", {"rows": []})])
    text = "\n".join(lines)
    assert "**Data poisoning** (1 of 2 met)" in text and "**Weight edits** (1 of 2 met)" in text
    # the verdict both runs hold is one row naming both; the dataset comes from either field
    row = next(line for line in lines if "nc/consistency" in line)
    assert "| mnist | lenet5 | badnets | 10% | 96.79 / 99.47 | nc/consistency | 96.76 / 0.52 |"\
        in row and "[merged](#merged), [source](#source)" in row and "| met |" in row
    row = next(line for line in lines if "benign-readout" in line)
    assert "missed: ASR 6.15% >= 5%; ACC drop >= 2 pt; FT or FP better on both" in row
    row = next(line for line in lines if line.startswith("| mnist | lenet5 | 97.35 / 0.37"))
    assert "97.35 / 0.37 met" in row and "97.35 / 20.00 **missed**" in row
    assert "long text" not in text  # the reasons stay in each run's section
    assert report.backdoor_targets([("x", {"targets": [{"met": True}]})]) == []


def test_repeat_verdicts_tabulate_the_repeats_runs_beside_the_glance():
    summary = [
        {"defense": "nc", "variant": "consistency", "n": 3, "acc_drop_mean": 0.003,
         "asr_mean": 0.06, "asr_std": 0.01, "asr_min": 0.049, "asr_max": 0.07,
         "small_enough": 1, "met": 1},
        {"defense": "jaxpurify", "variant": "benign-readout", "n": 3, "acc_drop_mean": 0.04,
         "asr_mean": 0.02, "asr_std": 0.01, "asr_min": 0.01, "asr_max": 0.03,
         "small_enough": 0, "met": 0},
        {"defense": "ft", "variant": None, "n": 3, "acc_drop_mean": 0.0, "asr_mean": 0.9,
         "asr_std": 0.0, "asr_min": 0.9, "asr_max": 0.9, "small_enough": 0}]
    m = {"dataset": "mnist", "setup": {"config": {"model": "one-hidden", "attack": "badnets",
                                                  "rate": 0.01, "vary": ["benign", "key"]}},
         "summary": summary,
         "verdicts": {"judged": ["jaxpurify benign-readout", "nc consistency"], "repeats": 3,
                      "small_enough": 1, "met": 1, "repeats_met": [1]}}
    lines = report.repeat_verdicts([("rep", m), ("grid", {"targets": []})],
                                   lambda names: ", ".join(names))
    row = lines[-1]
    # the row meeting the target most often is named, not the lower-ASR one over the budget
    assert row == ("| mnist | one-hidden | badnets | 1% | benign, key | 1 of 3 | missed | "
                   "nc consistency | 0.30 | 6.00 ± 1.00 [4.90, 7.00] | rep |")
    no_baselines = {**m, "verdicts": {**m["verdicts"], "met": None}}
    del no_baselines["verdicts"]["met"]
    assert "(ASR and ACC only: no FT or FP ran)" in report.repeat_verdicts(
        [("rep", no_baselines)], str)[-1]
    assert report.repeat_verdicts([("grid", {"targets": []})], str) == []
    # a row-space run's config names no model: the rows' (by their patches) is shown
    row_space = {**m, "setup": {"config": {k: v for k, v in m["setup"]["config"].items()
                                           if k != "model"}},
                 "rows": [{"model": "one-hidden-4patch", "defense": "none"}]}
    assert "| mnist | one-hidden-4patch | badnets |" in report.repeat_verdicts(
        [("rep", row_space)], str)[-1]
