"""Model spec -> pipeline. Local sources only; safetensors only.

Specs: ``"embedded"`` (the model shipped in this package), a diffusers folder (model_index.json,
unet/, vae/, text_encoder/, tokenizer/, scheduler/), a single-file SD 1.x ``.safetensors`` checkpoint
in the original CompVis key layout (configs shipped in ``pipelines/models/configs/sd1``), or a Hugging Face
repo id already in the local cache (looked up with ``local_files_only``; nothing is downloaded).
Pickle-based files (.ckpt, .bin, .pt, .pth) are refused: loading them can execute code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.generation.text_to_image import TextToImagePipeline
from pipelines.models.components import SDComponents
from pipelines.models.errors import PICKLE_SUFFIXES, ModelLoadError, refuse_pickle
from pipelines.models.hashing import file_hash
from pipelines.models.quiet import quiet_loading
from pipelines.models.shipped import CLIP_TOKENIZER_DIR, EMBEDDED_MODEL_DIR, SD1_CONFIG_DIR, read_scheduler_config
from pipelines.speed.options import (
    SpeedOptions,
    apply_speed_options,
    default_device,
    default_dtype,
    default_speed_options,
    text_encoder_dtype,
)

if TYPE_CHECKING:
    import torch

    from pipelines.models.library import ModelLibrary

COMPONENT_FOLDERS = ("unet", "vae", "text_encoder")


def resolve_spec(spec: str | Path) -> Path:
    """Turn a spec into a local path: the embedded folder, a file/folder, or a cached HF repo."""
    text = str(spec).strip()
    if not text:
        raise ModelLoadError("model spec is empty; use 'embedded', a folder, or a .safetensors file")
    if text == "embedded":
        if not (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
            raise ModelLoadError(
                f"the embedded model is not built in {EMBEDDED_MODEL_DIR}; train and export it with the "
                "`python -m pipelines.training.<stage>` scripts (README, 'The embedded model')"
            )
        return EMBEDDED_MODEL_DIR
    path = Path(text).expanduser()
    if path.exists():
        return path
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            return cached_repo(text)
        except FileNotFoundError as error:
            raise ModelLoadError(f"model not found: {error}") from error
    raise ModelLoadError(f"model not found: {path} (no such file or folder)")


def text_encoder_layers(spec: str | Path, config: str | Path | None = None) -> int:
    """The text encoder's layer count (the largest clip skip) of a model spec, from the config ``load_pipeline``
    builds it from, without reading weights: a diffusers folder's ``text_encoder/config.json``, a single file's
    from ``config`` (default: SD 1.x, 12 layers). ModelLoadError when the spec or config cannot be read."""
    return _text_encoder_number(spec, config, "num_hidden_layers", "layer count")


def text_encoder_width(spec: str | Path, config: str | Path | None = None) -> int:
    """The text encoder's hidden size (an embedding's vector width; 768 for SD 1.x), read as
    :func:`text_encoder_layers` reads the layer count, without weights."""
    return _text_encoder_number(spec, config, "hidden_size", "width")


def _text_encoder_number(spec: str | Path, config: str | Path | None, key: str, what: str) -> int:
    """A positive integer ``key`` of the text encoder config a model spec is built from."""
    import json

    path = resolve_spec(spec)
    folder = path if path.is_dir() else Path(config) if config else SD1_CONFIG_DIR
    file = folder / "text_encoder" / "config.json"
    try:
        value = json.loads(file.read_text(encoding="utf-8"))[key]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(f"{file}: cannot read the text encoder's {what} ({error})") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelLoadError(f"{file}: {key} must be a positive integer, got {value!r}")
    return value


def cached_repo(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    """A repo already in the local Hugging Face cache; never downloads (FileNotFoundError if absent)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir))
    except Exception as error:  # noqa: BLE001 - LocalEntryNotFoundError and friends
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local path nor in the local Hugging Face cache "
            "(nothing is downloaded; put the weights on disk and pass their path)"
        ) from error


