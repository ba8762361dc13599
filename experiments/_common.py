"""Helpers shared by the experiments: metrics IO, figures, an environment stamp, HiGHS."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np


def jsonable(obj):
    """Plain-Python version of ``obj`` for ``json.dump`` (arrays, numpy scalars, NaN/Inf).

    Non-finite floats become ``None`` (strict JSON has no NaN/Inf), paths become strings.
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__array__") and not isinstance(obj, str | bytes):
        arr = np.asarray(obj)
        return jsonable(arr.tolist()) if arr.ndim else jsonable(arr.item())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def with_options(cfg: dict, options: dict) -> dict:
    """``cfg`` updated by ``options`` (``--set KEY=VALUE``); an unknown key is refused with the
    keys there are."""
    unknown = set(options) - set(cfg)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; configurable: {sorted(cfg)}")
    return {**cfg, **options}


def write_metrics(out: Path, metrics: dict, name: str = "metrics.json") -> Path:
    """Write ``metrics`` as indented JSON to ``out/name`` (``out`` is created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(jsonable(metrics), indent=2, allow_nan=False) + "\n")
    return path


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_fig(fig, out: Path, name: str, dpi: int = 120) -> Path:
    """Save ``fig`` as ``out/name`` (PNG) and close it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path


def environment(t0: float | None = None) -> dict:
    """A stamp of where the numbers came from (and seconds since ``t0``).

    ``packages`` holds the installed versions of the libraries whose arithmetic the numbers
    depend on, and ``source`` the git commit of the code that ran, read when this module is
    imported (``dirty`` when the library or the experiments had uncommitted changes; ``None``
    outside a git checkout, e.g. an installed wheel): two runs of one deterministic setting
    can differ in the last digits when either changed (e.g. an optimizer's update order), and
    this is how to tell.
    """
    import jax

    import jaxpurify

    stamp = {
        "jax": jax.__version__,
        "jaxpurify": jaxpurify.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "x64": bool(jax.config.jax_enable_x64),
        "cpu_count": os.cpu_count(),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        "packages": {name: _version(name) for name in _PACKAGES},
        "source": _SOURCE,
    }
    if t0 is not None:
        stamp["seconds"] = time.perf_counter() - t0
    return stamp


_PACKAGES = ("jaxlib", "flax", "optax", "chex", "numpy", "scipy", "ml_dtypes")


def _source_revision() -> dict | None:
    """The git commit of this checkout and whether its code differs from it (None: no git)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--", "jaxpurify", "experiments")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(changed)}


#: read when the experiments are imported, i.e. when their code and the library's is loaded:
#: a commit made while a long run is going does not describe that run
_SOURCE = _source_revision()


def _version(name: str) -> str | None:
    """The installed version of distribution ``name`` (None when it is not installed)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def highs_l1(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``min_x ||y - a x||_1`` with HiGHS (``scipy.optimize.linprog(method="highs")``).

    The textbook LP: variables ``[x (free), t >= 0]``, minimise ``sum(t)`` subject to
    ``a x - t <= y`` and ``-a x - t <= -y``.

    Returns:
        ``(x, objective, seconds)``; ``seconds`` covers building the LP and solving it.
    """
    import scipy.sparse as sp
    from scipy.optimize import linprog

    a = np.asarray(a, np.float64)
    y = np.asarray(y, np.float64)
    m, n = a.shape
    t0 = time.perf_counter()
    eye = sp.eye_array(m, format="csc")
    a_s = sp.csc_array(a)
    a_ub = sp.block_array([[a_s, -eye], [-a_s, -eye]], format="csc")
    b_ub = np.concatenate([y, -y])
    c = np.concatenate([np.zeros(n), np.ones(m)])
    bounds = [(None, None)] * n + [(0, None)] * m
    res = linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    seconds = time.perf_counter() - t0
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed: {res.message}")
    return res.x[:n], float(res.fun), seconds
