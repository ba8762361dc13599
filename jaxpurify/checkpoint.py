r"""Save and load a model's params with orbax, plus a JSON sidecar that rebuilds the model.

A checkpoint is a directory::

    DIR/
        jaxpurify.json     the sidecar: model class and constructor fields, the design (for a
                           designed network's deployed weights), the shape/dtype of every
                           stored leaf, a sha256 of every stored file, and free metadata
        params/            orbax (StandardCheckpointer) checkpoint of the params
        init_params/       the same for the init ``w_0`` (optional; needed by the
                           ``row_space`` and ``lazy`` subspaces of :func:`jaxpurify.purify.purify`)

so that :func:`load_model` gives back ``(model, params)`` with
``model.apply({"params": params}, x)`` working, and :func:`load_checkpoint` gives everything
(init params, design, training-data record, metadata).

Guarantees:

* **Never overwrites by accident.** :func:`save_model` refuses an existing non-empty
  directory unless ``overwrite=True``, and even then only replaces an empty directory or an
  existing jaxpurify checkpoint (never an arbitrary folder). The new checkpoint is written
  to a temporary sibling and moved into place, so an interrupted save leaves no half-written
  checkpoint under ``DIR``.
* **Corruption is detected before anything is decoded.** Every stored file's size and
  sha256 is recorded in the sidecar and checked on load; a missing, truncated or edited
  file, a missing or unreadable sidecar, or a sidecar that does not describe the stored
  arrays (wrong class, edited fields, other shapes) raises :class:`CheckpointError` with
  what is wrong and what to do.

Designed networks: the *deployed* weights of a
:class:`~jaxpurify.models.DesignedOneHiddenLayerCNN` are the plain params
``W = A theta`` (``model.materialize(code_params)``). Saving those with the designed model
stores ``OneHiddenLayerCNN`` as the model (so the params apply) and the designed model as
``design`` (so ``purify(design, params, subspace="designed")`` knows ``A``). Saving the code
params themselves stores the designed model as the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "FORMAT",
    "SIDECAR",
    "Checkpoint",
    "CheckpointError",
    "CheckpointExistsError",
    "is_checkpoint",
    "load_checkpoint",
    "load_model",
    "register_model",
    "save_model",
]

#: Name of the JSON sidecar inside a checkpoint directory.
SIDECAR = "jaxpurify.json"
#: ``format`` field of the sidecar.
FORMAT = "jaxpurify.checkpoint"
_VERSION = 1
_TREES = ("params", "init_params")

_REGISTRY: dict[str, type] = {}


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not describe the stored arrays."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """:func:`save_model` would replace an existing directory."""


class Checkpoint(NamedTuple):
    """Everything :func:`load_checkpoint` reads back.

    Attributes:
        model: the Flax module whose ``apply({"params": params}, x)`` runs the network.
        params: nested dict of numpy arrays (dtypes as saved).
        init_params: the init ``w_0`` (same structure), or None if it was not saved.
        design: a :class:`~jaxpurify.models.DesignedOneHiddenLayerCNN` when ``params`` are
            the deployed (materialized) weights of a designed network, else None.
        training_data: the record given to :func:`save_model` (e.g.
            ``{"dataset": "mnist", "limit": 512, "normalize": True}``), or None.
        metadata: free JSON metadata given to :func:`save_model`.
        path: the checkpoint directory.
        sidecar: the raw sidecar dict.
    """

    model: Any
    params: dict
    init_params: dict | None
    design: Any
    training_data: dict | None
    metadata: dict
    path: Path
    sidecar: dict


# --------------------------------------------------------------------------- model classes


def _builtin_models() -> dict[str, type]:
    from jaxpurify.models import DesignedOneHiddenLayerCNN, OneHiddenLayerCNN

    return {"OneHiddenLayerCNN": OneHiddenLayerCNN,
            "DesignedOneHiddenLayerCNN": DesignedOneHiddenLayerCNN}


def register_model(cls: type) -> type:
    """Allow :func:`load_checkpoint` to rebuild ``cls`` (a ``flax.linen.Module`` class).

    The jaxpurify models, and Flax modules defined in ``jaxpurify.*`` modules, are found
    without registration. Usable as a class decorator.
    """
    import flax.linen as nn

    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_model expects a flax.linen.Module subclass, got {cls!r}")
    _REGISTRY[cls.__name__] = cls
    return cls


def _resolve_class(name: str, module: str | None) -> type:
    import flax.linen as nn

    known = {**_builtin_models(), **_REGISTRY}
    if name in known:
        return known[name]
    if module and _in_jaxpurify(module):
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    raise CheckpointError(
        f"the sidecar names model class {name!r} (module {module!r}), which is not known here. "
        "If it is your own Flax module, import it and call "
        "jaxpurify.checkpoint.register_model(ThatClass) before loading."
    )


# --------------------------------------------------------------------------- fields <-> JSON


def _is_dtype_like(v: Any) -> bool:
    if isinstance(v, np.dtype):
        return True
    if isinstance(v, type) and issubclass(v, np.generic):
        return True
    return type(v).__name__ == "_ScalarMeta"  # jnp.float32 and friends


def _encode(v: Any, where: str) -> Any:
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        if not np.isfinite(v):
            raise CheckpointError(f"{where} = {v!r} cannot be stored in JSON")
        return v
    if isinstance(v, np.integer | np.floating | np.bool_):
        return v.item()
    if _is_dtype_like(v):
        return {"__dtype__": np.dtype(v).name}
    if isinstance(v, tuple):
        return {"__tuple__": [_encode(x, where) for x in v]}
    if isinstance(v, list):
        return [_encode(x, where) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {k: _encode(x, f"{where}[{k!r}]") for k, x in v.items()}
    if _is_jaxpurify_dataclass(type(v)):  # a layer spec such as jaxpurify.multilayer.Conv
        cls = type(v)
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: _encode(getattr(v, f.name), f"{where}.{f.name}")
                           for f in dataclasses.fields(v) if f.init}}
    raise CheckpointError(
        f"{where} = {v!r} cannot be stored in the sidecar: only None, bool, int, float, str, "
        "tuples/lists/dicts of those, dtypes and jaxpurify's frozen dataclasses (layer specs) "
        "are supported. Give the module plain configuration fields (e.g. a string naming the "
        "activation instead of a function)."
    )


def _is_jaxpurify_dataclass(cls: type) -> bool:
    """A frozen dataclass defined in ``jaxpurify`` (only those are rebuilt on load: a sidecar
    never makes :func:`load_checkpoint` import or call anything else)."""
    return (dataclasses.is_dataclass(cls) and isinstance(cls, type)
            and cls.__dataclass_params__.frozen and _in_jaxpurify(cls.__module__))


def _in_jaxpurify(module: str) -> bool:
    """Whether ``module`` is jaxpurify or one of its modules: the only ones a sidecar may name."""
    return module == "jaxpurify" or module.startswith("jaxpurify.")


def _dataclass(name: str) -> type:
    module, _, qualname = name.partition(":")
    cls = None
    if _in_jaxpurify(module):
        try:
            cls = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
        except (ImportError, AttributeError):
            cls = None
    if not (isinstance(cls, type) and _is_jaxpurify_dataclass(cls)):
        raise CheckpointError(f"the sidecar names the field type {name!r}, which is not a "
                              "frozen dataclass of this jaxpurify; the checkpoint was written "
                              "by another version or edited: re-save it")
    return cls


def _decode(v: Any) -> Any:
    import jax.numpy as jnp

    if isinstance(v, dict):
        if set(v) == {"__dtype__"}:
            name = v["__dtype__"]
            return getattr(jnp, name, None) or jnp.dtype(name)
        if set(v) == {"__tuple__"}:
            return tuple(_decode(x) for x in v["__tuple__"])
        if set(v) == {"__dataclass__", "fields"}:
            cls = _dataclass(v["__dataclass__"])
            try:
                return cls(**{k: _decode(x) for k, x in v["fields"].items()})
            except TypeError as err:
                raise CheckpointError(f"the sidecar's {v['__dataclass__']} fields do not fit "
                                      f"it ({err}); re-save the checkpoint") from err
        return {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def _describe_model(model) -> dict:
    import flax.linen as nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen.Module, got {type(model).__name__}")
    cls = type(model)
    fields = {}
    for f in dataclasses.fields(model):
        if not f.init or f.name in ("parent", "name"):
            continue
        fields[f.name] = _encode(getattr(model, f.name), f"{cls.__name__}.{f.name}")
    return {"class": cls.__name__, "module": cls.__module__, "fields": fields}


def _build_model(desc: Any, what: str):
    if not isinstance(desc, dict) or not isinstance(desc.get("class"), str) \
            or not isinstance(desc.get("fields"), dict):
        raise CheckpointError(f"the sidecar's {what!r} entry is malformed (expected "
                              "{'class': ..., 'module': ..., 'fields': {...}}); re-save the "
                              "checkpoint with jaxpurify.checkpoint.save_model")
    cls = _resolve_class(desc["class"], desc.get("module"))
    fields = {k: _decode(v) for k, v in desc["fields"].items()}
    try:
        return cls(**fields)
    except TypeError as err:
        raise CheckpointError(
            f"the sidecar's {what} fields do not fit {cls.__name__}: {err}. The sidecar was "
            "edited or written by another version; re-save the checkpoint."
        ) from err


def _model_repr(desc: dict) -> str:
    def show(v):
        if isinstance(v, dict) and set(v) == {"__dtype__"}:
            return v["__dtype__"]
        return repr(_decode(v))

    args = ", ".join(f"{k}={show(v)}" for k, v in desc.get("fields", {}).items())
    return f"{desc.get('class')}({args})"


# --------------------------------------------------------------------------- trees


def _unwrap(params: Any, what: str) -> dict:
    try:
        from flax.core import unfreeze

        params = unfreeze(params)
    except Exception:  # noqa: BLE001 - not a FrozenDict
        pass
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    if not isinstance(params, dict) or not params:
        raise CheckpointError(f"{what} must be a non-empty nested dict of arrays (Flax params), "
                              f"got {type(params).__name__}")
    return params


def _flatten(tree: dict, what: str, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if not isinstance(k, str) or not k or "/" in k:
            raise CheckpointError(f"{what}: key {k!r} at {prefix or '/'} must be a non-empty "
                                  "string without '/'")
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            if not v:
                raise CheckpointError(f"{what}/{path} is an empty dict; drop it before saving")
            out.update(_flatten(v, what, path + "/"))
        else:
            try:
                arr = np.asarray(v)
            except Exception as err:  # noqa: BLE001
                raise CheckpointError(f"{what}/{path} is not an array ({type(v).__name__})") \
                    from err
            if arr.dtype == object:
                raise CheckpointError(f"{what}/{path} is not a numeric array "
                                      f"({type(v).__name__})")
            out[path] = arr
    return out


def _unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _spec(flat: dict[str, np.ndarray]) -> dict[str, dict]:
    return {k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in flat.items()}


def _expected_shapes(model, params_spec: dict, input_shape) -> dict[str, tuple] | None:
    """Shapes ``model.init`` gives, or None when the model's input is unknown."""
    import jax
    import jax.numpy as jnp

    from jaxpurify.models import DesignedOneHiddenLayerCNN, OneHiddenLayerCNN

    if input_shape is not None:
        shape = (1, *input_shape)
    elif isinstance(model, OneHiddenLayerCNN | DesignedOneHiddenLayerCNN):
        p = model.patch_size
        ph, pw = (p, p) if isinstance(p, int) else tuple(p)
        if isinstance(model, DesignedOneHiddenLayerCNN):
            c = model.in_channels
        else:
            kernel = params_spec.get("conv/kernel")
            if kernel is None or len(kernel["shape"]) != 4:
                return {"conv/kernel": ("a 4-d array",)}
            c = kernel["shape"][2]
        shape = (1, ph, pw, c)
    else:
        return None
    try:
        with warnings.catch_warnings():  # float64 param_dtype without x64: shapes still right
            warnings.simplefilter("ignore", UserWarning)
            variables = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                       jax.ShapeDtypeStruct(shape, jnp.float32))
    except Exception as err:  # noqa: BLE001 - any failure means the fields are inconsistent
        raise CheckpointError(f"cannot build params for {type(model).__name__} from the "
                              f"sidecar's fields ({type(err).__name__}: {err})") from err
    return {k: tuple(v.shape) for k, v in _flatten(_unwrap_shapes(variables), "init").items()}


