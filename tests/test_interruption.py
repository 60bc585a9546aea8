"""A1111's interrupt and skip in the library: what an interrupted generation keeps, and what a skip goes on with.

Each stop is asked from the step callback at a known step, as ``POST /sdapi/v1/interrupt`` would ask it from
another thread, so the tests do not depend on timing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.generation.conditioning import HiresFix, ImageConditioning
from pipelines.generation.denoising import GenerationInterrupted, Interruption
from pipelines.generation.request import GenerationRequest
from pipelines.rerank.best_of import best_of_n
from pipelines.rerank.clip_scorer import ClipScorer
from pipelines.rerank.min_score import best_of_until_pass
from sd_app.engine import Engine
from sd_app.metadata import parse_parameters
from tests.clip_fixtures import tiny_clip_dir

BASE = dict(prompt="a red circle", steps=3, width=64, height=64, seed=40, sampler="Euler a")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip_dir(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return ClipScorer.load(clip_dir, device="cpu")


def stop_at(step: int, interruption: Interruption, *, skip: bool = False):
    """A step callback asking ``interruption`` to interrupt (or skip) once ``step`` is done."""

    def on_step(info):
        if info.step == step:
            interruption.skip() if skip else interruption.interrupt()

    return on_step


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=int)


def clean_picture(pipe, request: GenerationRequest, step: int) -> list[Image.Image]:
    """The pictures of ``request``'s predicted clean latents after ``step`` steps (run apart, to compare)."""
    with pipe.generating():
        run, _ = pipe.start(request, track_clean=True)
        run.run(step)
        return pipe.decode(run.clean)


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "Heun", "DDIM", "LMS"])
def test_an_interrupted_run_keeps_the_clean_latents_of_its_last_step(tiny_pipe, sampler):
    """The x0 an interrupt keeps is the one the loop predicted at the last step done (A1111's last_latent),
    computed only when asked: the same as a run that tracks it at every step."""
    request = GenerationRequest(**{**BASE, "n": 2, "sampler": sampler, "steps": 4}).resolved()
    with tiny_pipe.generating():
        tracked, _ = tiny_pipe.start(request, track_clean=True)
        tracked.run(2)
        interruption = Interruption()
        run, _ = tiny_pipe.start(request)
        with pytest.raises(GenerationInterrupted, match="interrupted after 2 of 4 steps") as stopped:
            run.run(on_step=stop_at(2, interruption), interruption=interruption)
    assert stopped.value.step == 2 and not stopped.value.skipped
    torch.testing.assert_close(stopped.value.clean, tracked.clean, rtol=1e-5, atol=1e-5)


def test_interrupt_keeps_the_finished_batches_ranked_and_the_current_one_as_it_was(tiny_pipe, scorer):
    request = GenerationRequest(**BASE, n=6)
    whole = best_of_n(tiny_pipe, request, scorer, batch_size=4)
    interruption = Interruption()
    # steps 1-3: the first batch of 4; 4-6: the second batch of 2, interrupted after its first step
    out = best_of_n(tiny_pipe, request, scorer, batch_size=4, on_step=stop_at(4, interruption),
                    interruption=interruption)
    assert out.interrupted
    finished, stopped = out.candidates[:4], out.candidates[4:]
    assert [c.stopped_at for c in finished] == [None] * 4 and [c.stopped_at for c in stopped] == [1, 1]
    # the finished ones: the same pictures and scores as uninterrupted, ranked among themselves
    same = {c.seed: c for c in whole.candidates}
    assert [c.seed for c in finished] == [c.seed for c in whole.candidates if c.seed < 44]
    for candidate in finished:
        np.testing.assert_array_equal(pixels(candidate.image), pixels(same[candidate.seed].image))
        assert candidate.score == pytest.approx(same[candidate.seed].score, abs=1e-4)
    # the stopped ones: their seeds' predicted clean pictures after one step, unscored, in generation order
    assert [c.seed for c in stopped] == [44, 45] and all(c.score is None for c in stopped)
    expected = clean_picture(tiny_pipe, GenerationRequest(**{**BASE, "seed": 44, "n": 2}), 1)
    for candidate, picture in zip(stopped, expected, strict=True):
        assert np.abs(pixels(candidate.image) - pixels(picture)).max() <= 1


def test_interrupt_before_the_first_step_keeps_nothing(tiny_pipe, scorer):
    interruption = Interruption()
    interruption.interrupt()  # e.g. asked while the job waited for the model
    out = best_of_n(tiny_pipe, GenerationRequest(**BASE, n=2), scorer, interruption=interruption)
    assert out.interrupted and out.candidates == []


