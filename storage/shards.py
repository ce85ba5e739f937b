"""Parquet shards of decoded images: the format the decode stage writes and the splits stage reads.

A shard holds rows of one letter:

    file     string                       path inside the archive, e.g. notMNIST_large/A/xyz.png
    label    int8                         0-9 for A-J
    pixels   fixed_size_binary[784]       the raw uint8 28x28 pixels, row-major (normalised only at training)
    digest   fixed_size_binary[16]        blake2b-128 of the 784 pixel bytes (duplicate control)

`pixels` is one 784-byte value per row rather than a list of 784 numbers: Parquet stores a list with
a level per element, which made reading ten times slower for no gain in what the bytes mean.

zstd-compressed with bounded row groups, so pyarrow, pandas or DuckDB read them without this project.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.seed import IMAGE_SIDE

PIXELS_PER_IMAGE = IMAGE_SIDE * IMAGE_SIDE
DIGEST_BYTES = 16
ROW_GROUP_ROWS = 8192

SHARD_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("label", pa.int8()),
        ("pixels", pa.binary(PIXELS_PER_IMAGE)),
        ("digest", pa.binary(DIGEST_BYTES)),
    ]
)


def pixel_digest(pixels: bytes | np.ndarray) -> bytes:
    """The duplicate-control hash of one image's 784 raw pixel bytes (row-major uint8)."""
    return hashlib.blake2b(pixels, digest_size=DIGEST_BYTES).digest()


def write_shard(path: Path | BinaryIO, files: Sequence[str], label: int, pixels: np.ndarray) -> None:
    """Write one shard; `pixels` is uint8 of shape (rows, 28, 28) or (rows, 784)."""
    flat = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(len(files), PIXELS_PER_IMAGE)
    digests = [pixel_digest(row) for row in flat]
    table = pa.table(
        {
            "file": pa.array(files, pa.string()),
            "label": pa.array(np.full(len(files), label, dtype=np.int8)),
            "pixels": pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(PIXELS_PER_IMAGE), len(files), [None, pa.py_buffer(flat)]
            ),
            "digest": pa.array(digests, pa.binary(DIGEST_BYTES)),
        },
        schema=SHARD_SCHEMA,
    )
    # Statistics on pixels and digests would cost time and serve no query.
    pq.write_table(
        table, path, compression="zstd", row_group_size=ROW_GROUP_ROWS,
        use_dictionary=["label"], write_statistics=["file", "label"],
    )


def read_shard(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a shard file (optionally only some columns), unverified: the stages read through `storage.letters`."""
    return pq.read_table(path, columns=list(columns) if columns else None, schema=SHARD_SCHEMA)


def read_shard_bytes(data: bytes, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a shard from its bytes (already checked against its digest), optionally only some columns."""
    return pq.read_table(pa.BufferReader(data), columns=list(columns) if columns else None, schema=SHARD_SCHEMA)


def pixels_of(table: pa.Table) -> np.ndarray:
    """The `pixels` column as uint8 (rows, 28, 28), without a per-row Python loop."""
    column = table.column("pixels").combine_chunks()
    values = np.frombuffer(column.buffers()[1], dtype=np.uint8)
    start = column.offset * PIXELS_PER_IMAGE
    return values[start : start + len(column) * PIXELS_PER_IMAGE].reshape(len(column), IMAGE_SIDE, IMAGE_SIDE)
