"""The `notmnist` command line: one subcommand per stage or pipeline.

The pipeline commands (run, train, mnist, iris) have one option per parameter of their flow, named
alike (`--min-images-large` is `min_images_large`) with the same default, and pass all of them on
(`_flow_arguments`): a parameter added to a flow without its option fails the tests, not a user.
Heavy imports (TensorFlow, Prefect) happen inside the subcommands so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import re
import sys
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from core import seed as SEED_FACTS
from core.defaults import (
    DEDUP,
    DEDUP_MODES,
    EPHEMERAL_API_STARTUP_SECONDS,
    READ_TIMEOUT_SECONDS,
    TASK_RUNNERS,
    TRAIN_TIMEOUT_SECONDS,
)

Handler = Callable[[argparse.Namespace], dict[str, Any]]
SEED_LIMIT = 2**32  # NumPy's RandomState and Keras take seeds in [0, 2**32)


def _number(kind: type, *, low: float, high: float | None = None, what: str) -> Callable[[str], Any]:
    """An argparse type: `kind` within [low, high), or a usage error that says the range."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < low or (high is not None and value >= high) or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    return parse


def SHA256(text: str) -> str:  # noqa: N802 (an argparse type, named like the others)
    """An argparse type: a sha256 as 64 hexadecimal digits, lower-cased."""
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a sha256 (64 hexadecimal digits)")
    return text.lower()


COUNT = _number(int, low=0, what="a count (0 or more)")
POSITIVE = _number(int, low=1, what="a positive integer")
SEED_VALUE = _number(int, low=0, high=SEED_LIMIT, what=f"a seed (0 to {SEED_LIMIT - 1})")
SECONDS = _number(float, low=1e-9, what="a positive number of seconds")
RATE = _number(float, low=1e-12, what="a positive learning rate")


def _flow_arguments(flow, args: argparse.Namespace) -> dict[str, Any]:
    """Every parameter of `flow`, taken from the option of the same name (paths as text, as flows take them)."""
    return {
        name: str(value) if isinstance(value := getattr(args, name), Path) else value
        for name in inspect.signature(flow.fn).parameters
    }


def _run_flow(flow, args: argparse.Namespace) -> dict[str, Any]:
    """Run `flow` with every parameter from the options; a failure names the run's page when a server keeps it."""
    from core.errors import RunCancelledError
    from flows.reports import run_url

    state = flow(**_flow_arguments(flow, args), return_state=True)
    if state.is_cancelled():
        raise RunCancelledError(state.message)
    try:
        return state.result()
    except Exception as error:
        if url := run_url(state.state_details.flow_run_id):
            error.add_note(f"the run: {url}")
        raise


def data_root(args: argparse.Namespace, *, must_exist: bool, before: str = ""):
    """`--data-dir` (with `--scratch-dir`) as a DataRoot; a local one is refused with a sentence when it is a
    file, or missing where it must hold inputs."""
    from core.errors import PipelineError
    from storage.layout import DataRoot
    from storage.objects import is_object_store

    if not is_object_store(args.data_dir):
        data_dir = Path(args.data_dir)
        if data_dir.exists() and not data_dir.is_dir():
            raise PipelineError(f"--data-dir {data_dir} is a file, not a folder: give the data root's folder.")
        if must_exist and not data_dir.is_dir():
            raise PipelineError(f"--data-dir {data_dir} does not exist: give the data root that holds {before}.")
    return DataRoot(args.data_dir, args.scratch_dir)


def _fetch(args: argparse.Namespace) -> dict[str, Any]:
    from storage.digests import sha256_of
    from tasks.download import download_file

    path = download_file(
        args.url, args.dest, expected_bytes=args.expected_bytes, sha256=args.sha256, retries=args.retries,
        read_timeout=args.read_timeout_seconds,
    )
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": args.sha256 or sha256_of(path)}


def _extract(args: argparse.Namespace) -> dict[str, Any]:
    from storage.extraction import class_folders
    from tasks.extract import extract_archive

    top = extract_archive(args.archive, args.dest, expected_classes=args.expected_classes or None)
    return {"folder": str(top), "classes": class_folders(top)}


