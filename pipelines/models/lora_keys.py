"""LoRA key names: which model module a key of a LoRA file patches, in every layout we read.

- kohya sd-scripts (and LyCORIS): ``lora_unet_<diffusers module path, "." -> "_">.<tensor>`` and
  ``lora_te_<transformers module path, "." -> "_">.<tensor>``; SD 1.x U-Net paths may also come in the
  original (CompVis) layout, ``lora_unet_input_blocks_4_1_proj_in``, which A1111 maps the same way.
- diffusers / PEFT: ``unet.<module path>.lora_A.weight`` / ``text_encoder.<module path>.lora_B.weight``
  (``.lora.down.weight`` / ``.lora_linear_layer.up.weight`` in older diffusers files).

A key is split into (module key, tensor name): ``lora_unet_mid_block_attentions_0_proj_in`` and
``lora_down.weight``; :func:`module_table` maps module keys of every spelling to the model's modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from pipelines.models.components import SDComponents

KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}
PEFT_PREFIXES = {"unet": "unet", "text_encoder": "text_encoder"}
# kohya/LyCORIS tensor names (the part after the module key's first ".")
KOHYA_TENSORS = (
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b",
)
# diffusers/PEFT tensor-name suffixes -> kohya's
PEFT_TENSORS = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight",
    "lora_linear_layer.up.weight": "lora_up.weight",
    "alpha": "alpha",
}


@dataclass(frozen=True)
class Target:
    """One patchable module: which component it is in, its module path there, and the module."""

    component: str  # "unet" or "text_encoder"
    path: str  # e.g. "down_blocks.1.attentions.0.proj_in"
    module: Any  # torch.nn.Linear or torch.nn.Conv2d


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
    """Module path -> module for every Linear and Conv2d of ``model`` (what a LoRA can patch)."""
    import torch

    return {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def module_table(components: SDComponents) -> dict[str, Target]:
    """Every spelling of a patchable module's key -> its ``Target``: kohya (diffusers and original
    U-Net paths) and PEFT (``unet.<path>``, ``text_encoder.<path>``)."""
    table: dict[str, Target] = {}
    for component in ("unet", "text_encoder"):
        model = getattr(components, component)
        for path, module in patchable_modules(model).items():
            target = Target(component, path, module)
            table[kohya_name(component, path)] = target
            table[f"{PEFT_PREFIXES[component]}.{path}"] = target
            table[f"{PEFT_PREFIXES[component]}.{canonical_path(component, path)}"] = target
    for original, path in original_unet_paths(components.unet).items():
        target = table.get(kohya_name("unet", path))
        if target is not None:
            table.setdefault(kohya_name("unet", original), target)
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
    for suffix, tensor in PEFT_TENSORS.items():
        if key.endswith("." + suffix) and key.startswith(tuple(p + "." for p in PEFT_PREFIXES.values())):
            module = key[: -len(suffix) - 1]
            return module.removesuffix(".processor"), tensor
    module, dot, tensor = key.partition(".")
    if dot and key.startswith(tuple(p + "_" for p in KOHYA_PREFIXES.values())) and tensor in KOHYA_TENSORS:
        return module, tensor
    return None
