"""The Gradio app through gradio_client against a live server: generate, errors, recovery, cancel,
inspect, score, PNG info, and 8 clients at once each getting the image their seed determines."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import gradio as gr
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


def generate_args(prompt="a red circle", seed=11, n=2, steps=2, width=64, sampler="Euler a", rerank="clip",
                  hires=(False, 2, "Latent", 0, 0.7)):
    # prompt, negative, sampler, steps, cfg, width, height, seed, candidates, rerank by,
    # hires fix (on, scale, upscaler, steps, denoising strength)
    return (prompt, "", sampler, steps, 7, width, 64, seed, n, rerank, *hires)


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
    from pipelines.generation.denoising import DenoisingRun

    calls = {"n": 0}
    original = DenoisingRun.run  # the sampling loop every text-to-image request runs

    def exploding_denoise(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DenoisingRun, "run", exploding_denoise)
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
# ---- hires fix, Image to image, send-to ------------------------------------------------------------


def _drawing(size=64):
    from PIL import ImageDraw

    image = Image.new("RGB", (size, size), (40, 80, 220))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(220, 40, 40))
    return image


def image_args(editor, mask=None, prompt="a green circle", seed=21, n=1, strength=0.8, blur=4, content="original",
               area="Whole picture", padding=32, mode="Inpaint masked", resize="just resize", outpaint=0,
               sides=("left", "right", "top", "bottom"), width=0, height=0, decoder="Full"):
    # editor, mask, prompt, negative, sampler, steps, cfg, width, height, seed, n, rerank, strength, mask blur,
    # masked content, inpaint area, padding, mask mode, resize mode, outpaint, sides, VAE decoder
    return (editor, mask, prompt, "", "Euler a", 4, 7, width, height, seed, n, True, strength, blur, content, area,
            padding, mode, resize, outpaint, list(sides), decoder)


def test_generate_with_the_hires_fix(client):
    status, _, gallery, parameters, _ = client.predict(
        *generate_args(n=1, hires=(True, 1.5, "Latent (bicubic)", 2, 0.5)), api_name="/generate"
    )
    assert status.startswith("Done: 1 image(s)") and Image.open(gallery[0]["image"]).size == (96, 96)
    params = parse_parameters(parameters)
    assert params["Hires upscaler"] == "Latent (bicubic)" and params["Hires steps"] == "2"


def test_inpaint_with_a_painted_mask_keeps_the_rest(client, tmp_path):
    from pipelines.generation.masks import processed_mask

    _drawing().save(tmp_path / "init.png")
    stroke = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    stroke.paste((255, 255, 255, 255), (20, 20, 44, 44))  # what the brush painted
    stroke.save(tmp_path / "layer.png")
    editor = {"background": handle_file(str(tmp_path / "init.png")),
              "layers": [handle_file(str(tmp_path / "layer.png"))], "composite": None}
    status, _, gallery, parameters, files = client.predict(*image_args(editor, n=2), api_name="/img2img")
    assert status.startswith("Done: 2 image(s)") and len(files) == 2
    painted = Image.new("L", (64, 64), 0)
    painted.paste(255, (20, 20, 44, 44))
    outside = np.asarray(processed_mask(painted, invert=False, blur=4)) == 0
    for item in gallery:
        out = np.asarray(Image.open(item["image"]).convert("RGB")).astype(int)
        assert np.abs(out - np.asarray(_drawing()).astype(int))[outside].max() == 0
    params = parse_parameters(parameters)
    assert params["Denoising strength"] == "0.8" and params["Mask blur"] == "4" and params["Size"] == "64x64"


def test_img2img_outpaint_and_errors(client, tmp_path):
    _drawing().save(tmp_path / "init.png")
    editor = {"background": handle_file(str(tmp_path / "init.png")), "layers": [], "composite": None}
    status, _, gallery, _, _ = client.predict(*image_args(editor, outpaint=16, sides=("left",)), api_name="/img2img")
    assert "outpainting: canvas 80x64" in status and Image.open(gallery[0]["image"]).size == (80, 64)
    with pytest.raises(AppError, match="init image: upload or send an image"):
        client.predict(*image_args(None), api_name="/img2img")
    with pytest.raises(AppError, match="outpaint: choose at least one side"):
        client.predict(*image_args(editor, outpaint=8, sides=()), api_name="/img2img")
    Image.new("L", (64, 64), 0).save(tmp_path / "black.png")
    with pytest.raises(AppError, match="mask is all black: nothing to repaint"):
        client.predict(*image_args(editor, mask=handle_file(str(tmp_path / "black.png"))), api_name="/img2img")
    with pytest.raises(AppError, match="vae_decoder TAESD: .* has no tiny decoder"):  # the view's decoder is used
        client.predict(*image_args(editor, decoder="TAESD"), api_name="/img2img")


def test_editor_value_to_init_image_and_mask():
    from sd_app.ui_image import editor_inputs

    background = Image.new("RGBA", (32, 16), (10, 20, 30, 255))
    layer = Image.new("RGBA", (64, 32), (0, 0, 0, 0))  # layers may come at another size
    layer.paste((255, 255, 255, 128), (0, 0, 16, 16))
    init, mask = editor_inputs({"background": background, "layers": [layer], "composite": None})
    assert init.mode == "RGB" and init.size == (32, 16) and mask.size == (32, 16)
    assert mask.getpixel((3, 3)) == 255 and mask.getpixel((20, 3)) == 0
    assert editor_inputs({"background": background, "layers": [Image.new("RGBA", (32, 16))]})[1] is None
    assert editor_inputs(None) == (None, None)


def test_send_a_result_and_a_png_to_image_to_image(live_server, tmp_path):
    from pipelines.generation.conditioning import ImageConditioning

    session = UserSession()
    with pytest.raises(Exception, match="Generate an image first"):
        UiHandlers.send_result_to_image(session)
    result = live_server.engine.generate(
        GenerationRequest(prompt="a star", steps=2, width=64, height=64, seed=31, n=2, sampler="Euler"),
        output_dir=tmp_path,
    )
    session.last_result = result
    session.selected = 1
    editor, prompt, _, sampler, steps, _, seed, _ = UiHandlers.send_result_to_image(session)
    assert editor["background"] is result.candidates[1].image and seed == result.candidates[1].seed
    assert (prompt, sampler, steps) == ("a star", "Euler", 2)

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 30, 30))
    inpainted = live_server.engine.generate(
        GenerationRequest(prompt="a square", steps=2, width=64, height=64, seed=5, sampler="Euler",
                          image=ImageConditioning(_drawing(), strength=0.55, mask=mask, mask_blur=7,
                                                  inpaint_full_res=True, padding=12, invert_mask=True)),
        output_dir=tmp_path,
    )
    path = str(inpainted.candidates[0].path)
    filled = UiHandlers.send_png_to_image(path, UiHandlers.png_info(path)[0])
    assert filled[0]["background"].size == (64, 64) and filled[1] == "a square" and filled[6] == 5
    assert filled[7:13] == (0.55, 7, "original", "Only masked", 12, "Inpaint not masked")
    assert filled[13:15] == ("just resize", "Full") and len(filled) == 16  # resize mode, VAE decoder, the tab


def test_cancel_says_so_only_for_a_job_and_each_view_keeps_its_own_results(client, live_server):
    """Cancel after a job finished has nothing to stop. In the page: each Cancel button also drops its view's
    queued job (Gradio's ``cancels``, which the browser carries out), and Generate and Image to image keep their
    results, selection, seed and cancel switch apart (one shared state mixed them up)."""
    client.predict(*generate_args(n=1), api_name="/generate")
    assert client.predict(api_name="/cancel") == "Nothing to cancel."
    config = build_demo(live_server.engine).config
    dependencies = {d.get("api_name"): d for d in config["dependencies"]}
    states = {c["id"] for c in config["components"] if c.get("type") == "state"}
    generate, image = dependencies["generate"], dependencies["img2img"]
    cancelled = [d["cancels"] for d in config["dependencies"] if d.get("cancels")]
    assert [generate["id"]] in cancelled and [image["id"]] in cancelled
    generate_states, image_states = states & set(generate["inputs"]), states & set(image["inputs"])
    # each view's own session; the one state they share is the page's record of the selection it shows
    assert len(generate_states - image_states) == 1 and len(image_states - generate_states) == 1
    assert len(generate_states & image_states) == 1


def test_image_to_image_takes_the_servers_clip_skip_and_the_vae_list_has_no_twins(live_server, monkeypatch):
    from dataclasses import replace

    from sd_app.ui_jobs import JobTracker

    engine = replace(live_server.engine, clip_skip=2, vae="None")  # serve --clip-skip 2, VAE "None" chosen
    handlers = UiHandlers(engine, JobTracker())
    seen = []

    def capture(request, *args, **kwargs):
        seen.append(request)
        yield ("captured",)

    monkeypatch.setattr(handlers, "_stream", capture)
    drawing = _drawing()
    editor = {"background": drawing, "layers": [], "composite": drawing}
    list(handlers.image_to_image(editor, None, "a square", "", "Euler", 2, 7, 64, 64, 5, 1, False, 0.5, 4, "original",
                                 "Whole picture", 32, "Inpaint masked", "just resize", 0, [], "Full", UserSession()))
    assert seen[0].clip_skip == 2  # as the API's img2img and the Generate slider's default
    assert handlers.vae_choices().count("None") == 1 and handlers.vae_choices().count("Automatic") == 1


def test_a_failed_generation_says_so_in_the_status_line(client, live_server, monkeypatch):
    from pipelines.generation.denoising import DenoisingRun

    def failing(self, *args, **kwargs):
        raise RuntimeError("the disk caught fire")

    monkeypatch.setattr(DenoisingRun, "run", failing)
    job = client.submit(*generate_args(n=1), api_name="/generate")
    with pytest.raises(AppError, match="disk caught fire"):
        job.result(timeout=60)
    assert any(str(update[0]).startswith("Failed: ") for update in job.outputs() if update)


def test_hires_resize_goes_from_png_info_into_generate_and_into_the_picture(client):
    """A1111's ``Hires resize: WxH`` (what --hires-size writes) survives Send to Generate (it fell back to the
    scale) and the view's "resize to" box makes that size."""
    text = ("a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64, Denoising strength: 0.5, "
            "Hires resize: 128x64, Hires steps: 1, Hires upscaler: Latent")
    filled = UiHandlers.send_to_generate(text)
    assert filled[8:13] == (True, 2.0, "Latent", 1, 0.5) and filled[15] == "128x64"
    foreign = UiHandlers.send_to_generate(text.replace("Hires upscaler: Latent", "Hires upscaler: R-ESRGAN 4x+"))
    assert foreign[:8] == filled[:8] and foreign[10] == "Latent"  # the rest is filled in, not refused
    # prompt, negative, sampler, steps, cfg, width, height, seed, candidates, rerank by, hires fix (5), clip skip,
    # scorers, minimum score, extra rounds, prune to, prune at, VAE decoder, hires resize
    args = ("a cat", "", "Euler", 2, 7, 64, 64, 5, 1, "off", True, 2, "Latent", 1, 0.5, 1, "", "", 3, 0, 0, "Full")
    status, _, gallery, parameters, _ = client.predict(*args, "128x64", api_name="/generate")
    assert Image.open(gallery[0]["image"]).size == (128, 64)
    assert parse_parameters(parameters)["Hires resize"] == "128x64"
    with pytest.raises(AppError, match=r"Hires fix \"Or resize to WxH\" must look like 1024x768"):
        client.predict(*args, "big", api_name="/generate")


