"""Best-of-N: generate N candidates in batches, score each against the prompt with CLIP, best first.

Image ``i`` always uses seed ``seed + i`` with its own generator, so splitting the N candidates into
batches changes nothing in the pictures; only memory use and preview granularity depend on it.

An :class:`~pipelines.generation.denoising.Interruption` stops it as A1111's interrupt and skip do
(``modules/processing.py``): an interrupt keeps the candidates finished, ranked among themselves, and after them
the batch being denoised as the pictures of its predicted clean latents at the step reached, unscored; the
later batches are not started. A skip does that to the batch being denoised and goes on with the next one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from pipelines.generation.denoising import GenerationInterrupted
from pipelines.generation.extra_networks import strip_network_tags
from pipelines.generation.prompts import parse_emphasis
from pipelines.generation.request import GenerationRequest, require_request

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.generation.denoising import Interruption
    from pipelines.generation.text_to_image import StepCallback, StepInfo, TextToImagePipeline
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
) -> BestOfOutput:
    """Generate ``request.n`` candidates, rank them by CLIP score if ``scorer`` is given, keep the top ``keep``.

    With ``request.prune_to`` M the candidates are pruned early (:mod:`pipelines.rerank.early_pruning`):
    only M are finished, ranked by their final score; ``pruned`` lists the others with their early score
    (by ``early_scorer`` when given, else by ``scorer``), and with ``hold_pruned`` ``held`` has their runs,
    stopped where they were pruned, for the caller to finish if it needs them. ``interruption``: A1111's
    interrupt and skip (module docstring); the candidates they stopped come last, unscored (``stopped``).
    """
    require_request(request)
    check_keep(keep, request.n)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if request.prune_to:
        if scorer is None:
            raise ValueError(f"early pruning (prune_to={request.prune_to}) needs a reranker to score the candidates")
        if keep is not None and keep > request.prune_to:
            raise ValueError(f"keep must be at most prune_to={request.prune_to}, got {keep}")
    request = request.resolved()
    plain = parse_emphasis(strip_network_tags(request.prompt))
    plain_prompt = "".join(span.text for span in plain)  # CLIP reads plain text
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
        parts = range(0, request.n, batch_size)
        for part_index, start in enumerate(parts):
            if interruption is not None:
                if interruption.interrupted:  # asked between two batches: the rest are not started
                    interrupted = True
                    break
                interruption.clear_skip()  # a skip asked after the last batch ended stops none (as A1111)
            part = replace(request, seed=request.seeds()[start], n=min(batch_size, request.n - start))
            try:
                output = pipe(part, on_step=_whole_request_steps(on_step, part_index, len(parts)), cancel=cancel,
                              progress=progress, interruption=interruption)
            except GenerationInterrupted as stop:
                stopped.update({start + i: picture for i, picture in stop.unfinished.items()})
                model_hash, extra = pipe.components.model_hash, stop.extra
                if stop.skipped:
                    continue
                interrupted = True
                break
            images.extend(output.images)
            seeds.extend(output.seeds)
            made.extend(range(start, start + len(output.images)))
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
