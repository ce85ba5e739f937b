"""Cache policies for the stage tasks: what really determines each stage's output.

Each key hashes the task's inputs (minus those that do not change the output, such as the worker
count), the task's source, and the identity of the files it reads — so a re-downloaded archive or
re-decoded shards invalidate what was built from them, while a rerun with nothing changed comes
back Cached in seconds. Large arrays never enter a key: stages pass paths and manifests.

A cached result points at files; when those files are gone (a cleaned data root), the flow asks for
a refresh through `refresh_unless`, and the stage's own "what needs doing?" check rebuilds them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy, CachePolicy


def file_identity(paths: Iterable[Path]) -> str:
    """Size and modification time of each file (or 'absent'): cheap, and changes when a file is rewritten."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            status = os.stat(path)
            digest.update(f"{path}:{status.st_size}:{status.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            digest.update(f"{path}:absent\n".encode())
    return digest.hexdigest()


def stage_cache(
    reads: Callable[[dict[str, Any]], Iterable[Path]] | None = None, ignore: Iterable[str] = ()
) -> CachePolicy:
    """INPUTS (less `ignore`) + TASK_SOURCE + the identity of the files `reads(parameters)` names."""
    policy = INPUTS
    for name in ignore:
        policy = policy - name
    policy = policy + TASK_SOURCE
    if reads is not None:
        policy = policy + CacheKeyFnPolicy(cache_key_fn=lambda context, parameters: file_identity(reads(parameters)))
    return policy


def refresh_unless(task, output_is_there: bool):
    """The task as is when its output is still on disk, else one that ignores (and replaces) the cache."""
    return task if output_is_there else task.with_options(refresh_cache=True)