def _unwrap_shapes(variables) -> dict:
    import jax

    params = variables.get("params", {}) if isinstance(variables, dict) else variables
    # ShapeDtypeStruct leaves -> placeholder arrays with the right shape (no memory).
    return jax.tree_util.tree_map(lambda s: np.broadcast_to(np.False_, s.shape), dict(params))


def _check_against_model(model, spec: dict, input_shape, *, where: str, fix: str) -> None:
    expected = _expected_shapes(model, spec, input_shape)
    if expected is None:
        return
    got = {k: tuple(v["shape"]) for k, v in spec.items()}
    if expected == got:
        return
    lines = []
    for k in sorted(set(expected) | set(got)):
        e, g = expected.get(k), got.get(k)
        if e != g:
            lines.append(f"  {k}: model expects {e if e is not None else 'nothing'}, "
                         f"{where} {g if g is not None else 'nothing'}")
    raise CheckpointError(
        f"{type(model).__name__} does not match the params:\n" + "\n".join(lines) + f"\n{fix}"
    )


# --------------------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_manifest(root: Path) -> dict[str, dict]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            out[rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    return out


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as err:  # pragma: no cover - orbax comes with flax
        raise ImportError("jaxpurify.checkpoint needs orbax-checkpoint: "
                          "pip install 'jaxpurify[checkpoint]'") from err
    return ocp


