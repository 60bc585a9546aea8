"""The UI's Interrupt and Skip (A1111's): the views keep what was made, and the HTTP API's ``/interrupt`` and
``/skip`` do the same to a UI job. Each stop is asked from the tracker's step hook at a known step, through the
handler functions and the tracker the served app uses (no timing)."""

from __future__ import annotations

import gradio as gr
import httpx
import numpy as np
import pytest
from PIL import Image

from sd_app.metadata import parse_parameters
from sd_app.ui import build_demo
from sd_app.ui_handlers import UiHandlers, UserSession

pytest_plugins = ["tests.serve_fixtures"]


def generate_kwargs(seed: int, n: int, rerank: str = "clip") -> dict:
    return {"prompt": "a red circle", "negative": "", "sampler": "Euler a", "steps": 2, "cfg": 7, "width": 64,
            "height": 64, "seed": seed, "n": n, "rerank": rerank, "hires_on": False, "hires_scale": 2,
            "hires_upscaler": "Latent", "hires_steps": 0, "hires_denoise": 0.7, "clip_skip": 1}


@pytest.fixture
def stepped(serve_engine, stepped_server):
    """(the views' handlers on the served app's engine and tracker, the tracker, the app's address)."""
    url, tracker = stepped_server
    yield UiHandlers(serve_engine, tracker), tracker, url
    tracker.on_start = tracker.on_step = None


def run(updates) -> tuple:
    """The last (status, previews, gallery, parameters, files) a view's generator yields."""
    return list(updates)[-1]


def png_parameters(path: str) -> dict[str, str]:
    with Image.open(path) as image:
        return parse_parameters(image.info["parameters"])


def test_interrupt_keeps_the_finished_images_ranked_then_the_stopped_ones_captioned_and_saved(stepped):
    handlers, tracker, _ = stepped
    whole = run(handlers.generate(**generate_kwargs(seed=70, n=6), session=UserSession()))
    by_seed = {png_parameters(path)["Seed"]: np.asarray(Image.open(path)) for path in whole[4]}
    session = UserSession()
    answers: list[str] = []
    # 6 images run as batches of 4 and 2 (steps 1-2 and 3-4): interrupted after the second batch's first step
    tracker.on_step = lambda step: answers.append(handlers.interrupt(session)) if step == 3 else None
    status, _, gallery, parameters, files = run(handlers.generate(**generate_kwargs(seed=70, n=6), session=session))
    assert answers == ["Interrupting…"]
    assert status.startswith("Interrupted: 4 finished image(s), 2 stopped at step 1 of 2"), status
    captions = [caption for _, caption in gallery]
    scores = [float(caption.split()[1]) for caption in captions[:4]]
    assert all(caption.startswith("CLIP ") for caption in captions[:4]) and scores == sorted(scores, reverse=True)
    assert captions[4:] == ["stopped at step 1 of 2 · seed 74", "stopped at step 1 of 2 · seed 75"]
    assert [path for path, _ in gallery] == files and len(files) == 6  # every one saved, as the API's save_images
    saved = [png_parameters(path) for path in files]
    assert all("Stopped at step" not in fields for fields in saved[:4])
    assert [fields["Stopped at step"] for fields in saved[4:]] == ["1 of 2", "1 of 2"]
    for fields, path in zip(saved[:4], files[:4]):  # the finished ones are what an uninterrupted run makes
        np.testing.assert_array_equal(np.asarray(Image.open(path)), by_seed[fields["Seed"]])
    assert parse_parameters(parameters)["Seed"] == saved[0]["Seed"]
    assert [c.stopped_at for c in session.last_result.candidates] == [None] * 4 + [1, 1]  # Send to, Inspect
    assert UiHandlers.interrupt(session) == "Nothing to interrupt." and UiHandlers.skip(session) == "Nothing to skip."


def test_skip_stops_the_batch_being_denoised_and_the_view_goes_on(stepped):
    handlers, tracker, _ = stepped
    session = UserSession()
    answers: list[str] = []
    tracker.on_step = lambda step: answers.append(handlers.skip(session)) if step == 1 else None
    status, _, gallery, _, files = run(handlers.generate(**generate_kwargs(seed=80, n=6, rerank="off"),
                                                         session=session))
    assert answers == ["Skipping…"]
    assert status.startswith("Done: 6 image(s)") and "4 skipped at step 1 of 2" in status, status
    captions = [caption for _, caption in gallery]
    assert captions == ["seed 84", "seed 85", *[f"stopped at step 1 of 2 · seed {seed}" for seed in range(80, 84)]]
    assert [png_parameters(path).get("Stopped at step") for path in files] == [None, None, *["1 of 2"] * 4]


