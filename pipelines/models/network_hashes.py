"""A1111's ``Lora hashes`` / ``TI hashes`` infotext values, and finding a pasted infotext's LoRAs by them.

``Lora hashes: "name: 0123456789ab, ..."`` names each LoRA as its prompt tag did (``extra_networks_lora``); when
an infotext is pasted (PNG info's "send to", ``/sdapi/v1/png-info``), A1111's ``infotext_pasted``
(``scripts/lora_script.py``) renames each ``<lora:NAME:`` whose hash is a local file's to that file. Light: no
tensor library is imported.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipelines.models.errors import ModelLoadError

if TYPE_CHECKING:
    from pipelines.models.library import ModelLibrary


def hashes_text(pairs: Sequence[tuple[str, str]]) -> str:
    """A1111's ``Lora hashes`` / ``TI hashes`` value: ``name: hash, name: hash``."""
    return ", ".join(f"{name}: {short_hash}" for name, short_hash in pairs)


def lora_hashes_text(pairs: Sequence[tuple[str, str]]) -> str:
    """A1111's ``Lora hashes`` value (``extra_networks_lora.activate``): each LoRA by the name its tag mentions
    (a file name or an alias), with ``:`` and ``,`` removed, once per name; pairs without a hash left out."""
    by_name: dict[str, str] = {}
    for name, short_hash in pairs:
        if short_hash:
            by_name[name.replace(":", "").replace(",", "")] = short_hash
    return hashes_text(list(by_name.items()))


def parse_hashes_text(text: str) -> dict[str, str]:
    """The inverse of :func:`hashes_text` (PNG info reads ``Lora hashes`` back)."""
    pairs = {}
    for item in text.split(","):
        name, sep, short_hash = item.strip().rpartition(":")
        if sep and name.strip():
            pairs[name.strip()] = short_hash.strip()
    return pairs


PASTED_LORA_RE = re.compile(r"<lora:([^:]+):")  # A1111's re_lora (scripts/lora_script.py): a tag with a weight


def local_lora_names(prompt: str, lora_hashes: str, library: ModelLibrary) -> str:
    """``prompt`` with each ``<lora:NAME:...>`` whose ``Lora hashes`` hash is a local LoRA's renamed to that
    file's prompt name (A1111's ``infotext_pasted``: a pasted infotext finds its LoRAs by hash). Only hashes known
    without hashing count (``ModelLibrary.known_network_hash``, as A1111's hash lookup); a tag whose name already
    finds the file of its hash is left as written."""
    hashes = parse_hashes_text(lora_hashes or "")
    if not hashes:
        return prompt

    def rename(match: re.Match[str]) -> str:
        name = match.group(1)
        short_hash = hashes.get(name.replace(",", ""))
        entry = library.find_by_network_hash(short_hash) if short_hash else None
        if entry is None:
            return match.group(0)
        try:
            if library.find("lora", name).path == entry.path:
                return match.group(0)
        except ModelLoadError:
            pass  # no file of that name, or not this one: the hash's file is meant
        return f"<lora:{library.prompt_name(entry)}:"

    return PASTED_LORA_RE.sub(rename, prompt)
