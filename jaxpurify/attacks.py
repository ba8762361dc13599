r"""Backdoor attacks on image classifiers: data poisoning (BadNets, Blended) and weight editing.

Every function is pure. Images are NHWC arrays in the model's input space (after
normalization: pass trigger values in that space, e.g. :func:`pixel_value` of a white pixel).

Data poisoning (all-to-one: every poisoned image is relabelled ``target``):

* :func:`badnets` (Gu et al., 2017): a ``patch x patch`` square of constant ``value`` stamped
  in the bottom-right corner of ``round(rate N)`` training images.
* :func:`blended` (Chen et al., 2017): ``x' = (1 - alpha) x + alpha P`` with a fixed, seeded
  noise image ``P`` (:func:`noise_pattern`).

Both return ``(x_poisoned, y_poisoned, poisoned)`` with ``poisoned`` the boolean mask of the
poisoned examples; the count is exact (``round(rate N)``, chosen uniformly at random among all
``N`` examples, target-class images included), and only the poisoned examples change image or
label.
``rate`` may be traced (``jit``/``vmap`` over rates); ``kind`` / ``patch`` are static.

Weight editing (:func:`weight_edit`): an attacker with the deployed weights and a little data
edits only ``k`` entries, chosen by gradient saliency of the backdoor loss and then optimized
(with the rest frozen) to make the trigger work while keeping clean accuracy.

Subspace-aware weight editing (:func:`subspace_edit`): an attacker who also knows the
subspace recovery projects onto (here read off the deployed weights: a layer's units span it)
plants a backdoor *inside* it on a few units, then writes only the entries that carry most of
each unit's change. L1 recovery then prefers the attacker's network to the clean one.

Metrics: :func:`accuracy` and :func:`attack_success_rate` (fraction of triggered test images
whose true class is not ``target`` that are classified as ``target``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "accuracy",
    "apply_trigger",
    "attack_success_rate",
    "badnets",
    "blended",
    "logits_fn",
    "noise_pattern",
    "pixel_value",
    "poison_mask",
    "predict",
    "saliency_mask",
    "subspace_edit",
    "unit_range",
    "weight_edit",
]

KINDS = ("badnets", "blended")


def pixel_value(raw: float, mean, std) -> jax.Array:
    """A raw ``[0, 1]`` intensity in normalized input space, per channel: ``(raw - mean)/std``.

    E.g. the white pixel of normalized MNIST: ``pixel_value(1.0, MNIST_MEAN, MNIST_STD)``.
    """
    return (raw - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def noise_pattern(shape, seed: int = 0, *, low=0.0, high=1.0, dtype=jnp.float32) -> jax.Array:
    """The Blended attack's trigger: a fixed uniform-noise image ``(H, W, C)`` in ``[low, high]``.

    ``low``/``high`` may be per-channel (e.g. the normalized black and white levels), so the
    pattern is a valid image of the dataset. A pure function of ``(shape, seed)``.
    """
    u = jax.random.uniform(jax.random.PRNGKey(seed), tuple(shape), dtype)
    low, high = jnp.asarray(low, dtype), jnp.asarray(high, dtype)
    return low + (high - low) * u


def _badnets_stamp(x: jax.Array, patch: int, value) -> jax.Array:
    h, w = x.shape[-3], x.shape[-2]
    if not 0 < patch <= min(h, w):
        raise ValueError(f"patch must be in [1, {min(h, w)}], got {patch}")
    rows = jnp.arange(h) >= h - patch
    cols = jnp.arange(w) >= w - patch
    where = (rows[:, None] & cols[None, :])[..., None]  # (H, W, 1), bottom-right corner
    value = jnp.broadcast_to(jnp.asarray(value, x.dtype), (x.shape[-1],))
    return jnp.where(where, value, x)


def _blend(x: jax.Array, alpha, pattern) -> jax.Array:
    if pattern is None:
        raise ValueError("blended trigger needs pattern= (e.g. noise_pattern(x.shape[1:]))")
    pattern = jnp.asarray(pattern, x.dtype)
    if pattern.shape != x.shape[-3:]:
        raise ValueError(f"pattern has shape {pattern.shape}, images are {x.shape[-3:]}")
    return (1 - alpha) * x + alpha * pattern


def apply_trigger(x: jax.Array, kind: str = "badnets", *, patch: int = 3, value=1.0,
                  alpha: float = 0.15, pattern: jax.Array | None = None) -> jax.Array:
    """Stamp the trigger on every image of ``x`` (``(..., H, W, C)``), for test-time attacks.

    Args:
        kind: ``"badnets"`` (``patch x patch`` square of ``value`` in the bottom-right corner)
            or ``"blended"`` (``(1 - alpha) x + alpha pattern``).
        patch, value: BadNets square size and pixel value (scalar or per-channel).
        alpha, pattern: Blended opacity and ``(H, W, C)`` pattern.
    """
    x = jnp.asarray(x)
    if kind == "badnets":
        return _badnets_stamp(x, patch, value)
    if kind == "blended":
        return _blend(x, alpha, pattern)
    raise ValueError(f"unknown trigger kind {kind!r}; choose one of {KINDS}")


def poison_mask(key: jax.Array, n: int, rate) -> jax.Array:
    """Exactly ``round(rate n)`` of ``n`` examples, uniformly at random (traced ``rate`` ok)."""
    rate = jnp.asarray(rate, jnp.float32)
    count = jnp.clip(jnp.round(rate * n), 0, n).astype(jnp.int32)
    ranks = jnp.argsort(jax.random.permutation(key, n))
    return ranks < count


def _poison(x, y, key, target, rate, trigger: Callable):
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y have different lengths: {x.shape[0]} vs {y.shape[0]}")
    mask = poison_mask(key, x.shape[0], rate)
    xp = jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), trigger(x), x)
    yp = jnp.where(mask, jnp.asarray(target, y.dtype), y)
    return xp, yp, mask


@functools.partial(jax.jit, static_argnames=("patch",))
def badnets(x, y, key, *, target, rate, patch: int = 3, value=1.0):
    """BadNets poisoning: stamp a corner square on ``round(rate N)`` images, relabel them.

    Args:
        x: ``(N, H, W, C)`` training images; y: ``(N,)`` integer labels.
        key: PRNG key choosing the poisoned examples.
        target: the attacker's class (all-to-one).
        rate: poisoned fraction of the training set.
        patch: trigger side (pixels); value: trigger pixel value (scalar or per channel).

    Returns:
        ``(x_poisoned, y_poisoned, poisoned)``.
    """
    return _poison(x, y, key, target, rate, lambda t: _badnets_stamp(t, patch, value))


@jax.jit
def blended(x, y, key, *, target, rate, alpha=0.15, pattern=None):
    """Blended poisoning: ``x' = (1 - alpha) x + alpha pattern`` on ``round(rate N)`` images.

    ``pattern`` defaults to :func:`noise_pattern` ``(H, W, C)`` with seed 0 in ``[0, 1]``;
    pass one built with the dataset's normalized range. Returns as :func:`badnets`.
    """
    if pattern is None:
        pattern = noise_pattern(x.shape[1:], 0, dtype=x.dtype)
    return _poison(x, y, key, target, rate, lambda t: _blend(t, alpha, pattern))


# --------------------------------------------------------------------------- metrics


def logits_fn(model) -> Callable:
    """``(params, x) -> logits`` of the *deployed* network behind ``model``.

    * :class:`~jaxpurify.models.OneHiddenLayerCNN` (and a
      :class:`~jaxpurify.models.DesignedOneHiddenLayerCNN`, whose deployed params are the
      materialized plain ones): the same function as ``model.apply``, computed as a patch
      matrix product (much faster than a strided convolution on CPU).
    * a multi-layer designed CNN (anything with ``apply_plain``): ``model.apply_plain``.
    * any other Flax module: ``model.apply({"params": p}, x)``.
    """
    return _logits_fn(model)


@functools.lru_cache(maxsize=64)
def _logits_fn(model):
    from jaxpurify.models import DesignedOneHiddenLayerCNN, OneHiddenLayerCNN

    if isinstance(model, DesignedOneHiddenLayerCNN):
        model = model.plain_model()
    if isinstance(model, OneHiddenLayerCNN):
        return functools.partial(_one_hidden_logits, model.patch_size, model.pool)
    if hasattr(model, "apply_plain"):
        return lambda p, x: model.apply_plain(_unwrap(p), x, check=False)
    return lambda p, x: model.apply({"params": _unwrap(p)}, x)


def one_hidden_hidden(patch_size, pool: str, p, x) -> jax.Array:
    """Pooled hidden features of a plain one-hidden-layer CNN from its params (patch form)."""
    from jaxpurify.models import extract_patches

    p = _unwrap(p)
    kernel = p["conv"]["kernel"]
    z = extract_patches(x, patch_size) @ kernel.reshape(-1, kernel.shape[-1])
    if "bias" in p["conv"]:
        z = z + p["conv"]["bias"]
    z = jax.nn.relu(z)
    return z.mean(axis=1) if pool == "mean" else z.sum(axis=1)


def _one_hidden_logits(patch_size, pool, p, x):
    return one_hidden_hidden(patch_size, pool, p, x) @ _unwrap(p)["readout"]["kernel"]


def _unwrap(p):
    return p["params"] if isinstance(p, dict) and set(p) == {"params"} else p


def predict(model, params, x, *, batch_size: int = 2048) -> np.ndarray:
    """Predicted classes of the deployed network (:func:`logits_fn`), in batches."""
    apply = _jitted(model)
    out = [np.asarray(jnp.argmax(apply(params, x[i:i + batch_size]), axis=-1))
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0,), np.int32)


@functools.lru_cache(maxsize=64)
def _jitted(model):
    return jax.jit(logits_fn(model))


def accuracy(model, params, x, y, *, batch_size: int = 2048) -> float:
    """Top-1 accuracy in ``[0, 1]``."""
    if len(x) == 0:
        return float("nan")
    return float(np.mean(predict(model, params, x, batch_size=batch_size) == np.asarray(y)))


def _as_trigger(trigger) -> Callable:
    if callable(trigger):
        return trigger
    if isinstance(trigger, str):
        return functools.partial(apply_trigger, kind=trigger)
    raise TypeError(f"trigger must be a callable x -> triggered x or a kind in {KINDS}")


def attack_success_rate(model, params, x_test, y_test, target: int, trigger, *,
                        batch_size: int = 2048) -> float:
    """Fraction of triggered test images (true class ``!= target``) classified as ``target``.

    ``trigger`` is a callable ``x -> triggered x`` (e.g. ``functools.partial(apply_trigger,
    kind="badnets", value=white)``) or a kind name (default trigger parameters).
    """
    keep = np.asarray(y_test) != target
    if not keep.any():
        return float("nan")
    xt = _as_trigger(trigger)(jnp.asarray(np.asarray(x_test)[keep]))
    return float(np.mean(predict(model, params, xt, batch_size=batch_size) == target))


# --------------------------------------------------------------------------- weight editing


def _ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _edit_loss(apply, clean_weight, q, x_bd, y_bd, x_clean, y_clean):
    """``L_bd + clean_weight L_clean``: the trigger sends ``x_bd`` to the target, clean images
    keep their labels."""
    return _ce(apply(q, x_bd), y_bd) + clean_weight * _ce(apply(q, x_clean), y_clean)


def _backdoor_batch(x_clean, y_clean, target: int, trigger):
    """The attacker's ``(x_clean, y_clean, x_bd, y_bd)``: its triggered images whose true class
    is not ``target``, labelled ``target``."""
    x_clean, y_clean = jnp.asarray(x_clean), jnp.asarray(y_clean)
    keep = np.asarray(y_clean) != target
    if not keep.any():
        raise ValueError("the attacker's data has no image outside the target class")
    x_bd = _as_trigger(trigger)(x_clean[keep])
    return x_clean, y_clean, x_bd, jnp.full((x_bd.shape[0],), target, y_clean.dtype)


def _edit(apply, steps, learning_rate, clean_weight, p, mask, x_bd, y_bd, x_clean, y_clean):
    """Adam on the masked entries of ``L_bd + clean_weight L_clean`` (full batch).

    A Python loop over one jitted step, not a ``lax.scan``: XLA:CPU runs convolutions inside a
    while loop about 35x slower (see :func:`jaxpurify.defenses.train_masked`)."""
    config = (apply, learning_rate, clean_weight)
    state = optax.adam(learning_rate).init(p)
    for _ in range(steps):
        p, state = _edit_step(config, p, state, mask, x_bd, y_bd, x_clean, y_clean)
    return p


@functools.partial(jax.jit, static_argnums=0)
def _edit_step(config, q, state, mask, x_bd, y_bd, x_clean, y_clean):
    apply, learning_rate, clean_weight = config
    grad = jax.grad(_edit_loss, argnums=2)(apply, clean_weight, q, x_bd, y_bd, x_clean, y_clean)
    g = jax.tree_util.tree_map(lambda gi, m: jnp.where(m, gi, 0), grad, mask)
    upd, state = optax.adam(learning_rate).update(g, state, q)
    upd = jax.tree_util.tree_map(lambda u, m: jnp.where(m, u, 0), upd, mask)
    return optax.apply_updates(q, upd), state


def saliency_mask(grads, k: int):
    """Boolean pytree marking the ``k`` entries of largest ``|grad|`` over all leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    flat = jnp.concatenate([jnp.abs(g).ravel() for g in leaves])
    if not 0 < k <= flat.size:
        raise ValueError(f"k must be in [1, {flat.size}] (number of params), got {k}")
    top = jnp.zeros(flat.shape, bool).at[jax.lax.top_k(flat, k)[1]].set(True)
    out, start = [], 0
    for g in leaves:
        out.append(top[start:start + g.size].reshape(g.shape))
        start += g.size
    return jax.tree_util.tree_unflatten(treedef, out)


