"""Switching checkpoint, VAE and clip skip at run time: POST /sdapi/v1/options on a live server,
override_settings per request, the model routes, bounded memory and waiting for the running job."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from pipelines.models.random_model import write_random_model
from sd_app.metadata import parse_parameters
from tests import lora_fixtures as fx
from tests.serve_fixtures import start_server

BASE = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 1,
        "rerank": False}


@pytest.fixture(scope="module")
def models_root(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("webui")
    checkpoints = root / "models" / "Stable-diffusion"
    write_random_model(tiny_config, checkpoints / "tiny-a", seed=1)
    write_random_model(tiny_config, checkpoints / "tiny-b", seed=2)
    vae = checkpoints / "tiny-a" / "vae" / "diffusion_pytorch_model.safetensors"
    (root / "models" / "VAE").mkdir(parents=True)
    shutil.copy(vae, root / "models" / "VAE" / "soft.safetensors")
    (root / "models" / "Lora").mkdir(parents=True)
    (root / "models" / "Lora" / "old.pt").write_bytes(b"pickle")
    (root / "embeddings").mkdir()
    save_file({"emb_params": torch.zeros(2, 32)}, str(root / "embeddings" / "fits.safetensors"))
    save_file({"emb_params": torch.zeros(1, 768)}, str(root / "embeddings" / "wide.safetensors"))
    return root


@pytest.fixture(scope="module")
def server(models_root, tmp_path_factory):
    from sd_app.engine import Engine
    from sd_app.server import create_app

    engine = Engine(model="tiny-a", reranker=None, output_dir=tmp_path_factory.mktemp("out"), device="cpu",
                    models_dirs=[models_root])
    engine.pipeline()
    pipe = engine.pipeline()
    fx.kohya_lora(pipe.components, models_root / "models" / "Lora" / "ink.safetensors")
    url, uvicorn_server, thread = start_server(create_app(engine))
    yield url, engine
    uvicorn_server.should_exit = uvicorn_server.force_exit = True
    thread.join(timeout=10)


def txt2img(url, **fields):
    response = httpx.post(f"{url}/sdapi/v1/txt2img", json={**BASE, **fields}, timeout=300)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    return info, parse_parameters(info["infotexts"][0])


def options(url, **values):
    return httpx.post(f"{url}/sdapi/v1/options", json=values, timeout=300)


def hashes(url):
    return {m["model_name"]: m["hash"] for m in httpx.get(f"{url}/sdapi/v1/sd-models", timeout=60).json()}


def test_listings_in_a1111_shapes(server):
    url, _ = server
    models = httpx.get(f"{url}/sdapi/v1/sd-models", timeout=60).json()
    assert [m["model_name"] for m in models] == ["shapes-tiny", "tiny-a", "tiny-b"]
    tiny_a = next(m for m in models if m["model_name"] == "tiny-a")
    assert tiny_a["title"] == f"tiny-a [{tiny_a['hash']}]" and len(tiny_a["sha256"]) == 64
    assert [v["model_name"] for v in httpx.get(f"{url}/sdapi/v1/sd-vae").json()] == ["soft.safetensors"]
    loras = {row["name"]: row for row in httpx.get(f"{url}/sdapi/v1/loras").json()}
    assert loras["ink"]["metadata"]["ss_network_dim"] == "4" and loras["ink"]["base_model"] == "SD 1.x"
    assert "pickle" in loras["old"]["refused"] and loras["old"]["hash"] is None
    embeddings = httpx.get(f"{url}/sdapi/v1/embeddings").json()
    assert embeddings["loaded"]["fits"]["vectors"] == 2 and embeddings["loaded"]["fits"]["shape"] == 32
    assert list(embeddings["skipped"]) == ["wide"]  # 768 wide: not for this 32-wide text encoder


def test_switch_by_options_and_back(server):
    url, engine = server
    known = hashes(url)
    assert httpx.get(f"{url}/sdapi/v1/options").json()["sd_model_checkpoint"] == f"tiny-a [{known['tiny-a']}]"
    assert txt2img(url)[1]["Model hash"] == known["tiny-a"]
    response = options(url, sd_model_checkpoint=f"tiny-b [{known['tiny-b']}]")
    assert response.status_code == 200, response.text
    assert httpx.get(f"{url}/sdapi/v1/options").json()["sd_model_checkpoint"] == f"tiny-b [{known['tiny-b']}]"
    assert txt2img(url)[1]["Model hash"] == known["tiny-b"]
    assert len(engine.loaded()) == 1  # the old model was freed
    assert options(url, sd_model_checkpoint="tiny-a").status_code == 200  # by name
    assert txt2img(url)[1]["Model hash"] == known["tiny-a"]


def test_bad_options_are_refused_by_name_and_change_nothing(server):
    url, _ = server
    before = httpx.get(f"{url}/sdapi/v1/options").json()
    response = options(url, sd_model_checkpoint="nope.safetensors")
    assert response.status_code == 422 and "no checkpoint named 'nope.safetensors'" in response.json()["detail"]
    response = options(url, sd_model_checkpoint="tiny-b", show_progressbar=True)
    assert response.status_code == 422 and "show_progressbar" in response.json()["detail"]
    response = options(url, CLIP_stop_at_last_layers=0)
    assert response.status_code == 422 and "CLIP_stop_at_last_layers" in response.json()["detail"]
    assert httpx.get(f"{url}/sdapi/v1/options").json() == before


def test_a_client_names_models_never_paths_and_can_post_back_what_it_read(server, models_root, tmp_path):
    """README "Security": the API takes no path. A loadable model outside the folders, a missing path, a system
    file and a file with a secret get one answer, 422, and nothing is read or switched."""
    url, _ = server
    before = httpx.get(f"{url}/sdapi/v1/options").json()
    outside = tmp_path / "elsewhere"
    shutil.copytree(models_root / "models" / "Stable-diffusion" / "tiny-b", outside)
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"\x0c\x00\x00\x00\x00\x00\x00\x00\"hunter2xx\"")
    for value in (str(outside), str(tmp_path / "missing"), "/etc/passwd", str(secret), "./models"):
        for response in (
            options(url, sd_model_checkpoint=value),
            options(url, sd_vae=value),
            httpx.post(f"{url}/sdapi/v1/txt2img", json={**BASE, "override_settings": {"sd_model_checkpoint": value}},
                       timeout=300),
            httpx.post(f"{url}/sdapi/v1/txt2img", json={**BASE, "override_settings": {"sd_vae": value}}, timeout=300),
        ):
            assert response.status_code == 422, response.text
            assert "not paths" in response.json()["detail"] and "hunter2" not in response.text
    assert httpx.get(f"{url}/sdapi/v1/options").json() == before
    assert options(url, **before).status_code == 200  # what GET /options shows goes back as it is
    assert httpx.get(f"{url}/sdapi/v1/options").json() == before
    response = options(url, sd_checkpoints_limit=before["sd_checkpoints_limit"] + 1)
    assert response.status_code == 422 and "--max-loaded" in response.json()["detail"]


def test_override_settings_switch_for_one_request_and_back(server):
    url, engine = server
    known = hashes(url)
    assert options(url, sd_model_checkpoint="tiny-a").status_code == 200
    info, params = txt2img(url, override_settings={"sd_model_checkpoint": "tiny-b", "CLIP_stop_at_last_layers": 2})
    assert params["Model hash"] == known["tiny-b"] and params["Clip skip"] == "2" and info["clip_skip"] == 2
    assert httpx.get(f"{url}/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny-a")
    assert txt2img(url)[1]["Model hash"] == known["tiny-a"]
    response = httpx.post(f"{url}/sdapi/v1/txt2img", json={**BASE, "override_settings": {"tiling": True}})
    assert response.status_code == 422 and "override_settings: not supported by sd-app: tiling" in response.text
    _, params = txt2img(url, override_settings={"sd_model_checkpoint": "tiny-b"},
                        override_settings_restore_afterwards=False)
    assert params["Model hash"] == known["tiny-b"]
    assert httpx.get(f"{url}/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny-b")  # A1111: it stays
    txt2img(url, override_settings={"CLIP_stop_at_last_layers": 2}, override_settings_restore_afterwards=False)
    assert httpx.get(f"{url}/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2  # every override stays
    assert options(url, sd_model_checkpoint="tiny-a", CLIP_stop_at_last_layers=1).status_code == 200
    assert len(engine.loaded()) == 1


def test_vae_and_clip_skip_options(server):
    url, engine = server
    plain = txt2img(url)
    assert options(url, sd_vae="soft.safetensors", CLIP_stop_at_last_layers=2).status_code == 200
    opts = httpx.get(f"{url}/sdapi/v1/options").json()
    assert opts["sd_vae"] == "soft.safetensors" and opts["CLIP_stop_at_last_layers"] == 2
    info, params = txt2img(url)
    assert params["Clip skip"] == "2" and info["clip_skip"] == 2
    assert info["infotexts"] != plain[0]["infotexts"]
    assert options(url, sd_vae="Automatic", CLIP_stop_at_last_layers=1).status_code == 200
    assert "Clip skip" not in txt2img(url)[1]


def test_a_clip_skip_beyond_the_models_text_encoder_is_refused_and_changes_nothing(server):
    """CLIP_stop_at_last_layers is checked against the selected model's text encoder when it is set: accepted, it
    would fail every request after it."""
    url, _ = server
    before = httpx.get(f"{url}/sdapi/v1/options").json()
    response = options(url, CLIP_stop_at_last_layers=3)  # the tiny models' text encoders have 2 layers
    assert response.status_code == 422
    assert "CLIP_stop_at_last_layers must be between 1 and 2 (this model's text encoder has 2 layers), got 3" in (
        response.json()["detail"])
    response = options(url, sd_model_checkpoint="tiny-b", CLIP_stop_at_last_layers=3)
    assert response.status_code == 422 and "between 1 and 2" in response.json()["detail"]
    assert httpx.get(f"{url}/sdapi/v1/options").json() == before
    txt2img(url)


def test_a_switch_to_fewer_text_encoder_layers_than_the_clip_skip_is_refused(tmp_path, tiny_config):
    """A switch never leaves the default clip skip beyond the new model's text encoder: refused (nothing loaded),
    unless the same options lower it."""
    from sd_app.api_models import apply_options
    from sd_app.engine import Engine

    checkpoints = tmp_path / "webui" / "models" / "Stable-diffusion"
    two = write_random_model(tiny_config, checkpoints / "two", seed=1)
    one = Path(shutil.copytree(two, checkpoints / "one"))  # its config says 1 layer (never loaded here)
    config = json.loads((one / "text_encoder" / "config.json").read_text())
    (one / "text_encoder" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    engine = Engine(model="two", reranker=None, output_dir=tmp_path / "out", device="cpu",
                    models_dirs=[tmp_path / "webui"])
    assert apply_options(engine, {"CLIP_stop_at_last_layers": 2})["CLIP_stop_at_last_layers"] == 2
    with pytest.raises(ValueError, match=f"not switched to {one}: its text encoder has 1 layers, fewer than the "
                                         "default clip skip 2; set CLIP_stop_at_last_layers to at most 1"):
        apply_options(engine, {"sd_model_checkpoint": "one"})
    with pytest.raises(ValueError, match="CLIP_stop_at_last_layers must be between 1 and 1"):
        apply_options(engine, {"sd_model_checkpoint": "one", "CLIP_stop_at_last_layers": 2})
    with pytest.raises(ValueError, match="not switched"):
        engine.switch(checkpoint="one")  # the UI's dropdown switches so
    assert engine.model == "two" and engine.clip_skip == 2 and engine.loaded() == []


def test_a_switch_waits_for_the_running_job(server):
    url, _ = server
    known = hashes(url)
    assert options(url, sd_model_checkpoint="tiny-a").status_code == 200
    finished: list[str] = []
    results: dict[str, object] = {}

    def generate() -> None:
        results["txt2img"] = txt2img(url, steps=150)[1]["Model hash"]
        finished.append("txt2img")

    def switch() -> None:
        results["options"] = options(url, sd_model_checkpoint="tiny-b").status_code
        finished.append("options")

    job = threading.Thread(target=generate)
    job.start()
    while httpx.get(f"{url}/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:
        time.sleep(0.05)
    switcher = threading.Thread(target=switch)
    switcher.start()
    job.join()
    switcher.join()
    assert finished == ["txt2img", "options"]  # the switch returned only after the job it waited for
    assert results == {"txt2img": known["tiny-a"], "options": 200}
    assert options(url, sd_model_checkpoint="tiny-a").status_code == 200


def test_refresh_finds_new_files(server, models_root):
    url, _ = server
    save_file({"emb_params": torch.zeros(1, 32)}, str(models_root / "embeddings" / "later.safetensors"))
    assert "later" not in httpx.get(f"{url}/sdapi/v1/embeddings").json()["loaded"]
    assert httpx.post(f"{url}/sdapi/v1/refresh-embeddings").status_code == 200
    assert "later" in httpx.get(f"{url}/sdapi/v1/embeddings").json()["loaded"]
    for route in ("refresh-checkpoints", "refresh-vae", "refresh-loras"):
        assert httpx.post(f"{url}/sdapi/v1/{route}").status_code == 200


def test_lru_of_k_checkpoints(models_root, tmp_path):
    from sd_app.engine import Engine

    engine = Engine(model="tiny-a", reranker=None, output_dir=tmp_path, device="cpu", models_dirs=[models_root],
                    max_loaded=2)
    a = engine.pipeline()
    b = engine.switch(checkpoint="tiny-b")
    assert len(engine.loaded()) == 2 and a is not b
    assert engine.switch(checkpoint="tiny-a") is a  # still loaded: no reload
    engine.switch(vae="soft.safetensors")  # tiny-a with another VAE: tiny-b (least recently used) is freed
    assert [key[0].split("/")[-1] for key in engine.loaded()] == ["tiny-a", "tiny-a"]
    with pytest.raises(Exception, match="no checkpoint named 'zzz'"):
        engine.switch(checkpoint="zzz")
    assert engine.model == "tiny-a" and engine.vae == "soft.safetensors"  # the selection stayed


def test_ui_dropdowns_switch_the_model_and_clip_skip_reaches_the_picture(server):
    from gradio_client import Client

    url, engine = server
    known = hashes(url)
    client = Client(url, verbose=False, analytics_enabled=False)
    status, checkpoint, vae = client.predict("tiny-b", "Automatic", api_name="/switch_model")
    assert status.startswith("Loaded tiny-b") and Path(engine.model).name == "tiny-b"  # the library entry's path
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="missing is not in the list of choices"):
        client.predict("missing", "Automatic", api_name="/switch_model")
    assert Path(engine.model).name == "tiny-b"
    # prompt, negative, sampler, steps, cfg, width, height, seed, candidates, rerank by, hires fix, clip skip
    hires_off = (False, 2, "Latent", 0, 0.7)
    status, _, _, parameters, _ = client.predict("a red circle", "", "Euler", 2, 7, 64, 64, 3, 1, "off", *hires_off, 2,
                                                 api_name="/generate")
    params = parse_parameters(parameters)
    assert params["Model hash"] == known["tiny-b"] and params["Clip skip"] == "2"
    checkpoints, vaes, networks = client.predict(api_name="/refresh_models")
    assert checkpoints["value"] == "tiny-b" and ["tiny-a", "tiny-a"] in checkpoints["choices"]
    choices = [value for _, value in networks["choices"]]
    assert {"lora:ink", "lora:hexagon", "embedding:fits", "embedding:wide"} <= set(choices)
    assert not any("old" in value for value in choices)  # the refused pickle is not offered
    prompt = client.predict("a red circle", "lora:ink", 0.5, api_name="/add_network")
    assert prompt == "a red circle <lora:ink:0.5>"
    prompt = client.predict(prompt, "lora:ink", 1.25, api_name="/add_network")  # the weight is replaced
    assert prompt == "a red circle <lora:ink:1.25>"
    prompt = client.predict(prompt, "embedding:fits", 1, api_name="/add_network")
    assert prompt == "a red circle <lora:ink:1.25> fits"
    assert client.predict(prompt, "embedding:fits", 1, api_name="/add_network") == prompt  # already there
    with pytest.raises(AppError, match="Choose a LoRA or an embedding"):
        client.predict(prompt, None, 1, api_name="/add_network")
    _, _, _, parameters, _ = client.predict(prompt, "", "Euler", 2, 7, 64, 64, 3, 1, "off", *hires_off, 1,
                                            api_name="/generate")
    params = parse_parameters(parameters)
    assert params["Lora hashes"].startswith("ink: ") and params["TI hashes"].startswith("fits: ")
    assert options(url, sd_model_checkpoint="tiny-a").status_code == 200


def test_a_title_picks_one_of_two_same_named_files_and_options_post_back_unchanged(tmp_path, tiny_config):
    """Over HTTP a checkpoint is named by its title when the name is ambiguous; GET /options shows the VAE
    selection as it is ("None": the checkpoint's own, not "Automatic", which would find dream-ft), so posting it
    back changes nothing."""
    from sd_app.api_models import apply_options, options_payload
    from sd_app.engine import Engine

    webui, comfy = tmp_path / "webui" / "models", tmp_path / "ComfyUI" / "models"
    first = write_random_model(tiny_config, webui / "Stable-diffusion" / "dream", seed=1)
    second = write_random_model(tiny_config, comfy / "checkpoints" / "dream", seed=2)
    (webui / "VAE").mkdir(parents=True)
    shutil.copy(first / "vae" / "diffusion_pytorch_model.safetensors", webui / "VAE" / "dream-ft.safetensors")
    engine = Engine(model=str(first), reranker=None, output_dir=tmp_path / "out", device="cpu",
                    models_dirs=[webui.parent, comfy.parent])
    before = options_payload(engine)
    assert before["sd_vae"] == "None"
    assert apply_options(engine, before) == before and engine.selection() == (str(first), None)
    short = engine.library().hashes.short_hash(second / "unet" / "diffusion_pytorch_model.safetensors")
    apply_options(engine, {"sd_model_checkpoint": f"dream [{short}]"})  # the title /sd-models lists
    assert engine.selection()[0] == str(second)


def test_automatic_vae_is_a1111s_near_the_checkpoint(tmp_path):
    """A1111's find_vae_near_checkpoint: <stem>.vae.safetensors beside it, else a VAE whose file name starts
    with the checkpoint's stem, else the checkpoint's own."""
    from pipelines.models.library import ModelLibrary
    from sd_app.checkpoints import vae_path

    models = tmp_path / "models"
    checkpoint = models / "Stable-diffusion" / "dream-v2.safetensors"
    for path in (checkpoint, models / "VAE" / "dream-v2-ft.safetensors", models / "VAE" / "other.safetensors"):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.zeros(1)}, str(path))
    library = ModelLibrary([tmp_path], shipped=False)
    assert vae_path(library, str(checkpoint), "Automatic") == str(models / "VAE" / "dream-v2-ft.safetensors")
    beside = checkpoint.with_name("dream-v2.vae.safetensors")
    save_file({"w": torch.zeros(1)}, str(beside))
    library.refresh()
    assert vae_path(library, str(checkpoint), "Automatic") == str(beside)
    assert vae_path(library, str(models / "Stable-diffusion" / "plain.safetensors"), "Automatic") is None
    assert vae_path(library, str(checkpoint), "None") is None


def test_automatic_vae_of_a_diffusers_folder_uses_the_folders_name_as_its_stem(tmp_path):
    """A1111's rule (it lists files only) applied to a diffusers folder: its stem is its name."""
    from pipelines.models.library import ModelLibrary
    from sd_app.checkpoints import vae_path

    models = tmp_path / "models"
    folder = models / "Stable-diffusion" / "dream-v2"
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    matching = models / "VAE" / "dream-v2-ft.safetensors"
    matching.parent.mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, str(matching))
    library = ModelLibrary([tmp_path], shipped=False)
    assert vae_path(library, str(folder), "Automatic") == str(matching)
    beside = folder.with_name("dream-v2.vae.safetensors")
    save_file({"w": torch.zeros(1)}, str(beside))
    library.refresh()
    assert vae_path(library, str(folder), "Automatic") == str(beside)
    assert vae_path(library, str(models / "Stable-diffusion"), "Automatic") is None  # no model: no stem
    assert vae_path(library, "embedded", "Automatic") is None


