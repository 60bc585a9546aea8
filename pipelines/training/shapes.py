"""The synthetic captioned-shapes world and its pixel oracle.

One coloured shape (circle, square, triangle, star) on a plain background of another colour, drawn
procedurally with size and position jitter, captioned "a red circle on a blue background". The
oracle (:func:`judge`) reads only pixels, never a learned model, so it can grade generated images.
It checks what the caption says, written from the caption before it was run on any model:

- background: the dominant palette colour of the border is the named one;
- count: exactly one shape ("a"): one region of shape-coloured pixels larger than a small area (an
  eighth of the smallest shape the world draws), however many smaller specks there are;
- colour: the dominant non-background palette colour is the named one;
- binding: the shape's interior (its region shrunk by 2 judge pixels, so anti-aliased edges and thin
  halos do not count) is that one colour, at least 90% of it, not mixed with another;
- kind: the geometry of the largest region of the shape colour (fill ratio of its bounding box and
  solidity, i.e. area over convex-hull area).

``EXTRA_SHAPES`` (the hexagon) are drawn and judged but never sampled by :func:`dataset` nor captioned
by :func:`all_captions`: the embedded model never saw them, and LoRAs teach them
(``pipelines.training.lora``). The oracle tells a hexagon from a circle (by its outline's six-fold
harmonic) only when asked to know hexagons (``judge(..., known=...)``), so its verdicts on the base
world are unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
EXTRA_SHAPES: tuple[str, ...] = ("hexagon",)  # drawable, judged, never in the base world's data
ALL_SHAPES: tuple[str, ...] = SHAPES + EXTRA_SHAPES
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
STAR_INNER_RATIO = 0.45  # inner / outer radius of the 5-pointed star
_CAPTION_RE = re.compile(r"^\s*an?\s+(\w+)\s+(\w+)\s+on\s+an?\s+(\w+)\s+background\s*\.?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class ShapeAttributes:
    """What a caption says (shape, colours) plus the jitter it does not say (size, centre)."""

    shape: str
    shape_colour: str
    background: str
    size: float = 0.3  # radius of the shape's circumscribed circle, as a fraction of the image side
    cx: float = 0.5  # centre, fractions of the image side
    cy: float = 0.5

    def __post_init__(self) -> None:
        if self.shape not in ALL_SHAPES:
            raise ValueError(f"shape={self.shape!r} is not one of {ALL_SHAPES}")
        for name in ("shape_colour", "background"):
            if getattr(self, name) not in PALETTE:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {COLOURS}")
        if self.shape_colour == self.background:
            raise ValueError(f"shape_colour and background are both {self.background!r}")


@dataclass(frozen=True)
class Verdict:
    """The oracle's per-attribute judgement of one image, plus what it saw."""

    shape_colour_ok: bool
    background_ok: bool
    shape_ok: bool
    count_ok: bool = True
    binding_ok: bool = True
    seen_shape: str | None = None
    seen_shape_colour: str | None = None
    seen_background: str | None = None
    seen_count: int = 1  # shape-sized regions of non-background colour
    colour_purity: float = 1.0  # fraction of the shape's interior in the shape colour
    seen_inner_colour: str | None = None  # the commonest other colour inside the shape (None: none)

    @property
    def all_ok(self) -> bool:
        return self.shape_colour_ok and self.background_ok and self.shape_ok and self.count_ok and self.binding_ok


SIZE_RANGE = (0.2, 0.34)  # radius of the circumscribed circle, fraction of the image side


def sample_attributes(rng: np.random.Generator, kinds: tuple[str, ...] = SHAPES) -> ShapeAttributes:
    """Uniform shape (of ``kinds``) and colour pair (never equal), jittered size and position inside the frame."""
    shape = kinds[int(rng.integers(len(kinds)))]
    fg, bg = rng.choice(len(COLOURS), size=2, replace=False)
    size = float(rng.uniform(*SIZE_RANGE))
    margin = size + 0.04
    cx, cy = (float(v) for v in rng.uniform(margin, 1.0 - margin, size=2))
    return ShapeAttributes(shape, COLOURS[int(fg)], COLOURS[int(bg)], size, cx, cy)


def dataset(seed: int, n: int, kinds: tuple[str, ...] = SHAPES) -> list[ShapeAttributes]:
    """``n`` attribute sets of ``kinds`` (the base world's by default), the same for the same seed."""
    rng = np.random.default_rng(seed)
    return [sample_attributes(rng, kinds) for _ in range(n)]


