"""What a run shows in the Prefect UI: tables, pictures and a report as artifacts with stable keys.

Keys are lowercase with dashes, so every run's versions line up on the Artifacts page. Pictures are
markdown artifacts holding the PNG itself (a data URI), so the UI shows them without any file server;
the same PNGs are written beside the model, where `report.md` links to them.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.settings import get_current_settings

from core.seed import reported
from flows import pictures
from storage.layout import DataRoot, archive_stem
from storage.letters import LetterShards, letter_folder, sample_identity
from storage.models import picture_file, picture_name, write_picture
from storage.splits import open_split
from tasks.reporting import artifact_key
from tasks.stage import in_working_copy


def publish_picture(key: str, png: bytes, title: str, description: str) -> None:
    """A picture as a markdown artifact (the PNG inline, as a data URI)."""
    encoded = base64.b64encode(png).decode()
    create_markdown_artifact(key=key, markdown=f"![{title}](data:image/png;base64,{encoded})", description=description)


def publish_letters(root: DataRoot, archive_name: str, manifests: dict[str, dict]) -> bytes:
    """Per-letter table (loaded, rejected, mean, std), the rejected files with reasons, and a grid of sample
    glyphs per letter; returns that picture's PNG."""
    archive, shards_dir = archive_stem(archive_name), root.shards(archive_name)
    create_table_artifact(
        key=artifact_key(archive, "letters"),
        table=[
            {
                "letter": letter,
                "loaded": manifest["images"],
                "rejected": len(manifest["rejected"]),
                "mean": round(manifest["mean"], 4),
                "std": round(manifest["std"], 4),
            }
            for letter, manifest in manifests.items()
        ],
        description=f"{archive}: images decoded per letter; mean/std of (x - 127.5) / 255 as the seed prints them",
    )
    rejected = [
        {"file": item["file"], "reason": item["reason"], "detail": item.get("detail", "")}
        for manifest in manifests.values()
        for item in manifest["rejected"]
    ]
    create_table_artifact(
        key=artifact_key(archive, "rejected-files"),
        table=rejected or [{"file": "(none)", "reason": "", "detail": ""}],
        description=f"{archive}: every file that did not become a row, and why",
    )

    def drawing() -> bytes:
        in_working_copy(root, *(letter_folder(shards_dir, letter) for letter in manifests))
        count = pictures.SAMPLES_PER_LETTER
        return pictures.glyph_grid(archive, {letter: LetterShards(shards_dir, letter).sample(count)
                                             for letter in manifests}, rejected)

    # Pinned by the shards' recorded digests: a rerun finds the picture without fetching or reading a shard.
    identity = [archive, {letter: sample_identity(manifest, pictures.SAMPLES_PER_LETTER)
                          for letter, manifest in manifests.items()}, rejected]
    png = pictures.drawn_once(pictures.glyph_grid, identity, drawing)
    publish_picture(artifact_key(archive, "glyphs"), png, f"{archive} glyphs",
                    f"{archive}: sample glyphs of each letter, and the rejected files")
    return png


def publish_splits(manifest: dict) -> None:
    """Split sizes, per-class counts and the duplicate overlap before and after dedup."""
    rows = [
        {"split": split, "rows": info["rows"], **info["per_class"]} for split, info in manifest["splits"].items()
    ]
    create_table_artifact(
        key="notmnist-splits", table=rows,
        description=f"seed {manifest['seed']}, dedup {manifest['dedup']}, fingerprint {manifest['fingerprint'][:16]}",
    )
    before, after = manifest["overlap"]["seed_sampling"], manifest["overlap"]["after_dedup"]
    create_table_artifact(
        key="notmnist-overlap",
        table=[{"measure": name, "seed sampling": before[name], "after dedup": after[name]} for name in before],
        description="exact duplicate images within and across splits (digest of the pixels)",
    )


