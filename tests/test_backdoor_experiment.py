"""The backdoor experiment's target verdicts (experiments/backdoor.py ``_targets``) say why."""

from __future__ import annotations

import pytest

backdoor = pytest.importorskip("experiments.backdoor")

CLEAN = {"m": {"acc": 0.95, "asr_badnets": 0.01}}


def _edit_row(k, acc, asr, certified, error, worst=0.1):
    rec = {"readout": {"max_row_fraction": worst, "critical_fraction": 0.4}}
    return {"model": "m", "attack": "weight-edit", "k": k, "variant": "designed",
            "acc": acc, "asr": asr,
            "details": {"certified": certified, "exact_error": error, "recovery": rec}}


def _none_row(k, edited):
    return {"model": "m", "attack": "weight-edit", "k": k, "variant": None, "defense": "none",
            "acc": 0.9, "asr": 0.9, "details": {"edited_row_fraction": edited}}


def test_weight_edit_verdicts():
    rows = [_edit_row(10, 0.95, 0.01, True, 3e-7),
            _edit_row(30, 0.9498, 0.008, False, 5e-2, worst=0.5),
            _edit_row(100, 0.94, 0.004, False, 0.6, worst=0.75)]
    got = {t["k"]: t for t in backdoor._targets(rows, CLEAN)}
    assert got[10]["met"] and got[10]["reason"].startswith("recovery exact and certified")
    # behaviour restored without exact weights: met, and the reason must not say "exact"
    assert got[30]["met"] and "not exactly the clean ones" in got[30]["reason"]
    # without the edit's own share, the solver's flagged share is quoted as just that
    assert "recovery flagged 0.50 of a row as corrupted" in got[30]["reason"]
    assert "not recorded" in got[30]["reason"]
    assert not got[100]["met"] and got[100]["reason"].startswith("recovery failed")
    assert "concentrate" not in got[100]["reason"]


def test_weight_edit_verdict_quotes_the_edits_own_share_per_unit():
    rows = [_edit_row(100, 0.94, 0.004, False, 0.6, worst=0.75),
            _none_row(100, {"conv": 0.05, "readout": 0.55}),
            _edit_row(30, 0.94, 0.004, False, 0.6, worst=0.75),
            _none_row(30, {"conv": 0.0, "readout": 0.3})]
    got = {t["k"]: t for t in backdoor._targets(rows, CLEAN)}
    assert got[100]["reason"].startswith("edits concentrate in one unit vector")
    assert "changed 0.55 of one unit vector of readout vs Donoho-Tanner critical fraction 0.40"\
        in got[100]["reason"] and "flagged 0.75" in got[100]["reason"]
    # below the threshold for typical supports and still failed: not called concentrated
    assert got[30]["reason"].startswith("recovery failed") and "changed 0.30" in got[30]["reason"]


def test_edited_row_fraction_counts_edits_per_recovery_problem():
    import jax
    import numpy as np

    from jaxpurify.models import DesignedOneHiddenLayerCNN

    def fractions(joint):
        module = DesignedOneHiddenLayerCNN(4, 4, 1, 8, 3, num_classes=3, pool="mean",
                                           joint_layers=joint)
        plain = module.materialize(module.init(jax.random.PRNGKey(0),
                                               np.zeros((1, 8, 8, 1), np.float32))["params"])
        mask = jax.tree_util.tree_map(lambda v: np.zeros(v.shape, bool), plain)
        flat = mask["conv"]["kernel"].reshape(-1, 4)  # (16 weights, 4 filters), a view
        flat[:5, 2] = True  # 5 of filter 2's 16 weights ...
        mask["conv"]["bias"][2] = True  # ... and its bias: 6 of 17 entries
        mask["readout"]["kernel"][1, 0] = mask["readout"]["kernel"][3, 0] = True  # 2 of 4
        mask["readout"]["kernel"][0, 2] = True
        return backdoor.edited_row_fraction(module, mask)

    per_unit = fractions(())
    assert per_unit == pytest.approx({"conv": 6 / 17, "readout": 2 / 4})
    assert fractions(("readout",)) == pytest.approx({"conv": 6 / 17, "readout": 3 / 12})


def test_rejudge_rewrites_verdicts_from_the_stored_rows(tmp_path):
    import json

    rows = [{**_edit_row(30, 0.9498, 0.008, False, 5e-2, worst=0.5), "dataset": "mnist",
             "poison_rate": None, "defense": "jaxpurify", "budget": 0.0, "n_benign": 0,
             "seconds": 1.0}]
    rows[0]["details"]["recovery"]["readout"].update(rows_off_subspace=1, num_corrupted=30)
    stale = [{"model": "m", "attack": "weight-edit", "k": 30, "met": True, "reason": "old"}]
    (tmp_path / "metrics.json").write_text(json.dumps(
        {"dataset": "mnist", "clean": CLEAN, "rows": rows, "targets": stale}))
    targets = backdoor.rejudge(tmp_path)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["targets"] == targets and "not exactly the clean ones" in targets[0]["reason"]
    assert on_disk["rows"] == rows  # measurements untouched
    tables = (tmp_path / "tables.md").read_text()
    assert "- MET: m / weight-edit (k=30)" in tables and "not exactly" in tables
    assert (tmp_path / "backdoor.png").stat().st_size > 0


def _poison_row(defense, acc, asr, variant=None, budget=0.01):
    return {"model": "m", "attack": "badnets", "poison_rate": 0.1, "k": None,
            "defense": defense, "variant": variant, "budget": budget, "n_benign": 600,
            "acc": acc, "asr": asr, "details": {}}


def test_poisoning_verdict_judges_every_jaxpurify_variant():
    rows = [_poison_row("none", 0.95, 0.99, budget=0.0),
            _poison_row("ft", 0.95, 0.90), _poison_row("fp", 0.94, 0.92),
            _poison_row("jaxpurify", 0.95, 0.85, "designed+code-ft"),
            _poison_row("jaxpurify", 0.94, 0.02, "benign-readout"),
            _poison_row("jaxpurify", 0.50, 0.00, "benign-row-space")]  # not judged
    (t,) = backdoor._targets(rows, CLEAN)
    assert t["met"] and t["variant"] == "benign-readout" and t["asr"] == 0.02
    assert t["reason"].startswith("undefended ASR 99.0% (clean network: 1.0%); at 600 benign")
    assert t["asr_clean"] == 0.01
    assert "designed+code-ft: ASR 85.0%" in t["reason"]
    assert "benign-readout: ASR 2.0%, ACC drop 1.0 pt" in t["reason"]
    assert "benign-row-space" not in t["reason"]
    # low ASR bought with accuracy: missed, and the variant shown is the one within the ACC
    # budget with the lowest ASR
    rows[4] = _poison_row("jaxpurify", 0.90, 0.02, "benign-readout")
    (t,) = backdoor._targets(rows, CLEAN)
    assert not t["met"] and not t["asr_acc_met"] and t["variant"] == "designed+code-ft"
    # better than FT/FP is part of the target: FT better on both ACC and ASR fails it, FT
    # with equal ASR and lower ACC does not
    rows[4] = _poison_row("jaxpurify", 0.94, 0.02, "benign-readout")
    rows[1] = _poison_row("ft", 0.95, 0.01)
    (t,) = backdoor._targets(rows, CLEAN)
    assert t["asr_acc_met"] and not t["dominates_ft_fp"] and not t["met"]
    assert t["reason"].endswith("FT better on both ACC and ASR than benign-readout")
    # the designed readout's reason says whether the budget's labels determine it
    for unknowns, says in ((160, "the benign labels determine the readout"),
                           (5130, "more unknowns than labels")):
        ro = {**_poison_row("jaxpurify", 0.93, 0.9, "designed-readout"),
              "details": {"unknowns": unknowns}}
        (t,) = backdoor._targets([*rows, ro], CLEAN)
        assert f"({unknowns} unknowns, 600 benign labels): {says}" in t["reason"]
    rows[1] = _poison_row("ft", 0.93, 0.02)
    (t,) = backdoor._targets(rows, CLEAN)
    assert t["met"]
    # an attack that did not implant is said so
    rows[0] = _poison_row("none", 0.95, 0.03, budget=0.0)
    (t,) = backdoor._targets(rows, CLEAN)
    assert t["reason"].startswith("the attack did not take: undefended ASR 3.0% (clean "
                                  "network: 1.0%); ")


