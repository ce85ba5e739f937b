"""The `notmnist` command line: one subcommand per stage or pipeline.

Heavy imports (TensorFlow, Prefect) happen inside the subcommands so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], dict[str, Any]]


def _fetch(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.download import download_file, sha256_of

    path = download_file(
        args.url, args.dest, expected_bytes=args.expected_bytes, sha256=args.sha256, retries=args.retries
    )
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": args.sha256 or sha256_of(path)}


def _extract(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.extract import extract_archive

    top = extract_archive(args.archive, args.dest, expected_classes=args.expected_classes or None)
    return {"folder": str(top), "classes": sorted(p.name for p in top.iterdir() if p.is_dir())}


def _demo(args: argparse.Namespace) -> dict[str, Any]:
    from flows.demo import run_demo

    return run_demo(args.data_dir, per_letter=args.per_letter)


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as one JSON object")
    common.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand, each option documented with its default."""
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="notmnist",
        description="Download, verify, decode and train on notMNIST (and the seed's MNIST and iris models).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help_text, description=help_text, parents=[common],
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        sub.set_defaults(handler=handler)
        return sub

    fetch = command("fetch", _fetch, "Download a file with size/sha256 checks, resuming any partial download.")
    fetch.add_argument("url", help="http(s) or file:// URL, or a local path")
    fetch.add_argument("--dest", type=Path, default=Path("."), help="folder to put the file in")
    fetch.add_argument("--expected-bytes", type=int, default=None, help="exact size the file must have")
    fetch.add_argument("--sha256", default=None, help="hex sha256 the file must have")
    fetch.add_argument("--retries", type=int, default=5, help="further attempts after a network or 5xx error")

    extract = command("extract", _extract, "Safely extract a notMNIST .tar.gz (refuses hostile members).")
    extract.add_argument("archive", type=Path, help="the .tar.gz to extract")
    extract.add_argument("--dest", type=Path, default=Path("."), help="folder to extract into")
    extract.add_argument(
        "--expected-classes", type=int, default=10, help="class folders the archive must hold (0: do not check)"
    )

    demo = command("demo", _demo, "Run the pipeline offline on generated archives served from 127.0.0.1.")
    demo.add_argument("--data-dir", type=Path, default=Path("data/demo"), help="data root for the demo")
    demo.add_argument("--per-letter", type=int, default=200, help="images per letter in the generated large archive")
    return parser


def _version() -> str:
    try:
        return metadata.version("notmnist-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"


def _print_human(result: dict[str, Any]) -> None:
    width = max((len(key) for key in result), default=0)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `notmnist` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(message)s")
    from tasks.errors import PipelineError

    try:
        result = args.handler(args)
    except KeyboardInterrupt:
        print("notmnist: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    except Exception as error:  # one line for the user; the traceback only on request
        if args.debug:
            traceback.print_exc()
        elif not isinstance(error, PipelineError):
            print("notmnist: unexpected failure; rerun with --debug for the traceback.", file=sys.stderr)
        print(f"notmnist {args.command}: error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, default=str))
    else:
        _print_human(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
