"""Universal adversarial unlearning: the perturbations, the radius rule and the unlearning."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpurify import adversarial_unlearning as AU
from jaxpurify import attacks as A
from jaxpurify import defenses as D
from tests.backdoor_helpers import TRIGGER, poisoned_one_hidden


@pytest.fixture(scope="module")
def poisoned():
    return poisoned_one_hidden()


def _accuracy(m, p, x, y):
    return float(jnp.mean(jnp.argmax(m.apply({"params": p}, x), -1) == y))


def test_perturbations_stay_in_their_balls_and_match_one_radius_at_a_time(poisoned):
    m, w, xb, *_ = poisoned
    radii = [0.5, 2.0, 8.0]
    both = AU.universal_perturbations(m, w, xb, radii, steps=20, batch_size=30)
    norms = np.sqrt(np.sum(np.asarray(both.delta) ** 2, axis=(1, 2, 3)))
    assert both.delta.shape == (3,) + xb.shape[1:]
    assert np.all(norms <= np.asarray(radii) * (1 + 1e-6))
    np.testing.assert_allclose(norms[-1], 8.0, rtol=1e-5)  # ascent reaches the boundary
    for i, r in enumerate(radii):  # the vmap over radii is the same as one radius alone
        one = AU.universal_perturbations(m, w, xb, [r], steps=20, batch_size=30)
        np.testing.assert_allclose(one.delta[0], both.delta[i], rtol=1e-5, atol=1e-6)  # float32
        assert abs(one.fooled[0] - both.fooled[i]) <= 1 / 60  # at most one image flips
    # a larger ball holds the smaller ones' perturbations: it fools at least as many here
    assert both.fooled[0] <= both.fooled[1] <= both.fooled[2]
    assert both.fooled[2] > 0.5


@pytest.mark.parametrize("radius, bound", [(3.0, 0.5), (3.0, 10.0), (100.0, 0.5), (0.01, 1.0)])
def test_the_sparse_projection_is_the_euclidean_projection(radius, bound):
    """KKT conditions of ``min |d - v|^2 s.t. |d|_1 <= r, |d|_inf <= b``: ``d`` feasible,
    ``d_i = sign(v_i) clip(|v_i| - tau, 0, b)`` with one ``tau >= 0``, and ``tau > 0`` only
    where the L1 constraint is active (then ``|d|_1 = r``)."""
    v = jax.random.normal(jax.random.PRNGKey(0), (6, 5, 3)) * 2.0
    d = AU._project_sparse(v, jnp.float64(radius), jnp.float64(bound))
    a, e = np.abs(np.asarray(v)), np.abs(np.asarray(d))
    assert np.sum(e) <= radius * (1 + 1e-12) and np.max(e) <= bound
    assert np.all(np.sign(np.asarray(d))[e > 0] == np.sign(np.asarray(v))[e > 0])
    interior = (e > 0) & (e < bound)
    shrink = a[interior] - e[interior]  # one threshold for every entry strictly inside
    tau = shrink.mean() if shrink.size else 0.0
    np.testing.assert_allclose(shrink, tau, atol=1e-12)
    assert np.all(a[e == 0] <= tau + 1e-12)  # zeroed entries lie under it
    assert np.all(a[e == bound] - bound >= tau - 1e-12)  # clipped ones over it
    if np.sum(np.minimum(a, bound)) <= radius:  # the box alone is within the ball
        np.testing.assert_allclose(e, np.minimum(a, bound), atol=1e-12)
    else:
        np.testing.assert_allclose(np.sum(e), radius, rtol=1e-10)
        assert tau > 0


def test_sparse_perturbations_are_patches_within_their_balls(poisoned):
    m, w, xb, *_ = poisoned
    radii = [1.0, 4.0]
    found = AU.universal_perturbations(m, w, xb, radii, targets=[0, 0], steps=20,
                                       batch_size=30, norm="l1", bound=0.5)
    d = np.abs(np.asarray(found.delta)).reshape(2, -1)
    assert np.all(d.sum(1) <= np.asarray(radii) * (1 + 1e-6)) and d.max() <= 0.5
    np.testing.assert_allclose(d.sum(1)[-1], 4.0, rtol=1e-5)  # the ascent reaches the ball
    assert np.count_nonzero(d[-1]) <= 0.25 * d.shape[1]  # a sparse perturbation
    assert found.fooled[0] <= found.fooled[1]
    # the default box is the benign value range
    wide = AU.universal_perturbations(m, w, xb, [4.0], targets=[0], steps=3, norm="l1")
    assert np.abs(np.asarray(wide.delta)).max() <= float(xb.max() - xb.min()) + 1e-6


def test_the_radius_rule_takes_the_smallest_radius_that_fools_enough():
    radii = [1.0, 2.0, 4.0, 8.0]
    assert AU.choose_radius([0.1, 0.5, 0.9, 1.0], radii, 0.5) == 2.0
    assert AU.choose_radius([0.1, 0.2, 0.9, 0.3], radii, 0.5) == 4.0
    assert AU.choose_radius([0.1, 0.2, 0.3, 0.4], radii, 0.5) == 8.0  # none: the largest
    x = np.ones((4, 2, 2, 1))
    assert AU.benign_scale(x) == pytest.approx(2.0)
    assert AU.benign_scale(-x, "l1") == pytest.approx(4.0)


def test_targeted_unlearning_finds_the_target_and_removes_the_backdoor(poisoned):
    m, w, xb, _, x_te, y_te = poisoned
    assert A.attack_success_rate(m, w, x_te, y_te, 0, TRIGGER) > 0.9
    q, info = AU.universal_unlearning(m, w, xb, hflip=False, crop=0, steps=100,
                                      learning_rate=1e-2)
    d = info.details
    assert A.attack_success_rate(m, q, x_te, y_te, 0, TRIGGER) < 0.05
    assert _accuracy(m, q, x_te, y_te) >= _accuracy(m, w, x_te, y_te) - 0.02
    assert d["targets"][0] == 0 and int(np.argmax(d["anomaly"])) == 0  # the planted target
    # radii tried in increasing order until some class's perturbation reached 90%
    tried = [radius for radius, _ in d["candidates"]]
    assert tried == sorted(tried) and d["radius"] == tried[-1]
    assert all(max(success) < 0.9 for _, success in d["candidates"][:-1])
    assert max(d["candidates"][-1][1]) >= 0.9 or len(tried) == len(AU.RADIUS_FRACTIONS)
    assert len(d["fooled"]) == 5 and d["rounds"] == 5
    assert d["fooled"][0][1] < d["fooled"][0][0]  # each round unlearns its perturbation


def test_sparse_targeted_unlearning_removes_the_patch_backdoor(poisoned):
    m, w, xb, _, x_te, y_te = poisoned
    # the toy's trigger is half an image's L1 norm (a 3x3 square of 4s on 8x8 images, far
    # beyond SPARSE_RADIUS_FRACTIONS, made for a 3x3 patch on 28x28 or 32x32 images); here
    # five rounds leave 12% ASR, a fresh perturbation still moving 24% of the benign images
    fractions = (0.05, 0.1, 0.2, 0.4, 0.8)
    q, info = AU.universal_unlearning(m, w, xb, norm="l1", radius_fractions=fractions,
                                      rounds=10, hflip=False, crop=0, steps=100,
                                      learning_rate=1e-2)
    d = info.details
    assert d["norm"] == "l1" and d["bound"] == pytest.approx(float(xb.max() - xb.min()))
    tried = [radius for radius, _ in d["candidates"]]
    np.testing.assert_allclose(tried[0], fractions[0] * AU.benign_scale(xb, "l1"), rtol=1e-12)
    assert d["targets"][0] == 0 and d["fooled_final"] < 0.05
    assert A.attack_success_rate(m, q, x_te, y_te, 0, TRIGGER) < 0.05
    assert _accuracy(m, q, x_te, y_te) >= _accuracy(m, w, x_te, y_te) - 0.02


def test_both_balls_are_chosen_each_by_its_rule_and_unlearned_together(poisoned):
    m, w, xb, _, x_te, y_te = poisoned
    kw = dict(hflip=False, crop=0, steps=100, learning_rate=1e-2)
    q, info = AU.universal_unlearning(m, w, xb, norm=("l2", "l1"), **kw)
    d = info.details
    assert d["norm"] == "l2+l1" and [b["norm"] for b in d["balls"]] == ["l2", "l1"]
    # each ball's rule is the one a single-ball run applies (same key: same choice)
    for ball in d["balls"]:
        _, alone = AU.universal_unlearning(m, w, xb, norm=ball["norm"], **{**kw, "rounds": 1})
        for k in ("radius", "targets", "candidates", "anomaly"):
            assert ball[k] == alone.details[k]
    assert "bound" in d["balls"][1] and "bound" not in d["balls"][0]
    assert len(d["fooled"]) == 5 and 0 <= d["fooled_final"] <= 1
    assert A.attack_success_rate(m, q, x_te, y_te, 0, TRIGGER) < 0.05


def test_each_ball_is_weighed_as_a_run_with_it_alone_weighs_it(poisoned, monkeypatch):
    """``ball_weighting="each"``: ball ``b``'s stamps weigh ``S / S_b`` in distill's
    ``mean_s w_s gap_s``, so each ball's stamps add up to the weight 1 a run with that ball
    alone gives them (per mirrored copy); ``"mean"`` keeps the one weight; with one ball the
    two are the same run."""
    weights = AU.ball_weights([1, 3], mirror=True)
    np.testing.assert_allclose(weights, [4, 4 / 3, 4 / 3, 4 / 3] * 2)
    np.testing.assert_allclose([weights[:1].sum() / 4, weights[1:4].sum() / 4], [1.0, 1.0])
    with pytest.raises(ValueError, match="counts"):
        AU.ball_weights([2, 0], mirror=False)
    m, w, xb, *_ = poisoned
    seen, distill = [], AU.distill

    def spy(*args, **kwargs):
        seen.append((kwargs["stamps"][2].shape[0], kwargs["stamp_weight"]))
        return distill(*args, **kwargs)

    monkeypatch.setattr(AU, "distill", spy)
    kw = dict(rounds=1, hflip=False, crop=0, steps=20, learning_rate=1e-2)
    _, each = AU.universal_unlearning(m, w, xb, norm=("l2", "l1"), ball_weighting="each", **kw)
    _, mean = AU.universal_unlearning(m, w, xb, norm=("l2", "l1"), **kw)
    counts = [len(b["targets"]) for b in each.details["balls"]]
    assert each.details["ball_weighting"] == "each" and mean.details["ball_weighting"] == "mean"
    assert seen[0][0] == sum(counts)
    np.testing.assert_array_equal(seen[0][1], AU.ball_weights(counts, mirror=False))
    assert seen[1][1] == 1.0
    one = [AU.universal_unlearning(m, w, xb, norm="l1", ball_weighting=b, **kw)[0]
           for b in ("each", "mean")]
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(jnp.array_equal, *one)))


def test_the_climbing_radius_follows_the_shortcut_the_fixed_one_leaves(poisoned):
    """``radius_schedule="climb"``: each later round re-runs the rule on the current network
    from the last radius up, the targets accumulate, and on the toy's oversized patch five
    rounds remove what five fixed ones leave (12% ASR; the sparse test above takes ten)."""
    m, w, xb, _, x_te, y_te = poisoned
    fractions = (0.05, 0.1, 0.2, 0.4, 0.8)
    kw = dict(norm="l1", radius_fractions=fractions, hflip=False, crop=0, steps=100,
              learning_rate=1e-2)
    q, info = AU.universal_unlearning(m, w, xb, radius_schedule="climb", **kw)
    d = info.details
    assert A.attack_success_rate(m, q, x_te, y_te, 0, TRIGGER) < 0.05
    assert _accuracy(m, q, x_te, y_te) >= _accuracy(m, w, x_te, y_te) - 0.02
    ladder = np.asarray(fractions) * AU.benign_scale(xb, "l1")
    assert d["radius_schedule"] == "climb" and len(d["schedule"]) == d["rounds"]
    assert d["schedule"][0] == [d["radius"], d["targets"]]  # round 1: the deployed network's
    radii = [radius for radius, _ in d["schedule"]]
    assert radii == sorted(radii) and all(np.isclose(ladder, r).any() for r in radii)
    assert radii[-1] > radii[0]  # it climbed
    for (_, before), (_, after) in itertools.pairwise(d["schedule"]):
        assert after[:len(before)] == before  # no target given back
    # a round's rule is the single-ball rule run on that round's network from its radius
    fixed, _ = AU.universal_unlearning(m, w, xb, rounds=1, **kw)
    round_2 = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), 1))[0]
    upper = [f for f, r in zip(fractions, ladder, strict=True) if r >= radii[0]]
    _, again = AU.universal_unlearning(m, fixed, xb, **{**kw, "radius_fractions": upper,
                                                        "rounds": 1, "key": round_2})
    assert d["schedule"][1][0] == again.details["radius"]
    assert d["schedule"][1][1] == d["targets"] + [
        t for t in again.details["targets"] if t not in d["targets"]]
    # retarget=False: the first round's targets only, their radius climbing
    _, info = AU.universal_unlearning(m, w, xb, radius_schedule="climb", retarget=False, **kw)
    d = info.details
    assert d["retarget"] is False and d["schedule"][0] == [d["radius"], d["targets"]]
    assert all(step is None or step[1] == d["targets"] for step in d["schedule"])
    radii = [step[0] for step in d["schedule"] if step is not None]
    assert radii == sorted(radii) and radii[-1] > radii[0]


def test_the_rechecked_radius_runs_the_fixed_rounds_until_the_shortcut_is_gone(poisoned,
                                                                              monkeypatch):
    """``radius_schedule="recheck"``: a later round's rule asks only the last radius, and the
    rounds are the fixed schedule's, bit for bit, up to the first round whose check no longer
    reaches ``fool_level``; on the toy that is after round 1 (the sits-out test below)."""
    m, w, xb, *_ = poisoned
    kw = dict(norm="l1", radius_fractions=(0.05, 0.1, 0.2, 0.4, 0.8), hflip=False, crop=0,
              steps=100, learning_rate=1e-2, retarget=False)
    asked, choose = [], AU._choose

    def spy(*args, **kwargs):
        if kwargs.get("check"):
            asked.append(np.asarray(args[3]).tolist())
        return choose(*args, **kwargs)

    monkeypatch.setattr(AU, "_choose", spy)
    q, info = AU.universal_unlearning(m, w, xb, radius_schedule="recheck", **kw)
    d = info.details
    assert d["radius_schedule"] == "recheck" and d["rounds"] == 1 and d["stopped"]
    assert d["schedule"] == [[d["radius"], d["targets"]], None]
    assert asked == [[d["radius"]]]  # the last radius only, not the candidates above it
    fixed, _ = AU.universal_unlearning(m, w, xb, rounds=1, **kw)
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(jnp.array_equal, q, fixed)))

    def always_reached(*args, **kwargs):  # a shortcut that never goes away
        radius, targets, record, reached, found = choose(*args, **kwargs)
        return radius, targets, record, reached or bool(kwargs.get("check")), found

    monkeypatch.setattr(AU, "_choose", always_reached)
    q, info = AU.universal_unlearning(m, w, xb, radius_schedule="recheck", rounds=3, **kw)
    d = info.details
    assert d["rounds"] == 3 and not d["stopped"]
    assert d["schedule"] == [[d["radius"], d["targets"]]] * 3
    fixed, _ = AU.universal_unlearning(m, w, xb, rounds=3, **kw)
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(jnp.array_equal, q, fixed)))
    # a given radius is rechecked as it is (climbing needs the rule's candidates)
    _, info = AU.universal_unlearning(m, w, xb, radius=d["radius"], radius_schedule="recheck",
                                      rounds=2, **{k: v for k, v in kw.items()
                                                   if k != "radius_fractions"})
    assert info.details["schedule"][1] == [d["radius"], d["targets"]]


def test_until_fooled_distills_in_passes_until_the_found_shortcut_is_unlearned(poisoned,
                                                                              monkeypatch):
    """``until_fooled``: each round distills its perturbations in passes of ``steps``, every
    pass from where the last ended and with its own key, until they move at most the level
    of the benign images or ``max_passes`` ran; where one pass reaches the level the network
    is the one-pass round's, bit for bit."""
    m, w, xb, *_ = poisoned
    kw = dict(norm="l1", radius_fractions=(0.05, 0.1, 0.2, 0.4, 0.8), hflip=False, crop=0,
              steps=20, learning_rate=1e-2, rounds=2)
    one, one_info = AU.universal_unlearning(m, w, xb, **kw)
    calls, distill = [], AU.distill

    def spy(model, params, *args, key, **kwargs):
        out = distill(model, params, *args, key=key, **kwargs)
        calls.append((params, out[0], key))
        return out

    monkeypatch.setattr(AU, "distill", spy)
    # a level every round reaches in one pass: the one-pass rounds exactly
    q, info = AU.universal_unlearning(m, w, xb, until_fooled=0.999, **kw)
    d = info.details
    assert d["passes"] == [1, 1] and d["until_fooled"] == 0.999 and len(calls) == 2
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(jnp.array_equal, q, one)))
    assert d["fooled"] == one_info.details["fooled"]
    # passes too short to reach the level: max_passes per round, each continuing the last
    calls.clear()
    short = {**kw, "steps": 5, "learning_rate": 3e-3}
    q, info = AU.universal_unlearning(m, w, xb, until_fooled=0.0, max_passes=3, **short)
    d = info.details
    assert d["passes"] == [3, 3] and len(calls) == 6 and min(f for _, f in d["fooled"]) > 0
    first = calls[:d["passes"][0]]
    for (_, out, _), (start, _, _) in itertools.pairwise(first):
        assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(jnp.array_equal, out,
                                                                    start)))
    k_unlearn = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), 0))[1]
    assert [np.asarray(k).tolist() for *_, k in first] == [
        np.asarray(k_unlearn if p == 0 else jax.random.fold_in(k_unlearn, p)).tolist()
        for p in range(len(first))]
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(jnp.array_equal, q,
                                                                calls[-1][1])))


