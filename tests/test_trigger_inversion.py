"""Neural Cleanse: trigger inversion flags a planted BadNets target and unlearning removes it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpurify import attacks as A
from jaxpurify import trigger_inversion as T
from tests.backdoor_helpers import TRIGGER, poisoned_one_hidden


@pytest.fixture(scope="module")
def poisoned():
    """The shared poisoned one-hidden-layer CNN (:func:`poisoned_one_hidden`)."""
    return poisoned_one_hidden()


@pytest.fixture(scope="module")
def reversed_triggers(poisoned):
    """The inversion the tests below share (150 steps of 30 of the 60 benign images)."""
    m, w, xb, _, _, _ = poisoned
    return T.reverse_triggers(m, w, xb, steps=150, batch_size=30)


def test_anomaly_index_is_the_robust_z_score_below_the_median():
    a = T.anomaly_index([1.0, 10.0, 12.0, 14.0])
    med, mad = 11.0, 1.4826 * 2.0
    np.testing.assert_allclose(a, (med - np.array([1.0, 10.0, 12.0, 14.0])) / mad)
    np.testing.assert_array_equal(T.anomaly_index([3.0, 3.0, 3.0]), 0.0)


def test_reverse_triggers_flags_the_target_with_a_mask_on_the_trigger(poisoned,
                                                                      reversed_triggers):
    m, w, xb, _, x_te, y_te = poisoned
    assert A.attack_success_rate(m, w, x_te, y_te, 0, TRIGGER) > 0.9
    rev, info = reversed_triggers
    assert rev.mask.shape == (3, 8, 8, 1) and rev.pattern.shape == (3, 8, 8, 1)
    # This network is nearly linear in its one patch, so a few extreme pixels flip any
    # class and no class passes Neural Cleanse's threshold of 2; the target's mask is still
    # the smallest, and it concentrates on the planted corner (9 of 64 pixels).
    assert int(np.argmax(info.details["anomaly"])) == 0 and rev.flagged(0.5) == [0]
    assert rev.mask_l1[0] < 0.85 * min(rev.mask_l1[1:])
    assert float(jnp.sum(rev.mask[0, 5:, 5:])) > 0.3 * rev.mask_l1[0]
    lo, hi = float(xb.min()), float(xb.max())
    assert lo - 1e-5 <= float(rev.pattern.min()) and float(rev.pattern.max()) <= hi + 1e-5
    assert rev.success[0] > 0.9


def test_neural_cleanse_unlearns_the_backdoor_and_keeps_accuracy(poisoned, reversed_triggers):
    m, w, xb, yb, x_te, y_te = poisoned
    rev, _ = reversed_triggers
    q, info = T.neural_cleanse(m, w, xb, yb, triggers=rev, threshold=None, stamp_fraction=0.5,
                               learning_rate=0.05, epochs=20)
    assert info.name == "nc" and info.details["flagged"] == [0]
    assert A.attack_success_rate(m, q, x_te, y_te, 0, TRIGGER) < 0.1
    assert A.accuracy(m, q, x_te, y_te) >= A.accuracy(m, w, x_te, y_te) - 0.03


def test_consistency_unlearning_removes_the_backdoor_without_labels(poisoned,
                                                                     reversed_triggers):
    m, w, xb, yb, x_te, y_te = poisoned
    rev, _ = reversed_triggers
    q, info = T.unlearn_consistent(m, w, xb, rev, [0], steps=300, learning_rate=1e-2,
                                   batch_size=30, hflip=False, crop=0)
    assert info.name == "nc-consistency" and info.details["classes"] == [0]
    before, after = info.details["stamped_gap"]
    assert after < 0.1 * before
    assert A.attack_success_rate(m, q, x_te, y_te, 0, TRIGGER) < 0.1
    assert A.accuracy(m, q, x_te, y_te) >= A.accuracy(m, w, x_te, y_te) - 0.03
    # neural_cleanse(unlearning="consistency") is this unlearning of the flagged classes
    r, nc = T.neural_cleanse(m, w, xb, yb, triggers=rev, threshold=None, learning_rate=1e-2,
                             unlearning="consistency",
                             consistency={"steps": 300, "batch_size": 30, "hflip": False,
                                          "crop": 0})
    assert nc.details["flagged"] == [0] and nc.details["unlearning"] == "consistency"
    for a, b in zip(jax.tree_util.tree_leaves(r), jax.tree_util.tree_leaves(q), strict=True):
        np.testing.assert_array_equal(a, b)


def test_consistency_unlearning_mirrors_the_stamps_of_a_flipped_network(poisoned,
                                                                        reversed_triggers):
    """With ``mirror`` the left-right mirror of the reversed stamp is unlearned too: a network
    trained with flips answers the trigger on either side, and the inversion finds one."""
    m, w, xb, _, _, _ = poisoned
    rev, _ = reversed_triggers
    left = rev._replace(mask=rev.mask[:, :, ::-1], pattern=rev.pattern[:, :, ::-1])
    kw = {"steps": 5, "learning_rate": 1e-2, "batch_size": 30, "hflip": False, "crop": 0}
    a, _ = T.unlearn_consistent(m, w, xb, rev, [0], mirror=True, **kw)
    b, _ = T.unlearn_consistent(m, w, xb, left, [0], mirror=True, **kw)
    c, _ = T.unlearn_consistent(m, w, xb, rev, [0], mirror=False, **kw)
    leaves = jax.tree_util.tree_leaves
    for u, v in zip(leaves(a), leaves(b), strict=True):  # the same two stamps, other order
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(u, v) for u, v in zip(leaves(a), leaves(c), strict=True))


def test_each_weighting_gives_every_stamp_the_weight_one_stamp_has_alone(poisoned,
                                                                       reversed_triggers):
    """``stamp_weighting="each"`` multiplies the mean stamped term by the number of stamps:
    with one class it is the ``"mean"`` loss, and with ``k`` classes it is
    :func:`jaxpurify.defenses.distill` at ``stamp_weight=k``; an unknown name is refused."""
    from jaxpurify import defenses as D

    m, w, xb, _, _, _ = poisoned
    rev, _ = reversed_triggers
    kw = {"steps": 5, "learning_rate": 1e-2, "batch_size": 30, "hflip": False, "crop": 0}
    leaves = jax.tree_util.tree_leaves
    one_mean, _ = T.unlearn_consistent(m, w, xb, rev, [0], **kw)
    one_each, info = T.unlearn_consistent(m, w, xb, rev, [0], stamp_weighting="each", **kw)
    assert info.details["stamp_weighting"] == "each"
    for u, v in zip(leaves(one_mean), leaves(one_each), strict=True):
        np.testing.assert_array_equal(u, v)
    two_each, _ = T.unlearn_consistent(m, w, xb, rev, [0, 1], stamp_weighting="each", **kw)
    two_mean, _ = T.unlearn_consistent(m, w, xb, rev, [0, 1], **kw)
    stamps = (rev.mask[np.array([0, 1])], rev.pattern[np.array([0, 1])])
    ref, _ = D.distill(m, w, xb, teacher=w, steps=5, learning_rate=1e-2, batch_size=30,
                       stamps=stamps, stamp_weight=2.0, key=jax.random.PRNGKey(0))
    for u, v in zip(leaves(two_each), leaves(ref), strict=True):
        np.testing.assert_array_equal(u, v)
    assert any(not np.allclose(u, v) for u, v in zip(leaves(two_each), leaves(two_mean),
                                                     strict=True))
    with pytest.raises(ValueError, match="stamp_weighting must be 'mean' or 'each'"):
        T.unlearn_consistent(m, w, xb, rev, [0], stamp_weighting="sum", **kw)


def test_neural_cleanse_returns_the_network_unchanged_when_nothing_is_flagged(poisoned,
                                                                             reversed_triggers):
    m, w, xb, yb, _, _ = poisoned
    rev, _ = reversed_triggers
    q, info = T.neural_cleanse(m, w, xb, yb, triggers=rev, threshold=1e9)
    assert info.details["flagged"] == []
    for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(w), strict=True):
        np.testing.assert_array_equal(a, b)


_CONSISTENCY = {"unlearning": "consistency", "learning_rate": 1e-2,
                "consistency": {"steps": 300, "batch_size": 30, "hflip": False, "crop": 0}}


def test_rounds_stop_when_the_next_inversion_flags_nothing(poisoned, reversed_triggers):
    """Round 2 reverses the triggers of the unlearned network; with nothing above 2 there it
    stops, and the result is round 1's to the bit."""
    m, w, xb, yb, _, _ = poisoned
    rev, _ = reversed_triggers
    one, _ = T.neural_cleanse(m, w, xb, yb, triggers=rev, threshold=None, **_CONSISTENCY)
    more, info = T.neural_cleanse(m, w, xb, yb, triggers=rev, threshold=None, rounds=3,
                                  steps=150, batch_size=30, **_CONSISTENCY)
    first, second = info.details["rounds"]  # the third round never ran
    assert first["flagged"] == [0] and second["flagged"] == []
    assert max(second["anomaly"]) <= 2.0 and len(second["anomaly"]) == 3
    for a, b in zip(jax.tree_util.tree_leaves(more), jax.tree_util.tree_leaves(one),
                    strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("restart", [False, True], ids=["continue", "restart"])
def test_a_later_round_unlearns_every_stamp_found_so_far(monkeypatch, poisoned,
                                                         reversed_triggers, restart):
    """While an inversion flags a class, its stamps join the earlier ones and the unlearning
    runs again, the deployed network still the teacher: from the current network, or with
    ``restart`` from the deployed one. The later inversion looks at the unlearned network
    either way."""
    m, w, xb, yb, x_te, y_te = poisoned
    rev, _ = reversed_triggers
    calls, inverted, unlearn, invert = [], [], T._unlearn, T.reverse_triggers

    def spy(model, params, deployed, x, y, stamps, **kw):
        out = unlearn(model, params, deployed, x, y, stamps, **kw)
        calls.append((params, deployed, stamps, out[0]))
        return out

    def spy_inversion(model, params, x, **kw):
        inverted.append(params)
        return invert(model, params, x, **kw)

    monkeypatch.setattr(T, "_unlearn", spy)
    monkeypatch.setattr(T, "reverse_triggers", spy_inversion)
    q, info = T.neural_cleanse(m, w, xb, yb, triggers=rev, threshold=0.3, rounds=2,
                               restart=restart, steps=150, batch_size=30, **_CONSISTENCY)
    first, second = info.details["rounds"]
    assert info.details["restart"] is restart
    assert first["flagged"] == rev.flagged(0.3) and second["flagged"]  # a second round ran
    assert info.details["stamped_gap"] == first["stamped_gap"] != second["stamped_gap"]
    assert len(calls) == 2
    (p1, d1, s1, out1), (p2, d2, s2, out2) = calls
    assert p1 is d1 and d2 is d1  # the first from the deployed network; the same teacher
    assert p2 is (d1 if restart else out1)
    assert len(inverted) == 1 and inverted[0] is out1  # round 2's inversion: the unlearned one
    assert s1.mask.shape[0] == len(first["flagged"])
    assert s2.mask.shape[0] == len(first["flagged"]) + len(second["flagged"])
    np.testing.assert_array_equal(s2.mask[:s1.mask.shape[0]], s1.mask)
    for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(out2), strict=True):
        np.testing.assert_array_equal(a, b)
    assert A.attack_success_rate(m, q, x_te, y_te, 0, TRIGGER) < 0.1
    assert A.accuracy(m, q, x_te, y_te) >= A.accuracy(m, w, x_te, y_te) - 0.03