def _shards(args: argparse.Namespace) -> dict[str, Any]:
    from storage.letters import letter_folder
    from tasks.decode import decode_to_shards
    from tasks.stage import publish
    from tasks.unpack import unpack_archive

    layout = data_root(args, must_exist=False)
    layout.check_writable()
    source = args.source
    if source.is_file() and not args.from_archive:
        source = unpack_archive(source, layout.packed(source))
        publish(layout, [letter_folder(source, letter) for letter in SEED_FACTS.LETTERS])  # the decode tasks' inputs
    out_dir = layout.shards(args.source)
    manifests = decode_to_shards(source, out_dir, min_images=args.min_images, workers=args.workers)
    publish(layout, [letter_folder(out_dir, letter) for letter in manifests])
    return {
        "shards": layout.url(out_dir),
        "images": sum(m["images"] for m in manifests.values()),
        "rejected": sum(len(m["rejected"]) for m in manifests.values()),
        "per_letter": {letter: m["images"] for letter, m in manifests.items()},
    }


def _splits(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.splits import splits_task

    layout = data_root(args, must_exist=True, before="shards/ (run `notmnist shards` first)")
    layout.check_writable()
    manifest = splits_task.fn(  # the stage through its boundary (inputs fetched, output published), without Prefect
        layout, train_size=args.train_size, valid_size=args.valid_size, test_size=args.test_size, seed=args.seed,
        dedup=args.dedup,
    )
    return {
        "folder": layout.url(layout.splits(manifest["key"])),
        "fingerprint": manifest["fingerprint"],
        "rows": {split: info["rows"] for split, info in manifest["splits"].items()},
        "overlap_seed_sampling": manifest["overlap"]["seed_sampling"],
        "overlap_after_dedup": manifest["overlap"]["after_dedup"],
    }


def _without_checks(args: argparse.Namespace, *names: str) -> None:
    """With --no-checks, the named size and sha256 options become None (nothing checked)."""
    from core.errors import PipelineError

    given = [f"--{name.replace('_', '-')}" for name in names if "sha256" in name and getattr(args, name)
             and getattr(args, name) != SEED_FACTS.MNIST_SHA256]
    if args.no_checks and given:
        raise PipelineError(f"--no-checks turns off the check {', '.join(given)} asks for: give one or the other.")
    if args.no_checks:
        for name in names:
            setattr(args, name, None)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from flows.notmnist import notmnist_pipeline
    from tasks.splits import check_parameters

    data_root(args, must_exist=False)
    _without_checks(args, "large_bytes", "large_sha256", "small_bytes", "small_sha256")
    check_parameters({"train": args.train_size, "valid": args.valid_size, "test": args.test_size}, args.dedup)
    return _run_flow(notmnist_pipeline, args)


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from core.errors import PipelineError
    from flows.train import train, train_flow
    from storage.splits import newest_splits

    layout = data_root(args, must_exist=True, before="splits/ (run `notmnist splits` first)")
    if not args.splits and layout.store is not None:
        raise PipelineError(f"Name the split folder to train on with --splits: {layout.location} is an object store.")
    if not args.splits:
        args.splits = newest_splits(layout.splits_root, "mnist-" if args.experiment == "mnist" else "train").name
    arguments = _flow_arguments(train_flow, args)
    training = {name: arguments[name] for name in ("epochs", "batch_size", "learning_rate", "seed")}
    return train(layout, args.experiment, args.splits, training, args.train_deployment, args.train_timeout_seconds)


def _mnist(args: argparse.Namespace) -> dict[str, Any]:
    from flows.mnist import mnist_pipeline

    data_root(args, must_exist=False)
    _without_checks(args, "expected_bytes", "sha256")
    return _run_flow(mnist_pipeline, args)


def _iris(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.reporting import import_keras_quietly

    import_keras_quietly()
    from flows.iris import iris_pipeline

    data_root(args, must_exist=False)
    return _run_flow(iris_pipeline, args)


def _predict(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.reporting import import_keras_quietly

    import_keras_quietly()
    from tasks.predict import predict_files

    return predict_files(args.model, args.images, top=args.top)


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.reporting import import_keras_quietly

    import_keras_quietly()
    from tasks.predict import evaluate_model

    return evaluate_model(args.model, args.data, split=args.split)


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


def data_dir_options(sub: argparse.ArgumentParser, default: str = "data") -> None:
    sub.add_argument("--data-dir", default=default,
                     help="data root: a folder, or s3://BUCKET/PREFIX (endpoint and keys from the AWS_* variables)")
    sub.add_argument("--scratch-dir", default=None,
                     help="local working copy of an s3:// data root: downloads, files being written "
                          "(default: ~/.cache/notmnist/s3/BUCKET/PREFIX; not used with a local --data-dir)")


def _split_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--train-size", type=POSITIVE, default=SEED_FACTS.TRAIN_SIZE, help="training rows, a multiple of 10 (a tenth per class)")
    sub.add_argument("--valid-size", type=POSITIVE, default=SEED_FACTS.VALID_SIZE, help="validation rows, a multiple of 10")
    sub.add_argument("--test-size", type=POSITIVE, default=SEED_FACTS.TEST_SIZE, help="test rows, a multiple of 10")
    sub.add_argument(
        "--dedup", choices=DEDUP_MODES, default=DEDUP,
        help="none: the seed's sampling; cross-split: no valid/test image in train, no test image in valid; "
        "all: also no repeats within a split",
    )


def _training_options(
    sub: argparse.ArgumentParser, *, epochs: int = SEED_FACTS.EPOCHS, batch_size: int = SEED_FACTS.BATCH_SIZE,
    learning_rate: float = SEED_FACTS.LEARNING_RATE, optimizer: str = "Adadelta",
) -> None:
    sub.add_argument("--seed", type=SEED_VALUE, default=SEED_FACTS.SEED, help="seed of the shuffles and the weights")
    sub.add_argument("--epochs", type=POSITIVE, default=epochs, help="training epochs (the seed's value)")
    sub.add_argument("--batch-size", type=POSITIVE, default=batch_size, help="training batch size (the seed's value)")
    sub.add_argument("--learning-rate", type=RATE, default=learning_rate,
                     help=f"{optimizer}'s learning rate (the seed's value)")


def letter_task_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--workers", type=POSITIVE, default=None,
                     help="decode processes (threads with --task-runner threads; the local Dask cluster's workers "
                          "with dask and no address); default: one per core")
    sub.add_argument("--task-runner", choices=TASK_RUNNERS, default=TASK_RUNNERS[0],
                     help="where the per-letter decode tasks run: this machine's processes, threads, or a Dask cluster")
    sub.add_argument("--dask-address", default=None,
                     help="scheduler of an existing Dask cluster (tcp://HOST:8786) for --task-runner dask "
                          "(default: a local cluster started for the run)")


def _dispatch_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--train-deployment", default=None,
                     help="send training to this deployment (e.g. train/gpu) instead of training here")
    sub.add_argument("--train-timeout-seconds", type=SECONDS, default=TRAIN_TIMEOUT_SECONDS,
                     help="how long to wait for a training sent to a deployment")


def _read_timeout_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--read-timeout-seconds", type=SECONDS, default=READ_TIMEOUT_SECONDS,
                     help="a download attempt ends after this long without data; the next one resumes")


