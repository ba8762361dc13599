"""The ``jaxpurify`` command line: ``demo``, ``run NAME``, ``list`` and ``purify``.

Every experiment lives in ``experiments/<name>.py`` and exposes ``run(*, quick, out, seed,
**options) -> dict``; it writes ``out/metrics.json`` and its plots and returns the metrics.

``purify`` reads a checkpoint written by :func:`jaxpurify.checkpoint.save_model`, removes the
contamination with :func:`jaxpurify.purify.purify` and writes the purified checkpoint and a
report to a new directory; it never writes into its input.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

#: Experiment name -> module under ``experiments/``.
EXPERIMENTS = {
    "exact-recovery": "experiments.exact_recovery",
    "phase-transition": "experiments.phase_transition",
    "mnist": "experiments.real_data",
    "cifar10": "experiments.real_data",
    "multilayer-mnist": "experiments.multilayer",
    "multilayer-cifar10": "experiments.multilayer",
    "backdoor-mnist": "experiments.backdoor",
    "backdoor-cifar10": "experiments.backdoor",
    "adaptive-edit-mnist": "experiments.adaptive_edit",
    "adaptive-edit-cifar10": "experiments.adaptive_edit",
    "backdoor-row-space-mnist": "experiments.row_space_backdoor",
    "backdoor-row-space-cifar10": "experiments.row_space_backdoor",
    "backdoor-repeats-mnist": "experiments.backdoor_repeats",
    "backdoor-repeats-cifar10": "experiments.backdoor_repeats",
    "backdoor-repeats-row-space-mnist": "experiments.backdoor_repeats",
    "backdoor-repeats-row-space-cifar10": "experiments.backdoor_repeats",
    "universal-shortcuts-mnist": "experiments.universal_shortcuts",
    "universal-shortcuts-cifar10": "experiments.universal_shortcuts",
    "universal-shortcuts-row-space-mnist": "experiments.universal_shortcuts",
    "universal-shortcuts-row-space-cifar10": "experiments.universal_shortcuts",
}

#: ``purify --subspace`` choices (see :mod:`jaxpurify.subspaces`).
SUBSPACES = ("designed", "row_space", "lazy")
#: ``purify --data`` dataset names (anything else must be a ``.npz`` path).
DATASETS = ("mnist", "cifar10")


class CLIError(Exception):
    """A user-facing error: printed on stderr without a traceback, exit status 2."""


def _load_experiment(name: str):
    module = EXPERIMENTS[name]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("experiments"):
            raise SystemExit(
                f"jaxpurify: experiment {name!r} ({module}) is not available in this install. "
                "Experiments ship with the source tree: run from a checkout installed with "
                "`pip install -e .`."
            ) from err
        raise


def _cmd_list(_args) -> int:
    for name in EXPERIMENTS:
        try:
            doc = (_load_experiment(name).__doc__ or "").strip().splitlines()
            doc = doc[0] if doc else ""
        except SystemExit:
            doc = "(not available in this install)"
        except Exception as err:  # noqa: BLE001 - a broken module must not break the listing
            doc = f"(fails to import: {type(err).__name__}: {err})"
        print(f"{name:22s} {doc}")
    return 0


_RESERVED = ("name", "quick", "out", "seed")


def _parse_settings(settings, run, name: str) -> dict:
    """``--set KEY=VALUE`` pairs as keyword arguments of the experiment's ``run``.

    VALUE is read as a Python literal (``2``, ``0.5``, ``(0.1, 0.2)``, ``None``) and kept as
    a string otherwise (paths). Keys the experiment cannot take are refused here, with the
    keys it can.
    """
    import ast
    import inspect

    params = inspect.signature(run).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    known = [k for k, p in params.items()
             if k not in _RESERVED and p.kind is not inspect.Parameter.VAR_KEYWORD]
    out = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise CLIError(f"--set {item!r}: expected KEY=VALUE, e.g. --set epochs=2")
        if key in _RESERVED:
            raise CLIError(f"--set {key}=...: use the --{key} option (or the NAME argument)")
        if not open_ended and key not in known:
            raise CLIError(f"--set {key}=...: {name} has no setting {key!r}; it takes "
                           f"{', '.join(known) or 'none'}")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def _shell_word(word: str) -> str:
    """``word`` quoted for a POSIX shell, readably: double quotes when that is enough."""
    import shlex

    quoted = shlex.quote(word)
    if quoted == word or any(c in word for c in '"$`\\!'):
        return quoted
    return f'"{word}"'


def _record_command(path: Path, args) -> None:
    """Store the command line that made ``metrics.json`` in it (the results page,
    docs/results.md, prints it)."""
    if not path.is_file():
        return
    words = ["jaxpurify", "run", args.name] + (["--quick"] if args.quick else [])
    words += ["--seed", str(args.seed)] if args.seed else []
    for item in args.settings:
        words += ["--set", item]
    words += ["--out", str(args.out)] if getattr(args, "out", None) else []
    metrics = json.loads(path.read_text())
    metrics["command"] = " ".join(_shell_word(w) for w in words)
    path.write_text(json.dumps(metrics, indent=2))


def _cmd_run(args) -> int:
    mod = _load_experiment(args.name)
    options = _parse_settings(args.settings, mod.run, args.name)
    out = Path(args.out or Path("runs") / args.name)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    metrics = mod.run(name=args.name, quick=args.quick, out=out, seed=args.seed, **options)
    seconds = time.perf_counter() - t0
    _record_command(out / "metrics.json", args)
    print(f"\n{args.name}: finished in {seconds:.1f} s; metrics in {out / 'metrics.json'}")
    for plot in sorted(out.glob("*.png")):
        print(f"  plot: {plot}")
    if args.print_json:
        print(json.dumps(metrics, indent=2, default=str))
    return 0


def _cmd_demo(args) -> int:
    from jaxpurify._demo import demo

    return demo(out=Path(args.out or "runs/demo"), seed=args.seed, data_dir=args.data_dir)


# --------------------------------------------------------------------------- purify


def _check_out_dir(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse any output location that could touch the input checkpoint."""
    from jaxpurify.checkpoint import is_checkpoint

    s, o = src.resolve(), out.resolve()
    if s == o:
        raise CLIError(f"--out {out} is the input checkpoint; purify never writes into its "
                       "input. Pass a new directory, e.g. --out "
                       f"{src.parent / (src.name + '-purified')}")
    if s in o.parents:
        raise CLIError(f"--out {out} is inside the input checkpoint {src}; purify never writes "
                       "into its input. Pass a directory outside it.")
    if o in s.parents:
        raise CLIError(f"--out {out} contains the input checkpoint {src}; writing there could "
                       "replace the input. Pass a directory that does not contain it.")
    if o.exists() and not o.is_dir():
        raise CLIError(f"--out {out} exists and is a file; pass a directory path.")
    if o.is_dir() and any(o.iterdir()):
        if not overwrite:
            raise CLIError(f"--out {out} exists and is not empty; pass a new directory, or "
                           "--overwrite to replace a previous purify output.")
        if not is_checkpoint(o):
            raise CLIError(f"--out {out} is not empty and is not a jaxpurify checkpoint; refusing "
                           "to replace it even with --overwrite. Pass a new directory.")


