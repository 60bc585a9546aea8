"""Hard negatives of the shapes world are what their captions say (by the oracle), and the evaluation's
two-way choices between them and their single-shape captions run through the library's scorer."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.training import hard_negatives, shapes


def test_variants_are_what_their_captions_say():
    rng = np.random.default_rng(3)
    for attrs in shapes.dataset(8, 30):
        (single, caption, _), (two, two_text, _), (mixed, mixed_text, _), (swapped, swapped_text, _) = (
            hard_negatives.variants(attrs, rng)
        )
        assert caption == shapes.caption(attrs) and shapes.judge(single, attrs).all_ok
        verdict = shapes.judge(two, attrs)
        assert verdict.seen_count == 2 and verdict.shape_ok and verdict.shape_colour_ok, (attrs, verdict)
        assert two_text == f"two {attrs.shape_colour} {attrs.shape}s on a {attrs.background} background"
        inner = mixed_text.split(" and ")[1].split()[0]
        assert inner not in (attrs.shape_colour, attrs.background) and shapes.judge(mixed, attrs).colour_purity < 0.95
        flipped = hard_negatives.swapped(attrs)
        assert swapped_text == shapes.caption(flipped) and shapes.judge(swapped, flipped).all_ok



def test_composition_choices_agree_with_zero_shot(tmp_path):
    """The evaluation's two-way choices equal what the scorer's zero-shot table says for each pair."""
    from pipelines.rerank.clip_scorer import ClipScorer
    from pipelines.training import data
    from pipelines.training.evaluate import composition
    from tests.clip_fixtures import tiny_clip_dir

    scorer = ClipScorer.load(tiny_clip_dir(tmp_path), device="cpu")
    choices = composition(scorer, 6)

    def prefers(image, right, wrong) -> bool:
        rows = {row.text: row.probability for row in scorer.zero_shot(image, [right, wrong])}
        return rows[right] > rows[wrong]

    rng = np.random.default_rng(data.HELDOUT_SEED)  # the same drawings, in the same order
    count, binding, mixed = [], [], []
    for attrs in (shapes.sample_attributes(rng) for _ in range(6)):
        (single, caption, _), (two, two_text, _), (mixed_image, mixed_text, _), _ = hard_negatives.variants(attrs, rng)
        swapped_text = shapes.caption(hard_negatives.swapped(attrs))
        count += [prefers(single, caption, two_text), prefers(two, two_text, caption)]
        binding.append(prefers(single, caption, swapped_text))
        mixed += [prefers(single, caption, mixed_text), prefers(mixed_image, mixed_text, caption)]
    assert choices == pytest.approx({"count": np.mean(count), "binding": np.mean(binding), "mixed": np.mean(mixed)})