def test_a_given_teacher_is_what_every_pass_distills_toward(poisoned, monkeypatch):
    """``teacher=``: the rule and the perturbations still ask the network being unlearned,
    every pass distills toward the given params; ``teacher=params`` is the default bit for
    bit, and a teacher of another network is refused before any work."""
    m, w, xb, *_ = poisoned
    kw = dict(norm="l1", radius_fractions=(0.05, 0.1, 0.2, 0.4, 0.8), hflip=False, crop=0,
              steps=20, learning_rate=1e-2, rounds=2, until_fooled=0.0, max_passes=2)
    own, own_info = AU.universal_unlearning(m, w, xb, **kw)
    same, same_info = AU.universal_unlearning(m, w, xb, teacher={"params": w}, **kw)
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(jnp.array_equal, same, own)))
    assert same_info.details["teacher_given"] and "teacher_given" not in own_info.details
    other = jax.tree_util.tree_map(lambda a: 0.5 * a, w)  # a network that answers otherwise
    teachers, distill = [], AU.distill

    def spy(model, params, *args, teacher, **kwargs):
        teachers.append(teacher)
        return distill(model, params, *args, teacher=teacher, **kwargs)

    monkeypatch.setattr(AU, "distill", spy)
    q, info = AU.universal_unlearning(m, w, xb, teacher=other, **kw)
    assert len(teachers) == sum(info.details["passes"]) >= 2
    assert all(t is other for t in teachers)
    assert info.details["radius"] == own_info.details["radius"]  # the rule asked w, not other
    assert not all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(jnp.array_equal, q, own)))
    teachers.clear()
    wrong = {**w, "readout": {"kernel": w["readout"]["kernel"][:, :2]}}  # another shape
    with pytest.raises(ValueError, match="same network"):
        AU.universal_unlearning(m, w, xb, teacher=wrong, **kw)
    with pytest.raises(ValueError, match="same network"):
        AU.universal_unlearning(m, w, xb, teacher={"other": w}, **kw)
    assert not teachers  # refused before the rule ran or anything distilled


