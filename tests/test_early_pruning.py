"""Early pruning: kept candidates are exactly their seeds' full images; the pruned are the lowest early scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.generation.request import GenerationRequest
from pipelines.rerank.best_of import best_of_n
from pipelines.rerank.clip_scorer import ClipScorer
from pipelines.rerank.early_pruning import decode_clean
from tests.clip_fixtures import tiny_clip_dir

BASE = dict(prompt="a red circle", steps=5, width=64, height=64, seed=70, cfg_scale=7.0)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    return ClipScorer.load(tiny_clip_dir(tmp_path_factory.mktemp("clip")), device="cpu")


def _unpruned(pipe, **settings) -> torch.Tensor:
    """Final latents [n, C, h, w] of the same batch run to the end, no pruning."""
    with pipe.generating():
        run, _ = pipe.start(GenerationRequest(**{**BASE, **settings}))
        return run.run()


# The same candidates of the same batch: pruning changes nothing but the last bits (a smaller batch after the
# cut; fp32). Against a seed run
# alone (batch 1) the U-Net's batched convolutions differ in the last bits; that is the best-of test's
# 8-bit comparison below.
EXACT = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "DPM++ SDE", "Euler a", "Heun", "LMS", "PLMS", "UniPC"])
def test_kept_rows_finish_as_their_full_trajectories(tiny_pipe, sampler):
    """Multistep histories, second-order states, Brownian trees and ancestral noise follow the kept rows."""
    request = GenerationRequest(**{**BASE, "n": 4, "sampler": sampler})
    with tiny_pipe.generating():
        run, _ = tiny_pipe.start(request, track_clean=True)
        run.run(2)
        assert run.step == 2 and run.clean is not None and run.clean.shape == (4, 4, 8, 8)
        run.keep([3, 1])
        final = run.run()  # [2, C, h, w]
    assert run.step == BASE["steps"]
    full = _unpruned(tiny_pipe, n=4, sampler=sampler)
    torch.testing.assert_close(final, full[[3, 1]], **EXACT)


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "DPM++ SDE", "Euler a", "Heun", "PLMS"])
def test_rows_split_off_finish_as_their_full_trajectories_and_leave_the_run_as_it_was(tiny_pipe, sampler):
    """A split-off run is independent: finishing it first changes neither its rows nor the original's."""
    request = GenerationRequest(**{**BASE, "n": 4, "sampler": sampler})
    with tiny_pipe.generating():
        run, _ = tiny_pipe.start(request, track_clean=True)
        run.run(2)
        aside = run.split_off([3, 1])
        assert aside.step == 2 and aside.n == 2 and run.n == 4
        set_aside = aside.run()  # [2, C, h, w], before the original goes on
        run.keep([0, 2])
        kept = run.run()
    assert aside.step == run.step == BASE["steps"]
    full = _unpruned(tiny_pipe, n=4, sampler=sampler)
    torch.testing.assert_close(set_aside, full[[3, 1]], **EXACT)
    torch.testing.assert_close(kept, full[[0, 2]], **EXACT)


def test_deep_cache_and_cfg_cutoff_follow_the_kept_rows(tiny_pipe):
    # steps 0-3 guided (cutoff 0.2 of 5), step 3 cached from step 2's deep features, step 4 unguided
    settings = dict(cache_interval=2, guidance_cutoff=0.2, sampler="DPM++ 2M", n=3)
    with tiny_pipe.generating():
        run, _ = tiny_pipe.start(GenerationRequest(**{**BASE, **settings}))
        run.run(3)  # a cached step next
        run.keep([2])
        final = run.run()
    torch.testing.assert_close(final, _unpruned(tiny_pipe, **settings)[[2]], **EXACT)


