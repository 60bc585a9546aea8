"""The A1111-compatible HTTP API as a client uses it: a live server on the tiny models, plus auth."""

from __future__ import annotations

import base64
import io
import json
import threading

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipelines.generation.previews import preview
from pipelines.generation.text_to_image import StepInfo
from sd_app.api import progress_payload, sampler_from_fields
from sd_app.metadata import parse_parameters
from sd_app.server import is_loopback, parse_credentials
from sd_app.ui_jobs import Busy, JobTracker

pytest_plugins = ["tests.serve_fixtures"]

BASE = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler a"}


def txt2img(url: str, **fields) -> dict:
    response = httpx.post(f"{url}/sdapi/v1/txt2img", json={**BASE, **fields}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_txt2img_returns_pngs_with_parameters_seeds_and_scores(live_server):
    body = txt2img(live_server.url, seed=5, batch_size=2, n_iter=2, negative_prompt="blurry")
    info = json.loads(body["info"])
    images = [decode(b64) for b64 in body["images"]]
    assert len(images) == 4 and all(im.format == "PNG" and im.size == (64, 64) for im in images)
    assert sorted(info["all_seeds"]) == [5, 6, 7, 8] and info["seed"] == 5
    scores = info["clip_scores"]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True) and info["reranked"] is True
    for image, seed, score, infotext in zip(images, info["all_seeds"], scores, info["infotexts"]):
        params = parse_parameters(image.info["parameters"])
        assert image.info["parameters"] == infotext
        assert params["Seed"] == str(seed) and params["CLIP score"] == f"{score:.2f}"
        assert params["negative_prompt"] == "blurry" and params["Sampler"] == "Euler a"
    assert body["parameters"]["batch_size"] == 2 and body["parameters"]["seed"] == 5


def test_a_seed_gives_the_same_image_alone_or_in_a_batch(live_server):
    batch = txt2img(live_server.url, seed=40, batch_size=3, rerank=False)
    assert json.loads(batch["info"])["all_seeds"] == [40, 41, 42]  # generation order without rerank
    alone = txt2img(live_server.url, seed=41)
    np.testing.assert_array_equal(np.asarray(decode(batch["images"][1])), np.asarray(decode(alone["images"][0])))


def test_random_seed_is_reported(live_server):
    info = json.loads(txt2img(live_server.url, seed=-1)["info"])
    assert 0 <= info["seed"] <= 2**32 - 1 and info["all_seeds"] == [info["seed"]]


def test_sampler_aliases_and_scheduler_field(live_server):
    info = json.loads(txt2img(live_server.url, sampler_name="DPM++ 2M", scheduler="Karras", seed=1)["info"])
    assert (info["sampler_name"], info["scheduler"]) == ("DPM++ 2M", "Karras")
    assert "Schedule type: Karras" in info["infotexts"][0]
    assert sampler_from_fields("k_euler_a", None) == "Euler a"
    assert sampler_from_fields("DPM++ 2M Karras", "Automatic") == "DPM++ 2M"  # Karras is its default
    assert sampler_from_fields("k_lms", "Karras") == "LMS Karras"
    assert sampler_from_fields("Euler a", "exponential") == "Euler a Exponential"
    info = json.loads(txt2img(live_server.url, sampler_name="LMS", seed=1, steps=2)["info"])
    assert (info["sampler_name"], info["scheduler"]) == ("LMS", "Uniform")  # needs scipy: declared


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"width": 65}, "width must be a positive multiple of 8, got 65"),
        ({"steps": 0}, "steps must be between 1 and 150, got 0"),
        ({"seed": -7}, "seed must be -1 (random)"),
        ({"sampler_name": "Euler z"}, "unknown sampler 'Euler z'"),
        ({"scheduler": "Polyexponential"}, "scheduler 'Polyexponential' is an A1111 schedule type we do not"),
        ({"scheduler": "Bogus"}, "scheduler 'Bogus' is unknown; choose one of: Automatic, Uniform, Karras"),
        ({"sampler_name": "DDIM", "scheduler": "Karras"}, "sampler 'DDIM' has no schedule choice"),
        ({"batch_size": 8, "n_iter": 3}, "batch_size * n_iter must be between 1 and 16"),
        ({"enable_hr": True, "hr_scale": 0.5}, "hr_scale must be between 1 and 8, got 0.5"),
        ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler must be one of Latent"),
        ({"enable_hr": True, "hr_prompt": "a dog"}, "hr_prompt is not supported by sd-app (got 'a dog')"),
        ({"enable_hr": True, "hr_sampler_name": "DDIM"}, "hr_sampler_name is not supported"),
        ({"restore_faces": True}, "not supported by sd-app: restore_faces=True"),
    ],
)
def test_bad_input_is_422_with_a_clear_detail(live_server, fields, message):
    response = httpx.post(f"{live_server.url}/sdapi/v1/txt2img", json={**BASE, **fields}, timeout=60)
    assert response.status_code == 422
    assert message in response.json()["detail"]


