"""Evaluate the embedded model and print one table.

    python -m pipelines.training.evaluate [--model pipelines/embedded/shapes-tiny] [--pairs 48]
        [--modes fast,diffusers,deepcache3,cfg-cutoff]

Rows: tiny-CLIP zero-shot accuracy (image -> correct caption among all 120) on held-out 512x512
drawings through the shipped reranker (:class:`pipelines.rerank.clip_scorer.ClipScorer`); then, per pipeline mode
(those of :mod:`pipelines.models.modes`), generation fidelity judged by the pixel oracle
(:func:`pipelines.training.shapes.judge`: one shape, of the named kind and colour, one colour inside, on the
named background) over prompt x seed pairs at 20 steps and CFG 7, for the first
candidate and for the best of 4 by CLIP score (Radford et al. 2021), and seconds per 512x512 image.
Candidate ``c`` of pair ``k`` uses seed ``1000 k + c`` in every mode, so modes see the same noise.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipelines.rerank.clip_scorer import ClipScorer
from pipelines.training import data, shapes
from pipelines.training.export import DEFAULT_OUT

PROMPT_SEED = 2024  # prompts of the evaluation: shapes.dataset(PROMPT_SEED, pairs)
ATTRIBUTES = ("all", "shape", "shape_colour", "background")  # what zero-shot can tell apart
CHECKS = ("all", "count", "binding", "shape", "shape_colour", "background")  # the oracle's checks


@dataclass(frozen=True)
class ModeResult:
    """Oracle fidelity of one pipeline mode: first candidate, best of N, and seconds per image."""

    mode: str
    single: dict[str, float]
    best: dict[str, float]
    seconds_per_image: float


def zero_shot(scorer: ClipScorer, n: int) -> dict[str, float]:
    """Accuracy over all captions on n held-out 512x512 drawings, overall and per attribute."""
    captions = shapes.all_captions()
    text, _ = scorer.text_features(captions)  # (C, D)
    attrs = shapes.dataset(data.HELDOUT_SEED, n)
    hits: dict[str, list[bool]] = {key: [] for key in ATTRIBUTES}
    for start in range(0, n, 50):
        chunk = attrs[start : start + 50]
        pred = (scorer.image_features([shapes.draw(a) for a in chunk]) @ text.T).argmax(1)  # (b,)
        for a, p in zip(chunk, pred):
            guess = shapes.parse_caption(captions[int(p)])
            hits["all"].append(captions[int(p)] == shapes.caption(a))
            for key in ATTRIBUTES[1:]:
                hits[key].append(getattr(guess, key) == getattr(a, key))
    return {k: float(np.mean(v)) for k, v in hits.items()}


def composition(scorer: ClipScorer, n: int) -> dict[str, float]:
    """Two-way choices on n held-out drawings and their hard negatives (:mod:`hard_negatives`): count
    ("a red circle" vs "two red circles", on one- and two-shape drawings), binding ("a red circle on a
    blue background" vs "a blue circle on a red background") and a second colour inside ("a red circle"
    vs "a red and yellow circle", on plain and mixed drawings)."""
    from pipelines.training import hard_negatives

    rng = np.random.default_rng(data.HELDOUT_SEED)
    hits: dict[str, list[bool]] = {key: [] for key in hard_negatives.CHOICES}
    for images, captions in hard_negatives.choice_cases(rng, n):
        texts, _ = scorer.text_features(captions)  # (4, D)
        sims = (scorer.image_features(images) @ texts.T).numpy()  # (3, 4)
        for key, right in hard_negatives.two_way_hits(sims).items():
            hits[key] += right
    return {key: float(np.mean(value)) for key, value in hits.items()}


def generation(folder: Path, scorer: ClipScorer, mode_keys: list[str], pairs: int, candidates: int,
               steps: int, cfg: float, size: int = 512) -> list[ModeResult]:
    """Per mode: fidelity of candidate 0, of the best of ``candidates`` by CLIP score, seconds per image."""
    from pipelines.generation.request import GenerationRequest
    from pipelines.generation.schedulers import sampler_for_config
    from pipelines.models.modes import Runner, modes_by_key
    from pipelines.models.shipped import read_scheduler_config

    modes = modes_by_key(mode_keys)
    runner = Runner(folder, "cpu", modes)
    sampler = sampler_for_config(read_scheduler_config(folder))
    prompts = shapes.dataset(PROMPT_SEED, pairs)  # distinct prompt x seed pairs
    results = []
    for mode in modes:
        first, best, seconds = [], [], []
        for k, attrs in enumerate(tqdm(prompts, desc=mode.name, unit="prompt", mininterval=10)):
            prompt = shapes.caption(attrs)
            images = []
            for c in range(candidates):
                request = GenerationRequest(prompt=prompt, steps=steps, cfg_scale=cfg, seed=1000 * k + c,
                                            sampler=sampler, width=size, height=size)
                image, spent, _, _ = runner.run(mode, request)
                images.append(image)
                seconds.append(spent)
            verdicts = [shapes.judge(image, attrs) for image in images]
            first.append(verdicts[0])
            best.append(verdicts[scorer.score(images, prompt).order()[0]])
        results.append(ModeResult(mode.name, shapes.fidelity(first), shapes.fidelity(best), float(np.median(seconds))))
    return results


def format_table(zs: dict[str, float], n_zero_shot: int, results: list[ModeResult], pairs: int,
                 candidates: int, steps: int, cfg: float, threads: int,
                 choices: dict[str, float] | None = None) -> str:
    """One markdown table: zero-shot, then per mode single / best-of-N fidelity and s/image."""
    def cells(r: dict[str, float]) -> str:
        return " | ".join(f"{r[k]:.1%}" if k in r else "" for k in CHECKS)

    lines = ["| metric | all right | one shape | one colour inside | shape | shape colour | background | s/image "
             "| target |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|",
             f"| tiny-CLIP zero-shot ({n_zero_shot} held-out, 120 captions) | {cells(zs)} | | >= 95% |"]
    wording = {"count": 'one vs two ("a red circle" / "two red circles")',
               "binding": 'swapped colours ("a red circle on blue" / "a blue circle on red")',
               "mixed": 'a second colour inside ("a red circle" / "a red and yellow circle")'}
    for key, value in (choices or {}).items():
        lines.append(f"| tiny-CLIP two-way choice, {wording[key]} ({n_zero_shot} held-out) | {value:.1%} "
                     "| | | | | | | >= 95% |")
    for r in results:
        lines.append(f"| {r.mode}: 1 sample ({pairs} prompt x seed, {steps} steps, CFG {cfg:g}) | "
                     f"{cells(r.single)} | {r.seconds_per_image:.2f} | >= 70%, <= 10 s |")
        lines.append(f"| {r.mode}: best of {candidates} by CLIP score | {cells(r.best)} | | >= 90% |")
    lines.append(f"\n512x512, batch 1, {threads} CPU threads; s/image is the median over all generations.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_OUT, help="diffusers folder with clip/")
    parser.add_argument("--modes", default="fast", help="comma-separated pipeline modes (pipelines.models.modes)")
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--n-zero-shot", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    scorer = ClipScorer.load(args.model / "clip", device="cpu")
    zs = zero_shot(scorer, args.n_zero_shot)
    choices = composition(scorer, args.n_zero_shot)
    mode_keys = [key for key in args.modes.split(",") if key]  # --modes "": the reranker's rows only
    results = generation(args.model, scorer, mode_keys, args.pairs, args.candidates, args.steps,
                         args.cfg) if mode_keys else []
    print(format_table(zs, args.n_zero_shot, results, args.pairs, args.candidates, args.steps, args.cfg,
                       torch.get_num_threads(), choices))
    print(f"evaluation took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
