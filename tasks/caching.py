"""The stages' cache policy (a cached result counts only while the output it describes is on disk, intact),
and their retry condition.

A key is the task's inputs (less those that do not change the output, such as the worker count) and
its source. Before Prefect looks the key up, the policy asks storage/ whether the output those inputs
lead to is there and intact (a committed folder whose files match their digests, a download that
passes its checks). When it is not (never built, deleted, damaged), the record stored under the key
describes something that is gone: the policy forgets it, so the stage runs and rebuilds what it
owns, and its new result is stored under the same key for the next run. Large arrays never enter a
key: stages pass paths and manifests.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.filesystems import LocalFileSystem
from prefect.results import get_result_store
from prefect.utilities.hashing import hash_objects

from core.errors import PipelineError

OutputIdentity = Callable[[dict[str, Any]], str | None]


@dataclass
class StageCache(CachePolicy):
    """INPUTS (less `ignore`) + TASK_SOURCE, served only while `output(parameters)` finds the output intact."""

    output: OutputIdentity | None = None
    ignore: Iterable[str] = field(default_factory=tuple)
    keyed_on: Callable[[dict[str, Any]], str] | None = None  # what stands in the key for ignored inputs

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        inputs_policy = INPUTS
        for name in self.ignore:
            inputs_policy = inputs_policy - name
        keys = [
            policy.compute_key(task_ctx=task_ctx, inputs=inputs, flow_parameters=flow_parameters, **kwargs)
            for policy in (inputs_policy, TASK_SOURCE)
        ]
        if self.keyed_on is not None:
            keys.append(self.keyed_on(inputs))
        key = hash_objects(*keys, raise_on_failure=True)
        if self.output is not None and self.output(inputs) is None and not _forget(task_ctx.task, key):
            # A record that cannot be removed must not be served: this run stores under a key of its own.
            return hash_objects(key, uuid.uuid4().hex)
        return key


def _forget(task, key: str) -> bool:
    """Remove the cached record stored under `key` for `task`; False where its storage cannot say."""
    store = get_result_store().update_for_task(task)
    storage = store.metadata_storage or store.result_storage
    if not isinstance(storage, LocalFileSystem):
        return False
    # The path the store itself wrote the record to: LocalFileSystem resolves keys under its base path.
    Path(storage._resolve_path(key)).unlink(missing_ok=True)
    return True


def stage_cache(
    output: OutputIdentity, ignore: Iterable[str] = (), keyed_on: Callable[[dict[str, Any]], str] | None = None
) -> StageCache:
    """The cache policy of a stage whose finished output `output(parameters)` identifies (None: not there).

    `ignore` leaves inputs out of the key; `keyed_on(parameters)` puts what they stood for back in.
    """
    return StageCache(output=output, ignore=tuple(ignore), keyed_on=keyed_on)


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
