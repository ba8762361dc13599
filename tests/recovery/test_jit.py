"""l1_regression under jax.jit."""

import jax
import numpy as np
import pytest

import jaxpurify as jp
from tests.recovery.helpers import planted


@pytest.mark.parametrize("shared", [True, False])
def test_jit_equals_eager(shared):
    a, y, x, _ = planted(20, 80, 16, 0.2, batch=3, shared=shared)
    eager = jp.l1_regression(a, y)
    jitted = jax.jit(lambda a, y: jp.l1_regression(a, y))(a, y)
    for f in ("x", "residual", "objective", "iterations", "interpolated", "result"):
        np.testing.assert_allclose(getattr(jitted, f), getattr(eager, f), rtol=1e-12, atol=1e-13)


def test_jit_with_nonfinite_input_raises_at_run_time():
    a, y, _, _ = planted(21, 40, 8, 0.1)
    y = y.copy()
    y[0] = np.nan
    f = jax.jit(lambda a, y: jp.l1_regression(a, y).x)
    with pytest.raises(Exception, match="NaN or Inf"):
        jax.block_until_ready(f(a, y))
    g = jax.jit(lambda a, y: jp.l1_regression(a, y, throw=False).result)
    assert int(g(a, y)) == jp.RESULTS.nonfinite_input
