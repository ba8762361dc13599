"""One-hidden-layer CNN models: patches, pooling, the designed parameterization.

Two image shapes only (compilations are per shape): the shared ``(4, 16, 16, 1)`` setup with
8x8 patches, and ``(2, 16, 16, 3)`` colour images with 4x8 patches, 6 filters and 3 classes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpurify.models import (
    DesignedOneHiddenLayerCNN,
    OneHiddenLayerCNN,
    design_matrix,
    extract_patches,
)
from jaxpurify.models._one_hidden import _DESIGNS
from tests.one_hidden_helpers import (
    fast_compiles,  # noqa: F401 (autouse fixture)
    init,
    setup,
)

F64 = jnp.float64
X3 = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3)), F64)


def _colour_model(pool="sum"):
    return OneHiddenLayerCNN(6, (4, 8), num_classes=3, pool=pool, param_dtype=F64)


@functools.cache
def _colour_params():
    params = init(_colour_model(), jax.random.PRNGKey(2), X3)
    return jax.tree_util.tree_map(lambda a: a + 0.1, params)  # nonzero biases


def _designed(pool="sum", seed=0, dtype=F64):
    return DesignedOneHiddenLayerCNN(6, (4, 8), in_channels=3, filter_code_dim=5,
                                     readout_code_dim=3, num_classes=3, pool=pool,
                                     design_seed=seed, param_dtype=dtype)


def _conv(model, params, x):
    return model.apply({"params": params}, x, method=lambda m, x: m.conv(x))


def test_patches_times_kernel_is_the_strided_conv():
    cases = [(setup().student, setup().p0, setup().x, (8, 8)),
             (_colour_model(), _colour_params(), X3, (4, 8))]
    for model, params, x, (ph, pw) in cases:
        n, h, w, c = x.shape
        j = params["conv"]["kernel"].shape[-1]
        patches = extract_patches(x, (ph, pw))
        assert patches.shape == (n, (h // ph) * (w // pw), ph * pw * c)
        conv = _conv(model, params, x)
        assert conv.shape == (n, h // ph, w // pw, j)
        ours = patches @ params["conv"]["kernel"].reshape(-1, j) + params["conv"]["bias"]
        np.testing.assert_allclose(ours, conv.reshape(n, -1, j), rtol=0, atol=1e-13)
        # Patch 1 is the second block of the first block row, flattened in (ph, pw, C) order.
        np.testing.assert_array_equal(patches[1, 1], x[1, :ph, pw:2 * pw, :].reshape(-1))


@pytest.mark.parametrize("pool", ["sum", "mean"])
def test_model_is_the_formula(pool):
    """f(x) = sum_j beta_j pool_i relu(W_j^T P_i x + b_j), 3 channels, 3 classes."""
    model, params = _colour_model(pool), _colour_params()
    assert params["conv"]["kernel"].dtype == F64
    z = jax.nn.relu(extract_patches(X3, (4, 8)) @ params["conv"]["kernel"].reshape(-1, 6)
                    + params["conv"]["bias"])  # (N, k = 8, J)
    h = z.sum(axis=1) if pool == "sum" else z.mean(axis=1)
    out = model.apply({"params": params}, X3)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out, h @ params["readout"]["kernel"], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(model.apply({"params": params}, X3, method=model.hidden), h,
                               rtol=1e-13, atol=1e-13)
    if pool == "mean":  # the same function as sum pooling up to the factor k = 8
        np.testing.assert_allclose(_colour_model("sum").apply({"params": params}, X3),
                                   8 * out, rtol=1e-13)


def test_model_without_bias():
    model = OneHiddenLayerCNN(32, 8, use_bias=False, pool="mean", param_dtype=F64)
    params = init(model, jax.random.PRNGKey(0), setup().x)
    assert set(params["conv"]) == {"kernel"}
    assert model.apply({"params": params}, setup().x).shape == (4, 1)


@pytest.mark.parametrize("pool", ["sum", "mean"])
def test_materialize_is_the_same_function(pool):
    dm = _designed(pool)
    codes = init(dm, jax.random.PRNGKey(3), X3)
    assert codes["conv_code"].shape == (5, 6) and codes["readout_code"].shape == (3, 3)
    plain = dm.materialize(codes)
    assert plain["conv"]["kernel"].shape == (4, 8, 3, 6)
    assert plain["conv"]["bias"].shape == (6,)
    assert plain["readout"]["kernel"].shape == (6, 3)
    # The structure of the plain model's own params.
    ref = _colour_params()
    assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(ref)
    out = dm.apply({"params": codes}, X3)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(dm.plain_model().apply({"params": plain}, X3), out,
                               rtol=1e-12, atol=1e-13)
    # {"params": ...} accepted too; [W; b] = A_W theta and beta = A_beta phi.
    again = dm.materialize({"params": codes})
    np.testing.assert_array_equal(again["conv"]["kernel"], plain["conv"]["kernel"])
    designs = dm.designs(F64)
    wb = np.concatenate([np.asarray(plain["conv"]["kernel"]).reshape(-1, 6),
                         np.asarray(plain["conv"]["bias"])[None]])
    np.testing.assert_allclose(wb, designs["conv"] @ codes["conv_code"], atol=1e-14)
    np.testing.assert_allclose(plain["readout"]["kernel"],
                               designs["readout"] @ codes["readout_code"], atol=1e-14)


def test_designs_are_reproducible_from_the_seed():
    a, b, c = _designed(seed=4), _designed(seed=4), _designed(seed=5)
    da, db, dc = a.designs(F64), b.designs(F64), c.designs(F64)
    assert da["conv"].shape == (4 * 8 * 3 + 1, 5) and da["readout"].shape == (6, 3)
    for name in ("conv", "readout"):
        np.testing.assert_array_equal(da[name], db[name])
        assert not np.allclose(da[name], dc[name])
        # The same matrix in every dtype, up to rounding (a pure function of the seed).
        np.testing.assert_allclose(a.designs(jnp.float32)[name], da[name], rtol=1e-6,
                                   atol=1e-7)
    np.testing.assert_array_equal(design_matrix(4, 97, 5, F64), da["conv"])
    # Entries scaled by 1/sqrt(cols): A theta has the variance of theta's entries.
    big = np.asarray(design_matrix(0, 4000, 16, F64))
    assert abs(big.var() * 16 - 1) < 0.05


def test_materialize_float32_codes_on_float64_inputs():
    """The trained function (designs cast to the inputs' dtype) and the materialized one
    (designs in the codes' dtype) use the same A."""
    dm = _designed(dtype=jnp.float32)
    codes = init(dm, jax.random.PRNGKey(0), X3)
    plain = dm.materialize(codes)
    assert plain["conv"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(dm.plain_model().apply({"params": plain}, X3),
                               dm.apply({"params": codes}, X3), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 15, 16, 3), (2, 16, 12, 3), (16, 16, 3)])
def test_bad_image_sizes_raise(shape):
    x = jnp.zeros(shape, F64)
    with pytest.raises(ValueError):
        extract_patches(x, (4, 8))
    with pytest.raises(ValueError):
        _designed().init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError):  # a VALID conv would silently drop the border
        _colour_model().init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError):
        _colour_model().apply({"params": _colour_params()}, x)


