"""Multi-layer designed CNNs and layer-by-layer purification (jaxpurify.multilayer).

Every purification here uses one small three-layer network whose layers come in only two
solver shapes ((10, 26, 7) and (10, 91, 23)), so each test worker compiles the L1 solver
twice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpurify import contamination as C
from jaxpurify.data import DataNotFoundError, load_mnist
from jaxpurify.multilayer import (
    Conv,
    Dense,
    DesignedCNN,
    LeNet5,
    SmallVGG,
    accuracy,
    gram_rank,
    layer_patches,
    layer_vectors,
    patch_grams,
    predict,
    principal_directions,
    purify_layers,
    row_space_ranks,
    train,
    with_layer_vectors,
)

# conv 5x5 (10) -> pool 2 -> conv 3x3 (10) -> pool 3 -> dense 90 -> 10 on 28x28x1 inputs;
# conv2 and fc1 both solve 10 problems of 91 x 23.
TINY_LAYERS = (Conv(10, 5, "VALID", pool=2), Conv(10, 3, "VALID", pool=3), Dense(10))


def tiny(dtype=jnp.float64, **kw) -> DesignedCNN:
    return DesignedCNN(layers=TINY_LAYERS, input_shape=(28, 28, 1), ratio=4.0,
                       param_dtype=dtype, **kw)


def init(model, seed=0):
    x = jnp.zeros((1, *model.input_shape), model.param_dtype)
    return jax.jit(model.init)(jax.random.PRNGKey(seed), x)["params"]


def rel_err(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_layer_info_presets():
    lenet = LeNet5()
    infos = lenet.layer_info()
    assert [i.name for i in infos] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert [i.fan_in for i in infos] == [25, 150, 400, 120, 84]
    assert lenet.num_params()["plain"] == 61706
    assert all(3.5 < i.ratio <= 4.0 for i in infos)
    vgg = SmallVGG()
    assert [i.kernel_shape for i in vgg.layer_info()][-1] == (2048, 10)
    per_layer = DesignedCNN(layers=TINY_LAYERS, ratio=(2.0, 3.0, 4.0))
    assert [i.code_dim for i in per_layer.layer_info()] == [13, 31, 23]


@pytest.mark.parametrize("make", [LeNet5, SmallVGG, tiny])
def test_materialize_apply_plain_consistency(make):
    model = make()
    params = init(model)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, *model.input_shape), model.param_dtype)
    plain = model.materialize(params)
    logits = jax.jit(model.apply)({"params": params}, x)
    assert logits.shape == (3, model.num_classes)
    scale = float(jnp.max(jnp.abs(logits)))  # float32 models: jit fusion reorders sums
    np.testing.assert_allclose(jax.jit(model.apply_plain)(plain, x), logits, rtol=1e-5,
                               atol=1e-5 * scale)
    # Wrapped params materialize the same; every unit vector lies in range(A_l).
    wrapped = model.materialize({"params": params})
    designs = model.designs(jnp.float64)
    for info in model.layer_info():
        np.testing.assert_array_equal(wrapped[info.name]["kernel"], plain[info.name]["kernel"])
        v = np.asarray(layer_vectors(plain[info.name]), np.float64)
        a = np.asarray(designs[info.name])
        theta, *_ = np.linalg.lstsq(a, v.T, rcond=None)
        assert np.linalg.norm(a @ theta - v.T) <= 1e-5 * np.linalg.norm(v)
        back = with_layer_vectors(plain[info.name], layer_vectors(plain[info.name]))
        np.testing.assert_array_equal(back["kernel"], plain[info.name]["kernel"])
        np.testing.assert_array_equal(back["bias"], plain[info.name]["bias"])


def test_designs_are_dtype_independent():
    model = tiny()
    d32, d64 = model.designs(jnp.float32), model.designs(jnp.float64)
    for k in d32:
        np.testing.assert_array_equal(np.asarray(d32[k], np.float64), d64[k])


@pytest.mark.parametrize("law", ["gaussian", "heavy_tailed"])
def test_purify_layers_exact_recovery_float64(law):
    model = tiny()
    clean = model.materialize(init(model, seed=3))
    dirty, mask = C.sparse_gross_errors(clean, jax.random.PRNGKey(4), fraction=0.1, law=law)
    recovered, report = purify_layers(model, dirty)
    assert report.ok, report.summary()
    for info in model.layer_info():
        r = report.layers[info.name]
        assert r.converged and r.certified and r.designed
        assert r.num_certified == r.units == info.units
        for leaf in ("kernel", "bias"):
            assert rel_err(recovered[info.name][leaf], clean[info.name][leaf]) <= 1e-10
            np.testing.assert_array_equal(r.corrupted[leaf], np.asarray(mask[info.name][leaf]))
        assert r.num_corrupted == sum(int(np.sum(m)) for m in mask[info.name].values())
    assert "conv1" in report.summary()
    assert report.to_dict()["ok"] is True


def test_purify_layers_clean_and_partly_clean_units():
    """Uncorrupted units are answered by least squares (in range to the interpolation
    tolerance) and not sent to the solver; the rest are still recovered exactly."""
    model = tiny()
    clean = model.materialize(init(model, seed=9))
    recovered, report = purify_layers(model, clean)
    assert report.ok
    for name, r in report.layers.items():
        assert r.num_in_range == r.units and r.num_corrupted == 0
        assert rel_err(recovered[name]["kernel"], clean[name]["kernel"]) <= 1e-12
    dirty = {k: dict(v) for k, v in clean.items()}
    dirty["fc1"]["kernel"] = dirty["fc1"]["kernel"].at[3, 2].add(5.0)  # one unit only
    recovered, report = purify_layers(model, dirty)
    assert report.ok and report.layers["fc1"].num_in_range == 9
    assert report.layers["fc1"].num_corrupted == 1 and report.layers["fc1"].corrupted[
        "kernel"][3, 2]
    assert rel_err(recovered["fc1"]["kernel"], clean["fc1"]["kernel"]) <= 1e-10


def test_purify_layers_nonfinite_and_huge_entries():
    model = tiny()
    clean = model.materialize(init(model, seed=5))
    dirty, mask = C.sparse_gross_errors(clean, jax.random.PRNGKey(6), fraction=0.05)
    dirty = {k: dict(v) for k, v in dirty.items()}
    mask = {k: {leaf: np.array(m) for leaf, m in v.items()} for k, v in mask.items()}
    # Exponent bit flips: NaN, Inf and ~1e38 entries (the last overflow float32 sums).
    for name, idx, value in (("conv1", (0, 0, 0, 1), np.nan), ("conv2", (1, 2, 3, 4), np.inf),
                             ("fc1", (7, 3), -np.inf), ("fc1", (11, 5), 3e38)):
        dirty[name]["kernel"] = dirty[name]["kernel"].at[idx].set(value)
        mask[name]["kernel"][idx] = True
    recovered, report = purify_layers(model, dirty)
    assert report.ok, report.summary()
    assert report.layers["conv1"].num_nonfinite == 1
    assert report.layers["fc1"].num_nonfinite == 1
    assert report.layers["fc1"].num_screened == 1
    for name in clean:
        for leaf in ("kernel", "bias"):
            assert np.all(np.isfinite(recovered[name][leaf]))
            assert rel_err(recovered[name][leaf], clean[name][leaf]) <= 1e-10
            np.testing.assert_array_equal(report.layers[name].corrupted[leaf], mask[name][leaf])


def test_joint_layer_recovers_edits_concentrated_in_one_unit():
    """60 of fc1's first unit's 91 entries edited: past the per-unit threshold; with fc1
    coded as a whole (``joint_layers``: one 910 x 230 problem) they are 60 of 910 entries
    and recovery is exact, float64, with every edited entry flagged."""
    from jaxpurify import defenses

    edited = {name: {"kernel": np.zeros(info.kernel_shape, bool),
                     "bias": np.zeros(info.units, bool)} for name, info in
              ((i.name, i) for i in tiny().layer_info())}
    edited["fc1"]["kernel"][:60, 0] = True
    for joint, exact in (((), False), (("fc1",), True)):
        model = tiny(joint_layers=joint)
        codes = init(model, seed=3)
        clean = model.materialize(codes)
        np.testing.assert_allclose(model.apply({"params": codes}, jnp.ones((2, 28, 28, 1))),
                                   model.apply_plain(clean, jnp.ones((2, 28, 28, 1))),
                                   rtol=1e-12)
        dirty = jax.tree_util.tree_map(lambda w, e: jnp.where(e, w + 1.0, w), clean, edited)
        recovered, report = purify_layers(model, dirty)
        fc1 = report.layers["fc1"]
        assert fc1.certified is exact
        assert (rel_err(recovered["fc1"]["kernel"], clean["fc1"]["kernel"]) <= 1e-10) is exact
    assert (fc1.units, fc1.rows, fc1.code_dim) == (1, 910, 230) and report.ok
    np.testing.assert_array_equal(fc1.corrupted["kernel"], edited["fc1"]["kernel"])
    assert report.layers["conv1"].units == 10  # the other layers stay per unit
    back = defenses._codes(model, clean)  # the code round trip of the one-vector layer
    assert max(float(jnp.max(jnp.abs(back[k] - codes[k]))) for k in codes) < 1e-10
    with pytest.raises(ValueError, match="joint_layers: \\['fc9'\\] are not designed"):
        tiny(joint_layers=("fc9",)).layer_info()


def test_an_edit_consistent_with_the_subspace_is_ambiguous():
    """fc1's first unit gets the entries holding 90% of an in-range change ``A delta`` (what
    ``attacks.subspace_edit`` writes): L1 returns ``w + A delta``, interpolating the written
    entries (more than the 23 unknowns), and the clean entries it calls corrupted are fit
    exactly by ``-A delta``: ambiguous, not certified, in ``purify_layers`` and in
    ``defenses.recover_designed`` alike. float64."""
    from jaxpurify import defenses
    from jaxpurify.attacks import _concentrated_support

    model = tiny()
    clean = model.materialize(init(model, seed=3))
    a = np.asarray(model.designs(jnp.float64)["fc1"])
    change = a @ np.random.default_rng(1).standard_normal(a.shape[1])
    written = _concentrated_support(change, 0.9)
    assert written.sum() > a.shape[1] and (~written).sum() > a.shape[1]  # both testable
    kernel = np.array(clean["fc1"]["kernel"])
    bias = np.array(clean["fc1"]["bias"])
    kernel[written[:-1], 0] += change[:-1][written[:-1]]
    bias[0] += change[-1] if written[-1] else 0.0
    dirty = {**clean, "fc1": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}
    recovered, report = purify_layers(model, dirty)
    fc1 = report.layers["fc1"]
    assert fc1.num_ambiguous == 1 and not fc1.certified and not report.ok
    assert any("ambiguous" in w for w in fc1.warnings)
    np.testing.assert_allclose(recovered["fc1"]["kernel"][:, 0],
                               clean["fc1"]["kernel"][:, 0] + change[:-1], atol=1e-10)
    assert rel_err(recovered["fc1"]["kernel"][:, 1:], clean["fc1"]["kernel"][:, 1:]) <= 1e-10
    _, info = defenses.recover_designed(model, dirty)
    assert info["fc1"]["ambiguous_rows"] == 1 and not info["fc1"]["certified"]


def test_purify_layers_bad_inputs():
    model = tiny()
    params = init(model)
    plain = model.materialize(params)
    with pytest.raises(ValueError, match="exactly the layers"):
        purify_layers(model, {k: v for k, v in plain.items() if k != "fc1"})
    with pytest.raises(ValueError, match="exactly the layers"):
        purify_layers(model, {**plain, "fc9": plain["fc1"]})
    with pytest.raises(ValueError, match="must be \\{'kernel', 'bias'\\}"):
        purify_layers(model, params)  # code params, not plain params
    with pytest.raises(ValueError, match="must be \\{'kernel', 'bias'\\}"):
        purify_layers(model, {**plain, "conv2": {"kernel": plain["conv2"]["kernel"]}})
    with pytest.raises(ValueError, match="has shape"):
        purify_layers(model, {**plain, "fc1": {"kernel": plain["fc1"]["kernel"][:-1],
                                              "bias": plain["fc1"]["bias"]}})
    with pytest.raises(ValueError, match="must be a dict"):
        purify_layers(model, [plain])
    with pytest.raises(ValueError, match="unknown layers"):
        purify_layers(model, plain, layers=["conv7"])
    with pytest.raises(ValueError, match="screen"):
        purify_layers(model, plain, screen=0.5)
    with pytest.raises(TypeError, match="DesignedCNN"):
        purify_layers(object(), plain)
    with pytest.raises(ValueError, match="code params"):
        model.materialize(plain)  # plain params where codes are expected
    with pytest.raises(ValueError, match="has shape"):
        model.materialize({**params, "fc1": params["fc1"][:-1]})
    with pytest.raises(ValueError, match="inputs must be"):
        model.apply_plain(plain, jnp.zeros((2, 32, 32, 3)))
    with pytest.raises(ValueError, match="ratio"):
        DesignedCNN(layers=TINY_LAYERS, ratio=1.0).layer_info()
    with pytest.raises(ValueError, match="before the dense"):
        DesignedCNN(layers=(Dense(4), Conv(3))).layer_info()


def test_plain_last_layer_is_left_alone():
    model = tiny(plain_last=True)
    infos = model.layer_info()
    assert not infos[-1].designed and infos[-1].code_dim == infos[-1].rows
    clean = model.materialize(init(model))
    dirty, _ = C.sparse_gross_errors(clean, jax.random.PRNGKey(8), fraction=0.1)
    recovered, report = purify_layers(model, dirty)
    assert report.ok  # every designed layer certified
    assert not report.layers["fc1"].designed
    assert any("plain (not designed)" in w for w in report.warnings)
    np.testing.assert_array_equal(recovered["fc1"]["kernel"], dirty["fc1"]["kernel"])
    assert rel_err(recovered["conv2"]["kernel"], clean["conv2"]["kernel"]) <= 1e-10


def test_row_space_is_full_for_conv_layers():
    """One image already spans every patch direction of the first conv layer: the data
    row-space subspace has no redundancy for conv layers."""
    model = tiny()
    plain = model.materialize(init(model))
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 28, 28, 1))
    ranks = row_space_ranks(model, plain, x)
    assert ranks["conv1"]["rank"] == ranks["conv1"]["dim"] == 26
    assert ranks["conv1"]["patch_rows"] == 24 * 24
    assert ranks["fc1"]["rank"] == 1  # one image: one feature vector (with its 1)


def test_principal_directions_order_the_patch_energy_and_span_the_patches():
    """The eigenpairs of a layer's patch Gram come leading first, reconstruct it, and their
    first ``gram_rank`` directions hold every patch (three images: fc1 has rank 3 of 91)."""
    model = tiny()
    plain = model.materialize(init(model))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 28, 28, 1), jnp.float64)
    g = patch_grams(model, plain, x)[0]["fc1"]
    lam, v = principal_directions(g)
    assert np.all(np.diff(lam) <= 0) and np.all(lam >= 0)
    np.testing.assert_allclose(v @ np.diag(lam) @ v.T, g, atol=1e-10 * lam[0])
    np.testing.assert_allclose(v.T @ v, np.eye(len(lam)), atol=1e-12)
    r = gram_rank(g)
    q = np.asarray(layer_patches(model, plain, x)["fc1"])
    assert r == 3
    np.testing.assert_allclose(q - (q @ v[:, :r]) @ v[:, :r].T, 0.0, atol=1e-10)
    assert np.linalg.norm(q @ v[:, r - 1]) > 1e-6  # the r-th direction carries patches


def _mnist_slice():
    try:
        return load_mnist(limit_train=600, limit_test=500, dtype="float64")
    except DataNotFoundError as err:  # pragma: no cover - CI has the data
        pytest.skip(f"MNIST not available: {err}")


def test_real_mnist_slice_purified_predictions_equal_clean():
    ds = _mnist_slice()
    model = tiny()
    params, losses = train(model, init(model, seed=1), ds.x_train, ds.y_train, epochs=4,
                           batch_size=50, key=0, progress=False, optimizer=optax.adam(1e-2))
    assert np.isfinite(losses[0]) and np.isfinite(losses[-1])
    clean = model.materialize(params)
    acc = accuracy(model, clean, ds.x_test, ds.y_test)
    assert acc > 0.3  # 48 Adam steps on 600 images: well above chance (0.1)
    dirty, _ = C.sparse_gross_errors(clean, jax.random.PRNGKey(7), fraction=0.1)
    assert accuracy(model, dirty, ds.x_test, ds.y_test) < acc
    recovered, report = purify_layers(model, dirty)
    assert report.ok, report.summary()
    np.testing.assert_array_equal(predict(model, recovered, ds.x_test),
                                  predict(model, clean, ds.x_test))


def test_random_crop_cuts_a_window_of_the_padded_image():
    from jaxpurify.multilayer import _random_crop

    x = jnp.arange(2 * 5 * 6 * 3, dtype=jnp.float32).reshape(2, 5, 6, 3) + 1
    pad = 2
    out = np.asarray(_random_crop(jax.random.PRNGKey(3), x, pad))
    assert out.shape == x.shape
    padded = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    for img, src in zip(out, padded, strict=True):
        windows = [src[i:i + 5, j:j + 6] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
        assert any(np.array_equal(img, w) for w in windows)


def test_train_with_crop_and_flip_runs_and_rejects_negative_crop():
    ds = _mnist_slice()
    model = tiny(jnp.float32)
    params, losses = train(model, init(model, seed=1), ds.x_train[:100], ds.y_train[:100],
                           epochs=1, batch_size=50, key=0, progress=False, hflip=True, crop=2)
    assert np.all(np.isfinite(np.asarray(losses[[0, -1]])))
    with pytest.raises(ValueError, match="crop"):
        train(model, params, ds.x_train[:100], ds.y_train[:100], batch_size=50, crop=-1,
              progress=False)
