"""ClipScorer: equality with torchmetrics' CLIPScore, batching, truncation, zero-shot, bad inputs."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from PIL import Image

from pipelines.rerank import clip_scorer as rerank
from pipelines.rerank.clip_scorer import ClipScorer, load_image_file
from pipelines.rerank.prompt_text import scoring_note, scoring_prompt
from tests.clip_fixtures import (
    blob_images,
    hf_cache_copy,
    tiny_clip_dir,
    to_uint8_chw,
    torch_threads,
    torchmetrics_clip_score,
)

SIZES = [(64, 64), (100, 80), (120, 200), (512, 512), (70, 90)]
PROMPTS = ["a red circle on a blue background", "a green star", "two yellow squares"]
LONG_PROMPT = "a small red circle above a large blue square on a green background, " * 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip_dir(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return ClipScorer.load(clip_dir, device="cpu")


@pytest.fixture(scope="module")
def metric(clip_dir):
    return torchmetrics_clip_score(clip_dir)


@pytest.fixture(scope="module")
def images():
    return blob_images(SIZES)


def tm_score(metric, images, prompt):
    metric.reset()
    metric.update([to_uint8_chw(im) for im in images], [prompt] * len(images))
    return float(metric.compute())


def test_scores_equal_torchmetrics_per_image_and_mean(scorer, metric, images):
    raw = []
    for prompt in PROMPTS:
        result = scorer.score(images, prompt)
        assert not result.truncated and result.reranker == "clip-tiny"
        for image, score, cos in zip(images, result.scores, result.cosines, strict=True):
            assert score == pytest.approx(tm_score(metric, [image], prompt), abs=0.01)
            assert score == pytest.approx(max(100 * cos, 0.0), abs=1e-6)
        mean = max(100 * sum(result.cosines) / len(images), 0.0)  # torchmetrics: clamp of the batch mean
        assert mean == pytest.approx(tm_score(metric, images, prompt), abs=0.01)
        raw.extend(result.scores)
    assert any(s > 0 for s in raw), "all scores clamped to 0: the comparison would be vacuous"


def test_raw_cosines_equal_torchmetrics_update(scorer, metric, images):
    """Unclamped per-image values from torchmetrics' own update function (negative ones too)."""
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    prompt = PROMPTS[0]
    expected, _ = _clip_score_update(
        [to_uint8_chw(im) for im in images], [prompt] * len(images), metric.model, metric.processor
    )
    got = torch.tensor(scorer.score(images, prompt).cosines) * 100
    torch.testing.assert_close(got, expected.float(), atol=0.01, rtol=0)


def test_legacy_openai_preprocessor_config(tmp_path, images):
    """openai's repos store size/crop_size as ints under feature_extractor_type."""
    folder = tiny_clip_dir(tmp_path, legacy_preprocessor=True)
    assert json.loads((folder / "preprocessor_config.json").read_text())["size"] == 64
    legacy = ClipScorer.load(folder, device="cpu")
    scores = legacy.score(images, PROMPTS[0]).scores
    metric = torchmetrics_clip_score(folder)
    for image, score in zip(images, scores, strict=True):
        assert score == pytest.approx(tm_score(metric, [image], PROMPTS[0]), abs=0.01)


def test_prompt_encoded_once_and_images_batched(clip_dir):
    scorer = ClipScorer.load(clip_dir, device="cpu", batch_size=4)
    calls = {"text": 0, "image": []}
    text_fn, image_fn = scorer.model.get_text_features, scorer.model.get_image_features

    def count_text(*args, **kwargs):
        calls["text"] += 1
        return text_fn(*args, **kwargs)

    def count_image(*args, pixel_values, **kwargs):
        calls["image"].append(len(pixel_values))
        return image_fn(*args, pixel_values=pixel_values, **kwargs)

    scorer.model.get_text_features = count_text
    scorer.model.get_image_features = count_image
    result = scorer.score(blob_images([(64, 64)] * 10), PROMPTS[0])
    assert len(result.scores) == 10
    assert calls == {"text": 1, "image": [4, 4, 2]}


