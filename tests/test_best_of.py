"""Best-of-N reranking through the pipeline, the engine and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.generation.request import GenerationRequest
from pipelines.rerank.best_of import best_of_n
from pipelines.rerank.clip_scorer import ClipScorer
from sd_app.cli import main
from sd_app.engine import Engine
from sd_app.metadata import parse_parameters
from tests.clip_fixtures import tiny_clip_dir


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip_dir(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return ClipScorer.load(clip_dir, device="cpu")


REQUEST = dict(prompt="a red circle", steps=2, width=64, height=64, seed=40, n=5, sampler="Euler")


def test_candidates_are_sorted_by_score_with_their_own_seeds(tiny_pipe, scorer):
    ranked = best_of_n(tiny_pipe, GenerationRequest(**REQUEST), scorer, batch_size=2)
    scores = [c.score for c in ranked.candidates]
    assert scores == sorted(scores, reverse=True) and len(scores) == 5
    assert sorted(c.seed for c in ranked.candidates) == [40, 41, 42, 43, 44]
    again = scorer.score([c.image for c in ranked.candidates], "a red circle").scores
    assert again == pytest.approx(scores, abs=1e-4)
    best = ranked.candidates[0]
    alone = tiny_pipe(GenerationRequest(**{**REQUEST, "seed": best.seed, "n": 1})).images[0]
    assert np.abs(np.asarray(alone, dtype=int) - np.asarray(best.image, dtype=int)).max() <= 2
    assert ranked.reranker == scorer.name


def test_batching_does_not_change_the_pictures_and_keep_takes_the_top(tiny_pipe, scorer):
    by_two = best_of_n(tiny_pipe, GenerationRequest(**REQUEST), scorer, batch_size=2)
    by_five = best_of_n(tiny_pipe, GenerationRequest(**REQUEST), scorer, batch_size=5, keep=2)
    assert [c.seed for c in by_five.candidates] == [c.seed for c in by_two.candidates][:2]
    with pytest.raises(ValueError, match="keep must be an integer between 1 and n=5, got 6"):
        best_of_n(tiny_pipe, GenerationRequest(**REQUEST), scorer, keep=6)


def test_without_scorer_generation_order_is_kept(tiny_pipe):
    ranked = best_of_n(tiny_pipe, GenerationRequest(**{**REQUEST, "n": 3}))
    assert [c.seed for c in ranked.candidates] == [40, 41, 42]
    assert all(c.score is None for c in ranked.candidates)


def test_engine_writes_scores_into_png_metadata(tiny_model, clip_dir, tmp_path):
    engine = Engine(model=str(tiny_model), reranker=str(clip_dir), output_dir=tmp_path, device="cpu")
    result = engine.generate(GenerationRequest(**{**REQUEST, "n": 3}))
    assert [c.score for c in result.candidates] == sorted((c.score for c in result.candidates), reverse=True)
    for candidate in result.candidates:
        params = parse_parameters(Image.open(candidate.path).info["parameters"])
        assert params["CLIP score"] == f"{candidate.score:.2f}"
        assert params["Reranker"] == "clip-tiny" and params["Seed"] == str(candidate.seed)


def test_cli_reranks_by_default_and_no_rerank_keeps_order(tiny_model, clip_dir, tmp_path, capsys):
    args = [
        "generate",
        "a red circle",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "9",
        "--n",
        "3",
        "--model",
        str(tiny_model),
        "--reranker",
        str(clip_dir),
    ]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    scores = [float(line.split("CLIP score ")[1]) for line in lines]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    assert main([*args, "--out", str(tmp_path / "b"), "--no-rerank"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("seed ")[1].split()[0] for line in lines] == ["9", "10", "11"]


def test_cli_scores_a_single_image_only_when_asked(tiny_model, clip_dir, tmp_path, capsys):
    """--n 1 has nothing to rank: no scorer is loaded unless --score, --scorer or --min-score asks for one."""
    args = ["generate", "a red circle", "--steps", "2", "--width", "64", "--height", "64", "--seed", "9",
            "--model", str(tiny_model), "--reranker", str(clip_dir)]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    captured = capsys.readouterr()
    assert "CLIP score" not in captured.out and "in generation order" in captured.err
    (path,) = (tmp_path / "plain").glob("*.png")
    params = parse_parameters(Image.open(path).info["parameters"])
    assert "CLIP score" not in params and "Reranker" not in params
    for extra in (["--score"], ["--scorer", "clip"], ["--min-score", "0"]):
        out = tmp_path / extra[0].strip("-")
        assert main([*args, *extra, "--out", str(out)]) == 0
        captured = capsys.readouterr()
        assert "CLIP score" in captured.out and "best first by clip-tiny" in captured.err, extra
        (path,) = out.glob("*.png")
        assert parse_parameters(Image.open(path).info["parameters"])["Reranker"] == "clip-tiny"
    assert main([*args, "--no-rerank", "--min-score", "20", "--out", str(tmp_path / "x")]) == 2
    assert "--min-score needs reranking" in capsys.readouterr().err


def test_score_command_prints_scores_best_first_and_zero_shot_table(clip_dir, tmp_path, capsys, scorer):
    from tests.clip_fixtures import blob_images

    paths = []
    for index, image in enumerate(blob_images([(64, 64)] * 3, seed=3)):
        paths.append(tmp_path / f"img{index}.png")
        image.save(paths[-1])
    assert main(["score", *map(str, paths), "--prompt", "a red circle", "--reranker", str(clip_dir)]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    printed = [float(row.split()[1]) for row in rows]
    expected = scorer.score([Image.open(p).convert("RGB") for p in paths], "a red circle").scores
    assert printed == sorted(printed, reverse=True)
    assert printed == pytest.approx(sorted(expected, reverse=True), abs=0.01)

    assert (
        main(["score", str(paths[0]), "--texts", "a cat", "a dog", "a car", "--reranker", str(clip_dir)]) == 0
    )
    table = capsys.readouterr().out.strip().splitlines()[2:]
    probabilities = [float(line.split()[-1]) for line in table]
    assert len(table) == 3 and sum(probabilities) == pytest.approx(1.0, abs=2e-4)
    assert probabilities == sorted(probabilities, reverse=True)


def test_score_command_errors_are_one_line(clip_dir, tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    gray = tmp_path / "gray.png"
    Image.new("L", (8, 8)).save(gray)
    for args, message in [
        ([str(bad), "--prompt", "x"], "is not a readable image file"),
        ([str(gray), "--prompt", "x"], "grayscale"),
        ([str(tmp_path / "missing.png"), "--prompt", "x"], "image file not found"),
    ]:
        assert main(["score", *args, "--reranker", str(clip_dir)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    assert main(["score", str(tmp_path / "ok.png"), "--prompt", "x", "--reranker", str(tmp_path)]) == 2
    assert "not a CLIP model folder" in capsys.readouterr().err


def test_scoring_reads_the_prompt_without_emphasis_syntax(tiny_pipe, scorer):
    ranked = best_of_n(tiny_pipe, GenerationRequest(**{**REQUEST, "prompt": "a (red:1.3) [circle]", "n": 2}), scorer)
    plain = scorer.score([c.image for c in ranked.candidates], "a red circle").scores
    assert [c.score for c in ranked.candidates] == pytest.approx(plain, abs=1e-4)


def test_latent_previews_use_a_projection_fitted_to_the_models_vae(tiny_pipe):
    import torch

    tiles = tiny_pipe.preview_latents(torch.zeros(2, 4, 8, 8), size=32)
    assert [t.size for t in tiles] == [(32, 32), (32, 32)]
    assert tiny_pipe._latent_projection is not None  # fitted once, then reused
