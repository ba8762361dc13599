r"""Recovery subspaces ``A`` for the one-hidden-layer CNN, one per source of structure.

Each builder returns a :class:`LayerProblem`: the rows of ``layer_vectors(params)`` are
modelled as ``offset + design @ theta + e`` with ``e`` sparse, and ``purify`` solves
``min ||vectors - offset - design theta||_1`` with :func:`jaxpurify.l1_regression`.

Vectors (the layout every builder shares):

* filters: one row per filter, ``[W_j; b_j]`` (``d + 1`` entries, ``W_j`` in Flax kernel
  order ``(ph, pw, C)``): :func:`filter_vectors`.
* readout: one row per output class ``c``, ``beta[:, c]`` (``J`` entries):
  :func:`readout_vectors`.

Sources (which training procedures keep the parameters in the subspace, exactly):

* **data row-space** (:func:`filter_row_space`): ``A_W`` is an orthonormal basis of the
  span of the training patches ``[P_i x_s; 1]``. Exact for any (S)GD / momentum / Nesterov
  trajectory from ``w_0`` on those inputs, any loss, with or without the readout training;
  with weight decay, exact with ``weight_decay=True`` (the design gains the column ``w_0``).
  Needs fewer patches than ``d + 1`` (the span must be a proper subspace).
  The readout (:func:`readout_row_space`): ``A_beta`` spans the hidden features
  ``h(x_s)`` at the final filters; exact when the readout was trained with the filters fixed
  (frozen filters or two-stage training; with weight decay, ``weight_decay=True`` again adds
  ``beta_0``), not for joint training, where the features moved.
* **lazy / per-sample** (:func:`filter_lazy`): with activation patterns and readout fixed at
  init, the update of all filters together is one coefficient per (sample, class):
  ``Delta[W_j; b_j] = sum_{s,c} theta_{s,c} beta_{j,c} sum_i 1[W_j^T P_i x_s + b_j > 0]
  [P_i x_s; 1]``. Far fewer unknowns (``N C`` for ``J (d + 1)`` parameters); exact only while
  no activation pattern flips and the readout is frozen (the lazy regime).
* **designed** (:func:`designed`): the network was trained as ``[W_j; b_j] = A_W theta_j``,
  ``beta_c = A_beta phi_c`` with seeded random ``A`` (``DesignedOneHiddenLayerCNN``); exact at
  any data size, the ratio being chosen up front.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpurify._precision import full_precision
from jaxpurify.models import OneHiddenLayerCNN, extract_patches

SOURCES = ("row_space", "lazy", "designed")


class LayerProblem(NamedTuple):
    """One family of recovery problems for one layer.

    Attributes:
        layer: ``"conv"`` or ``"readout"``.
        source: the subspace source that built it.
        design: ``(m, n)`` shared by every row, or ``(B, m, n)``.
        offset: ``(B, m)`` known part (``w_0``; zeros when ``w_0`` is a design column).
    """

    layer: str
    source: str
    design: jax.Array
    offset: jax.Array

    @property
    def ratio(self) -> float:
        """Overparameterization ratio ``m / n`` (parameters per unknown)."""
        m, n = self.design.shape[-2:]
        return m / n


def _pair_of(p) -> tuple[int, int]:
    return (p, p) if isinstance(p, int) else tuple(p)


def _params(p):
    return p["params"] if isinstance(p, dict) and "params" in p and len(p) == 1 else p


def filter_vectors(params) -> jax.Array:
    """``(J, d + 1)``: each filter with its bias (zeros if the model has no bias)."""
    conv = _params(params)["conv"]
    kernel = conv["kernel"]
    j = kernel.shape[-1]
    w = kernel.reshape(-1, j).T
    b = conv.get("bias", jnp.zeros((j,), kernel.dtype))
    return jnp.concatenate([w, b[:, None]], axis=1)


def with_filter_vectors(params, vectors: jax.Array):
    """Params with the filters (and bias, if present) replaced by ``vectors``."""
    p = dict(_params(params))
    conv = dict(p["conv"])
    kernel = conv["kernel"]
    conv["kernel"] = vectors[:, :-1].T.reshape(kernel.shape).astype(kernel.dtype)
    if "bias" in conv:
        conv["bias"] = vectors[:, -1].astype(conv["bias"].dtype)
    p["conv"] = conv
    return p


def readout_vectors(params) -> jax.Array:
    """``(C, J)``: one row per output class."""
    return _params(params)["readout"]["kernel"].T


def with_readout_vectors(params, vectors: jax.Array):
    p = dict(_params(params))
    kernel = p["readout"]["kernel"]
    p["readout"] = {**p["readout"], "kernel": vectors.T.astype(kernel.dtype)}
    return p


def principal_row_basis(rows: jax.Array) -> jax.Array:
    """Orthonormal basis (``m x r``) of the span of ``rows`` (``N x m``) by SVD, its columns
    the right singular vectors in decreasing order of singular value (so ``[:, :k]`` spans the
    ``k`` leading principal directions of the rows).

    The rank uses ``numpy.linalg.matrix_rank``'s tolerance (``eps * max(N, m) * s_max``), so
    directions the trajectory can actually move along are never dropped.
    """
    rows = jnp.asarray(rows)
    _, s, vt = jnp.linalg.svd(rows, full_matrices=False)
    return vt[: int(numerical_rank(s, rows.shape))].T


def numerical_rank(singular_values: jax.Array, shape) -> jax.Array:
    """The number of singular values (decreasing) of a ``shape`` matrix above
    ``numpy.linalg.matrix_rank``'s tolerance ``eps * max(shape) * s_max``; traceable."""
    s = singular_values
    return jnp.sum(s > jnp.finfo(s.dtype).eps * max(shape) * s[0])