@pytest.mark.parametrize("joint", [("readout",), ("conv", "readout")])
def test_joint_layers_code_the_whole_layer(joint):
    """``vec(layer) = A theta`` with one (units * rows) x (units * r) design; the codes keep
    their shape, the materialized weights are the same function, and ``codes`` inverts it."""
    dm = DesignedOneHiddenLayerCNN(6, (4, 8), in_channels=3, filter_code_dim=5,
                                   readout_code_dim=3, num_classes=3, param_dtype=F64,
                                   joint_layers=joint)
    codes = init(dm, jax.random.PRNGKey(3), X3)
    assert codes["conv_code"].shape == (5, 6) and codes["readout_code"].shape == (3, 3)
    designs, per_unit = dm.designs(F64), _designed().designs(F64)
    shapes = {"conv": (6 * 97, 6 * 5), "readout": (3 * 6, 3 * 3)}
    for name in ("conv", "readout"):
        assert designs[name].shape == (shapes[name] if name in joint else
                                       per_unit[name].shape)
    plain = dm.materialize(codes)
    np.testing.assert_allclose(dm.plain_model().apply({"params": plain}, X3),
                               dm.apply({"params": codes}, X3), rtol=1e-12, atol=1e-13)
    # unit after unit: the readout's columns (classes) stacked are A_beta phi
    beta = np.asarray(plain["readout"]["kernel"])
    np.testing.assert_allclose(beta.T.reshape(-1),
                               designs["readout"] @ np.asarray(codes["readout_code"]).T.reshape(-1),
                               atol=1e-14)
    np.testing.assert_allclose(dm.codes("readout", beta.T, designs["readout"]),
                               codes["readout_code"], atol=1e-12)
    with pytest.raises(ValueError, match="joint_layers: unknown layers"):
        DesignedOneHiddenLayerCNN(6, 4, 1, 5, 3, joint_layers=("dense",)).designs()


def test_whole_layer_designs_are_drawn_once_and_can_be_large():
    """A jointly coded MNIST conv layer (64 filters of 14 x 14 + 1): 12608 x 3072, whose shape
    id passes 2**32 (``fold_in`` takes uint32); drawn once per process (the cache the
    multilayer designs use), :func:`design_matrix`'s numbers, scaled like every design."""
    dm = DesignedOneHiddenLayerCNN(64, 14, 1, 48, 16, num_classes=10, joint_layers=("conv",))
    a = dm.designs(jnp.float32)["conv"]
    assert a.shape == (64 * 197, 64 * 48) and bool(jnp.all(jnp.isfinite(a)))
    # drawn by one compiled call, like the multilayer designs: design_matrix up to rounding
    np.testing.assert_allclose(a, design_matrix(0, 64 * 197, 64 * 48), rtol=1e-6, atol=1e-8)
    drawn = dict(_DESIGNS)
    np.testing.assert_allclose(dm.designs(jnp.float64)["conv"], a, rtol=1e-6)  # no new draw
    assert _DESIGNS == drawn and _DESIGNS[(0, 64 * 197, 64 * 48)] is drawn[(0, 64 * 197, 64 * 48)]
    assert abs(float(a.var()) * 64 * 48 - 1) < 0.01
