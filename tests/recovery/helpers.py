"""Planted sparse-error instances shared by the solver tests."""

from __future__ import annotations

import numpy as np


def planted(seed: int, m: int, n: int, fraction: float, *, batch: int | None = None,
            shared: bool = True, dtype=np.float64, magnitude: float = 10.0):
    """Gaussian design, planted ``x``, a ``fraction`` of ``y`` hit by large Gaussian errors.

    Returns ``A, y, x, corrupted`` with ``A`` of shape ``(m, n)`` (shared) or
    ``(batch, m, n)``, and ``y, x, corrupted`` with a leading ``batch`` axis when given.
    """
    rng = np.random.default_rng(seed)
    b = 1 if batch is None else batch
    a = rng.standard_normal((m, n) if shared else (b, m, n))
    x = rng.standard_normal((b, n))
    clean = np.einsum("mn,bn->bm", a, x) if shared else np.einsum("bmn,bn->bm", a, x)
    k = int(round(fraction * m))
    corrupted = np.zeros((b, m), bool)
    y = clean.copy()
    for i in range(b):
        rows = rng.choice(m, k, replace=False)
        corrupted[i, rows] = True
        y[i, rows] += magnitude * clean[i].std() * (1.0 + rng.random(k)) * rng.choice([-1, 1], k)
    if batch is None:
        y, x, corrupted = y[0], x[0], corrupted[0]
        if not shared:
            a = a[0]
    return a.astype(dtype), y.astype(dtype), x.astype(dtype), corrupted


def rel_err(x_hat, x) -> np.ndarray:
    x_hat, x = np.asarray(x_hat, np.float64), np.asarray(x, np.float64)
    return np.linalg.norm(x_hat - x, axis=-1) / np.linalg.norm(x, axis=-1)


def highs_l1(a, y):
    """Reference: ``min ||A x - y||_1`` as an LP solved by HiGHS; returns ``(x, objective)``."""
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix, eye, hstack, vstack

    a = np.asarray(a, np.float64)
    y = np.asarray(y, np.float64)
    m, n = a.shape
    ident = eye(m, format="csr")
    a_ub = vstack([hstack([csr_matrix(a), -ident]), hstack([csr_matrix(-a), -ident])])
    b_ub = np.concatenate([y, -y])
    c = np.concatenate([np.zeros(n), np.ones(m)])
    bounds = [(None, None)] * n + [(0, None)] * m
    res = linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    assert res.status == 0, res.message
    return res.x[:n], res.fun
