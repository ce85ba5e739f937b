"""The stage boundary: every data stage reads and writes the data root through this one piece of code.

A stage is a plain function whose first argument is the data root (`storage.layout.DataRoot`, one
value, never taken apart) and that works in the root's working copy. `stage_task` makes it a Prefect
task that, around the function:

- asks the data root "is it done?" before Prefect looks up its cache: the stage's `outputs` (the one
  statement of where it writes, which the function uses too) must be committed in the data root,
  intact by the store's listing, and made from the current inputs (`current`). When they are not, the
  record stored under the key describes something that is gone or damaged: it is forgotten (with one
  warning line naming the damage), so the stage runs again and publishes a new generation;
- when it runs, fetches the folders it `reads` (verified against their manifests) and the outputs the
  data root already holds, calls the function, and publishes its outputs, replacing a damaged copy.

Prefect's cache records live in the data root (`<root>/_prefect/records/`, through `DataRootRecords`),
and a key holds the data root's location, never a machine's path: a second machine with its own
working copy finds every finished stage Cached. Records are JSON, never pickles: a record read from
a shared bucket runs no code.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.filesystems import WritableFileSystem
from prefect.serializers import JSONSerializer
from prefect.utilities.hashing import hash_objects

from core.errors import PipelineError
from storage.disk import writing
from storage.folders import manifest_identity
from storage.layout import DataRoot
from storage.objects import is_object_store
from storage.records import delete_record, read_record, write_record
from tasks.cancellation import cancellable
from tasks.reporting import stage_logger

Parameters = dict[str, Any]
_SERIALIZER = JSONSerializer().model_dump(mode="json")  # what every stage's record names, exactly
Outputs = Callable[[DataRoot, Parameters], list[Path] | None]  # None: cannot be known yet (inputs missing)
Current = Callable[[DataRoot, Parameters, dict[Path, dict]], bool]


class DataRootRecords(WritableFileSystem):
    """Prefect result storage that keeps each record where its key says: in the data root it describes.

    A stage's cache key is the record's location (`DataRoot.record_location`), an s3:// URL or a local
    path, so this one block serves every data root, and every machine that reaches the data root
    reads the same records.
    """

    _block_type_name = "notMNIST data root records"
    _block_type_slug = "notmnist-data-root-records"

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        data = read_record(_location(path))
        if data is None:
            raise ValueError(f"No record at {path}")  # what Prefect's own storages raise for a missing path
        _check_record(path, data)
        return data

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> None:
        write_record(_location(path), content)

    def delete_path(self, path: str) -> None:
        """Forget the record at `path`."""
        delete_record(_location(path))

    def _resolve_path(self, path: str) -> None:
        # Prefect asks an unsaved storage to resolve keys to paths; these keys are full locations already.
        return None


def _check_record(path: str, data: bytes) -> None:
    """Refuse a record this project did not write: one naming another serializer or decoder (Prefect would use it,
    and a pickle or a named function runs code), or holding an object to rebuild by class name."""
    try:
        record = json.loads(data)
        serializer = record["metadata"]["serializer"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a stage's record") from error
    if serializer != _SERIALIZER or b'"__class__"' in data:
        raise ValueError(f"{path} names a serializer or objects no stage writes; it is ignored")


def _location(key: str) -> str:
    """Where the record of `key` is: the key itself for a stage's record; a key that names no place (Prefect's
    record of a failed run, under a random name) goes where Prefect's own local storage would keep it."""
    if is_object_store(key) or Path(key).is_absolute():
        return key
    from prefect.settings import get_current_settings

    return str(Path(get_current_settings().results.local_storage_path).expanduser() / key)


RECORDS = DataRootRecords()
# Prefect takes a task's result storage only as a block saved on its API. A stage names it by its slug until the
# flows save it (`open_data_root`); then the stages hold the saved block itself, since Prefect loads a block named
# by its slug from the API again on every task run (measured: about 0.35 s of CPU each, on 2 cores).
RECORDS_BLOCK = f"{DataRootRecords._block_type_slug}/records"
_STAGES: list = []  # every cached stage's task
_saved_on: dict[str, DataRootRecords] = {}


