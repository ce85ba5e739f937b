"""`iris_pipeline`: the seed's softmax regression on iris, with sparse and one-hot labels."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from core.parameters import Positive, Rate, Seed
from core.seed import IRIS_BATCH_SIZE, IRIS_EPOCHS, IRIS_LEARNING_RATE, SEED, reported
from tasks.cancellation import cancellable
from tasks.reporting import import_keras_quietly
from tasks.stage import open_data_root


@flow(name="iris-pipeline")
@cancellable
def iris_pipeline(
    data_dir: str = "data",
    epochs: Positive = IRIS_EPOCHS,
    batch_size: Positive = IRIS_BATCH_SIZE,
    learning_rate: Rate = IRIS_LEARNING_RATE,
    seed: Seed = SEED,
    scratch_dir: str | None = None,
) -> dict[str, Any]:
    """Both iris fits (seed: 0.89 sparse, 0.87 one-hot, scored on the training rows) plus held-out accuracy.

    Args:
        data_dir: the data root (the models go to models/): a folder, or s3://bucket/prefix (endpoint and keys
            from the AWS_* variables).
        epochs: training epochs.
        batch_size: training batch size.
        learning_rate: SGD's learning rate.
        seed: seed of the weights, the shuffles and the held-out rows.
        scratch_dir: the local working copy of an s3:// data root (default: under ~/.cache/notmnist).
    """
    import_keras_quietly()  # Keras (2 s and 400 MB to import) only in a process that trains
    from tasks.iris import VARIANTS, iris_task

    root = open_data_root(data_dir, scratch_dir)
    result = iris_task(root, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    create_table_artifact(
        key="iris-report",
        table=[
            {
                "labels": variant,
                "accuracy on the training rows (seed's protocol)": round(result[f"{variant}_train_accuracy"], 4),
                "seed reported": reported("iris")[f"{variant}_train_accuracy"],
                "held-out accuracy": round(result[f"{variant}_held_out_accuracy"], 4),
            }
            for variant in VARIANTS
        ],
        description="softmax regression (Dense(3) + softmax, SGD) on the 150-row iris table",
    )
    return result
