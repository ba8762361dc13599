"""Backdoor defenses: FT, fine-pruning, ANP and jaxpurify (exact removal of weight edits)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpurify import attacks as A
from jaxpurify import defenses as D
from jaxpurify import subspaces as S
from jaxpurify.models import DesignedOneHiddenLayerCNN
from jaxpurify.training import fit
from tests.backdoor_helpers import TRIGGER
from tests.backdoor_helpers import synthetic_images as _synthetic


@pytest.fixture(scope="module")
def designed():
    """A tiny designed one-hidden-layer CNN (filters 17 = 16 + bias, code 5; readout 16/4)."""
    m = DesignedOneHiddenLayerCNN(16, 4, 1, 5, 4, num_classes=3, pool="mean")
    x, y = _synthetic(600, 0)
    p0 = m.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))["params"]
    p, _ = fit(m, p0, jnp.asarray(x), jnp.asarray(y), optimizer=optax.adam(1e-2), steps=300,
               loss="cross_entropy", batch_size=64, key=jax.random.PRNGKey(1))
    w = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), m.materialize(p))
    x_te, y_te = _synthetic(300, 1)
    return m, w, x, y, x_te, y_te


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def _same_structure(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert u.shape == v.shape and bool(jnp.all(jnp.isfinite(u)))


def test_jaxpurify_removes_a_weight_edit_backdoor_exactly_without_data(designed):
    m, w, x, y, x_te, y_te = designed
    assert A.accuracy(m, w, x_te, y_te) > 0.9
    asr_clean = A.attack_success_rate(m, w, x_te, y_te, 0, TRIGGER)
    edited, mask = A.weight_edit(m, w, x[:200], y[:200], target=0, trigger=TRIGGER, k=4,
                                 steps=150, learning_rate=5e-2)
    asr_edit = A.attack_success_rate(m, edited, x_te, y_te, 0, TRIGGER)
    assert asr_edit > asr_clean + 0.3, (asr_clean, asr_edit)
    out, info = D.jaxpurify_defense(m, edited)
    assert _max_diff(out, w) < 1e-5
    assert info.details["certified"]
    assert sum(r["num_corrupted"] for r in info.details["recovery"].values()) >= 4
    assert A.attack_success_rate(m, out, x_te, y_te, 0, TRIGGER) == asr_clean
    assert A.accuracy(m, out, x_te, y_te) == A.accuracy(m, w, x_te, y_te)


def test_recovery_finds_planted_edits_and_leaves_clean_rows_untouched(designed):
    m, w, *_ = designed
    bad = {**w, "conv": dict(w["conv"])}
    kernel = np.array(w["conv"]["kernel"])
    kernel[0, 0, 0, 3] += 2.0  # filter 3: two of its 17 entries
    kernel[1, 2, 0, 3] -= 1.5
    kernel[3, 3, 0, 9] += 3.0  # filter 9: one entry
    bad["conv"]["kernel"] = jnp.asarray(kernel)
    out, report = D.recover_designed(m, bad)
    assert _max_diff(out, w) < 1e-5
    assert report["conv"]["rows_off_subspace"] == 2 and report["conv"]["num_corrupted"] == 3
    assert report["readout"]["rows_off_subspace"] == 0
    untouched = np.ones(16, bool)
    untouched[[3, 9]] = False
    np.testing.assert_array_equal(np.asarray(out["conv"]["kernel"])[..., untouched],
                                  np.asarray(w["conv"]["kernel"])[..., untouched])
    # the certificate says when the edits are too dense to recover
    dense = {**w, "readout": {"kernel": w["readout"]["kernel"].at[:12, 0].add(2.0)}}
    _, report = D.recover_designed(m, dense)
    assert not report["readout"]["certified"]


def test_jaxpurify_with_benign_data_fine_tunes_the_codes(designed):
    m, w, x, y, *_ = designed
    out, info = D.jaxpurify_defense(m, w, x[:50], y[:50], key=jax.random.PRNGKey(0))
    _same_structure(out, w)
    assert info.details["ft_steps"] == 10
    assert _max_diff(out, w) > 0  # fine-tuned ...
    _, report = D.recover_designed(m, out)  # ... and still in range(A)
    assert all(r["rows_off_subspace"] == 0 for r in report.values())


def test_fine_tune_runs_and_respects_the_mask(designed):
    m, w, x, y, *_ = designed
    out, info = D.fine_tune(m, w, x[:64], y[:64], epochs=2, batch_size=32)
    _same_structure(out, w)
    assert info.name == "ft" and info.details["steps"] == 4
    assert _max_diff(out, w) > 0
    frozen = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, bool), w)
    frozen["readout"]["kernel"] = jnp.ones(w["readout"]["kernel"].shape, bool)
    out, _ = D.fine_tune(m, w, x[:64], y[:64], epochs=2, update_mask=frozen)
    np.testing.assert_array_equal(out["conv"]["kernel"], w["conv"]["kernel"])
    assert _max_diff(out["readout"], w["readout"]) > 0
    with pytest.raises(ValueError, match="benign"):
        D.fine_tune(m, w, x[:0], y[:0])


def test_fine_tune_cosine_schedule_decays_the_rate_over_the_steps(designed):
    """Full batch, two epochs: the cosine recipe is one SGD step at the peak rate and one at
    half of it (momentum and coupled weight decay as in torch's SGD)."""
    m, w, x, y, *_ = designed
    xb, yb = jnp.asarray(x[:64]), jnp.asarray(y[:64])
    out, info = D.fine_tune(m, w, xb, yb, epochs=2, batch_size=64, schedule="cosine",
                            learning_rate=0.05)
    assert info.details["steps"] == 2
    apply = D.network(m).apply
    grad = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        apply(p, xb), yb).mean())
    p, velocity = w, jax.tree_util.tree_map(jnp.zeros_like, w)
    for lr in (0.05, 0.025):
        g = jax.tree_util.tree_map(lambda a, b: a + 5e-4 * b, grad(p), p)
        velocity = jax.tree_util.tree_map(lambda v, a: 0.9 * v + a, velocity, g)
        p = jax.tree_util.tree_map(lambda a, v, lr=lr: a - lr * v, p, velocity)
    assert _max_diff(out, p) < 1e-6
    constant, _ = D.fine_tune(m, w, xb, yb, epochs=2, batch_size=64, learning_rate=0.05)
    assert _max_diff(constant, p) > 1e-5  # a constant rate takes the second step in full
    with pytest.raises(ValueError, match="schedule must be"):
        D.fine_tune(m, w, xb, yb, schedule="step")


