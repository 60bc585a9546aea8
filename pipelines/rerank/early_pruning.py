"""Early pruning (speculative best-of-N): run all N candidates for K steps, score each one's predicted
clean image, finish only the best M.

After step K the scheduler's x0 prediction (``pipelines.generation.denoising.predicted_clean``) already
shows the composition the finished image will have (the coarse layout is settled in the first steps of
sampling; Ho et al. 2020, Fig. 6). It is decoded cheaply, by default with the linear latent -> RGB map of
the previews (no VAE: a VAE decode of the embedded model costs about 7 U-Net steps), and scored by the
request's reranker, or by ``early_scorer``: the app passes the model's preview scorer where its folder has
one (``clip_preview/``, a CLIP taught what finished images such previews become). The kept candidates go
on from where they are, so each is the very image its seed gives without pruning, to the last bits of a
batched convolution (one 8-bit level at most; tests/test_early_pruning.py). Compute: N K + M (steps - K)
U-Net steps and M VAE decodes instead of N steps and N decodes. Asked to (``hold_pruned``), the pruned
candidates' runs are set aside after step K (:class:`HeldRuns`), so a caller that needs them after all (a
minimum score the kept ones missed) finishes them from step K, not from their seeds. An interruption
(A1111's interrupt; a skip acts as one here, the candidates being ranked together) keeps the kept candidates
finished so far and the pictures of the others' predicted clean latents at the step they reached.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.generation.denoising import GenerationInterrupted
from pipelines.generation.request import GenerationRequest

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from pipelines.generation.denoising import DenoisingRun, Interruption
    from pipelines.generation.text_to_image import StepCallback, StepInfo, TextToImagePipeline
    from pipelines.rerank.clip_scorer import ClipScorer, ScoreResult
    from pipelines.rerank.contrastive import ContrastiveScorer

# How x0 becomes a picture: the linear latent -> RGB map, the VAE on x0 at half size (a quarter of the
# decode), or the full VAE.
EARLY_DECODERS = ("preview", "vae-half", "taesd", "vae")
DEFAULT_EARLY_DECODER = "preview"
PREVIEW_SIZE = 224  # the preview (h/8 x w/8 pixels) is upscaled to CLIP's input size
PREVIEW_CLIP_FOLDER = "clip_preview"  # a model folder's preview scorer: a CLIP folder beside unet/, vae/ ...


@dataclass(frozen=True)
class PrunedCandidate:
    """A candidate dropped after step ``at_step``: its seed, early score and position made."""

    seed: int
    score: float
    generation_index: int
    at_step: int
    details: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EarlyRanking:
    """The early scores of all candidates (generation order) and the rows kept, best first."""

    scores: list[float]
    details: list[dict[str, float]]
    kept: list[int]  # generation indices, best first
    pruned: list[int]  # generation indices, best first
    label: str = "CLIP score"  # what the early scores are


@dataclass
class EarlyPruned:
    """What :func:`early_pruned_images` made: the kept candidates' images and, when interrupted, the rest."""

    images: dict[int, Image.Image]  # generation index -> finished image of a kept candidate
    ranking: EarlyRanking | None  # None when interrupted before every candidate reached step K
    extra: dict[str, Any]  # the networks' infotext pairs
    held: HeldRuns | None = None  # the pruned candidates' runs (``hold_pruned``)
    unfinished: dict[int, tuple[Image.Image, int]] = field(default_factory=dict)  # index -> (x0 picture, steps)
    interrupted: bool = False


def pruned_request_steps(request: GenerationRequest) -> int:
    """Candidate-steps of a pruned request: all N candidates to step K, the kept M to the end."""
    return request.n * request.prune_at + request.prune_to * (request.steps - request.prune_at)


@dataclass
class HeldRuns:
    """The runs of pruned candidates, stopped after step K, and the request that started them.

    Each run holds latents, scheduler history and prompt states of a few images (kilobytes at 512x512), and
    the pipeline it runs on."""

    request: GenerationRequest  # seed resolved
    runs: list[tuple[list[int], DenoisingRun]] = field(default_factory=list)  # (generation indices, run of them)

    @property
    def steps_left(self) -> int:
        """Candidate-steps to finish them all."""
        return sum(run.n * (run.total - run.step) for _, run in self.runs)

    def finish(
        self,
        pipe: TextToImagePipeline,
        *,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        progress: bool = False,
        interruption: Interruption | None = None,
    ) -> dict[int, Image.Image]:
        """Run every held candidate to the end and decode it: generation index -> image. Each is the image its
        seed gives without pruning (to one 8-bit level). ``on_step`` counts candidate-steps; the runs are used up.
        Interrupted: GenerationInterrupted with ``finished`` and ``unfinished`` by generation index."""
        request, runs, total = self.request, self.runs, self.steps_left
        self.runs = []
        with pipe.generating():
            pipe.activate_networks(request.prompt, request.negative_prompt)  # the prompt's LoRAs, as when started
            return _finish_runs(pipe, runs, request.vae_decoder, on_step, [0], total, cancel, progress, interruption)


