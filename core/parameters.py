"""The kinds of value the flows take, each with its range, declared once.

A flow's parameters are annotated with these; Prefect checks them (with pydantic) whenever the flow is
called, from Python, a deployment or the UI, and the command line builds each option's parser from
the same annotation (flows/options.py), so `notmnist run --epochs 0` and a deployment run with
`epochs=0` are refused by one rule, in the same words.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, Field

SEED_LIMIT = 2**32  # NumPy's RandomState and Keras take seeds in [0, 2**32)

# Each description completes "VALUE is not ...", the command line's words for a value out of range.
Count = Annotated[int, Field(ge=0, description="a count (0 or more)")]
Positive = Annotated[int, Field(ge=1, description="a positive integer")]
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT, description=f"a seed (0 to {SEED_LIMIT - 1})")]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False, description="a positive number of seconds")]
Rate = Annotated[float, Field(gt=0, allow_inf_nan=False, description="a positive learning rate")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$", description="a sha256 (64 hexadecimal digits)"),
                   AfterValidator(str.lower)]

# What the splits stage's duplicate control may let repeat (tasks/splits.py).
Dedup = Literal["none", "cross-split", "all"]
# Where the pipeline's per-letter decode tasks run (flows/letters.py): this machine's processes, threads of
# the flow's process, or a Dask cluster.
TaskRunner = Literal["processes", "threads", "dask"]
# Which dataset a split folder holds, and so how its pixels are normalised.
Experiment = Literal["notmnist", "mnist"]

DEDUP_MODES: tuple[str, ...] = get_args(Dedup)
TASK_RUNNERS: tuple[str, ...] = get_args(TaskRunner)
