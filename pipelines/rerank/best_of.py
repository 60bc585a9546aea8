"""Best-of-N: generate N candidates in batches, score each against the prompt with CLIP, best first.

Image ``i`` always uses seed ``seed + i`` with its own generator, so splitting the N candidates into
batches changes nothing in the pictures; only memory use and preview granularity depend on it.

An :class:`~pipelines.generation.denoising.Interruption` stops it as A1111's interrupt and skip do
(``modules/processing.py``): an interrupt keeps the candidates finished, ranked among themselves, and after them
the batch being denoised as the pictures of its predicted clean latents at the step reached, unscored; the
later batches are not started. A skip does that to the batch being denoised and goes on with the next one.

What a skip stops is A1111's batch when the caller gives its size (``skip_batch_size``, the API's
``batch_size``; ``n_iter`` such batches make the request), else the part being denoised. The parts stay
those of ``batch_size`` either way, so the pictures are what they were without a skip (the pipeline's
pictures differ by an 8-bit level at most between batch sizes, not always by none). A skipped part's
candidates of later A1111 batches are made again in a part of their own; the skipped batch's candidates in
later parts are run to the step the skip stopped it at and kept there, as A1111 stops a batch together.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from pipelines.generation.denoising import GenerationInterrupted, Interruption
from pipelines.generation.request import GenerationRequest, require_request
from pipelines.rerank.prompt_text import scoring_prompt

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.generation.text_to_image import StepCallback, StepInfo, TextToImageOutput, TextToImagePipeline
    from pipelines.rerank.clip_scorer import ClipScorer
    from pipelines.rerank.contrastive import ContrastiveScorer
    from pipelines.rerank.early_pruning import HeldRuns, PrunedCandidate

DEFAULT_BATCH_SIZE = 4


@dataclass(frozen=True)
class RankedImage:
    """One candidate: its picture, seed, CLIP score (None when not scored) and position made."""

    image: Image.Image
    seed: int
    score: float | None
    generation_index: int
    details: dict[str, float] = field(default_factory=dict)  # other numbers behind the score
    # Steps done when an interrupt or a skip stopped it (its picture: the predicted clean latents); None: finished
    stopped_at: int | None = None


@dataclass(frozen=True)
class BestOfOutput:
    """Candidates best first (generation order when unscored) and what produced them."""

    candidates: list[RankedImage]
    request: GenerationRequest  # seed resolved
    model_name: str
    model_hash: str | None
    reranker: str | None
    prompt_truncated: bool  # the prompt was cut to CLIP's 77 positions for scoring
    score_label: str = "CLIP score"  # what the candidates' scores are
    extra: dict[str, str] = field(default_factory=dict)  # the pipeline's infotext pairs (Lora hashes, TI hashes)
    pruned: list[PrunedCandidate] = field(default_factory=list)  # dropped by early pruning, best early score first
    early_scorer: str | None = None  # what ranked the candidates for early pruning
    early_score_label: str = "CLIP score"  # what the early scores are
    held: HeldRuns | None = field(default=None, repr=False, compare=False)  # the pruned, to finish (hold_pruned)
    interrupted: bool = False  # an interrupt stopped it: the candidates not started are missing

    @property
    def finished(self) -> list[RankedImage]:
        return [c for c in self.candidates if c.stopped_at is None]

    @property
    def stopped(self) -> list[RankedImage]:
        """The candidates an interrupt or a skip stopped on the way, in generation order."""
        return [c for c in self.candidates if c.stopped_at is not None]


def _whole_request_steps(on_step: StepCallback | None, part: int, parts: int) -> StepCallback | None:
    """Report a part's steps as steps of the whole request (part 2 of 3 at step 5/20 -> step 25/60), so
    progress only moves forward and its ETA covers every part."""
    if on_step is None or parts == 1:
        return on_step

    def forward(info: StepInfo) -> None:
        on_step(replace(info, step=part * info.total + info.step, total=parts * info.total))

    return forward


@dataclass(frozen=True)
class Part:
    """Candidates ``start`` .. ``start + n - 1`` denoised together; ``until``: stop them after that step, as
    the skip that stopped the rest of their A1111 batch did (None: run them to the end)."""

    start: int
    n: int
    until: int | None = None

    @property
    def end(self) -> int:
        return self.start + self.n


def skipped_batch_end(index: int, skip_batch_size: int, n: int) -> int:
    """One past the last candidate of the A1111 batch of ``skip_batch_size`` that candidate ``index`` is in."""
    return min((index // skip_batch_size + 1) * skip_batch_size, n)


def after_skip(part: Part, end: int, step: int, parts: list[Part]) -> list[Part]:
    """The parts left once a skip stopped ``part`` at ``step`` and with it the candidates before ``end``: the
    part's candidates from ``end`` on are made again as a part of their own, those of later parts before
    ``end`` are run to ``step`` and stopped there (none when ``step`` is 0: they would have no picture)."""
    if end < part.end:
        return [Part(end, part.end - end), *parts]
    rest: list[Part] = []
    for later in parts:  # in generation order, the first ones within the skipped batch
        if later.start >= end:
            rest.append(later)
            continue
        if step:
            rest.append(Part(later.start, min(later.end, end) - later.start, step))
        if later.end > end:
            rest.append(Part(end, later.end - end))
    return rest


def _run_until(pipe: TextToImagePipeline, request: GenerationRequest, until: int, on_step: StepCallback | None,
               cancel: threading.Event | None, progress: bool, interruption: Interruption | None
               ) -> TextToImageOutput:
    """Run ``request`` and stop it after step ``until`` as a skip does (GenerationInterrupted); an interrupt
    asked meanwhile stops it within a step, as an interrupt."""
    stop = Interruption()

    def forward(info: StepInfo) -> None:
        if on_step is not None:
            on_step(info)
        if info.step >= until:
            stop.skip()
        if interruption is not None and interruption.interrupted:
            stop.interrupt()

    return pipe(request, on_step=forward, cancel=cancel, progress=progress, interruption=stop)


def check_keep(keep: int | None, n: int) -> None:
    """ValueError unless ``keep`` is None or an integer in 1..n (how many of the best candidates to keep)."""
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= n):
        raise ValueError(f"keep must be an integer between 1 and n={n}, got {keep!r}")


def best_of_n(
    pipe: TextToImagePipeline,
    request: GenerationRequest,
    scorer: ClipScorer | ContrastiveScorer | None = None,
    *,
    keep: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    early_scorer: ClipScorer | ContrastiveScorer | None = None,
    on_step: StepCallback | None = None,
    cancel: threading.Event | None = None,
    progress: bool = False,
    hold_pruned: bool = False,
    interruption: Interruption | None = None,
    skip_batch_size: int | None = None,
) -> BestOfOutput:
    """Generate ``request.n`` candidates, rank them by CLIP score if ``scorer`` is given, keep the top ``keep``.

    With ``request.prune_to`` M the candidates are pruned early (:mod:`pipelines.rerank.early_pruning`):
    only M are finished, ranked by their final score; ``pruned`` lists the others with their early score
    (by ``early_scorer`` when given, else by ``scorer``), and with ``hold_pruned`` ``held`` has their runs,
    stopped where they were pruned, for the caller to finish if it needs them. ``interruption``: A1111's
    interrupt and skip (module docstring); the candidates they stopped come last, unscored (``stopped``).
    ``skip_batch_size``: A1111's ``batch_size``, the candidates one skip stops together (None: the part being
    denoised, up to ``batch_size``).
    """
    require_request(request)
    check_keep(keep, request.n)
    sizes = {"batch_size": batch_size, **({"skip_batch_size": skip_batch_size} if skip_batch_size is not None else {})}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if request.prune_to:
        if scorer is None:
            raise ValueError(f"early pruning (prune_to={request.prune_to}) needs a reranker to score the candidates")
        if keep is not None and keep > request.prune_to:
            raise ValueError(f"keep must be at most prune_to={request.prune_to}, got {keep}")
    request = request.resolved()
    plain_prompt = scoring_prompt(request.prompt)  # what every scorer reads (tags and emphasis removed)
    images: list[Image.Image] = []
    seeds: list[int] = []
    made: list[int] = []  # generation index of each image
    model_hash: str | None = None
    extra: dict[str, str] = {}
    pruned: list[PrunedCandidate] = []
    held: HeldRuns | None = None
    early: dict[int, dict[str, float]] = {}  # generation index -> early score, for the kept ones
    early_label = "CLIP score"
    stopped: dict[int, tuple[Image.Image, int]] = {}  # generation index -> (x0 picture, steps done)
    interrupted = False
    if request.prune_to and scorer is not None:
        from pipelines.rerank.early_pruning import early_pruned_images, pruned_candidates

        if interruption is not None:
            interruption.clear_skip()  # a skip asked before the job started stops none (as A1111)
        run = early_pruned_images(
            pipe, request, scorer, plain_prompt, batch_size=batch_size, early_scorer=early_scorer, on_step=on_step,
            cancel=cancel, progress=progress, hold_pruned=hold_pruned, interruption=interruption,
        )
        made = sorted(run.images)
        images, extra, held = [run.images[i] for i in made], run.extra, run.held
        seeds = [request.seeds()[i] for i in made]
        stopped, interrupted = run.unfinished, run.interrupted
        if run.ranking is not None:
            pruned = pruned_candidates(request, run.ranking)
            early = {i: {"Early score": run.ranking.scores[i]} for i in sorted({*made, *stopped})}
            early_label = run.ranking.label
        model_hash = pipe.components.model_hash
    else:
        parts = [Part(start, min(batch_size, request.n - start)) for start in range(0, request.n, batch_size)]
        done = 0
        while parts:
            part, parts = parts[0], parts[1:]
            if interruption is not None:
                if interruption.interrupted:  # asked between two batches: the rest are not started
                    interrupted = True
                    break
                interruption.clear_skip()  # a skip asked after the last batch ended stops none (as A1111)
            steps = _whole_request_steps(on_step, done, done + 1 + len(parts))
            done += 1
            part_request = replace(request, seed=request.seeds()[part.start], n=part.n)
            try:
                if part.until is None:
                    output = pipe(part_request, on_step=steps, cancel=cancel, progress=progress,
                                  interruption=interruption)
                else:
                    output = _run_until(pipe, part_request, part.until, steps, cancel, progress, interruption)
            except GenerationInterrupted as stop:
                model_hash, extra = pipe.components.model_hash, stop.extra
                end = part.end  # the candidates this stop stops are those before it
                if stop.skipped and part.until is None and skip_batch_size is not None:
                    end = skipped_batch_end(part.start, skip_batch_size, request.n)
                stopped.update({part.start + i: kept for i, kept in stop.unfinished.items() if part.start + i < end})
                if not stop.skipped:
                    interrupted = True
                    break
                if part.until is None:  # (else: the rest of a skipped batch, stopped at its step)
                    parts = after_skip(part, end, stop.step, parts)
                continue
            images.extend(output.images)
            seeds.extend(output.seeds)
            made.extend(range(part.start, part.start + len(output.images)))
            model_hash = output.model_hash
            extra = output.extra
    scores: list[float | None] = [None] * len(images)
    details: list[dict[str, float]] = [{} for _ in images]
    order = list(range(len(images)))
    truncated, label = False, "CLIP score"
    if scorer is not None and images:
        result = scorer.score(images, plain_prompt)  # prompt encoded once for all candidates
        scores = list(result.scores)
        details = [dict(d) for d in result.details] or details
        order = result.order()
        truncated, label = result.truncated, result.label
    candidates = [RankedImage(images[i], seeds[i], scores[i], made[i], {**details[i], **early.get(made[i], {})})
                  for i in order]
    all_seeds = request.seeds()
    candidates += [RankedImage(picture, all_seeds[i], None, i, early.get(i, {}), stopped_at=step)
                   for i, (picture, step) in sorted(stopped.items())]  # after the finished ones, unscored
    return BestOfOutput(
        candidates=candidates[:keep] if keep is not None else candidates,
        request=request,
        model_name=pipe.name,
        model_hash=model_hash,
        reranker=scorer.name if scorer is not None else None,
        prompt_truncated=truncated,
        score_label=label,
        extra=extra,
        pruned=pruned,
        early_scorer=(early_scorer or scorer).name if request.prune_to and scorer is not None else None,
        early_score_label=early_label,
        held=held,
        interrupted=interrupted,
    )