def _orbax_save(path: Path, flat: dict[str, np.ndarray]) -> None:
    ocp = _orbax()
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(path.absolute(), _unflatten(flat))
        ckptr.wait_until_finished()
    finally:
        ckptr.close()


def _orbax_restore(path: Path, spec: dict[str, dict]) -> dict[str, np.ndarray]:
    import jax

    ocp = _orbax()
    target = _unflatten({k: jax.ShapeDtypeStruct(tuple(v["shape"]), np.dtype(v["dtype"]))
                         for k, v in spec.items()})
    ckptr = ocp.StandardCheckpointer()
    try:
        meta = ckptr.metadata(path.absolute())
        tree = getattr(getattr(meta, "item_metadata", None), "tree", None)
        if tree is not None:
            stored = {k: {"shape": list(v.shape), "dtype": np.dtype(v.dtype).name}
                      for k, v in _flatten_meta(tree).items()}
            if stored != spec:
                raise CheckpointError(_spec_diff(spec, stored, path))
        # Restored as numpy (the target's leaves are not jax arrays), so dtypes stay as saved
        # whatever jax_enable_x64 says.
        target = jax.tree_util.tree_map(lambda s: np.empty(s.shape, s.dtype), target)
        restored = ckptr.restore(path.absolute(), target)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many types
        raise CheckpointError(
            f"orbax could not read {path} ({type(err).__name__}: {str(err)[:300]}). The "
            "checkpoint is corrupt or was written by an incompatible orbax version; re-save it."
        ) from err
    finally:
        ckptr.close()
    return {k: np.asarray(v) for k, v in _flatten(restored, "restored").items()}


