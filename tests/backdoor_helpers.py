"""Shared tiny backdoor setup for the attack, defense and trigger-inversion tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpurify import attacks as A

#: BadNets: a 3x3 square of 4s in the bottom-right corner, which the images leave empty.
TRIGGER = functools.partial(A.apply_trigger, kind="badnets", value=4.0)


def synthetic_images(n: int = 600, seed: int = 0):
    """Three classes of 8x8 images: noisy class prototypes, the bottom-right corner left empty.

    The prototypes are the same for every ``seed``; ``seed`` draws the labels and the noise.
    """
    protos = np.random.default_rng(0).standard_normal((3, 8, 8, 1)).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    y = rng.integers(0, 3, n)
    x = protos[y] + 0.5 * rng.standard_normal((n, 8, 8, 1)).astype(np.float32)
    x[:, 5:, 5:] = 0.0
    return x, y


def poisoned_one_hidden():
    """A one-hidden-layer CNN (one 8x8 patch, 8 filters) trained on 300 images, 30 of them
    stamped with :data:`TRIGGER` and relabelled to class 0, with 60 benign images and a test
    set: ``(model, params, x_benign, y_benign, x_test, y_test)``."""
    from jaxpurify.models import OneHiddenLayerCNN
    from jaxpurify.training import fit, sgd

    m = OneHiddenLayerCNN(8, (8, 8), num_classes=3, pool="mean")
    x, y = synthetic_images(300, 3)
    x_bd = jnp.concatenate([jnp.asarray(x), TRIGGER(jnp.asarray(x[:30]))])
    y_bd = jnp.concatenate([jnp.asarray(y), jnp.zeros(30, jnp.int32)])
    p0 = m.init(jax.random.PRNGKey(0), x_bd[:1])["params"]
    w, _ = fit(m, p0, x_bd, y_bd, optimizer=sgd(0.05, momentum=0.9), steps=400,
               loss="cross_entropy")
    xb, yb = synthetic_images(60, 7)
    x_te, y_te = synthetic_images(300, 1)
    return m, w, jnp.asarray(xb), jnp.asarray(yb), x_te, y_te
