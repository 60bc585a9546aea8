"""Textual-inversion embeddings (Gal et al. 2022) from ``.safetensors`` files, A1111's way.

The token is the file name (``embeddings/bad-hands.safetensors`` is used as ``bad-hands`` in a prompt).
A file holds one tensor: ``emb_params`` (A1111 and kohya), ``string_to_param.*`` (A1111's ``.pt``
layout, flattened) or any single key (diffusers' concept files, ``<concept>``); [D] or [n, D], n
vectors taking n positions. SDXL's ``clip_l``/``clip_g`` pairs and widths that are not the text
encoder's are refused with the file named; ``.pt``/``.bin`` embeddings are pickles and refused as
everywhere else. The same layouts come bundled in LoRA files (``bundle_emb.NAME.<key>``, read by
``pipelines.models.lora_formats``), built here by :func:`embedding_from_tensors`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.generation.extra_networks import TextualInversion
from pipelines.models.errors import IncompatibleModel, ModelLoadError, refuse_pickle

if TYPE_CHECKING:
    import torch


def read_embedding(path: Path, name: str, width: int, short_hash: str = "") -> TextualInversion:
    """The embedding in ``path`` as n vectors [n, width] (fp32); ModelLoadError naming the file if it cannot be."""
    from pipelines.models.single_file import read_safetensors

    refuse_pickle(path)
    return embedding_from_tensors(str(path), name, read_safetensors(path), width, short_hash)


def embedding_from_tensors(
    source: str, name: str, state: Mapping[str, torch.Tensor], width: int, short_hash: str = ""
) -> TextualInversion:
    """The embedding held by ``state`` (an embedding file's tensors) as n vectors [n, width] (fp32);
    ModelLoadError starting with ``source`` (the file, or the LoRA that bundles it) if it is none."""
    if {"clip_l", "clip_g"} <= set(state):
        raise IncompatibleModel(f"{source}: an SDXL embedding (clip_l and clip_g); this model is SD 1.x")
    if len(state) != 1:
        keys = ", ".join(sorted(state)[:5])
        raise ModelLoadError(
            f"{source}: an embedding file holds one tensor (e.g. emb_params), this one {len(state)}: {keys}"
        )
    ((key, tensor),) = state.items()
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)  # [1, D]
    if tensor.ndim != 2 or tensor.shape[0] == 0:
        raise ModelLoadError(f"{source}: embedding {key!r} has shape {tuple(tensor.shape)}; expected [n, {width}]")
    if tensor.shape[1] != width:
        guess = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL", 2048: "SDXL"}.get(int(tensor.shape[1]), "another model")
        raise IncompatibleModel(
            f"{source}: embedding of width {tensor.shape[1]} (made for {guess}); this text encoder's width is {width}"
        )
    return TextualInversion(name=name, vectors=tensor.float(), short_hash=short_hash)
