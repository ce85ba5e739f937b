"""Model folders: a trained model, how it scored, and the record of exactly what produced it.

    models/<key>/
      model.keras (iris: sparse.keras, onehot.keras)   the trained weights and architecture
      metrics.json               test and validation results, per-epoch history, confusion matrix, speed
      record.json                parameters, dataset fingerprint and split folder (relative to the data
                                 root), package versions, commit, device, the seed's numbers
      _manifest.json             written last (storage/folders.py)
      tensorboard/               Keras' TensorBoard logs (`tensorboard --logdir data/models`)
      report.md, *.png           added by the flows once the folder is in place: the report and its pictures
    models/<key>.backup/         while training: the last finished epoch (storage.layout.backup_folder)

A model folder is reused only when its record names the same parameters and dataset fingerprint and
every file matches its digest.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.errors import CorruptDataError, PipelineError
from storage.atomic import read_json, write_bytes
from storage.folders import FolderWriter, folder_problem, read_manifest, read_verified
from storage.layout import report_file

KIND, FORMAT = "model", 1
MODEL_FILE, METRICS_FILE, RECORD_FILE = "model.keras", "metrics.json", "record.json"


def variant_model_file(variant: str) -> str:
    """The file of one of a model folder's variants (iris: `sparse.keras`, `onehot.keras`)."""
    return f"{variant}.keras"


def model_writer(folder: Path) -> FolderWriter:
    """A writer of a model folder: save the model and write metrics and record into `.work`, then `commit()`."""
    return FolderWriter(folder, KIND, FORMAT)


def find_model(folder: Path, parameters: dict, fingerprint: str) -> tuple[dict, dict] | None:
    """(record, metrics) of an intact model folder trained with `parameters` on that dataset, else None."""
    folder = Path(folder)
    manifest = read_manifest(folder, KIND, FORMAT)
    if manifest is None or folder_problem(folder, manifest, trusting=True) is not None:
        return None
    record, metrics = read_json(folder / RECORD_FILE), read_json(folder / METRICS_FILE)
    if record.get("parameters") != parameters or record.get("dataset", {}).get("fingerprint") != fingerprint:
        return None
    return record, metrics


def verified_model(folder: Path) -> dict | None:
    """The manifest of a model folder whose every file matches it, None where no training wrote one (a bare model
    file); CorruptDataError naming the file when one differs, PipelineError for a folder that was never finished."""
    folder = Path(folder)
    manifest = read_manifest(folder, KIND, FORMAT)
    if manifest is None:
        if (folder / RECORD_FILE).exists() or (folder / METRICS_FILE).exists():
            raise PipelineError(f"{folder} has no manifest: it is no finished model folder; train it again.")
        return None
    if (problem := folder_problem(folder, manifest)) is not None:
        raise CorruptDataError(f"{problem}: the model folder changed after training; train it again")
    return manifest


def write_report(folder: Path, markdown: str) -> Path:
    """Write the run's markdown report beside a finished model; returns its path."""
    return write_bytes(report_file(folder), markdown.encode())


def picture_file(name: str) -> str:
    """The file of the picture `name` beside a model (`confusion_matrix.png`)."""
    return f"{name}.png"


def picture_name(file: str) -> str:
    """The picture a file beside a model holds (`confusion_matrix.png` -> `confusion_matrix`)."""
    return file.removesuffix(picture_file(""))


def write_picture(folder: Path, name: str, png: bytes) -> Path:
    """Write a picture of the run beside a finished model; returns its path."""
    return write_bytes(Path(folder) / picture_file(name), png)


def read_metrics(folder: Path) -> dict:
    """The metrics of a finished model folder, checked against its manifest."""
    manifest = read_manifest(folder, KIND, FORMAT)
    if manifest is None:
        raise PipelineError(f"{folder} holds no finished model: train it first (`notmnist train`).")
    remedy = "the model folder was damaged after training; delete it and train again"
    return json.loads(read_verified(folder, manifest, METRICS_FILE, remedy))