def orthonormal_row_basis(rows: jax.Array, *, what: str = "rows") -> jax.Array:
    """:func:`principal_row_basis` for a subspace to recover onto.

    Raises:
        ValueError: if the span is all of ``R^m`` (nothing to recover from).
    """
    basis = principal_row_basis(rows)
    m, r = basis.shape
    if r >= m:
        raise ValueError(
            f"the {what} span all of R^{m} (rank {r}): this subspace has no redundancy, so "
            "nothing can be recovered. Use fewer inputs than the vector length, a larger "
            "filter/patch, or a designed parameterization (subspace='designed')."
        )
    return basis


def augmented_patches(model: OneHiddenLayerCNN, inputs) -> jax.Array:
    """``(N k, d + 1)``: every patch ``[P_i x; 1]`` of ``inputs``, the rows the filters'
    row-space spans."""
    p = extract_patches(inputs, model.patch_size)
    p = p.reshape(-1, p.shape[-1])
    return jnp.concatenate([p, jnp.ones((p.shape[0], 1), p.dtype)], axis=1)


@full_precision
def filter_row_space(model: OneHiddenLayerCNN, init_params, inputs, *,
                     weight_decay: bool = False) -> LayerProblem:
    """Data row-space ``A_W`` for the filters (see module docstring)."""
    basis = orthonormal_row_basis(augmented_patches(model, inputs), what="training patches")
    w0 = filter_vectors(init_params)
    if not weight_decay:
        return LayerProblem("conv", "row_space", basis.astype(w0.dtype), w0)
    # w_j = c w0_j + basis theta_j: per-filter designs [basis, w0_j], no offset.
    designs = jnp.concatenate(
        [jnp.broadcast_to(basis, (w0.shape[0],) + basis.shape), w0[:, :, None]], axis=2)
    return LayerProblem("conv", "row_space", designs.astype(w0.dtype), jnp.zeros_like(w0))


def hidden_features(model: OneHiddenLayerCNN, params, inputs) -> jax.Array:
    """``(N, J)`` pooled hidden features of ``inputs`` under ``params``."""
    return model.apply({"params": _params(params)}, inputs, method=model.hidden)


@full_precision
def readout_row_space(model: OneHiddenLayerCNN, params, init_params, inputs, *,
                      weight_decay: bool = False) -> LayerProblem:
    """``A_beta``: span of the hidden features at the filters of ``params``.

    With ``weight_decay=True`` each class's design gains the column ``beta_0[:, c]`` (as for
    the filters: ``beta_c = c_t beta_c(0) + span``).
    """
    feats = hidden_features(model, params, inputs)
    basis = orthonormal_row_basis(feats, what="hidden features")
    beta0 = readout_vectors(init_params)
    if not weight_decay:
        return LayerProblem("readout", "row_space", basis.astype(beta0.dtype), beta0)
    designs = jnp.concatenate(
        [jnp.broadcast_to(basis, (beta0.shape[0],) + basis.shape), beta0[:, :, None]], axis=2)
    return LayerProblem("readout", "row_space", designs.astype(beta0.dtype),
                        jnp.zeros_like(beta0))


@full_precision
def filter_lazy(model: OneHiddenLayerCNN, init_params, inputs) -> LayerProblem:
    """Lazy per-sample design: one problem, all filters stacked (``J (d+1)`` entries)."""
    p0 = _params(init_params)
    patches = extract_patches(inputs, model.patch_size)  # (N, k, d)
    aug = jnp.concatenate([patches, jnp.ones(patches.shape[:2] + (1,), patches.dtype)], -1)
    w0 = filter_vectors(p0)  # (J, d+1)
    active = (jnp.einsum("nkt,jt->nkj", aug, w0) > 0).astype(aug.dtype)
    v = jnp.einsum("nkj,nkt->njt", active, aug)  # (N, J, d+1)
    beta0 = p0["readout"]["kernel"]  # (J, C)
    cols = jnp.einsum("jc,njt->jtnc", beta0, v)
    design = cols.reshape(w0.size, -1)
    design = orthonormal_row_basis(design.T, what="lazy per-sample directions")
    return LayerProblem("conv", "lazy", design.astype(w0.dtype), w0.reshape(1, -1))


def designed(designs: dict, params) -> dict[str, LayerProblem]:
    """Problems for a network trained in the code parameterization (no offset).

    A design with one row per entry of a unit vector codes each unit (one problem per unit);
    one with a row per entry of the whole layer codes the layer as one vector (``vec`` of the
    unit vectors, unit after unit: ``DesignedOneHiddenLayerCNN(joint_layers=...)``), and the
    problem's ``offset`` then has a single row.
    """
    out = {}
    for name, vectors in (("conv", filter_vectors), ("readout", readout_vectors)):
        if name not in designs:
            continue
        v = vectors(params)
        a = jnp.asarray(designs[name], v.dtype)
        m = a.shape[-2]
        if m == v.size and m != v.shape[1]:
            v = v.reshape(1, -1)
        elif m != v.shape[1]:
            raise ValueError(f"the {name!r} design has {m} rows; the layer has {v.shape[1]} "
                             f"entries per unit and {v.size} in all (one of these is needed)")
        out[name] = LayerProblem(name, "designed", a, jnp.zeros_like(v))
    return out


def count_parameters(tree) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(tree)))
