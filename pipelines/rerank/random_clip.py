"""Random-weight CLIP folders in the layout of openai/clip-vit-* (for format tests and benchmarks:
the real layout and tokenizer without downloading anything)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipelines.models.shipped import CLIP_TOKENIZER_DIR

# Text / vision settings per size. "base32" is openai/clip-vit-base-patch32's config.json.
CLIP_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        "vision": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        ),
        "projection_dim": 16,
    },
    "base32": {
        "text": dict(
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=8,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),  # openai's legacy ids: argmax pooling
        "vision": dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=32,
        ),
        "projection_dim": 512,
    },
}


def build_random_clip_folder(
    folder: str | Path, size: str = "tiny", legacy_preprocessor: bool = False, seed: int = 0
) -> Path:
    """Write a random-weight CLIPModel folder (config.json, model.safetensors, image processor,
    the real CLIP BPE tokenizer) in the layout of openai/clip-vit-base-patch32.

    ``legacy_preprocessor`` writes preprocessor_config.json the way openai's repos have it
    (``feature_extractor_type``, integer ``size``/``crop_size``).
    """
    import json

    from transformers import CLIPConfig, CLIPModel

    spec = CLIP_SIZES[size]
    text = dict(
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=spec["projection_dim"],
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    text.update(spec["text"])
    vision = dict(projection_dim=spec["projection_dim"], **spec["vision"])
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec["projection_dim"])
    import torch

    torch.manual_seed(seed)
    folder = Path(folder)
    CLIPModel(config).eval().save_pretrained(folder, safe_serialization=True)
    side = spec["vision"]["image_size"]
    preprocessor = {
        "do_resize": True,
        "do_center_crop": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_convert_rgb": True,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    if legacy_preprocessor:
        preprocessor.update(feature_extractor_type="CLIPFeatureExtractor", size=side, crop_size=side)
    else:
        preprocessor.update(
            image_processor_type="CLIPImageProcessor",
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
        )
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    for file in CLIP_TOKENIZER_DIR.iterdir():
        shutil.copy(file, folder / file.name)
    return folder
