"""The command line: --help everywhere, list, and purify end to end and on bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpurify import checkpoint as C
from jaxpurify import cli
from jaxpurify import contamination as K
from jaxpurify import training as T
from jaxpurify.models import DesignedOneHiddenLayerCNN, OneHiddenLayerCNN

SUBCOMMANDS = ["demo", "run", "list", "purify"]


def _snapshot(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- help and list


def test_every_subcommand_is_tested():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(SUBCOMMANDS)


@pytest.mark.parametrize("argv", [[]] + [[c] for c in SUBCOMMANDS])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: jaxpurify")
    if argv == ["purify"]:
        for flag in ("--checkpoint", "--out", "--subspace", "--data", "--data-dir", "--limit",
                     "--overwrite", "exit status"):
            assert flag in out


def test_help_subprocess():
    """The installed entry point parses (``python -m jaxpurify.cli``)."""
    res = subprocess.run([sys.executable, "-m", "jaxpurify.cli", "purify", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--checkpoint" in res.stdout


def test_purify_requires_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["purify"])
    assert exc.value.code == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in cli.EXPERIMENTS:
        assert name in out


# --------------------------------------------------------------------------- purify


@pytest.fixture(scope="module")
def designed_ckpt(tmp_path_factory):
    """A contaminated DesignedOneHiddenLayerCNN checkpoint and its clean deployed weights."""
    root = tmp_path_factory.mktemp("designed")
    model = DesignedOneHiddenLayerCNN(16, 4, in_channels=1, filter_code_dim=4,
                                      readout_code_dim=4, num_classes=3,
                                      param_dtype=jnp.float64)
    code = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    clean = model.materialize(code)
    dirty, _ = K.sparse_gross_errors(clean, jax.random.PRNGKey(1), fraction=0.1)
    path = C.save_model(root / "ck", model, dirty, metadata={"what": "test"})
    return path, jax.tree_util.tree_map(np.asarray, clean)


@pytest.fixture(scope="module")
def row_space_ckpt(tmp_path_factory):
    """A plain CNN trained by GD on 2 inputs (filters only), contaminated, with w_0 saved."""
    root = tmp_path_factory.mktemp("rowspace")
    model = OneHiddenLayerCNN(6, 4, num_classes=1, param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 1))
    y = jnp.array([1.0, -1.0])
    p0 = model.init(jax.random.PRNGKey(3), x)["params"]
    p, _ = T.fit(model, p0, x, y, optimizer=T.sgd(0.05), steps=10, trainable=("conv",))
    dirty, _ = K.sparse_gross_errors(p, jax.random.PRNGKey(4), fraction=0.05)
    np.savez(root / "inputs.npz", x_train=np.asarray(x))
    path = C.save_model(root / "ck", model, dirty, init_params=p0)
    return path, jax.tree_util.tree_map(np.asarray, p), root / "inputs.npz"


def test_purify_designed_end_to_end(designed_ckpt, tmp_path, capsys):
    src, clean = designed_ckpt
    before = _snapshot(src)
    out = tmp_path / "purified"
    assert cli.main(["purify", "--checkpoint", str(src), "--out", str(out), "--strict"]) == 0
    printed = capsys.readouterr().out
    assert "certified" in printed and "DT crit" in printed and str(out) in printed
    assert _snapshot(src) == before  # the input is untouched

    ck = C.load_checkpoint(out)
    assert type(ck.model) is OneHiddenLayerCNN and ck.design is not None
    for a, b in zip(jax.tree_util.tree_leaves(ck.params), jax.tree_util.tree_leaves(clean),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    assert ck.metadata["what"] == "test"
    assert ck.metadata["purified_from"] == str(src.resolve())

    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is True and report["subspace"] == "designed"
    assert set(report["layers"]) == {"conv", "readout"}
    for layer in report["layers"].values():
        assert layer["certified"] and layer["converged"]
        assert 0.05 < layer["fraction"] < 0.15
    masks = np.load(out / "corrupted.npz")
    assert set(masks.files) == {"conv/kernel", "conv/bias", "readout/kernel"}

    # a second run into the same OUTDIR needs --overwrite, and then replaces it
    assert cli.main(["purify", "--checkpoint", str(src), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["purify", "--checkpoint", str(src), "--out", str(out),
                     "--overwrite"]) == 0
    assert C.is_checkpoint(out)


def test_purify_row_space_with_npz(row_space_ckpt, tmp_path, capsys):
    src, clean, npz = row_space_ckpt
    out = tmp_path / "purified"
    rc = cli.main(["purify", "--checkpoint", str(src), "--out", str(out),
                   "--subspace", "row_space", "--data", str(npz)])
    assert rc == 0, capsys.readouterr().err
    assert "inputs.npz (2 inputs)" in capsys.readouterr().out
    _, params = C.load_model(out)
    np.testing.assert_allclose(params["conv"]["kernel"], clean["conv"]["kernel"], atol=1e-9)
    np.testing.assert_allclose(params["conv"]["bias"], clean["conv"]["bias"], atol=1e-9)


def _err(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def test_purify_refuses_to_write_into_input(designed_ckpt, tmp_path, capsys):
    src, _ = designed_ckpt
    before = _snapshot(src)
    assert cli.main(["purify", "--checkpoint", str(src), "--out", str(src)]) == 2
    assert "never writes into its input" in _err(capsys)
    assert cli.main(["purify", "--checkpoint", str(src), "--out", str(src) + "/../ck",
                     "--overwrite"]) == 2
    assert "never writes into its input" in _err(capsys)
    assert cli.main(["purify", "--checkpoint", str(src), "--out", str(src / "sub")]) == 2
    assert "inside the input" in _err(capsys)
    assert cli.main(["purify", "--checkpoint", str(src), "--out", str(src.parent),
                     "--overwrite"]) == 2
    assert "contains the input" in _err(capsys)
    assert _snapshot(src) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert cli.main(["purify", "--checkpoint", str(src), "--out", str(other),
                     "--overwrite"]) == 2
    assert "not a jaxpurify checkpoint" in _err(capsys)
    assert (other / "keep.txt").read_text() == "x"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_purify_corrupt_checkpoint(designed_ckpt, tmp_path, capsys):
    bad = _copy(designed_ckpt[0], tmp_path / "bad")
    files = [p for p in (bad / "params").rglob("*") if p.is_file()]
    f = max(files, key=lambda p: p.stat().st_size)
    f.write_bytes(f.read_bytes()[:10])
    out = tmp_path / "out"
    assert cli.main(["purify", "--checkpoint", str(bad), "--out", str(out)]) == 2
    err = _err(capsys)
    assert "corrupt or incomplete" in err and "Re-copy" in err
    assert not out.exists()


def test_purify_mismatched_sidecar(designed_ckpt, tmp_path, capsys):
    bad = _copy(designed_ckpt[0], tmp_path / "bad")
    info = json.loads((bad / C.SIDECAR).read_text())
    info["model"]["fields"]["num_filters"] = 5
    (bad / C.SIDECAR).write_text(json.dumps(info))
    assert cli.main(["purify", "--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "does not match the params" in _err(capsys)


def test_purify_missing_things(designed_ckpt, row_space_ckpt, tmp_path, capsys):
    assert cli.main(["purify", "--checkpoint", str(tmp_path / "nope"),
                     "--out", str(tmp_path / "o")]) == 2
    assert "no such directory" in _err(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["purify", "--checkpoint", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "not a jaxpurify checkpoint" in _err(capsys)
    # row_space without w_0
    assert cli.main(["purify", "--checkpoint", str(designed_ckpt[0]), "--out",
                     str(tmp_path / "o"), "--subspace", "row_space"]) == 2
    assert "needs the init params" in _err(capsys)
    # row_space without inputs
    assert cli.main(["purify", "--checkpoint", str(row_space_ckpt[0]), "--out",
                     str(tmp_path / "o")]) == 2
    assert "--data mnist|cifar10|PATH.npz" in _err(capsys)
    # designed on a checkpoint without a design
    assert cli.main(["purify", "--checkpoint", str(row_space_ckpt[0]), "--out",
                     str(tmp_path / "o"), "--subspace", "designed"]) == 2
    assert "records no design" in _err(capsys)
    # a data file that does not exist / holds raw pixels
    assert cli.main(["purify", "--checkpoint", str(row_space_ckpt[0]), "--out",
                     str(tmp_path / "o"), "--data", str(tmp_path / "x.npz")]) == 2
    assert "no such file" in _err(capsys)
    np.savez(tmp_path / "u8.npz", x_train=np.zeros((2, 8, 8, 1), np.uint8))
    assert cli.main(["purify", "--checkpoint", str(row_space_ckpt[0]), "--out",
                     str(tmp_path / "o"), "--data", str(tmp_path / "u8.npz")]) == 2
    assert "uint8" in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_purify_corrupt_checkpoint_subprocess(designed_ckpt, tmp_path):
    """The real entry point: exit status 2, message on stderr, no traceback."""
    bad = _copy(designed_ckpt[0], tmp_path / "bad")
    (bad / C.SIDECAR).write_text("{ not json")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "jaxpurify.cli", "purify", "--checkpoint",
                          str(bad), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 2
    assert "not valid JSON" in res.stderr and "Traceback" not in res.stderr


def test_run_settings_are_parsed_as_literals_or_strings():
    def run(*, name, quick, out, seed, epochs=1, fractions=(0.1,), codes=None):
        return {}

    got = cli._parse_settings(["epochs=2.5", "fractions=(0.0, 0.2)", "codes=a/b.npz",
                               "epochs=3"], run, "x")
    assert got == {"epochs": 3, "fractions": (0.0, 0.2), "codes": "a/b.npz"}


@pytest.mark.parametrize("item, message", [
    ("epochs", "expected KEY=VALUE"),
    ("seed=3", "use the --seed option"),
    ("nope=1", "has no setting 'nope'; it takes"),
])
def test_run_bad_settings_say_what_to_do(item, message, tmp_path, capsys):
    out = tmp_path / "never-made"
    assert cli.main(["run", "exact-recovery", "--set", item, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_run_records_its_command_in_the_metrics(tmp_path):
    import argparse

    (tmp_path / "metrics.json").write_text(json.dumps({"rows": [], "x": float("nan")}))
    args = argparse.Namespace(name="multilayer-cifar10", quick=False, seed=3,
                              settings=["codes=a b/codes.npz"])
    cli._record_command(tmp_path / "metrics.json", args)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["command"] == ("jaxpurify run multilayer-cifar10 --seed 3 "
                                  '--set "codes=a b/codes.npz"')
    assert metrics["rows"] == [] and np.isnan(metrics["x"])
    args.out = "results/a b"  # where it wrote is part of the recipe
    cli._record_command(tmp_path / "metrics.json", args)
    assert json.loads((tmp_path / "metrics.json").read_text())["command"].endswith(
        '--set "codes=a b/codes.npz" --out "results/a b"')


@pytest.mark.parametrize("word", ["run", "models=('one-hidden',)", "a b", 'x"y', "$HOME", "it's"])
def test_recorded_words_survive_the_shell(word):
    import shlex

    assert shlex.split(cli._shell_word(word)) == [word]


def test_python_dash_m_is_the_cli():
    out = subprocess.run([sys.executable, "-m", "jaxpurify", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "demo" in out and "purify" in out and "run" in out
