"""The model folders users already have: AUTOMATIC1111's and ComfyUI's layouts, listed and looked up.

A1111 (``stable-diffusion-webui/``): ``models/Stable-diffusion``, ``models/VAE``, ``models/Lora``,
``models/LyCORIS``, ``embeddings/``. ComfyUI (``ComfyUI/``): ``models/checkpoints``, ``models/vae``,
``models/loras``, ``models/embeddings``. A root may be the install folder or its ``models/`` folder;
folder names match case-insensitively and subfolders are walked. Checkpoints are single
``.safetensors`` files or diffusers folders (``model_index.json``); ``*.vae.safetensors`` next to
checkpoints are VAEs, as in A1111. A PEFT adapter folder (``adapter_model.safetensors`` with
``adapter_config.json``, ``pipelines.models.peft_layout``) under a LoRA folder is one LoRA named by the folder
(A1111 lists files only). Pickle files (.ckpt, .pt, .bin, ...) are listed as refused, with
the reason, and never opened. Names are A1111's: the path under the kind's folder, without the
extension for LoRAs and embeddings (``<lora:name:1>``; a unique file stem works too) and with it for
checkpoints and VAEs (``sd_model_checkpoint``, ``sd_vae``). A .safetensors LoRA is also found by its alias,
kohya's ``ss_output_name`` in its header (A1111's ``NetworkOnDisk.alias``), when no name or stem is the text
and no other file has that alias (A1111 then forbids it: only names work). Short hashes are A1111's AutoV2,
from a ``HashCache``; the embedded model and the example LoRAs shipped with the package are always listed.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.models.errors import PICKLE_SUFFIXES, IncompatibleModel, ModelLoadError, ModelNotFound
from pipelines.models.hash_cache import HashCache
from pipelines.models.peft_layout import ADAPTER_WEIGHTS, adapter_files, adapter_weights, is_adapter, pickled_part
from pipelines.models.shipped import EMBEDDED_MODEL_DIR, PACKAGE_DIR

KINDS = ("checkpoint", "vae", "lora", "embedding")
SHIPPED_LORA_DIR = PACKAGE_DIR / "embedded" / "loras"
# folder names (lower case) under a root, per kind; "models/x" also matches a root that is models/ itself
FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoint": ("models/stable-diffusion", "models/checkpoints"),
    "vae": ("models/vae",),
    "lora": ("models/lora", "models/lycoris", "models/loras"),
    "embedding": ("embeddings", "models/embeddings"),
}
# other folders of a known layout: TAESD's tiny decoders (pipelines.models.tiny_decoder)
OTHER_FOLDERS = ("models/vae-approx", "models/vae_approx")
IMAGE_EMBEDDINGS = {".png", ".webp", ".jxl", ".avif"}  # A1111 hides pickled embeddings in images
MAX_HEADER_BYTES = 100_000_000
NETWORK_HASH_DIGITS = 12  # A1111's Network.shorthash / Embedding.shorthash: hash[0:12]
ALIAS_KEY = "ss_output_name"  # kohya's output name in a LoRA header: A1111's NetworkOnDisk.alias
FORBIDDEN_ALIASES = ("none",)  # A1111's list_available_networks never resolves these as aliases
EMBEDDED_NAME = EMBEDDED_MODEL_DIR.name


@dataclass(frozen=True)
class ModelFile:
    """One entry of a model folder: what it is, where, how big, and why it is refused (if it is)."""

    name: str  # A1111's name (see module docstring)
    kind: str  # one of KINDS
    path: Path
    format: str  # "safetensors", "diffusers", "peft" (a PEFT adapter folder) or "pickle"
    size: int  # bytes (a diffusers folder or PEFT adapter: its weight files)
    refused: str | None = None
    folder: str = ""  # the root folder it was found under ("shipped" for the package's own)

    @property
    def stem(self) -> str:
        return self.name.rsplit("/", 1)[-1].removesuffix(".safetensors")

    @property
    def weights(self) -> Path:
        """The file whose hash names the model: the file itself, a diffusers folder's U-Net weights, or a PEFT
        adapter's first weights file (the U-Net's)."""
        if self.format == "peft":
            return next(iter(adapter_files(self.path)), self.path / ADAPTER_WEIGHTS)  # the folder may be gone
        if self.format != "diffusers":
            return self.path
        for folder in ("unet", ""):
            files = sorted((self.path / folder).glob("*.safetensors"))
            if files:
                return files[0]
        return self.path / "model_index.json"


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a .safetensors header says without reading any tensor: metadata and tensor shapes."""

    metadata: dict[str, str]
    shapes: dict[str, list[int]]
    dtypes: dict[str, str]
    complete: bool  # the file is as long as the header says