def test_interrupted_before_its_first_step_the_view_keeps_its_last_results(stepped):
    handlers, tracker, _ = stepped
    session = UserSession()
    run(handlers.generate(**generate_kwargs(seed=90, n=1), session=session))
    before = session.last_result
    tracker.on_start = lambda: handlers.interrupt(session)  # registered, waiting for the model
    status, _, gallery, parameters, files = run(handlers.generate(**generate_kwargs(seed=91, n=2), session=session))
    assert status == "Interrupted before the first step: nothing was made."
    assert session.last_result is before and session.last_seed == 90
    assert (gallery, parameters, files) == (gr.update(), gr.update(), gr.update())  # the last results stay shown


def test_image_to_image_interrupt_keeps_the_picture_at_the_step_reached(stepped):
    handlers, tracker, _ = stepped
    session = UserSession()
    drawing = Image.new("RGB", (64, 64), (40, 80, 220))
    editor = {"background": drawing, "layers": [], "composite": drawing}
    args = (editor, None, "a green circle", "", "Euler a", 4, 7, 64, 64, 21, 1, True, 0.8, 4, "original",
            "Whole picture", 32, "Inpaint masked", "just resize", 0, [], "Full", session)
    tracker.on_step = lambda step: handlers.interrupt(session) if step == 1 else None
    status, _, gallery, parameters, files = run(handlers.image_to_image(*args))
    total = session.last_result.request.total_steps
    assert status.startswith(f"Interrupted: 0 finished image(s), 1 stopped at step 1 of {total}"), status
    assert [caption for _, caption in gallery] == [f"stopped at step 1 of {total} · seed 21"]
    assert png_parameters(files[0])["Stopped at step"] == f"1 of {total}"
    assert parse_parameters(parameters)["Denoising strength"] == "0.8"


@pytest.mark.parametrize(("route", "answer", "status"), [
    ("interrupt", {"interrupted": True}, "Interrupted: 0 finished image(s), 1 stopped at step 1 of 2"),
    ("skip", {"skipped": True}, "Done: 1 image(s)"),  # the only batch skipped: the job had nothing left to do
])
def test_the_apis_interrupt_and_skip_stop_a_ui_job_keeping_what_it_made(stepped, route, answer, status):
    """POST /sdapi/v1/interrupt or /skip finds the running UI job through the served app's tracker and stops it as
    the page's own buttons do (it used to cancel it, keeping nothing)."""
    handlers, tracker, url = stepped
    answers: list[dict] = []

    def post(step: int) -> None:
        if step == 1:
            answers.append(httpx.post(f"{url}/sdapi/v1/{route}", timeout=30).json())

    tracker.on_step = post
    shown, _, gallery, _, files = run(handlers.generate(**generate_kwargs(seed=95, n=1), session=UserSession()))
    assert answers == [answer] and shown.startswith(status), shown
    assert [caption for _, caption in gallery] == ["stopped at step 1 of 2 · seed 95"] and len(files) == 1
    assert png_parameters(files[0])["Stopped at step"] == "1 of 2"


def test_each_view_has_interrupt_and_skip_that_keep_its_job_and_a_cancel_that_drops_a_queued_one(serve_engine):
    """Gradio's ``cancels`` also closes a running job's generator (its results would be lost), so it sits only on
    Cancel; each view's Interrupt and Skip reach its own job through its own session and answer in its status."""
    demo = build_demo(serve_engine)
    fns = list(demo.fns.values())
    dropping = [f for f in fns if f.cancels]
    for view in ("generate", "img2img"):
        run_fn = next(f for f in fns if f.api_name == view)
        session = next(c for c in run_fn.inputs if isinstance(c, gr.State) and c.value is UserSession)
        status = run_fn.outputs[0]
        buttons = {}
        for name in ("interrupt", "skip", "cancel"):
            [handler] = [f for f in fns if getattr(f.fn, "__name__", None) == name and f.inputs == [session]]
            assert handler.outputs == [status] and handler.concurrency_limit is None, (view, name)
            buttons[name] = handler.targets
        assert len({str(targets) for targets in buttons.values()}) == 3, view  # three buttons
        [drop] = [f for f in dropping if f.cancels == [run_fn._id]]
        assert drop.targets == buttons["cancel"], view  # Cancel drops a queued job; Interrupt and Skip do not
    assert len(dropping) == 2
