"""``jaxpurify run backdoor-row-space-* --quick``: schema, applicability and the measured effect."""

from __future__ import annotations

import json

import pytest

from jaxpurify.data import DataNotFoundError

row_space = pytest.importorskip("experiments.row_space_backdoor")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("backdoor-row-space-mnist")
    try:
        metrics = row_space.run(name="backdoor-row-space-mnist", quick=True, out=out)
    except DataNotFoundError as err:  # pragma: no cover - CI has the data
        pytest.skip(f"MNIST not available: {err}")
    assert json.loads((out / "metrics.json").read_text())["rows"] == metrics["rows"]
    return out, metrics


def test_rows_hold_the_issue_schema(quick):
    out, metrics = quick
    assert (out / "tables.md").exists() and (out / "backdoor.png").stat().st_size > 0
    rows = metrics["rows"]
    for r in rows:
        for key in ("dataset", "model", "attack", "poison_rate", "defense", "budget", "acc",
                    "asr", "seconds"):
            assert key in r, key
        assert r["defense"] in ("none", "jaxpurify", "ft")
        assert r["acc"] is None or (0 <= r["acc"] <= 1 and 0 <= r["asr"] <= 1)
    assert metrics["setup"]["filter_entries"] == 785
    assert len(metrics["targets"]) == 1 and metrics["environment"]["source"] is not None


def test_the_row_space_applies_only_below_the_filter_length(quick):
    _, metrics = quick
    jp = {(r["variant"], r["budget"]): r for r in metrics["rows"] if r["defense"] == "jaxpurify"}
    # 40 benign images (1% of 4000): 40 patches < 785 entries; 2000 (50%): the span is full
    for variant in ("benign-row-space", "benign-projection"):
        assert jp[(variant, 0.01)]["acc"] is not None
        assert jp[(variant, 0.5)]["acc"] is None
        assert "785/785" in jp[(variant, 0.5)]["details"]["benign_patch_rank"]


def test_the_projection_removes_the_badnets_backdoor_fine_tuning_does_not(quick):
    """Measured in the quick setting (4000 training images, 300 steps, 10% BadNets): the
    undefended and fine-tuned networks keep ASR > 90%, the projection onto 40 benign images'
    span brings it under 5%."""
    _, metrics = quick
    at = {(r["defense"], r["variant"]): r for r in metrics["rows"]
          if r["budget"] in (0.0, 0.01)}
    assert at[("none", None)]["asr"] > 0.9 and at[("ft", None)]["asr"] > 0.9
    assert at[("jaxpurify", "benign-projection")]["asr"] < 0.05


def test_the_principal_projection_applies_where_the_span_is_full(quick):
    """Measured in the quick setting: at 2000 benign images (50%) the patches span all 785
    filter entries, so the span projection has nothing to remove; keeping only the leading
    principal directions (rank chosen on held-out benign ACC: 128) removes the backdoor there
    (ASR 0.87%, ACC unchanged at 91.6%)."""
    _, metrics = quick
    at = {(r["defense"], r["variant"], r["budget"]): r for r in metrics["rows"]}
    none, principal = at[("none", None, 0.0)], at[("jaxpurify", "benign-principal", 0.5)]
    assert principal["details"]["principal_rank"] < 785
    # every candidate's held-out benign ACC is kept; the chosen rank is the smallest within
    # 1 pt of the undefended network's on the budget
    d = principal["details"]
    candidates = {int(r): a for r, a in d["principal_candidates"].items()}
    assert candidates[d["principal_rank"]] == d["principal_held_out_acc"]
    assert d["principal_held_out_acc"] >= d["principal_undefended_acc"] - 0.01
    assert all(a < d["principal_undefended_acc"] - 0.01
               for r, a in candidates.items() if r < d["principal_rank"])
    assert 0.5 < principal["details"]["trigger_outside_kept"] <= 1  # BadNets: its corner
    assert principal["asr"] < 0.05 and principal["acc"] > none["acc"] - 0.02
    assert at[("jaxpurify", "benign-principal", 0.01)]["acc"] is not None


def test_trigger_shares_outside_the_benign_span(quick):
    """Recorded per trigger and applicable budget. On MNIST no benign image lights the corner
    BadNets uses, so nearly all of its change lies outside the span; the full-image Blended
    pattern much less (measured on the full set at 600 images: 0.97 vs 0.29)."""
    _, metrics = quick
    shares = metrics["setup"]["trigger_outside_benign_span"]
    assert set(shares) == {"badnets", "blended"} and set(shares["badnets"]) == {"0.01"}
    assert shares["badnets"]["0.01"] > 0.95
    assert shares["blended"]["0.01"] < shares["badnets"]["0.01"]


