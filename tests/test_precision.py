"""Every matrix product of recovery runs at full precision.

On GPUs/TPUs XLA's default float32 product is reduced precision (TF32/bfloat16 passes);
a clean ``A theta`` or an L1 solve computed that way is off by ~1e-3 and nothing certifies.
The CPU cannot show the numbers, but the traced programs can: every ``dot_general`` in
them must ask for ``Precision.HIGHEST``, also in derivatives and under vmap.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpurify import multilayer as ML
from jaxpurify.models import DesignedOneHiddenLayerCNN
from jaxpurify.recovery import l1_regression


def _dot_precisions(jaxpr) -> list:
    """The ``precision`` of every dot_general in a (closed) jaxpr, sub-jaxprs included."""
    found = []

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn.params["precision"])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr)
    return found


def _assert_all_highest(jaxpr):
    precisions = _dot_precisions(jaxpr)
    assert precisions, "no matrix product traced"
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    low = [p for p in precisions if p != highest]
    assert not low, f"{len(low)} of {len(precisions)} products at reduced precision: {low[:3]}"


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(40, 8)), jnp.float32)
    y = a @ jnp.asarray(rng.normal(size=8), jnp.float32)
    return a, y


def test_solver_products_are_full_precision(problem):
    a, y = problem
    _assert_all_highest(jax.make_jaxpr(lambda a, y: l1_regression(a, y).x)(a, y))


def test_solver_products_under_vmap(problem):
    a, y = problem
    ys = jnp.stack([y, 2 * y])
    _assert_all_highest(jax.make_jaxpr(
        jax.vmap(lambda y1: l1_regression(a, y1).x))(ys))


def test_solver_derivative_products_are_full_precision(problem):
    a, y = problem
    _assert_all_highest(jax.make_jaxpr(
        jax.grad(lambda y1: jnp.sum(l1_regression(a, y1).x ** 2)))(y))


def test_materialize_is_full_precision():
    model = DesignedOneHiddenLayerCNN(num_filters=3, patch_size=4, in_channels=1,
                                      filter_code_dim=4, readout_code_dim=2)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1), jnp.float32))
    _assert_all_highest(jax.make_jaxpr(model.materialize)(params))
    deep = ML.DesignedCNN(layers=(ML.Conv(4, 3, "VALID", pool=2), ML.Dense(3)),
                          input_shape=(8, 8, 1))
    codes = deep.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    _assert_all_highest(jax.make_jaxpr(deep.materialize)(codes))
