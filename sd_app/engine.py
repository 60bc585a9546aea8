"""The one engine every front end calls: request -> images (+ CLIP scores) -> PNG files with metadata.

Models load lazily on first use, so building an engine (and importing this module) is cheap. The
checkpoint and VAE can be switched at run time (``switch``; A1111's options) or for one request
(``generate(..., checkpoint=, vae=)``; A1111's ``override_settings``): a switch waits for the running
job, and at most ``max_loaded`` checkpoints stay in memory (``sd_app.checkpoints``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.generation.request import GenerationRequest, require_request
from sd_app.checkpoints import PipelineCache, checkpoint_path, vae_path
from sd_app.metadata import format_parameters
from sd_app.storage import save_png

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.generation.denoising import Interruption
    from pipelines.generation.prompts import TokenCount
    from pipelines.generation.text_to_image import StepCallback, TextToImagePipeline
    from pipelines.models.library import ModelLibrary
    from pipelines.rerank.clip_scorer import ClipScorer
    from pipelines.rerank.early_pruning import PrunedCandidate
    from pipelines.rerank.min_score import RoundReport
    from pipelines.rerank.scorer_specs import ScorerSpec
    from pipelines.rerank.scorers import Scorer
    from sd_app.limits import RequestLimits


@dataclass
class Candidate:
    """One generated image with its seed, CLIP score (if scored), metadata text and file (if saved)."""

    image: Image.Image
    seed: int
    score: float | None  # by the reranker's measure (result.score_label)
    parameters: str
    path: Path | None = None
    details: dict[str, float] = field(default_factory=dict)  # every scorer's number behind the score
    passed: bool | None = None  # reached the minimum scores (None: no minimum asked)
    # Steps done when an interrupt or a skip stopped it (its picture: the predicted clean latents); None: finished
    stopped_at: int | None = None


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
    inpainting_conditioning: bool = False  # the model is an SD inpainting model (9-channel U-Net)
    model_hash: str | None = None  # of the checkpoint that made the images
    pruned: list[PrunedCandidate] = field(default_factory=list)  # dropped early (request.prune_to), best first
    early_scorer: str | None = None  # what scored the candidates for early pruning (the reranker or a preview scorer)
    early_score_label: str = "CLIP score"
    min_scores: dict[str, float] = field(default_factory=dict)  # label -> minimum asked ({} when none)
    rounds: int = 1  # rounds of candidates generated (more than 1 only to reach the minimum scores)
    max_rounds: int = 1
    candidates_made: int = 0  # candidates started in all rounds, pruned ones included (request.n when one round)
    interrupted: bool = False  # an interrupt stopped it: finished candidates first, then the stopped ones

    @property
    def passed(self) -> bool | None:
        """Some candidate reached the minimum scores (None when none were asked)."""
        return any(c.passed for c in self.candidates) if self.min_scores else None

    @property
    def images(self) -> list[Image.Image]:
        return [c.image for c in self.candidates]

    @property
    def seeds(self) -> list[int]:
        return [c.seed for c in self.candidates]


class SelectionChanged(ValueError):
    """The checkpoint or VAE was switched (by another client) after the caller looked; nothing was generated."""

    def __init__(self, expected: tuple[str, str | None], current: tuple[str, str | None]) -> None:
        super().__init__(f"the selected model changed to {current[0]} (VAE {current[1] or 'its own'}) "
                         f"from {expected[0]} (VAE {expected[1] or 'its own'})")
        self.expected, self.current = expected, current


@dataclass
class Engine:
    """Holds the loaded models of one app instance; thread-safe lazy loading."""

    model: str = "embedded"
    vae: str | None = None
    reranker: str | None = "embedded"
    output_dir: Path = Path("outputs")
    device: str | None = None
    limits: RequestLimits | None = None  # a server's bounds on one request (none for the CLI)
    models_dirs: Sequence[Path] = ()  # A1111 / ComfyUI folders: checkpoints, VAEs, LoRAs, embeddings
    max_loaded: int = 1  # checkpoints kept in memory (least recently used freed first)
    # A1111's CLIP_stop_at_last_layers and sd_vae_decode_method ("Full" or "TAESD") options: what the UI and HTTP
    # API put in a request that does not say; generate() runs a GenerationRequest as it is, its own values included
    clip_skip: int = 1
    vae_decoder: str = "Full"
    scorers: Sequence[ScorerSpec] = ()  # preference scorers beside the reranker CLIP, and their default weights
    _library: ModelLibrary | None = field(default=None, init=False, repr=False)
    _pipelines: PipelineCache | None = field(default=None, init=False, repr=False)
    _scorer: ClipScorer | None = field(default=None, init=False, repr=False)
    _scorers: dict[ScorerSpec, Scorer] = field(default_factory=dict, init=False, repr=False)
    _preview_scorers: dict[Path, ClipScorer] = field(default_factory=dict, init=False, repr=False)
    _load_lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)
    _use_lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)

    def library(self) -> ModelLibrary:
        """The model folders (and what ships with the package); hashes cached in the user's cache folder."""
        with self._load_lock:
            if self._library is None:
                from pipelines.models.hash_cache import HashCache, default_cache_file
                from pipelines.models.library import ModelLibrary

                self._library = ModelLibrary(list(self.models_dirs), HashCache(default_cache_file()))
            return self._library

    def selection(self) -> tuple[str, str | None]:
        """(checkpoint spec, VAE file or None) the current ``model`` and ``vae`` values name."""
        library = self.library()
        checkpoint = checkpoint_path(library, self.model)
        return checkpoint, vae_path(library, checkpoint, self.vae)

    def check_selection(self) -> None:
        """An error now, naming it, when the selected checkpoint, VAE or reranker cannot be found, or the default clip
        skip is beyond the checkpoint's text encoder; loads nothing.
        (``selection`` finds the VAE file or raises; ``text_encoder_layers`` resolves the checkpoint, as
        ``resolve_spec``, before it reads the text encoder's config.)"""
        from pipelines.generation.prompts import check_clip_skip
        from pipelines.models.loading import text_encoder_layers

        checkpoint, _ = self.selection()
        check_clip_skip(self.clip_skip, text_encoder_layers(checkpoint), "clip_skip")  # what every request carries
        if self.reranker is not None:  # the reranker folder too, checked as its loading checks it
            from pipelines.rerank.clip_scorer import check_clip_folder, resolve_clip_folder, tokenizer_folder

            folder = resolve_clip_folder(self.reranker)
            check_clip_folder(folder, tokenizer_folder(folder), folder)

    def pipeline(self) -> TextToImagePipeline:
        """The text-to-image pipeline of the selected checkpoint and VAE, loaded on first call."""
        with self._load_lock:
            if self._pipelines is None:
                self._pipelines = PipelineCache(self.max_loaded)
            checkpoint, vae = self.selection()

            def load() -> TextToImagePipeline:
                from pipelines.models.loading import load_pipeline

                return load_pipeline(checkpoint, device=self.device, vae=vae, library=self.library())

            return self._pipelines.get((checkpoint, vae), load)

    def active_pipeline(self) -> TextToImagePipeline:
        """The pipeline used last (the running job's, for previews and token counts), else the selected one."""
        with self._load_lock:
            latest = self._pipelines.latest() if self._pipelines is not None else None
        return latest if latest is not None else self.pipeline()

    def loaded(self) -> list[tuple[str, str | None]]:
        """(checkpoint, VAE) of each pipeline in memory, least recently used first."""
        with self._load_lock:
            return self._pipelines.keys() if self._pipelines is not None else []

    def switch(
        self, checkpoint: str | None = None, vae: str | None = None, clip_skip: int | None = None
    ) -> TextToImagePipeline:
        """Select another checkpoint and/or VAE (A1111's option values) and load it, after the running job;
        ``clip_skip``: the default clip skip too (None: unchanged).

        On a bad name, a clip skip beyond the new checkpoint's text encoder layers (the default one kept, too: a
        switch never leaves every request failing) or a failed load, the previous selection stays
        (ModelLoadError / ValueError).
        """
        with self._use_lock:
            if checkpoint is not None or clip_skip is not None:
                from pipelines.generation.prompts import check_clip_skip

                layers = self.text_layers(checkpoint)
                if clip_skip is None and self.clip_skip > layers:  # the default kept: say which, and what to do
                    raise ValueError(f"not switched to {checkpoint}: its text encoder has {layers} layers, fewer than "
                                     f"the default clip skip {self.clip_skip}; set CLIP_stop_at_last_layers to at "
                                     f"most {layers} with the switch")
                check_clip_skip(self.clip_skip if clip_skip is None else clip_skip, layers, "CLIP_stop_at_last_layers")
            previous = self._select(checkpoint, vae)
            try:
                pipe = self.pipeline()
            except BaseException:
                self.model, self.vae = previous
                raise
            if clip_skip is not None:
                self.clip_skip = clip_skip
            return pipe

    def set_clip_skip(self, clip_skip: int) -> None:
        """Set the default clip skip (A1111's ``CLIP_stop_at_last_layers``); ValueError, nothing set, when the
        selected checkpoint's text encoder has fewer layers."""
        from pipelines.generation.prompts import check_clip_skip

        check_clip_skip(clip_skip, self.text_layers(), "CLIP_stop_at_last_layers")
        self.clip_skip = clip_skip

    def text_layers(self, checkpoint: str | None = None) -> int:
        """The text encoder layers (the largest clip skip) of ``checkpoint`` (an A1111 checkpoint value; None: the
        selected one), from its config: no weights are read."""
        from pipelines.models.loading import text_encoder_layers

        return text_encoder_layers(checkpoint_path(self.library(), self.model if checkpoint is None else checkpoint))

    def _select(self, checkpoint: str | None, vae: str | None) -> tuple[str, str | None]:
        """Set ``model``/``vae`` (None: unchanged); returns the previous pair."""
        previous = (self.model, self.vae)
        if checkpoint is not None:
            self.model = checkpoint
        if vae is not None:
            self.vae = vae
        return previous

    @contextlib.contextmanager
    def _selected(self, checkpoint: str | None, vae: str | None) -> Iterator[None]:
        """``model``/``vae`` set for the block (None: unchanged), then set back."""
        previous = self._select(checkpoint, vae)
        try:
            yield
        finally:
            self.model, self.vae = previous

    def scorer(self) -> ClipScorer | None:
        """The CLIP reranker, loaded on first call; None when reranking is switched off."""
        if self.reranker is None:
            return None
        with self._load_lock:
            if self._scorer is None:
                from pipelines.rerank.clip_scorer import ClipScorer

                self._scorer = ClipScorer.load(self.reranker, device=self.device)
            return self._scorer

    def preview_scorer(self, pipe: TextToImagePipeline) -> ClipScorer | None:
        """The preview scorer for early pruning of the model ``pipe`` was loaded from (a CLIP folder
        ``clip_preview/`` inside its diffusers folder), loaded on first call; None when the model has none
        (the embedded model ships none) or is a single file."""
        from pipelines.rerank.early_pruning import preview_scorer_folder

        model_folder = Path(pipe.components.source)
        folder = preview_scorer_folder(model_folder) if model_folder.is_dir() else None
        if folder is None:
            return None
        with self._load_lock:
            if folder not in self._preview_scorers:
                from pipelines.rerank.clip_scorer import ClipScorer

                scorer = ClipScorer.load(folder, device=self.device)
                scorer.name = f"{model_folder.name}/{folder.name}"  # e.g. "shapes-tiny/clip_preview"
                self._preview_scorers[folder] = scorer
            return self._preview_scorers[folder]

    def available_scorers(self) -> dict[str, ScorerSpec]:
        """Scorers a request may name: clip / contrastive / mixed on the reranker CLIP (when there is one),
        and the configured ``scorers`` (which may also point these kinds at other folders)."""
        from pipelines.rerank.scorer_specs import ScorerSpec

        kinds = ("clip", "contrastive", "mixed") if self.reranker is not None else ()
        available = {kind: ScorerSpec(kind) for kind in kinds}
        available.update({spec.kind: spec for spec in self.scorers})
        return available

    def default_weights(self) -> dict[str, float]:
        """The configured scorers' weights, or CLIP score alone."""
        return {spec.kind: spec.weight for spec in self.scorers} or {"clip": 1.0}

    def ranking_scorer(self, weights: Mapping[str, float]) -> Scorer:
        """The scorer ranking by ``weights`` (scorer name -> weight); models load on first use."""
        from pipelines.rerank.scorer_specs import parse_weights
        from pipelines.rerank.scorers import combine

        weights = parse_weights(weights)
        if not weights:
            raise ValueError("choose at least one scorer")
        available = self.available_scorers()
        parts = []
        for kind, weight in weights.items():
            if kind not in available:
                offered = ", ".join(available) or "none (no reranker is loaded)"
                raise ValueError(f"scorer {kind!r} is not available here (available: {offered}; more with --scorer)")
            parts.append((kind, self._load_scorer(available[kind]), weight))
        return combine(parts)

    def _load_scorer(self, spec: ScorerSpec) -> Scorer:
        from dataclasses import replace

        from pipelines.rerank.scorers import load_scorer

        key = replace(spec, weight=1.0)
        with self._load_lock:
            if key not in self._scorers:
                self._scorers[key] = load_scorer(key, self.scorer, device=self.device)
            return self._scorers[key]

    def generate(
        self,
        request: GenerationRequest,
        *,
        checkpoint: str | None = None,
        vae: str | None = None,
        expect_selection: tuple[str, str | None] | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Run ``request`` (see ``_generate`` for ``options``) after any running job; ``checkpoint`` and ``vae``
        switch for this request only and back (A1111's ``override_settings``). ``expect_selection``: the
        ``selection()`` the caller showed its user; SelectionChanged, checked once the running job is done,
        when another client has switched since (a page must not run a model it does not show)."""
        require_request(request)  # before waiting for the lock or loading a model
        with self._use_lock, self._selected(checkpoint, vae):
            if expect_selection is not None:
                current = self.selection()
                if current != tuple(expect_selection):
                    raise SelectionChanged(tuple(expect_selection), current)
            return self._generate(request, **options)

    def _generate(
        self,
        request: GenerationRequest,
        *,
        rerank: bool = True,
        rerank_by: str | None = None,
        scorers: Mapping[str, float] | str | None = None,
        min_score: Mapping[str, float] | None = None,
        extra_rounds: int = 3,
        keep: int | None = None,
        save: bool = True,
        output_dir: Path | None = None,
        on_step: StepCallback | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        cancel: threading.Event | None = None,
        progress: bool = False,
        interruption: Interruption | None = None,
        skip_batch_size: int | None = None,
    ) -> GenerationResult:
        """Generate ``request.n`` candidates; score and sort them best first if ``rerank``; save PNGs.

        Scoring: ``scorers`` (name -> weight, e.g. {"clip": 1, "aesthetic": 0.5}), else ``rerank_by`` alone
        ("clip", "contrastive" against counterfactual captions, or "mixed"), else the engine's default.
        ``min_score`` (name -> minimum, "" for the only scorer): generate up to ``extra_rounds`` more rounds
        of candidates with new seeds until one reaches them (``on_round`` hears after each round).
        ValueError (nothing generated) when the request breaks the engine's ``limits``. ``interruption``: A1111's
        interrupt and skip (``pipelines.rerank.best_of``); the candidates stopped on the way come last.
        ``skip_batch_size``: A1111's ``batch_size``, the candidates one skip stops together (None: the up to 4
        denoised together).
        """
        from pipelines.rerank.best_of import best_of_n
        from pipelines.rerank.contrastive import RERANK_MODES
        from pipelines.rerank.scorer_specs import parse_min_scores, parse_weights, thresholds_by_label
        from pipelines.rerank.scorers import scorer_kinds

        if rerank_by is not None and rerank_by not in RERANK_MODES:
            raise ValueError(f"rerank_by must be one of {', '.join(RERANK_MODES)}, got {rerank_by!r}")
        chosen = parse_weights(scorers)
        weights = chosen or ({rerank_by: 1.0} if rerank_by else self.default_weights())
        if not chosen and self.reranker is None and not self.scorers:
            rerank = False  # no scorer at all (--reranker none): generation order, as asked at start
        reranker = self.ranking_scorer(weights) if rerank else None
        thresholds = parse_min_scores(min_score)
        if thresholds and reranker is None:
            raise ValueError("a minimum score needs reranking on")
        labels = thresholds_by_label(thresholds, scorer_kinds(reranker, next(iter(weights)))) if thresholds else {}
        pipe = self.pipeline()
        if self.limits is not None:
            self.limits.check(request, pipe.count_tokens, rounds=1 + extra_rounds if labels else 1)
        rounds, max_rounds, passed, started = 1, 1, None, request.n
        early_scorer = self.preview_scorer(pipe) if request.prune_to and reranker is not None else None
        if labels:
            from pipelines.rerank.min_score import best_of_until_pass

            until = best_of_until_pass(
                pipe, request, reranker, labels, extra_rounds, keep=keep, early_scorer=early_scorer, on_step=on_step,
                on_round=on_round, cancel=cancel, progress=progress, interruption=interruption,
                skip_batch_size=skip_batch_size,
            )
            output, rounds, max_rounds, passed = until.output, until.rounds, until.max_rounds, until.passed
            started = until.candidates_made
        else:
            output = best_of_n(pipe, request, reranker, keep=keep, early_scorer=early_scorer, on_step=on_step,
                               cancel=cancel, progress=progress, interruption=interruption,
                               skip_batch_size=skip_batch_size)
            if output.interrupted:  # the candidates started: returned, or pruned early
                started = len(output.candidates) + len(output.pruned)
        candidates = []
        for index, ranked in enumerate(output.candidates):
            extra: dict[str, Any] = dict(output.extra)  # Lora hashes, TI hashes
            made = output.request
            # stopped before the pruning step (an interrupt or skip): never scored early nor pruned, so not said
            if made.prune_to and (ranked.stopped_at is None or ranked.stopped_at >= made.prune_at):
                from pipelines.rerank.early_pruning import format_pruned

                extra["Early pruning"] = f"{made.n} to {made.prune_to} at step {made.prune_at}"
                if output.pruned:  # (none left when a minimum score had them finished)
                    extra["Pruned early"] = format_pruned(output.pruned)  # seed: early score
                extra["Early scorer"] = output.early_scorer
            if ranked.score is not None:
                extra[output.score_label] = f"{ranked.score:.2f}"
                extra.update({key: f"{value:.2f}" for key, value in ranked.details.items()})
                extra["Reranker"] = output.reranker
            else:  # stopped unscored: its early score, when it was ranked early
                extra.update({key: f"{value:.2f}" for key, value in ranked.details.items()})
            if labels:
                extra["Min score"] = ", ".join(f"{label} {value:g}" for label, value in labels.items())
                extra["Min score passed"] = "yes" if passed[index] else "no"
                extra["Rounds"] = f"{rounds} of {max_rounds}"
            if ranked.stopped_at is not None:  # the picture is not what these settings make: say so
                extra["Stopped at step"] = f"{ranked.stopped_at} of {output.request.total_steps}"
            parameters = format_parameters(
                output.request, ranked.seed, output.model_name, output.model_hash, extra
            )
            candidate = Candidate(ranked.image, ranked.seed, ranked.score, parameters, details=ranked.details,
                                  passed=passed[index] if labels else None, stopped_at=ranked.stopped_at)
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
            inpainting_conditioning=pipe.inpainting_unet,
            model_hash=output.model_hash,
            min_scores=labels,
            rounds=rounds,
            max_rounds=max_rounds,
            candidates_made=started,
            pruned=output.pruned,
            early_scorer=output.early_scorer,
            early_score_label=output.early_score_label,
            interrupted=output.interrupted,
        )
