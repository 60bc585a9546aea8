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

    from pipelines.generation.text_to_image import StepCallback, TextToImagePipeline
    from pipelines.rerank.clip_scorer import ClipScorer


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
    inpainting_conditioning: bool = False  # the model is an SD inpainting model (9-channel U-Net)

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
        keep: int | None = None,
        save: bool = True,
        output_dir: Path | None = None,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        progress: bool = False,
    ) -> GenerationResult:
        """Generate ``request.n`` candidates; score and sort them best first if ``rerank``; save PNGs."""
        from pipelines.rerank.best_of import best_of_n

        pipe = self.pipeline()
        output = best_of_n(
            pipe,
            request,
            self.scorer() if rerank else None,
            keep=keep,
            on_step=on_step,
            cancel=cancel,
            progress=progress,
        )
        candidates = []
        for ranked in output.candidates:
            extra: dict[str, Any] = {}
            if ranked.score is not None:
                extra = {"CLIP score": f"{ranked.score:.2f}", "Reranker": output.reranker}
            parameters = format_parameters(
                output.request, ranked.seed, output.model_name, output.model_hash, extra
            )
            candidate = Candidate(ranked.image, ranked.seed, ranked.score, parameters)
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
            inpainting_conditioning=pipe.inpainting_unet,
        )
