"""jaxpurify: purify contaminated convolutional networks by robust (L1) recovery, in JAX.

The clean parameters of a trained network lie in a known low-dimensional subspace
``w_0 + range(A)``; contamination (sparse gross errors, bit flips, backdoor edits) is removed
by the L1 regression ``theta = argmin ||w_c - w_0 - A theta||_1``, ``w = w_0 + A theta``.
"""

from jaxpurify.recovery import (
    ADMM,
    METHODS,
    PDHG,
    RESULTS,
    L1RecoveryError,
    L1Solution,
    l1_regression,
)

__version__ = "0.1.0"

__all__ = [
    "ADMM",
    "METHODS",
    "PDHG",
    "RESULTS",
    "L1RecoveryError",
    "L1Solution",
    "l1_regression",
]
