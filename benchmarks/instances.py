"""Seeded synthetic instances for L1 (least-absolute-deviation) regression benchmarks.

Model
-----
``y = A @ x_true + e`` where

* ``A`` has i.i.d. entries ``N(0, 1) / sqrt(m)`` (columns have unit expected squared norm,
  so ``A`` is well conditioned for ``m >> n`` and the scale of ``A @ x`` does not grow with
  ``m``);
* ``x_true`` has i.i.d. ``N(0, 1)`` entries;
* a uniformly random subset of ``round(fraction * m)`` entries of ``y`` (exactly that many,
  per problem) is corrupted by a large error ``e_i``; all other ``e_i`` are exactly zero.

Error laws (``s = 10 * std(A @ x_true)``, computed per problem):

* ``"gaussian"``: ``e_i ~ N(0, s^2)``;
* ``"heavy_tailed"``: ``e_i = s * T_i`` with ``T_i`` Student-t with 1 degree of freedom
  (i.e. standard Cauchy); no finite variance, occasional huge outliers.

Because the non-corrupted entries are noise free, the L1 minimiser equals ``x_true``
exactly whenever the corruption pattern is recoverable (it is, with overwhelming
probability, for the sizes/fractions used by ``bench_l1.py``), so the relative error
``||x - x_true|| / ||x_true||`` measures solver accuracy, down to rounding.

Everything is numpy based and fully determined by ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAWS = ("gaussian", "heavy_tailed")


@dataclass(frozen=True)
class Instances:
    """A batch of L1-regression problems.

    Attributes
    ----------
    A : ``(m, n)`` if ``shared_design`` else ``(batch, m, n)``.
    Y : ``(batch, m)`` observations.
    X_true : ``(batch, n)`` planted coefficients.
    mask : ``(batch, m)`` boolean, True where ``y`` was corrupted.
    """

    A: np.ndarray
    Y: np.ndarray
    X_true: np.ndarray
    mask: np.ndarray

    def design(self, i: int) -> np.ndarray:
        """Design matrix of problem ``i`` (works for shared and separate designs)."""
        return self.A if self.A.ndim == 2 else self.A[i]

    def __iter__(self):  # allows ``A, Y, X, mask = make_instances(...)``
        return iter((self.A, self.Y, self.X_true, self.mask))


def make_instances(
    seed: int | np.random.Generator = 0,
    batch: int = 64,
    m: int = 400,
    n: int = 100,
    fraction: float = 0.2,
    law: str = "gaussian",
    shared_design: bool = False,
    dtype=np.float64,
) -> Instances:
    """Generate ``batch`` planted L1-regression problems (see module docstring).

    Parameters
    ----------
    seed : int or ``np.random.Generator``.
    batch, m, n : number of problems and problem shape (``m > n``).
    fraction : fraction of corrupted observations, in ``[0, 1)``.
    law : ``"gaussian"`` or ``"heavy_tailed"``.
    shared_design : if True, one ``(m, n)`` design is shared by the whole batch.
    dtype : output floating dtype (generation is done in float64, then cast).

    Returns
    -------
    Instances ``(A, Y, X_true, mask)``; unpacks like a tuple.
    """
    if law not in LAWS:
        raise ValueError(f"unknown law {law!r}; expected one of {LAWS}")
    if not m > n:
        raise ValueError(f"need m > n, got m={m}, n={n}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    if shared_design:
        A = rng.standard_normal((m, n)) / np.sqrt(m)
        X_true = rng.standard_normal((batch, n))
        AX = X_true @ A.T  # (batch, m)
    else:
        A = rng.standard_normal((batch, m, n)) / np.sqrt(m)
        X_true = rng.standard_normal((batch, n))
        AX = np.einsum("bmn,bn->bm", A, X_true)

    k = int(round(fraction * m))
    # exactly k corrupted entries per problem, uniformly placed
    order = np.argsort(rng.random((batch, m)), axis=1)
    mask = np.zeros((batch, m), dtype=bool)
    np.put_along_axis(mask, order[:, :k], True, axis=1)

    scale = 10.0 * AX.std(axis=1, keepdims=True)
    if law == "gaussian":
        noise = rng.standard_normal((batch, m))
    else:
        noise = rng.standard_t(1.0, size=(batch, m))
    E = np.where(mask, scale * noise, 0.0)
    Y = AX + E

    return Instances(
        A=A.astype(dtype),
        Y=Y.astype(dtype),
        X_true=X_true.astype(dtype),
        mask=mask,
    )
