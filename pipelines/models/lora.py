"""Apply LoRAs by merging their deltas into the model's weights, and restore the weights exactly.

A1111's approach (``extensions-builtin/Lora/networks.py``): W <- W + sum_i w_i * delta_i for every
module a LoRA patches, with the weights as they were kept aside, so unloading copies them back bit
for bit; the merged model runs at the base model's speed (no per-step cost), and the formats
diffusers cannot load (LyCORIS LoCon, LoHa, LoKr) work too. Prompt weights: ``te`` for the text
encoder's modules, ``unet`` for the U-Net's; a module with weight 0 is not touched (so weight 0 is the
base model, pixel for pixel). Every delta is computed and checked against the model before any weight
changes: a LoRA for another base, a truncated file or unknown keys leave the model as it was.
Convolutions prepacked into oneDNN's layout (``pipelines.speed.conv_packing``, the CPU default) are
unpacked while their weights are read and changed, and packed again with the merged weights.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.models.errors import IncompatibleModel
from pipelines.models.lora_formats import LoraFile, module_delta
from pipelines.models.lora_keys import Target, module_table

if TYPE_CHECKING:
    import torch

    from pipelines.models.components import SDComponents


@dataclass(frozen=True)
class WeightedLora:
    """A LoRA file and the prompt's weights for it: ``<lora:name:te[:unet]>``."""

    lora: LoraFile
    te: float
    unet: float

    @property
    def identity(self) -> tuple[str, float, float, str]:
        return (str(self.lora.path), self.te, self.unet, self.lora.short_hash)


class LoraPatcher:
    """Merges a set of LoRAs into one model's U-Net and text encoder; ``restore`` undoes it exactly."""

    def __init__(self, components: SDComponents) -> None:
        self.components = components
        self._table: dict[str, Target] | None = None
        self._backup: dict[tuple[int, str], tuple[torch.nn.Parameter, torch.Tensor]] = {}
        self._applied: tuple[tuple[str, float, float, str], ...] = ()
        self._patched: set[torch.nn.Module] = set()  # modules whose weights differ from the base now
        self._lock = threading.Lock()

    @property
    def applied(self) -> tuple[tuple[str, float, float, str], ...]:
        """(path, te, unet, hash) of each LoRA merged now."""
        return self._applied

    def table(self) -> dict[str, Target]:
        if self._table is None:
            self._table = module_table(self.components)
        return self._table

    def apply(self, loras: Sequence[WeightedLora]) -> None:
        """Make the model the base plus exactly these LoRAs (nothing to do when they are merged already)."""
        from pipelines.speed.conv_packing import plain_weights

        wanted = tuple(lora.identity for lora in loras)
        with self._lock:
            if wanted == self._applied:
                return
            table = self.table()
            targets = [table[key].module for weighted in loras for key in weighted.lora.modules if key in table]
            with plain_weights([*targets, *self._patched]):
                deltas = self._deltas(loras)  # every error is raised here, before any weight changes
                self._restore()
                self._merge(deltas)
                self._patched = set(targets)
            self._applied = wanted

    def restore(self) -> None:
        """Put the model's weights back as they were before any LoRA (bit for bit)."""
        from pipelines.speed.conv_packing import plain_weights

        with self._lock, plain_weights(self._patched):
            self._restore()
            self._patched = set()

    def _deltas(self, loras: Sequence[WeightedLora]) -> dict[int, tuple[torch.nn.Parameter, torch.Tensor]]:
        """Parameter id -> (parameter, fp32 sum of weighted deltas) for every module the LoRAs patch."""
        table = self.table()
        sums: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        for weighted in loras:
            lora = weighted.lora
            missing = [key for key in lora.modules if key not in table]
            if missing:
                shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                raise IncompatibleModel(
                    f"{lora.path}: {len(missing)} of its modules are not in this model ({shown}); "
                    "is it a LoRA for another base (SD 2.x, SDXL)?"
                )
            for key, module in lora.modules.items():
                target = table[key]
                multiplier = weighted.te if target.component == "text_encoder" else weighted.unet
                if multiplier == 0:
                    continue
                weight = target.module.weight
                try:
                    delta, bias_delta = module_delta(module, tuple(weight.shape))
                except (ValueError, RuntimeError) as error:
                    raise IncompatibleModel(
                        f"{lora.path}: does not fit this model ({error}); is it a LoRA for another base?"
                    ) from error
                for parameter, change in ((weight, delta), (target.module.bias, bias_delta)):
                    if change is None:
                        continue
                    if parameter is None or change.shape != parameter.shape:
                        raise IncompatibleModel(f"{lora.path}: {key} does not fit this model's {target.path}")
                    change = change.to(parameter.device) * multiplier
                    if id(parameter) in sums:
                        change = sums[id(parameter)][1] + change
                    sums[id(parameter)] = (parameter, change)
        return sums

    def _merge(self, deltas: dict[int, tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
        import torch

        with torch.no_grad():
            for key, (parameter, delta) in deltas.items():
                original = parameter.detach().clone()
                self._backup[(key, "")] = (parameter, original)
                parameter.copy_((original.float() + delta).to(parameter.dtype))  # in place: layout kept
        self._refuse_projections()

    def _restore(self) -> None:
        import torch

        with torch.no_grad():
            for parameter, original in self._backup.values():
                parameter.copy_(original)
        changed = bool(self._backup)
        self._backup.clear()
        self._applied = ()
        if changed:
            self._refuse_projections()

    def _refuse_projections(self) -> None:
        """Attention modules whose q/k/v were fused (``fuse_qkv_projections``) run the fused copy: refresh it."""
        import torch

        with torch.no_grad():
            for module in self.components.unet.modules():
                if not getattr(module, "fused_projections", False):
                    continue
                if getattr(module, "to_qkv", None) is not None:
                    module.to_qkv.weight.copy_(torch.cat([module.to_q.weight, module.to_k.weight, module.to_v.weight]))
                if getattr(module, "to_kv", None) is not None:
                    module.to_kv.weight.copy_(torch.cat([module.to_k.weight, module.to_v.weight]))