def _no_checks_option(sub: argparse.ArgumentParser, what: str) -> None:
    sub.add_argument("--no-checks", action="store_true", help=f"check neither {what} (for a mirror with other files)")


def _add_fetch(commands) -> None:
    fetch = commands("fetch", _fetch, "Download a file with size/sha256 checks, resuming any partial download.")
    fetch.add_argument("url", help="http(s) or file:// URL, or a local path")
    fetch.add_argument("--dest", type=Path, default=Path("."), help="folder to put the file in")
    fetch.add_argument("--expected-bytes", type=COUNT, default=None, help="exact size the file must have")
    fetch.add_argument("--sha256", type=SHA256, default=None, help="hex sha256 the file must have")
    fetch.add_argument("--retries", type=COUNT, default=5, help="further attempts after a network or 5xx error")
    _read_timeout_option(fetch)


def _add_extract(commands) -> None:
    extract = commands("extract", _extract, "Safely extract a notMNIST .tar.gz (refuses hostile members).")
    extract.add_argument("archive", type=Path, help="the .tar.gz to extract")
    extract.add_argument("--dest", type=Path, default=Path("."), help="folder to extract into")
    extract.add_argument(
        "--expected-classes", type=COUNT, default=10, help="class folders the archive must hold (0: do not check)"
    )