def test_ft_at_another_learning_rate_is_a_diagnostic_not_the_baseline(tmp_path):
    rows = [_poison_row("none", 0.95, 0.99, budget=0.0), _poison_row("ft", 0.95, 0.90),
            _poison_row("fp", 0.94, 0.92),
            _poison_row("jaxpurify", 0.94, 0.02, "benign-readout"),
            _poison_row("ft", 0.95, 0.01, "lr=0.001")]  # would beat jaxpurify if judged
    (t,) = backdoor._targets(rows, CLEAN)
    assert t["met"] and "FT ASR 90.0%" in t["reason"]
    assert "diagnostic" in backdoor._note(rows[-1])
    backdoor._plot(rows, tmp_path / "b.png", "mnist")  # an unlisted variant is drawn too
    assert (tmp_path / "b.png").stat().st_size > 0


def test_backdoorbench_ft_recipe_is_a_baseline_the_verdict_compares_against():
    rows = [_poison_row("none", 0.95, 0.99, budget=0.0), _poison_row("ft", 0.95, 0.90),
            _poison_row("fp", 0.94, 0.92),
            _poison_row("jaxpurify", 0.94, 0.02, "benign-readout")]
    (t,) = backdoor._targets(rows, CLEAN)
    assert t["met"]
    rows.append({**_poison_row("ft", 0.945, 0.01, "backdoorbench"), "details": {"steps": 200}})
    (t,) = backdoor._targets(rows, CLEAN)
    assert not t["met"] and t["asr_acc_met"] and not t["dominates_ft_fp"]
    assert "FT (backdoorbench) 1.0%" in t["reason"]
    assert t["reason"].endswith("FT (backdoorbench) better on both ACC and ASR than "
                                "benign-readout")
    assert "published FT recipe (200 steps; judged like FT)" in backdoor._note(rows[-1])
    assert backdoor.recipe("ft", "backdoorbench", "mnist")["hflip"] is False
    assert backdoor.recipe("ft", "backdoorbench", "cifar10")["hflip"] is True
    with pytest.raises(ValueError, match="unknown FT recipe 'sam'"):
        backdoor.recipe("ft", "sam", "mnist")


def test_backdoorbench_fp_recipe_is_a_baseline_the_verdict_compares_against():
    rows = [_poison_row("none", 0.95, 0.99, budget=0.0), _poison_row("ft", 0.95, 0.90),
            _poison_row("fp", 0.94, 0.92),
            _poison_row("jaxpurify", 0.94, 0.02, "benign-readout")]
    assert backdoor._targets(rows, CLEAN)[0]["met"]
    bb = {**_poison_row("fp", 0.945, 0.01, "backdoorbench"),
          "details": {"num_pruned": 3, "channels": 16, "ft_steps": 200}}
    (t,) = backdoor._targets([*rows, bb], CLEAN)
    assert not t["met"] and t["asr_acc_met"] and not t["dominates_ft_fp"]
    assert "FP (backdoorbench) 1.0%" in t["reason"]
    assert t["reason"].endswith("FP (backdoorbench) better on both ACC and ASR than "
                                "benign-readout")
    assert ("backdoorbench's published FP recipe (200 fine-tuning steps; judged like FP); "
            "pruned 3/16") in backdoor._note(bb)
    # a diagnostic FP variant is not a published recipe: not judged
    (t,) = backdoor._targets([*rows, {**bb, "variant": "lr=0.001"}], CLEAN)
    assert t["met"]
    kw = backdoor.recipe("fp", "backdoorbench", "mnist")
    assert kw["hflip"] is False and kw["relative_drop"] and kw["prune_fraction"] == 0.01
    assert backdoor.recipe("fp", "backdoorbench", "cifar10")["hflip"] is True


def test_unknown_defense_or_attack_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match=r"unknown defenses \['bogus'\]"):
        backdoor.run(out=tmp_path, quick=True, defenses=("ft", "bogus"))
    with pytest.raises(ValueError, match=r"unknown attacks \['weight-edit'\]"):
        backdoor.run(out=tmp_path, quick=True, attacks=("badnets", "weight-edit"))
    with pytest.raises(ValueError, match=r"joint: unknown layers \['fc9'\]; .* lenet5 \['conv1'"):
        backdoor.run(out=tmp_path, quick=True, joint=("readout", "fc3", "fc9"))
    with pytest.raises(ValueError, match="unknown FT recipe 'bogus'"):
        backdoor.run(out=tmp_path, quick=True, ft_recipes=("bogus",))
    with pytest.raises(ValueError, match="unknown FP recipe 'bogus'"):
        backdoor.run(out=tmp_path, quick=True, fp_recipes=("bogus",))
    with pytest.raises(ValueError, match="unknown jaxpurify_variants.*'benign-readout'"):
        backdoor.run(out=tmp_path, quick=True, jaxpurify_variants=("benign-readout", "bogus"))
    assert not any(tmp_path.iterdir())


def test_probe_is_reported_in_the_poisoning_verdict():
    rows = [_poison_row("none", 0.95, 0.99, budget=0.0),
            _poison_row("ft", 0.95, 0.90), _poison_row("fp", 0.94, 0.92),
            _poison_row("jaxpurify", 0.90, 0.02, "benign-readout")]
    rows[0]["details"]["readout_probe"] = {"n": 60000, "steps": 3000, "acc": 0.94, "asr": 0.6}
    (t,) = backdoor._targets(rows, CLEAN)
    assert t["reason"].endswith("has ASR 60.0% at ACC 94.0%: the hidden features carry the "
                                "trigger as evidence for the target class, so a readout's low "
                                "ASR from few labels comes with under-fitting")
    rows[0]["details"]["readout_probe"]["asr"] = 0.01  # a clean-label readout that is clean
    (t,) = backdoor._targets(rows, CLEAN)
    assert t["reason"].endswith("has ASR 1.0% at ACC 94.0%")
    # above 5% but no higher than the clean network's own ASR: no claim about the features
    rows[0]["details"]["readout_probe"]["asr"] = 0.06
    (t,) = backdoor._targets(rows, {"m": {"acc": 0.95, "asr_badnets": 0.07}})
    assert t["reason"].endswith("has ASR 6.0% at ACC 94.0%")


