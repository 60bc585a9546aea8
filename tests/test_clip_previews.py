"""The preview scorer's data: outcome captions from the oracle's verdict, previews exactly as early pruning sees."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.training import hard_negatives, shapes
from pipelines.training.clip_previews import counterfactual_captions, kept_right, outcome_caption

ATTRS = shapes.ShapeAttributes("circle", "red", "blue", 0.3, 0.5, 0.5)


def _caption_of(image: Image.Image) -> str:
    return outcome_caption(ATTRS, shapes.judge(image, ATTRS))


def test_outcome_captions_say_what_the_finished_image_shows():
    rng = np.random.default_rng(3)
    assert _caption_of(shapes.draw(ATTRS, 256)) == "a red circle on a blue background"
    assert _caption_of(hard_negatives.draw_two(ATTRS, rng)) == "two red circles on a blue background"
    mixed = hard_negatives.draw_mixed(ATTRS, "yellow", rng)
    assert _caption_of(mixed) == "a red and yellow circle on a blue background"
    assert _caption_of(shapes.draw(hard_negatives.swapped(ATTRS), 256)) == "a blue circle on a red background"
    square = shapes.ShapeAttributes("square", "red", "blue", 0.3, 0.5, 0.5)
    assert _caption_of(shapes.draw(square, 256)) == "a red square on a blue background"
    assert _caption_of(Image.new("RGB", (256, 256), shapes.PALETTE["blue"])) == "a blue background"


def test_counterfactuals_are_the_prompts_near_misses():
    assert counterfactual_captions(ATTRS) == ["two red circles on a blue background",
                                              "a red and blue circle on a blue background",
                                              "a blue circle on a red background"]


def test_kept_right_counts_pairs_whose_kept_hold_a_right_candidate():
    right = np.array([[False, True, False], [False, False, False], [True, False, False]])
    scores = np.array([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0], [1.0, 3.0, 2.0]])
    assert kept_right(scores, right, 1) == 0.0  # the second pair has no right candidate: not counted
    assert kept_right(scores, right, 2) == 0.0
    assert kept_right(scores, right, 3) == 1.0
    assert kept_right(-scores, right, 1) == 1.0


@pytest.mark.parametrize("inner", ["yellow", "green"])
def test_the_oracle_reports_the_second_colour_inside_a_mottled_shape(inner):
    verdict = shapes.judge(hard_negatives.draw_mixed(ATTRS, inner, np.random.default_rng(1)), ATTRS)
    assert not verdict.binding_ok and verdict.seen_inner_colour == inner
    assert shapes.judge(shapes.draw(ATTRS, 256), ATTRS).seen_inner_colour is None


def test_rank_loss_wants_the_right_candidates_first_and_skips_undecided_pairs():
    import torch

    from pipelines.training.clip_previews import rank_loss

    right = torch.tensor([[True, False, False], [True, True, True]])
    prompts = torch.tensor([0, 1])
    logits = torch.zeros(2, 3, 2)  # [P, N, U]
    assert rank_loss(logits, prompts, right).item() == pytest.approx(-np.log(1 / 3))
    logits[0, 0, 0] = 20.0  # the right candidate far ahead: almost no loss
    assert rank_loss(logits, prompts, right).item() < 1e-6
    logits[0, 0, 0], logits[0, 1, 0] = 0.0, 20.0  # a wrong one ahead: large
    assert rank_loss(logits, prompts, right).item() > 10
    logits[1, :, 1] = torch.tensor([5.0, -5.0, 0.0])  # an all-right pair never counts
    assert rank_loss(logits, prompts, right).item() > 10
    assert rank_loss(logits, prompts, torch.ones(2, 3, dtype=torch.bool)).item() == 0.0


def test_pairwise_right_is_the_within_pair_auc():
    from pipelines.training.clip_previews import pairwise_right

    right = np.array([[True, False, False], [True, True, True]])
    assert pairwise_right(np.array([[3.0, 1.0, 2.0], [0.0, 0.0, 0.0]]), right) == 1.0
    assert pairwise_right(np.array([[1.5, 1.0, 2.0], [0.0, 0.0, 0.0]]), right) == 0.5
    assert pairwise_right(np.array([[1.0, 1.0, 2.0], [0.0, 0.0, 0.0]]), right) == 0.25
    assert np.isnan(pairwise_right(np.zeros((1, 3)), np.ones((1, 3), dtype=bool)))


def test_export_refuses_a_preview_scorer_of_another_decoder(tmp_path):
    """The app prunes on the linear preview: a scorer that learned from tiny-decoder pictures would be fed
    pictures it never saw."""
    import json

    from pipelines.training.export import main

    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    (run / "ckpt" / "state.json").write_text(json.dumps({"step": 400, "decoder": "taesd"}))
    with pytest.raises(SystemExit, match="learned from x0 decoded by another decoder"):
        main(["--preview-clip", str(run), "--out", str(tmp_path / "model")])
    assert not (tmp_path / "model").exists()
