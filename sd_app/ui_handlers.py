"""What the Gradio views do: plain methods on one object per served app, wired up by ``sd_app.ui``.

Per-user data lives in a ``UserSession`` held by ``gr.State`` (never in module globals). Every
input error becomes a short ``gr.Error`` message; generation errors (out-of-memory included) free
memory and leave the engine ready for the next request.

Stopping a view's job, as A1111's buttons: Interrupt keeps what was made (the finished images, ranked, then the
images being denoised, decoded from their predicted clean latents at the step reached and captioned so; saved
like the others with ``Stopped at step: K of N`` in their infotext), Skip does that to the batch being denoised
(a view has one Candidates count, no batch size and count: its batches are the up to 4 candidates denoised
together) and the job goes on (``pipelines.generation.denoising.Interruption``). The HTTP API's ``/interrupt``
and ``/skip`` reach a UI job the same way (``sd_app.ui_jobs``). Cancel keeps nothing, and drops a job still queued.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from pipelines.generation.request import GenerationRequest
from sd_app.ui_jobs import Busy, JobTracker
from sd_app.ui_selection import ShownSelection, changed_message, follow

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.generation.denoising import Interruption
    from pipelines.models.library import ModelLibrary
    from sd_app.engine import Candidate, Engine, GenerationResult

log = logging.getLogger("sd_app.ui")
PREVIEW_PX = 192  # longest side of live latent previews
THUMB_PX = 64  # per-step thumbnails in the Inspect view
MAX_TEXTS = 64  # texts one request scores images against (Inspect's extra texts, the Score tab)
HIRES_RESIZE_LABEL = 'Hires fix "Or resize to WxH"'  # the view's label of the hires resize (A1111's hr_resize_x, _y)
CANCEL_WAIT_S = 120  # how long the report of a cancel waits for the job to stop (it checks at every step)
DROPPED_NOTE = "Dropped from the queue: the job had not started; nothing was made."
WAITING_NOTE = ("Nothing to {action} yet: this view's job is still waiting in the queue (it will run in full); "
                "use Cancel to drop it from the queue.")


class UserSession:
    """One browser tab's state: its last result, last seed and the cancel and interrupt switches of its running job.

    A plain class, not a dataclass: Gradio serialises dataclass state values into the page config.
    """

    def __init__(self) -> None:
        self.last_seed: int | None = None
        self.last_result: GenerationResult | None = None
        self.cancel: threading.Event | None = None
        self.interruption: Interruption | None = None  # the running job's Interrupt and Skip (None: no job)
        self.finished: threading.Event | None = None  # set when the running job's worker has ended
        self.cancel_unreported = False  # Cancel stopped the job, and its stream (closed by the click) did not say so
        self.step_thumbnails: list[tuple[Image.Image, str]] = []
        self.selected: int = 0  # the gallery image last clicked (what "Send to" sends)
        self.last_ranking: Any = None  # the Rerank view's last ranking (sd_app.rerank_folder.FileRanking)

    def __deepcopy__(self, memo: dict) -> UserSession:
        return UserSession()  # gr.State copies its initial value once per session: start empty


# The "Rerank by" dropdown: label -> value handed to the engine ("off" keeps generation order).
RERANK_CHOICES = {
    "CLIP score": "clip",
    "Contrastive: prompt vs counterfactual captions": "contrastive",
    "Mixed: half CLIP, half contrastive": "mixed",
    "Off: generation order": "off",
}


def user_error(message: str) -> gr.Error:
    """A short message for the user; the server log does not get a traceback for it."""
    return gr.Error(message, print_exception=False)


def integer(name: str, value: Any) -> int:
    """An integer from a UI number (floats like 20.0 accepted); ValueError otherwise."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"{name} must be an integer, got {value!r}")


def number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def canonical_sampler(name: str) -> str:
    """The dropdown's spelling of a sampler name (names are matched case-insensitively)."""
    from pipelines.generation.schedulers import resolve_sampler

    return resolve_sampler(name).label


def caption(seed: int, score: float | None, label: str = "CLIP score", details: dict[str, float] | None = None,
            passed: bool | None = None, stopped_at: int | None = None, total_steps: int = 0) -> str:
    """Gallery caption: ``CLIP 31.2 · seed 123`` (or ``seed 123`` without a reranker); a Weighted score
    shows every scorer's number (``Weighted 0.84 · CLIP 31.2 · Aesthetic 5.8 · seed 123``); an image an
    interrupt or a skip stopped (unscored) says where: ``stopped at step 3 of 20 · seed 123``."""
    if stopped_at is not None:
        return f"stopped at step {stopped_at} of {total_steps} · seed {seed}"
    if score is None:
        return f"seed {seed}"
    short = label.removesuffix(" score")
    if label == "Weighted score":
        parts = [f"{short} {score:.2f}"]
        parts += [f"{name.removesuffix(' score')} {value:.1f}" for name, value in (details or {}).items()
                  if not name.endswith("probability")]
    else:
        parts = [f"{short} {score:.1f}"]
    if passed is False:
        parts.append("below min")
    return " · ".join([*parts, f"seed {seed}"])