def test_skip_stops_the_batch_being_denoised_and_goes_on_with_the_next(tiny_pipe):
    request = GenerationRequest(**BASE, n=6)
    whole = best_of_n(tiny_pipe, request, batch_size=4)
    interruption = Interruption()
    out = best_of_n(tiny_pipe, request, batch_size=4, on_step=stop_at(1, interruption, skip=True),
                    interruption=interruption)
    assert not out.interrupted and not interruption.skipped  # a skip stops one batch only
    assert [(c.seed, c.stopped_at) for c in out.candidates] == [(44, None), (45, None)] + [
        (seed, 1) for seed in (40, 41, 42, 43)]  # the finished batch first, then the skipped one
    for candidate, reference in zip(out.candidates[:2], whole.candidates[4:], strict=True):
        np.testing.assert_array_equal(pixels(candidate.image), pixels(reference.image))


def test_a_skip_asked_between_batches_stops_none(tiny_pipe):
    """As A1111, which clears the skip before each batch."""
    interruption = Interruption()
    interruption.skip()
    out = best_of_n(tiny_pipe, GenerationRequest(**BASE, n=2), interruption=interruption)
    assert [c.stopped_at for c in out.candidates] == [None, None] and not out.interrupted


def test_an_interrupted_inpainting_keeps_the_original_outside_the_mask(tiny_pipe):
    init = Image.new("RGB", (64, 64), (10, 200, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))  # repaint the middle only
    image = ImageConditioning(init, strength=1.0, mask=mask, mask_blur=0)
    request = GenerationRequest(**{**BASE, "steps": 4}, image=image)
    interruption = Interruption()
    with pytest.raises(GenerationInterrupted) as stopped:
        tiny_pipe(request, on_step=stop_at(2, interruption), interruption=interruption)
    (picture, step), = stopped.value.unfinished.values()
    assert step == 2 and stopped.value.total == 4 and picture.size == (64, 64)
    assert pixels(picture)[2, 2].tolist() == [10, 200, 30]  # laid back as a finished inpainting is
    assert pixels(picture)[32, 32].tolist() != [10, 200, 30]


def test_interrupted_hires_fix_keeps_the_first_pass_before_its_second_begins(tiny_pipe):
    """A1111 skips the hires pass of an interrupted image; once the pass has begun, its x0 is kept."""
    request = GenerationRequest(**BASE, hires=HiresFix(scale=2.0, steps=2, denoising_strength=0.6))  # 3 + 2 steps
    assert request.total_steps == 5
    for step, size in ((3, (64, 64)), (4, (128, 128))):
        interruption = Interruption()
        with pytest.raises(GenerationInterrupted) as stopped:
            tiny_pipe(request, on_step=stop_at(step, interruption), interruption=interruption)
        (picture, done), = stopped.value.unfinished.values()
        assert (done, stopped.value.total, picture.size) == (step, 5, size)


def test_interrupted_early_pruning_keeps_the_finished_kept_candidates(tiny_pipe, scorer):
    request = GenerationRequest(**BASE, n=4, prune_to=2, prune_at=1)  # steps: 4 x 1, then the kept 2 x 2
    whole = best_of_n(tiny_pipe, request, scorer, batch_size=1)
    kept = sorted(c.seed for c in whole.candidates)
    interruption = Interruption()
    # batches of one: the first kept candidate finishes at candidate-step 6, the second is stopped at 7
    out = best_of_n(tiny_pipe, request, scorer, batch_size=1, on_step=stop_at(7, interruption),
                    interruption=interruption)
    assert out.interrupted and [c.seed for c in out.pruned] == [c.seed for c in whole.pruned]
    assert [(c.seed, c.stopped_at) for c in out.candidates] == [(kept[0], None), (kept[1], 2)]
    np.testing.assert_array_equal(pixels(out.candidates[0].image),
                                  pixels(next(c.image for c in whole.candidates if c.seed == kept[0])))
    # stopped before step K: every candidate started is unfinished, and none is pruned
    interruption = Interruption()
    out = best_of_n(tiny_pipe, request, scorer, batch_size=2, on_step=stop_at(2, interruption),
                    interruption=interruption)
    assert out.interrupted and out.pruned == []
    assert [(c.seed, c.stopped_at) for c in out.candidates] == [(40, 1), (41, 1)]


