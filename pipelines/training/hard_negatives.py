"""Hard negatives of the shapes world: pictures that differ from a caption only in count or binding.

For a caption "a red circle on a blue background" (:class:`shapes.ShapeAttributes`):

- two: two red circles on blue, captioned "two red circles on a blue background";
- mixed: a red circle with a second colour inside (a smaller circle of another colour in its middle),
  captioned "a red and yellow circle on a blue background";
- swapped: the shape and background colours exchanged, "a blue circle on a red background" (a caption
  of the world already).

Used to fine-tune the reranker's CLIP so that it counts and binds colours to shapes (Yuksekgonul et al.
2023 train with exactly such composition-aware hard negatives), and to test that it does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
from PIL import Image

from pipelines.training import shapes

KINDS = ("single", "two", "mixed", "swapped")


def two_caption(attrs: shapes.ShapeAttributes) -> str:
    return f"two {attrs.shape_colour} {attrs.shape}s on a {attrs.background} background"


def mixed_caption(attrs: shapes.ShapeAttributes, inner: str) -> str:
    return f"a {attrs.shape_colour} and {inner} {attrs.shape} on a {attrs.background} background"


def swapped(attrs: shapes.ShapeAttributes) -> shapes.ShapeAttributes:
    return replace(attrs, shape_colour=attrs.background, background=attrs.shape_colour)


def draw_two(attrs: shapes.ShapeAttributes, rng: np.random.Generator, size: int = 256) -> Image.Image:
    """Two shapes of ``attrs``' kind and colour, apart (left/right or top/bottom halves), smaller sizes."""
    radius = [float(rng.uniform(0.12, 0.2)) for _ in range(2)]
    across = float(rng.uniform(0.3, 0.7))
    along = [0.25 + float(rng.uniform(-0.03, 0.03)), 0.75 + float(rng.uniform(-0.03, 0.03))]
    horizontal = bool(rng.integers(2))
    first, second = (
        (replace(attrs, size=r, cx=a, cy=across) if horizontal else replace(attrs, size=r, cx=across, cy=a))
        for r, a in zip(radius, along)
    )
    image = np.asarray(shapes.draw(first, size)).copy()
    other = np.asarray(shapes.draw(second, size))
    painted = np.any(other != other[0, 0], axis=-1)
    image[painted] = other[painted]
    return Image.fromarray(image)


def draw_mixed(attrs: shapes.ShapeAttributes, inner: str, rng: np.random.Generator,
               size: int = 256) -> Image.Image:
    """``attrs``' shape with a same-kind shape of colour ``inner`` in its middle (45-60% of its radius)."""
    image = np.asarray(shapes.draw(attrs, size)).copy()
    core = replace(attrs, shape_colour=inner, size=attrs.size * float(rng.uniform(0.45, 0.6)))
    if core.shape_colour == core.background:
        raise ValueError(f"inner colour {inner!r} is the background colour")
    pixels = np.asarray(shapes.draw(core, size))
    painted = np.any(pixels != pixels[0, 0], axis=-1)
    image[painted] = pixels[painted]
    return Image.fromarray(image)


def inner_colour(attrs: shapes.ShapeAttributes, rng: np.random.Generator) -> str:
    """A colour that is neither the shape's nor the background's."""
    choices = [c for c in shapes.COLOURS if c not in (attrs.shape_colour, attrs.background)]
    return choices[int(rng.integers(len(choices)))]


def variants(attrs: shapes.ShapeAttributes, rng: np.random.Generator,
             size: int = 256) -> list[tuple[Image.Image, str, str]]:
    """(image, caption, kind) for the single drawing and its three hard negatives."""
    inner = inner_colour(attrs, rng)
    flipped = swapped(attrs)
    return [
        (shapes.draw(attrs, size), shapes.caption(attrs), "single"),
        (draw_two(attrs, rng, size), two_caption(attrs), "two"),
        (draw_mixed(attrs, inner, rng, size), mixed_caption(attrs, inner), "mixed"),
        (shapes.draw(flipped, size), shapes.caption(flipped), "swapped"),
    ]


CHOICES = ("count", "binding", "mixed")


def choice_cases(rng: np.random.Generator, n: int) -> Iterator[tuple[list[Image.Image], list[str]]]:
    """For n drawings: images [single, two, mixed] and captions [single, two, swapped, mixed]."""
    for attrs in (shapes.sample_attributes(rng) for _ in range(n)):
        (single, caption, _), (two, two_text, _), (mixed, mixed_text, _), _ = variants(attrs, rng)
        yield [single, two, mixed], [caption, two_text, shapes.caption(swapped(attrs)), mixed_text]


def two_way_hits(sims: np.ndarray) -> dict[str, list[bool]]:
    """Right answers of the two-way choices, from similarities (3 images x 4 captions) of one case of
    :func:`choice_cases`: count (single vs two, on both drawings), binding (single vs swapped) and a second
    colour inside (single vs mixed, on both drawings)."""
    return {
        "count": [bool(sims[0, 0] > sims[0, 1]), bool(sims[1, 1] > sims[1, 0])],
        "binding": [bool(sims[0, 0] > sims[0, 2])],
        "mixed": [bool(sims[0, 0] > sims[0, 3]), bool(sims[2, 3] > sims[2, 0])],
    }
