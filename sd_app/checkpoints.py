"""Which checkpoint and VAE the engine runs, by A1111's names, and the bounded set of loaded pipelines.

A1111's option values: ``sd_model_checkpoint`` is a checkpoint's title (``sub/model.safetensors
[hash]``), its name, file name, stem or short hash; ``sd_vae`` is ``Automatic`` (a ``<checkpoint
stem>.vae.safetensors`` beside the checkpoint, else a VAE of the folders whose file name starts with the
checkpoint's stem, else the checkpoint's own; a diffusers folder's stem is its name), ``None`` (the checkpoint's
own) or a VAE's name. Paths and ``embedded`` work too, as on the command line; a client of the server
(HTTP API, browser UI) names library entries only (:func:`client_selection`). At most ``max_loaded``
pipelines stay in memory (1 by default: a switch frees the old model before loading the new).
"""

from __future__ import annotations

import gc
import re
from collections import OrderedDict
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.generation.text_to_image import TextToImagePipeline
    from pipelines.models.library import ModelFile, ModelLibrary

AUTOMATIC_VAE = "Automatic"
OWN_VAE = "None"


def checkpoint_path(library: ModelLibrary, spec: str) -> str:
    """The loadable spec of an A1111 checkpoint value: ``embedded``, a path, or a library entry's path."""
    text = str(spec).strip()
    if text == "embedded" or Path(text).expanduser().exists():
        return text
    from pipelines.models.errors import ModelLoadError

    try:
        entry = library.find("checkpoint", text)
    except ModelLoadError:
        repo_id = re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.endswith(".safetensors")
        if text.startswith(("/", "~", ".")) or repo_id:
            return text  # a path, or a Hugging Face repo id in the local cache: loading says what is wrong
        raise  # a name, or a title (no repo id has a space or brackets)
    return "embedded" if entry.folder == "shipped" else str(entry.path)


def vae_path(library: ModelLibrary, checkpoint: str, spec: str | None) -> str | None:
    """The VAE file for an ``sd_vae`` value (None: the checkpoint's own)."""
    if spec is None or spec == OWN_VAE:
        return None
    if spec == AUTOMATIC_VAE:  # A1111's find_vae_near_checkpoint
        path = Path(checkpoint)
        # A1111's stem is the path without its extension: a diffusers folder's is its name (A1111 lists files only)
        if not (checkpoint.endswith(".safetensors") or (path.is_dir() and (path / "model_index.json").is_file())):
            return None
        stem = path.name.removesuffix(".safetensors")
        beside = path.with_name(stem + ".vae.safetensors")
        if beside.is_file():
            return str(beside)
        named = [e for e in library.files("vae") if e.refused is None and e.path.name.startswith(stem)]
        return str(named[0].path) if named else None  # models/VAE/<checkpoint stem>*.safetensors
    if Path(spec).expanduser().is_file():
        return spec
    return str(library.find("vae", spec).path)


def client_selection(
    library: ModelLibrary,
    checkpoint: str | None,
    vae: str | None,
    shown: Callable[[], tuple[Collection[str], Collection[str]]] = lambda: ((), ()),
) -> tuple[str | None, str | None]:
    """A server client's ``sd_model_checkpoint`` / ``sd_vae`` values as the engine's selection (None: unchanged).

    A client names a checkpoint or VAE of the model folders (A1111's names, titles, short hashes),
    ``embedded``, ``Automatic`` or ``None``, or sends back how the running selection was shown to it
    (``shown()``: the checkpoint's and the VAE's spellings, which may be the operator's paths; asked only
    for a value that names no library entry). It never names a file of its own choosing on this machine
    (README "Security"): ModelNotFound, before anything is read."""
    from pipelines.models.errors import ModelNotFound

    def named(kind: str, value: str | None, plain: tuple[str, ...]) -> str | None:
        if value is None:
            return None
        text = str(value).strip()
        if text in plain:
            return text
        try:
            entry = library.find(kind, text)
        except ModelNotFound:
            if text in shown()[0 if kind == "checkpoint" else 1]:
                return None
            if text.startswith(("/", "~", ".")) or "\\" in text:
                listing = "sd-models" if kind == "checkpoint" else "sd-vae"
                raise ModelNotFound(f"{kind} {text!r}: the server takes the names of its model folders' files, "
                                    f"not paths (GET /sdapi/v1/{listing} lists them)") from None
            raise
        # The entry's own path (a library file, never one the client chose): a name alone could be ambiguous
        # again (the same name under two roots, told apart by the title's hash).
        return "embedded" if entry.folder == "shipped" else str(entry.path)

    return named("checkpoint", checkpoint, ("embedded",)), named("vae", vae, (AUTOMATIC_VAE, OWN_VAE))


def vae_shown(library: ModelLibrary, vae: str | None) -> str:
    """An engine's VAE selection as A1111's ``sd_vae`` shows it: ``None`` for the checkpoint's own (no separate
    VAE is not ``Automatic``, which may find one), a library VAE by its name, anything else as it is."""
    if vae is None:
        return OWN_VAE
    for entry in library.files("vae"):
        if str(entry.path) == vae:
            return entry.name
    return vae


def entry_title(entry: ModelFile, short_hash: str | None) -> str:
    """A1111's checkpoint title: ``name [hash]``."""
    return f"{entry.name} [{short_hash}]" if short_hash else entry.name


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PipelineCache:
    """Loaded pipelines by (checkpoint, VAE), least recently used evicted first; at most ``size``."""

    def __init__(self, size: int = 1) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"max loaded checkpoints must be at least 1, got {size!r}")
        self.size = size
        self._pipelines: OrderedDict[tuple[str, str | None], TextToImagePipeline] = OrderedDict()

    def get(self, key: tuple[str, str | None], load: Callable[[], TextToImagePipeline]) -> TextToImagePipeline:
        """The pipeline for ``key``; loaded (after freeing the least recently used) when absent."""
        if key in self._pipelines:
            self._pipelines.move_to_end(key)
            return self._pipelines[key]
        while len(self._pipelines) >= self.size:  # free first: memory stays bounded during the load
            self._pipelines.popitem(last=False)
            free_memory()
        pipe = load()
        self._pipelines[key] = pipe
        return pipe

    def latest(self) -> TextToImagePipeline | None:
        """The most recently used pipeline, if any is loaded."""
        return next(reversed(self._pipelines.values()), None)

    def keys(self) -> list[tuple[str, str | None]]:
        return list(self._pipelines)

    def __len__(self) -> int:
        return len(self._pipelines)

    def describe(self) -> list[dict[str, Any]]:
        return [{"checkpoint": k[0], "vae": k[1]} for k in self._pipelines]
