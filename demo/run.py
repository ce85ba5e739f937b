"""`notmnist demo`: the whole pipeline offline, on generated archives served from 127.0.0.1.

Nothing leaves the machine: two notMNIST-format archives are generated once (cached in the data
root's `source/` folder), served by a loopback HTTP server as the real host would serve them, and
`notmnist_pipeline` runs on them with sizes that suit them — every stage real, nothing skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from core.errors import PipelineError
from core.seed import LARGE_ARCHIVE, SMALL_ARCHIVE
from demo.loopback import FileServer
from demo.synthetic import drawing_fonts, make_archives
from flows.notmnist import notmnist_pipeline
from flows.reports import run_url
from storage.atomic import read_json, write_json
from storage.layout import DataRoot


def demo_archives(
    source_dir: Path, per_letter: int, small_per_letter: int | None = None, *, system_fonts: bool = False
) -> dict:
    """The demo's archives, generated on first use and reused while their sizes and fonts stay the same."""
    catalogue = source_dir / "archives.json"
    sizes = {"per_letter": per_letter, "small_per_letter": small_per_letter,
             "fonts": [Path(font).name for font in drawing_fonts(system_fonts)]}
    try:
        known = read_json(catalogue)
        if all(known.get(key) == value for key, value in sizes.items()) and all(
            (source_dir / name).is_file() for name in known["archives"]
        ):
            return known["archives"]
    except (OSError, ValueError, KeyError):
        pass
    # Said before the flow (and its logging) starts: otherwise the terminal stays silent while they are drawn.
    print(f"Drawing the demo's archives into {source_dir} ({per_letter:,} images per letter, drawn "
          "once per data root) ...", file=sys.stderr, flush=True)
    archives = make_archives(source_dir, per_letter=per_letter, small_per_letter=small_per_letter,
                             system_fonts=system_fonts)
    write_json(catalogue, {**sizes, "archives": archives})
    return archives


def demo_sizes(per_letter: int, small_per_letter: int) -> dict[str, int]:
    """Split sizes that leave room for duplicate control: valid 10% and train 80% of large, test 80% of small."""
    valid, train, test = per_letter // 10, per_letter * 8 // 10, small_per_letter * 8 // 10
    if min(valid, train, test) < 1:
        raise PipelineError("the demo needs at least 10 images per letter; raise --per-letter")
    return {"valid_size": 10 * valid, "train_size": 10 * train, "test_size": 10 * test}


def prepare_demo(layout: DataRoot, per_letter: int, *, system_fonts: bool = False) -> dict:
    """What the demo needs before its flow: a data root it can write, and its archives (drawn once)."""
    layout.check_writable()  # before minutes of generating archives for a data root that cannot take them
    return demo_archives(layout.source, per_letter, system_fonts=system_fonts)


def run_demo(
    layout: DataRoot, *, per_letter: int = 5000, epochs: int = 5, workers: int | None = None,
    task_runner: str = "processes", dask_address: str | None = None, train_deployment: str | None = None,
    system_fonts: bool = False,
) -> dict[str, Any]:
    """Generate (once), serve and run the pipeline; returns its result and where to see the run."""
    archives = prepare_demo(layout, per_letter, system_fonts=system_fonts)  # done already from the command line
    large, small = archives[LARGE_ARCHIVE], archives[SMALL_ARCHIVE]
    with FileServer(layout.source) as server:
        state = notmnist_pipeline(
            base_url=server.base_url, data_dir=layout.location, scratch_dir=layout.scratch,
            large_bytes=large["bytes"], large_sha256=large["sha256"],
            small_bytes=small["bytes"], small_sha256=small["sha256"],
            min_images_large=per_letter * 9 // 10, min_images_small=(small["images"] // 10) * 9 // 10,
            epochs=epochs, workers=workers, task_runner=task_runner, dask_address=dask_address,
            train_deployment=train_deployment,
            **demo_sizes(per_letter, small["images"] // 10),
            return_state=True,
        )
    result = state.result()  # raises the run's error when it failed
    return {**result, "flow_run": _where_to_look(state.state_details.flow_run_id)}


def _where_to_look(flow_run_id) -> str:
    if url := run_url(flow_run_id):
        return f"{url} (Artifacts tab: notmnist-report)"
    return (
        f"{flow_run_id} ran on Prefect's embedded API, which stopped with this command; to follow runs in the "
        "UI, start `prefect server start`, export PREFECT_API_URL=http://127.0.0.1:4200/api and rerun"
    )
