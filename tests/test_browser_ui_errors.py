"""In a real browser (Debian's chromium through Playwright): what the page shows after a run was refused because
the checkpoint was switched elsewhere, and after Cancel. Only the page shows these: Gradio's page runs an event's
``.then`` listeners after a success or a cancel but not after an error, and Cancel's ``cancels`` closes the job's
stream in the page, so its last line never arrives there."""

from __future__ import annotations

import re
import threading

import httpx
import pytest

from tests.serve_fixtures import SteppedTracker, start_server
from tests.test_browser import ARTIFACTS, CHROMIUM, FLAGS, set_number

pytest_plugins = ["tests.serve_fixtures"]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)"
)


@pytest.fixture(scope="module")
def two_checkpoints_server(tiny_config, tmp_path_factory):
    """A server whose models folder holds two checkpoints, tiny-a selected: (address, engine)."""
    from pipelines.models.random_model import write_random_model
    from sd_app.engine import Engine
    from sd_app.server import create_app

    root = tmp_path_factory.mktemp("two-checkpoints")
    for name, seed in (("tiny-a", 1), ("tiny-b", 2)):
        write_random_model(tiny_config, root / "models" / "Stable-diffusion" / name, seed=seed)
    engine = Engine(model="tiny-a", reranker=None, output_dir=tmp_path_factory.mktemp("out"), device="cpu",
                    models_dirs=[root])
    engine.pipeline()
    url, server, thread = start_server(create_app(engine))
    yield url, engine
    server.should_exit = server.force_exit = True
    thread.join(timeout=10)


class CancelHoldingTracker(SteppedTracker):
    """Holds a job at its first step until the page has asked Gradio to close the job's stream (``/cancel``, which
    a click on Cancel sends after the button's own handler answered), so the stream is closed before the job ends,
    as with a job that takes longer than a step to notice its cancel."""

    def __init__(self) -> None:
        super().__init__()
        self.stream_closing = threading.Event()

    def step(self, job, info) -> None:
        super().step(job, info)
        if info.step == 1:
            self.stream_closing.wait(60)


@pytest.fixture(scope="module")
def holding_server(serve_engine):
    """The app with a :class:`CancelHoldingTracker`, told when Gradio's ``/cancel`` has cancelled the stream's task."""
    import asyncio

    import gradio.routes

    from sd_app.server import create_app

    tracker = CancelHoldingTracker()
    original = gradio.routes.cancel_tasks

    async def cancel_tasks(task_ids):
        cancelling = asyncio.ensure_future(original(task_ids))
        await asyncio.sleep(0)  # it has run up to its first await: the stream's task is cancelled
        tracker.stream_closing.set()
        return await cancelling

    gradio.routes.cancel_tasks = cancel_tasks
    url, server, thread = start_server(create_app(serve_engine, tracker=tracker))
    try:
        yield url, tracker
    finally:
        tracker.stream_closing.set()
        gradio.routes.cancel_tasks = original
        server.should_exit = server.force_exit = True
        thread.join(timeout=10)


@pytest.fixture
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 1000})
        finally:
            browser.close()


def open_generate(page, url: str) -> None:
    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
    prompt = page.locator("#prompt textarea")
    prompt.wait_for(timeout=60_000)
    prompt.fill("a red circle")
    for elem_id, value in (("steps", 2), ("width", 64), ("height", 64), ("candidates", 1)):
        set_number(page, elem_id, value)


def status_line(page) -> str:
    return page.locator("#status p").first.inner_text()


def test_after_a_run_refused_for_a_switch_made_elsewhere_the_page_shows_the_new_model_and_runs_it(
    page, two_checkpoints_server
):
    url, _ = two_checkpoints_server
    open_generate(page, url)
    checkpoint = page.locator("#checkpoint input")
    try:
        page.locator("button#generate").click()
        page.locator("#status p").get_by_text(re.compile(r"^Done: 1 image")).wait_for(timeout=120_000)
        assert checkpoint.input_value() == "tiny-a"
        response = httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-b"}, timeout=300)
        assert response.status_code == 200, response.text
        page.locator("button#generate").click()
        page.locator("#status p").get_by_text(re.compile("server now runs tiny-b")).wait_for(timeout=120_000)
        # the refusal says the dropdowns show the new model: they do, and the next click runs it
        page.wait_for_function("() => document.querySelector('#checkpoint input').value === 'tiny-b'",
                               timeout=30_000)
        page.locator("button#generate").click()
        page.locator("#status p").get_by_text(re.compile(r"^Done: 1 image")).wait_for(timeout=120_000)
        assert "Model: tiny-b" in page.locator("#parameters textarea").input_value()
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "browser-switched-elsewhere-failure.png"), full_page=True)
        raise
    finally:
        httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-a"}, timeout=300)


def test_after_cancel_the_status_says_the_job_was_cancelled(page, holding_server):
    url, tracker = holding_server
    tracker.stream_closing.clear()
    open_generate(page, url)
    running = "#gallery [data-testid=status-tracker].generating"  # the page's Generate event is under way
    try:
        page.locator("button#generate").click()
        page.locator(running).wait_for(timeout=60_000)
        page.locator("button#cancel").click()
        page.locator(running).wait_for(state="detached", timeout=60_000)  # the page closed the job's stream
        page.locator("#status p").get_by_text(re.compile(r"^Cancelled")).wait_for(timeout=60_000)
        assert "nothing was kept" in status_line(page)
        assert page.locator("#previews img").count() == 0
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "browser-cancel-failure.png"), full_page=True)
        raise
    finally:
        tracker.stream_closing.set()