def read_header(path: Path) -> SafetensorsHeader:
    """Parse a .safetensors header (u64 little-endian length, then JSON); ModelLoadError naming the file."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise ModelLoadError(f"{path}: not a .safetensors file (shorter than its 8-byte header length)")
            (length,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ModelLoadError(f"{path}: not a valid or complete .safetensors file (header of {length} bytes)")
            header = json.loads(handle.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{path}: not a valid .safetensors file ({error})") from error
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: not a valid .safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    end = 0
    for key, info in header.items():
        if not isinstance(info, dict) or "shape" not in info or "data_offsets" not in info:
            raise ModelLoadError(f"{path}: not a valid .safetensors file (entry {key!r})")
        shapes[key], dtypes[key] = list(info["shape"]), str(info.get("dtype"))
        end = max(end, int(info["data_offsets"][1]))
    return SafetensorsHeader({str(k): str(v) for k, v in metadata.items()}, shapes, dtypes, 8 + length + end <= size)


def base_model(header: SafetensorsHeader) -> str:
    """The base a LoRA, embedding or checkpoint was made for: metadata first (kohya ``ss_*``,
    ``modelspec.architecture``), else the tensors' names and widths; "unknown" when neither says."""
    meta = header.metadata
    version = meta.get("ss_base_model_version", "") or meta.get("modelspec.architecture", "")
    if version:
        lowered = version.lower()
        if "xl" in lowered:
            return "SDXL"
        if "v2" in lowered or "sd-2" in lowered or "sd_2" in lowered:
            return "SD 2.x"
        if "v1" in lowered or "sd-1" in lowered or "sd_1" in lowered:
            return "SD 1.x"
        return version
    if meta.get("ss_v2") == "True":
        return "SD 2.x"
    keys = header.shapes
    sdxl_prefixes = ("lora_te1_", "lora_te2_", "conditioner.embedders.", "text_encoders.clip_g.")  # last: ComfyUI's
    if any(k.startswith(sdxl_prefixes) or (k.startswith("bundle_emb.") and k.endswith(".clip_g")) for k in keys) or (
        set(keys) >= {"clip_l", "clip_g"}
    ):
        return "SDXL"
    if any(k.startswith(("cond_stage_model.model.", "text_encoders.clip_h.")) for k in keys):
        return "SD 2.x"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "SD 1.x"
    # A cross-attention key projection's input width is the text encoder's: kohya, diffusers, PEFT and diffusers'
    # attention-processor spellings.
    cross_keys = ("attn2.to_k.lora_down.weight", "attn2_to_k.lora_down.weight", "attn2.to_k.lora_A.weight",
                  "attn2.processor.to_k_lora.down.weight")
    widths = {shape[-1] for k, shape in keys.items() if k.endswith(cross_keys) and shape}
    widths |= {shape[-1] for k, shape in keys.items() if len(keys) == 1 and shape}  # an embedding's width
    if widths & {768}:
        return "SD 1.x"
    if widths & {1024}:
        return "SD 2.x"
    if widths & {2048, 1280}:
        return "SDXL"
    return "unknown"


def check_lora_base(path: Path, header: SafetensorsHeader, what: str = "a LoRA") -> None:
    """IncompatibleModel when the header says ``path`` (``what`` it is) was made for another base than SD 1.x (an
    unknown base passes: the keys are checked when it is read)."""
    base = base_model(header)
    if base not in ("SD 1.x", "unknown"):
        raise IncompatibleModel(f"{path}: {what} for another base ({base}); this model is SD 1.x")


def _child(folder: Path, name: str) -> Path | None:
    """``folder/name`` matched case-insensitively, or None."""
    exact = folder / name
    if exact.is_dir():
        return exact
    if not folder.is_dir():
        return None
    for entry in folder.iterdir():
        if entry.is_dir() and entry.name.lower() == name:
            return entry
    return None


