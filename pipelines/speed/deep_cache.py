"""Feature caching across denoising steps, after DeepCache (Ma, Fang & Wang, CVPR 2024).

Adjacent denoising steps produce very similar high-level U-Net features. Every ``interval`` steps
the full U-Net runs and the input of its last up block (the deep features) is cached; in between only
the shallow branch runs: ``conv_in`` -> first down block -> last up block (with the cached deep
features and the fresh skip connections of the first down block) -> output. With SD 1.x's four
levels that skips about three quarters of the U-Net's work on cached steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from diffusers import UNet2DConditionModel


def _time_embedding(unet: UNet2DConditionModel, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    import torch

    t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=sample.device)
    t = t.reshape(-1).to(sample.device).expand(sample.shape[0])  # [B]
    return unet.time_embedding(unet.time_proj(t).to(sample.dtype))  # [B, 4 * C0]


def _down(block: torch.nn.Module, sample: torch.Tensor, emb: torch.Tensor, states: torch.Tensor) -> tuple:
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=sample, temb=emb, encoder_hidden_states=states)
    return block(hidden_states=sample, temb=emb)


def _up(
    block: torch.nn.Module,
    sample: torch.Tensor,
    emb: torch.Tensor,
    states: torch.Tensor,
    residuals: tuple,
    size: tuple | None,
) -> torch.Tensor:
    if getattr(block, "has_cross_attention", False):
        return block(
            hidden_states=sample, temb=emb, res_hidden_states_tuple=residuals,
            encoder_hidden_states=states, upsample_size=size,
        )
    return block(hidden_states=sample, temb=emb, res_hidden_states_tuple=residuals, upsample_size=size)


def _head(unet: UNet2DConditionModel, sample: torch.Tensor) -> torch.Tensor:
    if unet.conv_norm_out is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)


@dataclass
class DeepCacheRunner:
    """Calls the U-Net for one generation, reusing deep features between full steps.

    ``interval`` 1 runs the full U-Net every step (and equals ``unet(...)``); N runs it every N-th
    step. A change of batch size (e.g. guidance switched off) forces a full step.
    """

    unet: UNet2DConditionModel
    interval: int = 1
    _deep: torch.Tensor | None = field(default=None, init=False, repr=False)
    full_steps: int = field(default=0, init=False)
    cached_steps: int = field(default=0, init=False)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor, step: int) -> torch.Tensor:
        """Noise prediction [B, C, h, w] for latents ``sample`` [B, C, h, w] at ``timestep``."""
        reuse = (
            self.interval > 1
            and step % self.interval != 0
            and self._deep is not None
            and self._deep.shape[0] == sample.shape[0]
        )
        if reuse:
            self.cached_steps += 1
            return self._shallow(sample, timestep, states)
        self.full_steps += 1
        return self._full(sample, timestep, states)

    def _full(self, sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        emb = _time_embedding(unet, sample, timestep)
        hidden = unet.conv_in(sample)  # [B, C0, h, w]
        residuals: tuple = (hidden,)
        for block in unet.down_blocks:
            hidden, block_residuals = _down(block, hidden, emb, states)
            residuals += block_residuals
        if unet.mid_block is not None:
            hidden = unet.mid_block(hidden, emb, encoder_hidden_states=states)
        last = len(unet.up_blocks) - 1
        odd_size = any(side % 2**last for side in sample.shape[-2:])  # as diffusers' forward_upsample_size
        for index, block in enumerate(unet.up_blocks):
            block_residuals = residuals[-len(block.resnets) :]
            residuals = residuals[: -len(block.resnets)]
            if index == last:
                self._deep = hidden  # input of the last up block: the cached deep features
            size = residuals[-1].shape[2:] if index < last and odd_size else None
            hidden = _up(block, hidden, emb, states, block_residuals, size)
        return _head(unet, hidden)

    def _shallow(self, sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        emb = _time_embedding(unet, sample, timestep)
        hidden = unet.conv_in(sample)  # [B, C0, h, w]
        first = unet.down_blocks[0]
        _, first_residuals = _down(first, hidden, emb, states)
        stack = (hidden, *first_residuals)  # what the last up block consumes, plus the downsampled output
        if getattr(first, "downsamplers", None) is not None:
            stack = stack[:-1]
        last_block = unet.up_blocks[-1]
        block_residuals = stack[-len(last_block.resnets) :]
        hidden = _up(last_block, self._deep, emb, states, block_residuals, None)
        return _head(unet, hidden)
