"""Fused bf16 attention on CPU through oneDNN Graph's scaled-dot-product-attention partition.

``softmax(Q K^T / sqrt(d)) V`` (Vaswani et al. 2017). On processors with AVX512-BF16 but no AMX,
PyTorch's CPU flash-attention kernel runs bf16 no faster than fp32: SD 1.5's 4096-token self-attention
(batch 2 for CFG, 8 heads of 40) takes 260 ms on a 2-core Zen 4, against 147 ms for oneDNN Graph's
fused MHA partition; the VAE's single-head attention takes 153 ms against 47 ms.

PyTorch reaches oneDNN Graph through TorchScript's LLGA fuser (deprecated since PyTorch 2.5, present
through 2.13). Each attention shape is traced once, frozen and run twice with the fuser switched on
(only for those calls), which caches the fused plan. A shape that does not fuse, or a PyTorch without
the bridge, uses ``F.scaled_dot_product_attention``, so the result is always attention, only slower.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers.models.attention_processor import Attention

FUSED_NODE = "oneDNNFusionGroup"  # what TorchScript calls a oneDNN Graph partition in an optimized graph


def onednn_graph_available() -> bool:
    """True when this PyTorch has TorchScript's oneDNN Graph (LLGA) bridge."""
    import torch

    return all(hasattr(torch._C, name) for name in ("_jit_llga_enabled", "_jit_set_llga_enabled"))


@contextlib.contextmanager
def _llga_fuser() -> Iterator[None]:
    """Switch TorchScript's oneDNN Graph fuser on for the block, then back to what it was."""
    import torch

    previous = torch._C._jit_llga_enabled()
    torch._C._jit_set_llga_enabled(True)
    try:
        yield
    finally:
        torch._C._jit_set_llga_enabled(previous)


def _attention_module(scale: float) -> torch.nn.Module:
    """The pattern oneDNN Graph fuses: matmul -> scale -> softmax -> matmul, on [B, H, N, D] tensors."""
    import torch

    class ScaledDotProductAttention(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            weights = torch.matmul(q, k.transpose(-1, -2)).mul(scale).softmax(-1)  # [B, H, Nq, Nk]
            return torch.matmul(weights, v)  # [B, H, Nq, D]

    return ScaledDotProductAttention().eval()


class FusedCpuAttention:
    """``softmax(q k^T / sqrt(d)) v`` for [B, H, N, D] tensors, one fused oneDNN kernel per shape.

    Kernels are kept per (shapes, strides, dtype), the least recently used dropped beyond ``max_kernels``;
    ``None`` marks a shape that did not fuse (it runs ``F.scaled_dot_product_attention``).
    """

    def __init__(self, max_kernels: int = 64) -> None:
        self.max_kernels = max_kernels
        self._kernels: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        key = (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype)
        with self._lock:
            if key not in self._kernels:
                kernel, out = self._build(q, k, v)
                self._kernels[key] = kernel
                if len(self._kernels) > self.max_kernels:
                    self._kernels.popitem(last=False)
                return out
            self._kernels.move_to_end(key)
            kernel = self._kernels[key]
        return F.scaled_dot_product_attention(q, k, v) if kernel is None else kernel(q, k, v)

    def __len__(self) -> int:
        """Cached shapes, fused or not."""
        return len(self._kernels)

    def fused_shapes(self) -> int:
        """How many cached shapes run the fused kernel (the rest fell back to SDPA)."""
        return sum(kernel is not None for kernel in self._kernels.values())

    @staticmethod
    def _build(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """(fused kernel or None, its output for these inputs): trace, freeze, run twice to fuse."""
        import torch
        import torch.nn.functional as F

        if not onednn_graph_available():
            return None, F.scaled_dot_product_attention(q, k, v)
        try:
            with _llga_fuser(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer warnings
                # check_trace would run the pattern again and import torch.distributed to compare (0.6 s)
                traced = torch.jit.trace(_attention_module(q.shape[-1] ** -0.5), (q, k, v), check_trace=False)
                kernel = torch.jit.freeze(traced)
                kernel(q, k, v)  # profiling run
                out = kernel(q, k, v)  # optimized: the fuser replaces the pattern with one partition
                fused = FUSED_NODE in str(kernel.graph_for(q, k, v))
        except RuntimeError:
            return None, F.scaled_dot_product_attention(q, k, v)
        return (kernel if fused else None), out


class FusedCpuAttnProcessor:
    """A diffusers attention processor computing SD 1.x attention blocks with ``FusedCpuAttention``.

    Mirrors diffusers' ``AttnProcessor2_0`` (the default) for what SD 1.x U-Nets and VAEs use: self- and
    cross-attention, 4-D inputs with group norm (VAE), residual connection and output rescale. Anything
    else (masks, spatial or q/k norms, fused projections) goes to ``AttnProcessor2_0`` itself.
    """

    def __init__(self, attention: FusedCpuAttention | None = None) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.attention = attention if attention is not None else FusedCpuAttention()
        self.fallback = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        unsupported = (attention_mask, attn.spatial_norm, attn.norm_q, attn.norm_k, getattr(attn, "to_qkv", None))
        if args or kwargs or any(part is not None for part in unsupported):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:  # VAE: [B, C, H, W] -> [B, HW, C]
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states  # [B, Nk, Dk]
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)  # [B, N, H*D]
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        out = self.attention(query, key, value)  # [B, H, Nq, D]
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # [B, Nq, H*D]
        out = attn.to_out[1](attn.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def use_fused_cpu_attention(*models: torch.nn.Module) -> FusedCpuAttention:
    """Give every attention block of ``models`` (diffusers U-Nets / VAEs) one shared fused-attention cache."""
    attention = FusedCpuAttention()
    processor = FusedCpuAttnProcessor(attention)
    for model in models:
        model.set_attn_processor(processor)
    return attention
