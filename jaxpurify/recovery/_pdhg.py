r"""Restarted PDHG (primal-dual hybrid gradient) for :math:`\min_x \|y - Ax\|_1`.

The saddle-point form in orthonormal coordinates :math:`Ax = Qz`:

.. math::
    \min_z \max_{\|u\|_\infty \le 1} u^\top (y - Qz),

solved by Chambolle-Pock steps (the prox of the box is a clip):

.. math::
    z^{k+1} &= z^k + \tau Q^\top u^k \\
    u^{k+1} &= \mathrm{clip}\big(u^k + \sigma (y - Q(2z^{k+1} - z^k)),\ -1,\ 1\big)

with :math:`\tau = \eta\omega`, :math:`\sigma = \eta/\omega`, :math:`\eta < 1 = \|Q\|`, and a
primal weight :math:`\omega` balancing the two scales. As in PDLP (Applegate et al. 2021),
each chunk ends with a restart to whichever of the current and the averaged iterate has the
smaller duality gap, and :math:`\omega` is updated from the movement since the last restart.
Rows with :math:`|u_i| < 1` (dual strictly inside the box) are the estimated interpolated set.
No factorization beyond the shared QR is needed.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxpurify.recovery._certificate import evaluate, relative_gap


class PDHGState(NamedTuple):
    z: jax.Array
    u: jax.Array
    z_sum: jax.Array
    u_sum: jax.Array
    z_anchor: jax.Array
    u_anchor: jax.Array
    omega: jax.Array


@dataclasses.dataclass(frozen=True)
class PDHG:
    """Restarted, averaged PDHG with primal-weight updates (see module docstring).

    Args:
        eta: step-size fraction of the stability limit, ``0 < eta < 1``.
        smoothing: weight of the previous primal weight in its geometric update.
    """

    eta: float = 0.95
    smoothing: float = 0.5
    name = "pdhg"

    def __post_init__(self):
        if not 0.0 < self.eta < 1.0:
            raise ValueError(f"PDHG needs 0 < eta < 1, got eta={self.eta}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"PDHG needs 0 <= smoothing < 1, got {self.smoothing}")

    def init(self, q: jax.Array, y: jax.Array) -> PDHGState:
        m = y.shape[0]
        z = q.T @ y
        u = jnp.sign(y - q @ z)
        omega = jnp.linalg.norm(z) / jnp.sqrt(jnp.asarray(m, y.dtype))
        omega = jnp.maximum(omega, jnp.finfo(y.dtype).tiny ** 0.5)
        return PDHGState(z, u, jnp.zeros_like(z), jnp.zeros_like(u), z, u, omega)

    def run(self, q: jax.Array, y: jax.Array, state: PDHGState, steps: int) -> PDHGState:
        tau = self.eta * state.omega
        sigma = self.eta / state.omega

        def step(_, s: PDHGState) -> PDHGState:
            z = s.z + tau * (q.T @ s.u)
            u = jnp.clip(s.u + sigma * (y - q @ (2.0 * z - s.z)), -1.0, 1.0)
            return s._replace(z=z, u=u, z_sum=s.z_sum + z, u_sum=s.u_sum + u)

        s = jax.lax.fori_loop(0, steps, step, state)
        z_avg, u_avg = s.z_sum / steps, s.u_sum / steps
        scale = jnp.sum(jnp.abs(y))
        cur, avg = evaluate(q, y, s.z, s.u), evaluate(q, y, z_avg, u_avg)
        use_avg = (relative_gap(avg.objective, avg.dual_value, scale)
                   < relative_gap(cur.objective, cur.dual_value, scale))
        z = jnp.where(use_avg, z_avg, s.z)
        u = jnp.where(use_avg, u_avg, s.u)
        dz = jnp.linalg.norm(z - s.z_anchor)
        du = jnp.linalg.norm(u - s.u_anchor)
        moved = (dz > 0) & (du > 0)
        log_new = jnp.log(jnp.where(moved, dz / jnp.where(moved, du, 1.0), s.omega))
        omega = jnp.exp(self.smoothing * jnp.log(s.omega) + (1 - self.smoothing) * log_new)
        zero_z, zero_u = jnp.zeros_like(z), jnp.zeros_like(u)
        return PDHGState(z, u, zero_z, zero_u, z, u, omega)

    def estimate(self, q: jax.Array, y: jax.Array, s: PDHGState):
        """Primal point, dual estimate and the believed-interpolated rows."""
        return s.z, s.u, jnp.abs(s.u) < 1.0
