"""Scoring throughput of ClipScorer vs torchmetrics' CLIPScore on the same model and images.

    python scripts/bench_rerank.py                       # tiny random CLIP built in a temp dir
    python scripts/bench_rerank.py --size base32         # openai/clip-vit-base-patch32 config, random
    python scripts/bench_rerank.py --model DIR           # any local CLIP folder

Reranking needs one score per image. torchmetrics' CLIPScore returns the mean over what it was
given, so per-image scores take one update per image (text re-encoded each time); ClipScorer
encodes the prompt once and the images in batches. A third row times torchmetrics on all 64 images
in one call (mean only, not usable for ranking) as the floor of its cost. Methods run alternately
after a warm-up; the table gives the median wall time and process CPU time of the repeats (CPU
time is steadier on a shared machine; with ``--threads 1`` it is the fairer column) and each
method's time over ClipScorer's ("x"). With a random model folder the timings reflect that model's
size only (weights do not change the cost).

"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.rerank.random_clip import CLIP_SIZES, build_random_clip_folder
from pipelines.rerank.torchmetrics_reference import to_uint8_chw, torchmetrics_clip_score

PROMPT = "a red circle on a blue background"

def random_images(n: int, size: int = 512, seed: int = 0) -> list[Image.Image]:
    """n RGB images of smooth random colour blobs (SD output size by default)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))
    return images


@dataclass(frozen=True)
class BenchRow:
    method: str
    seconds: float  # median wall time over repeats, for all images
    images_per_s: float  # from the wall time
    cpu_seconds: float  # median process CPU time: steadier than wall time on a shared machine
    per_image_scores: bool


def run_benchmark(folder: str | Path, n_images: int = 64, repeats: int = 3) -> list[BenchRow]:
    """Time the three methods alternately (``repeats`` rounds after one warm-up round)."""
    from pipelines.rerank.clip_scorer import ClipScorer

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
    """Command line: ``python scripts/bench_rerank.py [--model DIR] [--size tiny|base32]``."""
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
