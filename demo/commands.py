"""The demo's commands of `notmnist`: `demo` (the whole pipeline offline) and `make-archives`.

They are declared as a plugin of the command line (pyproject.toml, entry point group `notmnist.commands`),
so the product's layers never import the demo; `register` adds them to the parser `flows/cli.py` builds.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from core.parameters import Seed
from flows.cli import LOCATION, POSITIVE, data_root, pipeline_options
from flows.options import option_type

SYSTEM_FONTS_HELP = ("draw from this machine's font folders too (by default only from the fonts matplotlib ships, "
                     "so a seed gives the same archives everywhere)")


def _demo(args: argparse.Namespace) -> dict[str, Any]:
    from demo.run import run_demo

    return run_demo(
        data_root(args, must_exist=False), per_letter=args.per_letter, epochs=args.epochs, workers=args.workers,
        task_runner=args.task_runner, dask_address=args.dask_address,
        train_deployment=args.train_deployment, system_fonts=args.system_fonts,
    )


def _draw_archives(args: argparse.Namespace) -> None:
    from demo.run import prepare_demo

    prepare_demo(data_root(args, must_exist=False), args.per_letter, system_fonts=args.system_fonts)


def _make_archives(args: argparse.Namespace) -> dict[str, Any]:
    from demo.synthetic import make_archives

    return make_archives(args.dest, per_letter=args.per_letter, small_per_letter=args.small_per_letter, seed=args.seed,
                         system_fonts=args.system_fonts)


def _stack(args: argparse.Namespace) -> dict[str, Any]:
    from demo.stack import stack_down, stack_up

    if args.action == "up":
        return stack_up(args.folder, args.checkout, args.port, args.repository)
    return stack_down(args.folder)


def _demo_options(demo: argparse.ArgumentParser) -> None:
    pipeline_options(demo, *LOCATION, data_dir="data/demo")
    demo.add_argument("--per-letter", type=POSITIVE, default=5000, help="images per letter in the generated large archive")
    demo.add_argument("--epochs", type=POSITIVE, default=5,
                      help="training epochs (the seed trains 2 on 200,000 images; the demo has 40,000)")
    pipeline_options(demo, "workers", "task_runner", "dask_address", "train_deployment")
    demo.add_argument("--system-fonts", action="store_true", help=SYSTEM_FONTS_HELP)
    demo.set_defaults(prepare=_draw_archives)  # the archives are drawn while Prefect's embedded API starts


def _make_archives_options(archives: argparse.ArgumentParser) -> None:
    archives.add_argument("dest", type=Path, metavar="DIR", help="folder to write the two archives to")
    archives.add_argument("--per-letter", type=POSITIVE, required=True, help="images per letter in the large archive")
    archives.add_argument("--small-per-letter", type=POSITIVE, default=None,
                          help="images per letter in the small archive (default: a sixth of --per-letter)")
    archives.add_argument("--seed", type=option_type(Seed), default=2024, help="same seed, same bytes")
    archives.add_argument("--system-fonts", action="store_true", help=SYSTEM_FONTS_HELP)


def _stack_options(stack: argparse.ArgumentParser) -> None:
    stack.add_argument("action", choices=("up", "down"), help="up starts everything; down stops what up started")
    stack.add_argument("--folder", type=Path, default=Path(".stack"),
                       help="where the stack keeps its databases, bucket, workers' folders, logs and stack.json")
    stack.add_argument("--port", type=POSITIVE, default=4200, help="the Prefect server's port (its UI and API)")
    stack.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1],
                       help="the git checkout to deploy from: workers clone its current commit")
    stack.add_argument("--repository", default=None,
                       help="where workers clone that commit from (default: the checkout itself, as a file:// URL)")


def register(commands) -> None:
    """Add `demo`, `make-archives` and `stack` through the command line's `commands(name, handler, help, options)`."""
    commands("demo", _demo, "Run the pipeline offline on generated archives served from 127.0.0.1.", _demo_options)
    commands("make-archives", _make_archives,
             "Write notMNIST_large.tar.gz and notMNIST_small.tar.gz in the real layout, from the fonts matplotlib ships.",
             _make_archives_options)
    commands("stack", _stack,
             "Start (up) or stop (down) the multi-machine topology on this one: a Prefect server, SeaweedFS with the "
             "bucket, the work pools, the deployments, and a cpu and a gpu worker that clone this checkout's commit.",
             _stack_options)
