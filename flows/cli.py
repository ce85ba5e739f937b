"""The `notmnist` command line: one subcommand per stage or pipeline.

Heavy imports (TensorFlow, Prefect) happen inside the subcommands so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], dict[str, Any]]


def _fetch(args: argparse.Namespace) -> dict[str, Any]:
    from storage.digests import sha256_of
    from tasks.download import download_file

    path = download_file(
        args.url, args.dest, expected_bytes=args.expected_bytes, sha256=args.sha256, retries=args.retries
    )
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": args.sha256 or sha256_of(path)}


def _extract(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.extract import extract_archive

    top = extract_archive(args.archive, args.dest, expected_classes=args.expected_classes or None)
    return {"folder": str(top), "classes": sorted(p.name for p in top.iterdir() if p.is_dir())}


def _shards(args: argparse.Namespace) -> dict[str, Any]:
    from storage.layout import DataRoot, archive_stem
    from tasks.decode import decode_to_shards
    from tasks.extract import extract_archive

    layout = DataRoot(args.data_dir)
    source = args.source
    if source.is_file() and not args.from_archive:
        source = extract_archive(source, layout.extracted)
    manifests = decode_to_shards(
        source, layout.shards(archive_stem(args.source)), min_images=args.min_images, workers=args.workers
    )
    return {
        "shards": str(layout.shards(archive_stem(args.source))),
        "images": sum(m["images"] for m in manifests.values()),
        "rejected": sum(len(m["rejected"]) for m in manifests.values()),
        "per_letter": {letter: m["images"] for letter, m in manifests.items()},
    }


def _splits(args: argparse.Namespace) -> dict[str, Any]:
    from storage.layout import DataRoot
    from tasks.splits import build_splits

    layout = DataRoot(args.data_dir)
    manifest = build_splits(
        layout.shards("notMNIST_large"), layout.shards("notMNIST_small"), layout.splits_root,
        train_size=args.train_size, valid_size=args.valid_size, test_size=args.test_size,
        seed=args.seed, dedup=args.dedup,
    )
    return {
        "folder": manifest["folder"],
        "fingerprint": manifest["fingerprint"],
        "rows": {split: info["rows"] for split, info in manifest["splits"].items()},
        "overlap_seed_sampling": manifest["overlap"]["seed_sampling"],
        "overlap_after_dedup": manifest["overlap"]["after_dedup"],
    }


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from flows.notmnist import notmnist_pipeline

    return notmnist_pipeline(
        base_url=args.base_url, data_dir=str(args.data_dir), large_sha256=args.large_sha256,
        small_sha256=args.small_sha256, min_images_large=args.min_images_large,
        min_images_small=args.min_images_small, train_size=args.train_size, valid_size=args.valid_size,
        test_size=args.test_size, dedup=args.dedup, seed=args.seed, epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, workers=args.workers,
        train_deployment=args.train_deployment,
    )


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from flows.train import train_here_or_there
    from storage.atomic import read_json
    from storage.layout import DataRoot

    layout = DataRoot(args.data_dir)
    split_dir = args.split_dir or _newest_split_folder(layout.splits_root)
    training = dict(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed)
    return train_here_or_there(
        layout, "notmnist", read_json(Path(split_dir) / "manifest.json"), training, args.train_deployment, 6 * 3600
    )


def _newest_split_folder(splits_root: Path) -> Path:
    from tasks.errors import PipelineError

    folders = sorted(
        (manifest.parent for manifest in splits_root.glob("train*/manifest.json")), key=lambda p: p.stat().st_mtime
    )
    if not folders:
        raise PipelineError(f"No notMNIST splits under {splits_root}: run `notmnist splits` (or `notmnist run`) first.")
    return folders[-1]


def _mnist(args: argparse.Namespace) -> dict[str, Any]:
    from flows.mnist import mnist_pipeline

    return mnist_pipeline(
        data_dir=str(args.data_dir), url=args.url, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, seed=args.seed, train_deployment=args.train_deployment,
        **({"expected_bytes": None, "sha256": None} if args.no_checks else {}),
    )


def _iris(args: argparse.Namespace) -> dict[str, Any]:
    from flows.iris import iris_pipeline

    return iris_pipeline(
        data_dir=str(args.data_dir), epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, seed=args.seed,
    )


def _add_split_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--train-size", type=int, default=200_000, help="training rows (size // 10 per class)")
    sub.add_argument("--valid-size", type=int, default=10_000, help="validation rows")
    sub.add_argument("--test-size", type=int, default=10_000, help="test rows")
    sub.add_argument("--seed", type=int, default=133, help="seed of the shuffles and of training (the seed's value)")
    sub.add_argument(
        "--dedup", choices=("none", "cross-split", "all"), default="cross-split",
        help="none: the seed's sampling; cross-split: no valid/test image in train, no test image in valid; "
        "all: also no repeats within a split",
    )


def _add_training_options(sub: argparse.ArgumentParser, *, epochs=2, batch_size=128, learning_rate=1.0) -> None:
    sub.add_argument("--epochs", type=int, default=epochs, help="training epochs (the seed's value)")
    sub.add_argument("--batch-size", type=int, default=batch_size, help="training batch size (the seed's value)")
    sub.add_argument(
        "--learning-rate", type=float, default=learning_rate,
        help="learning rate (the seed's: Adadelta 1.0, Keras 1's default; SGD 0.01 for iris)",
    )


def _demo(args: argparse.Namespace) -> dict[str, Any]:
    from flows.demo import run_demo

    return run_demo(args.data_dir, per_letter=args.per_letter, epochs=args.epochs, workers=args.workers)


def _make_archives(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.synthetic import make_archives

    return make_archives(args.dest, per_letter=args.per_letter, small_per_letter=args.small_per_letter, seed=args.seed)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, or an off flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


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
        formatter_class=_HelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help_text, description=help_text, parents=[common],
            formatter_class=_HelpFormatter,
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

    shards = command("shards", _shards, "Decode a notMNIST archive or extracted folder into Parquet shards.")
    shards.add_argument("source", type=Path, metavar="ARCHIVE_OR_FOLDER", help="a .tar.gz or its extracted top folder")
    shards.add_argument("--data-dir", type=Path, default=Path("data"), help="data root (shards go to shards/<archive>)")
    shards.add_argument("--min-images", type=int, default=0, help="fail when a letter has fewer usable images")
    shards.add_argument("--workers", type=int, default=None, help="decode processes (default: one per core)")
    shards.add_argument(
        "--from-archive", action="store_true",
        help="read the PNGs straight from the archive instead of extracting it first (faster)",
    )

    splits = command(
        "splits", _splits,
        "Build class-balanced train/valid (from notMNIST_large) and test (from notMNIST_small) splits.",
    )
    splits.add_argument("--data-dir", type=Path, default=Path("data"), help="data root holding shards/")
    _add_split_options(splits)

    run = command("run", _run, "Run the whole notMNIST pipeline as a Prefect flow (download to trained model).")
    run.add_argument("--data-dir", type=Path, default=Path("data"), help="data root")
    run.add_argument("--base-url", default="https://commondatastorage.googleapis.com/books1000/",
                     help="where notMNIST_large.tar.gz and notMNIST_small.tar.gz are published")
    run.add_argument("--large-sha256", default=None, help="sha256 notMNIST_large.tar.gz must have")
    run.add_argument("--small-sha256", default=None, help="sha256 notMNIST_small.tar.gz must have")
    run.add_argument("--min-images-large", type=int, default=45_000, help="fewest usable images per letter, large")
    run.add_argument("--min-images-small", type=int, default=1_800, help="fewest usable images per letter, small")
    run.add_argument("--workers", type=int, default=None, help="decode processes (default: one per core)")
    run.add_argument("--train-deployment", default=None,
                     help="send training to this deployment (e.g. train/gpu) instead of training here")
    _add_split_options(run)
    _add_training_options(run)

    train = command("train", _train, "Train the seed's CNN on notMNIST splits (the newest under --data-dir by default).")
    train.add_argument("--data-dir", type=Path, default=Path("data"), help="data root")
    train.add_argument("--split-dir", type=Path, default=None, help="a split folder (default: the newest one)")
    train.add_argument("--seed", type=int, default=133, help="seed of the weights and the epoch shuffles")
    train.add_argument("--train-deployment", default=None, help="train on this deployment's pool (e.g. train/gpu)")
    _add_training_options(train)

    mnist = command("mnist", _mnist, "The seed's MNIST CNN: fetch mnist.npz (verified), convert, train.")
    mnist.add_argument("--data-dir", type=Path, default=Path("data"), help="data root")
    mnist.add_argument("--url", default="https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz",
                       help="where mnist.npz is (http(s), file:// or a path)")
    mnist.add_argument("--no-checks", action="store_true",
                       help="skip the size and sha256 checks (for a mirror with another copy of the file)")
    mnist.add_argument("--seed", type=int, default=133, help="seed of the weights and the epoch shuffles")
    mnist.add_argument("--train-deployment", default=None, help="train on this deployment's pool (e.g. train/gpu)")
    _add_training_options(mnist)

    iris = command("iris", _iris, "The seed's softmax regression on iris, sparse and one-hot labels.")
    iris.add_argument("--data-dir", type=Path, default=Path("data"), help="data root")
    iris.add_argument("--seed", type=int, default=133, help="seed of the weights, shuffles and held-out rows")
    _add_training_options(iris, epochs=15, batch_size=5, learning_rate=0.01)

    demo = command("demo", _demo, "Run the pipeline offline on generated archives served from 127.0.0.1.")
    demo.add_argument("--data-dir", type=Path, default=Path("data/demo"), help="data root for the demo")
    demo.add_argument("--per-letter", type=int, default=5000, help="images per letter in the generated large archive")
    demo.add_argument("--epochs", type=int, default=5,
                      help="training epochs (the seed trains 2 on 200,000 images; the demo has 40,000)")
    demo.add_argument("--workers", type=int, default=None, help="decode processes (default: one per core)")

    archives = command(
        "make-archives", _make_archives,
        "Write notMNIST_large.tar.gz and notMNIST_small.tar.gz in the real layout, from this machine's fonts.",
    )
    archives.add_argument("dest", type=Path, metavar="DIR", help="folder to write the two archives to")
    archives.add_argument("--per-letter", type=int, required=True, help="images per letter in the large archive")
    archives.add_argument("--small-per-letter", type=int, default=None,
                          help="images per letter in the small archive (default: a sixth of --per-letter)")
    archives.add_argument("--seed", type=int, default=2024, help="same seed, same bytes")
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
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if args.debug else "3")  # TensorFlow's C++ start-up chatter
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the embedded server would phone home
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.debug else logging.WARNING)  # one line per API call
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