def test_an_interrupted_minimum_score_ranks_every_rounds_finished_candidates(tiny_pipe, scorer):
    request = GenerationRequest(**BASE, n=2)
    interruption = Interruption()
    # two candidates of 3 steps per round; out of 4 rounds each is told as 6 of 24 steps: round 2 is 7-12
    out = best_of_until_pass(tiny_pipe, request, scorer, {"CLIP score": 1e9}, 3, batch_size=1,
                             on_step=stop_at(10, interruption), interruption=interruption)
    assert out.rounds == 2 and out.output.interrupted
    assert [c.stopped_at for c in out.output.candidates] == [None, None, None, 1]
    finished = out.output.candidates[:3]
    assert sorted(c.seed for c in finished) == [40, 41, 42] and out.output.candidates[3].seed == 43
    scores = [c.score for c in finished]
    assert scores == sorted(scores, reverse=True) and out.output.candidates[3].score is None
    assert out.passed == [False] * 3 + [None]  # the stopped one was never scored: neither passed nor below


def test_a_skip_asked_before_a_pruned_job_or_between_rounds_stops_none(tiny_pipe, scorer):
    """A1111 clears a skip before each batch: with early pruning too, a skip asked before the job starts, or
    after a round's last step (while it is decoded and scored), does not stop the next round."""
    request = GenerationRequest(**BASE, n=2, prune_to=1, prune_at=1)
    interruption = Interruption()
    interruption.skip()
    out = best_of_n(tiny_pipe, request, scorer, interruption=interruption)
    assert not out.interrupted and [c.stopped_at for c in out.candidates] == [None]
    whole = best_of_until_pass(tiny_pipe, request, scorer, {"CLIP score": 1e9}, 1)
    interruption = Interruption()
    # round 1 (2 x 1 steps, then the kept one's 2) is told as steps 1-4 of 8; round 2 finishes the pruned one
    out = best_of_until_pass(tiny_pipe, request, scorer, {"CLIP score": 1e9}, 1, on_step=stop_at(4, interruption,
                             skip=True), interruption=interruption)
    assert out.rounds == 2 and not out.output.interrupted
    assert [c.stopped_at for c in out.output.candidates] == [None, None]
    assert [c.seed for c in out.output.candidates] == [c.seed for c in whole.output.candidates]


def test_with_a1111_batches_a_skip_stops_one_batch_and_the_parts_candidates_of_the_next_are_made_again(tiny_pipe):
    """batch_size 1 x n_iter 4, denoised as one part of 4: a skip stops the first batch's image only, as in A1111;
    the other three are made again, from their seeds, as a part of their own."""
    request = GenerationRequest(**BASE, n=4)
    interruption = Interruption()
    out = best_of_n(tiny_pipe, request, on_step=stop_at(1, interruption, skip=True), interruption=interruption,
                    skip_batch_size=1)
    assert not out.interrupted
    assert [(c.seed, c.stopped_at) for c in out.candidates] == [(41, None), (42, None), (43, None), (40, 1)]
    remade = best_of_n(tiny_pipe, GenerationRequest(**{**BASE, "seed": 41, "n": 3}))
    for candidate, reference in zip(out.candidates[:3], remade.candidates, strict=True):
        np.testing.assert_array_equal(pixels(candidate.image), pixels(reference.image))
    expected = clean_picture(tiny_pipe, GenerationRequest(**{**BASE, "n": 4}), 1)[0]
    assert np.abs(pixels(out.candidates[3].image) - pixels(expected)).max() <= 1
    # batch_size 2 x n_iter 4 in parts of 4: the skip stops seeds 40 and 41, the six others are finished
    interruption = Interruption()
    out = best_of_n(tiny_pipe, GenerationRequest(**BASE, n=8), on_step=stop_at(1, interruption, skip=True),
                    interruption=interruption, skip_batch_size=2)
    assert [(c.seed, c.stopped_at) for c in out.candidates] == [(s, None) for s in range(42, 48)] + [(40, 1), (41, 1)]


