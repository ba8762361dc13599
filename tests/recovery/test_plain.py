"""l1_regression called directly: exact recovery, agreement with HiGHS, status, bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxpurify as jp
from tests.recovery.helpers import highs_l1, planted, rel_err

METHODS = jp.METHODS


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("m,n,fraction", [(80, 20, 0.1), (160, 20, 0.3)])
def test_exact_recovery_float64(method, shared, m, n, fraction):
    a, y, x, corrupted = planted(0, m, n, fraction, batch=6, shared=shared)
    sol = jp.l1_regression(a, y, method=method)
    assert sol.x.shape == x.shape and sol.residual.shape == y.shape
    assert np.all(sol.converged) and np.all(sol.result == jp.RESULTS.successful)
    assert np.max(rel_err(sol.x, x)) <= 1e-12
    # The certificate: interpolated rows are exactly the clean ones.
    np.testing.assert_array_equal(np.asarray(sol.interpolated), ~corrupted)
    np.testing.assert_array_equal(np.asarray(sol.corrupted), corrupted)
    np.testing.assert_allclose(sol.objective, np.abs(y - np.einsum(
        "...mn,...n->...m", a, x)).sum(-1), rtol=1e-12)
    # The dual is feasible and tight.
    u = np.asarray(sol.dual)
    assert np.max(np.abs(u)) <= 1 + 1e-12
    assert np.max(np.abs(np.einsum("...mn,...m->...n", a, u))) <= 1e-8 * np.abs(a).max()
    assert np.max(sol.gap) <= jp.recovery.default_tol(np.float64)


@pytest.mark.parametrize("method", METHODS)
def test_float32_recovery(method):
    a, y, x, _ = planted(1, 120, 20, 0.15, batch=4, dtype=np.float32)
    sol = jp.l1_regression(a, y, method=method)
    assert sol.x.dtype == jnp.float32 and sol.objective.dtype == jnp.float32
    assert np.all(sol.converged)
    assert np.max(rel_err(sol.x, x)) <= 1e-5


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", range(4))
def test_matches_highs_outside_recovery_region(method, seed):
    # Dense Gaussian y: nothing is planted, the minimizer is a generic vertex.
    rng = np.random.default_rng(100 + seed)
    a = rng.standard_normal((50, 12))
    y = rng.standard_normal(50) * 3
    sol = jp.l1_regression(a, y, method=method)
    x_ref, obj_ref = highs_l1(a, y)
    assert sol.converged
    np.testing.assert_allclose(float(sol.objective), obj_ref, rtol=1e-9)
    # Generic LPs have a unique vertex solution: x itself must match.
    np.testing.assert_allclose(np.asarray(sol.x), x_ref, atol=1e-7)
    assert int(sol.num_interpolated) >= a.shape[1]


def test_beyond_threshold_matches_highs_and_is_not_planted():
    # 45% corruption at m/n = 2 is far past the Donoho-Tanner threshold (~19%): the L1
    # minimizer is certified optimal but is not the planted x.
    a, y, x, _ = planted(3, 60, 30, 0.45)
    sol = jp.l1_regression(a, y)
    _, obj_ref = highs_l1(a, y)
    assert sol.converged
    np.testing.assert_allclose(float(sol.objective), obj_ref, rtol=1e-9)
    assert rel_err(sol.x, x) > 1e-3


def test_broadcast_batch_shapes():
    a, y, x, _ = planted(4, 60, 10, 0.1, batch=6, shared=False)
    a = a.reshape(2, 3, 60, 10)
    y = y.reshape(2, 3, 60)
    sol = jp.l1_regression(a, y)
    assert sol.x.shape == (2, 3, 10) and sol.converged.shape == (2, 3)
    np.testing.assert_allclose(sol.x, x.reshape(2, 3, 10), rtol=1e-10, atol=1e-12)
    # A broadcasts against y's batch like jnp.linalg.solve.
    sol2 = jp.l1_regression(a[:1], y)
    assert sol2.x.shape == (2, 3, 10)


def test_exact_fit_has_zero_objective():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((40, 8))
    x = rng.standard_normal(8)
    sol = jp.l1_regression(a, a @ x)
    assert sol.converged and float(sol.objective) < 1e-12
    np.testing.assert_allclose(sol.x, x, rtol=1e-12)


def test_solver_objects_and_unknown_method():
    a, y, x, _ = planted(6, 60, 10, 0.1)
    sol = jp.l1_regression(a, y, method=jp.ADMM(alpha=1.8))
    np.testing.assert_allclose(sol.x, x, rtol=1e-12)
    with pytest.raises(ValueError, match="unknown method"):
        jp.l1_regression(a, y, method="simplex")
    with pytest.raises(ValueError, match="alpha"):
        jp.ADMM(alpha=2.5)


class TestBadInput:
    def test_row_mismatch(self):
        with pytest.raises(ValueError, match=r"A has 5 rows but y has 4"):
            jp.l1_regression(np.ones((5, 2)), np.ones(4))

    def test_wrong_rank(self):
        with pytest.raises(ValueError, match="A must have shape"):
            jp.l1_regression(np.ones(5), np.ones(5))
        with pytest.raises(ValueError, match="y must have shape"):
            jp.l1_regression(np.ones((5, 2)), np.float64(1.0))

    def test_complex_rejected(self):
        with pytest.raises(ValueError, match="real floating"):
            jp.l1_regression(np.ones((5, 2), complex), np.ones(5))

    @pytest.mark.parametrize("bad", [np.nan, np.inf])
    def test_nonfinite_raises_or_flags(self, bad):
        a, y, _, _ = planted(7, 40, 8, 0.1, batch=3)
        y = y.copy()
        y[1, 3] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            jp.l1_regression(a, y)
        sol = jp.l1_regression(a, y, throw=False)
        np.testing.assert_array_equal(sol.result, [0, jp.RESULTS.nonfinite_input, 0])
        np.testing.assert_array_equal(sol.converged, [True, False, True])
        assert np.all(np.isnan(sol.x[1]))
        assert np.all(np.isfinite(np.asarray(sol.x)[[0, 2]]))

    def test_underdetermined_is_reported(self):
        rng = np.random.default_rng(8)
        a, y = rng.standard_normal((5, 8)), rng.standard_normal(5)
        sol = jp.l1_regression(a, y, throw=False)
        assert int(sol.result) == jp.RESULTS.underdetermined and not sol.converged
        with pytest.raises(jp.L1RecoveryError, match="underdetermined"):
            jp.l1_regression(a, y)

    def test_rank_deficient_is_reported(self):
        rng = np.random.default_rng(9)
        a = rng.standard_normal((40, 6))
        a[:, 5] = a[:, 0] + a[:, 1]
        sol = jp.l1_regression(a, rng.standard_normal(40), throw=False)
        assert int(sol.result) == jp.RESULTS.rank_deficient and not sol.converged
        assert np.all(np.isfinite(sol.x))

    def test_iteration_limit_is_reported(self):
        a, y, _, _ = planted(10, 200, 50, 0.3)
        sol = jp.l1_regression(a, y, max_iters=1, check_every=1, throw=False)
        assert int(sol.result) == jp.RESULTS.max_iters_reached and not sol.converged
        with pytest.raises(jp.L1RecoveryError, match="iteration limit"):
            jp.l1_regression(a, y, max_iters=1, check_every=1)

    def test_bad_options(self):
        a, y, _, _ = planted(11, 40, 8, 0.1)
        with pytest.raises(ValueError, match="tol"):
            jp.l1_regression(a, y, tol=0.0)
        with pytest.raises(ValueError, match="max_iters"):
            jp.l1_regression(a, y, max_iters=0)


def test_zero_data_converges_immediately():
    # A dead filter or an untouched readout gives y == 0: the answer is x = 0, at once.
    a, _, _, _ = planted(12, 17, 8, 0.0)
    sol = jp.l1_regression(a, np.zeros((2, 17)))
    assert np.all(sol.converged) and np.all(sol.iterations == 0)
    np.testing.assert_array_equal(sol.x, 0.0)


@pytest.mark.parametrize("tol", [1e-9, 1e-12])
def test_rounding_in_the_inputs_does_not_block_convergence(tol):
    # y = w - w0 with weights 1e3 times the update: y is in range(A) only up to rounding of
    # the *inputs* (a dense 1e-13-relative LP). The gap is certified at the rounding level
    # (m * eps * ||y||_1) instead of iterating to max_iters.
    rng = np.random.default_rng(7)
    a = rng.standard_normal((200, 40))
    x = 1e-3 * rng.standard_normal((4, 40))
    w0 = rng.standard_normal((4, 200))
    y = (w0 + x @ a.T) - w0
    sol = jp.l1_regression(a, y, tol=tol, max_iters=2000)
    assert np.all(sol.converged) and np.all(sol.iterations == 0)
    assert np.all(rel_err(sol.x, x) < 1e-11)


@pytest.mark.parametrize("magnitude", [1e-9, 1e-6])
def test_tiny_corruption_is_found_exactly(magnitude):
    # Corruption far below the clean scale (but above rounding) is still decoded exactly.
    rng = np.random.default_rng(8)
    a = rng.standard_normal((200, 40))
    x = rng.standard_normal((4, 40))
    size = magnitude * (1.0 + rng.random((4, 200))) * rng.choice([-1.0, 1.0], (4, 200))
    e = np.where(rng.random((4, 200)) < 0.1, size, 0.0)
    sol = jp.l1_regression(a, x @ a.T + e, tol=1e-12)
    assert np.all(sol.converged)
    assert np.all(rel_err(sol.x, x) < 1e-13)
    np.testing.assert_array_equal(sol.interpolated, e == 0)