def test_take_and_concat_keep_every_field_aligned(reversed_triggers):
    rev, _ = reversed_triggers
    two = rev.take([2, 0])
    np.testing.assert_array_equal(two.mask[0], rev.mask[2])
    np.testing.assert_array_equal(two.anomaly, rev.anomaly[[2, 0]])
    both = two.concat(rev.take([1]))
    assert [f.shape[0] for f in both] == [3] * 5
    np.testing.assert_array_equal(both.pattern[2], rev.pattern[1])
    np.testing.assert_array_equal(both.mask_l1, rev.mask_l1[[2, 0, 1]])
    with pytest.raises(ValueError, match="image shapes"):
        two.concat(two._replace(mask=two.mask[:, :4]))


def test_sparse_edit_applies_only_the_largest_entries_scaled():
    p = {"a": jnp.zeros(4), "b": {"c": jnp.zeros((2, 3))}}
    e = {"a": jnp.array([1.0, -5.0, 0.5, 2.0]), "b": {"c": jnp.array([[3.0, 0, 0], [0, -4, 0]])}}
    q = T.sparse_edit(p, e, keep_fraction=0.3, scale=0.5)  # 3 of 10 entries: -5, -4, 3
    np.testing.assert_array_equal(q["a"], [0, -2.5, 0, 0])
    np.testing.assert_array_equal(q["b"]["c"], [[1.5, 0, 0], [0, -2, 0]])
    full = T.sparse_edit(p, e)
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(e), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="keep_fraction"):
        T.sparse_edit(p, e, keep_fraction=0.0)


def test_arguments_are_checked(poisoned):
    m, w, xb, yb, _, _ = poisoned
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        T.reverse_triggers(m, w, xb[0])
    with pytest.raises(ValueError, match="steps"):
        T.reverse_triggers(m, w, xb, steps=0)
    with pytest.raises(ValueError, match="stamp_fraction"):
        T.neural_cleanse(m, w, xb, yb, stamp_fraction=0.0)
    with pytest.raises(ValueError, match="unlearning"):
        T.neural_cleanse(m, w, xb, yb, unlearning="prune")
    with pytest.raises(ValueError, match="rounds"):
        T.neural_cleanse(m, w, xb, yb, rounds=0)
    rev = T.ReversedTriggers(jnp.zeros((3, 8, 8, 1)), jnp.zeros((3, 8, 8, 1)), np.ones(3),
                             np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="classes"):
        T.unlearn_consistent(m, w, xb, rev, [3])
    with pytest.raises(ValueError, match="classes"):
        T.unlearn_consistent(m, w, xb, rev, [])
    with pytest.raises(ValueError, match="steps"):
        T.unlearn_consistent(m, w, xb, rev, [0], steps=0)
