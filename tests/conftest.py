"""Test configuration: float64 on (exactness is checked to machine precision)."""

import os

# One BLAS thread per process: XLA's LAPACK calls (QR, Cholesky) thrash when OpenBLAS
# threads compete with XLA's own threads and the parallel test workers on a small machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

# Tests read the real datasets through this setting; default to the layout beside the repo.
_shared = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
if "JAXPURIFY_DATA_DIR" not in os.environ and os.path.isdir(_shared):
    os.environ["JAXPURIFY_DATA_DIR"] = os.path.abspath(_shared)