def _flatten_meta(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in dict(tree).items():
        if isinstance(v, dict) or (hasattr(v, "items") and not hasattr(v, "shape")):
            out.update(_flatten_meta(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _diff_lines(a: dict, b: dict, a_name: str, b_name: str) -> str:
    lines = []
    fmt = lambda x: "missing" if x is None else f"{tuple(x['shape'])} {x['dtype']}"
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            lines.append(f"  {k}: {a_name} {fmt(a.get(k))}, {b_name} {fmt(b.get(k))}")
    return "\n".join(lines)


def _spec_diff(recorded: dict, stored: dict, path: Path) -> str:
    return (f"the sidecar does not match the arrays stored in {path}:\n"
            + _diff_lines(recorded, stored, "sidecar", "stored")
            + "\nThe sidecar was edited or belongs to another checkpoint; re-save the "
            "checkpoint with jaxpurify.checkpoint.save_model.")


# --------------------------------------------------------------------------- save


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a jaxpurify sidecar (not verified)."""
    return (Path(path) / SIDECAR).is_file()


def _prepare_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise CheckpointExistsError(f"{path} exists and is not a directory; choose another path")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise CheckpointExistsError(
                f"{path} already exists and is not empty; refusing to overwrite it. Choose "
                "another directory, or pass overwrite=True (--overwrite) to replace a previous "
                "jaxpurify checkpoint."
            )
        if not is_checkpoint(path):
            raise CheckpointExistsError(
                f"{path} exists, is not empty and is not a jaxpurify checkpoint (no {SIDECAR}); "
                "refusing to delete it even with overwrite=True. Choose another directory."
            )


def save_model(
    path: str | os.PathLike,
    model,
    params,
    *,
    init_params=None,
    design=None,
    training_data: dict | None = None,
    metadata: dict | None = None,
    input_shape: tuple[int, ...] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``params`` (and ``init_params``) of a Flax ``model`` to the directory ``path``.

    Args:
        path: checkpoint directory; must not exist or be empty (see ``overwrite``).
        model: the Flax module the params belong to. A
            :class:`~jaxpurify.models.DesignedOneHiddenLayerCNN` given with plain params
            (``{"conv", "readout"}``, i.e. ``model.materialize(code_params)``, possibly
            contaminated) is stored as its ``plain_model()`` with ``design=model``.
        params: nested dict of arrays (``{"params": ...}`` and ``FrozenDict`` accepted).
        init_params: the init ``w_0`` with the structure of ``params`` (optional).
        design: the designed model behind plain params (set automatically, see ``model``).
        training_data: JSON record of the training inputs, read by ``jaxpurify purify`` when
            ``--data`` is not given: ``{"dataset": "mnist" | "cifar10" | "PATH.npz",
            "limit": N (first N training examples), "normalize": bool}``.
        metadata: free JSON-serializable dict stored in the sidecar.
        input_shape: ``(H, W, C)`` of one input; lets :func:`load_checkpoint` check the params
            against any model (the one-hidden-layer CNNs do not need it).
        overwrite: replace ``path`` if it is an existing jaxpurify checkpoint (an arbitrary
            non-empty directory is never replaced).

    Returns:
        The checkpoint directory.

    Raises:
        CheckpointExistsError: ``path`` exists and may not be replaced.
        CheckpointError: the params do not fit the model, ``init_params`` does not have the
            structure of ``params``, or a field / metadata entry is not JSON-serializable.
    """
    from jaxpurify.models import DesignedOneHiddenLayerCNN

    path = Path(path)
    _prepare_target(path, overwrite)

    params = _unwrap(params, "params")
    if isinstance(model, DesignedOneHiddenLayerCNN) and {"conv", "readout"} <= set(params):
        if design is None:
            design = model
        model = model.plain_model()
    if design is not None and not isinstance(design, DesignedOneHiddenLayerCNN):
        raise TypeError(f"design must be a DesignedOneHiddenLayerCNN, got {type(design).__name__}")

    flat = _flatten(params, "params")
    spec = _spec(flat)
    model_desc = _describe_model(model)
    fix = ("Pass the model these params were created with (model.init(...)['params']).")
    _check_against_model(model, spec, input_shape, where="params have", fix=fix)
    if design is not None:
        _check_against_model(design.plain_model(), spec, None, where="params have",
                             fix="The design's plain_model() does not fit these params.")

    trees = {"params": flat}
    if init_params is not None:
        init_flat = _flatten(_unwrap(init_params, "init_params"), "init_params")
        if {k: (v.shape, v.dtype) for k, v in init_flat.items()} != \
                {k: (v.shape, v.dtype) for k, v in flat.items()}:
            raise CheckpointError(
                "init_params does not have the structure (paths, shapes, dtypes) of params:\n"
                + _diff_lines(spec, _spec(init_flat), "params", "init_params")
                + "\nPass the init of the same model (model.init(...)['params'])."
            )
        trees["init_params"] = init_flat

    sidecar = {
        "format": FORMAT,
        "version": _VERSION,
        "model": model_desc,
        "design": None if design is None else _describe_model(design),
        "input_shape": None if input_shape is None else [int(s) for s in input_shape],
        "trees": {name: _spec(t) for name, t in trees.items()},
        "training_data": None if training_data is None else _encode(training_data,
                                                                    "training_data"),
        "metadata": _encode(metadata or {}, "metadata"),
    }
    try:
        from jaxpurify import __version__

        sidecar["jaxpurify_version"] = __version__
    except ImportError:  # pragma: no cover
        pass
    try:
        json.dumps(sidecar)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"the metadata is not JSON-serializable: {err}") from err

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = None
    try:
        tmp.mkdir()
        files = {}
        for name, t in trees.items():
            _orbax_save(tmp / name, t)
            files.update({f"{name}/{k}": v for k, v in _file_manifest(tmp / name).items()})
        sidecar["files"] = files
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
        if path.exists():
            _prepare_target(path, overwrite)  # re-check: it may have changed meanwhile
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            old.rename(path)
            old = None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


# --------------------------------------------------------------------------- load


def _read_sidecar(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the directory does not exist. Check the "
                              "path (save one with jaxpurify.checkpoint.save_model).")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory. Pass the directory "
                              "written by jaxpurify.checkpoint.save_model.")
    side = path / SIDECAR
    if not side.is_file():
        if (path / "_CHECKPOINT_METADATA").exists() or (path / "params").is_dir():
            hint = ("It looks like a plain orbax checkpoint: restore its params yourself and "
                    "re-save them with jaxpurify.checkpoint.save_model(DIR, model, params), "
                    "which records the model in the sidecar.")
        else:
            hint = ("Pass the directory written by jaxpurify.checkpoint.save_model (it holds "
                    f"{SIDECAR} and params/).")
        raise CheckpointError(f"{path} is not a jaxpurify checkpoint: {SIDECAR} (the sidecar "
                              f"describing the model) is missing. {hint}")
    try:
        info = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{side} is unreadable or not valid JSON ({err}); the checkpoint "
                              "is corrupt. Re-copy it or re-save it.") from err
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{side} is not a jaxpurify checkpoint sidecar (format "
                              f"{info.get('format') if isinstance(info, dict) else None!r}, "
                              f"expected {FORMAT!r}); re-save the checkpoint.")
    if info.get("version") != _VERSION:
        raise CheckpointError(f"{side} has sidecar version {info.get('version')!r}; this "
                              f"jaxpurify reads version {_VERSION}. Re-save the checkpoint with "
                              "this version of jaxpurify.")
    for key, kind in (("model", dict), ("trees", dict), ("files", dict)):
        if not isinstance(info.get(key), kind):
            raise CheckpointError(f"{side} lacks a valid {key!r} entry; the sidecar is "
                                  "corrupt or was edited. Re-save the checkpoint.")
    if not isinstance(info["trees"].get("params"), dict) or not info["trees"]["params"]:
        raise CheckpointError(f"{side} records no params; re-save the checkpoint.")
    return info


