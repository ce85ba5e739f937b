"""The stages' cache policy: a cached result counts only while the output it describes is on disk, intact.

A key is the task's inputs (less those that do not change the output, such as the worker count),
its source, and the identity of the output those inputs lead to, as storage/ finds it: a committed
folder whose files match their digests, a download that passes its checks. When storage finds no
such output (never built, deleted, damaged), the policy yields no key at all, so Prefect neither
serves nor stores a cached result and the stage runs, rebuilding what it owns. Large arrays never
enter a key: stages pass paths and manifests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects

OutputIdentity = Callable[[dict[str, Any]], str | None]


@dataclass
class StageCache(CachePolicy):
    """INPUTS (less `ignore`) + TASK_SOURCE + `output(parameters)`; no key when `output` finds nothing intact."""

    output: OutputIdentity | None = None
    ignore: Iterable[str] = field(default_factory=tuple)

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        identity = self.output(inputs) if self.output else ""
        if identity is None:
            return None
        inputs_policy = INPUTS
        for name in self.ignore:
            inputs_policy = inputs_policy - name
        keys = [
            policy.compute_key(task_ctx=task_ctx, inputs=inputs, flow_parameters=flow_parameters, **kwargs)
            for policy in (inputs_policy, TASK_SOURCE)
        ]
        return hash_objects(*keys, identity, raise_on_failure=True)


def stage_cache(output: OutputIdentity, ignore: Iterable[str] = ()) -> StageCache:
    """The cache policy of a stage whose finished output `output(parameters)` identifies (None: not there)."""
    return StageCache(output=output, ignore=tuple(ignore))