def test_a_page_opened_after_a_switch_shows_the_selection_as_it_is(server):
    """The page is built once, at start; each page load asks for the current checkpoint, VAE and clip skip."""
    from sd_app.ui import build_demo
    from sd_app.ui_handlers import UiHandlers
    from sd_app.ui_jobs import JobTracker

    url, engine = server
    config = build_demo(engine).config
    loads = [d for d in config["dependencies"] if d["targets"] and d["targets"][0][1] == "load"]
    checkpoint = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "checkpoint")
    assert any(checkpoint in d["outputs"] for d in loads)
    assert options(url, sd_model_checkpoint="tiny-b", CLIP_stop_at_last_layers=2).status_code == 200
    try:
        shown, vae, clip_skip, *_ = UiHandlers(engine, JobTracker()).current_settings()
        current = httpx.get(f"{url}/sdapi/v1/options").json()
        assert shown["value"] == "tiny-b" and vae["value"] == current["sd_vae"] and clip_skip == 2
    finally:
        assert options(url, sd_model_checkpoint="tiny-a", CLIP_stop_at_last_layers=1).status_code == 200


def test_an_open_page_follows_a_switch_made_elsewhere_and_runs_only_the_model_it_shows(server):
    """A page keeps what it shows in a gr.State; after POST /options switches the model, its next run is refused
    with both names (nothing generated), its widgets then follow (clip skip only where the user left the
    default), and the run after that uses the new model."""
    import gradio as gr
    from PIL import Image

    from sd_app.ui import build_demo
    from sd_app.ui_handlers import UiHandlers, UserSession
    from sd_app.ui_jobs import JobTracker

    url, engine = server
    config = build_demo(engine).config
    ids = {c.get("props", {}).get("elem_id"): c["id"] for c in config["components"]}
    for view in ("generate", "img2img"):  # after each run the page's selection follows the server's
        run = next(d["id"] for d in config["dependencies"] if d.get("api_name") == view)
        assert any(d["trigger_after"] == run and {ids["checkpoint"], ids["vae"], ids["clip-skip"]} <= set(d["outputs"])
                   for d in config["dependencies"])
    known = hashes(url)
    handlers = UiHandlers(engine, JobTracker())
    *_, page = handlers.current_settings()  # the page as it opened: tiny-a, clip skip 1
    assert page.checkpoint == "tiny-a" and page.clip_skip == 1
    outputs = Path(engine.output_dir)
    before = sorted(outputs.rglob("*.png"))
    # prompt, negative, sampler, steps, cfg, width, height, seed, candidates, rerank by, hires fix, clip skip
    fields = ("a red circle", "", "Euler", 2, 7, 64, 64, 3, 1, "off", False, 2, "Latent", 0, 0.7, 1)
    assert options(url, sd_model_checkpoint="tiny-b", CLIP_stop_at_last_layers=2).status_code == 200
    try:
        with pytest.raises(gr.Error, match=r"server now runs tiny-b .* after this page showed tiny-a"):
            list(handlers.generate(*fields, session=UserSession(), shown=page))
        editor = {"background": Image.new("RGB", (64, 64)), "layers": [], "composite": None}
        with pytest.raises(gr.Error, match="server now runs tiny-b"):  # Image to image checks it too
            list(handlers.image_to_image(editor, None, "a square", "", "Euler", 2, 7, 64, 64, 5, 1, False, 0.5, 4,
                                         "original", "Whole picture", 32, "Inpaint masked", "just resize", 0, [],
                                         "Full", UserSession(), shown=page))
        assert sorted(outputs.rglob("*.png")) == before  # nothing was generated with a model the page did not show

        checkpoint, vae, clip_skip, _, _, followed = handlers.follow_server(page, 1, "Full", "Full")
        assert checkpoint["value"] == "tiny-b" and vae["value"] == followed.vae and clip_skip == 2
        _, _, kept, *_ = handlers.follow_server(page, 3, "Full", "Full")  # a clip skip the user chose stays
        assert "value" not in kept
        assert all("value" not in update for update in handlers.follow_server(followed, 2, "Full", "Full")[:5])

        *_, parameters, _ = list(handlers.generate(*fields, session=UserSession(), shown=followed))[-1]
        assert parse_parameters(parameters)["Model hash"] == known["tiny-b"]
    finally:
        assert options(url, sd_model_checkpoint="tiny-a", CLIP_stop_at_last_layers=1).status_code == 200


def test_the_pages_own_switch_and_refresh_keep_its_record_of_what_it_shows(server):
    from sd_app.ui_handlers import UiHandlers
    from sd_app.ui_jobs import JobTracker

    _, engine = server
    handlers = UiHandlers(engine, JobTracker())
    try:
        status, checkpoint, _, shown = handlers.switch_model("tiny-b", "None")
        assert status.startswith("Loaded tiny-b") and checkpoint == "tiny-b" and shown.checkpoint == "tiny-b"
        assert shown.selection == engine.selection()
        *_, refreshed = handlers.refresh_models()
        assert refreshed == shown
    finally:
        handlers.switch_model("tiny-a", "None")