def stopped_note(stopped: list[Candidate], total_steps: int) -> str:
    """``2 stopped at step 3 of 20`` for the candidates an interrupt or a skip stopped (several steps when they
    were stopped at different ones, e.g. a minimum score's round finishing pruned candidates)."""
    steps = sorted({c.stopped_at for c in stopped if c.stopped_at is not None})
    where = ", ".join(str(step) for step in steps)
    return f"{len(stopped)} stopped at step{'s' if len(steps) > 1 else ''} {where} of {total_steps}"


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def error_message(error: BaseException) -> str:
    """One line for the user for any generation failure (no traceback)."""
    import torch

    if isinstance(error, (ValueError, Busy)):
        return str(error)
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return "Out of memory: try fewer candidates, a smaller size or fewer steps."
    if isinstance(error, OSError):
        return f"Model files could not be read: {error}"
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"Generation failed ({type(error).__name__}): {first[:300]}"


@contextlib.contextmanager
def reported_to_user(action: str) -> Iterator[None]:
    """Turn any failure inside into a one-line gr.Error; unexpected ones free memory and are logged."""
    try:
        yield
    except ValueError as error:
        raise user_error(str(error)) from None
    except Exception as error:  # noqa: BLE001
        free_memory()
        log.exception("%s failed", action)
        raise user_error(error_message(error)) from None


@contextlib.contextmanager
def uploads_named_as_uploaded(files: list[str]) -> Iterator[None]:
    """A ValueError inside naming an uploaded file by the server's temporary copy (``/tmp/gradio/<hash>/cat.png``)
    names it as the user uploaded it (``cat.png``: Gradio keeps the uploaded name)."""
    try:
        yield
    except ValueError as error:
        message = str(error)
        for file in sorted(map(str, files), key=len, reverse=True):
            message = message.replace(file, Path(file).name)
        if message == str(error):
            raise
        raise ValueError(message) from None