def test_a_climbing_rule_s_perturbations_are_reused_only_where_they_are_the_round_s(
        poisoned, monkeypatch):
    """A later round's rule asked of exactly the targets it then unlearns (``retarget=False``)
    has already found that round's perturbations: they are reused, one ascent fewer per ball
    and round, and the network is the one recomputing them gives, bit for bit."""
    m, w, xb, *_ = poisoned
    kw = dict(norm="l1", radius_fractions=(0.05, 0.1, 0.2, 0.4, 0.8), hflip=False, crop=0,
              steps=100, learning_rate=1e-2, radius_schedule="climb", rounds=3)
    calls, ascend, choose = [], AU.universal_perturbations, AU._choose

    def counted(*args, **kwargs):
        calls.append(len(kwargs.get("targets") or []))
        return ascend(*args, **kwargs)

    def forgetful(*args, **kwargs):  # the rule without its perturbations: perturb recomputes
        return choose(*args, **kwargs)[:4] + (None,)

    monkeypatch.setattr(AU, "universal_perturbations", counted)
    reused, info = AU.universal_unlearning(m, w, xb, retarget=False, **kw)
    d, reusing = info.details, len(calls)
    climbed = sum(step is not None for step in d["schedule"][1:])
    assert climbed >= 1  # some later round ran, so something was reused
    monkeypatch.setattr(AU, "_choose", forgetful)
    again, _ = AU.universal_unlearning(m, w, xb, retarget=False, **kw)
    assert len(calls) - reusing == reusing + climbed
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(jnp.array_equal, reused, again)))
    # retarget=True: the rule asks every class, the round only its targets: nothing reused
    calls.clear()
    AU.universal_unlearning(m, w, xb, **kw)
    retargeting = len(calls)
    monkeypatch.setattr(AU, "_choose", choose)
    calls.clear()
    AU.universal_unlearning(m, w, xb, **kw)
    assert len(calls) == retargeting


