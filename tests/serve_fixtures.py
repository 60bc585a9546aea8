"""Fixtures for the UI/API/browser tests: one engine (tiny SD + tiny CLIP) and one live server per session.

Used as a plugin (``pytest_plugins = ["tests.serve_fixtures"]``) so every test module shares the same
loaded models and the same server: Gradio, diffusers and the models load once.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from sd_app.ui_jobs import JobTracker
from tests.clip_fixtures import tiny_clip_dir

SIZE = {"width": 64, "height": 64}


@dataclass
class LiveServer:
    url: str
    app: object
    engine: object


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_clip_dir(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def serve_engine(tiny_model, tiny_clip, tmp_path_factory):
    """An engine on the tiny models, already loaded (so tests time generation, not loading)."""
    from sd_app.engine import Engine

    engine = Engine(
        model=str(tiny_model), reranker=str(tiny_clip), output_dir=tmp_path_factory.mktemp("outputs"), device="cpu"
    )
    engine.pipeline()
    engine.scorer()
    return engine


def start_server(app: object) -> tuple[str, object, threading.Thread]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1)
    )
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture(scope="session")
def live_server(serve_engine) -> Iterator[LiveServer]:
    """``sd_app.server.create_app`` (UI + API, no auth) served by uvicorn on a free port."""
    from sd_app.server import create_app

    app = create_app(serve_engine, max_queue=16)
    url, server, thread = start_server(app)
    yield LiveServer(url, app, serve_engine)
    server.should_exit = server.force_exit = True  # do not wait for Gradio's open event streams
    thread.join(timeout=10)


class SteppedTracker(JobTracker):
    """A tracker that calls ``on_start()`` when a job registers and ``on_step(step)`` after each step it records:
    the tests' way to call ``/interrupt`` or ``/skip`` (or the UI's buttons) at a known point of a running job."""

    def __init__(self) -> None:
        super().__init__()
        self.on_start: Callable[[], None] | None = None
        self.on_step: Callable[[int], None] | None = None

    @contextmanager
    def job(self, *args, **kwargs):
        with super().job(*args, **kwargs) as job:
            if self.on_start is not None:
                self.on_start()
            yield job

    def step(self, job, info) -> None:
        super().step(job, info)
        if self.on_step is not None:
            self.on_step(info.step)


@pytest.fixture(scope="module")
def stepped_server(serve_engine):
    """The app served with a :class:`SteppedTracker`: (its address, the tracker)."""
    from sd_app.server import create_app

    tracker = SteppedTracker()
    url, server, thread = start_server(create_app(serve_engine, tracker=tracker))
    yield url, tracker
    server.should_exit = server.force_exit = True
    thread.join(timeout=10)
