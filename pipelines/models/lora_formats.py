"""LoRA files -> per-module weight deltas, for every format A1111 reads.

Formats (DESIGN section 3): kohya LoRA and LyCORIS LoCon (``lora_down``/``lora_up``, ``alpha``; convolution
downs [r, in, k, k]; ``lora_mid`` [r, r, k, k] is LoCon's CP decomposition), LyCORIS LoHa (``hada_*``,
Hyeon-Woo et al. 2022, "FedPara"), LoKr (``lokr_*``, Kronecker product, Yeh et al. 2024, "LyCORIS"), full
deltas (``diff``, ``diff_b``), LyCORIS norm deltas (``w_norm``, ``b_norm``: a GroupNorm/LayerNorm's weight and
bias), and diffusers/PEFT (``lora_A``/``lora_B``, alpha from ``.alpha`` keys or the ``lora_adapter_metadata``
header, whose ``use_rslora`` makes the scale alpha / sqrt(rank): rank-stabilised LoRA, Kalajdzievski 2023, as
PEFT's ``LoraConfig``); PEFT's own adapter folders (``adapter_model.safetensors`` + ``adapter_config.json``) are
read by ``pipelines.models.peft_adapter``. Every delta is computed in fp32 and already scaled by alpha / rank (1
without alpha); the prompt's weight multiplies it when merged (``pipelines.models.lora``). Key layouts: ``lora_keys``.

Textual-inversion embeddings bundled in the file (kohya's ``bundle_emb.NAME.emb_params`` or
``bundle_emb.NAME.string_to_param.*``) are kept as ``LoraFile.embeddings``; A1111 makes them usable as NAME in
a prompt that uses the LoRA (``pipelines.models.networks``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.models.errors import ModelLoadError, refuse_pickle
from pipelines.models.lora_keys import PEFT_PREFIXES, split_key
from pipelines.models.peft_layout import ADAPTER_CONFIG, MODEL_PREFIX

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LoraModule:
    """The tensors a LoRA file holds for one model module, by kohya's tensor names."""

    key: str  # the module key as the file spells it
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None
    rank_stabilized: bool = False  # PEFT's use_rslora: scale alpha / sqrt(rank)

    @property
    def kind(self) -> str:
        names = set(self.tensors)
        if "hada_w1_a" in names:
            return "loha"
        if names & {"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"}:
            return "lokr"
        if "diff" in names or "diff_b" in names:
            return "full"
        if "w_norm" in names or "b_norm" in names:
            return "norm"
        return "locon" if "lora_mid.weight" in names else "lora"


@dataclass(frozen=True)
class LoraFile:
    """A parsed LoRA file: its name (as the prompt names it), path, AutoV2 hash and modules."""

    name: str
    path: Path
    short_hash: str
    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # bundled: name -> its tensors


REQUIRED = {
    "lora": ({"lora_down.weight", "lora_up.weight"},),
    "locon": ({"lora_down.weight", "lora_up.weight", "lora_mid.weight"},),
    "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},),
    "lokr": ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"}),  # and a w2 (checked in _lokr_factor)
    "full": ({"diff"}, {"diff_b"}),
    "norm": ({"w_norm"},),  # and b_norm if the norm has a bias (ComfyUI skips a b_norm alone)
}
BUNDLE_PREFIX = "bundle_emb."  # kohya's bundled embeddings: bundle_emb.NAME.<the embedding file's key>