def test_tiny_run_end_to_end(tmp_path):
    """The whole experiment on 2000 real MNIST images: rows schema, the probe, the verdicts."""
    import json

    nets = tmp_path / "networks"
    metrics = backdoor.run(out=tmp_path, quick=True, train_limit=2000, test_limit=500,
                           steps=150, edit_steps=20, ks=(10,), budgets=(0.01,),
                           defenses=("jaxpurify", "ft", "fp"), probe_steps=100,
                           anp_iterations=20, networks=nets)
    assert metrics["setup"]["networks"] == {
        "dir": str(nets), "mnist-one-hidden-clean": "trained",
        "mnist-one-hidden-badnets-0.1": "trained", "mnist-one-hidden-blended-0.1": "trained"}
    assert "networks" not in metrics["setup"]["model_config"]  # no number depends on it
    rows = metrics["rows"]
    assert json.loads((tmp_path / "metrics.json").read_text())["rows"] == rows
    assert (tmp_path / "backdoor.png").stat().st_size > 0
    assert {r["attack"] for r in rows} == {"weight-edit", "badnets", "blended"}
    for r in rows:
        assert {"dataset", "model", "attack", "poison_rate", "defense", "budget", "acc", "asr",
                "seconds"} <= set(r)
        assert r["defense"] in ("none", "jaxpurify", "ft", "fp")
        assert r["acc"] is None or 0.0 <= r["acc"] <= 1.0
    none = [r for r in rows if r["defense"] == "none" and r["attack"] != "weight-edit"]
    assert len(none) == 2
    for r in none:
        probe = r["details"]["readout_probe"]
        assert probe["n"] == 2000 and probe["steps"] == 100 and 0.0 <= probe["asr"] <= 1.0
    for setting in {(r["attack"], r["k"]) for r in rows}:  # the readout in both subspaces
        ro = {r["variant"]: r["details"] for r in rows if (r["attack"], r["k"]) == setting
              and r["variant"] in ("benign-readout", "designed-readout")}
        assert ro["benign-readout"]["unknowns"] == 64 * 10  # every entry of the readout
        assert ro["designed-readout"]["unknowns"] == 16 * 10  # its codes
    poison = [t for t in metrics["targets"] if t["attack"] != "weight-edit"]
    assert len(poison) == 2 and all("a readout re-fit on all 2000" in t["reason"] for t in poison)
    assert all("designed-readout: ASR" in t["reason"] for t in poison)  # judged too
    assert all("benign-principal: ASR" in t["reason"] for t in poison)
    principal = [r for r in rows if r["variant"] == "benign-principal"]
    assert len(principal) == 2 and all(r["details"]["principal_rank"] >= 1 for r in principal)
    for t in poison:  # the clean network's ASR with the same trigger is the reference quoted
        assert t["asr_clean"] == metrics["clean"]["one-hidden"][f"asr_{t['attack']}"]
        assert f"(clean network: {100 * t['asr_clean']:.1f}%)" in t["reason"]
    # a second run adds a diagnostic FT learning rate to one attack: it loads the networks
    # the first stored, so the merge keeps one undefended row each and the new FT rows
    more = backdoor.run(out=tmp_path / "more", quick=True, train_limit=2000, test_limit=500,
                        steps=150, edit_steps=20, ks=(), budgets=(0.01,), attacks=("badnets",),
                        defenses=("anp",), ft_learning_rates=(0.001,), probe_steps=100,
                        anp_iterations=20, networks=nets)
    assert more["setup"]["networks"] == {"dir": str(nets), "mnist-one-hidden-clean": "loaded",
                                         "mnist-one-hidden-badnets-0.1": "loaded"}
    assert more["timings"]["one-hidden/train-clean"] == metrics["timings"]["one-hidden/train-clean"]
    assert [(r["defense"], r["variant"]) for r in more["rows"]] == [
        ("none", None), ("jaxpurify", "designed"), ("anp", None), ("anp", "benign-stop"),
        ("ft", "lr=0.001")]
    anp, stop = more["rows"][2:4]
    assert stop["seconds"] > anp["seconds"]  # the mask optimization is counted in both
    assert stop["details"]["num_pruned"] <= 64 and "threshold" in stop["details"]
    merged = backdoor.merge(tmp_path / "merged", [tmp_path, tmp_path / "more"])
    assert len(merged["rows"]) == len(rows) + 3
    judged = ("model", "attack", "poison_rate", "k", "variant", "acc", "asr", "met")
    assert ([{k: t.get(k) for k in judged} for t in merged["targets"]]
            == [{k: t.get(k) for k in judged} for t in metrics["targets"]])
    badnets = [t for t in merged["targets"] if t["attack"] == "badnets"][0]
    assert f"ANP {100 * anp['asr']:.1f}%" in badnets["reason"]  # now quoted beside FT and FP
    # the readout coded as a whole: recovery solves one vector of all 640 readout entries,
    # and the run is another network, which a merge with the per-column one refuses
    joint = backdoor.run(out=tmp_path / "joint", quick=True, train_limit=2000, test_limit=500,
                         steps=150, edit_steps=20, ks=(10,), rates=(), budgets=(0.01,),
                         defenses=("jaxpurify",), joint=("readout",), probe_steps=100,
                         anp_iterations=20, networks=nets,
                         jaxpurify_variants=("benign-readout",))
    assert [r["variant"] for r in joint["rows"]] == [None, "designed", "benign-readout"]
    assert joint["setup"]["networks"]["mnist-one-hidden-clean"] == "trained"  # another key
    assert len(list(nets.iterdir())) == 4
    assert joint["setup"]["model_config"]["joint"] == ["readout"]
    assert metrics["setup"]["model_config"]["joint"] == []
    designed = [r for r in joint["rows"] if r["variant"] == "designed"][0]
    readout = designed["details"]["recovery"]["readout"]
    assert readout["rows_off_subspace"] == 1 and readout["certified"]
    assert readout["max_row_fraction"] == readout["num_corrupted"] / 640
    with pytest.raises(ValueError, match=r"model_config differs .* \['joint'\]"):
        backdoor.merge(tmp_path / "mixed", [tmp_path, tmp_path / "joint"])


def test_published_recipes_run_end_to_end(tmp_path):
    """``ft_recipes`` / ``fp_recipes`` add judged rows measured by the presets (no flips on
    MNIST): BackdoorBench's FT for 100 epochs, its FP after its pruning rule."""
    metrics = backdoor.run(out=tmp_path, quick=True, train_limit=2000, test_limit=500,
                           steps=150, ks=(), budgets=(0.01,), attacks=("badnets",),
                           defenses=("jaxpurify",), ft_recipes=("backdoorbench",),
                           fp_recipes=("backdoorbench",), probe_steps=100)
    rows = {(r["defense"], r["variant"]): r for r in metrics["rows"]}
    ft, fp = rows[("ft", "backdoorbench")], rows[("fp", "backdoorbench")]
    assert ft["n_benign"] == fp["n_benign"] == 20
    assert ft["details"]["steps"] == 100  # 100 epochs of one minibatch
    assert fp["details"]["ft_steps"] == 100 and fp["details"]["num_pruned"] < 64
    (t,) = metrics["targets"]
    assert "FT (backdoorbench)" in t["reason"] and "FP (backdoorbench)" in t["reason"]
    tables = (tmp_path / "tables.md").read_text()
    assert "published FP recipe (100 fine-tuning steps; judged like FP)" in tables


def _run_folder(path, rows, clean=CLEAN, **setup):
    import json

    path.mkdir()
    base = {"models": ["m"], "budgets": [0.01], "poison_rates": [], "weight_edit_k": [],
            "defenses": ["ft", "fp"], "model_config": {"steps": 10}}
    (path / "metrics.json").write_text(json.dumps(
        {"experiment": "backdoor-mnist", "dataset": "mnist", "quick": False, "seed": 0,
         "setup": {**base, **setup}, "clean": clean, "rows": rows, "targets": [],
         "seconds": 2.0, "command": f"run {path.name}"}))
    return path


