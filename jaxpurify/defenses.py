r"""Backdoor defenses with a small benign budget: fine-tuning, fine-pruning, ANP and jaxpurify.

Every defense takes the model (which says how the *deployed* plain params are evaluated, see
:func:`network`), the deployed params and the defender's benign data. None of them looks at
the test set: every choice (pruning depth, ANP threshold) is made on the benign budget alone.
Each returns ``(params, DefenseInfo)``.

* :func:`fine_tune`: the usual recipe, SGD (lr 0.01, momentum 0.9, weight decay 5e-4) for a
  few epochs (default 10) of minibatches of 128 on the benign set; :data:`BACKDOORBENCH_FT`
  is BackdoorBench's (cosine decay over 100 epochs of 256, random flips and shifts).
* :func:`distill`: the deployed network's logits on augmented benign images distilled into
  another network (Adam on the squared logit difference), a ``refine`` step that gives back
  what a projection cost on benign inputs.
* :func:`fine_prune` (Liu, Dolan-Gavitt & Garg, *Fine-Pruning*, RAID 2018): prune the last
  convolutional layer's channels in increasing order of mean activation on benign data
  until the accuracy on a held-out part of the benign budget drops by more than
  ``max_drop`` (4 points, their rule), then fine-tune the pruned network (pruned channels
  stay removed); :data:`BACKDOORBENCH_FP` is BackdoorBench's (1 % of the channels per step
  down to a 10 % relative drop, then its FT recipe).
* :func:`anp` (Wu & Wang, *Adversarial Neuron Pruning*, NeurIPS 2021), following the
  reference implementation (``optimize_mask_cifar.py`` / ``prune_neuron_cifar.py``): each
  channel ``j`` of every conv layer gets a mask ``m_j`` on its weights and multiplicative
  perturbations ``delta_j, xi_j`` of its weights and bias; per batch the perturbation is drawn
  uniformly in ``[-eps, eps]`` and moved by one signed gradient-ascent step of size ``eps``
  (``anp_steps = 1``), then the mask takes an SGD step (lr 0.2, momentum 0.9) on
  ``alpha L(m) + (1 - alpha) L(m + delta, 1 + xi)`` (``alpha = 0.2``, ``eps = 0.4``, 2000
  iterations of batch 128 drawn with replacement) and is clipped to ``[0, 1]``. Channels
  with ``m_j < 0.2`` are pruned. The reference perturbs BatchNorm layers and pruning zeroes
  the BN scale (the BN shift stays); these networks have no BatchNorm, so the channel's
  convolution weights play the scale (zeroed when pruned) and its bias the shift (kept).
  :func:`anp_prune` re-prunes with the same mask and a stopping rule on benign accuracy.
* :func:`jaxpurify_defense`: robust recovery. The network was trained in the designed
  parameterization (every unit's ``[w; b] = A theta`` with seeded random ``A``), so a sparse
  edit of the deployed weights leaves ``range(A)`` and L1 regression removes it exactly,
  with no data. With a benign budget it then fine-tunes the recovered *codes* ``theta`` with
  the :func:`fine_tune` recipe. A data-poisoning backdoor is learned by training, so it lies
  in ``range(A)`` like the clean function: recovery alone cannot remove it.
* :func:`refit_readout`: the output-layer subspace taken from benign data. The readout is
  reset to its known initialization and trained again on the benign budget with the hidden
  layers frozen, so it ends in ``beta_0 + span{benign hidden features}``; a readout vote
  that only triggered training images taught is not relearned. ``subspace="designed"``
  re-estimates only the readout's codes (fewer unknowns, the network stays designed).
* :func:`row_space_defense`: the filters' data row-space taken from benign data, for a plain
  one-hidden-layer CNN trained by (S)GD from a known init: what training added outside
  ``w_0 + span{benign patches}`` is removed (by L1 recovery or by projection). Needs fewer
  benign patches than filter entries.
* :func:`principal_projection`: the same projection onto only the benign patches' leading
  principal directions, the rank chosen on held-out benign accuracy (cross-validation on the
  budget); :func:`layer_principal_projection` does it layer by layer for a multi-layer CNN,
  each layer's update onto the leading directions of its own benign input patches.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpurify._precision import full_precision
from jaxpurify.attacks import accuracy, logits_fn, one_hidden_hidden, predict
from jaxpurify.phase_transition import critical_fraction
from jaxpurify.purify import fit_count, second_explanation
from jaxpurify.recovery import l1_regression
from jaxpurify.training import sgd

__all__ = [
    "BACKDOORBENCH_FP",
    "BACKDOORBENCH_FT",
    "DefenseInfo",
    "Network",
    "anp",
    "anp_prune",
    "channel_activations",
    "distill",
    "fine_prune",
    "fine_tune",
    "jaxpurify_defense",
    "layer_principal_projection",
    "network",
    "principal_projection",
    "prune_channels",
    "recover_designed",
    "refit_readout",
    "row_space_defense",
]


class DefenseInfo(NamedTuple):
    """What a defense did: its name, wall-clock seconds, and defense-specific details."""

    name: str
    seconds: float
    details: dict


class Network(NamedTuple):
    """How the defenses see a classifier's deployed (plain) params.

    Attributes:
        apply: ``(params, x) -> logits``.
        conv_layers: names of the conv layers (``params[name] = {"kernel": (..., J),
            "bias": (J,)}``) whose output channels are the neurons ANP perturbs.
        last_conv: the layer fine-pruning prunes.
        channels: ``(params, x) -> (N, J)`` mean post-ReLU activation of each channel of
            ``last_conv`` per image (averaged over positions).
        readout: the output layer (an affine map ``h @ kernel (+ bias)`` of its inputs).
        readout_inputs: jitted ``(params, x) -> (N, F)``, the inputs ``h`` of ``readout``.
    """

    apply: Callable
    conv_layers: tuple
    last_conv: str
    channels: Callable
    readout: str
    readout_inputs: Callable


def _unwrap(params):
    return params["params"] if isinstance(params, dict) and set(params) == {"params"} else params


@functools.lru_cache(maxsize=64)
def network(model) -> Network:
    """The :class:`Network` view of a one-hidden-layer CNN (plain or designed) or of a
    multi-layer designed CNN (:mod:`jaxpurify.multilayer`)."""
    from jaxpurify.models import DesignedOneHiddenLayerCNN, OneHiddenLayerCNN

    apply = logits_fn(model)
    if isinstance(model, DesignedOneHiddenLayerCNN):
        model = model.plain_model()
    if isinstance(model, OneHiddenLayerCNN):
        def channels(p, x):
            return one_hidden_hidden(model.patch_size, "mean", p, x)

        hidden = jax.jit(functools.partial(one_hidden_hidden, model.patch_size, model.pool))
        return Network(apply, ("conv",), "conv", channels, "readout", hidden)
    if hasattr(model, "layer_info") and hasattr(model, "layer_inputs"):
        infos = model.layer_info()
        convs = tuple(i.name for i in infos if i.kind == "conv")
        if not convs:
            raise ValueError(f"{type(model).__name__} has no conv layer to prune")
        nxt = infos[[i.name for i in infos].index(convs[-1]) + 1].name
        units = infos[[i.name for i in infos].index(convs[-1])].units

        def channels(p, x):
            h = model.layer_inputs(_unwrap(p), x)[nxt]
            return h.reshape(h.shape[0], -1, units).mean(axis=1)

        last = infos[-1].name
        inputs = jax.jit(lambda p, x: model.layer_inputs(_unwrap(p), x)[last])
        return Network(apply, convs, convs[-1], channels, last, inputs)
    raise TypeError(f"no defense view for {type(model).__name__}: use OneHiddenLayerCNN, "
                    "DesignedOneHiddenLayerCNN or a jaxpurify.multilayer.DesignedCNN")


def _ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _check_data(x, y, what="benign"):
    if x is None or y is None or len(x) == 0:
        raise ValueError(f"this defense needs {what} data (x and y with at least one example)")
    if len(x) != len(y):
        raise ValueError(f"x and y have different lengths: {len(x)} vs {len(y)}")
    return jnp.asarray(x), jnp.asarray(y)


def train_masked(apply_fn: Callable, params, x, y, *, optimizer, steps: int, batch_size: int,
                 key, update_mask=None, hflip: bool = False, crop: int = 0):
    """Minibatch training of ``CE(apply_fn(params, x), y)``; entries with mask False stay put.

    Minibatches are drawn without replacement within each epoch (a shuffling data loader;
    the batch is the whole set when that is smaller than ``batch_size``). ``optimizer`` is an
    optax transformation, or a hashable tuple ``("sgd", lr, momentum, weight_decay)`` or
    ``("sgd-cosine", lr, momentum, weight_decay, steps)`` (the rate decayed from ``lr`` to 0
    by a cosine over ``steps``; with a tuple the compiled step is reused across calls with
    the same ``apply_fn`` and shapes). ``hflip`` and ``crop`` augment every minibatch (random
    horizontal flips, random shifts by up to ``crop`` pixels with zero padding: the standard
    CIFAR-10 training transforms).

    The steps run as a Python loop over one jitted step, not a ``lax.scan``: XLA:CPU runs
    convolutions inside a while loop about 35x slower than the same step on its own
    (SmallVGG, 64-image SGD steps: 6.6 s vs 0.19 s each), and on an accelerator the loop's
    dispatch is asynchronous.
    """
    if crop < 0:
        raise ValueError(f"crop must be >= 0 pixels, got {crop}")
    x, y = jnp.asarray(x), jnp.asarray(y)
    n = x.shape[0]
    b = int(min(batch_size, n))
    per_epoch = n // b
    epochs = -(-steps // per_epoch)
    augment = (bool(hflip), int(crop))
    if any(augment):  # without augmentation the batch order is that of earlier versions
        key, k_aug = jax.random.split(key)
        aug_keys = jax.random.split(k_aug, steps)
    else:
        aug_keys = jnp.zeros((steps, 2), jnp.uint32)
    perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, epochs))
    idx = perms[:, : per_epoch * b].reshape(-1, b)[:steps]
    if update_mask is None:
        update_mask = jax.tree_util.tree_map(lambda _: True, params)
    state = _init_state(optimizer, params)
    for t in range(idx.shape[0]):
        params, state = _train_step(apply_fn, optimizer, augment, params, state, x, y, idx, t,
                                    update_mask, aug_keys[t])
    return params


def _make_tx(optimizer):
    """An optax transformation from itself or from a hashable tuple: ``("sgd", lr, momentum,
    weight_decay)``, ``("sgd-cosine", lr, momentum, weight_decay, steps)`` or
    ``("adam-cosine", peak_lr, steps)`` (what :func:`distill` runs)."""
    if isinstance(optimizer, tuple) and optimizer and optimizer[0] == "sgd":
        _, lr, momentum, wd = optimizer
        return sgd(lr, momentum=momentum, weight_decay=wd)
    if isinstance(optimizer, tuple) and optimizer and optimizer[0] == "sgd-cosine":
        _, lr, momentum, wd, steps = optimizer
        return sgd(optax.cosine_decay_schedule(lr, steps), momentum=momentum, weight_decay=wd)
    if isinstance(optimizer, tuple) and optimizer and optimizer[0] == "adam-cosine":
        _, lr, steps = optimizer
        return optax.adam(optax.cosine_decay_schedule(lr, steps))
    return optimizer


@functools.partial(jax.jit, static_argnums=0)
def _init_state(optimizer, params):
    return _make_tx(optimizer).init(params)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _train_step(apply_fn, optimizer, augment, params, state, x, y, idx, t, update_mask, key):
    """One masked update on the minibatch ``x[idx[t]]`` (augmented as ``augment`` says)."""
    from jaxpurify.multilayer import _augment

    batch = idx[t]
    xb = _augment(*jax.random.split(key), x[batch], *augment)
    g = jax.grad(lambda p: _ce(apply_fn(p, xb), y[batch]))(params)
    u, state = _make_tx(optimizer).update(g, state, params)
    u = jax.tree_util.tree_map(lambda a, m: jnp.where(m, a, 0), u, update_mask)
    return optax.apply_updates(params, u), state


def _fine_tune_apply(apply_fn, params, x, y, *, epochs, learning_rate, momentum, weight_decay,
                     batch_size, key, update_mask=None, schedule="constant", hflip=False,
                     crop=0):
    n = x.shape[0]
    steps = max(1, epochs * (-(-n // min(batch_size, n))))
    if schedule == "constant":
        tx = ("sgd", float(learning_rate), float(momentum), float(weight_decay))
    elif schedule == "cosine":
        tx = ("sgd-cosine", float(learning_rate), float(momentum), float(weight_decay), steps)
    else:
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    key = jax.random.PRNGKey(0) if key is None else key
    out = train_masked(apply_fn, params, x, y, optimizer=tx, steps=steps,
                       batch_size=batch_size, key=key, update_mask=update_mask, hflip=hflip,
                       crop=crop)
    return jax.block_until_ready(out), steps


#: BackdoorBench's fine-tuning defense (``config/defense/ft``): SGD at 0.01 (momentum 0.9,
#: weight decay 5e-4) decayed by a cosine over 100 epochs of minibatches of 256, on the
#: training transforms (random 4-pixel shifts; on CIFAR-10 also horizontal flips): pass as
#: ``fine_tune(..., **BACKDOORBENCH_FT)`` (on MNIST with ``hflip=False``).
BACKDOORBENCH_FT = {"epochs": 100, "batch_size": 256, "schedule": "cosine", "hflip": True,
                    "crop": 4}

#: BackdoorBench's fine-pruning defense (``config/defense/fp``, ``defense/fp.py``): prune 1 %
#: of the channels per step (``once_prune_ratio``) until the accuracy falls 10 % below the
#: unpruned network's (``acc_ratio``, relative), then fine-tune by :data:`BACKDOORBENCH_FT`:
#: pass as ``fine_prune(..., **BACKDOORBENCH_FP)`` (on MNIST with ``hflip=False``).
BACKDOORBENCH_FP = {**BACKDOORBENCH_FT, "max_drop": 0.1, "relative_drop": True,
                    "prune_fraction": 0.01}


def fine_tune(model, params, x_benign, y_benign, *, epochs: int = 10, learning_rate: float = 0.01,
              momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 128,
              schedule: str = "constant", hflip: bool = False, crop: int = 0, key=None,
              update_mask=None):
    """Fine-tune every deployed parameter on the benign set.

    The default is the fine-pruning paper's recipe as run here since the first version: SGD
    (lr 0.01, momentum 0.9, weight decay 5e-4) at a constant rate for ``epochs`` epochs of
    minibatches of ``batch_size``, on the images as they are. :data:`BACKDOORBENCH_FT` holds
    BackdoorBench's longer recipe (cosine decay, 100 epochs, augmented minibatches).

    Args:
        model, params: the model and its deployed params.
        x_benign, y_benign: the benign budget.
        epochs, learning_rate, momentum, weight_decay, batch_size: the SGD recipe.
        schedule: ``"constant"``, or ``"cosine"`` (decay to 0 over all the steps).
        hflip, crop: augment every minibatch (random horizontal flips; random shifts by up
            to ``crop`` pixels, zero padded).
        key: PRNG key of the batch order and augmentations (default ``PRNGKey(0)``).
        update_mask: a boolean pytree like the params; entries marked False stay frozen.

    Returns:
        ``(params, DefenseInfo)``; ``details`` holds ``steps`` and ``epochs``.
    """
    t0 = time.perf_counter()
    x, y = _check_data(x_benign, y_benign)
    out, steps = _fine_tune_apply(network(model).apply, _unwrap(params), x, y, epochs=epochs,
                                  learning_rate=learning_rate, momentum=momentum,
                                  weight_decay=weight_decay, batch_size=batch_size, key=key,
                                  update_mask=update_mask, schedule=schedule, hflip=hflip,
                                  crop=crop)
    return out, DefenseInfo("ft", time.perf_counter() - t0, {"steps": steps, "epochs": epochs})


def distill(model, params, x_benign, y_benign=None, *, teacher, steps: int = 300,
            learning_rate: float = 3e-4, batch_size: int = 64, hflip: bool = False,
            crop: int = 0, stamps=None, stamp_weight: float = 1.0, key=None):
    r"""Pull ``params`` toward the ``teacher``'s logits on (augmented) benign images.

    Minimizes, over every deployed parameter ``q`` (starting from ``params``),

    .. math:: \frac{1}{BC} \sum_{x \in \text{batch}} \| f_q(a(x)) - f_T(a(x)) \|_2^2

    with Adam (cosine decay from ``learning_rate`` over ``steps`` steps), each step on
    ``batch_size`` benign images drawn without replacement and augmented by ``a`` (random
    horizontal flips and shifts by up to ``crop`` pixels, if asked). The labels are not used:
    the teacher's ten logits per image carry more than one label, and the augmentations make
    new images the teacher labels for free. As the ``refine`` step of
    :func:`layer_principal_projection` with ``teacher`` the *deployed* network, it gives back
    what the projection cost on benign inputs; the teacher's logits on benign images carry
    part of a backdoor's vote too, so the backdoor comes back the longer it runs.

    Args:
        model: a model :func:`network` knows.
        params: the student's starting params (e.g. a projected network).
        x_benign: benign images ``(N, H, W, C)``.
        y_benign: ignored (the ``refine(params, x, y)`` signature).
        teacher: the teacher's params (same structure; held fixed).
        steps, learning_rate, batch_size: Adam steps, peak rate, images per step.
        hflip, crop: augmentations (CIFAR-10: ``True``, 4).
        stamps: optional ``(masks, patterns)``, ``(S, H, W, 1)`` and ``(S, H, W, C)``, or
            ``(masks, patterns, offsets)`` with additive ``offsets`` ``(S, H, W, C)``: each
            batch is also stamped, ``(1 - m_s) a(x) + m_s p_s + d_s``, and every stamped image is
            pulled to the teacher's logits on the clean ``a(x)`` (the loss adds their mean
            squared gap, times ``stamp_weight``): a trigger's shortcut is unlearned without
            labels (:func:`jaxpurify.trigger_inversion.unlearn_consistent`).
        stamp_weight: the weight of the stamped term against the clean one (finite, >= 0;
            ignored without ``stamps``), or one weight per stamp, ``(S,)``: the stamped term
            is then ``mean_s w_s gap_s`` (a scalar ``w`` is every ``w_s = w``).
        key: PRNG key of the batches and augmentations (default ``PRNGKey(0)``).

    Returns:
        ``(params, DefenseInfo)``; ``details`` holds ``steps`` and ``logit_mse`` (the mean
        squared logit difference on the un-augmented benign images, before and after,
        evaluated 1024 images at a time).

    Raises:
        ValueError: no benign images, ``steps < 1``, a bad ``batch_size`` or ``crop``, a
            teacher whose structure or shapes differ from ``params``, non-finite logits before
            distilling (NaN/Inf params) or after (diverged).
    """
    t0 = time.perf_counter()
    if x_benign is None or len(x_benign) == 0:
        raise ValueError("distill needs benign images (x with at least one example)")
    x = jnp.asarray(x_benign)
    n = x.shape[0]
    if not (isinstance(steps, int | np.integer) and steps >= 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 1 <= batch_size or crop < 0:
        raise ValueError(f"batch_size must be >= 1 and crop >= 0, got {batch_size}, {crop}")
    weights = np.asarray(stamp_weight, np.float64)
    if weights.ndim > 1 or not (np.all(np.isfinite(weights)) and np.all(weights >= 0)):
        raise ValueError(f"stamp_weight must be finite and >= 0 (a number, or one per stamp), "
                         f"got {stamp_weight!r}")
    p = _unwrap(params)
    t = _same_network(_unwrap(teacher), p)
    apply = network(model).apply
    tx = ("adam-cosine", float(learning_rate), int(steps))
    config = (apply, tx, int(min(batch_size, n)), bool(hflip), int(crop))
    before = _logit_mse(apply, p, t, x)
    if not np.isfinite(before):
        raise ValueError("the student's or the teacher's logits on the benign images are not "
                         "finite: check both params for NaN/Inf before distilling")
    state = _init_state(tx, p)
    key = jax.random.PRNGKey(0) if key is None else key
    if stamps is not None:  # the weight travels as an array: a new weight, no new compile
        stamps = _stamp_arrays(stamps, x)
        if weights.ndim == 1 and weights.shape != (stamps[0].shape[0],):
            raise ValueError(f"stamp_weight has {weights.shape[0]} weights for "
                             f"{stamps[0].shape[0]} stamps: give one per stamp or one number")
        stamps = (*stamps, jnp.asarray(weights, x.dtype))
    for k in jax.random.split(key, int(steps)):
        p, state = _distill_step(config, p, state, t, x, k, stamps)
    after = _logit_mse(apply, p, t, x)
    if not np.isfinite(after):
        raise ValueError(f"distillation diverged (non-finite logits after {steps} steps at "
                         f"learning_rate={learning_rate:g}): lower the learning rate")
    return jax.block_until_ready(p), DefenseInfo("distill", time.perf_counter() - t0, {
        "steps": int(steps), "logit_mse": (before, after)})


def _same_network(teacher, params):
    """``teacher``, checked to be params of the same network as ``params``: the same pytree
    structure and leaf shapes (a distillation's teacher, :func:`distill`).

    Raises:
        ValueError: another structure or another shape.
    """
    leaves = jax.tree_util.tree_leaves
    if (jax.tree_util.tree_structure(teacher) != jax.tree_util.tree_structure(params)
            or [jnp.shape(a) for a in leaves(teacher)] != [jnp.shape(a) for a in
                                                            leaves(params)]):
        raise ValueError("teacher must have the structure and shapes of params (the same "
                         "network's params: pass the deployed or projected network's)")
    return teacher


def _stamp_arrays(stamps, x):
    """``(masks, patterns, offsets)`` of ``stamps`` (zero offsets when only masks and patterns
    are given), checked against the images ``x``."""
    if len(stamps) not in (2, 3):
        raise ValueError(f"stamps must be (masks, patterns) or (masks, patterns, offsets), got "
                         f"{len(stamps)} arrays")
    masks, patterns = jnp.asarray(stamps[0], x.dtype), jnp.asarray(stamps[1], x.dtype)
    count, image = masks.shape[0], x.shape[1:]
    offsets = (jnp.zeros((count,) + image, x.dtype) if len(stamps) == 2
               else jnp.asarray(stamps[2], x.dtype))
    if (masks.shape != (count,) + image[:2] + (1,) or patterns.shape != (count,) + image
            or offsets.shape != (count,) + image):
        raise ValueError(f"stamps for images {image} must be masks (S, {image[0]}, {image[1]}, "
                         f"1), patterns and offsets (S, {', '.join(map(str, image))}); got "
                         f"{masks.shape}, {patterns.shape}, {offsets.shape}")
    return masks, patterns, offsets


def _squared_gaps(apply, params, x, target_logits):
    """``(f_q(x) - target)^2`` per image and logit: the terms of the distillation loss."""
    return (apply(params, x) - target_logits) ** 2


def _logit_mse(apply, params, teacher, x, *, batch_size: int = 1024) -> float:
    """``mean (f_q(x) - f_T(x))^2`` over all of ``x``, ``batch_size`` images at a time."""
    total, count = 0.0, 0
    for i in range(0, int(x.shape[0]), batch_size):
        s, c = _squared_gap_sum(apply, params, teacher, x[i:i + batch_size])
        total, count = total + float(s), count + int(c)
    return total / count


@functools.partial(jax.jit, static_argnums=0)
def _squared_gap_sum(apply, params, teacher, x):
    """The sum and count of :func:`_squared_gaps` on ``x`` against the teacher (jitted with
    the arrays as arguments: closed over, XLA would constant-fold the teacher's forward pass
    at compile time)."""
    gaps = _squared_gaps(apply, params, x, apply(teacher, x))
    return jnp.sum(gaps), gaps.size


@functools.partial(jax.jit, static_argnums=0)
def _distill_step(config, params, state, teacher, x, key, stamps=None):
    """One Adam step of :func:`distill` (a Python loop over it: see :func:`train_masked`)."""
    from jaxpurify.multilayer import _augment

    apply, tx, batch_size, hflip, crop = config
    k_batch, k_flip, k_crop = jax.random.split(key, 3)
    xb = x[jax.random.choice(k_batch, x.shape[0], (batch_size,), replace=False)]
    xb = _augment(k_flip, k_crop, xb, hflip, crop)
    target = apply(teacher, xb)

    def loss(q):
        clean = jnp.mean(_squared_gaps(apply, q, xb, target))
        if stamps is None:
            return clean
        masks, patterns, offsets, weight = stamps
        xs = ((1 - masks[:, None]) * xb[None] + masks[:, None] * patterns[:, None]
              + offsets[:, None])
        logits = apply(q, xs.reshape((-1,) + xb.shape[1:]))
        gaps = (logits.reshape((masks.shape[0],) + target.shape) - target) ** 2
        if weight.ndim == 0:  # one weight: the mean over every stamp, as it always was
            return clean + weight * jnp.mean(gaps)
        return clean + jnp.mean(weight[:, None, None] * gaps)

    g = jax.grad(loss)(params)
    u, state = _make_tx(tx).update(g, state, params)
    return optax.apply_updates(params, u), state


# --------------------------------------------------------------------------- fine-pruning


def channel_activations(model, params, x, *, batch_size: int = 1024) -> np.ndarray:
    """Mean post-ReLU activation of each channel of the last conv layer over ``x``."""
    net = network(model)
    fn = jax.jit(net.channels)
    p = _unwrap(params)
    acts = [np.asarray(fn(p, x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
    return np.concatenate(acts).mean(axis=0)


def prune_channels(params, layer: str, channels, *, keep_bias: bool = False):
    """Params with output ``channels`` of ``layer`` removed: kernel zeroed, and bias zeroed
    unless ``keep_bias`` (ANP's convention, see the module docstring)."""
    p = dict(_unwrap(params))
    conv = dict(p[layer])
    keep = np.ones(conv["kernel"].shape[-1], bool)
    keep[np.asarray(list(channels), int)] = False
    keep = jnp.asarray(keep)
    conv["kernel"] = conv["kernel"] * keep.astype(conv["kernel"].dtype)
    if "bias" in conv and not keep_bias:
        conv["bias"] = conv["bias"] * keep.astype(conv["bias"].dtype)
    p[layer] = conv
    return p


def _split_benign(x, y, val_fraction: float, key):
    n = len(x)
    n_val = int(max(1, round(val_fraction * n)))
    if n_val >= n:
        return (x, y), (x, y)  # a single example: nothing to hold out
    perm = np.asarray(jax.random.permutation(key, n))
    val, tr = perm[:n_val], perm[n_val:]
    return (x[tr], y[tr]), (x[val], y[val])


def fine_prune(model, params, x_benign, y_benign, *, max_drop: float = 0.04,
               relative_drop: bool = False, prune_fraction: float | None = None,
               val_fraction: float = 0.2, epochs: int = 10, learning_rate: float = 0.01,
               momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 128,
               schedule: str = "constant", hflip: bool = False, crop: int = 0, key=None):
    r"""Fine-pruning: prune dormant channels while held-out benign accuracy holds, fine-tune.

    The benign budget is split into a held-out part (``val_fraction``, at least one image)
    for the stopping rule and the rest for the activation ranking and the fine-tuning.
    Channels of the last conv layer are pruned in increasing order of mean activation, one
    at a time or, with ``prune_fraction``, :math:`\lceil \text{prune\_fraction} \cdot C
    \rceil` of the ``C`` channels at a time. Pruning stops before the first step whose
    held-out accuracy :math:`a` falls below the unpruned network's :math:`a_0` by more than
    ``max_drop``: :math:`a < a_0 - \text{max\_drop}`, or with ``relative_drop``
    :math:`a < (1 - \text{max\_drop})\, a_0` (never all channels). The pruned network is
    then fine-tuned by the :func:`fine_tune` recipe given (``epochs`` ... ``crop``) with the
    pruned channels frozen at zero.

    The defaults are the fine-pruning paper's rule (one channel at a time, 4 points) with the
    :func:`fine_tune` default. :data:`BACKDOORBENCH_FP` is BackdoorBench's: 1 % of the
    channels per step, stop at a 10 % relative drop, then :data:`BACKDOORBENCH_FT`. (It
    measures the drop on the clean *test* set; here, as for every defense, on held-out
    benign images. It prunes the last linear layer's inputs, which on its ResNets are the
    last conv layer's pooled channels, as here.)

    Args:
        model, params: the model and its deployed params.
        x_benign, y_benign: the benign budget.
        max_drop: the largest held-out accuracy drop pruning may cause (a fraction, or a
            fraction of ``a_0`` with ``relative_drop``).
        relative_drop: measure the drop relative to the unpruned accuracy.
        prune_fraction: channels pruned per step, as a fraction of the layer's (rounded up);
            ``None``: one at a time.
        val_fraction: share of the budget held out for the stopping rule.
        epochs, learning_rate, momentum, weight_decay, batch_size, schedule, hflip, crop: the
            fine-tuning recipe, as in :func:`fine_tune`.
        key: PRNG key of the split, the batch order and the augmentations.

    Returns:
        ``(params, DefenseInfo)``; ``details["pruned"]`` lists the removed channels (in the
        order pruned), with ``num_pruned``, ``channels``, ``val_size``,
        ``val_acc_unpruned``, ``val_acc_pruned`` and ``ft_steps``.
    """
    t0 = time.perf_counter()
    x, y = _check_data(x_benign, y_benign)
    if prune_fraction is not None and not 0.0 < prune_fraction <= 1.0:
        raise ValueError(f"prune_fraction must be in (0, 1] or None, got {prune_fraction}")
    key = jax.random.PRNGKey(0) if key is None else key
    k_split, k_ft = jax.random.split(key)
    (x_tr, y_tr), (x_val, y_val) = _split_benign(x, y, val_fraction, k_split)
    net = network(model)
    p = _unwrap(params)
    order = [int(j) for j in np.argsort(channel_activations(model, p, x_tr), kind="stable")]
    step = 1 if prune_fraction is None else int(np.ceil(prune_fraction * len(order)))
    base = accuracy(model, p, x_val, y_val)
    floor = base * (1.0 - max_drop) if relative_drop else base - max_drop
    pruned: list[int] = []
    acc = base
    for n in range(step, len(order), step):
        trial = accuracy(model, prune_channels(p, net.last_conv, order[:n]), x_val, y_val)
        if trial < floor:
            break
        pruned, acc = order[:n], trial
    p = prune_channels(p, net.last_conv, pruned)
    keep = np.ones(p[net.last_conv]["kernel"].shape[-1], bool)
    keep[pruned] = False
    mask = jax.tree_util.tree_map(lambda _: True, p)
    mask[net.last_conv] = {k: jnp.broadcast_to(jnp.asarray(keep), v.shape)
                           for k, v in p[net.last_conv].items()}
    p, steps = _fine_tune_apply(net.apply, p, x_tr, y_tr, epochs=epochs,
                                learning_rate=learning_rate, momentum=momentum,
                                weight_decay=weight_decay, batch_size=batch_size, key=k_ft,
                                update_mask=mask, schedule=schedule, hflip=hflip, crop=crop)
    return p, DefenseInfo("fp", time.perf_counter() - t0, {
        "pruned": pruned, "num_pruned": len(pruned), "channels": int(keep.size),
        "val_size": int(len(x_val)), "val_acc_unpruned": base, "val_acc_pruned": acc,
        "ft_steps": steps})


# --------------------------------------------------------------------------- ANP


def _anp_params(p, layers, mask, noise_w, noise_b):
    out = dict(p)
    for name in layers:
        conv = dict(p[name])
        conv["kernel"] = conv["kernel"] * (mask[name] + noise_w[name])
        if "bias" in conv:
            conv["bias"] = conv["bias"] * (1.0 + noise_b[name])
        out[name] = conv
    return out


def anp(model, params, x_benign, y_benign, *, eps: float = 0.4, alpha: float = 0.2,
        threshold: float = 0.2, iterations: int = 2000, batch_size: int = 128,
        learning_rate: float = 0.2, momentum: float = 0.9, key=None):
    """Adversarial Neuron Pruning of the conv channels (see the module docstring).

    ``details["mask"]`` holds the optimized mask values per layer and ``details["pruned"]``
    the channels with mask below ``threshold``.
    """
    t0 = time.perf_counter()
    x, y = _check_data(x_benign, y_benign)
    key = jax.random.PRNGKey(0) if key is None else key
    net = network(model)
    p = _unwrap(params)
    layers = net.conv_layers

    mask = _anp_masks(net.apply, layers, float(eps), float(alpha), float(learning_rate),
                      float(momentum), int(iterations), int(batch_size), p, x, y, key)
    mask = {name: np.asarray(v) for name, v in mask.items()}
    pruned = {name: [int(i) for i in np.flatnonzero(v < threshold)] for name, v in mask.items()}
    out = p
    for name in layers:
        out = prune_channels(out, name, pruned[name], keep_bias=True)
    return out, DefenseInfo("anp", time.perf_counter() - t0, {
        "mask": {k: v.tolist() for k, v in mask.items()}, "pruned": pruned,
        "num_pruned": int(sum(len(v) for v in pruned.values())),
        "channels": int(sum(v.size for v in mask.values()))})


def anp_prune(model, params, mask, x_benign, y_benign, *, max_drop: float = 0.04,
              pruning_max: float = 0.9, step: float = 0.05):
    """ANP's mask ranking with a stopping rule on benign accuracy instead of the fixed threshold.

    The reference prunes every channel with mask below 0.2, a value chosen for ResNet-18's
    thousands of BatchNorm neurons; on a small network it can remove half of the channels.
    Here the threshold steps through ``0, step, ..., pruning_max`` (the sweep of the reference
    ``prune_neuron_cifar.py --pruning-by threshold``), pruning every channel with
    ``mask <= threshold``, and stops before the first threshold whose accuracy on the benign
    images falls more than ``max_drop`` below the unpruned network's (fine-pruning's 4-point
    rule). The reference reports its sweep on the test set (the paper prunes at 0.2;
    BackdoorBench keeps the lowest test ASR within 10% of the test ACC); this rule looks at
    benign data only. The benign images are those the mask was optimized on (the whole budget,
    as in :func:`anp`), so the accuracy it sees is optimistic.

    Args:
        model: the model, as for :func:`anp`.
        params: the deployed params.
        mask: ``{layer: (channels,)}`` mask values, e.g. ``anp(...)[1].details["mask"]``.
        x_benign, y_benign: the benign budget.
        max_drop: largest benign-accuracy drop allowed (a fraction).
        pruning_max, step: the threshold sweep.

    Returns:
        ``(params, DefenseInfo)``; ``details["threshold"]`` is the chosen threshold (``None``
        when even ``mask <= 0`` costs more than ``max_drop``) and ``details["pruned"]`` the
        removed channels per layer.
    """
    t0 = time.perf_counter()
    x, y = _check_data(x_benign, y_benign)
    net = network(model)
    p = _unwrap(params)
    values = {name: np.asarray(mask[name]) for name in net.conv_layers}
    base = accuracy(model, p, x, y)
    chosen = (None, p, base, {name: [] for name in values})
    for threshold in np.arange(0.0, pruning_max + step / 2, step):
        pruned = {name: [int(i) for i in np.flatnonzero(v <= threshold)]
                  for name, v in values.items()}
        if chosen[0] is not None and pruned == chosen[3]:  # no new channel: same network
            chosen = (float(round(threshold, 6)), *chosen[1:])
            continue
        q = p
        for name, channels in pruned.items():
            q = prune_channels(q, name, channels, keep_bias=True)
        acc = accuracy(model, q, x, y)
        if acc < base - max_drop:
            break
        chosen = (float(round(threshold, 6)), q, acc, pruned)
    threshold, q, acc, pruned = chosen
    return q, DefenseInfo("anp", time.perf_counter() - t0, {
        "threshold": threshold, "pruned": pruned,
        "num_pruned": int(sum(len(v) for v in pruned.values())),
        "channels": int(sum(v.size for v in values.values())),
        "benign_acc_unpruned": base, "benign_acc_pruned": acc})


def _anp_masks(apply_fn, layers, eps, alpha, learning_rate, momentum, iterations, batch_size,
               p, x, y, key):
    """The ANP mask after ``iterations`` steps (a Python loop over one jitted step: see
    :func:`train_masked` for why not a ``lax.scan``)."""
    config = (apply_fn, layers, eps, alpha, learning_rate, momentum, batch_size)
    dtype = p[layers[0]]["kernel"].dtype
    mask = {name: jnp.ones((p[name]["kernel"].shape[-1],), dtype) for name in layers}
    state = optax.sgd(learning_rate, momentum=momentum).init(mask)
    keys = jax.random.split(key, iterations)
    for t in range(iterations):
        mask, state = _anp_step(config, mask, state, p, x, y, keys, t)
    return mask


@functools.partial(jax.jit, static_argnums=0)
def _anp_step(config, mask, state, p, x, y, keys, t):
    """One ANP step: a signed-gradient perturbation of the neurons, then SGD on the mask."""
    apply_fn, layers, eps, alpha, learning_rate, momentum, batch_size = config
    dtype = mask[layers[0]].dtype

    def loss(mask, nw, nb, idx):
        return _ce(apply_fn(_anp_params(p, layers, mask, nw, nb), x[idx]), y[idx])

    def uniform(k):
        ks = jax.random.split(k, len(layers))
        return {name: jax.random.uniform(kk, mask[name].shape, dtype, -eps, eps)
                for name, kk in zip(layers, ks, strict=True)}

    zero = jax.tree_util.tree_map(jnp.zeros_like, mask)
    k_idx, k_w, k_b = jax.random.split(keys[t], 3)
    idx = jax.random.randint(k_idx, (batch_size,), 0, x.shape[0])  # with replacement
    nw, nb = uniform(k_w), uniform(k_b)
    # one signed gradient-ascent step on the perturbation (lr eps / steps, steps = 1)
    gw, gb = jax.grad(loss, argnums=(1, 2))(mask, nw, nb, idx)
    nw = jax.tree_util.tree_map(lambda a, g: a + eps * jnp.sign(g), nw, gw)
    nb = jax.tree_util.tree_map(lambda a, g: a + eps * jnp.sign(g), nb, gb)

    def objective(m):
        return alpha * loss(m, zero, zero, idx) + (1 - alpha) * loss(m, nw, nb, idx)

    tx = optax.sgd(learning_rate, momentum=momentum)
    u, state = tx.update(jax.grad(objective)(mask), state, mask)
    mask = jax.tree_util.tree_map(lambda a: jnp.clip(a, 0.0, 1.0), optax.apply_updates(mask, u))
    return mask, state


# --------------------------------------------------------------------------- jaxpurify


class _PutRows(NamedTuple):
    """``(params, rows) -> params`` for one designed layer: ``rows`` reshaped to the layer's
    vectors and put back by ``put`` (into ``params[name]`` when ``name`` is set). A hashable
    value, so a jitted step that closes over it is compiled once per model and shape."""

    put: Callable
    shape: tuple
    name: str | None = None

    def __call__(self, q, rows):
        v = rows.reshape(self.shape)
        return self.put(q, v) if self.name is None else {**q, self.name: self.put(q[self.name], v)}


def _designed_layers(model, p):
    """``{name: (A, vectors, setter)}`` for every designed layer: ``vectors`` has one row per
    recovery problem (a unit, or the whole layer when it is coded as a whole: the rows of
    ``A`` say which) and ``setter(params, vectors)`` (a :class:`_PutRows`) puts such rows
    back."""
    from jaxpurify import subspaces as S
    from jaxpurify.models import DesignedOneHiddenLayerCNN

    if isinstance(model, DesignedOneHiddenLayerCNN):
        a = model.designs(p["conv"]["kernel"].dtype)
        units = {"conv": (S.filter_vectors(p), S.with_filter_vectors, None),
                 "readout": (S.readout_vectors(p), S.with_readout_vectors, None)}
    elif hasattr(model, "layer_info") and hasattr(model, "designs"):
        from jaxpurify.multilayer import layer_vectors, with_layer_vectors

        a = model.designs(p[model.layer_info()[0].name]["kernel"].dtype)
        units = {i.name: (layer_vectors(p[i.name]), with_layer_vectors, i.name)
                 for i in model.layer_info() if i.designed}
    else:
        raise TypeError(f"the designed subspace needs a designed model "
                        f"(DesignedOneHiddenLayerCNN or a jaxpurify.multilayer.DesignedCNN); "
                        f"got {type(model).__name__}")
    return {name: (a[name], v.reshape(-1, a[name].shape[0]), _PutRows(put, v.shape, layer))
            for name, (v, put, layer) in units.items()}


def _recover_rows(a, v, *, rtol, method, tol, max_iters):
    """L1 recovery of the rows of ``v`` onto ``range(a)``, skipping rows already in it."""
    v = jnp.asarray(v)
    nonfinite = ~jnp.isfinite(v)
    v0 = jnp.where(nonfinite, 0.0, v)
    q, _ = jnp.linalg.qr(a.astype(v0.dtype))
    resid = v0 - (v0 @ q) @ q.T
    scale = jnp.max(jnp.abs(v0), axis=1)
    in_range = np.asarray((jnp.max(jnp.abs(resid), axis=1) <= rtol * scale)
                          & ~jnp.any(nonfinite, axis=1))
    flagged = np.flatnonzero(~in_range)
    out, corrupted = v, np.zeros(v.shape, bool)
    info = {"rows": int(v.shape[0]), "rows_off_subspace": int(flagged.size), "converged": True,
            "certified": True, "ambiguous_rows": 0, "max_row_fraction": 0.0}
    if flagged.size:
        # Solve a batch of the layer's full size (in-range rows replaced by copies of flagged
        # ones), so that every call on this layer reuses one compiled solver.
        rows = np.resize(flagged, v.shape[0])
        a = a.astype(v0.dtype)
        sol = l1_regression(a, v0[rows], method=method, tol=tol, max_iters=max_iters,
                            throw=False)
        f = flagged.size
        out = out.at[flagged].set(sol.x[:f] @ a.T)
        corrupted[flagged] = np.asarray(sol.corrupted)[:f] | np.asarray(nonfinite)[flagged]
        info["converged"] = bool(np.all(np.asarray(sol.converged)[:f]))
        # (see jaxpurify.purify: an edit consistent with range(A) is interpolated too)
        ambiguous = second_explanation(a, sol, method=method, tol=tol,
                                       max_iters=max_iters)[:f] > a.shape[1]
        info["ambiguous_rows"] = int(np.sum(ambiguous))
        fit = fit_count(a, v0[rows], sol, method=method, tol=tol, max_iters=max_iters)[:f]
        info["certified"] = bool(np.all(fit > a.shape[1]) and not ambiguous.any())
        info["max_row_fraction"] = float(corrupted.sum(axis=1).max() / v.shape[1])
    info["num_corrupted"] = int(corrupted.sum())
    info["ratio"] = a.shape[0] / a.shape[1]
    info["critical_fraction"] = float(critical_fraction(a.shape[0] / a.shape[1]))
    return out, corrupted, info


@full_precision
def recover_designed(model, params, *, rtol: float | None = None, method="admm",
                     tol: float | None = None, max_iters: int = 20_000):
    r"""Robust recovery of a designed network's deployed weights (no data).

    For each designed layer, every unit vector ``v`` (filter with bias, readout column, ...)
    is modelled as ``A theta + e`` with ``e`` sparse and recovered as ``A theta_hat``,
    ``theta_hat = argmin ||v - A theta||_1`` (:func:`jaxpurify.l1_regression`, one batched
    solve per layer), exactly what :func:`jaxpurify.purify.purify` (``subspace="designed"``)
    and :func:`jaxpurify.multilayer.purify_layers` compute. One difference: rows already in
    ``range(A)`` to rounding (least-squares residual ``<= rtol max|v|``, ``rtol = 1000 eps``)
    are left exactly as they are instead of being solved -- the L1 solution of such a row
    is the row itself, and the solver otherwise spends its whole iteration budget failing to
    certify a rounding-level optimum (an uncorrupted float32 layer of 64 filters took ~70 s).

    Returns:
        ``(params, report)`` with ``report[layer]`` a dict: rows, rows_off_subspace,
        num_corrupted, converged, certified (every solved row fits more entries than unknowns
        to rounding, :func:`jaxpurify.purify.exactly_fit`, and none is ambiguous:
        ``ambiguous_rows`` counts the rows whose judged-corrupted entries another vector of
        ``range(A)`` fits exactly, more than ``n`` of them; see
        :func:`jaxpurify.purify.second_explanation`), max_row_fraction (largest fraction of
        a row the solver judged corrupted: the true share where recovery is exact; on a row
        it fails on, typically ``1 - n/m`` (the L1 fit interpolates ``n`` of the ``m``
        entries and flags the rest), not the attacker's share), ratio and the Donoho-Tanner
        critical_fraction at that ratio.
    """
    p = dict(_unwrap(params))
    report = {}
    for name, (a, v, setter) in _designed_layers(model, p).items():
        r = 1e3 * float(jnp.finfo(v.dtype).eps) if rtol is None else rtol
        rec, corrupted, info = _recover_rows(a, v, rtol=r, method=method, tol=tol,
                                             max_iters=max_iters)
        p = setter(p, rec)
        report[name] = info
    return jax.block_until_ready(p), report


@functools.lru_cache(maxsize=32)
def _code_apply(model):
    return lambda c, xb: model.apply({"params": c}, xb)


def _codes(model, p):
    """Code params of recovered plain params (exact: every layer is in ``range(A)``)."""
    from jaxpurify.models import DesignedOneHiddenLayerCNN

    if isinstance(model, DesignedOneHiddenLayerCNN):
        from jaxpurify import subspaces as S

        a = model.designs(p["conv"]["kernel"].dtype)
        return {"conv_code": model.codes("conv", S.filter_vectors(p), a["conv"]),
                "readout_code": model.codes("readout", S.readout_vectors(p), a["readout"])}
    from jaxpurify.multilayer import layer_vectors

    a_all = model.designs(jax.tree_util.tree_leaves(p)[0].dtype)
    return {info.name: model.layer_codes(info, layer_vectors(p[info.name]), a_all[info.name])
            for info in model.layer_info()}


def jaxpurify_defense(model, params, x_benign=None, y_benign=None, *, fine_tune_codes=True,
                      epochs: int = 10, learning_rate: float = 0.01, momentum: float = 0.9,
                      weight_decay: float = 5e-4, batch_size: int = 128, key=None,
                      method="admm"):
    """Robust recovery in the designed subspace, then (optionally) fine-tuning of the codes.

    1. :func:`recover_designed`: every unit vector is projected back onto ``range(A)`` by
       L1 regression; sparse edits of the deployed weights are removed exactly, no data.
    2. With benign data and ``fine_tune_codes``: the codes of the recovered weights
       (``theta = A^+ v``, exact) are fine-tuned with the :func:`fine_tune` recipe in the
       designed model, then materialized. Fine-tuning the codes keeps the network in
       ``range(A)`` (recoverable again) and has fewer unknowns than the plain weights.

    Args:
        model: the designed model the network was trained as
            (:class:`~jaxpurify.models.DesignedOneHiddenLayerCNN` or a
            :class:`~jaxpurify.multilayer.DesignedCNN`).
        params: the deployed (materialized, possibly edited) plain params.

    Returns:
        ``(plain params, DefenseInfo)``; ``details["recovery"]`` is the per-layer report.
    """
    t0 = time.perf_counter()
    p, report = recover_designed(model, params, method=method)
    details = {"recovery": report, "recovery_seconds": time.perf_counter() - t0,
               "certified": all(r["converged"] and r["certified"] for r in report.values())}
    if x_benign is not None and fine_tune_codes and len(x_benign) > 0:
        x, y = _check_data(x_benign, y_benign)
        codes = _codes(model, p)
        codes, steps = _fine_tune_apply(_code_apply(model), codes, x, y, epochs=epochs,
                                        learning_rate=learning_rate, momentum=momentum,
                                        weight_decay=weight_decay, batch_size=batch_size,
                                        key=key)
        p = model.materialize(codes)
        details["ft_steps"] = steps
    jax.block_until_ready(p)
    return p, DefenseInfo("jaxpurify", time.perf_counter() - t0, details)


def _affine(q, h):
    return h @ q["kernel"] + q["bias"] if "bias" in q else h @ q["kernel"]


def refit_readout(model, params, x_benign, y_benign, *, init_params, subspace: str = "plain",
                  steps: int = 300, learning_rate: float = 0.1, momentum: float = 0.9,
                  batch_size: int = 128, key=None):
    r"""The benign-readout option: re-estimate the output layer from its init on benign data.

    (S)GD with momentum on the cross-entropy moves the readout only along the hidden
    features of the images it is trained on,
    ``beta - beta_0 = sum_s h(x_s) c_s^T`` (the gradient is ``H^T (softmax - onehot)``), the
    output layer's row-space subspace. The readout is reset to its known init ``beta_0`` and
    trained again, every other layer frozen, on the benign budget only (SGD, ``steps``
    minibatches, no weight decay, so the result stays in
    ``beta_0 + span{h(x) : x benign}``): the part of the deployed readout that only triggered
    training images taught (the target-class vote of trigger-detecting units) is not
    relearned. It removes a backdoor that lives in the readout and not one built into the
    hidden features, and it costs accuracy when the budget has few labels per readout entry.
    Measured on poisoned MNIST networks, the features do carry the trigger: a readout re-fit
    on *all* clean training labels votes for the target on 24-65% of triggered images, so
    the low ASR at small budgets comes with an under-fit readout (see ``docs/backdoors.md``).

    With ``subspace="designed"`` (a designed model) the readout stays in ``range(A)``: every
    output unit's ``[beta_c; b_c] = A theta_c`` and only the codes are re-estimated, from
    their init ``theta_0 = A^+ v_0``, the rest as above (the gradient in the codes is ``A^T``
    times the plain one, so the readout ends in ``beta_0 + A A^T span{h(x) : x benign}``).
    The network stays a valid designed network, and the readout has ``code_dim`` unknowns per
    unit instead of ``fan_in + 1``: the benign labels determine it well, so it regains the
    accuracy the plain refit loses, and with it whatever target vote the features carry.

    Args:
        model: a one-hidden-layer CNN (plain or designed) or a multi-layer designed CNN.
        params: the deployed plain params.
        init_params: the plain params at the known initialization (only the readout's are
            used), e.g. ``model.materialize(codes_at_init)``.
        subspace: ``"plain"`` (every readout entry re-estimated) or ``"designed"`` (the
            readout's codes; needs a designed model).

    Returns:
        ``(plain params, DefenseInfo)`` with ``details["layer"]``, the re-estimated layer, and
        ``details["unknowns"]``, the number of re-estimated parameters.
    """
    if subspace not in ("plain", "designed"):
        raise ValueError(f"subspace must be 'plain' or 'designed', got {subspace!r}")
    t0 = time.perf_counter()
    x, y = _check_data(x_benign, y_benign)
    net = network(model)
    layer = net.readout
    p, p0 = dict(_unwrap(params)), _unwrap(init_params)
    if layer not in p0 or (jax.tree_util.tree_structure(p0[layer])
                           != jax.tree_util.tree_structure(p[layer])):
        raise ValueError(f"init_params must hold the initial {layer!r} layer with the deployed "
                         "params' structure (plain params, e.g. model.materialize(init_codes))")
    # the other layers are frozen: their features are computed once, and only the readout,
    # a function of them, is trained (the same minibatch SGD as training the whole network
    # with everything else masked)
    h = jnp.concatenate([net.readout_inputs(p, x[i:i + 1024])
                         for i in range(0, x.shape[0], 1024)])
    key = jax.random.PRNGKey(0) if key is None else key
    sgd = ("sgd", float(learning_rate), float(momentum), 0.0)
    if subspace == "plain":
        q = train_masked(_affine, jax.tree_util.tree_map(jnp.asarray, p0[layer]), h, y,
                         steps=steps, batch_size=batch_size, key=key, optimizer=sgd)
        p[layer] = jax.block_until_ready(q)
        unknowns = sum(v.size for v in jax.tree_util.tree_leaves(q))
    else:
        p, unknowns = _refit_designed_readout(model, p, p0, layer, h, y, steps=steps,
                                              batch_size=batch_size, key=key, optimizer=sgd)
    variant = "benign-readout" if subspace == "plain" else "designed-readout"
    return p, DefenseInfo("jaxpurify", time.perf_counter() - t0, {
        "variant": variant, "layer": layer, "steps": steps, "unknowns": int(unknowns)})


class _CodedReadout(NamedTuple):
    """``(params, h) -> logits`` of the readout ``A theta`` on frozen features ``h``, with
    ``params = {"theta", "a", "frozen"}`` (only ``theta`` trained). A hashable value, so the
    jitted training step is compiled once per model and shape, not once per call."""

    setter: _PutRows
    layer: str

    def __call__(self, params, h):
        a, frozen = jax.lax.stop_gradient((params["a"], params["frozen"]))
        return _affine(self.setter(frozen, (a @ params["theta"]).T)[self.layer], h)


@full_precision
def _refit_designed_readout(model, p, p0, layer, h, y, **train):
    """The readout's codes trained from their init on frozen features ``h`` (full precision:
    the readout ``A theta`` must stay in ``range(A)`` on GPUs too)."""
    designed = _designed_layers(model, p)  # raises for a model without designs
    if layer not in designed:
        raise ValueError(f"subspace='designed' needs a designed {layer!r} layer; "
                         f"{type(model).__name__} designs {sorted(designed)}")
    a, _, setter = designed[layer]
    theta0 = jnp.linalg.lstsq(a, _designed_layers(model, dict(p0))[layer][1].T)[0]
    frozen = {layer: p[layer]}  # all the setter reads
    start = {"theta": theta0, "a": a, "frozen": frozen}
    trained = {"theta": True, "a": False,
               "frozen": jax.tree_util.tree_map(lambda _: False, frozen)}
    theta = train_masked(_CodedReadout(setter, layer), start, h, y, update_mask=trained,
                         **train)["theta"]
    return jax.block_until_ready(setter(p, (a @ theta).T)), int(theta.size)


def row_space_defense(model, params, x_benign, *, init_params, method="admm",
                      robust: bool = True, max_iters: int = 20_000):
    r"""The benign row-space option for data poisoning (one-hidden-layer CNNs only).

    (S)GD or momentum from a known init ``w_0`` moves each filter only along the augmented
    training patches ``[P_i x; 1]``. Filters are modelled as
    ``w_0 + span{[P_i x; 1] : x benign} + e`` and recovered onto that span: whatever training
    added outside the span of the benign patches (a trigger's pixels, which benign images
    never show, among it) is removed. ``robust=True`` treats ``e`` as sparse and solves by L1
    (:func:`jaxpurify.purify.purify`, ``subspace="row_space"``, filters only); ``robust=False``
    projects orthogonally, :math:`w_0 + QQ^\top(w - w_0)` with ``Q`` an orthonormal basis of the
    benign patches (``e`` is then the part orthogonal to them; the rest of the clean
    training set's updates is dense, not sparse, so this is not recovery but a projection).
    Exact only for a network trained by (S)GD on the benign images themselves; with a budget
    it is a defense that needs fewer benign patches than filter entries.

    Raises:
        ValueError: the benign patches span every filter direction (no redundancy: nothing
            can be removed), e.g. with more patches than filter entries.
    """
    from jaxpurify import subspaces as S
    from jaxpurify.models import DesignedOneHiddenLayerCNN
    from jaxpurify.purify import purify

    t0 = time.perf_counter()
    plain = model.plain_model() if isinstance(model, DesignedOneHiddenLayerCNN) else model
    p, p0 = _unwrap(params), _unwrap(init_params)
    variant = "benign-row-space" if robust else "benign-projection"
    if not robust:
        problem = S.filter_row_space(plain, p0, jnp.asarray(x_benign))  # raises if full
        y = S.filter_vectors(p) - problem.offset
        kept = (y @ problem.design) @ problem.design.T  # the basis is orthonormal
        out = jax.block_until_ready(S.with_filter_vectors(dict(p), problem.offset + kept))
        return out, DefenseInfo("jaxpurify", time.perf_counter() - t0, {
            "variant": variant, "removed_energy": float(
                jnp.linalg.norm(y - kept) / jnp.maximum(jnp.linalg.norm(y), 1e-30))})
    out, report = purify(plain, p, init_params=p0, inputs=jnp.asarray(x_benign),
                         subspace="row_space", layers=("conv",), method=method,
                         max_iters=max_iters)
    r = report.layers["conv"]
    return out, DefenseInfo("jaxpurify", time.perf_counter() - t0, {
        "variant": variant, "num_corrupted": r.num_corrupted,
        "fraction": r.fraction, "certified": bool(r.certified and r.converged)})


@full_precision
def principal_projection(model, params, x_benign, y_benign, *, init_params,
                         max_drop: float = 0.01, ranks=None, folds: int = 5,
                         refine: Callable | None = None):
    r"""Filter updates projected onto the benign patches' leading principal directions.

    With ``V_r`` the top ``r`` right singular vectors of the augmented benign patches
    ``[P_i x; 1]`` (one-hidden-layer CNNs), every filter becomes

    .. math:: \hat w_j = w_{0,j} + V_r V_r^\top (w_j - w_{0,j}).

    At ``r`` = the patches' rank this is :func:`row_space_defense`'s projection (``robust=False``)
    and the network's outputs on the benign images are unchanged (their patches lie in the
    span). Smaller ``r`` keeps only the directions along which benign images vary most: the
    clean training signal concentrates there, while a trigger that benign images do not
    carry (a noise pattern blended over the whole image) spreads over the trailing ones, even
    where the full benign span contains part of it. Unlike the full-span projection it also
    applies when the benign patches span every filter direction.

    The rank is chosen on the benign budget alone, by ``folds``-fold cross-validation: image
    ``i`` is held out in fold ``i mod folds``; each fold projects onto the leading directions
    of the *other* images' patches (at most their rank) and counts the held-out images it
    classifies correctly. ``r`` is the smallest rank on the grid whose pooled held-out
    accuracy is at least the undefended network's accuracy on the budget minus ``max_drop``;
    if none qualifies, the full rank (the span projection). The chosen ``r`` is then applied
    to the directions of all the benign images. Scoring the images that define ``V_r``
    (``folds=1``) is optimistic, the more so the closer ``r`` is to the number of images: a
    benign image's own residual outside ``V_r`` is smaller than an unseen one's.

    With ``refine`` (e.g. the FT recipe), every candidate is scored as it would be deployed,
    as in :func:`layer_principal_projection`: each fold projects, then calls
    ``refine(params, x, y)`` on its training images before counting the held-out ones, and
    the chosen projection is refined on the whole budget.

    Args:
        model: a one-hidden-layer CNN (plain or designed; the deployed params are plain).
        params: the deployed params.
        x_benign, y_benign: the benign budget.
        init_params: the known initialization ``w_0``.
        max_drop: largest benign-accuracy drop allowed (a fraction).
        ranks: the candidate ranks (default: ``1, 2, 4, ...`` below the patches' rank, then
            that rank).
        folds: cross-validation folds for choosing the rank (``1``: score the images that
            define the directions). Without ``refine`` every fold and candidate is built and
            scored in one ``vmap``.
        refine: optional ``refine(params, x, y) -> params`` applied after the projection, in
            every fold and at the end (a pure function of its arguments; needs
            ``folds >= 2``).

    Returns:
        ``(params, DefenseInfo)``; ``details`` holds ``rank`` (chosen), ``full_rank``,
        ``ranks``, ``folds``, ``benign_acc`` (pooled held-out accuracy per candidate),
        ``benign_acc_undefended``, ``qualified`` (whether any candidate met the rule),
        ``refined`` and ``removed_energy`` (``||w - w_hat|| / ||w - w_0||`` over all
        filters, before ``refine``).
    """
    from jaxpurify import subspaces as S
    from jaxpurify.models import DesignedOneHiddenLayerCNN, OneHiddenLayerCNN

    t0 = time.perf_counter()
    x, y = _check_data(x_benign, y_benign)
    _check_rule(max_drop, folds, len(y))
    _check_refine(refine, folds)
    plain = model.plain_model() if isinstance(model, DesignedOneHiddenLayerCNN) else model
    if not isinstance(plain, OneHiddenLayerCNN):
        raise TypeError("principal_projection needs a one-hidden-layer CNN (its filters move "
                        f"along the input patches); got {type(model).__name__}")
    p, p0 = _unwrap(params), _unwrap(init_params)
    w0 = S.filter_vectors(p0)
    update = S.filter_vectors(p) - w0
    patches = S.augmented_patches(plain, x).astype(update.dtype)
    basis = S.principal_row_basis(patches).T
    full = basis.shape[0]
    if ranks is None:
        ranks = [2 ** i for i in range(max(full - 1, 1).bit_length()) if 2 ** i < full] + [full]
    ranks = sorted({int(r) for r in ranks})
    if ranks[0] < 1 or ranks[-1] > full:
        raise ValueError(f"ranks must lie in [1, {full}] (the benign patches' rank), got "
                         f"{ranks}")
    if refine is None:
        correct = _held_out_correct(logits_fn(plain), p, w0, update, patches, x, y,
                                    jnp.asarray(ranks), folds)
    else:
        correct = _held_out_refined(plain, p, w0, update, patches, x, y, ranks, folds,
                                    refine)
    scores = np.asarray(correct) / len(y)
    base = accuracy(plain, p, x, y)
    chosen = next((i for i, a in enumerate(scores) if a >= base - max_drop), None)
    r = ranks[-1 if chosen is None else chosen]
    out = S.with_filter_vectors(p, w0 + (update @ basis[:r].T) @ basis[:r])
    kept = S.filter_vectors(out) - w0
    if refine is not None:
        out = refine(out, x, y)
    return jax.block_until_ready(out), DefenseInfo("jaxpurify", time.perf_counter() - t0, {
        "variant": "benign-principal", "rank": r, "full_rank": full, "ranks": ranks,
        "folds": folds, "benign_acc": [float(a) for a in scores],
        "benign_acc_undefended": base, "qualified": chosen is not None,
        "refined": refine is not None, "removed_energy": float(
            jnp.linalg.norm(update - kept) / jnp.maximum(jnp.linalg.norm(update), 1e-30))})


@functools.partial(jax.jit, static_argnums=(0, 8))
def _held_out_correct(apply, p, w0, update, patches, x, y, ranks, folds):
    """Per candidate rank, the benign images classified correctly when held out: fold ``f``
    (images ``i`` with ``i mod folds = f``) is scored by the projection onto the leading
    directions of the other folds' patches. Zeroing the held-out rows leaves the other
    rows' right singular vectors, so every fold is one SVD of the same shape (one ``vmap``).
    ``folds = 1`` scores every image under its own directions."""
    from jaxpurify import subspaces as S

    fold_of_image = jnp.arange(len(y)) % folds
    fold_of_row = jnp.repeat(fold_of_image, patches.shape[0] // len(y))

    def fold(f):
        held_out = fold_of_image == f
        rows = patches if folds == 1 else jnp.where((fold_of_row != f)[:, None], patches, 0)
        _, s, vt = jnp.linalg.svd(rows, full_matrices=False)
        rank = S.numerical_rank(s, rows.shape)
        coefficients = update @ vt.T

        def candidate(r):
            keep = jnp.arange(vt.shape[0]) < jnp.minimum(r, rank)
            q = S.with_filter_vectors(p, w0 + (coefficients * keep) @ vt)
            return jnp.sum((jnp.argmax(apply(q, x), axis=-1) == y) & held_out)

        return jax.vmap(candidate)(ranks)

    return jax.vmap(fold)(jnp.arange(folds)).sum(axis=0)


def _held_out_refined(plain, p, w0, update, patches, x, y, ranks, folds, refine):
    """:func:`_held_out_correct` with ``refine`` run on each fold's training images after
    each candidate projection (a Python loop: ``refine`` is any function)."""
    from jaxpurify import subspaces as S

    fold_of_image = np.arange(len(y)) % folds
    fold_of_row = np.repeat(fold_of_image, patches.shape[0] // len(y))
    correct = np.zeros(len(ranks), np.int64)
    for f in range(folds):
        held_out = fold_of_image == f
        basis = S.principal_row_basis(patches[fold_of_row != f]).T
        for c, r in enumerate(ranks):
            v = basis[:r]
            q = refine(S.with_filter_vectors(p, w0 + (update @ v.T) @ v), x[~held_out],
                       y[~held_out])
            correct[c] += np.sum(predict(plain, q, x[held_out]) == np.asarray(y[held_out]))
    return correct


#: Candidate shares of each layer's benign patch energy kept by
#: :func:`layer_principal_projection` (``1.0``: the full benign span of every layer).
LAYER_ENERGIES = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.0)


@full_precision
def layer_principal_projection(model, params, x_benign, y_benign, *, init_params,
                               max_drop: float = 0.01, energies=LAYER_ENERGIES,
                               folds: int = 5, layers=None, batch_size: int = 50,
                               refine: Callable | None = None):
    r"""Every layer's update projected onto its benign inputs' leading principal directions.

    The multi-layer form of :func:`principal_projection`, for a
    :class:`~jaxpurify.multilayer.DesignedCNN`. A unit of layer ``l`` with vector
    ``u = [w; b]`` (fan-in weights and bias, :func:`jaxpurify.multilayer.layer_vectors`) sees
    the augmented input patches ``q = [P_i h_{l-1}(x); 1]``. With
    :math:`G_l = \sum q q^\top = V_l \Lambda_l V_l^\top` over the benign images (features of
    the deployed network, :func:`jaxpurify.multilayer.patch_grams`) and :math:`V_{l,e}` the
    fewest leading eigenvectors holding a share ``e`` of :math:`\operatorname{tr} G_l`, every
    unit becomes

    .. math:: \hat u = u_0 + V_{l,e} V_{l,e}^\top (u - u_0).

    The unit's response to a benign patch changes by :math:`(u - u_0)^\top (I - V V^\top) q`,
    which only the trailing ``1 - e`` of the benign patch energy excites; what training added
    along directions that benign inputs hardly excite (a trigger's, if benign images do not
    carry it) goes back to the init. At ``e = 1`` (each layer's numerical rank) the network's
    outputs on the benign images themselves are unchanged, layer by layer. A dense layer after
    the convolutions sees every position separately, so a trigger at a place where benign
    images are blank (a corner patch on MNIST) is a direction of its own there.

    ``e`` is chosen on the benign budget alone, by ``folds``-fold cross-validation as in
    :func:`principal_projection`: image ``i`` is held out in fold ``i mod folds``, each fold
    projects onto the directions of the other images' Gram matrices (``G_l`` minus the
    fold's) and counts the held-out images it classifies correctly, and ``e`` is the smallest
    candidate whose pooled held-out accuracy is at least the undefended network's accuracy on
    the budget minus ``max_drop``; if none qualifies, ``e = 1``. The chosen ``e`` is then
    applied to the directions of all the benign images. Candidates are scored with one
    compiled function per fold (``lax.map`` over candidates, so memory stays that of one
    forward pass).

    With ``refine`` (e.g. fine-tuning on the benign images, the second half of fine-pruning),
    every candidate is scored as it would be deployed: each fold projects, then calls
    ``refine(params, x, y)`` on the fold's training images (the other folds) before counting
    the held-out ones, and the chosen projection is refined on the whole budget. Fine-tuning
    can restore the accuracy a small share costs, so a smaller share can qualify. Apart from
    weight decay, what SGD adds to a layer lies in the span of that layer's benign input
    patches (a unit's gradient is a sum of them), so directions that the projection removed
    and benign images do not excite come back only as far as the features change.

    Args:
        model: a :class:`~jaxpurify.multilayer.DesignedCNN` (its deployed params are plain).
        params: the deployed plain params ``{layer: {"kernel", "bias"}}``.
        x_benign, y_benign: the benign budget.
        init_params: the known initialization (plain params of the same shapes).
        max_drop: largest benign-accuracy drop allowed (a fraction).
        energies: candidate shares ``e`` in ``(0, 1]``, tried from the smallest.
        folds: cross-validation folds (``1``: score the images that define the directions).
        layers: the layers projected (default: all).
        batch_size: images per batch when accumulating the Gram matrices.
        refine: optional ``refine(params, x, y) -> params`` applied after the projection, in
            every fold and at the end (a pure function of its arguments).

    Returns:
        ``(params, DefenseInfo)``; ``details`` holds ``energy`` (chosen), ``energies``,
        ``ranks`` and ``full_ranks`` (per layer: directions kept, numerical rank of
        ``G_l``), ``dims`` (``fan_in + 1``), ``folds``, ``benign_acc`` (pooled held-out accuracy
        per candidate), ``benign_acc_undefended``, ``qualified``, ``refined`` and
        ``removed_energy`` (``||u - u_hat|| / ||u - u_0||`` over the projected layers, before
        ``refine``).

    Raises:
        TypeError: ``model`` is not a multi-layer designed CNN.
        ValueError: bad ``energies``, ``layers``, ``max_drop`` or ``folds``, or features that
            are not finite on the benign images.
    """
    from jaxpurify import multilayer as M

    t0 = time.perf_counter()
    x, y = _check_data(x_benign, y_benign)
    if not isinstance(model, M.DesignedCNN):
        raise TypeError("layer_principal_projection needs a jaxpurify.multilayer.DesignedCNN; "
                        f"got {type(model).__name__} (one-hidden-layer CNNs: "
                        "principal_projection)")
    _check_rule(max_drop, folds, len(y))
    _check_refine(refine, folds)
    energies = sorted({float(e) for e in energies})
    if not energies or energies[0] <= 0 or energies[-1] > 1:
        raise ValueError(f"energies must be shares in (0, 1], got {energies}")
    names = [i.name for i in model.layer_info()]
    layers = tuple(names if layers is None else layers)
    if not layers or set(layers) - set(names):
        raise ValueError(f"layers must name some of {names}; got {list(layers)}")
    p, p0 = _unwrap(params), _unwrap(init_params)
    M.check_plain(model, p)
    M.check_plain(model, p0)
    updates = {n: M.layer_vectors(p[n]) - M.layer_vectors(p0[n]) for n in layers}

    fold_of_image = np.arange(len(y)) % folds
    fold_grams = [M.patch_grams(model, p, x[fold_of_image == f], batch_size=batch_size)[0]
                  for f in range(folds)]
    total = {n: sum(g[n] for g in fold_grams) for n in layers}
    if not all(np.all(np.isfinite(total[n])) for n in layers):
        raise ValueError("the deployed network's features on the benign images are not "
                         "finite: check the params for NaN/Inf before purifying")
    apply = logits_fn(model)
    correct = np.zeros(len(energies), np.int64)
    for f in range(folds):
        held_out = fold_of_image == f
        grams = total if folds == 1 else {n: total[n] - fold_grams[f][n] for n in layers}
        bases, ranks = _energy_bases(grams, energies, updates)
        if refine is None:
            correct += np.asarray(_count_correct(apply, p, p0, bases, ranks,
                                                 jnp.asarray(x[held_out]),
                                                 jnp.asarray(y[held_out])))
            continue
        for c in range(len(energies)):
            q = refine(_project_layers(p, p0, bases, {n: r[c] for n, r in ranks.items()}),
                       x[~held_out], y[~held_out])
            correct[c] += np.sum(predict(model, q, x[held_out]) == np.asarray(y[held_out]))
    scores = correct / len(y)
    base = accuracy(model, p, x, y)
    chosen = next((i for i, a in enumerate(scores) if a >= base - max_drop), None)
    i = len(energies) - 1 if chosen is None else chosen
    bases, ranks = _energy_bases(total, [energies[i]], updates)
    out = _project_layers(p, p0, bases, {n: r[0] for n, r in ranks.items()})
    removed = sum(float(jnp.sum((M.layer_vectors(p[n]) - M.layer_vectors(out[n])) ** 2))
                  for n in layers)
    norm = sum(float(jnp.sum(u ** 2)) for u in updates.values())
    if refine is not None:
        out = refine(out, x, y)
    return jax.block_until_ready(out), DefenseInfo("jaxpurify", time.perf_counter() - t0, {
        "variant": "benign-layer-principal", "energy": energies[i], "energies": energies,
        "ranks": {n: int(ranks[n][0]) for n in layers},
        "full_ranks": {n: M.gram_rank(total[n]) for n in layers},
        "dims": {n: int(total[n].shape[0]) for n in layers}, "folds": folds,
        "benign_acc": [float(a) for a in scores], "benign_acc_undefended": base,
        "qualified": chosen is not None, "refined": refine is not None,
        "removed_energy": float(np.sqrt(removed / max(norm, 1e-60)))})


def _check_rule(max_drop, folds, n):
    """The benign-accuracy rule's arguments of the principal projections."""
    if not 0 <= max_drop < 1:
        raise ValueError(f"max_drop is a fraction of accuracy in [0, 1), got {max_drop}")
    if not (isinstance(folds, int | np.integer) and 1 <= folds <= n):
        raise ValueError(f"folds must be an integer in [1, {n}] (the benign images), got "
                         f"{folds!r}")


def _check_refine(refine, folds):
    """The ``refine`` argument of the principal projections."""
    if refine is not None and not callable(refine):
        raise TypeError(f"refine must be a function (params, x, y) -> params, got {refine!r}")
    if refine is not None and folds == 1:
        raise ValueError("refine needs held-out images (folds >= 2): scoring the images it "
                         "was fit to would favour every candidate")


def _energy_bases(grams, energies, updates):
    """Per layer: the eigenvectors of ``grams[l]`` (columns, leading first, in the updates'
    dtype) and, per share ``e`` of ``energies``, the fewest leading ones holding ``e`` of the
    trace (at most the numerical rank; ``e = 1``: the rank)."""
    from jaxpurify import multilayer as M

    bases, ranks = {}, {}
    for n, g in grams.items():
        lam, vec = M.principal_directions(g)
        full = M.gram_rank(g)
        share = np.cumsum(lam) / max(lam.sum(), 1e-300)
        ranks[n] = np.array([full if e >= 1 else min(int(np.searchsorted(share, e)) + 1, full)
                             for e in energies])
        bases[n] = jnp.asarray(vec, updates[n].dtype)
    return bases, ranks


def _project_layers(p, p0, bases, ranks, coefficients=None):
    """``p`` with every layer ``l`` of ``bases`` replaced by ``u_0 + V_r V_r^T (u - u_0)``,
    ``V_r`` the first ``ranks[l]`` columns of ``bases[l]`` (traceable in ``ranks``);
    ``coefficients``: the updates' ``(u - u_0) V`` per layer, if already computed."""
    from jaxpurify import multilayer as M

    if coefficients is None:
        coefficients = _update_coefficients(p, p0, bases)
    out = dict(p)
    for n, v in bases.items():
        keep = jnp.arange(v.shape[1]) < ranks[n]
        out[n] = M.with_layer_vectors(
            p[n], M.layer_vectors(p0[n]) + (coefficients[n] * keep) @ v.T)
    return out


def _update_coefficients(p, p0, bases):
    """Per layer of ``bases``: the units' updates in its eigenvector coordinates."""
    from jaxpurify import multilayer as M

    return {n: (M.layer_vectors(p[n]) - M.layer_vectors(p0[n])) @ v for n, v in bases.items()}


@functools.partial(jax.jit, static_argnums=0)
def _count_correct(apply, p, p0, bases, ranks, x, y):
    """Images of ``x`` classified correctly after :func:`_project_layers` with each
    candidate's ranks (``ranks[l][c]``), one candidate at a time (``lax.map``); the updates'
    coordinates do not depend on the candidate and are computed once."""
    coefficients = _update_coefficients(p, p0, bases)

    def candidate(r):
        q = _project_layers(p, p0, bases, r, coefficients)
        return jnp.sum(jnp.argmax(apply(q, x), axis=-1) == y)

    return jax.lax.map(candidate, {n: jnp.asarray(r) for n, r in ranks.items()})
