"""Decoding one batch of PNGs into a shard: the work each decode process does.

Kept free of Prefect and TensorFlow so a worker process starts in a fraction of a second.

Policy for images that are not 28x28 8-bit grayscale ("L"), applied the same way everywhere:
they are rejected, never converted. notMNIST holds only "L" images, so an RGB, RGBA, palette or
16-bit file means a different source, and silently converting it would hide that. Each rejected
file is listed in the letter's manifest with one of these reasons:

    empty        the file has no bytes
    unreadable   not a PNG Pillow can decode (the real archives hold 7 such files)
    wrong size   a PNG that is not 28x28
    wrong mode   a 28x28 PNG that is not 8-bit grayscale (e.g. RGB, RGBA, P, I;16)
    bad name     the file name is not valid UTF-8 (legal on Linux; listed with \\xNN escapes)
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

try:
    from imagecodecs import spng_decode
except ImportError:  # a platform without its wheel: Pillow decodes everything
    spng_decode = None

from storage.packed import read_group
from storage.shards import IMAGE_SIDE, PIXELS_PER_IMAGE, write_shard
from tasks.own_process import watch_parent

EMPTY, UNREADABLE, WRONG_SIZE, WRONG_MODE = "empty", "unreadable", "wrong size", "wrong mode"
BAD_NAME = "bad name"
# A plain notMNIST PNG starts with the signature and a 13-byte IHDR: 28x28, bit depth 8, color type 0 (grayscale),
# compression, filter and interlace methods 0.
_PLAIN_START = b"\x89PNG\r\n\x1a\n" + struct.pack(">I4s", 13, b"IHDR")
_GRAY_28 = struct.pack(">IIBBBBB", IMAGE_SIDE, IMAGE_SIDE, 8, 0, 0, 0, 0)
_GRAY_28_CRC = struct.pack(">I", zlib.crc32(b"IHDR" + _GRAY_28))


@dataclass(frozen=True)
class Rejected:
    """A file that did not become a row, and why."""

    file: str
    reason: str
    detail: str = ""


@dataclass
class BatchJob:
    """Up to a few thousand images of one letter, going into one shard."""

    label: int
    shard_path: str
    files: list[str]  # names inside the archive, e.g. notMNIST_large/A/xyz.png
    blobs: list[bytes] | None = None  # the PNG bytes, when read straight from the archive
    paths: list[str] | None = None  # or where to read them, from an extracted folder
    packed: tuple[tuple, int, int] | None = None  # or a packed letter's checked file, row group and rows

    @property
    def rows(self) -> int:
        """The images in this batch."""
        return self.packed[2] if self.packed else len(self.files)


@dataclass
class BatchResult:
    """What a batch produced: its shard (if any row survived), rejects and pixel statistics."""

    shard_path: str | None
    rows: int
    rejected: list[Rejected] = field(default_factory=list)
    histogram: list[int] = field(default_factory=lambda: [0] * 256)  # exact counts of each pixel value


def decode_png(data: bytes) -> tuple[bytes | None, Rejected | None]:
    """The 784 pixel bytes of a 28x28 grayscale PNG, or why it is rejected (file left blank).

    libspng (through imagecodecs) decodes the plain files notMNIST is made of about 2.5 times faster than
    Pillow (BENCHMARKS.md), and checks what Pillow checks: the header's CRC and the image data's zlib
    checksum (neither checks the image data's CRC). It gets only plain files: a 28x28 8-bit grayscale
    header, then image data alone, since it skips a damaged ancillary chunk where Pillow refuses the file.
    Every other file, and every file libspng refuses, goes to Pillow, which names the reason; so pixels and
    reasons are Pillow's (tests/tasks/test_images.py compares the two on thousands of damaged files).
    """
    if spng_decode is not None and _plain_gray_28(data):
        try:
            pixels = spng_decode(data)
        except Exception:  # noqa: BLE001 - libspng's refusals carry no reason Pillow would give: ask Pillow
            pass
        else:
            if pixels.shape == (IMAGE_SIDE, IMAGE_SIDE) and pixels.dtype == np.uint8:
                return pixels.tobytes(), None
    return decode_png_with_pillow(data)


def _plain_gray_28(data: bytes) -> bool:
    """A PNG whose header says 28x28, 8-bit grayscale, not interlaced, followed by image data chunks alone."""
    if data[:16] != _PLAIN_START or data[16:29] != _GRAY_28 or data[29:33] != _GRAY_28_CRC:
        return False
    position = 33
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"IEND":
            return True
        if kind != b"IDAT":
            return False
        position += 12 + length
    return True  # cut short: libspng refuses it, and Pillow says how


def decode_png_with_pillow(data: bytes) -> tuple[bytes | None, Rejected | None]:
    """`decode_png` with Pillow alone: the reference for every decision, and the decode floor of the benchmarks."""
    if not data:
        return None, Rejected("", EMPTY)
    try:
        with Image.open(io.BytesIO(data), formats=("PNG",)) as image:
            if image.size != (IMAGE_SIDE, IMAGE_SIDE):
                return None, Rejected("", WRONG_SIZE, "{}x{}".format(*image.size))
            if image.mode != "L":
                return None, Rejected("", WRONG_MODE, image.mode)
            pixels = image.tobytes()  # decodes now: a truncated file fails here, not at open
    except UnidentifiedImageError:
        return None, Rejected("", UNREADABLE, "cannot identify image file")  # Pillow's text names a buffer
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return None, Rejected("", UNREADABLE, str(error))
    if len(pixels) != PIXELS_PER_IMAGE:
        return None, Rejected("", UNREADABLE, f"{len(pixels)} pixel bytes")
    return pixels, None


def is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8, kept as surrogates by the file system or tar reader
        return False
    return True


def printable_name(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 written as \\xNN escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def start_worker(parent: int) -> None:
    """A decode worker's set-up: exit with its parent, then pay the one-time costs before work arrives."""
    watch_parent(parent)
    warm_up()


def warm_up() -> None:
    """Pay a worker's one-time costs (Pillow's PNG plugin, Parquet's zstd writer) before work arrives."""
    image = io.BytesIO()
    Image.new("L", (IMAGE_SIDE, IMAGE_SIDE)).save(image, format="PNG")
    pixels, _ = decode_png(image.getvalue())
    write_shard(io.BytesIO(), ["warm-up"], 0, np.frombuffer(pixels, dtype=np.uint8))


def decode_batch(job: BatchJob) -> BatchResult:
    """Decode a batch and write its shard; runs in a worker process."""
    kept_files: list[str] = []
    kept_pixels: list[bytes] = []
    rejected: list[Rejected] = []
    files, blobs = read_group(*job.packed[:2]) if job.packed else (job.files, job.blobs)
    for index, name in enumerate(files):
        if not is_utf8(name):  # Parquet strings are UTF-8; Linux names need not be
            rejected.append(Rejected(printable_name(name), BAD_NAME, "the file name is not valid UTF-8"))
            continue
        if blobs is not None:
            data = blobs[index]
        else:
            try:
                data = Path(job.paths[index]).read_bytes()
            except OSError as error:
                rejected.append(Rejected(name, UNREADABLE, str(error)))
                continue
        pixels, problem = decode_png(data)
        if problem is not None:
            rejected.append(Rejected(name, problem.reason, problem.detail))
            continue
        kept_files.append(name)
        kept_pixels.append(pixels)

    if not kept_files:
        return BatchResult(None, 0, rejected)
    array = np.frombuffer(b"".join(kept_pixels), dtype=np.uint8).reshape(len(kept_files), PIXELS_PER_IMAGE)
    write_shard(Path(job.shard_path), kept_files, job.label, array)
    histogram = np.bincount(array.reshape(-1), minlength=256).tolist()
    return BatchResult(job.shard_path, len(kept_files), rejected, histogram)
