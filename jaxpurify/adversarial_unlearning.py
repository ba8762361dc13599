r"""Universal adversarial unlearning: i-BAU's minimax with the consistency loss.

A backdoor is a *universal* shortcut: one small change of the input sends almost every image
to the target class. A clean network has universal adversarial perturbations too, but they
need a larger norm to move as many images. i-BAU (Zeng et al., ICLR 2022) removes the
shortcut by solving, on a small benign set,

.. math::

    \min_q \max_{\lVert\delta\rVert_2 \le \varepsilon}\; \frac1n \sum_i
    L\big(f_q(x_i + \delta), y_i\big),

alternating a universal perturbation ``delta`` found on the current network with an
unlearning step that makes the network ignore it. This module keeps that alternation and
replaces the unlearning loss by the library's label-free consistency loss
(:func:`jaxpurify.trigger_inversion.unlearn_consistent`): the perturbed image is pulled to
the *deployed* network ``T``'s logits on the clean image while the clean logits stay put,

.. math::

    \min_q\; \frac{1}{BC} \sum_{x} \Big( \lVert f_q(a(x)) - f_T(a(x)) \rVert_2^2
    + \lVert f_q(a(x) + \delta_r) - f_T(a(x)) \rVert_2^2 \Big).

Each round ``r`` finds ``delta_r`` by projected gradient ascent (L2 ball, normalized steps)
on the current network, then runs ``steps`` Adam steps of the loss above from the current
network. Three departures from i-BAU, stated so nobody mistakes this for it:

- the unlearning step is plain (no implicit hypergradient through ``delta``'s dependence
  on ``q``), and the loss is the consistency above, not the cross-entropy at the labels;
- by default the perturbations are *targeted*, one per class (toward it, over the images
  not predicted as it), Neural Cleanse's question asked with an L2 ball instead of a mask:
  an all-to-one backdoor's target needs a far smaller ball than any other class, so only
  the most successful class's perturbation (and any other's that stands out as far) is
  unlearned, and the clean behaviour toward the other classes is left alone.
  ``targeted=False`` keeps i-BAU's untargeted ascent away from the network's own
  predictions;
- the radius is chosen on the benign data (i-BAU's is a fixed regularizer): the smallest,
  among fractions of the benign images' root-mean-square norm, at which a perturbation
  moves ``fool_level`` of the benign images (targeted: some class's perturbation sends that
  many of the others there). On a backdoored network that is about the trigger's size,
  the trigger being the cheapest universal shortcut; nothing in the rule looks at
  triggered or test images.

The ball decides which shortcuts the perturbation can reach. An L2 ball (``norm="l2"``)
reaches dense ones like a blended pattern; a patch trigger is sparse, and on the CIFAR-10
VGG the L2 perturbation toward the target found (and unlearned) a dense shortcut half the
patch's L2 norm while the patch kept working. ``norm="l1"`` asks the same question in the
sparse ball

.. math::

    \{\delta : \lVert\delta\rVert_1 \le \varepsilon,\;
    \lVert\delta\rVert_\infty \le b\},

``b`` the benign images' value range, whose corners are patches: ``eps / b`` pixels moved
as far as a pixel can move. The ascent takes SLIDE's sparse steps (Tramer & Boneh, NeurIPS
2019) and projects exactly (a soft threshold found by bisection, then the box).

A defender who does not know the trigger's kind asks both balls (``norm=("l2", "l1")``):
each ball's radius and targets come from its own rule, and each round unlearns all their
perturbations together. One mean over every stamp (``ball_weighting="mean"``) gives a ball
its share of the perturbations, half the pull a run with it alone gives it when both balls
have as many; ``ball_weighting="each"`` gives each ball that full pull,
:math:`\sum_b \frac{1}{S_b} \sum_{s \in b} \mathrm{gap}_s` (:func:`ball_weights`).

The radius rule asks its question once, of the deployed network (``radius_schedule="fixed"``).
A network that is not robust anywhere answers with a radius below the trigger's size (the
one-hidden CNNs: the smallest candidates, where the CIFAR-10 patch is 0.021 of the L1 scale
and the rule stopped at 0.02), and five rounds there leave the trigger outside the ball.
``radius_schedule="climb"`` asks it again before every later round, of the current network,
over each ball's candidates from its last radius up: the unlearning follows the cheapest
universal shortcut that still moves ``fool_level`` of the benign images, a ball with none
left among its candidates sits the round out, and the rounds end early when every ball does.
A ball's targets accumulate (a class once unlearned stays among them at the new radius):
a round that turned to another class's shortcut alone would give the first one back.
``retarget=False`` climbs the first round's targets' radius only, leaving the other classes'
shortcuts alone; its rule then finds exactly the perturbations the round unlearns, and the
round reuses them. ``radius_schedule="recheck"`` asks each ball's rule again at its last
radius only: the rounds go on while the shortcut the unlearning removed (or, with
``retarget``, another that stands out as far) still moves ``fool_level`` of the benign images
at that radius, and end when none does. Every round distills toward the deployed, backdoored
network's logits, and distilling longer than the shortcut needs can teach the backdoor back
(``docs/backdoors.md`` measured it for Neural Cleanse's rounds); ``"recheck"`` stops where the rule
says the shortcut is gone. Nothing in any schedule looks at triggered or test images.

How long a round distills is a second question. By default a round runs ``steps`` steps once.
With ``until_fooled`` it runs them in passes, from where the last pass ended, until the
round's perturbations move at most that share of the benign images (at most ``max_passes``
passes). The found shortcut is then unlearned as far as the level asks, however many steps
this network needs. Stop 54's probes found 100 steps too few on the SGD-trained MNIST CNNs,
where the found perturbation is the trigger itself, and enough on LeNet-5 and the designed
MNIST CNN, where longer distillation gave the backdoor back.

The teacher is the network the unlearning starts from, unless ``teacher=`` names another
(the same network's params). Started from a subspace projection of the deployed network
(:func:`jaxpurify.defenses.principal_projection`), the unlearning has to remove only what the
projection left: the experiments' ``benign-principal+universal`` rows, which meet Blended on
the four-patch MNIST CNN where unlearning the deployed network left 7-19% (five draws each).
The teacher matters much less than the start (``docs/backdoors.md``, the teacher ablation,
five draws of 24 settings): from the projection, distilling toward the deployed network's
logits instead moves the mean ASR by at most 0.58 pt on MNIST (-6.9 to +2.4 on CIFAR-10), and
from the deployed network, distilling toward the projection's stays above the projected start
in 20 of the 24 settings.

Measured (``docs/backdoors.md``): on the one-hidden CNNs the climb reaches the trigger and
removes the backdoor, at 2.9 to 8.9 pt of ACC. The cost follows the radius, not the added
classes: a clean network of that kind already has a universal shortcut to the target at the
trigger's size (``jaxpurify run universal-shortcuts-*``), so unlearning there removes its own
shortcuts too. On LeNet-5, whose own shortcuts begin about twice as far out, both schedules
meet the backdoor target. On the 10-epoch small VGG (BadNets 10%) the first targets' climb went
past the patch's size to the top candidates, where the clean VGG's own class-0 shortcuts move
99-100% of the benign images, and cost 4.3 pt. There the fixed sparse rounds gave the backdoor
back: round 1 alone left 2.99% ASR, five rounds 13.62%. ``"recheck"`` stopped after round 1 on
every network measured (its first targets never reached 90% again), which meets the backdoor
target on that VGG (69.82 / 2.99) and costs accuracy the later rounds give back on the others
(3.8-4.0 pt on the VGG's Blended). On the VGG's BadNets 5% network, which no probe read, it
meets the target as well (sparse 70.17 / 3.34, both balls 70.25 / 3.48), where the five fixed
sparse rounds end at 50.17% ASR; on its BadNets 1% network the sparse ball meets it (70.92 /
4.80, five fixed rounds 25.46% ASR) and both balls miss on ACC (69.47 / 2.04: the L2 radius
doubles past the weaker trigger into the clean network's own dense shortcuts). On the 3-epoch
small VGG the same rules take the ASR to 3.6-8.7% but cost 4.3-6.8 pt of ACC (sparse recheck,
BadNets 5% 57.19 / 3.62, 10% 59.01 / 3.73; L2, Blended 10% 55.84 / 8.67), where FT and FP cost
9.4-51.3 pt: the same rule costs that less-trained network three to four and a half times what
it costs the 10-epoch one. A probe unlearning class 0's sparse perturbation alone costs 5.70 pt
there and 1.75 pt at 10 epochs, and class 1's (a class the attack did not touch) costs 16.85
and 12.86 pt: unlearning is cheap only where the perturbation works through the backdoor alone.
Over five fresh benign draws and keys on each LeNet-5 setting where the attack took (BadNets
1%, 5%, 10%, Blended 5%, 10%; 600 images), the L2 targeted rule met the backdoor target in 25
of 25 draws: ASR 0.34-1.22%, ACC drop at most 0.34 pt. On the 10-epoch VGG's Blended 5% network
the L2 rule misses narrowly (70.23 / 5.19, 2.25 pt); on its Blended 1% network, where the
attack took weakly (14.88% ASR), no class stands out at radius 5.52, the radius doubles into
the network's own shortcuts, and it misses on ACC (69.33 / 3.44, 3.04 pt).
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpurify.defenses import DefenseInfo, _same_network, _unwrap, distill, network
from jaxpurify.trigger_inversion import anomaly_index

#: Candidate radii of the universal perturbation, as fractions of the benign images' root
#: mean square L2 norm (the radius rule takes the smallest that fools enough images).
RADIUS_FRACTIONS = (0.025, 0.05, 0.1, 0.2, 0.4)

#: The same for the sparse (``norm="l1"``) perturbation, as fractions of the benign images'
#: root mean square L1 norm: the BadNets 3x3 corner patch is 0.021 of it on CIFAR-10 and
#: 0.053 on MNIST, the Blended pattern (ratio 0.1) 0.22 and 0.34 (the experiments' triggers
#: on their 1% benign budgets).
SPARSE_RADIUS_FRACTIONS = (0.005, 0.01, 0.02, 0.04, 0.08)

#: The balls a universal perturbation may live in: ``"l2"``, or ``"l1"``, the L1 ball
#: within the box ``|delta| <= bound`` (the benign images' value range), whose corners are
#: patches: a few pixels changed as far as an image's pixel may change.
NORMS = ("l2", "l1")

#: How :func:`universal_unlearning`'s later rounds choose their radius: ``"fixed"`` (the first
#: round's), ``"climb"`` (the rule again, from the last radius up) or ``"recheck"`` (the rule
#: again at the last radius: the rounds stop when no shortcut reaches ``fool_level`` there).
RADIUS_SCHEDULES = ("fixed", "climb", "recheck")

#: Fraction of the entries a sparse ascent step moves (its largest gradient entries).
SPARSE_DENSITY = 0.01


class UniversalPerturbations(NamedTuple):
    """Universal perturbations of one network, one per radius.

    Attributes:
        delta: ``(R, H, W, C)``, each within its L2 ball.
        radius: ``(R,)`` the balls' radii.
        fooled: ``(R,)`` fraction of the images whose predicted class the perturbation
            changes (the images it was found on); for a targeted perturbation, the fraction of
            the images not predicted as its target that it sends there.
        target: ``(R,)`` each perturbation's target class, ``-1`` for an untargeted one.
    """

    delta: jax.Array
    radius: np.ndarray
    fooled: np.ndarray
    target: np.ndarray


def _project(delta, radius):
    """``delta`` scaled into the L2 ball of ``radius`` (unchanged inside it)."""
    norm = jnp.sqrt(jnp.sum(delta ** 2))
    return delta * jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-12))


def _project_sparse(delta, radius, bound, iterations: int = 60):
    r"""The Euclidean projection of ``delta`` onto ``{|d|_1 <= radius, |d|_inf <= bound}``.

    The projection soft-thresholds and clips, ``d_i = sign(v_i) min(max(|v_i| - tau, 0),
    bound)``, with the smallest ``tau >= 0`` whose ``d`` lies in the L1 ball: the mass
    ``sum_i min(max(|v_i| - tau, 0), bound)`` falls monotonically in ``tau``, so bisection
    on ``[0, max |v|]`` finds it (``iterations`` halvings: far below float32 resolution).
    The upper end of the last bracket is taken, so ``d`` never leaves the ball by rounding.
    (:func:`jaxpurify.phase_transition._bisect_decreasing` is the same bisection returning
    the midpoint: it would move the results stored in ``results/`` by a float32 ulp.)
    """
    a = jnp.abs(delta)

    def mass(tau):
        return jnp.sum(jnp.clip(a - tau, 0.0, bound))

    def halve(_, interval):
        lo, hi = interval
        mid = 0.5 * (lo + hi)
        over = mass(mid) > radius
        return jnp.where(over, mid, lo), jnp.where(over, hi, mid)

    _, tau = jax.lax.fori_loop(0, iterations, halve, (jnp.zeros_like(radius), jnp.max(a)))
    tau = jnp.where(mass(0.0) <= radius, 0.0, tau)
    return jnp.sign(delta) * jnp.clip(a - tau, 0.0, bound)


def _sparse_direction(g, delta, bound, density: float):
    """The steepest-ascent direction of L1 norm 1 spread over the ``density`` fraction of
    the largest gradient entries (SLIDE's sparse step, Tramer & Boneh 2019): their signs.
    Entries of ``delta`` at the box's edge that the gradient pushes further out are left out
    (as APGD-L1 does): a step there would be clipped away."""
    k = max(1, int(round(density * g.size)))
    g = jnp.where((jnp.abs(delta) >= bound) & (jnp.sign(g) == jnp.sign(delta)), 0.0, g)
    a = jnp.abs(g)
    chosen = (a >= jax.lax.top_k(a.reshape(-1), k)[0][-1]) & (a > 0)
    return jnp.sign(g) * chosen / jnp.maximum(jnp.sum(chosen), 1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _ascent_step(apply, norm, params, deltas, radii, step_sizes, targets, xb, labels, bound):
    """One normalized gradient-ascent step of every perturbation (``vmap``): away from the
    network's own ``labels`` (``target < 0``) or toward the target class; ``norm`` ``"l2"``
    (the gradient scaled to unit L2 norm, projected onto the L2 ball) or ``"l1"`` (the
    sparse step, projected onto the L1 ball within the box ``|d| <= bound``)."""

    def one(delta, radius, step, target):
        toward = target >= 0
        wanted = jnp.where(toward, target, labels)

        def loss(d):
            logits = apply(params, xb + d)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, wanted)
            # the targeted ascent pulls only the images not already predicted as the target
            weight = jnp.where(toward, (labels != target).astype(ce.dtype), 1.0)
            return jnp.where(toward, -1.0, 1.0) * jnp.sum(weight * ce) / jnp.maximum(
                jnp.sum(weight), 1.0)

        g = jax.grad(loss)(delta)
        if norm == "l1":
            ascent = _sparse_direction(g, delta, bound, SPARSE_DENSITY)
            return _project_sparse(delta + step * ascent, radius, bound)
        g = g / jnp.maximum(jnp.sqrt(jnp.sum(g ** 2)), 1e-12)
        return _project(delta + step * g, radius)

    return jax.vmap(one)(deltas, radii, step_sizes, targets)


@functools.partial(jax.jit, static_argnums=0)
def _changed(apply, params, deltas, targets, x, labels):
    """Per perturbation: how many of ``x`` it moves (off their label, or onto its target from
    another class) and how many could move."""

    def one(d, target):
        pred = jnp.argmax(apply(params, x + d), -1)
        could = jnp.where(target >= 0, labels != target, True)
        moved = jnp.where(target >= 0, pred == target, pred != labels)
        return jnp.sum(moved & could), jnp.sum(could)

    return jax.vmap(one)(deltas, targets)


def _predictions(apply, params, x, batch_size=1024):
    return jnp.concatenate([jnp.argmax(apply(params, x[i:i + batch_size]), -1)
                            for i in range(0, x.shape[0], batch_size)])


def _fooled(apply, params, deltas, targets, x, labels, batch_size=1024) -> np.ndarray:
    moved = could = 0
    for i in range(0, x.shape[0], batch_size):
        m, c = _changed(apply, params, deltas, targets, x[i:i + batch_size],
                        labels[i:i + batch_size])
        moved, could = moved + np.asarray(m), could + np.asarray(c)
    return moved / np.maximum(could, 1)


def universal_perturbations(model, params, x_benign, radii, *, targets=None, steps: int = 50,
                            batch_size: int = 100, norm: str = "l2", bound: float | None = None,
                            key=None) -> UniversalPerturbations:
    r"""Universal perturbations of ``params``, one per radius, found together (``vmap``).

    For every radius ``eps`` maximizes ``mean CE(f(x + delta), argmax f(x))`` (untargeted)
    or, with a target class ``k``, ``-mean CE(f(x + delta), k)`` over the images not
    predicted as ``k``, over the ball by ``steps`` normalized gradient-ascent steps of size
    ``2.5 eps / steps`` from ``delta = 0``, each on a minibatch cycling through a shuffled
    ``x_benign``, projected back onto the ball. ``norm="l2"``: the ball
    ``|delta|_2 <= eps``, steps along the gradient scaled to unit L2 norm. ``norm="l1"``:
    the sparse ball ``|delta|_1 <= eps, |delta|_inf <= bound``, whose corners are patches
    (``eps / bound`` entries at the box's edge), steps of unit L1 norm spread over the
    :data:`SPARSE_DENSITY` largest gradient entries (SLIDE's, Tramer & Boneh, NeurIPS 2019)
    and an exact projection (soft threshold found by bisection, then the box).

    Args:
        model, params: the model (see :func:`jaxpurify.defenses.network`) and its params.
        x_benign: ``(N, H, W, C)`` benign images (their labels are not used: the network's own
            predictions are).
        radii: the balls' radii (positive, finite).
        targets: one target class per radius (``-1``: untargeted); default all untargeted.
        steps, batch_size: ascent steps and images per step.
        norm: the ball, ``"l2"`` or ``"l1"`` (:data:`NORMS`).
        bound: the sparse ball's box (``norm="l1"``; default: the value range of
            ``x_benign``, max minus min, as far as one pixel of an image can move).
        key: PRNG key of the shuffle (default ``PRNGKey(0)``).

    Returns:
        :class:`UniversalPerturbations`.

    Raises:
        ValueError: bad images, radii, ``steps``, ``batch_size``, ``norm`` or ``bound``.
        FloatingPointError: a non-finite perturbation (NaN/Inf params).
    """
    x = jnp.asarray(x_benign)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"x_benign must be (N, H, W, C) with N >= 1, got shape {x.shape}")
    bound = _check_ball(x, norm, bound)
    radii = np.asarray(radii, np.float64).reshape(-1)
    if radii.size == 0 or not np.all(np.isfinite(radii)) or np.any(radii <= 0):
        raise ValueError(f"radii must be positive and finite, got {radii.tolist()}")
    if not (isinstance(steps, int | np.integer) and steps >= 1) or batch_size < 1:
        raise ValueError(f"need steps >= 1 and batch_size >= 1, got {steps!r}, {batch_size!r}")
    targets = (np.full(radii.size, -1) if targets is None
               else np.asarray(targets, np.int64).reshape(-1))
    apply = network(model).apply
    params = _unwrap(params)
    num_classes = int(jax.eval_shape(apply, params, x[:1]).shape[-1])
    if targets.shape != radii.shape or np.any(targets >= num_classes) or np.any(targets < -1):
        raise ValueError(f"targets must give one class in -1..{num_classes - 1} per radius, "
                         f"got {targets.tolist()} for {radii.size} radii")
    labels = _predictions(apply, params, x)
    r = jnp.asarray(radii, x.dtype)
    t = jnp.asarray(targets, jnp.int32)
    deltas = jnp.zeros((radii.size,) + x.shape[1:], x.dtype)
    key = jax.random.PRNGKey(0) if key is None else key
    b = min(batch_size, x.shape[0])
    order = np.asarray(jax.random.permutation(key, x.shape[0]))
    per = max(1, x.shape[0] // b)
    for i in range(int(steps)):
        idx = order[(i % per) * b:(i % per + 1) * b]
        deltas = _ascent_step(apply, norm, params, deltas, r, 2.5 * r / steps, t, x[idx],
                              labels[idx], jnp.asarray(bound or 0.0, x.dtype))
    if not bool(jnp.all(jnp.isfinite(deltas))):
        raise FloatingPointError("the universal perturbation is not finite: check the params "
                                 "for NaN/Inf")
    return UniversalPerturbations(deltas, radii, _fooled(apply, params, deltas, t, x, labels),
                                  targets)


def _check_ball(x, norm: str, bound) -> float | None:
    """``bound`` checked (the benign value range where ``None``; ``"l2"`` has none)."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {list(NORMS)}")
    if norm == "l2":
        return None
    if bound is None:
        bound = float(jnp.max(x) - jnp.min(x))
        if not bound > 0:
            raise ValueError("the benign images are constant: pass the sparse ball's bound")
    elif not (np.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be positive and finite (or None), got {bound!r}")
    return float(bound)


def benign_scale(x_benign, norm: str = "l2") -> float:
    """The benign images' root-mean-square L2 (or, ``norm="l1"``, L1) norm: what
    :data:`RADIUS_FRACTIONS` (:data:`SPARSE_RADIUS_FRACTIONS`) scale."""
    x = np.asarray(x_benign, np.float64).reshape(len(x_benign), -1)
    size = np.sum(np.abs(x), axis=1) if norm == "l1" else np.sqrt(np.sum(x ** 2, axis=1))
    return float(np.sqrt(np.mean(size ** 2)))


def choose_radius(fooled, radii, fool_level: float) -> float:
    """The smallest of ``radii`` whose perturbation fooled at least ``fool_level`` of the
    benign images; the largest if none did."""
    radii, fooled = np.asarray(radii, np.float64), np.asarray(fooled, np.float64)
    enough = np.flatnonzero(fooled >= fool_level)
    return float(radii[enough].min() if enough.size else radii.max())


def universal_unlearning(model, params, x_benign, y_benign=None, *, norm: str = "l2",
                         radius: float | tuple | None = None, radius_fractions=None,
                         fool_level: float = 0.9, rounds: int = 5, steps: int = 100,
                         learning_rate: float = 1e-3, batch_size: int = 64,
                         ascent_steps: int = 50, targeted: bool = True, hflip: bool = True,
                         crop: int = 4, mirror: bool | None = None, bound: float | None = None,
                         ball_weighting: str = "mean", radius_schedule: str = "fixed",
                         retarget: bool = True, until_fooled: float | None = None,
                         max_passes: int = 10, teacher=None, key=None):
    r"""Alternate universal perturbations with consistency unlearning (module docstring).

    Args:
        model, params: the model (see :func:`jaxpurify.defenses.network`) and deployed params.
        x_benign: ``(N, H, W, C)`` the benign budget.
        y_benign: ignored (the labels are not used; the ``defense(params, x, y)`` signature).
        norm: the perturbations' ball (:func:`universal_perturbations`): ``"l2"`` (a blend's
            kind of trigger) or ``"l1"``, the sparse ball within the box ``bound`` (a
            patch's); or a tuple of both, ``("l2", "l1")``: each ball's radius and targets
            chosen by its own rule, and each round unlearns every ball's perturbations
            together (a defender who does not know the trigger's kind).
        radius: the perturbation's radius in ``norm``, or with several balls a tuple of
            one radius per ball, in ``norm``'s order (e.g. the radii the rule chose on
            another network: the experiments' ``deployed-at-projected-radii`` diagnostic);
            ``None`` chooses it on the benign images (the smallest of ``radius_fractions``
            times :func:`benign_scale` whose perturbation of the deployed network changes at
            least ``fool_level`` of their predictions). A targeted ball given its radius
            still chooses its targets there.
        radius_fractions, fool_level: the rule's candidates (one ball only; default
            :data:`RADIUS_FRACTIONS`, :data:`SPARSE_RADIUS_FRACTIONS` for ``"l1"``) and
            level. The default 0.9 was chosen on MNIST LeNet-5 probes (BadNets 10%: at 0.5
            the targeted L2 unlearning left 9.5% ASR, at 0.9 0.5%;
            ``docs/backdoors.md``), before any CIFAR-10 run.
        rounds: perturbation-and-unlearning rounds (i-BAU's default: 5).
        steps, learning_rate, batch_size: each round's unlearning (Adam, cosine decay from
            ``learning_rate`` over ``steps``; :func:`jaxpurify.defenses.distill`).
        ascent_steps: gradient-ascent steps of each perturbation
            (:func:`universal_perturbations`, 100 images per step).
        targeted: find one perturbation per class toward it (the default; Neural Cleanse's
            question with an L2 ball for the mask) instead of one away from the predictions
            (i-BAU's): the radius is the smallest candidate at which some class's
            perturbation sends ``fool_level`` of the other images there, and only the most
            successful class's perturbation (and any other class's that stands out as far)
            is unlearned.
        hflip, crop: the unlearning's augmentations (CIFAR-10: ``True``, 4).
        mirror: also unlearn the perturbation mirrored left-right (default ``hflip``).
        bound: the sparse ball's box (default: the benign images' value range).
        ball_weighting: with several balls, how the unlearning weighs their perturbations:
            ``"mean"``, one mean over every perturbation (a ball's share of the stamped term
            is its share of the perturbations), or ``"each"``, every ball's perturbations
            at the weight a run with that ball alone gives them (the stamped term is the sum
            over balls of their means,
            :math:`\sum_b \frac{1}{S_b} \sum_{s \in b} \mathrm{gap}_s`). One ball: the two
            are the same.
        radius_schedule: ``"fixed"``, every round at the radius and targets the rule chose
            on the deployed network, or ``"climb"``: before every later round each ball's
            rule runs again on the current network, over its candidates from its last
            radius up, and picks that round's radius and new targets (added to the ball's
            earlier ones); a ball whose
            perturbations reach ``fool_level`` at none of them sits the round out, and the
            rounds stop when every ball does (module docstring). Needs ``radius=None``.
            ``"recheck"``: the same, with the last radius as the only candidate (a given
            ``radius`` too), so the rounds run while the shortcut still reaches
            ``fool_level`` there.
        retarget: under ``"climb"`` or ``"recheck"``, whether a later round's rule may add
            targets (the most successful class at its radius, and any that stands out);
            ``False`` asks only of the first round's targets the smallest radius, from the
            last up (``"recheck"``: the last), at which one of their perturbations still
            reaches ``fool_level``.
        until_fooled, max_passes: ``None`` (the default): each round distills ``steps``
            steps once. A level in ``[0, 1)``: each round distills its perturbations in
            passes of ``steps`` steps (each pass a fresh Adam and cosine schedule from where
            the last ended), until they move at most ``until_fooled`` of the benign images
            (mean over the round's perturbations) or ``max_passes`` passes have run: the
            found shortcut is unlearned as far as the level asks, however many steps that
            takes this network, instead of for a fixed count. Nothing but the benign images
            is read. The first pass is the one-pass round, bit for bit.
        teacher: the params every round distills toward (same structure and shapes as
            ``params``); ``None`` (the default): the network the unlearning starts from,
            ``params`` itself. The radius rule and the perturbations always ask the network
            being unlearned; only the logits the stamped and clean images are pulled to
            change. Started from a projection, ``teacher=`` the deployed network separates
            where the unlearning starts from what it distills toward (the experiments'
            teacher ablation, ``docs/backdoors.md``).
        key: PRNG key of the ascent's and the unlearning's batches (default ``PRNGKey(0)``).

    Returns:
        ``(params, DefenseInfo)``; ``details`` holds ``norm`` (and ``bound`` for
        ``"l1"``), ``radius``, the rule's ``candidates``
        when it chose (untargeted: ``[radius, fooled fraction]`` on the deployed network;
        targeted: ``[radius, per-class success]`` for each radius tried), with ``targeted``
        the ``targets`` unlearned and the classes' ``anomaly`` indices, and ``fooled``: per
        round, the fraction of the benign images that round's perturbations moved before
        its unlearning and after it (mean over targets), and ``fooled_final``, fresh
        perturbations of the returned network (all on the benign images). With several
        balls, ``norm`` joins their names (``"l2+l1"``), ``balls`` holds each one's
        ``norm``, ``bound``, ``radius``, ``candidates``, ``targets`` and ``anomaly``,
        ``ball_weighting`` says how they were weighed, and ``fooled`` and ``fooled_final``
        average over every ball's perturbations. ``rounds`` counts the rounds run; under
        ``"climb"``, ``schedule`` holds per round and ball ``[radius, targets]`` (``None``:
        the ball sat out) and ``stopped`` whether the rounds ended before ``rounds``
        (the same under ``"recheck"``). With ``until_fooled``, ``passes`` holds each
        round's number of passes, and ``fooled`` each round's fraction after its last pass.
        With ``teacher`` given, ``teacher_given`` is ``True``.

    Raises:
        ValueError: bad images, ``rounds``, ``fool_level``, ball or radius settings, a
            ``teacher`` whose structure or shapes differ from ``params``, or what
            :func:`jaxpurify.defenses.distill` refuses (e.g. diverged unlearning).
    """
    t0 = time.perf_counter()
    x = jnp.asarray(x_benign)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"x_benign must be (N, H, W, C) with N >= 1, got shape {x.shape}")
    norms = (norm,) if isinstance(norm, str) else tuple(norm)
    if not norms or len(set(norms)) != len(norms):
        raise ValueError(f"norm must be one of {list(NORMS)} or a tuple of distinct ones, "
                         f"got {norm!r}")
    balls = [{"norm": n, "bound": _check_ball(x, n, bound)} for n in norms]
    if len(norms) > 1 and radius_fractions is not None:
        raise ValueError("radius_fractions applies to one ball; with several norms each "
                         "ball's rule uses its default fractions")
    radii = _radii(radius, norms)
    if not (isinstance(rounds, int | np.integer) and rounds >= 1):
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    if ball_weighting not in ("mean", "each"):
        raise ValueError(f"ball_weighting must be 'mean' or 'each', got {ball_weighting!r}")
    if radius_schedule not in RADIUS_SCHEDULES:
        raise ValueError(f"radius_schedule must be one of {list(RADIUS_SCHEDULES)}, got "
                         f"{radius_schedule!r}")
    if radius_schedule == "climb" and radius is not None:
        raise ValueError("radius_schedule='climb' re-runs the radius rule every round; give "
                         "radius=None (and radius_fractions for the candidates)")
    if until_fooled is not None and not 0 <= until_fooled < 1:
        raise ValueError(f"until_fooled must be in [0, 1) (or None: one pass), got "
                         f"{until_fooled!r}")
    if not (isinstance(max_passes, int | np.integer) and max_passes >= 1):
        raise ValueError(f"max_passes must be a positive integer, got {max_passes!r}")
    if not 0 < fool_level <= 1:
        raise ValueError(f"fool_level must be in (0, 1], got {fool_level!r}")
    key = jax.random.PRNGKey(0) if key is None else key
    mirror = hflip if mirror is None else mirror
    apply = network(model).apply
    deployed = _unwrap(params)
    taught = deployed if teacher is None else _same_network(_unwrap(teacher), deployed)
    plans, ladders = [], []  # per ball: its radius, targets and the rule's record; candidates
    for ball, given in zip(balls, radii, strict=True):
        if given is not None:
            candidates = np.asarray([given], np.float64)
        else:
            fractions = radius_fractions if radius_fractions is not None else (
                SPARSE_RADIUS_FRACTIONS if ball["norm"] == "l1" else RADIUS_FRACTIONS)
            candidates = np.asarray(fractions, np.float64) * benign_scale(x, ball["norm"])
        chosen, targets, record, *_ = _choose(model, deployed, x, candidates, fool_level,
                                              targeted, ascent_steps, ball, key)
        record.update(norm=ball["norm"], radius=chosen,
                      **({"bound": ball["bound"]} if ball["norm"] == "l1" else {}))
        plans.append((ball, chosen, targets, record))
        ladders.append(candidates)
    asks_again = radius_schedule != "fixed"  # the rule again before every later round
    upward = radius_schedule == "climb"  # over the candidates from the last radius up

    def perturb(active, current, k, known=None):  # each active ball's, toward its targets
        known = known or {}  # id(ball) -> its perturbations, already found by its rule
        return [known[id(ball)] if id(ball) in known else universal_perturbations(
                    model, current, x, [chosen] * len(targets), targets=targets,
                    steps=ascent_steps, key=k, **ball)
                for ball, chosen, targets, _ in active]

    current, history, schedule, active, passes = deployed, [], [], plans, []
    for r in range(int(rounds)):
        k_ascent, k_unlearn = jax.random.split(jax.random.fold_in(key, r))
        known = {}  # a later rule's perturbations that are this round's exactly
        if asks_again and r > 0:  # the rule again, from (recheck: at) its last radius
            active, step = [], []
            for b, ((ball, last, before, record), ladder) in enumerate(zip(plans, ladders,
                                                                           strict=True)):
                asked = ladder[ladder >= last] if upward else np.asarray([last])
                chosen, new, _, reached, by_rule = _choose(
                    model, current, x, asked, fool_level, targeted, ascent_steps, ball,
                    k_ascent, check=True, classes=None if retarget or not targeted else before)
                targets = before + [t for t in new if t not in before]  # none given back
                step.append([chosen, targets] if reached else None)
                if reached:  # a ball that sits out keeps its last radius and targets
                    plans[b] = (ball, chosen, targets, record)
                    active.append(plans[b])
                    if by_rule is not None and by_rule.target.tolist() == targets:
                        known[id(ball)] = by_rule  # the very call perturb would make
            schedule.append(step)
            if not active:
                break
        elif asks_again:
            schedule.append([[chosen, targets] for _, chosen, targets, _ in plans])
        weights = (1.0 if ball_weighting == "mean" or len(active) == 1 else
                   ball_weights([len(targets) for _, _, targets, _ in active], mirror))
        found = perturb(active, current, k_ascent, known)
        offsets = jnp.concatenate([f.delta for f in found])
        if mirror:
            offsets = jnp.concatenate([offsets, offsets[:, :, ::-1]])
        stamps = (jnp.zeros(offsets.shape[:3] + (1,), x.dtype), jnp.zeros_like(offsets),
                  offsets)  # no mask, no pattern: the perturbations added
        for p in range(1 if until_fooled is None else int(max_passes)):
            current, _ = distill(model, current, x, teacher=taught, steps=steps,
                                 learning_rate=learning_rate, batch_size=batch_size,
                                 hflip=hflip, crop=crop, stamps=stamps, stamp_weight=weights,
                                 key=k_unlearn if p == 0 else jax.random.fold_in(k_unlearn, p))
            labels = _predictions(apply, current, x)
            after = float(np.mean(np.concatenate(
                [_fooled(apply, current, f.delta, jnp.asarray(f.target), x, labels)
                 for f in found])))
            if until_fooled is None or after <= until_fooled:
                break
        passes.append(p + 1)
        history.append([float(np.mean(np.concatenate([f.fooled for f in found]))), after])
    final = perturb(plans, current, jax.random.fold_in(key, rounds))
    details = (plans[0][3] if len(plans) == 1 else
               {"norm": "+".join(norms), "balls": [record for *_, record in plans],
                "ball_weighting": ball_weighting})
    details.update(rounds=len(history), steps=int(steps), fooled=history,
                   fooled_final=float(np.mean(np.concatenate([f.fooled for f in final]))))
    if until_fooled is not None:
        details.update(until_fooled=float(until_fooled), passes=passes)
    if teacher is not None:
        details.update(teacher_given=True)
    if asks_again:
        details.update(radius_schedule=radius_schedule, retarget=bool(retarget),
                       stopped=len(history) < rounds,
                       schedule=[s if len(plans) > 1 else s[0] for s in schedule])
    return current, DefenseInfo("universal-unlearning", time.perf_counter() - t0, details)


def _radii(radius, norms: tuple) -> list:
    """One given radius (or ``None``: the rule chooses) per ball, checked."""
    if radius is None:
        return [None] * len(norms)
    several = len(norms) > 1
    given = tuple(radius) if isinstance(radius, tuple | list) else (radius,)
    if len(given) != len(norms) or (several and not isinstance(radius, tuple | list)):
        raise ValueError(f"radius must be one number per ball ({len(norms)} for norm "
                         f"{'+'.join(norms)}: {'a tuple' if several else 'a number'}), "
                         f"got {radius!r}")
    values = [float(r) if np.ndim(r) == 0 and not isinstance(r, bool | str) else np.nan
              for r in given]
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"radius must be positive and finite (or None: chosen), got {radius!r}")
    return values