def test_trigger_outside_span_is_zero_inside_and_one_orthogonal():
    """Exact ends of the diagnostic: a trigger adding the difference of two benign images is
    inside the span of the augmented patches ``[x; 1]`` (0);
    one lighting a pixel no benign image has is orthogonal to it (1)."""
    import numpy as np

    from jaxpurify.models import OneHiddenLayerCNN

    rng = np.random.default_rng(0)
    benign = np.zeros((5, 6, 6, 1), np.float32)
    benign[:, 1:, 1:] = rng.standard_normal((5, 5, 5, 1))
    model = OneHiddenLayerCNN(3, (6, 6), num_classes=2, pool="mean")
    probe = rng.standard_normal((4, 6, 6, 1)).astype(np.float32)
    shares = row_space.trigger_outside_span(
        model, {"inside": lambda x: x + benign[0] - benign[1],
                "corner": lambda x: x.at[:, 0, 0].set(9.0)}, benign, probe)
    inside, corner = shares["inside"], shares["corner"]
    assert inside < 1e-6 and abs(corner - 1.0) < 1e-6
    # keeping only the leading principal directions removes more, down to the full span
    trig = {"inside": lambda x: x + benign[0] - benign[1]}
    by_rank = [row_space.trigger_outside_span(model, trig, benign, probe, rank=r)["inside"]
               for r in (1, 2, 3, 4, 5)]
    assert by_rank[0] > 0.1 and by_rank[-1] < 1e-6
    assert all(a >= b - 1e-6 for a, b in zip(by_rank, by_rank[1:], strict=False))


def test_unknown_variants_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown jaxpurify variants"):
        row_space.run(quick=True, out=tmp_path, variants=("benign-typo",))
    with pytest.raises(ValueError, match="unknown FT recipe 'bogus'"):
        row_space.run(quick=True, out=tmp_path / "never", ft_recipes=("bogus",))
    with pytest.raises(ValueError, match="unknown FP recipe 'bogus'"):
        row_space.run(quick=True, out=tmp_path / "never", fp_recipes=("bogus",))
    assert not (tmp_path / "never").exists()


@pytest.fixture(scope="module")
def four_patches(tmp_path_factory):
    """The theorem's own model, four 14x14 patches per MNIST image, on a small draw."""
    out = tmp_path_factory.mktemp("backdoor-row-space-mnist-4patch")
    try:
        return row_space.run(name="backdoor-row-space-mnist", quick=True, out=out, patch=14,
                             train_limit=1000, test_limit=500, steps=100,
                             budgets=(0.01, 0.1), defenses=("jaxpurify", "universal"),
                             variants=("benign-projection", "benign-principal",
                                       "benign-principal+universal",
                                       "benign-principal+universal-deployed-start",
                                       "benign-principal+universal-deployed-at-projected-radii"))
    except DataNotFoundError as err:  # pragma: no cover - CI has the data
        pytest.skip(f"MNIST not available: {err}")


def test_four_patches_per_image_name_the_model_and_count_patches(four_patches):
    """With ``patch=14`` every filter has 14*14 + 1 entries and each image gives four
    patches, so 10 benign images (1% of 1000) leave the span 40/197 and 100 fill it."""
    metrics = four_patches
    assert metrics["setup"]["filter_entries"] == 197
    assert metrics["setup"]["patches_per_image"] == 4
    assert {r["model"] for r in metrics["rows"]} == {"one-hidden-4patch"}
    jp = {(r["variant"], r["budget"]): r for r in metrics["rows"] if r["defense"] == "jaxpurify"}
    assert jp[("benign-projection", 0.01)]["details"]["benign_patch_rank"] == "40/197"
    assert jp[("benign-projection", 0.01)]["acc"] is not None
    assert jp[("benign-projection", 0.1)]["acc"] is None  # 400 patches span all 197
    assert jp[("benign-principal", 0.1)]["acc"] is not None


def test_the_universal_unlearning_is_run_and_judged(four_patches):
    rows = [r for r in four_patches["rows"] if r["defense"] == "universal"]
    assert {(r["variant"], r["budget"]) for r in rows} == {
        ("universal-targeted", 0.01), ("universal-targeted", 0.1)}
    assert all(0 <= r["asr"] <= 1 and r["details"] for r in rows)
    (target,) = four_patches["targets"]
    assert "universal/universal-targeted: ASR" in target["reason"]


