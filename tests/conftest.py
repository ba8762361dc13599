"""Test configuration: float64 on (exactness is checked to machine precision)."""

import os

# One BLAS thread per process: XLA's LAPACK calls (QR, Cholesky) thrash when OpenBLAS
# threads compete with XLA's own threads and the parallel test workers on a small machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)

# Tests read the real datasets through this setting; default to the layout beside the repo.
_shared = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
if "JAXPURIFY_DATA_DIR" not in os.environ and os.path.isdir(_shared):
    os.environ["JAXPURIFY_DATA_DIR"] = os.path.abspath(_shared)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop JAX's compiled executables after each test module.

    Each executable keeps memory mappings of its machine code. A test worker that runs
    ~200 tests without releasing them climbs past 35 000 mappings halfway through the suite,
    and Linux's default ``vm.max_map_count`` is 65 530: past it, LLVM fails to load new code
    ("Cannot allocate memory", a crashed worker). Modules recompile what they share.
    """
    yield
    jax.clear_caches()
