"""Fused CPU attention (oneDNN Graph): the same attention as SDPA, fused where the CPU allows it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipelines.models.loading import load_pipeline
from pipelines.speed.cpu_attention import (
    FusedCpuAttention,
    FusedCpuAttnProcessor,
    onednn_graph_available,
    use_fused_cpu_attention,
)
from pipelines.speed.options import SpeedOptions, cpu_has_native_bf16

can_fuse_bf16 = pytest.mark.skipif(
    not (onednn_graph_available() and cpu_has_native_bf16()),
    reason="needs PyTorch's oneDNN Graph bridge and a CPU with native bf16",
)
# Without the bridge FusedCpuAttention is F.scaled_dot_product_attention itself: comparing the two
# would pass whatever the fused path does.
has_bridge = pytest.mark.skipif(
    not onednn_graph_available(),
    reason="this PyTorch has no oneDNN Graph (LLGA) bridge: the 'fused' kernel would be SDPA compared with SDPA",
)


def _qkv(q_len: int, kv_len: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, q_len, 40, generator=generator)  # [B, H, Nq, D]
    k, v = (torch.randn(2, 4, kv_len, 40, generator=generator) for _ in range(2))  # [B, H, Nk, D]
    return tuple(x.to(dtype) for x in (q, k, v))


@has_bridge
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 0.05), (torch.float32, 1e-4)])
@pytest.mark.parametrize("kv_len", [256, 77])  # self- and cross-attention
def test_matches_scaled_dot_product_attention(dtype, tolerance, kv_len):
    q, k, v = _qkv(256, kv_len, dtype)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    attention = FusedCpuAttention()
    first, cached = attention(q, k, v), attention(q, k, v)  # built on the first call, cached after
    for out in (first, cached):
        assert out.dtype == dtype and out.shape == q.shape
        assert (out.float() - expected).abs().max().item() < tolerance
    assert len(attention) == 1 and attention.fused_shapes() == 1  # the fused kernel, not the SDPA fallback


@has_bridge
def test_strided_inputs_as_the_processor_passes_them():
    """[B, N, H*D] projections viewed as [B, H, N, D] (not contiguous) give the same attention."""
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 128, 4 * 40, generator=generator).bfloat16() for _ in range(3))
    q, k, v = (x.view(2, 128, 4, 40).transpose(1, 2) for x in (q, k, v))
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    attention = FusedCpuAttention()
    out = attention(q, k, v)
    assert (out.float() - expected).abs().max().item() < 0.05
    assert attention.fused_shapes() == 1


@can_fuse_bf16
def test_bf16_attention_is_fused_and_the_fuser_switch_is_put_back():
    before = torch._C._jit_llga_enabled()
    attention = FusedCpuAttention()
    attention(*_qkv(256, 256, torch.bfloat16))
    assert attention.fused_shapes() == 1
    assert torch._C._jit_llga_enabled() == before  # on only while the kernel was built


def test_without_the_onednn_bridge_it_is_plain_sdpa(monkeypatch):
    import pipelines.speed.cpu_attention as cpu_attention

    monkeypatch.setattr(cpu_attention, "onednn_graph_available", lambda: False)
    q, k, v = _qkv(64, 64, torch.bfloat16)
    attention = FusedCpuAttention()
    expected = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(attention(q, k, v), expected) and torch.equal(attention(q, k, v), expected)
    assert (len(attention), attention.fused_shapes()) == (1, 0)


def test_kernel_cache_keeps_the_most_recent_shapes():
    attention = FusedCpuAttention(max_kernels=2)
    for q_len in (64, 128, 192, 128):
        attention(*_qkv(q_len, q_len, torch.bfloat16))
    assert len(attention) == 2


@can_fuse_bf16
def test_processor_is_as_close_to_fp32_as_diffusers_bf16_on_unet_and_vae(tiny_model):
    """Self- and cross-attention in the U-Net, 4-D group-normed attention in the VAE: against the fp32
    model, the fused processor's error stays within that of diffusers' own processor at the same bf16."""
    off = SpeedOptions(fused_cpu_attention=False)
    fp32 = load_pipeline(tiny_model, device="cpu", dtype=torch.float32, speed=off).components
    bf16 = load_pipeline(tiny_model, device="cpu", dtype=torch.bfloat16, speed=off).components
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 4, 16, 16, generator=generator)  # [B, C, h, w]
    states = torch.randn(2, 77, bf16.unet.config.cross_attention_dim, generator=generator)
    latents = torch.randn(1, 4, 16, 16, generator=generator)

    def run(c, dtype):  # (noise [2, 4, 16, 16], pixels [1, 3, 128, 128]) in fp32
        with torch.inference_mode():
            noise = c.unet(sample.to(dtype), 500, encoder_hidden_states=states.to(dtype)).sample
            return noise.float(), c.vae.decode(latents.to(dtype)).sample.float()

    reference, diffusers_bf16 = run(fp32, torch.float32), run(bf16, torch.bfloat16)
    attention = use_fused_cpu_attention(bf16.unet, bf16.vae)
    fused = run(bf16, torch.bfloat16)
    processors = [*bf16.unet.attn_processors.values(), *bf16.vae.attn_processors.values()]
    assert {type(p) for p in processors} == {FusedCpuAttnProcessor}
    assert len(attention) >= 3  # U-Net self- and cross-attention and the VAE's, in one cache
    assert attention.fused_shapes() == len(attention)  # every shape ran oneDNN Graph's kernel
    for ours, theirs, exact in zip(fused, diffusers_bf16, reference):
        assert (ours - exact).abs().max().item() <= 1.5 * (theirs - exact).abs().max().item() + 1e-3
        assert (ours - exact).abs().mean().item() <= 1.5 * (theirs - exact).abs().mean().item() + 1e-4


def test_masked_attention_goes_to_the_diffusers_processor():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 6, 16, generator=generator)
    mask = torch.tensor([[0.0, 0.0, 0.0, 0.0, -1e4, -1e4]])  # additive: the last two tokens masked
    processor = FusedCpuAttnProcessor()
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, hidden, attention_mask=mask)
        out = processor(attn, hidden, attention_mask=mask)
        unmasked = processor(attn, hidden)
    assert torch.allclose(out, expected, atol=1e-6)
    assert len(processor.attention) == 1 and not torch.allclose(unmasked, expected, atol=1e-3)


def test_loading_uses_it_for_bf16_on_cpu_only(tiny_model):
    def processors(pipe):
        models = (pipe.components.unet, pipe.components.vae)
        return {type(p).__name__ for model in models for p in model.attn_processors.values()}

    assert processors(load_pipeline(tiny_model, device="cpu", dtype=torch.bfloat16)) == {"FusedCpuAttnProcessor"}
    assert "FusedCpuAttnProcessor" not in processors(load_pipeline(tiny_model, device="cpu", dtype=torch.float32))
    off = SpeedOptions(fused_cpu_attention=False)
    unfused = load_pipeline(tiny_model, device="cpu", dtype=torch.bfloat16, speed=off)
    assert "FusedCpuAttnProcessor" not in processors(unfused)
