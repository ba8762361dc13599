"""experiments/phase_transition.py: the grid follows the Donoho-Tanner curve; sharding is exact."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

PT = pytest.importorskip("experiments.phase_transition")

ROOT = Path(__file__).resolve().parents[1]
# m = 24, ratio 2 (n = 12): the Donoho-Tanner critical fraction is 0.19; 5% is far below it
# and 60% far above. (One ratio column = one solver compilation: keeps the test short.)
GRID = {"ratios": [2.0], "fractions": [0.05, 0.6], "trials": 3, "m": 24}
SCRIPT = """
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
from experiments import phase_transition as PT
g = PT.run_grid([2.0], [0.05, 0.6], 3, 24, jax.random.PRNGKey(0), details=True)
print(json.dumps({"devices": len(jax.devices()), "mesh": g.num_devices,
                  "used": g.devices_used, "padded": g.trials_padded,
                  "success": g.success.tolist(), "error": g.rel_error.tolist()}))
"""


@pytest.fixture(scope="module")
def grid():
    return PT.run_grid(GRID["ratios"], GRID["fractions"], GRID["trials"], GRID["m"],
                       jax.random.PRNGKey(0), details=True)


def test_grid_below_and_above_the_curve(grid):
    assert grid.success.shape == (len(PT.FAMILIES), 1, 2, 3)
    np.testing.assert_array_equal(grid.n, [12])
    assert grid.devices_used == len(jax.devices())
    # 5% is far below the curve: every family recovers (to machine precision).
    assert grid.success[:, 0, 0].mean() >= 0.9
    assert grid.rel_error[grid.success].max() < 1e-12
    # 60% is far above it: nothing recovers.
    assert grid.success[:, 0, 1].mean() <= 0.1
    # Without details, run_grid returns the success array (same problems: cached compiles).
    plain = PT.run_grid(GRID["ratios"], GRID["fractions"], GRID["trials"], GRID["m"],
                        jax.random.PRNGKey(0))
    assert plain.dtype == bool
    np.testing.assert_array_equal(plain, grid.success)


def test_fifty_percent_fraction():
    assert PT.fifty_percent_fraction([0.1, 0.2, 0.3], [1.0, 0.75, 0.25]) == pytest.approx(0.25)
    assert PT.fifty_percent_fraction([0.1, 0.2], [1.0, 0.9]) is None
    assert PT.fifty_percent_fraction([0.1, 0.2], [0.4, 0.0]) is None


def test_four_devices_give_the_one_device_results(grid):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "OPENBLAS_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["devices"] == 4 and got["mesh"] == 4 and got["used"] == 4
    assert got["padded"] == 4  # 3 trials padded to a multiple of the 4 devices
    # Same problems as the one-device grid of this process, same answers.
    np.testing.assert_array_equal(np.asarray(got["success"]), grid.success)
    np.testing.assert_allclose(np.asarray(got["error"]), grid.rel_error, rtol=1e-6,
                               atol=1e-12)