def test_predicted_clean_matches_the_schedulers_own(tiny_pipe):
    """Euler's step returns x0 (``pred_original_sample``); ours, from the U-Net input, is the same."""
    request = GenerationRequest(**{**BASE, "n": 2, "sampler": "Euler"})
    seen = []
    with tiny_pipe.generating():
        run, _ = tiny_pipe.start(request, track_clean=True)
        step = run.scheduler.step

        def recording_step(*args, **kwargs):
            out = step(*args, **kwargs)
            seen.append(out.pred_original_sample)
            return out

        run.scheduler.step = recording_step
        run.run(3)
    torch.testing.assert_close(run.clean, seen[-1], rtol=1e-4, atol=1e-4)


def test_pruned_best_of_keeps_the_best_early_scores_and_their_full_images(tiny_pipe, scorer):
    request = GenerationRequest(**{**BASE, "n": 5, "prune_to": 2, "prune_at": 2, "sampler": "DPM++ 2M"})
    steps: list[tuple[int, int]] = []
    out = best_of_n(tiny_pipe, request, scorer, batch_size=2, on_step=lambda i: steps.append((i.step, i.total)))
    kept = {c.seed for c in out.candidates}
    assert len(out.candidates) == 2 and len(out.pruned) == 3
    assert kept.isdisjoint(p.seed for p in out.pruned)
    lowest_kept = min(c.details["Early score"] for c in out.candidates)
    assert all(p.score <= lowest_kept for p in out.pruned) and all(p.at_step == 2 for p in out.pruned)
    assert [p.score for p in out.pruned] == sorted((p.score for p in out.pruned), reverse=True)
    # the early scores are the scorer's on the previews of x0 after step 2, for every candidate (same batches)
    clean = []
    with tiny_pipe.generating():
        for seed, n in ((70, 2), (72, 2), (74, 1)):
            part = GenerationRequest(**{**BASE, "seed": seed, "n": n, "sampler": "DPM++ 2M"})
            run, _ = tiny_pipe.start(part, track_clean=True)
            run.run(2)
            clean.append(run.clean)
        early = scorer.score(decode_clean(tiny_pipe, torch.cat(clean)), "a red circle").scores
    for c in out.pruned:
        assert c.score == pytest.approx(early[c.seed - 70], abs=1e-4)
    assert sorted(early, reverse=True)[:2] == pytest.approx(sorted(
        (c.details["Early score"] for c in out.candidates), reverse=True), abs=1e-4)
    # progress counts candidate-steps: 5 x 2 + 2 x 3, never backwards
    assert [s for s, _ in steps] == sorted(s for s, _ in steps) and steps[-1] == (16, 16)
    assert {t for _, t in steps} == {16}
    # each kept picture is its seed's picture generated alone
    for c in out.candidates:
        alone = tiny_pipe(GenerationRequest(**{**BASE, "seed": c.seed, "n": 1, "sampler": "DPM++ 2M"})).images[0]
        assert np.abs(np.asarray(alone, dtype=int) - np.asarray(c.image, dtype=int)).max() <= 1


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"n": 4, "prune_to": 4, "prune_at": 2}, "prune_to must be between 1 and n - 1 = 3"),
        ({"n": 4, "prune_to": 0, "prune_at": 2}, "prune_to must be between 1 and n - 1 = 3"),
        ({"n": 4, "prune_to": 2, "prune_at": 5}, "prune_at must be a step between 1 and steps - 1 = 4, got 5"),
        ({"n": 4, "prune_to": 2, "prune_at": 0}, "prune_at must be a step between 1 and steps - 1 = 4, got 0"),
        ({"n": 1, "prune_to": 1, "prune_at": 2}, "early pruning needs n >= 2 candidates"),
        ({"n": 4, "prune_to": 2.0, "prune_at": 2}, "prune_to must be an integer"),
    ],
)
def test_bad_pruning_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        GenerationRequest(**{**BASE, **settings})


def test_pruning_needs_a_scorer_and_keep_within_it(tiny_pipe, scorer):
    request = GenerationRequest(**{**BASE, "n": 3, "prune_to": 1, "prune_at": 2})
    with pytest.raises(ValueError, match="needs a reranker"):
        best_of_n(tiny_pipe, request)
    with pytest.raises(ValueError, match="keep must be at most prune_to=1, got 2"):
        best_of_n(tiny_pipe, request, scorer, keep=2)
    with pytest.raises(ValueError, match="needs a scorer"):
        tiny_pipe(request)


