"""Training helpers: full-batch and minibatch fit, frozen layers, losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpurify.training import cross_entropy_loss, fit, mse_loss, sgd
from tests.one_hidden_helpers import (
    fast_compiles,  # noqa: F401 (autouse fixture)
    joint,
    multiclass_setup,
    setup,
    two_stage,
)


def _leaves_equal(a, b):
    return all(np.array_equal(u, v) for u, v in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


@pytest.mark.parametrize("name", ["gd", "sgd", "momentum"])
def test_fit_decreases_the_loss(name):
    """Full batch (gd, momentum) and minibatches of 2 (sgd) all fit the teacher."""
    s = setup()
    params, history = joint(name)
    assert history.loss.shape == (200,)
    assert float(history.loss[-1]) < 1e-3 * float(history.loss[0])
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(s.p0)
    assert all(a.dtype == jnp.float64 for a in jax.tree_util.tree_leaves(params))
    out = s.student.apply({"params": params}, s.x)
    assert float(jnp.max(jnp.abs(out - s.y))) < 1e-2


def test_full_batch_loss_is_the_loss_at_the_current_params():
    s = setup()
    _, history = joint("gd")
    first = mse_loss(s.student.apply({"params": s.p0}, s.x), s.y)
    np.testing.assert_allclose(history.loss[0], first, rtol=1e-14)


def test_minibatches_follow_the_key():
    s = setup()
    kw = dict(optimizer=sgd(0.05), steps=6, batch_size=2)
    a, ha = fit(s.student, s.p0, s.x, s.y, key=jax.random.PRNGKey(1), **kw)
    b, hb = fit(s.student, s.p0, s.x, s.y, key=jax.random.PRNGKey(1), **kw)
    c, hc = fit(s.student, s.p0, s.x, s.y, key=jax.random.PRNGKey(2), **kw)
    assert _leaves_equal(a, b)
    np.testing.assert_array_equal(ha.loss, hb.loss)
    assert not np.array_equal(ha.loss, hc.loss)
    # A minibatch loss is the loss of 2 of the 4 samples.
    full = float(mse_loss(s.student.apply({"params": s.p0}, s.x), s.y))
    assert float(ha.loss[0]) != pytest.approx(full)


@pytest.mark.parametrize("frozen, trained", [("conv", "readout"), ("readout", "conv")])
def test_frozen_layers_are_untouched_bit_for_bit(frozen, trained):
    s = setup()
    # Two-stage training: stage 2 trains the readout only (stage 1 the filters only).
    p1, _ = fit(s.student, s.p0, s.x, s.y, optimizer=sgd(0.05, momentum=0.9, weight_decay=0.1),
                steps=10, trainable=(trained,))
    assert _leaves_equal(p1[frozen], s.p0[frozen])
    assert not _leaves_equal(p1[trained], s.p0[trained])


def test_two_stage_training_fits():
    s = setup()
    params, history = two_stage("gd")
    assert float(history.loss[-1]) < float(history.loss[0])
    out = s.student.apply({"params": params}, s.x)
    assert float(jnp.max(jnp.abs(out - s.y))) < 1e-2


def test_cross_entropy_multiclass():
    s = multiclass_setup()
    trained, history = fit(s.model, s.p0, s.x, s.labels, optimizer=sgd(0.5), steps=100,
                           loss="cross_entropy")
    assert float(history.loss[-1]) < 0.2 * float(history.loss[0])
    np.testing.assert_array_equal(
        jnp.argmax(s.model.apply({"params": trained}, s.x), -1), s.labels)
    # A callable loss is used as given.
    _, h2 = fit(s.model, s.p0, s.x, s.labels, optimizer=sgd(0.5), steps=3,
                loss=cross_entropy_loss)
    np.testing.assert_allclose(h2.loss, history.loss[:3], rtol=1e-13)


def test_mse_accepts_flat_targets():
    out = jnp.array([[1.0], [2.0]])
    assert float(mse_loss(out, jnp.array([0.0, 0.0]))) == pytest.approx(1.25)
    assert float(mse_loss(out, jnp.array([[1.0], [0.0]]))) == pytest.approx(1.0)


def test_bad_arguments_raise():
    s = setup()
    with pytest.raises(ValueError, match="batch_size"):
        fit(s.student, s.p0, s.x, s.y, optimizer=sgd(0.1), steps=1, batch_size=5)
    with pytest.raises(ValueError, match="batch_size"):
        fit(s.student, s.p0, s.x, s.y, optimizer=sgd(0.1), steps=1, batch_size=0)
    with pytest.raises(ValueError, match="trainable"):
        fit(s.student, s.p0, s.x, s.y, optimizer=sgd(0.1), steps=1, trainable=("dense",))