def test_fine_tune_augments_its_minibatches(designed):
    """Flips change nothing on mirror-symmetric images and change the step on the others;
    shifts change it on any image. BackdoorBench's recipe runs as a preset."""
    m, w, x, y, *_ = designed
    xb, yb = x[:64], y[:64]
    mirrored = (xb + xb[:, :, ::-1]) / 2
    kw = {"epochs": 3, "batch_size": 64, "key": jax.random.PRNGKey(5)}
    plain, _ = D.fine_tune(m, w, mirrored, yb, **kw)
    flipped, _ = D.fine_tune(m, w, mirrored, yb, hflip=True, **kw)
    assert _max_diff(plain, flipped) < 1e-5
    plain, _ = D.fine_tune(m, w, xb, yb, **kw)
    assert _max_diff(plain, D.fine_tune(m, w, xb, yb, hflip=True, **kw)[0]) > 1e-3
    assert _max_diff(plain, D.fine_tune(m, w, mirrored, yb, crop=2, **kw)[0]) > 1e-3
    out, info = D.fine_tune(m, w, xb, yb, **{**D.BACKDOORBENCH_FT, "epochs": 2})
    _same_structure(out, w)
    assert info.details["steps"] == 2  # one minibatch of 256 covers the 64 images
    with pytest.raises(ValueError, match="crop must be >= 0"):
        D.fine_tune(m, w, xb, yb, crop=-1)


def test_fine_prune_prunes_dormant_channels_and_keeps_them_pruned(designed):
    m, w, x, y, *_ = designed
    # make channels 0 and 1 dormant: large negative bias
    bad = {**w, "conv": {**w["conv"], "bias": w["conv"]["bias"].at[:2].set(-100.0)}}
    out, info = D.fine_prune(m, bad, x[:100], y[:100], key=jax.random.PRNGKey(0))
    _same_structure(out, w)
    pruned = info.details["pruned"]
    assert {0, 1} <= set(pruned) and info.details["val_size"] == 20
    k = np.asarray(out["conv"]["kernel"])
    assert np.all(k[..., pruned] == 0) and np.all(np.asarray(out["conv"]["bias"])[pruned] == 0)
    assert info.details["val_acc_pruned"] >= info.details["val_acc_unpruned"] - 0.04


def test_fine_prune_backdoorbench_steps_and_relative_stop(designed):
    """BackdoorBench's rule prunes ceil(1% of 16) = 1 channel per step, as deep as a 10%
    relative drop allows; coarser steps prune a multiple of the step, the same channels
    first; the recipe's fine-tuning is the cosine, augmented one."""
    m, w, x, y, *_ = designed
    bad = {**w, "conv": {**w["conv"], "bias": w["conv"]["bias"].at[:2].set(-100.0)}}
    xb, yb = x[:100], y[:100]
    kw = {"key": jax.random.PRNGKey(0), "epochs": 1}
    out, info = D.fine_prune(m, bad, xb, yb, **{**D.BACKDOORBENCH_FP, **kw})
    _same_structure(out, w)
    d = info.details
    assert {0, 1} <= set(d["pruned"]) and d["ft_steps"] == 1  # one batch of 256
    assert d["val_acc_pruned"] >= 0.9 * d["val_acc_unpruned"]
    # four channels per step: a multiple of 4 channels, taken from the same ranking
    _, info4 = D.fine_prune(m, bad, xb, yb, prune_fraction=0.25, max_drop=0.1,
                            relative_drop=True, **kw)
    four = info4.details["pruned"]
    assert len(four) % 4 == 0 and len(four) < 16
    short, long_ = sorted((four, d["pruned"]), key=len)
    assert long_[: len(short)] == short
    # no drop allowed: pruning stops at the first step that costs any held-out accuracy
    _, info_s = D.fine_prune(m, bad, xb, yb, max_drop=0.0, relative_drop=True, **kw)
    assert info_s.details["val_acc_pruned"] >= info_s.details["val_acc_unpruned"]
    assert d["pruned"][: info_s.details["num_pruned"]] == info_s.details["pruned"]
    # the fine-tuning is the recipe's: without its flips and shifts the step differs
    plain, info_p = D.fine_prune(m, bad, xb, yb, **{**D.BACKDOORBENCH_FP, **kw, "hflip": False,
                                                    "crop": 0})
    assert info_p.details["pruned"] == d["pruned"] and _max_diff(out, plain) > 1e-4
    with pytest.raises(ValueError, match="prune_fraction"):
        D.fine_prune(m, bad, xb, yb, prune_fraction=1.5)


def test_anp_runs_and_prunes_by_mask_threshold(designed):
    m, w, x, y, *_ = designed
    out, info = D.anp(m, w, x[:100], y[:100], iterations=30, key=jax.random.PRNGKey(0))
    _same_structure(out, w)
    mask = np.asarray(info.details["mask"]["conv"])
    assert mask.shape == (16,) and np.all((mask >= 0) & (mask <= 1))
    pruned = info.details["pruned"]["conv"]
    np.testing.assert_array_equal(sorted(pruned), np.flatnonzero(mask < 0.2))
    k = np.asarray(out["conv"]["kernel"])
    assert np.all(k[..., pruned] == 0)
    np.testing.assert_array_equal(out["conv"]["bias"], w["conv"]["bias"])  # shift kept


def test_anp_prune_stops_on_benign_accuracy(designed):
    m, w, x, y, *_ = designed
    xb, yb = x[:100], y[:100]
    mask = {"conv": np.linspace(0.0, 1.0, 16)}  # channel j has mask j / 15
    out, info = D.anp_prune(m, w, mask, xb, yb)
    t = info.details["threshold"]
    pruned = info.details["pruned"]["conv"]
    assert pruned == [int(j) for j in np.flatnonzero(mask["conv"] <= t)]
    k = np.asarray(out["conv"]["kernel"])
    assert np.all(k[..., pruned] == 0) and np.all(k[..., len(pruned):] != 0)
    np.testing.assert_array_equal(out["conv"]["bias"], w["conv"]["bias"])  # shift kept
    base = A.accuracy(m, w, xb, yb)
    assert info.details["benign_acc_unpruned"] == base
    assert A.accuracy(m, out, xb, yb) >= base - 0.04  # the stopping rule holds
    if t < 0.9:  # and the next threshold of the sweep would have broken it
        nxt = [int(j) for j in np.flatnonzero(mask["conv"] <= t + 0.05)]
        pruned_more = D.prune_channels(w, "conv", nxt, keep_bias=True)
        assert A.accuracy(m, pruned_more, xb, yb) < base - 0.04
    # any drop allowed: the whole sweep, up to pruning_max; none allowed below base: nothing
    everything = D.anp_prune(m, w, mask, xb, yb, max_drop=1.0)[1].details
    assert everything["threshold"] == 0.9 and everything["num_pruned"] == 14
    none, info = D.anp_prune(m, w, mask, xb, yb, max_drop=-1.0)
    assert info.details["threshold"] is None and _max_diff(none, w) == 0


