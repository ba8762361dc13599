"""Shared tiny float64 setups for the one-hidden-layer tests (models, training, subspaces,
purify).

Every setup is cached per process, and all files use the same shapes (16x16x1 images, patch 8
-> k = 4 patches of d = 64, N = 4 samples, J = 32 filters), so the jitted training runs and the
L1 solves compile once for the whole suite.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpurify import subspaces as S
from jaxpurify.models import DesignedOneHiddenLayerCNN, OneHiddenLayerCNN, extract_patches
from jaxpurify.training import fit, sgd

F64 = jnp.float64
N, J, PATCH = 4, 32, 8
LAZY_J, LAZY_SEED = 16, 15  # an init whose pre-activations all stay > 0.02 away from 0


_NO_OPT = "jax_disable_most_optimizations"


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """Autouse in the modules that import it: XLA skips most optimizations while they run.

    These problems are tiny, so compiling dominates (about a third less CPU time with the
    flag); the numerics they check (1e-10 and looser) do not depend on it. The flag is not
    part of JAX's compilation cache key, so later modules may reuse these executables: only
    their speed differs.
    """
    old = jax.config.values.get(_NO_OPT, False)
    jax.config.update(_NO_OPT, True)
    yield
    jax.config.update(_NO_OPT, old)


def init(model, key, x):
    """``model.init(key, x)["params"]``, jitted: one compilation instead of one per op."""
    return jax.jit(model.init)(key, x)["params"]


@functools.cache
def setup():
    """Inputs, teacher targets, and the float64 student (mean pooling) with its init."""
    kx, kt, ks = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (N, 16, 16, 1), F64)
    teacher = OneHiddenLayerCNN(4, PATCH, param_dtype=F64)
    y = jax.jit(lambda k, x: teacher.apply(teacher.init(k, x), x))(kt, x)
    student = OneHiddenLayerCNN(J, PATCH, pool="mean", param_dtype=F64)
    p0 = init(student, ks, x)
    return SimpleNamespace(x=x, y=y, student=student, p0=p0, key=ks)


@functools.cache
def multiclass_setup():
    """A 3-class student (8 filters) with integer labels for cross-entropy."""
    s = setup()
    model = OneHiddenLayerCNN(8, PATCH, num_classes=3, pool="mean", param_dtype=F64)
    return SimpleNamespace(x=s.x, labels=jnp.array([0, 1, 2, 1]), model=model,
                           p0=init(model, jax.random.PRNGKey(0), s.x))


OPTIMIZERS = {
    "gd": lambda: sgd(0.05),
    "sgd": lambda: sgd(0.05),  # with minibatches of 2
    "momentum": lambda: sgd(0.05, momentum=0.9),
    "nesterov": lambda: sgd(0.05, momentum=0.9, nesterov=True),
    "weight_decay": lambda: sgd(0.05, momentum=0.9, weight_decay=1e-2),
    "adam": lambda: optax.adam(1e-2),
}


def _fit(s, params, name, steps, trainable=None):
    kw = {"batch_size": 2, "key": jax.random.PRNGKey(1)} if name == "sgd" else {}
    return fit(s.student, params, s.x, s.y, optimizer=OPTIMIZERS[name](), steps=steps,
               trainable=trainable, **kw)


@functools.cache
def joint(name):
    """Filters and readout trained together (200 steps)."""
    s = setup()
    return _fit(s, s.p0, name, 200)


@functools.cache
def two_stage(name):
    """Filters first (readout frozen, 30 steps), then the readout (filters frozen, 200)."""
    s = setup()
    p1, _ = _fit(s, s.p0, name, 30, ("conv",))
    return _fit(s, p1, name, 200, ("readout",))


@functools.cache
def lazy_setup():
    """A J=16 student whose init has every pre-activation at least 0.02 away from zero."""
    s = setup()
    student = OneHiddenLayerCNN(LAZY_J, PATCH, pool="mean", param_dtype=F64)
    p0 = init(student, jax.random.PRNGKey(LAZY_SEED), s.x)
    return SimpleNamespace(x=s.x, y=s.y, student=student, p0=p0)


@functools.cache
def lazy_trained(kind):
    """``small``: filters only, 10 steps of 1e-3 (no flip); ``flip``: filters only, 200 steps
    of 0.05 (patterns flip); ``joint``: small steps but the readout trains too."""
    s = lazy_setup()
    lr, steps, trainable = {"small": (1e-3, 10, ("conv",)), "flip": (0.05, 200, ("conv",)),
                            "joint": (1e-3, 10, None)}[kind]
    return fit(s.student, s.p0, s.x, s.y, optimizer=sgd(lr), steps=steps,
               trainable=trainable)[0]


def activation_pattern(params, x):
    """``(N, k, J)`` bools: which pre-activations ``W_j^T P_i x_s + b_j`` are positive."""
    p = extract_patches(x, PATCH)
    aug = jnp.concatenate([p, jnp.ones(p.shape[:2] + (1,), p.dtype)], -1)
    return np.asarray(jnp.einsum("nkt,jt->nkj", aug, S.filter_vectors(params)) > 0)


def designed_model():
    return DesignedOneHiddenLayerCNN(J, PATCH, in_channels=1, filter_code_dim=16,
                                     readout_code_dim=4, pool="mean", param_dtype=F64)


@functools.cache
def designed_trained():
    """Codes of the designed model trained by :func:`fit` (momentum, 200 steps)."""
    s = setup()
    dm = designed_model()
    c0 = init(dm, s.key, s.x)
    return fit(dm, c0, s.x, s.y, optimizer=sgd(0.05, momentum=0.9), steps=200)


def subspace_distance(problem: S.LayerProblem, vectors) -> float:
    """``||rows of (vectors - offset) off range(design)||_F / ||vectors - offset||_F``."""
    y = np.asarray(vectors, np.float64) - np.asarray(problem.offset, np.float64)
    design = np.asarray(problem.design, np.float64)
    res = np.empty_like(y)
    for b in range(y.shape[0]):
        a = design if design.ndim == 2 else design[b]
        coef = np.linalg.lstsq(a, y[b], rcond=None)[0]
        res[b] = y[b] - a @ coef
    return float(np.linalg.norm(res) / np.linalg.norm(y))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