def _add_shards(commands) -> None:
    shards = commands("shards", _shards, "Decode a notMNIST archive or extracted folder into Parquet shards.")
    shards.add_argument("source", type=Path, metavar="ARCHIVE_OR_FOLDER",
                        help="a .tar.gz (unpacked first, into the data root's packed/, as the pipeline does), "
                             "its extracted top folder, or its packed folder")
    data_dir_options(shards)
    shards.add_argument("--min-images", type=COUNT, default=0, help="fail when a letter has fewer usable images")
    shards.add_argument("--workers", type=POSITIVE, default=None, help="decode processes (default: one per core)")
    shards.add_argument(
        "--from-archive", action="store_true",
        help="read the PNGs straight from the archive, writing nothing but the shards (no packed/ copy)",
    )


def _add_splits(commands) -> None:
    splits = commands(
        "splits", _splits,
        "Build class-balanced train/valid (from notMNIST_large) and test (from notMNIST_small) splits.",
    )
    data_dir_options(splits)
    _split_options(splits)
    splits.add_argument("--seed", type=SEED_VALUE, default=SEED_FACTS.SEED, help="seed of the shuffles (the seed's value)")


def _add_run(commands) -> None:
    run = commands("run", _run, "Run the whole notMNIST pipeline as a Prefect flow (download to trained model).")
    data_dir_options(run)
    run.add_argument("--base-url", default=SEED_FACTS.NOTMNIST_BASE_URL, help="where both archives are published")
    for size, name, archive, default_bytes, minimum in (
        ("large", "valid and train are drawn from", SEED_FACTS.LARGE_ARCHIVE, SEED_FACTS.LARGE_BYTES,
         SEED_FACTS.MIN_IMAGES_LARGE),
        ("small", "test is drawn from", SEED_FACTS.SMALL_ARCHIVE, SEED_FACTS.SMALL_BYTES, SEED_FACTS.MIN_IMAGES_SMALL),
    ):
        run.add_argument(f"--{size}-archive", default=archive, help=f"file name under --base-url that {name}")
        run.add_argument(f"--{size}-bytes", type=COUNT, default=default_bytes, help=f"size the {size} archive must have")
        run.add_argument(f"--{size}-sha256", type=SHA256, default=None, help=f"sha256 the {size} archive must have")
        run.add_argument(f"--min-images-{size}", type=COUNT, default=minimum,
                         help=f"fewest usable images per letter of the {size} archive")
    _no_checks_option(run, "the archives' sizes nor their sha256")
    _read_timeout_option(run)
    letter_task_options(run)
    _split_options(run)
    _training_options(run)
    _dispatch_options(run)


def _add_train(commands) -> None:
    train = commands("train", _train, "Train the seed's CNN on a split folder (the newest under --data-dir by default).")
    data_dir_options(train)
    train.add_argument("--splits", default="", help="a split folder's name under <data-dir>/splits (default: the newest)")
    train.add_argument("--experiment", choices=("notmnist", "mnist"), default="notmnist",
                       help="which dataset the splits hold (its normalisation)")
    _training_options(train)
    _dispatch_options(train)


def _add_mnist(commands) -> None:
    mnist = commands("mnist", _mnist, "The seed's MNIST CNN: fetch mnist.npz (verified), convert, train.")
    data_dir_options(mnist)
    mnist.add_argument("--url", default=SEED_FACTS.MNIST_URL, help="where mnist.npz is (http(s), file:// or a path)")
    mnist.add_argument("--expected-bytes", type=COUNT, default=SEED_FACTS.MNIST_BYTES, help="size the file must have")
    mnist.add_argument("--sha256", type=SHA256, default=SEED_FACTS.MNIST_SHA256, help="sha256 the file must have")
    _no_checks_option(mnist, "the file's size nor its sha256")
    _read_timeout_option(mnist)
    _training_options(mnist)
    _dispatch_options(mnist)


