"""Preference scorers beside CLIP: PickScore-style CLIPModel folders, LAION's aesthetic head, weighted
combinations and minimum scores. Models are tiny ones built here in the real formats; numbers are checked
against independent computations (transformers and numpy directly, as the PickScore model card and LAION's
simple_inference.py do)."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.generation.request import GenerationRequest
from pipelines.rerank.aesthetic import AestheticScorer, build_aesthetic_mlp, load_aesthetic_head
from pipelines.rerank.clip_scorer import ClipScorer, ScoreResult
from pipelines.rerank.min_score import best_of_until_pass
from pipelines.rerank.preference import PreferenceScorer
from pipelines.rerank.scorer_specs import (
    ScorerSpec,
    parse_min_scores,
    parse_scorer,
    parse_weights,
    passes,
    thresholds_by_label,
)
from pipelines.rerank.scorers import WeightedScorer, combine, load_scorer
from tests.clip_fixtures import blob_images, tiny_clip_dir, torch_threads
from tests.scorer_fixtures import LAION_WIDTHS, laion_head_state

PROMPT = "a red circle on a blue background"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIPModel folder whose logit scale is 37 (not CLIP's 100), so the scale's use shows."""
    folder = tiny_clip_dir(tmp_path_factory.mktemp("pick"), seed=3)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    state["logit_scale"] = torch.tensor(math.log(37.0))
    save_file(state, str(weights), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def clip(clip_dir):
    return ClipScorer.load(clip_dir, device="cpu")


@pytest.fixture(scope="module")
def images():
    return blob_images([(64, 64), (80, 64), (64, 96), (70, 70)], seed=5)


def reference_features(folder, images, text=None):
    """Normalised image (and text) features straight from transformers, as PickScore's model card computes them."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels)
        image = getattr(image, "pooler_output", image)
        image = image / image.norm(dim=-1, keepdim=True)
        if text is None:
            return image, None, model
        tokens = processor(text=[text], padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_emb = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        text_emb = getattr(text_emb, "pooler_output", text_emb)
        return image, text_emb / text_emb.norm(dim=-1, keepdim=True), model


# ---- specs ---------------------------------------------------------------------------------


def test_scorer_specs_parse_kind_files_and_weight():
    assert parse_scorer("clip") == ScorerSpec("clip", None, None, 1.0)
    assert parse_scorer("clip:0.5") == ScorerSpec("clip", None, None, 0.5)
    assert parse_scorer("pickscore=/m/PickScore_v1@/m/CLIP-ViT-H-14:2") == ScorerSpec(
        "pickscore", "/m/PickScore_v1", "/m/CLIP-ViT-H-14", 2.0
    )
    assert parse_scorer("aesthetic=/m/sac+logos+ava1-l14-linearMSE.safetensors") == ScorerSpec(
        "aesthetic", "/m/sac+logos+ava1-l14-linearMSE.safetensors", None, 1.0
    )
    assert parse_scorer("clip=C:\\models\\clip:0") == ScorerSpec("clip", "C:\\models\\clip", None, 0.0)
    assert parse_scorer("aesthetic=h.safetensors@clip-l:0.5").text() == "aesthetic=h.safetensors@clip-l:0.5"
    for bad, message in [
        ("pickscore", "needs its file"),
        ("beauty=/x", "scorer kind must be one of"),
        ("clip:-1", "weight must be a number >= 0"),
        ("clip:abc", r"^scorer weight must be a number, got 'clip:abc'$"),  # the weight, as parse_weights says
        ("clip:inf", r"^scorer weight must be a number, got 'clip:inf'$"),
        ("clip=/a@/b", "'@' is for pickscore"),
        ("aesthetic=", "no file after '='"),
        ("", "KIND"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_scorer(bad)


def test_weights_and_minimum_scores_by_name():
    assert parse_weights("clip:1, aesthetic:0.5,pickscore") == {"clip": 1.0, "aesthetic": 0.5, "pickscore": 1.0}
    assert parse_weights({"Clip": 2}) == {"clip": 2.0}
    assert parse_weights("") == {} and parse_weights(None) == {}
    for bad, message in [("aesthetic=/etc/x", "not files"), ("clip:x", "must be a number"), ("clip, clip", "twice"),
                         ("art:1", "must be one of")]:
        with pytest.raises(ValueError, match=message):
            parse_weights(bad)
    assert parse_min_scores(["aesthetic=5.5", "clip=28"]) == {"aesthetic": 5.5, "clip": 28.0}
    assert parse_min_scores("30") == {"": 30.0} and parse_min_scores(30) == {"": 30.0}
    with pytest.raises(ValueError, match="NAME=NUMBER"):
        parse_min_scores(["aesthetic=high"])
    assert thresholds_by_label({"": 30.0}, ["clip"]) == {"CLIP score": 30.0}
    assert thresholds_by_label({"aesthetic": 5.0}, ["clip", "aesthetic"]) == {"Aesthetic score": 5.0}
    with pytest.raises(ValueError, match="name the scorer"):
        thresholds_by_label({"": 30.0}, ["clip", "aesthetic"])
    with pytest.raises(ValueError, match="not among the scorers in use"):
        thresholds_by_label({"pickscore": 20.0}, ["clip"])
    for kind, value in [("clip", 200.0), ("clip", -1.0), ("contrastive", 100.5), ("mixed", -0.1)]:
        with pytest.raises(ValueError, match=f"minimum score for {kind} must be between 0 and 100"):
            thresholds_by_label({"": value}, [kind])
    assert thresholds_by_label({"clip": 100.0, "pickscore": 200.0, "aesthetic": -3.0},
                               ["clip", "pickscore", "aesthetic"]) == {
        "CLIP score": 100.0, "PickScore": 200.0, "Aesthetic score": -3.0}  # no fixed range: left alone
    assert passes({"CLIP score": 30.0, "Aesthetic score": 5.0}, {"CLIP score": 30.0})
    assert not passes({"CLIP score": 29.99}, {"CLIP score": 30.0})
    assert not passes({"CLIP score": 31.0}, {"Aesthetic score": 1.0})  # a missing score never passes


# ---- PickScore convention ------------------------------------------------------------------


def test_pickscore_is_logit_scale_times_cosine_as_its_model_card(clip_dir, clip, images):
    result = PreferenceScorer(clip).score(images, PROMPT)
    image, text, model = reference_features(clip_dir, images, PROMPT)
    expected = model.logit_scale.exp() * (text @ image.T)[0]  # PickScore model card: scores
    assert float(model.logit_scale.detach().exp()) == pytest.approx(37.0, rel=1e-5)
    assert result.scores == pytest.approx(expected.tolist(), abs=1e-4)
    probs = torch.softmax(expected, dim=-1) * 100  # the card's calc_probs
    assert [d["Preference probability"] for d in result.details] == pytest.approx(probs.tolist(), abs=1e-3)
    assert result.label == "PickScore"
    assert result.order() == sorted(range(4), key=lambda i: -float(expected[i].detach()))


def test_pickscore_folder_without_processor_takes_it_from_a_second_folder(tmp_path, clip_dir, images):
    model_only = tmp_path / "PickScore_v1"
    model_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clip_dir / name, model_only / name)
    with pytest.raises(ValueError, match="no preprocessor_config.json.*after '@'"):
        load_scorer(parse_scorer(f"pickscore={model_only}"), lambda: None, device="cpu")
    scorer = load_scorer(parse_scorer(f"pickscore={model_only}@{clip_dir}"), lambda: None, device="cpu")
    reference = PreferenceScorer(ClipScorer.load(clip_dir, device="cpu")).score(images, PROMPT)
    assert scorer.score(images, PROMPT).scores == pytest.approx(reference.scores, abs=1e-5)


# ---- LAION aesthetic head ------------------------------------------------------------------


def test_the_published_laion_layout_loads_and_refuses_a_clip_of_another_width(tmp_path, clip):
    head = tmp_path / "sac+logos+ava1-l14-linearMSE.safetensors"
    save_file(laion_head_state(LAION_WIDTHS), str(head))
    mlp = load_aesthetic_head(head)
    assert set(mlp.state_dict()) == set(laion_head_state(LAION_WIDTHS))
    assert [type(m).__name__ for m in mlp.layers] == ["Linear", "Dropout"] * 3 + ["Linear", "Linear"]
    assert [(m.in_features, m.out_features) for m in mlp.layers if isinstance(m, torch.nn.Linear)] == [
        (768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)
    ]
    assert [m.p for m in mlp.layers if isinstance(m, torch.nn.Dropout)] == [0.2, 0.2, 0.1]
    with pytest.raises(ValueError, match="takes 768-wide CLIP image embeddings.*16-wide"):
        AestheticScorer(clip, mlp, head.stem)


def test_aesthetic_score_is_the_mlp_on_normalised_image_embeddings(tmp_path, clip_dir, clip, images):
    widths = (16, 32, 8, 8, 4, 1)  # the tiny CLIP's 16-wide projection; LAION's key names
    state = laion_head_state(widths, seed=1)
    head = tmp_path / "tiny-aesthetic.safetensors"
    save_file(state, str(head))
    scorer = load_scorer(parse_scorer(f"aesthetic={head}@{clip_dir}"), lambda: None, device="cpu")
    result = scorer.score(images, PROMPT)
    image, _, _ = reference_features(clip_dir, images)
    x = image.double().numpy()  # LAION's `normalized` embeddings; the head has no activations
    for index in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{index}.weight"].double().numpy().T + state[f"layers.{index}.bias"].double().numpy()
    assert result.scores == pytest.approx(x[:, 0].tolist(), abs=1e-4)
    assert result.label == "Aesthetic score"
    assert scorer.score(images, "something else entirely").scores == result.scores  # prompt-independent
    assert scorer.name == f"tiny-aesthetic on {clip.name}"


def test_aesthetic_head_refuses_pickles_and_other_layouts(tmp_path):
    pickle = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    pickle.write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="never loaded.*weights_only=True"):
        load_aesthetic_head(pickle)
    with pytest.raises(ValueError, match="never loaded"):  # before asking for a CLIP
        load_scorer(parse_scorer(f"aesthetic={pickle}"), lambda: None)
    state = laion_head_state((16, 32, 8, 8, 4, 1))
    del state["layers.7.bias"]
    with pytest.raises(ValueError, match="missing layers.7.bias"):
        build_aesthetic_mlp(state)
    state = laion_head_state((16, 32, 8, 8, 4, 1))
    state["layers.2.weight"] = torch.zeros(8, 31)
    with pytest.raises(ValueError, match="layers.2"):
        build_aesthetic_mlp(state)
    state = laion_head_state((16, 32, 8, 8, 4, 2))
    with pytest.raises(ValueError, match="must output one rating"):
        build_aesthetic_mlp(state)
    not_safetensors = tmp_path / "head.safetensors"
    not_safetensors.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_aesthetic_head(not_safetensors)


# ---- combination ---------------------------------------------------------------------------


class FixedScorer:
    """Scores given in advance (in input order), for checking the combination's arithmetic."""

    def __init__(self, name, label, scores, details=None):
        self.name, self.label, self.values, self.details = name, label, scores, details

    def score(self, images, prompt):
        values = self.values[: len(images)]
        details = tuple(self.details[: len(images)]) if self.details else ()
        return ScoreResult(prompt, tuple(values), tuple(0.0 for _ in values), False, self.name, self.label, details)


def test_weighted_score_standardises_each_scorer_then_weighs():
    clip_scores = [30.0, 32.0, 28.0, 30.0]
    aesthetic = [5.0, 4.0, 7.0, 6.0]
    combined = WeightedScorer(
        [("clip", FixedScorer("c", "CLIP score", clip_scores), 1.0),
         ("aesthetic", FixedScorer("a", "Aesthetic score", aesthetic), 0.5)]
    )
    result = combined.score([None] * 4, PROMPT)
    z_clip = (np.array(clip_scores) - np.mean(clip_scores)) / np.std(clip_scores)
    z_aes = (np.array(aesthetic) - np.mean(aesthetic)) / np.std(aesthetic)
    assert result.scores == pytest.approx(((1.0 * z_clip + 0.5 * z_aes) / 1.5).tolist(), abs=1e-9)
    assert result.label == "Weighted score"
    assert [d["CLIP score"] for d in result.details] == clip_scores
    assert [d["Aesthetic score"] for d in result.details] == aesthetic
    assert result.order() == [1, 3, 0, 2]  # CLIP's 32 leads at weight 1 : 0.5 ...
    heavier = WeightedScorer(
        [("clip", FixedScorer("c", "CLIP score", clip_scores), 1.0),
         ("aesthetic", FixedScorer("a", "Aesthetic score", aesthetic), 2.0)]
    ).score([None] * 4, PROMPT)
    assert heavier.order() == [2, 3, 0, 1]  # ... the aesthetic 7.0 at 1 : 2
    silent = WeightedScorer(
        [("clip", FixedScorer("c", "CLIP score", clip_scores), 1.0),
         ("aesthetic", FixedScorer("a", "Aesthetic score", aesthetic), 0.0)]
    ).score([None] * 4, PROMPT)
    assert silent.order() == [1, 0, 3, 2] and silent.details[2]["Aesthetic score"] == 7.0  # recorded, not ranked
    one = WeightedScorer([("clip", FixedScorer("c", "CLIP score", [31.0]), 1.0),
                          ("aesthetic", FixedScorer("a", "Aesthetic score", [5.0]), 1.0)]).score([None], PROMPT)
    assert one.scores == (0.0,)  # a lone candidate does not vary
    with pytest.raises(ValueError, match="given once"):
        WeightedScorer([("clip", FixedScorer("c", "CLIP score", []), 1.0)] * 2)
    with pytest.raises(ValueError, match="weight above 0"):
        WeightedScorer([("clip", FixedScorer("c", "CLIP score", []), 0.0)])
    lone = FixedScorer("c", "CLIP score", [1.0])
    assert combine([("clip", lone, 2.0)]) is lone


# ---- minimum scores ------------------------------------------------------------------------


class SeedPipe:
    """A stand-in pipeline: image i of a request is a flat picture whose red channel is its seed - 100."""

    name = "seed-pipe"

    def __call__(self, request, on_step=None, cancel=None, progress=False, interruption=None):
        from types import SimpleNamespace

        from PIL import Image

        from pipelines.generation.text_to_image import StepInfo

        for step in range(1, request.steps + 1):
            if on_step is not None:
                on_step(StepInfo(step, request.steps, 0.0, torch.zeros(request.n, 4, 8, 8)))
        seeds = request.seeds()
        images = [Image.new("RGB", (8, 8), (seed - 100, 0, 0)) for seed in seeds]
        return SimpleNamespace(images=images, seeds=seeds, model_hash="0123456789", extra={})


class SeedScorer:
    """'CLIP score' = the picture's red value = its seed - 100, so a minimum of s passes the seeds >= 100 + s."""

    name, label = "seed-scorer", "CLIP score"

    def __init__(self):
        self.prompts = []

    def score(self, images, prompt):
        self.prompts.append(prompt)
        values = tuple(float(i.getpixel((0, 0))[0]) for i in images)
        return ScoreResult(prompt, values, values, False, self.name, self.label)


REQ = dict(prompt="a (red:1.2) circle <lora:x:1>", steps=1, width=64, height=64, seed=100, n=2, sampler="Euler")


def test_min_score_regenerates_with_the_next_seeds_until_one_passes():
    reports = []
    steps = []
    seed_scorer = SeedScorer()
    out = best_of_until_pass(
        SeedPipe(), GenerationRequest(**REQ), seed_scorer, {"CLIP score": 5.0}, 5,
        on_round=reports.append, on_step=lambda info: steps.append((info.step, info.total)),
    )
    assert out.rounds == 3 and out.max_rounds == 6 and out.any_passed  # seeds 100-101, 102-103, 104-105
    assert [c.seed for c in out.output.candidates] == [105, 104, 103, 102, 101, 100]
    assert out.passed == [True, False, False, False, False, False]
    assert [r.passed for r in reports] == [0, 0, 1] and reports[1].best == {"CLIP score": 3.0}
    assert "none reached CLIP score >= 5 (best: CLIP score 3.00); generating more" in reports[1].text()
    assert steps == [(1, 6), (2, 6), (3, 6)]  # progress of the whole bounded request, only forward
    assert set(seed_scorer.prompts) == {"a red circle"}  # scorers read plain text: no emphasis, no LoRA tags


def test_min_score_is_bounded_and_says_when_none_passed():
    reports = []
    seed_scorer = SeedScorer()
    out = best_of_until_pass(SeedPipe(), GenerationRequest(**REQ), seed_scorer, {"CLIP score": 50.0}, 1,
                             on_round=reports.append, keep=3)
    assert out.rounds == 2 and not out.any_passed and out.passed == [False] * 3
    assert [c.seed for c in out.output.candidates] == [103, 102, 101]
    assert reports[-1].text().endswith("no rounds left")
    with pytest.raises(ValueError, match="extra rounds must be an integer between 0 and 10"):
        best_of_until_pass(SeedPipe(), GenerationRequest(**REQ), seed_scorer, {"CLIP score": 1.0}, 11)


class SeedDetailScorer(SeedScorer):
    """Ranks the lowest seed best (Weighted score = -red) and carries 'Aesthetic score' = red = seed - 100."""

    label = "Weighted score"

    def score(self, images, prompt):
        red = [float(i.getpixel((0, 0))[0]) for i in images]
        return ScoreResult(prompt, tuple(-r for r in red), tuple(0.0 for _ in red), False, self.name, self.label,
                           tuple({"Aesthetic score": r} for r in red))


def test_candidates_that_reach_the_minimum_come_first_whatever_their_ranking_score():
    out = best_of_until_pass(SeedPipe(), GenerationRequest(**REQ), SeedDetailScorer(), {"Aesthetic score": 3.0}, 3)
    assert out.rounds == 2 and [c.seed for c in out.output.candidates] == [103, 100, 101, 102]
    assert out.passed == [True, False, False, False]
    assert [c.details["Aesthetic score"] for c in out.output.candidates] == [3.0, 0.0, 1.0, 2.0]
