"""Prepacked convolutions: bit-exact against the plain ones, one copy of the weights, LoRA-safe."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import tests.lora_fixtures as fx
from pipelines.generation.request import GenerationRequest
from pipelines.models.library import ModelLibrary
from pipelines.models.loading import load_pipeline
from pipelines.speed.conv_packing import (
    PackedConv2d,
    pack_convolutions,
    packed_convolutions,
    packing_available,
    plain_weights,
)
from pipelines.speed.options import SpeedOptions

pytestmark = pytest.mark.skipif(not packing_available(), reason="this PyTorch has no oneDNN prepacked convolution")
REQUEST = dict(steps=3, width=64, height=64, seed=5, sampler="Euler a")


def _pipes(model, dtype, library=None):
    packed = load_pipeline(model, device="cpu", dtype=dtype, library=library)
    plain = load_pipeline(model, device="cpu", dtype=dtype, library=library,
                          speed=SpeedOptions(prepack_convolutions=False))
    return packed, plain


def test_a_packed_convolution_equals_the_plain_one_for_either_input_layout():
    """A channels_last 3x3 convolution given a contiguous input (as after an attention block's reshape)."""
    conv = torch.nn.Conv2d(64, 96, 3, padding=1).to(torch.bfloat16).to(memory_format=torch.channels_last)
    conv.requires_grad_(False)
    packed = torch.nn.Sequential(copy.deepcopy(conv))
    assert pack_convolutions(packed) == 1
    sample = torch.randn(2, 64, 17, 17, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for layout in (torch.contiguous_format, torch.channels_last):
        given = sample.contiguous(memory_format=layout)
        with torch.inference_mode():
            assert torch.equal(packed(given), conv(given))


def test_packed_unet_and_vae_are_bit_exact_and_hold_one_copy(tiny_model):
    dtype = torch.bfloat16
    packed, plain = _pipes(tiny_model, dtype)
    fp32 = load_pipeline(tiny_model, device="cpu", dtype=torch.float32)
    assert not packed_convolutions(fp32.components.unet)  # fp32 is left plain (see the module docstring)
    unet, vae = packed.components.unet, packed.components.vae
    convs = [m for m in plain.components.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert len(packed_convolutions(unet)) == len(convs) > 0 and packed_convolutions(vae)
    assert all(m.weight.numel() == 0 for m in packed_convolutions(unet))  # the plain copy is gone
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator).to(dtype)  # [B, C, h, w], contiguous as the loop gives it
    states = torch.randn(2, 77, 32, generator=generator).to(dtype)
    with torch.inference_mode():
        expected = plain.components.unet(sample, 500, encoder_hidden_states=states).sample
        got = unet(sample, 500, encoder_hidden_states=states).sample
        pixels = plain.components.vae.decode(sample[:1]).sample, vae.decode(sample[:1]).sample
    assert torch.equal(got, expected) and torch.equal(*pixels)
    # state_dict (saving, merging) sees the plain weights
    packed_state, plain_state = unet.state_dict(), plain.components.unet.state_dict()
    assert packed_state.keys() == plain_state.keys()
    assert all(torch.equal(packed_state[k], plain_state[k]) for k in plain_state)


def test_lora_merges_into_packed_convolutions_and_restores_them(tiny_model, tmp_path):
    (tmp_path / "models" / "Lora").mkdir(parents=True)
    library = ModelLibrary([tmp_path], shipped=False)
    packed, plain = _pipes(tiny_model, torch.bfloat16, library)
    fx.kohya_lora(plain.components, tmp_path / "models" / "Lora" / "kohya.safetensors")  # 3x3 and 1x1 convs too
    fx.locon_cp(plain.components, tmp_path / "models" / "Lora" / "locon.safetensors")
    target = packed.components.unet.get_submodule(fx.UNET_CONV)
    before = fx.weight(packed.components, "unet", fx.UNET_CONV).clone()
    images = {}
    for prompt in ("a red circle", "a red circle <lora:kohya:1> <lora:locon:0.7>", "a red circle"):
        out = [pipe(GenerationRequest(prompt=prompt, **REQUEST)).images[0] for pipe in (packed, plain)]
        assert np.array_equal(np.asarray(out[0]), np.asarray(out[1]))  # packed == plain, with and without LoRA
        images.setdefault(prompt, []).append(np.asarray(out[0]))
        assert isinstance(target, PackedConv2d) and target.weight.numel() == 0  # packed again after merging
    with_lora = images["a red circle <lora:kohya:1> <lora:locon:0.7>"][0]
    assert not np.array_equal(with_lora, images["a red circle"][0])  # the LoRA did reach the packed convs
    assert np.array_equal(images["a red circle"][0], images["a red circle"][1])  # restored bit for bit
    assert torch.equal(fx.weight(packed.components, "unet", fx.UNET_CONV), before)


def test_plain_weights_unpacks_in_place_and_packs_what_was_written(tiny_model):
    packed, _ = _pipes(tiny_model, torch.bfloat16)
    conv = packed.components.unet.conv_in
    parameter = conv.weight
    with plain_weights([conv]):
        assert type(conv) is torch.nn.Conv2d and conv.weight is parameter and conv.weight.shape[1] == 4
        original = conv.weight.clone()
        conv.weight.mul_(2)
    assert isinstance(conv, PackedConv2d) and torch.equal(fx.weight(packed.components, "unet", "conv_in"), 2 * original)
