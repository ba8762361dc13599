"""The repeats experiment (experiments/backdoor_repeats.py): one setting's defenses re-run on
fresh benign draws and keys, repeat 0 being the backdoor experiment's own."""

import json

import jax
import numpy as np
import pytest

backdoor = pytest.importorskip("experiments.backdoor")
repeats = pytest.importorskip("experiments.backdoor_repeats")
row_space = pytest.importorskip("experiments.row_space_backdoor")

TINY = dict(quick=True, train_limit=2000, test_limit=500)


def test_repeat_zero_is_the_grid_draw_and_later_ones_are_fresh():
    order = np.arange(1000)[::-1].copy()
    idx0, key0 = repeats.draws(order, 20, 256, 0, 0, ("benign", "key"))
    np.testing.assert_array_equal(idx0, order[:20])
    np.testing.assert_array_equal(key0, jax.random.PRNGKey(11))
    fresh = [repeats.draws(order, 20, 256, 0, r, ("benign", "key")) for r in (1, 2)]
    for idx, key in fresh:
        assert len(set(idx.tolist())) == 20  # no image twice
        assert not set(idx.tolist()) & set(order[-256:].tolist())  # never the attacker's
        assert not np.array_equal(idx, idx0) and not np.array_equal(key, key0)
    assert not np.array_equal(fresh[0][0], fresh[1][0])
    assert not np.array_equal(fresh[0][1], fresh[1][1])
    idx, key = repeats.draws(order, 20, 256, 0, 1, ("key",))  # only the key afresh
    np.testing.assert_array_equal(idx, idx0)
    assert not np.array_equal(key, key0)
    idx, key = repeats.draws(order, 20, 256, 0, 1, ("benign",))  # only the images afresh
    assert not np.array_equal(idx, idx0)
    np.testing.assert_array_equal(key, key0)


def _row(repeat, defense, variant, acc, asr, budget=0.01):
    return {"repeat": repeat, "defense": defense, "variant": variant, "budget": budget,
            "acc": acc, "asr": asr}


def test_judge_and_summary_count_the_repeats_that_meet_the_target():
    rows = [_row(0, "none", None, 0.70, 0.99, budget=0.0),
            _row(0, "nc", "consistency-top", 0.69, 0.04),   # small, FT not better on both
            _row(0, "ft", None, 0.60, 0.01),
            _row(1, "nc", "consistency-top", 0.695, 0.06),  # ASR too high
            _row(1, "ft", None, 0.60, 0.01),
            _row(2, "nc", "consistency-top", 0.60, 0.01),   # small? no: 10 pt drop; FT equal
            _row(2, "ft", None, 0.61, 0.01)]                # better on both (ACC, same ASR)
    repeats.judge_repeats(rows)
    nc = [r for r in rows if r["defense"] == "nc"]
    assert [r["small_enough"] for r in nc] == [True, False, False]
    assert [r["not_beaten"] for r in nc] == [True, True, False]
    assert all("not_beaten" not in r for r in rows if r["defense"] == "ft")  # not judged
    summary = {s["defense"]: s for s in repeats.summarize(rows)}
    s = summary["nc"]
    asr = np.array([0.04, 0.06, 0.01])
    assert s["n"] == 3 and s["repeats"] == [0, 1, 2]
    assert s["asr_mean"] == pytest.approx(asr.mean())
    assert s["asr_std"] == pytest.approx(asr.std(ddof=1))
    assert (s["asr_min"], s["asr_max"]) == (0.01, 0.06)
    assert s["acc_drop_mean"] == pytest.approx(0.70 - np.mean([0.69, 0.695, 0.60]))
    assert s["small_enough"] == 1 and s["met"] == 1
    assert "met" not in summary["ft"]  # a baseline is not judged against itself
    assert repeats.verdicts(rows) == {"judged": ["nc consistency-top"], "repeats": 3,
                                      "small_enough": 1, "met": 1, "repeats_met": [0]}
    # a diagnostic row meeting the target in another repeat counts for itself, not the verdict
    rows.append(_row(1, "nc", "consistency-rounds-restart-each", 0.69, 0.01))
    repeats.judge_repeats(rows)
    each = {s["variant"]: s for s in repeats.summarize(rows)}["consistency-rounds-restart-each"]
    assert each["small_enough"] == 1 and each["met"] == 1
    assert repeats.verdicts(rows)["met"] == 1
    alone = [r for r in rows if r["defense"] != "ft"]  # without FT, nothing to be beaten by
    for r in alone:
        r.pop("not_beaten", None)
    repeats.judge_repeats(alone)
    assert "met" not in repeats.summarize(alone)[0]
    assert "met" not in repeats.verdicts(alone)