def _add_iris(commands) -> None:
    iris = commands("iris", _iris, "The seed's softmax regression on iris, sparse and one-hot labels.")
    data_dir_options(iris)
    _training_options(
        iris, epochs=SEED_FACTS.IRIS_EPOCHS, batch_size=SEED_FACTS.IRIS_BATCH_SIZE,
        learning_rate=SEED_FACTS.IRIS_LEARNING_RATE, optimizer="SGD",
    )


def _add_predict(commands) -> None:
    predict = commands("predict", _predict, "Print the letter (and its probability) of each PNG: files, folders or an archive.")
    predict.add_argument("model", type=Path, metavar="MODEL", help="a model folder (models/<key>) or its model.keras")
    predict.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="PNG files, folders of them, or a .tar.gz")
    predict.add_argument("--top", type=POSITIVE, default=1, help="how many of the most likely classes to list")


def _add_evaluate(commands) -> None:
    evaluate = commands("evaluate", _evaluate, "Score a model on a split folder, or on a folder of letter folders.")
    evaluate.add_argument("model", type=Path, metavar="MODEL", help="a model folder (models/<key>) or its model.keras")
    evaluate.add_argument("data", type=Path, metavar="DATA",
                          help="a split folder (splits/<key>) or a folder with one folder of PNGs per class (A ... J)")
    evaluate.add_argument("--split", choices=("train", "valid", "test"), default="test",
                          help="which split of a split folder to score")


COMMANDS = (
    _add_fetch, _add_extract, _add_shards, _add_splits, _add_run, _add_train, _add_mnist, _add_iris, _add_predict,
    _add_evaluate,
)
# More commands come from installed packages that declare them (the offline demo's `demo` and `make-archives`,
# demo/commands.py): the product's layers never import the demo.
COMMAND_PLUGINS = "notmnist.commands"


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
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = subparsers.add_parser(
            name, help=help_text, description=help_text, parents=[common], formatter_class=_HelpFormatter
        )
        sub.set_defaults(handler=handler)
        return sub

    for add in COMMANDS:
        add(command)
    for plugin in sorted(metadata.entry_points(group=COMMAND_PLUGINS), key=lambda point: point.name):
        plugin.load()(command)
    return parser