def test_a_ball_without_a_shortcut_sits_out_and_the_rounds_stop_when_all_do(poisoned,
                                                                            monkeypatch):
    m, w, xb, *_ = poisoned
    kw = dict(norm=("l2", "l1"), radius_schedule="climb", hflip=False, crop=0, steps=100,
              learning_rate=1e-2)
    # the toy's backdoor is gone after one round: no ball's rule reaches 90% again
    q, info = AU.universal_unlearning(m, w, xb, **kw)
    d = info.details
    assert d["rounds"] == 1 and d["stopped"] and len(d["fooled"]) == 1
    assert d["schedule"][1] == [None, None]
    assert d["schedule"][0] == [[b["radius"], b["targets"]] for b in d["balls"]]
    # one ball without a shortcut: only the other's stamps, at a single ball's weight
    seen, distill, choose = [], AU.distill, AU._choose

    def spy(*args, **kwargs):
        seen.append((kwargs["stamps"][2].shape[0], kwargs["stamp_weight"]))
        return distill(*args, **kwargs)

    def only_l1_finds_one(*args, **kwargs):  # in the later rounds' rules (check=True)
        radius, targets, record, reached, found = choose(*args, **kwargs)
        return radius, targets, record, (args[7]["norm"] == "l1" if kwargs.get("check")
                                         else reached), found

    monkeypatch.setattr(AU, "distill", spy)
    monkeypatch.setattr(AU, "_choose", only_l1_finds_one)
    _, info = AU.universal_unlearning(m, w, xb, **{**kw, "rounds": 2, "ball_weighting": "each"})
    d = info.details
    assert d["rounds"] == 2 and not d["stopped"] and d["schedule"][1][0] is None
    assert seen[0][0] == sum(len(b["targets"]) for b in d["balls"])
    assert seen[1] == (len(d["schedule"][1][1][1]), 1.0)