def ball_weights(counts, mirror: bool) -> np.ndarray:
    r"""Per-stamp weights that give each ball the pull a run with it alone gives it.

    With ``S_b = counts[b]`` perturbations in ball ``b`` and ``S = sum_b S_b``, the weight
    ``S / S_b`` on each of ball ``b``'s stamps turns :func:`jaxpurify.defenses.distill`'s
    ``mean_s w_s gap_s`` into :math:`\sum_b \frac{1}{S_b} \sum_{s \in b} \mathrm{gap}_s`.
    The order is the stamps': the balls' perturbations one after another, then (``mirror``)
    the same again mirrored.
    """
    counts = np.asarray(counts, np.int64)
    if counts.ndim != 1 or counts.size == 0 or np.any(counts < 1):
        raise ValueError(f"counts must be positive perturbation counts per ball, got {counts}")
    weights = np.repeat(counts.sum() / counts, counts)
    return np.concatenate([weights, weights]) if mirror else weights


def _choose(model, params, x, candidates, fool_level, targeted, ascent_steps, ball, key,
            check: bool = False, classes=None):
    """The radius and the perturbations' targets (``[-1]``: untargeted) the unlearning uses,
    the rule's record, whether a perturbation reached ``fool_level`` at that radius, and the
    targeted perturbations found there (``None`` from the untargeted rule).

    Untargeted: the smallest candidate whose perturbation changes ``fool_level`` of the
    predictions. Targeted: candidates in increasing order, each with one perturbation per
    class, until a class's reaches ``fool_level`` there (else the largest); the targets are
    that radius's most successful class and any other whose success lies more than 2 robust
    standard deviations above the classes' median (:func:`anomaly_index` of minus it).
    A single untargeted candidate is taken unmeasured (reached: ``True``) unless ``check``.
    ``classes`` (targeted) asks only of those classes' perturbations, and they are the targets.
    """
    if not targeted and len(candidates) == 1 and not check:  # a given radius: nothing to choose
        return float(candidates[0]), [-1], {}, True, None
    if not targeted:
        found = universal_perturbations(model, params, x, candidates, steps=ascent_steps,
                                        key=key, **ball)
        chosen = choose_radius(found.fooled, candidates, fool_level)
        return (chosen, [-1],
                {"candidates": [[float(r), float(f)]
                                for r, f in zip(candidates, found.fooled, strict=True)]},
                bool(found.fooled.max() >= fool_level), None)
    num_classes = int(jax.eval_shape(network(model).apply, params, x[:1]).shape[-1])
    asked = list(range(num_classes) if classes is None else classes)
    tried = []
    for radius in np.sort(candidates):
        found = universal_perturbations(model, params, x, [radius] * len(asked),
                                        targets=asked, steps=ascent_steps, key=key, **ball)
        tried.append([float(radius), found.fooled.tolist()])
        if found.fooled.max() >= fool_level:
            break
    if classes is not None:
        return (float(radius), asked, {"candidates": tried},
                bool(found.fooled.max() >= fool_level), found)
    success = found.fooled
    index = anomaly_index(-success)  # a large success is what Neural Cleanse's small mask is
    top = int(np.argmax(success))
    targets = [top] + [int(k) for k in np.argsort(-success) if k != top and index[k] > 2.0]
    chosen = {"targets": targets, "anomaly": index.tolist()}
    return (float(radius), targets, ({"candidates": tried, **chosen} if len(candidates) > 1
                                     else chosen), bool(success.max() >= fool_level), found)
