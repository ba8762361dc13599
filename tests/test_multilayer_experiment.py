"""``jaxpurify run multilayer-*`` (experiments/multilayer.py) at a tiny setting: the metrics
schema, and that codes trained once (e.g. on an accelerator) are evaluated anywhere."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxpurify.data import DataNotFoundError

multilayer = pytest.importorskip("experiments.multilayer")

TINY = {"epochs": 0.5, "limit_train": 512, "limit_test": 300, "fractions": (0.0, 0.1),
        "laws": ("gaussian",), "row_space_sizes": (1,), "highs_sample": 1,
        "highs_max_rows": 200}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("multilayer-mnist")
    try:
        metrics = multilayer.run(name="multilayer-mnist", quick=True, out=out, **TINY)
    except DataNotFoundError as err:  # pragma: no cover - CI has the data
        pytest.skip(f"MNIST not available: {err}")
    return out, metrics


def test_writes_metrics_figure_and_codes(trained):
    out, metrics = trained
    for name in ("metrics.json", "accuracy.png", "codes.npz", "codes.json"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["acc_clean"] == metrics["acc_clean"]
    record = json.loads((out / "codes.json").read_text())
    assert record["device"] == metrics["train_device"] and record["seconds"] > 0
    for row in metrics["rows"]:
        for key in ("dataset", "model", "subspace", "noise", "fraction", "acc_clean",
                    "acc_contaminated", "acc_purified", "param_rel_error", "seconds"):
            assert key in row, key


def test_purified_accuracy_equals_clean_at_ten_percent(trained):
    _, metrics = trained
    (row,) = [r for r in metrics["rows"] if r["fraction"] == 0.1]
    assert row["ok"], row
    assert row["acc_purified"] == row["acc_clean"]
    assert row["acc_contaminated"] < row["acc_clean"]


def test_loaded_codes_give_the_same_network(trained, tmp_path):
    out, metrics = trained
    again = multilayer.run(name="multilayer-mnist", quick=True, out=tmp_path,
                           **{**TINY, "codes": out / "codes.npz", "fractions": (0.0,)})
    assert again["acc_clean"] == metrics["acc_clean"]
    assert again["train_seconds"] == metrics["train_seconds"]
    assert not (tmp_path / "codes.npz").exists()  # nothing was trained


def test_missing_codes_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="codes.npz"):
        multilayer.run(name="multilayer-mnist", quick=True, out=tmp_path,
                       **{**TINY, "codes": tmp_path / "nope.npz"})


def test_mismatched_codes_are_refused(trained, tmp_path):
    out, _ = trained
    with np.load(out / "codes.npz") as z:
        codes = {k: z[k] for k in z.files}
    codes.pop(sorted(codes)[0])
    np.savez(tmp_path / "codes.npz", **codes)
    with pytest.raises(ValueError, match="layers"):
        multilayer.run(name="multilayer-mnist", quick=True, out=tmp_path / "o",
                       **{**TINY, "codes": tmp_path / "codes.npz"})
