"""Using a trained model: the letter of each PNG (files, folders or an archive), and scores on labelled data.

Images go through the decode stage's own check (`tasks.images.decode_png`), so a file the pipeline
would reject is reported with the same reason (empty, unreadable, wrong size, wrong mode, bad name)
and never reaches the model. Models are loaded with Keras' safe mode on: a `.keras` file that would
run arbitrary code when loaded (a Lambda layer's pickled function) is refused.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import PipelineError
from core.seed import LETTERS, NORMALISATIONS
from storage.atomic import read_json
from storage.folders import MANIFEST
from storage.layout import ARCHIVE_SUFFIXES
from storage.models import METRICS_FILE, MODEL_FILE, RECORD_FILE, verified_model
from storage.splits import open_split, read_splits_manifest
from storage.tar_stream import MAX_MEMBERS, MAX_TOTAL_BYTES, TarReader
from tasks.images import IMAGE_SIDE, UNREADABLE, Rejected, decode_png, is_utf8, printable_name
from tasks.training_record import confusion_matrix, per_class_accuracy

BATCH = 1024
# A 28x28 8-bit PNG takes under 2 kB; a file this large is no such image, and is not read whole.
MAX_IMAGE_BYTES = 1 << 20


@dataclass
class TrainedModel:
    """A model with what it needs to be used: its class names and the normalisation it was trained with."""

    model: object
    class_names: list[str]
    normalisation: tuple[float, float]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes) for uint8 images (N, 28, 28)."""
        offset, scale = self.normalisation
        outputs = []
        for start in range(0, len(images), BATCH):
            pixels = (images[start : start + BATCH].astype(np.float32) - offset) / scale
            outputs.append(np.asarray(self.model.predict(pixels[..., np.newaxis], verbose=0)))
        return np.concatenate(outputs) if outputs else np.empty((0, len(self.class_names)), np.float32)


def load_trained_model(path: Path) -> TrainedModel:
    """A model folder (or the `.keras` file in one), with its class names and normalisation from its record."""
    import keras

    path = Path(path)
    model_file = path / MODEL_FILE if path.is_dir() else path
    if not model_file.is_file():
        raise PipelineError(f"{path} is not a model: give a model folder (models/<key>) or its {MODEL_FILE}.")
    folder = model_file.parent
    manifest = verified_model(folder)  # before Keras reads a byte of it
    try:
        model = keras.saving.load_model(model_file, safe_mode=True, compile=False)
    except Exception as error:  # Keras raises ValueError, OSError, zipfile errors...: all mean "not loadable"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PipelineError(
            f"{model_file} cannot be loaded safely as a Keras model ({reason[:160]}); give a model folder this "
            "project trained (models/<key>)."
        ) from error
    if manifest is None:  # a bare .keras file, not in a folder training wrote: the notMNIST model
        experiment, class_names = "notmnist", list(LETTERS)
    else:  # checked as the pipeline checks it before reusing it: every file against the manifest
        experiment = read_json(folder / RECORD_FILE).get("experiment", "notmnist")
        class_names = list(read_json(folder / METRICS_FILE)["class_names"])
    if experiment not in NORMALISATIONS:
        raise PipelineError(f"{folder}: no normalisation known for experiment {experiment!r}.")
    return TrainedModel(model, class_names, NORMALISATIONS[experiment])


def image_inputs(paths: list[Path]) -> Iterator[tuple[str, bytes | Rejected]]:
    """(name, bytes) of every file given: files as they are, folders walked in sorted order, archives read whole.

    What cannot be read as a file (a dangling link, a FIFO, a device, something over MAX_IMAGE_BYTES, a read
    error) comes as (name, Rejected) instead, so one bad entry never costs the others.
    """
    for path in map(Path, paths):
        if path.is_dir():
            for folder, subfolders, files in os.walk(path):
                subfolders.sort()
                for name in sorted(files):
                    yield str(Path(folder) / name), _read_image_file(Path(folder) / name)
        elif path.name.endswith(ARCHIVE_SUFFIXES) and path.is_file():
            yield from _archive_images(path)
        elif path.exists() or path.is_symlink():
            yield str(path), _read_image_file(path)
        else:
            raise PipelineError(f"{path} does not exist: give PNG files, folders of them or a .tar.gz.")


def _archive_images(archive: Path) -> Iterator[tuple[str, bytes | Rejected]]:
    """The files of an archive, members over MAX_IMAGE_BYTES skipped unread (the tar reader checks the rest)."""
    with TarReader(archive, max_members=MAX_MEMBERS, max_total_bytes=MAX_TOTAL_BYTES) as reader:
        for member_name, is_directory, size, data in reader.entries(MAX_IMAGE_BYTES):
            if is_directory:
                continue
            name = f"{archive}:{member_name}"
            if data is None:
                yield name, Rejected(name, UNREADABLE, f"{size:,} bytes, more than a 28x28 PNG can need")
            else:
                yield name, data