def test_long_prompt_truncated_and_flagged(scorer, images):
    result = scorer.score(images, LONG_PROMPT)
    assert result.truncated
    assert all(math.isfinite(s) for s in result.scores)
    features, flags = scorer.text_features([PROMPTS[0], LONG_PROMPT])
    assert flags == [False, True]
    # Truncation keeps the end-of-text token: same features as the first 75 tokens + eos.
    ids = scorer.tokenizer(LONG_PROMPT)["input_ids"]
    cut = scorer.tokenizer.decode(ids[1:76])
    cut_features, cut_flags = scorer.text_features([cut])
    assert cut_flags == [False]
    torch.testing.assert_close(features[1], cut_features[0], atol=1e-4, rtol=0)


def test_text_features_are_unit_vectors(scorer):
    features, flags = scorer.text_features(PROMPTS)
    assert features.shape == (3, 16) and flags == [False] * 3
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))


def test_rank_is_best_first_and_consistent_with_scores(scorer, images):
    order, result = scorer.rank(images, PROMPTS[1])
    assert sorted(order) == list(range(len(images)))
    ranked_scores = [result.scores[i] for i in order]
    ranked_cosines = [result.cosines[i] for i in order]
    assert ranked_scores == sorted(result.scores, reverse=True)
    assert ranked_cosines == sorted(result.cosines, reverse=True)


def test_zero_shot_probabilities_match_manual_softmax(scorer, images):
    texts = ["a cat", "a dog", "a car", LONG_PROMPT]
    rows = scorer.zero_shot(images[1], texts)
    assert sorted(r.text for r in rows) == sorted(texts)
    assert sum(r.probability for r in rows) == pytest.approx(1.0, abs=1e-6)
    assert [r.probability for r in rows] == sorted((r.probability for r in rows), reverse=True)
    assert {r.text: r.truncated for r in rows}[LONG_PROMPT] is True

    image_features = scorer.image_features([images[1]])  # [1, D]
    text_features, _ = scorer.text_features(texts)  # [T, D]
    cos = (text_features @ image_features[0]).double()
    scale = scorer.model.logit_scale.exp().item()
    probs = torch.softmax(scale * cos, dim=0)
    by_text = {r.text: r for r in rows}
    for text, c, p in zip(texts, cos, probs, strict=True):
        assert by_text[text].cosine == pytest.approx(float(c), abs=1e-6)
        assert by_text[text].logit == pytest.approx(scale * float(c), abs=1e-5)
        assert by_text[text].probability == pytest.approx(float(p), abs=1e-6)


def test_image_features_batched_equal_one_by_one(scorer, images):
    batched = scorer.image_features(images)
    single = torch.cat([scorer.image_features([im]) for im in images])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


# ---- bad inputs ---------------------------------------------------------------------------------


def test_load_image_file_rejects_non_images(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        load_image_file(bad)
    truncated = tmp_path / "cut.png"
    blob_images([(64, 64)])[0].save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ValueError, match="cut.png"):
        load_image_file(truncated)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image_file(tmp_path / "missing.png")


def test_load_image_file_alpha_and_grayscale(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "alpha.png")
    Image.new("L", (8, 8), 128).save(tmp_path / "gray.png")
    blob_images([(8, 8)])[0].save(tmp_path / "rgb.png")

    with pytest.raises(ValueError, match=r"alpha\.png.*alpha channel"):
        load_image_file(tmp_path / "alpha.png")
    with pytest.raises(ValueError, match=r"gray\.png.*grayscale"):
        load_image_file(tmp_path / "gray.png")
    assert load_image_file(tmp_path / "rgb.png").mode == "RGB"

    flat = load_image_file(tmp_path / "alpha.png", convert=True)
    assert flat.mode == "RGB"
    assert flat.getpixel((0, 0)) == (255, 0, 0) and flat.getpixel((5, 5)) == (255, 255, 255)
    assert load_image_file(tmp_path / "gray.png", convert=True).getpixel((1, 1)) == (128, 128, 128)