def kind_folders(root: Path, kind: str) -> list[Path]:
    """The folders of ``kind`` under ``root`` (an A1111 or ComfyUI install, or its ``models/``)."""
    found: list[Path] = []
    for relative in FOLDERS[kind]:
        for candidate in (relative, relative.removeprefix("models/")):
            folder: Path | None = root
            for part in candidate.split("/"):
                folder = _child(folder, part) if folder is not None else None
            if folder is not None and folder.resolve() not in [f.resolve() for f in found]:
                found.append(folder)
    return found


def _tree(folder: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` of ``folder`` following symlinked folders as A1111 does (a shared model store linked into place
    is common), each real folder once (a link back up the tree does not loop)."""
    seen: set[str] = set()
    for top, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        folders.sort()  # walked in name order: a folder reachable twice is named by the same path everywhere
        yield top, folders, files


def place_lora(source: Path, lora_folder: Path, name: str) -> Path:
    """Copy a LoRA into ``lora_folder`` so that ``<lora:name:...>`` names it: a ``.safetensors`` file as
    ``name.safetensors``, a PEFT adapter folder (``peft_layout``) as ``name/``. ModelLoadError for anything else."""
    import shutil

    if source.is_dir():
        if not is_adapter(source):
            raise ModelLoadError(f"{source}: a folder, but no PEFT adapter (adapter_config.json with "
                                 "adapter_model.safetensors, there or in unet/ and text_encoder/)")
        return Path(shutil.copytree(source, lora_folder / name))
    if source.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{source}: a LoRA is a .safetensors file or a PEFT adapter folder")
    return Path(shutil.copy(source, lora_folder / f"{name}.safetensors"))


def walk(folder: Path) -> list[Path]:
    """Every file and folder under ``folder``, sorted (symlinked folders followed, :func:`_tree`)."""
    return sorted(Path(top) / name for top, folders, files in _tree(folder) for name in (*folders, *files))


def folder_stamp(folders: Iterable[Path]) -> tuple[tuple[str, int], ...]:
    """The modification times of ``folders`` and every folder under them: a file added, removed or renamed in
    any of them changes it."""
    stamp = []
    for folder in folders:
        for top, _, _ in _tree(folder):
            try:
                stamp.append((top, os.stat(top).st_mtime_ns))
            except OSError:
                continue
    return tuple(stamp)


def _weights_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in walk(folder) if p.suffix == ".safetensors" and p.is_file())


def _entries(folder: Path, kind: str, label: str) -> Iterable[ModelFile]:
    """Every model file of ``kind`` under ``folder`` (walked), diffusers folders as one entry."""
    diffusers_roots: list[Path] = []
    for path in walk(folder):
        if any(path.is_relative_to(d) for d in diffusers_roots) or any(p.startswith(".") for p in path.parts[-1:]):
            continue
        relative = path.relative_to(folder).as_posix()
        if path.is_dir():
            if kind == "lora" and is_adapter(path):  # a PEFT adapter folder is one LoRA, named by the folder
                diffusers_roots.append(path)
                pickled = pickled_part(path)
                refused = (f"{pickled.name} is a Python pickle, which can run code when loaded; save the adapter as "
                           ".safetensors (PEFT's default)") if pickled else None
                size = sum(p.stat().st_size for p in adapter_weights(path))
                yield ModelFile(relative, kind, path, "peft", size, refused=refused, folder=label)
            elif kind == "checkpoint" and (path / "model_index.json").is_file():
                diffusers_roots.append(path)
                yield ModelFile(relative, kind, path, "diffusers", _weights_size(path), folder=label)
            elif kind == "vae" and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
                diffusers_roots.append(path)
                yield ModelFile(relative, kind, path, "diffusers", _weights_size(path), folder=label)
            continue
        suffix = path.suffix.lower()
        is_vae_file = path.name.lower().endswith((".vae.safetensors", ".vae.pt", ".vae.ckpt"))
        if kind == "checkpoint" and is_vae_file:
            continue  # listed as a VAE
        name = relative if kind in ("checkpoint", "vae") else relative.rsplit(".", 1)[0]
        if suffix == ".safetensors":
            yield ModelFile(name, kind, path, "safetensors", path.stat().st_size, folder=label)
        elif suffix in PICKLE_SUFFIXES or (kind == "embedding" and suffix in IMAGE_EMBEDDINGS):
            what = "a Python pickle" if suffix in PICKLE_SUFFIXES else "an image holding a pickled embedding"
            yield ModelFile(
                name, kind, path, "pickle", path.stat().st_size,
                refused=f"{suffix} is {what}, which can run code when loaded; convert it to .safetensors",
                folder=label,
            )


def has_layout(root: Path) -> bool:
    """``root`` holds a folder of A1111's or ComfyUI's layout (any kind's, or TAESD's), as :func:`kind_folders`
    finds them."""
    if any(kind_folders(root, kind) for kind in KINDS):
        return True
    for relative in OTHER_FOLDERS:
        for candidate in (relative, relative.removeprefix("models/")):
            folder: Path | None = root
            for part in candidate.split("/"):
                folder = _child(folder, part) if folder is not None else None
            if folder is not None:
                return True
    return False


def layout_hint(root: Path) -> str:
    """What is wrong with a models folder without the layout, and the folders looked for."""
    looked_for = ("A1111's models/Stable-diffusion, models/VAE, models/Lora, models/LyCORIS, embeddings or ComfyUI's "
                  "models/checkpoints, models/vae, models/loras, models/embeddings, in it or as its models/ folder")
    leaves = {relative.rsplit("/", 1)[-1] for folders in FOLDERS.values() for relative in folders}
    advice = (f"it looks like one of those folders itself: give its parent, {root.parent}"
              if root.name.lower() in leaves else "give the A1111 or ComfyUI install folder or its models/ folder")
    return f"models folder {root} has none of the model folders sd-app reads ({looked_for}); {advice}"


def title_hash(text: str) -> str:
    """The hash of an A1111 title ``name [hash]``, lower case; "" when ``text`` is no title."""
    _, _, rest = text.partition(" [")
    return rest[:-1].strip().lower() if rest.endswith("]") else ""


def _is_short_hash(text: str) -> bool:
    return len(text) in (8, 10) and all(c in "0123456789abcdef" for c in text.lower())


def _spellings(entry: ModelFile) -> tuple[str, ...]:
    """The names :meth:`ModelLibrary.find` knows ``entry`` by, its title aside."""
    return entry.name, entry.name.removesuffix(".safetensors"), entry.stem, entry.path.name


@dataclass
class ModelLibrary:
    """The model folders of one app (``--models-dir``, repeatable) plus what ships with the package.

    Listings are cached until ``refresh()`` (A1111's refresh buttons and ``POST /refresh-*``); a name
    not found triggers one rescan, so a file dropped in is found without a refresh.
    """

    roots: Sequence[Path] = ()
    hashes: HashCache = field(default_factory=HashCache)
    shipped: bool = True  # list the embedded model and the shipped example LoRAs
    _listing: dict[str, list[ModelFile]] = field(default_factory=dict, init=False, repr=False)
    _stamps: dict[str, tuple[tuple[str, int], ...]] = field(default_factory=dict, init=False, repr=False)
    _aliases: dict[tuple[str, int, int], str] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    unrecognised: list[Path] = field(default_factory=list, init=False)  # roots holding no known model folder

    def __post_init__(self) -> None:
        self.roots = [Path(root).expanduser() for root in self.roots]
        for root in self.roots:
            if not root.is_dir():
                raise ModelLoadError(f"models folder not found: {root}")
        # A folder without the layout is read (an install may gain its folders later), with a warning: it is most
        # often the checkpoints folder itself, given by mistake, whose models would otherwise silently be missing.
        self.unrecognised = [root for root in self.roots if not has_layout(root)]
        for root in self.unrecognised:
            warnings.warn(layout_hint(root), stacklevel=2)

    def refresh(self, kind: str | None = None) -> None:
        """Forget the cached listing (of one kind, or all); the next call rescans the folders."""
        with self._lock:
            if kind is None:
                self._listing.clear()
            else:
                self._listing.pop(kind, None)

    def current_files(self, kind: str) -> list[ModelFile]:
        """``files(kind)``, rescanned first when a folder of that kind changed since the listing (a file added,
        removed or renamed): for the kinds a prompt uses without naming them in a lookup, embeddings, whose
        words must not silently stay text because the file came after the listing."""
        folders = [folder for root in self.roots for folder in kind_folders(root, kind)]
        stamp = folder_stamp(folders)
        with self._lock:
            changed = self._stamps.get(kind) != stamp
            if changed:
                self._listing.pop(kind, None)
                self._stamps[kind] = stamp
        return self.files(kind)

    def files(self, kind: str) -> list[ModelFile]:
        """Every entry of ``kind``, refused pickles included, sorted by name."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        with self._lock:
            cached = self._listing.get(kind)
        if cached is not None:
            return list(cached)
        entries: list[ModelFile] = []
        if self.shipped:
            entries.extend(self._shipped(kind))
        for root in self.roots:
            for folder in kind_folders(root, kind):
                entries.extend(_entries(folder, kind, str(folder)))
            if kind == "vae":
                for folder in kind_folders(root, "checkpoint"):  # model.vae.safetensors beside checkpoints
                    entries.extend(
                        ModelFile(p.relative_to(folder).as_posix(), "vae", p, "safetensors", p.stat().st_size,
                                  folder=str(folder))
                        for p in walk(folder) if p.name.lower().endswith(".vae.safetensors")
                    )
        entries.sort(key=lambda e: (e.folder != "shipped", e.name.lower()))
        with self._lock:
            self._listing[kind] = entries
        return list(entries)

    @staticmethod
    def _shipped(kind: str) -> list[ModelFile]:
        if kind == "checkpoint" and (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
            return [ModelFile(EMBEDDED_NAME, kind, EMBEDDED_MODEL_DIR, "diffusers", _weights_size(EMBEDDED_MODEL_DIR),
                              folder="shipped")]
        if kind == "lora" and SHIPPED_LORA_DIR.is_dir():
            return list(_entries(SHIPPED_LORA_DIR, kind, "shipped"))
        return []

    def find(self, kind: str, name: str) -> ModelFile:
        """The entry named ``name`` (A1111's name, or a unique stem; a checkpoint or VAE also by file name, title
        "name [hash]" or short hash). ModelLoadError when there is none, it is ambiguous, refused, or a title's
        hash is another file's (:meth:`_of_hash`)."""
        text = name.strip()
        for attempt in range(2):
            matches = self._matches(kind, text)
            if matches or attempt:
                break
            self.refresh(kind)  # a file added since the last listing
        if not matches:
            known = ", ".join(e.name for e in self.files(kind) if e.refused is None) or "none"
            hint = ""
            if kind in ("checkpoint", "vae") and _is_short_hash(text):
                hint = "; a short hash names a file once it is hashed (sd-app models lists the hashes)"
            if kind == "lora":
                hint = f"; a LoRA is named by its file name, stem or alias ({ALIAS_KEY} in its header)"
            hint += "".join(f"; {layout_hint(root)}" for root in self.unrecognised)
            raise ModelNotFound(f"no {kind} named {text!r} in the model folders (available: {known}){hint}")
        wanted = title_hash(text)
        if wanted and not any(text in _spellings(m) for m in matches):  # matched by the title's name
            matches = self._of_hash(kind, text, matches, wanted)
        if len(matches) > 1:
            matches = self._one_of(matches)
        if len(matches) > 1 and kind == "lora" and not any(text in _spellings(m) for m in matches):
            names = " or ".join(f"<lora:{m.name}:...>" for m in matches)
            raise ModelNotFound(f"lora alias {text!r} ({ALIAS_KEY} in their headers) is shared by "
                                f"{', '.join(str(m.path) for m in matches)}, so it names none of them (as in A1111); "
                                f"name the file instead: {names}")
        if len(matches) > 1:
            paths = ", ".join(str(m.path) for m in matches)
            advice = "rename one of them"
            if kind in ("checkpoint", "vae"):
                titles = " or ".join(f"'{m.name} [{self.short_hash(m)}]'" for m in matches if m.refused is None)
                advice = f"name it by its title with the hash, {titles} (sd-app models lists them), or {advice}"
            raise ModelNotFound(f"{kind} name {text!r} is ambiguous: {paths} differ; {advice}")
        entry = matches[0]
        if entry.refused:
            raise ModelLoadError(f"{entry.path}: refused: {entry.refused}")
        return entry

    def _of_hash(self, kind: str, text: str, matches: list[ModelFile], wanted: str) -> list[ModelFile]:
        """The entries of a title's name whose short hash begins with the title's hash. When none does: ModelNotFound
        naming both files if another file is known by that hash (the title means two files); else the entries of the
        name, with a warning (A1111's ``get_closet_checkpoint_match`` also falls back to the title without its hash:
        a file updated since, a title from another machine, or A1111's old 8-digit hash, which sd-app never makes)."""
        usable = [m for m in matches if m.refused is None]
        if not usable:
            return matches  # refused: find says why
        fitting = [m for m in usable if self.hashes.short_hash(m.weights).startswith(wanted)]
        if fitting:
            return fitting
        have = " and ".join(f"{m.path} has hash {self.short_hash(m)}" for m in usable)
        others = [e for e in self.files(kind)
                  if e.refused is None and (self.hashes.cached(e.weights) or "").startswith(wanted)]
        if not others:
            warnings.warn(f"{kind} title {text!r}: {have}, not {wanted}, and no {kind} of the model folders is known "
                          "by that hash; using the file of its name", stacklevel=3)
            return usable
        where = "; ".join(f"{wanted} is the hash of {e.path} ('{e.name} [{self.short_hash(e)}]')" for e in others)
        raise ModelNotFound(f"{kind} title {text!r} does not match its file: {have}, not {wanted}; {where}. "
                            "Name the file by its own title, or by its name alone")

    def _one_of(self, matches: list[ModelFile]) -> list[ModelFile]:
        """The entries of one name (under several roots) that mean one model: one of them when they are copies of
        one file (the same real path, or the same bytes: an A1111 and a ComfyUI folder sharing a checkpoint). A
        user's file shadows a shipped example of its name."""
        own = [m for m in matches if m.folder != "shipped"]
        matches = own or matches
        if len(matches) == 1:
            return matches
        if all(m.refused is None for m in matches):
            real = {m.weights.resolve() for m in matches}
            if len(real) == 1 or (len({m.size for m in matches}) == 1
                                  and len({self.hashes.sha256(m.weights) for m in matches}) == 1):
                return matches[:1]
        return matches

    def _matches(self, kind: str, text: str) -> list[ModelFile]:
        entries = self.files(kind)
        title_name, _, rest = text.partition(" [")
        candidates = [text, title_name] if rest.endswith("]") else [text]
        if kind == "checkpoint" and text == "embedded":
            candidates.append(EMBEDDED_NAME)
        for candidate in candidates:
            exact = [e for e in entries if candidate in (e.name, e.name.removesuffix(".safetensors"))]
            if exact:
                return exact
        for candidate in candidates:
            by_stem = [e for e in entries if candidate in (e.stem, e.path.name)]
            if by_stem:
                return by_stem
        if kind == "lora" and text.lower() not in FORBIDDEN_ALIASES:  # headers read only when no name fits
            return [e for e in entries if e.refused is None and self.alias(e) == text]
        if kind in ("checkpoint", "vae") and _is_short_hash(text):  # hashes already computed (A1111's too)
            wanted = text.lower()
            return [e for e in entries
                    if e.refused is None and (self.hashes.cached(e.weights) or "").startswith(wanted)]
        return []

    def alias(self, entry: ModelFile) -> str:
        """A .safetensors LoRA's alias, kohya's ``ss_output_name`` in its header (A1111's ``NetworkOnDisk.alias``);
        "" for other entries and files without one. Headers are read once per file version (mtime, size)."""
        if entry.kind != "lora" or entry.format != "safetensors" or entry.refused:
            return ""
        try:
            stat = entry.path.stat()
        except OSError:
            return ""
        key = (str(entry.path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._aliases.get(key)
        if cached is not None:
            return cached
        try:
            alias = read_header(entry.path).metadata.get(ALIAS_KEY, "").strip()
        except ModelLoadError:
            alias = ""  # an unreadable file is reported when it is used by its name
        with self._lock:
            self._aliases[key] = alias
        return alias

    def prompt_name(self, entry: ModelFile) -> str:
        """What A1111 writes in a prompt for a LoRA (``get_alias()`` with its default "Alias from file"): the alias
        when it names this file, else the file stem when that does, else the name."""
        for candidate in (self.alias(entry), entry.stem):
            if not candidate:
                continue
            try:
                if self.find("lora", candidate).path == entry.path:
                    return candidate
            except ModelLoadError:
                continue
        return entry.name

    def known_network_hash(self, entry: ModelFile) -> str | None:
        """:meth:`network_hash` when it needs no hashing (the header's ``sshs_model_hash``, or a digest already
        cached), else None: what A1111's ``available_network_hash_lookup`` knows."""
        if entry.refused or entry.kind != "lora":
            return None
        if entry.format == "safetensors":
            try:
                digest = read_header(entry.path).metadata.get("sshs_model_hash") or ""
            except ModelLoadError:
                return None
            digest = digest or self.hashes.cached(entry.path, "tensors_sha256") or ""
            return digest[:NETWORK_HASH_DIGITS] or None
        if entry.format == "peft":
            parts = adapter_weights(entry.path)
            if parts and all(self.hashes.cached(path, "tensors_sha256") for path in parts):
                return self.network_hash(entry)  # every part cached: nothing is read
        return None

    def find_by_network_hash(self, short_hash: str) -> ModelFile | None:
        """The usable LoRA whose known 12-digit network hash is ``short_hash`` (A1111's hash lookup when an
        infotext is pasted), or None."""
        wanted = short_hash.strip().lower()
        if len(wanted) != NETWORK_HASH_DIGITS:
            return None
        for entry in self.files("lora"):
            if entry.refused is None and self.known_network_hash(entry) == wanted:
                return entry
        return None

    def short_hash(self, entry: ModelFile) -> str | None:
        """AutoV2 short hash of the entry's weights (None for refused pickles: they are never read)."""
        if entry.refused:
            return None
        return self.hashes.short_hash(entry.weights)

    def network_hash(self, entry: ModelFile) -> str | None:
        """The short hash A1111 writes in ``Lora hashes`` and ``TI hashes`` (its ``shorthash``): 12 hex digits of,
        for a .safetensors LoRA, its header's ``sshs_model_hash`` or else the SHA-256 of its tensor bytes (A1111's
        ``use_addnet_hash``, Civitai's AutoV3); for a PEFT adapter folder, that of its weights file (of the SHA-256 of
        its parts' tensor hashes when it has a U-Net and a text encoder part); for an embedding, the file's SHA-256.
        None for refused pickles."""
        if entry.refused:
            return None
        if entry.format == "peft":
            digests = [self.hashes.tensors_sha256(path) for path in adapter_weights(entry.path)]
            digest = digests[0] if len(digests) == 1 else hashlib.sha256(" ".join(digests).encode()).hexdigest()
        elif entry.kind == "lora" and entry.format == "safetensors":
            digest = read_header(entry.path).metadata.get("sshs_model_hash") or self.hashes.tensors_sha256(entry.path)
        else:
            digest = self.hashes.sha256(entry.weights)
        return digest[:NETWORK_HASH_DIGITS]

    def describe(self, entry: ModelFile, hashes: bool = True) -> dict[str, Any]:
        """A listing row: name, kind, format, size, short hash, base model and the header's metadata."""
        row: dict[str, Any] = {
            "name": entry.name, "kind": entry.kind, "format": entry.format, "path": str(entry.path),
            "size": entry.size, "folder": entry.folder, "refused": entry.refused,
            "hash": self.short_hash(entry) if hashes else None, "base_model": None, "metadata": {},
            "alias": self.alias(entry) or None,
        }
        if entry.refused:
            return row
        header_file = entry.weights
        if header_file.suffix == ".safetensors":
            try:
                header = read_header(header_file)
            except ModelLoadError as error:
                row["refused"] = str(error)
                return row
            row["metadata"] = header.metadata
            row["base_model"] = base_model(header) if entry.format != "diffusers" else "SD 1.x"
            if not header.complete:
                row["refused"] = f"{header_file}: truncated (shorter than its header says)"
        return row
