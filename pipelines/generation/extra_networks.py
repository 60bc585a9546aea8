"""A1111's extra networks in a prompt: ``<lora:name:te[:unet]>`` tags, and what provides them.

Tag syntax (A1111 ``modules/extra_networks.py`` and ``extensions-builtin/Lora``): ``<lora:NAME>``,
``<lora:NAME:W>`` (text encoder and U-Net weight W), ``<lora:NAME:TE:UNET>`` or named ``te=``/``unet=``;
``<lyco:...>`` is the same (LyCORIS's old extension). Weights may be negative; 0 leaves that part of
the model untouched. Tags are removed from the text the encoder sees; another network type
(``<hypernet:...>``) is refused rather than silently dropped. ``ExtraNetworks`` is what a pipeline asks
to merge the tagged LoRAs and to look up textual-inversion embeddings (``pipelines.models.networks``
implements it on a model library).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

TAG_RE = re.compile(r"<(\w+):([^>]+)>")
LORA_TYPES = ("lora", "lyco")
MAX_WEIGHT = 100.0  # |W| past this only overflows the merged weights (NaN pictures); users go to about 2
NEGATIVE_PROMPT_TAGS = "negative_prompt: <lora:...> tags belong in the prompt (a negative weight subtracts one)"


@dataclass(frozen=True)
class NetworkTag:
    """One ``<lora:...>`` tag: the LoRA's name and its text-encoder and U-Net weights."""

    name: str
    te: float = 1.0
    unet: float = 1.0


@dataclass(frozen=True)
class TextualInversion:
    """An embedding used by its name in a prompt: n vectors [n, D] standing for the name's tokens."""

    name: str
    vectors: torch.Tensor  # [n, D]
    short_hash: str = ""


class ExtraNetworks(Protocol):
    """What a pipeline needs from a model library for LoRAs and embeddings."""

    def activate(self, tags: Sequence[NetworkTag]) -> dict[str, str]:
        """Merge exactly the tagged LoRAs (none: the base model); infotext pairs (``Lora hashes``)."""
        ...

    def embeddings(self, texts: Sequence[str]) -> dict[str, TextualInversion]:
        """Embeddings whose names may occur in ``texts`` (by name; the caller matches tokens)."""
        ...


def _weight(tag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{tag}: weight {text!r} is not a number") from None
    if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
        raise ValueError(f"{tag}: weight {text!r} must be a number between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}")
    return value


def parse_tag(kind: str, arguments: str) -> NetworkTag:
    """The ``NetworkTag`` of ``<kind:arguments>``; ValueError naming the tag when it is malformed."""
    tag = f"<{kind}:{arguments}>"
    if kind.lower() not in LORA_TYPES:
        raise ValueError(f"{tag}: extra network type {kind!r} is not supported (only <lora:...> and <lyco:...>)")
    parts = [part.strip() for part in arguments.split(":")]
    name, positional, named = parts[0], [], {}
    if not name:
        raise ValueError(f"{tag}: the LoRA name is missing (write <lora:NAME:WEIGHT>)")
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if eq:
            if key.strip() not in ("te", "unet"):
                raise ValueError(f"{tag}: argument {key.strip()!r} is not supported (te=, unet=)")
            named[key.strip()] = _weight(tag, value.strip())
        else:
            positional.append(_weight(tag, part))
    if len(positional) > 2:
        raise ValueError(f"{tag}: at most two weights (text encoder, U-Net)")
    te = named.get("te", positional[0] if positional else 1.0)
    unet = named.get("unet", positional[1] if len(positional) > 1 else te)
    return NetworkTag(name, te, unet)


def strip_network_tags(prompt: str) -> str:
    """The prompt without its ``<type:...>`` tags (the text the encoder and the reranker read)."""
    return TAG_RE.sub("", prompt)


def parse_network_tags(prompt: str) -> tuple[str, list[NetworkTag]]:
    """(prompt without tags, its LoRA tags in order); ValueError for a malformed or unsupported tag."""
    tags = [parse_tag(match.group(1), match.group(2)) for match in TAG_RE.finditer(prompt)]
    return strip_network_tags(prompt), tags
