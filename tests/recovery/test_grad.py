"""Derivatives of l1_regression: jvp, grad, and vmap of grad, against finite differences.

At a non-degenerate vertex (exactly n interpolated rows: generic data) the implicit
derivative is the true derivative and must match central finite differences in float64. At
a degenerate vertex (exact recovery: m - k > n interpolated rows) the documented derivative
is least squares over the interpolated rows; it is checked against that formula, and it is
zero along the corrupted entries, which is the true (robust) derivative there.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpurify as jp
from tests.recovery.helpers import planted


def _generic(seed, m=40, n=8):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, n)), rng.standard_normal(m) * 2.0


def _x(a, y):
    return jp.l1_regression(a, y).x


def _fd(f, arg, direction, h=1e-6):
    return (f(arg + h * direction) - f(arg - h * direction)) / (2 * h)


@pytest.mark.parametrize("seed", range(3))
def test_jvp_matches_finite_differences_nondegenerate(seed):
    a, y = _generic(seed)
    assert int(jp.l1_regression(a, y).num_interpolated) == a.shape[1]
    rng = np.random.default_rng(1000 + seed)
    da, dy = rng.standard_normal(a.shape), rng.standard_normal(y.shape)
    _, tangent = jax.jvp(_x, (a, y), (da, dy))
    fd = _fd(lambda t: np.asarray(_x(a + t * da, y + t * dy)), 0.0, 1.0)
    np.testing.assert_allclose(tangent, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", range(2))
def test_grad_matches_finite_differences_nondegenerate(seed):
    a, y = _generic(10 + seed)
    c = np.random.default_rng(seed).standard_normal(a.shape[1])

    def loss(a, y):
        return jnp.dot(c, _x(a, y)) + jp.l1_regression(a, y).objective

    ga, gy = jax.grad(loss, argnums=(0, 1))(a, y)
    rng = np.random.default_rng(2000 + seed)
    da, dy = rng.standard_normal(a.shape), rng.standard_normal(y.shape)
    h = 1e-6
    fd = (loss(a + h * da, y + h * dy) - loss(a - h * da, y - h * dy)) / (2 * h)
    np.testing.assert_allclose(np.sum(ga * da) + np.sum(gy * dy), fd, rtol=1e-5)


def test_objective_gradient_is_the_dual_nondegenerate():
    # Envelope theorem: d/dy min_x ||y - A x||_1 = u, the optimal dual.
    a, y = _generic(20)
    sol = jp.l1_regression(a, y)
    gy = jax.grad(lambda y: jp.l1_regression(a, y).objective)(y)
    np.testing.assert_allclose(gy, sol.dual, atol=1e-8)


def test_degenerate_derivative_is_least_squares_on_interpolated_rows():
    a, y, x, corrupted = planted(21, 60, 10, 0.2)
    rng = np.random.default_rng(3)
    da, dy = rng.standard_normal(a.shape), rng.standard_normal(y.shape)
    _, tangent = jax.jvp(_x, (a, y), (da, dy))
    s = ~corrupted
    expected = np.linalg.lstsq(a[s], dy[s] - da[s] @ x, rcond=None)[0]
    np.testing.assert_allclose(tangent, expected, rtol=1e-8, atol=1e-10)


def test_degenerate_derivative_ignores_corrupted_entries():
    # Moving a corrupted observation does not move the recovered x: exact, not a convention.
    a, y, _, corrupted = planted(22, 60, 10, 0.2)
    dy = np.where(corrupted, 1.0, 0.0)
    _, tangent = jax.jvp(lambda y: _x(a, y), (y,), (dy,))
    np.testing.assert_allclose(tangent, 0.0, atol=1e-12)
    moved = np.asarray(_x(a, y + 0.5 * dy))
    np.testing.assert_allclose(moved, np.asarray(_x(a, y)), rtol=1e-12)


def test_vmap_of_grad_equals_loop():
    rng = np.random.default_rng(30)
    a = rng.standard_normal((40, 8))
    ys = rng.standard_normal((3, 40)) * 2.0
    c = rng.standard_normal(8)

    def loss(a, y):
        return jnp.dot(c, _x(a, y))

    batched = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, 0))(a, ys)
    for i in range(3):
        ga, gy = jax.grad(loss, argnums=(0, 1))(a, ys[i])
        np.testing.assert_allclose(batched[0][i], ga, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(batched[1][i], gy, rtol=1e-10, atol=1e-12)


def test_vmap_of_jvp_equals_loop():
    rng = np.random.default_rng(31)
    a = rng.standard_normal((3, 40, 8))
    ys = rng.standard_normal((3, 40)) * 2.0
    das = rng.standard_normal(a.shape)
    dys = rng.standard_normal(ys.shape)
    out = jax.vmap(lambda *t: jax.jvp(_x, t[:2], t[2:])[1])(a, ys, das, dys)
    for i in range(3):
        single = jax.jvp(_x, (a[i], ys[i]), (das[i], dys[i]))[1]
        np.testing.assert_allclose(out[i], single, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_gradient_is_finite_at_an_unconverged_point(dtype):
    # One chunk on generic data: fewer than n rows are interpolated. The derivative then
    # uses the n smallest residuals (documented), so it is finite, never NaN.
    a, y = _generic(11, m=60, n=10)
    a, y = jnp.asarray(a, dtype), jnp.asarray(y, dtype)

    def loss(y):
        sol = jp.l1_regression(a, y, max_iters=1, check_every=1, throw=False)
        return jnp.sum(sol.x**2), sol

    (_, sol), g = jax.value_and_grad(loss, has_aux=True)(y)
    assert not bool(sol.converged)
    assert bool(jnp.all(jnp.isfinite(g)))
