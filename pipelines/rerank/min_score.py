"""Best-of-N until a candidate reaches minimum scores: more rounds with new seeds, bounded.

Round ``r`` (0-based) generates the request's ``n`` candidates from seed ``seed + r * n``, so the
candidates of all rounds carry the consecutive seeds ``seed, seed + 1, ...`` a single larger request
would have had, and any one of them can be remade alone. Each round's candidates are scored; the loop
stops after the first round in which one passes (every threshold met, each in its scorer's own units:
:func:`pipelines.rerank.scorer_specs.passes`), or after ``1 + extra_rounds`` rounds. All candidates are then
ranked together (a Weighted score is relative to the candidates ranked together), the passing ones first.

With early pruning (``request.prune_to``) a round finishes only its M best candidates; when none of them
passes, the next round finishes the N - M it pruned (the same seeds, going on from the step they were
pruned at, so each is its seed's whole image), and the round after that starts new seeds again. Pruning
then costs nothing in fidelity where it matters: a request whose kept candidates fall short gets every
candidate of the round, as best-of-N without pruning would have, and at no more U-Net steps.

Interrupted (A1111's interrupt, :class:`~pipelines.generation.denoising.Interruption`), no round follows: the
candidates finished in all rounds are ranked together, and the ones stopped on the way come after them,
unscored. A skip stops the batch being denoised and the round goes on (``best_of_n``); while pruned candidates
are being finished, it stops them all, as an interrupt. A skip asked between two rounds stops none.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from pipelines.generation.denoising import GenerationInterrupted
from pipelines.generation.request import MAX_SEED, GenerationRequest
from pipelines.rerank.best_of import DEFAULT_BATCH_SIZE, BestOfOutput, RankedImage, _whole_request_steps, best_of_n
from pipelines.rerank.prompt_text import scoring_prompt
from pipelines.rerank.scorer_specs import passes

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.generation.denoising import Interruption
    from pipelines.generation.text_to_image import StepCallback, StepInfo, TextToImagePipeline
    from pipelines.rerank.clip_scorer import ClipScorer, ScoreResult
    from pipelines.rerank.early_pruning import HeldRuns, PrunedCandidate
    from pipelines.rerank.scorers import Scorer

MAX_EXTRA_ROUNDS = 10


@dataclass(frozen=True)
class RoundReport:
    """After each round: how many of its candidates passed and the best numbers seen so far."""

    round: int  # 1-based
    max_rounds: int
    passed: int  # candidates of this round that reached every minimum
    best: dict[str, float]  # label -> best value over all candidates so far, for the thresholds' labels
    thresholds: dict[str, float]  # label -> minimum

    def text(self) -> str:
        wanted = ", ".join(f"{label} >= {value:g}" for label, value in self.thresholds.items())
        seen = ", ".join(f"{label} {value:.2f}" for label, value in self.best.items())
        if self.passed:
            return f"round {self.round}/{self.max_rounds}: {self.passed} candidate(s) reached {wanted}"
        more = "generating more" if self.round < self.max_rounds else "no rounds left"
        return f"round {self.round}/{self.max_rounds}: none reached {wanted} (best: {seen}); {more}"


@dataclass(frozen=True)
class MinScoreOutput:
    """The pooled candidates best first (passing ones first) and how the rounds went."""

    output: BestOfOutput
    rounds: int
    max_rounds: int
    thresholds: dict[str, float]  # label -> minimum
    # per candidate of ``output``, in its order; None for one an interrupt or a skip stopped (never scored)
    passed: list[bool | None] = field(default_factory=list)
    candidates_made: int = 0  # started over all rounds: n per round of new seeds (pruned ones included)

    @property
    def any_passed(self) -> bool:
        return any(flag is True for flag in self.passed)


def candidate_scores(score: float | None, label: str, details: Mapping[str, float]) -> dict[str, float]:
    """Every labelled number of one candidate: its ranking score and the numbers behind it."""
    scores = dict(details)
    if score is not None:
        scores.setdefault(label, score)
    return scores


def _scores_of(result: ScoreResult, index: int) -> dict[str, float]:
    details = result.details[index] if result.details else {}
    return candidate_scores(result.scores[index], result.label, details)


def _finish_pruned(
    pipe: TextToImagePipeline,
    held: HeldRuns,
    pending: list[PrunedCandidate],
    on_step: StepCallback | None,
    cancel: threading.Event | None,
    progress: bool,
    interruption: Interruption | None = None,
) -> tuple[list[Image.Image], list[int], list[RankedImage]]:
    """The pruned candidates finished from the step they were pruned at, in ``pending``'s order: each its
    seed's own image, as without pruning (to one 8-bit level), and (interrupted) the ones stopped on the way.
    Progress is told in a pruned round's candidate-steps, so that every round moves it by the same amount."""
    from pipelines.rerank.early_pruning import pruned_request_steps

    unit, left = pruned_request_steps(held.request), held.steps_left

    def forward(info: StepInfo) -> None:
        if on_step is not None:
            on_step(replace(info, step=round(info.step * unit / left), total=unit))

    stopped: list[RankedImage] = []
    try:
        # generation index -> image
        finished = held.finish(pipe, on_step=forward, cancel=cancel, progress=progress, interruption=interruption)
    except GenerationInterrupted as stop:
        finished = stop.finished
        stopped = [RankedImage(stop.unfinished[c.generation_index][0], c.seed, None, c.generation_index,
                               stopped_at=stop.unfinished[c.generation_index][1])
                   for c in pending if c.generation_index in stop.unfinished]
    done = [c for c in pending if c.generation_index in finished]
    return [finished[c.generation_index] for c in done], [c.seed for c in done], stopped


