"""Tiny VAE decoders: TAESD (Ollin Boer Bohan, "Tiny AutoEncoder for Stable Diffusion") and the like.

A tiny decoder maps the diffusion model's latents [B, 4, h, w] straight to pixels [B, 3, 8h, 8w] in a
fraction of the full VAE decoder's time, with slightly softer detail. A1111 calls the choice
"VAE type for decode" (option ``sd_vae_decode_method``: ``Full`` or ``TAESD``; infotext ``VAE Decoder``).
Like TAESD, it takes the *scaled* latents the U-Net works in (diffusers' ``AutoencoderTiny``,
``scaling_factor`` 1.0); its own ``latents [-1, 1]`` clamp is ``tanh(z / 3) * 3``.

Where one is found, first match wins:

1. the model folder's own ``vae_decoder_tiny/`` (``config.json`` of an ``AutoencoderTiny`` and
   ``diffusion_pytorch_model.safetensors`` with its ``decoder.*`` weights; the embedded model ships one
   trained for its own latent space by ``pipelines.training.tiny_decoder``);
2. for a model in Stable Diffusion 1.x's latent space (VAE ``scaling_factor`` 0.18215), the original
   TAESD decoder file ``taesd_decoder.safetensors`` in a models folder's ``VAE-approx/`` (A1111) or
   ``vae_approx/`` (ComfyUI). Its keys are the indices of TAESD's ``nn.Sequential`` (``1.weight``,
   ``3.conv.0.weight``, ...), one more than diffusers' ``decoder.layers.N`` (TAESD's index 0 is the clamp).

Only ``.safetensors`` is read (TAESD's ``.pth`` files are pickles and are refused).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.models.errors import ModelLoadError, refuse_pickle

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderTiny

MODEL_SUBFOLDER = "vae_decoder_tiny"
APPROX_FOLDERS = ("VAE-approx", "vae_approx")
TAESD_DECODER_FILE = "taesd_decoder.safetensors"
SD1_SCALING_FACTOR = 0.18215

# TAESD's published decoder: 64 channels, 3/3/3/1 blocks (its config in diffusers' madebyollin/taesd).
TAESD_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "act_fn": "relu",
    "encoder_block_out_channels": [64, 64, 64, 64], "decoder_block_out_channels": [64, 64, 64, 64],
    "num_encoder_blocks": [1, 3, 3, 3], "num_decoder_blocks": [3, 3, 3, 1],
    "upsampling_scaling_factor": 2, "latent_magnitude": 3, "latent_shift": 0.5, "scaling_factor": 1.0,
}


def taesd_to_diffusers_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TAESD decoder keys (``<index>.<rest>``) -> diffusers ``decoder.layers.<index - 1>.<rest>``."""
    out = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or int(index) < 1 or not rest:
            raise ModelLoadError(f"not a TAESD decoder key: {key!r}")
        out[f"decoder.layers.{int(index) - 1}.{rest}"] = value
    return out


def build_decoder(config: dict, decoder_state: dict[str, torch.Tensor], source: Path,
                  dtype: torch.dtype) -> AutoencoderTiny:
    """An ``AutoencoderTiny`` of ``config`` with ``decoder.*`` weights loaded strictly; decode only (its
    encoder is not built)."""
    import torch
    from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny

    from pipelines.speed.vae_precision import cast_module

    try:
        with torch.device("meta"):  # no random initialisation: every decoder weight comes from the file
            model = AutoencoderTiny.from_config(config)
    except (TypeError, ValueError) as error:
        raise ModelLoadError(f"{source}: not an AutoencoderTiny config ({error})") from error
    model.encoder = torch.nn.Identity()  # decode only: no encoder weights ship with a tiny decoder
    expected = {f"decoder.{key}" for key in model.decoder.state_dict()}
    got = set(decoder_state)
    if got != expected:
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        raise ModelLoadError(f"{source}: not this tiny decoder's weights (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    state = {k.removeprefix("decoder."): v for k, v in decoder_state.items()}
    try:
        model.decoder.load_state_dict(state, assign=True)
    except RuntimeError as error:
        raise ModelLoadError(f"{source}: tensor shapes do not fit the tiny decoder ({error})") from error
    return cast_module(model, dtype).eval().requires_grad_(False)


def load_tiny_decoder(path: Path, dtype: torch.dtype) -> AutoencoderTiny:
    """A tiny decoder from a ``vae_decoder_tiny``-style folder or an original TAESD decoder file."""
    from pipelines.models.single_file import read_safetensors

    refuse_pickle(path)
    if path.is_dir():
        config_file, weights = path / "config.json", path / "diffusion_pytorch_model.safetensors"
        if not config_file.is_file():
            raise ModelLoadError(f"{path}: a tiny decoder folder needs config.json")
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"{config_file}: not a readable JSON config ({error})") from error
        state = read_safetensors(weights)
        return build_decoder(config, {k: v for k, v in state.items() if k.startswith("decoder.")}, path, dtype)
    return build_decoder(TAESD_CONFIG, taesd_to_diffusers_keys(read_safetensors(path)), path, dtype)


def save_tiny_decoder(model: AutoencoderTiny, folder: Path, metadata: dict[str, str] | None = None) -> Path:
    """``model``'s decoder as a ``vae_decoder_tiny``-style folder: its config, ``decoder.*`` weights in fp16."""
    from safetensors.torch import save_file

    config = {k: v for k, v in model.config.items() if not k.startswith("_") and k != "block_out_channels"}
    tensors = {f"decoder.{k}": v.detach().half().contiguous() for k, v in model.decoder.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny", **config}, indent=2,
                                                   sort_keys=True) + "\n")
    weights = folder / "diffusion_pytorch_model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt", **(metadata or {})})
    return folder


def find_tiny_decoder(model_folder: Path | None, roots: Sequence[Path], vae_scaling_factor: float) -> Path | None:
    """Where this model's tiny decoder is (see the module docstring for the order), or None."""
    if model_folder is not None and (model_folder / MODEL_SUBFOLDER / "config.json").is_file():
        return model_folder / MODEL_SUBFOLDER
    if abs(vae_scaling_factor - SD1_SCALING_FACTOR) > 1e-6:
        return None  # TAESD knows SD 1.x's latent space only
    for root in roots:
        for folder in APPROX_FOLDERS:
            candidate = Path(root) / folder / TAESD_DECODER_FILE
            if candidate.is_file():
                return candidate
    return None
