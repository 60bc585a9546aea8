"""LoRA key names: which model module a key of a LoRA file patches, in every layout we read.

- kohya sd-scripts (and LyCORIS): ``lora_unet_<diffusers module path, "." -> "_">.<tensor>`` and
  ``lora_te_<transformers module path, "." -> "_">.<tensor>``; SD 1.x U-Net paths may also come in the
  original (CompVis) layout, ``lora_unet_input_blocks_4_1_proj_in``, which A1111 maps the same way.
- diffusers / PEFT: ``unet.<module path>.lora_A.weight`` / ``text_encoder.<module path>.lora_B.weight``
  (``.lora.down.weight`` / ``.lora_linear_layer.up.weight`` in older diffusers files). diffusers' first
  layout, attention processors (``save_attn_procs``): ``[unet.]<block path>.attn1.processor.to_q_lora.down.weight``
  (``to_out_lora`` is ``to_out.0``; in the text encoder ``self_attn.to_q_lora`` is ``q_proj``), as diffusers'
  ``convert_unet_state_dict_to_peft`` and ComfyUI read them (no prefix: the U-Net's, as ``save_attn_procs`` wrote).
- ComfyUI's generic layout (``comfy/lora.py``, ``model_lora_keys_unet`` / ``model_lora_keys_clip``): its own
  state-dict paths, ``diffusion_model.<original U-Net path>.lora_up.weight`` and
  ``text_encoders.clip_l.transformer.<transformers path>.lora_down.weight``.

Every layout may patch Linear and Conv2d layers (any tensor format) and norm layers (GroupNorm, LayerNorm: LyCORIS
``w_norm``/``b_norm`` or full ``diff``/``diff_b`` deltas).

A key is split into (module key, tensor name): ``lora_unet_mid_block_attentions_0_proj_in`` and
``lora_down.weight``; :func:`module_table` maps module keys of every spelling to the model's modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from pipelines.models.components import SDComponents

KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}
PEFT_PREFIXES = {"unet": "unet", "text_encoder": "text_encoder"}
COMFY_PREFIXES = {"unet": "diffusion_model", "text_encoder": "text_encoders.clip_l.transformer"}
DOTTED_PREFIXES = tuple(f"{prefix}." for prefix in (*PEFT_PREFIXES.values(), *COMFY_PREFIXES.values()))
UNET_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")  # how an unprefixed ``save_attn_procs`` key starts
# kohya/LyCORIS tensor names (the part after the module key's first ".")
KOHYA_TENSORS = (
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b", "w_norm", "b_norm",
)
# diffusers/PEFT tensor-name suffixes -> kohya's
PEFT_TENSORS = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight",
    "lora_linear_layer.up.weight": "lora_up.weight",
}
# tensor names a dotted key (PEFT, ComfyUI) may end with, longest first (".diff_b" before ".diff")
DOTTED_TENSORS = sorted({**{name: name for name in KOHYA_TENSORS}, **PEFT_TENSORS}.items(), key=lambda i: -len(i[0]))
# diffusers' attention-processor keys: <module>[.processor].to_q_lora.up.weight
PROCESSOR_KEY = re.compile(
    r"^(?P<module>.+?)(?:\.processor)?\.to_(?P<projection>q|k|v|out)_lora\.(?P<end>up|down)\.weight$"
)
PROCESSOR_PROJECTIONS = {  # component -> the processor's projection name -> the module's
    "unet": {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"},
    "text_encoder": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"},
}


@dataclass(frozen=True)
class Target:
    """One patchable module: which component it is in, its module path there, and the module."""

    component: str  # "unet" or "text_encoder"
    path: str  # e.g. "down_blocks.1.attentions.0.proj_in"
    module: Any  # torch.nn.Linear, Conv2d, GroupNorm or LayerNorm


def kohya_name(component: str, path: str) -> str:
    """``lora_unet_down_blocks_1_attentions_0_proj_in`` for the U-Net module ``down_blocks.1.attentions.0.proj_in``;
    ``lora_te_text_model_encoder_layers_0_mlp_fc1`` for the text encoder's ``encoder.layers.0.mlp.fc1``."""
    return f"{KOHYA_PREFIXES[component]}_{canonical_path(component, path).replace('.', '_')}"


