"""The server as a hostile page or client would try it: foreign Host names (DNS rebinding), cross-site
requests, CORS, file paths into Gradio handlers, oversized and unbounded requests, unknown fields,
disconnects, per-client caps, progress that must not go backwards. Against live servers on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch

from pipelines.generation.request import GenerationRequest
from pipelines.generation.text_to_image import StepInfo
from sd_app.security import AccessPolicy, host_name
from sd_app.ui_jobs import Busy, JobTracker
from tests.serve_fixtures import start_server

pytest_plugins = ["tests.serve_fixtures"]

BASE = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler a"}


def _stop(server: object, thread: threading.Thread) -> None:
    server.should_exit = server.force_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module", params=["no auth", "auth"])
def guarded(request, serve_engine):
    """A server as ``sd-app serve --allowed-host sd.example --cors-origin http://app.example:3000`` makes
    it, once without and once with auth: the rules must be the same."""
    from dataclasses import replace

    from sd_app.limits import RequestLimits
    from sd_app.server import create_app

    credentials = {"alice": "s3cret"} if request.param == "auth" else None
    policy = AccessPolicy.build("127.0.0.1", ["sd.example"], ["http://app.example:3000"])
    limits = RequestLimits(max_prompt_tokens=100, max_image_pixels=128 * 128, max_pixel_steps=64 * 64 * 8)
    engine = replace(serve_engine, limits=limits)  # the same tiny models, this server's limits
    app = create_app(engine, credentials=credentials, policy=policy, max_body_bytes=200_000)
    url, server, thread = start_server(app)
    auth = ("alice", "s3cret") if credentials else None
    yield url, auth, engine
    _stop(server, thread)


def test_host_names(guarded):
    url, auth, _ = guarded
    port = url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "sd.example", f"SD.example:{port}"):
        assert httpx.get(f"{url}/sdapi/v1/samplers", headers={"Host": host}, auth=auth).status_code == 200, host
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "sd.example.evil"):
        for method, path in (("GET", "/sdapi/v1/samplers"), ("GET", "/config"), ("POST", "/sdapi/v1/interrupt"),
                             ("POST", "/sdapi/v1/skip"), ("GET", "/sdapi/v1/cmd-flags")):
            response = httpx.request(method, f"{url}{path}", headers={"Host": host}, auth=auth)
            assert response.status_code == 403, (host, path)
            assert "not served here" in response.json()["detail"]
            assert "access-control-allow-origin" not in response.headers


def test_downloads_of_outputs_need_our_host(guarded):
    url, auth, engine = guarded
    body = httpx.post(f"{url}/sdapi/v1/txt2img", json={**BASE, "seed": 3, "save_images": True}, auth=auth,
                      timeout=120).json()
    assert len(body["images"]) == 1
    saved = sorted(engine.output_dir.glob("*.png"))[-1]
    path = f"/gradio_api/file={saved}"
    assert httpx.get(f"{url}{path}", auth=auth).status_code == 200
    assert httpx.get(f"{url}{path}", headers={"Host": "evil.example"}, auth=auth).status_code == 403


def test_cross_site_writes_are_refused(guarded):
    url, auth, _ = guarded
    for origin in ("http://evil.example", "null", "http://127.0.0.1:1"):
        # A form-like POST needs no CORS preflight, so the server itself must refuse it.
        response = httpx.post(f"{url}/sdapi/v1/interrupt", content="x", auth=auth,
                              headers={"Origin": origin, "Content-Type": "text/plain"})
        assert response.status_code == 403 and "cross-site" in response.json()["detail"], origin
        response = httpx.post(f"{url}/sdapi/v1/txt2img", json=BASE, auth=auth, headers={"Origin": origin})
        assert response.status_code == 403, origin
        response = httpx.post(f"{url}/sdapi/v1/skip", content="x", auth=auth,
                              headers={"Origin": origin, "Content-Type": "text/plain"})
        assert response.status_code == 403 and "cross-site" in response.json()["detail"], origin
    # Our own pages (same origin) may post.
    for path in ("/sdapi/v1/interrupt", "/sdapi/v1/skip"):
        response = httpx.post(f"{url}{path}", auth=auth, headers={"Origin": url})
        assert response.status_code == 200, path
    if auth is not None:  # the new A1111 routes need the password like the others
        for method, path in (("POST", "/sdapi/v1/skip"), ("GET", "/sdapi/v1/cmd-flags")):
            assert httpx.request(method, f"{url}{path}", headers={"Origin": url}).status_code == 401, path
            assert httpx.request(method, f"{url}{path}", auth=auth).status_code == 200, path


def test_cors_headers_only_for_the_opted_in_origin(guarded):
    url, auth, _ = guarded
    for path in ("/config", "/sdapi/v1/samplers"):
        response = httpx.get(f"{url}{path}", auth=auth, headers={"Origin": "http://evil.example"})
        assert response.status_code == 200  # reading is harmless: the browser hides it without CORS headers
        assert "access-control-allow-origin" not in response.headers
        assert "access-control-allow-credentials" not in response.headers
    friend = "http://app.example:3000"
    response = httpx.get(f"{url}/sdapi/v1/samplers", auth=auth, headers={"Origin": friend})
    assert response.headers["access-control-allow-origin"] == friend
    preflight = httpx.options(f"{url}/sdapi/v1/txt2img", headers={
        "Origin": friend, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 204 and preflight.headers["access-control-allow-origin"] == friend
    response = httpx.post(f"{url}/sdapi/v1/interrupt", auth=auth, headers={"Origin": friend})
    assert response.status_code == 200


def test_body_size_and_request_limits(guarded):
    url, auth, _ = guarded
    response = httpx.post(f"{url}/sdapi/v1/txt2img", auth=auth, timeout=60,
                          json={**BASE, "prompt": "a " * 150_000})
    assert response.status_code == 413 and "limit of 200000 bytes" in response.json()["detail"]
    # the same without a Content-Length (chunked): counted before the app reads any of it
    json_type = {"Content-Type": "application/json"}
    response = httpx.post(f"{url}/sdapi/v1/txt2img", auth=auth, timeout=60, headers=json_type,
                          content=(b" " * 50_000 for _ in range(5)))
    assert response.status_code == 413 and "limit of 200000 bytes" in response.json()["detail"]
    if auth is not None:  # no password: refused before any of the body is read (not read whole, then 413)
        response = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=60, headers=json_type,
                              content=(b" " * 50_000 for _ in range(5)))
        assert response.status_code == 401
    whole = json.dumps({**BASE, "seed": 4}).encode()
    response = httpx.post(f"{url}/sdapi/v1/txt2img", auth=auth, timeout=120, headers=json_type,
                          content=iter([whole[:10], whole[10:]]))  # a chunked body within the limit arrives whole
    assert response.status_code == 200, response.text
    cases = [
        ({"prompt": "red " * 150}, "prompt is 150 CLIP tokens; this server accepts up to 100"),
        ({"negative_prompt": "blue " * 150}, "negative_prompt is 150 CLIP tokens"),
        ({"width": 256, "height": 256}, "256x256 is 65536 pixels per image; this server accepts up to 16384"),
        ({"steps": 3, "batch_size": 3}, "width x height x steps x images = 64x64x3x3 = 36864 exceeds"),
        # the hires fix's second pass counts: its size, and its steps as work
        ({"enable_hr": True, "hr_scale": 2.5}, "hires fix 160x160 is 25600 pixels per image; this server accepts "
                                               "up to 16384 (e.g. 128x128)"),
        ({"enable_hr": True, "hr_resize_x": 2048, "hr_resize_y": 2048}, "hires fix 2048x2048 is 4194304 pixels"),
        ({"enable_hr": True, "hr_scale": 2}, "(width x height x steps + the hires pass's) x images = "
                                             "(64x64x2 + 128x128x2)x1 = 40960 exceeds"),
    ]
    for fields, message in cases:
        response = httpx.post(f"{url}/sdapi/v1/txt2img", json={**BASE, **fields}, auth=auth, timeout=60)
        assert response.status_code == 422 and message in response.json()["detail"], response.text


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"eta": 0.5}, "eta=0.5 is not supported for Euler a"),
        ({"override_settings": {"sd_hypernetwork": "x"}},
         "override_settings: not supported by sd-app: sd_hypernetwork"),
        ({"tiling": True, "restore_faces": True}, "restore_faces=True, tiling=True"),
        ({"s_churn": 0.3, "tiling": True}, "s_churn=0.3, tiling=True"),
        ({"colour": "x" * 100_000}, "unknown field(s): colour"),
        # A1111 honours these; sd-app does not, so they are refused rather than ignored
        ({"disable_extra_networks": True}, "disable_extra_networks=True"),
        ({"infotext": "a cat\nSteps: 2, Sampler: Euler, CFG scale: 3"}, "infotext="),
        ({"firstpass_image": "iVBORw0KGgo="}, "firstpass_image="),
    ],
)
def test_fields_that_would_change_the_picture_are_refused_by_name(live_server, fields, message):
    response = httpx.post(f"{live_server.url}/sdapi/v1/txt2img", json={**BASE, **fields}, timeout=60)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert message in detail and len(detail) < 400  # named, never echoed back whole


def test_a_refused_value_is_echoed_back_only_when_short(live_server):
    url = f"{live_server.url}/sdapi/v1/img2img"
    response = httpx.post(url, json={**BASE, "init_images": "x" * 1_000_000}, timeout=60)  # not a list
    assert response.status_code == 422 and len(response.content) < 2_000
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body", "init_images"] and "list" in detail["msg"] and "input" not in detail
    response = httpx.post(url, json={**BASE, "init_images": "x"}, timeout=60)
    assert response.json()["detail"][0]["input"] == "x"  # short: shown, as FastAPI does
    # what cannot be echoed as JSON is left out, never a 500: a form body (bytes), NaN, a lone surrogate
    for content, kind in ((b'{"prompt": "x"}', "application/x-www-form-urlencoded"),
                          (b'{"prompt": "x", "steps": NaN}', "application/json"),
                          (b'{"prompt": "x", "steps": "\\ud800"}', "application/json")):
        response = httpx.post(f"{live_server.url}/sdapi/v1/txt2img", content=content, timeout=60,
                              headers={"Content-Type": kind})
        assert response.status_code == 422, (content, response.text)


def test_a1111_defaults_of_unimplemented_fields_are_accepted(live_server):
    defaults = {  # what A1111 clients (e.g. the webuiapi package) send by default
        "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {},
        "override_settings_restore_afterwards": True, "script_args": [], "script_name": None, "alwayson_scripts": {},
        "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.7, "restore_faces": False,
        "tiling": False, "subseed": -1, "subseed_strength": 0.0, "styles": [], "do_not_save_samples": False,
        "seed_resize_from_h": -1, "seed_resize_from_w": -1, "disable_extra_networks": False, "infotext": None,
        "firstpass_image": None, "token_merging_ratio": 0, "token_merging_ratio_hr": 0,
        "hr_checkpoint_name": "Use same checkpoint", "hr_sampler_name": "Use same sampler",
        "hr_scheduler": "Use same scheduler",
    }
    response = httpx.post(f"{live_server.url}/sdapi/v1/txt2img", json={**BASE, **defaults, "seed": 2}, timeout=120)
    assert response.status_code == 200, response.text


def test_lms_samplers_answer_images_not_500(live_server):
    for sampler in ("LMS", "LMS Karras"):
        response = httpx.post(f"{live_server.url}/sdapi/v1/txt2img", json={**BASE, "sampler_name": sampler}, timeout=60)
        assert response.status_code == 200, response.text


def test_errors_are_json_with_detail(live_server):
    bad_json = httpx.post(f"{live_server.url}/sdapi/v1/txt2img", content=b"{not json",
                          headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 422 and "detail" in bad_json.json()
    wrong_type = httpx.post(f"{live_server.url}/sdapi/v1/txt2img", json={**BASE, "steps": "many"})
    assert wrong_type.status_code == 422 and "detail" in wrong_type.json()


def test_png_info_reads_only_uploaded_files(live_server, tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    secret = tmp_path / "secret.png"
    info = PngInfo()
    info.add_text("parameters", "the secret\nSteps: 1, Sampler: Euler, Seed: 1")
    Image.new("RGB", (8, 8)).save(secret, pnginfo=info)
    call = httpx.post(f"{live_server.url}/gradio_api/call/png_info",
                      json={"data": [{"path": str(secret), "meta": {"_type": "gradio.FileData"}}]})
    assert call.status_code == 200
    event_id = call.json()["event_id"]
    stream = httpx.get(f"{live_server.url}/gradio_api/call/png_info/{event_id}", timeout=60).text
    assert "the secret" not in stream and "error" in stream


def test_a_client_that_disconnects_cancels_its_job(live_server):
    request = {**BASE, "steps": 150, "batch_size": 16, "width": 256, "height": 256}  # 2400 steps of work
    outcome: list[BaseException] = []

    def client() -> None:
        try:
            httpx.post(f"{live_server.url}/sdapi/v1/txt2img", json=request, timeout=6.0)
        except httpx.ReadTimeout as error:  # the client gives up and closes the connection
            outcome.append(error)

    def progress() -> dict:
        return httpx.get(f"{live_server.url}/sdapi/v1/progress").json()

    thread = threading.Thread(target=client)
    thread.start()
    deadline = time.monotonic() + 6.0
    while progress()["state"]["job_count"] != 1:  # registered: waiting or running
        assert time.monotonic() < deadline, "the request never became a job"
        time.sleep(0.1)
    thread.join()
    assert len(outcome) == 1
    gone_at, done = time.monotonic() + 5, 0.0
    while (state := progress())["state"]["job_count"] != 0:
        done = state["progress"]
        assert time.monotonic() < gone_at, "the abandoned job kept running"
        time.sleep(0.1)
    assert done < 0.9  # it stopped early, it did not finish


def test_per_client_cap_on_waiting_jobs():
    tracker = JobTracker(max_waiting=10, max_waiting_per_client=2)
    with tracker.job(5, threading.Event(), "api", client="10.0.0.1"), \
            tracker.job(5, threading.Event(), "api", client="10.0.0.1"):
        with pytest.raises(Busy, match="2 of your requests"), tracker.job(5, threading.Event(), "api", "10.0.0.1"):
            pass
        with tracker.job(5, threading.Event(), "api", client="10.0.0.2"):  # others still get in
            pass


def test_progress_never_goes_backwards_across_batches(serve_engine):
    """A request of 6 images runs in parts of 4 and 2; the reported steps count over the whole request."""
    tracker = JobTracker()
    seen: list[tuple[int, int]] = []
    cancel = threading.Event()
    request = GenerationRequest(prompt="a red circle", steps=3, width=64, height=64, n=6, seed=1)
    with tracker.job(request.steps, cancel, "api") as job:

        def on_step(info: StepInfo) -> None:
            tracker.step(job, info)
            seen.append((job.step, job.total_steps))

        serve_engine.generate(request, rerank=False, save=False, on_step=on_step, cancel=cancel)
    assert seen == [(step, 6) for step in range(1, 7)]
    assert job.eta(job.started + 10.0) >= 0


def test_eta_counts_the_steps_left_of_the_whole_request():
    tracker = JobTracker()
    with tracker.job(10, threading.Event(), "api") as job:
        tracker.step(job, StepInfo(step=2, total=8, timestep=1.0, latents=torch.zeros(1, 4, 2, 2)))
        assert job.eta(job.started + 4.0) == pytest.approx(2.0 * 6)  # 2 s per step so far, 6 steps left


def test_host_name_parsing():
    assert host_name("LocalHost:7860") == "localhost" and host_name("[::1]:7860") == "::1"
    assert host_name("sd.example.") == "sd.example" and host_name("::1") == "::1"
    policy = AccessPolicy.build("0.0.0.0", ["sd.example"])
    assert "0.0.0.0" not in policy.allowed_hosts and policy.host_allowed("sd.example:80")
    with pytest.raises(ValueError, match="--cors-origin"):
        AccessPolicy.build("127.0.0.1", cors_origins=["evil.example"])
    assert json.loads(json.dumps(sorted(policy.allowed_hosts)))


def test_inspect_and_rerank_views_keep_the_prompt_limits(guarded, tmp_path):
    """Inspect's counterfactual captions and token table grow with the prompt: bounded as generation is."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    from PIL import Image

    url, auth, _ = guarded
    import base64

    # gradio_client's own auth= is Gradio's login form; this server asks for HTTP Basic
    basic = "Basic " + base64.b64encode(":".join(auth).encode()).decode() if auth else None
    client = Client(url, verbose=False, analytics_enabled=False, headers={"Authorization": basic} if basic else None)
    with pytest.raises(AppError, match="prompt is 150 CLIP tokens; this server accepts up to 100"):
        client.predict("red " * 150, "", 7, 64, 64, 2, "", api_name="/inspect")
    with pytest.raises(AppError, match="at most 64 texts, one per line; got 65"):  # each encoded and scored
        client.predict("red", "", 7, 64, 64, 2, "a\n" * 65, api_name="/inspect")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(AppError, match="prompt is 24000 characters long; this server accepts up to 20000"):
        client.predict([handle_file(str(tmp_path / "a.png"))], "", "red " * 6000, ["clip"], "", api_name="/rerank")


def test_an_over_limit_request_is_refused_before_it_queues(guarded):
    """The size and work limits need no model: a request over them gets its 422 at once, not after the job
    running before it (it used to wait in the queue first)."""
    url, auth, engine = guarded
    started = threading.Event()
    release = threading.Event()
    original = engine.generate

    def slow_generate(*args, **kwargs):
        started.set()
        release.wait(timeout=60)
        return original(*args, **kwargs)

    engine.generate = slow_generate  # the running job holds the model until released
    try:
        first = threading.Thread(target=lambda: httpx.post(f"{url}/sdapi/v1/txt2img", json={**BASE, "seed": 8},
                                                           auth=auth, timeout=120))
        first.start()
        assert started.wait(timeout=60)
        response = httpx.post(f"{url}/sdapi/v1/txt2img", json={**BASE, "width": 256, "height": 256}, auth=auth,
                              timeout=10)  # would time out waiting behind the first
        assert response.status_code == 422 and "this server accepts up to 16384" in response.json()["detail"]
    finally:
        release.set()
        engine.generate = original
        first.join(timeout=120)
