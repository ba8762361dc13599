r"""Phase transition of L1 error correction (statistical dimension of the L1 descent cone).

Setting
-------
A clean weight vector :math:`w_0 = A x_0 \in \mathbb{R}^m` lies in a known
:math:`n`-dimensional subspace (:math:`A \in \mathbb{R}^{m \times n}`, overparameterization
ratio :math:`m/n > 1`) and is observed with sparse gross errors, :math:`w = w_0 + e`,
:math:`\|e\|_0 = k = \rho m`. L1 regression

.. math:: \hat x = \arg\min_x \|w - A x\|_1

recovers :math:`x_0` exactly iff :math:`\operatorname{range}(A)` meets the descent cone
:math:`\mathcal D(\|\cdot\|_1, e)` only at 0. For a generic (Gaussian) subspace the
approximate kinematic formula (Amelunxen, Lotz, McCoy & Tropp, *Living on the edge*, 2014)
says this happens with high probability when :math:`n + \delta(\mathcal D) < m` and fails
w.h.p. when :math:`n + \delta(\mathcal D) > m`, where the statistical dimension satisfies
:math:`\delta(\mathcal D(\|\cdot\|_1, e)) \approx m\, \psi(k/m)` with

.. math::
    \psi(\rho) = \inf_{t \ge 0}\; \rho\,(1 + t^2)
        + (1 - \rho)\, \mathbb{E}\big[(|g| - t)_+^2\big], \qquad g \sim \mathcal N(0, 1),

    \mathbb{E}\big[(|g| - t)_+^2\big] = 2\big((1 + t^2)\, Q(t) - t\, \varphi(t)\big),

:math:`\varphi` the standard normal density and :math:`Q(t) = \mathbb P(g > t)`. The
boundary :math:`m - n = m\,\psi(k/m)` i.e. :math:`1 - n/m = \psi(\rho)` is the
Donoho–Tanner weak threshold for error correction (equivalently, for L1 recovery of a
:math:`k`-sparse vector in :math:`\mathbb{R}^m` from :math:`m - n` Gaussian measurements).

Parametric form used for the computations
-----------------------------------------
The objective :math:`F_\rho(t)` is strictly convex (:math:`F_\rho'' = 2\rho + 4(1-\rho)Q(t) >
0`), and with :math:`D(t) = \mathbb E[(g - t)_+] = \varphi(t) - t\,Q(t)` its stationarity
condition :math:`F_\rho'(t) = 2\rho t - 4(1-\rho) D(t) = 0` gives, for the unique minimizer
:math:`t^\star \in (0, \infty)`,

.. math::
    \rho(t^\star) = \frac{2 D(t^\star)}{t^\star + 2 D(t^\star)}, \qquad
    \psi = \rho + 2 (1 - \rho) Q(t^\star) = \frac{2\varphi(t^\star)}{t^\star + 2 D(t^\star)},
    \qquad 1 - \psi = \frac{t^\star \operatorname{erf}(t^\star/\sqrt 2)}{t^\star + 2 D(t^\star)}.

Both :math:`\rho(t)` and :math:`\psi(t)` decrease strictly from 1 (at :math:`t = 0`) to 0
(as :math:`t \to \infty`), so the curve is traced by a single scalar :math:`t` and every
function below is one vectorised bisection in :math:`t` (fixed iteration count, so it is
``jit``/``vmap`` friendly), followed by closed-form evaluation. :math:`D(t)` is evaluated with
a continued fraction for :math:`t \ge 2.5` to avoid the cancellation in
:math:`\varphi(t) - t Q(t)`. Accuracy is close to machine precision in the working dtype
(float64 under ``jax_enable_x64``, float32 otherwise).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.special import erf, ndtr

__all__ = ["critical_fraction", "critical_ratio", "psi"]

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_HALF = math.sqrt(0.5)
# Continued fraction used for t >= _CF_SWITCH, truncated at depth _CF_TERMS.
_CF_SWITCH = 2.5
_CF_TERMS = 80


def _as_float(x: Any) -> jax.Array:
    """Converts to a JAX array with a floating dtype of at least float32."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _phi(t: jax.Array) -> jax.Array:
    return _INV_SQRT_2PI * jnp.exp(-0.5 * t * t)


