r"""Multi-layer designed CNNs (LeNet-5, a small VGG) and layer-by-layer purification.

The paper's extension to deep networks. Every conv or dense layer ``l`` stores, for each of
its output units ``u``, the unit's fan-in weights together with its bias as

.. math:: [w_u; b_u] = A_l \theta_u ,

with ``A_l`` a fixed, seeded random ``(fan_in + 1) x r_l`` matrix shared by all units of the
layer (:func:`jaxpurify.models.design_matrix`), ``r_l = ceil((fan_in + 1) / ratio)``. Only
the codes ``theta`` are trained, so the deployed weights of every layer lie in ``range(A_l)``
whatever the optimizer (SGD, momentum, Adam, weight decay on ``theta``, ...) and whatever the
data size: an update of ``theta`` is an update of ``theta``, and ``A_l theta`` is always in
the range. This is what makes a *deep* network recoverable: the data row-space argument that
serves the one-hidden-layer model does not (see :func:`row_space_ranks`).

* :class:`DesignedCNN` (and the presets :class:`LeNet5`, :class:`SmallVGG`): a Flax module
  whose params are the codes ``{layer: theta (r_l, units)}``; :meth:`DesignedCNN.materialize`
  gives the deployed plain weights ``{layer: {"kernel", "bias"}}`` (what gets contaminated),
  :meth:`DesignedCNN.apply_plain` runs the network from plain weights, and
  :meth:`DesignedCNN.designs` returns ``A_l`` per layer.
* :func:`purify_layers`: for each layer, the unit vectors ``(units, fan_in + 1)`` are
  recovered by ONE batched :func:`jaxpurify.l1_regression` (shared design ``A_l``).
* :func:`train`: minibatch training of the codes with optax and a tqdm progress bar.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpurify._precision import full_precision
from jaxpurify.models._one_hidden import cached_designs, unit_codes, unit_vectors
from jaxpurify.phase_transition import critical_fraction
from jaxpurify.purify import fit_count, second_explanation
from jaxpurify.recovery import RESULTS, l1_regression
from jaxpurify.recovery._solve import default_tol

__all__ = [
    "Conv",
    "Dense",
    "DesignedCNN",
    "LayerInfo",
    "LayerPurifyReport",
    "LeNet5",
    "MultiLayerReport",
    "SmallVGG",
    "accuracy",
    "check_plain",
    "layer_vectors",
    "predict",
    "purify_layers",
    "gram_rank",
    "layer_patches",
    "patch_grams",
    "principal_directions",
    "row_space_ranks",
    "train",
    "with_layer_vectors",
]


# ----------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class Conv:
    """A conv layer: ``features`` output channels, square ``kernel``, stride 1, then ReLU
    and, if ``pool > 1``, a ``pool x pool`` max-pool with stride ``pool``."""

    features: int
    kernel: int = 3
    padding: str = "SAME"
    pool: int = 1


@dataclasses.dataclass(frozen=True)
class Dense:
    """A dense layer (input flattened first); ReLU after it unless it is the last layer."""

    features: int


class LayerInfo(NamedTuple):
    """Static description of one layer.

    Attributes:
        name: ``"conv1"``, ``"conv2"``, ..., ``"fc1"``, ...
        kind: ``"conv"`` or ``"dense"``.
        kernel_shape: shape of the plain kernel (``(kh, kw, C_in, U)`` or ``(fan_in, U)``).
        fan_in: weights per unit.
        units: output units ``U`` (channels or neurons).
        code_dim: ``r``, unknowns per unit (columns of ``A``).
        designed: False for a plain last layer (``plain_last=True``): its "design" is the
            identity, so it has no redundancy and is not purified.
    """

    name: str
    kind: str
    kernel_shape: tuple
    fan_in: int
    units: int
    code_dim: int
    designed: bool

    @property
    def rows(self) -> int:
        """``fan_in + 1`` entries per unit vector ``[w_u; b_u]``."""
        return self.fan_in + 1

    @property
    def ratio(self) -> float:
        """Overparameterization ratio ``(fan_in + 1) / r``."""
        return self.rows / self.code_dim

    @property
    def size(self) -> int:
        """Plain parameters of the layer (kernel and bias)."""
        return self.rows * self.units


def _layer_infos(layers, input_shape, ratio, plain_last) -> tuple[LayerInfo, ...]:
    if not layers:
        raise ValueError("a DesignedCNN needs at least one layer")
    ratios = tuple(ratio) if isinstance(ratio, Sequence) else (ratio,) * len(layers)
    if len(ratios) != len(layers):
        raise ValueError(f"ratio must be a number or one per layer ({len(layers)}); got {ratio}")
    for q in ratios:
        if not q > 1:
            raise ValueError(f"ratio must be > 1 (parameters per unknown), got {ratio}")
    h, w, c = input_shape
    flat = None
    infos, n_conv, n_dense = [], 0, 0
    for i, spec in enumerate(layers):
        last = i == len(layers) - 1
        if isinstance(spec, Conv):
            if flat is not None:
                raise ValueError("conv layers must come before the dense layers")
            if spec.padding not in ("SAME", "VALID"):
                raise ValueError(f"padding must be 'SAME' or 'VALID', got {spec.padding!r}")
            n_conv += 1
            k = spec.kernel
            fan_in = k * k * c
            name, kind, shape = f"conv{n_conv}", "conv", (k, k, c, spec.features)
            if spec.padding == "VALID":
                h, w = h - k + 1, w - k + 1
            if spec.pool > 1:
                h, w = h // spec.pool, w // spec.pool
            if h < 1 or w < 1:
                raise ValueError(f"layer {name} leaves no spatial extent for {input_shape}")
            c = spec.features
        elif isinstance(spec, Dense):
            n_dense += 1
            fan_in = flat if flat is not None else h * w * c
            name, kind, shape = f"fc{n_dense}", "dense", (fan_in, spec.features)
            flat = spec.features
        else:
            raise ValueError(f"layers must be Conv(...) or Dense(...) specs, got {spec!r}")
        designed = not (last and plain_last)
        r = math.ceil((fan_in + 1) / ratios[i]) if designed else fan_in + 1
        infos.append(LayerInfo(name, kind, shape, fan_in, shape[-1], r, designed))
    return tuple(infos)


def _unwrap(params):
    if isinstance(params, dict) and set(params) == {"params"}:
        return params["params"]
    if hasattr(params, "keys") and set(params.keys()) == {"params"}:
        return params["params"]
    return params


# ----------------------------------------------------------------------------- model


class DesignedCNN(nn.Module):
    """A plain conv/dense ReLU network trained in the code parameterization ``A_l theta``.

    Params are ``{layer name: theta (code_dim, units)}``; ``A_l theta`` stacks the unit's
    fan-in weights (plain kernel order ``(kh, kw, C_in)`` for convs) and, in its last row,
    the bias.

    Attributes:
        layers: tuple of :class:`Conv` then :class:`Dense` specs; the last one is the logits.
        input_shape: ``(H, W, C)`` of one input image.
        ratio: ``(fan_in + 1) / r`` per layer (``r = ceil((fan_in + 1) / ratio)``), a number
            or a tuple with one per layer; the Donoho-Tanner critical fraction at this ratio
            bounds the recoverable contamination (``critical_fraction(4) = 0.40``).
        design_seed: layer ``l`` (0-based) uses ``design_matrix(design_seed + l, ...)``.
        plain_last: keep the last layer plain (identity design, not purified).
        param_dtype: dtype of the codes (float64 for exactness studies).
        joint_layers: names of designed layers coded as a whole: the layer's unit vectors,
            unit after unit, are ``A_l theta`` with ``A_l`` of ``(units (fan_in + 1)) x
            (units r)`` (same unknowns). Recovery then solves one problem per layer and the
            Donoho-Tanner threshold bounds the corrupted fraction of the layer, not of each
            unit (see :class:`~jaxpurify.models.DesignedOneHiddenLayerCNN`).
    """

    layers: tuple = ()
    input_shape: tuple = (28, 28, 1)
    ratio: Any = 4.0
    design_seed: int = 0
    plain_last: bool = False
    param_dtype: Any = jnp.float32
    joint_layers: tuple = ()

    # -- static structure (usable on an unbound module)

    def layer_info(self) -> tuple[LayerInfo, ...]:
        """One :class:`LayerInfo` per layer, in order."""
        ratio = tuple(self.ratio) if isinstance(self.ratio, Sequence) else self.ratio
        infos = _layer_infos(tuple(self.layers), tuple(self.input_shape), ratio,
                             self.plain_last)
        unknown = set(self.joint_layers) - {i.name for i in infos if i.designed}
        if unknown:
            raise ValueError(f"joint_layers: {sorted(unknown)} are not designed layers of this "
                             f"model; choose from {[i.name for i in infos if i.designed]}")
        return infos

    def problem_info(self, info: LayerInfo) -> LayerInfo:
        """The recovery problems of a layer: ``info`` itself, or for a layer in
        ``joint_layers`` one unit of ``units (fan_in + 1)`` rows and ``units r`` unknowns."""
        if info.name not in self.joint_layers:
            return info
        return info._replace(fan_in=info.units * info.rows - 1, units=1,
                             code_dim=info.units * info.code_dim)

    def layer_weights(self, info: LayerInfo, code: jax.Array, design: jax.Array) -> jax.Array:
        """A layer's unit vectors ``(units, fan_in + 1)`` from its ``(r, units)`` code."""
        return unit_vectors(design, code, info.name in self.joint_layers)

    def layer_codes(self, info: LayerInfo, vectors: jax.Array, design: jax.Array) -> jax.Array:
        """The ``(r, units)`` code of unit vectors in ``range(design)`` (least squares: the
        inverse of :meth:`layer_weights`)."""
        return unit_codes(design, vectors, info.name in self.joint_layers)

    @property
    def num_classes(self) -> int:
        return self.layers[-1].features

    def designs(self, dtype=None) -> dict[str, jax.Array]:
        """``{layer: A_l ((fan_in + 1) x r_l)}`` (identity for a plain last layer).

        The entries are drawn in float32 and cast to ``dtype`` (default ``param_dtype``), so
        the float32 and float64 designs hold the same numbers.
        """
        dtype = self.param_dtype if dtype is None else dtype
        infos = [self.problem_info(info) for info in self.layer_info()]
        drawn = cached_designs(tuple((self.design_seed + i, info.rows, info.code_dim)
                                  for i, info in enumerate(infos) if info.designed))[::-1]
        out = {}
        for info in infos:
            a = drawn.pop() if info.designed else np.eye(info.rows, dtype=np.float32)
            out[info.name] = jnp.asarray(a, dtype)
        return out

    def num_params(self) -> dict[str, int]:
        """``{"codes": trained unknowns, "plain": deployed parameters}``."""
        infos = self.layer_info()
        return {"codes": sum(i.code_dim * i.units for i in infos),
                "plain": sum(i.size for i in infos)}

    # -- Flax

    def setup(self):
        infos = self.layer_info()
        codes = {}
        for info in infos:
            gain = 1.0 if info is infos[-1] else 2.0  # He init for ReLU layers
            std = math.sqrt(gain / info.fan_in)  # A has unit-variance rows: w ~ theta in scale
            codes[info.name] = self.param(info.name, nn.initializers.normal(std),
                                          (info.code_dim, info.units), self.param_dtype)
        self.codes = codes

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.apply_plain(self.materialize(dict(self.codes)), x, check=False)

    # -- code params -> plain params, and the plain forward pass

    @full_precision
    def materialize(self, params) -> dict:
        """Deployed plain params ``{layer: {"kernel", "bias"}}`` from code params.

        Accepts ``{layer: theta}`` or ``{"params": {layer: theta}}``.
        """
        p = _unwrap(params)
        infos = self.layer_info()
        _check_codes(p, infos)
        dtype = jnp.result_type(*[p[i.name] for i in infos])
        designs = self.designs(dtype)
        out = {}
        for info in infos:
            v = self.layer_weights(info, jnp.asarray(p[info.name], dtype), designs[info.name])
            out[info.name] = {"kernel": v[:, :-1].T.reshape(info.kernel_shape), "bias": v[:, -1]}
        return out

    def apply_plain(self, plain: dict, x: jax.Array, *, check: bool = True) -> jax.Array:
        """Logits of the network with plain weights ``{layer: {"kernel", "bias"}}``.

        The same function as ``model.apply({"params": codes}, x)`` when
        ``plain = model.materialize(codes)``; contaminated or purified weights go here.
        """
        infos = self.layer_info()
        if check:
            check_plain(self, plain)
        h = jnp.asarray(x)
        if h.ndim == 3:
            h = h[None]
        if h.ndim != 4 or tuple(h.shape[1:]) != tuple(self.input_shape):
            raise ValueError(f"inputs must be (N, {', '.join(map(str, self.input_shape))}); "
                             f"got shape {tuple(jnp.shape(x))}")
        dtype = jnp.result_type(plain[infos[0].name]["kernel"])
        h = h.astype(dtype)
        for spec, info in zip(self.layers, infos, strict=True):
            kernel = plain[info.name]["kernel"].astype(dtype)
            bias = plain[info.name]["bias"].astype(dtype)
            if info.kind == "conv":
                h = jax.lax.conv_general_dilated(
                    h, kernel, (1, 1), spec.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
                h = nn.relu(h + bias)
                if spec.pool > 1:
                    h = nn.max_pool(h, (spec.pool, spec.pool), strides=(spec.pool, spec.pool))
            else:
                h = h.reshape(h.shape[0], -1) @ kernel + bias
                if info is not infos[-1]:
                    h = nn.relu(h)
        return h

    def layer_inputs(self, plain: dict, x: jax.Array) -> dict[str, jax.Array]:
        """Each layer's input features (the previous layer's output) for inputs ``x``."""
        infos = self.layer_info()
        out = {}
        h = jnp.asarray(x).astype(jnp.result_type(plain[infos[0].name]["kernel"]))
        for spec, info in zip(self.layers, infos, strict=True):
            out[info.name] = h
            kernel, bias = plain[info.name]["kernel"], plain[info.name]["bias"]
            if info.kind == "conv":
                h = jax.lax.conv_general_dilated(
                    h, kernel, (1, 1), spec.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
                h = nn.relu(h + bias)
                if spec.pool > 1:
                    h = nn.max_pool(h, (spec.pool, spec.pool), strides=(spec.pool, spec.pool))
            else:
                h = h.reshape(h.shape[0], -1)
                out[info.name] = h
                h = nn.relu(h @ kernel + bias)
        return out


class LeNet5(DesignedCNN):
    """LeNet-5 for 28x28x1 inputs: conv5x5(6, same)-pool-conv5x5(16)-pool-120-84-10, ReLU and
    max-pooling, every layer designed (61,706 deployed parameters)."""

    layers: tuple = (Conv(6, 5, "SAME", pool=2), Conv(16, 5, "VALID", pool=2),
                     Dense(120), Dense(84), Dense(10))
    input_shape: tuple = (28, 28, 1)


class SmallVGG(DesignedCNN):
    """A small VGG for 32x32x3 inputs: [conv3x3(w)] x2 - pool - [conv3x3(2w)] x2 - pool -
    [conv3x3(4w)] x2 - pool - dense(10), ``w = 32``, every layer designed."""

    layers: tuple = (Conv(32), Conv(32, pool=2), Conv(64), Conv(64, pool=2),
                     Conv(128), Conv(128, pool=2), Dense(10))
    input_shape: tuple = (32, 32, 3)


# ----------------------------------------------------------------------------- checks


def _check_codes(p, infos):
    if not hasattr(p, "keys"):
        raise ValueError(f"code params must be a dict {{layer: theta}}; got {type(p).__name__}")
    names = [i.name for i in infos]
    if set(p.keys()) != set(names):
        raise ValueError(f"code params must have the layers {names}; got {sorted(p.keys())} "
                         "(plain params {layer: {'kernel', 'bias'}} go to apply_plain / "
                         "purify_layers, not materialize)")
    for info in infos:
        shape = tuple(np.shape(p[info.name]))
        if shape != (info.code_dim, info.units):
            raise ValueError(f"code params[{info.name!r}] has shape {shape}; expected "
                             f"{(info.code_dim, info.units)} (code_dim, units)")


def check_plain(model: DesignedCNN, plain) -> None:
    """Raise ``ValueError`` unless ``plain`` is ``{layer: {"kernel", "bias"}}`` of the right
    shapes for ``model``."""
    infos = model.layer_info()
    names = [i.name for i in infos]
    if not hasattr(plain, "keys"):
        raise ValueError(f"plain params must be a dict {{layer: {{'kernel', 'bias'}}}}; got "
                         f"{type(plain).__name__}")
    if set(plain.keys()) != set(names):
        raise ValueError(f"plain params must have exactly the layers {names}; got "
                         f"{sorted(map(str, plain.keys()))}")
    for info in infos:
        layer = plain[info.name]
        if not hasattr(layer, "keys") or set(layer.keys()) != {"kernel", "bias"}:
            got = sorted(layer.keys()) if hasattr(layer, "keys") else type(layer).__name__
            raise ValueError(f"plain params[{info.name!r}] must be {{'kernel', 'bias'}}; "
                             f"got {got}")
        for leaf, shape in (("kernel", info.kernel_shape), ("bias", (info.units,))):
            got = tuple(np.shape(layer[leaf]))
            if got != tuple(shape):
                raise ValueError(f"plain params[{info.name!r}][{leaf!r}] has shape {got}; "
                                 f"expected {tuple(shape)}")
            if not jnp.issubdtype(jnp.result_type(layer[leaf]), jnp.floating):
                raise ValueError(f"plain params[{info.name!r}][{leaf!r}] must be floating; "
                                 f"got {jnp.result_type(layer[leaf])}")


# ----------------------------------------------------------------------------- vectors


def layer_vectors(plain_layer: dict) -> jax.Array:
    """``(units, fan_in + 1)``: each unit's fan-in weights followed by its bias."""
    kernel = jnp.asarray(plain_layer["kernel"])
    units = kernel.shape[-1]
    w = kernel.reshape(-1, units).T
    return jnp.concatenate([w, jnp.asarray(plain_layer["bias"]).reshape(units, 1)], axis=1)


def with_layer_vectors(plain_layer: dict, vectors: jax.Array) -> dict:
    """The layer ``{"kernel", "bias"}`` holding ``vectors`` (the inverse of
    :func:`layer_vectors`), in the dtypes of ``plain_layer``."""
    kernel, bias = plain_layer["kernel"], plain_layer["bias"]
    return {"kernel": jnp.asarray(vectors[:, :-1].T.reshape(kernel.shape), kernel.dtype),
            "bias": jnp.asarray(vectors[:, -1], bias.dtype)}


# ----------------------------------------------------------------------------- purify


class LayerPurifyReport(NamedTuple):
    """What recovery found for one layer.

    Attributes:
        layer: layer name.
        units, rows, code_dim: ``B`` problems of ``rows x code_dim`` (``rows = fan_in + 1``;
            a layer in ``joint_layers``: one problem of the whole layer).
        ratio: ``rows / code_dim``.
        critical_fraction: Donoho-Tanner threshold (Gaussian designs, large size) at
            ``ratio``; small layers break earlier (finite-size effects).
        designed: False for a plain layer (left as it is).
        corrupted: ``{"kernel": bool, "bias": bool}`` entries judged corrupted (nonzero
            residual, or non-finite / screened).
        num_corrupted, fraction: their count and fraction of the layer's entries.
        num_nonfinite: NaN/Inf entries (treated as corrupted).
        num_screened: finite entries larger than ``screen x`` the layer's median ``|w|``
            (zeroed before solving, treated as corrupted; see :func:`purify_layers`).
        num_converged: problems whose duality gap met ``tol``.
        num_certified: problems fitting more rows than unknowns (``> code_dim``) to rounding
            (:func:`jaxpurify.purify.exactly_fit`) and not ambiguous.
        num_in_range: units already in ``range(A_l)`` to the interpolation tolerance
            (answered by least squares, not sent to the solver).
        converged, certified: all problems converged / certified.
        seconds: wall time of the layer (solve and reassembly; includes compilation the
            first time a shape is seen).
        warnings: human-readable doubts.
        num_ambiguous: problems whose judged-corrupted entries another vector of
            ``range(A_l)`` fits exactly, more than ``code_dim`` of them (two networks of the
            subspace explain the layer; see :func:`jaxpurify.purify.second_explanation`).
    """

    layer: str
    units: int
    rows: int
    code_dim: int
    ratio: float
    critical_fraction: float
    designed: bool
    corrupted: dict
    num_corrupted: int
    fraction: float
    num_nonfinite: int
    num_screened: int
    num_converged: int
    num_certified: int
    num_in_range: int
    converged: bool
    certified: bool
    seconds: float
    warnings: tuple
    num_ambiguous: int = 0

    def to_dict(self) -> dict:
        """JSON-friendly summary (without the masks)."""
        d = self._asdict()
        d.pop("corrupted")
        d["warnings"] = list(d["warnings"])
        return d


class MultiLayerReport(NamedTuple):
    """Per-layer reports and the total time."""

    layers: dict
    seconds: float

    @property
    def ok(self) -> bool:
        """Every designed layer converged and is certified."""
        return all(r.converged and r.certified for r in self.layers.values() if r.designed)

    @property
    def warnings(self) -> list[str]:
        return [w for r in self.layers.values() for w in r.warnings]

    def to_dict(self) -> dict:
        return {"ok": self.ok, "seconds": self.seconds,
                "layers": {k: r.to_dict() for k, r in self.layers.items()}}

    def summary(self) -> str:
        """A small table, one line per layer."""
        lines = [f"{'layer':6s} {'units':>5s} {'m x r':>10s} {'ratio':>6s} {'DT crit':>7s} "
                 f"{'corrupt':>8s} {'conv.':>7s} {'cert.':>7s} {'sec':>6s}"]
        for r in self.layers.values():
            lines.append(
                f"{r.layer:6s} {r.units:5d} {f'{r.rows}x{r.code_dim}':>10s} {r.ratio:6.2f} "
                f"{r.critical_fraction:7.3f} {r.fraction:8.4f} "
                f"{f'{r.num_converged}/{r.units}':>7s} {f'{r.num_certified}/{r.units}':>7s} "
                f"{r.seconds:6.2f}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _solve_dtype(dtype):
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"plain params must be floating, got {dtype}")
    return jnp.promote_types(dtype, jnp.float32)


@full_precision
def purify_layers(model: DesignedCNN, contaminated, *, method="admm", tol: float | None = None,
                  max_iters: int = 300, screen: float | None = 1e3,
                  layers: Sequence[str] | None = None):
    r"""Recover every layer of a contaminated designed network by L1 regression.

    For each designed layer ``l``, the unit vectors ``v_u = [w_u; b_u]`` (``units x
    (fan_in + 1)``) are modelled as ``A_l theta_u + e_u`` with ``e_u`` sparse and recovered by
    one batched ``l1_regression(A_l, V)`` (all units share ``A_l``: one factorization, every
    iteration a matrix-matrix product): ``v_u <- A_l theta_hat_u``. Layers are independent
    (the designed subspace does not depend on the other layers), so any order works.

    NaN/Inf entries (e.g. exponent bit flips) and absurdly large finite entries
    (``|v| > screen * median|v|`` over the layer) are set to 0 before solving and reported
    as corrupted. Setting a suspected entry to any value is always safe: if it was corrupted
    it stays one gross error, and if it was clean (never seen for ``screen=1e3``) it costs
    one error of the budget; the solve is then well scaled (a flipped exponent can reach
    ``3e38``, which overflows float32 sums).

    Units already in ``range(A_l)`` to the solver's interpolation tolerance (uncorrupted
    units; units hit only by tiny changes such as low-mantissa bit flips) are answered by
    least squares, every row interpolated (see ``_solve_layer``): the certified L1 solution,
    without the solver's slowest case.

    The solve runs in the params' dtype (float32 params: float32, tolerance 1e-5; the
    interpolation test is relative to float32 rounding, which is what float32 weights
    ``A theta`` carry; float64 params: float64, exact to ~1e-15).

    Args:
        model: the :class:`DesignedCNN` whose ``designs()`` the clean weights came from.
        contaminated: plain params ``{layer: {"kernel", "bias"}}`` (or wrapped in
            ``{"params": ...}``); NaN/Inf allowed.
        method, tol, max_iters: passed to :func:`jaxpurify.l1_regression` (a batch runs
            until its slowest member stops, so ``max_iters`` bounds the time of a layer;
            exact-recovery instances stop after tens of iterations). A unit counts as
            converged when the solver's relative gap meets ``tol`` or its absolute gap is at
            most ``tol * ||v_u||_1``.
        screen: threshold factor of the gross-outlier screen (None: only NaN/Inf).
        layers: names of the layers to purify (default: every designed layer).

    Returns:
        ``(recovered plain params, MultiLayerReport)``.

    Raises:
        ValueError: params not of the model's structure/shapes, unknown layer names.
    """
    t_all = time.perf_counter()
    if not isinstance(model, DesignedCNN):
        raise TypeError(f"purify_layers needs a DesignedCNN (LeNet5, SmallVGG, ...); got "
                        f"{type(model).__name__} (one-hidden-layer models: jaxpurify.purify)")
    plain = _unwrap(contaminated)
    check_plain(model, plain)
    infos = model.layer_info()
    names = [i.name for i in infos]
    if layers is None:
        layers = [i.name for i in infos if i.designed]
    unknown = set(layers) - set(names)
    if unknown:
        raise ValueError(f"unknown layers {sorted(unknown)}; the model has {names}")
    if screen is not None and not screen > 1:
        raise ValueError(f"screen must be > 1 or None, got {screen}")

    pad_to: dict = {}
    for i in map(model.problem_info, infos):
        if i.name in layers and i.designed:
            pad_to[(i.rows, i.code_dim)] = max(pad_to.get((i.rows, i.code_dim), 0), i.units)
    out = {k: dict(v) for k, v in plain.items()}
    reports = {}
    for info in infos:
        t0 = time.perf_counter()
        if info.name not in layers or not info.designed:
            reports[info.name] = _skipped_report(info, t0)
            continue
        problem = model.problem_info(info)  # a jointly coded layer: one vector
        vectors = layer_vectors(plain[info.name]).reshape(problem.units, problem.rows)
        dtype = _solve_dtype(vectors.dtype)
        vectors = vectors.astype(dtype)
        nonfinite = ~jnp.isfinite(vectors)
        clean_v = jnp.where(nonfinite, 0.0, vectors)
        screened = jnp.zeros_like(nonfinite)
        if screen is not None:
            finite_abs = np.abs(np.asarray(vectors)[~np.asarray(nonfinite)])
            scale = float(np.median(finite_abs)) if finite_abs.size else 0.0
            if scale > 0:
                screened = jnp.abs(clean_v) > screen * scale
                clean_v = jnp.where(screened, 0.0, clean_v)
        a = model.designs(dtype)[info.name]
        res = _solve_layer(a, clean_v, method=method, tol=tol, max_iters=max_iters,
                           pad_to=pad_to[(problem.rows, problem.code_dim)])
        shape = (info.units, info.rows)
        flagged = np.asarray(~res.interpolated | nonfinite | screened).reshape(shape)
        out[info.name] = with_layer_vectors(plain[info.name], res.recovered.reshape(shape))
        jax.block_until_ready(out[info.name])
        masks = {"kernel": flagged[:, :-1].T.reshape(info.kernel_shape),
                 "bias": flagged[:, -1].copy()}
        reports[info.name] = _layer_report(problem, res, masks, int(np.sum(nonfinite)),
                                           int(np.sum(screened & ~nonfinite)), t0)
    return out, MultiLayerReport(reports, time.perf_counter() - t_all)


class _LayerSolution(NamedTuple):
    recovered: jax.Array  # (U, m)
    interpolated: np.ndarray  # (U, m) bool
    converged: np.ndarray  # (U,) bool
    num_fit: np.ndarray  # (U,) rows fit to rounding (jaxpurify.purify.exactly_fit)
    ambiguous: np.ndarray  # (U,) bool: a second explanation (see jaxpurify.purify)
    in_range: np.ndarray  # (U,) bool: answered by least squares


@jax.jit
def _least_squares_fit(a, v):
    """Least-squares fits ``P_A v_u`` and which rows they interpolate (the solver's
    threshold ``eps**0.75 * max|v_u|``)."""
    eps = jnp.finfo(v.dtype).eps
    q, _ = jnp.linalg.qr(a)
    fit = (v @ q) @ q.T
    thr = eps**0.75 * jnp.maximum(jnp.max(jnp.abs(v), axis=1, keepdims=True),
                                  jnp.finfo(v.dtype).tiny)
    return fit, jnp.abs(v - fit) <= thr


def _solve_layer(a, v, *, method, tol, max_iters, pad_to: int = 0) -> _LayerSolution:
    """One batched L1 regression for the units of a layer, with a least-squares fast path.

    A unit whose vector already lies in ``range(A)`` to the solver's interpolation tolerance
    (``eps**0.75 * max|v|``; e.g. an uncorrupted unit, or one hit only by low-mantissa bit
    flips) is answered by its least-squares fit: every row is interpolated, so it is the
    certified L1 solution. Such a unit is the slowest case for the first-order solver (the
    optimum is a rounding-level objective that the relative duality gap must resolve; it
    was measured at thousands of iterations in float32), and a batch runs until its
    slowest member converges; so it is replaced in the batch by a copy of a unit that does
    need solving (same shapes: no recompilation), and its answer is the fit. The batch is
    padded the same way to ``pad_to`` units (one compilation for layers of equal
    ``A`` shape, e.g. the two convs of a VGG block).
    """
    units, m = v.shape
    vp = jnp.concatenate([v, jnp.zeros((pad_to - units, m), v.dtype)]) if pad_to > units else v
    fit, ls_interp = _least_squares_fit(a, vp)
    fit, ls_interp = fit[:units], np.asarray(ls_interp[:units])
    in_range = ls_interp.all(axis=1)
    if in_range.all():
        return _LayerSolution(fit, ls_interp, np.ones(len(v), bool), np.full(len(v), m),
                              np.zeros(len(v), bool), in_range)
    first = int(np.argmax(~in_range))
    y = jnp.where(jnp.asarray(in_range)[:, None], v[first], v)
    if pad_to > units:  # share one compiled solver with a same-shape layer of more units
        y = jnp.concatenate([y, jnp.broadcast_to(v[first], (pad_to - units, m))])
    sol = l1_regression(a, y, method=method, tol=tol, max_iters=max_iters, throw=False)
    sol, y = jax.tree_util.tree_map(lambda t: t[:units], sol), y[:units]
    keep = jnp.asarray(in_range)[:, None]
    recovered = jnp.where(keep, fit, sol.x @ a.T)
    interpolated = np.where(in_range[:, None], ls_interp, np.asarray(sol.interpolated))
    # The solver's gap is relative to the objective; when every error of a unit is small
    # (e.g. mid-mantissa bit flips) the objective is within a few hundred roundings of zero
    # and that relative gap cannot reach float32 tolerances. Accept the dual certificate
    # also when the absolute gap is below tol * ||y||_1 (the solver's own floor, eps *
    # ||y||_1, raised to tol).
    tol_ = default_tol(v.dtype) if tol is None else tol
    abs_gap = sol.objective - jnp.sum(y * sol.dual, axis=1)
    solvable = (sol.result == RESULTS.successful) | (sol.result == RESULTS.max_iters_reached)
    small_gap = (abs_gap <= tol_ * jnp.sum(jnp.abs(y), axis=1)) & solvable
    converged = in_range | np.asarray(sol.converged | small_gap)
    num_fit = np.where(in_range, m, fit_count(a, y, sol, method=method, tol=tol,
                                              max_iters=max_iters))
    ambiguous = ~in_range & (second_explanation(a, sol, method=method, tol=tol,
                                                max_iters=max_iters) > a.shape[1])
    return _LayerSolution(recovered, interpolated, converged, num_fit, ambiguous, in_range)


def _skipped_report(info: LayerInfo, t0: float) -> LayerPurifyReport:
    why = "plain (not designed)" if not info.designed else "not selected"
    return LayerPurifyReport(
        info.name, info.units, info.rows, info.code_dim, info.ratio, 0.0, info.designed,
        {}, 0, 0.0, 0, 0, 0, 0, 0, False, False, time.perf_counter() - t0,
        (f"{info.name}: {why}; left as it is",))


def _layer_report(info, sol, masks, num_nonfinite, num_screened, t0) -> LayerPurifyReport:
    n = info.code_dim
    num = int(masks["kernel"].sum() + masks["bias"].sum())
    fraction = num / info.size
    crit = float(critical_fraction(info.ratio))
    conv = np.asarray(sol.converged)
    ambiguous = np.asarray(sol.ambiguous)
    cert = (np.asarray(sol.num_fit) > n) & ~ambiguous
    warns = []
    if not conv.all():
        warns.append(f"{info.name}: {int((~conv).sum())} of {conv.size} problem(s) did not "
                     "converge (raise max_iters)")
    if ambiguous.any():
        warns.append(f"{info.name}: {int(ambiguous.sum())} unit(s) are ambiguous: the entries "
                     f"judged corrupted are themselves fit exactly, on more than the {n} "
                     "unknowns, by another vector of the subspace (an edit made consistent "
                     "with it looks like this); do not trust this layer without another check")
    doubtful = np.asarray(sol.num_fit) <= n
    if doubtful.any():
        warns.append(f"{info.name}: recovery is doubtful for {int(doubtful.sum())} of "
                     f"{doubtful.size} unit(s): the L1 solution fits no more rows than "
                     f"unknowns ({n}) to rounding, as past the recovery threshold (detected "
                     f"corrupted fraction {fraction:.3f}; Donoho-Tanner reference {crit:.3f} at "
                     f"ratio {info.ratio:.2f})")
    return LayerPurifyReport(
        info.name, info.units, info.rows, n, info.ratio, crit, True, masks, num, fraction,
        num_nonfinite, num_screened, int(conv.sum()), int(cert.sum()), int(sol.in_range.sum()),
        bool(conv.all()), bool(cert.all()), time.perf_counter() - t0, tuple(warns),
        int(ambiguous.sum()))


# ----------------------------------------------------------------------------- training


def _flip(key, xb):
    flip = jax.random.bernoulli(key, 0.5, (xb.shape[0], 1, 1, 1))
    return jnp.where(flip, xb[:, :, ::-1, :], xb)


def _random_crop(key, xb, pad: int):
    """Pad each image by ``pad`` zeros on every side and cut a random ``H x W`` window
    (the standard CIFAR translation augmentation); one offset per image."""
    n, h, w, _ = xb.shape
    padded = jnp.pad(xb, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * pad + 1)

    def cut(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

    return jax.vmap(cut)(padded, offsets)


def _augment(k_flip, k_crop, xb, hflip: bool, crop: int):
    """``xb`` randomly flipped (``hflip``) and shifted by up to ``crop`` pixels (``crop > 0``):
    the CIFAR-10 training transforms that :func:`train` and the defenses' training share."""
    if hflip:
        xb = _flip(k_flip, xb)
    if crop:
        xb = _random_crop(k_crop, xb, crop)
    return xb


def train(model: DesignedCNN, params, x, y, *, epochs: float = 1.0, batch_size: int = 128,
          optimizer: optax.GradientTransformation | None = None, key=None,
          hflip: bool = False, crop: int = 0, progress: bool = True, desc: str = "train"):
    """Minibatch cross-entropy training of the codes (the only trained parameters).

    Any optax optimizer keeps the designed structure exactly (only ``theta`` moves; the
    deployed weights are ``A theta``). Default: Adam (1e-3) with cosine decay.

    Args:
        model, params: the module and its code params (``{"params": ...}`` or bare).
        x, y: training images ``(N, H, W, C)`` and int labels (numpy; batches are moved to
            the device one at a time).
        epochs: passes over the data (fractions allowed).
        batch_size: minibatch size.
        optimizer: an optax transformation (default Adam with cosine decay).
        key: PRNG key or int seed for the batch order and augmentation.
        hflip: random horizontal flips (CIFAR-10 augmentation).
        crop: random translations by up to ``crop`` pixels (zero padding, then a random
            window of the original size); 0 turns it off.
        progress: show a tqdm bar.

    Returns:
        ``(params, losses)``: trained code params (bare dict) and the per-step losses.
    """
    from tqdm.auto import tqdm

    p = _unwrap(params)
    n = int(x.shape[0])
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    if crop < 0:
        raise ValueError(f"crop must be >= 0 pixels, got {crop}")
    per_epoch = n // batch_size
    steps = max(1, int(round(epochs * per_epoch)))
    if optimizer is None:
        optimizer = optax.adam(optax.cosine_decay_schedule(1e-3, steps))
    key = jax.random.PRNGKey(key if isinstance(key, int) else 0) if not hasattr(
        key, "shape") else key
    opt_state = optimizer.init(p)

    @jax.jit
    def step(p, opt_state, xb, yb, k):
        xb = _augment(*jax.random.split(k), xb, hflip, crop)

        def loss_fn(p):
            logits = model.apply({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    losses = np.empty(steps, np.float32)
    bar = tqdm(total=steps, desc=desc, disable=not progress, mininterval=2.0)
    done = 0
    while done < steps:
        perm = rng.permutation(n)
        for b in range(per_epoch):
            if done >= steps:
                break
            idx = np.sort(perm[b * batch_size:(b + 1) * batch_size])
            key, sub = jax.random.split(key)
            p, opt_state, loss = step(p, opt_state, jnp.asarray(x[idx]), jnp.asarray(y[idx]),
                                      sub)
            losses[done] = float(loss) if done % 50 == 0 or done == steps - 1 else np.nan
            done += 1
            bar.update(1)
            if done % 50 == 0:
                bar.set_postfix(loss=f"{losses[done - 50]:.3f}")
    bar.close()
    return p, losses


def predict(model: DesignedCNN, plain: dict, x, *, batch_size: int = 1000) -> np.ndarray:
    """Predicted classes of the plain network on ``x`` (in batches; NaN logits allowed)."""
    check_plain(model, plain)
    fn = _predict_fn(model)
    preds = [np.asarray(fn(plain, jnp.asarray(x[i:i + batch_size])))
             for i in range(0, int(x.shape[0]), batch_size)]
    return np.concatenate(preds) if preds else np.zeros((0,), np.int32)


_PREDICT_CACHE: dict = {}


def _predict_fn(model):
    fn = _PREDICT_CACHE.get(model)
    if fn is None:
        fn = jax.jit(lambda p, xb: jnp.argmax(model.apply_plain(p, xb, check=False), -1))
        _PREDICT_CACHE[model] = fn
    return fn


def accuracy(model: DesignedCNN, plain: dict, x, y, *, batch_size: int = 1000) -> float:
    """Test accuracy of the plain network (a non-finite logit row counts as wrong)."""
    fn = _PREDICT_CACHE.get(("acc", model))
    if fn is None:
        def acc_fn(p, xb, yb):
            logits = model.apply_plain(p, xb, check=False)
            ok = (jnp.argmax(logits, -1) == yb) & jnp.all(jnp.isfinite(logits), -1)
            return jnp.sum(ok)
        fn = jax.jit(acc_fn)
        _PREDICT_CACHE[("acc", model)] = fn
    check_plain(model, plain)
    n = int(x.shape[0])
    correct = sum(int(fn(plain, jnp.asarray(x[i:i + batch_size]),
                         jnp.asarray(y[i:i + batch_size])))
                  for i in range(0, n, batch_size))
    return correct / n


# ----------------------------------------------------------------------------- row space


def _patches(info: LayerInfo, spec, h: jax.Array) -> jax.Array:
    """``(rows, fan_in + 1)`` input patches ``[P_i h; 1]`` in plain kernel order."""
    if info.kind == "conv":
        k, c = info.kernel_shape[0], info.kernel_shape[2]
        eye = jnp.eye(k * k * c, dtype=h.dtype).reshape(k, k, c, k * k * c)
        pt = jax.lax.conv_general_dilated(h, eye, (1, 1), spec.padding,
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
        pt = pt.reshape(-1, k * k * c)
    else:
        pt = h.reshape(h.shape[0], -1)
    return jnp.concatenate([pt, jnp.ones((pt.shape[0], 1), pt.dtype)], axis=1)


def layer_patches(model: DesignedCNN, plain: dict, x) -> dict[str, jax.Array]:
    """Per layer: the input patches ``[P_i h_{l-1}(x_s); 1]`` (rows) for inputs ``x``, in
    plain kernel order, with the features ``h`` computed from ``plain``."""
    fn = _PREDICT_CACHE.get(("patches", model))
    if fn is None:
        def patches_fn(p, xb):
            feats = model.layer_inputs(p, xb)
            return {info.name: _patches(info, spec, feats[info.name])
                    for spec, info in zip(model.layers, model.layer_info(), strict=True)}
        fn = jax.jit(patches_fn)
        _PREDICT_CACHE[("patches", model)] = fn
    return fn(plain, jnp.asarray(x))


def patch_grams(model: DesignedCNN, plain: dict, x, *, batch_size: int = 50):
    """Per layer: float64 Gram matrix ``sum q q^T`` over the input patches ``q`` of
    :func:`layer_patches` for inputs ``x`` (accumulated on the host), and the patch count."""
    grams, rows = {}, {}
    for i in range(0, int(x.shape[0]), batch_size):
        for name, q in layer_patches(model, plain, x[i:i + batch_size]).items():
            q = np.asarray(q, np.float64)
            grams[name] = grams.get(name, 0.0) + q.T @ q
            rows[name] = rows.get(name, 0) + q.shape[0]
    return grams, rows


def principal_directions(gram) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a patch Gram matrix, leading direction first.

    Returns ``(lam, v)``: the eigenvalues of ``gram`` (in float64) in decreasing order, clipped
    at 0 (round-off makes the null ones slightly negative), and the orthonormal eigenvectors
    as the columns of ``v`` in the same order, so ``v[:, :r]`` spans the ``r`` directions that
    hold the most patch energy (``v[:, :gram_rank(gram)]``: the patches' span)."""
    lam, v = np.linalg.eigh(np.asarray(gram, np.float64))
    return np.clip(lam[::-1], 0, None), v[:, ::-1]


def gram_rank(gram, rtol: float = 1e-6) -> int:
    """Numerical rank of the span whose (float64) Gram matrix is ``gram``: singular values
    ``sqrt(eig)`` above ``rtol`` times the largest. ``rtol=1e-6`` sits above float32 noise in
    the features (~1e-7) and far above float64 round-off of the Gram (~1e-8 in singular
    values)."""
    ev = np.clip(np.linalg.eigvalsh(np.asarray(gram, np.float64)), 0, None)
    s = np.sqrt(ev)
    return int(np.sum(s > rtol * s.max())) if s.max() > 0 else 0


def row_space_ranks(model: DesignedCNN, plain: dict, x, *, batch_size: int = 50,
                    rtols: Sequence[float] = (1e-6, 1e-3)) -> dict:
    """Does the data row-space subspace exist at this data size?

    For each layer, the span of its input patches ``[P_i h_{l-1}(x_s); 1]`` over the inputs
    ``x`` (features from ``plain``): a (S)GD update of the layer lies in this span (at the
    features of the step), so the row-space recovery of the one-hidden-layer model needs
    its rank to be well below ``fan_in + 1``. Returns per layer ``{"dim": fan_in + 1,
    "patch_rows": ..., "rank": rank at rtols[0], "rank_rtol_<r>": ..., "ratio": dim /
    rank}``.
    """
    grams, rows = patch_grams(model, plain, x, batch_size=batch_size)
    out = {}
    for info in model.layer_info():
        ranks = [gram_rank(grams[info.name], t) for t in rtols]
        out[info.name] = {"dim": info.rows, "patch_rows": rows[info.name], "rank": ranks[0],
                          **{f"rank_rtol_{t:g}": r for t, r in zip(rtols, ranks, strict=True)},
                          "ratio": info.rows / max(ranks[0], 1)}
    return out