def test_merge_makes_one_table_per_attack_and_rejudges(tmp_path):
    import json

    def poisoned(rate):
        rs = [_poison_row("none", 0.95, 0.99, budget=0.0), _poison_row("ft", 0.95, 0.90),
              _poison_row("fp", 0.94, 0.92),
              _poison_row("jaxpurify", 0.94, 0.02, "benign-readout")]
        return [{**r, "dataset": "mnist", "poison_rate": rate, "seconds": 1.0} for r in rs]

    a = _run_folder(tmp_path / "a", poisoned(0.1), poison_rates=[0.1])
    b = _run_folder(tmp_path / "b", poisoned(0.05), poison_rates=[0.05])
    metrics = backdoor.merge(a, [a, b])  # the output may be one of the sources
    assert len(metrics["rows"]) == 8 and metrics["setup"]["poison_rates"] == [0.05, 0.1]
    assert [r["poison_rate"] for r in metrics["rows"]] == [0.05] * 4 + [0.1] * 4  # sorted
    assert [r["defense"] for r in metrics["rows"][:4]] == ["none", "ft", "fp", "jaxpurify"]
    assert [t["poison_rate"] for t in metrics["targets"]] == [0.05, 0.1]
    assert all(t["met"] for t in metrics["targets"])  # judged again, not copied ([] above)
    assert [r["command"] for r in metrics["runs"]] == ["run a", "run b"]
    assert metrics["seconds"] == 4.0
    assert metrics["command"] == (f"run a --out {a} && run b --out {b} && python -m "
                                  f"experiments.backdoor --merge {a} {a} {b}")
    assert json.loads((a / "metrics.json").read_text())["rows"] == metrics["rows"]
    c = _run_folder(tmp_path / "c", poisoned(0.05), poison_rates=[0.05])
    recorded = json.loads((c / "metrics.json").read_text())
    (c / "metrics.json").write_text(json.dumps({**recorded, "command": f"run c --out {c}"}))
    assert backdoor.merge(tmp_path / "ac", [a, c])["command"].startswith(  # its --out kept once
        f"run a --out {a} && run b --out {b} && python -m experiments.backdoor --merge {a} {a} "
        f"{b} && run c --out {c} && python -m experiments.backdoor --merge ")
    tables = (a / "tables.md").read_text()
    assert tables.count("## mnist / m / badnets") == 1  # both rates in one table
    assert "- MET: m / badnets (rate 0.05)" in tables
    # the same rows measured twice (a merged folder and one of its runs) are kept once;
    # refused: a row measured with other results, another clean model, another config
    again = backdoor.merge(tmp_path / "c", [a, b])
    assert again["rows"] == metrics["rows"]
    assert again["runs"] == metrics["runs"] and again["seconds"] == 4.0  # b's run counted once
    assert again["command"].startswith(f"run a --out {a} && run b --out {b} && python -m "
                                       f"experiments.backdoor --merge {a} {a} {b} && ")
    redone = _run_folder(tmp_path / "redone", [{**r, "asr": 0.5} for r in poisoned(0.05)])
    with pytest.raises(ValueError, match="measured in two runs with different results"):
        backdoor.merge(tmp_path / "c2", [b, redone])
    # --supersede: defense rows re-measured by newer code replace the old ones, on record;
    # an undefended row that differs is another network and is refused all the same
    with pytest.raises(ValueError, match="measured in two runs with different results"):
        backdoor.merge(tmp_path / "c2", [b, redone], supersede=True)
    newer = [{**r, "asr": 0.5} if r["defense"] == "ft" else r for r in poisoned(0.05)]
    newer = _run_folder(tmp_path / "newer", newer)
    fresh = backdoor.merge(tmp_path / "c3", [b, newer], supersede=True)
    assert [(r["defense"], r["asr"]) for r in fresh["rows"]] == [
        ("none", 0.99), ("ft", 0.5), ("fp", 0.92), ("jaxpurify", 0.02)]
    assert fresh["superseded"] == [{
        "row": {"model": "m", "attack": "badnets", "poison_rate": 0.05, "k": None,
                "defense": "ft", "variant": None, "budget": 0.01},
        "was": [0.95, 0.9], "now": [0.95, 0.5], "source": str(newer)}]
    assert fresh["command"].endswith(f"--merge {tmp_path / 'c3'} {b} {newer} --supersede")
    assert backdoor.merge(tmp_path / "c4", [tmp_path / "c3", b, newer],  # kept on re-merge
                          supersede=True)["superseded"] == fresh["superseded"]
    assert backdoor.merge(tmp_path / "c5", [tmp_path / "c3", b])["rows"] == fresh["rows"]
    assert "superseded" not in metrics
    d = _run_folder(tmp_path / "d", poisoned(0.01), clean={"m": {"acc": 0.9}})
    with pytest.raises(ValueError, match="the clean m"):
        backdoor.merge(tmp_path / "e", [b, d])
    f = _run_folder(tmp_path / "f", poisoned(0.01), model_config={"steps": 20})
    with pytest.raises(ValueError, match=r"model_config differs .* \['steps'\]"):
        backdoor.merge(tmp_path / "g", [b, f])
    # a switch that only decides which rows a run adds does not make another network: the
    # merge takes both runs and records every value they ran with
    bc = {"steps": 10, "row_space": True, "probe_steps": 3000}
    b2 = _run_folder(tmp_path / "b2", poisoned(0.01), model_config=bc)
    f2 = _run_folder(tmp_path / "f2", poisoned(0.01), model_config={**bc, "row_space": False})
    mixed = backdoor.merge(tmp_path / "g2", [b2, f2])["setup"]["model_config"]
    assert mixed == {"steps": 10, "row_space": [True, False], "probe_steps": 3000}
    again = backdoor.merge(tmp_path / "g3", [tmp_path / "g2", b2])  # a merged source's list
    assert again["setup"]["model_config"] == mixed
    # a run that adds a defense retrains the attacked network: its undefended row is the same
    # measurement, kept once with the details of both
    probe = {"n": 60000, "acc": 0.9, "asr": 0.5}
    none = {**poisoned(0.05)[0], "details": {"readout_probe": probe}}
    anp = {**poisoned(0.05)[1], "defense": "anp", "acc": 0.9, "asr": 0.03}
    j = _run_folder(tmp_path / "j", [none, anp], poison_rates=[0.05], defenses=["anp"])
    merged = backdoor.merge(tmp_path / "k", [b, j])
    assert [r["defense"] for r in merged["rows"]] == ["none", "ft", "fp", "jaxpurify", "anp"]
    assert merged["rows"][0]["details"] == {"readout_probe": probe}
    assert merged["setup"]["defenses"] == ["anp", "fp", "ft"]
    # a key that only the later run has (added to the experiment since) is not a conflict
    h = _run_folder(tmp_path / "h", poisoned(0.01), model_config={"steps": 10, "probe": 5})
    assert backdoor.merge(tmp_path / "i", [b, h])["setup"]["model_config"] == {
        "steps": 10, "probe": 5}


def test_layer_principal_row_records_and_says_what_was_kept():
    """A ``benign-layer-principal`` row stores the share kept, the directions per layer and
    how the share was chosen; its note and the verdict say so."""
    from jaxpurify.defenses import DefenseInfo

    info = DefenseInfo("jaxpurify", 1.0, {
        "variant": "benign-layer-principal", "energy": 0.97, "energies": [0.9, 0.97, 1.0],
        "ranks": {"conv1": 14, "fc1": 47}, "full_ranks": {"conv1": 26, "fc1": 400},
        "dims": {"conv1": 26, "fc1": 401}, "folds": 5, "benign_acc": [0.8, 0.972, 0.98],
        "benign_acc_undefended": 0.98, "qualified": True, "removed_energy": 0.61,
        "refined": False})
    d = {**backdoor.layer_principal_details(info),
         "trigger_outside_kept_layers": {"conv1": 0.042, "fc1": 0.99}}
    assert d["principal_held_out_acc"] == 0.972 and d["layer_principal_energy"] == 0.97
    assert d["principal_candidates"] == {"0.9": 0.8, "0.97": 0.972, "1.0": 0.98}
    assert d["principal_undefended_acc"] == 0.98
    row = {**_poison_row("jaxpurify", 0.959, 0.0101, "benign-layer-principal"), "details": d}
    note = backdoor._note(row)
    assert ("each layer's top directions holding 0.97 of its benign patch energy kept "
            "(conv1 14/26, fc1 47/401): the smallest share within 1 pt of the undefended "
            "benign ACC (5-fold held out)") in note
    assert "61% of the filter updates' norm removed (outside each layer's leading" in note
    assert "of the trigger's patch change outside them: conv1 4%, fc1 99%" in note
    assert "FT recipe" not in note
    refined = {**row, "variant": "benign-layer-principal+ft",
               "details": {**d, "refined": True}}
    assert ("(5-fold held out); then the FT recipe on the budget (also in each fold)"
            in backdoor._note(refined))
    rows = [_poison_row("none", 0.968, 0.995, budget=0.0), _poison_row("ft", 0.96, 0.9),
            _poison_row("fp", 0.95, 0.8), row]
    (t,) = backdoor._targets(rows, {"m": {"acc": 0.97, "asr_badnets": 0.003}})
    assert t["met"] and t["variant"] == "benign-layer-principal"
    assert "benign-layer-principal: ASR 1.0%, ACC drop 0.9 pt (every layer's update" in \
        t["reason"]