def _load_npz_inputs(path: Path, limit: int | None):
    import numpy as np

    if not path.is_file():
        raise CLIError(f"--data {path}: no such file. Pass 'mnist', 'cifar10' or the path of an "
                       ".npz file holding the training inputs under the key 'x_train' (or 'x').")
    try:
        with np.load(path, allow_pickle=False) as z:
            key = next((k for k in ("x_train", "x", "inputs") if k in z.files), None)
            if key is None:
                raise CLIError(f"--data {path} has keys {sorted(z.files)}; it needs the training "
                               "inputs (N, H, W, C) under 'x_train' (or 'x').")
            x = z[key]
    except CLIError:
        raise
    except Exception as err:  # noqa: BLE001 - np.load raises many types on bad files
        raise CLIError(f"--data {path} is not a readable .npz file ({type(err).__name__}: "
                       f"{err}).") from err
    if not np.issubdtype(x.dtype, np.floating):
        raise CLIError(
            f"--data {path}: '{key}' holds {x.dtype} values; purify needs the exact inputs the "
            "network was trained on, as floats after preprocessing. Save those, or use --data "
            "mnist/cifar10 (standard scaling and normalization)."
        )
    return x if limit is None else x[:limit]


def _load_inputs(args, record: dict | None, dtype):
    """Training inputs for the row_space / lazy subspaces: --data, else the checkpoint's record."""
    from jaxpurify import data as D

    record = record if isinstance(record, dict) else {}
    spec = args.data or record.get("dataset")
    limit = args.limit if args.limit is not None else record.get("limit")
    if spec is None:
        raise CLIError(
            f"--subspace {args.subspace} needs the training inputs the network was trained on: "
            "pass --data mnist|cifar10|PATH.npz and --limit N (the first N training examples), "
            "or use --subspace designed for a DesignedOneHiddenLayerCNN checkpoint."
        )
    if spec in DATASETS:
        loader = D.load_mnist if spec == "mnist" else D.load_cifar10
        ds = loader(args.data_dir, dtype=dtype, normalize=bool(record.get("normalize", True)),
                    limit_train=limit, limit_test=0)
        x = ds.x_train
        where = f"{spec} (first {len(x)} training images)"
    else:
        x = _load_npz_inputs(Path(spec), limit)
        where = f"{spec} ({len(x)} inputs)"
    return x.astype(dtype, copy=False), where