def test_wrong_types_are_422(live_server):
    response = httpx.post(f"{live_server.url}/sdapi/v1/txt2img", json={"steps": "many"}, timeout=60)
    assert response.status_code == 422
    assert any(error["loc"][-1] == "steps" for error in response.json()["detail"])


def test_samplers_models_options_progress(live_server):
    samplers = httpx.get(f"{live_server.url}/sdapi/v1/samplers").json()
    names = [s["name"] for s in samplers]
    assert {"Euler a", "DPM++ 2M", "DPM++ SDE", "Heun", "DDIM", "PLMS", "UniPC"} <= set(names)  # A1111 labels
    assert next(s for s in samplers if s["name"] == "DPM++ 2M")["options"] == {"scheduler": "karras"}
    schedulers = httpx.get(f"{live_server.url}/sdapi/v1/schedulers").json()
    assert [s["label"] for s in schedulers] == ["Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform"]
    assert schedulers[-1]["name"] == "sgm_uniform"  # A1111's name; LCM and TCD take it
    assert next(s for s in samplers if s["name"] == "LCM")["aliases"] == ["k_lcm"]
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    model, *library = httpx.get(f"{live_server.url}/sdapi/v1/sd-models").json()  # the selected one first
    assert {"title", "model_name", "hash", "sha256", "filename", "config"} <= set(model)
    assert [m["model_name"] for m in library] == ["shapes-tiny"]  # the shipped model is always listed
    assert model["model_name"] == "tiny-sd" and model["title"] == f"tiny-sd [{model['hash']}]"
    progress = httpx.get(f"{live_server.url}/sdapi/v1/progress").json()
    assert progress["progress"] == 0.0 and progress["state"]["sampling_steps"] == 0
    assert progress["current_image"] is None
    assert httpx.get(f"{live_server.url}/sdapi/v1/options").json()["sd_model_checkpoint"] == model["title"]


def test_progress_reports_the_running_job_with_a_preview():
    tracker = JobTracker()
    cancel = threading.Event()
    with tracker.job(10, cancel, "api") as job:
        tracker.step(job, StepInfo(step=4, total=10, timestep=500.0, latents=torch.zeros(2, 4, 8, 8)))
        payload = progress_payload(tracker, lambda latents: preview(latents, size=128))
        assert payload["progress"] == pytest.approx(0.4)
        assert payload["state"]["sampling_step"] == 4 and payload["state"]["sampling_steps"] == 10
        assert decode(payload["current_image"]).size == (256, 128)  # two 128 px previews side by side
        assert tracker.interrupt() and cancel.is_set()
    assert progress_payload(tracker, lambda latents: [])["state"]["job_count"] == 0


def test_too_many_waiting_is_busy():
    tracker = JobTracker(max_waiting=1)
    with tracker.job(5, threading.Event(), "api"):
        with pytest.raises(Busy, match="busy"), tracker.job(5, threading.Event(), "api"):
            pass


# ---- auth -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_client(serve_engine):
    from fastapi.testclient import TestClient

    from sd_app.server import create_app

    return TestClient(create_app(serve_engine, credentials={"alice": "s3cret"}), base_url="http://127.0.0.1")


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/"), ("GET", "/config"), ("GET", "/sdapi/v1/samplers"), ("POST", "/sdapi/v1/txt2img"),
     ("POST", "/sdapi/v1/interrupt"), ("POST", "/sdapi/v1/skip"), ("GET", "/sdapi/v1/cmd-flags")],
)
def test_auth_refuses_ui_and_api_without_credentials(auth_client, method, path):
    for auth in (None, ("alice", "wrong"), ("mallory", "s3cret")):
        response = auth_client.request(method, path, json=BASE if method == "POST" else None, auth=auth)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Basic")