def read_lora(path: Path, name: str, short_hash: str) -> LoraFile:
    """Parse a LoRA ``.safetensors`` or PEFT adapter folder; ModelLoadError naming the file for pickles, truncation
    or unknown keys."""
    from pipelines.models.library import check_lora_base, read_header
    from pipelines.models.single_file import read_safetensors

    if path.is_dir():
        return _read_adapter_folder(path, name, short_hash)
    refuse_pickle(path)
    state = read_safetensors(path)  # names the file when it is cut short or not safetensors
    header = read_header(path)
    metadata = header.metadata
    check_lora_base(path, header)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    bundled: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        if key.startswith(BUNDLE_PREFIX):
            embedding, _, inner = key.removeprefix(BUNDLE_PREFIX).partition(".")
            if embedding and inner:
                bundled.setdefault(embedding, {})[inner] = tensor
                continue
        parts = split_key(key)
        if parts is None:
            unknown.append(key)
        else:
            grouped.setdefault(parts[0], {})[parts[1]] = tensor
    if unknown:
        hint = " (DoRA's dora_scale is not supported)" if any("dora_scale" in k for k in unknown) else ""
        if any(k.startswith(MODEL_PREFIX) for k in unknown):
            hint = f" (a PEFT adapter's weights: use the folder holding them and its {ADAPTER_CONFIG})"
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ModelLoadError(f"{path}: {len(unknown)} key(s) are no LoRA/LyCORIS key of SD 1.x: {shown}{hint}")
    if not grouped and not bundled:
        raise ModelLoadError(f"{path}: no LoRA weights in it")
    peft_configs = _peft_configs(metadata)
    modules = {}
    for key, tensors in grouped.items():
        config = _peft_config(key, peft_configs)
        alpha_tensor = tensors.pop("alpha", None)
        alpha = float(alpha_tensor.float().item()) if alpha_tensor is not None else _peft_alpha(key, config)
        module = LoraModule(key, tensors, alpha, rank_stabilized=_is_true(config.get("use_rslora")))
        if not any(required <= set(tensors) for required in REQUIRED[module.kind]):
            raise ModelLoadError(f"{path}: module {key} has an incomplete {module.kind} ({', '.join(sorted(tensors))})")
        modules[key] = module
    return LoraFile(name, path, short_hash, modules, metadata, bundled)


def _read_adapter_folder(path: Path, name: str, short_hash: str) -> LoraFile:
    """A PEFT adapter folder (``pipelines.models.peft_adapter``) as a LoraFile."""
    from pipelines.models.peft_adapter import read_adapter

    modules = {m.key: LoraModule(m.key, m.tensors, m.alpha, m.rank_stabilized) for m in read_adapter(path)}
    return LoraFile(name, path, short_hash, modules)


