"""The output folder: safe file names, atomic PNG writes with metadata, never overwriting.

Names follow A1111's ``NNNNN-SEED-<prompt slug>.png``. A file appears whole or not at all: the PNG is
written to a temporary file in the same folder and hard-linked to its final name, which fails rather
than replaces if that name exists (then the next number is tried).
"""

from __future__ import annotations

import os
import re
import secrets
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

SLUG_MAX = 60  # characters
SLUG_MAX_BYTES = 180  # a file name is at most 255 bytes (ext4, APFS, NTFS in UTF-16): room for NNNNN-SEED- and .png
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_NUMBER_RE = re.compile(r"^(\d{5})-")


def slugify(prompt: str, max_length: int = SLUG_MAX) -> str:
    """A file-name-safe slug of a prompt: no separators, control characters or reserved names."""
    text = unicodedata.normalize("NFKC", prompt)
    text = "".join(c if c.isprintable() else " " for c in text)
    text = re.sub(r"[^\w.-]+", " ", text)  # separators, brackets, punctuation -> space
    text = re.sub(r"[\s_]+", "_", text.strip()).strip("._-")
    text = _fit(text, max_length).rstrip("._-")
    if not text or text.lower().split(".")[0] in _WINDOWS_RESERVED:
        text = f"img_{text}" if text else "untitled"
    return _fit(text, max_length)


def _fit(text: str, max_length: int) -> str:
    """``text`` cut to ``max_length`` characters and ``SLUG_MAX_BYTES`` bytes of UTF-8 (whole characters)."""
    text = text[:max_length]
    while len(text.encode("utf-8")) > SLUG_MAX_BYTES:
        text = text[:-1]
    return text


def next_number(folder: Path) -> int:
    """One more than the highest ``NNNNN-`` number in ``folder`` (0 for an empty folder)."""
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBER_RE.match(p.name))]
    return max(numbers, default=-1) + 1


def create_temp_file(folder: Path, prefix: str = ".tmp-", suffix: str = ".png") -> tuple[int, str]:
    """A new file of a random name in ``folder``, open for writing, with the mode the umask gives (0644
    usually; ``tempfile.mkstemp``'s 0600 would keep the images from other users and a web server)."""
    while True:
        name = str(folder / f"{prefix}{secrets.token_hex(8)}{suffix}")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), name
        except FileExistsError:
            continue


def _write_temp_png(image: Image.Image, folder: Path, parameters: str | None, prefix: str = ".tmp-") -> str:
    """The PNG (with its ``parameters`` chunk) in a fsynced temporary file of ``folder``."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    handle, temp_name = create_temp_file(folder, prefix)
    try:
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG", pnginfo=info)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        os.unlink(temp_name)
        raise
    return temp_name


def save_png(
    image: Image.Image, folder: str | Path, seed: int, prompt: str, parameters: str | None = None
) -> Path:
    """Write ``image`` atomically as ``NNNNN-SEED-slug.png`` in ``folder`` (created if missing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    temp_name = _write_temp_png(image, folder, parameters)
    try:
        slug = slugify(prompt)
        number = next_number(folder)
        while True:
            target = folder / f"{number:05d}-{seed}-{slug}.png"
            try:
                os.link(temp_name, target)  # fails instead of overwriting
                return target
            except FileExistsError:
                number += 1
    finally:
        os.unlink(temp_name)


def save_png_as(image: Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    """Write ``image`` atomically under a fixed name (replacing a leftover of an unfinished attempt)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(_write_temp_png(image, path.parent, parameters, prefix=f".tmp-{path.stem}-"), path)
    return path
