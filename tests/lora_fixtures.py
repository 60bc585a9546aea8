"""LoRA and embedding files of every format, built for a loaded model's shapes (random weights)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from pipelines.models.lora_keys import kohya_name
from pipelines.speed.conv_packing import current_weight

# (component, module path) the fixtures patch: linear, 1x1 conv and 3x3 conv in the U-Net, linear in the text encoder
UNET_LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
UNET_CONV = "down_blocks.0.resnets.0.conv1"
UNET_PROJ = "down_blocks.0.attentions.0.proj_in"
TE_LINEAR = "encoder.layers.0.self_attn.q_proj"
TE_MLP = "encoder.layers.1.mlp.fc1"
TE_OUT = "encoder.layers.0.self_attn.out_proj"  # diffusers infers a kohya text encoder LoRA's layout from it


def weight(components, component: str, path: str) -> torch.Tensor:
    """The module's weight as plain numbers (a prepacked convolution's unpacked copy)."""
    return current_weight(getattr(components, component).get_submodule(path))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kohya_lora(components, path: Path, rank: int = 4, alpha: float = 2.0, seed: int = 0,
               modules: tuple[tuple[str, str], ...] = (("unet", UNET_LINEAR), ("unet", UNET_CONV),
                                                       ("unet", UNET_PROJ), ("text_encoder", TE_LINEAR),
                                                       ("text_encoder", TE_OUT)),
               output_name: str | None = None) -> Path:
    """kohya LoRA (conv 3x3 downs as kohya's conv_dim / LoCon write them), alpha given; its header's
    ``ss_output_name`` (A1111's alias) is ``output_name``, the file stem by default, as kohya writes it."""
    g = _gen(seed)
    state = {}
    for component, module in modules:
        w = weight(components, component, module)
        name = kohya_name(component, module)
        if w.ndim == 4:
            state[f"{name}.lora_down.weight"] = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * 0.1
            state[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.1
        else:
            state[f"{name}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.1
            state[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.1
        state[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                          "ss_base_model_version": "sd_v1",
                                          "ss_output_name": path.stem if output_name is None else output_name})
    return path


def locon_cp(components, path: Path, rank: int = 3, alpha: float = 1.5, seed: int = 1) -> Path:
    """LyCORIS LoCon with CP decomposition: 1x1 down, lora_mid [r, r, 3, 3], 1x1 up."""
    g = _gen(seed)
    w = weight(components, "unet", UNET_CONV)
    name = kohya_name("unet", UNET_CONV)
    state = {
        f"{name}.lora_down.weight": torch.randn(rank, w.shape[1], 1, 1, generator=g) * 0.2,
        f"{name}.lora_mid.weight": torch.randn(rank, rank, 3, 3, generator=g) * 0.2,
        f"{name}.lora_up.weight": torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.2,
        f"{name}.alpha": torch.tensor(alpha),
    }
    save_file(state, str(path))
    return path


def loha(components, path: Path, rank: int = 2, alpha: float = 1.0, seed: int = 2) -> Path:
    """LyCORIS LoHa on a linear and a 3x3 conv (w_b flattened over in x k x k, as LyCORIS writes it)."""
    g = _gen(seed)
    state = {}
    for component, module in (("unet", UNET_LINEAR), ("unet", UNET_CONV)):
        w = weight(components, component, module)
        name = kohya_name(component, module)
        fan_in = w[0].numel()
        for i in ("1", "2"):
            state[f"{name}.hada_w{i}_a"] = torch.randn(w.shape[0], rank, generator=g) * 0.3
            state[f"{name}.hada_w{i}_b"] = torch.randn(rank, fan_in, generator=g) * 0.3
        state[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


def lokr(components, path: Path, alpha: float = 4.0, seed: int = 3) -> Path:
    """LyCORIS LoKr: linear with w1 whole and w2 = w2_a @ w2_b (rank 2); 3x3 conv with w1 and a 4-D w2."""
    g = _gen(seed)
    state = {}
    w = weight(components, "unet", UNET_LINEAR)  # [32, 32]: w1 [4, 2] (x) w2 [8, 16]
    name = kohya_name("unet", UNET_LINEAR)
    state[f"{name}.lokr_w1"] = torch.randn(4, 2, generator=g)
    state[f"{name}.lokr_w2_a"] = torch.randn(w.shape[0] // 4, 2, generator=g) * 0.1
    state[f"{name}.lokr_w2_b"] = torch.randn(2, w.shape[1] // 2, generator=g) * 0.1
    state[f"{name}.alpha"] = torch.tensor(alpha)
    c = weight(components, "unet", UNET_CONV)  # [32, 32, 3, 3]: w1 [2, 4] (x) w2 [16, 8, 3, 3]
    name = kohya_name("unet", UNET_CONV)
    state[f"{name}.lokr_w1"] = torch.randn(2, 4, generator=g)
    state[f"{name}.lokr_w2"] = torch.randn(c.shape[0] // 2, c.shape[1] // 4, 3, 3, generator=g) * 0.05
    save_file(state, str(path))
    return path


def peft_lora(components, path: Path, rank: int = 4, lora_alpha: float = 8.0, seed: int = 4) -> Path:
    """diffusers/PEFT keys (``unet.<path>.lora_A.weight``), alpha in ``lora_adapter_metadata`` (as diffusers does)."""
    import json

    g = _gen(seed)
    state = {}
    for component, module, spelled in (("unet", UNET_LINEAR, UNET_LINEAR),
                                       ("text_encoder", TE_MLP, "text_model." + TE_MLP)):
        w = weight(components, component, module)
        state[f"{component}.{spelled}.lora_A.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.1
        state[f"{component}.{spelled}.lora_B.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.1
    meta = {"unet.r": rank, "unet.lora_alpha": lora_alpha, "text_encoder.r": rank,
            "text_encoder.lora_alpha": lora_alpha}
    save_file(state, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return path


def sdxl_lora(path: Path) -> Path:
    """A LoRA for SDXL (second text encoder, 2048-wide cross-attention): not for an SD 1.x model."""
    state = {
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4),
    }
    save_file(state, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    return path


def embedding(path: Path, vectors: torch.Tensor, key: str = "emb_params") -> Path:
    save_file({key: vectors.contiguous()}, str(path))
    return path
