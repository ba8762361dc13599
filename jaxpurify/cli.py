"""The ``jaxpurify`` command line: ``demo``, ``run NAME`` and ``list``.

Every experiment lives in ``experiments/<name>.py`` and exposes ``run(*, quick, out, seed,
**options) -> dict``; it writes ``out/metrics.json`` and its plots and returns the metrics.
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
}


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
            doc = (_load_experiment(name).__doc__ or "").strip().splitlines()[0]
        except SystemExit:
            doc = "(not available in this install)"
        print(f"{name:22s} {doc}")
    return 0


def _cmd_run(args) -> int:
    mod = _load_experiment(args.name)
    out = Path(args.out or Path("runs") / args.name)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    metrics = mod.run(name=args.name, quick=args.quick, out=out, seed=args.seed)
    seconds = time.perf_counter() - t0
    print(f"\n{args.name}: finished in {seconds:.1f} s; metrics in {out / 'metrics.json'}")
    for plot in sorted(out.glob("*.png")):
        print(f"  plot: {plot}")
    if args.print_json:
        print(json.dumps(metrics, indent=2, default=str))
    return 0


def _cmd_demo(args) -> int:
    from jaxpurify._demo import demo

    return demo(out=Path(args.out or "runs/demo"), seed=args.seed, data_dir=args.data_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxpurify",
        description="Purify contaminated CNNs by robust (L1) recovery.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="short end-to-end run: train, contaminate, purify")
    p.add_argument("--out", help="output folder (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="folder with mnist/ (default $JAXPURIFY_DATA_DIR)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("run", help="run one experiment and write metrics.json + plots")
    p.add_argument("name", choices=sorted(EXPERIMENTS), metavar="NAME",
                   help="one of: " + ", ".join(EXPERIMENTS))
    p.add_argument("--quick", action="store_true", help="small setting (about two minutes)")
    p.add_argument("--out", help="output folder (default runs/NAME)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--print-json", action="store_true", help="also print the metrics")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("list", help="list the experiments")
    p.set_defaults(func=_cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
