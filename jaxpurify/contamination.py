r"""Synthetic contamination of parameter pytrees.

This module corrupts the weights of a model (any pytree of arrays, typically a Flax
``params`` dict) in controlled ways, so that purification can be benchmarked against a
known ground truth. Every function is pure and functional: it takes the clean pytree and a
PRNG key and returns ``(contaminated, mask)`` where ``mask`` is a pytree of boolean arrays
with the same structure and leaf shapes, ``True`` exactly where an entry was corrupted.

Contamination models
--------------------
Let :math:`w \in \mathbb{R}^{d}` be one leaf (flattened) and :math:`\rho` the corrupted
fraction. A support :math:`S \subset \{1, \dots, d\}` with exactly

.. math:: |S| = k = \operatorname{round}(\rho\, d)

elements is drawn (uniformly without replacement, or the :math:`k` largest :math:`|w_i|`),
and the contaminated leaf is

.. math::
    \tilde w_i = \begin{cases} w_i + \sigma\, \xi_i & i \in S \\ w_i & i \notin S
    \end{cases}
    \qquad \sigma = \begin{cases} \text{magnitude} \cdot \operatorname{std}(w) &
    \text{relative} \\ \text{magnitude} & \text{absolute} \end{cases}

with :math:`\xi_i` i.i.d. from the chosen law (see :func:`corrupt_vector`). This is the
"sparse gross error" model :math:`\tilde w = w + e`, :math:`\|e\|_0 = k`, under which L1
regression onto the known subspace recovers :math:`w` exactly below the phase transition
of :mod:`jaxpurify.phase_transition`.

Implementation notes
--------------------
* The support is chosen with an *exact count*: a uniform random permutation (or the
  descending ``|w|`` order) is computed and the entries whose rank is ``< k`` are
  corrupted. ``k`` may be a traced value, so ``fraction`` can be traced (``jax.jit`` or
  ``jax.vmap`` over fractions) without any Bernoulli approximation.
* ``k`` is computed as ``clip(round(fraction * size), 0, size)`` with :func:`jax.numpy.round`
  (round-half-to-even) in the floating dtype of ``fraction`` (float32 unless x64 is
  enabled), identically in eager, jitted and vmapped code.
* String/boolean options (``law``, ``targeting``, ``relative``, ``bits``) are static: pass
  them through :func:`functools.partial` or ``static_argnames`` when jitting.
* Leaves are processed independently, each with its own key obtained by splitting ``key``
  into one key per leaf (in :func:`jax.tree.flatten` order).
* Leaves without a floating dtype (integers, booleans, complex numbers, Python scalars)
  are returned unchanged with an all-``False`` mask. Floating leaves keep their shape and
  dtype (as canonicalised by JAX: float64 leaves need ``jax_enable_x64``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BIT_CLASSES",
    "HEAVY_TAILED_DF",
    "LAWS",
    "TARGETINGS",
    "bit_flips",
    "combine",
    "corrupt_vector",
    "dense_noise",
    "sparse_gross_errors",
]

PyTree = Any
Contamination = Callable[[PyTree, jax.Array], tuple[PyTree, PyTree]]

#: Error laws accepted by :func:`corrupt_vector` / :func:`sparse_gross_errors`.
LAWS: tuple[str, ...] = ("gaussian", "uniform", "heavy_tailed", "sign_flip", "constant")
#: Support selection strategies.
TARGETINGS: tuple[str, ...] = ("random", "largest")
#: Bit classes accepted by :func:`bit_flips` (an ``int`` bit position is also accepted).
BIT_CLASSES: tuple[str, ...] = ("any", "sign", "exponent", "mantissa")
#: Degrees of freedom of the Student-t law used by ``law="heavy_tailed"`` (infinite
#: variance, finite mean).
HEAVY_TAILED_DF: float = 1.5

_UINT_BY_BITS = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def _concrete_value(x: Any) -> np.ndarray | None:
    """Returns ``x`` as a NumPy array if it is concrete, ``None`` if it is traced."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _check_scalar(name: str, x: Any) -> None:
    if jnp.ndim(x) != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {jnp.shape(x)}.")


