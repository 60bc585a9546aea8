"""Preference scores from any transformers ``CLIPModel`` folder, in PickScore's convention.

PickScore (Kirstain et al. 2023, "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image
Generation"; github.com/yuvalkirstain/PickScore) is CLIP-H fine-tuned on human picks. Its model card
scores an image as ``model.logit_scale.exp() * cos(E_text, E_image)`` (normalised ``get_text_features``
and ``get_image_features``), and ``softmax`` of those scores over the images of one prompt is the
probability that a person prefers each. We report that score, unclamped (about 18-23 for PickScore_v1,
whose logit scale is 100), and record the softmax probability among the candidates beside it.

``yuvalkirstain/PickScore_v1`` holds the CLIPModel only; its tokenizer and image processor are
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s, given as a second folder (``pickscore=MODEL@PROCESSOR``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.rerank.clip_scorer import ScoreResult

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.rerank.clip_scorer import ClipScorer


@dataclass
class PreferenceScorer:
    """``logit_scale.exp() * cos(image, prompt)`` of a CLIPModel (PickScore's score)."""

    clip: ClipScorer
    label: str = "PickScore"

    @property
    def name(self) -> str:
        return self.clip.name

    def score(self, images: Sequence[Image.Image], prompt: str) -> ScoreResult:
        """Per image: PickScore's score; details: the softmax preference probability among ``images`` (0-100)."""
        import torch

        cosines, truncated = self.clip.prompt_cosines(images, prompt)  # [N]
        cosines = cosines.double()
        scores = self.clip.logit_scale * cosines  # [N]
        preference = torch.softmax(scores, dim=0) * 100.0  # [N], PickScore's calc_probs
        return ScoreResult(
            prompt=prompt,
            scores=tuple(float(s) for s in scores),
            cosines=tuple(float(c) for c in cosines),
            truncated=truncated,
            reranker=self.name,
            label=self.label,
            details=tuple({"Preference probability": float(p)} for p in preference),
        )
