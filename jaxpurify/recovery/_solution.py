"""The result type of :func:`jaxpurify.l1_regression` and its status codes."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class RESULTS:
    """Integer status codes carried by :class:`L1Solution` (``solution.result``).

    Like ``optimistix.RESULTS``, a code is an ``int32`` array so that it survives ``jit``
    and ``vmap``; :meth:`message` turns one into words.

    Attributes:
        successful: the relative duality gap reached ``tol``; ``x`` is a certified minimizer.
        max_iters_reached: the iteration budget ran out before the gap reached ``tol``;
            ``x`` is the best iterate found (smallest objective) but is *not* certified.
        nonfinite_input: ``A`` or ``y`` held NaN or Inf; the output is not a solution.
        rank_deficient: ``A`` does not have full column rank, so the minimizer is not unique
            and recovery of a planted ``x`` is impossible; ``x`` is a minimizer of a
            regularized problem.
        underdetermined: ``m <= n``: the L1 objective is zero for every interpolant, so it
            identifies nothing; ``x`` is the minimum-norm interpolant.
    """

    successful = 0
    max_iters_reached = 1
    nonfinite_input = 2
    rank_deficient = 3
    underdetermined = 4

    _messages = {
        0: "successful",
        1: "the iteration limit was reached before the duality gap met the tolerance; "
        "raise `max_iters` or loosen `tol`",
        2: "A or y contains NaN or Inf; clean the inputs (or inspect where they came from)",
        3: "A is rank deficient (numerically), so the minimizer is not unique; remove "
        "dependent columns of the design",
        4: "the problem is underdetermined (m <= n): every interpolant has zero L1 error, so "
        "nothing can be recovered; use a design with more rows than columns",
    }

    @classmethod
    def message(cls, code) -> str:
        """Human-readable meaning of a (concrete) status code."""
        return cls._messages[int(code)]

    @classmethod
    def messages(cls, codes) -> list[str]:
        """Messages for an array of codes (flattened)."""
        return [cls.message(c) for c in np.asarray(codes).reshape(-1)]


class L1Solution(NamedTuple):
    r"""Solution of :math:`\min_x \|A x - y\|_1`, batched like the inputs.

    Every field has the leading batch shape ``B`` of the problem (``()`` for one problem).

    Attributes:
        x: ``(*B, n)`` the minimizer.
        residual: ``(*B, m)`` :math:`r = y - A x`. In recovery, the nonzero entries are the
            detected corruption.
        objective: ``(*B,)`` :math:`\|r\|_1`.
        dual: ``(*B, m)`` a dual certificate :math:`u` with :math:`A^\top u = 0` and
            :math:`\|u\|_\infty \le 1`; :math:`y^\top u` is a lower bound on the optimum.
        gap: ``(*B,)`` relative duality gap :math:`(\|r\|_1 - y^\top u)/\|r\|_1`; the
            solution is certified optimal to this relative accuracy.
        converged: ``(*B,)`` bool, ``gap <= tol`` and the status is ``successful``.
        iterations: ``(*B,)`` first-order iterations used.
        polished: ``(*B,)`` bool, ``x`` came from the exact active-set solve (the polish)
            rather than from a first-order iterate.
        interpolated: ``(*B, m)`` bool, rows with :math:`|r_i| \le u^{3/4} s`, ``u`` the
            unit roundoff and ``s = max(||A x||_inf, median |y|)`` the scale of the clean
            data. At a vertex solution at least ``n`` rows are interpolated; in exact
            recovery these are the entries judged clean.
        num_interpolated: ``(*B,)`` number of interpolated rows.
        result: ``(*B,)`` int32 status code, see :class:`RESULTS`.
    """

    x: jax.Array
    residual: jax.Array
    objective: jax.Array
    dual: jax.Array
    gap: jax.Array
    converged: jax.Array
    iterations: jax.Array
    polished: jax.Array
    interpolated: jax.Array
    num_interpolated: jax.Array
    result: jax.Array

    @property
    def corrupted(self) -> jax.Array:
        """Rows judged corrupted: the complement of :attr:`interpolated`."""
        return jnp.logical_not(self.interpolated)
