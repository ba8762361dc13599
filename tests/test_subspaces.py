"""Recovery subspaces: each claim of the ``jaxpurify.subspaces`` docstring, measured.

A claim "training X keeps the params in subspace A" is checked as the relative distance of
``vectors - offset`` from ``range(design)`` (see ``subspace_distance``): ~1e-15 when it holds
(asserted < 1e-12 after the params moved by at least a few percent) and >= 1e-3 when it fails.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpurify import subspaces as S
from jaxpurify.models import OneHiddenLayerCNN
from jaxpurify.training import fit, sgd
from tests.one_hidden_helpers import (
    activation_pattern,
    designed_model,
    designed_trained,
    fast_compiles,  # noqa: F401 (autouse fixture)
    init,
    joint,
    lazy_setup,
    lazy_trained,
    multiclass_setup,
    rel_err,
    setup,
    subspace_distance,
    two_stage,
)

EXACT = 1e-12
FAR = 1e-3


def _moved(params, p0, which=S.filter_vectors):
    return rel_err(which(params), which(p0))


# --------------------------------------------------------------------------- layout


def test_vector_layout_round_trips():
    s = setup()
    v = S.filter_vectors(s.p0)
    assert v.shape == (32, 65)
    np.testing.assert_array_equal(v[:, :-1], s.p0["conv"]["kernel"].reshape(64, 32).T)
    np.testing.assert_array_equal(v[:, -1], s.p0["conv"]["bias"])
    back = S.with_filter_vectors({"params": s.p0}, 2 * v)
    np.testing.assert_array_equal(back["conv"]["kernel"], 2 * s.p0["conv"]["kernel"])
    np.testing.assert_array_equal(back["readout"]["kernel"], s.p0["readout"]["kernel"])
    r = S.readout_vectors({"params": s.p0})
    assert r.shape == (1, 32)
    back = S.with_readout_vectors(s.p0, 3 * r)
    np.testing.assert_array_equal(back["readout"]["kernel"], 3 * s.p0["readout"]["kernel"])
    assert S.count_parameters(s.p0) == 32 * 65 + 32


def test_filter_vectors_without_bias():
    s = setup()
    model = OneHiddenLayerCNN(4, 8, use_bias=False, param_dtype=jnp.float64)
    p = init(model, jax.random.PRNGKey(0), s.x)
    v = S.filter_vectors(p)
    np.testing.assert_array_equal(v[:, -1], 0)
    assert set(S.with_filter_vectors(p, v)["conv"]) == {"kernel"}


def test_orthonormal_row_basis():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((3, 7)) @ rng.standard_normal((7, 10))
    rows = np.concatenate([rows, rows[:2] - rows[2:3]])  # 5 rows of rank 3
    basis = np.asarray(S.orthonormal_row_basis(jnp.asarray(rows)))
    assert basis.shape == (10, 3)
    np.testing.assert_allclose(basis.T @ basis, np.eye(3), atol=1e-14)
    np.testing.assert_allclose(rows @ basis @ basis.T, rows, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 7, 12])
def test_numerical_rank_is_numpy_matrix_rank_under_jit_and_vmap(rank):
    """The tolerance the row bases and the held-out rank choice share: equal to
    ``numpy.linalg.matrix_rank`` on exactly low-rank matrices, also traced and batched."""
    rng = np.random.default_rng(rank)
    m = jnp.asarray(rng.standard_normal((30, rank)) @ rng.standard_normal((rank, 12)))
    s = jnp.linalg.svd(m, compute_uv=False)
    assert int(S.numerical_rank(s, m.shape)) == np.linalg.matrix_rank(np.asarray(m)) == rank
    batch = jnp.stack([m, m.at[:, 0].set(rng.standard_normal(30))])  # + a generic column
    ranks = jax.jit(jax.vmap(lambda a: S.numerical_rank(jnp.linalg.svd(a, compute_uv=False),
                                                        a.shape)))(batch)
    assert ranks.tolist() == [rank, min(rank + 1, 12)]


def test_full_span_raises():
    """The row-space needs fewer training patches than d + 1 = 65: 17 images give 68."""
    s = setup()
    x = jax.random.normal(jax.random.PRNGKey(5), (17, 16, 16, 1), jnp.float64)
    with pytest.raises(ValueError, match="no redundancy"):
        S.filter_row_space(s.student, s.p0, x)
    with pytest.raises(ValueError, match="R\\^10"):
        S.orthonormal_row_basis(jnp.asarray(np.random.default_rng(0).standard_normal((12, 10))))
    # 16 images (64 patches) still leave one direction.
    assert S.filter_row_space(s.student, s.p0, x[:16]).design.shape == (65, 64)


# --------------------------------------------------------------------------- data row-space


@pytest.mark.parametrize("name", ["gd", "sgd", "momentum", "nesterov"])
def test_filter_row_space_is_exact_for_sgd_family(name):
    """(S)GD / momentum / Nesterov, trained jointly with the readout."""
    s = setup()
    params, _ = joint(name)
    problem = S.filter_row_space(s.student, s.p0, s.x)
    assert problem.design.shape == (65, 16)  # N k = 16 patches
    assert problem.ratio == pytest.approx(65 / 16)
    assert _moved(params, s.p0) > 0.05
    assert subspace_distance(problem, S.filter_vectors(params)) < EXACT


def test_filter_row_space_is_exact_for_two_stage_training():
    s = setup()
    params, _ = two_stage("momentum")
    problem = S.filter_row_space(s.student, s.p0, s.x)
    assert _moved(params, s.p0) > 0.05
    assert subspace_distance(problem, S.filter_vectors(params)) < EXACT


def test_filter_row_space_is_exact_for_any_loss():
    """Cross-entropy with 3 classes (a different gradient, the same patch span)."""
    s = multiclass_setup()
    params, _ = fit(s.model, s.p0, s.x, s.labels, optimizer=sgd(0.5, momentum=0.5), steps=100,
                    loss="cross_entropy")
    assert _moved(params, s.p0) > 0.05
    problem = S.filter_row_space(s.model, s.p0, s.x)
    assert subspace_distance(problem, S.filter_vectors(params)) < EXACT


def test_weight_decay_needs_weight_decay_true():
    s = setup()
    params, _ = joint("weight_decay")
    plain = S.filter_row_space(s.student, s.p0, s.x)
    assert subspace_distance(plain, S.filter_vectors(params)) > FAR  # decay leaves w0 + span
    decayed = S.filter_row_space(s.student, s.p0, s.x, weight_decay=True)
    assert decayed.design.shape == (32, 65, 17)  # [basis, w0_j] per filter
    np.testing.assert_array_equal(decayed.offset, 0)
    np.testing.assert_array_equal(decayed.design[:, :, -1], S.filter_vectors(s.p0))
    assert subspace_distance(decayed, S.filter_vectors(params)) < EXACT


def test_adam_leaves_the_row_space():
    """Documented limitation: Adam rescales coordinates, so the update leaves the span."""
    s = setup()
    params, history = joint("adam")
    assert float(history.loss[-1]) < 1e-3 * float(history.loss[0])  # it did train
    for weight_decay in (False, True):
        problem = S.filter_row_space(s.student, s.p0, s.x, weight_decay=weight_decay)
        assert subspace_distance(problem, S.filter_vectors(params)) > 1e-2


def test_readout_row_space_is_exact_for_two_stage_training():
    s = setup()
    for name in ("gd", "momentum"):
        params, _ = two_stage(name)
        assert _moved(params, s.p0, S.readout_vectors) > 0.05
        problem = S.readout_row_space(s.student, params, s.p0, s.x)
        assert problem.design.shape == (32, 4)  # N = 4 hidden feature vectors
        assert subspace_distance(problem, S.readout_vectors(params)) < EXACT


def test_readout_row_space_with_weight_decay():
    s = setup()
    params, _ = two_stage("weight_decay")
    assert _moved(params, s.p0, S.readout_vectors) > 0.05
    plain = S.readout_row_space(s.student, params, s.p0, s.x)
    assert subspace_distance(plain, S.readout_vectors(params)) > FAR
    decayed = S.readout_row_space(s.student, params, s.p0, s.x, weight_decay=True)
    assert decayed.design.shape == (1, 32, 5)
    assert subspace_distance(decayed, S.readout_vectors(params)) < EXACT


def test_readout_row_space_with_frozen_filters():
    s = setup()
    params, _ = fit(s.student, s.p0, s.x, s.y, optimizer=sgd(0.05), steps=50,
                    trainable=("readout",))
    assert _moved(params, s.p0, S.readout_vectors) > 0.05
    problem = S.readout_row_space(s.student, params, s.p0, s.x)
    assert subspace_distance(problem, S.readout_vectors(params)) < EXACT


def test_readout_row_space_is_not_exact_for_joint_training():
    """The readout moved along features of filters that moved too (measured ~0.2)."""
    s = setup()
    for name in ("gd", "momentum"):
        params, _ = joint(name)
        assert _moved(params, s.p0, S.readout_vectors) > 0.05
        problem = S.readout_row_space(s.student, params, s.p0, s.x)
        assert subspace_distance(problem, S.readout_vectors(params)) > 1e-2


# --------------------------------------------------------------------------- lazy


def test_lazy_design_shape():
    s = lazy_setup()
    problem = S.filter_lazy(s.student, s.p0, s.x)
    assert problem.source == "lazy"
    assert problem.design.shape == (16 * 65, 4)  # N C = 4 unknowns for J (d + 1) entries
    assert problem.offset.shape == (1, 16 * 65)
    assert problem.ratio == pytest.approx(16 * 65 / 4)


def test_lazy_is_exact_without_pattern_flips():
    s = lazy_setup()
    params = lazy_trained("small")
    np.testing.assert_array_equal(activation_pattern(params, s.x), activation_pattern(s.p0, s.x))
    assert _moved(params, s.p0) > 3e-3
    problem = S.filter_lazy(s.student, s.p0, s.x)
    assert subspace_distance(problem, S.filter_vectors(params).reshape(1, -1)) < 1e-11
    # Much smaller than the data row-space: 4 unknowns in all instead of 16 per filter.
    assert subspace_distance(S.filter_row_space(s.student, s.p0, s.x),
                             S.filter_vectors(params)) < EXACT


def test_lazy_is_not_exact_when_patterns_flip():
    s = lazy_setup()
    params = lazy_trained("flip")
    assert (activation_pattern(params, s.x) != activation_pattern(s.p0, s.x)).sum() > 0
    problem = S.filter_lazy(s.student, s.p0, s.x)
    assert subspace_distance(problem, S.filter_vectors(params).reshape(1, -1)) > 1e-2


def test_lazy_is_not_exact_when_the_readout_trains():
    """No flip, but the filter updates use the moving readout (measured ~1e-2)."""
    s = lazy_setup()
    params = lazy_trained("joint")
    np.testing.assert_array_equal(activation_pattern(params, s.x), activation_pattern(s.p0, s.x))
    problem = S.filter_lazy(s.student, s.p0, s.x)
    assert subspace_distance(problem, S.filter_vectors(params).reshape(1, -1)) > FAR


# --------------------------------------------------------------------------- designed


def test_designed_problems():
    s = setup()
    dm = designed_model()
    codes, history = designed_trained()
    assert float(history.loss[-1]) < 1e-3 * float(history.loss[0])
    plain = dm.materialize(codes)
    problems = S.designed(dm.designs(jnp.float64), plain)
    assert problems["conv"].design.shape == (65, 16)
    assert problems["readout"].design.shape == (32, 4)
    assert problems["conv"].ratio == pytest.approx(65 / 16)
    for layer, vectors in (("conv", S.filter_vectors), ("readout", S.readout_vectors)):
        np.testing.assert_array_equal(problems[layer].offset, 0)
        assert subspace_distance(problems[layer], vectors(plain)) < EXACT
        # ... while the plain init is nowhere near range(A).
        assert subspace_distance(problems[layer], vectors(s.p0)) > 0.5
    assert set(S.designed({"conv": dm.designs(jnp.float64)["conv"]}, plain)) == {"conv"}