def _mean_excess(t: jax.Array) -> jax.Array:
    r"""``D(t) = E[(g - t)_+] = phi(t) - t Q(t)`` for ``t >= 0``, without cancellation.

    For ``t >= 2.5`` uses the Laplace continued fraction of the Mills ratio,
    ``Q/phi = 1/(t + c)`` with ``c = 1/(t + 2/(t + 3/(t + ...)))``, so that
    ``D = phi * c / (t + c)``.
    """
    direct = _phi(t) - t * ndtr(-t)
    tc = jnp.maximum(t, _CF_SWITCH)  # keep the continued fraction well conditioned
    c = jnp.zeros_like(tc)
    for j in range(_CF_TERMS, 1, -1):
        c = j / (tc + c)
    c = 1.0 / (tc + c)
    continued = _phi(tc) * c / (tc + c)
    return jnp.where(t >= _CF_SWITCH, continued, direct)


def _rho_of_t(t: jax.Array) -> jax.Array:
    d2 = 2.0 * _mean_excess(t)
    return d2 / (t + d2)


def _psi_of_t(t: jax.Array) -> jax.Array:
    return 2.0 * _phi(t) / (t + 2.0 * _mean_excess(t))


def _one_minus_psi_of_t(t: jax.Array) -> jax.Array:
    return t * erf(t * _SQRT_HALF) / (t + 2.0 * _mean_excess(t))


def _num_bisections(dtype: Any) -> int:
    # Brackets have length <= ~40; this reaches the floating-point resolution of t.
    return int(jnp.finfo(dtype).nmant) + 16


def _upper_bracket(level: jax.Array) -> jax.Array:
    r"""``T`` with ``rho(T) < level`` and ``psi(T) < level`` for ``level`` in ``(0, 1]``.

    Both are ``<= 2 phi(T) / T``; with ``T = sqrt(2 log(1/level)) + 1`` one has
    ``phi(T) <= 0.25 * level`` and ``T >= 1``.
    """
    return jnp.sqrt(2.0 * jnp.maximum(-jnp.log(level), 0.0)) + 1.0