def _finish_runs(
    pipe: TextToImagePipeline,
    runs: list[tuple[list[int], DenoisingRun]],
    vae_decoder: str,
    on_step: StepCallback | None,
    done: list[int],
    total: int,
    cancel: threading.Event | None,
    progress: bool,
    interruption: Interruption | None = None,
) -> dict[int, Image.Image]:
    """Run each (generation indices, run of them) to its end and decode the images: generation index -> image,
    in generation order. Call inside ``pipe.generating()``; ``on_step`` counts candidate-steps, ``done`` of
    ``total`` (``_counting``). Interrupted: GenerationInterrupted with the runs finished before (``finished``)
    and the pictures of the others' predicted clean latents (``unfinished``), by generation index."""
    finished: dict[int, torch.Tensor] = {}  # generation index -> final latents [C, h, w]
    for position, (indices, run) in enumerate(runs):
        try:
            latents = run.run(on_step=_counting(on_step, done, run.n, total), cancel=cancel, progress=progress,
                              interruption=interruption)
        except GenerationInterrupted as stop:
            stop.finished = _decoded(pipe, finished, vae_decoder)
            stop.unfinished = unfinished_pictures(pipe, runs[position:], vae_decoder)
            raise
        finished.update(zip(indices, latents, strict=True))
    return _decoded(pipe, finished, vae_decoder)


def _decoded(pipe: TextToImagePipeline, latents: dict[int, torch.Tensor], vae_decoder: str) -> dict[int, Image.Image]:
    """Generation index -> image of latents [C, h, w] by generation index, decoded together in index order."""
    import torch

    if not latents:
        return {}
    order = sorted(latents)
    images = pipe.decode(torch.stack([latents[i] for i in order]), vae_decoder)
    return dict(zip(order, images, strict=True))


def unfinished_pictures(
    pipe: TextToImagePipeline, runs: list[tuple[list[int], DenoisingRun]], vae_decoder: str
) -> dict[int, tuple[Image.Image, int]]:
    """Generation index -> (picture of the predicted clean latents, steps done) of runs stopped on the way; a run
    that has not evaluated the U-Net yet has none."""
    pictures: dict[int, tuple[Image.Image, int]] = {}
    for indices, run in runs:
        clean = run.predicted_clean()  # [n, C, h, w] or None
        if clean is not None:
            decoded = _decoded(pipe, dict(zip(indices, clean, strict=True)), vae_decoder)
            pictures.update({i: (image, run.step) for i, image in decoded.items()})
    return pictures


def preview_scorer_folder(model_folder: Path) -> Path | None:
    """The preview scorer shipped inside a diffusers model folder (``clip_preview/``), or None."""
    folder = model_folder / PREVIEW_CLIP_FOLDER
    return folder if (folder / "config.json").is_file() else None


def decode_clean(pipe: TextToImagePipeline, clean: torch.Tensor, decoder: str = DEFAULT_EARLY_DECODER
                 ) -> list[Image.Image]:
    """Pictures of predicted clean latents [n, C, h, w]: ``preview`` (linear map, upscaled), ``vae-half``
    (latents area-downsampled 2x, then the VAE), ``taesd`` (the model's tiny decoder) or ``vae``."""
    if decoder == "preview":
        return pipe.preview_latents(clean, size=PREVIEW_SIZE)
    if decoder == "vae-half":
        import torch

        return pipe.decode(torch.nn.functional.avg_pool2d(clean, 2))  # [n, C, h/2, w/2] -> H/2 x W/2 images
    if decoder == "taesd":
        return pipe.decode(clean, "TAESD")
    if decoder == "vae":
        return pipe.decode(clean)
    raise ValueError(f"decoder must be one of {', '.join(EARLY_DECODERS)}, got {decoder!r}")


def rank_early(result: ScoreResult, keep: int) -> EarlyRanking:
    """Keep the ``keep`` best by the scorer's order (ties by input index), prune the rest."""
    order = result.order()
    details = [dict(d) for d in result.details] or [{} for _ in result.scores]
    return EarlyRanking(list(result.scores), details, order[:keep], order[keep:], result.label)


