"""l1_regression under jax.vmap, and batched results against one-at-a-time results."""

import jax
import numpy as np
import pytest

import jaxpurify as jp
from tests.recovery.helpers import planted

FIELDS = ("x", "residual", "objective", "gap", "iterations", "interpolated", "result")


def _assert_same(s1, s2):
    """Same trajectory (iterations, interpolated rows, status exactly), same values up to
    rounding (a batch multiplies matrices where one problem multiplies vectors)."""
    for f in FIELDS:
        v1, v2 = np.asarray(getattr(s1, f)), np.asarray(getattr(s2, f))
        if v1.dtype.kind in "biu":
            np.testing.assert_array_equal(v1, v2, err_msg=f)
        else:
            scale = float(np.max(np.abs(v2), initial=1.0))
            np.testing.assert_allclose(v1, v2, rtol=1e-12, atol=1e-13 * scale, err_msg=f)


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


@pytest.mark.parametrize("shared", [True, False])
def test_compacted_batch_equals_one_loop(shared):
    # Eager batches run in rounds and continue only unfinished members in a smaller batch;
    # that must not change any member's trajectory or result.
    # Three easy members (5% corrupted) and three past the threshold (45%): the latter take
    # many more chunks.
    a, y, x, _ = planted(34, 120, 24, 0.45, batch=6, shared=shared)
    rng = np.random.default_rng(34)
    e = np.where(rng.random((3, 120)) < 0.05, 10.0 * rng.standard_normal((3, 120)), 0.0)
    y[:3] = (a @ x[:3].T).T + e if shared else np.einsum("bmn,bn->bm", a[:3], x[:3]) + e
    compacted = jp.l1_regression(a, y, check_every=10)
    one_loop = jp.l1_regression(a, y, check_every=10, compact=False)
    iterations = np.asarray(one_loop.iterations)
    assert iterations.max() > 2 * 10 > iterations.min()  # the batch was really compacted
    _assert_same(compacted, one_loop)