def _bisect_decreasing(f: Any, target: jax.Array, hi: jax.Array) -> jax.Array:
    """Solves ``f(t) = target`` on ``[0, hi]`` for ``f`` decreasing, elementwise."""
    lo = jnp.zeros_like(hi)

    def body(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        right = f(mid) > target  # the root lies to the right of mid
        return jnp.where(right, mid, lo), jnp.where(right, hi, mid)

    lo, hi = jax.lax.fori_loop(0, _num_bisections(hi.dtype), body, (lo, hi))
    return 0.5 * (lo + hi)


@jax.jit
def _threshold_for_fraction(rho: jax.Array) -> jax.Array:
    """Minimizer ``t*(rho)`` for ``rho`` in ``(0, 1)`` (other entries give garbage)."""
    safe = jnp.where((rho > 0) & (rho < 1), rho, 0.5)
    return _bisect_decreasing(_rho_of_t, safe, _upper_bracket(safe))


@jax.jit
def _psi_impl(rho: jax.Array) -> jax.Array:
    t = _threshold_for_fraction(rho)
    out = _psi_of_t(t)
    out = jnp.where(rho <= 0, 0.0, out)
    out = jnp.where(rho >= 1, 1.0, out)
    return jnp.where((rho >= 0) & (rho <= 1), out, jnp.nan).astype(rho.dtype)


def psi(rho: Any) -> jax.Array:
    r"""Normalized statistical dimension of the L1 descent cone at a :math:`\rho`-sparse point.

    .. math::
        \psi(\rho) = \inf_{t \ge 0}\; \rho (1 + t^2)
            + 2 (1 - \rho)\big((1 + t^2) Q(t) - t \varphi(t)\big),

    so that :math:`\delta(\mathcal D(\|\cdot\|_1, x)) \approx m\,\psi(k/m)` for a
    :math:`k`-sparse :math:`x \in \mathbb R^m`. :math:`\psi` increases from
    :math:`\psi(0) = 0` to :math:`\psi(1) = 1`, with
    :math:`\psi(\rho) \sim 2\rho \log(1/\rho)` as :math:`\rho \to 0`. Computed by bisection
    on the stationarity condition :math:`\rho\, t = 2 (1 - \rho) D(t)` (see module
    docstring) and the closed form :math:`\psi = 2\varphi(t^\star) / (t^\star + 2D(t^\star))`.

    Args:
      rho: Sparsity fraction(s) in [0, 1]; float, NumPy or JAX array of any shape.
        Integer inputs use the default float dtype; float16/bfloat16 are promoted to
        float32.

    Returns:
      Array of the same shape and floating dtype; NaN where ``rho`` is outside [0, 1] or
      NaN.
    """
    return _psi_impl(_as_float(rho))


@jax.jit
def _critical_fraction_impl(ratio: jax.Array) -> jax.Array:
    valid = (ratio > 1) & jnp.isfinite(ratio)
    safe_ratio = jnp.where(valid, ratio, 2.0)
    delta = (safe_ratio - 1.0) / safe_ratio  # = psi(rho*) in (0, 1)
    inv = 1.0 / safe_ratio  # = 1 - psi(rho*)
    hi = _upper_bracket(delta)
    lo = jnp.zeros_like(hi)

    def body(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        # psi(t) decreases in t; compare whichever of psi / 1 - psi is smaller (accuracy).
        right = jnp.where(delta <= 0.5, _psi_of_t(mid) > delta, _one_minus_psi_of_t(mid) < inv)
        return jnp.where(right, mid, lo), jnp.where(right, hi, mid)

    lo, hi = jax.lax.fori_loop(0, _num_bisections(ratio.dtype), body, (lo, hi))
    out = _rho_of_t(0.5 * (lo + hi))
    out = jnp.where(ratio == 1, 0.0, out)
    out = jnp.where(ratio == jnp.inf, 1.0, out)
    return jnp.where(ratio >= 1, out, jnp.nan).astype(ratio.dtype)


def critical_fraction(ratio: Any) -> jax.Array:
    r"""Largest correctable fraction of gross errors for an overparameterization ratio.

    For :math:`m/n` = ``ratio`` returns :math:`\rho^\star` solving

    .. math:: 1 - \frac{1}{m/n} = \psi(\rho^\star) \quad\Longleftrightarrow\quad
        m - n = m\, \psi(k^\star/m),

    the phase transition of L1 regression onto a generic :math:`n`-dimensional subspace of
    :math:`\mathbb R^m`: with :math:`k = \rho m` gross errors, exact recovery succeeds
    w.h.p. for :math:`\rho < \rho^\star` and fails w.h.p. for :math:`\rho > \rho^\star`.
    Values: :math:`\rho^\star(2) \approx 0.19284`, :math:`\rho^\star(4) \approx 0.40028`,
    :math:`\rho^\star(8) \approx 0.56626`.

    Args:
      ratio: Ratio(s) :math:`m/n \ge 1` (float or array). ``ratio == 1`` gives 0 and
        ``inf`` gives 1.

    Returns:
      Array of fractions in [0, 1] with the shape of ``ratio``; NaN where ``ratio < 1``.
    """
    return _critical_fraction_impl(_as_float(ratio))


@jax.jit
def _critical_ratio_impl(rho: jax.Array) -> jax.Array:
    t = _threshold_for_fraction(rho)
    out = (t + 2.0 * _mean_excess(t)) / (t * erf(t * _SQRT_HALF))  # 1 / (1 - psi)
    out = jnp.where(rho <= 0, 1.0, out)
    out = jnp.where(rho >= 1, jnp.inf, out)
    return jnp.where((rho >= 0) & (rho <= 1), out, jnp.nan).astype(rho.dtype)


def critical_ratio(fraction: Any) -> jax.Array:
    r"""Overparameterization ratio needed to correct a given fraction of gross errors.

    Inverse of :func:`critical_fraction`:

    .. math:: \frac{m}{n} = \frac{1}{1 - \psi(\rho)},

    evaluated as :math:`(t^\star + 2D(t^\star)) / (t^\star \operatorname{erf}(t^\star/\sqrt2))`
    to avoid cancellation when :math:`\psi(\rho)` is close to 1.

    Args:
      fraction: Fraction(s) :math:`\rho \in [0, 1]` of corrupted entries.

    Returns:
      Array of ratios :math:`\ge 1` (1 at :math:`\rho = 0`, ``inf`` at :math:`\rho = 1`);
      NaN where ``fraction`` is outside [0, 1].
    """
    return _critical_ratio_impl(_as_float(fraction))