def publish_training(experiment: str, metrics: dict[str, Any]) -> None:
    """The per-epoch metrics table."""
    history = metrics.get("history", {})
    epochs = len(next(iter(history.values()), []))
    create_table_artifact(
        key=artifact_key(experiment, "epochs"),
        table=[{"epoch": epoch + 1, **{name: _rounded(values[epoch]) for name, values in history.items()}}
               for epoch in range(epochs)],
        description=f"{experiment}: loss and accuracy per epoch",
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def publish_pictures(
    experiment: str, model_dir: Path, metrics: dict[str, Any], split_dir: Path, splits: dict, extra: dict[str, bytes]
) -> dict[str, str]:
    """The confusion matrix, learning curves and misclassified test images as artifacts and PNGs beside the model
    (with `extra` pictures, such as the glyph grids, published already under the key `artifact_key(name)`);
    returns each PNG written and the key of its artifact."""
    images, _ = open_split(split_dir, splits, "test")
    wrong = metrics.get("misclassified", [])
    drawn = {
        "confusion_matrix": pictures.confusion_heatmap(
            metrics["confusion_matrix"], metrics["class_names"], f"{experiment}: test confusion matrix"
        ),
        "learning_curves": pictures.learning_curves(metrics["history"], f"{experiment}: loss and accuracy per epoch"),
        "misclassified": pictures.misclassified(
            np.asarray(images[[item["row"] for item in wrong]]) if wrong else np.empty((0, 28, 28), np.uint8),
            [item["true"] for item in wrong], [item["predicted"] for item in wrong],
            f"{experiment}: misclassified test images (true as predicted)",
        ),
    }
    for name, png in drawn.items():
        title = name.replace("_", " ")
        publish_picture(artifact_key(experiment, name), png, title, f"{experiment}: {title} (test split)"
                        if name != "learning_curves" else f"{experiment}: {title}")
    for name, png in {**drawn, **extra}.items():
        write_picture(model_dir, name, png)
    return {picture_file(name): artifact_key(experiment, name) if name in drawn else artifact_key(name)
            for name in {**drawn, **extra}}


def publish_report(
    experiment: str, result: dict[str, Any], metrics: dict[str, Any], splits: dict, figures: dict[str, str],
    tensorboard: str,
) -> str:
    """A markdown report: accuracy against the seed's numbers, confusion matrix, pictures, where things are."""
    seed = reported(experiment)
    lines = [f"# {experiment} run", "", "| measure | this run | seed |", "| --- | --- | --- |"]
    for name in ("test_accuracy", "test_loss", "val_accuracy"):
        if result.get(name) is not None:
            lines.append(f"| {name} | {result[name]:.4f} | {_number(seed.get(name))} |")
    matrix = metrics.get("confusion_matrix")
    if matrix:
        labels = metrics.get("class_names") or [str(i) for i in range(len(matrix))]
        lines += ["", "Confusion matrix (rows: true, columns: predicted)", "",
                  "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        lines += [f"| **{label}** | " + " | ".join(str(v) for v in row) + " |" for label, row in zip(labels, matrix)]
    lines += ["", f"- model: `{result['model']}` (in the data root)", f"- splits: `splits/{splits['key']}`",
              f"- dataset fingerprint: `{result.get('dataset_fingerprint')}`", f"- device: {result.get('device')}",
              f"- TensorBoard: `tensorboard --logdir {tensorboard}`"]
    # The UI has its own artifact for each picture, linked where the UI outlives this command; report.md shows
    # the PNGs written beside it.
    pictures = ", ".join(f"[{key}]({page})" if (page := ui_page(f"artifacts/key/{key}")) else f"`{key}`"
                         for key in figures.values())
    create_markdown_artifact(
        key=artifact_key(experiment, "report"), description=f"{experiment}: results against the seed's",
        markdown="\n".join([*lines, f"- pictures: the artifacts {pictures}"]),
    )
    return "\n".join([*lines, ""] + [f"![{picture_name(name).replace('_', ' ')}]({name})" for name in figures])


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def run_url(flow_run_id) -> str | None:
    """The flow run's page in the Prefect UI, or None on the embedded API (gone when the command ends)."""
    return ui_page(f"runs/flow-run/{flow_run_id}")


def ui_page(path: str) -> str | None:
    """A page of the Prefect UI (`PREFECT_UI_URL`, or the API's address), or None on the embedded API."""
    settings = get_current_settings()
    return f"{settings.ui_url.rstrip('/')}/{path}" if settings.api.url and settings.ui_url else None
