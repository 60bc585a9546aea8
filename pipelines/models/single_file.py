"""Single-file SD 1.x checkpoints in the original CompVis key layout (``.safetensors`` only).

Layout (CompVis/stable-diffusion ``ldm``): ``model.diffusion_model.*`` (U-Net),
``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.*`` (CLIP text model). Loading converts
with diffusers' own single-file converters against configs shipped in this package (no download);
``to_original_layout`` is the inverse, so a diffusers model can be exported for A1111 and friends.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.models.components import SDComponents
from pipelines.models.errors import ModelLoadError, refuse_pickle
from pipelines.models.hashing import file_hash
from pipelines.models.shipped import CLIP_TOKENIZER_DIR, read_scheduler_config

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file; a clear error naming the file if it is not one or is cut short."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    refuse_pickle(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path}: expected a .safetensors file")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"{path}: not a valid or complete .safetensors file ({error})") from error


def _check_prefix(path: Path, state: dict[str, Any], prefix: str, what: str) -> None:
    if not any(key.startswith(prefix) for key in state):
        raise ModelLoadError(
            f"{path}: not an SD 1.x checkpoint in the original layout (no '{prefix}*' keys for the {what}); "
            "for a diffusers folder pass the folder instead"
        )


def _assert_materialized(path: Path, name: str, module: torch.nn.Module) -> None:
    """Converters may leave weights they did not find on the meta device: treat that as an error."""
    missing = [key for key, value in module.state_dict().items() if value.is_meta]
    if missing:
        raise ModelLoadError(f"{path}: {name} weights missing from the checkpoint, e.g. {missing[:3]}")


def _convert(path: Path, name: str, build: Any) -> Any:
    try:
        module = build()
    except ModelLoadError:
        raise
    except Exception as error:  # noqa: BLE001 - shape mismatches etc. become one clear message
        raise ModelLoadError(f"{path}: cannot load the {name} (wrong model type or shapes?): {error}") from error
    _assert_materialized(path, name, module)
    return module


# Checkpoints saved with transformers < 4.x (many merges of the NovelAI lineage) lack ``text_model.`` in the CLIP
# keys; A1111 (``modules/sd_models.py``, ``checkpoint_dict_replacements_sd1``) and kohya rename them so.
_OLD_TEXT_KEYS = tuple(TEXT_PREFIX + part for part in ("embeddings.", "encoder.", "final_layer_norm."))


def with_current_text_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the old CLIP key layout (``cond_stage_model.transformer.encoder...``) renamed to the current
    one (``cond_stage_model.transformer.text_model.encoder...``); other keys unchanged."""
    if not any(key.startswith(_OLD_TEXT_KEYS) for key in state):
        return state
    return {(TEXT_PREFIX + "text_model." + key[len(TEXT_PREFIX):] if key.startswith(_OLD_TEXT_KEYS) else key): value
            for key, value in state.items()}


# diffusers' VAE attention names before 0.14 (``query``, ``key``, ``value``, ``proj_attn``); diffusers' own
# from_pretrained still renames them.
_OLD_ATTENTION = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_NEW_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def with_current_attention_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers-layout VAE's state with the pre-0.14 attention names renamed to the current ones."""
    return {_OLD_ATTENTION.sub(lambda m: f"{m.group(1)}{_NEW_ATTENTION[m.group(2)]}.", key): value
            for key, value in state.items()}


def unet_in_channels(state: dict[str, torch.Tensor]) -> int:
    """Input channels of a CompVis-layout U-Net: 4, or 9 for an inpainting model (``sd-v1-5-inpainting``)."""
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")  # [C, in_channels, 3, 3]
    return int(conv_in.shape[1]) if conv_in is not None and conv_in.ndim == 4 else 4


def load_single_file(path: Path, config_dir: Path, dtypes: dict[str, torch.dtype]) -> SDComponents:
    """Components of a single-file SD 1.x checkpoint, shaped by the diffusers configs in ``config_dir``."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers.models.clip.modeling_clip import CLIPTextModel
    from transformers.models.clip.tokenization_clip import CLIPTokenizer

    state = with_current_text_keys(read_safetensors(path))
    for prefix, what in ((UNET_PREFIX, "U-Net"), (VAE_PREFIX, "VAE"), (TEXT_PREFIX, "text encoder")):
        _check_prefix(path, state, prefix, what)
    options = {"config": str(config_dir), "local_files_only": True, "torch_dtype": dtypes["model"]}
    text_options = {**options, "torch_dtype": dtypes["text"]}
    unet_options = {**options, "in_channels": unet_in_channels(state)}  # 9 for SD inpainting checkpoints
    unet = _convert(
        path, "U-Net", lambda: UNet2DConditionModel.from_single_file(state, subfolder="unet", **unet_options)
    )
    vae = _convert(path, "VAE", lambda: AutoencoderKL.from_single_file(state, subfolder="vae", **options))
    text_encoder = _convert(
        path,
        "text encoder",
        lambda: create_diffusers_clip_model_from_ldm(
            CLIPTextModel, state, subfolder="text_encoder", **text_options
        ),
    )
    tokenizer_dir = config_dir / "tokenizer"
    if not (tokenizer_dir / "vocab.json").is_file():
        tokenizer_dir = CLIP_TOKENIZER_DIR
    return SDComponents(
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True),
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        scheduler_config=read_scheduler_config(config_dir),
        name=path.stem,
        model_hash=file_hash(path),
        source=str(path),
    )


def load_vae_file(path: Path, config_dir: Path, dtype: torch.dtype) -> AutoencoderKL:
    """A standalone VAE: a file in the original layout (with or without ``first_stage_model.``) or the diffusers
    layout (old attention names too), or a diffusers VAE folder (``config.json`` and safetensors weights)."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    from pipelines.speed.vae_precision import cast_module

    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: a VAE folder needs a diffusers config.json beside its weights")
        return _convert(path, "VAE", lambda: AutoencoderKL.from_pretrained(
            path, local_files_only=True, use_safetensors=True, torch_dtype=dtype))
    state = read_safetensors(path)
    options = {"config": str(config_dir), "subfolder": "vae", "local_files_only": True, "torch_dtype": dtype}
    if any(key.startswith("encoder.down_blocks.") for key in state):  # already diffusers layout
        def build() -> AutoencoderKL:
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(config_dir), subfolder="vae"))
            vae.load_state_dict(with_current_attention_keys(state), strict=True)
            return cast_module(vae, dtype)
    else:
        def build() -> AutoencoderKL:
            return AutoencoderKL.from_single_file(state, **options)
    return _convert(path, "VAE", build)


