"""Model file hashes as AUTOMATIC1111 writes them."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_hash(path: Path) -> str:
    """A1111's "Model hash" (AutoV2): the first 10 hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def safetensors_data_sha256(data: bytes) -> str:
    """kohya's ``sshs_model_hash`` (sd-webui-additional-networks' hash, which A1111 also computes for LoRA
    files, and Civitai's AutoV3): the SHA-256 of a safetensors file's bytes after its header, so editing
    the metadata keeps it."""
    header_length = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_length:]).hexdigest()


def safetensors_tensors_sha256(path: Path) -> str:
    """:func:`safetensors_data_sha256` of a file, read in 1 MiB blocks after its header."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        handle.seek(8 + int.from_bytes(handle.read(8), "little"))
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
