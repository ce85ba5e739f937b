"""Synthetic notMNIST: archives laid out like the real ones, drawn from the fonts matplotlib ships.

The real notMNIST is every letter A-J of thousands of fonts rendered to 28x28 grayscale PNGs named
after the base64 of the font file's name, with a few files that cannot be read. This module makes
archives of the same shape, so tests, benchmarks and the demo never need the 247 MB download.

An archive is deterministic for its seed, whatever the worker count: its glyphs come from the fonts
matplotlib ships (DejaVu, STIX, Computer Modern; `bundled_fonts`), never from the system's font
folders unless asked (`find_fonts()`, `make-archives --system-fonts`), so installing a package that
brings fonts changes nothing. What still can: the versions of matplotlib (its fonts), Pillow (its
FreeType) and zlib. `fonts=()` uses only Pillow's built-in font.
"""

from __future__ import annotations

import base64
import functools
import gzip
import io
import multiprocessing
import os
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from core.seed import IMAGE_SIDE, LETTERS
from storage.atomic import atomic_path
from storage.digests import sha256_of

# Kinds the decode stage must skip: the real archives' 7 bad files all fail with "cannot identify
# image file" (see the seed README); truncation is the other way a download or extraction breaks.
UNREADABLE_KINDS = ("empty", "truncated", "not-an-image")
# Decodable images that are not 28x28 8-bit grayscale, to test how the decode stage treats them.
WRONG_IMAGE_KINDS = ("wrong-size", "rgb", "rgba", "palette", "gray16")
BAD_FILE_KINDS = UNREADABLE_KINDS + WRONG_IMAGE_KINDS
# A handful per archive, only of the unreadable kinds, like the 5 in the real large archive.
DEFAULT_BAD_FILES: Mapping[str, int] = MappingProxyType({"empty": 2, "not-an-image": 2, "truncated": 1})

FONT_SUFFIXES = (".ttf", ".otf", ".ttc")
# Glyphs are drawn big, then warped and reduced, so every font ends up about the same size.
DRAW_FONT_SIZE = 64
DRAW_CANVAS = 160
SUPERSAMPLE = 2
# Variation is tuned so the seed's small CNN (one Conv2D, Adam) scores about 93% on held-out
# glyphs after 3 epochs of 60k, near its 0.941 on the real data; with noise, blur, slant, rotation
# and stretch about 1.5x stronger it stayed at 84%.
SMALL_LETTER_CHANCE = 0.1  # some real notMNIST fonts have only small letters
INVERTED_CHANCE = 0.03  # real notMNIST has fonts that draw a dark letter in a light box
BLUR_CHANCE = 0.2
NOISE_CHANCE = 0.4
# Below this many files a process pool costs more to start than it saves.
PARALLEL_MINIMUM_FILES = 4_000
FILES_PER_CHUNK = 500
# Like the 403 page users reported saving in place of the archive (seed README).
NOT_AN_IMAGE_BYTES = b"<html><head><title>403 Forbidden</title></head><body>Forbidden</body></html>\n"

FAMILY_WORDS = (
    "Aldine", "Baskerton", "Corvina", "Dorian", "Elmwood", "Fairfax", "Garamis", "Harbor",
    "Ivory", "Juniper", "Kestrel", "Lindon", "Meridian", "Norwich", "Orchid", "Palatine",
    "Quill", "Romana", "Sable", "Tamsin", "Umbra", "Verona", "Wexford", "Yardley", "Zephyr",
)  # fmt: skip
CLASS_WORDS = ("", " Sans", " Serif", " Mono", " Display", " Grotesk", " Slab", " Script", " Poster", " Text")
STYLE_WORDS = ("Regular", "Bold", "Italic", "Bold Italic", "Light", "SemiBold", "Black", "Oblique", "BoldOblique")
FONT_FILE_SUFFIXES = ("ttf", "otf", "pfb")
# Each kind of random choice has its own stream, so that no two draw the same numbers.
GLYPH_STREAM, FONT_STREAM, NAME_STREAM, PLACEMENT_STREAM = range(4)


@dataclass(frozen=True)
class BadFile:
    """One injected bad file: its path relative to the letter folders' root, and its kind."""

    path: str
    kind: str

    @property
    def letter(self) -> str:
        """The letter folder the file sits in."""
        return self.path.split("/", 1)[0]

    @property
    def unreadable(self) -> bool:
        """True for kinds no image decoder can read."""
        return self.kind in UNREADABLE_KINDS


@dataclass(frozen=True)
class LetterFolders:
    """Letter folders written by `write_letter_folders`: where, and what is in them."""

    root: Path
    good_per_letter: dict[str, int]
    bad_files: tuple[BadFile, ...]


