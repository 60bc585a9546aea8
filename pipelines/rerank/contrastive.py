"""Contrastive reranking: how much better an image fits the prompt than close counterfactual captions.

The score is the zero-shot probability of the prompt among itself and its counterfactuals
(:mod:`pipelines.rerank.counterfactuals`): softmax over ``logit_scale * cos(image, caption)``
(Radford et al. 2021), times 100. An image of "two red cubes" loses probability to the caption "two red
cubes ..." even when plain CLIP likes it as much as a single cube. ``mix`` blends it with the CLIP score
(both on 0-100). Works with any CLIP the :class:`ClipScorer` loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.rerank.clip_scorer import ScoreResult
from pipelines.rerank.counterfactuals import Counterfactual, counterfactual_captions

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.rerank.clip_scorer import ClipScorer

RERANK_MODES = ("clip", "contrastive", "mixed")


@dataclass
class ContrastiveScorer:
    """Scores images by the prompt's probability against its counterfactuals (``mix`` of CLIP score)."""

    clip: ClipScorer
    mix: float = 0.0  # weight of the plain CLIP score: 0 = contrastive only, 0.5 = "mixed"

    def __post_init__(self) -> None:
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"mix must be between 0 and 1, got {self.mix!r}")

    @property
    def name(self) -> str:
        return f"{self.clip.name} (contrastive)" if self.mix == 0 else f"{self.clip.name} (mixed {self.mix:g})"

    def captions(self, prompt: str) -> list[Counterfactual]:
        return counterfactual_captions(prompt)

    def score(self, images: Sequence[Image.Image], prompt: str) -> ScoreResult:
        """Per image: 100 * P(prompt | image) among the prompt and its counterfactuals, mixed with CLIP."""
        import torch

        plain = self.clip.score(images, prompt)  # CLIP scores and cosines, prompt encoded once
        others = [c.text for c in self.captions(prompt)]
        if not others:  # nothing to contrast with: the CLIP score is all there is
            return plain
        image_feats = self.clip.image_features(images)  # [N, D]
        text_feats, _ = self.clip.text_features([prompt, *others])  # [1 + K, D]
        logits = self.clip.logit_scale * (image_feats @ text_feats.T)  # [N, 1 + K]
        probability = torch.softmax(logits.double(), dim=1)[:, 0] * 100.0  # [N]
        scores = [
            (1.0 - self.mix) * float(p) + self.mix * clip for p, clip in zip(probability, plain.scores, strict=True)
        ]
        details = tuple(
            {"CLIP score": clip, "Prompt probability": float(p)}
            for clip, p in zip(plain.scores, probability, strict=True)
        )
        return ScoreResult(
            prompt=prompt,
            scores=tuple(scores),
            cosines=plain.cosines,
            truncated=plain.truncated,
            reranker=self.name,
            label="Contrastive score" if self.mix == 0 else "Mixed score",
            details=details,
        )


def reranker_for(clip: ClipScorer, mode: str) -> ClipScorer | ContrastiveScorer:
    """The scorer a rerank mode names: "clip", "contrastive" or "mixed" (half CLIP, half contrastive)."""
    if mode == "clip":
        return clip
    if mode == "contrastive":
        return ContrastiveScorer(clip)
    if mode == "mixed":
        return ContrastiveScorer(clip, mix=0.5)
    raise ValueError(f"rerank mode must be one of {', '.join(RERANK_MODES)}, got {mode!r}")