@pytest.mark.parametrize("option, match", [
    ({"model": "resnet"}, "unknown model 'resnet'"),
    ({"attack": "weight-edit"}, "unknown attack"),
    ({"repeats": 0}, "repeats must be a positive integer"),
    ({"vary": "key"}, "vary must be a tuple"),
    ({"vary": ("bogus",)}, "vary must be a tuple"),
    ({"budget": 0.0}, "fractions of the training set"),
    ({"defenses": ("ft", "bogus")}, r"unknown defenses \['bogus'\]"),
    ({"nc_variants": ("bogus",)}, r"unknown nc_variants \['bogus'\]"),
])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, option, match):
    with pytest.raises(ValueError, match=match):
        repeats.run(out=tmp_path, **TINY, **option)


def test_repeats_end_to_end_repeat_zero_equals_the_backdoor_experiment(tmp_path):
    kw = dict(TINY, defenses=("jaxpurify", "ft"), jaxpurify_variants=("benign-readout",))
    grid = backdoor.run(out=tmp_path / "grid", ks=(), attacks=("badnets",), **kw)
    m = repeats.run(out=tmp_path / "rep", repeats=3, **kw)
    assert "targets" not in m  # a diagnostic, never a verdict
    on_disk = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert on_disk["summary"] == m["summary"]
    assert (tmp_path / "rep" / "repeats.png").is_file()
    assert "| jaxpurify benign-readout | 3 |" in (tmp_path / "rep" / "tables.md").read_text()

    def numbers(rows, **match):
        return {(r["defense"], r["variant"]): (r["acc"], r["asr"]) for r in rows
                if all(r.get(k) == v for k, v in match.items())}

    # repeat 0 is the grid's draw and key: the same numbers, bit for bit
    assert numbers(m["rows"], repeat=0) == numbers(grid["rows"])
    assert [r["benign_draw"] for r in m["rows"] if r["defense"] == "ft"] == \
        ["grid", "fresh 1", "fresh 2"]
    # the undefended and data-free rows are measured once
    assert [r["repeat"] for r in m["rows"] if r["budget"] == 0] == [0, 0]
    # a fresh draw re-fits the readout on other images: other numbers
    readout = [r["acc"] for r in m["rows"] if r["variant"] == "benign-readout"]
    assert len(set(readout)) > 1
    s = next(s for s in m["summary"] if s["variant"] == "benign-readout")
    assert s["acc_mean"] == pytest.approx(np.mean(readout))
    assert "met" in s  # judged against the FT row of each repeat
    assert m["verdicts"]["judged"] == ["jaxpurify benign-readout"]
    assert m["verdicts"]["repeats"] == 3 and "met" in m["verdicts"]

    # re-judged from the stored rows: the same marks, summary and verdicts
    stored = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    again = repeats.rejudge(tmp_path / "rep")
    for field in ("rows", "summary", "verdicts"):
        assert again[field] == stored[field]

    # nothing varied: every repeat is the grid's (the defenses are deterministic)
    same = repeats.run(out=tmp_path / "same", repeats=2, vary=(), **dict(kw, defenses=("ft",)))
    ft = [(r["acc"], r["asr"]) for r in same["rows"] if r["defense"] == "ft"]
    assert ft == [numbers(grid["rows"])[("ft", None)]] * 2
    assert same["summary"][0]["acc_std"] == 0.0


#: The row-space experiment's four-patch CNN on a small draw (1000 images, 100 SGD steps).
ROW_SPACE = dict(name="backdoor-repeats-row-space-mnist", quick=True, patch=14,
                 train_limit=1000, test_limit=500, steps=100)


@pytest.mark.parametrize("option, match", [
    ({"patch": 12}, "does not tile the 28x28 images"),
    ({"defenses": ("ft", "nc")}, r"unknown defenses \['nc'\]"),
    ({"variants": ("benign-typo",)}, "unknown jaxpurify variants"),
    ({"attack": "weight-edit"}, "unknown attack"),
    ({"budget": 1.5}, "fractions of the training set"),
    ({"vary": ("bogus",)}, "vary must be a tuple"),
])
def test_bad_row_space_settings_are_refused_before_anything_runs(tmp_path, option, match):
    with pytest.raises(ValueError, match=match):
        repeats.run(out=tmp_path / "never", **{**ROW_SPACE, **option})
    assert not (tmp_path / "never").exists()


