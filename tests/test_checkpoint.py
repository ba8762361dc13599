"""jaxpurify.checkpoint: orbax round trip, sidecar, corruption detection, never overwriting."""

import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpurify import checkpoint as C
from jaxpurify.models import DesignedOneHiddenLayerCNN, OneHiddenLayerCNN


def _plain(dtype=jnp.float64, **kw):
    model = OneHiddenLayerCNN(6, (4, 2), num_classes=3, pool="mean", param_dtype=dtype, **kw)
    x = jnp.ones((1, 8, 8, 2), dtype)
    p0 = model.init(jax.random.PRNGKey(0), x)["params"]
    p = jax.tree_util.tree_map(lambda a: a + 0.5, p0)
    return model, p0, p, x


def _designed(joint_layers=()):
    model = DesignedOneHiddenLayerCNN(8, 4, in_channels=1, filter_code_dim=5, readout_code_dim=3,
                                      num_classes=2, design_seed=3, param_dtype=jnp.float64,
                                      joint_layers=joint_layers)
    code = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 1)))["params"]
    return model, code


def _snapshot(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _assert_tree_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_round_trip_plain(tmp_path, dtype):
    model, p0, p, x = _plain(dtype)
    out = C.save_model(tmp_path / "ck", model, {"params": p}, init_params=p0,
                       training_data={"dataset": "mnist", "limit": 64, "normalize": True},
                       metadata={"note": "hello", "steps": 3, "shape": (1, 2)})
    assert out == tmp_path / "ck" and C.is_checkpoint(out)
    ck = C.load_checkpoint(out)
    assert ck.model == model and type(ck.model) is OneHiddenLayerCNN
    assert ck.model.patch_size == (4, 2) and ck.model.param_dtype == dtype
    _assert_tree_equal(ck.params, p)
    _assert_tree_equal(ck.init_params, p0)
    assert ck.design is None
    assert ck.training_data == {"dataset": "mnist", "limit": 64, "normalize": True}
    assert ck.metadata == {"note": "hello", "steps": 3, "shape": (1, 2)}
    m2, p2 = C.load_model(out)
    np.testing.assert_array_equal(m2.apply({"params": p2}, x), model.apply({"params": p}, x))
    # no temporary directories are left beside the checkpoint
    assert sorted(os.listdir(tmp_path)) == ["ck"]


@pytest.mark.parametrize("joint_layers", [(), ("readout",)])
def test_round_trip_designed_deployed_and_code(tmp_path, joint_layers):
    model, code = _designed(joint_layers)
    deployed = model.materialize(code)
    C.save_model(tmp_path / "deployed", model, deployed)
    ck = C.load_checkpoint(tmp_path / "deployed")
    assert type(ck.model) is OneHiddenLayerCNN and ck.design == model
    assert ck.design.designs()["readout"].shape == model.designs()["readout"].shape
    _assert_tree_equal(ck.params, jax.tree_util.tree_map(np.asarray, deployed))
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 8, 8, 1))
    np.testing.assert_allclose(ck.model.apply({"params": ck.params}, x),
                               model.apply({"params": code}, x), rtol=1e-12, atol=1e-12)

    C.save_model(tmp_path / "code", model, code, init_params=code)
    m, p = C.load_model(tmp_path / "code")
    assert m == model
    _assert_tree_equal(p, jax.tree_util.tree_map(np.asarray, code))


def test_register_custom_model(tmp_path):
    class TinyMLP(nn.Module):
        features: tuple = (4, 2)

        @nn.compact
        def __call__(self, x):
            for f in self.features:
                x = nn.Dense(f)(x)
            return x

    model = TinyMLP((5, 3))
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 7)))["params"]
    C.save_model(tmp_path / "ck", model, params, input_shape=(7,))
    with pytest.raises(C.CheckpointError, match="register_model"):
        C.load_model(tmp_path / "ck")
    C.register_model(TinyMLP)
    m, p = C.load_model(tmp_path / "ck")
    assert m.features == (5, 3)
    _assert_tree_equal(p, jax.tree_util.tree_map(np.asarray, params))


def test_round_trip_multilayer_layer_specs(tmp_path):
    """A multi-layer CNN's fields are layer specs (frozen dataclasses of jaxpurify): stored,
    rebuilt equal, and its deployed weights apply the same after the round trip."""
    from jaxpurify.multilayer import Conv, Dense, LeNet5

    model = LeNet5(layers=(Conv(3, 5, "SAME", pool=2), Dense(12), Dense(10)))
    plain = model.materialize(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
                              ["params"])
    C.save_model(tmp_path / "ck", model, plain)
    m, p = C.load_model(tmp_path / "ck")
    assert m == model and m.layers[0] == Conv(3, 5, "SAME", pool=2)
    _assert_tree_equal(p, jax.device_get(plain))
    x = jnp.linspace(0.0, 1.0, 2 * 28 * 28).reshape(2, 28, 28, 1)
    np.testing.assert_array_equal(m.apply_plain(p, x), model.apply_plain(plain, x))

    # a sidecar naming a class outside jaxpurify is refused, never imported
    info = json.loads((tmp_path / "ck" / C.SIDECAR).read_text())
    info["model"]["fields"]["layers"]["__tuple__"][1]["__dataclass__"] = "os:PathLike"
    (tmp_path / "ck" / C.SIDECAR).write_text(json.dumps(info))
    with pytest.raises(C.CheckpointError, match="'os:PathLike'.*not a frozen dataclass"):
        C.load_model(tmp_path / "ck")
    info["model"]["fields"]["layers"]["__tuple__"][1] = {
        "__dataclass__": "jaxpurify.multilayer:Dense", "fields": {"width": 3}}
    (tmp_path / "ck" / C.SIDECAR).write_text(json.dumps(info))
    with pytest.raises(C.CheckpointError, match="Dense fields do not fit"):
        C.load_model(tmp_path / "ck")


