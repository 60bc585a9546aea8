"""LoRAs and embeddings of a model library, for one loaded model: the pipeline's ``ExtraNetworks``.

``<lora:name:...>`` names are looked up in the library's LoRA folders (``models/Lora``,
``models/LyCORIS``, ComfyUI's ``models/loras`` and the LoRAs shipped with the package), parsed once
(a few are kept, keyed by path, mtime and size) and merged by a ``LoraPatcher``; embeddings come from
the ``embeddings`` folders by file name. Infotext: A1111's ``Lora hashes`` and ``TI hashes``.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pipelines.generation.extra_networks import NetworkTag, TextualInversion, strip_network_tags
from pipelines.models.embeddings import read_embedding
from pipelines.models.errors import ModelLoadError
from pipelines.models.lora import LoraPatcher, WeightedLora
from pipelines.models.lora_formats import LoraFile, read_lora

if TYPE_CHECKING:
    from pipelines.models.components import SDComponents
    from pipelines.models.library import ModelFile, ModelLibrary

KEPT_FILES = 8  # parsed LoRA / embedding files kept in memory


def hashes_text(pairs: Sequence[tuple[str, str]]) -> str:
    """A1111's ``Lora hashes`` / ``TI hashes`` value: ``name: hash, name: hash``."""
    return ", ".join(f"{name}: {short_hash}" for name, short_hash in pairs)


def parse_hashes_text(text: str) -> dict[str, str]:
    """The inverse of :func:`hashes_text` (PNG info reads ``Lora hashes`` back)."""
    pairs = {}
    for item in text.split(","):
        name, sep, short_hash = item.strip().rpartition(":")
        if sep and name.strip():
            pairs[name.strip()] = short_hash.strip()
    return pairs


class LibraryNetworks:
    """The ``ExtraNetworks`` of one loaded model, backed by a ``ModelLibrary``."""

    def __init__(self, library: ModelLibrary, components: SDComponents) -> None:
        self.library = library
        self.patcher = LoraPatcher(components)
        self.width = int(components.text_encoder.config.hidden_size)
        self._files: OrderedDict[tuple[str, int, int, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def _cached(self, entry: ModelFile, kind: str, load: Any) -> Any:
        stat = entry.path.stat()
        key = (str(entry.path), stat.st_mtime_ns, stat.st_size, kind)
        with self._lock:
            if key in self._files:
                self._files.move_to_end(key)
                return self._files[key]
        value = load()
        with self._lock:
            self._files[key] = value
            while len(self._files) > KEPT_FILES:
                self._files.popitem(last=False)
        return value

    def lora(self, name: str) -> LoraFile:
        """The parsed LoRA ``name`` (A1111's name or file stem); ModelLoadError if missing or unreadable."""
        entry = self.library.find("lora", name)
        return self._cached(entry, "lora", lambda: read_lora(entry.path, name, self.library.network_hash(entry) or ""))

    def activate(self, tags: Sequence[NetworkTag]) -> dict[str, str]:
        """Merge exactly the tagged LoRAs (no tags: restore the base model); ``Lora hashes`` infotext."""
        weighted = [WeightedLora(self.lora(tag.name), tag.te, tag.unet) for tag in tags]
        self.patcher.apply(weighted)
        if not weighted:
            return {}
        return {"Lora hashes": hashes_text([(tag.name, w.lora.short_hash) for tag, w in zip(tags, weighted)])}

    def embeddings(self, texts: Sequence[str]) -> dict[str, TextualInversion]:
        """Embeddings whose file names occur as words in ``texts`` outside ``<lora:...>`` tags (the encoder then
        matches their tokens), from the embedding folders as they are now."""
        joined = "\n".join(strip_network_tags(text) for text in texts)  # a LoRA and an embedding may share a name
        found: dict[str, TextualInversion] = {}
        for entry in self.library.current_files("embedding"):
            name = entry.stem
            if not re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", joined, flags=re.IGNORECASE):
                continue
            if entry.refused:
                raise ModelLoadError(f"{entry.path}: embedding {name!r} is in the prompt but refused: {entry.refused}")
            found[name] = self._cached(
                entry, "embedding",
                lambda entry=entry, name=name: read_embedding(entry.path, name, self.width,
                                                              self.library.network_hash(entry) or ""),
            )
        return found
