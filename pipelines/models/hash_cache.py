"""SHA-256 of model files, cached by path, modification time and size, so a 4 GB checkpoint is hashed once.

A1111's short hash (AutoV2) is the first 10 hex digits of the file's SHA-256 (``hashing.file_hash``);
A1111 caches it the same way (``cache.json``, keyed by file name and mtime). The cache is a JSON file
(written atomically, shared by processes; the last writer wins, which only costs a re-hash) or, without
a file, memory only.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

from pipelines.models.hashing import safetensors_tensors_sha256

SHORT_HASH_DIGITS = 10


def default_cache_file() -> Path:
    """``$SD_APP_CACHE_DIR/hashes.json``, else ``$XDG_CACHE_HOME/sd-app/hashes.json`` (``~/.cache`` by default)."""
    folder = os.environ.get("SD_APP_CACHE_DIR")
    if folder:
        return Path(folder) / "hashes.json"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sd-app" / "hashes.json"


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class HashCache:
    """SHA-256 per file, reused while the file's (path, mtime, size) are unchanged."""

    def __init__(self, file: Path | None = None) -> None:
        self.file = file
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, int | str]] = self._read()

    def _read(self) -> dict[str, dict[str, int | str]]:
        if self.file is None or not self.file.is_file():
            return {}
        try:
            entries = json.loads(self.file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}  # a damaged cache only costs re-hashing
        return entries if isinstance(entries, dict) else {}

    def sha256(self, path: Path) -> str:
        """The file's SHA-256, from the cache when its mtime and size are those recorded."""
        return self._digest(path, "sha256", sha256_file)

    def tensors_sha256(self, path: Path) -> str:
        """A .safetensors file's SHA-256 of the bytes after its header (kohya's ``sshs_model_hash``,
        sd-webui-additional-networks' hash, Civitai's AutoV3), cached like :meth:`sha256`."""
        return self._digest(path, "tensors_sha256", safetensors_tensors_sha256)

    def _digest(self, path: Path, field: str, compute: Callable[[Path], str]) -> str:
        resolved = path.resolve()
        stat = resolved.stat()
        key = str(resolved)
        with self._lock:
            entry = self._entries.get(key)
        same_file = bool(entry) and entry.get("mtime_ns") == stat.st_mtime_ns and entry.get("size") == stat.st_size
        if same_file and field in entry:
            return str(entry[field])
        digest = compute(resolved)
        with self._lock:
            fresh = {"mtime_ns": stat.st_mtime_ns, "size": stat.st_size}
            self._entries[key] = {**(entry if same_file else fresh), field: digest}
            self._write()
        return digest

    def short_hash(self, path: Path) -> str:
        """A1111's AutoV2 short hash: the first 10 hex digits of the SHA-256."""
        return self.sha256(path)[:SHORT_HASH_DIGITS]

    def cached(self, path: Path, field: str = "sha256") -> str | None:
        """The SHA-256 (``field``: "sha256", or "tensors_sha256" of :meth:`tensors_sha256`) if it is cached and still
        valid, without hashing."""
        try:
            resolved = path.resolve()
            stat = resolved.stat()
        except OSError:
            return None
        with self._lock:
            entry = self._entries.get(str(resolved))
        if entry and entry.get("mtime_ns") == stat.st_mtime_ns and entry.get("size") == stat.st_size:
            digest = entry.get(field)
            return str(digest) if digest else None
        return None

    def _write(self) -> None:
        if self.file is None:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(self._entries, indent=0, sort_keys=True))
            os.replace(tmp, self.file)
        except OSError:
            pass  # a read-only cache folder only costs re-hashing next time
