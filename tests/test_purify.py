"""``purify``: exact recovery of contaminated one-hidden-layer CNNs, the report, bad inputs.

All problems share the shapes of ``tests/one_hidden_helpers`` so that the L1 solves compile
once: the row-space and designed filters are 32 problems on one ``65 x 16`` design, their
readouts one ``32 x 4`` problem.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpurify import subspaces as S
from jaxpurify.contamination import bit_flips, sparse_gross_errors
from jaxpurify.models import DesignedOneHiddenLayerCNN
from jaxpurify.purify import ROUNDING_FACTOR, PurifyReport, purify
from jaxpurify.recovery import l1_regression
from tests.one_hidden_helpers import (
    PATCH,
    J,
    designed_model,
    designed_trained,
    fast_compiles,  # noqa: F401 (autouse fixture)
    init,
    joint,
    lazy_setup,
    lazy_trained,
    rel_err,
    setup,
    two_stage,
)

EXACT = 1e-10
LEAVES = (("conv", "kernel"), ("conv", "bias"), ("readout", "kernel"))


def _assert_exact(recovered, clean, model, x, leaves=LEAVES):
    for layer, leaf in leaves:
        assert recovered[layer][leaf].dtype == clean[layer][leaf].dtype
        assert rel_err(recovered[layer][leaf], clean[layer][leaf]) <= EXACT, (layer, leaf)
    if len(leaves) == len(LEAVES):
        out = model.apply({"params": recovered}, x)
        ref = model.apply({"params": clean}, x)
        np.testing.assert_allclose(out, ref, rtol=0, atol=EXACT * float(jnp.abs(ref).max()))


def _assert_masks(report, mask, leaves=LEAVES):
    for layer, leaf in leaves:
        flagged = report.layers[layer].corrupted[leaf]
        assert flagged.dtype == bool
        np.testing.assert_array_equal(flagged, np.asarray(mask[layer][leaf]), err_msg=layer)


def _contaminate(params, seed=0, **kw):
    return sparse_gross_errors(params, jax.random.PRNGKey(100 + seed), **{"fraction": 0.1, **kw})


# --------------------------------------------------------------------------- exact recovery


@pytest.mark.parametrize("name", ["gd", "momentum", "weight_decay"])
def test_row_space_recovers_two_stage_training_exactly(name):
    s = setup()
    clean, _ = two_stage(name)
    dirty, mask = _contaminate(clean)
    wd = name == "weight_decay"
    recovered, report = purify(s.student, dirty, init_params=s.p0, inputs=s.x, weight_decay=wd)
    _assert_exact(recovered, clean, s.student, s.x)
    _assert_masks(report, mask)
    assert isinstance(report, PurifyReport) and report.ok and report.warnings == []
    conv, readout = report.layers["conv"], report.layers["readout"]
    assert conv.source == readout.source == "row_space"
    assert conv.ratio == pytest.approx(65 / 17 if wd else 65 / 16)
    assert readout.ratio == pytest.approx(32 / 5 if wd else 32 / 4)
    assert conv.num_corrupted == int(mask["conv"]["kernel"].sum() + mask["conv"]["bias"].sum())
    assert conv.fraction == pytest.approx(conv.num_corrupted / (32 * 65))
    assert conv.num_nonfinite == 0 and conv.converged and conv.certified
    assert 0 < conv.critical_fraction < 1
    assert conv.objective.shape == (32,) and readout.objective.shape == (1,)
    assert "row_space" in report.summary()


@pytest.mark.parametrize("name", ["gd", "weight_decay"])
def test_clean_and_lightly_contaminated_params(name):
    """Untouched filters already lie in the subspace (a rounding-level L1 optimum): they must
    come back unflagged, converged and certified, next to filters that do need solving."""
    s = setup()
    clean, _ = two_stage(name)
    wd = name == "weight_decay"
    recovered, report = purify(s.student, clean, init_params=s.p0, inputs=s.x, weight_decay=wd)
    _assert_exact(recovered, clean, s.student, s.x)
    assert report.ok and all(r.num_corrupted == 0 for r in report.layers.values())
    dirty, mask = _contaminate(clean, fraction=0.01)
    hit = np.asarray(S.filter_vectors(mask)).any(axis=1)
    assert 0 < hit.sum() < 32  # some filters need solving, the others are untouched
    recovered, report = purify(s.student, dirty, init_params=s.p0, inputs=s.x, weight_decay=wd)
    _assert_exact(recovered, clean, s.student, s.x)
    _assert_masks(report, mask)
    assert report.ok


def test_lazy_recovers_the_filters_exactly():
    s = lazy_setup()
    clean = lazy_trained("small")
    dirty, mask = _contaminate(clean, fraction=0.2)
    recovered, report = purify(s.student, dirty, init_params=s.p0, inputs=s.x,
                               subspace="lazy", layers=("conv",))
    _assert_exact(recovered, clean, s.student, s.x, LEAVES[:2])
    _assert_masks(report, mask, LEAVES[:2])
    assert set(report.layers) == {"conv"} and report.ok
    assert report.layers["conv"].source == "lazy"
    assert report.layers["conv"].ratio == pytest.approx(16 * 65 / 4)
    # Layers not asked for come back as given.
    np.testing.assert_array_equal(recovered["readout"]["kernel"], dirty["readout"]["kernel"])


def test_designed_recovers_exactly():
    s = setup()
    dm = designed_model()
    codes, _ = designed_trained()
    clean = dm.materialize(codes)
    dirty, mask = _contaminate(clean, fraction=0.2)
    recovered, report = purify(dm, dirty, subspace="designed")
    _assert_exact(recovered, clean, dm.plain_model(), s.x)
    _assert_masks(report, mask)
    assert report.ok and report.layers["conv"].source == "designed"
    np.testing.assert_allclose(dm.plain_model().apply({"params": recovered}, s.x),
                               dm.apply({"params": codes}, s.x), atol=1e-12)
    # The plain model with the designs given explicitly is the same problem.
    again, _ = purify(dm.plain_model(), dirty, subspace="designed",
                      designs=dm.designs(jnp.float64))
    _assert_exact(again, recovered, dm.plain_model(), s.x)


def test_joint_readout_survives_edits_concentrated_in_one_column():
    """Edits filling 3/4 of one readout column: past the per-column threshold, so the
    per-unit design cannot recover it; coded as a whole (``joint_layers``) the same edits are
    3/40 of the layer's entries and recovery is exact."""
    s = setup()
    kw = dict(filter_code_dim=16, readout_code_dim=4, num_classes=10, pool="mean",
              param_dtype=jnp.float64)
    for layers, exact in (((), False), (("readout",), True)):
        dm = DesignedOneHiddenLayerCNN(J, PATCH, 1, joint_layers=layers, **kw)
        clean = dm.materialize(init(dm, s.key, s.x))
        beta = clean["readout"]["kernel"]  # (J, 10)
        edited = np.zeros(beta.shape, bool)
        edited[: 3 * J // 4, 0] = True
        dirty = {**clean, "readout": {"kernel": jnp.where(edited, beta + 5.0, beta)}}
        recovered, report = purify(dm, dirty, subspace="designed")
        assert report.layers["readout"].ratio == pytest.approx(J / 4)
        if exact:
            _assert_exact(recovered, clean, dm.plain_model(), s.x)
            np.testing.assert_array_equal(report.layers["readout"].corrupted["kernel"], edited)
            assert report.ok
        else:
            assert rel_err(recovered["readout"]["kernel"], beta) > 1e-3


def test_joint_layers_recover_sparse_errors_exactly():
    """Both layers coded as a whole (one 2080 x 512 and one 320 x 40 problem): 10% of every
    entry grossly corrupted comes back exactly, with the corrupted entries flagged."""
    s = setup()
    dm = DesignedOneHiddenLayerCNN(J, PATCH, 1, filter_code_dim=16, readout_code_dim=4,
                                   num_classes=10, pool="mean", param_dtype=jnp.float64,
                                   joint_layers=("conv", "readout"))
    clean = dm.materialize(init(dm, s.key, s.x))
    dirty, mask = _contaminate(clean)
    recovered, report = purify(dm, dirty, subspace="designed")
    _assert_exact(recovered, clean, dm.plain_model(), s.x)
    _assert_masks(report, mask)
    assert report.ok
    assert report.layers["conv"].ratio == pytest.approx(65 / 16)


@pytest.mark.parametrize("law", ["sign_flip", "heavy_tailed", "constant"])
def test_other_error_laws(law):
    s = setup()
    clean, _ = two_stage("momentum")
    dirty, mask = _contaminate(clean, seed=1, law=law)
    recovered, report = purify(s.student, dirty, init_params=s.p0, inputs=s.x)
    _assert_exact(recovered, clean, s.student, s.x)
    _assert_masks(report, mask)
    assert report.ok


def test_float32_exponent_bit_flips_with_nan_and_inf():
    """Exponent flips (in the float32 representation) of weights of size ~1 give NaN/Inf
    and ~1e38 entries next to ordinary ones: all are corrupted, the rest is recovered."""
    s = setup()
    dm = designed_model()
    codes, _ = designed_trained()
    clean = dm.materialize({"conv_code": 8 * codes["conv_code"],  # |w| ~ 1
                            "readout_code": codes["readout_code"]})
    dirty, mask = bit_flips(clean, jax.random.PRNGKey(3), fraction=0.1, bits="exponent")
    leaves = jax.tree_util.tree_leaves(dirty)
    assert sum(int((~jnp.isfinite(a)).sum()) for a in leaves) > 0
    assert max(float(jnp.abs(jnp.where(jnp.isfinite(a), a, 0)).max()) for a in leaves) > 1e30
    recovered, report = purify(dm, dirty, subspace="designed")
    _assert_exact(recovered, clean, dm.plain_model(), s.x)
    _assert_masks(report, mask)
    assert report.layers["conv"].num_nonfinite == int(
        sum((~jnp.isfinite(dirty["conv"][k])).sum() for k in ("kernel", "bias")))
    assert report.layers["conv"].num_nonfinite > 0
    assert report.ok
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(recovered))