def test_a_skip_stops_an_a1111_batch_larger_than_a_part_at_one_step(tiny_pipe):
    """batch_size 5 x n_iter 2 in parts of 4: a skip at step 2 of the first part stops the whole first batch at
    step 2, the fifth image too (run to step 2 in a part after), as A1111 stops a batch it denoises together."""
    request = GenerationRequest(**BASE, n=10)
    whole = best_of_n(tiny_pipe, request)
    interruption = Interruption()
    out = best_of_n(tiny_pipe, request, on_step=stop_at(2, interruption, skip=True), interruption=interruption,
                    skip_batch_size=5)
    assert not out.interrupted
    assert [(c.seed, c.stopped_at) for c in out.candidates] == [(s, None) for s in range(45, 50)] + [
        (s, 2) for s in range(40, 45)]
    for candidate in out.candidates[:5]:  # the second batch, finished: within a level of the unskipped run
        reference = next(c for c in whole.candidates if c.seed == candidate.seed)
        assert np.abs(pixels(candidate.image) - pixels(reference.image)).max() <= 1
    fifth = clean_picture(tiny_pipe, GenerationRequest(**{**BASE, "seed": 44}), 2)[0]
    np.testing.assert_array_equal(pixels(out.candidates[-1].image), pixels(fifth))
    # an interrupt while the fifth image catches up stops it there and the request with it
    interruption = Interruption()

    def skip_then_interrupt(info):  # parts: 40-43 (steps 1-3), then 44 alone to step 2 (4-5), 45-47, 48-49
        if info.step == 2:
            interruption.skip()
        if info.step == 4:
            interruption.interrupt()

    out = best_of_n(tiny_pipe, request, on_step=skip_then_interrupt, interruption=interruption, skip_batch_size=5)
    assert out.interrupted
    assert [(c.seed, c.stopped_at) for c in out.candidates] == [(40, 2), (41, 2), (42, 2), (43, 2), (44, 1)]


def test_without_a_skip_the_a1111_batches_leave_the_parts_and_pictures_as_they_were(tiny_pipe):
    """The parts stay those of 4 whatever batch_size asks, so no picture changes by a bit: the pipeline's
    pictures are the same at any batch size only to an 8-bit level (as measured here)."""
    request = GenerationRequest(**BASE, n=6)
    before = best_of_n(tiny_pipe, request)
    for skip_batch_size in (1, 3, 6):
        out = best_of_n(tiny_pipe, request, interruption=Interruption(), skip_batch_size=skip_batch_size)
        assert [c.seed for c in out.candidates] == [c.seed for c in before.candidates]
        for candidate, reference in zip(out.candidates, before.candidates, strict=True):
            np.testing.assert_array_equal(pixels(candidate.image), pixels(reference.image))
    alone = [tiny_pipe(GenerationRequest(**{**BASE, "seed": c.seed})).images[0] for c in before.candidates]
    assert max(np.abs(pixels(a) - pixels(c.image)).max() for a, c in zip(alone, before.candidates)) <= 1
    with pytest.raises(ValueError, match="skip_batch_size must be a positive integer, got 0"):
        best_of_n(tiny_pipe, request, skip_batch_size=0)


def test_an_image_stopped_before_the_pruning_step_says_nothing_of_early_pruning(tiny_model, clip_dir, tmp_path):
    """Its infotext says what happened to it: stopped at step J, never scored early nor pruned. One stopped at
    the pruning step or after was ranked and kept, so its infotext names the pruning too."""
    engine = Engine(model=str(tiny_model), reranker=str(clip_dir), output_dir=tmp_path, device="cpu")
    request = GenerationRequest(**BASE, n=4, prune_to=2, prune_at=2)  # 3 steps; steps told in candidate-steps
    for at, stopped_at, count, pruned in ((4, 1, 4, False), (8, 2, 2, True)):  # after step 1, after step 2
        interruption = Interruption()
        result = engine.generate(request, save=False, on_step=stop_at(at, interruption), interruption=interruption)
        assert result.interrupted and [c.stopped_at for c in result.candidates] == [stopped_at] * count
        for candidate in result.candidates:
            fields = parse_parameters(candidate.parameters)
            assert fields["Stopped at step"] == f"{stopped_at} of 3" and fields["Seed"] == str(candidate.seed)
            named = {key for key in ("Early pruning", "Pruned early", "Early scorer", "Early score") if key in fields}
            assert named == ({"Early pruning", "Pruned early", "Early scorer", "Early score"} if pruned else set())
        if pruned:
            assert parse_parameters(result.candidates[0].parameters)["Early pruning"] == "4 to 2 at step 2"


def test_a_minimum_scores_rounds_skip_one_a1111_batch_too(tiny_pipe, scorer):
    interruption = Interruption()
    out = best_of_until_pass(tiny_pipe, GenerationRequest(**BASE, n=2), scorer, {"CLIP score": 1e9}, 0,
                             on_step=stop_at(1, interruption, skip=True), interruption=interruption, skip_batch_size=1)
    assert not out.output.interrupted
    assert [(c.seed, c.stopped_at) for c in out.output.candidates] == [(41, None), (40, 1)]
