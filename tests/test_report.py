"""The README results section (experiments/_report.py) is rendered from metrics.json only."""

from __future__ import annotations

import json

import pytest

report = pytest.importorskip("experiments._report")


def _run(tmp_path, name, metrics, figure=True):
    d = tmp_path / "runs" / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    if figure:
        (d / "accuracy.png").write_bytes(b"\x89PNG")
    return d


def test_command_recorded_or_rebuilt():
    assert report.command("x", {"command": "jaxpurify run x --set a=1"}) == (
        "jaxpurify run x --set a=1")
    assert report.command("mnist", {"experiment": "mnist", "quick": True, "seed": 2}) == (
        "jaxpurify run mnist --quick --seed 2")
    rebuilt = report.command("multilayer-cifar10", {
        "experiment": "multilayer-cifar10", "config": {"codes": "results/c/codes.npz"}})
    assert rebuilt == "jaxpurify run multilayer-cifar10 --set codes=results/c/codes.npz"
    assert report.command("demo", {}) == "jaxpurify demo"


def test_section_has_commands_times_rows_and_figures(tmp_path):
    rows = [{"dataset": "mnist", "noise": "gaussian", "fraction": f, "acc_clean": 0.98,
             "acc_purified": 0.98 if f < 0.3 else 0.5, "seconds": 1.5} for f in (0.1, 0.3)]
    _run(tmp_path, "mnist", {"experiment": "mnist", "quick": True, "seconds": 12.0,
                             "acc_clean": 0.98, "rows": rows})
    _run(tmp_path, "demo", {"seconds": 3.0, "acc_clean": 0.9}, figure=False)
    section = report.render(tmp_path / "runs", tmp_path)
    assert section.startswith(report.START) and section.endswith(report.END)
    assert section.index("### demo") < section.index("### mnist")  # the demo first
    assert "Command: `jaxpurify run mnist --quick`; wall time 12.0 s." in section
    assert "0.3" in section and "gaussian" in section
    assert "(runs/mnist/accuracy.png)" in section


def test_update_replaces_only_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold\n{report.END}\noutro\n")
    new = report.update_readme(readme, f"{report.START}\nnew\n{report.END}")
    assert new == f"intro\n{report.START}\nnew\n{report.END}\noutro\n"
    readme.write_text(f"intro\n{report.END}\n")
    with pytest.raises(ValueError, match="markers"):
        report.update_readme(readme, "x")
