"""Latents the U-Net generates, each with the full VAE decoder's picture of it: training data for a decoder
that must read what the sampler leaves, not only what the VAE's encoder writes.

A decoder trained on encoder latents alone (``pipelines.training.tiny_decoder``) meets latents off that
manifold at generation time: faint second blobs that the VAE's decoder fades out and a small decoder draws
as shapes. Distilling the VAE decoder on generated latents (TAESD's own recipe adds such a term) covers them.

The pictures come from the product's default path (``pipelines.models.loading``): half from a default
request (DPM++ 2M, 20 steps, CFG 7), and, given an LCM-LoRA, half from ``LCM SGM Uniform`` at 4 steps
and CFG 1. Prompts are training captions of the shapes world, seeds ``seed * 100000 + i``. The set is
cached under ``folder`` by its settings and the exact weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipelines.models.hashing import file_hash
from pipelines.training import common, data, shapes

PER_PROMPT = 4  # images per request (one batch)
LCM_SAMPLER, LCM_STEPS = "LCM SGM Uniform", 4
LORA_NAME = "lcm-generated"


def generated_set(folder: Path, n: int, seed: int, lora: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cached (latents (N, 4, 64, 64) float16 as the U-Net leaves them (scaled), the VAE decoder's 512x512
    pictures of them (N, 512, 512, 3) uint8); with ``lora``, the second half are 4-step LCM latents."""
    from pipelines.models.shipped import EMBEDDED_MODEL_DIR
    from pipelines.training.unet import weights_id

    if n % (2 * PER_PROMPT):
        raise ValueError(f"the generated set's size must be a multiple of {2 * PER_PROMPT}, got {n}")
    key = f"unet{weights_id(EMBEDDED_MODEL_DIR / 'unet')}-vae{weights_id(EMBEDDED_MODEL_DIR / 'vae')}"
    key += f"-lora{file_hash(lora)}" if lora is not None else ""
    path = folder / f"generated-{key}-s{seed}-n{n}.npz"
    if not path.is_file():
        latents, pictures = generate(n, seed, lora)
        common.save_npz(path, latents=latents, pictures=pictures)
    with np.load(path) as stored:
        return stored["latents"], stored["pictures"]


def generate(n: int, seed: int, lora: Path | None) -> tuple[np.ndarray, np.ndarray]:
    from pipelines.generation.request import GenerationRequest
    from pipelines.models.library import ModelLibrary, place_lora
    from pipelines.models.loading import load_pipeline

    captions = [shapes.caption(a) for a in shapes.dataset(data.TRAIN_SEED, n // PER_PROMPT)]
    default = {"steps": 20, "cfg_scale": 7.0, "tag": ""}
    few_step = {"steps": LCM_STEPS, "cfg_scale": 1.0, "sampler": LCM_SAMPLER, "tag": f"<lora:{LORA_NAME}:1> "}
    half = len(captions) // 2
    settings = [default] * half + [few_step if lora is not None else default] * (len(captions) - half)
    latents, pictures = [], []
    with tempfile.TemporaryDirectory() as library_root:
        (Path(library_root) / "Lora").mkdir()
        if lora is not None:
            place_lora(lora, Path(library_root) / "Lora", LORA_NAME)
        pipe = load_pipeline("embedded", device="cpu", library=ModelLibrary([Path(library_root)], shipped=False))
        for k, (caption, setting) in enumerate(tqdm(list(zip(captions, settings, strict=True)),
                                                    desc="generated latents", mininterval=20)):
            options = {key: value for key, value in setting.items() if key != "tag"}
            request = GenerationRequest(prompt=setting["tag"] + caption, n=PER_PROMPT,
                                        seed=seed * 100000 + PER_PROMPT * k, **options).resolved()
            with pipe.generating():
                run, _ = pipe.start(request)
                batch = run.run()  # (PER_PROMPT, 4, 64, 64), scaled
                images = pipe.decode(batch, "Full")
            latents.append(batch.float().cpu().numpy().astype(np.float16))
            pictures.append(np.stack([np.asarray(image) for image in images]))
    return np.concatenate(latents), np.concatenate(pictures)