def save_records_block() -> None:
    """Save the records block on the Prefect API this process uses (once per API), and give it to every stage."""
    from prefect.settings import get_current_settings

    api = str(get_current_settings().api.url or "")
    saved = _saved_on.get(api) if api else None
    if saved is None:
        saved = DataRootRecords()
        saved.save(RECORDS_BLOCK.split("/")[1], overwrite=True)
        if api:
            _saved_on[api] = saved
    for stage in _STAGES:
        stage.result_storage = saved


@dataclass(frozen=True)
class Stage:
    """What a stage reads from and writes to the data root, as functions of its data root and parameters."""

    outputs: Outputs
    reads: Outputs = lambda root, parameters: []
    current: Current | None = None  # are committed outputs those of the current inputs? (default: yes)
    after_publish: Callable[[DataRoot, Parameters], None] | None = None  # once the outputs are in the data root
    # What a run wrote, from its result, where that can differ from `outputs` read from the data root at another
    # moment (an input published again meanwhile): default, `outputs`.
    built: Callable[[DataRoot, Parameters, Any], list[Path]] | None = None

    def written(self, root: DataRoot, parameters: Parameters, result: Any) -> list[Path]:
        """What a run of the stage wrote, to publish."""
        if self.built is not None:
            return self.built(root, parameters, result)
        return self.outputs(root, parameters) or []

    def fetch_outputs(self, root: DataRoot, parameters: Parameters) -> list[Path] | None:
        """The stage's outputs in this machine's working copy, fetched (verified) from the data root; None when the
        data root does not hold them all."""
        outputs = self.outputs(root, parameters)
        if not outputs or not all(root.fetch(path) for path in outputs):
            return None
        return outputs

    def identity(self, root: DataRoot, parameters: Parameters, logger=None) -> str | None:
        """The identity of the outputs when the data root holds them committed, intact and current, else None.

        Damage (an object missing, resized or written again since its folder was committed) is named in
        one warning line on `logger`.
        """
        outputs = self.outputs(root, parameters)
        if not outputs:
            return None
        manifests = {}
        for path in outputs:
            manifest, damage = root.commit_state(path)
            if damage is not None and logger is not None:
                logger.warning("Damaged in the data root: %s; this stage runs again to replace it", damage)
            if manifest is None:
                return None
            manifests[path] = manifest
        if self.current is not None and not self.current(root, parameters, manifests):
            return None
        return hash_objects(*(manifest_identity(manifest) for manifest in manifests.values()))


@dataclass
class StageCache(CachePolicy):
    """INPUTS (less `ignore`, the data root by its location) + TASK_SOURCE, stored in the data root, and
    served only while the stage's outputs are there (`Stage.identity`)."""

    stage: Stage | None = None
    ignore: Iterable[str] = field(default_factory=tuple)
    keyed_on: Callable[[Parameters], str] | None = None  # what stands in the key for ignored inputs

    def compute_key(self, task_ctx, inputs: Parameters, flow_parameters: Parameters, **kwargs) -> str | None:
        root = inputs["root"]
        if not isinstance(root, DataRoot):
            raise PipelineError(f"a stage's first argument is its DataRoot; got {root!r}")
        inputs_policy = INPUTS
        for name in (*self.ignore, "root"):
            inputs_policy = inputs_policy - name
        keys = [
            policy.compute_key(task_ctx=task_ctx, inputs=inputs, flow_parameters=flow_parameters, **kwargs)
            for policy in (inputs_policy, TASK_SOURCE)
        ]
        keys.append(root.location)  # the data root by its location: the same key on every machine
        if self.keyed_on is not None:
            keys.append(self.keyed_on(inputs))
        key = root.record_location(hash_objects(*keys, raise_on_failure=True))
        if self.stage is not None and self.stage.identity(root, inputs, stage_logger(__name__)) is None:
            RECORDS.delete_path(key)  # what it described is gone or damaged: the stage runs again
        return key


