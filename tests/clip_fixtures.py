"""Tiny random CLIP folders (openai/clip-vit-* layout) and test images for the rerank tests.

The folder builder lives in ``pipelines.rerank.random_clip`` (the benchmark needs it too); these helpers
give the tests their folders and images.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.rerank.random_clip import build_random_clip_folder
from pipelines.rerank.torchmetrics_reference import to_uint8_chw, torchmetrics_clip_score

__all__ = [
    "tiny_clip_dir",
    "blob_images",
    "to_uint8_chw",
    "torchmetrics_clip_score",
    "hf_cache_copy",
    "torch_threads",
]


def tiny_clip_dir(root: Path, legacy_preprocessor: bool = False, seed: int = 0) -> Path:
    """A 2-layer random CLIPModel (64 px images, 16 px patches) + image processor + CLIP tokenizer."""
    name = "clip-tiny-legacy" if legacy_preprocessor else "clip-tiny"
    return build_random_clip_folder(root / name, "tiny", legacy_preprocessor=legacy_preprocessor, seed=seed)


def blob_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """RGB images of smooth random colour blobs at the given (width, height) sizes."""
    rng = np.random.default_rng(seed)
    images = []
    for width, height in sizes:
        small = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))
    return images


def hf_cache_copy(folder: Path, cache_dir: Path, repo_id: str, revision: str = "0" * 40) -> Path:
    """Lay ``folder`` out as a Hugging Face hub cache entry: models--org--name/snapshots/<rev>."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch CPU threads, then restore. Tiny models gain nothing from more threads,
    and on a shared 2-core machine extra threads only contend (2-3x slower tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
