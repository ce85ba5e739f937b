"""One epoch of the notMNIST CNN: this project's training path against the seed's in-memory `model.fit`.

Generates (once, under --workdir) a split folder of glyph-like uint8 images: --train-rows training
rows (200,000 by default, the seed's notMNIST size), 10,000 valid and 10,000 test. Each variant then
runs in a fresh process, so its peak RSS (ru_maxrss) is its own (goal: cli at least 1.2x seed's speed):

  cli      `notmnist train --epochs 1` as users run it: a Prefect flow and task around train_model
  project  train_model(..., epochs=1) called directly: uint8 splits verified and read into a tf.data
           pipeline, seeded per-epoch shuffle, op determinism, 16 steps per execution, checkpoint,
           evaluation, atomic outputs
  seed     the seed's way: every split normalised to float32 in memory, one-hot labels, then
           model.fit(..., validation_data=...) and model.evaluate on the test arrays

Same model, optimizer (Adadelta, lr 1.0) and batch size (128). Speed is timed over the epoch's
training steps alone (epoch start to the start of validation): samples per second, and the
process's CPU seconds over the same span (all threads), which other jobs on a shared machine
disturb less. The project's own per-epoch record (metrics.json's history) gives both for `cli` and
`project`; a callback measuring the same span gives them for `seed`. Variants alternate for
--repeats rounds; the best speed, the least CPU and the largest peak RSS of each count. Each round
also times the input pipeline alone (no model): one epoch of training batches, read as `fit` reads
them.

    .venv/bin/python bench/train.py [--workdir .bench] [--train-rows 200000] [--repeats 2]

With --seed-fit SPLIT_FOLDER [--epochs 2], only the seed's fit on that folder, as JSON (bench/pipeline.py
uses it as the training floor of a whole run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.layout import DataRoot  # noqa: E402
from storage.splits import SplitWriter, find_splits  # noqa: E402

KEY = "bench"  # the split folder's name under the benchmark's data root

SPLIT_ROWS = {"valid": 10_000, "test": 10_000}
BATCH_SIZE = 128
CHUNK_ROWS = 8_192


def glyph_like_images(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Dark background, a bright noisy block whose place depends on the label (so the model can learn)."""
    images = rng.integers(0, 40, size=(len(labels), 28, 28), dtype=np.uint8)
    for index, label in enumerate(labels):
        row, column = 2 + (label // 5) * 12, 1 + (label % 5) * 5
        images[index, row : row + 12, column : column + 6] = rng.integers(120, 256, size=(12, 6), dtype=np.uint8)
    return images


def generate(data_root: Path, train_rows: int) -> None:
    """The split folder (NPY files written in chunks through memory maps, then committed)."""
    folder = DataRoot(data_root).splits(KEY)
    if find_splits(folder) is not None:
        return
    shutil.rmtree(data_root, ignore_errors=True)
    rng = np.random.default_rng(133)
    with SplitWriter(folder, list("ABCDEFGHIJ")) as writer:
        for split, rows in {"train": train_rows, **SPLIT_ROWS}.items():
            x, y = writer.create(split, rows)
            for start in range(0, rows, CHUNK_ROWS):
                labels = rng.integers(0, 10, size=min(CHUNK_ROWS, rows - start))
                y[start : start + len(labels)] = labels
                x[start : start + len(labels)] = glyph_like_images(rng, labels)
            x.flush(), y.flush()
            writer.save_files(split, [f"{split}/{i}" for i in range(rows)])
        writer.commit()


def training_timer():
    """A Keras callback timing the first epoch's start to its validation's start, in wall-clock and CPU seconds."""
    import keras

    class TrainingTime(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 0:
                self.started, self.cpu_started, self.seconds = time.perf_counter(), time.process_time(), None

        def on_test_begin(self, logs=None):
            if self.seconds is None:
                self.seconds = time.perf_counter() - self.started
                self.cpu_seconds = time.process_time() - self.cpu_started

    return TrainingTime()


def timing(timer, rows: int) -> dict:
    return {"samples_per_second": rows / timer.seconds, "cpu_ms_per_1000_samples": 1e6 * timer.cpu_seconds / rows}


def recorded_timing(metrics_path: str, rows: int) -> dict:
    """Speed and CPU of the one epoch, as the training stage recorded them in metrics.json."""
    history = json.loads(Path(metrics_path).read_text())["history"]
    return {"samples_per_second": rows / history["seconds"][0],
            "cpu_ms_per_1000_samples": 1e6 * history["cpu_seconds"][0] / rows}


def train_rows(data_root: Path) -> int:
    from storage.splits import read_splits_manifest

    return read_splits_manifest(DataRoot(data_root).splits(KEY))["splits"]["train"]["rows"]


def run_project(data_root: Path) -> dict:
    from tasks.train import train_model

    shutil.rmtree(DataRoot(data_root).models_root, ignore_errors=True)
    started = time.perf_counter()
    result = train_model(data_root, KEY, epochs=1, batch_size=BATCH_SIZE)
    return {**recorded_timing(result["metrics_path"], train_rows(data_root)), "test_accuracy": result["test_accuracy"],
            "total_seconds": time.perf_counter() - started}


def run_cli(data_root: Path) -> dict:
    """`notmnist train` in its own process (Prefect's embedded API included); peak RSS is that process's."""
    shutil.rmtree(DataRoot(data_root).models_root, ignore_errors=True)
    started = time.perf_counter()
    command = [str(Path(sys.executable).with_name("notmnist")), "train", "--data-dir", str(data_root), "--splits", KEY,
               "--epochs", "1", "--batch-size", str(BATCH_SIZE), "--json"]
    child = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    result = json.loads(child.stdout)
    return {**recorded_timing(result["metrics_path"], train_rows(data_root)), "test_accuracy": result["test_accuracy"],
            "total_seconds": time.perf_counter() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def run_input(data_root: Path) -> dict:
    """The input pipeline alone: one epoch of training batches as `fit` reads them, and as NumPy batches."""
    from storage.splits import read_splits_manifest
    from tasks.batches import open_splits

    folder = DataRoot(data_root).splits(KEY)
    train = open_splits(folder, read_splits_manifest(folder), experiment="notmnist", batch_size=BATCH_SIZE, seed=133)["train"]
    feed = train.keras_input()
    started = time.perf_counter()
    for _ in feed:
        pass
    keras_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for index in range(len(train)):
        train[index]
    numpy_seconds = time.perf_counter() - started
    return {"input_samples_per_second": train.rows / keras_seconds, "numpy_samples_per_second": train.rows / numpy_seconds}


def seed_fit(folder: Path, epochs: int) -> dict:
    """The seed's way on a split folder: every split normalised to float32 in memory, one-hot labels, then
    model.fit(..., validation_data=...) and model.evaluate. Returns the first epoch's training speed, the whole
    fit's seconds (validation included) and the test accuracy."""
    import keras

    from tasks.models import build_one_layer_cnn, make_optimizer

    arrays = {}
    for split in ("train", "valid", "test"):
        pixels = np.load(folder / f"{split}_x.npy").astype(np.float32)  # whole split in memory
        pixels -= 127.5
        pixels /= 255.0
        arrays[split] = (pixels[..., np.newaxis], keras.utils.to_categorical(np.load(folder / f"{split}_y.npy"), 10))
    keras.utils.set_random_seed(133)
    model = build_one_layer_cnn()
    model.compile(optimizer=make_optimizer("adadelta", 1.0), loss="categorical_crossentropy", metrics=["accuracy"])
    timer = training_timer()
    started = time.perf_counter()
    model.fit(*arrays["train"], batch_size=BATCH_SIZE, epochs=epochs, verbose=0, validation_data=arrays["valid"],
              callbacks=[timer])
    fit_seconds = time.perf_counter() - started
    _, accuracy = model.evaluate(*arrays["test"], verbose=0)
    return {**timing(timer, len(arrays["train"][0])), "fit_seconds": fit_seconds, "test_accuracy": float(accuracy)}


def run_seed(data_root: Path) -> dict:
    started = time.perf_counter()
    result = seed_fit(DataRoot(data_root).splits(KEY), epochs=1)
    return {**result, "total_seconds": time.perf_counter() - started}


VARIANTS = {"cli": run_cli, "project": run_project, "seed": run_seed, "input": run_input}


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    child = subprocess.run(
        [sys.executable, __file__, "--variant", variant, "--workdir", str(args.workdir), "--train-rows", str(args.train_rows)],
        check=True, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench")
    parser.add_argument("--train-rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--seed-fit", type=Path, metavar="SPLIT_FOLDER",
                        help="only the seed's plain fit on this split folder (--epochs of it), printed as JSON")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of --seed-fit (the seed trains 2)")
    args = parser.parse_args()
    folder = args.workdir / f"train-data-{args.train_rows}"

    if args.seed_fit:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        print(json.dumps(seed_fit(args.seed_fit, args.epochs)))
        return

    if args.variant:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        result = VARIANTS[args.variant](folder)
        result.setdefault("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(result))
        return

    print(f"generating {args.train_rows:,} training rows (once) ...", flush=True)
    generate(folder, args.train_rows)
    runs: dict[str, list[dict]] = {"cli": [], "project": [], "seed": []}
    inputs = []
    for round_number in range(args.repeats):
        for variant in runs:
            runs[variant].append(result := run_variant(args, variant))
            print(f"round {round_number + 1} {variant:<8} {result['samples_per_second']:8.0f} samples/s   "
                  f"{result['cpu_ms_per_1000_samples']:6.0f} CPU ms/1000 samples   peak RSS {result['peak_rss_mb']:6.0f} MB   "
                  f"test accuracy {result['test_accuracy']:.3f}   {result['total_seconds']:.1f} s in all   "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
        inputs.append(result := run_variant(args, "input"))
        print(f"round {round_number + 1} input pipeline alone: {result['input_samples_per_second']:8.0f} samples/s "
              f"(tf.data, as fit reads it), {result['numpy_samples_per_second']:8.0f} samples/s (NumPy batches)", flush=True)

    best = {variant: max(r["samples_per_second"] for r in results) for variant, results in runs.items()}
    cpu = {variant: min(r["cpu_ms_per_1000_samples"] for r in results) for variant, results in runs.items()}
    peak = {variant: max(r["peak_rss_mb"] for r in results) for variant, results in runs.items()}
    print(f"cores: {os.cpu_count()}  training rows: {args.train_rows:,}  batch size: {BATCH_SIZE}")
    for variant in runs:
        print(f"{variant:<8} best {best[variant]:8.0f} samples/s   least {cpu[variant]:6.0f} CPU ms/1000 samples   "
              f"peak RSS {peak[variant]:6.0f} MB")
    print(f"input pipeline alone, best {max(r['input_samples_per_second'] for r in inputs):,.0f} samples/s")
    for variant in ("cli", "project"):
        print(f"{variant}/seed: speed ratio {best[variant] / best['seed']:.3f} (goal >= 1.2), "
              f"CPU ratio {cpu[variant] / cpu['seed']:.3f}, peak RSS ratio {peak[variant] / peak['seed']:.3f} (goal <= 0.5)")


if __name__ == "__main__":
    main()