def test_nonfinite_entries_in_row_space():
    s = setup()
    clean, _ = two_stage("gd")
    dirty, mask = _contaminate(clean)
    kernel = np.array(dirty["conv"]["kernel"])
    kernel[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    dirty = {**dirty, "conv": {**dirty["conv"], "kernel": jnp.asarray(kernel)}}
    mask["conv"]["kernel"] = mask["conv"]["kernel"].at[0, 0, 0, :3].set(True)
    recovered, report = purify(s.student, dirty, init_params=s.p0, inputs=s.x)
    _assert_exact(recovered, clean, s.student, s.x)
    _assert_masks(report, mask)
    assert report.layers["conv"].num_nonfinite == 3 and report.ok


def test_params_form_is_kept():
    s = setup()
    clean, _ = two_stage("gd")
    dirty, _ = _contaminate(clean)
    plain, _ = purify(s.student, dirty, init_params=s.p0, inputs=s.x)
    wrapped, report = purify(s.student, {"params": dirty}, init_params={"params": s.p0},
                             inputs=s.x)
    assert set(wrapped) == {"params"} and report.ok
    assert jax.tree_util.tree_structure(wrapped["params"]) == jax.tree_util.tree_structure(clean)
    for a, b in zip(jax.tree_util.tree_leaves(wrapped["params"]),
                    jax.tree_util.tree_leaves(plain), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "params" not in plain


def test_beyond_the_threshold_is_reported():
    """45% corrupted at ratio 65/16 ~ 4 (Donoho-Tanner reference ~0.40): not certified."""
    dm = designed_model()
    codes, _ = designed_trained()
    clean = dm.materialize(codes)
    dirty, _ = _contaminate(clean, fraction=0.45)
    recovered, report = purify(dm, dirty, subspace="designed")
    conv = report.layers["conv"]
    assert conv.critical_fraction < 0.45
    assert not conv.certified and not report.ok
    assert conv.num_doubtful > 0 and conv.num_ambiguous == 0  # past the threshold, generic
    assert any("doubtful" in w for w in report.warnings)
    assert "doubtful" in report.summary()
    assert rel_err(recovered["conv"]["kernel"], clean["conv"]["kernel"]) > 1e-2  # indeed wrong


def test_an_edit_consistent_with_the_subspace_is_reported_ambiguous():
    """An attacker who knows ``A`` writes the entries holding 90% of an in-range change
    ``A delta`` into filter 0 (43 of its 65 entries): L1 returns the attacker's filter
    ``w + A delta``, interpolating the written entries (more than ``n = 16``), so the
    interpolation count alone would certify it. The clean entries it then calls corrupted
    are fit exactly by ``-A delta``: ambiguous, not certified. Generic gross errors past
    ``n`` entries in the other filters are not."""
    from jaxpurify.attacks import _concentrated_support

    dm = designed_model()
    codes, _ = designed_trained()
    clean = dm.materialize(codes)
    dirty, _ = _contaminate(clean, fraction=0.3)  # 19-20 of 65 entries per filter: > n
    a = np.asarray(dm.designs(jnp.float64)["conv"])
    change = a @ np.random.default_rng(0).standard_normal(a.shape[1])
    written = _concentrated_support(change, 0.9)
    assert written.sum() > 16 and (~written).sum() > 16  # both sides testable
    clean_vectors = np.asarray(S.filter_vectors(clean))
    vectors = clean_vectors.copy()
    vectors[0, written] += change[written]
    dirty = S.with_filter_vectors(dirty, jnp.asarray(vectors[:1]).repeat(J, 0).at[1:].set(
        S.filter_vectors(dirty)[1:]))
    recovered, report = purify(dm, dirty, subspace="designed")
    conv = report.layers["conv"]
    got = np.asarray(S.filter_vectors(recovered))
    np.testing.assert_allclose(got[0], clean_vectors[0] + change, atol=1e-10)  # attacker's
    assert conv.num_ambiguous == 1 and not conv.certified and not report.ok
    assert any("ambiguous" in w for w in conv.warnings)
    # the other filters' gross errors, more than n entries in many of them, are not
    # ambiguous (generic errors admit no second explanation; some filters are past the
    # threshold at 30% and come back wrong, reported as ordinary doubtful problems)
    flagged = conv.corrupted["kernel"].reshape(-1, J).sum(0) + conv.corrupted["bias"]
    assert np.sum(flagged[1:] > 16) >= 10


def test_near_fits_of_a_wrong_vertex_do_not_certify_it():
    """float32. 60% of filter 0's entries hit: L1 returns a wrong vertex fitting exactly
    ``n = 16`` rows (doubtful). Three of its corrupted entries moved to 25 roundings of that
    vertex's fit, on the same side (the vertex stays optimal: same dual certificate): the
    solver's looser interpolation test (``eps**0.75``, about 54 roundings) now counts ``n + 3``
    rows, which the interpolation count alone would certify. Counted to the rounding of the
    inputs (``exactly_fit``) they are not fits: still doubtful, not certified; the clean
    filters are certified."""
    dm = designed_model()
    codes, _ = designed_trained()
    clean = jax.tree.map(lambda t: t.astype(jnp.float32), dm.materialize(codes))
    a = dm.designs(jnp.float32)["conv"]
    m, n = a.shape
    vectors = np.asarray(S.filter_vectors(clean)).copy()
    rng = np.random.default_rng(1)
    hit = rng.choice(m, int(0.6 * m), replace=False)
    vectors[0, hit] += rng.normal(size=hit.size).astype(np.float32) * np.abs(vectors[0]).max()
    sol = l1_regression(a, jnp.asarray(vectors[0]))
    assert int(sol.num_interpolated) == n  # a vertex past the threshold
    r = np.asarray(sol.residual)
    fit = vectors[0] - r
    eps = float(jnp.finfo(jnp.float32).eps)
    scale = max(np.abs(fit).max(), np.median(np.abs(vectors[0])))
    spread = np.abs(np.asarray(a)) @ np.abs(np.asarray(sol.x))
    outside = np.flatnonzero(~np.asarray(sol.interpolated))
    pick = outside[np.argsort((spread + np.abs(fit))[outside])[:3]]
    # 25 roundings of the scale: above exactly_fit's bound there, below the solver's test
    assert np.all(ROUNDING_FACTOR * (spread + np.abs(fit))[pick] < 25 * scale)
    vectors[0, pick] = fit[pick] + np.sign(r[pick]) * 25 * eps * scale
    near = l1_regression(a, jnp.asarray(vectors[0]))
    assert int(near.num_interpolated) == n + 3  # the old certificate's count
    recovered, report = purify(dm, S.with_filter_vectors(clean, jnp.asarray(vectors)),
                               subspace="designed", layers=("conv",))
    conv = report.layers["conv"]
    got = np.asarray(S.filter_vectors(recovered))
    clean_vectors = np.asarray(S.filter_vectors(clean))
    assert np.abs(got[0] - clean_vectors[0]).max() > 0.1  # wrong
    np.testing.assert_allclose(got[1:], clean_vectors[1:], atol=1e-6)
    assert conv.num_doubtful == 1 and conv.num_ambiguous == 0
    assert conv.unknowns == n and conv.num_interpolated[0] == n + 3 and conv.num_fit[0] <= n
    assert np.all(conv.num_fit[1:] == m)  # the clean filters: every row, to rounding
    assert not conv.certified and not report.ok
    assert any("fits no more rows than unknowns (16) to rounding" in w for w in conv.warnings)


def _mantissa_flipped_problems():
    """float32, 16 problems ``y = A x`` (120 x 30), a quarter of the entries with one mantissa
    bit flipped; returns ``(rng, A, x, y)`` (``rng`` for further draws)."""
    from jaxpurify.contamination import bit_flips

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((120, 30)).astype(np.float32))
    x = rng.standard_normal((16, 30)).astype(np.float32)
    y = bit_flips({"y": jnp.asarray(x) @ a.T}, jax.random.key(0), fraction=0.25,
                  bits="mantissa")[0]["y"]
    return rng, a, x, y


def test_fit_count_refits_solutions_smeared_by_low_mantissa_flips():
    """float32, 16 problems (120 x 30), a quarter of the entries with one mantissa bit flipped.
    Flips of the low bits are below the solver's interpolation test, so its polish fits them
    along with the clean rows and the solutions come back smeared (right to ~3e-5): counted to
    rounding, many problems fit no more than ``n`` rows. Re-fit on the interpolated rows
    (``fit_count``), every problem fits its clean rows exactly again."""
    from jaxpurify.purify import exactly_fit, fit_count

    rng, a, x, y = _mantissa_flipped_problems()
    m, n = a.shape
    sol = l1_regression(a, y)
    assert np.all(np.asarray(sol.num_interpolated) > n)
    assert np.sum(exactly_fit(a, y, sol).sum(axis=-1) <= n) >= 5  # smeared
    counts = fit_count(a, y, sol)
    assert counts.shape == (16,) and np.all(counts > n)
    assert np.abs(np.asarray(sol.x) - x).max() < 1e-4 * np.abs(x).max()


@pytest.mark.parametrize("per_batch", [1, 3])
def test_refits_in_bounded_batches_count_the_same(monkeypatch, per_batch):
    """The re-fits copy a shared design once per problem; under a byte budget they run in
    batches of ``per_batch`` problems (the last padded) and decide as one batch does. The counts
    themselves may move by a few rows: float32 rows near the rounding bound fall either side
    of it when the batch (hence the compiled reduction order) changes."""
    from jaxpurify import purify as P

    rng, a, x, y = _mantissa_flipped_problems()
    m, n = a.shape
    sol = l1_regression(a, y)
    whole = P.fit_count(a, y, sol)
    # an edit consistent with range(A) on 36 > n rows (30%, below the threshold): a second
    # explanation of those rows
    edited = x @ np.asarray(a).T
    edited[:, :36] += (rng.standard_normal((16, n)).astype(np.float32) @ np.asarray(a).T)[:, :36]
    odd = l1_regression(a, jnp.asarray(edited))
    second = P.second_explanation(a, odd)
    sizes = []
    solve = P.l1_regression
    monkeypatch.setattr(P, "l1_regression", lambda d, t, **k: sizes.append(d.shape[0])
                        or solve(d, t, **k))
    monkeypatch.setattr(P, "_MASKED_BATCH_BYTES", per_batch * m * n * 4)
    counts, again = P.fit_count(a, y, sol), P.second_explanation(a, odd)
    np.testing.assert_array_equal(counts > n, whole > n)
    np.testing.assert_allclose(counts, whole, atol=0.05 * m)
    np.testing.assert_array_equal(again > n, second > n)
    assert np.sum(second > n) >= 12  # the others: L1 went wrong, or nothing to test
    assert sizes and set(sizes) == {per_batch}


def test_iteration_budget_is_passed_and_reported():
    """A budget too small past the threshold shows as not converged, with what to do."""
    dm = designed_model()
    codes, _ = designed_trained()
    dirty, _ = _contaminate(dm.materialize(codes), fraction=0.45)
    _, report = purify(dm, dirty, subspace="designed", max_iters=10, check_every=10)
    assert not report.layers["conv"].converged and not report.ok
    assert any("raise max_iters" in w for w in report.warnings)


def test_training_outside_the_subspace_is_reported():
    """Joint training: the filters are still exact, the readout is not (and is flagged);
    Adam: nothing is in the row-space, every filter problem is flagged."""
    s = setup()
    clean, _ = joint("momentum")
    dirty, _ = _contaminate(clean)
    recovered, report = purify(s.student, dirty, init_params=s.p0, inputs=s.x)
    _assert_exact(recovered, clean, s.student, s.x, LEAVES[:2])
    assert report.layers["conv"].certified and not report.layers["readout"].certified
    assert not report.ok and any(w.startswith("readout: recovery is doubtful")
                                 for w in report.warnings)
    clean, _ = joint("adam")
    dirty, _ = _contaminate(clean)
    recovered, report = purify(s.student, dirty, init_params=s.p0, inputs=s.x)
    assert rel_err(recovered["conv"]["kernel"], clean["conv"]["kernel"]) > 1e-2
    assert not report.layers["conv"].certified and not report.ok


# --------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def clean():
    return two_stage("gd")[0]


def test_mismatched_init_params_raise(clean):
    s = setup()
    with pytest.raises(ValueError, match="shape"):
        small = lazy_setup()  # 16 filters instead of 32
        purify(s.student, clean, init_params=small.p0, inputs=s.x)
    no_bias = {"conv": {"kernel": s.p0["conv"]["kernel"]}, "readout": s.p0["readout"]}
    with pytest.raises(ValueError, match="structure"):
        purify(s.student, clean, init_params=no_bias, inputs=s.x)
    nan = {**s.p0, "readout": {"kernel": s.p0["readout"]["kernel"].at[0, 0].set(jnp.nan)}}
    with pytest.raises(ValueError, match="NaN"):
        purify(s.student, clean, init_params=nan, inputs=s.x)
    with pytest.raises(ValueError, match="init_params"):
        purify(s.student, clean, inputs=s.x)
    with pytest.raises(ValueError, match="init_params"):
        purify(s.student, clean, inputs=s.x, subspace="lazy")


@pytest.mark.parametrize("make", [
    lambda x: x[0],  # no batch axis
    lambda x: jnp.concatenate([x, x, x], axis=-1),  # 3 channels, the filters take 1
    lambda x: x[:, :12],  # not tiled by the 8x8 patches
    lambda x: x.at[0, 0, 0, 0].set(jnp.nan),
    lambda x: None,
], ids=["ndim", "channels", "tiling", "nan", "missing"])
def test_bad_inputs_raise(clean, make):
    s = setup()
    with pytest.raises(ValueError, match="inputs"):
        purify(s.student, clean, init_params=s.p0, inputs=make(s.x))


def test_bad_options_raise(clean):
    s = setup()
    with pytest.raises(ValueError, match="unknown subspace"):
        purify(s.student, clean, init_params=s.p0, inputs=s.x, subspace="pca")
    with pytest.raises(ValueError, match="unknown layers"):
        purify(s.student, clean, init_params=s.p0, inputs=s.x, layers=("conv", "dense"))
    with pytest.raises(ValueError, match="designs"):
        purify(s.student, clean, subspace="designed")
    a = designed_model().designs(jnp.float64)  # per filter: 65 rows; per layer: 32 * 65
    with pytest.raises(ValueError, match="'conv' design has 64 rows; the layer has 65 entries"):
        purify(s.student, clean, subspace="designed", designs={**a, "conv": a["conv"][:-1]})
    with pytest.raises(ValueError, match="'conv' and 'readout'"):
        purify(s.student, {"conv": clean["conv"]}, init_params=s.p0, inputs=s.x)


def test_not_a_cnn_raises(clean):
    s = setup()
    with pytest.raises(TypeError, match="OneHiddenLayerCNN"):
        purify(nn.Dense(3), clean, init_params=s.p0, inputs=s.x)


def test_full_span_raises(clean):
    s = setup()
    x = jax.random.normal(jax.random.PRNGKey(5), (17, 16, 16, 1), jnp.float64)
    with pytest.raises(ValueError, match="no redundancy"):
        purify(s.student, clean, init_params=s.p0, inputs=x)