class UiHandlers:
    """Handlers of every view, bound to one engine and one job tracker."""

    def __init__(self, engine: Engine, tracker: JobTracker) -> None:
        self.engine = engine
        self.tracker = tracker
        # (session hash, view's API name) -> that page's events of the view waiting in Gradio's queue; build_demo
        # sets it once the queue exists (sd_app.ui_admission.queued_events)
        self.waiting_in_queue: Callable[[str, str], int] = lambda session_hash, view: 0

    # ---- Generate ---------------------------------------------------------------------------

    def count_tokens(self, prompt: str) -> str:
        """Live counter under the prompt: ``12/75 tokens`` and the chunk count past 75."""
        try:
            count = self.engine.pipeline().count_tokens(prompt or "")
        except Exception as error:  # noqa: BLE001 - a counter must never break typing
            return f"tokens: unavailable ({type(error).__name__})"
        limit = 75 * count.chunks
        chunks = f" · {count.chunks} chunks" if count.chunks > 1 else ""
        return f"{count.tokens}/{limit} tokens{chunks}"

    @staticmethod
    def request_settings(
        prompt: str, negative: str, sampler: str, steps: Any, cfg: Any, width: Any, height: Any, seed: Any, n: Any
    ) -> dict[str, Any]:
        """The Generate view's fields as ``GenerationRequest`` settings; ValueError names the bad one."""
        return {
            "prompt": prompt or "",
            "negative_prompt": negative or "",
            "steps": integer("steps", steps),
            "cfg_scale": number("cfg_scale", cfg),
            "seed": integer("seed", seed),
            "width": integer("width", width),
            "height": integer("height", height),
            "n": integer("candidates", n),
            "sampler": sampler,
        }

    @classmethod
    def build_request(
        cls,
        prompt: str,
        negative: str,
        sampler: str,
        steps: Any,
        cfg: Any,
        width: Any,
        height: Any,
        seed: Any,
        n: Any,
        hires: tuple[Any, ...] | None = None,
        clip_skip: Any = 1,
        pruning: tuple[Any, Any] = (0, 0),
        vae_decoder: str = "Full",
    ) -> GenerationRequest:
        """The validated request for the Generate view's fields; ValueError names the bad one.

        ``hires``: (enabled, scale, upscaler, second-pass steps, denoising strength[, resize to "WxH", empty for
        the scale]) of the hires fix; ``pruning``: (prune_to, prune_at) of early pruning, (0, 0) for none.
        """
        settings = cls.request_settings(prompt, negative, sampler, steps, cfg, width, height, seed, n)
        settings["clip_skip"] = integer("clip_skip", clip_skip)
        settings["prune_to"], settings["prune_at"] = integer("prune_to", pruning[0]), integer("prune_at", pruning[1])
        settings["vae_decoder"] = vae_decoder or "Full"
        if hires is not None and hires[0]:
            from pipelines.generation.conditioning import MAX_SIDE, HiresFix
            from sd_app.arguments import parse_hires_size

            _, scale, upscaler, hires_steps, denoise, *resize = hires
            size = (resize[0] or "").strip() if resize else ""
            resize_x, resize_y = parse_hires_size(size, HIRES_RESIZE_LABEL) if size else (0, 0)
            for side, value in (("width", resize_x), ("height", resize_y)):  # named as the view names them
                if value > MAX_SIDE or value % 8:
                    raise ValueError(f"{HIRES_RESIZE_LABEL}: the {side} must be 0 (keep the aspect) or a multiple "
                                     f"of 8 up to {MAX_SIDE}, got {value}")
            settings["hires"] = HiresFix(
                scale=number("hr_scale", scale),
                upscaler=upscaler,
                steps=integer("hr_second_pass_steps", hires_steps),
                denoising_strength=number("denoising_strength", denoise),
                resize_x=resize_x,
                resize_y=resize_y,
            )
        return GenerationRequest(**settings)

    def generate(
        self,
        prompt: str,
        negative: str,
        sampler: str,
        steps: Any,
        cfg: Any,
        width: Any,
        height: Any,
        seed: Any,
        n: Any,
        rerank: str,
        hires_on: bool,
        hires_scale: Any,
        hires_upscaler: str,
        hires_steps: Any,
        hires_denoise: Any,
        clip_skip: Any,
        scorers: str | None = "",
        min_score: str | None = "",
        extra_rounds: Any = 3,
        session: UserSession | None = None,
        prune_to: Any = 0,
        prune_at: Any = 0,
        vae_decoder: str = "Full",
        hires_resize: str | None = "",
        shown: ShownSelection | None = None,
        progress: gr.Progress = gr.Progress(),
    ) -> Iterator[tuple[Any, ...]]:
        """Run one request in a worker thread; yield (status, previews, gallery, parameters, files).

        ``rerank``: "clip", "contrastive", "mixed" or "off" (generation order); ``scorers`` ("clip:1,
        aesthetic:0.5") overrides it; ``min_score`` ("aesthetic=5.5" or a number) regenerates up to
        ``extra_rounds`` more rounds until a candidate reaches it; ``prune_to`` M > 0 finishes only the
        best M candidates, scored after step ``prune_at`` (early pruning). ``shown``: the selection the page
        shows (its ``gr.State``; None for a script's call): the run is refused if the server's has changed.
        """
        from pipelines.rerank.scorer_specs import parse_min_scores, parse_weights

        rerank_by = rerank or "off"
        hires = (hires_on, hires_scale, hires_upscaler, hires_steps, hires_denoise, hires_resize)
        try:
            request = self.build_request(
                prompt, negative, sampler, steps, cfg, width, height, seed, n, hires, clip_skip, (prune_to, prune_at),
                vae_decoder,
            )
            if rerank_by not in RERANK_CHOICES.values():
                raise ValueError(f"rerank must be one of {', '.join(RERANK_CHOICES.values())}, got {rerank!r}")
            ranking = {
                "scorers": parse_weights(scorers or "") or None,
                "min_score": parse_min_scores(min_score or "") or None,
                "extra_rounds": integer("extra rounds", extra_rounds),
            }
            if rerank_by == "off" and (ranking["scorers"] or ranking["min_score"]):
                if self.engine.reranker is None:  # the view's Rerank by is Off and cannot be changed
                    raise ValueError("This server was started without a reranker (--reranker none): scorers and "
                                     "a minimum score cannot be used")
                raise ValueError("Rerank by is Off: turn it on to use scorers or a minimum score")
        except ValueError as error:
            raise user_error(str(error)) from None
        yield from self._stream(request, rerank_by, session or UserSession(), progress, [], ranking, shown)

    def image_to_image(
        self,
        editor: Any,
        mask: Any,
        prompt: str,
        negative: str,
        sampler: str,
        steps: Any,
        cfg: Any,
        width: Any,
        height: Any,
        seed: Any,
        n: Any,
        rerank: bool,
        strength: Any,
        mask_blur: Any,
        masked_content: str,
        inpaint_area: str,
        padding: Any,
        mask_mode: str,
        resize_mode: str,
        outpaint: Any,
        sides: list[str] | None,
        vae_decoder: str,
        session: UserSession,
        shown: ShownSelection | None = None,
        progress: gr.Progress = gr.Progress(),
    ) -> Iterator[tuple[Any, ...]]:
        """img2img / inpaint / outpaint from the Image to image view; yields as ``generate`` does."""
        from sd_app.ui_image import image_request

        try:
            base = self.request_settings(prompt, negative, sampler, steps, cfg, width, height, seed, n)
            base["vae_decoder"] = vae_decoder or "Full"
            base["clip_skip"] = self.engine.clip_skip  # the server's (this view has no slider), as the API's img2img
            request, notes = image_request(
                base, editor, mask, number("denoising strength", strength), integer("mask blur", mask_blur),
                masked_content, inpaint_area, integer("padding", padding), mask_mode, resize_mode,
                integer("outpaint", outpaint), sides,
            )
        except ValueError as error:
            raise user_error(str(error)) from None
        yield from self._stream(request, "clip" if rerank else "off", session, progress, notes, shown=shown)

    def _stream(
        self, request: GenerationRequest, rerank_by: str, session: UserSession, progress: gr.Progress, notes: list[str],
        ranking: dict[str, Any] | None = None, shown: ShownSelection | None = None,
    ) -> Iterator[tuple[Any, ...]]:
        """Run ``request`` in a worker thread; yield (status, previews, gallery, parameters, files) updates.

        ``rerank_by``: "clip", "contrastive", "mixed" or "off" (generation order); ``shown``: the page's selection,
        which the engine checks once the model is free. The session's ``cancel`` stops the job keeping nothing, its
        ``interruption`` keeps what was made (the view's Interrupt and Skip, the API's)."""
        from pipelines.generation.denoising import Interruption

        cancel = threading.Event()
        interruption = Interruption()
        finished = threading.Event()
        session.cancel, session.interruption, session.finished = cancel, interruption, finished
        session.cancel_unreported = False
        session.step_thumbnails = []
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        expected = shown.selection if shown is not None else None

        def work() -> None:
            try:
                self._work(request, rerank_by, cancel, session, events, ranking or {}, expected, interruption)
            finally:
                finished.set()  # what the report of a cancel waits for (the click closes this stream: after_cancel)

        worker = threading.Thread(target=work, daemon=True, name="generate")
        round_note = ""
        started = time.monotonic()
        worker.start()
        skip = gr.update()
        try:
            yield "Waiting for the model…", skip, skip, skip, skip
            while True:
                kind, payload = events.get()
                while kind == "step" and not events.empty():  # show only the newest step
                    kind, payload = events.get()
                if kind == "round":
                    round_note = f" · {payload}"
                    yield f"{payload} · {time.monotonic() - started:.1f} s", skip, skip, skip, skip
                elif kind == "step":
                    step, total, previews = payload
                    progress((step, total), desc=f"Step {step}/{total}")
                    status = f"Step {step}/{total} · {time.monotonic() - started:.1f} s{round_note}"
                    yield status, previews, skip, skip, skip
                elif kind == "error":
                    session.cancel_unreported = False  # this stream says it
                    yield from self._failed(payload, shown)
                    return
                else:
                    yield self._finished(payload, session, time.monotonic() - started, notes)
                    return
        finally:
            if worker.is_alive():  # the client went away or the event was cancelled: stop the work too
                cancel.set()
            if session.cancel is cancel and not cancel.is_set():
                session.cancel = None  # finished: Cancel now has nothing of this job's to stop
            if session.interruption is interruption:
                session.interruption = None  # nor Interrupt and Skip

    def _work(
        self,
        request: GenerationRequest,
        rerank_by: str,
        cancel: threading.Event,
        session: UserSession,
        events: queue.Queue,
        ranking: dict[str, Any] | None = None,
        expected: tuple[str, str | None] | None = None,
        interruption: Interruption | None = None,
    ) -> None:
        import torch

        from pipelines.generation.previews import PreviewStream
        from pipelines.generation.text_to_image import GenerationCancelled

        try:
            pipe = self.engine.pipeline()
            stream = PreviewStream()  # on a GPU, previews of the newest latents that reached the host
            with self.tracker.job(request.total_steps, cancel, "ui", interruption=interruption) as job:

                def on_step(info: Any) -> None:
                    self.tracker.step(job, info)
                    stream.push(info.latents, info.step)
                    arrived = stream.latest()
                    if arrived is None:
                        return
                    previews = pipe.preview_latents(arrived.wait(), size=PREVIEW_PX)
                    thumb = previews[0].copy()
                    thumb.thumbnail((THUMB_PX, THUMB_PX))
                    session.step_thumbnails.append((thumb, f"step {arrived.step}/{info.total}"))
                    events.put(("step", (arrived.step, info.total, previews)))

                result = self.engine.generate(
                    request,
                    rerank=rerank_by != "off",
                    rerank_by=None if rerank_by == "off" or (ranking or {}).get("scorers") else rerank_by,
                    on_step=on_step,
                    on_round=lambda report: events.put(("round", report.text())),
                    cancel=cancel,
                    interruption=interruption,
                    expect_selection=expected,
                    **(ranking or {}),
                )
            events.put(("done", result))
        except BaseException as error:  # noqa: BLE001 - handed to the UI thread, which reports it
            expected = (ValueError, Busy, GenerationCancelled, MemoryError, torch.OutOfMemoryError)
            if not isinstance(error, (ValueError, Busy)):
                free_memory()
            if not isinstance(error, expected):
                log.exception("generation failed")
            events.put(("error", error))

    def _failed(self, error: BaseException, shown: ShownSelection | None = None) -> Iterator[tuple[Any, ...]]:
        from pipelines.generation.text_to_image import GenerationCancelled
        from sd_app.engine import SelectionChanged

        skip = gr.update()
        if isinstance(error, GenerationCancelled):
            yield f"Cancelled ({error}).", [], skip, skip, skip  # no stale previews; the last results stay
            return
        if isinstance(error, SelectionChanged) and shown is not None:
            message = changed_message(shown, self.shown_selection())  # the page's widgets follow after the run
        else:
            message = error_message(error)
        yield f"Failed: {message}", skip, skip, skip, skip  # not "Waiting for the model…" under the popup
        raise user_error(message)

    @staticmethod
    def _finished(
        result: GenerationResult, session: UserSession, seconds: float, notes: list[str] | None = None
    ) -> tuple[Any, ...]:
        """The view's final (status, previews, gallery, parameters, files); an interrupted result shows its
        finished candidates (ranked) then the stopped ones, which their captions mark."""
        skip = gr.update()
        if not result.candidates:  # interrupted before its first step: the view keeps its last results
            return "Interrupted before the first step: nothing was made.", skip, skip, skip, skip
        session.last_result = result
        session.last_seed = result.request.seed
        session.selected = 0
        total = result.request.total_steps
        items = [
            (str(c.path) if c.path else c.image,
             caption(c.seed, c.score, result.score_label, c.details, c.passed, c.stopped_at, total))
            for c in result.candidates
        ]
        files = [str(c.path) for c in result.candidates if c.path]
        best = result.candidates[0]
        stopped = [c for c in result.candidates if c.stopped_at is not None]
        if result.interrupted:
            status = f"Interrupted: {len(result.candidates) - len(stopped)} finished image(s)"
            status += f", {stopped_note(stopped, total)}" if stopped else ""
            status += f" in {seconds:.1f} s"
        else:
            status = f"Done: {len(result.candidates)} image(s) in {seconds:.1f} s"
            if stopped:
                status += f" · {stopped_note(stopped, total).replace('stopped', 'skipped', 1)}"
        if best.score is not None:
            status += f" · best {result.score_label} {best.score:.1f} (seed {best.seed})"
        tokens = result.prompt_tokens
        if tokens is not None and tokens.chunks > 1:
            status += f" · prompt: {tokens.tokens} tokens in {tokens.chunks} chunks of 75"
        if result.min_scores:
            wanted = ", ".join(f"{label} {value:g}" for label, value in result.min_scores.items())
            status += (f" · minimum {wanted} reached in round {result.rounds}" if result.passed else
                       f" · no candidate reached the minimum {wanted} in {result.rounds} round(s); showing the best")
        if result.prompt_truncated_for_scoring:
            status += " · the reranker read only the first 77 tokens"
        if result.pruned:
            listed = ", ".join(f"seed {c.seed} ({c.score:.1f})" for c in result.pruned)
            status += f" · pruned at step {result.pruned[0].at_step} by {result.early_scorer}: {listed}"
        for note in notes or []:
            status += f" · {note}"
        return status, skip, items, best.parameters, files

    @staticmethod
    def outpaint_content(pixels: Any, current: str) -> Any:
        """Masked content when the canvas is padded: "fill" (the new border starts from the colours around it,
        as the CLI's --outpaint and A1111's outpainting scripts do) unless the user chose another than the
        default "original"; unchanged otherwise."""
        return "fill" if pixels and current == "original" else gr.update()

    @staticmethod
    def cancel(session: UserSession, queued: int = 0) -> str:
        """Set the running job's cancel event: it stops within one step and keeps nothing. The click also closes the
        job's stream (the button's ``cancels``), so the view's last line comes from ``after_cancel``. ``queued``: the
        view's jobs still waiting in Gradio's queue, which that ``cancels`` drops. (Interrupt and Skip cannot have
        ``cancels``: closing a running job's stream would lose what they keep.)"""
        if session.cancel is None or (session.finished is not None and session.finished.is_set()):
            return DROPPED_NOTE if queued else "Nothing to cancel."  # (a cancelled job's event stays set)
        session.cancel_unreported = session.cancel_unreported or not session.cancel.is_set()
        session.cancel.set()
        return "Cancelling…"

    @staticmethod
    def after_cancel(session: UserSession) -> tuple[Any, Any]:
        """(status, previews) after the view's run event failed or was cancelled: once a job that Cancel stopped has
        ended, say so and clear its stale previews; otherwise (an error, which said so itself) leave both."""
        skip = gr.update()
        if not session.cancel_unreported:
            return skip, skip
        session.cancel_unreported = False
        if session.finished is not None and not session.finished.wait(CANCEL_WAIT_S):
            return "Cancelling… (the job stops at its next step)", skip
        return "Cancelled: the job stopped; nothing was kept.", []

    @staticmethod
    def interrupt(session: UserSession, queued: int = 0) -> str:
        """A1111's Interrupt: stop the view's running job, keeping what it made (its finished images, then the ones
        being denoised as they are at the step reached); the job answers with them."""
        if session.interruption is None:
            return WAITING_NOTE.format(action="interrupt") if queued else "Nothing to interrupt."
        session.interruption.interrupt()
        return "Interrupting…"

    @staticmethod
    def skip(session: UserSession, queued: int = 0) -> str:
        """A1111's Skip: stop the batch the view's job is denoising, keeping its images as they are, and go on with
        the next batch."""
        if session.interruption is None:
            return WAITING_NOTE.format(action="skip") if queued else "Nothing to skip."
        session.interruption.skip()
        return "Skipping…"

    def stop_buttons(self, view: str) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
        """The view's Interrupt, Skip and Cancel handlers for Gradio; each also knows whether the page's job of
        ``view`` (its run event's API name) still waits in Gradio's queue (``self.waiting_in_queue``)."""
        handlers = self

        def queued(request: gr.Request | None) -> int:
            session_hash = getattr(request, "session_hash", None)
            return handlers.waiting_in_queue(session_hash, view) if session_hash else 0

        def interrupt(session: UserSession, request: gr.Request) -> str:
            return handlers.interrupt(session, queued(request))

        def skip(session: UserSession, request: gr.Request) -> str:
            return handlers.skip(session, queued(request))

        def cancel(session: UserSession, request: gr.Request) -> str:
            return handlers.cancel(session, queued(request))

        return interrupt, skip, cancel

    @staticmethod
    def reuse_seed(session: UserSession) -> int:
        return session.last_seed if session.last_seed is not None else -1

    @staticmethod
    def select_candidate(session: UserSession, evt: gr.SelectData) -> str:
        """Parameters text of the clicked gallery image."""
        result = session.last_result
        if result is None or evt.index is None or not 0 <= int(evt.index) < len(result.candidates):
            return gr.update()
        session.selected = int(evt.index)
        return result.candidates[int(evt.index)].parameters

    @staticmethod
    def send_result_to_image(session: UserSession) -> tuple[Any, ...]:
        """The selected (else best) result and its settings into the Image to image view, and switch to it."""
        result = session.last_result
        if result is None or not result.candidates:
            raise user_error("Generate an image first, then send it.")
        candidate = result.candidates[min(session.selected, len(result.candidates) - 1)]
        request = result.request
        return (
            {"background": candidate.image, "layers": [], "composite": candidate.image},
            request.prompt,
            request.negative_prompt,
            canonical_sampler(request.sampler),
            request.steps,
            request.cfg_scale,
            candidate.seed,
            gr.Tabs(selected="img2img"),
        )

    # ---- Checkpoint and VAE -----------------------------------------------------------------

    def checkpoint_choices(self) -> list[str]:
        """The model folders' checkpoints by A1111 name (the selected model first if it is not one of them)."""
        names = [e.name for e in self.engine.library().files("checkpoint") if e.refused is None]
        current = self.checkpoint_value()
        return names if current in names else [current, *names]

    def checkpoint_value(self) -> str:
        """The dropdown's spelling of the selected checkpoint."""
        model = str(self.engine.model)
        if model == "embedded":
            from pipelines.models.library import EMBEDDED_NAME

            return EMBEDDED_NAME
        for entry in self.engine.library().files("checkpoint"):
            if str(entry.path) == model or model in (entry.name, entry.stem):
                return entry.name
        return model

    def current_settings(self) -> tuple[Any, ...]:
        """The server's selection as it is now, for a page being opened (the page was built at start; a switch
        over the HTTP API or from another page may have changed it since): checkpoint and VAE dropdowns,
        clip skip, the two views' VAE decoders, and the page's record of what it shows."""
        shown = self.shown_selection()
        return (gr.update(choices=self.checkpoint_choices(), value=shown.checkpoint),
                gr.update(choices=self.vae_choices(), value=shown.vae),
                shown.clip_skip, shown.vae_decoder, shown.vae_decoder, shown)

    def shown_selection(self) -> ShownSelection:
        """The server's selection as a page shows it (``sd_app.ui_selection``)."""
        from pipelines.models.errors import ModelLoadError

        try:
            selection: tuple[str, str | None] | None = self.engine.selection()
        except ModelLoadError:  # e.g. the selected file was removed: nothing to compare, loading will say so
            selection = None
        return ShownSelection(selection, self.checkpoint_value(), self.vae_value(), self.engine.clip_skip,
                              self.engine.vae_decoder)

    def follow_server(
        self, shown: ShownSelection | None, clip_skip: Any, vae_decoder: Any, image_vae_decoder: Any
    ) -> tuple[Any, ...]:
        """After a run: the page's checkpoint and VAE dropdowns, clip skip and VAE decoders follow a switch made
        elsewhere since the page last showed the selection (``shown``); clip skip and the decoders only where
        the user left them at the default they were shown. Unchanged widgets are not touched."""
        current = self.shown_selection()
        skip = gr.update()
        if shown is None:  # the page never got the selection: show it all, as a page load does
            return self.current_settings()
        moved = current[:3] != shown[:3]
        return (
            gr.update(choices=self.checkpoint_choices(), value=current.checkpoint) if moved else skip,
            gr.update(choices=self.vae_choices(), value=current.vae) if moved else skip,
            follow(clip_skip, shown.clip_skip, current.clip_skip, skip),
            follow(vae_decoder, shown.vae_decoder, current.vae_decoder, skip),
            follow(image_vae_decoder, shown.vae_decoder, current.vae_decoder, skip),
            current,
        )

    def vae_value(self) -> str:
        """The dropdown's spelling of the selected VAE ("None": the checkpoint's own)."""
        from sd_app.checkpoints import vae_shown

        return vae_shown(self.engine.library(), self.engine.vae)

    def vae_choices(self) -> list[str]:
        from sd_app.checkpoints import AUTOMATIC_VAE, OWN_VAE

        names = [e.name for e in self.engine.library().files("vae") if e.refused is None]
        choices = [AUTOMATIC_VAE, OWN_VAE, *names]
        current = self.vae_value()
        return choices + ([current] if current not in choices else [])  # e.g. a --vae path

    def switch_model(self, checkpoint: str, vae: str) -> tuple[Any, ...]:
        """Load the chosen checkpoint and VAE after the running job (the old model is freed)."""
        from sd_app.checkpoints import client_selection

        started = time.monotonic()
        try:
            # The dropdowns' names, or the current selection as shown; a crafted call naming a path is refused.
            chosen = client_selection(self.engine.library(), checkpoint, vae,
                                      lambda: ({self.checkpoint_value()}, {self.vae_value()}))
            self.engine.switch(*chosen)
        except ValueError as error:
            gr.Warning(str(error))
            return f"Not switched: {error}", self.checkpoint_value(), self.vae_value(), self.shown_selection()
        except Exception as error:  # noqa: BLE001
            log.exception("switching the model failed")
            free_memory()
            message = error_message(error)
            return f"Not switched: {message}", self.checkpoint_value(), self.vae_value(), self.shown_selection()
        shown = self.shown_selection()  # what the page shows from now on (its record, for its next run)
        return (f"Loaded {shown.checkpoint} (VAE {shown.vae}) in {time.monotonic() - started:.1f} s",
                shown.checkpoint, shown.vae, shown)

    def refresh_models(self) -> tuple[Any, ...]:
        """Rescan the model folders for the dropdowns (A1111's refresh button); they show the current selection."""
        self.engine.library().refresh()
        shown = self.shown_selection()
        return (gr.update(choices=self.checkpoint_choices(), value=shown.checkpoint),
                gr.update(choices=self.vae_choices(), value=shown.vae),
                gr.update(choices=self.network_choices(), value=None), shown)

    # ---- LoRA and embeddings ----------------------------------------------------------------

    def network_choices(self) -> list[tuple[str, str]]:
        """(label, value) of every usable LoRA and embedding in the model folders, shipped LoRAs first."""
        library = self.engine.library()
        return [(f"{label}: {entry.name}", f"{kind}:{entry.name}")
                for kind, label in (("lora", "LoRA"), ("embedding", "Embedding"))
                for entry in library.files(kind) if entry.refused is None]

    @staticmethod
    def add_network(prompt: str | None, choice: str | None, weight: float) -> str:
        """The prompt with the chosen LoRA's ``<lora:NAME:W>`` tag (its weight replaced when the tag is already
        there) or the embedding's name (A1111 ``extra_networks``: the tag or the name is what the prompt holds)."""
        text = (prompt or "").rstrip()
        if not choice:
            raise user_error("Choose a LoRA or an embedding first")
        kind, _, name = choice.partition(":")
        if kind == "lora":
            try:
                tag = f"<lora:{name}:{number('LoRA weight', weight):g}>"
            except ValueError as error:
                raise user_error(str(error)) from None
            existing = re.compile(rf"<lora:{re.escape(name)}(?::[^>]*)?>")
            if existing.search(text):
                return existing.sub(lambda _: tag, text, count=1)
            return f"{text} {tag}".lstrip()
        if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text):
            return text  # the embedding is already in the prompt
        return f"{text} {name}".lstrip()

    # ---- Inspect ----------------------------------------------------------------------------

    def inspect(
        self, prompt: str, negative: str, cfg: Any, width: Any, height: Any, n: Any, texts: str, session: UserSession
    ) -> tuple[Any, ...]:
        """Tokens + ids, embedding and latent shapes, per-step thumbnails, similarity table, PCA map."""
        from sd_app.ui_inspect import embedding_shapes, similarity, token_rows

        with reported_to_user("inspect"):
            pipe = self.engine.pipeline()
            for name, text in (("prompt", prompt or ""), ("negative_prompt", negative or "")):
                if self.engine.limits is not None:  # before any work that grows with the prompt
                    self.engine.limits.check_text(name, text, pipe.count_tokens)
            extra = self.texts_to_score(texts)
            rows = token_rows(pipe.components.tokenizer, prompt or "")
            shapes = embedding_shapes(
                pipe,
                prompt or "",
                negative or "",
                number("cfg_scale", cfg),
                integer("width", width),
                integer("height", height),
                integer("candidates", n),
            )
            from pipelines.rerank.counterfactuals import counterfactual_captions
            from pipelines.rerank.prompt_text import scoring_prompt

            captions = counterfactual_captions(scoring_prompt(prompt or ""))
            if captions:
                shapes += "\n\n**Counterfactual captions** (what contrastive reranking weighs the prompt against):\n"
                shapes += "\n".join(f"- {c.text} ({c.kind})" for c in captions)
            table, pca = None, None
            result = session.last_result
            if result is not None:
                scorer = self.engine.scorer()
                if scorer is None:
                    shapes += "\n\nNo reranker is loaded, so there is no similarity table or map."
                else:
                    table, pca = similarity(scorer, result, extra)
            else:
                shapes += "\n\nGenerate images to see their per-step latents, similarity table and PCA map."
        return rows, shapes, list(session.step_thumbnails), table, pca

    # ---- Score ------------------------------------------------------------------------------

    def texts_to_score(self, texts: str | None) -> list[str]:
        """The non-empty lines of ``texts``: at most ``MAX_TEXTS``, each within the server's prompt limit (each is
        encoded and scored against every image; ValueError otherwise)."""
        lines = [line.strip() for line in (texts or "").splitlines() if line.strip()]
        if len(lines) > MAX_TEXTS:
            raise ValueError(f"at most {MAX_TEXTS} texts, one per line; got {len(lines)}")
        if self.engine.limits is not None:
            for line in lines:
                self.engine.limits.check_text("a text", line)
        return lines

    def score(self, files: list[str] | None, texts: str) -> list[list[Any]]:
        """Zero-shot table: for each uploaded image, every text with cosine, logit and probability."""
        from pipelines.rerank.clip_scorer import load_image_file
        from pipelines.rerank.prompt_text import scoring_prompt

        try:
            lines = self.texts_to_score(texts)
        except ValueError as error:
            raise user_error(str(error)) from None
        if not files:
            raise user_error("Upload at least one image.")
        if not lines:
            raise user_error("Type at least one text (one per line).")
        with reported_to_user("score"), uploads_named_as_uploaded(files):  # not the server's temporary copies
            scorer = self.engine.scorer()
            if scorer is None:
                raise ValueError("no CLIP model is loaded (the server was started with --reranker none)")
            rows = []
            for file in files:
                path = Path(file)
                image = load_image_file(path, convert=True)
                for row in scorer.zero_shot(image, [scoring_prompt(line) for line in lines]):
                    rows.append(
                        [path.name, row.text, round(row.cosine, 4), round(row.logit, 2), round(row.probability, 4)]
                    )
            return rows

    # ---- PNG info ---------------------------------------------------------------------------

    @staticmethod
    def png_info(file: str | None) -> tuple[str, dict[str, Any] | None]:
        """The ``parameters`` text of a dropped PNG and its parsed fields."""
        from PIL import Image, UnidentifiedImageError

        from sd_app.metadata import parse_parameters, read_png_parameters

        if not file:
            return "", None
        try:
            with Image.open(file) as image:
                text = read_png_parameters(image)
        except (OSError, UnidentifiedImageError):
            raise user_error(f"{Path(file).name} is not a readable image") from None
        if text is None:
            raise user_error(f"{Path(file).name} has no 'parameters' text (not made by sd-app or AUTOMATIC1111?)")
        try:
            return text, parse_parameters(text)
        except ValueError as error:
            return text, {"error": str(error)}

    @staticmethod
    def send_to_generate(text: str, library: ModelLibrary | None = None) -> tuple[Any, ...]:
        """Fill the Generate view (hires fix included) from a parameters text and switch to it; with a ``library``,
        its LoRAs found by their ``Lora hashes`` as A1111 does on a paste (``local_lora_names``)."""
        from pipelines.generation.conditioning import LATENT_UPSCALERS, PIXEL_UPSCALERS, HiresFix
        from sd_app.metadata import parse_parameters, request_from_parameters, with_local_loras

        try:
            params = with_local_loras(parse_parameters(text or ""), library)
            upscaler = params.get("Hires upscaler")
            if upscaler is not None and upscaler not in (*LATENT_UPSCALERS, *PIXEL_UPSCALERS):
                # e.g. A1111's R-ESRGAN 4x+: fill in the rest rather than refuse the whole text
                gr.Warning(f"Hires upscaler {upscaler!r} is not one of sd-app's; Latent is chosen instead")
                params["Hires upscaler"] = "Latent"
            request = request_from_parameters(params)
        except ValueError as error:
            raise user_error(str(error)) from None
        hires = request.hires or HiresFix()
        return (
            request.prompt,
            request.negative_prompt,
            canonical_sampler(request.sampler),
            request.steps,
            request.cfg_scale,
            request.width,
            request.height,
            request.seed,
            request.hires is not None,
            hires.scale,
            hires.upscaler,
            hires.steps,
            hires.denoising_strength,
            request.clip_skip,
            request.vae_decoder,
            f"{hires.resize_x}x{hires.resize_y}" if hires.resize_x or hires.resize_y else "",
            gr.Tabs(selected="generate"),
        )

    @staticmethod
    def send_png_to_image(file: str | None, text: str, library: ModelLibrary | None = None) -> tuple[Any, ...]:
        """The dropped PNG and its parameters (img2img settings included) into the Image to image view (LoRAs as
        :meth:`send_to_generate` finds them)."""
        from PIL import Image, UnidentifiedImageError

        from sd_app.metadata import (
            image_settings_from_parameters,
            parse_parameters,
            request_from_parameters,
            with_local_loras,
        )
        from sd_app.ui_image import INPAINT_AREAS, MASK_MODES

        if not file:
            raise user_error("Drop a PNG first.")
        try:
            with Image.open(file) as opened:
                image = opened.convert("RGB")
        except (OSError, UnidentifiedImageError):
            raise user_error(f"{Path(file).name} is not a readable image") from None
        skip = gr.update()
        try:
            params = with_local_loras(parse_parameters(text or ""), library)
            request = request_from_parameters(params)
            settings = image_settings_from_parameters(params)
        except ValueError:  # no usable parameters: send the picture alone
            return ({"background": image, "layers": [], "composite": image}, *([skip] * 14),
                    gr.Tabs(selected="img2img"))
        return (
            {"background": image, "layers": [], "composite": image},
            request.prompt,
            request.negative_prompt,
            canonical_sampler(request.sampler),
            request.steps,
            request.cfg_scale,
            request.seed,
            settings.get("strength", skip),
            settings.get("mask_blur", skip),
            settings.get("masked_content", skip),
            INPAINT_AREAS[1] if settings.get("inpaint_full_res") else INPAINT_AREAS[0],
            settings.get("padding", skip),
            MASK_MODES[1] if settings.get("invert_mask") else MASK_MODES[0],
            settings.get("resize_mode", "just resize") if settings else skip,  # A1111 writes only another mode
            request.vae_decoder,
            gr.Tabs(selected="img2img"),
        )
