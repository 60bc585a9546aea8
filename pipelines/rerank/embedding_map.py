"""2-D PCA map of the image and text embeddings of one request, drawn with matplotlib.

CLIP (Radford et al. 2021) puts images and texts in one space; projecting both sets onto their
first two principal components shows which texts sit near which images. PCA is a centred SVD in
numpy; drawing uses a ``matplotlib.figure.Figure`` on the Agg canvas (no pyplot global state).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class PCA2D:
    coords: np.ndarray  # [M, 2] projected points
    explained: tuple[float, float]  # fraction of the total variance on each axis (0 if degenerate)


def pca_2d(points: Any) -> PCA2D:
    """Project [M, D] points on their first two principal components.

    Degenerate inputs (one point, two points, all points equal) give zero coordinates on the
    missing axes instead of noise. Signs are fixed (largest loading positive), so maps are stable.
    """
    x = _as_array(points)  # [M, D]
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"points must be a non-empty [M, D] array, got shape {list(x.shape)}")
    centered = x - x.mean(axis=0)  # [M, D]
    _, singular, vt = np.linalg.svd(centered, full_matrices=False)  # [K], [K, D]
    coords = np.zeros((len(x), 2))
    tol = max(singular.max(initial=0.0) * 1e-6, 1e-12)
    for k in range(min(2, len(singular))):
        if singular[k] <= tol:
            continue
        component = vt[k] * np.sign(vt[k][np.abs(vt[k]).argmax()])  # [D]
        coords[:, k] = centered @ component
    total = float((singular**2).sum())
    explained = [float(s**2 / total) if total > 0 and s > tol else 0.0 for s in singular[:2]]
    explained += [0.0] * (2 - len(explained))
    return PCA2D(coords=coords, explained=(explained[0], explained[1]))


def embedding_map(
    image_features: Any,
    text_features: Any,
    texts: Sequence[str],
    images: Sequence[Image.Image] | None = None,
    image_labels: Sequence[str] | None = None,
    size: tuple[int, int] = (640, 480),
    thumbnail_px: int = 40,
    title: str | None = "CLIP embeddings, 2-D PCA",
) -> Image.Image:
    """Draw images ([N, D] features, optional thumbnails) and texts ([T, D]) on one PCA map.

    Returns an RGB PIL image of exactly ``size`` (width, height); save it as PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    img = _as_array(image_features)  # [N, D]
    txt = _as_array(text_features)  # [T, D]
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"features must be [N, D] and [T, D], got {list(img.shape)} and {list(txt.shape)}")
    if len(texts) != len(txt):
        raise ValueError(f"texts has {len(texts)} entries for {len(txt)} text features")
    if images is not None and len(images) != len(img):
        raise ValueError(f"images has {len(images)} entries for {len(img)} image features")
    if image_labels is not None and len(image_labels) != len(img):
        raise ValueError(f"image_labels has {len(image_labels)} entries for {len(img)} image features")
    if len(img) + len(txt) == 0:
        raise ValueError("nothing to draw: no image and no text features")

    pca = pca_2d(np.concatenate([img, txt]))
    img_xy, txt_xy = pca.coords[: len(img)], pca.coords[len(img) :]  # [N, 2], [T, 2]
    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(img_xy[:, 0], img_xy[:, 1], marker="o", s=30, color="tab:blue", label="images", zorder=2)
    ax.scatter(txt_xy[:, 0], txt_xy[:, 1], marker="*", s=120, color="tab:red", label="texts", zorder=3)
    for i, (x, y) in enumerate(img_xy):
        if images is not None:
            thumb = images[i].convert("RGB")
            thumb.thumbnail((thumbnail_px, thumbnail_px))
            box = OffsetImage(np.asarray(thumb), zoom=72 / dpi)  # zoom undoes the points->pixels scale
            ax.add_artist(
                AnnotationBbox(
                    box, (x, y), frameon=True, pad=0.1, zorder=1, bboxprops={"edgecolor": "tab:blue"}
                )
            )
        label = image_labels[i] if image_labels is not None else f"#{i}"
        ax.annotate(
            label,
            (x, y),
            xytext=(0, -thumbnail_px * 0.5 - 10),
            textcoords="offset points",
            ha="center",
            fontsize=7,
            color="tab:blue",
        )
    for text, (x, y) in zip(texts, txt_xy, strict=True):
        ax.annotate(
            textwrap.shorten(text, 40, placeholder="..."),
            (x, y),
            xytext=(6, 6),
            textcoords="offset points",
            fontsize=8,
            color="tab:red",
        )
    _set_limits(ax, pca.coords)
    ax.set_xlabel(f"PC1 ({pca.explained[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({pca.explained[1]:.0%} of variance)")
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())  # [H, W, 4]
    return Image.fromarray(np.ascontiguousarray(rgba[..., :3]))


def embedding_map_for(
    scorer: Any, images: Sequence[Image.Image], texts: Sequence[str], **kwargs: Any
) -> Image.Image:
    """Encode with a ``pipelines.rerank.clip_scorer.ClipScorer`` and draw the map (thumbnails included)."""
    text_features, _ = scorer.text_features(texts)
    return embedding_map(scorer.image_features(images), text_features, list(texts), images=images, **kwargs)


def _set_limits(ax: Any, coords: np.ndarray) -> None:
    """Pad the data range by 25% (and give a zero range a unit span) so thumbnails fit."""
    for axis, setter in ((0, ax.set_xlim), (1, ax.set_ylim)):
        low, high = float(coords[:, axis].min()), float(coords[:, axis].max())
        span = high - low if high - low > 1e-9 else 1.0
        setter(low - 0.25 * span, high + 0.25 * span)


def _as_array(x: Any) -> np.ndarray:
    """torch tensor or array-like -> float64 numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)
