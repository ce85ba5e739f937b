"""Tests for the synthetic notMNIST archives: layout, names, bad files, determinism, variety."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont, UnidentifiedImageError

from core.seed import IMAGE_SIDE
from demo.synthetic import (
    BAD_FILE_KINDS,
    DEFAULT_BAD_FILES,
    LETTERS,
    UNREADABLE_KINDS,
    find_fonts,
    make_archive,
    make_archives,
    render_glyph,
    write_letter_folders,
)

PER_LETTER = 6
EVERY_KIND_ONCE = {kind: 1 for kind in BAD_FILE_KINDS}


def archive_files(path: Path) -> dict[str, bytes]:
    """Every regular file in the archive at `path`, by member name."""
    with tarfile.open(path) as archive:
        return {member.name: archive.extractfile(member).read() for member in archive if member.isfile()}


def decoded(content: bytes) -> Image.Image:
    """`content` opened and fully decoded by Pillow."""
    image = Image.open(io.BytesIO(content))
    image.load()
    return image


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_archive(
        tmp_path_factory.mktemp("archive"), "notMNIST_small", per_letter=PER_LETTER, seed=1, bad_files=EVERY_KIND_ONCE
    )


@pytest.fixture(scope="module")
def files(archive):
    return archive_files(archive.path)


@pytest.fixture(scope="module")
def good_images(archive, files):
    bad_paths = {f"notMNIST_small/{bad.path}" for bad in archive.bad_files}
    return {name: decoded(content) for name, content in files.items() if name not in bad_paths}


def test_archive_holds_one_top_folder_with_the_ten_letter_folders(archive):
    with tarfile.open(archive.path) as handle:
        members = handle.getmembers()
    folders = [member.name for member in members if member.isdir()]
    assert folders == ["notMNIST_small", *(f"notMNIST_small/{letter}" for letter in LETTERS)]
    assert {member.name.split("/")[1] for member in members if member.isfile()} == set(LETTERS)
    assert all(member.name.count("/") == 2 for member in members if member.isfile())


def test_file_names_are_base64_of_font_file_names(files):
    for name in files:
        file_name = name.rsplit("/", 1)[1]
        assert file_name.endswith(".png"), name
        try:
            font_name = base64.b64decode(file_name.removesuffix(".png"), validate=True).decode("ascii")
        except (binascii.Error, UnicodeDecodeError) as error:
            pytest.fail(f"{name} is not base64 of an ASCII name: {error}")
        assert font_name.endswith((".ttf", ".otf", ".pfb")), font_name


def test_every_good_image_is_a_28x28_grayscale_png_and_counted_per_letter(archive, good_images):
    assert all(image.format == "PNG" for image in good_images.values())
    assert {(image.size, image.mode) for image in good_images.values()} == {((IMAGE_SIDE, IMAGE_SIDE), "L")}
    counted = {letter: sum(name.split("/")[1] == letter for name in good_images) for letter in LETTERS}
    assert counted == archive.good_per_letter == dict.fromkeys(LETTERS, PER_LETTER)


def test_summary_lists_one_bad_file_of_each_kind_that_is_in_the_archive(archive, files):
    assert sorted(bad.kind for bad in archive.bad_files) == sorted(BAD_FILE_KINDS)
    assert all(f"notMNIST_small/{bad.path}" in files for bad in archive.bad_files)
    assert len(files) == len(LETTERS) * PER_LETTER + len(BAD_FILE_KINDS)


def check_empty(content: bytes) -> None:
    assert content == b""


def check_truncated(content: bytes) -> None:
    with pytest.raises(OSError, match="truncated"):
        decoded(content)


def check_not_an_image(content: bytes) -> None:
    with pytest.raises(UnidentifiedImageError, match="cannot identify image file"):
        decoded(content)


def check_image(size: int, mode: str):
    def check(content: bytes) -> None:
        image = decoded(content)
        assert (image.size, image.mode) == ((size, size), mode)

    return check


CHECK_OF_KIND = {
    "empty": check_empty,
    "truncated": check_truncated,
    "not-an-image": check_not_an_image,
    "wrong-size": check_image(IMAGE_SIDE + 4, "L"),
    "rgb": check_image(IMAGE_SIDE, "RGB"),
    "rgba": check_image(IMAGE_SIDE, "RGBA"),
    "palette": check_image(IMAGE_SIDE, "P"),
    "gray16": check_image(IMAGE_SIDE, "I;16"),
}


@pytest.mark.parametrize("kind", BAD_FILE_KINDS, ids=BAD_FILE_KINDS)
def test_bad_file_has_the_property_of_its_kind(archive, files, kind):
    (bad,) = [bad for bad in archive.bad_files if bad.kind == kind]
    CHECK_OF_KIND[kind](files[f"notMNIST_small/{bad.path}"])
    assert bad.unreadable == (kind in UNREADABLE_KINDS)
    assert bad.letter in LETTERS


def test_default_bad_files_are_a_few_unreadable_ones_over_several_letters(tmp_path):
    result = make_archive(tmp_path, per_letter=1, seed=0, workers=1)
    assert len(result.bad_files) == sum(DEFAULT_BAD_FILES.values())
    assert all(bad.unreadable for bad in result.bad_files)
    assert len({bad.letter for bad in result.bad_files}) > 1


def test_result_reports_the_size_and_sha256_of_the_written_archive(archive):
    content = archive.path.read_bytes()
    assert archive.path.name == "notMNIST_small.tar.gz"
    assert archive.size_bytes == len(content)
    assert archive.sha256 == hashlib.sha256(content).hexdigest()
    assert [path.name for path in archive.path.parent.iterdir()] == [archive.path.name]  # no temporary left


def test_same_seed_gives_the_same_bytes_and_another_seed_different_ones(tmp_path):
    first = make_archive(tmp_path / "first", per_letter=3, seed=4)
    again = make_archive(tmp_path / "again", per_letter=3, seed=4)
    other = make_archive(tmp_path / "other", per_letter=3, seed=5)
    assert first.path.read_bytes() == again.path.read_bytes()
    assert first.sha256 == again.sha256
    assert other.sha256 != first.sha256


def test_worker_count_does_not_change_the_archive(tmp_path):
    in_process = make_archive(tmp_path / "one", per_letter=2, seed=2, bad_files=EVERY_KIND_ONCE, workers=1)
    two_processes = make_archive(tmp_path / "two", per_letter=2, seed=2, bad_files=EVERY_KIND_ONCE, workers=2)
    assert two_processes.sha256 == in_process.sha256


def test_letter_folders_hold_the_same_files_as_the_archive(archive, files, tmp_path):
    root = tmp_path / "notMNIST_small"
    folders = write_letter_folders(root, per_letter=PER_LETTER, seed=1, bad_files=EVERY_KIND_ONCE)
    written = {
        f"notMNIST_small/{path.relative_to(folders.root).as_posix()}": path.read_bytes()
        for path in folders.root.rglob("*")
        if path.is_file()
    }
    assert written == files
    assert (folders.good_per_letter, folders.bad_files) == (archive.good_per_letter, archive.bad_files)


def test_glyphs_vary_within_a_letter_and_differ_between_letters(good_images):
    by_letter = {letter: [] for letter in LETTERS}
    for name, image in good_images.items():
        by_letter[name.split("/")[1]].append(np.asarray(image, dtype=np.float32))
    for letter, images in by_letter.items():
        assert len({image.tobytes() for image in images}) == len(images), f"repeated images of {letter}"
        assert all(image.max() > 100 for image in images), f"a blank image of {letter}"
    means = np.stack([np.mean(images, axis=0) for images in by_letter.values()])
    distances = np.abs(means[:, None] - means[None, :]).mean(axis=(2, 3))
    assert distances[~np.eye(len(LETTERS), dtype=bool)].min() > 3.0


def first_loadable_font() -> Path | None:
    """The first installed font file Pillow can load, if any."""
    for path in find_fonts():
        try:
            ImageFont.truetype(str(path), 12)
        except OSError:
            continue
        return path
    return None


@pytest.mark.parametrize("font", ["built-in", "installed"], ids=["built-in", "installed"])
def test_render_glyph_draws_a_light_letter_on_black(font):
    path = None if font == "built-in" else first_loadable_font()
    if font == "installed" and path is None:
        pytest.skip("no loadable font files installed on this machine")
    glyphs = [render_glyph(letter, path, np.random.default_rng(index)) for index, letter in enumerate(LETTERS)]
    for glyph in glyphs:
        assert (glyph.shape, glyph.dtype) == ((IMAGE_SIDE, IMAGE_SIDE), np.uint8)
    # Mostly light glyphs on black: the corners are darker than the brightest pixels.
    corners = np.mean([[glyph[0, 0], glyph[0, -1], glyph[-1, 0], glyph[-1, -1]] for glyph in glyphs])
    assert corners < 64 < np.mean([glyph.max() for glyph in glyphs])


def test_archives_without_installed_fonts_use_the_built_in_one_and_skip_unusable_files(tmp_path):
    not_a_font = tmp_path / "fonts" / "Broken.ttf"
    not_a_font.parent.mkdir()
    not_a_font.write_bytes(b"not a font")
    built_in = make_archive(tmp_path / "built-in", per_letter=2, fonts=())
    with_broken = make_archive(tmp_path / "broken", per_letter=2, fonts=[not_a_font])
    assert with_broken.sha256 == built_in.sha256


def test_find_fonts_lists_font_files_only_sorted(tmp_path):
    names = ["b/Sans.ttf", "a/Serif.OTF", "Collection.ttc", "notes.txt", "Bitmap.pcf.gz"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert find_fonts([tmp_path, tmp_path / "missing"]) == [
        tmp_path / "Collection.ttc",
        tmp_path / "a" / "Serif.OTF",
        tmp_path / "b" / "Sans.ttf",
    ]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"per_letter": -1}, "per_letter must be >= 0"),
        ({"per_letter": 1, "bad_files": {"corrupt": 1}}, "unknown bad file kinds"),
        ({"per_letter": 1, "bad_files": {"empty": -1}}, "bad file counts must be >= 0"),
        ({"per_letter": 1, "workers": 0}, "workers must be >= 1"),
        ({"per_letter": 1, "name": "a/b"}, "plain folder name"),
    ],
    ids=["negative-count", "unknown-kind", "negative-bad-count", "no-workers", "nested-name"],
)
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        make_archive(tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


def test_render_glyph_refuses_other_letters():
    with pytest.raises(ValueError, match="letter must be one of ABCDEFGHIJ"):
        render_glyph("K", None, np.random.default_rng(0))


def test_the_archive_for_a_seed_does_not_change_when_the_system_fonts_do(tmp_path, monkeypatch):
    """The default draws from the fonts matplotlib ships: a font that a package installs changes nothing, unless
    the system's fonts are asked for."""
    from demo import synthetic

    system = tmp_path / "system-fonts"
    system.mkdir()
    monkeypatch.setattr(synthetic, "_font_folders", lambda: [system])
    before = make_archives(tmp_path / "before", per_letter=4, seed=9)
    asked_before = make_archives(tmp_path / "asked-before", per_letter=4, seed=9, system_fonts=True)
    serif = next(path for path in synthetic.bundled_fonts() if path.name == "DejaVuSerif-Bold.ttf")
    for copy in range(12):  # enough new fonts that some image is sure to be drawn with one
        shutil.copy(serif, system / f"new-{copy}.ttf")
    after = make_archives(tmp_path / "after", per_letter=4, seed=9)
    asked_after = make_archives(tmp_path / "asked-after", per_letter=4, seed=9, system_fonts=True)
    sha256 = lambda archives: {name: archive["sha256"] for name, archive in archives.items()}  # noqa: E731
    assert sha256(after) == sha256(before)
    assert sha256(asked_after) != sha256(asked_before)  # the system's fonts, when asked for, do change it
    drawn = [Path(font).name for font in synthetic.drawing_fonts()]
    assert len(drawn) > 10 and "DejaVuSans.ttf" in drawn  # DejaVu, STIX, Computer Modern
    assert "LastResortHE-Regular.ttf" not in drawn  # one box for every letter: no letter at all
