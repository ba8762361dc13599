"""experiments/exact_recovery.py on a reduced setting: exact inside the region, refused past it."""

import json
from pathlib import Path

import pytest

exact_recovery = pytest.importorskip("experiments.exact_recovery")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("er")
    # One trained student (the "past" case reuses it: same samples and channels).
    metrics = exact_recovery.run(
        quick=True, out=out, seed=0, kinds=("row_space", "past"),
        laws=("gaussian",), fractions=(0.05, 0.2),
        config={"past_samples": 4, "past_channels": 2, "past_fractions": (0.75,),
                "test_inputs": 16},
        progress=False)
    return out, metrics


def test_outputs_written(result):
    out, metrics = result
    assert (out / "rel_error.png").stat().st_size > 0
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["all_exact_inside_region"] == metrics["all_exact_inside_region"]
    assert len(on_disk["rows"]) == 3
    assert "jax" in on_disk["environment"] and "seconds" in on_disk["environment"]
    assert on_disk["environment"]["packages"]["optax"]  # the versions behind the arithmetic
    source = on_disk["environment"]["source"]  # the code behind it, when run from a checkout
    if (Path(__file__).resolve().parents[1] / ".git").exists():
        assert len(source["commit"]) == 40 and isinstance(source["dirty"], bool)
    else:
        assert source is None


def test_exact_inside_the_region(result):
    _, metrics = result
    inside = [r for r in metrics["rows"] if r["region"] == "inside"]
    assert len(inside) == 2
    assert metrics["all_exact_inside_region"]
    for r in inside:
        assert set(r["rel_error"]) == {"conv.kernel", "conv.bias", "readout.kernel"}
        assert max(r["rel_error"].values()) <= exact_recovery.REL_TOL
        assert r["max_output_diff_relative"] <= exact_recovery.OUT_TOL
        assert r["ok"], r["warnings"]
        assert r["mask_agrees"], r["mask_mismatches"]


def test_refused_past_the_threshold(result):
    _, metrics = result
    past = [r for r in metrics["rows"] if r["region"] == "past"]
    assert len(past) == 1
    assert metrics["none_ok_past_region"]
    assert not past[0]["ok"]
    assert past[0]["max_rel_error"] > 1e-3