def load_pipeline(
    spec: str | Path = "embedded",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    vae: str | Path | None = None,
    config: str | Path | None = None,
    speed: SpeedOptions | None = None,
    library: ModelLibrary | None = None,
) -> TextToImagePipeline:
    """Load a text-to-image pipeline from a local model spec (see module docstring).

    ``dtype``: the U-Net and VAE dtype (default: fp16 on CUDA, bf16 on CPUs with native bf16, else
    fp32; see ``pipelines.speed.options``). ``vae``: a separate VAE ``.safetensors`` (original or diffusers
    key layout) replacing the model's. ``config``: a diffusers folder whose configs describe a
    single-file checkpoint (default: SD 1.x). ``speed``: memory format / fusion / compile options.
    ``library``: where ``<lora:name:1>`` and embeddings in prompts are found (default: what ships
    with the package, e.g. the example LoRA ``<lora:hexagon:1>``).
    """
    from pipelines.speed.devices import checked_device, checked_float_dtype

    device = checked_device(device) if device is not None else default_device()
    dtype = checked_float_dtype(dtype) if dtype is not None else default_dtype(device)
    dtypes = {"model": dtype, "text": text_encoder_dtype(device)}
    path = resolve_spec(spec)
    refuse_pickle(path)
    config_dir = Path(config) if config else SD1_CONFIG_DIR
    with quiet_loading():
        if path.is_dir():
            components = load_diffusers_folder(path, dtypes)
        elif path.suffix.lower() == ".safetensors":
            from pipelines.models.single_file import load_single_file

            components = load_single_file(path, config_dir, dtypes)
        else:
            raise ModelLoadError(f"{path}: not a model; expected a diffusers folder or a .safetensors file")
        if vae is not None:
            from pipelines.models.single_file import load_vae_file

            vae_config = path if path.is_dir() and config is None else config_dir  # a folder's own VAE shape
            components.vae = load_vae_file(Path(vae), vae_config, dtypes["model"])
            components.vae_name = Path(vae).name
            weights = Path(vae) if Path(vae).is_file() else next(iter(sorted(Path(vae).glob("*.safetensors"))), None)
            if weights is not None:
                components.vae_hash = library.hashes.short_hash(weights) if library is not None else file_hash(weights)
    if str(spec).strip() == "embedded":
        components.name = EMBEDDED_MODEL_DIR.name
    from pipelines.models.tiny_decoder import find_tiny_decoder, load_tiny_decoder

    roots = library.roots if library is not None else ()
    tiny = find_tiny_decoder(path if path.is_dir() else None, roots, float(components.vae.config.scaling_factor))
    if tiny is not None:
        components.tiny_decoder = load_tiny_decoder(tiny, dtypes["model"])
    for module in (components.unet, components.vae, components.text_encoder, components.tiny_decoder):
        if module is None:
            continue
        if module.device.type != device.split(":")[0]:
            module.to(device)
        module.eval().requires_grad_(False)
    apply_speed_options(components, speed or default_speed_options(device))
    from pipelines.models.library import ModelLibrary
    from pipelines.models.networks import LibraryNetworks

    pipe = TextToImagePipeline(components)
    pipe.extra_networks = LibraryNetworks(library if library is not None else ModelLibrary(), components)
    return pipe


def _weights_file(folder: Path) -> tuple[Path, str | None]:
    """The safetensors weights of one component folder and its variant; refuses pickle-only folders."""
    candidates = sorted(folder.glob("*.safetensors"))
    plain = [p for p in candidates if p.name.count(".") == 1]
    if plain:
        return plain[0], None
    if candidates:
        return candidates[0], candidates[0].name.split(".")[-2]
    pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES] if folder.is_dir() else []
    if pickles:
        refuse_pickle(pickles[0])
    raise ModelLoadError(f"{folder}: no .safetensors weights found")


def load_diffusers_folder(path: Path, dtypes: dict[str, torch.dtype]) -> SDComponents:
    """Components of a diffusers-layout folder, each checked and loaded with ``local_files_only``."""
    # By module path: ``from diffusers import ...`` also runs the __init__ of the packages on the way.
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers.models.clip.modeling_clip import CLIPTextModel
    from transformers.models.clip.tokenization_clip import CLIPTokenizer

    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path}: not a diffusers model folder (no model_index.json)")
    weights = {name: _weights_file(path / name) for name in COMPONENT_FOLDERS}
    classes: dict[str, Any] = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    modules: dict[str, Any] = {}
    for name, model_class in classes.items():
        file, variant = weights[name]
        dtype = dtypes["text" if name == "text_encoder" else "model"]
        try:
            modules[name] = model_class.from_pretrained(
                path, subfolder=name, variant=variant, use_safetensors=True, local_files_only=True, dtype=dtype
            )
        except Exception as error:  # noqa: BLE001 - every library error becomes one clear message
            raise ModelLoadError(f"{file}: cannot load {name}: {error}") from error
    tokenizer_dir = path / "tokenizer" if (path / "tokenizer" / "vocab.json").is_file() else CLIP_TOKENIZER_DIR
    return SDComponents(
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True),
        text_encoder=modules["text_encoder"],
        unet=modules["unet"],
        vae=modules["vae"],
        scheduler_config=read_scheduler_config(path),
        name=path.name,
        model_hash=file_hash(weights["unet"][0]),
        source=str(path),
    )
