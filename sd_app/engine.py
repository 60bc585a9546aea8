"""The one engine every front end calls: request -> images (+ CLIP scores) -> PNG files with metadata.

Models load lazily on first use, so building an engine (and importing this module) is cheap.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.generation.request import GenerationRequest
from sd_app.metadata import format_parameters
from sd_app.storage import save_png

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.generation.prompts import TokenCount
    from pipelines.generation.text_to_image import StepCallback, TextToImagePipeline
    from pipelines.rerank.clip_scorer import ClipScorer
    from sd_app.limits import RequestLimits


@dataclass
class Candidate:
    """One generated image with its seed, CLIP score (if scored), metadata text and file (if saved)."""

    image: Image.Image
    seed: int
    score: float | None  # by the reranker's measure (result.score_label)
    parameters: str
    path: Path | None = None
    details: dict[str, float] = field(default_factory=dict)  # the numbers behind a contrastive score


@dataclass
class GenerationResult:
    """Candidates best first when reranked (else in generation order) and what produced them."""

    candidates: list[Candidate]
    request: GenerationRequest
    model_name: str
    reranker_name: str | None = None
    prompt_truncated_for_scoring: bool = False
    prompt_tokens: TokenCount | None = None  # CLIP tokens and 75-token chunks the prompt was encoded in
    score_label: str = "CLIP score"  # what the candidates' scores are ("Contrastive score", ...)

    @property
    def images(self) -> list[Image.Image]:
        return [c.image for c in self.candidates]

    @property
    def seeds(self) -> list[int]:
        return [c.seed for c in self.candidates]


@dataclass
class Engine:
    """Holds the loaded models of one app instance; thread-safe lazy loading."""

    model: str = "embedded"
    vae: str | None = None
    reranker: str | None = "embedded"
    output_dir: Path = Path("outputs")
    device: str | None = None
    limits: RequestLimits | None = None  # a server's bounds on one request (none for the CLI)
    _pipeline: TextToImagePipeline | None = field(default=None, init=False, repr=False)
    _scorer: ClipScorer | None = field(default=None, init=False, repr=False)
    _load_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def pipeline(self) -> TextToImagePipeline:
        """The text-to-image pipeline, loaded on first call."""
        with self._load_lock:
            if self._pipeline is None:
                from pipelines.models.loading import load_pipeline

                self._pipeline = load_pipeline(self.model, device=self.device, vae=self.vae)
            return self._pipeline

    def scorer(self) -> ClipScorer | None:
        """The CLIP reranker, loaded on first call; None when reranking is switched off."""
        if self.reranker is None:
            return None
        with self._load_lock:
            if self._scorer is None:
                from pipelines.rerank.clip_scorer import ClipScorer

                self._scorer = ClipScorer.load(self.reranker, device=self.device)
            return self._scorer

    def generate(
        self,
        request: GenerationRequest,
        *,
        rerank: bool = True,
        rerank_by: str = "clip",
        keep: int | None = None,
        save: bool = True,
        output_dir: Path | None = None,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        progress: bool = False,
    ) -> GenerationResult:
        """Generate ``request.n`` candidates; score and sort them best first if ``rerank`` (``rerank_by``:
        "clip", "contrastive" against counterfactual captions, or "mixed"); save PNGs.

        ValueError (nothing generated) when the request breaks the engine's ``limits``.
        """
        from pipelines.rerank.best_of import best_of_n
        from pipelines.rerank.contrastive import RERANK_MODES, reranker_for

        if rerank_by not in RERANK_MODES:
            raise ValueError(f"rerank_by must be one of {', '.join(RERANK_MODES)}, got {rerank_by!r}")
        scorer = self.scorer() if rerank else None
        reranker = reranker_for(scorer, rerank_by) if scorer is not None else None
        pipe = self.pipeline()
        if self.limits is not None:
            self.limits.check(request, pipe.count_tokens)
        output = best_of_n(
            pipe,
            request,
            reranker,
            keep=keep,
            on_step=on_step,
            cancel=cancel,
            progress=progress,
        )
        candidates = []
        for ranked in output.candidates:
            extra: dict[str, Any] = dict(output.extra)  # Lora hashes, TI hashes
            if ranked.score is not None:
                extra[output.score_label] = f"{ranked.score:.2f}"
                extra.update({key: f"{value:.2f}" for key, value in ranked.details.items()})
                extra["Reranker"] = output.reranker
            parameters = format_parameters(
                output.request, ranked.seed, output.model_name, output.model_hash, extra
            )
            candidate = Candidate(ranked.image, ranked.seed, ranked.score, parameters, details=ranked.details)
            if save:
                candidate.path = save_png(
                    candidate.image, output_dir or self.output_dir, candidate.seed, request.prompt, parameters
                )
            candidates.append(candidate)
        return GenerationResult(
            candidates=candidates,
            request=output.request,
            model_name=output.model_name,
            reranker_name=output.reranker,
            prompt_truncated_for_scoring=output.prompt_truncated,
            prompt_tokens=pipe.count_tokens(output.request.prompt),
            score_label=output.score_label,
        )
