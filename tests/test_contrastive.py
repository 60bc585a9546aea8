"""Contrastive reranking: counterfactual captions made from the prompt, scores equal to CLIP's zero-shot
probability of the prompt among them, and the mode through engine, CLI and API."""

from __future__ import annotations

import json

import httpx
import pytest

from pipelines.generation.request import GenerationRequest
from pipelines.rerank.clip_scorer import ClipScorer
from pipelines.rerank.contrastive import ContrastiveScorer, reranker_for
from pipelines.rerank.counterfactuals import counterfactual_captions
from sd_app.metadata import parse_parameters
from tests.clip_fixtures import blob_images, tiny_clip_dir

pytest_plugins = ["tests.serve_fixtures"]


def _texts(prompt: str) -> dict[str, list[str]]:
    made: dict[str, list[str]] = {}
    for caption in counterfactual_captions(prompt):
        made.setdefault(caption.kind, []).append(caption.text)
    return made


def test_counterfactuals_of_an_ordinary_prompt():
    made = _texts("a red cube and a blue ball")
    assert made["colour swap"] == ["a blue cube and a red ball"]
    assert made["count"] == ["two red cubes and a blue ball", "several red cubes and a blue ball",
                             "a red cube and two blue balls", "a red cube and several blue balls"]
    assert made["attribute"] == ["a green cube and a blue ball", "a yellow cube and a blue ball",
                                 "a red cube and a green ball", "a red cube and a yellow ball"]


def test_counterfactuals_of_the_shapes_grammar_and_of_plurals():
    made = _texts("A red circle on a blue background")
    assert made["colour swap"] == ["A blue circle on a red background"]
    assert made["count"] == ["Two red circles on a blue background", "Several red circles on a blue background"]
    assert "A red circle on two blue backgrounds" not in sum(made.values(), [])  # scenes keep their count
    assert _texts("three small boxes")["count"] == ["a small box"]
    assert counterfactual_captions("landscape, highly detailed") == []


@pytest.fixture(scope="module")
def tiny_scorer(tmp_path_factory):
    return ClipScorer.load(tiny_clip_dir(tmp_path_factory.mktemp("clip")), device="cpu")


def test_contrastive_score_is_the_prompts_zero_shot_probability(tiny_scorer):
    prompt = "a red cube and a blue ball"
    images = blob_images([(64, 64)] * 3, seed=4)
    result = ContrastiveScorer(tiny_scorer).score(images, prompt)
    texts = [prompt, *(c.text for c in counterfactual_captions(prompt))]
    for image, score, details in zip(images, result.scores, result.details, strict=True):
        rows = {row.text: row.probability for row in tiny_scorer.zero_shot(image, texts)}
        assert score == pytest.approx(100 * rows[prompt], rel=1e-5)
        assert details["Prompt probability"] == pytest.approx(score)
    plain = tiny_scorer.score(images, prompt)
    assert [d["CLIP score"] for d in result.details] == pytest.approx(plain.scores)
    assert result.order() == sorted(range(3), key=lambda i: -result.scores[i])
    mixed = reranker_for(tiny_scorer, "mixed").score(images, prompt)
    assert mixed.scores == pytest.approx([(a + b) / 2 for a, b in zip(result.scores, plain.scores)])
    assert (result.label, mixed.label) == ("Contrastive score", "Mixed score")


def test_without_counterfactuals_it_is_the_clip_score(tiny_scorer):
    images = blob_images([(64, 64)] * 2)
    assert ContrastiveScorer(tiny_scorer).score(images, "landscape").scores == tiny_scorer.score(images,
                                                                                                   "landscape").scores
    with pytest.raises(ValueError, match="rerank mode must be one of clip, contrastive, mixed"):
        reranker_for(tiny_scorer, "aesthetic")


def test_engine_writes_every_score_into_the_metadata(serve_engine):
    request = GenerationRequest(prompt="a red circle on a blue background", steps=2, width=64, height=64, n=3, seed=9)
    result = serve_engine.generate(request, rerank_by="contrastive", save=False)
    assert result.score_label == "Contrastive score"
    scores = [c.score for c in result.candidates]
    assert scores == sorted(scores, reverse=True)
    params = parse_parameters(result.candidates[0].parameters)
    assert float(params["Contrastive score"]) == pytest.approx(scores[0], abs=0.01)
    assert "CLIP score" in params and "Prompt probability" in params and params["Reranker"].endswith("(contrastive)")
    with pytest.raises(ValueError, match="rerank_by must be one of"):
        serve_engine.generate(request, rerank_by="best", save=False)


def test_api_and_cli_take_the_mode(live_server, tiny_model, tiny_clip, tmp_path, capsys):
    body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "batch_size": 2, "seed": 3,
            "rerank_by": "mixed"}
    response = httpx.post(f"{live_server.url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["score_label"] == "Mixed score" and len(info["rerank_details"]) == 2
    assert info["clip_scores"] == [d["CLIP score"] for d in info["rerank_details"]]
    bad = httpx.post(f"{live_server.url}/sdapi/v1/txt2img", json={**body, "rerank_by": "best"}, timeout=60)
    assert bad.status_code == 422

    from sd_app.cli import main

    assert main(["generate", "a red circle and a blue square", "--steps", "1", "--width", "64", "--height", "64",
                 "--n", "2", "--model", str(tiny_model), "--reranker", str(tiny_clip), "--out", str(tmp_path),
                 "--rerank-by", "contrastive"]) == 0
    assert "Contrastive score" in capsys.readouterr().out


def test_counterfactuals_of_a_huge_prompt_read_what_clip_reads():
    """Only the first 77 words can reach CLIP, so only they are changed; the work (quadratic in the colour words,
    for each a new string of the prompt's length) stays bounded for a 400,000-character prompt."""
    made = counterfactual_captions("red blue " * 50_000)
    assert len(made) == 12 and all(c.kind == "colour swap" for c in made)
    made = counterfactual_captions("red " * 80 + "blue circle")
    assert made and all(c.text.endswith(" red red red blue circle") for c in made)  # words 78- never change
    assert not [c for c in made if c.kind == "colour swap"]  # blue is past them: nothing to swap with