def _version() -> str:
    try:
        return metadata.version("notmnist-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"


def _print_human(result: dict[str, Any]) -> None:
    """Key and value a line; below its key, a list of records (predictions, rejected files) one record a line, a
    mapping (per-class accuracy) one entry a line, and a matrix (the confusion matrix) as a table with the classes."""
    width = max((len(key) for key in result), default=0)
    for key, value in result.items():
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            print(f"{key} ({len(value)}):")
            for item in value:
                line = "  ".join(_cell(v) for k, v in item.items() if k != "top")
                ranked = ", ".join(f"{entry['class']} {entry['probability']:.4f}" for entry in item.get("top", [])[1:])
                print(f"  {line}" + (f"  (then {ranked})" if ranked else ""))
        elif isinstance(value, dict) and value:
            print(f"{key}:")
            inner = max(len(str(name)) for name in value)
            for name, entry in value.items():
                print(f"  {str(name):<{inner}}  {_cell(entry)}")
        elif isinstance(value, list) and value and all(isinstance(row, list) for row in value):
            print(f"{key} (rows: true, columns: predicted):")
            names = [str(name) for name in result.get("class_names") or range(len(value))]
            cells = [[str(cell) for cell in row] for row in value]
            column = max(len(text) for text in [*names, *(cell for row in cells for cell in row)])
            label = max(len(name) for name in names)
            print("  " + " " * label + "  " + " ".join(f"{name:>{column}}" for name in names))
            for name, row in zip(names, cells):
                print(f"  {name:<{label}}  " + " ".join(f"{cell:>{column}}" for cell in row))
        elif isinstance(value, list) and value and all(isinstance(item, (str, int, float)) for item in value):
            print(f"{key:<{width}}  {' '.join(_cell(item) for item in value)}")
        else:
            print(f"{key:<{width}}  {value}")


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class _RunFormatter(logging.Formatter):
    """`LEVEL [run name] message`: each line says which task or flow run it comes from."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(run)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        name = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        record.run = f"[{name}] " if name else ""
        return super().format(record)


def _no_tracebacks(record: logging.LogRecord) -> bool:
    """Console filter without --debug: a log record carrying a traceback is left out (the run's UI keeps it)."""
    return record.exc_info is None


def _not_relayed(record: logging.LogRecord) -> bool:
    """Console filter: an epoch line the pipeline repeats in its own run's log was printed once already."""
    return not getattr(record, "relayed", False)


def prefect_api_problem(error: BaseException) -> str | None:
    """What to do, in one line, when `error` (or what caused it) is Prefect's API not answering, else None."""
    while error is not None:
        text = str(error)
        if "Timed out while attempting to connect to ephemeral Prefect API server" in text:
            seconds = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "20")
            return (f"Prefect's embedded API did not start within {seconds} s (a busy machine, or a new Prefect home "
                    "creating its database): start `prefect server start` in another terminal and export "
                    "PREFECT_API_URL=http://127.0.0.1:4200/api, or allow it longer with "
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.")
        if text.startswith("Failed to reach API at "):
            url = text.removeprefix("Failed to reach API at ")
            return (f"The Prefect API at {url} does not answer: start it (`prefect server start`) or correct "
                    "PREFECT_API_URL; unset, each command starts an embedded API of its own.")
        error = error.__cause__ or error.__context__
    return None


def cancelled(error: BaseException) -> bool:
    """Whether `error` says a run was cancelled: the pipeline's own, or a training run's state read directly."""
    from prefect.exceptions import CancelledRun

    from core.errors import RunCancelledError

    return isinstance(error, (RunCancelledError, CancelledRun))


def _working_folder(args: argparse.Namespace) -> Path:
    """The local folder a command writes in: its scratch folder, its local data root, or the current folder."""
    from storage.objects import is_object_store

    for folder in (getattr(args, "scratch_dir", None), getattr(args, "data_dir", None)):
        if folder and not is_object_store(str(folder)):
            return Path(folder)
    return Path.cwd()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `notmnist` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if args.debug else "3")  # TensorFlow's C++ start-up chatter
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the embedded server would phone home
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_API_STARTUP_SECONDS))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_RunFormatter())
        handler.addFilter(_not_relayed)
    if not args.debug:  # a failed run's exception is the one line below, not a traceback per task
        for handler in logging.getLogger().handlers:
            handler.addFilter(_no_tracebacks)
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.debug else logging.WARNING)  # one line per API call
    from core.errors import PipelineError
    from storage.disk import disk_full, out_of_space

    try:
        result = args.handler(args)
    except KeyboardInterrupt:
        print("notmnist: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    except Exception as error:  # one line for the user; the traceback only on request
        if cancelled(error):
            from tasks.cancellation import INTERRUPT, stop_cause

            print(f"notmnist {args.command}: cancelled: {error}", file=sys.stderr)
            return 130 if stop_cause() == INTERRUPT else 1
        if args.debug:
            traceback.print_exc()
        elif not isinstance(error, PipelineError) and out_of_space(error):  # met outside a stage and the flows
            error = disk_full(error, _working_folder(args), f"what `notmnist {args.command}` wrote")
        elif isinstance(error, OSError) and error.strerror:  # a path that cannot serve: say which and why
            error = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
        elif problem := prefect_api_problem(error):
            error = problem
        elif not isinstance(error, PipelineError):
            print("notmnist: unexpected failure; rerun with --debug for the traceback.", file=sys.stderr)
        print(f"notmnist {args.command}: error: {error}", file=sys.stderr)
        for note in getattr(error, "__notes__", []):
            print(f"notmnist {args.command}: {note}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, default=str))
    else:
        _print_human(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
