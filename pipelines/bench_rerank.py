"""Scoring throughput of ClipScorer vs torchmetrics' CLIPScore on the same model and images.

    python -m pipelines.bench_rerank                       # tiny random CLIP built in a temp dir
    python -m pipelines.bench_rerank --size base32         # openai/clip-vit-base-patch32 config, random
    python -m pipelines.bench_rerank --model DIR           # any local CLIP folder

Reranking needs one score per image. torchmetrics' CLIPScore returns the mean over what it was
given, so per-image scores take one update per image (text re-encoded each time); ClipScorer
encodes the prompt once and the images in batches. A third row times torchmetrics on all 64 images
in one call (mean only, not usable for ranking) as the floor of its cost. Methods run alternately
after a warm-up; the table gives the median wall time and process CPU time of the repeats (CPU
time is steadier on a shared machine; with ``--threads 1`` it is the fairer column) and each
method's time over ClipScorer's ("x"). With a random model folder the timings reflect that model's
size only (weights do not change the cost).

Also home of two helpers shared with the tests: ``build_random_clip_folder`` (a CLIPModel folder
with random weights in the layout of openai/clip-vit-*) and ``torchmetrics_clip_score``.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

TOKENIZER_DIR = Path(__file__).resolve().parent / "configs" / "clip-tokenizer"
PROMPT = "a red circle on a blue background"

# Text / vision settings per size. "base32" is openai/clip-vit-base-patch32's config.json.
CLIP_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        "vision": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        ),
        "projection_dim": 16,
    },
    "base32": {
        "text": dict(
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=8,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),  # openai's legacy ids: argmax pooling
        "vision": dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=32,
        ),
        "projection_dim": 512,
    },
}


def build_random_clip_folder(
    folder: str | Path, size: str = "tiny", legacy_preprocessor: bool = False, seed: int = 0
) -> Path:
    """Write a random-weight CLIPModel folder (config.json, model.safetensors, image processor,
    the real CLIP BPE tokenizer) in the layout of openai/clip-vit-base-patch32.

    ``legacy_preprocessor`` writes preprocessor_config.json the way openai's repos have it
    (``feature_extractor_type``, integer ``size``/``crop_size``).
    """
    import json

    from transformers import CLIPConfig, CLIPModel

    spec = CLIP_SIZES[size]
    text = dict(
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=spec["projection_dim"],
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    text.update(spec["text"])
    vision = dict(projection_dim=spec["projection_dim"], **spec["vision"])
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec["projection_dim"])
    torch.manual_seed(seed)
    folder = Path(folder)
    CLIPModel(config).eval().save_pretrained(folder, safe_serialization=True)
    side = spec["vision"]["image_size"]
    preprocessor = {
        "do_resize": True,
        "do_center_crop": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_convert_rgb": True,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    if legacy_preprocessor:
        preprocessor.update(feature_extractor_type="CLIPFeatureExtractor", size=side, crop_size=side)
    else:
        preprocessor.update(
            image_processor_type="CLIPImageProcessor",
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
        )
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    for file in TOKENIZER_DIR.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


def torchmetrics_clip_score(folder: str | Path) -> Any:
    """``torchmetrics.multimodal.CLIPScore`` on a local folder, loaded as torchmetrics loads
    ``openai/*`` names (CLIPModel + CLIPProcessor.from_pretrained).

    torchmetrics 1.9 expects get_*_features to return tensors; transformers >= 5 returns an output
    object (Lightning-AI/torchmetrics#3407), so the projected ``pooler_output`` is unwrapped here.
    Nothing else of torchmetrics' computation is changed.
    """
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    def model_and_processor() -> tuple[Any, Any]:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
        for method in ("get_text_features", "get_image_features"):
            model.__dict__[method] = _returning_tensor(getattr(model, method))
        return model, CLIPProcessor.from_pretrained(folder, local_files_only=True)

    return CLIPScore(model_name_or_path=model_and_processor)


def _returning_tensor(fn: Callable[..., Any]) -> Callable[..., torch.Tensor]:
    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = fn(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    return wrapped


def random_images(n: int, size: int = 512, seed: int = 0) -> list[Image.Image]:
    """n RGB images of smooth random colour blobs (SD output size by default)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))
    return images


def to_uint8_chw(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 tensor [3, H, W], the input torchmetrics takes."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class BenchRow:
    method: str
    seconds: float  # median wall time over repeats, for all images
    images_per_s: float  # from the wall time
    cpu_seconds: float  # median process CPU time: steadier than wall time on a shared machine
    per_image_scores: bool


def run_benchmark(folder: str | Path, n_images: int = 64, repeats: int = 3) -> list[BenchRow]:
    """Time the three methods alternately (``repeats`` rounds after one warm-up round)."""
    from pipelines.rerank import ClipScorer

    scorer = ClipScorer.load(folder, device="cpu")
    metric = torchmetrics_clip_score(folder)
    images = random_images(n_images)
    tensors = [to_uint8_chw(im) for im in images]  # torchmetrics wants tensors; converted untimed
    batch = torch.stack(tensors)  # [N, 3, H, W] uint8

    def ours() -> None:
        scorer.score(images, PROMPT)

    def tm_per_image() -> None:
        for tensor in tensors:
            metric.reset()
            metric.update(tensor, PROMPT)
            metric.compute()

    def tm_one_batch() -> None:
        metric.reset()
        metric.update(batch, [PROMPT] * len(batch))
        metric.compute()

    methods = {
        "ClipScorer.score (batched, prompt once)": (ours, True),
        "torchmetrics CLIPScore, one update per image": (tm_per_image, True),
        "torchmetrics CLIPScore, one batch (mean only)": (tm_one_batch, False),
    }
    wall: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(repeats + 1):
        names = list(methods)
        names = names[round_ % len(names) :] + names[: round_ % len(names)]  # rotate the order
        for name in names:
            start, start_cpu = time.perf_counter(), time.process_time()
            methods[name][0]()
            if round_ > 0:  # round 0 is the warm-up
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    rows = []
    for name, (_, per_image) in methods.items():
        seconds = statistics.median(wall[name])
        rows.append(BenchRow(name, seconds, n_images / seconds, statistics.median(cpu[name]), per_image))
    return rows


def format_table(rows: Sequence[BenchRow]) -> str:
    """Rows side by side; "x" = method time / ClipScorer time (how many times faster ours is)."""
    wall, cpu = rows[0].seconds, rows[0].cpu_seconds
    header = f"{'method':46s} {'wall s':>7s} {'images/s':>8s} {'x wall':>6s} {'cpu s':>7s} {'x cpu':>6s}"
    lines = [header]
    for row in rows:
        lines.append(
            f"{row.method:46s} {row.seconds:7.3f} {row.images_per_s:8.1f} {row.seconds / wall:6.2f} "
            f"{row.cpu_seconds:7.3f} {row.cpu_seconds / cpu:6.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m pipelines.bench_rerank [--model DIR] [--size tiny|base32]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local CLIP folder (default: random weights built in a temp dir)")
    parser.add_argument("--size", choices=sorted(CLIP_SIZES), default="tiny", help="size of the random CLIP")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            folder, label = Path(args.model), args.model
        else:
            folder = build_random_clip_folder(Path(tmp) / f"clip-{args.size}", size=args.size)
            label = f"random-weight CLIP, {args.size} config (timings reflect that size only)"
        rows = run_benchmark(folder, n_images=args.images, repeats=args.repeats)
    print(f"model: {label}")
    print(
        f"{args.images} images 512x512, prompt {PROMPT!r}, CPU threads {torch.get_num_threads()}, "
        f"median of {args.repeats} alternating rounds after a warm-up"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