def test_auth_lets_ui_and_api_in_with_credentials(auth_client):
    auth = ("alice", "s3cret")
    assert auth_client.get("/", auth=auth).status_code == 200
    assert auth_client.get("/sdapi/v1/samplers", auth=auth).status_code == 200
    response = auth_client.post("/sdapi/v1/txt2img", json={**BASE, "seed": 3}, auth=auth)
    assert response.status_code == 200 and len(response.json()["images"]) == 1
    assert auth_client.post("/sdapi/v1/skip", auth=auth).json() == {"skipped": False}
    assert auth_client.get("/sdapi/v1/cmd-flags", auth=auth).status_code == 200


def test_credentials_parsing(tmp_path):
    file = tmp_path / "users.txt"
    file.write_text("# users\nbob:pw1\ncarol:pa:ss,dave:x\n")
    assert parse_credentials(["alice:s3cret"], file) == {"alice": "s3cret", "bob": "pw1", "carol": "pa:ss", "dave": "x"}
    with pytest.raises(ValueError, match="user:password"):
        parse_credentials(["alice"])
    with pytest.raises(ValueError, match="cannot read"):
        parse_credentials(None, tmp_path / "missing.txt")
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_serve_refuses_public_host_without_auth(capsys):
    from sd_app.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "7861"]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve on 0.0.0.0 without auth" in err and "--insecure" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--model", "{missing}"], "model not found: {missing}"),
     (["--reranker", "{missing}"], "reranker folder not found: {missing}"),
     (["--clip-skip", "0"], "--clip-skip must be between 1 and 12, got 0"),
     (["--clip-skip", "6"], "--clip-skip must be between 1 and 4 (this model's text encoder has 4 layers), got 6")],
)
def test_serve_stops_at_its_start_on_a_missing_model_or_a_bad_default(tmp_path, option, message):
    import subprocess
    import sys

    missing = str(tmp_path / "missing.safetensors")
    done = subprocess.run(
        [sys.executable, "-m", "sd_app.cli", "serve", "--port", "7861", *[o.format(missing=missing) for o in option],
         "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
    )  # (were it to serve, the timeout ends the test)
    assert done.returncode == 2, done.stderr
    assert message.format(missing=missing) in done.stderr and "serving on" not in done.stderr
    assert "Traceback" not in done.stderr


def test_the_collector_resumes_with_the_loaded_objects_frozen():
    import gc

    from sd_app.lifetime import pause_gc, resume_gc

    frozen = gc.get_freeze_count()
    resume_gc()  # not paused: nothing to do
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    pause_gc()
    try:
        assert not gc.isenabled()
        loaded = [[index] for index in range(1000)]  # what a server makes while it loads
        resume_gc()
        assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(loaded)
    finally:
        gc.enable()
        gc.unfreeze()


# ---- img2img, inpaint, hires fix ------------------------------------------------------------------


def b64png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def drawing() -> Image.Image:
    from PIL import ImageDraw

    image = Image.new("RGB", (64, 64), (40, 80, 220))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(220, 40, 40))
    return image


