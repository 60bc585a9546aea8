"""Several scorers at once: loading each (its spec: :mod:`pipelines.rerank.scorer_specs`), weighted combination.

Kinds (each records its own number in the image metadata under its label):

- ``clip``: CLIP score, torchmetrics' ``max(100 * cos, 0)`` (default model: the app's reranker CLIP);
- ``contrastive`` / ``mixed``: the prompt's probability against counterfactual captions (x100), pure or
  half CLIP score (:mod:`pipelines.rerank.contrastive`), on the reranker CLIP or the folder given;
- ``pickscore``: PickScore's ``logit_scale * cos`` on any CLIPModel folder (``@`` the processor folder
  when the model folder has no tokenizer / preprocessor, as PickScore_v1);
- ``aesthetic``: LAION's MLP head (.safetensors) on the image embeddings of the CLIP after ``@`` (the
  reranker CLIP when omitted); prompt-independent.

Combination (Weighted score). The scorers' scales differ (CLIP score ~20-35, PickScore ~18-23,
aesthetic 1-10, probabilities 0-100), so each scorer's scores are standardised over the candidates
being ranked, ``z = (s - mean) / std`` (population std; ``z = 0`` when all are equal), and the
Weighted score is ``sum(w * z) / sum(w)``. A weight says how much a scorer pulls the ranking,
whatever its units; weight 0 records a score without ranking by it. The Weighted score is relative to
the candidates ranked together: minimum scores (``scorer_specs.passes``) are thresholds on each scorer's own number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pipelines.rerank.clip_scorer import ScoreResult
from pipelines.rerank.scorer_specs import SCORER_LABELS, WEIGHTED_LABEL, ScorerSpec

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.rerank.clip_scorer import ClipScorer


class Scorer(Protocol):
    name: str

    def score(self, images: Sequence[Image.Image], prompt: str) -> ScoreResult: ...


def standardized(values: Sequence[float]) -> list[float]:
    """(v - mean) / std over ``values`` (population std); all zeros when they do not vary."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    if std <= 1e-12 * max(1.0, abs(mean)):
        return [0.0] * n
    return [(v - mean) / std for v in values]


@dataclass
class WeightedScorer:
    """Scorers ranked together: Weighted score = sum(w * z) / sum(w), z standardised over the candidates."""

    parts: list[tuple[str, Scorer, float]]  # (kind, scorer, weight)
    label: str = WEIGHTED_LABEL

    def __post_init__(self) -> None:
        kinds = [kind for kind, _, _ in self.parts]
        if not self.parts:
            raise ValueError("a weighted scorer needs at least one scorer")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"each scorer kind may be given once, got {', '.join(kinds)}")
        if sum(weight for _, _, weight in self.parts) <= 0:
            raise ValueError("at least one scorer needs a weight above 0")

    @property
    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.parts]

    @property
    def name(self) -> str:
        return " + ".join(f"{kind} {scorer.name} x{weight:g}" for kind, scorer, weight in self.parts)

    def score(self, images: Sequence[Image.Image], prompt: str) -> ScoreResult:
        """Every scorer's number per image (details, under its label) and the Weighted score."""
        results = [(kind, scorer.score(images, prompt), weight) for kind, scorer, weight in self.parts]
        total = sum(weight for _, _, weight in results)
        combined = [0.0] * len(results[0][1].scores)
        for _, result, weight in results:
            for i, z in enumerate(standardized(result.scores)):
                combined[i] += weight * z / total
        details = []
        for i in range(len(combined)):
            row = {SCORER_LABELS[kind]: result.scores[i] for kind, result, _ in results}  # each scorer's own number
            for _, result, _ in results:  # then the numbers behind them (prompt / preference probability)
                if result.details:
                    row.update({k: v for k, v in result.details[i].items() if k not in row})
            details.append(row)
        text_results = [r for kind, r, _ in results if kind != "aesthetic"]
        first = text_results[0] if text_results else results[0][1]
        return ScoreResult(
            prompt=prompt,
            scores=tuple(combined),
            cosines=first.cosines,
            truncated=any(r.truncated for r in text_results),
            reranker=self.name,
            label=self.label,
            details=tuple(details),
        )


def load_scorer(
    spec: ScorerSpec,
    reranker_clip: Callable[[], ClipScorer | None],
    device: str | None = None,
) -> Scorer:
    """The scorer ``spec`` names; ``reranker_clip()`` gives the app's CLIP when the spec names no folder."""
    from pipelines.rerank.clip_scorer import ClipScorer

    def clip_at(folder: str | None, processor: str | None = None) -> ClipScorer:
        if folder is None:
            clip = reranker_clip()
            if clip is None:
                raise ValueError(f"scorer {spec.kind!r} needs a CLIP folder (no reranker CLIP is loaded)")
            return clip
        return ClipScorer.load(folder, device=device, processor_dir=processor)

    if spec.kind == "aesthetic":
        from pathlib import Path

        from pipelines.rerank.aesthetic import AestheticScorer, load_aesthetic_head

        head = load_aesthetic_head(spec.source)  # a pickle or a wrong file is refused before any CLIP loads
        return AestheticScorer(clip_at(spec.companion), head, Path(spec.source).stem)
    if spec.kind == "pickscore":
        from pipelines.rerank.preference import PreferenceScorer

        try:
            return PreferenceScorer(clip_at(spec.source, spec.companion))
        except ValueError as error:
            if spec.companion is None and ("preprocessor_config" in str(error) or "tokenizer" in str(error)):
                raise ValueError(
                    f"{error}. PickScore_v1 ships only the model: give the folder of its processor "
                    "(laion/CLIP-ViT-H-14-laion2B-s32B-b79K) after '@': pickscore=MODEL_FOLDER@PROCESSOR_FOLDER"
                ) from None
            raise
    from pipelines.rerank.contrastive import reranker_for

    return reranker_for(clip_at(spec.source), spec.kind)


def combine(parts: Sequence[tuple[str, Scorer, float]]) -> Scorer:
    """One scorer alone ranks by its own number (its label in the metadata); several by the Weighted score."""
    if len(parts) == 1:
        kind, scorer, weight = parts[0]
        if weight <= 0:
            raise ValueError(f"scorer {kind!r} has weight 0; nothing would rank the candidates")
        return scorer
    return WeightedScorer(list(parts))


def scorer_kinds(scorer: Scorer, default_kind: str) -> list[str]:
    """The kinds behind a scorer ``combine`` made (``default_kind`` for a lone one)."""
    return scorer.kinds if isinstance(scorer, WeightedScorer) else [default_kind]
