"""``jaxpurify demo`` (the main job) end to end, in a subprocess, on real MNIST."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_on_mnist(tmp_path):
    data = os.environ.get("JAXPURIFY_DATA_DIR")
    assert data and Path(data).is_dir(), (
        "the demo test needs the real data: set JAXPURIFY_DATA_DIR to the shared data folder")
    out = tmp_path / "demo"
    env = {**os.environ, "JAXPURIFY_DATA_DIR": data, "OPENBLAS_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "jaxpurify.cli", "demo", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "MNIST (real data)" in res.stdout and "SYNTHETIC" not in res.stdout
    for word in ("clean", "contaminated", "purified", "certified", "time:"):
        assert word in res.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert not m["synthetic"] and m["test_examples"] == 10_000
    assert m["report_ok"] and m["differing_predictions"] == 0
    assert m["acc_purified"] == m["acc_clean"] > 0.8
    assert m["acc_contaminated"] < m["acc_clean"] - 0.3
    assert m["param_rel_error_purified"] < 1e-12
    for layer in m["layers"].values():
        assert layer["flagged_exactly_the_planted"]
        assert abs(layer["planted"] / layer["entries"] - 0.1) < 0.01
    assert (out / m["figure"]).stat().st_size > 10_000