def test_the_projection_then_unlearned_row_keeps_the_projections_rank_and_is_judged(
        four_patches):
    """``benign-principal+universal`` unlearns the very projection the ``benign-principal``
    row measured (same rank, same trigger share outside it) and is judged like it."""
    rows = {(r["variant"], r["budget"]): r for r in four_patches["rows"]
            if r["defense"] == "jaxpurify"}
    for budget in (0.01, 0.1):
        alone, then = rows[("benign-principal", budget)], rows[("benign-principal+universal",
                                                                   budget)]
        for key in ("principal_rank", "trigger_outside_kept", "removed_energy"):
            assert then["details"][key] == alone["details"][key]
        assert 1 <= len(then["details"]["passes"]) and then["details"]["until_fooled"] == 0.05
        assert then["seconds"] > alone["seconds"] and 0 <= then["asr"] <= 1
    (target,) = four_patches["targets"]
    assert "benign-principal+universal: ASR" in target["reason"]


def test_the_teacher_ablation_row_is_measured_beside_the_judged_ones_and_never_judged(
        four_patches):
    """Named in ``variants``, the ablation arm that starts from the deployed network and
    distills toward the projection is measured on the same projection, and the verdict quotes
    it as a diagnostic, never as the judged row."""
    arm = "benign-principal+universal-deployed-start"
    rows = {(r["variant"], r["budget"]): r for r in four_patches["rows"]
            if r["defense"] == "jaxpurify"}
    for budget in (0.01, 0.1):
        then, ablation = rows[("benign-principal+universal", budget)], rows[(arm, budget)]
        assert ablation["details"]["principal_rank"] == then["details"]["principal_rank"]
        assert ablation["details"]["teacher_given"] and "teacher_given" not in then["details"]
        assert 0 <= ablation["asr"] <= 1
    (target,) = four_patches["targets"]
    assert target["variant"] != arm and f"{arm} (diagnostic, not judged) ASR" in target["reason"]


def test_the_radius_diagnostic_unlearns_the_deployed_network_at_the_projected_radii(
        four_patches):
    """The radius arm runs the deployed network's own unlearning at the radii the rule chose
    on the projection, one per ball, with no teacher of its own; never judged."""
    arm = "benign-principal+universal-deployed-at-projected-radii"
    rows = {(r["variant"], r["budget"]): r for r in four_patches["rows"]
            if r["defense"] == "jaxpurify"}
    for budget in (0.01, 0.1):
        then, radii = rows[("benign-principal+universal", budget)], rows[(arm, budget)]
        assert [b["radius"] for b in radii["details"]["balls"]] == [
            b["radius"] for b in then["details"]["balls"]]
        assert all("candidates" not in b for b in radii["details"]["balls"])
        assert "teacher_given" not in radii["details"] and 0 <= radii["asr"] <= 1
    (target,) = four_patches["targets"]
    assert target["variant"] != arm and f"{arm} (diagnostic, not judged) ASR" in target["reason"]


def test_a_stored_run_is_rejudged_with_its_own_variants_and_the_grid_rejudge_refuses_it(
        four_patches, tmp_path):
    """``rejudge`` re-derives the verdicts the run wrote, from its rows and its
    configuration's judged variants; the backdoor experiment's rejudge, which judges other
    variants with other reasons, refuses a row-space run and names the command to use."""
    import json

    from experiments import backdoor

    (tmp_path / "metrics.json").write_text(json.dumps(four_patches))
    stored = json.loads(json.dumps(four_patches["targets"]))
    assert row_space.rejudge(tmp_path) == stored
    assert json.loads((tmp_path / "metrics.json").read_text())["targets"] == stored
    assert (tmp_path / "tables.md").exists() and (tmp_path / "backdoor.png").exists()
    with pytest.raises(ValueError, match="experiments.row_space_backdoor --rejudge"):
        backdoor.rejudge(tmp_path)


def test_bad_patches_and_defenses_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not tile the 28x28 images"):
        row_space.run(quick=True, out=tmp_path / "never", patch=12)
    with pytest.raises(ValueError, match=r"unknown defenses \['nc'\]"):
        row_space.run(quick=True, out=tmp_path / "never", defenses=("ft", "nc"))
    with pytest.raises(ValueError, match="unknown universal variants"):
        row_space.run(quick=True, out=tmp_path / "never", defenses=("universal",),
                      universal_variants=("universal-typo",))
    assert not (tmp_path / "never").exists()
