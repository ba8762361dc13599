"""Robust recovery: batched, exact, differentiable L1 regression.

``l1_regression(A, y)`` minimizes ``||A x - y||_1``; the method objects configure the
first-order phase, and every method shares the exact polish and the dual certificate.
"""

from jaxpurify.recovery._admm import ADMM
from jaxpurify.recovery._pdhg import PDHG
from jaxpurify.recovery._solution import RESULTS, L1Solution
from jaxpurify.recovery._solve import (
    METHODS,
    L1RecoveryError,
    default_check_every,
    default_tol,
    l1_regression,
)

__all__ = [
    "ADMM",
    "METHODS",
    "PDHG",
    "RESULTS",
    "L1RecoveryError",
    "L1Solution",
    "default_check_every",
    "default_tol",
    "l1_regression",
]
