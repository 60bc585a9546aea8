"""The LoRAs and embeddings a prompt uses, checked before any model loads: from the model library's listing and
the files' safetensors headers, no tensor read.

``sd-app batch`` checks every line of a prompts file with it, so that a line naming a missing, ambiguous, refused
or incompatible network stops the batch before its first job (``file:line`` in the error) instead of after the
lines before it were generated. Found here, as loading would find them: a malformed or unsupported tag, tags in
the negative prompt, a ``<lora:NAME>`` that is not in the folders, is ambiguous or is a refused pickle, a LoRA file
cut short or made for another base (SD 2.x, SDXL, by ``pipelines.models.library.base_model``); an embedding the
prompt uses that is refused, cut short, not one tensor, or of another width than the model's text encoder. What
only the tensors tell (a LoRA's keys and shapes against the model) is still found when its job merges it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.generation.extra_networks import NEGATIVE_PROMPT_TAGS, parse_network_tags, strip_network_tags
from pipelines.models.errors import ModelLoadError
from pipelines.models.library import check_lora_base, read_header
from pipelines.models.networks import mentions_word
from pipelines.models.peft_layout import adapter_weights

if TYPE_CHECKING:
    from pathlib import Path

    from pipelines.models.library import ModelFile, ModelLibrary, SafetensorsHeader



class NetworkChecker:
    """Checks prompts against one model library and text encoder width; a file passed once is not read again."""

    def __init__(self, library: ModelLibrary, text_width: int) -> None:
        self.library = library
        self.text_width = text_width  # the model's text encoder hidden size, [D] of an embedding vector
        self._passed: set[tuple[str, str]] = set()  # (kind, path) of files whose headers passed

    def check(self, prompt: str, negative_prompt: str = "") -> None:
        """ValueError (``ModelLoadError``, ``IncompatibleModel``, ``ModelNotFound``) naming the tag or file whose
        network the prompt could not use; None when every one it names passes."""
        _, tags = parse_network_tags(prompt)
        if parse_network_tags(negative_prompt)[1]:
            raise ValueError(NEGATIVE_PROMPT_TAGS)
        for tag in tags:
            entry = self.library.find("lora", tag.name)  # missing, ambiguous or refused: ModelNotFound / ModelLoadError
            if ("lora", str(entry.path)) not in self._passed:
                files = adapter_weights(entry.path) if entry.format == "peft" else [entry.path]
                for file in files:
                    check_lora_base(file, _complete_header(file))
                self._passed.add(("lora", str(entry.path)))
        text = "\n".join(strip_network_tags(part) for part in (prompt, negative_prompt))
        for entry in self.library.current_files("embedding"):
            if mentions_word(text, entry.stem):
                self._check_embedding(entry)

    def _check_embedding(self, entry: ModelFile) -> None:
        if entry.refused:
            raise ModelLoadError(
                f"{entry.path}: embedding {entry.stem!r} is in the prompt but refused: {entry.refused}")
        if ("embedding", str(entry.path)) in self._passed:
            return
        check_embedding_header(entry.path, entry.stem, _complete_header(entry.path), self.text_width)
        self._passed.add(("embedding", str(entry.path)))


def _complete_header(path: Path) -> SafetensorsHeader:
    header = read_header(path)
    if not header.complete:
        raise ModelLoadError(f"{path}: not a complete .safetensors file (shorter than its header says)")
    return header


def check_embedding_header(path: Path, name: str, header: SafetensorsHeader, width: int) -> None:
    """What ``embedding_from_tensors`` would say of the file's tensors, said from their shapes: the checks run on
    empty tensors of those shapes on the meta device (no memory, nothing read)."""
    import torch

    from pipelines.models.embeddings import embedding_from_tensors

    state = {key: torch.empty(shape, device="meta") for key, shape in header.shapes.items()}
    embedding_from_tensors(str(path), name, state, width)
