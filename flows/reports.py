"""What a run shows in the Prefect UI: tables and a report as artifacts with stable keys.

Keys are lowercase with dashes, so every run's versions line up on the Artifacts page.
"""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.settings import get_current_settings

from core.seed import reported
from tasks.reporting import artifact_key


def publish_letters(archive: str, manifests: dict[str, dict]) -> None:
    """Per-letter table (loaded, rejected, mean, std) and the list of rejected files with reasons."""
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
        table=[{"epoch": epoch + 1, **{name: round(values[epoch], 4) for name, values in history.items()}}
               for epoch in range(epochs)],
        description=f"{experiment}: loss and accuracy per epoch",
    )


def publish_report(experiment: str, result: dict[str, Any], metrics: dict[str, Any], splits: dict) -> str:
    """A markdown report: accuracy against the seed's numbers, confusion matrix, where things are."""
    seed = reported(experiment)
    lines = [f"# {experiment} run", "", "| measure | this run | seed |", "| --- | --- | --- |"]
    for name in ("test_accuracy", "test_loss", "val_accuracy"):
        if result.get(name) is not None:
            lines.append(f"| {name} | {result[name]:.4f} | {seed.get(name, '')} |")
    matrix = metrics.get("confusion_matrix")
    if matrix:
        labels = metrics.get("class_names") or [str(i) for i in range(len(matrix))]
        lines += ["", "Confusion matrix (rows: true, columns: predicted)", "",
                  "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        lines += [f"| **{label}** | " + " | ".join(str(v) for v in row) + " |" for label, row in zip(labels, matrix)]
    lines += ["", f"- model: `{result['model']}` (in the data root)", f"- splits: `splits/{splits['key']}`",
              f"- dataset fingerprint: `{result.get('dataset_fingerprint')}`", f"- device: {result.get('device')}"]
    markdown = "\n".join(lines)
    create_markdown_artifact(key=artifact_key(experiment, "report"), markdown=markdown,
                             description=f"{experiment}: results against the seed's")
    return markdown


def run_url(flow_run_id) -> str | None:
    """The flow run's page in the Prefect UI, or None on the embedded API (gone when the command ends)."""
    api = get_current_settings().api.url
    return f"{api.removesuffix('/api').rstrip('/')}/runs/flow-run/{flow_run_id}" if api else None