def box_mask(size: int = 64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return mask


def img2img(url: str, **fields) -> dict:
    body = {**BASE, "init_images": [b64png(drawing())], "seed": 3, **fields}
    response = httpx.post(f"{url}/sdapi/v1/img2img", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_img2img_returns_images_with_a1111_infotext(live_server):
    body = img2img(live_server.url, denoising_strength=0.6, batch_size=2, steps=5)
    info = json.loads(body["info"])
    assert len(body["images"]) == 2 and info["denoising_strength"] == 0.6
    params = parse_parameters(decode(body["images"][0]).info["parameters"])
    assert params["Denoising strength"] == "0.6" and "Mask blur" not in params
    assert body["parameters"]["init_images"] is None  # not echoed back, as A1111
    assert info["is_using_inpainting_conditioning"] is False


def test_img2img_with_one_step_denoises_it(live_server):
    """steps 1 at strength 0.75: int(0.75) is 0, but one step runs (A1111 never runs none), so the picture is not
    the init image through the VAE that strength 0 returns."""
    one_step, unchanged = (np.asarray(decode(img2img(live_server.url, seed=12, steps=1, denoising_strength=strength,
                                                     rerank=False)["images"][0])).astype(int) for strength in (0.75, 0))
    assert np.abs(one_step - unchanged).max() > 2


def test_img2img_seed_alone_or_in_a_batch(live_server):
    batch = img2img(live_server.url, seed=60, batch_size=2, rerank=False)
    alone = img2img(live_server.url, seed=61)
    np.testing.assert_array_equal(np.asarray(decode(batch["images"][1])), np.asarray(decode(alone["images"][0])))


def test_inpaint_keeps_pixels_outside_the_mask_and_notes_a_resized_mask(live_server):
    body = img2img(
        live_server.url, mask=b64png(box_mask(32)), mask_blur=0, inpainting_fill=1, inpaint_full_res=False,
        denoising_strength=1.0, steps=3,
    )
    info = json.loads(body["info"])
    assert info["notes"] == ["mask 32x32 resized to the init image's 64x64"]
    from pipelines.generation.masks import fit_mask

    out = np.asarray(decode(body["images"][0]).convert("RGB")).astype(int)
    outside = np.asarray(fit_mask(box_mask(32), drawing())[0]) == 0  # the mask as resized (Lanczos, as A1111)
    assert outside.sum() > 2500
    assert np.abs(out - np.asarray(drawing()).astype(int))[outside].max() == 0
    params = parse_parameters(info["infotexts"][0])
    assert params["Mask blur"] == "0" and params["Masked content"] == "original" and "Inpaint area" not in params


def test_txt2img_hires_fix(live_server):
    body = txt2img(live_server.url, seed=9, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent (nearest)",
                   hr_second_pass_steps=2, denoising_strength=0.5)
    image = decode(body["images"][0])
    assert image.size == (96, 96)
    params = parse_parameters(image.info["parameters"])
    hires = (params["Hires upscale"], params["Hires steps"], params["Hires upscaler"])
    assert hires == ("1.5", "2", "Latent (nearest)")
    assert params["Denoising strength"] == "0.5" and params["Size"] == "64x64"
    resized = txt2img(live_server.url, seed=9, enable_hr=True, hr_resize_x=128, hr_resize_y=96, hr_upscaler="Lanczos")
    assert decode(resized["images"][0]).size == (128, 96)
    upscalers = httpx.get(f"{live_server.url}/sdapi/v1/upscalers").json()
    modes = httpx.get(f"{live_server.url}/sdapi/v1/latent-upscale-modes").json()
    assert "Lanczos" in [u["name"] for u in upscalers] and modes[0] == {"name": "Latent"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"init_images": ["!!notbase64!!"]}, "init_images[0] is not valid base64"),
        ({"init_images": [base64.b64encode(b"hello").decode()]}, "init_images[0] is not a readable image"),
        ({"init_images": []}, "init_images must hold exactly one base64 image, got 0"),
        ({"denoising_strength": 1.5}, "denoising_strength must be between 0 and 1, got 1.5"),
        ({"mask": "BLACK"}, "mask is all black: nothing to repaint"),
        ({"inpainting_fill": 7}, "inpainting_fill must be one of 0 fill, 1 original, 2 latent noise"),
        ({"resize_mode": 3}, "resize_mode must be one of 0 just resize, 1 crop and resize, 2 resize and fill"),
        ({"mask_blur_x": 9}, "mask_blur_x (9) and mask_blur_y (4) must be equal"),
        ({"mask_round": False}, "mask_round is not supported by sd-app (got 'False')"),
        ({"initial_noise_multiplier": 0.5}, "initial_noise_multiplier is not supported"),
    ],
)
def test_img2img_bad_input_is_422_naming_the_field(live_server, fields, message):
    if fields.get("mask") == "BLACK":
        fields = {"mask": b64png(Image.new("L", (64, 64), 0))}
    body = {**BASE, "init_images": [b64png(drawing())], **fields}
    response = httpx.post(f"{live_server.url}/sdapi/v1/img2img", json=body, timeout=60)
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