def _check_fraction(fraction: Any) -> None:
    _check_scalar("fraction", fraction)
    value = _concrete_value(fraction)
    if value is None:
        return  # traced: clipped to [0, 1] numerically
    if not np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.complexfloating):
        raise ValueError(f"`fraction` must be a real number, got {fraction!r}.")
    if not (np.isfinite(value) and 0.0 <= float(value) <= 1.0):
        raise ValueError(f"`fraction` must lie in [0, 1], got {float(value)!r}.")


def _check_nonnegative(name: str, x: Any) -> None:
    _check_scalar(name, x)
    value = _concrete_value(x)
    if value is None:
        return
    if not np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.complexfloating):
        raise ValueError(f"`{name}` must be a real number, got {x!r}.")
    if not (np.isfinite(value) and float(value) >= 0.0):
        raise ValueError(f"`{name}` must be finite and >= 0, got {float(value)!r}.")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {tuple(choices)}.")


def _is_float_leaf(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


# --------------------------------------------------------------------------------------
# Array-level building blocks
# --------------------------------------------------------------------------------------


def _num_corrupted(fraction: Any, size: int) -> jax.Array:
    """``clip(round(fraction * size), 0, size)`` as int32; works with traced fraction."""
    frac = jnp.asarray(fraction)
    if not jnp.issubdtype(frac.dtype, jnp.floating):
        frac = frac.astype(jnp.result_type(float))
    count = jnp.round(frac * size)
    return jnp.clip(count, 0, size).astype(jnp.int32)


def _support_mask(w: jax.Array, key: jax.Array, count: jax.Array, targeting: str) -> jax.Array:
    """Boolean mask with exactly ``count`` True entries.

    ``targeting="random"`` ranks entries by a uniform random permutation;
    ``targeting="largest"`` ranks them by decreasing ``|w|`` (stable, so ties go to the
    lower flat index; NaNs are ranked last, infinities first). Entries with rank
    ``< count`` are selected, which is valid for a traced ``count``.
    """
    size = w.size
    if targeting == "random":
        order = jax.random.permutation(key, size)
    else:
        order = jnp.argsort(-jnp.abs(w.reshape(-1)), stable=True)
    selected = jnp.arange(size) < count
    mask = jnp.zeros((size,), dtype=bool).at[order].set(selected)
    return mask.reshape(w.shape)


def _leaf_scale(w: jax.Array, relative: Any) -> jax.Array:
    """``std(w)`` (population, over the whole array; 1 if it is 0 / non-finite) if
    ``relative`` else 1. ``relative`` may be traced (one compilation for both cases)."""
    std = jnp.std(w)
    use_std = jnp.asarray(relative) & jnp.isfinite(std) & (std > 0)
    return jnp.where(use_std, std, jnp.ones_like(std))


def _student_t(key: jax.Array, df: float, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    r"""Exact Student-t sampler without rejection loop (Bailey's polar method).

    Bailey (1994): for :math:`(U, V)` uniform in the unit disk and :math:`W = U^2 + V^2`,
    :math:`T = U \sqrt{\nu (W^{-2/\nu} - 1) / W} \sim t_\nu`. Since :math:`W \sim
    \mathcal U(0, 1]` and the angle :math:`\theta` is independent and uniform, this is
    :math:`T = \cos\theta \sqrt{\nu\, \operatorname{expm1}(-(2/\nu) \log W)}`, which is
    cheap to compile and to run under ``vmap`` (unlike gamma-based samplers).
    """
    key_radius, key_angle = jax.random.split(key)
    w = 1.0 - jax.random.uniform(key_radius, shape, dtype)  # in (0, 1]
    theta = jax.random.uniform(key_angle, shape, dtype, 0.0, 2.0 * np.pi)
    return jnp.cos(theta) * jnp.sqrt(df * jnp.expm1((-2.0 / df) * jnp.log(w)))


def _draw_unit_errors(key: jax.Array, law: str, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Unit-scale error draws ``xi`` for the additive laws."""
    if law == "gaussian":
        return jax.random.normal(key, shape, dtype)
    if law == "uniform":
        return jax.random.uniform(key, shape, dtype, minval=-1.0, maxval=1.0)
    if law == "heavy_tailed":
        return _student_t(key, HEAVY_TAILED_DF, shape, dtype)
    if law == "constant":
        return jax.random.rademacher(key, shape, jnp.int32).astype(dtype)
    raise AssertionError(law)  # pragma: no cover - validated by callers


def _work_dtype(dtype: Any) -> Any:
    """Computation dtype: at least float32 (bf16/f16 leaves are computed in float32)."""
    return jnp.promote_types(jax.dtypes.canonicalize_dtype(dtype), jnp.float32)


def corrupt_vector(
    w: jax.Array,
    key: jax.Array,
    *,
    fraction: float | jax.Array,
    magnitude: float | jax.Array = 10.0,
    law: str = "gaussian",
    relative: bool = True,
    targeting: str = "random",
) -> tuple[jax.Array, jax.Array]:
    r"""Adds sparse gross errors to a single array.

    Exactly :math:`k = \operatorname{round}(\rho d)` entries of ``w`` (with
    :math:`d` = ``w.size`` and :math:`\rho` = ``fraction``) are corrupted:

    .. math::
        \tilde w_i = w_i + \sigma \xi_i \quad (i \in S), \qquad
        \tilde w_i = w_i \quad (i \notin S),

    where :math:`\sigma = \text{magnitude}\cdot\operatorname{std}(w)` if ``relative``
    (population std over all entries of ``w``, replaced by 1 when it is 0 or not finite)
    and :math:`\sigma = \text{magnitude}` otherwise, and :math:`\xi_i` are i.i.d. with law

    * ``"gaussian"``: :math:`\xi \sim \mathcal N(0, 1)` (so :math:`\sigma` is the error std);
    * ``"uniform"``: :math:`\xi \sim \mathcal U[-1, 1)` (so :math:`|e_i| \le \sigma`);
    * ``"heavy_tailed"``: Student-t with :data:`HEAVY_TAILED_DF` = 1.5 degrees of freedom
      (finite mean, infinite variance; exact loop-free sampler, see ``_student_t``);
    * ``"constant"``: :math:`\xi = \pm 1` with a random sign, i.e. :math:`e_i = \pm\sigma`;
    * ``"sign_flip"``: not additive, :math:`\tilde w_i = -w_i` on :math:`S` (``magnitude``
      and ``relative`` are ignored; a selected entry equal to 0 is therefore unchanged).

    The support :math:`S` is uniform without replacement (``targeting="random"``) or the
    :math:`k` entries of largest :math:`|w_i|` (``targeting="largest"``; ties broken by flat
    index). Because selection is "rank < k", ``fraction`` and ``magnitude`` may be traced,
    e.g. ``jax.vmap(lambda k, f: corrupt_vector(w, k, fraction=f))(keys, fractions)``.

    Args:
      w: Floating-point array of any shape.
      key: PRNG key (typed or raw ``uint32[2]``).
      fraction: Corrupted fraction :math:`\rho \in [0, 1]`. Traced values are clipped.
      magnitude: Error scale (relative to ``std(w)`` if ``relative``), >= 0.
      law: One of :data:`LAWS`.
      relative: Whether ``magnitude`` is relative to ``std(w)``.
      targeting: One of :data:`TARGETINGS`.

    Returns:
      ``(w_tilde, mask)``: the contaminated array (same shape and dtype as ``w``) and a
      boolean array, True exactly on :math:`S`.

    Raises:
      ValueError: If ``w`` is not floating point, ``fraction`` is not a scalar or (when
        concrete) not in [0, 1], ``magnitude`` is negative, or ``law`` / ``targeting`` is
        unknown.
    """
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"`w` must have a floating dtype, got {w.dtype}.")
    _check_fraction(fraction)
    _check_nonnegative("magnitude", magnitude)
    _check_choice("law", law, LAWS)
    _check_choice("targeting", targeting, TARGETINGS)

    # The jitted core works on the flattened array so that compilations are shared by all
    # leaves of the same size and dtype.
    out, mask = _corrupt_array(
        w.reshape(-1),
        key,
        fraction,
        magnitude,
        bool(relative),
        law=law,
        targeting=targeting,
    )
    return out.reshape(w.shape), mask.reshape(w.shape)


@functools.partial(jax.jit, static_argnames=("law", "targeting"))
def _corrupt_array(
    w: jax.Array,
    key: jax.Array,
    fraction: Any,
    magnitude: Any,
    relative: Any,
    *,
    law: str,
    targeting: str,
) -> tuple[jax.Array, jax.Array]:
    """Jitted core of :func:`corrupt_vector` (arguments already validated)."""
    key_support, key_errors = jax.random.split(key)
    count = _num_corrupted(fraction, w.size)
    mask = _support_mask(w, key_support, count, targeting)

    work = w.astype(_work_dtype(w.dtype))
    if law == "sign_flip":
        corrupted = -work
    else:
        xi = _draw_unit_errors(key_errors, law, w.shape, work.dtype)
        sigma = jnp.asarray(magnitude, work.dtype) * _leaf_scale(work, relative)
        corrupted = work + (sigma * xi).astype(work.dtype)
    out = jnp.where(mask, corrupted, work).astype(w.dtype)
    return out, mask


def _bit_layout(dtype: Any) -> tuple[Any, int, int, int]:
    """``(flip_dtype, nbits, nmant, nexp)``; float64 is flipped as float32."""
    dtype = jax.dtypes.canonicalize_dtype(dtype)
    flip_dtype = jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits == 64 else jnp.dtype(dtype)
    info = jnp.finfo(flip_dtype)
    nbits, nmant, nexp = int(info.bits), int(info.nmant), int(info.nexp)
    if nbits not in _UINT_BY_BITS:
        raise ValueError(f"bit_flips does not support dtype {dtype}.")
    return flip_dtype, nbits, nmant, nexp


def _bit_range(dtype: Any, bits: str | int) -> tuple[int, int]:
    """Half-open range ``[low, high)`` of bit positions for ``bits`` and a leaf dtype."""
    flip_dtype, nbits, nmant, nexp = _bit_layout(dtype)
    if isinstance(bits, str):
        return {
            "any": (0, nbits),
            "sign": (nbits - 1, nbits),
            "exponent": (nmant, nmant + nexp),
            "mantissa": (0, nmant),
        }[bits]
    if not 0 <= bits < nbits:
        raise ValueError(f"Bit position {bits} out of range for {flip_dtype} ({nbits} bits).")
    return bits, bits + 1


@jax.jit
def _flip_bits_array(
    w: jax.Array, key: jax.Array, fraction: Any, low: Any, high: Any
) -> tuple[jax.Array, jax.Array]:
    """Flips bit ``b ~ U{low, ..., high-1}`` in ``round(fraction * w.size)`` random entries.

    ``low``/``high`` are traced so that all bit classes share one compilation.
    """
    dtype = jax.dtypes.canonicalize_dtype(w.dtype)
    flip_dtype, nbits, _, _ = _bit_layout(dtype)
    uint = _UINT_BY_BITS[nbits]

    key_support, key_bits = jax.random.split(key)
    count = _num_corrupted(fraction, w.size)
    mask = _support_mask(w, key_support, count, "random")
    position = jax.random.randint(key_bits, w.shape, low, high, dtype=jnp.int32)

    work = w.astype(flip_dtype)
    as_uint = jax.lax.bitcast_convert_type(work, uint)
    flipped = as_uint ^ jnp.left_shift(jnp.ones((), uint), position.astype(uint))
    corrupted = jax.lax.bitcast_convert_type(flipped, flip_dtype).astype(dtype)
    return jnp.where(mask, corrupted, w), mask


# --------------------------------------------------------------------------------------
# Pytree-level API
# --------------------------------------------------------------------------------------


def _false_mask(leaf: Any) -> jax.Array:
    return jnp.zeros(jnp.shape(leaf), dtype=bool)


def _map_float_leaves(
    fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
    params: PyTree,
    key: jax.Array,
) -> tuple[PyTree, PyTree]:
    """Applies ``fn(leaf, leaf_key)`` to every floating leaf; others get a False mask."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    out_leaves, mask_leaves = [], []
    for i, leaf in enumerate(leaves):
        if _is_float_leaf(leaf):
            new_leaf, mask = fn(jnp.asarray(leaf), keys[i])
        else:
            new_leaf, mask = leaf, _false_mask(leaf)
        out_leaves.append(new_leaf)
        mask_leaves.append(mask)
    return treedef.unflatten(out_leaves), treedef.unflatten(mask_leaves)


def sparse_gross_errors(
    params: PyTree,
    key: jax.Array,
    *,
    fraction: float | jax.Array,
    magnitude: float | jax.Array = 10.0,
    law: str = "gaussian",
    relative: bool = True,
    targeting: str = "random",
) -> tuple[PyTree, PyTree]:
    r"""Corrupts a fraction of the entries of every leaf with gross errors.

    Each floating leaf :math:`w^{(\ell)}` (of size :math:`d_\ell`) independently receives
    :func:`corrupt_vector` with its own key: exactly
    :math:`\operatorname{round}(\rho\, d_\ell)` entries get
    :math:`w_i \mapsto w_i + \sigma_\ell \xi_i` with
    :math:`\sigma_\ell = \text{magnitude}\cdot\operatorname{std}(w^{(\ell)})` when
    ``relative`` (else ``magnitude``), or :math:`w_i \mapsto -w_i` for ``"sign_flip"``.
    See :func:`corrupt_vector` for the laws and targeting rules.

    Args:
      params: Pytree of arrays (e.g. a Flax params dict).
      key: PRNG key.
      fraction: Corrupted fraction per leaf, in [0, 1]; may be traced.
      magnitude: Error scale (>= 0); may be traced.
      law: One of :data:`LAWS`: ``"gaussian"``, ``"uniform"``, ``"heavy_tailed"``,
        ``"sign_flip"``, ``"constant"``.
      relative: Scale errors by each leaf's std (fallback 1 if the std is 0).
      targeting: ``"random"`` (uniform support) or ``"largest"`` (largest-:math:`|w|`).

    Returns:
      ``(contaminated, mask)`` with the structure of ``params``; ``mask`` leaves are bool
      arrays, True where an entry was corrupted. Non-floating leaves are unchanged with an
      all-False mask.

    Raises:
      ValueError: On a bad ``fraction``, ``magnitude``, ``law`` or ``targeting``.
    """
    _check_fraction(fraction)
    _check_nonnegative("magnitude", magnitude)
    _check_choice("law", law, LAWS)
    _check_choice("targeting", targeting, TARGETINGS)

    def fn(w: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        return corrupt_vector(
            w,
            k,
            fraction=fraction,
            magnitude=magnitude,
            law=law,
            relative=relative,
            targeting=targeting,
        )

    return _map_float_leaves(fn, params, key)


def bit_flips(
    params: PyTree,
    key: jax.Array,
    *,
    fraction: float | jax.Array,
    bits: str | int = "any",
) -> tuple[PyTree, PyTree]:
    r"""Flips one random bit in a fraction of the entries of every leaf (soft errors).

    For each floating leaf, exactly :math:`\operatorname{round}(\rho d)` entries (uniform
    without replacement) have one bit of their IEEE-754 representation flipped:

    .. math:: \tilde w_i = \operatorname{bitcast}\big(\operatorname{bitcast}_{u}(w_i)
        \oplus 2^{b_i}\big), \quad b_i \sim \mathcal U(B),

    where ``bitcast_u`` reinterprets the float as an unsigned integer of the same width
    (``uint32`` for float32, via :func:`jax.lax.bitcast_convert_type`) and :math:`B` is

    * ``"any"``: all bits :math:`\{0, \dots, 31\}`;
    * ``"sign"``: the sign bit 31 (:math:`w \mapsto -w`);
    * ``"exponent"``: bits 23..30 (scales by :math:`2^{\pm 2^j}`; may create Inf/NaN);
    * ``"mantissa"``: bits 0..22 (relative change < 1);
    * an ``int``: that bit position only.

    (Positions given for float32; float16 / bfloat16 leaves are flipped natively in 16 bits
    with their own layout from :func:`jax.numpy.finfo`.) **float64 leaves** are cast to
    float32, flipped in the float32 representation (models a float32 storage/transport
    fault) and cast back; only the selected entries go through this round trip, the others
    keep their full float64 value.

    Flipping high exponent bits produces huge, subnormal, ``Inf`` or ``NaN`` values (e.g.
    flipping bit 30 of 0.75 gives ~2.6e38, of 3.0 ~5.9e-39, of 1.0 ``+Inf`` and of 1.5
    ``NaN``).
    These are kept on purpose since they are realistic; downstream purification must be
    robust to non-finite entries (e.g. treat them as erasures).

    Args:
      params: Pytree of arrays.
      key: PRNG key.
      fraction: Corrupted fraction per leaf, in [0, 1]; may be traced.
      bits: One of :data:`BIT_CLASSES` or an integer bit position (static).

    Returns:
      ``(contaminated, mask)``; every masked entry differs from the clean one in exactly
      one bit of its (float32 for float64 leaves) representation.

    Raises:
      ValueError: On a bad ``fraction`` or ``bits``.
    """
    _check_fraction(fraction)
    if isinstance(bits, bool) or not isinstance(bits, str | int | np.integer):
        raise ValueError(f"`bits` must be one of {BIT_CLASSES} or an int, got {bits!r}.")
    if isinstance(bits, str):
        _check_choice("bits", bits, BIT_CLASSES)
    else:
        bits = int(bits)
        if not 0 <= bits < 32:
            raise ValueError(f"Bit position must be in [0, 32), got {bits}.")

    def fn(w: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        low, high = _bit_range(w.dtype, bits)
        out, mask = _flip_bits_array(w.reshape(-1), k, fraction, low, high)
        return out.reshape(w.shape), mask.reshape(w.shape)

    return _map_float_leaves(fn, params, key)


def dense_noise(
    params: PyTree,
    key: jax.Array,
    *,
    std: float | jax.Array,
    relative: bool = True,
) -> tuple[PyTree, PyTree]:
    r"""Adds dense Gaussian noise to every entry of every floating leaf.

    .. math:: \tilde w_i = w_i + s\,\sigma_\ell\, z_i, \qquad z_i \sim \mathcal N(0, 1),

    with :math:`s` = ``std`` and :math:`\sigma_\ell = \operatorname{std}(w^{(\ell)})`
    (fallback 1 when it is 0) if ``relative``, else :math:`\sigma_\ell = 1`.

    Args:
      params: Pytree of arrays.
      key: PRNG key.
      std: Noise standard deviation (relative or absolute), >= 0; may be traced.
      relative: Scale the noise by each leaf's std.

    Returns:
      ``(contaminated, mask)``; the mask is all True on floating leaves (False elsewhere).

    Raises:
      ValueError: If ``std`` is negative, non-finite or not a scalar.
    """
    _check_nonnegative("std", std)

    def fn(w: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        out, mask = _dense_noise_array(w.reshape(-1), k, std, bool(relative))
        return out.reshape(w.shape), mask.reshape(w.shape)

    return _map_float_leaves(fn, params, key)


@jax.jit
def _dense_noise_array(
    w: jax.Array, key: jax.Array, std: Any, relative: Any
) -> tuple[jax.Array, jax.Array]:
    work = w.astype(_work_dtype(w.dtype))
    sigma = jnp.asarray(std, work.dtype) * _leaf_scale(work, relative)
    noisy = work + sigma * jax.random.normal(key, w.shape, work.dtype)
    return noisy.astype(w.dtype), jnp.ones(w.shape, dtype=bool)


def combine(
    params: PyTree, key: jax.Array, *contaminations: Contamination
) -> tuple[PyTree, PyTree]:
    r"""Applies several contaminations in sequence.

    With :math:`c_1, \dots, c_J` the given callables and :math:`k_1, \dots, k_J` =
    ``jax.random.split(key, J)``:

    .. math:: p_0 = \text{params}, \quad (p_j, M_j) = c_j(p_{j-1}, k_j), \quad
        \text{mask} = M_1 \lor \dots \lor M_J.

    Example:
      >>> from functools import partial
      >>> corrupted, mask = combine(params, key,
      ...     partial(dense_noise, std=0.01),
      ...     partial(sparse_gross_errors, fraction=0.1, law="heavy_tailed"))

    Args:
      params: Pytree of arrays.
      key: PRNG key.
      *contaminations: Callables ``(params, key) -> (params, mask)``, applied in order.

    Returns:
      ``(contaminated, mask)`` where the mask is the leafwise OR of all masks (all False
      if no contamination is given).

    Raises:
      TypeError: If a contamination is not callable.
    """
    for c in contaminations:
        if not callable(c):
            raise TypeError(f"Contaminations must be callables (params, key) -> ..., got {c!r}.")
    mask = jax.tree.map(_false_mask, params)
    keys = jax.random.split(key, max(len(contaminations), 1))
    for i, contamination in enumerate(contaminations):
        params, new_mask = contamination(params, keys[i])
        mask = jax.tree.map(jnp.logical_or, mask, new_mask)
    return params, mask