def _counting(on_step: StepCallback | None, done: list[int], rows: int, total: int) -> StepCallback | None:
    """Progress in candidate-steps of the whole request: a step of a batch of ``rows`` moves it by ``rows``."""
    if on_step is None:
        return None

    def forward(info: StepInfo) -> None:
        done[0] += rows
        on_step(replace(info, step=done[0], total=total))

    return forward


def early_pruned_images(
    pipe: TextToImagePipeline,
    request: GenerationRequest,
    scorer: ClipScorer | ContrastiveScorer,
    prompt: str,
    *,
    batch_size: int,
    decoder: str = DEFAULT_EARLY_DECODER,
    early_scorer: ClipScorer | ContrastiveScorer | None = None,
    on_step: StepCallback | None = None,
    cancel: threading.Event | None = None,
    progress: bool = False,
    hold_pruned: bool = False,
    interruption: Interruption | None = None,
) -> EarlyPruned:
    """Run ``request`` (seed resolved, ``prune_to`` M and ``prune_at`` K set) with pruning: the kept
    candidates' images, the ranking, the networks' infotext, and with ``hold_pruned`` the pruned candidates'
    runs (else None).

    ``early_scorer`` ranks the x0 pictures (default: ``scorer``), e.g. a model's preview scorer, a CLIP
    fine-tuned on its own x0 previews (:mod:`pipelines.training.clip_previews`). ``on_step`` counts
    candidate-steps: N K + M (steps - K) in all, monotonic. Interrupted (or skipped) before step K, every
    candidate started is unfinished and none ranked; after, the kept candidates not finished are.
    """
    import torch

    pipe.check_decoder(request.vae_decoder)
    n, keep, at = request.n, request.prune_to, request.prune_at
    total = pruned_request_steps(request)
    done = [0]
    runs: list[tuple[int, DenoisingRun]] = []  # (first generation index, run)
    extra: dict[str, Any] = {}
    with pipe.generating():
        for start in range(0, n, batch_size):
            part = replace(request, seed=request.seeds()[start], n=min(batch_size, n - start), prune_to=0,
                           prune_at=0)
            run, extra = pipe.start(part, track_clean=True)
            runs.append((start, run))
            try:
                run.run(at, on_step=_counting(on_step, done, part.n, total), cancel=cancel, progress=progress,
                        interruption=interruption)
            except GenerationInterrupted:
                started = [(list(range(first, first + r.n)), r) for first, r in runs]
                unfinished = unfinished_pictures(pipe, started, request.vae_decoder)
                return EarlyPruned({}, None, extra, unfinished=unfinished, interrupted=True)
        clean = torch.cat([run.clean for _, run in runs])  # [N, C, h, w], x0 predicted at step K
        ranking = rank_early((early_scorer or scorer).score(decode_clean(pipe, clean, decoder), prompt), keep)
        held = HeldRuns(request) if hold_pruned else None
        kept: list[tuple[list[int], DenoisingRun]] = []  # (generation indices, run of them)
        for start, run in runs:
            rows = [i - start for i in sorted(ranking.kept) if start <= i < start + run.n]
            dropped = [i - start for i in sorted(ranking.pruned) if start <= i < start + run.n]
            if held is not None and dropped:
                aside = run.split_off(dropped) if rows else run  # [len(dropped), ...] at step K
                held.runs.append(([start + row for row in dropped], aside))
            if rows:
                run.keep(rows)
                kept.append(([start + row for row in rows], run))
        try:
            finished = _finish_runs(pipe, kept, request.vae_decoder, on_step, done, total, cancel, progress,
                                    interruption)
        except GenerationInterrupted as stop:
            return EarlyPruned(stop.finished, ranking, extra, held, stop.unfinished, interrupted=True)
    return EarlyPruned(finished, ranking, extra, held)  # the M kept images


def pruned_candidates(request: GenerationRequest, ranking: EarlyRanking) -> list[PrunedCandidate]:
    """The dropped candidates, best early score first."""
    seeds = request.seeds()
    return [
        PrunedCandidate(seeds[i], ranking.scores[i], i, request.prune_at, ranking.details[i]) for i in ranking.pruned
    ]


def format_pruned(pruned: list[PrunedCandidate]) -> str:
    """``seed: score`` of each pruned candidate, for the infotext ("Pruned early: 1236: 21.30, ...")."""
    return ", ".join(f"{c.seed}: {c.score:.2f}" for c in pruned)
