"""Using a trained model: `predict` on generated letters and hostile files, `evaluate` on folders and splits."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.errors import CorruptDataError, PipelineError
from core.seed import LETTERS
from demo.synthetic import write_letter_folders
from flows.cli import main
from storage.layout import DataRoot
from storage.splits import SplitWriter
from tasks.predict import decode_inputs, evaluate_model, image_inputs, predict_files
from tasks.train import train_model


@pytest.fixture(scope="module")
def letters(tmp_path_factory) -> Path:
    """Generated letters the model never trained on: a folder per letter, 8 PNGs each."""
    return write_letter_folders(tmp_path_factory.mktemp("unseen") / "letters", per_letter=8, seed=2, bad_files={},
                                fonts=()).root


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The seed's CNN trained for a few epochs on 100 generated letters per class."""
    root = tmp_path_factory.mktemp("trained")
    folders = write_letter_folders(root / "letters", per_letter=100, seed=1, bad_files={}, fonts=())
    with SplitWriter(DataRoot(root).splits("letters"), list(LETTERS)) as writer:
        for split, part in (("train", slice(0, 80)), ("valid", slice(80, 90)), ("test", slice(90, 100))):
            images, labels, names = [], [], []
            for label, letter in enumerate(LETTERS):
                files = sorted((folders.root / letter).iterdir())[part]
                found, pixels, _ = decode_inputs((str(path), path.read_bytes()) for path in files)
                images.append(pixels), labels.append(np.full(len(pixels), label)), names.extend(found)
            writer.save(split, np.concatenate(images), np.concatenate(labels), names)
        writer.commit(seed=0, dedup="none", inputs={})
    return Path(train_model(root, "letters", epochs=4, batch_size=32)["model_path"]).parent


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_evaluate_on_letter_folders_scores_well_above_chance(model, letters):
    scores = evaluate_model(model, letters)
    assert scores["images"] == 80 and scores["accuracy"] > 0.6  # chance is 0.1
    assert list(scores["per_class_accuracy"]) == list(LETTERS)
    matrix = np.array(scores["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum(axis=1).tolist() == [8] * 10


def test_evaluate_on_a_split_folder_scores_the_chosen_split(model):
    split_folder = model.parents[1] / "splits" / "letters"
    assert evaluate_model(model, split_folder)["images"] == 100
    assert evaluate_model(model, split_folder, split="valid")["images"] == 100


def test_predict_on_files_folders_and_an_archive_agree(model, letters, tmp_path):
    archive = tmp_path / "letters.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(letters, arcname="letters")
    files = sorted((letters / "C").iterdir())
    by_file = predict_files(model, files)["predictions"]
    by_folder = [p for p in predict_files(model, [letters])["predictions"] if "/C/" in p["file"]]
    by_archive = [p for p in predict_files(model, [archive])["predictions"] if "/C/" in p["file"]]
    assert [p["class"] for p in by_file] == [p["class"] for p in by_folder] == [p["class"] for p in by_archive]
    assert sum(p["class"] == "C" for p in by_file) > len(files) / 2


def test_top_k_lists_the_most_likely_classes_in_order(model, letters):
    (prediction,) = predict_files(model, [next((letters / "A").iterdir())], top=3)["predictions"]
    probabilities = [entry["probability"] for entry in prediction["top"]]
    assert len(prediction["top"]) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert prediction["class"] == prediction["top"][0]["class"] and sum(probabilities) <= 1.0 + 1e-6


def test_hostile_files_are_reported_with_the_decode_stages_reasons_and_never_crash(model, letters, tmp_path, capsys):
    good = next((letters / "B").iterdir()).read_bytes()
    hostile = {
        "empty.png": (b"", "empty"),
        "page.png": (b"<html>403 Forbidden</html>", "unreadable"),
        "truncated.png": (good[: len(good) // 2], "unreadable"),
        "rgb.png": (png(Image.new("RGB", (28, 28))), "wrong mode"),
        "big.png": (png(Image.new("L", (30, 30))), "wrong size"),
        "bomb.png": (png(Image.new("1", (20000, 20000))), "unreadable"),  # 400 million pixels: Pillow's bomb check
    }
    for name, (data, _) in hostile.items():
        (tmp_path / name).write_bytes(data)
    with open(os.fsencode(tmp_path) + b"/caf\xe9.png", "wb") as handle:
        handle.write(good)
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    os.mkfifo(tmp_path / "fifo.png")  # reading it would wait forever
    assert main(["predict", str(model), str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    reasons = {Path(item["file"]).name: item["reason"] for item in result["rejected"]}
    assert reasons == {**{name: reason for name, (_, reason) in hostile.items()}, "caf\\xe9.png": "bad name",
                       "dangling.png": "unreadable", "fifo.png": "unreadable"}
    assert result["predictions"] == []


def test_a_model_file_swapped_in_a_model_folder_is_refused_as_the_pipeline_refuses_it(model, letters, tmp_path):
    import shutil

    import keras

    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    inputs = keras.Input((28, 28, 1))  # another model of the same shape, as an MNIST model would be
    keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs))).save(folder / "model.keras")
    for use in (lambda: predict_files(folder, [letters]), lambda: evaluate_model(folder, letters)):
        with pytest.raises(CorruptDataError, match=r"model\.keras .*recorded.*the model folder changed after training"):
            use()
    (folder / "_manifest.json").unlink()  # and without its manifest, it is no finished model folder
    with pytest.raises(PipelineError, match="has no manifest: it is no finished model folder"):
        predict_files(folder / "model.keras", [letters])


def test_a_split_or_folders_of_other_classes_than_the_models_are_refused(model, letters, tmp_path):
    digits = tmp_path / "splits" / "digits"
    with SplitWriter(digits, list("0123456789")) as writer:
        for split in ("train", "valid", "test"):
            writer.save(split, np.zeros((10, 28, 28), np.uint8), np.arange(10), [str(n) for n in range(10)])
        writer.commit(seed=0, dedup="none", inputs={})
    with pytest.raises(PipelineError, match=r"holds the classes 0 1 2 .* but the model .* predicts A B C .*own "
                                            r"experiment"):
        evaluate_model(model, digits)
    (letters / "7").mkdir(exist_ok=True)
    try:
        with pytest.raises(PipelineError, match=r"holds folders 7, which are not classes of this model \(A B C"):
            evaluate_model(model, letters)
    finally:
        (letters / "7").rmdir()


@pytest.mark.parametrize("kind", ["lambda-layer", "not-a-model"])
def test_a_model_that_cannot_be_loaded_safely_is_refused(tmp_path, kind):
    import keras

    path = tmp_path / "model.keras"
    if kind == "lambda-layer":  # loading it would unpickle and run a function: safe mode refuses
        inputs = keras.Input((28, 28, 1))
        keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs)).save(path)
    else:
        path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(PipelineError, match=r"cannot be loaded safely"):
        predict_files(path, [tmp_path])


def test_the_command_line_prints_a_line_per_file(model, letters, capsys):
    assert main(["predict", str(model), *map(str, sorted((letters / "D").iterdir())[:2]), "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "predictions (2):" and all(line.startswith("  ") and "(then " in line for line in lines[1:3])
    assert main(["evaluate", str(model), str(letters)]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_missing_inputs_are_one_line_errors(model, tmp_path, capsys):
    assert main(["predict", str(model), str(tmp_path / "absent.png")]) == 1
    assert "does not exist: give PNG files" in capsys.readouterr().err
    assert main(["evaluate", str(model), str(tmp_path)]) == 1
    assert "holds neither a split folder's manifest nor folders named A" in capsys.readouterr().err
    assert main(["evaluate", str(model), str(tmp_path / "absent")]) == 1
    assert "absent does not exist or is not a folder" in capsys.readouterr().err
    assert main(["predict", str(model), str(tmp_path)]) == 1
    assert "No files in" in capsys.readouterr().err
    assert list(image_inputs([])) == []


def test_an_archive_member_too_large_for_an_image_is_rejected_unread(model, letters, tmp_path):
    archive = tmp_path / "mixed.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(next((letters / "E").iterdir()), arcname="mixed/E/good.png")
        big = tarfile.TarInfo("mixed/E/huge.png")
        big.size = 8 << 20
        tar.addfile(big, io.BytesIO(bytes(big.size)))
    result = predict_files(model, [archive])
    assert [p["file"].rsplit("/", 1)[-1] for p in result["predictions"]] == ["good.png"]
    assert [(r["file"].rsplit("/", 1)[-1], r["reason"]) for r in result["rejected"]] == [("huge.png", "unreadable")]