def test_untargeted_unlearning_is_i_baus_ascent_and_removes_this_backdoor(poisoned):
    m, w, xb, _, x_te, y_te = poisoned
    q, info = AU.universal_unlearning(m, w, xb, targeted=False, fool_level=0.5, hflip=False,
                                      crop=0, steps=100, learning_rate=1e-2)
    d = info.details
    assert A.attack_success_rate(m, q, x_te, y_te, 0, TRIGGER) < 0.05
    assert _accuracy(m, q, x_te, y_te) >= _accuracy(m, w, x_te, y_te) - 0.02
    # the rule's radius is the smallest candidate fooling half the benign predictions
    fooled = dict(map(tuple, d["candidates"]))
    assert fooled[d["radius"]] >= 0.5 or d["radius"] == max(fooled)
    assert all(f < 0.5 for r, f in fooled.items() if r < d["radius"])
    assert "targets" not in d


def test_a_given_radius_is_used_and_the_labels_are_not(poisoned):
    m, w, xb, yb, *_ = poisoned
    kw = dict(radius=2.0, rounds=2, steps=20, hflip=False, crop=0, ascent_steps=10,
              targeted=False)
    q1, info = AU.universal_unlearning(m, w, xb, yb, **kw)
    q2, _ = AU.universal_unlearning(m, w, xb, jnp.zeros_like(yb), **kw)
    assert info.details["radius"] == 2.0 and "candidates" not in info.details
    for a, b in zip(jax.tree_util.tree_leaves(q1), jax.tree_util.tree_leaves(q2), strict=True):
        np.testing.assert_array_equal(a, b)