def best_of_until_pass(
    pipe: TextToImagePipeline,
    request: GenerationRequest,
    scorer: Scorer,
    thresholds: Mapping[str, float],
    extra_rounds: int,
    *,
    keep: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    early_scorer: ClipScorer | None = None,
    on_step: StepCallback | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
    cancel: threading.Event | None = None,
    progress: bool = False,
    interruption: Interruption | None = None,
    skip_batch_size: int | None = None,
) -> MinScoreOutput:
    """Generate rounds of ``request.n`` candidates until one reaches ``thresholds`` (label -> minimum).

    With ``request.prune_to`` each round of new seeds is pruned early (``early_scorer`` ranks the x0
    pictures, default ``scorer``); a round whose kept candidates all fall short is followed by one that
    finishes the pruned ones (module docstring). ``output.pruned`` lists the candidates never finished;
    ``interruption``: A1111's interrupt and skip (module docstring); ``skip_batch_size``: the candidates of a
    round one skip stops together (``best_of_n``)."""
    if isinstance(extra_rounds, bool) or not isinstance(extra_rounds, int) or not 0 <= extra_rounds <= MAX_EXTRA_ROUNDS:
        raise ValueError(f"extra rounds must be an integer between 0 and {MAX_EXTRA_ROUNDS}, got {extra_rounds!r}")
    if not thresholds:
        raise ValueError("minimum scores are empty: use best_of_n")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be a positive integer, got {keep!r}")
    request = request.resolved()
    max_rounds = 1 + extra_rounds
    prompt = scoring_prompt(request.prompt)
    images: list[Image.Image] = []
    seeds: list[int] = []
    best: dict[str, float] = {}
    last: BestOfOutput | None = None
    result: ScoreResult | None = None
    pending: list[PrunedCandidate] = []  # pruned by the last round of new seeds, not finished yet
    held: HeldRuns | None = None  # their runs, stopped where they were pruned
    fresh = 0  # rounds of new seeds so far
    stopped: list[RankedImage] = []  # stopped on the way by an interrupt or a skip, unscored
    interrupted = False
    for round_index in range(max_rounds):
        round_steps = _whole_request_steps(on_step, round_index, max_rounds)
        if interruption is not None:
            interruption.clear_skip()  # a skip asked between two rounds stops none (as A1111, between batches)
        if pending:  # the kept of the last pruned round fell short: finish the ones it pruned
            assert held is not None  # held whenever a round follows
            new_images, new_seeds, round_stopped = _finish_pruned(
                pipe, held, pending, round_steps, cancel, progress, interruption
            )
            pending, held = [], None
            interrupted = bool(round_stopped)  # a skip too: the pruned are finished together
        else:
            part = replace(request, seed=(request.seed + fresh * request.n) % (MAX_SEED + 1))
            fresh += 1
            last = best_of_n(
                pipe, part, scorer if request.prune_to else None, batch_size=batch_size, early_scorer=early_scorer,
                cancel=cancel, progress=progress, on_step=round_steps, hold_pruned=round_index < max_rounds - 1,
                interruption=interruption, skip_batch_size=skip_batch_size,
            )
            made = sorted(last.finished, key=lambda c: c.generation_index)
            new_images, new_seeds = [c.image for c in made], [c.seed for c in made]  # generation order
            pending, held = list(last.pruned), last.held
            round_stopped, interrupted = last.stopped, last.interrupted
        images.extend(new_images)
        seeds.extend(new_seeds)
        stopped.extend(round_stopped)
        round_scores: list[dict[str, float]] = []
        if new_images:
            result = scorer.score(new_images, prompt)
            round_scores = [_scores_of(result, i) for i in range(len(new_images))]
        for label in thresholds:
            values = [s[label] for s in round_scores if label in s]
            if values:
                best[label] = max([*values, best.get(label, values[0])])
        passed = sum(passes(s, thresholds) for s in round_scores)
        if on_round is not None:
            on_round(RoundReport(round_index + 1, max_rounds, passed, dict(best), dict(thresholds)))
        if passed or interrupted:
            break
    assert last is not None
    rounds = round_index + 1
    if rounds > 1 and images:
        result = scorer.score(images, prompt)  # rank every round's candidates together
    ok = [passes(_scores_of(result, i), thresholds) for i in range(len(images))] if result is not None else []
    order = sorted(result.order(), key=lambda i: not ok[i]) if result is not None else []  # passing first, stable
    details = [dict(d) for d in result.details] if result is not None and result.details else [{} for _ in images]
    candidates = [RankedImage(images[i], seeds[i], result.scores[i], i, details[i]) for i in order]
    candidates += stopped  # after the finished ones, unscored
    kept = candidates[:keep] if keep is not None else candidates
    output = BestOfOutput(
        candidates=kept,
        request=replace(request, n=request.n),
        model_name=last.model_name,
        model_hash=last.model_hash,
        reranker=scorer.name,
        prompt_truncated=result.truncated if result is not None else False,
        score_label=result.label if result is not None else last.score_label,
        extra=last.extra,
        pruned=pending,
        early_scorer=last.early_scorer,
        early_score_label=last.early_score_label,
        interrupted=interrupted,
    )
    passed_flags: list[bool | None] = [ok[i] for i in order] + [None] * len(stopped)
    return MinScoreOutput(output, rounds, max_rounds, dict(thresholds), passed_flags[: len(kept)], request.n * fresh)
