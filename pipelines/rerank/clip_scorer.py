"""CLIP scorer: text/image features, CLIP score and best-of-N ordering.

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision")
maps images and texts into one embedding space; after L2-normalisation their dot product is the
cosine similarity. The CLIP score follows torchmetrics' ``CLIPScore`` (Hessel et al. 2021):
``max(100 * cos(E_image, E_text), 0)``, computed here per image rather than as a batch mean.

Differences from ``torchmetrics.multimodal.CLIPScore`` on the same model and images (scores agree to
< 0.01; see tests/test_rerank.py):

- the prompt is encoded once per request, images are encoded in batches of ``batch_size``;
- prompts over the model's 77 positions are truncated by the tokenizer, which keeps the end-of-text
  token (torchmetrics slices the ids and drops it) and the result says ``truncated=True``;
- images must be RGB ``PIL.Image`` objects: alpha or grayscale inputs raise ValueError instead of
  being converted silently (``load_image_file(path, convert=True)`` converts explicitly).

Preprocessing is the model's own ``preprocessor_config.json`` through transformers' CLIP image
processor (resize shortest side, bicubic; center crop; CLIP mean/std), PIL backend, no torchvision.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipelines.models.errors import PICKLE_SUFFIXES
from pipelines.models.quiet import quiet_loading
from pipelines.models.shipped import EMBEDDED_MODEL_DIR

EMBEDDED_CLIP = EMBEDDED_MODEL_DIR / "clip"
TEXT_TOWER_PREFIX = "text_model."  # CLIPModel's and SD text_encoder's key prefix of the text transformer
TOKEN_EMBEDDING_KEY = TEXT_TOWER_PREFIX + "embeddings.token_embedding.weight"  # (49408, W): shared, never copied
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_GRAY_MODES = {"1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass(frozen=True)
class ScoreResult:
    """CLIP scores of several images against one prompt, in input order."""

    prompt: str
    scores: tuple[float, ...]  # max(100 * cos, 0) per image (torchmetrics convention)
    cosines: tuple[float, ...]  # raw cosine similarity per image, in [-1, 1]
    truncated: bool  # the prompt was longer than the text encoder's positions and was cut
    reranker: str  # ClipScorer.name, for metadata ("Reranker: <name>")
    label: str = "CLIP score"  # what ``scores`` are, for metadata ("CLIP score: 31.2")
    details: tuple[dict[str, float], ...] = ()  # per image: the other numbers behind its score

    def order(self) -> list[int]:
        """Indices best first: by score, ties (e.g. CLIP scores clamped at 0) by cosine, then input index."""
        return sorted(range(len(self.cosines)), key=lambda i: (-self.scores[i], -self.cosines[i], i))


@dataclass(frozen=True)
class ZeroShotRow:
    """One text of a zero-shot table: cosine, scaled logit and softmax probability over the texts."""

    text: str
    cosine: float
    logit: float  # logit_scale.exp() * cosine (about 100 * cosine for OpenAI CLIP)
    probability: float  # softmax of the logits over all texts of the request
    truncated: bool


class ClipScorer:
    """A transformers ``CLIPModel`` with its tokenizer and image processor, ready to score.

    Build with ``ClipScorer.load(spec)``; ``name`` is a short model name for image metadata.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_processor: Any,
        name: str,
        device: torch.device,
        batch_size: int = 32,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name
        self.device = device
        self.batch_size = batch_size
        self.dtype = next(model.parameters()).dtype
        self.max_length = int(model.config.text_config.max_position_embeddings)  # 77 for CLIP

    @classmethod
    def load(
        cls,
        spec: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        cache_dir: str | Path | None = None,
        processor_dir: str | Path | None = None,
    ) -> ClipScorer:
        """Load a local CLIP folder, ``"embedded"``, or a repo id already in the local HF cache.

        The folder has the layout of ``openai/clip-vit-base-patch32``: config.json (model_type
        "clip"), model.safetensors, preprocessor_config.json and tokenizer files. Nothing is
        downloaded (``local_files_only=True``) and pickled weights (.bin/.ckpt) are refused.
        ``processor_dir``: take the tokenizer and image processor from this folder instead (PickScore_v1
        ships only the model; its processor is laion/CLIP-ViT-H-14-laion2B-s32B-b79K's).
        Raises FileNotFoundError for a missing folder, ValueError for a folder that is not a
        safetensors CLIP model.
        """
        from transformers import AutoTokenizer

        from pipelines.speed.devices import checked_device, checked_float_dtype
        from pipelines.speed.options import default_device

        device = torch.device(checked_device(device) if device is not None else default_device())
        dtype = checked_float_dtype(dtype)
        folder = resolve_clip_folder(spec, cache_dir=cache_dir)
        processor_folder = resolve_clip_folder(processor_dir, cache_dir=cache_dir) if processor_dir else folder
        tokenizer_dir = tokenizer_folder(processor_folder)
        check_clip_folder(folder, tokenizer_dir, processor_folder)
        try:
            with quiet_loading():
                model = load_clip_model(folder)
                tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
                processor = image_processor_class().from_pretrained(processor_folder, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - any library error becomes one message naming the folder
            raise ValueError(f"{folder}: cannot load the CLIP model: {err}") from err
        model = model.to(device=device, dtype=dtype)
        return cls(model, tokenizer, processor, clip_display_name(folder, spec), device, batch_size)

    # ---- features -------------------------------------------------------------------------

    @torch.inference_mode()
    def text_features(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
        """Encode texts -> (L2-normalised features [T, D] float32, truncated flag per text)."""
        texts = check_texts(texts)
        truncated = [n > self.max_length for n in self._token_counts(texts)]
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            out = self.model.get_text_features(
                input_ids=batch["input_ids"].to(self.device),  # [t, L<=77]
                attention_mask=batch["attention_mask"].to(self.device),
            )
            chunks.append(_pooled(out).float())  # [t, D]
        return _l2_normalize(torch.cat(chunks)), truncated

    @torch.inference_mode()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Encode RGB PIL images in batches -> L2-normalised features [N, D] float32."""
        images = check_images(images)
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.image_processor(images=images[start : start + self.batch_size], return_tensors="pt")
            pixel_values = pixels["pixel_values"].to(self.device, self.dtype)  # [n, 3, S, S]
            chunks.append(_pooled(self.model.get_image_features(pixel_values=pixel_values)).float())
        return _l2_normalize(torch.cat(chunks))  # [N, D]

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature, exponentiated (100 for OpenAI CLIP)."""
        return float(self.model.logit_scale.detach().float().exp())

    # ---- scoring ----------------------------------------------------------------------------

    def prompt_cosines(self, images: Sequence[Image.Image], prompt: str) -> tuple[torch.Tensor, bool]:
        """Cosine of each image with ``prompt`` (encoded once), on the CPU, and whether the prompt was cut
        to CLIP's 77 positions; ValueError unless ``prompt`` is a string."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        image_feats = self.image_features(images)  # [N, D]
        text_feats, truncated = self.text_features([prompt])  # [1, D]
        return (image_feats @ text_feats[0]).cpu(), truncated[0]  # [N]

    def score(self, images: Sequence[Image.Image], prompt: str) -> ScoreResult:
        """CLIP score of each image against ``prompt``; the prompt is encoded once."""
        cosines, truncated = self.prompt_cosines(images, prompt)  # [N]
        scores = torch.clamp(100.0 * cosines, min=0.0)
        return ScoreResult(
            prompt=prompt,
            scores=tuple(float(s) for s in scores),
            cosines=tuple(float(c) for c in cosines),
            truncated=truncated,
            reranker=self.name,
        )

    def rank(self, images: Sequence[Image.Image], prompt: str) -> tuple[list[int], ScoreResult]:
        """Best-of-N: (indices best first, scores in input order)."""
        result = self.score(images, prompt)
        return result.order(), result

    def zero_shot(self, image: Image.Image, texts: Sequence[str]) -> list[ZeroShotRow]:
        """Rank texts for one image: cosine, logit = logit_scale.exp() * cos, softmax; best first."""
        texts = check_texts(texts)
        image_feats = self.image_features([image])  # [1, D]
        text_feats, truncated = self.text_features(texts)  # [T, D]
        cosines = (text_feats @ image_feats[0]).cpu().double()  # [T]
        logits = self.logit_scale * cosines
        probs = torch.softmax(logits, dim=0)
        rows = [
            ZeroShotRow(text, float(c), float(lg), float(p), trunc)
            for text, c, lg, p, trunc in zip(texts, cosines, logits, probs, truncated, strict=True)
        ]
        return sorted(rows, key=lambda r: -r.probability)

    def _token_counts(self, texts: list[str]) -> list[int]:
        """Untruncated token counts, bos/eos included."""
        ids = self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        return [len(x) for x in ids]


# ---- folders --------------------------------------------------------------------------------


def resolve_clip_folder(spec: str | Path, cache_dir: str | Path | None = None) -> Path:
    """``"embedded"`` -> the packaged CLIP; a folder -> itself; ``org/name`` -> local HF cache."""
    if str(spec) == "embedded":
        if not (EMBEDDED_CLIP / "config.json").is_file():
            raise FileNotFoundError(
                f"the embedded CLIP model is not built yet (expected {EMBEDDED_CLIP}); "
                "pass a local CLIP folder instead"
            )
        return EMBEDDED_CLIP
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"reranker {str(spec)!r} is a file, expected a CLIP model folder")
    if isinstance(spec, str) and _REPO_ID.match(spec):
        from pipelines.models.loading import cached_repo

        return cached_repo(spec, cache_dir=cache_dir)
    raise FileNotFoundError(f"reranker folder not found: {spec}")


def text_tower_key(key: str) -> str:
    """A text-encoder weight name as CLIPModel spells it (transformers 5 may drop ``text_model.``)."""
    return key if key.startswith(TEXT_TOWER_PREFIX) else TEXT_TOWER_PREFIX + key


def load_clip_model(folder: Path) -> Any:
    """A transformers ``CLIPModel`` from a safetensors folder, its text tower from ``../text_encoder`` if shared.

    The embedded model stores its CLIP token embedding once: the same weights are Stable Diffusion's
    text encoder (``shapes-tiny/text_encoder``, keys ``text_model.*``), so ``shapes-tiny/clip`` holds
    the vision tower, both projections, the logit scale and only those text-tower weights the
    reranker's own fine-tune changed (the 40 MB budget has no room for a copy of the rest).
    A folder whose weights include the token embedding loads as it is.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers.models.clip.configuration_clip import CLIPConfig
    from transformers.models.clip.modeling_clip import CLIPModel

    weights = folder / "model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), "pt") as handle:
            shares_text_tower = TOKEN_EMBEDDING_KEY not in handle.keys()
    if not weights.is_file() or not shares_text_tower:  # sharded or whole: transformers' own loader
        return CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    shared = folder.parent / "text_encoder" / "model.safetensors"
    if not shared.is_file():
        raise ValueError(f"{weights} has no text tower ({TOKEN_EMBEDDING_KEY}) and there is no {shared} to share")
    state = {text_tower_key(key): tensor for key, tensor in load_file(str(shared)).items()}
    state.update(load_file(str(weights)))  # the reranker's own text layers, where it has them, win
    # transformers' own loader builds the model on the meta device and takes these tensors as they are,
    # instead of initialising every weight at random and then copying over it.
    model, info = CLIPModel.from_pretrained(
        None, config=CLIPConfig.from_pretrained(folder, local_files_only=True), state_dict=state,
        output_loading_info=True,
    )
    problems = {kind: sorted(keys) for kind, keys in info.items() if keys and kind != "error_msgs"}
    if problems or info.get("error_msgs"):  # every key present, none left random, none unused
        raise ValueError(f"{weights} + {shared} do not match the CLIP config: {problems or info['error_msgs']}")
    return model


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )


def tokenizer_folder(folder: Path) -> Path:
    """Where a CLIP folder's tokenizer lives: itself, or the ``tokenizer/`` beside it.

    The embedded model ships its CLIP tokenizer once, in ``shapes-tiny/tokenizer``, shared by the
    text encoder and the reranker in ``shapes-tiny/clip`` (the 40 MB budget has no room for a copy).
    """
    sibling = folder.parent / "tokenizer"
    return sibling if not _has_tokenizer(folder) and _has_tokenizer(sibling) else folder


def check_clip_folder(folder: Path, tokenizer_dir: Path | None = None, processor_dir: Path | None = None) -> None:
    """Raise ValueError naming ``folder`` unless it is a safetensors transformers CLIPModel (with its tokenizer
    in ``tokenizer_dir`` and image processor settings in ``processor_dir``, both ``folder`` by default)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} is not a CLIP model folder: no config.json")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{folder} is not a CLIP model folder: config.json is not a JSON object") from err
    if model_type != "clip":
        raise ValueError(
            f"{folder} is not a CLIP model: config.json has model_type={model_type!r}, expected 'clip'"
        )
    names = {p.name for p in folder.iterdir()}
    if not any(n.endswith(".safetensors") for n in names):
        pickled = sorted(n for n in names if n.endswith(tuple(PICKLE_SUFFIXES)))
        if pickled:
            raise ValueError(
                f"{folder} has only pickled weights ({', '.join(pickled)}); they are refused because "
                "unpickling can run code. Convert them to model.safetensors"
            )
        raise ValueError(f"{folder} has no model.safetensors")
    processor_dir = processor_dir or folder
    if not (processor_dir / "preprocessor_config.json").is_file():
        raise ValueError(f"{processor_dir} has no preprocessor_config.json (the CLIP image processor settings)")
    if not _has_tokenizer(tokenizer_dir or folder):
        raise ValueError(f"{processor_dir} has no CLIP tokenizer (tokenizer.json or vocab.json + merges.txt)")


def clip_display_name(folder: Path, spec: str | Path) -> str:
    """Short model name for metadata: repo id for HF cache snapshots, else the folder name."""
    if str(spec) == "embedded":
        return "shapes-tiny-clip"
    parts = folder.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--") :].replace("--", "/")
    return folder.resolve().name


# ---- inputs ---------------------------------------------------------------------------------


def load_image_file(path: str | Path, convert: bool = False) -> Image.Image:
    """Open an image file as RGB for scoring.

    Unreadable or non-image files raise ValueError naming the file. Images with an alpha channel
    or in grayscale raise ValueError unless ``convert=True``, which composites alpha over white
    and replicates gray into RGB (explicit, never silent). Palette images without transparency
    are decoded to RGB (lossless).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path} is not a readable image file ({err})") from err
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode == "RGB":
        return image
    if not convert:
        raise ValueError(f"{path}: {_mode_problem(image.mode)}; pass convert=True to convert it explicitly")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def check_images(images: Sequence[Image.Image]) -> list[Image.Image]:
    """Validate a non-empty list of RGB PIL images; ValueError names the offending index."""
    if isinstance(images, Image.Image):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("images must contain at least one image, got none")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"images[{i}] must be a PIL.Image.Image, got {type(image).__name__}")
        if image.mode != "RGB":
            source = getattr(image, "filename", "") or ""
            where = f"images[{i}]" + (f" ({source})" if source else "")
            raise ValueError(f"{where}: {_mode_problem(image.mode)}; convert it to RGB first")
        if min(image.size) < 1:
            raise ValueError(f"images[{i}] is empty (size {image.size})")
    return images


def check_texts(texts: Sequence[str]) -> list[str]:
    """Validate a non-empty list of strings (a bare string is one text)."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("texts must contain at least one text, got none")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] must be a string, got {type(text).__name__}")
    return texts


def _mode_problem(mode: str) -> str:
    if mode in _ALPHA_MODES:
        return f"image has an alpha channel (mode {mode!r}); CLIP scores RGB images"
    if mode in _GRAY_MODES:
        return f"image is grayscale (mode {mode!r}); CLIP scores RGB images"
    return f"image has mode {mode!r}; CLIP scores RGB images"


# ---- helpers --------------------------------------------------------------------------------


def image_processor_class() -> Any:
    """transformers >= 5 has a PIL backend (no torchvision); 4.x's CLIPImageProcessor is PIL/numpy."""
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def _pooled(out: Any) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4.x) or an output with pooler_output (5.x)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True).clamp_min(1e-12)  # [.., D] unit vectors
