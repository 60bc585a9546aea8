"""Convolution weights reordered once into oneDNN's blocked layout, the plain copy dropped (CPU).

A CPU ``nn.Conv2d`` hands oneDNN a plain [O, I, kh, kw] weight and oneDNN reorders it into its blocked
layout (e.g. ``OIhw16i16o``) on every call. Reordering once at load time, as inductor's freezing pass
does (``mkldnn_reorder_conv2d_weight`` + ``mkldnn._convolution_pointwise``), saves that work: 3-9% per
3x3 convolution of a bf16 SD 1.5 U-Net on this Zen 4 (1 thread). 1x1 convolutions are left plain:
packed without knowing the input's shape, oneDNN picks a layout their kernel does not use and
reorders again on every call (2-3.5x slower; the input shape varies with resolution and batch). The
packed weight replaces the plain one, so the model holds one copy of those weights, not two.

Bit-exact: for a channels_last input the packed call runs the same oneDNN primitive on the same
numbers as ``F.conv2d`` with a channels_last weight (tests check a whole U-Net and VAE, and a 3x3
convolution given either input layout), so only models converted to channels_last are packed, and
each packed convolution takes its input as channels_last, as ``F.conv2d`` does then. Only bf16
weights on CPUs with native bf16 are packed: there PyTorch always runs bf16 convolutions in oneDNN,
whereas small fp32 ones (batch 1, under 20480 input values, e.g. on the 64x64x4 latents) take ATen's
own kernel, whose sums differ from oneDNN's in the last bits.

The ``weight`` parameter keeps its identity but holds an empty tensor while packed; ``plain_weights``
unpacks for code that reads or changes weights (LoRA merging) and packs again afterwards;
``state_dict`` returns the plain weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch


def packing_available() -> bool:
    """True when this PyTorch has oneDNN (mkldnn) with the reorder and the prepacked convolution op, and
    the CPU computes bf16 natively (where PyTorch sends every bf16 convolution to oneDNN)."""
    from pipelines.speed.cpu import cpu_has_native_bf16

    return (
        cpu_has_native_bf16()
        and torch.backends.mkldnn.is_available()
        and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    )


def _packable(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module) is torch.nn.Conv2d
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and weight is not None
        and weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and tuple(module.kernel_size) != (1, 1)
        and weight.is_contiguous(memory_format=torch.channels_last)
        and not weight.requires_grad
    )


class PackedConv2d(torch.nn.Conv2d):
    """A ``Conv2d`` whose weight lives in oneDNN's blocked layout (``_packed``); made by ``pack_convolutions``."""

    _packed: torch.Tensor  # opaque mkldnn tensor, [O, I, kh, kw] in a blocked layout

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Conv2d's name
        sample = input.contiguous(memory_format=torch.channels_last)  # [B, I, H, W], as F.conv2d would convert it
        return torch.ops.mkldnn._convolution_pointwise(
            sample, self._packed, self.bias, list(self.padding), list(self.stride), list(self.dilation),
            self.groups, "none", [], "",
        )  # [B, O, H', W'], channels_last


def _pack(module: torch.nn.Conv2d) -> None:
    weight = module.weight.detach()
    module._packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
        weight.to_mkldnn(), list(module.padding), list(module.stride), list(module.dilation), module.groups
    )
    module.weight.data = weight.new_empty(0)  # the plain copy goes; the Parameter object stays
    module.__class__ = PackedConv2d


def _unpack(module: PackedConv2d) -> None:
    plain = module._packed.to_dense()  # [O, I, kh, kw], the original numbers
    module.weight.data = plain.contiguous(memory_format=torch.channels_last)
    del module._packed
    module.__class__ = torch.nn.Conv2d


def _plain_state_dict(module: torch.nn.Module, state: dict[str, Any], prefix: str, _metadata: Any) -> None:
    """``state_dict`` hook: a packed convolution saves its plain weight."""
    if isinstance(module, PackedConv2d):
        state[prefix + "weight"] = module._packed.to_dense()


def pack_convolutions(model: torch.nn.Module) -> int:
    """Pack every plain channels_last CPU ``Conv2d`` of ``model`` in place; returns how many were packed."""
    if not packing_available():
        return 0
    packed = 0
    for module in model.modules():
        if _packable(module):
            _pack(module)
            if not getattr(module, "_plain_state_dict_hook", False):
                module._register_state_dict_hook(_plain_state_dict)
                module._plain_state_dict_hook = True
            packed += 1
    return packed


def packed_convolutions(model: torch.nn.Module) -> list[PackedConv2d]:
    return [module for module in model.modules() if isinstance(module, PackedConv2d)]


@contextlib.contextmanager
def plain_weights(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Unpack the packed convolutions among ``modules`` for the block (weights readable and writable in
    place, Parameter objects unchanged), then pack them again with whatever the block wrote."""
    unpacked = [module for module in dict.fromkeys(modules) if isinstance(module, PackedConv2d)]
    for module in unpacked:
        _unpack(module)
    try:
        yield
    finally:
        for module in unpacked:
            _pack(module)


def current_weight(module: torch.nn.Module) -> torch.Tensor:
    """A module's weight as plain numbers: a packed convolution's unpacked (a copy), any other's own tensor."""
    return module._packed.to_dense() if isinstance(module, PackedConv2d) else module.weight
