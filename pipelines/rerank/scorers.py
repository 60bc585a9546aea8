"""Several scorers at once: what each is (``KIND[=SOURCE[@COMPANION]][:WEIGHT]``), loading, weighted combination.

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
the candidates ranked together: minimum scores (``passes``) are thresholds on each scorer's own number.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pipelines.rerank.clip_scorer import ScoreResult

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.rerank.clip_scorer import ClipScorer

SCORER_LABELS = {
    "clip": "CLIP score",
    "contrastive": "Contrastive score",
    "mixed": "Mixed score",
    "pickscore": "PickScore",
    "aesthetic": "Aesthetic score",
}
NEEDS_SOURCE = ("pickscore", "aesthetic")
WEIGHTED_LABEL = "Weighted score"
_WEIGHT = re.compile(r"^(?P<head>.*):(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)$")
_NAME = re.compile(r"^[a-z]+$")


def _is_weight(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


class Scorer(Protocol):
    name: str

    def score(self, images: Sequence[Image.Image], prompt: str) -> ScoreResult: ...


@dataclass(frozen=True)
class ScorerSpec:
    """One scorer of a combination: its kind, files (None = the reranker CLIP) and weight."""

    kind: str
    source: str | None = None  # model folder (clip, contrastive, mixed, pickscore) or head file (aesthetic)
    companion: str | None = None  # pickscore: processor folder; aesthetic: the CLIP folder of its embeddings
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in SCORER_LABELS:
            raise ValueError(f"scorer kind must be one of {', '.join(SCORER_LABELS)}, got {self.kind!r}")
        if self.kind in NEEDS_SOURCE and not self.source:
            example = "aesthetic=HEAD.safetensors@CLIP_FOLDER" if self.kind == "aesthetic" else "pickscore=FOLDER"
            raise ValueError(f"scorer {self.kind!r} needs its file: {example}")
        if self.companion and self.kind not in NEEDS_SOURCE:
            raise ValueError(f"'@' is for pickscore (processor folder) and aesthetic (CLIP folder), not {self.kind!r}")
        if not _is_weight(self.weight):
            raise ValueError(f"scorer {self.kind!r}: weight must be a number >= 0, got {self.weight!r}")

    @property
    def label(self) -> str:
        return SCORER_LABELS[self.kind]

    def text(self) -> str:
        """The spec back in ``KIND[=SOURCE[@COMPANION]]:WEIGHT`` form."""
        files = f"={self.source}" + (f"@{self.companion}" if self.companion else "") if self.source else ""
        return f"{self.kind}{files}:{self.weight:g}"


def _split_weight(text: str) -> tuple[str, float | None]:
    match = _WEIGHT.match(text)
    if match is None:
        return text, None
    return match["head"], float(match["weight"])


def parse_scorer(text: str) -> ScorerSpec:
    """``clip``, ``clip:0.5``, ``pickscore=/m/PickScore_v1@/m/CLIP-ViT-H-14:1``, ``aesthetic=/m/head.safetensors``...

    The weight is a trailing ``:number`` (default 1); ``@`` separates the companion folder.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a scorer must look like KIND[=SOURCE[@COMPANION]][:WEIGHT], got an empty value")
    head, weight = _split_weight(text.strip())
    kind, sep, files = head.partition("=")
    kind = kind.strip().lower()
    source, companion = None, None
    if sep:
        source, at, companion = files.rpartition("@") if "@" in files else (files, "", "")
        source, companion = source.strip(), (companion.strip() or None)
        if not source:
            raise ValueError(f"scorer {text!r}: no file after '='")
    return ScorerSpec(kind, source, companion, 1.0 if weight is None else weight)


def parse_weights(text: str | Mapping[str, float] | None) -> dict[str, float]:
    """Scorer names and weights: ``"clip:1, aesthetic:0.5"`` (a bare name weighs 1), or a mapping.

    Names only (the scorers' files are the server's settings): ``=`` is refused. Empty -> {}.
    """
    if text is None:
        return {}
    items = dict(text).items() if isinstance(text, Mapping) else _weight_items(text)
    weights: dict[str, float] = {}
    for name, weight in items:
        key = str(name).strip().lower()
        if key not in SCORER_LABELS:
            raise ValueError(f"scorer name must be one of {', '.join(SCORER_LABELS)}, got {name!r}")
        if key in weights:
            raise ValueError(f"scorer {key!r} given twice")
        if not _is_weight(weight):
            raise ValueError(f"scorer {key!r}: weight must be a number >= 0, got {weight!r}")
        weights[key] = float(weight)
    return weights


def _weight_items(text: str) -> list[tuple[str, float]]:
    items = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" in part:
            raise ValueError(f"give scorers by name and weight (e.g. aesthetic:0.5), not files: {part!r}")
        name, weight = _split_weight(part)
        if ":" in name:
            raise ValueError(f"scorer weight must be a number, got {part!r}")
        items.append((name, 1.0 if weight is None else weight))
    return items


def parse_min_scores(items: Sequence[str] | str | Mapping[str, float] | float | None) -> dict[str, float]:
    """Minimum scores by scorer name: ``["aesthetic=5.5", "clip=28"]``, ``"30"`` (the only scorer: key ""),
    or a mapping / number. Each value is in that scorer's own units."""
    if items is None:
        return {}
    if isinstance(items, bool):
        raise ValueError(f"minimum score must be a number, got {items!r}")
    if isinstance(items, (int, float)):
        items = {"": float(items)}
    if isinstance(items, str):
        items = [p for p in items.split(",") if p.strip()]
    pairs = dict(items).items() if isinstance(items, Mapping) else (_min_item(text) for text in items)
    thresholds: dict[str, float] = {}
    for name, value in pairs:
        key = str(name).strip().lower()
        if key and key not in SCORER_LABELS:
            raise ValueError(f"minimum score: scorer name must be one of {', '.join(SCORER_LABELS)}, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"minimum score for {key or 'the scorer'} must be a number, got {value!r}")
        thresholds[key] = float(value)
    return thresholds


def _min_item(text: str) -> tuple[str, float]:
    name, sep, value = str(text).strip().rpartition("=")
    try:
        return (name if sep else ""), float(value)
    except ValueError:
        raise ValueError(f"minimum score must look like NAME=NUMBER or NUMBER, got {text!r}") from None


def thresholds_by_label(thresholds: Mapping[str, float], kinds: Sequence[str]) -> dict[str, float]:
    """Minimum scores keyed by the labels the candidates' scores carry; ValueError for a scorer not in use."""
    labels: dict[str, float] = {}
    for name, value in thresholds.items():
        if not name:
            if len(kinds) != 1:
                raise ValueError(
                    f"name the scorer of the minimum score ({', '.join(f'{k}={value:g}' for k in kinds)}): "
                    "several scorers are in use"
                )
            name = kinds[0]
        if name not in kinds:
            raise ValueError(f"minimum score for {name!r}, which is not among the scorers in use ({', '.join(kinds)})")
        labels[SCORER_LABELS[name]] = value
    return labels


def passes(scores: Mapping[str, float], thresholds: Mapping[str, float]) -> bool:
    """True when every labelled score reaches its minimum (``scores``: label -> value)."""
    return all(label in scores and scores[label] >= value for label, value in thresholds.items())


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
