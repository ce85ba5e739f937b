"""The PNG decoder: libspng where it is sure to agree with Pillow, Pillow for everything else."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from demo.synthetic import make_archive
from storage.tar_stream import iter_files
from tasks import images
from tasks.images import decode_png, decode_png_with_pillow


def png(array: np.ndarray, mode: str | None = None, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG", **options)
    return buffer.getvalue()


def chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) if crc is None else crc)


def with_chunk_after_header(data: bytes, extra: bytes) -> bytes:
    return data[:33] + extra + data[33:]


def crafted(rng: np.random.Generator) -> dict[str, bytes]:
    """Files that put the choice between the two decoders to the test."""
    gray = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    plain = png(gray)
    idat = plain.index(b"IDAT") - 4
    return {
        "plain": plain,
        "interlaced": png(gray, optimize=False, **{"interlace": 1}),
        "with text": png(gray, pnginfo=_text("a note")),
        "text with a bad CRC": with_chunk_after_header(plain, chunk(b"tEXt", b"k\0v", crc=1)),
        "gamma": with_chunk_after_header(plain, chunk(b"gAMA", struct.pack(">I", 45455))),
        "transparency": with_chunk_after_header(plain, chunk(b"tRNS", struct.pack(">H", 0))),
        "image data with a bad CRC": plain[: idat + 8 + struct.unpack(">I", plain[idat : idat + 4])[0]] + b"\0\0\0\0"
        + plain[idat + 12 + struct.unpack(">I", plain[idat : idat + 4])[0] :],
        "no end chunk": plain[:-12],
        "trailing bytes": plain + b"garbage",
        "truncated in the image data": plain[: idat + 20],
        "truncated in the header": plain[:20],
        "rgb": png(np.stack([gray] * 3, axis=-1)),
        "rgba": png(np.stack([gray] * 4, axis=-1)),
        "palette": _palette(gray),
        "16-bit": png(gray.astype(np.uint16) * 257),
        "1-bit": png(gray > 127),
        "27x28": png(gray[:27]),
        "wrong size in a plain header": png(rng.integers(0, 256, (28, 29), dtype=np.uint8)),
        "empty": b"",
        "not a png": b"GIF89a" + bytes(100),
    }


def _text(value: str):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("comment", value)
    return info


def _palette(gray: np.ndarray) -> bytes:
    image = Image.fromarray(gray).convert("P")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def mutated(plain: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(plain)
    if rng.random() < 0.3:
        return bytes(data[: int(rng.integers(0, len(data)))])
    for _ in range(int(rng.integers(1, 4))):
        data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
    return bytes(data)


def test_pixels_and_reasons_are_pillows_on_every_image_of_a_generated_archive_and_crafted_files(tmp_path):
    archive = make_archive(tmp_path, "notMNIST_small", per_letter=40, seed=5)  # this machine's fonts, bad files too
    blobs = [data for _, data in iter_files(archive.path, max_members=10**5, max_total_bytes=1 << 30)]
    rng = np.random.default_rng(23)
    cases = {**{f"member {index}": data for index, data in enumerate(blobs)}, **crafted(rng)}
    plain = [data for data in blobs if images._plain_gray_28(data)]
    cases |= {f"mutated {index}": mutated(plain[index % len(plain)], rng) for index in range(3000)}
    for name, data in cases.items():
        assert decode_png(data) == decode_png_with_pillow(data), name
    assert len(plain) > 0.9 * len(blobs)  # the archive's PNGs take the fast path
    reasons = {decode_png(data)[1].reason for data in cases.values() if decode_png(data)[1] is not None}
    assert reasons == {"empty", "unreadable", "wrong size", "wrong mode"}


def test_plain_files_are_decoded_by_libspng(monkeypatch):
    pytest.importorskip("imagecodecs")
    gray = np.arange(784, dtype=np.uint8).reshape(28, 28)
    calls = []
    monkeypatch.setattr(images, "decode_png_with_pillow", lambda data: calls.append(data))
    assert decode_png(png(gray)) == (gray.tobytes(), None)
    assert calls == []
