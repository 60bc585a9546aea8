"""PEFT LoRA adapter folders (``PeftModel.save_pretrained``) -> per-module LoRA tensors with their alpha.

Layout: ``pipelines.models.peft_layout``. Weights: ``adapter_model.safetensors``, keys
``base_model.model.<module path>.lora_A.weight`` [r, in(, k, k)] and ``.lora_B.weight`` [out, r(, 1, 1)]. Config:
``adapter_config.json`` (PEFT's ``LoraConfig``), read with ``json`` (nothing in it is executed or unpickled):
a module's rank and alpha are those of the first ``rank_pattern`` / ``alpha_pattern`` key matching the end of its
path (PEFT's ``get_pattern_key``: ``(.*\\.)?(pattern)$``), else ``r`` and ``lora_alpha``; its scale is alpha / r, or
alpha / sqrt(r) with ``use_rslora`` (PEFT's ``LoraLayer.update_layer``). Fields that make a layer compute more than
W x + scale B A x (DoRA, biases, variants), or that changed the base weights when the adapter was made (PiSSA-style
initialisations), are refused by name. ``fan_in_fan_out`` is accepted: PEFT turns it off for Linear and Conv2d.

Which model a part adapts: its folder's name (``unet/``, ``text_encoder/``), else its module paths (``down_blocks.``
... for the U-Net, ``text_model.`` / ``encoder.layers.`` for CLIP's text encoder).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.models.errors import IncompatibleModel, ModelLoadError
from pipelines.models.lora_keys import PEFT_PREFIXES
from pipelines.models.peft_layout import (
    ADAPTER_CONFIG,
    ADAPTER_PICKLE,
    ADAPTER_WEIGHTS,
    MODEL_PREFIX,
    OTHER_BASE_FOLDERS,
    adapter_parts,
)

if TYPE_CHECKING:
    import torch

TENSORS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}  # -> kohya's names
UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "conv_norm_out", "time_embedding.")
TEXT_ENCODER_ROOTS = ("text_model.", "encoder.layers.", "embeddings.", "final_layer_norm")
# LoraConfig fields whose layers compute more than W x + scale B A x, or whose adapters hold more than B and A
REFUSED_FIELDS = {
    "use_dora": "DoRA rescales each weight by a learned magnitude",
    "lora_bias": "lora_B has a bias",
    "modules_to_save": "whole modules were trained and saved beside the adapter",
    "trainable_token_indices": "token embeddings were trained",
    "layer_replication": "it duplicates layers of the model",
    "target_parameters": "it adapts parameters, not layers",
    "use_qalora": "QA-LoRA pools the layer's input",
    "megatron_config": "it adapts Megatron's parallel layers",
    "alora_invocation_tokens": "an activated LoRA applies after given tokens only",
    "arrow_config": "Arrow routes between several adapters",
    "use_bdlora": "a LoRA variant",
    "velora_config": "a LoRA variant",
    "monteclora_config": "a LoRA variant",
    "kasa_config": "a LoRA variant",
}
# init_lora_weights values that changed the base weights (or add a variant): the adapter is not W + delta of ours
REFUSED_INITS = ("pissa", "olora", "corda", "loftq", "mica")


@dataclass(frozen=True)
class AdapterModule:
    """One adapted module: its key as ``lora_keys.module_table`` spells it, its factors and its alpha."""

    key: str  # "unet.<module path>" or "text_encoder.<module path>"
    tensors: dict[str, torch.Tensor]  # lora_down.weight [r, in(, k, k)], lora_up.weight [out, r(, 1, 1)]
    alpha: float
    rank_stabilized: bool  # use_rslora: scale alpha / sqrt(r)


def read_adapter(folder: Path) -> list[AdapterModule]:
    """Every module of the PEFT adapter ``folder`` (one part, or its ``unet/`` and ``text_encoder/`` parts).
    ModelLoadError naming the file for a missing or malformed config, unsupported fields, pickles or unknown keys;
    IncompatibleModel for an adapter of another base."""
    parts = adapter_parts(folder)
    if not parts:
        missing = ADAPTER_CONFIG if (folder / ADAPTER_WEIGHTS).is_file() else f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        raise ModelLoadError(f"{folder}: not a PEFT adapter folder ({missing} missing, there or in unet/ and "
                             "text_encoder/; PeftModel.save_pretrained writes both)")
    modules: list[AdapterModule] = []
    for component, part in parts.items():
        if component in OTHER_BASE_FOLDERS:
            raise IncompatibleModel(f"{part}: an adapter for another base (SDXL or a transformer model has "
                                    f"{component}/); this model is SD 1.x")
        modules += _read_part(part, component)
    return modules


def read_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict, checked (:func:`check_config`); ModelLoadError naming the file."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ModelLoadError(f"{path}: missing (a PEFT adapter's r and lora_alpha are in it)") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{path}: not a valid adapter config ({error})") from error
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: not a valid adapter config (a JSON object is expected)")
    check_config(config, path)
    return config


def check_config(config: dict[str, Any], path: Path) -> None:
    """ModelLoadError naming the field for a config sd-app cannot merge exactly (see the module docstring)."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ModelLoadError(f"{path}: peft_type {peft_type!r} is not supported (only LORA adapters)")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not _is_number(rank) or rank <= 0:
        raise ModelLoadError(f"{path}: r must be a positive number, got {rank!r}")
    if not _is_number(alpha):
        raise ModelLoadError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    for name, why in REFUSED_FIELDS.items():
        if config.get(name):
            raise ModelLoadError(f"{path}: {name} = {config[name]!r} is not supported ({why}; sd-app merges plain "
                                 "LoRA, W + scale * B A)")
    if config.get("bias", "none") not in (None, "none"):
        raise ModelLoadError(f"{path}: bias = {config['bias']!r} is not supported (the adapter replaces biases of "
                             "the model; only bias 'none' is)")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(REFUSED_INITS):
        raise ModelLoadError(f"{path}: init_lora_weights = {init!r} is not supported (it changed the base model's "
                             "weights, or the layer, when the adapter was made)")
    if config.get("use_rslora") not in (None, True, False):
        raise ModelLoadError(f"{path}: use_rslora must be true or false, got {config['use_rslora']!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict) or not all(_is_number(v) and v > 0 for v in patterns.values()):
            raise ModelLoadError(f"{path}: {name} must map module patterns to positive numbers, got {patterns!r}")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ModelLoadError(f"{path}: {name} key {pattern!r} is no regular expression ({error})") from error


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def pattern_value(patterns: dict[str, Any] | None, path: str, default: Any) -> Any:
    """The value of the first pattern matching the end of the module ``path`` (PEFT's ``get_pattern_key``), else
    ``default``: ``{"attn2.to_k": 8}`` matches ``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def _read_part(part: Path, component: str | None) -> list[AdapterModule]:
    from pipelines.models.library import check_lora_base, read_header
    from pipelines.models.single_file import read_safetensors

    weights = part / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ModelLoadError(f"{part / ADAPTER_PICKLE}: a Python pickle, never loaded (it can run code); save the "
                             f"adapter with safe_serialization=True (PEFT's default) to get {ADAPTER_WEIGHTS}")
    config = read_config(part / ADAPTER_CONFIG)
    check_lora_base(weights, read_header(weights), "an adapter")
    grouped: dict[str, dict[str, torch.Tensor]] = {}  # module path -> kohya tensor name -> tensor
    unknown: list[str] = []
    for key, tensor in read_safetensors(weights).items():
        path = key.removeprefix(MODEL_PREFIX)
        suffix = next((s for s in TENSORS if path.endswith("." + s)), None)
        if suffix is None:
            unknown.append(key)
        else:
            grouped.setdefault(path[: -len(suffix) - 1], {})[TENSORS[suffix]] = tensor
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ModelLoadError(f"{weights}: {len(unknown)} key(s) are no LoRA lora_A/lora_B weight: {shown}")
    if not grouped:
        raise ModelLoadError(f"{weights}: no LoRA weights in it")
    component = component or _component(weights, list(grouped))
    rslora = bool(config.get("use_rslora"))
    modules = []
    for path, tensors in grouped.items():
        if set(tensors) != set(TENSORS.values()):
            raise ModelLoadError(f"{weights}: module {path} has lora_A or lora_B alone")
        rank = int(tensors["lora_down.weight"].shape[0])
        expected = pattern_value(config.get("rank_pattern"), path, config["r"])
        if rank != expected:
            raise ModelLoadError(f"{weights}: module {path} has rank {rank}, but {ADAPTER_CONFIG} says {expected} "
                                 "(r, or its rank_pattern)")
        alpha = float(pattern_value(config.get("alpha_pattern"), path, config["lora_alpha"]))
        modules.append(AdapterModule(f"{PEFT_PREFIXES[component]}.{path}", tensors, alpha, rslora))
    return modules


def _component(weights: Path, paths: list[str]) -> str:
    """"unet" or "text_encoder", from a part's module paths; ModelLoadError when they do not say one of them."""
    found = {"unet" if p.startswith(UNET_ROOTS) else "text_encoder" if p.startswith(TEXT_ENCODER_ROOTS) else p
             for p in paths}
    if len(found) == 1 and found <= set(PEFT_PREFIXES):
        return found.pop()
    strange = sorted(found - set(PEFT_PREFIXES))
    detail = f"module {strange[0]!r} is neither's" if strange else "it has modules of both"
    raise ModelLoadError(f"{weights}: cannot tell whether this adapter is for the U-Net or the text encoder "
                         f"({detail}); save each model's adapter in its own unet/ or text_encoder/ folder")
