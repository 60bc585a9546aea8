"""LoRAs and embeddings of a model library, for one loaded model: the pipeline's ``ExtraNetworks``.

``<lora:name:...>`` names are looked up in the library's LoRA folders (``models/Lora``,
``models/LyCORIS``, ComfyUI's ``models/loras`` and the LoRAs shipped with the package), parsed once
(a few are kept, keyed by path, mtime and size) and merged by a ``LoraPatcher``; embeddings come from
the ``embeddings`` folders by file name, and from the LoRAs a prompt names when they bundle some (kohya's
``bundle_emb``: A1111 registers them while the LoRA is loaded). A LoRA is found by its file name, stem or alias
(``ModelLibrary.find``). Infotext: A1111's ``Lora hashes`` (``pipelines.models.network_hashes``) and
``TI hashes`` (a bundled embedding's "hash" is its LoRA's name, as A1111 writes it).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pipelines.generation.extra_networks import (
    TAG_RE,
    NetworkTag,
    TextualInversion,
    parse_tag,
    strip_network_tags,
)
from pipelines.models.embeddings import embedding_from_tensors, read_embedding
from pipelines.models.errors import ModelLoadError
from pipelines.models.lora import LoraPatcher, WeightedLora
from pipelines.models.lora_formats import LoraFile, read_lora
from pipelines.models.network_hashes import lora_hashes_text
from pipelines.models.peft_layout import adapter_files

if TYPE_CHECKING:
    from pipelines.models.components import SDComponents
    from pipelines.models.library import ModelFile, ModelLibrary

KEPT_FILES = 8  # parsed LoRA / embedding files kept in memory
log = logging.getLogger(__name__)


class LibraryNetworks:
    """The ``ExtraNetworks`` of one loaded model, backed by a ``ModelLibrary``."""

    def __init__(self, library: ModelLibrary, components: SDComponents) -> None:
        self.library = library
        self.patcher = LoraPatcher(components)
        self.width = int(components.text_encoder.config.hidden_size)
        self._files: OrderedDict[tuple[str, tuple[tuple[int, int], ...], str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self._shadowed: set[tuple[str, str]] = set()  # (LoRA path, bundled name) warned about once

    def _cached(self, entry: ModelFile, kind: str, load: Any) -> Any:
        files = adapter_files(entry.path) if entry.format == "peft" else [entry.path]  # a folder: its files' stamps
        stats = [path.stat() for path in files]
        key = (str(entry.path), tuple((stat.st_mtime_ns, stat.st_size) for stat in stats), kind)
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
        text = lora_hashes_text([(tag.name, w.lora.short_hash) for tag, w in zip(tags, weighted)])
        return {"Lora hashes": text} if text else {}

    def embeddings(self, texts: Sequence[str]) -> dict[str, TextualInversion]:
        """Embeddings whose names occur as words in ``texts`` outside ``<lora:...>`` tags (the encoder then
        matches their tokens): from the embedding folders as they are now, and bundled in a LoRA the texts
        tag (an embedding file of the same name wins, as in A1111)."""
        joined = "\n".join(strip_network_tags(text) for text in texts)  # a LoRA and an embedding may share a name
        found: dict[str, TextualInversion] = {}
        for entry in self.library.current_files("embedding"):
            name = entry.stem
            if not mentions_word(joined, name):
                continue
            if entry.refused:
                raise ModelLoadError(f"{entry.path}: embedding {name!r} is in the prompt but refused: {entry.refused}")
            found[name] = self._cached(
                entry, "embedding",
                lambda entry=entry, name=name: read_embedding(entry.path, name, self.width,
                                                              self.library.network_hash(entry) or ""),
            )
        found.update(self._bundled(texts, joined, taken={name.lower() for name in found}))
        return found

    def _bundled(self, texts: Sequence[str], joined: str, taken: set[str]) -> dict[str, TextualInversion]:
        """The embeddings bundled in the LoRAs ``texts`` tag that ``joined`` uses, except the names in ``taken``."""
        bundled: dict[str, TextualInversion] = {}
        for tag_name in _lora_tag_names(texts):
            try:
                lora = self.lora(tag_name)
            except ModelLoadError:
                continue  # merging the tags reports it; a LoRA that cannot be read bundles nothing
            for name, tensors in lora.embeddings.items():
                if not mentions_word(joined, name):
                    continue
                if name.lower() in taken:
                    if (str(lora.path), name) not in self._shadowed:
                        self._shadowed.add((str(lora.path), name))
                        log.warning("%s: bundled embedding %r not used: an embedding file of that name is", lora.path,
                                    name)
                    continue
                taken.add(name.lower())
                source = f"{lora.path} (embedding {name!r} bundled in the LoRA)"
                bundled[name] = embedding_from_tensors(source, name, tensors, self.width, short_hash=tag_name)
        return bundled


def mentions_word(text: str, name: str) -> bool:
    """Whether ``name`` occurs in ``text`` as a word (any case: CLIP's tokenizer lowercases)."""
    return re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", text, flags=re.IGNORECASE) is not None


def _lora_tag_names(texts: Sequence[str]) -> list[str]:
    """The names of the well-formed ``<lora:...>`` tags in ``texts``, in order, once each (a malformed tag is
    refused where the tags are merged)."""
    names: list[str] = []
    for text in texts:
        for match in TAG_RE.finditer(text):
            try:
                name = parse_tag(match.group(1), match.group(2)).name
            except ValueError:
                continue
            if name not in names:
                names.append(name)
    return names
