"""LAION's aesthetic predictor: an MLP on L2-normalised CLIP image embeddings, prompt-independent.

The "improved aesthetic predictor" (C. Schuhmann, github.com/christophschuhmann/improved-aesthetic-predictor,
``simple_inference.py``) rates how much people like an image on AVA's 1-10 scale from its CLIP ViT-L/14
image embedding (``encode_image``, i.e. the projected 768-wide features, L2-normalised). Its head,
``sac+logos+ava1-l14-linearMSE``, is an ``nn.Sequential`` named ``layers`` with no activations:

    layers.0 Linear(768, 1024)  layers.1 Dropout(0.2)
    layers.2 Linear(1024, 128)  layers.3 Dropout(0.2)
    layers.4 Linear(128, 64)    layers.5 Dropout(0.1)
    layers.6 Linear(64, 16)
    layers.7 Linear(16, 1)

so its state dict holds ``layers.{0,2,4,6,7}.{weight,bias}``. The published file is a pickle (.pth);
sd-app loads only a safetensors copy with these key names (README: how to convert). The widths are
read from the tensors, so heads trained the same way on another CLIP (e.g. 512-wide ViT-B/32) load too;
the CLIP given beside the head must produce embeddings of the head's input width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipelines.models.errors import PICKLE_SUFFIXES
from pipelines.rerank.clip_scorer import ScoreResult

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.rerank.clip_scorer import ClipScorer

LINEAR_LAYERS = (0, 2, 4, 6, 7)  # indices of the Linear modules in LAION's nn.Sequential
DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}  # after layers 0, 2, 4 (inactive at inference)
CONVERT_HINT = (
    "convert it once with: python -c \"import torch; from safetensors.torch import save_file; "
    "save_file(torch.load('HEAD.pth', map_location='cpu', weights_only=True), 'HEAD.safetensors')\""
)


def _expected_keys() -> set[str]:
    return {f"layers.{i}.{part}" for i in LINEAR_LAYERS for part in ("weight", "bias")}


class AestheticHead(torch.nn.Module):
    """LAION's MLP: a module whose ``layers`` Sequential holds the Linear/Dropout stack (their key names)."""

    def __init__(self, layers: torch.nn.Sequential) -> None:
        super().__init__()
        self.layers = layers

    @property
    def input_width(self) -> int:
        return int(self.layers[0].in_features)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)  # [N, D] -> [N, 1]


def build_aesthetic_mlp(state: dict[str, torch.Tensor]) -> AestheticHead:
    """LAION's head with the widths of ``state``, its weights loaded (strict: every key, none left random).

    Raises ValueError naming the missing/unexpected keys or the layer whose shapes do not chain.
    """
    keys = set(state)
    if keys != _expected_keys():
        missing = sorted(_expected_keys() - keys)
        unexpected = sorted(keys - _expected_keys())
        raise ValueError(
            "not a LAION aesthetic predictor head (expected layers.{0,2,4,6,7}.weight/bias)"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unexpected {', '.join(unexpected[:5])}" if unexpected else "")
        )
    modules: list[torch.nn.Module] = []
    width = None
    for position in range(LINEAR_LAYERS[-1] + 1):
        if position in DROPOUTS:
            modules.append(torch.nn.Dropout(DROPOUTS[position]))
            continue
        weight, bias = state[f"layers.{position}.weight"], state[f"layers.{position}.bias"]
        if weight.ndim != 2 or bias.shape != (weight.shape[0],) or (width is not None and weight.shape[1] != width):
            raise ValueError(
                f"layers.{position}: weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not follow "
                f"a {width}-wide input"
            )
        modules.append(torch.nn.Linear(weight.shape[1], weight.shape[0]))
        width = weight.shape[0]
    if width != 1:
        raise ValueError(f"layers.7 must output one rating, it outputs {width}")
    head = AestheticHead(torch.nn.Sequential(*modules))
    head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return head.eval()


def load_aesthetic_head(path: str | Path) -> AestheticHead:
    """LAION's aesthetic MLP from a safetensors file; pickles (.pth, ...) are refused with how to convert."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path}: '{path.suffix}' files are Python pickles and are never loaded (they can run code); "
            + CONVERT_HINT
        )
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic head not found: {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from err
    try:
        return build_aesthetic_mlp(state)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


@dataclass
class AestheticScorer:
    """Rates images with LAION's head on ``clip``'s normalised image embeddings; the prompt is not read."""

    clip: ClipScorer  # its image tower only (CLIP ViT-L/14 for LAION's published heads)
    mlp: AestheticHead
    head_name: str
    label: str = "Aesthetic score"

    def __post_init__(self) -> None:
        width = self.mlp.input_width
        clip_width = int(self.clip.model.config.projection_dim)
        if width != clip_width:
            raise ValueError(
                f"the aesthetic head {self.head_name} takes {width}-wide CLIP image embeddings, but "
                f"{self.clip.name} makes {clip_width}-wide ones; give the CLIP it was trained on "
                "(CLIP ViT-L/14, 768, for LAION's heads) after '@'"
            )
        self.mlp = self.mlp.to(self.clip.device)

    @classmethod
    def load(cls, head: str | Path, clip: ClipScorer) -> AestheticScorer:
        return cls(clip, load_aesthetic_head(head), Path(head).stem)

    @property
    def name(self) -> str:
        return f"{self.head_name} on {self.clip.name}"

    @torch.inference_mode()
    def ratings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The head's rating per image [N] (about 1-10 for LAION's heads), float32 on the CPU."""
        features = self.clip.image_features(images)  # [N, D], L2-normalised as LAION's `normalized`
        return self.mlp(features.to(self.clip.device)).squeeze(-1).float().cpu()  # [N]

    def score(self, images: Sequence[Image.Image], prompt: str) -> ScoreResult:
        """Ratings of ``images``; ``prompt`` is recorded but does not change them."""
        ratings = self.ratings(images)
        return ScoreResult(
            prompt=prompt,
            scores=tuple(float(r) for r in ratings),
            cosines=tuple(0.0 for _ in ratings),  # no text is compared
            truncated=False,
            reranker=self.name,
            label=self.label,
        )
