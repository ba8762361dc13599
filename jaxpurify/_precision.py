"""Full-precision matrix products, whatever the backend.

On GPUs and TPUs, XLA's default precision for ``float32`` products is reduced (TF32 or
bfloat16 passes, about 3 significant digits), which is fine for training but not for
recovery: a clean weight vector ``w = A theta`` computed at reduced precision is not in
``range(A)`` to float32 accuracy, and an L1 solve at reduced precision cannot certify an
exact fit. Every function that builds ``A theta`` or solves for ``theta`` runs under
:func:`full_precision`; on CPUs (and in float64) this changes nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import jax

F = TypeVar("F", bound=Callable)


def full_precision(fn: F) -> F:
    """Trace ``fn`` with ``jax.default_matmul_precision("highest")``.

    The setting is read when an operation is traced, so it also holds inside ``jit``,
    ``vmap`` and custom derivative rules traced while ``fn`` runs.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
