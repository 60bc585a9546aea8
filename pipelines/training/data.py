"""Datasets of the shapes world, drawn once and cached as .npy under ``runs/data`` (git-ignored).

Images are uint8 (N, H, W, 3), memory-mapped on load; labels are indices into
:func:`pipelines.training.shapes.all_captions`. The same (seed, n, size) always gives the same arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipelines.training import shapes

DATA_DIR = Path("runs/data")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRAIN_SEED, HELDOUT_SEED = 0, 1_000_003


def caption_index() -> dict[str, int]:
    """Caption -> label over all captions of the world."""
    return {c: i for i, c in enumerate(shapes.all_captions())}


def render(attrs: shapes.ShapeAttributes, size: int, draw_size: int | None = None) -> np.ndarray:
    """(size, size, 3) uint8; drawn at ``draw_size`` then bicubic-resized, as CLIP's processor would."""
    image = shapes.draw(attrs, draw_size or size)
    if image.size[0] != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image)


def image_set(seed: int, n: int, size: int, draw_size: int | None = None,
              root: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Cached (images (N, size, size, 3) uint8, labels (N,) int64) for ``n`` drawings from ``seed``."""
    stem = root / (f"shapes-s{seed}-n{n}-{size}" + (f"-from{draw_size}" if draw_size else ""))
    images_path, labels_path = stem.with_suffix(".images.npy"), stem.with_suffix(".labels.npy")
    if not images_path.exists():
        root.mkdir(parents=True, exist_ok=True)
        attrs = shapes.dataset(seed, n)
        index = caption_index()
        shape = (n, size, size, 3)
        images = np.lib.format.open_memmap(images_path.with_suffix(".tmp.npy"), "w+", np.uint8, shape)
        for i, a in enumerate(tqdm(attrs, desc=f"drawing {n} x {size}px", mininterval=5)):
            images[i] = render(a, size, draw_size)
        images.flush()
        del images
        np.save(labels_path, np.array([index[shapes.caption(a)] for a in attrs], dtype=np.int64))
        images_path.with_suffix(".tmp.npy").rename(images_path)
    return np.load(images_path, mmap_mode="r"), np.load(labels_path)


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], the VAE's range."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def unit_psnr(decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of [-1, 1] images (B, 3, H, W) against ``target``; ``decoded`` clamped to [-1, 1]."""
    mse = ((decoded.float().clamp(-1, 1) - target) / 2).pow(2).mean((1, 2, 3))  # (B,)
    return -10 * torch.log10(mse.clamp_min(1e-10))


def clip_normalize(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (B, 3, H, W) -> CLIP-normalized pixel values."""
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return ((images + 1.0) / 2.0 - mean) / std


def degrade(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mild blur, noise and colour shift on a random subset, so scorers also see imperfect images."""
    b = images.shape[0]
    pick = (torch.rand(b, generator=generator) < p).view(b, 1, 1, 1)  # (B, 1, 1, 1)
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4.0
    k2 = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)  # (3, 1, 3, 3)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), "replicate")  # (B, 3, H + 2, W + 2)
    blurred = torch.nn.functional.conv2d(padded, k2, groups=3)  # (B, 3, H, W)
    noise = torch.randn(images.shape, generator=generator) * 0.06
    shift = (torch.rand(b, 3, 1, 1, generator=generator) - 0.5) * 0.12  # (B, 3, 1, 1)
    return torch.where(pick, (blurred + noise + shift).clamp(-1, 1), images)