def test_img2img_mask_blur_as_a1111_reads_it(live_server):
    """mask_blur, when sent, sets both directions (A1111's property); otherwise mask_blur_x and _y, 4 each."""
    for fields, blur in (({"mask_blur": 8, "mask_blur_x": 4, "mask_blur_y": 4}, "8"), ({"mask_blur_x": 2,
                         "mask_blur_y": 2}, "2"), ({}, "4"), ({"mask_round": True}, "4")):
        body = {**BASE, "init_images": [b64png(drawing())], "mask": b64png(box_mask()), "seed": 3, **fields}
        response = httpx.post(f"{live_server.url}/sdapi/v1/img2img", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert parse_parameters(json.loads(response.json()["info"])["infotexts"][0])["Mask blur"] == blur


def test_webuiapi_client_img2img_and_hires_txt2img(live_server):
    """The webuiapi package from PyPI (what many scripts use) against our server."""
    webuiapi = pytest.importorskip("webuiapi")

    api = webuiapi.WebUIApi(baseurl=f"{live_server.url}/sdapi/v1", sampler="Euler a", steps=3)
    result = api.img2img(images=[drawing()], mask_image=box_mask(), prompt="a green circle", seed=5, width=64,
                         height=64, denoising_strength=0.8, inpaint_full_res=False, cfg_scale=7)
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    assert result.info["all_seeds"] == [5] and "Denoising strength: 0.8" in result.info["infotexts"][0]
    out = np.asarray(result.images[0].convert("RGB")).astype(int)
    from pipelines.generation.masks import processed_mask

    blurred_outside = np.asarray(processed_mask(box_mask(), invert=False, blur=4)) == 0  # webuiapi's mask_blur 4
    assert np.abs(out - np.asarray(drawing()).astype(int))[blurred_outside].max() == 0
    hires = api.txt2img(prompt="a red circle", seed=6, width=64, height=64, enable_hr=True, hr_scale=2,
                        hr_upscaler=webuiapi.HiResUpscaler.Latent, denoising_strength=0.6)
    assert hires.images[0].size == (128, 128) and "Hires upscaler: Latent" in hires.info["infotexts"][0]


def test_png_info_reads_back_what_txt2img_wrote_as_a1111_parses_it(live_server):
    body = txt2img(live_server.url, seed=5, negative_prompt="blurry, dark", rerank=False)
    infotext = json.loads(body["info"])["infotexts"][0]
    url = f"{live_server.url}/sdapi/v1/png-info"
    for sent in (body["images"][0], "data:image/png;base64," + body["images"][0]):
        answer = httpx.post(url, json={"image": sent}, timeout=60)
        assert answer.status_code == 200, answer.text
        info = answer.json()
        assert info["info"] == infotext and info["items"] == {}
        parameters = info["parameters"]
        assert parameters["Prompt"] == "a red circle" and parameters["Negative prompt"] == "blurry, dark"
        assert (parameters["Size-1"], parameters["Size-2"], parameters["Seed"]) == ("64", "64", "5")
        assert "Size" not in parameters and parameters["Sampler"] == "Euler a"
    plain = io.BytesIO()
    text = PngInfo()
    text.add_text("Software", "paint")
    Image.new("RGB", (8, 8)).save(plain, format="PNG", pnginfo=text)
    info = httpx.post(url, json={"image": base64.b64encode(plain.getvalue()).decode()}, timeout=60).json()
    assert info == {"info": "", "items": {"Software": "paint"}, "parameters": {}}
    for bad in ("not base64 at all!", base64.b64encode(b"not an image").decode()):
        answer = httpx.post(url, json={"image": bad}, timeout=60)
        assert answer.status_code == 422 and "image is not" in answer.json()["detail"]


def test_a1111_listings_of_features_sd_app_lacks_answer_empty_and_memory_is_reported(live_server):
    url = f"{live_server.url}/sdapi/v1"
    for route, empty in (("prompt-styles", []), ("face-restorers", []), ("hypernetworks", []), ("script-info", []),
                         ("scripts", {"txt2img": [], "img2img": []})):
        response = httpx.get(f"{url}/{route}", timeout=30)
        assert response.status_code == 200 and response.json() == empty, route
    memory = httpx.get(f"{url}/memory", timeout=30).json()
    assert 0 < memory["ram"]["free"] <= memory["ram"]["total"]
    assert memory["ram"]["used"] == memory["ram"]["total"] - memory["ram"]["free"]
    assert memory["cuda"] == {"error": "no CUDA device"} or memory["cuda"]["system"]["total"] > 0


def test_a_hires_sampler_named_another_way_is_the_same_sampler(live_server):
    """hr_sampler_name is compared as a sampler, not as text: an alias, or a first pass named by sampler_index."""
    hires = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5, "seed": 6}
    for fields in ({"hr_sampler_name": "k_euler_a"}, {"sampler_name": None, "sampler_index": "Euler a",
                                                      "hr_sampler_name": "Euler a"}):
        response = httpx.post(f"{live_server.url}/sdapi/v1/txt2img", json={**BASE, **hires, **fields}, timeout=120)
        assert response.status_code == 200, (fields, response.text)
    response = httpx.post(f"{live_server.url}/sdapi/v1/txt2img", json={**BASE, **hires, "hr_sampler_name": "Euler"},
                          timeout=60)
    assert response.status_code == 422 and "hr_sampler_name is not supported" in response.json()["detail"]