def canonical_path(component: str, path: str) -> str:
    """The module path as LoRA files spell it: transformers 5 dropped CLIPTextModel's ``text_model.`` level,
    which kohya and PEFT files (made with transformers 4) keep."""
    if component == "text_encoder" and not path.startswith("text_model."):
        return "text_model." + path
    return path


def patchable_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module path -> module for every Linear, Conv2d and affine norm layer of ``model`` (what a LoRA can patch)."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, kinds) and getattr(m, "weight", None) is not None}


def module_table(components: SDComponents) -> dict[str, Target]:
    """Every spelling of a patchable module's key -> its ``Target``: kohya (diffusers and original
    U-Net paths), PEFT (``unet.<path>``, ``text_encoder.<path>``) and ComfyUI (``diffusion_model.<original
    path>``, ``text_encoders.clip_l.transformer.<path>``)."""
    table: dict[str, Target] = {}
    for component in ("unet", "text_encoder"):
        model = getattr(components, component)
        for path, module in patchable_modules(model).items():
            target = Target(component, path, module)
            table[kohya_name(component, path)] = target
            table[f"{PEFT_PREFIXES[component]}.{path}"] = target
            table[f"{PEFT_PREFIXES[component]}.{canonical_path(component, path)}"] = target
            if component == "text_encoder":
                table[f"{COMFY_PREFIXES[component]}.{canonical_path(component, path)}"] = target
    for original, path in original_unet_paths(components.unet).items():
        target = table.get(kohya_name("unet", path))
        if target is not None:
            table.setdefault(kohya_name("unet", original), target)
            table.setdefault(f"{COMFY_PREFIXES['unet']}.{original}", target)
    return table


def original_unet_paths(unet: Any) -> dict[str, str]:
    """Original (CompVis) U-Net module path -> diffusers module path (``input_blocks.1.1.proj_in`` ->
    ``down_blocks.0.attentions.0.proj_in``), by the single-file exporter's renaming applied to names."""
    from pipelines.models.single_file import UNET_PREFIX, _unet_to_original

    class Names:  # the exporter renames a state dict's keys; hand it the names as the values
        config = unet.config

        @staticmethod
        def state_dict() -> dict[str, str]:
            return {name: name for name in unet.state_dict()}

    return {
        original.removeprefix(UNET_PREFIX).removesuffix(".weight"): name.removesuffix(".weight")
        for original, name in _unet_to_original(Names()).items()
        if name.endswith(".weight")
    }


def split_key(key: str) -> tuple[str, str] | None:
    """(module key, kohya tensor name) of a LoRA file's key, or None when it is no LoRA key we know."""
    if key.startswith(tuple(p + "_" for p in KOHYA_PREFIXES.values())):
        module, dot, tensor = key.partition(".")
        return (module, tensor) if dot and tensor in KOHYA_TENSORS else None
    processor = _processor_key(key)
    if processor is not None:
        return processor
    if not key.startswith(DOTTED_PREFIXES):
        return None
    key = key.replace(".processor.", ".")  # diffusers drops it too (``KEYS_TO_ALWAYS_REPLACE``)
    for suffix, tensor in DOTTED_TENSORS:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], tensor
    return None


def _processor_key(key: str) -> tuple[str, str] | None:
    """An attention-processor key as (``unet.<...>.attn1.to_q``, ``lora_up.weight``), else None."""
    match = PROCESSOR_KEY.match(key)
    if match is None:
        return None
    module = match["module"]
    if module.startswith(UNET_BLOCKS):
        module = f"{PEFT_PREFIXES['unet']}.{module}"  # ``save_attn_procs`` wrote the U-Net's keys unprefixed
    component = next((c for c, prefix in PEFT_PREFIXES.items() if module.startswith(prefix + ".")), None)
    if component is None:
        return None
    return f"{module}.{PROCESSOR_PROJECTIONS[component][match['projection']]}", f"lora_{match['end']}.weight"