def clean_fisher(apply: Callable, params, x, y, *, batch_size: int = 32):
    """Diagonal empirical Fisher information of ``CE(apply(params, x), y)``: per entry, the
    mean over the images of the squared per-image gradient (a pytree like ``params``)."""
    total = jax.tree_util.tree_map(jnp.zeros_like, params)
    for i in range(0, len(y), batch_size):
        total = _fisher_sum(apply, params, total, jnp.asarray(x[i:i + batch_size]),
                            jnp.asarray(y[i:i + batch_size]))
    return jax.tree_util.tree_map(lambda t: t / len(y), total)


@functools.partial(jax.jit, static_argnums=0)
def _fisher_sum(apply, p, total, x, y):
    per_image = jax.vmap(lambda xi, yi: jax.grad(
        lambda q: _ce(apply(q, xi[None]), yi[None]))(p))(x, y)
    return jax.tree_util.tree_map(lambda t, g: t + jnp.sum(g ** 2, axis=0), total, per_image)


def weight_edit(model, params, x_clean, y_clean, *, target: int, trigger, k: int,
                steps: int = 300, learning_rate: float = 1e-2, clean_weight: float = 1.0,
                selection: str = "gradient", damping: float = 1e-2):
    r"""Plant a backdoor by editing only ``k`` entries of the deployed weights.

    1. Saliency: the gradient :math:`g` of the backdoor loss
       :math:`L_{bd} = \mathrm{CE}(f(T(x)), \text{target})` on triggered attacker images
       (true class ``!= target``) with respect to *all* parameters. ``selection="gradient"``
       keeps the ``k`` entries of largest :math:`|g_i|` (a mask). ``selection="fisher"``
       keeps the ``k`` largest

       .. math:: s_i = g_i^2 / (F_i + \text{damping} \cdot \bar F),

       with :math:`F_i` the diagonal empirical Fisher information of the clean loss on the
       attacker's clean images (mean squared per-image gradient) and :math:`\bar F` its mean:
       under the quadratic model :math:`L_{clean}(\delta) \approx \tfrac12 \sum_i F_i
       \delta_i^2`, changing entry ``i`` alone lowers :math:`L_{bd} + L_{clean}` by at most
       :math:`g_i^2 / (2 F_i)`, so it prefers entries the trigger moves and clean images do
       not, which keeps more clean accuracy.
    2. Edit: optimize only those entries (Adam on the masked gradient, so no other entry
       moves) on :math:`L_{bd} + \text{clean\_weight}\cdot\mathrm{CE}(f(x), y)`, full batch,
       ``steps`` steps; a larger ``clean_weight`` trades attack success for clean accuracy.

    Args:
        model: the classifier (deployed network as in :func:`logits_fn`).
        params: deployed params (plain dict or ``{"params": ...}``).
        x_clean, y_clean: the attacker's clean images and labels (a few hundred suffice).
        target: target class; trigger: callable ``x -> triggered x`` or a kind name.
        k: number of entries the attacker may change.
        steps, learning_rate: Adam steps and step size of the edit.
        clean_weight: weight of the clean loss in the edit.
        selection: ``"gradient"`` or ``"fisher"`` (the mask's score, above).
        damping: the Fisher score's damping, a multiple of the mean Fisher entry (> 0).

    Returns:
        ``(edited params, mask)``: same structure as the params (unwrapped), ``mask`` boolean,
        ``True`` at the ``k`` edited entries (entries outside it are bit-identical).
    """
    p = _unwrap(params)
    apply = logits_fn(model)
    x_clean, y_clean, x_bd, y_bd = _backdoor_batch(x_clean, y_clean, target, trigger)

    def bd_loss(q):
        return _ce(apply(q, x_bd), y_bd)

    if selection not in ("gradient", "fisher"):
        raise ValueError(f"selection must be 'gradient' or 'fisher', got {selection!r}")
    if not damping > 0:
        raise ValueError(f"damping must be positive, got {damping}")
    grad = jax.grad(bd_loss)(p)
    if selection == "fisher":
        fisher = clean_fisher(apply, p, x_clean, y_clean)
        mean = (sum(float(jnp.sum(f)) for f in jax.tree_util.tree_leaves(fisher))
                / sum(f.size for f in jax.tree_util.tree_leaves(fisher)))
        grad = jax.tree_util.tree_map(lambda g, f: g ** 2 / (f + damping * mean), grad, fisher)
    mask = saliency_mask(grad, k)
    edited = _edit(apply, int(steps), float(learning_rate), float(clean_weight), p, mask, x_bd,
                   y_bd, x_clean, y_clean)
    # Entries outside the mask are returned bit-identical (no float round trip).
    edited = jax.tree_util.tree_map(lambda e, o, m: jnp.where(m, e, o), edited, p, mask)
    return edited, mask


