"""The `notmnist` command line: one subcommand per stage or pipeline.

The pipeline commands (run, train, mnist, iris) have one option per parameter of their flow, made from
its signature and docstring (flows/options.py): same name (`--min-images-large` is `min_images_large`),
default, range and help, and every option is passed on (`_flow_arguments`). A command's options are
built only when it runs (or asks for --help), so importing a flow costs `notmnist --help` nothing.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Collection
from importlib import metadata
from pathlib import Path
from typing import Any

from core import seed as SEED_FACTS
from core.defaults import EPHEMERAL_API_STARTUP_SECONDS
from core.parameters import Count, Positive, Sha256
from flows.embedded_api import EmbeddedAPI, start_if_unset
from flows.options import add_flow_options, option_type

Handler = Callable[[argparse.Namespace], dict[str, Any]]
Options = Callable[[argparse.ArgumentParser], None]
COUNT, POSITIVE, SHA256 = option_type(Count), option_type(Positive), option_type(Sha256)
LOCATION = ("data_dir", "scratch_dir")  # where a command reads and writes: a data root and its working copy


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
        if action.default is None or action.default is False or action.default == "":
            return action.help or ""
        return super()._get_help_string(action)


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as one JSON object")
    common.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    return common


def pipeline_options(sub: argparse.ArgumentParser, *names: str, **defaults: Any) -> None:
    """The options of `notmnist_pipeline`'s parameters `names`, for the commands that take some of them."""
    from flows.notmnist import notmnist_pipeline

    add_flow_options(sub, notmnist_pipeline, only=names, defaults=defaults)


def _no_checks_option(sub: argparse.ArgumentParser, what: str) -> None:
    sub.add_argument("--no-checks", action="store_true", help=f"check neither {what} (for a mirror with other files)")


def _fetch_options(fetch: argparse.ArgumentParser) -> None:
    fetch.add_argument("url", help="http(s) or file:// URL, or a local path")
    fetch.add_argument("--dest", type=Path, default=Path("."), help="folder to put the file in")
    fetch.add_argument("--expected-bytes", type=COUNT, default=None, help="exact size the file must have")
    fetch.add_argument("--sha256", type=SHA256, default=None, help="hex sha256 the file must have")
    fetch.add_argument("--retries", type=COUNT, default=5, help="further attempts after a network or 5xx error")
    pipeline_options(fetch, "read_timeout_seconds")


def _extract_options(extract: argparse.ArgumentParser) -> None:
    extract.add_argument("archive", type=Path, help="the .tar.gz to extract")
    extract.add_argument("--dest", type=Path, default=Path("."), help="folder to extract into")
    extract.add_argument(
        "--expected-classes", type=COUNT, default=10, help="class folders the archive must hold (0: do not check)"
    )


def _shards_options(shards: argparse.ArgumentParser) -> None:
    shards.add_argument("source", type=Path, metavar="ARCHIVE_OR_FOLDER",
                        help="a .tar.gz (unpacked first, into the data root's packed/, as the pipeline does), "
                             "its extracted top folder, or its packed folder")
    pipeline_options(shards, *LOCATION)
    shards.add_argument("--min-images", type=COUNT, default=0, help="fail when a letter has fewer usable images")
    shards.add_argument("--workers", type=POSITIVE, default=None, help="decode processes (default: one per core)")
    shards.add_argument(
        "--from-archive", action="store_true",
        help="read the PNGs straight from the archive, writing nothing but the shards (no packed/ copy)",
    )


def _splits_options(splits: argparse.ArgumentParser) -> None:
    pipeline_options(splits, *LOCATION, "train_size", "valid_size", "test_size", "dedup", "seed")


def _run_options(run: argparse.ArgumentParser) -> None:
    add_flow_options(run, _flow("run"))
    _no_checks_option(run, "the archives' sizes nor their sha256")


def _train_options(train: argparse.ArgumentParser) -> None:
    add_flow_options(train, _flow("train"))
    pipeline_options(train, "train_deployment", "train_timeout_seconds")


