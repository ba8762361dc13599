"""``jaxpurify run adaptive-edit-*`` (experiments/adaptive_edit.py) at its ``--quick`` setting:
the metrics schema, the table and figure, and the claim the experiment exists to check: a
recovery that leaves the attacker's backdoor in is never certified."""

from __future__ import annotations

import json

import pytest

from jaxpurify.data import DataNotFoundError

adaptive = pytest.importorskip("experiments.adaptive_edit")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("adaptive-edit-mnist")
    try:
        metrics = adaptive.run(name="adaptive-edit-mnist", quick=True, out=out)
    except DataNotFoundError as err:  # pragma: no cover - CI has the data
        pytest.skip(f"MNIST not available: {err}")
    return out, metrics


def test_writes_rows_table_figure_and_findings(quick):
    out, metrics = quick
    assert json.loads((out / "metrics.json").read_text())["rows"] == metrics["rows"]
    assert (out / "tables.md").read_text().count("| designs |") == 2
    assert (out / "adaptive_edit.png").stat().st_size > 0
    rows = metrics["rows"]
    assert [(r["coding"], r["knowledge"], r["concentration"]) for r in rows] == [
        ("per-unit", "weights", 0.6), ("per-unit", "weights", 0.9),
        ("joint-readout", "designs", 0.6), ("joint-readout", "designs", 0.9)]
    for r in rows:
        for key in ("acc_edited", "asr_edited", "acc", "asr", "largest_share"):
            assert 0.0 <= r[key] <= 1.0, (key, r)
        assert 0 < r["edits"] and r["edit_fraction"] == pytest.approx(r["edits"] / 13_248)
        assert r["certified"] == (not r["doubtful_layers"])
        # each stage of the certificate only takes away
        assert r["certified"] <= r["certified_by_count"] <= r["certified_by_interpolation"]
    # the per-unit shares follow the concentration (a random in-range vector holds 60% of
    # its L1 mass in about a third of its entries, 90% in about two thirds)
    per_unit = [r["largest_share"] for r in rows if r["coding"] == "per-unit"]
    assert per_unit[0] < 0.45 < per_unit[1]
    assert len(metrics["findings"]) == 2 and metrics["environment"]["source"] is not None


def test_a_backdoor_left_in_is_never_certified(quick):
    _, metrics = quick
    left_in = [r for r in metrics["rows"]
               if r["asr"] >= metrics["clean"][r["coding"]]["asr"] + 0.05]
    assert left_in  # the attack works against recovery at this setting
    assert not any(r["certified"] for r in left_in), left_in


def test_unknown_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown options"):
        adaptive.run(name="adaptive-edit-mnist", quick=True, out=tmp_path, nope=1)
    with pytest.raises(ValueError, match="coding"):
        adaptive.run(name="adaptive-edit-mnist", quick=True, out=tmp_path,
                     settings=(("per-layer", "weights"),))
