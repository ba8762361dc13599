"""The Colab notebooks: stored without outputs, and each runs headless with small parameters.

Each notebook's first code cell installs jaxpurify in Colab (and does nothing elsewhere); the
next code cell, tagged ``parameters``, holds every size knob. The test inserts a cell after it
that overrides those knobs with the small values below (as papermill does) and runs the
notebook with nbclient on a ``python3`` kernel that is this interpreter.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

COLAB = Path(__file__).resolve().parents[1] / "colab"

#: Small parameters per notebook (each must be a name assigned in its ``parameters`` cell).
SMALL = {
    "noise_sweeps.ipynb": {
        "N_TRAIN": 512, "N_TEST": 500, "TRAIN_STEPS": 40, "NUM_FILTERS": 16,
        "FILTER_CODE_DIM": 32, "READOUT_CODE_DIM": 4, "FRACTIONS": [0.0, 0.2],
        "LAWS": ["gaussian", "sign_flip"], "NOISE_STDS": [0.1], "BIT_FRACTIONS": [0.05],
    },
    "phase_transition.ipynb": {
        "N": 8, "RATIOS": [2.0, 4.0], "NUM_FRACTIONS": 4, "TRIALS": 4,
    },
    "flax_pipeline.ipynb": {
        "N_TRAIN": 512, "N_TEST": 500, "EPOCHS": 1, "NUM_FILTERS": 32, "FILTER_CODE_DIM": 16,
        "READOUT_CODE_DIM": 8, "DIFF_BATCH": 16, "DIFF_STEPS": 6, "RUN_CLI": False,
    },
}

#: Notebooks that read MNIST (from $JAXPURIFY_DATA_DIR when run here).
NEEDS_MNIST = {"noise_sweeps.ipynb", "flax_pipeline.ipynb"}


def _read(name: str):
    return nbformat.read(COLAB / name, as_version=4)


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_every_notebook_is_tested():
    assert sorted(p.name for p in COLAB.glob("*.ipynb")) == sorted(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_stored_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    raw = json.loads((COLAB / name).read_text())
    for cell in raw["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{name}: strip the outputs before committing"
            assert cell["execution_count"] is None, f"{name}: clear the execution counts"
    assert raw["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_layout(name):
    """Install cell first (Colab-guarded, placeholder URL marked), then the parameters cell."""
    install, params = _code_cells(_read(name))[:2]
    assert 'IN_COLAB = "google.colab" in sys.modules' in install.source
    assert "if IN_COLAB:" in install.source and "%pip install" in install.source
    assert "REPO_URL" in install.source and "PLACEHOLDER" in install.source
    # an uploaded wheel comes first: Colab can install without a hosted repository
    assert 'glob.glob("/content/jaxpurify-*.whl")' in install.source
    assert install.source.index("WHEELS[-1]") < install.source.index("git+{REPO_URL}")
    assert "parameters" in params.metadata.get("tags", [])
    for key in SMALL[name]:
        assert re.search(rf"^{key}\s*=", params.source, re.M), f"{name}: no {key} parameter"


@pytest.fixture
def python3_kernel(tmp_path, monkeypatch):
    """A ``python3`` kernel spec that runs this interpreter, found first on JUPYTER_PATH.

    This makes the notebooks run in the environment under test (a fresh venv included),
    whatever other ``python3`` kernel specs the machine has.
    """
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (jaxpurify tests)",
        "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the notebooks use the inline backend
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    # The notebooks pick float32/float64 themselves; do not leak the test suite's choice.
    monkeypatch.delenv("JAX_ENABLE_X64", raising=False)
    return "python3"


def _inject(nb, params: dict):
    cells = nb.cells
    index = next(i for i, c in enumerate(cells)
                 if c.cell_type == "code" and "parameters" in c.metadata.get("tags", []))
    source = "# Injected by tests/test_notebooks.py\n" + "\n".join(
        f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    cell["id"] = "injected-parameters"
    cells.insert(index + 1, cell)
    return nb


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_executes(name, python3_kernel, tmp_path):
    if name in NEEDS_MNIST:
        data_dir = os.environ.get("JAXPURIFY_DATA_DIR")
        if not data_dir or not (Path(data_dir) / "mnist").is_dir():
            pytest.skip("MNIST not available: set JAXPURIFY_DATA_DIR to the shared data folder")
    nb = _inject(_read(name), SMALL[name])
    workdir = tmp_path / "run"
    workdir.mkdir()
    client = nbclient.NotebookClient(nb, kernel_name=python3_kernel, timeout=600,
                                     resources={"metadata": {"path": str(workdir)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{name} failed:\n{err}")
    seconds = time.perf_counter() - t0
    print(f"{name}: executed in {seconds:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    # every notebook draws at least one figure
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """``pip wheel . --no-deps``: what the install cell tells Colab users to upload."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    root = tmp / "src"  # a copy: building writes build/ and *.egg-info into the tree
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for part in ("jaxpurify", "experiments"):
        shutil.copytree(COLAB.parent / part, root / part, ignore=ignore)
    for part in ("pyproject.toml", "README.md", "LICENSE"):
        if (COLAB.parent / part).exists():
            shutil.copy(COLAB.parent / part, root / part)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp / "dist")],
                   check=True, timeout=300)
    (built,) = (tmp / "dist").glob("jaxpurify-*.whl")
    return built


def test_the_wheel_holds_the_whole_package(wheel, tmp_path):
    """The installed wheel imports every public module and runs a solve."""
    site = str(tmp_path / "site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--target", site, str(wheel)], check=True, timeout=300)
    code = ("import jaxpurify, jaxpurify.multilayer, jaxpurify.recovery, jaxpurify.cli, "
            "experiments.multilayer, numpy as np; "
            f"assert jaxpurify.__file__.startswith({site!r}), jaxpurify.__file__; "
            "a = np.random.default_rng(0).normal(size=(30, 5)); "
            "s = jaxpurify.l1_regression(a, a @ np.ones(5)); "
            "assert bool(s.converged)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, cwd=tmp_path,
                   env={**os.environ, "PYTHONPATH": site})


def test_the_install_cell_installs_an_uploaded_wheel(wheel, python3_kernel, tmp_path):
    """The first cell, run as in Colab (``google.colab`` imported, the wheel uploaded), pip
    installs that wheel. Only the upload folder and pip's target are redirected."""
    upload, site = tmp_path / "content", tmp_path / "site"
    upload.mkdir()
    shutil.copy(wheel, upload / wheel.name)
    install = _code_cells(_read("noise_sweeps.ipynb"))[0].source
    assert install.count('"/content/') == 1 and install.count("%pip install -q {WHEELS") == 1
    install = install.replace('"/content/', f'"{upload.as_posix()}/').replace(
        "%pip install -q {WHEELS", f"%pip install -q --no-deps --target {site} {{WHEELS")
    fake_colab = ("import sys, types\n"
                  "sys.modules['google'] = types.ModuleType('google')\n"
                  "sys.modules['google.colab'] = types.ModuleType('google.colab')")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(fake_colab),
                                         nbformat.v4.new_code_cell(install)])
    client = nbclient.NotebookClient(nb, kernel_name=python3_kernel, timeout=300,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    assert (site / "jaxpurify" / "__init__.py").is_file()
    assert (site / "jaxpurify" / "recovery" / "_solve.py").is_file()
