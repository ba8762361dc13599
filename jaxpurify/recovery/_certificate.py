r"""Factorization, duality gap and the exact active-set polish shared by every method.

All methods work in the orthonormal coordinates of the design: with the thin QR
factorization :math:`A = QR`, the problem :math:`\min_x \|y - Ax\|_1` becomes
:math:`\min_z \|y - Qz\|_1` with :math:`x = R^{-1} z`. ``Q`` has unit operator norm, so
step sizes need no tuning, and projections onto :math:`\mathrm{range}(A)` cost two
matrix-vector products.

**Duality.** :math:`\min_x \|y - Ax\|_1 = \max\{y^\top u : A^\top u = 0,
\|u\|_\infty \le 1\}`. Any estimate :math:`u` is made dual feasible by projecting onto
:math:`\ker A^\top` (:math:`u - QQ^\top u`) and dividing by :math:`\max(1,\|u\|_\infty)`;
this keeps :math:`A^\top u = 0`. The relative gap
:math:`(\|y - Qz\|_1 - y^\top u)/\|y - Qz\|_1` then certifies the primal point.

**Polish.** At a vertex solution the residual vanishes on a set :math:`S` of at least
``n`` rows. Given the first-order estimate of :math:`S`, the polish solves the interpolation
conditions exactly by least squares on :math:`S`,
:math:`z_S = (Q_S^\top Q_S)^{-1} Q_S^\top y_S`, and builds the matching dual:
:math:`u_{S^c} = \mathrm{sign}(r_{S^c})` and :math:`u_S` the projection of the
first-order dual estimate onto :math:`\{Q_S^\top u_S = -Q_{S^c}^\top u_{S^c}\}`. If
:math:`S` is right the gap is zero up to rounding, which is how exact-recovery instances
come back to machine precision instead of to the iteration tolerance.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve, solve_triangular


class Factorization(NamedTuple):
    """Thin QR factorization of one design ``A`` (``m x n``)."""

    q: jax.Array  # (m, n), orthonormal columns spanning range(A)
    r: jax.Array  # (n, n), upper triangular
    full_rank: jax.Array  # bool scalar


def factorize(a: jax.Array) -> Factorization:
    """Householder QR of ``a`` (``m x n``, ``m > n``) and a numerical rank test.

    Householder QR is backward stable for any conditioning, which matters for the
    data-derived designs of :mod:`jaxpurify.subspaces` (highly correlated image patches).
    """
    m, n = a.shape
    q, r = jnp.linalg.qr(a, mode="reduced")
    diag = jnp.abs(jnp.diagonal(r))
    eps = jnp.finfo(a.dtype).eps
    full_rank = jnp.min(diag) > eps * max(m, n) * jnp.max(diag)
    return Factorization(q, r, full_rank)


def to_x(fac: Factorization, z: jax.Array) -> jax.Array:
    """Map orthonormal coordinates back, :math:`x = R^{-1} z` (safeguarded if singular)."""
    r = fac.r
    diag = jnp.diagonal(r)
    floor = jnp.finfo(r.dtype).eps * jnp.max(jnp.abs(diag)) * r.shape[0]
    safe = jnp.where(jnp.abs(diag) < floor, jnp.where(diag < 0, -floor, floor), diag)
    r = r + jnp.diag(safe - diag)
    return solve_triangular(r, z, lower=False)


def feasible_dual(q: jax.Array, u: jax.Array) -> jax.Array:
    r"""Project ``u`` onto :math:`\ker Q^\top` and scale it into the unit box."""
    u = u - q @ (q.T @ u)
    return u / jnp.maximum(1.0, jnp.max(jnp.abs(u)))


def relative_gap(primal: jax.Array, dual_value: jax.Array, y_scale: jax.Array,
                 num_rows: int = 1) -> jax.Array:
    r"""Relative duality gap, safe when the optimum is zero (``y`` in ``range(A)``).

    .. math:: \frac{\max(p - d - m\,\varepsilon\,\|y\|_1,\ 0)}
              {\max(p,\ \varepsilon^{1/4}\|y\|_1)}

    Both :math:`p = \|y - Qz\|_1` and :math:`d = y^\top u` are sums of ``m`` terms bounded by
    :math:`|y_i|` (up to rounding), so each carries a rounding error up to about
    :math:`m\varepsilon\|y\|_1`; a gap below that is indistinguishable from zero and is
    reported as zero. Without the allowance a problem whose ``y`` lies in ``range(A)`` up to
    rounding of its *inputs* (``y = w - w_0`` computed from weights much larger than the
    update) is a genuine dense-noise LP at the 1e-16 level that no tolerance below ~1e-11
    would ever certify. The allowance only matters when :math:`p \ll \|y\|_1`: elsewhere it
    is far below ``tol * p``.

    The denominator is floored at ``eps**0.25 * ||y||_1``: when ``y`` lies in ``range(A)``
    the objective is pure rounding and a gap relative to it would never converge.
    """
    finfo = jnp.finfo(primal.dtype)
    rounding = num_rows * finfo.eps * y_scale
    floor = jnp.maximum(finfo.eps**0.25 * y_scale, finfo.tiny)  # y == 0: gap 0, not 0/0
    return jnp.maximum(primal - dual_value - rounding, 0.0) / jnp.maximum(primal, floor)


def interp_threshold(y: jax.Array, fitted: jax.Array) -> jax.Array:
    """Rows with ``|r_i|`` below this are interpolated.

    ``eps**0.75`` times the scale of the clean part of ``y``: the larger of ``max |A x|`` and
    ``median |y|``. Not ``max |y|``: a single huge corrupted entry (an exponent bit flip is
    ~1e38) would otherwise make every row look interpolated.
    """
    eps = jnp.finfo(y.dtype).eps
    scale = jnp.maximum(jnp.max(jnp.abs(fitted)), jnp.median(jnp.abs(y)))
    return eps**0.75 * jnp.maximum(scale, jnp.finfo(y.dtype).tiny)


class Candidate(NamedTuple):
    """A primal point (orthonormal coordinates) with its objective, and a dual point."""

    z: jax.Array
    objective: jax.Array
    u: jax.Array
    dual_value: jax.Array


def evaluate(q: jax.Array, y: jax.Array, z: jax.Array, u: jax.Array) -> Candidate:
    """Objective of ``z`` and dual value of the feasible version of ``u``."""
    objective = jnp.sum(jnp.abs(y - q @ z))
    u = feasible_dual(q, u)
    return Candidate(z, objective, u, y @ u)


def _solve_on_rows(q, y, z, u, support, prune, dual_steps):
    """One least-squares solve on the believed-interpolated rows, with its dual."""
    n = q.shape[1]
    fitted = q @ z
    resid = jnp.abs(y - fitted)
    # Drop believed-clean rows whose current residual is an outlier among them: mildly
    # corrupted rows can sit under the first-order method's threshold, and one of them
    # spoils the exact solve. Dropping a few clean rows instead costs nothing -- except rows
    # that are already interpolated: those, and every interpolated row the first-order
    # method missed, are kept. A clean row left out of S gets u_i = sign(rounding noise) in
    # the dual below, which can make an exact primal uncertifiable.
    typical = jnp.nanmedian(jnp.where(support, resid, jnp.nan))
    support = (support & (resid <= prune * typical)) | (resid <= interp_threshold(y, fitted))
    _, smallest = jax.lax.top_k(-resid, n)
    support = support.at[smallest].set(True)
    w = support.astype(q.dtype)

    gram = q.T @ (w[:, None] * q)
    chol = cho_factor(gram, lower=True)
    z_p = cho_solve(chol, q.T @ (w * y))
    r_p = y - q @ z_p

    # Dual: signs off the support, projection of the estimate onto the affine set on it.
    s = jnp.where(support, 0.0, jnp.sign(r_p)).astype(q.dtype)
    u0 = jnp.where(support, u / jnp.maximum(1.0, jnp.max(jnp.abs(u))), 0.0)

    def to_affine(v):  # project v (supported on S) onto {Q_S^T v = -Q_{S^c}^T s}
        return v - w * (q @ cho_solve(chol, q.T @ (v + s)))

    def alternate(k, carry):
        # Alternating projections (box, then the affine set) with Nesterov extrapolation:
        # the plain iteration is projected gradient on dist(v, box)^2 / 2 over the affine
        # set, and the momentum makes a few steps certify problems that plain steps need
        # several more first-order chunks for.
        v, t = carry
        v_new = to_affine(jnp.clip(t, -1.0, 1.0))
        return v_new, v_new + (k / (k + 3.0)) * (v_new - v)

    start = to_affine(u0)
    u_p = s + jax.lax.fori_loop(0, dual_steps, alternate, (start, start))[0]

    cand = evaluate(q, y, z_p, u_p)
    ok = jnp.isfinite(cand.objective) & jnp.isfinite(cand.dual_value)
    inf = jnp.asarray(jnp.inf, q.dtype)
    cand = Candidate(
        jnp.where(ok, cand.z, z),
        jnp.where(ok, cand.objective, inf),
        jnp.where(ok, cand.u, jnp.zeros_like(u)),
        jnp.where(ok, cand.dual_value, -inf),
    )
    return cand, support


def merge(new: Candidate, old: Candidate):
    """Keep the better primal and the better dual point independently.

    Returns:
        ``(took_primal, merged)``: whether ``new``'s primal point was kept, and the merge.
    """
    take_p = new.objective < old.objective
    take_d = new.dual_value > old.dual_value
    return take_p, Candidate(
        jnp.where(take_p, new.z, old.z),
        jnp.where(take_p, new.objective, old.objective),
        jnp.where(take_d, new.u, old.u),
        jnp.where(take_d, new.dual_value, old.dual_value),
    )


def polish(q: jax.Array, y: jax.Array, z: jax.Array, u: jax.Array, support: jax.Array,
           *, passes: int = 2, prune: float = 5.0, dual_steps: int = 15) -> Candidate:
    r"""Exact active-set solve on the rows believed interpolated.

    Each pass solves least squares on the current support (after pruning rows whose
    residual is an outlier) and re-selects the support from the new, far more accurate,
    residual: a few mildly corrupted rows that slipped into the first support stand out
    after one solve, so the second pass is exact where the first was not.

    Args:
        q: ``(m, n)`` orthonormal basis of the design's range.
        y: ``(m,)`` observation.
        z: ``(n,)`` current primal estimate (orthonormal coordinates).
        u: ``(m,)`` current dual estimate (any scale; sign convention
            :math:`u_i = \mathrm{sign}(r_i)` off the support).
        support: ``(m,)`` bool, rows the method believes interpolated. The ``n`` rows
            with the smallest current residual are always added, so the least-squares
            problem is never underdetermined.
        passes: number of solve/re-select passes.
        prune: rows whose residual exceeds ``prune`` times the median residual over the
            support are dropped before each solve.
        dual_steps: accelerated alternating projections (box, then the affine set) that
            repair the first-order dual estimate on the support in the last pass; each
            costs about one first-order iteration. 15 measured fastest overall (fewer
            leave exact primals uncertified for more chunks; more cost more than they save).

    Returns:
        The best :class:`Candidate` over the passes (objective ``inf`` if all failed).
    """
    best = None
    for i in range(passes):
        steps = dual_steps if i == passes - 1 else 0
        cand, support = _solve_on_rows(q, y, z, u, support, prune, steps)
        best = cand if best is None else merge(cand, best)[1]
        z, u = cand.z, cand.u
    return best
