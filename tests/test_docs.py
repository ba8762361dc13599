"""docs/backdoors.md gives a reason for every missed backdoor verdict stored in ``results/``,
and docs/results.md is what those runs render."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.test_readme import anchor

report = pytest.importorskip("experiments._report")

ROOT = Path(__file__).resolve().parents[1]


def _reasons_section() -> str:
    text = report.REASONS.read_text()
    headings = {anchor(h): h for h in re.findall(r"^## (.+)$", text, re.M)}
    assert report.REASONS_ANCHOR in headings, "the reasons section is gone or renamed"
    start = text.index("## " + headings[report.REASONS_ANCHOR])
    end = text.find("\n## ", start + 3)
    return text[start:end if end > 0 else None]


def _stored_verdicts() -> report.Verdicts:
    runs = [(p.parent.name, json.loads(p.read_text()))
            for p in sorted((ROOT / "results").glob("*/metrics.json"))]
    return report.collect_verdicts(runs)


def test_every_run_with_a_missed_verdict_has_its_reason_and_the_counts_match():
    section, verdicts = _reasons_section(), _stored_verdicts()
    named = set(re.findall(r"`(backdoor-[\w-]+)`", section))
    missed = verdicts.missed_runs()
    assert missed, "no missed verdict found in results/: the test would check nothing"
    assert not missed - named, f"missed verdicts without a reason: {sorted(missed - named)}"
    stored = {p.parent.name for p in (ROOT / "results").glob("*/metrics.json")}
    assert not named - stored, f"runs named but not in results/: {sorted(named - stored)}"
    prose = re.sub(r"\s+", " ", section)
    for kind, label in (("data", "Data poisoning"), ("edits", "Weight edits")):
        met, total = verdicts.counts()[kind]
        assert f"{label}: **{total - met} of {total}**" in prose, (
            f"{label}: the section's count is not {total - met} of {total}")


def test_missed_runs_and_counts_on_a_small_store():
    def data(met, rate):
        return {"model": "m", "attack": "badnets", "poison_rate": rate, "met": met,
                "acc": 0.9, "asr": 0.01 if met else 0.5, "acc_none": 0.91, "asr_none": 0.9}

    def edit(met, k):
        return {"model": "m", "k": k, "met": met, "acc": 0.9, "asr": 0.01, "clean_acc": 0.9,
                "clean_asr": 0.01}

    runs = [("a", {"dataset": "mnist", "targets": [data(True, 0.1), data(False, 0.05)]}),
            ("a-merged", {"dataset": "mnist", "targets": [data(True, 0.1)]}),
            ("b", {"dataset": "mnist", "targets": [edit(True, 10), edit(False, 100)]}),
            ("c", {"dataset": "mnist", "targets": [edit(True, 10), "not a verdict"]})]
    verdicts = report.collect_verdicts(runs)
    assert verdicts.missed_runs() == {"a", "b"}
    # the met data verdict held by two runs is one row
    assert verdicts.counts() == {"data": (1, 2), "edits": (2, 3)}
    assert verdicts.ks == {10, 100}


def test_the_results_page_is_what_the_stored_runs_render():
    page = report.PAGE.read_text()
    stored = page[page.index(report.START):page.index(report.END) + len(report.END)]
    assert stored == report.render(ROOT / "results", report.PAGE.parent), (
        "docs/results.md is stale: run `python -m experiments._report results`")