def test_scorer_rejects_bad_images_and_texts(scorer):
    good = blob_images([(64, 64)])[0]
    with pytest.raises(ValueError, match=r"images\[1\].*alpha"):
        scorer.score([good, good.convert("RGBA")], "a cat")
    with pytest.raises(ValueError, match=r"images\[0\].*grayscale"):
        scorer.image_features([good.convert("L")])
    with pytest.raises(ValueError, match="images"):
        scorer.score([], "a cat")
    with pytest.raises(ValueError, match="texts"):
        scorer.zero_shot(good, [])
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        scorer.text_features(["a cat", None])
    with pytest.raises(ValueError, match="prompt"):
        scorer.score([good], None)


def test_non_clip_folders_are_refused(tmp_path, clip_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty.*no config.json"):
        ClipScorer.load(empty)

    bert = tmp_path / "bert-model"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="bert-model.*model_type='bert'"):
        ClipScorer.load(bert)

    pickled = tmp_path / "pickled-clip"
    shutil.copytree(clip_dir, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match="pickled-clip.*pytorch_model.bin"):
        ClipScorer.load(pickled)

    corrupt = tmp_path / "corrupt-clip"
    shutil.copytree(clip_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="corrupt-clip: cannot load"):
        ClipScorer.load(corrupt)

    with pytest.raises(FileNotFoundError, match="nowhere"):
        ClipScorer.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="file"):
        ClipScorer.load(clip_dir / "config.json")


def test_embedded_not_built_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(rerank, "EMBEDDED_CLIP", tmp_path / "embedded" / "shapes-tiny" / "clip")
    with pytest.raises(FileNotFoundError, match="embedded CLIP model is not built"):
        ClipScorer.load("embedded")


def test_repo_id_from_local_hf_cache(tmp_path, clip_dir):
    cache = tmp_path / "hub"
    hf_cache_copy(clip_dir, cache, "openai/clip-tiny")
    scorer = ClipScorer.load("openai/clip-tiny", device="cpu", cache_dir=cache)
    assert scorer.name == "openai/clip-tiny"
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        ClipScorer.load("openai/not-cached", cache_dir=cache)


def test_clip_folder_sharing_its_text_tower_with_a_text_encoder(tmp_path, clip_dir, images):
    """The embedded layout: clip/ without text_model.* weights, the text tower in ../text_encoder."""
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "model"
    shared = model_dir / "clip"
    shutil.copytree(clip_dir, shared)
    state = load_file(str(clip_dir / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("text_model.")}, str(shared / "model.safetensors"))
    with pytest.raises(ValueError, match="no text tower.*text_encoder"):
        ClipScorer.load(shared)
    (model_dir / "text_encoder").mkdir()
    save_file({k: v for k, v in state.items() if k.startswith("text_model.")},
              str(model_dir / "text_encoder" / "model.safetensors"))
    whole, joined = ClipScorer.load(clip_dir, device="cpu"), ClipScorer.load(shared, device="cpu")
    assert joined.score(images, "a red blob").scores == pytest.approx(whole.score(images, "a red blob").scores)

    # A reranker fine-tuned with its own text layers (not the token embedding) stores just those: they win.
    layer = "text_model.encoder.layers.0.mlp.fc1.weight"
    own = {k: v for k, v in state.items() if not k.startswith("text_model.")} | {layer: state[layer] * 2}
    save_file(own, str(shared / "model.safetensors"))
    tuned = ClipScorer.load(shared, device="cpu")
    assert torch.equal(tuned.model.state_dict()[layer], state[layer] * 2)
    token = "text_model.embeddings.token_embedding.weight"
    assert torch.equal(tuned.model.state_dict()[token], state[token])
    assert tuned.score(images, "a red blob").scores != pytest.approx(whole.score(images, "a red blob").scores)


def test_scoring_prompt_drops_lora_tags_and_emphasis_syntax_and_notes_it():
    prompt = "(a red hexagon:1.5) on a  [blue] ((background)) <lora:hexagon:0.8>"
    assert scoring_prompt(prompt) == "a red hexagon on a blue background"
    assert scoring_prompt(r"a \(literal\) bracket, embedding-name") == "a (literal) bracket, embedding-name"
    assert scoring_note(prompt) == "scored against: 'a red hexagon on a blue background'"
    assert scoring_note(" a red  circle ") is None