def test_defenses_accept_a_multilayer_designed_cnn(designed):
    ml = pytest.importorskip("jaxpurify.multilayer")
    del designed  # its recovery compiled the solver for 16 rows of 17 x 5: conv1 reuses it
    m = ml.DesignedCNN(layers=(ml.Conv(16, 4, "SAME", pool=2), ml.Dense(3)),
                       input_shape=(8, 8, 1), ratio=3.4)
    x, y = _synthetic(64, 2)
    w = m.materialize(m.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))["params"])
    assert D.network(m).conv_layers == ("conv1",)  # ANP's neurons
    assert D.channel_activations(m, w, x).shape == (16,)  # fine-pruning's view: last conv
    bad = {**w, "conv1": {**w["conv1"], "bias": w["conv1"]["bias"].at[1].add(5.0)}}
    out, info = D.jaxpurify_defense(m, bad)
    assert _max_diff(out, w) < 1e-5 and info.details["certified"]
    assert info.details["recovery"]["conv1"]["rows_off_subspace"] == 1
    last = m.layer_info()[-1].name
    out, info = D.refit_readout(m, bad, x, y, init_params=w, steps=5)
    assert info.details["layer"] == last and last != "conv1"
    np.testing.assert_array_equal(out["conv1"]["kernel"], bad["conv1"]["kernel"])
    assert _max_diff(out[last], w[last]) > 0
    start = {**bad, last: w[last]}
    mask = {k: jax.tree_util.tree_map(lambda _, on=k == last: on, v) for k, v in bad.items()}
    full = D.train_masked(D.network(m).apply, start, jnp.asarray(x), jnp.asarray(y),
                          optimizer=("sgd", 0.1, 0.9, 0.0), steps=5, batch_size=128,
                          key=jax.random.PRNGKey(0), update_mask=mask)
    assert _max_diff(out, full) < 1e-5  # frozen features computed once: same training


def test_refit_readout_stays_in_the_benign_feature_span_from_init(designed):
    """SGD from beta_0 on a few benign images: beta - beta_0 in span{h(x_s)}, the rest frozen."""
    m, w, x, y, *_ = designed
    p0 = m.materialize(m.init(jax.random.PRNGKey(7), jnp.asarray(x[:1]))["params"])
    xb, yb = x[:5], y[:5]  # 5 feature vectors span 5 of the 16 readout directions
    out, info = D.refit_readout(m, w, xb, yb, init_params=p0, steps=40,
                                key=jax.random.PRNGKey(0))
    _same_structure(out, w)
    assert info.name == "jaxpurify" and info.details["layer"] == "readout"
    np.testing.assert_array_equal(out["conv"]["kernel"], w["conv"]["kernel"])
    np.testing.assert_array_equal(out["conv"]["bias"], w["conv"]["bias"])
    h = np.asarray(D.network(m).channels(w, jnp.asarray(xb)), np.float64)  # (5, 16)
    delta = np.asarray(out["readout"]["kernel"] - p0["readout"]["kernel"], np.float64)
    q, _ = np.linalg.qr(h.T)  # orthonormal basis of the benign feature span
    off_span = delta - q @ (q.T @ delta)
    assert np.linalg.norm(delta) > 1e-2  # it trained ...
    assert np.linalg.norm(off_span) < 1e-5 * np.linalg.norm(delta)  # ... inside the span
    # the deployed readout is forgotten: starting from a different deployed readout gives
    # the same result
    other = {**w, "readout": {"kernel": w["readout"]["kernel"] + 1.0}}
    again, _ = D.refit_readout(m, other, xb, yb, init_params=p0, steps=40,
                               key=jax.random.PRNGKey(0))
    np.testing.assert_allclose(again["readout"]["kernel"], out["readout"]["kernel"], atol=1e-6)
    with pytest.raises(ValueError, match="init_params must hold"):
        D.refit_readout(m, w, xb, yb, init_params={"conv": p0["conv"]})
    # the same as training the whole network from the reset readout with the rest masked
    start = {**w, "readout": p0["readout"]}
    mask = {"conv": jax.tree_util.tree_map(lambda _: False, w["conv"]),
            "readout": jax.tree_util.tree_map(lambda _: True, w["readout"])}
    full = D.train_masked(D.network(m).apply, start, jnp.asarray(xb), jnp.asarray(yb),
                          optimizer=("sgd", 0.1, 0.9, 0.0), steps=40, batch_size=128,
                          key=jax.random.PRNGKey(0), update_mask=mask)
    np.testing.assert_allclose(out["readout"]["kernel"], full["readout"]["kernel"],
                               rtol=1e-4, atol=1e-5)


def test_designed_readout_refit_trains_the_codes_and_stays_in_range_A(designed):
    """subspace="designed": beta_c = A theta_c with theta from theta_0 by SGD on the benign
    features, so beta - beta_0 lies in A A^T span{h(x_s)} and the network stays designed."""
    m, w, x, y, *_ = designed
    c0 = m.init(jax.random.PRNGKey(7), jnp.asarray(x[:1]))["params"]
    p0 = m.materialize(c0)
    xb, yb = x[:2], y[:2]  # 2 feature vectors: a 2-dim part of the 4-dim range(A)
    out, info = D.refit_readout(m, w, xb, yb, init_params=p0, subspace="designed", steps=40,
                                key=jax.random.PRNGKey(0))
    _same_structure(out, w)
    assert info.details["variant"] == "designed-readout"
    assert info.details["unknowns"] == 4 * 3  # readout code 4 per class, 3 classes
    np.testing.assert_array_equal(out["conv"]["kernel"], w["conv"]["kernel"])
    a = np.asarray(m.designs(jnp.float64)["readout"])  # (16, 4)
    h = np.asarray(D.network(m).channels(w, jnp.asarray(xb)), np.float64)  # (2, 16)
    delta = np.asarray(out["readout"]["kernel"] - p0["readout"]["kernel"], np.float64)
    q, _ = np.linalg.qr(a @ a.T @ h.T)  # basis of A A^T span{h}
    assert np.linalg.norm(delta) > 1e-2
    assert np.linalg.norm(delta - q @ (q.T @ delta)) < 1e-5 * np.linalg.norm(delta)
    _, report = D.recover_designed(m, out)
    assert report["readout"]["rows_off_subspace"] == 0  # still a valid designed network
    # the same as training the designed model's readout codes, the filter codes frozen
    codes = {"conv_code": D._codes(m, w)["conv_code"], "readout_code": c0["readout_code"]}
    mask = {"conv_code": jax.tree_util.tree_map(lambda _: False, codes["conv_code"]),
            "readout_code": jax.tree_util.tree_map(lambda _: True, codes["readout_code"])}
    full = D.train_masked(lambda c, xb: m.apply({"params": c}, xb), codes, jnp.asarray(xb),
                          jnp.asarray(yb), optimizer=("sgd", 0.1, 0.9, 0.0), steps=40,
                          batch_size=128, key=jax.random.PRNGKey(0), update_mask=mask)
    np.testing.assert_allclose(out["readout"]["kernel"],
                               m.materialize(full)["readout"]["kernel"], rtol=1e-4, atol=1e-5)
    # a second call with the same shapes reuses the compiled training step
    compiled = D._train_step._cache_size()
    again, _ = D.refit_readout(m, w, xb, yb, init_params=p0, subspace="designed", steps=40,
                               key=jax.random.PRNGKey(0))
    assert D._train_step._cache_size() == compiled
    np.testing.assert_array_equal(again["readout"]["kernel"], out["readout"]["kernel"])
    with pytest.raises(ValueError, match="subspace must be"):
        D.refit_readout(m, w, xb, yb, init_params=p0, subspace="row_space")
    with pytest.raises(TypeError, match="needs a designed model"):
        D.refit_readout(m.plain_model(), w, xb, yb, init_params=p0, subspace="designed")