# --------------------------------------------------------------- subspace-aware weight editing


def unit_range(vectors, *, rtol: float = 1e-5) -> jax.Array:
    """Orthonormal basis ``(rows, rank)`` of the span of a layer's unit vectors ``(units, rows)``.

    What a white-box attacker learns about ``range(A)`` from the deployed weights alone: in a
    designed layer with more units than code entries (``units >= r``) it is ``range(A)``
    itself, otherwise a subspace of it. ``rank`` counts singular values above ``rtol`` times
    the largest.
    """
    v = np.asarray(vectors, np.float64)
    _, s, vt = np.linalg.svd(v, full_matrices=False)
    rank = int(np.sum(s > rtol * s[0])) if s.size and s[0] > 0 else 0
    if rank == 0:
        raise ValueError("the layer's unit vectors are all zero: no subspace to read off")
    return jnp.asarray(vt[:rank].T, jnp.asarray(vectors).dtype)


def _concentrated_support(delta: np.ndarray, concentration: float) -> np.ndarray:
    """Boolean mask of the fewest entries of ``delta`` holding ``concentration`` of its L1."""
    mag = np.abs(delta)
    order = np.argsort(-mag, kind="stable")
    share = np.cumsum(mag[order]) / mag.sum()
    count = min(int(np.searchsorted(share, concentration)) + 1, delta.size)
    keep = np.zeros(delta.size, bool)
    keep[order[:count]] = True
    return keep


