"""The Gradio app through gradio_client against a live server: generate, errors, recovery, cancel,
inspect, score, PNG info, and 8 clients at once each getting the image their seed determines."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from pipelines.generation.request import GenerationRequest
from sd_app.engine import Engine
from sd_app.metadata import parse_parameters
from sd_app.ui import build_demo
from sd_app.ui_handlers import UiHandlers, UserSession, caption

pytest_plugins = ["tests.serve_fixtures"]

CAPTION = re.compile(r"^CLIP \d+\.\d · seed (\d+)$")


def generate_args(prompt="a red circle", seed=11, n=2, steps=2, width=64, sampler="Euler a", rerank="clip"):
    # prompt, negative, sampler, steps, cfg, width, height, seed, candidates, rerank by
    return (prompt, "", sampler, steps, 7, width, 64, seed, n, rerank)


@pytest.fixture
def client(live_server):
    return Client(live_server.url, verbose=False, analytics_enabled=False)


def test_generate_two_candidates_with_scores_in_captions(client):
    status, _, gallery, parameters, files = client.predict(*generate_args(), api_name="/generate")
    assert status.startswith("Done: 2 image(s)")
    assert len(gallery) == 2 and len(files) == 2
    seeds = [int(CAPTION.match(item["caption"]).group(1)) for item in gallery]
    assert sorted(seeds) == [11, 12]
    scores = [float(item["caption"].split()[1]) for item in gallery]
    assert scores == sorted(scores, reverse=True)  # best first
    for item, seed in zip(gallery, seeds):
        params = parse_parameters(Image.open(item["image"]).info["parameters"])  # the download keeps metadata
        assert params["Seed"] == str(seed) and "CLIP score" in params
    assert parse_parameters(parameters)["Seed"] == str(seeds[0])


def test_bad_input_is_a_short_error_and_the_next_request_works(client):
    with pytest.raises(AppError, match="width must be a positive multiple of 8, got 65") as raised:
        client.predict(*generate_args(width=65), api_name="/generate")
    assert "Traceback" not in str(raised.value)
    status, *_ = client.predict(*generate_args(n=1), api_name="/generate")
    assert status.startswith("Done: 1 image(s)")


def test_out_of_memory_is_reported_and_the_next_request_works(client, live_server, monkeypatch):
    pipe = live_server.engine.pipeline()
    calls = {"n": 0}
    original = type(pipe).denoise

    def exploding_denoise(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "denoise", exploding_denoise)
    with pytest.raises(AppError, match="Out of memory"):
        client.predict(*generate_args(n=1), api_name="/generate")
    status, *_ = client.predict(*generate_args(n=1), api_name="/generate")
    assert status.startswith("Done") and calls["n"] == 2


def test_cancel_stops_the_running_generation(client):
    job = client.submit(*generate_args(n=1, steps=150, sampler="Euler"), api_name="/generate")
    deadline = time.monotonic() + 60
    while not any(str(update[0]).startswith("Step") for update in job.outputs() if update):
        assert time.monotonic() < deadline and not job.done(), "generation did not start stepping"
        time.sleep(0.05)
    assert client.predict(api_name="/cancel") == "Cancelling…"
    status = job.result(timeout=60)[0]
    done = re.match(r"Cancelled \(cancelled after (\d+) of 150 steps\)", status)
    assert done and int(done.group(1)) < 150, status


def test_token_counter(client):
    assert client.predict("a red circle", api_name="/count_tokens") == "3/75 tokens"
    assert client.predict("circle " * 80, api_name="/count_tokens") == "80/150 tokens · 2 chunks"


def test_inspect_after_generate(client):
    client.predict(*generate_args(n=2, steps=3), api_name="/generate")
    tokens, shapes, steps, table, pca = client.predict(
        "a red circle", "", 7, 64, 64, 2, "a blue square", api_name="/inspect"
    )
    assert [row[3] for row in tokens["data"]] == [49406, 320, 736, 7117, 49407]
    assert "`[1, 77, 32]`" in shapes and "`[2, 4, 8, 8]`" in shapes and "`[4, 77, 32]`" in shapes
    assert [item["caption"] for item in steps] == ["step 1/3", "step 2/3", "step 3/3"]
    assert table["headers"] == ["image", "a red circle", "a blue square"] and len(table["data"]) == 2
    assert Image.open(pca).size == (640, 480)


def test_score_view_zero_shot_table(client, tmp_path):
    path = tmp_path / "blob.png"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(path)
    rows = client.predict([handle_file(str(path))], "a red image\na blue image", api_name="/score")["data"]
    assert {row[1] for row in rows} == {"a red image", "a blue image"} and rows[0][0] == "blob.png"
    assert sum(row[4] for row in rows) == pytest.approx(1.0, abs=1e-3)


def test_png_info_round_trip(client, live_server, tmp_path):
    result = live_server.engine.generate(
        GenerationRequest(
            prompt="a (red:1.2) circle",
            negative_prompt="blurry",
            steps=2,
            width=64,
            height=64,
            seed=99,
            sampler="DPM++ 2M Exponential",
        ),
        output_dir=tmp_path,
    )
    text, fields = client.predict(handle_file(str(result.candidates[0].path)), api_name="/png_info")
    assert fields["Seed"] == "99" and fields["prompt"] == "a (red:1.2) circle"
    filled = UiHandlers.send_to_generate(text)
    assert filled[:8] == ("a (red:1.2) circle", "blurry", "DPM++ 2M Exponential", 2, 7.0, 64, 64, 99)


def test_nothing_heavy_at_import_and_build_demo_loads_no_model():
    code = (
        "import sys, sd_app.ui, sd_app.server, sd_app.batch, sd_app.api; "
        "print(sorted(m for m in ('gradio', 'torch', 'diffusers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr
    engine = Engine(model="/no/such/model", reranker=None)
    build_demo(engine)
    assert engine.loaded() == [] and engine._scorer is None


def test_session_helpers():
    session = UserSession()
    assert UiHandlers.reuse_seed(session) == -1 and UiHandlers.cancel(session) == "Nothing to cancel."
    session.last_seed = 1234
    assert UiHandlers.reuse_seed(session) == 1234
    assert caption(123, 31.24) == "CLIP 31.2 · seed 123" and caption(5, None) == "seed 5"


def test_eight_clients_at_once_each_get_their_seed_image(live_server):
    """4 Gradio clients and 4 API clients at once; each image equals a sequential reference."""
    seeds = list(range(500, 508))
    pipe = live_server.engine.pipeline()
    reference = {
        seed: np.asarray(
            pipe(
                GenerationRequest(prompt="a red circle", steps=2, width=64, height=64, seed=seed, sampler="Euler a")
            ).images[0]
        )
        for seed in seeds
    }

    def via_gradio(seed: int) -> np.ndarray:
        client = Client(live_server.url, verbose=False, analytics_enabled=False)
        _, _, gallery, _, _ = client.predict(*generate_args(seed=seed, n=1), api_name="/generate")
        assert gallery[0]["caption"].endswith(f"seed {seed}")
        return np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))

    def via_api(seed: int) -> np.ndarray:
        import base64
        import io
        import json

        body = {
            "prompt": "a red circle",
            "steps": 2,
            "width": 64,
            "height": 64,
            "seed": seed,
            "sampler_name": "Euler a",
        }
        response = httpx.post(f"{live_server.url}/sdapi/v1/txt2img", json=body, timeout=180).json()
        assert json.loads(response["info"])["all_seeds"] == [seed]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(response["images"][0]))).convert("RGB"))

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {seed: pool.submit(via_gradio if i % 2 else via_api, seed) for i, seed in enumerate(seeds)}
        images = {seed: future.result(timeout=300) for seed, future in futures.items()}
    for seed in seeds:
        np.testing.assert_array_equal(images[seed], reference[seed], err_msg=f"seed {seed}")


def test_contrastive_reranking_from_the_ui_and_its_captions_in_inspect(client):
    status, _, gallery, parameters, _ = client.predict(
        *generate_args("a red circle on a blue background", rerank="contrastive"), api_name="/generate"
    )
    assert "best Contrastive score" in status and gallery[0]["caption"].startswith("Contrastive ")
    assert "Contrastive score: " in parameters and "Prompt probability: " in parameters
    _, shapes, *_ = client.predict("a red circle on a blue background", "", 7, 64, 64, 2, "", api_name="/inspect")
    assert "Counterfactual captions" in shapes and "a blue circle on a red background (colour swap)" in shapes
