"""The README's code examples run as printed."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


def test_backdoor_example_runs_and_restores_the_clean_network(capsys):
    namespace: dict = {}
    exec(compile(_block("## Backdoors"), "README.md#backdoors", "exec"), namespace)
    certified, asr_clean, asr_edited, asr_hat = capsys.readouterr().out.split()
    assert certified == "True" and asr_hat == asr_clean != asr_edited
    ns = namespace
    for name in ("w_hat", "w_ro", "w_ft"):
        assert set(ns[name]) == set(ns["w_clean"])