def stage_task(
    function: Callable[..., Any], *, stage: Stage, name: str, task_run_name: Any, cached: bool = True,
    ignore: Iterable[str] = (), keyed_on: Callable[[Parameters], str] | None = None, stops: bool = False,
    **options: Any,
):
    """`function(root, ...)` as a Prefect task that reads and writes the data root through `stage` (see the
    module docstring); with `cached`, its result is cached in the data root while its outputs are there; with
    `stops`, a run interrupted or cancelled while in it ends Cancelled (tasks/cancellation.py)."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        parameters = signature.bind(*args, **kwargs)
        parameters.apply_defaults()
        values = dict(parameters.arguments)
        root = values["root"] = DataRoot.of(values["root"])
        logger = stage_logger(function.__module__)
        with writing(_running(name, task_run_name, values), root.root):
            # Done already (a record lost, say): the working copy takes the data root's outputs, and the function
            # finds them. A local data root is its own working copy: nothing to take.
            if root.store is not None and stage.identity(root, values) is not None:
                in_working_copy(root, *stage.outputs(root, values))
            in_working_copy(root, *(stage.reads(root, values) or []))
            result = function(**values)
            publish(root, stage.written(root, values, result), logger)
            if stage.after_publish is not None:
                stage.after_publish(root, values)
        return result

    if stops:
        run = cancellable(run)
    if not cached:
        return task(name=name, task_run_name=task_run_name, **options)(run)
    stage_run = task(
        name=name, task_run_name=task_run_name, cache_policy=StageCache(stage=stage, ignore=tuple(ignore),
                                                                         keyed_on=keyed_on),
        persist_result=True, result_storage=RECORDS_BLOCK, result_serializer="json", **options,
    )(run)
    _STAGES.append(stage_run)
    return stage_run


def _running(name: str, run_name: Any, values: Parameters) -> str:
    """What a stage run writes, for an error: the output of its task run's name ("unpack notMNIST_large.tar.gz")."""
    try:
        name = run_name.format(**values) if isinstance(run_name, str) else run_name(values) if run_name else name
    except (KeyError, IndexError, ValueError, TypeError):
        pass  # a name template that asks for more than the parameters: the stage's name says enough
    return f"the output of `{name}`"


def open_data_root(location: str, scratch: str | None = None) -> DataRoot:
    """The data root a flow works on, checked first: one that cannot be written (a missing bucket, refused keys,
    an endpoint that does not answer, a read-only folder) fails here, in seconds, before any download."""
    root = DataRoot(location, scratch)
    root.check_writable()
    save_records_block()
    if root.store is not None:  # uploads cut short, left long enough to be nobody's upload in progress
        for generation in root.store.sweep():
            stage_logger(__name__).info("Removed %s, an upload no manifest names", generation)
    return root


def in_working_copy(root: DataRoot, *paths: Path) -> list[Path]:
    """`paths` of the data root in this machine's working copy, fetched (verified) where needed: what a stage reads,
    and what the reports read of a stage whose run was served from the cache, or ran on another machine."""
    for path in paths:
        if root.fetch(path):
            continue
        _, damage = root.commit_state(path)
        if damage is not None:
            raise PipelineError(f"{root.url(path)} is damaged in the data root ({damage}): rerun the pipeline, "
                                "and the stage that writes it runs again.")
        raise PipelineError(f"{root.url(path)} is not in the data root: rerun the pipeline, which builds it first.")
    return list(paths)


def publish(root: DataRoot, paths: Iterable[Path], logger=None) -> None:
    """Publish what a stage wrote; a damaged copy in the data root (the cache check has named it) is replaced."""
    for path in paths:
        if root.publish(path) is not None:
            (logger or stage_logger(__name__)).info("Published %s again, in place of the damaged copy", root.url(path))


def attach(root: DataRoot, paths: Iterable[Path]) -> None:
    """Copy files written beside a committed folder (a model's report and pictures) to the data root."""
    for path in paths:
        root.attach(path)


def retry_unless_pipeline_error(task, task_run, state) -> bool:
    """Prefect retry condition: a crash (a killed worker, a dropped connection) is worth a retry; bad input,
    which a retry would only meet again, is not."""
    try:
        state.result()
    except PipelineError:
        return False
    except Exception:
        return True
    return False