# ---- interrupt, skip, cmd-flags -------------------------------------------------------------------


def stopped_request(server, route: str, at_step: int | None, **fields) -> tuple[dict, dict, list[dict]]:
    """txt2img with ``POST /sdapi/v1/{route}`` sent once ``at_step`` is done (None: as the job registers):
    the body, its info and what the route answered."""
    url, tracker = server
    answers: list[dict] = []

    def send() -> None:
        answers.append(httpx.post(f"{url}/sdapi/v1/{route}", timeout=30).json())

    if at_step is None:
        tracker.on_start = send
    else:
        tracker.on_step = lambda step: send() if step == at_step else None
    try:
        body = txt2img(url, **fields)
    finally:
        tracker.on_start = tracker.on_step = None
    return body, json.loads(body["info"]), answers


def test_interrupt_answers_200_with_the_finished_images_ranked_then_the_stopped_ones(stepped_server):
    whole = txt2img(stepped_server[0], seed=70, batch_size=6)
    by_seed = {seed: image for seed, image in zip(json.loads(whole["info"])["all_seeds"], whole["images"])}
    # 6 images run as batches of 4 and 2 (steps 1-2 and 3-4): interrupted after the second batch's first step
    body, info, answers = stopped_request(stepped_server, "interrupt", 3, seed=70, batch_size=6)
    assert answers == [{"interrupted": True}]
    assert info["interrupted"] is True and len(body["images"]) == 6
    assert info["stopped_at_step"] == [None] * 4 + [1, 1]
    assert sorted(info["all_seeds"][:4]) == [70, 71, 72, 73] and info["all_seeds"][4:] == [74, 75]
    scores = info["clip_scores"]
    assert scores[:4] == sorted(scores[:4], reverse=True) and scores[4:] == [None, None]
    for seed, image in zip(info["all_seeds"][:4], body["images"][:4]):  # the finished ones, as uninterrupted
        np.testing.assert_array_equal(np.asarray(decode(image)), np.asarray(decode(by_seed[seed])))
    for image, infotext in zip(body["images"], info["infotexts"]):
        assert decode(image).info["parameters"] == infotext
    assert all("Stopped at step" not in text for text in info["infotexts"][:4])
    assert [parse_parameters(text)["Stopped at step"] for text in info["infotexts"][4:]] == ["1 of 2"] * 2


def test_an_interrupted_single_image_is_its_picture_at_the_step_reached(stepped_server):
    """As A1111, which decodes the interrupted image's latest denoised latents."""
    body, info, _ = stopped_request(stepped_server, "interrupt", 1, seed=71)
    finished = txt2img(stepped_server[0], seed=71)["images"][0]
    assert info["interrupted"] is True and info["stopped_at_step"] == [1] and len(body["images"]) == 1
    assert decode(body["images"][0]).size == (64, 64)
    assert not np.array_equal(np.asarray(decode(body["images"][0])), np.asarray(decode(finished)))


def test_interrupted_before_its_first_step_a_request_answers_200_without_images(stepped_server):
    body, info, answers = stopped_request(stepped_server, "interrupt", None, seed=72, batch_size=2)
    assert answers == [{"interrupted": True}]
    assert body["images"] == [] and info["interrupted"] is True and info["all_seeds"] == []


