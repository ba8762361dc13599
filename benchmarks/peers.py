"""Peer solvers for L1 regression ``min_x ||A x - y||_1`` (benchmark baselines).

Both peers solve the same textbook LP reformulation, with variables ``z = [x, t]``
(``x`` free, length ``n``; ``t >= 0``, length ``m``)::

    minimise    sum(t)
    subject to   A x - t <=  y
                -A x - t <= -y

* :func:`highs_l1` -- HiGHS through ``scipy.optimize.linprog(method="highs")``, one problem
  per call (what a user with a single problem would do).  The constraint matrix is passed
  as a ``scipy.sparse`` CSC matrix by default (``sparse=True``); see :func:`compare_highs_formats`
  for the dense/sparse measurement.
* :func:`mpax_l1_batch` -- MPAX (``mpax.create_lp`` + ``mpax.r2HPDHG``, restarted Halpern
  PDHG written in JAX), ``jax.vmap``-ed over a batch of problems and ``jax.jit``-compiled
  once.  Separate designs ``A: (B, m, n)`` or one shared design ``A: (m, n)``.

Timings returned are wall-clock seconds from ``time.perf_counter``.
"""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

# --------------------------------------------------------------------------------------
# HiGHS (scipy.optimize.linprog)
# --------------------------------------------------------------------------------------


def _highs_lp(A: np.ndarray, y: np.ndarray, sparse: bool):
    m, n = A.shape
    c = np.concatenate([np.zeros(n), np.ones(m)])
    if sparse:
        As = sp.csc_array(A)
        eye = sp.eye_array(m, format="csc")
        A_ub = sp.block_array([[As, -eye], [-As, -eye]], format="csc")
    else:
        eye = np.eye(m)
        A_ub = np.block([[A, -eye], [-A, -eye]])
    b_ub = np.concatenate([y, -y])
    lb = np.concatenate([np.full(n, -np.inf), np.zeros(m)])
    ub = np.full(n + m, np.inf)
    bounds = np.stack([lb, ub], axis=1)
    return c, A_ub, b_ub, bounds


