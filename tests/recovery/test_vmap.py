"""l1_regression under jax.vmap, and batched results against one-at-a-time results."""

import jax
import numpy as np
import pytest

import jaxpurify as jp
from tests.recovery.helpers import planted

FIELDS = ("x", "residual", "objective", "gap", "iterations", "interpolated", "result")


def _assert_same(s1, s2):
    for f in FIELDS:
        np.testing.assert_allclose(getattr(s1, f), getattr(s2, f), rtol=1e-13, atol=1e-14,
                                   err_msg=f)


@pytest.mark.parametrize("method", jp.METHODS)
@pytest.mark.parametrize("shared", [True, False])
def test_batched_equals_one_at_a_time(method, shared):
    # Mixed difficulty so members converge after different numbers of iterations.
    a, y, _, _ = planted(30, 120, 24, 0.3, batch=4, shared=shared)
    y[0] = planted(31, 120, 24, 0.05, shared=True)[1] if shared else y[0]
    batched = jp.l1_regression(a, y, method=method)
    assert len(set(np.asarray(batched.iterations).tolist())) >= 1
    for i in range(4):
        single = jp.l1_regression(a if shared else a[i], y[i], method=method)
        _assert_same(jax.tree_util.tree_map(lambda t, i=i: t[i], batched), single)


def test_vmap_over_y_equals_shared_batch():
    a, y, _, _ = planted(32, 80, 16, 0.2, batch=5)
    batched = jp.l1_regression(a, y)
    vmapped = jax.vmap(lambda yi: jp.l1_regression(a, yi), in_axes=0)(y)
    _assert_same(vmapped, batched)


def test_vmap_over_designs_and_nested_vmap():
    a, y, x, _ = planted(33, 60, 12, 0.2, batch=6, shared=False)
    vmapped = jax.vmap(lambda ai, yi: jp.l1_regression(ai, yi))(a, y)
    batched = jp.l1_regression(a, y)
    _assert_same(vmapped, batched)
    nested = jax.vmap(jax.vmap(lambda ai, yi: jp.l1_regression(ai, yi)))(
        a.reshape(2, 3, 60, 12), y.reshape(2, 3, 60))
    np.testing.assert_allclose(nested.x.reshape(6, 12), x, rtol=1e-11)


def test_vmap_over_batched_call():
    # vmap of a call that is itself batched (shared design): (2, 3) problems in all.
    a, y, x, _ = planted(34, 60, 12, 0.1, batch=6)
    out = jax.vmap(lambda yb: jp.l1_regression(a, yb))(y.reshape(2, 3, 60))
    assert out.x.shape == (2, 3, 12)
    np.testing.assert_allclose(out.x.reshape(6, 12), x, rtol=1e-11)