def _layer_json(layer_report, changed: int) -> dict:
    import numpy as np

    r = layer_report
    return {
        "source": r.source,
        "num_corrupted": r.num_corrupted,
        "fraction": r.fraction,
        "num_nonfinite": r.num_nonfinite,
        "corrupted_per_leaf": {k: int(np.sum(v)) for k, v in r.corrupted.items()},
        "entries_changed": changed,
        "ratio": r.ratio,
        "critical_fraction": r.critical_fraction,
        "objective_max": float(np.max(r.objective)) if np.size(r.objective) else 0.0,
        "converged": r.converged,
        "certified": r.certified,
        "warnings": list(r.warnings),
    }


def _cmd_purify(args) -> int:
    import numpy as np

    from jaxpurify import checkpoint as C

    src, out = Path(args.checkpoint), Path(args.out)
    if not src.exists():
        raise CLIError(f"--checkpoint {src}: no such directory. Pass a directory written by "
                       "jaxpurify.checkpoint.save_model.")
    _check_out_dir(src, out, args.overwrite)

    t0 = time.perf_counter()
    ckpt = C.load_checkpoint(src)
    leaves = [v for t in (ckpt.params, ckpt.init_params or {}) for v in _leaves(t)]
    dtype = np.result_type(*[v.dtype for v in leaves if np.issubdtype(v.dtype, np.floating)])
    if dtype == np.float64:
        import jax

        jax.config.update("jax_enable_x64", True)

    from jaxpurify.models import DesignedOneHiddenLayerCNN, OneHiddenLayerCNN
    from jaxpurify.purify import purify

    model, params, init, design = ckpt.model, ckpt.params, ckpt.init_params, ckpt.design
    if isinstance(model, DesignedOneHiddenLayerCNN):
        # Code params (theta, phi): purify the deployed weights W = A theta.
        design = model
        params = _to_numpy(model.materialize(params))
        init = None if init is None else _to_numpy(model.materialize(init))
        model = model.plain_model()
    if not isinstance(model, OneHiddenLayerCNN):
        raise CLIError(f"{src} holds a {type(model).__name__}; `jaxpurify purify` handles the "
                       "one-hidden-layer CNNs (OneHiddenLayerCNN, DesignedOneHiddenLayerCNN). "
                       "For deeper networks use jaxpurify.multilayer from Python.")
    subspace = args.subspace or ("designed" if design is not None else "row_space")

    print(f"checkpoint  {src}: {type(model).__name__}, "
          f"{sum(np.size(v) for v in _leaves(params))} parameters ({dtype.name})"
          + (f", design {type(design).__name__}" if design is not None else ""))
    if subspace == "designed":
        if design is None:
            raise CLIError(
                f"--subspace designed needs a network trained as DesignedOneHiddenLayerCNN, but "
                f"{src} records no design. Use --subspace row_space or lazy (with --data and "
                "the checkpoint's init params)."
            )
        recovered, report = purify(design, params, subspace="designed", method=args.method)
    else:
        if init is None:
            raise CLIError(
                f"--subspace {subspace} needs the init params w_0, but {src} has none. Save the "
                "checkpoint with save_model(..., init_params=init), or use --subspace designed "
                "for a DesignedOneHiddenLayerCNN."
            )
        inputs, where = _load_inputs(args, ckpt.training_data, dtype)
        print(f"inputs      {where}")
        recovered, report = purify(model, params, init_params=init, inputs=inputs,
                                   subspace=subspace, weight_decay=args.weight_decay,
                                   method=args.method)
    recovered = _to_numpy(recovered)

    changed = {}
    for layer in report.layers:
        a, b = _leaves(params[layer]), _leaves(recovered[layer])
        changed[layer] = int(sum(np.sum(_changed(x, y)) for x, y in zip(a, b, strict=True)))
    summary = {
        "checkpoint": str(src),
        "out": str(out),
        "subspace": subspace,
        "model": type(model).__name__,
        "design": None if design is None else type(design).__name__,
        "ok": report.ok,
        "seconds_purify": report.seconds,
        "layers": {k: _layer_json(r, changed[k]) for k, r in report.layers.items()},
        "warnings": report.warnings,
    }
    metadata = dict(ckpt.metadata)
    metadata["purified_from"] = str(src.resolve())
    metadata["purify"] = {k: summary[k] for k in ("subspace", "ok")}
    C.save_model(out, design if design is not None else model, recovered, init_params=init,
                 training_data=ckpt.training_data, metadata=metadata, overwrite=args.overwrite)
    summary["seconds_total"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    np.savez_compressed(out / "corrupted.npz", **{
        f"{layer}/{leaf}": np.asarray(mask) for layer, r in report.layers.items()
        for leaf, mask in r.corrupted.items()})

    print(f"subspace    {subspace}\n")
    print(report.summary())
    print()
    for layer, n in changed.items():
        print(f"{layer:8s} {n} entries changed (by more than 1e-6 of the layer's scale)")
    verdict = ("certified: every layer converged, fits more entries than unknowns to rounding "
               "and admits no second explanation"
               if report.ok else "NOT certified: see the warnings above")
    print(f"\n{verdict}")
    print(f"purified checkpoint: {out}\nreport: {out / 'report.json'} (masks: "
          f"{out / 'corrupted.npz'})  [{summary['seconds_total']:.1f} s]")
    return 1 if args.strict and not report.ok else 0


def _changed(before, after):
    """Entries moved by more than 1e-6 of the leaf's scale (or that were NaN/Inf)."""
    import numpy as np

    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    scale = float(np.max(np.abs(after))) if after.size else 0.0
    return ~np.isfinite(before) | (np.abs(before - after) > 1e-6 * max(scale, 1e-30))


def _leaves(tree) -> list:
    import jax

    return jax.tree_util.tree_leaves(tree)


def _to_numpy(tree):
    import jax
    import numpy as np

    return jax.tree_util.tree_map(np.asarray, tree)


# --------------------------------------------------------------------------- parser

_PURIFY_EPILOG = """\
examples:
  # a DesignedOneHiddenLayerCNN checkpoint (the design is recorded in the checkpoint)
  jaxpurify purify --checkpoint runs/ckpt --out runs/ckpt-purified

  # a plain OneHiddenLayerCNN trained by SGD on the first 64 MNIST images
  jaxpurify purify --checkpoint runs/ckpt --out runs/clean --subspace row_space \\
      --data mnist --limit 64

subspaces:
  designed   the network was trained as DesignedOneHiddenLayerCNN (W = A theta): works at any
             data size; needs nothing but the checkpoint.
  row_space  (S)GD / momentum from the saved init w_0: the filters stay in the span of the
             training patches. Needs the init params in the checkpoint and the exact training
             inputs (--data, --limit); exact only when there are fewer patches than filter
             entries.
  lazy       lazy-regime training (activation patterns and readout fixed at init); needs the
             init params and the training inputs.
  Default: designed when the checkpoint records a design, else row_space.

output (OUTDIR, which must be new or empty, or a previous output with --overwrite):
  jaxpurify.json, params/, init_params/   the purified checkpoint (load with
                                           jaxpurify.checkpoint.load_model)
  report.json                              per layer: entries judged corrupted, ratio,
                                           Donoho-Tanner threshold, convergence, certificate
  corrupted.npz                            boolean masks of the entries judged corrupted

exit status: 0 purified (read the report for the certificate); 1 with --strict when some
layer is not certified (the output is still written); 2 bad arguments, or a missing,
corrupt or mismatched checkpoint or dataset (message on stderr).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxpurify",
        description="Purify contaminated CNNs by robust (L1) recovery.",
        epilog="Run `jaxpurify COMMAND --help` for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo", help="the main job: train, contaminate, purify and compare (about a minute)",
        description="The main job: train a designed one-hidden-layer CNN (real MNIST when a "
        "data directory is found, else a labeled synthetic task), contaminate 10% of every "
        "weight, purify, and print a table of test accuracy clean / contaminated / purified. "
        "Writes OUT/metrics.json and OUT/demo.png.")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder holding mnist/ and cifar10/ (default: $JAXPURIFY_DATA_DIR)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "run", help="run one experiment and write metrics.json + plots",
        description="Run one experiment from experiments/ and write OUT/metrics.json and its "
        "plots. `jaxpurify list` shows the experiments.")
    p.add_argument("name", choices=sorted(EXPERIMENTS), metavar="NAME",
                   help="one of: " + ", ".join(EXPERIMENTS))
    p.add_argument("--quick", action="store_true", help="small setting (about two minutes)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/NAME)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--print-json", action="store_true", help="also print the metrics")
    p.add_argument("--set", dest="settings", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="override one setting of the experiment (repeatable); VALUE is a "
                   "Python literal or a path, e.g. --set epochs=2 --set 'fractions=(0.1,)' "
                   "--set codes=results/multilayer-cifar10/codes.npz")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("list", help="list the experiments",
                       description="List the experiments `jaxpurify run NAME` accepts.")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser(
        "purify", help="purify a saved checkpoint into a new directory, with a report",
        description="Load a checkpoint written by jaxpurify.checkpoint.save_model, remove sparse\n"
        "contamination (gross errors, bit flips, edited weights) by L1 recovery onto the\n"
        "known subspace, and write the purified checkpoint and a report to a new directory.\n"
        "The input checkpoint is never modified.",
        epilog=_PURIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="input checkpoint directory (jaxpurify.checkpoint.save_model)")
    p.add_argument("--out", required=True, metavar="OUTDIR",
                   help="new directory for the purified checkpoint and report.json")
    p.add_argument("--subspace", choices=SUBSPACES, default=None,
                   help="recovery subspace (default: designed if the checkpoint records a "
                   "design, else row_space)")
    p.add_argument("--data", metavar="mnist|cifar10|PATH.npz", default=None,
                   help="training inputs for row_space/lazy (default: the dataset recorded in "
                   "the checkpoint); a .npz holds the preprocessed float inputs under "
                   "'x_train' or 'x'")
    p.add_argument("--data-dir", metavar="D", default=None,
                   help="folder holding mnist/ and cifar10/ (default: $JAXPURIFY_DATA_DIR; "
                   "without either, tensorflow-datasets is used if installed)")
    p.add_argument("--limit", type=_positive_int, metavar="N", default=None,
                   help="use the first N training examples: exactly the ones the network was "
                   "trained on (default: the limit recorded in the checkpoint, else all)")
    p.add_argument("--weight-decay", action="store_true",
                   help="row_space: the filters were trained with weight decay")
    p.add_argument("--method", choices=("admm", "pdhg"), default="admm",
                   help="L1 solver (default: admm)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUTDIR if it holds a previous purify output")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when recovery is not certified for every layer")
    p.set_defaults(func=_cmd_purify)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jaxpurify.data import DataCorruptError, DataNotFoundError

    self_described: tuple = (CLIError,)  # printed without their type name
    user_errors: tuple = (CLIError, DataNotFoundError, DataCorruptError)
    if args.func is _cmd_purify:  # everything purify raises is about its input
        from jaxpurify.checkpoint import CheckpointError

        self_described += (CheckpointError,)
        user_errors += (CheckpointError, ValueError, ImportError)
    try:
        return args.func(args)
    except user_errors as err:
        kind = "" if isinstance(err, self_described) else f"{type(err).__name__}: "
        print(f"jaxpurify {args.command}: error: {kind}{err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