# --------------------------------------------------------------------------- never overwrite


def test_save_never_overwrites(tmp_path):
    model, p0, p, _ = _plain()
    target = tmp_path / "ck"
    C.save_model(target, model, p)
    before = _snapshot(target)
    with pytest.raises(C.CheckpointExistsError, match="overwrite=True"):
        C.save_model(target, model, p0)
    assert _snapshot(target) == before
    # FileExistsError too, for callers that catch that
    with pytest.raises(FileExistsError):
        C.save_model(target, model, p0)

    C.save_model(target, model, p0, overwrite=True)
    _assert_tree_equal(C.load_model(target)[1], p0)
    assert sorted(os.listdir(tmp_path)) == ["ck"]

    # an arbitrary non-empty folder is never replaced, even with overwrite=True
    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(C.CheckpointExistsError, match="not a jaxpurify checkpoint"):
        C.save_model(other, model, p, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"

    # a file is never replaced
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(C.CheckpointExistsError, match="not a directory"):
        C.save_model(f, model, p, overwrite=True)

    # an existing empty directory is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    C.save_model(empty, model, p)
    assert C.is_checkpoint(empty)


def test_save_rejects_bad_input_and_leaves_nothing(tmp_path):
    model, p0, p, _ = _plain()
    with pytest.raises(C.CheckpointError, match="init_params does not have the structure"):
        C.save_model(tmp_path / "a", model, p, init_params={"conv": p0["conv"]})
    wrong = OneHiddenLayerCNN(7, (4, 2), num_classes=3)
    with pytest.raises(C.CheckpointError, match="does not match the params"):
        C.save_model(tmp_path / "b", wrong, p)
    with pytest.raises(C.CheckpointError, match="metadata"):
        C.save_model(tmp_path / "c", model, p, metadata={"f": object()})
    with pytest.raises(C.CheckpointError, match="non-empty nested dict"):
        C.save_model(tmp_path / "d", model, [1, 2])
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- load errors


@pytest.fixture
def saved(tmp_path):
    model, p0, p, _ = _plain()
    return C.save_model(tmp_path / "ck", model, p, init_params=p0)


def test_missing_directory_and_file(tmp_path):
    with pytest.raises(C.CheckpointError, match="does not exist"):
        C.load_model(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(C.CheckpointError, match="is a file"):
        C.load_model(tmp_path / "f")
    (tmp_path / "empty").mkdir()
    with pytest.raises(C.CheckpointError, match="jaxpurify.json .* is missing"):
        C.load_model(tmp_path / "empty")


def test_missing_sidecar_on_orbax_checkpoint(saved):
    (saved / C.SIDECAR).unlink()
    with pytest.raises(C.CheckpointError, match="plain orbax checkpoint.*save_model"):
        C.load_model(saved)


def test_sidecar_not_json(saved):
    (saved / C.SIDECAR).write_text('{"format": "jaxpurify.checkpoint", ')
    with pytest.raises(C.CheckpointError, match="not valid JSON"):
        C.load_model(saved)


def _largest_data_file(root: Path) -> Path:
    files = [p for p in (root / "params").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_files_detected(saved, damage):
    f = _largest_data_file(saved)
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        f.unlink()
    with pytest.raises(C.CheckpointError, match="corrupt or incomplete") as err:
        C.load_checkpoint(saved)
    assert f.relative_to(saved).as_posix() in str(err.value)


def test_edited_sidecar_fields_mismatch(saved):
    info = json.loads((saved / C.SIDECAR).read_text())
    info["model"]["fields"]["num_filters"] = 12
    (saved / C.SIDECAR).write_text(json.dumps(info))
    with pytest.raises(C.CheckpointError, match=r"conv/kernel: model expects \(4, 2, 2, 12\)"):
        C.load_model(saved)


def test_edited_sidecar_tree_mismatch(saved):
    info = json.loads((saved / C.SIDECAR).read_text())
    info["trees"]["params"]["readout/kernel"]["dtype"] = "float32"
    (saved / C.SIDECAR).write_text(json.dumps(info))
    with pytest.raises(C.CheckpointError, match="sidecar does not match the arrays"):
        C.load_model(saved)


def test_sidecar_unknown_class_and_bad_fields(saved):
    info = json.loads((saved / C.SIDECAR).read_text())
    info["model"]["class"] = "NoSuchNet"
    (saved / C.SIDECAR).write_text(json.dumps(info))
    with pytest.raises(C.CheckpointError, match="NoSuchNet.*register_model"):
        C.load_model(saved)
    info["model"]["class"] = "OneHiddenLayerCNN"
    info["model"]["fields"]["depth"] = 3
    (saved / C.SIDECAR).write_text(json.dumps(info))
    with pytest.raises(C.CheckpointError, match="do not fit OneHiddenLayerCNN"):
        C.load_model(saved)


def test_sidecar_wrong_version(saved):
    info = json.loads((saved / C.SIDECAR).read_text())
    info["version"] = 99
    (saved / C.SIDECAR).write_text(json.dumps(info))
    with pytest.raises(C.CheckpointError, match="version 99"):
        C.load_model(saved)


def test_checkpoint_error_is_value_error():
    assert issubclass(C.CheckpointError, ValueError)
