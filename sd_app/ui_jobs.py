"""Which generations are waiting or running, for the UI and the HTTP API.

One ``JobTracker`` per served app (built by ``sd_app.server``, never a module global). It backs
``GET /sdapi/v1/progress`` (step, ETA, live preview of the current latents), ``POST /sdapi/v1/interrupt`` and
``/skip`` (A1111's, through the running job's ``Interruption``, which API and UI jobs both have: a UI job is
stopped as its page's Interrupt or Skip would, keeping what it made; a job registered without one is cancelled)
and the "busy" answer when too many requests wait.
Generation itself is serialised by the pipeline's lock; the tracker only observes.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from pipelines.generation.denoising import Interruption
    from pipelines.generation.previews import LatentCopy
    from pipelines.generation.text_to_image import StepInfo


class Busy(RuntimeError):
    """Too many requests are already waiting for the model."""


def client_busy_message(waiting: int) -> str:
    """The refusal of a client's request when ``waiting`` of its own wait already (the API's and the UI's)."""
    return f"busy: {waiting} of your requests are already waiting; wait for them to finish"


@dataclass
class Job:
    """One request from registration until it finishes (successfully or not)."""

    id: int
    source: str  # "ui", "api"
    total_steps: int
    cancel: threading.Event
    client: str = ""  # the client's address, for the per-client cap on waiting jobs
    interruption: Interruption | None = None  # A1111's interrupt and skip, keeping what was made (API and UI jobs)
    registered: float = field(default_factory=time.time)
    started: float | None = None  # time of the first denoising step
    step: int = 0
    latest_copy: LatentCopy | None = None  # the latest step's latents on their way to the host

    @property
    def latents(self) -> torch.Tensor | None:
        """[n, 4, h, w] latest latents on the host (waits for the copy only here, when asked)."""
        return self.latest_copy.wait() if self.latest_copy is not None else None

    @property
    def progress(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0

    def eta(self, now: float) -> float:
        """Seconds left, extrapolated from the time per step so far (0 before the first step)."""
        if self.started is None or self.step == 0:
            return 0.0
        per_step = (now - self.started) / self.step
        return per_step * (self.total_steps - self.step)


class JobTracker:
    """Thread-safe registry of waiting and running jobs."""

    def __init__(self, max_waiting: int = 16, max_waiting_per_client: int = 4) -> None:
        self.max_waiting = max_waiting
        self.max_waiting_per_client = max_waiting_per_client
        self._lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)

    @contextmanager
    def job(
        self,
        total_steps: int,
        cancel: threading.Event,
        source: str,
        client: str = "",
        interruption: Interruption | None = None,
    ) -> Iterator[Job]:
        """Register a job for the duration of the block; raises Busy when ``max_waiting`` jobs wait already,
        or ``max_waiting_per_client`` of this ``client``'s. ``interruption``: what ``interrupt`` and ``skip``
        ask of it (None: they set ``cancel``)."""
        with self._lock:
            waiting = [j for j in self._jobs.values() if j.started is None]
            if len(waiting) >= self.max_waiting:
                raise Busy(f"busy: {len(waiting)} requests are already waiting for the model; try again shortly")
            mine = sum(1 for j in waiting if client and j.client == client)
            if mine >= self.max_waiting_per_client:
                raise Busy(client_busy_message(mine))
            job = Job(next(self._ids), source, total_steps, cancel, client, interruption=interruption)
            self._jobs[job.id] = job
        try:
            yield job
        finally:
            with self._lock:
                self._jobs.pop(job.id, None)

    def step(self, job: Job, info: StepInfo) -> None:
        """Record a denoising step of ``job`` (call from the pipeline's step callback)."""
        from pipelines.generation.previews import LatentCopy

        latents = LatentCopy(info.latents, info.step)  # no host sync per step on a GPU
        with self._lock:
            if job.started is None:
                job.started = time.time()
            job.step = info.step
            job.total_steps = info.total
            job.latest_copy = latents

    def current(self) -> Job | None:
        """The running job (the one that has started stepping), else the oldest waiting one."""
        with self._lock:
            running = [j for j in self._jobs.values() if j.started is not None]
            pool = running or list(self._jobs.values())
            return min(pool, key=lambda j: j.registered) if pool else None

    def count(self) -> int:
        with self._lock:
            return len(self._jobs)

    def interrupt(self) -> bool:
        """Interrupt the running job (else the oldest waiting one), keeping what it made; a job without an
        ``interruption`` is cancelled. False when there is no job."""
        job = self.current()
        if job is None:
            return False
        if job.interruption is not None:
            job.interruption.interrupt()
        else:
            job.cancel.set()
        return True

    def skip(self) -> bool:
        """Skip the batch the running job (else the oldest waiting one) is denoising; a job without an
        ``interruption`` is cancelled. False when there is no job."""
        job = self.current()
        if job is None:
            return False
        if job.interruption is not None:
            job.interruption.skip()
        else:
            job.cancel.set()
        return True
