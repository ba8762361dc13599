r"""Training helpers (optax) that keep what recovery needs: the init and the trajectory's span.

Why (S)GD, momentum and weight decay keep a one-hidden-layer CNN recoverable: the gradient of
any loss with respect to filter ``j`` and its bias is
:math:`\sum_{s,i} g_{s,i,j} [P_i x_s; 1]`, so every update (and any linear combination of past
updates, as momentum makes) lies in the span of the training patches. Weight decay multiplies
the current weights by a scalar, so :math:`[W_j; b_j] = c_t [W_j(0); b_j(0)] + \text{span}`
with the same :math:`c_t` for every filter (``weight_decay=True`` in the subspace builders).
Adaptive methods (Adam, RMSProp) rescale each coordinate and leave the span: they are not
covered (the tests show it). The readout moves along the hidden features of the *current*
filters; it stays in the span of the final features only when it is trained with the filters
fixed (:func:`fit` with ``trainable=("readout",)`` after the filters, i.e. two-stage training).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def sgd(learning_rate: float, *, momentum: float | None = None, nesterov: bool = False,
        weight_decay: float = 0.0) -> optax.GradientTransformation:
    """SGD with optional (Nesterov) momentum and decoupled weight decay."""
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))
    return optax.chain(*parts)


def mse_loss(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean squared error; scalar-output targets may be ``(N,)`` or ``(N, 1)``."""
    return 0.5 * jnp.mean((outputs - targets.reshape(outputs.shape)) ** 2)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


LOSSES: dict[str, Callable] = {"mse": mse_loss, "cross_entropy": cross_entropy_loss}


class History(NamedTuple):
    """Per-step training loss (``(steps,)``)."""

    loss: jax.Array


def _trainable_mask(params, trainable: Sequence[str] | None):
    if trainable is None:
        return jax.tree_util.tree_map(lambda _: True, params)
    unknown = set(trainable) - set(params)
    if unknown:
        raise ValueError(f"trainable names {sorted(unknown)} are not top-level params "
                         f"(have {sorted(params)})")
    return {k: jax.tree_util.tree_map(lambda _, k=k: k in trainable, v)
            for k, v in params.items()}


def fit(model, params, x, y, *, optimizer: optax.GradientTransformation, steps: int,
        loss: str | Callable = "mse", batch_size: int | None = None,
        key: jax.Array | None = None, trainable: Sequence[str] | None = None,
        model_kwargs: dict | None = None):
    """Train ``params`` (a plain params dict) of a Flax ``model`` on ``(x, y)``.

    The whole run is one ``lax.scan``: full-batch gradient descent when ``batch_size`` is
    None, otherwise minibatches drawn without replacement each epoch from ``key``.

    Args:
        model: a Flax module; called as ``model.apply({"params": p}, x)``.
        params: initial params (keep them: recovery needs ``w_0``).
        x, y: training inputs and targets (labels for cross-entropy).
        optimizer: an optax transformation, e.g. :func:`sgd`.
        steps: number of updates.
        loss: ``"mse"``, ``"cross_entropy"`` or ``f(outputs, targets) -> scalar``.
        batch_size: minibatch size (None: full batch).
        key: PRNG key for minibatch order.
        trainable: top-level param names to train (others frozen; e.g. ``("readout",)``).
        model_kwargs: extra keyword arguments for ``model.apply``.

    Returns:
        ``(params, History)``.
    """
    loss_fn = LOSSES[loss] if isinstance(loss, str) else loss
    kwargs = model_kwargs or {}
    mask = _trainable_mask(params, trainable)
    tx = optax.multi_transform({True: optimizer, False: optax.set_to_zero()}, mask)
    n = x.shape[0]
    if batch_size is not None and not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")

    def objective(p, xb, yb):
        return loss_fn(model.apply({"params": p}, xb, **kwargs), yb)

    def step(carry, idx):
        p, opt_state = carry
        xb, yb = (x, y) if idx is None else (x[idx], y[idx])
        value, grads = jax.value_and_grad(objective)(p, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), value

    if batch_size is None:
        indices = None
    else:
        per_epoch = n // batch_size
        epochs = -(-steps // per_epoch)
        key = jax.random.PRNGKey(0) if key is None else key
        perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, epochs))
        indices = perms[:, : per_epoch * batch_size].reshape(-1, batch_size)[:steps]

    @jax.jit
    def run(p):
        carry = (p, tx.init(p))
        if indices is None:
            (p, _), losses = jax.lax.scan(lambda c, _: step(c, None), carry, None, length=steps)
        else:
            (p, _), losses = jax.lax.scan(step, carry, indices)
        return p, losses

    params, losses = run(params)
    return params, History(losses)
