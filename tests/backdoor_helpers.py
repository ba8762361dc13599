"""Shared tiny backdoor setup for the attack, defense and trigger-inversion tests."""

from __future__ import annotations

import functools

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
