"""The shapes world: deterministic drawings, a caption grammar, and a pixel oracle right on them."""

import os

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pipelines.training import shapes

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_dataset_is_deterministic_for_a_seed():
    assert shapes.dataset(3, 20) == shapes.dataset(3, 20)
    assert shapes.dataset(3, 20) != shapes.dataset(4, 20)
    a = shapes.dataset(5, 1)[0]
    assert np.array_equal(np.asarray(shapes.draw(a, 128)), np.asarray(shapes.draw(a, 128)))


def test_colours_never_equal_and_enough_of_them():
    assert len(shapes.COLOURS) >= 6 and set(shapes.SHAPES) == {"circle", "square", "triangle", "star"}
    for a in shapes.dataset(0, 500):
        assert a.shape_colour != a.background
    with pytest.raises(ValueError, match="background"):
        shapes.ShapeAttributes("circle", "red", "red")


def test_captions_round_trip():
    captions = shapes.all_captions()
    assert len(captions) == len(set(captions)) == 4 * 6 * 5
    assert (
        shapes.caption(shapes.ShapeAttributes("circle", "red", "blue")) == "a red circle on a blue background"
    )
    for text in captions:
        attrs = shapes.parse_caption(text)
        assert attrs is not None and shapes.caption(attrs) == text
    assert shapes.parse_caption("A Red Circle on a Blue background.") == shapes.ShapeAttributes(
        "circle", "red", "blue"
    )
    assert shapes.parse_caption("a red circle on a red background") is None
    assert shapes.parse_caption("a cat on a mat") is None


def test_oracle_right_on_drawn_images_over_many_seeds():
    for attrs in shapes.dataset(11, 300):
        verdict = shapes.judge(shapes.draw(attrs, 256), attrs)
        assert verdict.all_ok, (attrs, verdict)


def test_oracle_right_at_512_and_robust_to_blur_and_noise():
    rng = np.random.default_rng(0)
    for attrs in shapes.dataset(12, 40):
        image = shapes.draw(attrs, 512).filter(ImageFilter.GaussianBlur(3))
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 15, (512, 512, 3))
        verdict = shapes.judge(Image.fromarray(noisy.clip(0, 255).astype(np.uint8)), attrs)
        assert verdict.all_ok, (attrs, verdict)


def test_oracle_says_no_to_the_wrong_caption():
    attrs = shapes.ShapeAttributes("star", "yellow", "purple")
    image = shapes.draw(attrs, 512)
    wrong = shapes.judge(image, shapes.ShapeAttributes("circle", "red", "green"))
    assert not (wrong.shape_ok or wrong.shape_colour_ok or wrong.background_ok)
    blank = shapes.judge(Image.new("RGB", (512, 512), shapes.PALETTE["blue"]), attrs)
    assert not blank.all_ok and blank.seen_shape is None


def test_oracle_ignores_a_stray_speck_but_not_a_second_shape_of_the_wrong_kind():
    attrs = shapes.ShapeAttributes("square", "white", "red", size=0.25, cx=0.35, cy=0.35)
    image = shapes.draw(attrs, 512)
    speck = image.copy()
    speck.paste(shapes.PALETTE["green"], (430, 450, 470, 480))  # a small blob away from the square
    assert shapes.judge(speck, attrs).all_ok
    star = shapes.draw(shapes.ShapeAttributes("star", "white", "red", size=0.3, cx=0.65, cy=0.65), 512)
    small_square = shapes.draw(shapes.ShapeAttributes("square", "white", "red", size=0.12, cx=0.2, cy=0.2), 512)
    both = Image.fromarray(np.maximum(np.asarray(star), np.asarray(small_square)))  # both white shapes on red
    verdict = shapes.judge(both, attrs)  # the caption's square is there, but the picture's shape is a star
    assert verdict.seen_shape == "star" and not verdict.all_ok


def test_largest_component_keeps_one_region():
    mask = np.zeros((20, 20), bool)
    mask[2:10, 2:10] = True  # 64 pixels
    mask[15:18, 15:18] = True  # 9 pixels
    mask[12, 2:6] = True  # 4 pixels, touching nothing
    kept = shapes.largest_component(mask)
    assert kept.sum() == 64 and kept[2:10, 2:10].all()
    assert not shapes.largest_component(np.zeros((5, 5), bool)).any()


# ---- the caption's whole meaning: one shape, of one colour -------------------------------------


