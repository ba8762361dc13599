r"""``purify``: remove sparse contamination from a one-hidden-layer CNN's params.

For each layer, the contaminated vectors ``w_c`` (filters with biases; readout columns) are
modelled as ``w_0 + A theta + e`` with ``e`` sparse, and recovered as
``w_hat = w_0 + A theta_hat``, ``theta_hat = argmin ||w_c - w_0 - A theta||_1``
(:func:`jaxpurify.l1_regression`, batched over the filters / classes that share ``A``).
The filters are recovered first; the readout's feature subspace is then built from the
*recovered* filters.

The report says, per layer, which entries were judged corrupted (the nonzero residual),
whether every problem converged, and whether recovery is *certified*: an L1 solution that
interpolates more rows than there are unknowns is, for continuous corruption, the unique
clean solution (corrupted rows cannot be fitted exactly together with the clean ones), while a
solution past the recovery threshold generically interpolates exactly ``n`` rows. Each layer
also gets the Donoho-Tanner critical fraction for its ratio as a reference.

The count uses rows fit *to the rounding of the inputs* (:func:`exactly_fit`), not the
solver's looser interpolation test (``|r_i| <= eps**0.75 * scale``, about 54 roundings in
float32, loose on purpose so that the solver finds its support). A wrong vertex fits ``n``
rows and, in float32, a few more rows can sit within that looser test by near-coincidence:
an edit whose in-range change ``A delta`` has entries near zero (an L1-penalized attacker's)
puts rows where clean and edited networks almost agree next to every vertex mixing the two.
Measured on the problems of the adaptive-edit experiment's attacks
(``benchmarks/certificate_margins.py``; MNIST): rows of correctly recovered units sit within
2.3 roundings; the wrong vertices this count drops had rows at 8.2-42 (on CIFAR-10, from 4.7).
Where the solver's count and this one disagree, the problem is re-fit on the solver's
interpolated rows first (:func:`fit_count`): tiny errors inside that set (low-mantissa bit
flips) smear a right solution by tens of roundings, and the re-fit separates the two cases.
Wrong problems that still fit more than ``n`` rows to rounding hold an exact second
explanation, which is what the test below is for.

That argument assumes the corruption is generic. An edit *made* consistent with ``range(A)``
(:func:`jaxpurify.attacks.subspace_edit`: the restriction of an in-range change to most of
a unit's L1 mass) is interpolated too, and the clean entries then look corrupted. So a
problem is certified only if, in addition, the entries judged corrupted ``T`` hold no second
explanation: the L1 fit of the residual on ``T`` alone, ``min_phi ||r_T - A_T phi||_1``,
interpolates no more than ``n`` of them (generic errors: exactly ``n``; a consistent edit, or
a clean unit misread as the corruption: all of its rows). With ``|T| <= n`` there is nothing to
test (any ``n`` rows are fit by some ``phi``). Such a problem is reported as *ambiguous*: two
vectors of the subspace fit it exactly on many entries each, and L1 returned the one that
explains more entries.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpurify import subspaces as S
from jaxpurify._precision import full_precision
from jaxpurify.models import DesignedOneHiddenLayerCNN, OneHiddenLayerCNN
from jaxpurify.phase_transition import critical_fraction
from jaxpurify.recovery import l1_regression


class LayerReport(NamedTuple):
    """What recovery found for one layer.

    Attributes:
        layer: ``"conv"`` or ``"readout"``.
        source: subspace source used.
        corrupted: ``{leaf name: bool array}`` entries judged corrupted (nonzero residual).
        num_corrupted: total entries judged corrupted.
        fraction: ``num_corrupted`` over the layer's entries.
        num_nonfinite: NaN/Inf entries found (treated as corrupted).
        ratio: overparameterization ratio ``m / n`` of the layer's design.
        critical_fraction: Donoho-Tanner threshold for Gaussian designs at ``ratio``.
        objective: ``(B,)`` L1 objective per problem.
        converged: every problem converged (duality gap met ``tol``).
        certified: every problem fits more rows than unknowns to the rounding of its inputs
            (:func:`fit_count`) and none is ambiguous (see module doc).
        warnings: human-readable doubts.
        num_ambiguous: problems whose judged-corrupted entries hold a second explanation (more
            than ``n`` of them fit exactly by another vector of the subspace).
        num_doubtful: problems fitting no more rows than unknowns to rounding.
        unknowns: ``n``, the number of unknowns of one problem.
        num_fit: ``(B,)`` rows each problem fits to the rounding of its inputs
            (:func:`fit_count`); certified needs more than ``unknowns``.
        num_interpolated: ``(B,)`` rows within the solver's looser interpolation test
            (``L1Solution.num_interpolated``; what the certificate counted before
            :func:`exactly_fit`).
    """

    layer: str
    source: str
    corrupted: dict
    num_corrupted: int
    fraction: float
    num_nonfinite: int
    ratio: float
    critical_fraction: float
    objective: np.ndarray
    converged: bool
    certified: bool
    warnings: tuple
    num_ambiguous: int = 0
    num_doubtful: int = 0
    unknowns: int = 0
    num_fit: np.ndarray | None = None
    num_interpolated: np.ndarray | None = None


class PurifyReport(NamedTuple):
    """Per-layer reports and an overall verdict."""

    layers: dict
    seconds: float

    @property
    def ok(self) -> bool:
        """Every layer converged and is certified."""
        return all(r.converged and r.certified for r in self.layers.values())

    @property
    def warnings(self) -> list[str]:
        return [w for r in self.layers.values() for w in r.warnings]

    def summary(self) -> str:
        """A small table, one line per layer."""
        lines = [f"{'layer':8s} {'source':10s} {'ratio':>7s} {'corrupt':>8s} {'DT crit':>8s} "
                 f"{'conv.':>6s} {'cert.':>6s}"]
        for r in self.layers.values():
            lines.append(f"{r.layer:8s} {r.source:10s} {r.ratio:7.2f} {r.fraction:8.3f} "
                         f"{r.critical_fraction:8.3f} {str(r.converged):>6s} "
                         f"{str(r.certified):>6s}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _check_tree(name, tree, ref):
    s1, s2 = jax.tree_util.tree_structure(tree), jax.tree_util.tree_structure(ref)
    if s1 != s2:
        raise ValueError(f"{name} does not have the structure of params: {s1} vs {s2}")
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(tree),
                          jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(ref),
                          strict=True):
        if np.shape(a) != np.shape(b):
            raise ValueError(f"{name}{jax.tree_util.keystr(path[0])} has shape {np.shape(a)} "
                             f"but params has {np.shape(b)}")


def _check_finite(name, tree):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not bool(jnp.all(jnp.isfinite(leaf))):
            raise ValueError(f"{name}{jax.tree_util.keystr(path)} contains NaN or Inf; it must "
                             "be clean (only the contaminated params may hold NaN/Inf)")


def _check_inputs(model, params, inputs):
    if inputs is None:
        raise ValueError("this subspace needs the training inputs: pass inputs=(N, H, W, C)")
    inputs = jnp.asarray(inputs)
    c = params["conv"]["kernel"].shape[2]
    if inputs.ndim != 4 or inputs.shape[-1] != c:
        raise ValueError(f"inputs must be NHWC images with {c} channel(s) (the filters' input "
                         f"channels); got shape {inputs.shape}")
    ph, pw = S._pair_of(model.patch_size)
    if inputs.shape[1] % ph or inputs.shape[2] % pw:
        raise ValueError(f"inputs of size {inputs.shape[1:3]} are not tiled by the patch size "
                         f"{(ph, pw)}")
    if not bool(jnp.all(jnp.isfinite(inputs))):
        raise ValueError("inputs contain NaN or Inf")
    return inputs


#: Entries of ``vectors - offset`` larger than this many times their problem's median nonzero
#: magnitude are erased (treated like NaN/Inf). Exponent bit flips make values ~1e38 next to
#: errors ~1e-1; with that dynamic range the solver's relative thresholds (interpolation and
#: duality gap) certify wrong solutions. Erasing them keeps them corrupted (and flagged).
GROSS_FACTOR = 1e4


@jax.jit
def _gross(y):
    a = jnp.abs(y)
    med = jnp.nanmedian(jnp.where(a > 0, a, jnp.nan), axis=-1, keepdims=True)
    return a > GROSS_FACTOR * med  # False on rows without nonzero entries (med is NaN)


def _apply(design, x):
    return (jnp.einsum("mn,bn->bm", design, x) if design.ndim == 2
            else jnp.einsum("bmn,bn->bm", design, x))


def _solve(problem: S.LayerProblem, vectors, *, method, tol, max_iters, check_every):
    """Solve one layer's problems.

    Returns:
        ``(recovered vectors, L1Solution, nonfinite mask, erased mask, rows fit exactly
        per problem)`` (see :func:`fit_count`).
    """
    nonfinite = ~jnp.isfinite(vectors)
    # NaN/Inf entries (e.g. exponent bit flips) become ordinary gross errors, and so do
    # absurdly large ones (see GROSS_FACTOR).
    y = jnp.where(nonfinite, 0.0, vectors - problem.offset)
    erased = nonfinite | _gross(y)
    # Clip (not zero) the erased entries: they stay gross errors of a sane magnitude, which
    # keeps them far from the clean scale.
    a = jnp.abs(y)
    cap = GROSS_FACTOR * jnp.nanmedian(jnp.where(a > 0, a, jnp.nan), axis=-1, keepdims=True)
    cap = jnp.where(jnp.isfinite(cap), cap, 1.0)
    y = jnp.where(nonfinite, cap, jnp.clip(y, -cap, cap))
    tol = _tolerance(y.dtype, tol)
    sol = l1_regression(problem.design, y, method=method, tol=tol, max_iters=max_iters,
                        check_every=check_every, throw=False)
    exact = fit_count(problem.design, y, sol, offset=problem.offset, method=method, tol=tol,
                      max_iters=max_iters, check_every=check_every)
    return problem.offset + _apply(problem.design, sol.x), sol, nonfinite, erased, exact


def _tolerance(dtype, tol):
    """The solver's ``tol``: stricter than its default in float64 (the duality gap is relative
    to ``||e||_1``, and exactness is the point)."""
    if tol is None:
        return 1e-12 if dtype == jnp.float64 else None
    return tol


def _deviates(vectors, recovered):
    """Entries judged corrupted: ``|w_c - w_hat|`` above rounding at the weights' scale.

    The solver's own flags are relative to the size of the *update* ``w - w_0``; when the
    update is tiny next to the weights, rounding in ``w - w_0`` alone would exceed them.
    """
    eps = jnp.finfo(recovered.dtype).eps
    scale = jnp.max(jnp.abs(recovered), axis=-1, keepdims=True)
    diff = jnp.abs(jnp.where(jnp.isfinite(vectors), vectors, jnp.inf) - recovered)
    return diff > eps**0.75 * jnp.maximum(scale, jnp.finfo(recovered.dtype).tiny)


#: A row counts as fit exactly (for the certificate) when its residual is within this many
#: roundings of its inputs; see :func:`exactly_fit`.
ROUNDING_FACTOR = 4.0


def exactly_fit(design, y, solution, *, offset=0.0, factor: float = ROUNDING_FACTOR
                ) -> np.ndarray:
    r"""Rows an L1 solution fits to the rounding of its inputs (bool, like ``interpolated``).

    .. math:: |r_i| \le c\,\varepsilon\,\bigl(|y_i| + |o_i| + (|A|\,|x|)_i\bigr)

    with ``c = factor``, ``eps`` the dtype's machine epsilon, ``o`` the subspace offset
    (``y = w - o``): the rounding that storing ``w`` and ``o`` and evaluating ``A x`` can leave
    on a row the solution truly fits. Only rows the solver also calls interpolated count.
    Rows of correctly recovered float32 units measured within 2.3 roundings, the near-fits of
    wrong vertices from 4.7 roundings on (see the module doc).

    Args:
        design: ``(m, n)`` or ``(*B, m, n)``.
        y: ``(*B, m)`` the observations the solver was given.
        solution: the :class:`~jaxpurify.recovery.L1Solution` of ``(design, y)``.
        offset: ``(B, m)`` or scalar, the offset subtracted from the weights.
        factor: roundings allowed.
    """
    eps = jnp.finfo(solution.x.dtype).eps
    x = jnp.abs(solution.x)
    a = jnp.abs(design)
    spread = jnp.einsum("...mn,...n->...m", a, x)
    bound = factor * eps * (jnp.abs(y) + jnp.abs(offset) + spread)
    return np.asarray(solution.interpolated & (jnp.abs(solution.residual) <= bound))


def fit_count(design, y, solution, *, offset=0.0, **solver) -> np.ndarray:
    """Per problem: rows fit to the rounding of the inputs (:func:`exactly_fit`), re-fit first
    where the solver's own count says more than ``n`` and this one does not.

    The solver's polish solves least squares on every row within its looser interpolation
    test. When that set holds entries with errors too small for the test (low-mantissa bit
    flips), the clean solution comes back smeared by them: its clean rows sit tens of
    roundings off, and counted to rounding the problem would look past the threshold although
    it is right to the solver's tolerance. So those problems are solved again by L1 on the
    interpolated rows alone (rows outside zeroed, batched by :func:`_solves_on_rows`) and
    counted on those rows: the clean solution then fits its clean rows exactly, while a wrong
    vertex with near-fits still fits only ``n``.
    ``solver`` goes to :func:`~jaxpurify.l1_regression`.
    """
    interpolated = np.asarray(solution.interpolated)
    shape, m, n = interpolated.shape[:-1], interpolated.shape[-1], design.shape[-1]
    interpolated = interpolated.reshape(-1, m)
    counts = exactly_fit(design, y, solution, offset=offset).reshape(-1, m).sum(axis=-1)
    redo = np.flatnonzero((counts <= n) & (interpolated.sum(axis=-1) > n))
    if redo.size:
        y = jnp.asarray(y).reshape(-1, m)
        o = jnp.broadcast_to(jnp.asarray(offset), (counts.size, m))
        for take, again in _solves_on_rows(design, y, interpolated, redo, **solver):
            a = design if design.ndim == 2 else design.reshape(-1, m, n)[take]
            fit = exactly_fit(a, y[take], again, offset=o[take]) & interpolated[take]
            counts[take] = fit.sum(axis=-1)
    return counts.reshape(shape)


#: Bytes of row-masked designs one batch of re-fits may hold: a shared design becomes one copy
#: per problem once its rows are masked (64 CIFAR-10 filters x 3073 x 2501 in float64 would be
#: 3.9 GB, several times over inside the solver).
_MASKED_BATCH_BYTES = 1 << 29


def _solves_on_rows(design, targets, rows, problems, **solver):
    """Yield ``(indices, L1 solution)`` of ``min ||rows * (t - A x)||_1`` for ``problems``.

    Args:
        design: ``(m, n)`` shared or ``(B, m, n)``.
        targets: ``(B, m)``.
        rows: ``(B, m)`` bool, the rows each fit may use (the others are zeroed).
        problems: indices into ``B`` to solve.
        **solver: for :func:`~jaxpurify.l1_regression`.

    Batches have one size per layer shape, as many problems as the layer has or fewer if their
    masked designs would exceed ``_MASKED_BATCH_BYTES``; the last is padded by repeating
    problems, so one compiled solve serves a layer however many problems are re-fit.
    """
    batches, m, n = targets.shape[0], *design.shape[-2:]
    size = int(np.clip(_MASKED_BATCH_BYTES // (m * n * design.dtype.itemsize), 1, batches))
    for start in range(0, problems.size, size):
        take = problems[start:start + size]
        pick = np.resize(take, size)
        a = design if design.ndim == 2 else design.reshape(-1, m, n)[pick]
        keep = jnp.asarray(rows[pick])
        sol = l1_regression(jnp.where(keep[..., None], a, 0), jnp.where(keep, targets[pick], 0),
                            throw=False, **solver)
        yield take, jax.tree_util.tree_map(lambda v, k=take.size: v[:k], sol)


def second_explanation(design, solution, **solver) -> np.ndarray:
    """Per problem: how many judged-corrupted rows another vector of ``range(A)`` fits exactly.

    ``T`` = the rows ``solution`` does not interpolate. Tested are the problems the
    interpolation count would certify (more than ``n`` rows interpolated) with ``|T| > n``:
    the residual on ``T`` is fit by :func:`~jaxpurify.l1_regression` with the rows outside
    ``T`` zeroed (they are then interpolated trivially and not counted). Elsewhere the count
    is 0: with ``|T| <= n`` any ``n`` rows are fit exactly (nothing to test), and a problem
    interpolating ``n`` rows or fewer is doubtful already. A count above ``n`` means the
    corruption holds a second explanation (see the module doc). ``solver`` goes to
    ``l1_regression``.
    """
    interpolated = np.asarray(solution.interpolated)
    m, n = interpolated.shape[-1], design.shape[-1]
    corrupted = ~interpolated.reshape(-1, m)
    sizes = corrupted.sum(axis=-1)
    counts = np.zeros(sizes.shape, int)
    test = np.flatnonzero((sizes > n) & (m - sizes > n))
    if test.size:
        residual = jnp.asarray(solution.residual).reshape(-1, m)
        for take, again in _solves_on_rows(design, residual, corrupted, test, **solver):
            counts[take] = np.asarray(again.num_interpolated) - (m - sizes[take])
    return counts.reshape(interpolated.shape[:-1])


def _layer_report(problem, sol, exact, nonfinite, corrupted_leaves, size, solver
                  ) -> LayerReport:
    m, n = problem.design.shape[-2:]
    num = int(sum(int(np.sum(v)) for v in corrupted_leaves.values()))
    fraction = num / size
    crit = float(critical_fraction(m / n)) if m > n else 0.0
    converged = bool(np.all(sol.converged))
    ambiguous = int(np.sum(second_explanation(problem.design, sol, **solver) > n))
    certified = bool(np.all(exact > n)) and ambiguous == 0
    warns = []
    if not converged:
        warns.append(f"{problem.layer}: {int(np.sum(~np.asarray(sol.converged)))} problem(s) "
                     "did not converge (raise max_iters or check the inputs)")
    if ambiguous:
        warns.append(f"{problem.layer}: {ambiguous} problem(s) are ambiguous: the entries judged "
                     f"corrupted are themselves fit exactly, on more than the {n} unknowns, by "
                     "another vector of the subspace, so two networks of the subspace each fit "
                     "many entries exactly and L1 returned the one fitting more (an edit made "
                     "consistent with the subspace, e.g. by an attacker who knows it, looks "
                     "like this); do not trust this layer without another check")
    bad = int(np.sum(exact <= n))
    if bad:
        warns.append(f"{problem.layer}: recovery is doubtful for {bad} of "
                     f"{np.size(exact)} problem(s): the L1 solution fits no more rows than "
                     f"unknowns ({n}) to rounding, as it does past the recovery threshold "
                     f"(detected corrupted fraction {fraction:.3f}, Donoho-Tanner reference "
                     f"{crit:.3f} at ratio {m / n:.2f})")
    return LayerReport(problem.layer, problem.source, corrupted_leaves, num, fraction,
                       int(np.sum(nonfinite)), m / n, crit, np.asarray(sol.objective), converged,
                       certified, tuple(warns), ambiguous, bad, n, np.asarray(exact),
                       np.asarray(sol.num_interpolated))


@full_precision
def purify(model, params, *, init_params=None, inputs=None, subspace: str = "row_space",
           designs: dict | None = None, layers=("conv", "readout"), weight_decay: bool = False,
           method="admm", tol: float | None = None, max_iters: int = 20_000,
           check_every: int | None = None):
    """Recover a contaminated one-hidden-layer CNN's params by L1 regression.

    Args:
        model: a :class:`~jaxpurify.models.OneHiddenLayerCNN` (or a
            :class:`~jaxpurify.models.DesignedOneHiddenLayerCNN`, whose ``designs()`` are then
            used and whose params are the materialized plain params).
        params: the contaminated params (plain dict, or ``{"params": ...}``). NaN/Inf
            entries are allowed (treated as corrupted), and so are absurdly large ones
            (more than ``GROSS_FACTOR`` times the typical deviation from ``w_0``).
        init_params: the init ``w_0`` (same structure); needed by ``row_space`` and ``lazy``.
        inputs: ``(N, H, W, C)`` training inputs; needed by ``row_space`` and ``lazy``.
        subspace: ``"row_space"``, ``"lazy"`` or ``"designed"`` (see
            :mod:`jaxpurify.subspaces` for which training keeps each one exact).
        designs: ``{"conv": A_W, "readout": A_beta}`` for ``subspace="designed"``.
        layers: which layers to recover.
        weight_decay: the params were trained with weight decay (adds ``w_0`` to ``A_W`` and
            ``beta_0`` to ``A_beta``).
        method, tol, max_iters, check_every: passed to :func:`jaxpurify.l1_regression`
            (``tol`` defaults to 1e-12 in float64: the gap is relative to the corruption's
            size, and exactness is the point). A budget too small shows as
            ``converged=False`` in the report, never as a silently accepted result.

    Returns:
        ``(recovered params, PurifyReport)``; params come back in the form they were given.

    Raises:
        ValueError: unknown subspace or layer, mismatched pytrees, NaN/Inf in ``init_params``
            or ``inputs``, inputs of the wrong shape, or a subspace with no redundancy.
    """
    t0 = time.perf_counter()
    if subspace not in S.SOURCES:
        raise ValueError(f"unknown subspace {subspace!r}; choose one of {S.SOURCES}")
    wrapped = isinstance(params, dict) and set(params) == {"params"}
    p = S._params(params)
    if isinstance(model, DesignedOneHiddenLayerCNN):
        designs = designs or model.designs(p["conv"]["kernel"].dtype)
        model = model.plain_model()
    if not isinstance(model, OneHiddenLayerCNN):
        raise TypeError(f"purify handles OneHiddenLayerCNN models; got {type(model).__name__} "
                        "(deeper networks: jaxpurify.multilayer.purify_layers)")
    if not {"conv", "readout"} <= set(p):
        raise ValueError(f"params must hold 'conv' and 'readout'; got {sorted(p)}")
    unknown = set(layers) - {"conv", "readout"}
    if unknown:
        raise ValueError(f"unknown layers {sorted(unknown)}; choose from ('conv', 'readout')")

    if subspace in ("row_space", "lazy"):
        if init_params is None:
            raise ValueError(f"subspace={subspace!r} needs init_params (the init w_0)")
        p0 = S._params(init_params)
        _check_tree("init_params", p0, p)
        _check_finite("init_params", p0)
        inputs = _check_inputs(model, p, inputs)
    elif designs is None:
        raise ValueError("subspace='designed' needs designs={'conv': A_W, 'readout': A_beta} "
                         "(DesignedOneHiddenLayerCNN.designs())")

    out, reports = dict(p), {}
    solver = {"method": method, "max_iters": max_iters, "check_every": check_every,
              "tol": _tolerance(p["conv"]["kernel"].dtype, tol)}
    if "conv" in layers:
        if subspace == "row_space":
            problem = S.filter_row_space(model, p0, inputs, weight_decay=weight_decay)
            vectors = S.filter_vectors(p)
        elif subspace == "lazy":
            problem = S.filter_lazy(model, p0, inputs)
            vectors = S.filter_vectors(p).reshape(1, -1)
        else:
            problem = S.designed(designs, p)["conv"]
            vectors = S.filter_vectors(p).reshape(problem.offset.shape)  # joint: one row
        recovered, sol, nonfinite, erased, exact = _solve(
            problem, vectors, method=method, tol=tol, max_iters=max_iters,
            check_every=check_every)
        shape = S.filter_vectors(p).shape
        out = S.with_filter_vectors(out, recovered.reshape(shape))
        flagged = (_deviates(vectors, recovered) | erased).reshape(shape)
        masks = S.with_filter_vectors({"conv": p["conv"]}, flagged)["conv"]
        masks = {k: np.asarray(v).astype(bool) for k, v in masks.items()}
        reports["conv"] = _layer_report(problem, sol, exact, nonfinite, masks, vectors.size,
                                        solver)

    if "readout" in layers:
        if subspace == "row_space":
            problem = S.readout_row_space(model, out, p0, inputs, weight_decay=weight_decay)
        elif subspace == "lazy":
            problem = S.readout_row_space(model, p0, p0, inputs)._replace(source="lazy")
        else:
            problem = S.designed(designs, p)["readout"]
        shape = S.readout_vectors(p).shape
        vectors = S.readout_vectors(p).reshape(problem.offset.shape)
        recovered, sol, nonfinite, erased, exact = _solve(
            problem, vectors, method=method, tol=tol, max_iters=max_iters,
            check_every=check_every)
        out = S.with_readout_vectors(out, recovered.reshape(shape))
        masks = {"kernel": np.asarray((_deviates(vectors, recovered) | erased).reshape(shape).T)}
        reports["readout"] = _layer_report(problem, sol, exact, nonfinite, masks,
                                           vectors.size, solver)

    report = PurifyReport(reports, time.perf_counter() - t0)
    return ({"params": out} if wrapped else out), report
