"""``experiments.real_data`` (``jaxpurify run mnist``) end to end on a tiny real-MNIST setting.

Checks the metrics schema, and the claim the experiment exists to show: wherever the report
certifies recovery, the purified network makes exactly the clean network's predictions on
every test image, while the contamination itself hurts; past the threshold the report does
not certify. The data come from ``$JAXPURIFY_DATA_DIR`` (set by ``conftest.py``).
"""

from __future__ import annotations

import json

import pytest

from experiments import real_data

ROW_KEYS = {
    "dataset": str, "model": str, "subspace": str, "noise": str, "fraction": float,
    "acc_clean": float, "acc_contaminated": float, "acc_purified": float,
    "differing_predictions": int, "report_ok": bool, "seconds": float,
    "planted_entries": int, "flagged_entries": int, "detection_exact": bool,
}

# Tiny: J=64 everywhere, and r_beta = N = 16 so both readout problems share one compilation.
TINY = dict(
    sources=("designed", "row_space", "lazy"), laws=("gaussian", "sign_flip"),
    fractions=(0.1, 0.6), limit_train=2000, steps=60, limit_test=2000, max_iters=200,
    designed={"filters": 64, "readout_code": 16},
    row_space={"limit_train": 16, "filters": 64, "steps": 60},
    lazy={"limit_train": 4, "filters": 8, "steps": 10, "probe_lrs": (1e-6,), "purify": False},
    progress=False,
)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist")
    metrics = real_data.run(name="mnist", quick=True, out=out, seed=0, **TINY)
    return out, metrics


def test_writes_metrics_and_figure(result):
    out, metrics = result
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(metrics["rows"]))
    assert metrics["figures"] == [real_data.FIGURE]
    assert (out / real_data.FIGURE).stat().st_size > 10_000
    assert metrics["command"] == "jaxpurify run mnist --quick"
    assert metrics["test_examples"] == 2000
    assert metrics["wall_seconds"] > 0


def test_row_schema(result):
    _, metrics = result
    rows = metrics["rows"]
    assert len(rows) == 2 * 2 * 2  # (designed, row_space) x laws x fractions
    for r in rows:
        for key, typ in ROW_KEYS.items():
            assert isinstance(r[key], typ), (key, r[key])
        assert r["dataset"] == "mnist"
        assert r["param_rel_error"] is None or r["param_rel_error"] >= 0
        assert set(r["layers"]) == {"conv", "readout"}
        for v in (r["acc_clean"], r["acc_contaminated"], r["acc_purified"]):
            assert 0.0 <= v <= 1.0
    assert {r["subspace"] for r in rows} == {"designed", "row_space"}


def test_certified_means_identical_predictions(result):
    _, metrics = result
    rows = metrics["rows"]
    certified = [r for r in rows if r["report_ok"]]
    assert {r["subspace"] for r in certified} == {"designed", "row_space"}
    for r in certified:
        assert r["differing_predictions"] == 0, r
        assert r["acc_purified"] == r["acc_clean"], r
        assert r["param_rel_error"] < 1e-9, r


def test_contamination_hurts_and_breaks_past_threshold(result):
    _, metrics = result
    designed = {(r["noise"], r["fraction"]): r for r in metrics["rows"]
                if r["subspace"] == "designed"}
    for law in ("gaussian", "sign_flip"):
        below, above = designed[(law, 0.1)], designed[(law, 0.6)]
        assert below["report_ok"] and below["detection_exact"]
        assert below["acc_contaminated"] < below["acc_clean"] - 0.05
        assert above["fraction"] > above["critical_fraction"]
        assert not above["report_ok"]


def test_sources_say_what_can_serve(result):
    _, metrics = result
    s = metrics["sources"]
    assert s["designed"]["served"] and s["row_space"]["served"]
    rs = s["row_space_at_designed_size"]
    assert not rs["served"] and rs["patch_span_rank"] == rs["d_plus_1"] == 197
    assert not s["lazy_at_designed_size"]["served"]
    probe = s["lazy_probe"]
    assert not probe["served"] and probe["unknowns"] == 4 * 10
    assert all(p["activation_flips"] >= 0 for p in probe["probe"])
    assert "lazy" not in s  # quick: the probe only
