"""sd-app library: Stable Diffusion 1.x generation, model loading, reranking and speed (no UI, no CLI).

The names scripts need, importable from here (each loads its module, and torch, on first use)::

    from pipelines import GenerationRequest, load_pipeline

    pipe = load_pipeline("embedded")
    image = pipe(GenerationRequest(prompt="a red circle on a blue background", seed=1)).images[0]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from pipelines.generation.conditioning import HiresFix, ImageConditioning
    from pipelines.generation.denoising import GenerationCancelled, StepInfo
    from pipelines.generation.request import GenerationRequest
    from pipelines.generation.text_to_image import TextToImageOutput, TextToImagePipeline
    from pipelines.models.errors import ModelLoadError
    from pipelines.models.loading import load_pipeline
    from pipelines.rerank.best_of import BestOfOutput, RankedImage, best_of_n
    from pipelines.rerank.clip_scorer import ClipScorer
    from pipelines.rerank.contrastive import ContrastiveScorer

_EXPORTS = {  # public name -> the module that defines it
    "GenerationRequest": "pipelines.generation.request",
    "ImageConditioning": "pipelines.generation.conditioning",
    "HiresFix": "pipelines.generation.conditioning",
    "GenerationCancelled": "pipelines.generation.denoising",
    "StepInfo": "pipelines.generation.denoising",
    "TextToImagePipeline": "pipelines.generation.text_to_image",
    "TextToImageOutput": "pipelines.generation.text_to_image",
    "load_pipeline": "pipelines.models.loading",
    "ModelLoadError": "pipelines.models.errors",
    "best_of_n": "pipelines.rerank.best_of",
    "BestOfOutput": "pipelines.rerank.best_of",
    "RankedImage": "pipelines.rerank.best_of",
    "ClipScorer": "pipelines.rerank.clip_scorer",
    "ContrastiveScorer": "pipelines.rerank.contrastive",
}
__all__ = [  # the names of _EXPORTS (a literal, for linters and type checkers)
    "BestOfOutput",
    "ClipScorer",
    "ContrastiveScorer",
    "GenerationCancelled",
    "GenerationRequest",
    "HiresFix",
    "ImageConditioning",
    "ModelLoadError",
    "RankedImage",
    "StepInfo",
    "TextToImageOutput",
    "TextToImagePipeline",
    "best_of_n",
    "load_pipeline",
]


def __getattr__(name: str) -> object:  # PEP 562: imported on first use, so `import pipelines` stays light
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