@dataclass(frozen=True)
class SyntheticArchive:
    """A `.tar.gz` written by `make_archive`, with what is in it."""

    path: Path
    size_bytes: int
    sha256: str
    good_per_letter: dict[str, int]
    bad_files: tuple[BadFile, ...]


@dataclass(frozen=True)
class _FileSpec:
    """What to draw for one file; everything else follows from the seed."""

    path: str
    letter_index: int
    image_index: int
    kind: str | None  # None for a good image


def _font_folders() -> list[Path]:
    """The standard font folders of Linux, macOS and Windows, whether or not they exist here."""
    home = Path.home()
    windows = Path(os.environ.get("WINDIR", r"C:\Windows"))
    local_app_data = Path(os.environ.get("LOCALAPPDATA", home / "AppData" / "Local"))
    data_home = Path(os.environ.get("XDG_DATA_HOME", home / ".local" / "share"))
    return [
        Path("/usr/share/fonts"),
        Path("/usr/local/share/fonts"),
        home / ".fonts",
        data_home / "fonts",
        Path("/System/Library/Fonts"),
        Path("/Library/Fonts"),
        home / "Library" / "Fonts",
        windows / "Fonts",
        local_app_data / "Microsoft" / "Windows" / "Fonts",
    ]


def bundled_fonts() -> list[Path]:
    """The TrueType fonts that ship inside matplotlib: the same files on every machine with its version."""
    import matplotlib

    return sorted(Path(matplotlib.get_data_path(), "fonts", "ttf").glob("*.ttf"))


def drawing_fonts(system_fonts: bool = False) -> list[str]:
    """The names of the fonts `make_archives` draws with (after Pillow's built-in one)."""
    fonts = find_fonts() if system_fonts else bundled_fonts()
    return [str(font) for font in _usable_fonts(tuple(fonts)) if font is not None]


def find_fonts(folders: Sequence[Path] | None = None) -> list[Path]:
    """Every TrueType/OpenType font file under `folders` (default: the standard font folders), sorted."""
    found: set[Path] = set()
    for folder in _font_folders() if folders is None else folders:
        # os.walk skips folders it may not read instead of failing the whole search.
        for directory, _, names in os.walk(folder):
            found.update(Path(directory, name) for name in names if name.lower().endswith(FONT_SUFFIXES))
    return sorted(found)


@functools.lru_cache(maxsize=None)  # each image picks a font at random, so keep them all loaded
def _load_font(font: Path | None) -> ImageFont.FreeTypeFont:
    """The font at drawing size; None is Pillow's built-in scalable font (Pillow >= 10.1)."""
    if font is None:
        return ImageFont.load_default(size=DRAW_FONT_SIZE)
    return ImageFont.truetype(str(font), DRAW_FONT_SIZE)


def _draw(character: str, font: ImageFont.FreeTypeFont, stroke_width: int = 0) -> Image.Image:
    """`character` drawn white on a black canvas, centred."""
    canvas = Image.new("L", (DRAW_CANVAS, DRAW_CANVAS))
    centre = DRAW_CANVAS / 2
    ImageDraw.Draw(canvas).text(
        (centre, centre), character, fill=255, font=font, anchor="mm", stroke_width=stroke_width, stroke_fill=255
    )
    return canvas


@functools.lru_cache(maxsize=8)
def _usable_fonts(fonts: tuple[Path, ...]) -> tuple[Path | None, ...]:
    """Pillow's built-in font, then those of `fonts` that load and draw every letter, big and small, each its own."""
    usable: list[Path | None] = [None]
    for font in fonts:
        try:
            loaded = _load_font(font)
            # A font without a letter draws the same box as for a code point no font has.
            missing = _draw("\U000f0000", loaded).tobytes()
            drawings = [_draw(character, loaded) for character in LETTERS + LETTERS.lower()]
        except (OSError, ValueError):
            continue  # not a font Pillow can draw with (a bitmap-only or damaged file)
        distinct = len({drawing.tobytes() for drawing in drawings[: len(LETTERS)]}) == len(LETTERS)
        if distinct and all(drawing.getbbox() is not None and drawing.tobytes() != missing for drawing in drawings):
            usable.append(font)  # a font of one box for a whole block of letters (LastResort) draws no letter
    return tuple(usable)


