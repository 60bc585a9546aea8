"""The one engine every front end calls: request -> images (+ CLIP scores) -> PNG files with metadata.

Models load lazily on first use, so building an engine (and importing this module) is cheap.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.request import GenerationRequest
from sd_app.metadata import format_parameters
from sd_app.storage import save_png

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.rerank import ClipScorer
    from pipelines.text_to_image import StepCallback, TextToImagePipeline


@dataclass
class Candidate:
    """One generated image with its seed, CLIP score (if scored), metadata text and file (if saved)."""

    image: Image.Image
    seed: int
    score: float | None
    parameters: str
    path: Path | None = None


@dataclass
class GenerationResult:
    """Candidates best first when reranked (else in generation order) and what produced them."""

    candidates: list[Candidate]
    request: GenerationRequest
    model_name: str
    reranker_name: str | None = None
    prompt_truncated_for_scoring: bool = False

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
    _pipeline: TextToImagePipeline | None = field(default=None, init=False, repr=False)
    _scorer: ClipScorer | None = field(default=None, init=False, repr=False)
    _load_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def pipeline(self) -> TextToImagePipeline:
        """The text-to-image pipeline, loaded on first call."""
        with self._load_lock:
            if self._pipeline is None:
                from pipelines.loading import load_pipeline

                self._pipeline = load_pipeline(self.model, device=self.device, vae=self.vae)
            return self._pipeline

    def scorer(self) -> ClipScorer | None:
        """The CLIP reranker, loaded on first call; None when reranking is switched off."""
        if self.reranker is None:
            return None
        with self._load_lock:
            if self._scorer is None:
                from pipelines.rerank import ClipScorer

                self._scorer = ClipScorer.load(self.reranker, device=self.device)
            return self._scorer

    def generate(
        self,
        request: GenerationRequest,
        *,
        rerank: bool = True,
        keep: int | None = None,
        save: bool = True,
        output_dir: Path | None = None,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        progress: bool = False,
    ) -> GenerationResult:
        """Generate ``request.n`` candidates; score and sort them best first if ``rerank``; save PNGs."""
        if keep is not None and not 1 <= keep <= request.n:
            raise ValueError(f"keep must be between 1 and n={request.n}, got {keep}")
        pipe = self.pipeline()
        output = pipe(request, on_step=on_step, cancel=cancel, progress=progress)
        scores: list[float | None] = [None] * len(output.images)
        scorer = self.scorer() if rerank else None
        truncated = False
        extra_base: dict[str, Any] = {}
        if scorer is not None:
            result = scorer.score(output.images, output.request.prompt)
            scores = list(result.scores)
            truncated = result.truncated
            extra_base["Reranker"] = scorer.name
        order = sorted(range(len(scores)), key=lambda i: -scores[i]) if scorer is not None else list(range(len(scores)))
        if keep is not None:
            order = order[:keep]
        candidates = []
        for index in order:
            extra = dict(extra_base)
            if scores[index] is not None:
                extra = {"CLIP score": f"{scores[index]:.2f}", **extra}
            parameters = format_parameters(
                output.request, output.seeds[index], output.model_name, output.model_hash, extra
            )
            candidate = Candidate(output.images[index], output.seeds[index], scores[index], parameters)
            if save:
                candidate.path = save_png(
                    candidate.image, output_dir or self.output_dir, candidate.seed, request.prompt, parameters
                )
            candidates.append(candidate)
        return GenerationResult(
            candidates=candidates,
            request=output.request,
            model_name=output.model_name,
            reranker_name=scorer.name if scorer is not None else None,
            prompt_truncated_for_scoring=truncated,
        )