def test_cli_lists_the_pruned_and_the_kept_images_name_them(tiny_model, tmp_path, capsys):
    from PIL import Image

    from sd_app.cli import main
    from sd_app.metadata import parse_parameters
    from tests.clip_fixtures import tiny_clip_dir

    clip = tiny_clip_dir(tmp_path / "clip")
    args = ["generate", "a red circle", "--steps", "4", "--width", "64", "--height", "64", "--seed", "9", "--n", "4",
            "--model", str(tiny_model), "--reranker", str(clip), "--out", str(tmp_path / "out")]
    assert main([*args, "--prune-to", "2", "--prune-at", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    kept = [line for line in out if not line.startswith("pruned")]
    pruned = [line for line in out if line.startswith("pruned at step 2  seed ")]
    assert len(kept) == 2 and len(pruned) == 2 and all(line.endswith(" by clip-tiny") for line in pruned)
    pruned_seeds = {line.split("seed ")[1].split()[0] for line in pruned}
    params = parse_parameters(Image.open(kept[0].split()[0]).info["parameters"])
    assert params["Early pruning"] == "4 to 2 at step 2"
    assert {pair.split(":")[0] for pair in params["Pruned early"].split(", ")} == pruned_seeds
    assert "Early score" in params
    assert main([*args, "--prune-to", "2", "--prune-at", "2", "--min-score", "100", "--extra-rounds", "1"]) == 0
    captured = capsys.readouterr()
    assert "4 of 4 image(s) (2 rounds: the pruned finished when no kept one passed)" in captured.err
    assert not [line for line in captured.out.splitlines() if line.startswith("pruned")]  # all 4 finished
    for bad, message in [(["--prune-to", "4", "--prune-at", "2"], "--prune-to must be between 1 and n - 1 = 3"),
                         (["--prune-to", "2", "--prune-at", "4"], "--prune-at must be a step between 1 and steps - 1"),
                         (["--prune-to", "2", "--prune-at", "2", "--no-rerank"], "needs a reranker")]:
        assert main([*args, *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


pytest_plugins = ["tests.serve_fixtures"]


def test_api_prune_fields_and_info(live_server):
    import json

    import httpx

    body = {"prompt": "a red circle", "steps": 3, "width": 64, "height": 64, "seed": 20, "batch_size": 4,
            "prune_to": 1, "prune_at": 1}
    response = httpx.post(f"{live_server.url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert len(response.json()["images"]) == 1 and (info["prune_to"], info["prune_at"]) == (1, 1)
    assert sorted([p["seed"] for p in info["pruned"]] + info["all_seeds"]) == [20, 21, 22, 23]
    assert all(p["score"] <= info["rerank_details"][0]["Early score"] for p in info["pruned"])
    assert info["early_scorer"] == info["reranker"]  # the live server's model ships no preview scorer
    bad = httpx.post(f"{live_server.url}/sdapi/v1/txt2img", json={**body, "prune_at": 3}, timeout=120)
    assert bad.status_code == 422 and "prune_at must be a step between 1 and steps - 1 = 2" in bad.text


def test_ui_prunes_and_says_which(live_server):
    from gradio_client import Client

    client = Client(live_server.url, verbose=False, analytics_enabled=False)
    # prompt, negative, sampler, steps, cfg, width, height, seed, candidates, rerank by, hires fix (5), clip skip,
    # scorers, minimum score, extra rounds; early pruning: finish only the best M, scored after step K
    args = ("a red circle", "", "Euler a", 3, 7, 64, 64, 30, 3, "clip", False, 2, "Latent", 0, 0.7, 1, "", "", 3)
    status, _, gallery, parameters, _ = client.predict(*args, 1, 2, api_name="/generate")
    assert status.startswith("Done: 1 image(s)") and len(gallery) == 1
    assert "pruned at step 2 by clip-tiny: seed " in status  # the live server's model ships no preview scorer
    assert "Early pruning: 3 to 1 at step 2" in parameters


def test_batch_manifest_lists_the_pruned(tiny_model, tmp_path):
    import json

    from sd_app.cli import main
    from tests.clip_fixtures import tiny_clip_dir

    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text("a red circle\n")
    assert main(["batch", str(prompts), "--out", str(out), "--model", str(tiny_model), "--steps", "3", "--width", "64",
                 "--height", "64", "--seed", "5", "--n", "3", "--prune-to", "1", "--prune-at", "1",
                 "--reranker", str(tiny_clip_dir(tmp_path / "clip"))]) == 0
    (record,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(record["files"]) == 1 and sorted([p["seed"] for p in record["pruned"]] + record["seeds"]) == [5, 6, 7]
    assert record["request"]["prune_to"] == 1 and all(p["at_step"] == 1 for p in record["pruned"])


def test_an_early_scorer_ranks_the_previews_and_the_reranker_the_finished_images(tiny_pipe, scorer, tmp_path):
    """``early_scorer`` (a model's preview scorer) decides what is pruned; ``scorer`` still ranks the kept."""
    early_scorer = ClipScorer.load(tiny_clip_dir(tmp_path / "early", seed=5), device="cpu")
    request = GenerationRequest(**{**BASE, "n": 4, "prune_to": 2, "prune_at": 2, "sampler": "DPM++ 2M"})
    out = best_of_n(tiny_pipe, request, scorer, batch_size=4, early_scorer=early_scorer)
    with tiny_pipe.generating():
        run, _ = tiny_pipe.start(GenerationRequest(**{**BASE, "n": 4, "sampler": "DPM++ 2M"}), track_clean=True)
        run.run(2)
        previews = decode_clean(tiny_pipe, run.clean)
    by_early = early_scorer.score(previews, "a red circle")
    by_reranker = scorer.score(previews, "a red circle")
    assert by_early.order()[:2] != by_reranker.order()[:2]  # the two scorers disagree: the test can tell them apart
    assert {c.seed - 70 for c in out.candidates} == set(by_early.order()[:2])
    pruned_early = sorted(by_early.scores[i] for i in by_early.order()[2:])
    assert sorted(p.score for p in out.pruned) == pytest.approx(pruned_early, abs=1e-4)
    assert out.early_scorer == early_scorer.name and out.reranker == scorer.name
    finished = scorer.score([c.image for c in out.candidates], "a red circle").scores
    assert [c.score for c in out.candidates] == pytest.approx(sorted(finished, reverse=True), abs=1e-4)


def test_the_engine_prunes_with_the_models_preview_scorer_and_says_so(tiny_model, tmp_path):
    import shutil

    from sd_app.engine import Engine
    from sd_app.metadata import parse_parameters

    model = tmp_path / "with-preview"
    shutil.copytree(tiny_model, model)
    reranker = tiny_clip_dir(tmp_path / "reranker")
    request = GenerationRequest(**{**BASE, "n": 3, "prune_to": 1, "prune_at": 2})
    plain = Engine(model=str(model), reranker=str(reranker), output_dir=tmp_path / "out", device="cpu")
    assert plain.preview_scorer(plain.pipeline()) is None
    params = parse_parameters(plain.generate(request).candidates[0].parameters)
    assert params["Early scorer"] == "clip-tiny"  # the reranker, when the model ships no preview scorer
    shutil.copytree(tiny_clip_dir(tmp_path / "preview", seed=5), model / "clip_preview")
    engine = Engine(model=str(model), reranker=str(reranker), output_dir=tmp_path / "out", device="cpu")
    assert engine.preview_scorer(engine.pipeline()).name == "with-preview/clip_preview"
    result = engine.generate(request)
    params = parse_parameters(result.candidates[0].parameters)
    assert params["Early scorer"] == "with-preview/clip_preview" and params["Reranker"] == "clip-tiny"


def test_a_minimum_score_finishes_the_pruned_when_the_kept_fall_short(tiny_pipe, scorer):
    """Round 1 finishes the best M; when none passes, round 2 finishes the N - M it pruned (their seeds'
    own images, going on from step 2); round 3 starts new seeds, pruned again."""
    from pipelines.rerank.min_score import best_of_until_pass

    request = GenerationRequest(**{**BASE, "n": 4, "prune_to": 1, "prune_at": 2, "sampler": "DPM++ 2M"})
    rounds: list[tuple[int, int]] = []
    steps: list[tuple[int, int]] = []  # (step, total) as told

    def run(minimum: float, extra_rounds: int):
        rounds.clear()
        steps.clear()
        return best_of_until_pass(tiny_pipe, request, scorer, {"CLIP score": minimum}, extra_rounds,
                                  on_round=lambda r: rounds.append((r.round, r.passed)),
                                  on_step=lambda i: steps.append((i.step, i.total)))

    passing = run(-1e9, 1)  # the kept one passes: one round, the other 3 stay pruned
    assert passing.rounds == 1 and len(passing.output.candidates) == 1 and len(passing.output.pruned) == 3
    assert {c.seed for c in passing.output.candidates} | {p.seed for p in passing.output.pruned} == {70, 71, 72, 73}
    rows: list[int] = []  # images per U-Net call (guided: twice the batch)
    hook = tiny_pipe.components.unet.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        short = run(1e9, 1)  # nobody passes: the pruned 3 are finished in round 2, all 4 ranked together
    finally:
        hook.remove()
    # The pruned go on from step 2: 4 x 5 candidate-steps in all, as without pruning (not 4 x 2 + 1 x 3 + 3 x 5).
    assert sum(rows) // 2 == 4 * BASE["steps"]
    assert short.rounds == 2 and rounds == [(1, 0), (2, 0)] and not short.output.pruned
    assert sorted(c.seed for c in short.output.candidates) == [70, 71, 72, 73]
    # progress never goes back and ends at its total, told alike by both rounds: a pruned round's 4 x 2 + 1 x 3
    assert [s for s, _ in steps] == sorted(s for s, _ in steps) and {t for _, t in steps} == {2 * 11}
    assert steps[-1] == (22, 22)
    finished = {c.seed: c.image for c in short.output.candidates}
    for seed in (p.seed for p in passing.output.pruned):  # each its seed's picture (8-bit, as the kept ones above)
        alone = tiny_pipe(GenerationRequest(**{**BASE, "seed": seed, "n": 1, "sampler": "DPM++ 2M"})).images[0]
        assert np.abs(np.asarray(alone, dtype=int) - np.asarray(finished[seed], dtype=int)).max() <= 1
    longer = run(1e9, 2)  # round 3: new seeds 74-77, pruned to 1 again
    assert longer.rounds == 3 and sorted(c.seed for c in longer.output.candidates)[:4] == [70, 71, 72, 73]
    assert len(longer.output.candidates) == 5 and {p.seed for p in longer.output.pruned} < {74, 75, 76, 77}
    assert len(longer.output.pruned) == 3


@pytest.mark.parametrize("text", ["clip=82", "82", "CLIP score=82", "clip score = 82"])
def test_evaluation_fallback_minimum_reads_as_min_score_does(text):
    """``evaluate_pruning --fallback`` takes ``--min-score``'s form, and the label its earlier logs were run with."""
    from pipelines.training.evaluate_pruning import fallback_thresholds

    assert fallback_thresholds(text) == {"CLIP score": 82.0}


@pytest.mark.parametrize(("text", "message"), [
    ("aesthetic=5", "not among the scorers in use"),
    ("clip=high", "NAME=NUMBER"),
    ("colour=3", "scorer name must be one of"),
])
def test_evaluation_fallback_refuses_a_bad_minimum_before_loading(text, message, tmp_path, capsys):
    from pipelines.training.evaluate_pruning import main

    with pytest.raises(SystemExit) as stop:
        main(["--fallback", text, "--model", str(tmp_path / "absent")])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