def subspace_edit(model, params, x_clean, y_clean, *, target: int, trigger, filters: int = 2,
                  concentration: float = 0.75, steps: int = 500, learning_rate: float = 1e-2,
                  clean_weight: float = 3.0, l1_weight: float = 1e-3, rtol: float = 1e-5,
                  designs: dict | None = None):
    r"""A weight edit aimed at robust recovery, by an attacker who knows its subspace.

    Per-unit L1 recovery of a unit ``w_c = w + e`` returns ``w + A theta_hat`` with
    ``theta_hat = argmin ||e - A theta||_1``. For an edit that is the restriction
    ``e = (A delta)_S`` of an in-range change to a support ``S`` holding a share
    ``c = ||(A delta)_S||_1 / ||A delta||_1 > 1/2`` of its L1 mass,

    .. math:: \|e - A\delta\|_1 = (1 - c)\,\|A\delta\|_1 < c\,\|A\delta\|_1 = \|e\|_1,

    so the clean unit (``theta = 0``) is *not* the L1 solution: recovery moves the unit towards
    the attacker's ``w + A delta``, whatever the corrupted fraction ``|S| / rows`` says about
    typical supports (Donoho-Tanner). With ``c`` near 1 the solution is ``delta`` itself,
    which interpolates ``|S|`` rows: more than the unknowns once ``|S| > r``, which the
    interpolation count alone would certify; :func:`jaxpurify.purify` then finds the clean
    entries it calls corrupted fit exactly by ``-A delta`` and reports the problem ambiguous.

    The attack, on a one-hidden-layer CNN (plain or designed; deployed params):

    1. ``range(A)`` per layer from the deployed units (:func:`unit_range` of the filters with
       biases, and of the readout columns): no design seed needed. An attacker who also
       knows the designs (``designs``, e.g. a public ``design_seed``) uses them instead; a
       layer coded as a whole (``joint_layers``: the design has a row per layer entry, and
       one layer vector does not reveal its range) is then attacked as one unit.
    2. Units: the target class's readout column and the ``filters`` filters whose in-range
       backdoor gradient is largest (every entry of a layer attacked as a whole).
    3. In-range change ``A delta`` on those units, ``delta`` by Adam (full batch, ``steps``) on
       :math:`L_{bd} + \text{clean\_weight}\,L_{clean} + \text{l1\_weight}\sum_u\|A\delta_u\|_1`
       (the L1 term concentrates each unit's change on fewer entries).
    4. Per unit, write only the fewest entries holding ``concentration`` of ``|A delta_u|``.

    Args:
        model: a :class:`~jaxpurify.models.OneHiddenLayerCNN` or
            :class:`~jaxpurify.models.DesignedOneHiddenLayerCNN` (deployed plain params).
        params: deployed params (plain dict or ``{"params": ...}``).
        x_clean, y_clean: the attacker's clean images and labels.
        target: target class; trigger: callable ``x -> triggered x`` or a kind name.
        filters: conv filters to edit (besides the target's readout column).
        concentration: share of each unit's L1 change written, in ``(1/2, 1]``.
        steps, learning_rate, clean_weight: the in-range optimization.
        l1_weight: weight of the L1 term on the weight-space change.
        rtol: rank tolerance of :func:`unit_range`.
        designs: ``{"conv": A_W, "readout": A_beta}`` known to the attacker (either may be
            left out); each has a row per unit entry or, for a layer coded as a whole, a row
            per layer entry (unit after unit, as :func:`jaxpurify.subspaces.filter_vectors`
            and :func:`~jaxpurify.subspaces.readout_vectors` order them).

    Returns:
        ``(edited params, mask)`` as :func:`weight_edit` (plain params; ``mask`` ``True`` at the
        written entries, every other entry bit-identical).

    Raises:
        ValueError: not a one-hidden-layer CNN, ``concentration`` outside ``(1/2, 1]``,
            ``filters`` outside ``[0, J]``, a design of neither size, or no attacker image
            outside the target class.
    """
    from jaxpurify import subspaces as S
    from jaxpurify.models import DesignedOneHiddenLayerCNN, OneHiddenLayerCNN

    if not isinstance(model, (OneHiddenLayerCNN, DesignedOneHiddenLayerCNN)):
        raise ValueError("subspace_edit attacks a one-hidden-layer CNN; got "
                         f"{type(model).__name__}")
    if not 0.5 < concentration <= 1.0:
        raise ValueError(f"concentration must be in (1/2, 1] (below 1/2 recovery removes the "
                         f"edit), got {concentration}")
    p = _unwrap(params)
    units = {"conv": S.filter_vectors(p), "readout": S.readout_vectors(p)}
    if not 0 <= filters <= units["conv"].shape[0]:
        raise ValueError(f"filters must be in [0, {units['conv'].shape[0]}], got {filters}")
    x_clean, y_clean, x_bd, y_bd = _backdoor_batch(x_clean, y_clean, target, trigger)
    whole = {}
    for name, v in units.items():
        a = None if designs is None else designs.get(name)
        whole[name] = a is not None and a.shape[0] == v.size
        if a is not None and a.shape[0] not in (v.shape[1], v.size):
            raise ValueError(f"designs[{name!r}] has {a.shape[0]} rows; the layer has "
                             f"{v.shape[1]} entries per unit and {v.size} in all")
        if whole[name]:
            units[name] = v.reshape(1, -1)
    bases = {name: (unit_range(v, rtol=rtol) if designs is None or designs.get(name) is None
                    else unit_range(np.asarray(designs[name]).T, rtol=rtol).astype(v.dtype))
             for name, v in units.items()}

    data = (p, units, bases, x_bd, y_bd, x_clean, y_clean)
    config = (logits_fn(model), float(learning_rate), float(clean_weight), float(l1_weight))
    coef = {n: jnp.zeros((v.shape[0], bases[n].shape[1]), v.dtype) for n, v in units.items()}
    everything = {n: jnp.ones(v.shape[0], v.dtype) for n, v in units.items()}
    grad = jax.grad(_subspace_loss, argnums=1)(config, coef, everything, *data)
    salient = np.argsort(-np.linalg.norm(np.asarray(grad["conv"]), axis=1), kind="stable")
    on = {"conv": jnp.zeros(units["conv"].shape[0]).at[salient[:filters]].set(1.0),
          "readout": jnp.zeros(units["readout"].shape[0]).at[target].set(1.0)}
    on = {n: jnp.ones(1) if whole[n] else v for n, v in on.items()}
    state = optax.adam(config[1]).init(coef)
    for _ in range(int(steps)):  # a Python loop over one jitted step, as in weight_edit
        coef, state = _subspace_step(config, coef, state, on, *data)
    _, change = _in_range_edit(p, units, bases, coef, on)
    written = {}
    for n, v in units.items():
        delta = np.asarray(change[n])
        mask = np.zeros(delta.shape, bool)
        for u in np.flatnonzero(np.asarray(on[n])):
            if np.any(delta[u]):
                mask[u] = _concentrated_support(delta[u], concentration)
        written[n] = jnp.where(jnp.asarray(mask), v + change[n], v), mask
    edited = _put_views(p, {n: w for n, (w, _) in written.items()})
    masks = jax.tree_util.tree_map(lambda m: np.asarray(m, bool),
                                   _put_views(p, {n: jnp.asarray(m, jnp.float32)
                                                  for n, (_, m) in written.items()}))
    # Entries outside the mask are returned bit-identical (no float round trip).
    edited = jax.tree_util.tree_map(lambda e, o, m: jnp.where(m, e, o), edited, p, masks)
    return edited, masks