def _overlay(*drawings: Image.Image) -> Image.Image:
    """Shapes of several drawings on the first one's background (pixels differing from it win)."""
    base = np.asarray(drawings[0]).copy()
    background = base[0, 0].copy()
    for drawing in drawings[1:]:
        pixels = np.asarray(drawing)
        painted = np.any(pixels != pixels[0, 0], axis=-1)
        base[painted] = pixels[painted]
    assert (base[0, 0] == background).all()
    return Image.fromarray(base)


def test_two_shapes_where_the_caption_says_one_are_wrong():
    named = shapes.ShapeAttributes("circle", "red", "blue", size=0.2, cx=0.3, cy=0.3)
    twin = shapes.ShapeAttributes("circle", "red", "blue", size=0.2, cx=0.7, cy=0.7)
    verdict = shapes.judge(_overlay(shapes.draw(named), shapes.draw(twin)), named)
    assert verdict.seen_count == 2 and not verdict.count_ok and not verdict.all_ok
    assert verdict.shape_ok and verdict.shape_colour_ok and verdict.background_ok  # only the count is wrong
    other = shapes.ShapeAttributes("square", "green", "blue", size=0.2, cx=0.7, cy=0.7)
    verdict = shapes.judge(_overlay(shapes.draw(named), shapes.draw(other)), named)
    assert verdict.seen_count == 2 and not verdict.all_ok
    three = [shapes.ShapeAttributes("star", "white", "purple", size=0.2, cx=x, cy=y)
             for x, y in ((0.25, 0.25), (0.75, 0.3), (0.5, 0.75))]
    assert shapes.judge(_overlay(*(shapes.draw(a) for a in three)), three[0]).seen_count == 3


def test_a_shape_mixed_with_another_colour_is_wrong():
    outer = shapes.ShapeAttributes("circle", "red", "blue", size=0.3)
    inner = shapes.ShapeAttributes("circle", "yellow", "blue", size=0.15)  # a quarter of the disc
    verdict = shapes.judge(_overlay(shapes.draw(outer), shapes.draw(inner)), outer)
    assert verdict.seen_count == 1 and not verdict.binding_ok and not verdict.all_ok
    assert verdict.colour_purity < 0.9
    square = shapes.ShapeAttributes("square", "green", "white", size=0.3)
    striped = np.asarray(shapes.draw(square)).copy()
    for top in range(180, 340, 40):  # yellow stripes across the square, about 40% of it
        band = striped[top : top + 16]
        band[np.all(band == shapes.PALETTE["green"], axis=-1)] = shapes.PALETTE["yellow"]
    verdict = shapes.judge(Image.fromarray(striped), square)
    assert not verdict.binding_ok and verdict.shape_colour_ok and not verdict.all_ok


def test_halos_and_anti_aliased_edges_are_not_faults():
    attrs = shapes.ShapeAttributes("circle", "red", "blue", size=0.3)
    ring = shapes.ShapeAttributes("circle", "purple", "blue", size=0.31)  # a 5 px purple halo around it
    verdict = shapes.judge(_overlay(shapes.draw(ring), shapes.draw(attrs)), attrs)
    assert verdict.all_ok, verdict
    for attrs in shapes.dataset(21, 40):  # drawn 4x larger and downsampled: smooth, blended edges
        smooth = shapes.draw(attrs, 2048).resize((512, 512), Image.Resampling.LANCZOS)
        verdict = shapes.judge(smooth, attrs)
        assert verdict.all_ok and verdict.seen_count == 1 and verdict.colour_purity > 0.97, (attrs, verdict)


def test_specks_are_not_shapes_but_small_second_shapes_are():
    attrs = shapes.ShapeAttributes("triangle", "yellow", "green", size=0.25, cx=0.4, cy=0.4)
    image = np.asarray(shapes.draw(attrs)).copy()
    image[440:470, 440:470] = shapes.PALETTE["yellow"]  # 30x30 px: a speck, not a shape
    assert shapes.judge(Image.fromarray(image), attrs).seen_count == 1
    smallest = shapes.ShapeAttributes("triangle", "yellow", "green", size=shapes.SIZE_RANGE[0], cx=0.78, cy=0.78)
    verdict = shapes.judge(_overlay(shapes.draw(attrs), shapes.draw(smallest)), attrs)
    assert verdict.seen_count == 2 and not verdict.all_ok