def test_radii_given_per_ball_reproduce_the_run_whose_rules_chose_them(poisoned):
    """A targeted ball asks for its perturbations at every candidate with the same key, so
    the radius its rule chose, given back, finds the same perturbations and targets there:
    the unlearning is the same, bit for bit (how the experiments' ``at-projected-radii``
    diagnostic puts another network's radii on the deployed one)."""
    m, w, xb, *_ = poisoned
    kw = dict(norm=("l2", "l1"), rounds=2, steps=20, hflip=False, crop=0, ascent_steps=10,
              learning_rate=1e-2)
    q, info = AU.universal_unlearning(m, w, xb, **kw)
    radii = tuple(ball["radius"] for ball in info.details["balls"])
    given, again = AU.universal_unlearning(m, w, xb, radius=radii, **kw)
    for chosen, ball in zip(info.details["balls"], again.details["balls"], strict=True):
        assert ball["radius"] == chosen["radius"] and ball["targets"] == chosen["targets"]
        assert "candidates" not in ball  # nothing was chosen
    assert again.details["fooled"] == info.details["fooled"]
    for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(given),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_distill_adds_offsets_to_the_stamped_images(poisoned):
    m, w, xb, *_ = poisoned
    zeros = jnp.zeros((1,) + xb.shape[1:3] + (1,))
    patterns = jnp.zeros((1,) + xb.shape[1:])

    def moved(offsets):  # student = teacher: only a stamped image's logit gap pulls
        q, _ = D.distill(m, w, xb, teacher=w, steps=3, stamps=(zeros, patterns, offsets))
        return max(float(jnp.max(jnp.abs(a - b)))
                   for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(w),
                                   strict=True))

    assert moved(jnp.zeros_like(patterns)) == 0.0  # a zero offset: the clean images, no gap
    assert moved(jnp.ones_like(patterns)) > 1e-4
    with pytest.raises(ValueError, match="stamps for images"):
        D.distill(m, w, xb, teacher=w, steps=1, stamps=(zeros, patterns, patterns[:, :4]))
    with pytest.raises(ValueError, match="masks, patterns"):
        D.distill(m, w, xb, teacher=w, steps=1, stamps=(zeros,))