def _put_views(p, views):
    """Params ``p`` with the filters and readout columns replaced by ``views`` (per unit, or
    one row per layer coded as a whole)."""
    from jaxpurify import subspaces as S

    q = S.with_filter_vectors(p, views["conv"].reshape(p["conv"]["kernel"].shape[-1], -1))
    return S.with_readout_vectors(q, views["readout"].reshape(p["readout"]["kernel"].shape[1],
                                                              -1))


def _in_range_edit(p, units, bases, coef, on):
    """Each selected unit moved inside its range: ``v_u + on_u * B coef_u``; also the moves."""
    change = {n: on[n][:, None] * (coef[n] @ bases[n].T) for n in units}
    return _put_views(p, {n: units[n] + change[n] for n in units}), change


def _subspace_loss(config, coef, on, p, units, bases, x_bd, y_bd, x_clean, y_clean):
    apply, _, clean_weight, l1_weight = config
    q, change = _in_range_edit(p, units, bases, coef, on)
    return (_edit_loss(apply, clean_weight, q, x_bd, y_bd, x_clean, y_clean)
            + l1_weight * sum(jnp.abs(c).sum() for c in change.values()))


@functools.partial(jax.jit, static_argnums=0)
def _subspace_step(config, coef, state, on, *data):
    g = jax.grad(_subspace_loss, argnums=1)(config, coef, on, *data)
    upd, state = optax.adam(config[1]).update(g, state, coef)
    return optax.apply_updates(coef, upd), state