def test_layer_trigger_outside_is_the_share_off_the_kept_benign_directions():
    """For a dense layer the patches are the flattened features: recomputed from
    ``layer_inputs`` with numpy (Gram of the benign features, eigh, the trigger's mean feature
    change), the share agrees; keeping every direction leaves none of it outside, keeping
    none all of it."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpurify import attacks as A
    from jaxpurify import multilayer as M

    m = M.DesignedCNN(layers=(M.Conv(4, 3, "SAME", pool=2), M.Dense(6), M.Dense(3)),
                      input_shape=(8, 8, 1), param_dtype=jnp.float64)
    rng = np.random.default_rng(0)
    x_benign, x_probe = rng.standard_normal((2, 20, 8, 8, 1))
    w = m.materialize(m.init(jax.random.PRNGKey(0), jnp.asarray(x_benign[:1]))["params"])
    trigger = functools.partial(A.apply_trigger, kind="badnets", value=3.0)
    dims = {i.name: i.rows for i in m.layer_info()}
    assert max(backdoor.layer_trigger_outside(m, w, x_benign, x_probe, trigger, dims).values()) \
        < 1e-12
    assert backdoor.layer_trigger_outside(m, w, x_benign, x_probe, trigger,
                                          {"fc1": 0}) == {"fc1": 1.0}
    share = backdoor.layer_trigger_outside(m, w, x_benign, x_probe, trigger, {"fc1": 5},
                                           batch_size=7)["fc1"]

    def features(x):
        h = np.asarray(m.layer_inputs(w, jnp.asarray(x))["fc1"])
        return np.hstack([h, np.ones((len(h), 1))])

    q = features(x_benign)
    v = np.linalg.eigh(q.T @ q)[1][:, ::-1][:, :5]
    d = (features(trigger(jnp.asarray(x_probe))) - features(x_probe)).mean(axis=0)
    assert 0 < share < 1
    np.testing.assert_allclose(share, np.linalg.norm(d - v @ (v.T @ d)) / np.linalg.norm(d),
                               rtol=1e-10)


def test_poisoning_verdict_judges_nc_consistency_beside_jaxpurify():
    """NC's consistency unlearning is judged like a jaxpurify variant and named with its
    defense; NC's own fine-tune unlearning is quoted, not judged."""
    rows = [_poison_row("none", 0.95, 0.99, budget=0.0),
            _poison_row("ft", 0.90, 0.90), _poison_row("fp", 0.89, 0.30),
            _poison_row("jaxpurify", 0.94, 0.85, "designed+code-ft"),
            _poison_row("nc", 0.95, 0.01, "fine-tune"),
            _poison_row("nc", 0.94, 0.04, "consistency"),
            _poison_row("nc", 0.90, 0.02, "consistency-top")]
    (t,) = backdoor._targets(rows, CLEAN)
    assert t["met"] and (t["defense"], t["variant"]) == ("nc", "consistency")
    assert "nc/consistency: ASR 4.0%, ACC drop 1.0 pt (Neural Cleanse's" in t["reason"]
    assert "nc/consistency-top: ASR 2.0%, ACC drop 5.0 pt" in t["reason"]
    assert "NC (fine-tune) 1.0%" in t["reason"] and "nc/fine-tune" not in t["reason"]
    # the paper's unlearning alone, however good, is a baseline and meets nothing
    (t,) = backdoor._targets([r for r in rows if r["variant"] not in
                              ("consistency", "consistency-top")], CLEAN)
    assert not t["met"] and t["variant"] == "designed+code-ft"


class _Inversion:
    """A stand-in for :func:`jaxpurify.trigger_inversion.reverse_triggers` (anomaly given)."""

    def __init__(self, anomaly):
        import numpy as np

        from jaxpurify.trigger_inversion import ReversedTriggers

        self.triggers = ReversedTriggers(None, None, None, None, np.asarray(anomaly))

    def __call__(self, module, params, x, *, key):
        return self.triggers, None


_CONS = {"unlearning": "consistency"}
_ROUNDS = {"unlearning": "consistency", "rounds": backdoor.NC_ROUNDS}
_RESTART = {**_ROUNDS, "restart": True}
_TOP = {"threshold": None}
_EVERY_CALL = [{}, _CONS, {**_CONS, **_TOP}, _ROUNDS, {**_ROUNDS, **_TOP}, _RESTART,
               {**_RESTART, **_TOP}, _RESTART, {**_RESTART, **_TOP}]  # the last two: "each"


@pytest.mark.parametrize("anomaly, calls, same_top", [
    # the top class is the flagged one
    ([4.0, 0.5, 0.1], [{}, _CONS, _ROUNDS, _RESTART, _RESTART], True),
    ([1.5, 0.5, 0.1], _EVERY_CALL, False),  # nothing flagged
    ([4.0, 3.0, 0.1], _EVERY_CALL, False),  # two flagged
])
@pytest.mark.parametrize("name, dataset, augment", [
    ("small-vgg", "cifar10", {"hflip": True, "crop": 4}),
    ("lenet5", "mnist", {"hflip": False, "crop": 2}),
])
def test_neural_cleanse_rows_share_one_inversion(monkeypatch, anomaly, calls, same_top, name,
                                                 dataset, augment):
    """One inversion per budget; the -top variants are computed only when their class set
    differs from the flagged one; the consistency augmentation follows the model's
    training; the -rounds variants ask for NC_ROUNDS rounds, the -restart ones restarted,
    the -each ones (the last calls) with every stamp at full weight."""
    seen = _fake_cleanse(monkeypatch, anomaly)
    rows = _nc_rows(name, dataset, backdoor.NC_VARIANTS)
    assert [kw for kw, _ in seen] == calls
    each = 1 if same_top else 2
    assert [c for _, c in seen] == [None] + [augment] * (len(calls) - 1 - each) + \
        [{**augment, "stamp_weighting": "each"}] * each
    assert [(d, v) for d, v, _, _ in rows] == [("nc", v) for v in backdoor.NC_VARIANTS]
    q = {v: q for _, v, q, _ in rows}
    assert (q["consistency-top"] == q["consistency"]) == same_top
    assert (q["consistency-top-rounds"] == q["consistency-rounds"]) == same_top
    assert (q["consistency-top-rounds-restart"] == q["consistency-rounds-restart"]) == same_top
    assert (q["consistency-top-rounds-restart-each"]
            == q["consistency-rounds-restart-each"]) == same_top
    assert q["consistency-rounds"] != q["consistency"] != q["consistency-rounds-restart"] \
        != q["consistency-rounds-restart-each"]
    assert all(s >= 1.0 for *_, s in rows)  # the inversion's seconds added


def test_nc_variants_pick_the_rows_and_a_top_row_alone_is_computed_once(monkeypatch,
                                                                        tmp_path):
    seen = _fake_cleanse(monkeypatch, [4.0, 0.5, 0.1])
    rows = _nc_rows("small-vgg", "cifar10", ("consistency-top-rounds",))
    assert [kw for kw, _ in seen] == [_ROUNDS]
    assert [v for _, v, _, _ in rows] == ["consistency-top-rounds"]
    with pytest.raises(ValueError, match=r"unknown nc_variants \['bogus'\]"):
        backdoor.run(out=tmp_path, quick=True, nc_variants=("bogus",))