def _verify_files(path: Path, info: dict) -> None:
    problems = []
    for rel, rec in info["files"].items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != rec.get("size"):
            problems.append(f"{rel} has {f.stat().st_size} bytes, {rec.get('size')} were saved")
        elif _sha256(f) != rec.get("sha256"):
            problems.append(f"{rel} was modified since it was saved (sha256 differs)")
    for name in info["trees"]:
        if name not in _TREES:
            problems.append(f"unknown tree {name!r} in the sidecar")
        elif not any(rel.startswith(f"{name}/") for rel in info["files"]):
            problems.append(f"no files recorded for {name}")
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(
            f"the checkpoint {path} is corrupt or incomplete:\n{shown}{more}\n"
            "Re-copy it from its source or re-save it with jaxpurify.checkpoint.save_model."
        )


def load_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> Checkpoint:
    """Load a checkpoint written by :func:`save_model`.

    Args:
        path: the checkpoint directory.
        verify: check every stored file against the sha256 recorded at save time (a few ms
            per MB; turn off only for trusted, very large checkpoints).

    Raises:
        CheckpointError: the directory or its sidecar is missing, a file is missing or
            modified, or the sidecar's model does not fit the stored arrays.
    """
    path = Path(path)
    info = _read_sidecar(path)
    if verify:
        _verify_files(path, info)
    model = _build_model(info["model"], "model")
    design = None if info.get("design") is None else _build_model(info["design"], "design")
    spec = info["trees"]["params"]
    input_shape = info.get("input_shape")
    fix = (f"The sidecar ({SIDECAR}) describes {_model_repr(info['model'])}, which is not "
           "the model these params belong to: the sidecar was edited or copied from another "
           "checkpoint. Restore the right sidecar, or re-save with "
           "jaxpurify.checkpoint.save_model(DIR, model, params).")
    _check_against_model(model, spec, input_shape, where="checkpoint stores", fix=fix)
    if design is not None:
        _check_against_model(design.plain_model(), spec, None, where="checkpoint stores",
                             fix=fix.replace("describes", "has the design"))
    trees = {}
    for name, tspec in info["trees"].items():
        if name in _TREES:
            trees[name] = _unflatten(_orbax_restore(path / name, tspec))
    return Checkpoint(
        model=model,
        params=trees["params"],
        init_params=trees.get("init_params"),
        design=design,
        training_data=None if info.get("training_data") is None
        else _decode(info["training_data"]),
        metadata=_decode(info.get("metadata") or {}),
        path=path,
        sidecar=info,
    )


def load_model(path: str | os.PathLike, *, verify: bool = True):
    """``(model, params)`` from a checkpoint; see :func:`load_checkpoint` for the rest."""
    ckpt = load_checkpoint(path, verify=verify)
    return ckpt.model, ckpt.params
