r"""One-hidden-layer non-overlapping CNNs, the model with exact-recovery theorems.

.. math::
    f(x) = \sum_j \beta_j \sum_i \mathrm{relu}(W_j^\top P_i x + b_j)

``P_i`` picks the ``i``-th of ``k`` disjoint patches (kernel = stride), ``W_j`` is filter
``j`` (``d = p_h p_w C`` entries), and ``beta_j`` (``num_classes`` entries) reads out the
sum-pooled hidden unit ``j``. Two parameterizations:

* :class:`OneHiddenLayerCNN`: plain Flax params ``{"conv": {"kernel", "bias"},
  "readout": {"kernel"}}``.
* :class:`DesignedOneHiddenLayerCNN`: the *designed* (code) parameterization. Each filter with
  its bias is ``[W_j; b_j] = A_W theta_j`` and each readout column ``beta_c = A_beta phi_c``,
  with ``A_W`` (``(d+1) x r_W``) and ``A_beta`` (``J x r_beta``) fixed, seeded random matrices;
  only ``theta`` and ``phi`` are trained. The network is then recoverable at any data size.
  A layer named in ``joint_layers`` is coded as a whole instead, ``vec(layer) = A theta``
  with one ``(units * rows) x (units * r)`` design: recovery then tolerates a fraction of the
  *layer's* entries, wherever they are, instead of a fraction of each unit's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpurify._precision import full_precision


def _pair(p) -> tuple[int, int]:
    return (p, p) if isinstance(p, int) else tuple(p)


def extract_patches(x: jax.Array, patch_size) -> jax.Array:
    """Disjoint patches of NHWC images, flattened in Flax kernel order ``(ph, pw, C)``.

    Args:
        x: ``(N, H, W, C)`` images; ``H`` and ``W`` must be multiples of the patch size.
        patch_size: ``p`` or ``(ph, pw)``.

    Returns:
        ``(N, k, d)`` with ``k = (H/ph)(W/pw)`` patches of ``d = ph*pw*C`` entries, so that
        ``patches @ kernel.reshape(d, J)`` equals the strided convolution.
    """
    ph, pw = _pair(patch_size)
    if x.ndim != 4:
        raise ValueError(f"expected NHWC images (N, H, W, C); got shape {x.shape}")
    n, h, w, c = x.shape
    if h % ph or w % pw:
        raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {(ph, pw)}: "
                         "non-overlapping patches must tile the image exactly")
    x = x.reshape(n, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // ph) * (w // pw), ph * pw * c)


class OneHiddenLayerCNN(nn.Module):
    """Non-overlapping conv (kernel = stride) -> ReLU -> sum over patches -> linear readout.

    Attributes:
        num_filters: ``J``, hidden channels.
        patch_size: ``p`` or ``(ph, pw)``; kernel size and stride.
        num_classes: readout width (1 for the scalar model of the theory).
        use_bias: learn the filter biases ``b_j``.
        pool: ``"sum"`` (the theory's model) or ``"mean"`` (same function up to a constant
            factor on the readout; better-scaled for training).
        param_dtype: parameter dtype (float64 for exactness studies: float32 updates round
            off the subspace by ~1e-7).
    """

    num_filters: int
    patch_size: int | Sequence[int]
    num_classes: int = 1
    use_bias: bool = True
    pool: str = "sum"
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        ph, pw = _pair(self.patch_size)
        self.conv = nn.Conv(self.num_filters, (ph, pw), strides=(ph, pw), padding="VALID",
                            use_bias=self.use_bias, param_dtype=self.param_dtype)
        self.readout = nn.Dense(self.num_classes, use_bias=False, param_dtype=self.param_dtype)

    def hidden(self, x: jax.Array) -> jax.Array:
        """Pooled hidden features ``h_j(x) = sum_i relu(W_j^T P_i x + b_j)``, ``(N, J)``."""
        ph, pw = _pair(self.patch_size)
        if x.ndim != 4 or x.shape[1] % ph or x.shape[2] % pw:
            raise ValueError(f"expected NHWC images (N, H, W, C) tiled by the patch size "
                             f"{(ph, pw)}; got shape {x.shape}")
        a = nn.relu(self.conv(x))
        return a.mean(axis=(1, 2)) if self.pool == "mean" else a.sum(axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.readout(self.hidden(x))


def design_matrix(seed: int, rows: int, cols: int, dtype=jnp.float32) -> jax.Array:
    """The seeded random code matrix of the designed parameterization.

    Gaussian entries scaled by ``1/sqrt(cols)`` so that ``A theta`` has the variance of
    ``theta``'s entries; a pure function of ``(seed, rows, cols)``, so any process can
    rebuild it. The entries are always drawn in float32 and then cast, so every ``dtype``
    (and the x64 setting) gives the same matrix up to rounding.
    """
    shape_id = rows * 1_000_003 + cols
    key = jax.random.fold_in(jax.random.PRNGKey(seed), shape_id % 2**32)
    if shape_id >= 2**32:  # a whole-layer design: its high bits too (fold_in takes uint32)
        key = jax.random.fold_in(key, shape_id >> 32)
    return jax.random.normal(key, (rows, cols), jnp.float32).astype(dtype) / math.sqrt(cols)


_DESIGNS: dict = {}


def cached_designs(specs: tuple) -> list[np.ndarray]:
    """``design_matrix(seed, rows, cols, float32)`` for each ``(seed, rows, cols)`` in
    ``specs``, as cached read-only numpy arrays (constants under ``jit``); the missing ones
    are drawn together in one compiled call, once per process. Large designs must come from
    here: drawn inside every traced training step, a whole-layer design costs far more than
    the step (``benchmarks/bench_joint_designs.py``)."""
    missing = tuple(s for s in dict.fromkeys(specs) if s not in _DESIGNS)
    if missing:
        with jax.ensure_compile_time_eval():
            drawn = jax.jit(lambda: [design_matrix(*s, jnp.float32) for s in missing])()
        for s, a in zip(missing, drawn, strict=True):
            a = np.array(a)
            a.setflags(write=False)
            _DESIGNS[s] = a
    return [_DESIGNS[s] for s in specs]


def unit_vectors(design: jax.Array, code: jax.Array, joint: bool) -> jax.Array:
    """A designed layer's unit vectors ``(units, rows)`` from its ``(r, units)`` code: per
    unit ``design @ code``, or for a layer coded as a whole ``vec = design @ vec(code)``,
    unit after unit."""
    if joint:
        return (design @ code.T.reshape(-1)).reshape(code.shape[1], -1)
    return (design @ code).T


def unit_codes(design: jax.Array, vectors: jax.Array, joint: bool) -> jax.Array:
    """The ``(r, units)`` code of unit vectors in ``range(design)`` (least squares): the
    inverse of :func:`unit_vectors`."""
    if joint:
        return jnp.linalg.lstsq(design, vectors.reshape(-1))[0].reshape(len(vectors), -1).T
    return jnp.linalg.lstsq(design, vectors.T)[0]


class DesignedOneHiddenLayerCNN(nn.Module):
    """One-hidden-layer CNN trained in the code parameterization ``W = A theta``.

    Attributes:
        num_filters, patch_size, num_classes, pool: as in :class:`OneHiddenLayerCNN`
            (biases are always part of the code: ``[W_j; b_j] = A_W theta_j``).
        in_channels: image channels ``C`` (needed to size ``A_W`` before seeing data).
        filter_code_dim: ``r_W``, columns of ``A_W`` (unknowns per filter).
        readout_code_dim: ``r_beta``, columns of ``A_beta``.
        design_seed: seed of ``A_W`` and ``A_beta``.
        joint_layers: layers (``"conv"``, ``"readout"``) coded as a whole: the layer's
            entries, unit after unit (``vec`` of :func:`~jaxpurify.subspaces.filter_vectors`
            or :func:`~jaxpurify.subspaces.readout_vectors`), are ``A theta`` with ``A`` of
            ``(units * rows) x (units * r)``. Same number of unknowns; the Donoho-Tanner
            threshold then bounds the corrupted fraction of the whole layer, not of each
            unit, so an attacker who puts all its edits into one unit (e.g. the target
            class's readout column) no longer defeats recovery by concentrating them.
    """

    num_filters: int
    patch_size: int | Sequence[int]
    in_channels: int
    filter_code_dim: int
    readout_code_dim: int
    num_classes: int = 1
    pool: str = "sum"
    design_seed: int = 0
    param_dtype: jnp.dtype = jnp.float32
    joint_layers: tuple[str, ...] = ()

    @property
    def filter_size(self) -> int:
        ph, pw = _pair(self.patch_size)
        return ph * pw * self.in_channels

    def _layer_shapes(self) -> dict[str, tuple[int, int, int]]:
        """``{layer: (rows per unit, code entries per unit, units)}``."""
        unknown = set(self.joint_layers) - {"conv", "readout"}
        if unknown:
            raise ValueError(f"joint_layers: unknown layers {sorted(unknown)}; choose from "
                             "('conv', 'readout')")
        return {"conv": (self.filter_size + 1, self.filter_code_dim, self.num_filters),
                "readout": (self.num_filters, self.readout_code_dim, self.num_classes)}

    def designs(self, dtype=jnp.float32) -> dict[str, jax.Array]:
        """``{"conv": A_W ((d+1) x r_W), "readout": A_beta (J x r_beta)}``.

        A layer in ``joint_layers`` gets one ``(units * rows) x (units * r)`` design instead.
        """
        out = {}
        for seed, (name, (rows, r, units)) in enumerate(self._layer_shapes().items(),
                                                          start=self.design_seed):
            if name in self.joint_layers:  # large: drawn once (per-unit designs as they were)
                out[name] = jnp.asarray(cached_designs(((seed, units * rows, units * r),))[0],
                                        dtype)
            else:
                out[name] = design_matrix(seed, rows, r, dtype)
        return out

    def weights(self, name: str, code: jax.Array, design: jax.Array) -> jax.Array:
        """A layer's ``(rows, units)`` weights from its ``(r, units)`` code and design."""
        return unit_vectors(design, code, name in self.joint_layers).T

    def codes(self, name: str, vectors: jax.Array, design: jax.Array) -> jax.Array:
        """The ``(r, units)`` code of a layer's unit ``vectors`` (``(units, rows)``) in
        ``range(design)``: the least-squares inverse of :meth:`weights`."""
        return unit_codes(design, vectors, name in self.joint_layers)

    def setup(self):
        d = self.filter_size
        self.conv_code = self.param("conv_code", nn.initializers.normal(1.0 / math.sqrt(d + 1)),
                                    (self.filter_code_dim, self.num_filters), self.param_dtype)
        self.readout_code = self.param(
            "readout_code", nn.initializers.normal(1.0 / math.sqrt(self.num_filters)),
            (self.readout_code_dim, self.num_classes), self.param_dtype)

    def hidden(self, x: jax.Array) -> jax.Array:
        theta = self.conv_code.astype(x.dtype)
        wb = self.weights("conv", theta, self.designs(x.dtype)["conv"])  # (d+1, J): with biases
        z = nn.relu(extract_patches(x, self.patch_size) @ wb[:-1] + wb[-1])
        return z.mean(axis=1) if self.pool == "mean" else z.sum(axis=1)

    def __call__(self, x: jax.Array) -> jax.Array:
        phi = self.readout_code.astype(x.dtype)
        return self.hidden(x) @ self.weights("readout", phi, self.designs(x.dtype)["readout"])

    def plain_model(self) -> OneHiddenLayerCNN:
        """The deployed network: same function, plain filter/readout parameters."""
        return OneHiddenLayerCNN(self.num_filters, self.patch_size, self.num_classes,
                                 use_bias=True, pool=self.pool, param_dtype=self.param_dtype,
                                 parent=None)

    @full_precision
    def materialize(self, params) -> dict:
        """Plain :class:`OneHiddenLayerCNN` params ``W = A theta`` from the code params.

        The deployed weights are what gets contaminated; purification projects them back
        onto ``range(A)`` (``purify(..., subspace="designed", designs=self.designs())``).
        """
        params = params.get("params", params)
        dtype = params["conv_code"].dtype
        designs = self.designs(dtype)
        wb = self.weights("conv", params["conv_code"], designs["conv"])
        ph, pw = _pair(self.patch_size)
        kernel = wb[:-1].reshape(ph, pw, self.in_channels, self.num_filters)
        beta = self.weights("readout", params["readout_code"], designs["readout"])
        return {"conv": {"kernel": kernel, "bias": wb[-1]}, "readout": {"kernel": beta}}