def _polygon(attrs: ShapeAttributes, side: int) -> list[tuple[float, float]]:
    cx, cy, r = attrs.cx * side, attrs.cy * side, attrs.size * side
    if attrs.shape == "square":
        h = r / math.sqrt(2.0)  # the square's circumscribed circle has radius r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if attrs.shape == "triangle":  # upright equilateral
        angles = (math.pi / 2, 7 * math.pi / 6, -math.pi / 6)
        return [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in angles]
    if attrs.shape == "hexagon":  # regular, flat top: vertices at 0, 60, ..., 300 degrees
        return [(cx + r * math.cos(k * math.pi / 3), cy - r * math.sin(k * math.pi / 3)) for k in range(6)]
    points = []  # star: 5 outer and 5 inner vertices, one point up
    for k in range(10):
        radius = r if k % 2 == 0 else r * STAR_INNER_RATIO
        angle = math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy - radius * math.sin(angle)))
    return points


def draw(attrs: ShapeAttributes, size: int = 512) -> Image.Image:
    """Render the attributes as a ``size`` x ``size`` RGB image (hard edges, no anti-aliasing)."""
    image = Image.new("RGB", (size, size), PALETTE[attrs.background])
    pen = ImageDraw.Draw(image)
    fill = PALETTE[attrs.shape_colour]
    if attrs.shape == "circle":
        cx, cy, r = attrs.cx * size, attrs.cy * size, attrs.size * size
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pen.polygon(_polygon(attrs, size), fill=fill)
    return image


def caption(attrs: ShapeAttributes) -> str:
    """``a red circle on a blue background``."""
    return f"a {attrs.shape_colour} {attrs.shape} on a {attrs.background} background"


def parse_caption(text: str) -> ShapeAttributes | None:
    """Attributes (default size and position) named by a caption of the grammar, else None."""
    match = _CAPTION_RE.match(text)
    if match is None:
        return None
    colour, shape, background = (g.lower() for g in match.groups())
    if shape not in ALL_SHAPES or colour not in PALETTE or background not in PALETTE or colour == background:
        return None
    return ShapeAttributes(shape, colour, background)


def all_attributes() -> Iterator[ShapeAttributes]:
    """Every captionable (shape, colour, background) at the default size and position."""
    for shape in SHAPES:
        for fg in COLOURS:
            for bg in COLOURS:
                if fg != bg:
                    yield ShapeAttributes(shape, fg, bg)


def all_captions() -> list[str]:
    """All 4 x 6 x 5 = 120 captions, in a fixed order."""
    return [caption(a) for a in all_attributes()]


# ---- the oracle -------------------------------------------------------------------------------

_JUDGE_SIDE = 128