def test_row_space_repeat_zero_equals_the_row_space_experiment(tmp_path):
    """The row-space source: repeat 0 is the row-space experiment's draw (the same rows,
    bit for bit), fresh draws avoid its probe images, and its verdict judges the
    row-space variants and the universal unlearning, not the backdoor experiment's set."""
    kw = dict(ROW_SPACE, attack="blended", rate=0.1, budget=0.01,
              defenses=("jaxpurify", "ft", "universal"),
              variants=("benign-projection", "benign-principal"))
    grid = row_space.run(out=tmp_path / "grid", **{
        **{k: v for k, v in kw.items() if k not in ("attack", "rate", "budget")},
        "name": "backdoor-row-space-mnist", "attacks": ("blended",), "rates": (0.1,),
        "budgets": (0.01,)})
    m = repeats.run(out=tmp_path / "rep", repeats=2, **kw)
    assert m["setup"]["source"] == "row-space" and m["setup"]["patches_per_image"] == 4
    assert {r["model"] for r in m["rows"]} == {"one-hidden-4patch"}

    def numbers(rows, **match):
        return {(r["defense"], r["variant"]): (r["acc"], r["asr"]) for r in rows
                if all(r.get(k) == v for k, v in match.items())}

    assert numbers(m["rows"], repeat=0) == numbers(grid["rows"])
    assert [r["repeat"] for r in m["rows"] if r["budget"] == 0] == [0]
    fresh = [r for r in m["rows"] if r["repeat"] == 1]
    assert {r["benign_draw"] for r in fresh} == {"fresh 1"}
    assert numbers(fresh) != numbers(m["rows"], repeat=0)
    # the benign-row-space and -projection rows are judged here (not in the backdoor
    # experiment), so is the universal unlearning; FT is what they are judged against
    assert m["verdicts"]["judged"] == ["jaxpurify benign-principal",
                                       "jaxpurify benign-projection",
                                       "universal universal-targeted"]
    assert "met" in m["verdicts"]
    order = np.asarray(jax.random.permutation(jax.random.PRNGKey(7), 1000))
    idx, _ = repeats.draws(order, 10, row_space.PROBE_IMAGES, 0, 1, ("benign", "key"))
    assert not set(idx.tolist()) & set(order[-row_space.PROBE_IMAGES:].tolist())  # no probe
    # re-judged from the stored rows (the source read back from setup): the same verdicts
    stored = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    again = repeats.rejudge(tmp_path / "rep")
    for field in ("rows", "summary", "verdicts"):
        assert again[field] == stored[field]
    assert "one-hidden-4patch blended 10%" in (tmp_path / "rep" / "tables.md").read_text()


def _arm_row(variant, repeat, acc, asr, defense="jaxpurify", **kw):
    return {"dataset": "mnist", "model": "one-hidden", "attack": "blended",
            "poison_rate": 0.05, "k": None, "repeat": repeat, "defense": defense,
            "variant": variant, "budget": 0.01, "acc": acc, "asr": asr, **kw}


def test_compare_pools_runs_by_setting_and_arm_and_refuses_other_draws(tmp_path):
    """Two runs that share a setting: a row both measured counts once, each arm's mean and
    range and its draws under the target come out, other variants are left out, and two
    runs whose shared row differs (not the same draws) are refused."""
    projected, radii = "benign-principal+universal", repeats.UNLEARNING_ARMS[
        ("jaxpurify", "benign-principal+universal-deployed-at-projected-radii")]
    none = _arm_row(None, 0, 0.95, 0.98, defense="none", budget=0.0)
    first = [none, _arm_row(projected, 0, 0.94, 0.02), _arm_row(projected, 1, 0.90, 0.04),
             _arm_row("benign-principal", 0, 0.95, 0.60)]
    second = [none, _arm_row(projected, 1, 0.90, 0.04),
              _arm_row("benign-principal+universal-deployed-at-projected-radii", 0, 0.93, 0.08)]
    for name, rows in (("a", first), ("b", second)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"rows": rows}))
    summary = repeats.compare([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    by_arm = {s["arm"]: s for s in summary}
    assert set(by_arm) == {repeats.UNLEARNING_ARMS[("jaxpurify", projected)], radii}
    both = by_arm[repeats.UNLEARNING_ARMS[("jaxpurify", projected)]]
    assert both["n"] == 2 and both["asr_mean"] == pytest.approx(0.03)
    assert (both["asr_min"], both["asr_max"]) == (0.02, 0.04)
    assert both["acc_drop_mean"] == pytest.approx(0.03)
    assert both["small_enough"] == 1  # the 5 pt drop of repeat 1 is over the line
    assert by_arm[radii]["n"] == 1 and by_arm[radii]["small_enough"] == 0
    table = (tmp_path / "out" / "arms.md").read_text()
    assert "| mnist | designed blended 5% | 1% |" in table and "3.00 [2.00, 4.00] (3.00) 1 of 2" \
        in table
    assert (tmp_path / "out" / "arms.png").stat().st_size > 0
    second[1] = _arm_row(projected, 1, 0.90, 0.05)
    (tmp_path / "b" / "metrics.json").write_text(json.dumps({"rows": second}))
    with pytest.raises(ValueError, match="not the same draws"):
        repeats.compare([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    with pytest.raises(ValueError, match="no row of the arms"):
        repeats.compare([tmp_path / "a"], tmp_path / "out", arms={("ft", None): "FT"})