@pytest.mark.parametrize("later, restarted", [([], False), ([2], True)])
def test_a_restart_row_reuses_the_continuing_row_when_no_later_round_unlearned(monkeypatch,
                                                                              later,
                                                                              restarted):
    """Restarting (and the later stamps' weighting) change only a later round's unlearning:
    where the continuing rounds stopped before one, the restarted rows are that row (marked
    ``restart``, and ``stamp_weighting`` for -each), not computed again; where a later round
    unlearned, each is computed."""
    from types import SimpleNamespace

    rounds = [{"flagged": [0]}, {"flagged": later}]
    seen = _fake_cleanse(monkeypatch, [4.0, 0.5, 0.1], {"rounds": rounds})
    rows = []
    model = SimpleNamespace(module=None, name="lenet5", dataset="mnist",
                            cfg={"nc_variants": ("consistency-rounds",
                                                 "consistency-rounds-restart",
                                                 "consistency-rounds-restart-each")})
    backdoor._neural_cleanse(model, None, None, None, None,
                             lambda d, v, q, info, seconds: rows.append((v, q, info)))
    assert [kw for kw, _ in seen] == ([_ROUNDS, _RESTART, _RESTART] if restarted
                                      else [_ROUNDS])
    (_, q1, info1), (_, q2, info2), (_, q3, info3) = rows
    assert (q2 == q1) != restarted and (q3 == q1) != restarted and (q3 == q2) != restarted
    assert "restart" not in info1.details and info2.details["rounds"] == rounds
    assert info2.details.get("restart", False) != restarted  # the fake sets none itself
    assert info3.details.get("stamp_weighting") == (None if restarted else "each")
    assert "stamp_weighting" not in info2.details


def _fake_cleanse(monkeypatch, anomaly, details=None):
    """Stand in for the inversion (``anomaly`` given) and for ``neural_cleanse`` (records
    its keyword arguments, returns ``"params<call number>"`` and ``details``)."""
    from jaxpurify import trigger_inversion as TI
    from jaxpurify.defenses import DefenseInfo

    seen = []

    def fake_cleanse(module, params, x, y, *, triggers, key, consistency=None, **kw):
        seen.append((kw, consistency))
        return f"params{len(seen)}", DefenseInfo("nc", 1.0, dict(details or {}))

    monkeypatch.setattr(TI, "reverse_triggers", _Inversion(anomaly))
    monkeypatch.setattr(TI, "neural_cleanse", fake_cleanse)
    return seen


def _nc_rows(name, dataset, variants):
    from types import SimpleNamespace

    rows = []
    model = SimpleNamespace(module=None, name=name, dataset=dataset,
                            cfg={"nc_variants": variants})
    backdoor._neural_cleanse(model, None, None, None, None,
                             lambda d, v, q, info, seconds: rows.append((d, v, q, seconds)))
    return rows


def test_neural_cleanse_runs_end_to_end(tmp_path):
    """``defenses=("nc",)`` on 2000 real MNIST images: every NC variant's row per budget,
    their notes (the rounds' too), and the verdict naming the consistency variants."""
    metrics = backdoor.run(out=tmp_path, quick=True, train_limit=2000, test_limit=500,
                           steps=150, ks=(), budgets=(0.01,), attacks=("badnets",),
                           defenses=("nc",), probe_steps=0)
    nc = {r["variant"]: r for r in metrics["rows"] if r["defense"] == "nc"}
    assert set(nc) == set(backdoor.NC_VARIANTS)
    for r in nc.values():
        assert r["n_benign"] == 20 and 0.0 <= r["acc"] <= 1.0 and r["seconds"] > 0
        assert len(r["details"]["anomaly"]) == 10 and len(r["details"]["mask_l1"]) == 10
    top = nc["consistency-top"]["details"]
    assert len(top["flagged"]) == 1 and "stamped_gap" in top
    rounds = nc["consistency-top-rounds"]["details"]["rounds"]
    assert 1 <= len(rounds) <= backdoor.NC_ROUNDS and rounds[0]["flagged"] == top["flagged"]
    assert "rounds" not in top
    # restarting changes only the later unlearnings: round 1 and round 2's inversion agree
    restarted = nc["consistency-top-rounds-restart"]["details"]
    assert restarted["restart"] and not nc["consistency-top-rounds"]["details"]["restart"]
    assert restarted["rounds"][0] == rounds[0]
    if len(rounds) > 1:
        assert [restarted["rounds"][1][k] for k in ("flagged", "anomaly")] == \
            [rounds[1][k] for k in ("flagged", "anomaly")]
    # the stamps' weighting changes only the later unlearnings too (round 1 has one stamp)
    each = nc["consistency-top-rounds-restart-each"]["details"]
    assert each["restart"] and each["stamp_weighting"] == "each"
    assert each["rounds"][0]["flagged"] == rounds[0]["flagged"]
    assert each["rounds"][0]["stamped_gap"] == rounds[0]["stamped_gap"]
    later = len(rounds) > 1 and bool(rounds[1]["flagged"])
    if not later:  # round 2 flagged nothing: all three are round 1's network
        for v in ("consistency-top-rounds-restart", "consistency-top-rounds-restart-each"):
            assert [nc[v][k] for k in ("acc", "asr")] == \
                [nc["consistency-top-rounds"][k] for k in ("acc", "asr")]
    (t,) = metrics["targets"]
    assert "nc/consistency-top: ASR" in t["reason"] and "NC (fine-tune)" in t["reason"]
    assert not t["variant"].endswith("-each")  # not judged, but quoted in the reason
    assert "nc/consistency-top-rounds-restart-each (diagnostic, not judged) ASR" in t["reason"]
    tables = (tmp_path / "tables.md").read_text()
    assert "seconds include the trigger inversion" in tables
    assert "; diagnostic (not judged)" in tables
    assert ("round 2: " in tables) == (len(rounds) > 1)
    assert ("stamps, from the deployed network" in tables) == later
    assert ("from the deployed network, each stamp at full weight" in tables) == later


def test_universal_unlearning_runs_end_to_end_and_is_judged(tmp_path):
    """``defenses=("universal",)`` on 2000 real MNIST images: one judged row per budget and
    ball (L2, sparse) with the radius rule's trail, the rounds and a note saying what was
    unlearned."""
    metrics = backdoor.run(out=tmp_path, quick=True, train_limit=2000, test_limit=500,
                           steps=150, ks=(), budgets=(0.01,), attacks=("badnets",),
                           defenses=("universal",), probe_steps=0)
    rows = {r["variant"]: r for r in metrics["rows"] if r["defense"] == "universal"}
    assert sorted(rows) == sorted(backdoor.UNIVERSAL_VARIANTS)
    tables = (tmp_path / "tables.md").read_text()
    for variant, row in rows.items():
        d = row["details"]
        assert row["n_benign"] == 20 and row["seconds"] > 0 and len(d["fooled"]) == d["rounds"]
        assert d["rounds"] == 5 or d.get("stopped")  # the climb may stop early
        assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["asr"] <= 1.0
        norms = backdoor.UNIVERSAL_VARIANTS[variant]["norm"]
        assert d["norm"] == (norms if isinstance(norms, str) else "+".join(norms))
        assert d.get("ball_weighting") == backdoor.UNIVERSAL_VARIANTS[variant].get(
            "ball_weighting", None if isinstance(norms, str) else "mean")
        for ball in d.get("balls", [d]):  # universal-both: one record per ball
            assert ball["radius"] == ball["candidates"][-1][0]
            assert len(ball["candidates"][-1][1]) == 10
            assert len(ball["anomaly"]) == 10 and ball["targets"]
            shown = ("L2" if ball["norm"] == "l2"
                     else f"sparse (L1 within |delta| <= {ball['bound']:.3g})")
            assert f"{shown} radius {ball['radius']:.3g}" in tables
    for both in ("universal-both", "universal-both-each", "universal-both-climb",
                 "universal-both-climb-first"):
        assert [b["norm"] for b in rows[both]["details"]["balls"]] == ["l2", "l1"]
    assert "each ball at its own run's weight" in tables
    climb = rows["universal-both-climb"]["details"]
    assert climb["radius_schedule"] == "climb" and len(climb["schedule"]) == climb["rounds"] + (
        1 if climb["stopped"] else 0)
    assert climb["schedule"][0] == [[b["radius"], b["targets"]] for b in climb["balls"]]
    assert "rule asked again each round" in tables
    first = rows["universal-both-climb-first"]["details"]
    assert not first["retarget"] and all(
        step is None or step[1] == ball["targets"]
        for steps in first["schedule"] for step, ball in zip(steps, first["balls"], strict=True))
    assert "(the first round's targets only)" in tables
    for name in backdoor.RECHECKED:
        d = rows[f"{name}-recheck"]["details"]  # its rounds stop when its shortcut is gone
        assert d["radius_schedule"] == "recheck" and not d["retarget"]
        radii = [b["radius"] for b in d.get("balls", [d])]  # every round at the first radius
        assert all(step is None or step[0] == radius
                   for steps in d["schedule"]
                   for step, radius in zip(steps if "balls" in d else [steps], radii,
                                           strict=True))
    assert "rule asked again each round at its last radius" in tables
    for name in backdoor.UNLEARNED:  # each round distilled until its shortcut is unlearned
        d, rechecked = (rows[f"{name}-unlearned"]["details"], rows[name]["details"])
        assert d["until_fooled"] == backdoor.UNTIL_FOOLED and len(d["passes"]) == d["rounds"]
        assert all(after <= backdoor.UNTIL_FOOLED or passes == 10
                   for (_, after), passes in zip(d["fooled"], d["passes"], strict=True))
        assert d["fooled"][0][0] == rechecked["fooled"][0][0]  # round 1 unlearns the same
    assert "(distilled until at most 5%: " in tables
    assert "a fresh one at the end" in tables
    (t,) = metrics["targets"]
    assert t["defense"] == "universal" and "universal/universal-" in t["reason"]