def highs_l1(
    A: np.ndarray,
    y: np.ndarray,
    *,
    sparse: bool = True,
    method: str = "highs",
    options: dict | None = None,
) -> tuple[np.ndarray, float]:
    """Solve one L1 regression with HiGHS via ``scipy.optimize.linprog``.

    Parameters
    ----------
    A : ``(m, n)`` design; y : ``(m,)`` observations (cast to float64).
    sparse : pass the ``2m x (n+m)`` constraint matrix as scipy sparse CSC (default) or dense.
    method : ``"highs"`` (HiGHS chooses; dual simplex in practice), ``"highs-ds"`` or
        ``"highs-ipm"``.
    options : extra ``linprog`` options.

    Returns
    -------
    ``(x, seconds)`` -- ``seconds`` covers building the LP *and* solving it (what a user
    pays per problem).  Raises ``RuntimeError`` if HiGHS does not report success.
    """
    A = np.asarray(A, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = A.shape[1]
    t0 = time.perf_counter()
    c, A_ub, b_ub, bounds = _highs_lp(A, y, sparse)
    res = linprog(c, A_ub=A_ub, b_ub=b_ub, bounds=bounds, method=method, options=options)
    seconds = time.perf_counter() - t0
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed: status={res.status}: {res.message}")
    return res.x[:n], seconds


def compare_highs_formats(A: np.ndarray, y: np.ndarray, repeats: int = 3) -> dict[str, float]:
    """Best-of-``repeats`` seconds for dense vs sparse constraint matrices (same problem)."""
    out = {}
    for sparse in (False, True):
        best = np.inf
        for _ in range(repeats):
            best = min(best, highs_l1(A, y, sparse=sparse)[1])
        out["sparse" if sparse else "dense"] = best
    return out


def highs_l1_dual(
    A: np.ndarray, y: np.ndarray, *, method: str = "highs"
) -> tuple[np.ndarray, float]:
    """Extra peer: HiGHS on the (much smaller) *dual* LP, one problem per call.

    ``max_u y'u  s.t.  A'u = 0, -1 <= u <= 1`` (``n`` equality rows, ``m`` boxed variables);
    ``x`` is read off the equality multipliers (``x = -eqlin.marginals`` in scipy's sign
    convention for ``min -y'u``).  Not the formulation the benchmark is specified with, but
    what an LP-savvy user would write; it is several times faster than :func:`highs_l1` at
    larger sizes.  ``seconds`` covers building and solving.
    """
    A = np.asarray(A, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = A.shape[1]
    t0 = time.perf_counter()
    res = linprog(-y, A_eq=A.T, b_eq=np.zeros(n), bounds=(-1.0, 1.0), method=method)
    seconds = time.perf_counter() - t0
    if res.status != 0:
        raise RuntimeError(f"HiGHS (dual LP) failed: status={res.status}: {res.message}")
    return -np.asarray(res.eqlin.marginals), seconds


# --------------------------------------------------------------------------------------
# MPAX (JAX PDHG LP solver)
# --------------------------------------------------------------------------------------


def _mpax_solve_one(A, y, ones_m, eps: float, iteration_limit: int):
    """Build and solve the LP of one problem with MPAX (traceable; used under vmap/jit).

    MPAX's ``create_lp(c, A, b, G, h, l, u)`` is ``min c'z s.t. A z = b, G z >= h,
    l <= z <= u``; our ``<=`` rows are negated into ``>=`` rows:
    ``-A x + t >= -y`` and ``A x + t >= y``.  ``ones_m`` is a runtime vector of ones: the
    identity block is built from it (not from a compile-time ``jnp.eye``) because XLA
    otherwise spends minutes constant-folding MPAX's Ruiz rescaling of that block.
    """
    import jax.numpy as jnp
    from mpax import create_lp, r2HPDHG

    m, n = A.shape
    dtype = A.dtype
    eye = jnp.diag(ones_m)
    G = jnp.block([[-A, eye], [A, eye]])
    h = jnp.concatenate([-y, y])
    c = jnp.concatenate([jnp.zeros(n, dtype), ones_m])
    lb = jnp.concatenate([jnp.full(n, -jnp.inf, dtype), jnp.zeros(m, dtype)])
    ub = jnp.full(n + m, jnp.inf, dtype)
    A_eq = jnp.zeros((0, n + m), dtype)
    b_eq = jnp.zeros((0,), dtype)
    lp = create_lp(c, A_eq, b_eq, G, h, lb, ub, use_sparse_matrix=False)
    solver = r2HPDHG(
        eps_abs=eps,
        eps_rel=eps,
        iteration_limit=iteration_limit,
        verbose=False,
        jit=True,
    )
    res = solver.optimize(lp)
    return res.primal_solution[:n], res.termination_status, res.iteration_count


@lru_cache(maxsize=64)
def _mpax_compiled(shared: bool, eps: float, iteration_limit: int, a_shape, y_shape, dtype):
    """AOT-compiled ``jit(vmap(solve_one))`` for one chunk shape; returns (fn, seconds)."""
    import jax

    def one(A, y, ones_m):
        return _mpax_solve_one(A, y, ones_m, eps, iteration_limit)

    in_axes = (None, 0, None) if shared else (0, 0, None)
    fn = jax.jit(jax.vmap(one, in_axes=in_axes))
    args = (
        jax.ShapeDtypeStruct(a_shape, dtype),
        jax.ShapeDtypeStruct(y_shape, dtype),
        jax.ShapeDtypeStruct(y_shape[-1:], dtype),
    )
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def mpax_l1_batch(
    A,
    Y,
    eps: float = 1e-4,
    *,
    chunk: int | None = None,
    iteration_limit: int = 100_000,
    return_info: bool = False,
):
    """Solve a batch of L1 regressions with MPAX ``r2HPDHG``, ``jax.vmap``-ed and jitted.

    Parameters
    ----------
    A : ``(B, m, n)`` separate designs, or ``(m, n)`` one design shared by the batch.
    Y : ``(B, m)`` observations.  The dtype of ``A``/``Y`` is used as is (enable
        ``jax_enable_x64`` for float64).
    eps : MPAX ``eps_abs = eps_rel`` (relative KKT tolerance; ``1e-4`` is MPAX's default,
        ``1e-8`` is a "high accuracy" setting).
    chunk : solve the batch ``chunk`` problems at a time with the same compiled function
        (bounds memory -- the dense LP matrix is ``2m x (n+m)`` per problem and MPAX's
        ``while_loop`` carries it, so under ``vmap`` it is replicated per problem even for a
        shared design -- and, for separate designs, is faster on CPU).  ``None`` = all at
        once.  ``B`` must be divisible by ``chunk``.
    iteration_limit : MPAX iteration cap per problem.
    return_info : also return a dict with ``compile_seconds`` (ahead-of-time
        ``lower().compile()``, excluded from ``seconds``; 0 if it was cached), ``status``
        (MPAX ``TerminationStatus`` ints, 2 = OPTIMAL) and ``iterations``.

    Returns
    -------
    ``(X, seconds)`` or ``(X, seconds, info)``; ``X`` is a ``(B, n)`` numpy array and
    ``seconds`` the wall time for the whole batch (divide by ``B`` for per problem).

    Notes
    -----
    ``vmap`` of MPAX's ``lax.while_loop`` runs every problem of a chunk until the *slowest*
    one has converged, so the chunk time is set by its hardest problem.
    """
    import jax
    import jax.numpy as jnp

    A = jnp.asarray(A)
    Y = jnp.asarray(Y, dtype=A.dtype)
    shared = A.ndim == 2
    B, m = Y.shape
    chunk = B if chunk is None else min(chunk, B)
    if B % chunk:
        raise ValueError(f"batch {B} not divisible by chunk {chunk}")
    a_shape = A.shape if shared else (chunk,) + A.shape[1:]
    hit = _mpax_compiled.cache_info().hits
    fn, compile_seconds = _mpax_compiled(
        shared, float(eps), int(iteration_limit), a_shape, (chunk, m), A.dtype
    )
    if _mpax_compiled.cache_info().hits > hit:
        compile_seconds = 0.0
    ones_m = jnp.ones((m,), A.dtype)

    t0 = time.perf_counter()
    outs = []
    for i in range(0, B, chunk):
        sl = slice(i, i + chunk)
        outs.append(fn(A if shared else A[sl], Y[sl], ones_m))
    jax.block_until_ready(outs)
    seconds = time.perf_counter() - t0

    X = np.concatenate([np.asarray(o[0]) for o in outs])
    if not return_info:
        return X, seconds
    info = {
        "compile_seconds": compile_seconds,
        "status": np.concatenate([np.asarray(o[1]) for o in outs]),
        "iterations": np.concatenate([np.asarray(o[2]) for o in outs]),
    }
    return X, seconds, info