def _mnist_options(mnist: argparse.ArgumentParser) -> None:
    add_flow_options(mnist, _flow("mnist"))
    _no_checks_option(mnist, "the file's size nor its sha256")


def _iris_options(iris: argparse.ArgumentParser) -> None:
    add_flow_options(iris, _flow("iris"))


def _predict_options(predict: argparse.ArgumentParser) -> None:
    predict.add_argument("model", type=Path, metavar="MODEL", help="a model folder (models/<key>) or its model.keras")
    predict.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="PNG files, folders of them, or a .tar.gz")
    predict.add_argument("--top", type=POSITIVE, default=1, help="how many of the most likely classes to list")


def _evaluate_options(evaluate: argparse.ArgumentParser) -> None:
    evaluate.add_argument("model", type=Path, metavar="MODEL", help="a model folder (models/<key>) or its model.keras")
    evaluate.add_argument("data", type=Path, metavar="DATA",
                          help="a split folder (splits/<key>) or a folder with one folder of PNGs per class (A ... J)")
    evaluate.add_argument("--split", choices=("train", "valid", "test"), default="test",
                          help="which split of a split folder to score")


def _flow(command: str):
    """The flow behind a pipeline command (imported on demand: the others never pay for it)."""
    import importlib

    module, name = FLOWS[command]
    return getattr(importlib.import_module(module), name)


FLOWS = {"run": ("flows.notmnist", "notmnist_pipeline"), "train": ("flows.train", "train_flow"),
         "mnist": ("flows.mnist", "mnist_pipeline"), "iris": ("flows.iris", "iris_pipeline")}
COMMANDS: tuple[tuple[str, Handler, str, Options], ...] = (
    ("fetch", _fetch, "Download a file with size/sha256 checks, resuming any partial download.", _fetch_options),
    ("extract", _extract, "Safely extract a notMNIST .tar.gz (refuses hostile members).", _extract_options),
    ("shards", _shards, "Decode a notMNIST archive or extracted folder into Parquet shards.", _shards_options),
    ("splits", _splits, "Build class-balanced train/valid (from notMNIST_large) and test (from notMNIST_small) splits.",
     _splits_options),
    ("run", _run, "Run the whole notMNIST pipeline as a Prefect flow (download to trained model).", _run_options),
    ("train", _train, "Train the seed's CNN on a split folder (the newest under --data-dir by default).",
     _train_options),
    ("mnist", _mnist, "The seed's MNIST CNN: fetch mnist.npz (verified), convert, train.", _mnist_options),
    ("iris", _iris, "The seed's softmax regression on iris, sparse and one-hot labels.", _iris_options),
    ("predict", _predict, "Print the letter (and its probability) of each PNG: files, folders or an archive.",
     _predict_options),
    ("evaluate", _evaluate, "Score a model on a split folder, or on a folder of letter folders.", _evaluate_options),
)
# More commands come from installed packages that declare them (the offline demo's `demo` and `make-archives`,
# demo/commands.py): the product's layers never import the demo.
COMMAND_PLUGINS = "notmnist.commands"
FLOW_PLUGINS = "notmnist.flow_commands"  # which of those commands run flows: they get an embedded API like `run`


def build_parser(building: Collection[str | None] | None = None) -> argparse.ArgumentParser:
    """The argument parser with every subcommand, each option documented with its default; only the commands in
    `building` (all when None) get their options, which for a pipeline command means importing its flow."""
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="notmnist",
        description="Download, verify, decode and train on notMNIST (and the seed's MNIST and iris models).",
        formatter_class=_HelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Handler, help_text: str, options: Options | None = None) -> argparse.ArgumentParser:
        sub = subparsers.add_parser(
            name, help=help_text, description=help_text, parents=[common], formatter_class=_HelpFormatter
        )
        sub.set_defaults(handler=handler)
        if options is not None and (building is None or name in building):
            options(sub)
        return sub

    for name, handler, help_text, options in COMMANDS:
        command(name, handler, help_text, options)
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


PACKAGES = ("core", "storage", "tasks", "flows", "demo")  # the loggers the project's modules log to


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