def _read_image_file(path: Path) -> bytes | Rejected:
    """The bytes of a regular file of at most MAX_IMAGE_BYTES, or why it is not read."""
    try:
        status = path.stat()  # follows a link: a link to a regular file is read
    except OSError as error:
        return Rejected(str(path), UNREADABLE, error.strerror or str(error))
    if not stat.S_ISREG(status.st_mode):
        return Rejected(str(path), UNREADABLE, "not a regular file")
    if status.st_size > MAX_IMAGE_BYTES:
        return Rejected(str(path), UNREADABLE, f"{status.st_size:,} bytes, more than a 28x28 PNG can need")
    try:
        return path.read_bytes()
    except OSError as error:
        return Rejected(str(path), UNREADABLE, error.strerror or str(error))


def decode_inputs(inputs: Iterator[tuple[str, bytes | Rejected]]) -> tuple[list[str], np.ndarray, list[dict]]:
    """Names and uint8 pixels (N, 28, 28) of the images the decode stage would accept, and the others with why."""
    names, pixels, rejected = [], [], []
    for name, data in inputs:
        if isinstance(data, Rejected):
            rejected.append({"file": printable_name(name), "reason": data.reason, "detail": data.detail})
            continue
        if not is_utf8(name):
            rejected.append({"file": printable_name(name), "reason": "bad name", "detail": "not valid UTF-8"})
            continue
        image, problem = decode_png(data)
        if problem is not None:
            rejected.append({"file": name, "reason": problem.reason, "detail": problem.detail})
            continue
        names.append(name)
        pixels.append(np.frombuffer(image, dtype=np.uint8))
    shape = (len(pixels), IMAGE_SIDE, IMAGE_SIDE)
    return names, np.stack(pixels).reshape(shape) if pixels else np.empty(shape, np.uint8), rejected


def predict_files(model_path: Path, paths: list[Path], *, top: int = 1) -> dict:
    """Each accepted image's `top` most likely classes with their probabilities, and every rejected file with why."""
    if top < 1:
        raise PipelineError(f"top must be at least 1; got {top}.")
    trained = load_trained_model(model_path)
    names, images, rejected = decode_inputs(image_inputs(paths))
    if not names and not rejected:
        raise PipelineError(f"No files in {', '.join(map(str, paths))}: give PNG files, folders of them or a .tar.gz.")
    probabilities = trained.probabilities(images)
    predictions = []
    for name, row in zip(names, probabilities):
        best = np.argsort(row)[::-1][:top]
        ranked = [{"class": trained.class_names[i], "probability": round(float(row[i]), 6)} for i in best]
        predictions.append({"file": name, "class": ranked[0]["class"], "probability": ranked[0]["probability"],
                            **({"top": ranked} if top > 1 else {})})
    return {"predictions": predictions, "rejected": rejected}


def evaluate_model(model_path: Path, data: Path, *, split: str = "test") -> dict:
    """Accuracy, per-class accuracy and the confusion matrix on a split folder, or on a folder of class folders."""
    trained = load_trained_model(model_path)
    data = Path(data)
    if not data.is_dir():
        raise PipelineError(f"{data} does not exist or is not a folder: give a split folder or a folder of letters.")
    rejected: list[dict] = []
    if (data / MANIFEST).is_file():
        manifest = read_splits_manifest(data)
        if list(manifest["class_names"]) != trained.class_names:
            raise PipelineError(
                f"{data} holds the classes {' '.join(manifest['class_names'])}, but the model {model_path} predicts "
                f"{' '.join(trained.class_names)}: give a split folder of the model's own experiment."
            )
        images, labels = open_split(data, manifest, split)
        source = f"{data} ({split})"
    else:
        images, labels, rejected = _labelled_folders(data, trained.class_names)
        source = str(data)
    if not len(labels):
        raise PipelineError(f"{source} holds no image the model can score.")
    predicted = np.argmax(trained.probabilities(np.asarray(images)), axis=1)
    matrix = confusion_matrix(np.asarray(labels), predicted, len(trained.class_names))
    return {
        "data": source,
        "images": len(labels),
        "accuracy": float(np.trace(matrix) / matrix.sum()),
        "per_class_accuracy": per_class_accuracy(matrix, trained.class_names),
        "class_names": trained.class_names,
        "confusion_matrix": matrix.tolist(),
        "rejected": rejected,
    }


def _labelled_folders(root: Path, class_names: list[str]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Images and labels of `root/<class name>/*`, the class folders the model knows."""
    present = [name for name in class_names if (root / name).is_dir()]
    if not present:
        raise PipelineError(
            f"{root} holds neither a split folder's manifest nor folders named {', '.join(class_names)}."
        )
    others = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and entry.name not in class_names)
    if others:
        raise PipelineError(
            f"{root} holds folders {', '.join(others)}, which are not classes of this model "
            f"({' '.join(class_names)}): give folders of its own classes only."
        )
    images, labels, rejected = [], [], []
    for name in present:
        _, pixels, skipped = decode_inputs(image_inputs([root / name]))
        images.append(pixels)
        labels.append(np.full(len(pixels), class_names.index(name), dtype=np.int64))
        rejected += skipped
    return np.concatenate(images), np.concatenate(labels), rejected

