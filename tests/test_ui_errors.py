"""What the views say when something goes wrong: unreadable uploads named as uploaded (and refused before the run,
the results kept), a queued job's Cancel and Interrupt, the hires "resize to" by its label, scorers on a server
without a reranker, and the Rerank view's empty prompt. Through gradio_client on a live server or the handlers."""

from __future__ import annotations

import threading
import time

import gradio as gr
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError, ValidationError
from PIL import Image

from sd_app.ui_handlers import UiHandlers, UserSession
from sd_app.ui_rerank import RerankView

pytest_plugins = ["tests.serve_fixtures"]


@pytest.fixture
def fake_png(tmp_path):
    path = tmp_path / "fake.png"
    path.write_text("not an image")
    return path


@pytest.fixture
def red_png(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return path


def image_args(editor, mask):
    # editor, mask, prompt, negative, sampler, steps, cfg, width, height, seed, n, rerank, strength, mask blur,
    # masked content, inpaint area, padding, mask mode, resize mode, outpaint, sides, VAE decoder
    return (editor, mask, "a square", "", "Euler", 2, 7, 64, 64, 5, 1, False, 0.5, 4, "original", "Whole picture",
            32, "Inpaint masked", "just resize", 0, [], "Full")


def test_an_unreadable_mask_or_init_image_is_refused_naming_the_field_and_the_file_as_uploaded(
    live_server, fake_png, red_png
):
    """Gradio opened the upload before the handler and failed without a message (a bare "Error" on every output);
    now the event's validator refuses it before the run, with one line under the input."""
    client = Client(live_server.url, verbose=False, analytics_enabled=False)
    editor = {"background": handle_file(str(red_png)), "layers": [], "composite": handle_file(str(red_png))}
    with pytest.raises(ValidationError, match=r"Mask: fake\.png is not a readable image") as raised:
        client.predict(*image_args(editor, handle_file(str(fake_png))), api_name="/img2img")
    assert "/tmp" not in str(raised.value) and "gradio" not in str(raised.value)
    unreadable_init = {"background": handle_file(str(fake_png)), "layers": [], "composite": None}
    with pytest.raises(ValidationError, match=r"Init image: fake\.png is not a readable image"):
        client.predict(*image_args(unreadable_init, None), api_name="/img2img")
    status, *_ = client.predict(*image_args(editor, None), api_name="/img2img")  # the next one runs
    assert status.startswith("Done: 1 image(s)")


def test_score_and_rerank_name_an_unreadable_upload_as_uploaded_not_by_the_servers_copy(live_server, fake_png):
    client = Client(live_server.url, verbose=False, analytics_enabled=False)
    with pytest.raises(AppError, match=r"fake\.png is not a readable image") as raised:
        client.predict([handle_file(str(fake_png))], "a cat", api_name="/score")
    assert "/" not in str(raised.value)
    with pytest.raises(AppError, match=r"fake\.png is not a readable image") as raised:
        client.predict([handle_file(str(fake_png))], "", "a cat", ["clip"], "", api_name="/rerank")
    assert "/" not in str(raised.value)


def test_the_rerank_view_refuses_an_empty_or_blank_prompt(serve_engine, red_png):
    view = RerankView(serve_engine)
    for prompt in ("", "  \n ", None):
        with pytest.raises(gr.Error, match="Type a prompt"):
            view.rerank([str(red_png)], "", prompt, ["clip"], "", UserSession())


def test_a_bad_hires_resize_is_named_by_the_views_label(serve_engine):
    hires = (True, 2, "Latent", 0, 0.7)
    for size, wrong in (("4000x0", "4000"), ("1004x512", "1004")):
        with pytest.raises(gr.Error) as raised:
            list(UiHandlers(serve_engine, None).generate("a cat", "", "Euler", 2, 7, 64, 64, 1, 1, "off", *hires, 1,
                                                        hires_resize=size))
        message = str(raised.value)
        assert 'Hires fix "Or resize to WxH"' in message and wrong in message and "hr_resize" not in message


def test_scorers_on_a_server_without_a_reranker_say_how_it_was_started(tiny_model, tmp_path):
    """The Rerank by dropdown is Off and disabled there: "turn it on" could not be done."""
    from sd_app.engine import Engine

    engine = Engine(model=str(tiny_model), reranker=None, output_dir=tmp_path, device="cpu")
    handlers = UiHandlers(engine, None)
    for scorers, min_score in (("clip:1", ""), ("", "5")):
        with pytest.raises(gr.Error, match=r"started without a reranker \(--reranker none\)") as raised:
            list(handlers.generate("a cat", "", "Euler", 2, 7, 64, 64, 1, 1, "off", False, 2, "Latent", 0, 0.7, 1,
                                   scorers=scorers, min_score=min_score))
        assert "turn it on" not in str(raised.value)


def test_cancel_and_interrupt_of_a_queued_job_say_so(stepped_server):
    """Page B's job waits behind page A's. B's Cancel (whose ``cancels`` drops it from the queue, in the browser)
    says it was dropped, not "Nothing to cancel."; B's Interrupt and Skip say the job waits and Cancel drops it."""
    from gradio_client.utils import Status

    url, tracker = stepped_server
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(60)

    tracker.on_start = hold
    page_a = Client(url, verbose=False, analytics_enabled=False)
    page_b = Client(url, verbose=False, analytics_enabled=False)
    args = ("a red circle", "", "Euler", 2, 7, 64, 64, 1, 1, "off", False, 2, "Latent", 0, 0.7)
    try:
        running = page_a.submit(*args, api_name="/generate")
        assert started.wait(60), "page A's job did not start"
        tracker.on_start = None
        waiting = page_b.submit(*args, api_name="/generate")
        deadline = time.monotonic() + 60
        while waiting.status().code != Status.IN_QUEUE:
            assert time.monotonic() < deadline, waiting.status()
            time.sleep(0.05)
        assert page_b.predict(api_name="/cancel").startswith("Dropped from the queue")
        for button in ("interrupt", "skip"):
            answer = page_b.predict(api_name=f"/{button}")
            assert "still waiting in the queue" in answer and "use Cancel" in answer, answer
        assert page_a.predict(api_name="/cancel") == "Cancelling…"  # A's runs: it is cancelled, not "dropped"
    finally:
        tracker.on_start = None
        release.set()
    assert running.result(timeout=60)[0].startswith("Cancelled")
    assert page_a.predict(api_name="/cancel") == "Nothing to cancel."  # the cancelled job has ended
    assert waiting.result(timeout=60)[0].startswith("Done")  # gradio_client has no cancels: B's job still ran
    assert page_b.predict(api_name="/cancel") == "Nothing to cancel."
