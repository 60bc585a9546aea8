"""What a scorer is, as text: ``KIND[=SOURCE[@COMPANION]][:WEIGHT]`` specs, scorer names and weights, and
minimum scores (each in its scorer's own units). No torch here: the ``--server`` client parses these too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SCORER_LABELS = {
    "clip": "CLIP score",
    "contrastive": "Contrastive score",
    "mixed": "Mixed score",
    "pickscore": "PickScore",
    "aesthetic": "Aesthetic score",
}
NEEDS_SOURCE = ("pickscore", "aesthetic")
# The values a scorer's number can take, where they are fixed: torchmetrics' CLIP score max(100 * cos, 0), the
# prompt's probability x 100, and their blend (pipelines.rerank.contrastive). PickScore (logit_scale x cos, per
# model) and the aesthetic head (an unbounded MLP) have no fixed range.
SCORE_RANGES = {"clip": (0.0, 100.0), "contrastive": (0.0, 100.0), "mixed": (0.0, 100.0)}
WEIGHTED_LABEL = "Weighted score"
_WEIGHT = re.compile(r"^(?P<head>.*):(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)$")
_NAME = re.compile(r"^[a-z]+$")


def _is_weight(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


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


def _weight_not_a_number(text: str) -> ValueError:
    """The error for ``name:WEIGHT`` whose weight is no finite number (``clip:abc``, ``clip:inf``)."""
    return ValueError(f"scorer weight must be a number, got {text!r}")


def parse_scorer(text: str) -> ScorerSpec:
    """``clip``, ``clip:0.5``, ``pickscore=/m/PickScore_v1@/m/CLIP-ViT-H-14:1``, ``aesthetic=/m/head.safetensors``...

    The weight is a trailing ``:number`` (default 1); ``@`` separates the companion folder.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a scorer must look like KIND[=SOURCE[@COMPANION]][:WEIGHT], got an empty value")
    head, weight = _split_weight(text.strip())
    kind, sep, files = head.partition("=")
    kind = kind.strip().lower()
    if ":" in kind:  # a weight the pattern did not take: not a number
        raise _weight_not_a_number(text.strip())
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
            raise _weight_not_a_number(part)
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
        check_min_score_range(name, value)
        labels[SCORER_LABELS[name]] = value
    return labels


def check_min_score_range(kind: str, value: float) -> None:
    """ValueError for a minimum that scorer ``kind`` can never reach or always reaches (``SCORE_RANGES``)."""
    if kind in SCORE_RANGES:
        low, high = SCORE_RANGES[kind]
        if not low <= value <= high:
            raise ValueError(f"minimum score for {kind} must be between {low:g} and {high:g} "
                             f"({SCORER_LABELS[kind]} is on that scale), got {value:g}")


def passes(scores: Mapping[str, float], thresholds: Mapping[str, float]) -> bool:
    """True when every labelled score reaches its minimum (``scores``: label -> value)."""
    return all(label in scores and scores[label] >= value for label, value in thresholds.items())