def test_count_shapes_one_drawn_shape_and_duplicates():
    from PIL import ImageDraw

    for attrs in shapes.dataset(21, 60):
        assert shapes.count_shapes(shapes.draw(attrs, 256), attrs.shape_colour) == 1, attrs
    twin = shapes.draw(shapes.ShapeAttributes("circle", "red", "blue", 0.15, 0.25, 0.25), 256)
    ImageDraw.Draw(twin).ellipse((150, 150, 230, 230), fill=shapes.PALETTE["red"])  # a second red circle
    assert shapes.count_shapes(twin, "red") == 2
    ImageDraw.Draw(twin).rectangle((10, 200, 13, 203), fill=shapes.PALETTE["red"])  # a speck is not a shape
    assert shapes.count_shapes(twin, "red") == 2
    assert shapes.count_shapes(twin, "green") == 0


def test_shape_centre_and_region_inside_a_mask():
    from PIL import ImageDraw

    for attrs in shapes.dataset(22, 40):
        cx, cy = shapes.shape_centre(shapes.draw(attrs, 256), attrs.shape_colour)
        if attrs.shape == "circle" or attrs.shape == "square":  # centroid = centre for symmetric shapes
            assert abs(cx - attrs.cx) < 0.02 and abs(cy - attrs.cy) < 0.02, attrs
        else:
            assert abs(cx - attrs.cx) < 0.02 and abs(cy - attrs.cy) < attrs.size * 0.5, attrs
    attrs = shapes.ShapeAttributes("square", "yellow", "purple", 0.2, 0.3, 0.3)
    image = shapes.draw(attrs, 256)
    mask = Image.new("L", (256, 256), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 127, 255), fill=255)  # the left half holds the square
    assert shapes.region_inside(image, "yellow", mask) == 1.0
    assert shapes.region_inside(image, "yellow", Image.eval(mask, lambda v: 255 - v)) == 0.0
    assert shapes.shape_centre(image, "green") is None


# ---- the hexagon: drawn and judged, never in the base world ------------------------------------


def test_hexagon_is_outside_the_base_world():
    assert "hexagon" not in shapes.SHAPES and "hexagon" in shapes.ALL_SHAPES
    assert not any("hexagon" in caption for caption in shapes.all_captions())
    assert all(a.shape in shapes.SHAPES for a in shapes.dataset(0, 300))  # datasets unchanged
    assert {a.shape for a in shapes.dataset(0, 50, kinds=("hexagon",))} == {"hexagon"}
    assert shapes.parse_caption("an orange hexagon on a blue background") is None  # no orange
    assert shapes.parse_caption("a red hexagon on a blue background") == shapes.ShapeAttributes(
        "hexagon", "red", "blue"
    )


def test_oracle_tells_hexagons_from_circles_blurred_and_noisy():
    rng = np.random.default_rng(1)
    for attrs in shapes.dataset(13, 40, kinds=("hexagon", "circle")):
        image = shapes.draw(attrs, 512).filter(ImageFilter.GaussianBlur(3))
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 15, (512, 512, 3))
        image = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
        verdict = shapes.judge(image, attrs, known=shapes.ALL_SHAPES)
        assert verdict.all_ok, (attrs, verdict)
        other = "circle" if attrs.shape == "hexagon" else "hexagon"
        wrong = shapes.ShapeAttributes(other, attrs.shape_colour, attrs.background)
        assert not shapes.judge(image, wrong, known=shapes.ALL_SHAPES).shape_ok


def test_oracle_knows_hexagons_only_when_asked():
    hexagon = shapes.ShapeAttributes("hexagon", "red", "blue", 0.3, 0.5, 0.5)
    image = shapes.draw(hexagon)
    assert shapes.judge(image, hexagon).all_ok  # a hexagon prompt: the oracle knows hexagons
    circle = shapes.ShapeAttributes("circle", "red", "blue")
    assert shapes.judge(image, circle).all_ok  # the base world's oracle: round enough to be its circle
    assert not shapes.judge(image, circle, known=shapes.ALL_SHAPES).shape_ok
    for kind in ("square", "triangle", "star"):  # corners of other counts are never a hexagon
        attrs = shapes.ShapeAttributes(kind, "red", "blue")
        assert shapes.judge(shapes.draw(attrs), attrs, known=shapes.ALL_SHAPES).all_ok


def test_outline_harmonics_count_corners():
    for kind, k in (("square", 4), ("hexagon", 6), ("triangle", 3)):
        image = shapes.draw(shapes.ShapeAttributes(kind, "white", "blue", 0.3, 0.5, 0.5), 128)
        mask = np.asarray(image)[..., 0] > 128
        harmonics = shapes.outline_harmonics(mask)
        assert int(np.argmax(harmonics[2:8])) + 2 == k, (kind, harmonics[:8])