def test_padding_the_canvas_turns_masked_content_to_fill_unless_chosen():
    assert UiHandlers.outpaint_content(64, "original") == "fill"  # the CLI's --outpaint default, A1111's scripts'
    assert UiHandlers.outpaint_content(64, "latent noise") == gr.update()  # the user's own choice stays
    assert UiHandlers.outpaint_content(0, "original") == gr.update()


def test_max_waiting_per_client_applies_to_ui_jobs(serve_engine):
    """serve --max-waiting-per-client 2: with one job running and two of its own waiting, an address's next
    Generate is refused at once with the API's message (under the prompt in a page, ValidationError in
    gradio_client); once they are done it is served again."""
    from gradio_client.exceptions import ValidationError
    from gradio_client.utils import Status

    from sd_app.server import create_app
    from sd_app.ui_jobs import JobTracker
    from tests.serve_fixtures import start_server

    tracker = JobTracker(max_waiting=16, max_waiting_per_client=2)
    url, server, thread = start_server(create_app(serve_engine, tracker=tracker))
    client = Client(url, verbose=False, analytics_enabled=False)
    fields = generate_args(n=1, steps=1, rerank="off")

    def wait_until(condition):
        deadline = time.monotonic() + 120
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)

    try:
        with serve_engine._use_lock:  # the running job waits for the model: the next ones wait in the queue
            running = client.submit(*fields, api_name="/generate")
            wait_until(lambda: tracker.count() == 1)
            waiting = [client.submit(*fields, api_name="/generate") for _ in range(2)]
            wait_until(lambda: all(job.status().code == Status.IN_QUEUE for job in waiting))
            third = client.submit(*fields, api_name="/generate")  # refused, or queued (then the test fails)
            wait_until(lambda: third.done() or third.status().code == Status.IN_QUEUE)
            assert third.done(), "a third waiting job of the same address was queued"
            with pytest.raises(ValidationError, match="busy: 2 of your requests are already waiting"):
                third.result()
            ids = {d.get("api_name"): d["id"] for d in client.config["dependencies"]}
            for view, prompt_input in (("generate", 0), ("img2img", 2)):  # Image to image counts the same jobs
                answer = httpx.post(f"{url}/gradio_api/queue/join", timeout=30,
                                    json={"data": [], "fn_index": ids[view], "session_hash": "page"})
                assert answer.status_code == 422  # as a page's join: the message is shown under the view's prompt
                assert answer.json()["detail"][prompt_input]["message"].startswith("busy: 2 of your requests")
        for job in (running, *waiting):
            assert job.result(timeout=300)[0].startswith("Done: 1 image(s)")
        assert client.predict(*fields, api_name="/generate")[0].startswith("Done: 1 image(s)")  # nothing leaked
    finally:
        server.should_exit = server.force_exit = True
        thread.join(timeout=10)


def test_max_waiting_per_client_warns_instead_of_failing_on_a_gradio_without_that_queue():
    """The cap uses Gradio's internal queue; a release without it serves the UI uncapped, saying so."""
    from types import SimpleNamespace

    from sd_app.ui_admission import limit_waiting_per_client

    for demo in (SimpleNamespace(), SimpleNamespace(_queue=SimpleNamespace(push=lambda **kw: None))):
        with pytest.warns(UserWarning, match="browser jobs are not capped per client"):
            limit_waiting_per_client(demo, 2, {"generate": 0})