def _nearest_colour(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Palette index and distance of the nearest palette colour for each pixel. pixels: (..., 3)."""
    palette = np.array(list(PALETTE.values()), dtype=np.float32)  # (C, 3)
    dist = np.linalg.norm(pixels[..., None, :] - palette, axis=-1)  # (..., C)
    index = dist.argmin(-1)
    return index, np.take_along_axis(dist, index[..., None], -1)[..., 0]


def _open(mask: np.ndarray) -> np.ndarray:
    """Morphological opening with a 3x3 cross: drops isolated pixels and one-pixel speckle.

    Outside the image counts as off for the erosion and as on for the dilation, so mask pixels on the
    image border are kept.
    """
    from scipy import ndimage

    cross = ndimage.generate_binary_structure(2, 1)
    eroded = ndimage.binary_erosion(mask, cross, border_value=0)
    return ndimage.binary_dilation(eroded, cross, border_value=1) & mask


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N, 2) points; 0 for fewer than 3 points or collinear ones."""
    from scipy.spatial import ConvexHull, QhullError

    if len(np.unique(points, axis=0)) < 3:
        return 0.0
    try:
        return float(ConvexHull(points).volume)  # in 2-D the hull's "volume" is its area
    except QhullError:
        return 0.0


def shape_features(mask: np.ndarray) -> tuple[float, float]:
    """(fill ratio of the bounding box, solidity) of a boolean (H, W) shape mask.

    Pixel centres are treated as unit squares, so the hull is taken over pixel corners.
    """
    ys, xs = np.nonzero(mask)
    if len(xs) < 8:
        return 0.0, 0.0
    area = float(len(xs))
    box = float((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    edge = mask & ~_erode1(mask)  # only boundary pixels can be hull vertices
    ey, ex = np.nonzero(edge)
    corners = np.concatenate(
        [np.stack([ex + dx, ey + dy], 1) for dx in (0, 1) for dy in (0, 1)]
    )  # (4E, 2) pixel corners
    return area / box, area / max(_hull_area(corners), 1.0)


def _erode1(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_erosion(mask, ndimage.generate_binary_structure(2, 1), border_value=0)


HEXAGON_HARMONIC = 0.025  # six-fold outline harmonic: drawn circles <= 0.005, drawn hexagons >= 0.05


def outline_harmonics(mask: np.ndarray, bins: int = 48) -> np.ndarray:
    """Amplitudes of the outline's radial profile r(angle) / mean r at k = 0 .. bins / 2.

    The boundary pixels' mean distance from the centroid in ``bins`` angular sectors; a regular
    polygon with k corners has its harmonics at multiples of k (a hexagon's 6th is ~0.055, a circle's
    ~0), whatever its position, size or rotation.
    """
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    ey, ex = np.nonzero(mask & ~_erode1(mask))
    sector = ((np.arctan2(cy - ey, ex - cx) + np.pi) / (2 * np.pi) * bins).astype(int) % bins  # (E,)
    radius = np.hypot(ey - cy, ex - cx)  # (E,)
    counts = np.bincount(sector, minlength=bins)
    sums = np.bincount(sector, weights=radius, minlength=bins)
    profile = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)  # (bins,)
    profile = np.where(np.isnan(profile), np.nanmean(profile), profile)
    return np.abs(np.fft.rfft(profile / profile.mean() - 1.0)) * 2 / bins  # (bins / 2 + 1,)


def classify_shape(mask: np.ndarray, known: tuple[str, ...] = SHAPES) -> str | None:
    """Shape kind from the mask: star is non-convex; the convex ones differ in how they fill their box.

    Drawn values: circle fill 0.785, square 1.0, triangle 0.5 (all solidity ~1); star fill ~0.4,
    solidity ~0.65. A hexagon fills its box like a circle (0.75); when ``known`` has it, a round shape
    is a hexagon if its outline's six-fold harmonic is strong (> ``HEXAGON_HARMONIC`` of the mean
    radius) and stronger than the three-, four- and five-fold ones.
    """
    fill, solidity = shape_features(mask)
    if fill == 0.0:
        return None
    if solidity < 0.75:
        return "star"
    if fill > 0.9:
        return "square"
    if fill > 0.64:
        if "hexagon" in known:
            harmonics = outline_harmonics(mask)
            if harmonics[6] > HEXAGON_HARMONIC and harmonics[6] >= harmonics[3:6].max():
                return "hexagon"
        return "circle"
    return "triangle"


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean (H, W) mask (the one shape a caption speaks of).

    Ties go to the region met first in raster order.
    """
    from scipy import ndimage

    if not mask.any():
        return mask
    labels, _ = ndimage.label(mask)  # (H, W), 0 = background, regions 1..n in raster order
    return labels == np.bincount(labels[mask]).argmax()


def _smallest_shape_area() -> float:
    """Area of the smallest shape the world draws, as a fraction of the image (a triangle or star at the
    smallest size)."""
    r = SIZE_RANGE[0]
    triangle = 3 * math.sqrt(3) / 4 * r**2
    star = 5 * r * (r * STAR_INNER_RATIO) * math.sin(math.pi / 5)
    return min(math.pi * r**2, 2 * r**2, triangle, star)


MIN_SHAPE_PIXELS = _smallest_shape_area() / 8 * _JUDGE_SIDE**2  # a region smaller than this is a speck
MIN_PURITY = 0.9  # share of the shape's interior that must be the shape colour
_INTERIOR_MARGIN = 2  # judge pixels shaved off the shape's outline before checking its interior


def _regions(mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """8-connected labels of ``mask`` and the labels of the regions of at least MIN_SHAPE_PIXELS."""
    from scipy import ndimage

    labelled, n = ndimage.label(mask, structure=np.ones((3, 3), bool))  # (S, S), 0 = off
    sizes = np.bincount(labelled.ravel(), minlength=n + 1)
    return labelled, [k for k in range(1, n + 1) if sizes[k] >= MIN_SHAPE_PIXELS]


def _interior(region: np.ndarray) -> np.ndarray:
    """The region with its outline shaved off (the whole region when it is too thin to have an inside)."""
    from scipy import ndimage

    interior = ndimage.binary_erosion(region, iterations=_INTERIOR_MARGIN)
    return region if interior.sum() < 8 else interior


def _purity(region: np.ndarray, labels: np.ndarray, colour: int) -> tuple[float, str | None]:
    """Share of the region's interior whose nearest palette colour is ``colour``, and the commonest other
    palette colour inside it (None when there is none)."""
    inside = labels[_interior(region)]  # (pixels,) palette indices
    others = np.bincount(inside[inside != colour], minlength=len(COLOURS))
    return float(np.mean(inside == colour)), COLOURS[int(others.argmax())] if others.any() else None


def judge(image: Image.Image, attrs: ShapeAttributes, known: tuple[str, ...] | None = None) -> Verdict:
    """Check from pixels alone whether ``image`` is what ``attrs``' caption says (module docstring).

    ``known``: the shapes the oracle can tell apart (default: the base world's plus ``attrs.shape``).
    """
    if known is None:
        known = SHAPES if attrs.shape in SHAPES else SHAPES + (attrs.shape,)
    small = image.convert("RGB").resize((_JUDGE_SIDE, _JUDGE_SIDE), Image.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.float32)  # (S, S, 3)
    labels, dist = _nearest_colour(pixels)  # (S, S), (S, S)
    border = np.concatenate([labels[:3].ravel(), labels[-3:].ravel(), labels[:, :3].ravel(),
                             labels[:, -3:].ravel()])  # (4 * 3 * S,) labels of a 3-pixel frame
    bg = int(np.bincount(border, minlength=len(COLOURS)).argmax())
    # Pixels far from the background colour belong to the shape (or to its blurred edge) ...
    bg_dist = np.linalg.norm(pixels - np.array(PALETTE[COLOURS[bg]], dtype=np.float32), axis=-1)  # (S, S)
    foreground = _open(bg_dist > 60.0)
    seen_colour: str | None = None
    seen_shape: str | None = None
    seen_count, purity, inner = 0, 0.0, None
    if foreground.sum() >= 16:
        core = foreground & (labels != bg) & (dist < 90.0)  # (S, S) pixels of some other palette colour
        counts = np.bincount(labels[core], minlength=len(COLOURS))
        if counts.sum() > 0:
            colour = int(counts.argmax())
            seen_colour = COLOURS[colour]
            # ... shapes are the shape-sized regions of such pixels (specks are not shapes) ...
            regions, shapes_seen = _regions(_open(core))
            seen_count = len(shapes_seen)
            if shapes_seen:
                largest = max(shapes_seen, key=lambda k: int((regions == k).sum()))
                purity, inner = _purity(regions == largest, labels, colour)
            # ... and the kind is the geometry of the largest region nearest to the shape colour: halos
            # of in-between colours and stray specks elsewhere are not the shape.
            seen_shape = classify_shape(largest_component(_open(labels == colour)), known)
    return Verdict(
        shape_colour_ok=seen_colour == attrs.shape_colour,
        background_ok=COLOURS[bg] == attrs.background,
        shape_ok=seen_shape == attrs.shape,
        count_ok=seen_count == 1,
        binding_ok=purity >= MIN_PURITY,
        seen_shape=seen_shape,
        seen_shape_colour=seen_colour,
        seen_background=COLOURS[bg],
        seen_count=seen_count,
        colour_purity=purity,
        seen_inner_colour=inner,
    )


def _colour_regions(image: Image.Image, colour: str) -> np.ndarray:
    """Pixels (judge side) nearest to ``colour`` in the palette, within reach of it, opened as ``judge`` does."""
    small = image.convert("RGB").resize((_JUDGE_SIDE, _JUDGE_SIDE), Image.Resampling.BOX)
    labels, dist = _nearest_colour(np.asarray(small, dtype=np.float32))  # (S, S), (S, S)
    return _open((labels == COLOURS.index(colour)) & (dist < 90.0))


def count_shapes(image: Image.Image, colour: str) -> int:
    """How many shape-sized regions of ``colour`` the image has, by the rule :func:`judge` counts with
    (8-connected, at least MIN_SHAPE_PIXELS: specks are not shapes)."""
    return len(_regions(_colour_regions(image, colour))[1])


def shape_centre(image: Image.Image, colour: str) -> tuple[float, float] | None:
    """Centre (fractions of the side) of the largest region of ``colour``, the shape ``judge`` classifies."""
    region = largest_component(_colour_regions(image, colour))
    if not region.any():
        return None
    ys, xs = np.nonzero(region)
    return (float(xs.mean()) + 0.5) / _JUDGE_SIDE, (float(ys.mean()) + 0.5) / _JUDGE_SIDE


def region_inside(image: Image.Image, colour: str, mask: Image.Image) -> float:
    """Fraction of the largest region of ``colour`` that lies where ``mask`` is white (0 when there is none)."""
    region = largest_component(_colour_regions(image, colour))
    if not region.any():
        return 0.0
    inside = np.asarray(mask.convert("L").resize((_JUDGE_SIDE, _JUDGE_SIDE), Image.Resampling.BOX)) >= 128
    return float((region & inside).sum() / region.sum())


def fidelity(verdicts: list[Verdict]) -> dict[str, float]:
    """Fraction of verdicts all right (``"all"``) and right per check."""
    return {"all": float(np.mean([v.all_ok for v in verdicts])),
            "count": float(np.mean([v.count_ok for v in verdicts])),
            "binding": float(np.mean([v.binding_ok for v in verdicts])),
            "shape": float(np.mean([v.shape_ok for v in verdicts])),
            "shape_colour": float(np.mean([v.shape_colour_ok for v in verdicts])),
            "background": float(np.mean([v.background_ok for v in verdicts]))}