def test_skip_stops_the_batch_being_denoised_and_the_request_goes_on(stepped_server):
    """As A1111: a skip stops one of the n_iter batches of batch_size images (here 2 of the 4 sd-app denoises
    together); the request goes on with the others."""
    body, info, answers = stopped_request(stepped_server, "skip", 1, seed=80, batch_size=2, n_iter=3, rerank=False)
    assert answers == [{"skipped": True}]
    assert info["interrupted"] is False and len(body["images"]) == 6
    assert info["all_seeds"] == [82, 83, 84, 85, 80, 81]  # the finished batches first, then the skipped one
    assert info["stopped_at_step"] == [None, None, None, None, 1, 1]
    assert [parse_parameters(text).get("Stopped at step") for text in info["infotexts"]] == [None] * 4 + ["1 of 2"] * 2
    alone = txt2img(stepped_server[0], seed=84, batch_size=2, rerank=False)["images"][0]  # as the same pair
    np.testing.assert_array_equal(np.asarray(decode(body["images"][2])), np.asarray(decode(alone)))


def test_a_skip_stops_all_of_a_batch_larger_than_sd_apps_parts(stepped_server):
    """batch_size 6 is denoised as parts of 4 and 2; a skip stops all six at the step reached, as in A1111."""
    body, info, _ = stopped_request(stepped_server, "skip", 1, seed=86, batch_size=6, rerank=False)
    assert info["interrupted"] is False and info["all_seeds"] == list(range(86, 92))
    assert info["stopped_at_step"] == [1] * 6 and len(body["images"]) == 6


def test_interrupt_and_skip_without_a_job_answer_200(live_server):
    assert httpx.post(f"{live_server.url}/sdapi/v1/interrupt").json() == {"interrupted": False}
    response = httpx.post(f"{live_server.url}/sdapi/v1/skip")
    assert response.status_code == 200 and response.json() == {"skipped": False}


def test_interrupt_and_skip_reach_a_jobs_interruption_and_cancel_a_job_without_one():
    """A UI job has an interruption too (tests/test_ui_interrupt.py); one registered without is cancelled."""
    from pipelines.generation.denoising import Interruption

    tracker = JobTracker()
    cancel, interruption = threading.Event(), Interruption()
    with tracker.job(4, cancel, "api", interruption=interruption) as job:
        tracker.step(job, StepInfo(step=1, total=4, timestep=1.0, latents=torch.zeros(1, 4, 8, 8)))
        assert tracker.skip() and interruption.skipped and not cancel.is_set()
        assert progress_payload(tracker, lambda latents: [], True)["state"]["skipped"] is True
        assert tracker.interrupt() and interruption.interrupted and not cancel.is_set()
        assert progress_payload(tracker, lambda latents: [], True)["state"]["interrupted"] is True
    cancel_only = threading.Event()
    with tracker.job(4, cancel_only, "api"):  # no interruption to keep what it made: cancelled
        assert tracker.skip() and cancel_only.is_set()


def serve_flags(*options: str):
    from sd_app.cli import build_parser

    return build_parser().parse_args(["serve", *options])


def test_cmd_flags_are_the_serve_options_with_the_credentials_masked(serve_engine, tmp_path):
    from fastapi.testclient import TestClient

    from sd_app.server import create_app

    users = tmp_path / "users.txt"
    users.write_text("bob:hunter2\n")
    flags = serve_flags("--port", "7999", "--auth", "alice:s3cret", "--auth-file", str(users), "--allowed-host",
                        "sd.example", "--out", str(tmp_path / "out"))
    client = TestClient(create_app(serve_engine, credentials={"alice": "s3cret"}, flags=flags),
                        base_url="http://127.0.0.1")
    assert client.get("/sdapi/v1/cmd-flags").status_code == 401
    response = client.get("/sdapi/v1/cmd-flags", auth=("alice", "s3cret"))
    assert response.status_code == 200
    shown = response.json()
    assert "s3cret" not in response.text and "alice" not in response.text and str(users) not in response.text
    assert shown["auth"] == shown["auth_file"] == "********"
    assert shown["port"] == 7999 and shown["host"] == "127.0.0.1" and shown["allowed_host"] == ["sd.example"]
    assert shown["out"] == str(tmp_path / "out") and shown["max_prompt_tokens"] == flags.max_prompt_tokens
    assert shown["insecure"] is False and shown["command"] == "serve"
    unset = create_app(serve_engine, flags=serve_flags())
    assert TestClient(unset, base_url="http://127.0.0.1").get("/sdapi/v1/cmd-flags").json()["auth"] is None
