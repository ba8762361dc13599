"""The universal-shortcuts diagnostic (experiments/universal_shortcuts.py): every class's
universal perturbation per ball and radius, on the clean and the poisoned networks."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpurify import adversarial_unlearning as AU

shortcuts = pytest.importorskip("experiments.universal_shortcuts")
backdoor = pytest.importorskip("experiments.backdoor")


def test_a_trigger_size_is_the_mean_change_it_stamps():
    x = np.zeros((4, 3, 3, 1))
    x[1] = 1.0

    def corner(v):  # one pixel set to 2: it changes by 2, 1, 2, 2 -> L2 = L1 = 1.75
        return v.at[:, 0, 0, 0].set(2.0)

    size = shortcuts.trigger_size(corner, x)
    assert size["l2"] == pytest.approx(1.75) and size["l1"] == pytest.approx(1.75)
    assert size["l2_fraction"] == pytest.approx(1.75 / AU.benign_scale(x, "l2"))
    assert size["l1_fraction"] == pytest.approx(1.75 / AU.benign_scale(x, "l1"))


def test_the_summary_takes_the_smallest_fraction_that_reaches_the_level():
    rows = [{"network": "clean", "norm": "l2", "fraction": f, "target_success": t,
             "top_success": s} for f, t, s in ((0.1, 0.2, 0.95), (0.05, 0.1, 0.5),
                                               (0.2, 0.91, 0.99))]
    rows.append({"network": "badnets", "norm": "l1", "fraction": 0.01, "target_success": 0.3,
                 "top_success": 0.3})
    s = shortcuts.summarize(rows, 0.9)
    assert s == [{"network": "clean", "norm": "l2", "target_reaches": 0.2,
                  "some_class_reaches": 0.1},
                 {"network": "badnets", "norm": "l1", "target_reaches": None,
                  "some_class_reaches": None}]


def test_the_quick_run_measures_every_network_ball_and_radius(tmp_path):
    metrics = shortcuts.run(name="universal-shortcuts-mnist", quick=True, out=tmp_path,
                            train_limit=2000, test_limit=500, steps=150, ascent_steps=5,
                            attacks=("badnets",))
    rows = metrics["rows"]
    assert [r["network"] for r in rows[::10]] == ["clean", "badnets"]
    assert len(rows) == 2 * (len(AU.RADIUS_FRACTIONS) + len(AU.SPARSE_RADIUS_FRACTIONS))
    for r in rows:
        assert len(r["success"]) == 10 and all(0 <= s <= 1 for s in r["success"])
        assert r["target_success"] == r["success"][backdoor.TARGET]
        assert r["top_success"] == max(r["success"]) == r["success"][r["top_class"]]
    assert sorted(metrics["networks"]) == ["badnets", "clean"]
    assert all(0 <= v <= 1 for e in metrics["networks"].values() for v in e.values())
    t = metrics["triggers"]["badnets"]
    assert 0 < t["l1_fraction"] < 1 and 0 < t["l2_fraction"] < 1
    assert len(metrics["summary"]) == 4
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored["rows"] == json.loads(json.dumps(rows))
    assert (tmp_path / "shortcuts.png").stat().st_size > 0
    assert "| badnets | l1 |" in (tmp_path / "tables.md").read_text()


def test_each_row_is_the_radius_rules_own_measurement():
    """One ball and radius of :func:`shortcuts` is the radius rule's call: every class's
    targeted perturbation with the same key and steps."""
    from tests.backdoor_helpers import poisoned_one_hidden

    m, w, xb, *_ = poisoned_one_hidden()
    key = jax.random.PRNGKey(3)
    reported = []
    rows = shortcuts.shortcuts(m, w, jnp.asarray(xb), key, ascent_steps=5,
                               report=reported.append)
    assert reported == rows  # each row reported as it is measured
    r = rows[len(AU.RADIUS_FRACTIONS) + 2]  # the sparse ball's third candidate
    assert r["norm"] == "l1" and r["fraction"] == AU.SPARSE_RADIUS_FRACTIONS[2]
    num_classes = len(r["success"])
    found = AU.universal_perturbations(m, w, xb, [r["radius"]] * num_classes,
                                       targets=range(num_classes), steps=5, key=key,
                                       norm="l1", bound=float(xb.max() - xb.min()))
    np.testing.assert_allclose(r["success"], found.fooled)


@pytest.mark.parametrize("bad, match", [({"model": "resnet"}, "unknown model"),
                                        ({"attacks": "badnets"}, "attacks must be a tuple"),
                                        ({"rate": 1.5}, "fractions of the training set")])
def test_a_bad_setting_is_refused_before_anything_loads(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        shortcuts.run(name="universal-shortcuts-mnist", quick=True, out=tmp_path, **bad)
    assert not (tmp_path / "metrics.json").exists()


def test_the_row_space_source_measures_the_row_space_experiments_networks(tmp_path):
    """``universal-shortcuts-row-space-*`` trains the row-space experiment's SGD networks
    (here four patches per image): the same networks that experiment measures, to the digit."""
    from experiments import row_space_backdoor

    small = dict(quick=True, patch=14, train_limit=1000, test_limit=500, steps=100)
    metrics = shortcuts.run(name="universal-shortcuts-row-space-mnist", out=tmp_path / "s",
                            ascent_steps=5, attacks=("badnets",), **small)
    assert metrics["setup"]["model"] == "one-hidden-4patch"
    assert metrics["setup"]["source"] == "row-space"
    assert {r["model"] for r in metrics["rows"]} == {"one-hidden-4patch"}
    assert len(metrics["rows"]) == 2 * (len(AU.RADIUS_FRACTIONS) + len(AU.SPARSE_RADIUS_FRACTIONS))
    grid = row_space_backdoor.run(name="backdoor-row-space-mnist", out=tmp_path / "g",
                                  defenses=("ft",), rates=(0.1,), budgets=(0.01,), **small)
    none = next(r for r in grid["rows"] if r["defense"] == "none")
    assert metrics["networks"]["badnets"] == {"acc": none["acc"], "asr_badnets": none["asr"]}
    assert metrics["networks"]["clean"] == {"acc": grid["clean"]["acc"],
                                            "asr_badnets": grid["clean"]["asr_badnets"]}
    with pytest.raises(ValueError, match="does not tile the 28x28 images"):
        shortcuts.run(name="universal-shortcuts-row-space-mnist", out=tmp_path / "never",
                      **{**small, "patch": 12})
    assert not (tmp_path / "never").exists()
