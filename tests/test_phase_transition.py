"""Tests for jaxpurify.phase_transition (dtype-agnostic; x64 only where stated)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpurify.phase_transition import critical_fraction, critical_ratio, psi

# rho*(m/n) computed in float64 (agrees with an independent scipy brentq solution).
REFERENCE_FRACTIONS = {2.0: 0.19284483309074, 4.0: 0.40028375760335, 8.0: 0.56625835608650}


def _rtol(x):
    return 1e-12 if np.asarray(x).dtype == np.float64 else 2e-6


def _brute_force_psi(rho):
    """psi(rho) by numerical integration of E[(|g|-t)_+^2] and scalar minimization in t."""
    integrate = pytest.importorskip("scipy.integrate")
    optimize = pytest.importorskip("scipy.optimize")
    stats = pytest.importorskip("scipy.stats")

    def objective(t):
        tail, _ = integrate.quad(
            lambda g: (g - t) ** 2 * stats.norm.pdf(g), t, np.inf, epsabs=0, epsrel=1e-13
        )
        return rho * (1 + t * t) + (1 - rho) * 2 * tail

    res = optimize.minimize_scalar(
        objective, bounds=(0.0, 12.0), method="bounded", options={"xatol": 1e-10}
    )
    return res.fun


def test_endpoints_and_out_of_range():
    out = np.asarray(psi([0.0, 1.0, -0.1, 1.1, np.nan]))
    np.testing.assert_array_equal(out[:2], [0.0, 1.0])
    assert np.all(np.isnan(out[2:]))
    np.testing.assert_array_equal(np.asarray(critical_fraction([1.0, np.inf])), [0.0, 1.0])
    assert np.isnan(np.asarray(critical_fraction(0.5)))
    np.testing.assert_array_equal(np.asarray(critical_ratio([0.0, 1.0])), [1.0, np.inf])


def test_psi_increasing_and_bounds():
    rho = np.linspace(0.0, 1.0, 401)
    out = np.asarray(psi(rho))
    assert np.all(np.diff(out) >= 0)
    assert np.all(np.diff(out[rho <= 0.9]) > 0)
    assert np.all((out >= rho) & (out <= 1))  # psi = rho + 2 (1 - rho) Q(t*) >= rho


def test_psi_matches_scipy_brute_force():
    rho = np.array([1e-4, 0.01, 0.1, 0.25, 0.5, 0.75, 0.95])
    expected = np.array([_brute_force_psi(r) for r in rho])
    np.testing.assert_allclose(np.asarray(psi(rho)), expected, rtol=max(_rtol(psi(0.5)), 1e-9))


def test_psi_float64_accuracy():
    with jax.enable_x64(True):
        rho = np.array([1e-8, 1e-4, 0.01, 0.1, 0.25, 0.5, 0.75, 0.95])
        out = psi(rho)
        assert out.dtype == jnp.float64
        expected = np.array([_brute_force_psi(r) for r in rho])
        # brute force (quad + bounded Brent) is itself accurate to ~1e-12
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-10)


def test_psi_is_the_infimum():
    """psi(rho) <= objective(t) on a grid of t, with equality approached near t*."""
    from jax.scipy.special import ndtr

    rho = jnp.asarray([0.05, 0.2, 0.6], jnp.float32)[:, None]
    t = jnp.linspace(0.0, 4.0, 4001, dtype=jnp.float32)[None, :]
    phi = jnp.exp(-0.5 * t * t) / np.sqrt(2 * np.pi)
    obj = rho * (1 + t * t) + (1 - rho) * 2 * ((1 + t * t) * ndtr(-t) - t * phi)
    value = np.asarray(psi(rho[:, 0]))
    grid_min = np.asarray(obj.min(axis=1))
    assert np.all(value <= grid_min + 1e-6)
    np.testing.assert_allclose(value, grid_min, rtol=1e-5)


def test_critical_fraction_known_values():
    ratios = np.array(list(REFERENCE_FRACTIONS))
    out = np.asarray(critical_fraction(ratios))
    np.testing.assert_allclose(out, list(REFERENCE_FRACTIONS.values()), rtol=_rtol(out))
    # the commonly quoted values
    np.testing.assert_allclose(out, [0.19, 0.40, 0.57], atol=0.01)


def test_critical_fraction_float64():
    with jax.enable_x64(True):
        out = critical_fraction(np.array(list(REFERENCE_FRACTIONS)))
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(out), list(REFERENCE_FRACTIONS.values()), rtol=1e-12)
        back = psi(out)
        np.testing.assert_allclose(
            np.asarray(back), 1 - 1 / np.array(list(REFERENCE_FRACTIONS)), rtol=1e-13
        )


def test_inverse_consistency():
    ratios = np.array([1.05, 1.5, 2.0, 3.0, 4.0, 8.0, 20.0, 100.0])
    rho = critical_fraction(ratios)
    assert np.all(np.diff(np.asarray(rho)) > 0)
    tol = max(_rtol(rho), 1e-5)
    np.testing.assert_allclose(np.asarray(critical_ratio(rho)), ratios, rtol=tol)
    np.testing.assert_allclose(np.asarray(psi(rho)), 1 - 1 / ratios, rtol=tol)
    fractions = np.array([0.01, 0.1, 0.3, 0.5, 0.7])
    np.testing.assert_allclose(
        np.asarray(critical_fraction(critical_ratio(fractions))), fractions, rtol=tol
    )


def test_shapes_dtypes_jit_vmap():
    rho = np.array([[0.1, 0.2], [0.3, 0.4]], np.float32)
    out = psi(rho)
    assert out.shape == (2, 2) and out.dtype == jnp.float32
    assert psi(0.3).shape == () and psi(1).dtype == jnp.result_type(float)
    np.testing.assert_allclose(np.asarray(jax.jit(psi)(rho)), np.asarray(out), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.vmap(psi)(rho)), np.asarray(out), rtol=1e-6)
    ratios = jnp.asarray([2.0, 4.0], jnp.float32)
    np.testing.assert_allclose(
        np.asarray(jax.vmap(critical_fraction)(ratios)),
        np.asarray(critical_fraction(ratios)),
        rtol=1e-6,
    )