def _peft_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """diffusers' ``lora_adapter_metadata`` (PEFT LoraConfig fields prefixed by component), per component."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    out: dict[str, dict] = {}
    for key, value in packed.items():
        component, _, field_name = key.partition(".")
        out.setdefault(component, {})[field_name] = value
    return out


def _peft_config(key: str, configs: dict[str, dict]) -> dict:
    """The PEFT LoraConfig fields of the component a ``unet.``/``text_encoder.`` module key is in ({} if none)."""
    for component, prefix in PEFT_PREFIXES.items():
        if key.startswith(prefix + ".") and component in configs:
            return configs[component]
    return {}


def _peft_alpha(key: str, config: dict) -> float | None:
    """PEFT's lora_alpha for a module (alpha_pattern first: a pattern matching the module path's end)."""
    from pipelines.models.peft_adapter import pattern_value

    alpha = pattern_value(config.get("alpha_pattern"), key.partition(".")[2], config.get("lora_alpha"))
    return float(alpha) if alpha is not None else None


def _is_true(value: object) -> bool:
    """A JSON flag: true, or the text "true" (any case)."""
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def module_delta(module: LoraModule, shape: tuple[int, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weight delta [shape], bias delta or None) in fp32, scaled by alpha / rank (alpha / sqrt(rank) when
    rank-stabilised); ValueError on a shape mismatch."""
    t = {name: tensor.float() for name, tensor in module.tensors.items()}
    rank: int | None = None
    bias = t.get("diff_b")
    kind = module.kind
    if kind == "full":
        weight = t.get("diff")
    elif kind == "norm":  # LyCORIS NormModule: deltas of the norm's affine weight and bias, [C] each
        weight, bias = t["w_norm"], t.get("b_norm")
    elif kind in ("lora", "locon"):
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        rank = down.shape[0]
        up2, down2 = up.reshape(up.shape[0], -1), down.reshape(rank, -1)  # [out, r], [r, in * k * k]
        if kind == "locon":  # CP: mid [r, r, k, k] between a 1x1 down and a 1x1 up
            weight = _einsum("n m k l, i n, m j -> i j k l", t["lora_mid.weight"], up2, down2)
        else:
            weight = up2 @ down2  # [out, in * k * k]
    elif kind == "loha":
        rank = t["hada_w1_b"].shape[0]
        weight = _hada_factor(t, "1", shape) * _hada_factor(t, "2", shape)  # Hadamard product
    else:
        weight, rank = _lokr(t, shape)
    scale = 1.0
    if module.alpha is not None and rank:
        scale = module.alpha / (math.sqrt(rank) if module.rank_stabilized else rank)
    if "scale" in t:
        scale = float(t["scale"].item())
    if weight is not None:
        if weight.numel() != _numel(shape):
            raise ValueError(f"{module.key}: delta of {tuple(weight.shape)} for a weight of {tuple(shape)}")
        weight = weight.reshape(shape) * scale
    if bias is not None:
        bias = bias * scale
    return weight, bias


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _einsum(equation: str, *tensors: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.einsum(equation, *tensors)


def _cp(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Tucker/CP rebuild: core [r, r, k, k], a [r, out], b [r, in] -> [out, in, k, k] (LyCORIS ``rebuild_tucker``)."""
    return _einsum("i j k l, i p, j q -> p q k l", core, a, b)


def _hada_factor(t: dict[str, torch.Tensor], index: str, shape: tuple[int, ...]) -> torch.Tensor:
    """One LoHa factor, w_a @ w_b (or its Tucker form with ``hada_t``), shaped like the weight."""
    a, b = t[f"hada_w{index}_a"], t[f"hada_w{index}_b"]
    core = t.get(f"hada_t{index}")
    if core is not None:
        return _cp(core, a, b.reshape(b.shape[0], -1))  # [out, in, k, k]
    return (a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)).reshape(shape)


def _lokr_factor(t: dict[str, torch.Tensor], index: str) -> tuple[torch.Tensor, int | None]:
    """LoKr's w1 or w2: stored whole, as w_a @ w_b, or (w2) as a Tucker core with a and b; and its rank."""
    whole = t.get(f"lokr_w{index}")
    if whole is not None:
        return whole, None
    a, b = t.get(f"lokr_w{index}_a"), t.get(f"lokr_w{index}_b")
    if a is None or b is None:
        raise ValueError(f"LoKr w{index} is missing (neither lokr_w{index} nor lokr_w{index}_a/_b)")
    core = t.get(f"lokr_t{index}")
    if core is not None:
        return _cp(core, a, b), b.shape[0]  # [out_2, in_2, k, k]
    return a @ b, b.shape[0]


def _lokr(t: dict[str, torch.Tensor], shape: tuple[int, ...]) -> tuple[torch.Tensor, int | None]:
    """delta = w1 (x) w2 (Kronecker), w1 [a, b] and w2 [c, d] or [c, d, k, k] -> [a c, b d(, k, k)]."""
    import torch

    w1, rank1 = _lokr_factor(t, "1")
    w2, rank2 = _lokr_factor(t, "2")
    if w2.ndim == 4:
        w1 = w1.reshape(*w1.shape, 1, 1)  # [a, b, 1, 1]
    weight = torch.kron(w1, w2.contiguous())
    if len(shape) == 4 and weight.ndim == 2:
        weight = weight.reshape(shape)  # w2 [c, d * k * k]: the kernel rides along d
    return weight, rank1 or rank2