# ---- diffusers -> original layout (export) ---------------------------------------------------------

_UNET_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
_UNET_TOP = [
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    ("conv_in.", "input_blocks.0.0."),
    ("conv_norm_out.", "out.0."),
    ("conv_out.", "out.2."),
]
_VAE_ATTENTION = [
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
]


def _unet_block_map(config: Any) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, original prefix, is_resnet) for the U-Net's blocks, from its config."""
    levels, layers = len(config.block_out_channels), config.layers_per_block
    mapping: list[tuple[str, str, bool]] = []
    for i in range(levels):
        for j in range(layers):
            index = 1 + i * (layers + 1) + j
            mapping.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{index}.0.", True))
            mapping.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{index}.1.", False))
        if i < levels - 1:
            downsampler = f"input_blocks.{(i + 1) * (layers + 1)}.0.op."
            mapping.append((f"down_blocks.{i}.downsamplers.0.conv.", downsampler, False))
        up_has_attention = "CrossAttn" in config.up_block_types[i]
        for j in range(layers + 1):
            index = i * (layers + 1) + j
            mapping.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{index}.0.", True))
            mapping.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{index}.1.", False))
        if i < levels - 1:
            upsampler = f"output_blocks.{i * (layers + 1) + layers}.{2 if up_has_attention else 1}."
            mapping.append((f"up_blocks.{i}.upsamplers.0.", upsampler, False))
    mapping.append(("mid_block.attentions.0.", "middle_block.1.", False))
    for j in range(2):
        mapping.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", True))
    return mapping


def _unet_to_original(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    blocks = _unet_block_map(unet.config)
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        new = key
        for old, original in _UNET_TOP:
            if key.startswith(old):
                new = original + key[len(old) :]
        for old, original, is_resnet in blocks:
            if key.startswith(old):
                rest = key[len(old) :]
                if is_resnet:
                    for diffusers_name, original_name in _UNET_RESNET:
                        if rest.startswith(diffusers_name + "."):
                            rest = original_name + rest[len(diffusers_name) :]
                new = original + rest
        out[UNET_PREFIX + new] = value
    return out


def _vae_to_original(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    prefixes: list[tuple[str, str]] = []
    for i in range(levels):
        prefixes.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."))
        prefixes.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        prefixes.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block."))
        prefixes.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample."))
    for part in ("encoder", "decoder"):
        prefixes.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
        prefixes.append((f"{part}.conv_norm_out.", f"{part}.norm_out."))
        for j in range(2):
            prefixes.append((f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}."))
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        new = key.replace(".conv_shortcut.", ".nin_shortcut.")
        for old, original in prefixes:
            if new.startswith(old):
                new = original + new[len(old) :]
        if ".mid.attn_1." in new:
            for old, original in _VAE_ATTENTION:
                new = new.replace(".mid.attn_1." + old, ".mid.attn_1." + original)
            if value.ndim == 2:  # linear [C, C] -> 1x1 conv [C, C, 1, 1]
                value = value[:, :, None, None]
        out[VAE_PREFIX + new] = value
    return out


def to_original_layout(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel
) -> dict[str, torch.Tensor]:
    """One CompVis-layout state dict for the three models (the inverse of ``load_single_file``)."""
    state = {**_unet_to_original(unet), **_vae_to_original(vae)}
    for key, value in text_encoder.state_dict().items():
        state[TEXT_PREFIX + "text_model." + key.removeprefix("text_model.")] = value
    return {key: value.contiguous() for key, value in state.items()}


def save_single_file(components: SDComponents, path: Path) -> Path:
    """Write the components as one original-layout ``.safetensors`` checkpoint."""
    from safetensors.torch import save_file

    state = to_original_layout(components.unet, components.vae, components.text_encoder)
    save_file(state, str(path), metadata={"format": "pt"})
    return path
