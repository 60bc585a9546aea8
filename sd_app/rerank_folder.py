"""Rerank images that already exist: score files against a prompt, sort best first, CSV, keep the best K.

Used by ``sd-app score`` and the UI's Rerank view (whose handler only turns its inputs into these calls).
Files are read as RGB (alpha composited over white, gray replicated); unreadable files are skipped and
listed, not fatal. Keeping the best K copies them into a folder under sanitised names
``NN-<original name>.<ext>`` (NN = rank), never overwriting: an existing name gets ``-2``, ``-3``...
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.rerank.scorers import Scorer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_FILES = 1000  # one ranking holds at most this many images (CLIP features for all stay in memory)


@dataclass(frozen=True)
class RankedFile:
    """One image: where it is, its ranking score and every scorer's number (label -> value)."""

    path: Path
    score: float
    scores: dict[str, float]


@dataclass
class FileRanking:
    """Images best first, the labels of their numbers (the ranking score first) and what was skipped."""

    prompt: str
    label: str  # of the ranking score
    scorer: str  # the scorer's name
    rows: list[RankedFile]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)
    truncated: bool = False  # the prompt was cut to CLIP's 77 tokens
    scored_text: str | None = None  # what the scorers read (``scoring_prompt``); None: the prompt itself

    @property
    def note(self) -> str | None:
        """``scored against: ...`` when the scorers read the prompt without its A1111 syntax, else None."""
        from pipelines.rerank.prompt_text import scoring_note

        return scoring_note(self.prompt)

    @property
    def labels(self) -> list[str]:
        """Column labels: the ranking score, then the other numbers in first-seen order."""
        labels = [self.label]
        for row in self.rows:
            labels += [label for label in row.scores if label not in labels]
        return labels

    def table(self) -> list[list[object]]:
        """Rows of ``rank, file, <labels...>`` (numbers rounded to 4 places; blank where a row lacks one)."""
        labels = self.labels
        return [
            [rank, row.path.name, *(round(row.scores[x], 4) if x in row.scores else "" for x in labels)]
            for rank, row in enumerate(self.rows, start=1)
        ]

    def csv_text(self) -> str:
        """The table as CSV with a header row: rank, file, path, <labels...> (full precision)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        labels = self.labels
        writer.writerow(["rank", "file", "path", *labels])
        for rank, row in enumerate(self.rows, start=1):
            numbers = [repr(row.scores[x]) if x in row.scores else "" for x in labels]
            writer.writerow([rank, row.path.name, str(row.path), *numbers])
        return buffer.getvalue()


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder`` (by suffix), sorted by name; ValueError when there are none."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders replaced by their image files; at most ``MAX_FILES``."""
    files: list[Path] = []
    for path in paths:
        path = Path(path).expanduser()
        files += image_files(path) if path.is_dir() else [path]
    if not files:
        raise ValueError("no images given")
    if len(files) > MAX_FILES:
        raise ValueError(f"{len(files)} images: rank at most {MAX_FILES} at once")
    return files


def rank_files(
    paths: Sequence[str | Path], prompt: str, scorer: Scorer, *, convert: bool = True, strict: bool = False
) -> FileRanking:
    """Score the images of ``paths`` against ``prompt`` with ``scorer``; best first. The scorer reads
    ``scoring_prompt(prompt)``, as when the images were generated, so the numbers are the generation's.

    ``convert``: alpha / gray images become RGB (else ValueError); ``strict``: an unreadable file is an
    error instead of being skipped and listed in ``skipped``."""
    from pipelines.rerank.clip_scorer import load_image_file
    from pipelines.rerank.min_score import candidate_scores
    from pipelines.rerank.prompt_text import scoring_prompt

    readable, images, skipped = [], [], []
    for path in expand_paths(paths):
        try:
            images.append(load_image_file(path, convert=convert))
            readable.append(path)
        except (OSError, ValueError) as error:
            if strict:
                raise
            skipped.append((path, str(error)))
    if not images:
        raise ValueError("none of the files is a readable image: " + "; ".join(why for _, why in skipped[:3]))
    text = scoring_prompt(prompt)
    result = scorer.score(images, text)
    rows = []
    for i in result.order():
        scores = candidate_scores(result.scores[i], result.label, result.details[i] if result.details else {})
        rows.append(RankedFile(readable[i], result.scores[i], scores))
    return FileRanking(prompt, result.label, scorer.name, rows, skipped, result.truncated, text)


def keep_best(ranking: FileRanking, k: int, folder: str | Path) -> list[Path]:
    """Copy the best ``k`` files into ``folder`` (created) as ``NN-<name>``; never overwrites. The copies."""
    from sd_app.storage import slugify

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"keep must be a positive integer, got {k!r}")
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for rank, row in enumerate(ranking.rows[:k], start=1):
        suffix = row.path.suffix.lower() if row.path.suffix.lower() in IMAGE_SUFFIXES else ".png"
        stem = f"{rank:02d}-{slugify(row.path.stem, 80)}"
        copies.append(_copy_new(row.path, folder, stem, suffix))
    return copies


def _copy_new(source: Path, folder: Path, stem: str, suffix: str) -> Path:
    """Copy ``source`` to ``folder/stem.suffix`` (or ``stem-2.suffix``...), atomically, never replacing a file."""
    from sd_app.storage import create_temp_file

    handle, temp_name = create_temp_file(folder, suffix=suffix)
    os.close(handle)
    try:
        shutil.copyfile(source, temp_name)
        attempt = 1
        while True:
            target = folder / (f"{stem}{suffix}" if attempt == 1 else f"{stem}-{attempt}{suffix}")
            try:
                os.link(temp_name, target)  # fails instead of overwriting
                return target
            except FileExistsError:
                attempt += 1
    finally:
        os.unlink(temp_name)