def test_arguments_are_checked(poisoned):
    m, w, xb, *_ = poisoned
    with pytest.raises(ValueError, match="radii"):
        AU.universal_perturbations(m, w, xb, [0.0])
    with pytest.raises(ValueError, match="radii"):
        AU.universal_perturbations(m, w, xb, [np.inf])
    with pytest.raises(ValueError, match="steps"):
        AU.universal_perturbations(m, w, xb, [1.0], steps=0)
    with pytest.raises(ValueError, match="x_benign"):
        AU.universal_perturbations(m, w, xb[0], [1.0])
    with pytest.raises(ValueError, match="targets"):
        AU.universal_perturbations(m, w, xb, [1.0, 2.0], targets=[0])
    with pytest.raises(ValueError, match="targets"):
        AU.universal_perturbations(m, w, xb, [1.0], targets=[3])  # 3 classes: 0..2
    with pytest.raises(ValueError, match="rounds"):
        AU.universal_unlearning(m, w, xb, rounds=0)
    with pytest.raises(ValueError, match="fool_level"):
        AU.universal_unlearning(m, w, xb, fool_level=0.0)
    with pytest.raises(ValueError, match="radius"):
        AU.universal_unlearning(m, w, xb, radius=-1.0)
    with pytest.raises(ValueError, match="norm"):
        AU.universal_perturbations(m, w, xb, [1.0], norm="linf")
    with pytest.raises(ValueError, match="distinct"):
        AU.universal_unlearning(m, w, xb, norm=("l2", "l2"))
    with pytest.raises(ValueError, match="ball_weighting"):
        AU.universal_unlearning(m, w, xb, norm=("l2", "l1"), ball_weighting="sum")
    with pytest.raises(ValueError, match="radius_schedule"):
        AU.universal_unlearning(m, w, xb, radius_schedule="grow")
    for level in (1.0, -0.1, np.nan):
        with pytest.raises(ValueError, match="until_fooled"):
            AU.universal_unlearning(m, w, xb, until_fooled=level)
    with pytest.raises(ValueError, match="max_passes"):
        AU.universal_unlearning(m, w, xb, until_fooled=0.1, max_passes=0)
    with pytest.raises(ValueError, match="radius=None"):
        AU.universal_unlearning(m, w, xb, radius=1.0, radius_schedule="climb")
    for radius in (1.0, (1.0,), (1.0, 2.0, 3.0)):
        with pytest.raises(ValueError, match="one number per ball"):
            AU.universal_unlearning(m, w, xb, norm=("l2", "l1"), radius=radius)
    for radius in ((1.0, 0.0), (np.nan, 1.0), (1.0, "2")):
        with pytest.raises(ValueError, match="positive and finite"):
            AU.universal_unlearning(m, w, xb, norm=("l2", "l1"), radius=radius)
    with pytest.raises(ValueError, match="one ball"):
        AU.universal_unlearning(m, w, xb, norm=("l2", "l1"), radius_fractions=(0.1,))
    with pytest.raises(ValueError, match="bound"):
        AU.universal_unlearning(m, w, xb, norm="l1", bound=0.0)
    with pytest.raises(ValueError, match="constant"):
        AU.universal_perturbations(m, w, jnp.zeros_like(xb), [1.0], norm="l1")
    nan = jax.tree_util.tree_map(lambda a: a * jnp.nan, w)
    with pytest.raises(FloatingPointError, match="NaN"):
        AU.universal_perturbations(m, nan, xb, [1.0], steps=2)
