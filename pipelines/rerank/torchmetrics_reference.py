"""torchmetrics' CLIPScore on a local CLIP folder: the reference our scorer is checked and timed against.

Needs the ``test`` extra (torchmetrics).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image


def torchmetrics_clip_score(folder: str | Path) -> Any:
    """``torchmetrics.multimodal.CLIPScore`` on a local folder, loaded as torchmetrics loads
    ``openai/*`` names (CLIPModel + CLIPProcessor.from_pretrained).

    torchmetrics 1.9 expects get_*_features to return tensors; transformers >= 5 returns an output
    object (Lightning-AI/torchmetrics#3407), so the projected ``pooler_output`` is unwrapped here.
    Nothing else of torchmetrics' computation is changed.
    """
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    def model_and_processor() -> tuple[Any, Any]:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
        for method in ("get_text_features", "get_image_features"):
            model.__dict__[method] = _returning_tensor(getattr(model, method))
        return model, CLIPProcessor.from_pretrained(folder, local_files_only=True)

    return CLIPScore(model_name_or_path=model_and_processor)


def _returning_tensor(fn: Callable[..., Any]) -> Callable[..., torch.Tensor]:
    import torch

    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = fn(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    return wrapped


def to_uint8_chw(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 tensor [3, H, W], the input torchmetrics takes."""
    import numpy as np
    import torch

    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
