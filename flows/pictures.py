"""Pictures where people would rather look than read: glyphs per letter, the confusion matrix, learning curves,
misclassified test images. Each function returns PNG bytes (matplotlib, drawn off-screen), which the flows
publish as artifacts and write beside the model.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # no display: draw into memory, in any thread
import numpy as np  # noqa: E402

from storage.drawn import recall, remember  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
SAMPLES_PER_LETTER = 10
REJECTED_LISTED = 14
MISCLASSIFIED_SHOWN = 24
DRAWING_CODE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()  # a change in drawing draws again


def remembered(draw: Callable[..., bytes]) -> Callable[..., bytes]:
    """`draw`, drawing each picture once on this machine: a rerun that shows the same things gets the PNG drawn
    before, filed under the digest of the arguments, this module's code and matplotlib's version."""

    @functools.wraps(draw)
    def drawn(*args: Any, **kwargs: Any) -> bytes:
        return drawn_once(draw, [args, kwargs], lambda: draw(*args, **kwargs))

    return drawn


def drawn_once(draw: Callable[..., bytes], identity: Any, drawing: Callable[[], bytes]) -> bytes:
    """The picture `drawing()` makes with `draw`, drawn once on this machine for `identity`: what it shows, or what
    pins that (the digests of the files it is read from), so that a rerun finds it without reading them."""
    digest = hashlib.sha256(f"{draw.__name__} {matplotlib.__version__} {DRAWING_CODE}".encode())
    _feed(digest, identity)
    key = digest.hexdigest()[:32]
    if (png := recall(key)) is None:
        png = drawing()
        remember(key, png)
    return png


def _feed(digest, value: Any) -> None:
    """Add `value` to `digest`, its type and shape included: [1] and (1,), "1" and 1, or two arrays of the same
    bytes and different shapes, digest differently."""
    if isinstance(value, np.ma.MaskedArray) or isinstance(value, np.ndarray) and (value.dtype.hasobject
                                                                                   or value.dtype.names):
        raise TypeError("cannot tell a picture's masked, structured or object array apart from another by its bytes")
    if isinstance(value, np.ndarray):
        digest.update(f"array {value.dtype.str} {value.shape} ".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)} ".encode())
        for name, item in value.items():  # in order: a picture lays its entries out in the order given
            _feed(digest, name), _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)} ".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, (str, int, float, bool, np.generic)) or value is None:
        digest.update(f"{type(value).__name__} {value!r} ".encode())
    else:
        raise TypeError(f"cannot tell a picture's {type(value).__name__} argument apart from another")


def _pyplot():
    """matplotlib's pyplot, imported when a picture is first drawn (half a second on 2 cores): a run whose
    pictures all come from the cache never imports it."""
    import matplotlib.pyplot

    return matplotlib.pyplot


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    _pyplot().close(figure)
    return buffer.getvalue()


def _glyph(axes, image: np.ndarray, title: str | None = None, color: str = "black") -> None:
    axes.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    axes.set_xticks([]), axes.set_yticks([])
    if title:
        axes.set_title(title, fontsize=8, color=color)


def _tail(name: str, width: int = 22) -> str:
    """`<letter folder>/<file>`, the file's name shortened in the middle to fit `width`."""
    *_, folder, file = ["", *name.split("/")]
    if len(file) > width:
        file = f"{file[: width // 2 - 1]}...{file[-(width // 2 - 2):]}"
    return f"{folder}/{file}" if folder else file


def mosaic(rows: Sequence[np.ndarray], columns: int, gap: int = 2) -> np.ndarray:
    """One image of 28x28 tiles: a row of tiles per entry of `rows`, `columns` wide, on a mid-grey ground."""
    side = 28 + gap
    canvas = np.full((len(rows) * side + gap, columns * side + gap), 128, dtype=np.uint8)
    for row, images in enumerate(rows):
        for column, image in enumerate(images[:columns]):
            canvas[gap + row * side : gap + row * side + 28, gap + column * side : gap + column * side + 28] = image
    return canvas


def glyph_grid(archive: str, samples: dict[str, np.ndarray], rejected: Sequence[dict]) -> bytes:
    """A row of sample glyphs for each letter, with the rejected files and their reasons listed beside."""
    letters = list(samples)
    figure, (glyphs, text) = _pyplot().subplots(
        1, 2, figsize=(11, 0.62 * len(letters) + 1), gridspec_kw={"width_ratios": [SAMPLES_PER_LETTER, 6]}
    )
    glyphs.imshow(mosaic([samples[letter] for letter in letters], SAMPLES_PER_LETTER), cmap="gray", vmin=0,
                  vmax=255, interpolation="nearest")
    glyphs.set_yticks([2 + 30 * row + 14 for row in range(len(letters))], letters, fontsize=12)
    glyphs.set_xticks([])
    text.axis("off")
    listed = [f"{item['reason']:<11} {_tail(item['file'])}" for item in rejected[:REJECTED_LISTED]]
    more = [f"... and {len(rejected) - REJECTED_LISTED} more"] if len(rejected) > REJECTED_LISTED else []
    body = "\n".join(listed + more) or "(none)"
    text.text(0, 1, f"rejected files ({len(rejected)})\n\n{body}", va="top", fontsize=8, family="monospace")
    figure.suptitle(f"{archive}: sample glyphs per letter", fontsize=11)
    return _png(figure)


@remembered
def confusion_heatmap(matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str) -> bytes:
    """The confusion matrix as a heatmap, counts written in each cell; rows true, columns predicted."""
    counts = np.asarray(matrix)
    figure, axes = _pyplot().subplots(figsize=(6.4, 5.6))
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names), axes.set_yticks(ticks, class_names)
    axes.set_xlabel("predicted"), axes.set_ylabel("true")
    threshold = counts.max() / 2 if counts.size else 0
    for (row, column), value in np.ndenumerate(counts):
        axes.text(column, row, str(value), ha="center", va="center", fontsize=7,
                  color="white" if value > threshold else "black")
    axes.set_title(title)
    return _png(figure)


@remembered
def learning_curves(history: dict[str, list[float]], title: str) -> bytes:
    """Loss and accuracy per epoch, training and validation."""
    figure, (loss, accuracy) = _pyplot().subplots(1, 2, figsize=(10, 3.8))
    for axes, measure in ((loss, "loss"), (accuracy, "accuracy")):
        for prefix, label in (("", "training"), ("val_", "validation")):
            values = history.get(prefix + measure)
            if values:
                axes.plot(range(1, len(values) + 1), values, marker="o", label=label)
        axes.set_xlabel("epoch"), axes.set_title(measure), axes.grid(alpha=0.3), axes.legend()
        axes.xaxis.get_major_locator().set_params(integer=True)
    figure.suptitle(title)
    return _png(figure)


@remembered
def misclassified(images: np.ndarray, true: Sequence[str], predicted: Sequence[str], title: str) -> bytes:
    """Test images the model got wrong, each titled with its true and predicted class."""
    shown = min(len(images), MISCLASSIFIED_SHOWN)
    columns = 8
    rows = max(1, -(-shown // columns))
    figure, grid = _pyplot().subplots(rows, columns, figsize=(columns * 1.1, rows * 1.35), squeeze=False)
    for index, axes in enumerate(grid.flat):
        if index < shown:
            _glyph(axes, images[index], f"{true[index]} as {predicted[index]}", color="firebrick")
        else:
            axes.axis("off")
    figure.suptitle(title if shown else f"{title}: none")
    return _png(figure)