@functools.lru_cache(maxsize=1024)  # a chunk of files is one or two letters: a few hundred outlines, 26 kB each
def _outline(character: str, font: Path | None, stroke_width: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """`character` drawn big in `font` (the canvas is only read afterwards) and the box around its ink."""
    canvas = _draw(character, _load_font(font), stroke_width=stroke_width)
    return canvas, canvas.getbbox() or (0, 0, DRAW_CANVAS, DRAW_CANVAS)


def render_glyph(letter: str, font: Path | None, rng: np.random.Generator) -> np.ndarray:
    """Draw `letter` (A-J) in `font` (None: Pillow's built-in) as a varied 28x28 uint8 array, light on black.

    Size, proportions, stroke width, slant, rotation, position, brightness, blur and noise are
    drawn from `rng`; a few glyphs are small letters or dark on light, as in the real archives.
    """
    if len(letter) != 1 or letter not in LETTERS:
        raise ValueError(f"letter must be one of {LETTERS}, got {letter!r}")
    character = letter.lower() if rng.random() < SMALL_LETTER_CHANCE else letter
    canvas, (left, top, right, bottom) = _outline(character, font, int(rng.integers(0, 5)))

    size = IMAGE_SIDE * SUPERSAMPLE
    stretch_x = float(np.exp(rng.uniform(-0.2, 0.2)))
    shear = rng.uniform(-0.2, 0.2)
    angle = np.deg2rad(np.clip(rng.normal(0.0, 4.0), -12.0, 12.0))
    # Real glyphs mostly fill the box; some are smaller.
    fill = rng.uniform(0.65, 1.0)
    scale = fill * size / max((right - left) * stretch_x, bottom - top, 1)
    cosine, sine = np.cos(angle), np.sin(angle)
    forward = np.array([[cosine, -sine], [sine, cosine]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    forward = forward @ np.diag([stretch_x * scale, scale])
    slack = np.maximum(size - np.array([(right - left) * stretch_x, bottom - top]) * scale, 0.0) / 2
    output_centre = size / 2 + rng.uniform(-slack - 1, slack + 1)
    glyph_centre = np.array([(left + right) / 2, (top + bottom) / 2])
    # Image.transform wants the map from output pixels back to canvas pixels.
    inverse = np.linalg.inv(forward)
    offset = glyph_centre - inverse @ output_centre
    coefficients = (*inverse[0], offset[0], *inverse[1], offset[1])
    image = canvas.transform((size, size), Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR)
    if rng.random() < BLUR_CHANCE:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    image = image.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BOX)

    pixels = np.asarray(image, dtype=np.float32) * rng.uniform(0.7, 1.0)
    if rng.random() < NOISE_CHANCE:
        pixels += rng.normal(0.0, rng.uniform(2.0, 15.0), pixels.shape)
    if rng.random() < INVERTED_CHANCE:
        pixels = 255.0 - pixels
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _png(image: Image.Image) -> bytes:
    """`image` encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _bad_file_bytes(kind: str, glyph: np.ndarray) -> bytes:
    """The content of a bad file of `kind`; the decodable kinds carry `glyph` in the wrong form."""
    image = Image.fromarray(glyph)
    if kind == "empty":
        return b""
    if kind == "truncated":
        png = _png(image)
        return png[: len(png) // 2]  # past the header, so it opens but fails to load
    if kind == "not-an-image":
        return NOT_AN_IMAGE_BYTES
    if kind == "wrong-size":
        return _png(image.resize((IMAGE_SIDE + 4, IMAGE_SIDE + 4), Image.Resampling.BILINEAR))
    if kind == "rgb":
        return _png(image.convert("RGB"))
    if kind == "rgba":
        return _png(image.convert("RGBA"))
    if kind == "palette":
        return _png(image.convert("P"))
    if kind == "gray16":
        return _png(Image.fromarray(glyph.astype(np.uint16) * 257))  # uint16 arrays become mode "I;16"
    raise ValueError(f"unknown bad file kind {kind!r}; known kinds: {', '.join(BAD_FILE_KINDS)}")


def _font_file_name(seed: int, image_index: int) -> str:
    """An invented font file name for image `image_index`, unique through the index in it."""
    rng = np.random.default_rng([seed, NAME_STREAM, image_index])
    family = FAMILY_WORDS[rng.integers(len(FAMILY_WORDS))] + CLASS_WORDS[rng.integers(len(CLASS_WORDS))]
    style = STYLE_WORDS[rng.integers(len(STYLE_WORDS))]
    suffix = FONT_FILE_SUFFIXES[rng.integers(len(FONT_FILE_SUFFIXES))]
    return f"{family} {image_index} {style}.{suffix}"


def _image_file_name(seed: int, image_index: int) -> str:
    """The PNG name the real archives would use: base64 of the font file name.

    Font names here are ASCII letters, digits, spaces and dots, which never encode to "/" (only
    "?", DEL and bytes >= 0x80 can), so every name is a valid file name.
    """
    return base64.b64encode(_font_file_name(seed, image_index).encode("ascii")).decode("ascii") + ".png"


def _plan(per_letter: int, seed: int, bad_files: Mapping[str, int]) -> list[_FileSpec]:
    """Every file to write, sorted by path; bad files get image indexes after the good ones."""
    if per_letter < 0:
        raise ValueError(f"per_letter must be >= 0, got {per_letter}")
    unknown = sorted(set(bad_files) - set(BAD_FILE_KINDS))
    if unknown:
        raise ValueError(f"unknown bad file kinds {unknown}; known kinds: {', '.join(BAD_FILE_KINDS)}")
    if any(count < 0 for count in bad_files.values()):
        raise ValueError(f"bad file counts must be >= 0, got {dict(bad_files)}")

    # Every letter folder holds the same names, as every real font file gave one image per letter.
    names = [_image_file_name(seed, image_index) for image_index in range(per_letter)]
    specs = [
        _FileSpec(f"{letter}/{name}", letter_index, image_index, None)
        for letter_index, letter in enumerate(LETTERS)
        for image_index, name in enumerate(names)
    ]
    # Placement follows the canonical kind order, not the caller's mapping order.
    placement = np.random.default_rng([seed, PLACEMENT_STREAM])
    next_index = [per_letter] * len(LETTERS)
    for kind in BAD_FILE_KINDS:
        for _ in range(bad_files.get(kind, 0)):
            letter_index = int(placement.integers(len(LETTERS)))
            image_index = next_index[letter_index]
            next_index[letter_index] += 1
            path = f"{LETTERS[letter_index]}/{_image_file_name(seed, image_index)}"
            specs.append(_FileSpec(path, letter_index, image_index, kind))
    return sorted(specs, key=lambda spec: spec.path)


@functools.lru_cache(maxsize=None)  # asked once per letter; a few thousand small ints
def _font_index(seed: int, image_index: int, fonts: int) -> int:
    """Which font image `image_index` is drawn in: one per image index, as each real font file gave one image of
    every letter."""
    return int(np.random.default_rng([seed, FONT_STREAM, image_index]).integers(fonts))


def _render_chunk(specs: Sequence[_FileSpec], seed: int, fonts: tuple[Path | None, ...]) -> list[bytes]:
    """The bytes of each file in `specs`; runs in worker processes, so it takes only picklable values."""
    contents = []
    for spec in specs:
        font = fonts[_font_index(seed, spec.image_index, len(fonts))]
        glyph_rng = np.random.default_rng([seed, GLYPH_STREAM, spec.letter_index, spec.image_index])
        glyph = render_glyph(LETTERS[spec.letter_index], font, glyph_rng)
        contents.append(_png(Image.fromarray(glyph)) if spec.kind is None else _bad_file_bytes(spec.kind, glyph))
    return contents


def _render(
    specs: Sequence[_FileSpec], seed: int, fonts: Sequence[Path] | None, workers: int | None
) -> Iterator[bytes]:
    """The bytes of each file in `specs`, in order, drawn by `workers` processes."""
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1 or None, got {workers}")
    if workers is None:
        workers = 1 if len(specs) < PARALLEL_MINIMUM_FILES else os.cpu_count() or 1
    usable = _usable_fonts(tuple(bundled_fonts() if fonts is None else fonts))
    chunks = [specs[start : start + FILES_PER_CHUNK] for start in range(0, len(specs), FILES_PER_CHUNK)]
    render_chunk = functools.partial(_render_chunk, seed=seed, fonts=usable)
    # Checks above run now; the drawing below runs as the caller consumes the files.
    return _drain(render_chunk, chunks, workers)


def _drain(
    render_chunk: Callable[[Sequence[_FileSpec]], list[bytes]], chunks: Sequence[Sequence[_FileSpec]], workers: int
) -> Iterator[bytes]:
    """The contents of every chunk in order, drawn in this process or by a pool of `workers`."""
    if workers == 1:
        for chunk in chunks:
            yield from render_chunk(chunk)
        return
    # "spawn" because forking a process that runs threads (Prefect, TensorFlow) can deadlock.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for contents in pool.imap(render_chunk, chunks):
            yield from contents


def _summary(specs: Sequence[_FileSpec]) -> tuple[dict[str, int], tuple[BadFile, ...]]:
    """Good images per letter and the bad files, as the result dataclasses report them."""
    good_per_letter = dict.fromkeys(LETTERS, 0)
    for spec in specs:
        if spec.kind is None:
            good_per_letter[LETTERS[spec.letter_index]] += 1
    bad = tuple(BadFile(spec.path, spec.kind) for spec in specs if spec.kind is not None)
    return good_per_letter, bad


def write_letter_folders(
    root: Path,
    *,
    per_letter: int,
    seed: int = 0,
    bad_files: Mapping[str, int] = DEFAULT_BAD_FILES,
    workers: int | None = None,
    fonts: Sequence[Path] | None = None,
) -> LetterFolders:
    """Write `root`/A..J/<base64 font name>.png as in an extracted notMNIST archive, replacing `root`.

    Args:
        per_letter: good images in each letter folder.
        bad_files: how many bad files of each kind (see BAD_FILE_KINDS) to add, spread over letters.
        workers: drawing processes; None picks one for small jobs and one per CPU for big ones.
            They are spawned, so a script that asks for more than one needs the
            `if __name__ == "__main__":` guard.
        fonts: font files to draw with (default: `bundled_fonts()`); Pillow's built-in font is always used.
    """
    root = Path(root)
    specs = _plan(per_letter, seed, bad_files)
    contents = _render(specs, seed, fonts, workers)
    with atomic_path(root) as temporary:
        for letter in LETTERS:
            (temporary / letter).mkdir(parents=True)
        for spec, content in zip(specs, contents, strict=True):
            (temporary / spec.path).write_bytes(content)
    good_per_letter, bad = _summary(specs)
    return LetterFolders(root, good_per_letter, bad)


def _tar_member(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    """A tar header with nothing in it that depends on the machine or the time."""
    member = tarfile.TarInfo(name)
    member.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    member.mode = 0o755 if directory else 0o644
    member.size = size
    member.mtime = 0
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    return member


def make_archive(
    dest_dir: Path,
    name: str = "notMNIST_small",
    *,
    per_letter: int,
    seed: int = 0,
    bad_files: Mapping[str, int] = DEFAULT_BAD_FILES,
    workers: int | None = None,
    fonts: Sequence[Path] | None = None,
) -> SyntheticArchive:
    """Write `dest_dir`/<name>.tar.gz holding <name>/A..J/*.png, atomically and byte-for-byte reproducibly.

    The arguments after `name` are those of `write_letter_folders`. Members go straight from memory
    into the archive (folders first, then files sorted by path) with fixed times and owners, under a
    gzip header without a time.
    """
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"name must be a plain folder name, got {name!r}")
    path = Path(dest_dir) / f"{name}.tar.gz"
    specs = _plan(per_letter, seed, bad_files)
    contents = _render(specs, seed, fonts, workers)
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as raw:
            with (
                # Level 6: the PNGs are already compressed, so 9 costs time and saves almost nothing.
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as compressed,
                tarfile.open(fileobj=compressed, mode="w", format=tarfile.GNU_FORMAT) as archive,
            ):
                for folder in (name, *(f"{name}/{letter}" for letter in LETTERS)):
                    archive.addfile(_tar_member(f"{folder}/", directory=True))
                for spec, content in zip(specs, contents, strict=True):
                    archive.addfile(_tar_member(f"{name}/{spec.path}", size=len(content)), io.BytesIO(content))
            raw.flush()
            os.fsync(raw.fileno())
        size_bytes = temporary.stat().st_size
        sha256 = sha256_of(temporary)
    good_per_letter, bad = _summary(specs)
    return SyntheticArchive(path, size_bytes, sha256, good_per_letter, bad)


def make_archives(
    dest_dir: Path, *, per_letter: int, small_per_letter: int | None = None, seed: int = 2024,
    system_fonts: bool = False,
) -> dict:
    """Write notMNIST_large.tar.gz and notMNIST_small.tar.gz; returns name -> {bytes, sha256, images}.

    With `system_fonts`, the glyphs come from this machine's font folders too (and the bytes depend on them).
    """
    small_per_letter = small_per_letter or max(per_letter // 6, 20)
    fonts = find_fonts() if system_fonts else None
    archives = {}
    for name, count, archive_seed in (("notMNIST_large", per_letter, seed), ("notMNIST_small", small_per_letter, seed + 1)):
        archive = make_archive(Path(dest_dir), name, per_letter=count, seed=archive_seed, fonts=fonts)
        archives[archive.path.name] = {
            "path": str(archive.path), "bytes": archive.size_bytes, "sha256": archive.sha256,
            "images": sum(archive.good_per_letter.values()), "unreadable": len(archive.bad_files),
        }
    return archives
