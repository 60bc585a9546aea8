"""Early x0 predictions of the embedded model, each with how its finished image turned out.

    python -m pipelines.training.preview_outcomes --out runs/preview-outcomes [--pairs 256] [--at 1,2,3,4]
        [--threads 2]                                     # training data: new prompts, new seeds
    python -m pipelines.training.preview_outcomes --evaluation --pairs 192 --out runs/preview-outcomes-eval
                                                          # the early-pruning evaluation's pairs, x0 only

Per prompt x seed pair, ``--candidates`` images are generated as one batch with the app's default pipeline
and sampler (as :mod:`pipelines.training.evaluate_pruning` does); the scheduler's predicted clean latents
after each step K of ``--at`` are kept (fp16, [K, C, h, w] per candidate), and the finished image, reduced
to the side the shapes oracle judges at, is kept beside them. These are the data the preview scorer
(:mod:`pipelines.training.clip_previews`) learns from: what an early x0 looks like when its finished image
is right, and when it ends with two shapes or a mottled one.

Training pairs use prompts ``shapes.dataset(TRAINING_PROMPT_SEED, pairs)`` and seeds
``TRAINING_SEED_BASE + 1000 k + c``: neither the evaluation's prompt list nor its seeds (``1000 k + c``).
With ``--evaluation`` the pairs are the evaluation's own (same prompts and seeds), only the first
``max(--at)`` steps are run, and no finished image is stored: those come from the evaluation's log.

Written in shards of ``--shard`` pairs (``shard-00000.npz`` ...), atomically; a rerun skips the shards
that exist, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.training import common, shapes
from pipelines.training.evaluate import PROMPT_SEED
from pipelines.training.export import DEFAULT_OUT

TRAINING_PROMPT_SEED = PROMPT_SEED + 7_919  # not the evaluation's prompt list
TRAINING_SEED_BASE = 50_000_000  # candidate seeds of training pair k: TRAINING_SEED_BASE + 1000 k + c
FINISHED_SIDE = 128  # the side the shapes oracle judges at (shapes.judge reduces 512 px images to it)


def pair_seed(index: int, evaluation: bool) -> int:
    """First candidate seed of pair ``index`` (the others follow it)."""
    return 1000 * index + (0 if evaluation else TRAINING_SEED_BASE)


def pair_attributes(pairs: int, evaluation: bool) -> list[shapes.ShapeAttributes]:
    """The prompts' attributes, pair by pair."""
    return shapes.dataset(PROMPT_SEED if evaluation else TRAINING_PROMPT_SEED, pairs)


def generate_pair(pipe: Any, attrs: shapes.ShapeAttributes, index: int, *, candidates: int, steps: int,
                  cfg: float, at: list[int], evaluation: bool) -> dict[str, Any]:
    """One pair: ``clean`` [N, len(at), C, h, w] fp16 and, unless ``evaluation``, ``finished``
    [N, S, S, 3] uint8 (the images at the oracle's side)."""
    from PIL import Image

    from pipelines.generation.request import GenerationRequest

    request = GenerationRequest(prompt=shapes.caption(attrs), steps=steps, cfg_scale=cfg,
                                seed=pair_seed(index, evaluation), n=candidates)
    clean = []
    with pipe.generating():
        run, _ = pipe.start(request, track_clean=True)
        for k in at:
            run.run(k)
            clean.append(run.clean.float().cpu().numpy().astype(np.float16))  # [N, C, h, w]
        record: dict[str, Any] = {"clean": np.stack(clean, axis=1)}  # [N, K, C, h, w]
        if not evaluation:
            images = pipe.decode(run.run())
            record["finished"] = np.stack([np.asarray(image.resize((FINISHED_SIDE, FINISHED_SIDE),
                                                                   Image.Resampling.BOX)) for image in images])
    return record


def write_shard(path: Path, records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Stack the pairs' arrays into one npz, written under a temporary name and renamed."""
    arrays = {key: np.stack([r[key] for r in records]) for key in records[0]}  # [P, N, ...]
    common.save_npz(path, meta=np.array(json.dumps(meta)), **arrays)


def read_shards(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All shards of ``folder`` concatenated along the pair axis, and the first shard's settings."""
    shards = sorted(folder.glob("shard-*[0-9].npz"))
    if not shards:
        raise FileNotFoundError(f"no shard-*.npz in {folder}: run python -m pipelines.training.preview_outcomes")
    parts = [dict(np.load(shard)) for shard in shards]
    meta = json.loads(str(parts[0].pop("meta")))
    for part in parts[1:]:
        part.pop("meta")
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}, meta


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_OUT, help="diffusers folder of the embedded model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--at", default="1,2,3,4", help="steps K after which x0 is kept")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--shard", type=int, default=16, help="pairs per file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--evaluation", action="store_true",
                        help="the early-pruning evaluation's pairs, x0 only (no finishing)")
    args = parser.parse_args(argv)
    at = sorted({int(k) for k in args.at.split(",") if k})
    if not at or at[0] < 1 or at[-1] >= args.steps:
        raise SystemExit(f"--at: steps between 1 and {args.steps - 1}, got {args.at!r}")
    import torch
    from tqdm import tqdm

    from pipelines.models.loading import load_pipeline

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": str(args.model), "candidates": args.candidates, "at": at, "steps": args.steps,
            "cfg": args.cfg, "evaluation": args.evaluation, "shard": args.shard,
            "prompt_seed": PROMPT_SEED if args.evaluation else TRAINING_PROMPT_SEED}
    attrs = pair_attributes(args.pairs, args.evaluation)
    pipe = load_pipeline(args.model, device="cpu")  # the app's default (fast) path
    for first in tqdm(range(0, args.pairs, args.shard), desc="shards"):
        path = args.out / f"shard-{first // args.shard:05d}.npz"
        if path.exists():
            continue
        indices = range(first, min(first + args.shard, args.pairs))
        records = [generate_pair(pipe, attrs[i], i, candidates=args.candidates, steps=args.steps, cfg=args.cfg,
                                 at=at, evaluation=args.evaluation) for i in indices]
        for record, i in zip(records, indices, strict=True):
            record["pair"] = np.array(i)
        write_shard(path, records, meta)


if __name__ == "__main__":
    main()