def prefect_api_problem(error: BaseException, seconds: float) -> str | None:
    """What to do, in one line, when `error` (or what caused it) is Prefect's API not answering (an embedded one
    given `seconds` to start), else None."""
    while error is not None:
        text = str(error)
        if "Timed out while attempting to connect to ephemeral Prefect API server" in text:
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


def _runs_flows(command: str | None, argv: list[str]) -> bool:
    """Whether `command` runs Prefect flows (and so needs an API), rather than only asking for help."""
    if {"-h", "--help", "--version"} & set(argv):
        return False
    return command in FLOWS or command in metadata.entry_points(group=FLOW_PLUGINS).names


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
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # while the command still imports or reads its options: nothing ran yet
        print("notmnist: interrupted.", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    word = next((word for word in argv if not word.startswith("-")), None)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the embedded server would phone home
    api = start_if_unset() if _runs_flows(word, argv) else None  # starts while the command imports
    try:
        return _command(argv, word, api)
    finally:
        if api is not None:  # now, not at exit: whoever calls main() in a longer process keeps no server running
            api.stop()


def _command(argv: list[str], word: str | None, api: EmbeddedAPI | None) -> int:
    args = build_parser({word}).parse_args(argv)  # --help and a bad option exit here
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if args.debug else "3")  # TensorFlow's C++ start-up chatter
    level = logging.DEBUG if args.debug else logging.INFO
    logging.basicConfig(level=level)  # a no-op once Prefect set up logging: its root logger stays at WARNING
    for package in PACKAGES:  # so the project's own lines outside a run (a stage a command calls) are let through here
        logging.getLogger(package).setLevel(level)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_RunFormatter())
        handler.addFilter(_not_relayed)
    if not args.debug:  # a failed run's exception is the one line below, not a traceback per task
        for handler in logging.getLogger().handlers:
            handler.addFilter(_no_tracebacks)
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.debug else logging.WARNING)  # one line per API call
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, get_current_settings, temporary_settings
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY as HEARTBEAT
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP

    from core.errors import PipelineError
    from storage.disk import disk_full, out_of_space

    # Prefect reads its settings once, when it is imported (building a flow's options imports it): the embedded
    # API's start-up time goes into them here, unless the user's environment gives one.
    startup = {} if STARTUP.name in os.environ else {STARTUP: EPHEMERAL_API_STARTUP_SECONDS}
    if api is not None and get_current_settings().api.url:  # a profile or settings file names the API to use
        api.stop()
        api = None
    answered = False  # whether the embedded API answered: an error after that may be its ending under the command
    try:
        if prepare := getattr(args, "prepare", None):  # needs no API: done while the embedded one starts
            prepare(args)
        if api is not None:
            embedded = api.wait(startup.get(STARTUP, STARTUP.value()))
            answered = True
            startup |= {setting: embedded[setting.name] for setting in (PREFECT_API_URL, PREFECT_UI_URL)}
            # No flow run heartbeats: they tell a standing server that a run still lives (its zombie detection), and
            # this API ends with the command. Each flow run waited up to a second at its end for the heartbeat thread,
            # which sleeps in whole seconds.
            startup[HEARTBEAT] = None
        with temporary_settings(updates=startup):
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
        elif answered and api.process.poll() is not None:  # the command's own API went away under it
            api.stop()  # what it said, if anything, above this line
            error = (f"Prefect's embedded API ended during the command (exit code {api.process.returncode}): rerun "
                     "the same command, which resumes from the stages that finished; a server started with `prefect "
                     "server start` (PREFECT_API_URL=http://127.0.0.1:4200/api) outlives commands")
        elif not isinstance(error, PipelineError) and out_of_space(error):  # met outside a stage and the flows
            error = disk_full(error, _working_folder(args), f"what `notmnist {args.command}` wrote")
        elif isinstance(error, OSError) and error.strerror:  # a path that cannot serve: say which and why
            error = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
        elif problem := prefect_api_problem(error, startup.get(STARTUP, STARTUP.value())):
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