def test_stored_network_is_the_trained_one_and_a_foreign_key_is_refused(tmp_path):
    """``networks``: the second call loads bit for bit what the first trained and saved; a
    checkpoint whose recorded key is not the one asked for (edited, or a hash collision) is
    refused with what to do, never used."""
    import json

    import jax
    import numpy as np

    from jaxpurify import checkpoint

    cfg = {**backdoor._config("mnist", True), "steps": 5}
    model = backdoor._Model("one-hidden", "mnist", cfg, (28, 28, 1))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((128, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 128)
    first, second = {}, {}
    p, s = model.trained(x, y, 0, store=tmp_path, poisoning=("badnets", 0.1), record=first)
    q, t = model.trained(x, y, 0, store=tmp_path, poisoning=("badnets", 0.1), record=second)
    assert first == {"mnist-one-hidden-badnets-0.1": "trained"} and s == t
    assert second == {"mnist-one-hidden-badnets-0.1": "loaded"}
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(q), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    (path,) = tmp_path.iterdir()
    sidecar = path / checkpoint.SIDECAR
    info = json.loads(sidecar.read_text())
    info["metadata"]["key"]["seed"] = 1
    sidecar.write_text(json.dumps(info))
    with pytest.raises(checkpoint.CheckpointError, match="trained under .*remove it"):
        model.trained(x, y, 0, store=tmp_path, poisoning=("badnets", 0.1), record={})


def test_tables_list_each_setting_by_budget_where_merged_runs_appended_theirs():
    def row(rate, defense, budget):
        return {"model": "m", "attack": "badnets", "poison_rate": rate, "k": None,
                "defense": defense, "variant": None, "budget": budget, "n_benign": 0,
                "acc": 0.5, "asr": 0.5, "seconds": 1.0, "details": {}}

    rows = [row(0.1, "none", 0.0), row(0.1, "ft", 0.05), row(0.01, "none", 0.0),
            row(0.1, "ft", 0.001), row(0.01, "ft", 0.05), row(0.1, "fp", 0.01)]
    body = [line.split(" | ")[:4] for line in backdoor._tables(rows, "mnist").splitlines()
            if line.startswith("| 1")]
    assert body == [["| 10%", "none", "", "0"], ["| 10%", "ft", "", "0.001"],
                    ["| 10%", "fp", "", "0.01"], ["| 10%", "ft", "", "0.05"],
                    ["| 1%", "none", "", "0"], ["| 1%", "ft", "", "0.05"]]


def test_a_projection_then_unlearned_row_starts_from_the_projection_and_distills_toward_it(
        monkeypatch):
    """``unlearned_after`` is :data:`THEN_UNLEARNED`'s universal unlearning of the projected
    network (the teacher the network it starts from), not of the deployed one; its seconds
    add the projection's, and its note puts the unlearning after what the projection kept."""
    import jax
    import numpy as np

    from jaxpurify import adversarial_unlearning as AU
    from jaxpurify import defenses as D
    from tests.backdoor_helpers import poisoned_one_hidden

    m, w, xb, yb, *_ = poisoned_one_hidden()
    init = m.init(jax.random.PRNGKey(0), xb[:1])["params"]
    projected, projection = D.principal_projection(m, w, xb, yb, init_params=init)
    settings = {**backdoor.UNIVERSAL_VARIANTS[backdoor.THEN_UNLEARNED], "rounds": 2,
                "steps": 20, "ascent_steps": 10, "max_passes": 2}
    # a short schedule: the wiring, not the unlearning, is under test
    monkeypatch.setitem(backdoor.UNIVERSAL_VARIANTS, backdoor.THEN_UNLEARNED, settings)
    q, info = backdoor.unlearned_after(m, projected, projection, xb, key=jax.random.PRNGKey(3),
                                       augmentation={"hflip": False, "crop": 1})
    kw = {**settings, "hflip": False, "crop": 1, "key": jax.random.PRNGKey(3)}
    direct, alone = AU.universal_unlearning(m, projected, xb, **kw)
    deployed, _ = AU.universal_unlearning(m, w, xb, **kw)
    leaves = jax.tree_util.tree_leaves
    assert all(np.array_equal(a, b) for a, b in zip(leaves(q), leaves(direct), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(q), leaves(deployed),
                                                        strict=True))
    assert info.name == f"{projection.name}+universal"
    assert info.seconds > projection.seconds
    assert info.details == alone.details
    row = {**_poison_row("jaxpurify", 0.9, 0.03, "benign-principal+universal"),
           "details": {**backdoor._details(info), **backdoor.principal_details(projection)}}
    note = backdoor._note(row)
    assert note.index("principal directions kept") < note.index("then universal unlearning: L2")
    assert "(distilled until at most 5%: " in note
    alone_row = {**_poison_row("universal", 0.9, 0.03, backdoor.THEN_UNLEARNED),
                 "details": backdoor._details(alone)}
    assert backdoor._note(alone_row).startswith("L2 radius")


@pytest.mark.parametrize("variants, projections", [
    (("benign-layer-principal+universal",), [False]),
    (("benign-layer-principal", "benign-layer-principal+universal"), [False]),
    (("benign-layer-principal+ft", "benign-layer-principal+universal"), [True, False]),
])
def test_a_deep_models_unlearned_row_starts_from_the_plain_layer_projection(
        monkeypatch, variants, projections):
    """On a deep model ``benign-layer-principal+universal`` unlearns the projection without
    the FT refinement, reusing the ``benign-layer-principal`` row's when that ran (one
    projection per budget), and its row records what that projection kept."""
    from types import SimpleNamespace

    from jaxpurify import adversarial_unlearning as AU
    from jaxpurify import defenses as D

    calls, starts = [], []

    def project(module, params, x, y, *, init_params, refine=None):
        calls.append(refine is not None)
        return f"projected{'+ft' if refine else ''}", D.DefenseInfo("layer-principal", 1.0, {
            "energy": 0.9, "energies": [0.9, 1.0], "ranks": {"fc1": 3}, "dims": {"fc1": 7},
            "folds": 5, "benign_acc": [0.8, 0.9], "benign_acc_undefended": 0.9,
            "qualified": True, "removed_energy": 0.5, "refined": refine is not None})

    def unlearn(module, params, x, **kw):
        starts.append(params)
        return "unlearned", D.DefenseInfo("universal-unlearning", 2.0, {
            "fooled": [[0.9, 0.01]], "fooled_final": 0.2, "passes": [2], "until_fooled": 0.05,
            "norm": "l2", "radius": 1.0})

    monkeypatch.setattr(D, "jaxpurify_defense",  # the data-free row, always measured
                        lambda module, params: (params, D.DefenseInfo("jaxpurify", 0.0, {})))
    monkeypatch.setattr(D, "layer_principal_projection", project)
    monkeypatch.setattr(AU, "universal_unlearning", unlearn)
    cfg = {"defenses": ("jaxpurify",), "jaxpurify_variants": variants, "anp_iterations": 1,
           "ft_learning_rates": (), "ft_recipes": (), "fp_recipes": ()}
    model = SimpleNamespace(name="lenet5", dataset="mnist", cfg=cfg, module=None)
    rows = backdoor._defend(model, "deployed", lambda _b: ("x", "y"), (0.01,),
                            lambda q: (0.9, 0.01), key=None, init_params=None, row_space=True)
    assert calls == projections and starts == ["projected"]
    (then,) = [r for r in rows if r["variant"] == "benign-layer-principal+universal"]
    assert then["seconds"] == 3.0 and then["details"]["passes"] == [2]
    assert then["details"]["layer_principal_ranks"] == {"fc1": 3}
    assert not then["details"]["refined"]


def _one_hidden_principal_rows(monkeypatch, variants):
    """``_defend``'s one-hidden rows for ``variants`` with the projection and the unlearning
    replaced by stand-ins; returns the rows, the params each projection was asked of, and the
    ``(start, teacher)`` of each unlearning (and its radius, where one was given)."""
    from types import SimpleNamespace

    from jaxpurify import adversarial_unlearning as AU
    from jaxpurify import defenses as D

    projected_from, unlearned = [], []

    def project(module, params, x, y, *, init_params):
        projected_from.append(params)
        return "projected", D.DefenseInfo("principal", 1.0, {
            "rank": 64, "ranks": [32, 64], "folds": 5, "benign_acc": [0.8, 0.9],
            "benign_acc_undefended": 0.9, "qualified": True, "removed_energy": 0.5})

    def unlearn(module, params, x, *, teacher=None, radius=None, **kw):
        unlearned.append((params, teacher) + (() if radius is None else (radius,)))
        return f"unlearned {len(unlearned)}", D.DefenseInfo("universal-unlearning", 2.0, {
            "fooled": [[0.9, 0.01]], "fooled_final": 0.2, "passes": [2], "until_fooled": 0.05,
            "norm": "l2", "radius": 1.0})

    monkeypatch.setattr(D, "jaxpurify_defense",
                        lambda module, params: (params, D.DefenseInfo("jaxpurify", 0.0, {})))
    monkeypatch.setattr(D, "principal_projection", project)
    monkeypatch.setattr(AU, "universal_unlearning", unlearn)
    cfg = {"defenses": ("jaxpurify",), "anp_iterations": 1, "ft_learning_rates": (),
           "ft_recipes": (), "fp_recipes": (), "jaxpurify_variants": variants}
    model = SimpleNamespace(name="one-hidden", dataset="mnist", cfg=cfg, module=None)
    rows = backdoor._defend(model, "deployed", lambda _b: ("x", "y"), (0.01,),
                            lambda q: (0.9, 0.01), key=None, init_params=None, row_space=True)
    return rows, projected_from, unlearned


def test_a_one_hidden_unlearned_row_unlearns_the_principal_rows_projection(monkeypatch):
    """On the one-hidden CNN both principal rows share one projection per budget: the
    ``+universal`` row starts its unlearning from it and records what it kept."""
    rows, calls, unlearned = _one_hidden_principal_rows(
        monkeypatch, ("benign-principal", "benign-principal+universal"))
    starts = [start for start, _ in unlearned]
    assert calls == ["deployed"] and starts == ["projected"]
    alone, then = (next(r for r in rows if r["variant"] == v)
                   for v in ("benign-principal", "benign-principal+universal"))
    assert alone["seconds"] == 1.0 and then["seconds"] == 3.0
    assert alone["details"]["principal_rank"] == then["details"]["principal_rank"] == 64
    assert then["details"]["passes"] == [2] and "passes" not in alone["details"]


def test_the_teacher_ablation_swaps_one_role_each_and_is_never_judged(monkeypatch):
    """The ablation's rows unlearn the same projection as ``benign-principal+universal``:
    one starts from it and distills toward the deployed network, the other starts from the
    deployed network and distills toward it; a run measures them only when named, and the
    verdict quotes them as diagnostics and never picks them, however low their ASR."""
    rows, calls, unlearned = _one_hidden_principal_rows(monkeypatch,
                                                        tuple(backdoor.UNLEARNING_ROLES))
    assert calls == ["deployed"]  # one projection for the three unlearned rows
    assert unlearned == [("projected", None), ("projected", "deployed"),
                         ("deployed", "projected")]
    assert [r["variant"] for r in rows if r["budget"]] == list(backdoor.UNLEARNING_ROLES)
    assert all(r["seconds"] == 3.0 for r in rows if r["budget"])  # the projection's too
    ablation = next(r for r in rows if r["variant"] == backdoor.JAXPURIFY_DIAGNOSTICS[1])
    assert ablation["details"]["principal_rank"] == 64
    assert "starts from the deployed network and distills toward the projected one" in \
        backdoor._note(ablation)
    assert not set(backdoor.JAXPURIFY_DIAGNOSTICS) & set(backdoor.JAXPURIFY_VARIANTS)
    with pytest.raises(ValueError, match="roles"):
        backdoor.unlearned_after(None, "projected", None, "x", key=None, augmentation={},
                                 roles=("deployed", "projected"))  # no deployed network given
    # judged: the combination at 6% ASR misses; the diagnostics' 1% do not count
    verdict_rows = [_poison_row("none", 0.95, 0.99, budget=0.0),
                    _poison_row("ft", 0.90, 0.50), _poison_row("fp", 0.90, 0.60),
                    _poison_row("jaxpurify", 0.94, 0.06, "benign-principal+universal"),
                    *(_poison_row("jaxpurify", 0.945, 0.01, v)
                      for v in backdoor.JAXPURIFY_DIAGNOSTICS)]
    (t,) = backdoor._targets(verdict_rows, CLEAN)
    assert not t["met"] and t["variant"] == "benign-principal+universal"
    for v in backdoor.JAXPURIFY_DIAGNOSTICS:
        assert f"{v} (diagnostic, not judged) ASR 1.0%" in t["reason"]


@pytest.mark.parametrize("with_source", [True, False])
def test_the_radius_diagnostic_unlearns_the_deployed_network_at_the_projection_s_radii(
        monkeypatch, with_source):
    """``benign-principal+universal-deployed-at-projected-radii`` is the deployed network's
    own unlearning (start and teacher) at the radius ``benign-principal+universal`` chose on
    the projection: read from that row when the run measures it, else made for it (and not
    a row); never judged."""
    variants = (("benign-principal+universal",) if with_source else ()) + (
        backdoor.AT_PROJECTED_RADII,)
    rows, calls, unlearned = _one_hidden_principal_rows(monkeypatch, variants)
    assert calls == ["deployed"]  # one projection
    assert unlearned == [("projected", None), ("deployed", None, 1.0)]
    assert [r["variant"] for r in rows if r["budget"]] == list(variants)
    row = rows[-1]
    assert row["details"]["principal_rank"] == 64 and row["seconds"] == 3.0
    assert "the deployed network's own unlearning at the radii the rule chose on the " \
        "projection; diagnostic (not judged)" in backdoor._note(row)
    assert backdoor.AT_PROJECTED_RADII in backdoor.JAXPURIFY_DIAGNOSTICS
    with pytest.raises(ValueError, match="principal rows"):
        backdoor.principal_row(None, "benign-readout", "projected", None, "x", deployed=None,
                               key=None, augmentation={})