def test_joint_readout_design_recovers_a_concentrated_edit(designed):
    """10 of a readout column's 16 entries edited: past the per-column threshold (the
    per-unit design is not certified), 10 of 48 entries of a readout coded as a whole
    (``joint_layers``) is not. The code round trip, code fine-tuning and the designed readout
    refit work on the one-vector layer too."""
    _, _, x, y, *_ = designed
    per_unit, joint = (DesignedOneHiddenLayerCNN(16, 4, 1, 5, 4, num_classes=3, pool="mean",
                                                 joint_layers=layers)
                       for layers in ((), ("readout",)))
    for m, recovered in ((per_unit, False), (joint, True)):
        codes = m.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))["params"]
        w = m.materialize(codes)
        bad = {**w, "readout": {"kernel": w["readout"]["kernel"].at[:10, 0].add(2.0)}}
        out, report = D.recover_designed(m, bad)
        assert report["readout"]["certified"] is recovered
        assert (_max_diff(out, w) < 1e-6) is recovered
    assert report["readout"]["rows"] == 1 and report["readout"]["num_corrupted"] == 10
    assert _max_diff(D._codes(joint, w), codes) < 1e-6
    out, info = D.jaxpurify_defense(joint, bad, x[:50], y[:50], key=jax.random.PRNGKey(0))
    assert info.details["certified"] and _max_diff(out, w) > 0  # fine-tuned from w ...
    assert all(r["rows_off_subspace"] == 0 for r in D.recover_designed(joint, out)[1].values())
    out, info = D.refit_readout(joint, w, x[:20], y[:20], init_params=w, subspace="designed",
                                steps=20, key=jax.random.PRNGKey(0))
    assert info.details["unknowns"] == 4 * 3 and _max_diff(out, w) > 0
    assert D.recover_designed(joint, out)[1]["readout"]["rows_off_subspace"] == 0


@pytest.mark.parametrize("robust", [True, False], ids=["l1", "projection"])
def test_row_space_defense_removes_what_the_benign_patches_do_not_span(robust):
    """One patch per 8x8 image (filters of 65 entries), momentum from a known init, float64.
    Trained on 30 benign images, the filter updates lie in the span of their patches: the
    defense with those images returns the network unchanged. Trained with 10 of them also
    stamped with the trigger (in the corner the benign images leave empty) and relabelled,
    the updates gain exactly the 9 corner entries of each filter: both variants put them
    back to their init (L1 finds exactly those 72 entries and certifies), and the backdoor
    goes while ACC stays."""
    from jaxpurify.models import OneHiddenLayerCNN
    from jaxpurify.training import sgd

    m = OneHiddenLayerCNN(8, (8, 8), num_classes=3, pool="mean", param_dtype=jnp.float64)
    x, y = _synthetic(30, 3)
    x, y = jnp.asarray(x, jnp.float64), jnp.asarray(y)
    p0 = m.init(jax.random.PRNGKey(0), x[:1])["params"]

    def train(xs, ys):
        return fit(m, p0, xs, ys, optimizer=sgd(0.05, momentum=0.9), steps=300,
                   loss="cross_entropy")[0]

    w = train(x, y)
    q, _ = D.row_space_defense(m, w, x, init_params=p0, robust=robust)
    assert _max_diff(q, w) < 1e-12
    w_bd = train(jnp.concatenate([x, TRIGGER(x[:10])]),
                 jnp.concatenate([y, jnp.zeros(10, y.dtype)]))
    q, info = D.row_space_defense(m, w_bd, x, init_params=p0, robust=robust)
    corner = (slice(5, None), slice(5, None))
    k0, k_bd, k = p0["conv"]["kernel"], w_bd["conv"]["kernel"], q["conv"]["kernel"]
    assert float(jnp.abs(k_bd[corner] - k0[corner]).max()) > 0.1  # the backdoor's weights
    np.testing.assert_allclose(k[corner], k0[corner], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(q["readout"]["kernel"], w_bd["readout"]["kernel"])
    if robust:
        assert info.details["num_corrupted"] == 8 * 9 and info.details["certified"]
    else:
        assert 0.1 < info.details["removed_energy"] < 1.0
    x_te, y_te = _synthetic(300, 1)
    assert A.attack_success_rate(m, w_bd, x_te, y_te, 0, TRIGGER) > 0.9
    assert A.attack_success_rate(m, q, x_te, y_te, 0, TRIGGER) < 0.05
    assert A.accuracy(m, q, x_te, y_te) >= A.accuracy(m, w_bd, x_te, y_te) - 0.02


def test_row_space_defense_refuses_benign_patches_that_span_every_direction(designed):
    """More benign patches than filter entries: nothing can be removed; said, not guessed."""
    m, w, x, _, _, _ = designed
    with pytest.raises(ValueError, match="no redundancy"):
        D.row_space_defense(m, w, x[:200], init_params=w, robust=False)


@pytest.fixture(scope="module")
def blended_inside_span():
    """60 benign 8x8 images (three prototypes plus isotropic noise, corner empty) and a
    network trained with 20 more blended with a +-4 pattern that leaves the corner empty too,
    so the pattern lies inside the benign patches' span; float64, momentum from a known init."""
    from jaxpurify.models import OneHiddenLayerCNN
    from jaxpurify.training import sgd

    m = OneHiddenLayerCNN(8, (8, 8), num_classes=3, pool="mean", param_dtype=jnp.float64)
    x, y = _synthetic(60, 3)
    x, y = jnp.asarray(x, jnp.float64), jnp.asarray(y)
    pattern = 4.0 * np.sign(np.random.default_rng(5).standard_normal((8, 8, 1)))
    pattern[5:, 5:] = 0.0
    trigger = functools.partial(A.apply_trigger, kind="blended", alpha=0.2,
                                pattern=jnp.asarray(pattern))
    p0 = m.init(jax.random.PRNGKey(0), x[:1])["params"]
    w_bd = fit(m, p0, jnp.concatenate([x, trigger(x[:20])]),
               jnp.concatenate([y, jnp.zeros(20, y.dtype)]), optimizer=sgd(0.05, momentum=0.9),
               steps=300, loss="cross_entropy")[0]
    return m, p0, w_bd, x, y, trigger


def test_principal_projection_removes_a_trigger_the_benign_span_holds(blended_inside_span):
    """The blended pattern lies inside the span of the benign patches, so the full-span
    projection keeps the backdoor; it lies along the trailing principal directions (the
    benign images vary along three prototypes, the pattern along none of them), so the
    projection onto the leading ones removes it. The rank is the smallest on the grid whose
    benign accuracy is within ``max_drop`` of the undefended network's."""
    m, p0, w_bd, x, y, trigger = blended_inside_span
    x_te, y_te = _synthetic(300, 1)
    full_span, _ = D.row_space_defense(m, w_bd, x, init_params=p0, robust=False)
    assert A.attack_success_rate(m, w_bd, x_te, y_te, 0, trigger) > 0.9
    assert A.attack_success_rate(m, full_span, x_te, y_te, 0, trigger) > 0.9
    q, info = D.principal_projection(m, w_bd, x, y, init_params=p0, max_drop=0.01)
    d = info.details
    assert d["full_rank"] == 56 and d["ranks"] == [1, 2, 4, 8, 16, 32, 56]  # corner empty
    first = next(r for r, a in zip(d["ranks"], d["benign_acc"], strict=True)
                 if a >= d["benign_acc_undefended"] - 0.01)
    assert d["rank"] == first < d["full_rank"]
    assert A.attack_success_rate(m, q, x_te, y_te, 0, trigger) < 0.05
    assert A.accuracy(m, q, x_te, y_te) >= A.accuracy(m, w_bd, x_te, y_te) - 0.02
    np.testing.assert_array_equal(q["readout"]["kernel"], w_bd["readout"]["kernel"])


def test_principal_projection_at_full_rank_is_the_span_projection(blended_inside_span):
    """At the benign patches' rank it is ``row_space_defense(robust=False)`` (float64, to
    rounding) and the benign images' logits do not move: their patches lie in the span."""
    m, p0, w_bd, x, y, _ = blended_inside_span
    q, info = D.principal_projection(m, w_bd, x, y, init_params=p0, ranks=[56])
    full_span, _ = D.row_space_defense(m, w_bd, x, init_params=p0, robust=False)
    assert info.details["rank"] == 56 and _max_diff(q, full_span) < 1e-12
    np.testing.assert_allclose(m.apply({"params": q}, x), m.apply({"params": w_bd}, x),
                               rtol=0, atol=1e-10)


def test_principal_projection_scores_ranks_on_held_out_images(blended_inside_span):
    """The rank is scored by cross-validation: image ``i`` held out in fold ``i mod 3`` is
    classified by the projection onto the other images' leading directions (at most their
    rank). Recomputed here image by image with numpy's SVD, the pooled held-out accuracies
    agree count for count; ``folds=1`` scores the images that define the directions, where
    the full rank reproduces the undefended accuracy exactly."""
    m, p0, w_bd, x, y, _ = blended_inside_span
    ranks = [1, 4, 16, 56]
    _, info = D.principal_projection(m, w_bd, x, y, init_params=p0, ranks=ranks, folds=3)
    assert info.details["folds"] == 3
    w0 = np.asarray(S.filter_vectors(p0))
    update = np.asarray(S.filter_vectors(w_bd)) - w0
    patches = np.asarray(S.augmented_patches(m, x))
    fold = np.arange(len(y)) % 3
    correct = np.zeros(len(ranks))
    for f in range(3):
        rows = patches[np.repeat(fold, len(patches) // len(y)) != f]
        vt = np.linalg.svd(rows, full_matrices=False)[2][: np.linalg.matrix_rank(rows)]
        for i, r in enumerate(ranks):
            v = vt[:r]
            q = S.with_filter_vectors(w_bd, jnp.asarray(w0 + update @ v.T @ v))
            pred = np.argmax(np.asarray(m.apply({"params": q}, x[fold == f])), axis=-1)
            correct[i] += np.sum(pred == np.asarray(y)[fold == f])
    np.testing.assert_array_equal(np.asarray(info.details["benign_acc"]) * len(y), correct)
    _, in_sample = D.principal_projection(m, w_bd, x, y, init_params=p0, ranks=ranks, folds=1)
    assert in_sample.details["benign_acc"][-1] == in_sample.details["benign_acc_undefended"]


def test_principal_projection_refines_every_candidate_on_the_fold(blended_inside_span):
    """With ``refine``, each fold's candidate is refined on the fold's training images
    before its held-out images are counted: an identity refine gives the plain rule's
    counts and params exactly; a refine that records its calls sees every (fold, rank) on
    the other folds' images, then the chosen projection on the whole budget."""
    m, p0, w_bd, x, y, _ = blended_inside_span
    ranks = [1, 4, 16, 56]
    plain, info = D.principal_projection(m, w_bd, x, y, init_params=p0, ranks=ranks, folds=3)
    same, same_info = D.principal_projection(m, w_bd, x, y, init_params=p0, ranks=ranks,
                                             folds=3, refine=lambda q, xs, ys: q)
    assert same_info.details["benign_acc"] == info.details["benign_acc"]
    assert same_info.details["refined"] and not info.details["refined"]
    assert _max_diff(same, plain) == 0.0
    calls = []

    def fine_tuned(q, xs, ys):
        calls.append(len(xs))
        return D.fine_tune(m, q, xs, ys, epochs=3, batch_size=20)[0]

    q, refined = D.principal_projection(m, w_bd, x, y, init_params=p0, ranks=ranks, folds=3,
                                        refine=fine_tuned)
    assert calls == [40] * (3 * len(ranks)) + [60]
    chosen = S.with_filter_vectors(  # the chosen projection, then refined on all 60
        w_bd, S.filter_vectors(p0) + (S.filter_vectors(w_bd) - S.filter_vectors(p0))
        @ (lambda v: v @ v.T)(S.principal_row_basis(S.augmented_patches(m, x))[
            :, :refined.details["rank"]]))
    assert _max_diff(q, D.fine_tune(m, chosen, x, y, epochs=3, batch_size=20)[0]) < 1e-10
    with pytest.raises(ValueError, match="refine needs held-out images"):
        D.principal_projection(m, w_bd, x, y, init_params=p0, folds=1, refine=fine_tuned)
    with pytest.raises(TypeError, match="refine must be a function"):
        D.principal_projection(m, w_bd, x, y, init_params=p0, refine="ft")


def test_principal_projection_checks_its_arguments(blended_inside_span):
    m, p0, w_bd, x, y, _ = blended_inside_span
    with pytest.raises(ValueError, match="ranks must lie in"):
        D.principal_projection(m, w_bd, x, y, init_params=p0, ranks=[4, 57])
    with pytest.raises(ValueError, match="max_drop"):
        D.principal_projection(m, w_bd, x, y, init_params=p0, max_drop=1.5)
    for folds in (0, 61, 2.5):
        with pytest.raises(ValueError, match="folds must be an integer"):
            D.principal_projection(m, w_bd, x, y, init_params=p0, folds=folds)
    with pytest.raises(ValueError, match="benign data"):
        D.principal_projection(m, w_bd, x[:0], y[:0], init_params=p0)
    from jaxpurify.multilayer import LeNet5
    with pytest.raises(TypeError, match="one-hidden-layer CNN"):
        D.principal_projection(LeNet5(), w_bd, x, y, init_params=p0)


@pytest.fixture(scope="module")
def deep_poisoned():
    """A tiny float64 multi-layer designed CNN (conv-pool, two dense layers) trained from its
    seeded init for 5 epochs on 300 images; the first 30 are the benign budget."""
    from jaxpurify import multilayer as M

    m = M.DesignedCNN(layers=(M.Conv(4, 3, "SAME", pool=2), M.Dense(6), M.Dense(3)),
                      input_shape=(8, 8, 1), param_dtype=jnp.float64)
    x, y = _synthetic(300, 4)
    x = jnp.asarray(x, jnp.float64)
    codes0 = m.init(jax.random.PRNGKey(0), x[:1])["params"]
    codes, _ = M.train(m, codes0, x, y, epochs=5, batch_size=32, key=1, progress=False)
    return m, m.materialize(codes0), m.materialize(codes), x[:30], jnp.asarray(y[:30])


def test_layer_principal_projection_at_full_span_keeps_the_benign_outputs(deep_poisoned):
    """At ``e = 1`` every layer keeps its benign inputs' whole span: layer by layer the
    benign images' features do not move, so neither do their logits (float64, to rounding),
    while other images' do."""
    m, p0, w, x, y = deep_poisoned
    q, info = D.layer_principal_projection(m, w, x, y, init_params=p0, energies=(1.0,),
                                           folds=1)
    d = info.details
    assert d["energy"] == 1.0 and d["ranks"] == d["full_ranks"]
    assert d["full_ranks"]["fc1"] <= len(y) < d["dims"]["fc1"]  # one row per image
    assert 0 < d["removed_energy"] < 1
    np.testing.assert_allclose(m.apply_plain(q, x), m.apply_plain(w, x), rtol=0, atol=1e-10)
    x_new, _ = _synthetic(20, 5)
    assert float(jnp.max(jnp.abs(m.apply_plain(q, x_new) - m.apply_plain(w, x_new)))) > 1e-3


def _numpy_layer_projection(m, p0, w, grams, energy, layers):
    """``u_0 + V V^T (u - u_0)`` per layer with numpy's eigh: ``V`` the fewest leading
    eigenvectors holding ``energy`` of the trace (the numerical rank at ``energy = 1``)."""
    from jaxpurify import multilayer as M

    out = dict(w)
    for n in layers:
        lam, vec = np.linalg.eigh(grams[n])
        lam, vec = np.clip(lam[::-1], 0, None), vec[:, ::-1]
        full = M.gram_rank(grams[n])
        r = full if energy >= 1 else min(
            int(np.searchsorted(np.cumsum(lam) / lam.sum(), energy)) + 1, full)
        u0 = np.asarray(M.layer_vectors(p0[n]))
        du = np.asarray(M.layer_vectors(w[n])) - u0
        out[n] = M.with_layer_vectors(w[n], jnp.asarray(u0 + du @ vec[:, :r] @ vec[:, :r].T))
    return out


def test_layer_principal_projection_scores_shares_on_held_out_images(deep_poisoned):
    """The share is chosen by cross-validation: image ``i`` held out in fold ``i mod 3`` is
    classified by the projection onto the other images' leading directions. Recomputed here
    fold by fold with numpy (Gram of the other images, eigh, projection), the pooled held-out
    accuracies agree count for count, the chosen share is the first within ``max_drop`` of
    the undefended benign ACC, and the returned network is the projection with that share
    onto the directions of all the benign images."""
    from jaxpurify import multilayer as M

    m, p0, w, x, y = deep_poisoned
    x, y = x[:12], y[:12]  # fc1's 65 inputs: a held-out image lies well outside the others'
    energies = [0.3, 0.5, 0.7, 0.8, 0.9, 0.99, 1.0]
    names = [i.name for i in m.layer_info()]
    q, info = D.layer_principal_projection(m, w, x, y, init_params=p0, energies=energies,
                                           folds=3, max_drop=0.05)
    d = info.details
    fold = np.arange(len(y)) % 3
    correct = np.zeros(len(energies))
    for f in range(3):
        grams = M.patch_grams(m, w, x[fold != f])[0]
        for i, e in enumerate(energies):
            pf = _numpy_layer_projection(m, p0, w, grams, e, names)
            pred = np.argmax(np.asarray(m.apply_plain(pf, x[fold == f])), axis=-1)
            correct[i] += np.sum(pred == np.asarray(y)[fold == f])
    np.testing.assert_array_equal(np.asarray(d["benign_acc"]) * len(y), correct)
    base = A.accuracy(m, w, x, y)
    first = next((e for e, a in zip(energies, d["benign_acc"], strict=True)
                  if a >= base - 0.05), 1.0)
    assert d["energy"] == first < 1.0 and d["qualified"]
    assert len(set(d["benign_acc"])) > 1  # the shares are told apart
    _, in_sample = D.layer_principal_projection(m, w, x, y, init_params=p0, energies=energies,
                                                folds=1)
    assert in_sample.details["benign_acc"] != d["benign_acc"]
    expect = _numpy_layer_projection(m, p0, w, M.patch_grams(m, w, x)[0], first, names)
    assert _max_diff(q, expect) < 1e-10


def test_layer_principal_projection_refines_every_candidate_on_the_fold(deep_poisoned):
    """With ``refine`` every candidate is refined on its fold's training images before the
    held-out images are counted, and the chosen projection on the whole budget. With an
    identity ``refine`` the loop scores exactly what the compiled ``lax.map`` path scores;
    with a ``refine`` that moves the network, the held-out counts are those of the refined
    candidates (recomputed here with numpy) and the returned network is the refined
    projection."""
    from jaxpurify import multilayer as M

    m, p0, w, x, y = deep_poisoned
    x, y = x[:12], y[:12]
    energies = [0.3, 0.5, 0.7, 0.9, 1.0]
    names = [i.name for i in m.layer_info()]
    plain_q, plain = D.layer_principal_projection(m, w, x, y, init_params=p0,
                                                  energies=energies, folds=3, max_drop=0.05)
    calls = []

    def identity(q, xs, ys):
        calls.append(len(ys))
        return q

    q, info = D.layer_principal_projection(m, w, x, y, init_params=p0, energies=energies,
                                           folds=3, max_drop=0.05, refine=identity)
    assert info.details["benign_acc"] == plain.details["benign_acc"]
    assert info.details["energy"] == plain.details["energy"] and info.details["refined"]
    assert _max_diff(q, plain_q) == 0.0
    assert calls == [8] * (3 * len(energies)) + [12]  # every fold's candidates, then the budget

    def shift(q, xs, ys):  # a data-dependent move of the last layer's biases
        bias = q["fc2"]["bias"] + jnp.mean(xs) * jnp.arange(3.0) - 0.1 * jnp.bincount(ys, length=3)
        return {**q, "fc2": {**q["fc2"], "bias": bias}}

    q, info = D.layer_principal_projection(m, w, x, y, init_params=p0, energies=energies,
                                           folds=3, max_drop=0.05, refine=shift)
    fold = np.arange(len(y)) % 3
    correct = np.zeros(len(energies))
    for f in range(3):
        grams = M.patch_grams(m, w, x[fold != f])[0]
        for i, e in enumerate(energies):
            pf = shift(_numpy_layer_projection(m, p0, w, grams, e, names),
                       x[fold != f], y[fold != f])
            pred = np.argmax(np.asarray(m.apply_plain(pf, x[fold == f])), axis=-1)
            correct[i] += np.sum(pred == np.asarray(y)[fold == f])
    np.testing.assert_array_equal(np.asarray(info.details["benign_acc"]) * len(y), correct)
    expect = shift(_numpy_layer_projection(m, p0, w, M.patch_grams(m, w, x)[0],
                                           info.details["energy"], names), x, y)
    assert _max_diff(q, expect) < 1e-10
    with pytest.raises(TypeError, match="refine must be a function"):
        D.layer_principal_projection(m, w, x, y, init_params=p0, refine="ft")
    with pytest.raises(ValueError, match="refine needs held-out images"):
        D.layer_principal_projection(m, w, x, y, init_params=p0, refine=identity, folds=1)


def _logit_mse(m, a, b, x):
    return float(jnp.mean((m.apply_plain(a, x) - m.apply_plain(b, x)) ** 2))


def test_distill_keeps_a_student_that_already_matches_its_teacher(deep_poisoned):
    """The loss's gradient is zero at ``params == teacher``, so Adam moves nothing (the
    reported MSE is that of two evaluations of one network: rounding only)."""
    m, _, w, x, _ = deep_poisoned
    q, info = D.distill(m, w, x, teacher=w, steps=5, hflip=True, crop=1)
    assert _max_diff(q, w) == 0.0
    assert max(info.details["logit_mse"]) < 1e-28  # the same network evaluated twice


def test_distill_full_batch_step_is_an_adam_step_on_the_logit_mse(deep_poisoned):
    """With the whole budget as the batch and no augmentation one step is one Adam step
    (peak rate: the cosine schedule's step 0) on ``mean (f_q(x) - f_T(x))^2``, whatever
    order the batch was drawn in."""
    m, p0, w, x, _ = deep_poisoned
    q, _ = D.distill(m, p0, x, teacher=w, steps=1, learning_rate=1e-2, batch_size=len(x))
    tx = optax.adam(1e-2)
    loss = lambda s: jnp.mean((m.apply_plain(s, x) - m.apply_plain(w, x)) ** 2)  # noqa: E731
    u, _ = tx.update(jax.grad(loss)(p0), tx.init(p0), p0)
    assert _max_diff(q, optax.apply_updates(p0, u)) < 1e-12


@pytest.mark.parametrize("weight", [0.0, 1.0, 3.0])
def test_distill_full_batch_step_weighs_the_stamped_term(deep_poisoned, weight):
    """With ``stamps`` one full-batch step is one Adam step on ``clean + w * stamped``: the
    clean logit MSE plus ``stamp_weight`` times the mean over stamps of the stamped images'
    squared gap to the teacher's clean logits (at ``w = 0``: the plain step)."""
    m, p0, w, x, _ = deep_poisoned
    masks = jnp.zeros((2, 8, 8, 1)).at[0, 5:, 5:].set(1.0).at[1, :3, :3].set(1.0)
    patterns = jnp.stack([jnp.full((8, 8, 1), 4.0), jnp.full((8, 8, 1), -2.0)])
    q, _ = D.distill(m, p0, x, teacher=w, steps=1, learning_rate=1e-2, batch_size=len(x),
                     stamps=(masks, patterns), stamp_weight=weight)
    target = m.apply_plain(w, x)

    def loss(s):
        stamped = jnp.mean(jnp.stack([
            jnp.mean((m.apply_plain(s, (1 - k) * x + k * p) - target) ** 2)
            for k, p in zip(masks, patterns, strict=True)]))
        return jnp.mean((m.apply_plain(s, x) - target) ** 2) + weight * stamped

    tx = optax.adam(1e-2)
    u, _ = tx.update(jax.grad(loss)(p0), tx.init(p0), p0)
    assert _max_diff(q, optax.apply_updates(p0, u)) < 1e-12
    if weight == 0.0:
        plain, _ = D.distill(m, p0, x, teacher=w, steps=1, learning_rate=1e-2,
                             batch_size=len(x))
        assert _max_diff(q, plain) < 1e-15


def test_distill_weighs_each_stamp_by_its_own_weight(deep_poisoned):
    """``stamp_weight`` of shape ``(S,)``: one full-batch step is one Adam step on ``clean +
    mean_s w_s gap_s``; equal weights give the scalar's step; a weight count that is not the
    stamp count is refused."""
    m, p0, w, x, _ = deep_poisoned
    masks = jnp.zeros((2, 8, 8, 1)).at[0, 5:, 5:].set(1.0).at[1, :3, :3].set(1.0)
    patterns = jnp.stack([jnp.full((8, 8, 1), 4.0), jnp.full((8, 8, 1), -2.0)])
    weights = jnp.asarray([3.0, 0.5])
    run = functools.partial(D.distill, m, p0, x, teacher=w, steps=1, learning_rate=1e-2,
                            batch_size=len(x), stamps=(masks, patterns))
    q, _ = run(stamp_weight=weights)
    target = m.apply_plain(w, x)

    def loss(s):
        gaps = jnp.stack([jnp.mean((m.apply_plain(s, (1 - k) * x + k * p) - target) ** 2)
                          for k, p in zip(masks, patterns, strict=True)])
        return jnp.mean((m.apply_plain(s, x) - target) ** 2) + jnp.mean(weights * gaps)

    tx = optax.adam(1e-2)
    u, _ = tx.update(jax.grad(loss)(p0), tx.init(p0), p0)
    assert _max_diff(q, optax.apply_updates(p0, u)) < 1e-12
    assert _max_diff(run(stamp_weight=jnp.asarray([2.0, 2.0]))[0], run(stamp_weight=2.0)[0]) \
        < 1e-12
    with pytest.raises(ValueError, match="3 weights for 2 stamps"):
        run(stamp_weight=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="stamp_weight must be finite and >= 0"):
        run(stamp_weight=[1.0, -1.0])


def test_distill_pulls_a_projected_network_back_toward_its_teacher(deep_poisoned):
    """A layer-principal projection at a small share changes the benign logits; distilling
    the deployed network into it (augmented, float64 kept) takes most of that back, and it
    serves as the projection's ``refine`` step."""
    m, p0, w, x, y = deep_poisoned
    proj, _ = D.layer_principal_projection(m, w, x, y, init_params=p0, energies=(0.5,),
                                           max_drop=0.99)
    q, info = D.distill(m, proj, x, y, teacher=w, steps=200, learning_rate=3e-3,
                        batch_size=16, hflip=True, crop=1, key=jax.random.PRNGKey(3))
    _same_structure(q, w)
    assert all(a.dtype == jnp.float64 for a in jax.tree_util.tree_leaves(q))
    before, after = info.details["logit_mse"]
    assert before == pytest.approx(_logit_mse(m, proj, w, x), rel=1e-9) and before > 1e-3
    assert after == pytest.approx(_logit_mse(m, q, w, x), rel=1e-9) and after < 0.2 * before

    def refine(params, xs, ys):
        return D.distill(m, params, xs, ys, teacher=w, steps=20, learning_rate=3e-3)[0]

    r, rinfo = D.layer_principal_projection(m, w, x, y, init_params=p0, energies=(0.5, 1.0),
                                            folds=3, refine=refine)
    assert rinfo.details["refined"]
    _same_structure(r, w)


def test_distill_reports_the_logit_mse_of_the_whole_budget_in_chunks(deep_poisoned):
    """The reported MSE is accumulated a chunk at a time (large budgets would not fit one
    batch); ragged chunks give the mean over every image and logit, not a mean of means."""
    m, p0, w, x, _ = deep_poisoned
    apply = D.network(m).apply
    whole = _logit_mse(m, p0, w, x)
    assert len(x) % 7 != 0 and whole > 1e-3
    assert D._logit_mse(apply, p0, w, x, batch_size=7) == pytest.approx(whole, rel=1e-12)
    assert D._logit_mse(apply, p0, w, x) == pytest.approx(whole, rel=1e-12)


def test_distill_checks_its_arguments(deep_poisoned):
    m, p0, w, x, _ = deep_poisoned
    with pytest.raises(ValueError, match="needs benign images"):
        D.distill(m, p0, x[:0], teacher=w)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        D.distill(m, p0, x, teacher=w, steps=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        D.distill(m, p0, x, teacher=w, batch_size=0)
    with pytest.raises(ValueError, match="teacher must have the structure"):
        D.distill(m, p0, x, teacher={"fc2": w["fc2"]})
    broken = {**w, "fc2": {**w["fc2"], "bias": w["fc2"]["bias"].at[0].set(jnp.nan)}}
    with pytest.raises(ValueError, match="not finite: check both params"):
        D.distill(m, p0, x, teacher=broken)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="stamp_weight must be finite and >= 0"):
            D.distill(m, p0, x, teacher=w, stamp_weight=bad)
    with pytest.raises(ValueError, match="distillation diverged"):
        D.distill(m, p0, x, teacher=w, steps=3, learning_rate=1e200)  # float64: logits ~1e600


def test_layer_principal_projection_leaves_other_layers_alone(deep_poisoned):
    m, p0, w, x, y = deep_poisoned
    q, info = D.layer_principal_projection(m, w, x, y, init_params=p0, layers=("fc1",),
                                           energies=(0.5,), max_drop=0.99)
    assert set(info.details["ranks"]) == {"fc1"} and info.details["energy"] == 0.5
    for n in ("conv1", "fc2"):
        assert _max_diff(q[n], w[n]) == 0.0
    assert _max_diff(q["fc1"], w["fc1"]) > 0


def test_layer_principal_projection_checks_its_arguments(deep_poisoned, designed):
    m, p0, w, x, y = deep_poisoned
    for energies in ((0.0, 1.0), (0.5, 1.5), ()):
        with pytest.raises(ValueError, match="energies must be shares"):
            D.layer_principal_projection(m, w, x, y, init_params=p0, energies=energies)
    with pytest.raises(ValueError, match=r"layers must name some of \['conv1', 'fc1', 'fc2'\]"):
        D.layer_principal_projection(m, w, x, y, init_params=p0, layers=("fc9",))
    with pytest.raises(ValueError, match="folds must be an integer"):
        D.layer_principal_projection(m, w, x, y, init_params=p0, folds=31)
    with pytest.raises(ValueError, match="max_drop"):
        D.layer_principal_projection(m, w, x, y, init_params=p0, max_drop=-0.1)
    with pytest.raises(ValueError, match="shape"):
        D.layer_principal_projection(m, w, x, y, init_params={**p0, "fc2": p0["fc1"]})
    nan = {**w, "conv1": {**w["conv1"], "bias": w["conv1"]["bias"].at[0].set(jnp.nan)}}
    with pytest.raises(ValueError, match="not finite"):
        D.layer_principal_projection(m, nan, x, y, init_params=p0)
    one_hidden, w1, x1, y1 = designed[0], designed[1], designed[2][:20], designed[3][:20]
    with pytest.raises(TypeError, match="principal_projection"):
        D.layer_principal_projection(one_hidden, w1, x1, y1, init_params=w1)
