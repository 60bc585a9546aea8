"""Evaluate the embedded model and print one table.

    python -m pipelines.training.evaluate [--model pipelines/embedded/shapes-tiny] [--pairs 48]
        [--modes fast,diffusers,deepcache3,cfg-cutoff] [--rerankers clip,contrastive,mixed]
        [--candidates-dir runs/eval/candidates]   # generate once, rerank (or re-score) again later

Rows: tiny-CLIP zero-shot accuracy (image -> correct caption among all 120) on held-out 512x512
drawings through the shipped reranker (:class:`pipelines.rerank.clip_scorer.ClipScorer`); then, per pipeline mode
(those of :mod:`pipelines.models.modes`), generation fidelity judged by the pixel oracle
(:func:`pipelines.training.shapes.judge`: one shape, of the named kind and colour, one colour inside, on the
named background) over prompt x seed pairs at 20 steps and CFG 7, for the first
candidate and for the best of 4 by each reranker (CLIP score, Radford et al. 2021; contrastive captions),
how often some candidate is right, and seconds per 512x512 image.
Candidate ``c`` of pair ``k`` uses seed ``1000 k + c`` in every mode, so modes see the same noise.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipelines.rerank.clip_scorer import ClipScorer
from pipelines.rerank.contrastive import RERANK_MODES, reranker_for
from pipelines.training import data, shapes
from pipelines.training.export import DEFAULT_OUT

PROMPT_SEED = 2024  # prompts of the evaluation: shapes.dataset(PROMPT_SEED, pairs)
ATTRIBUTES = ("all", "shape", "shape_colour", "background")  # what zero-shot can tell apart
CHECKS = ("all", "count", "binding", "shape", "shape_colour", "background")  # the oracle's checks


@dataclass(frozen=True)
class ModeResult:
    """Oracle fidelity of one pipeline mode: first candidate, best of N per reranker, seconds per image.

    ``any_right``: fraction of pairs where at least one candidate is all right (what a perfect reranker
    reaches); ``pick_rate[r]``: among those pairs, how often reranker ``r`` puts a right one first.
    """

    mode: str
    single: dict[str, float]
    best: dict[str, dict[str, float]]  # reranker name -> fidelity of its first pick
    any_right: float
    pick_rate: dict[str, float]
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


class CandidateCache:
    """Generated candidates as PNGs under ``folder/<mode>/<pair>-<candidate>.png``, so that rerankers can be
    compared (or a new CLIP scored) on the same pictures without generating them again. A manifest holds
    the settings; a folder made with other settings is refused rather than mixed in. The pair count is not
    one of them: pair k is the same prompt and seeds in a run of any length (``shapes.dataset`` draws the
    prompts in order), so a longer run reuses a shorter one's candidates."""

    def __init__(self, folder: Path | None, settings: dict) -> None:
        settings = {k: v for k, v in settings.items() if k != "pairs"}
        self.folder, self.settings = folder, settings
        if folder is None:
            return
        manifest = folder / "manifest.json"
        stored = json.loads(manifest.read_text()) if manifest.is_file() else dict(settings)
        stored.pop("pairs", None)  # written by earlier versions
        if stored != settings:
            raise SystemExit(f"{folder} holds candidates made with {manifest.read_text().strip()}, not {settings}: "
                             "choose another --candidates-dir")
        folder.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps(settings, sort_keys=True) + "\n")

    def path(self, mode: str, pair: int, candidate: int) -> Path | None:
        return None if self.folder is None else self.folder / mode / f"{pair:03d}-{candidate}.png"

    def get(self, mode: str, pair: int, candidate: int) -> Image.Image | None:
        path = self.path(mode, pair, candidate)
        if path is None or not path.is_file():
            return None
        with Image.open(path) as image:
            return image.convert("RGB")

    def put(self, mode: str, pair: int, candidate: int, image: Image.Image) -> None:
        path = self.path(mode, pair, candidate)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)


def generation(folder: Path, rerankers: dict[str, Any], mode_keys: list[str], pairs: int, candidates: int,
               steps: int, cfg: float, size: int = 512, cache_dir: Path | None = None) -> list[ModeResult]:
    """Per mode: fidelity of candidate 0, of the best of ``candidates`` by each reranker (name -> scorer
    with ``score(images, prompt).order()``), and seconds per generated image (NaN when all were cached)."""
    from pipelines.generation.request import GenerationRequest
    from pipelines.generation.schedulers import sampler_for_config
    from pipelines.models.modes import Runner, modes_by_key
    from pipelines.models.shipped import read_scheduler_config

    modes = modes_by_key(mode_keys)
    runner = Runner(folder, "cpu", modes)
    sampler = sampler_for_config(read_scheduler_config(folder))
    cache = CandidateCache(cache_dir, {"model": str(folder), "pairs": pairs, "candidates": candidates,
                                       "steps": steps, "cfg": cfg, "size": size, "sampler": sampler})
    prompts = shapes.dataset(PROMPT_SEED, pairs)  # distinct prompt x seed pairs
    results = []
    for key, mode in zip(mode_keys, modes):
        first, any_right, seconds = [], [], []
        best: dict[str, list[shapes.Verdict]] = {name: [] for name in rerankers}
        picked_right: dict[str, list[bool]] = {name: [] for name in rerankers}
        for k, attrs in enumerate(tqdm(prompts, desc=mode.name, unit="prompt", mininterval=10)):
            prompt = shapes.caption(attrs)
            images = []
            for c in range(candidates):
                image = cache.get(key, k, c)
                if image is None:
                    request = GenerationRequest(prompt=prompt, steps=steps, cfg_scale=cfg, seed=1000 * k + c,
                                                sampler=sampler, width=size, height=size)
                    image, spent, _, _ = runner.run(mode, request)
                    cache.put(key, k, c, image)
                    seconds.append(spent)
                images.append(image)
            verdicts = [shapes.judge(image, attrs) for image in images]
            first.append(verdicts[0])
            some_right = any(v.all_ok for v in verdicts)
            any_right.append(some_right)
            for name, reranker in rerankers.items():
                pick = verdicts[reranker.score(images, prompt).order()[0]]
                best[name].append(pick)
                if some_right:
                    picked_right[name].append(pick.all_ok)
        results.append(ModeResult(
            mode.name, shapes.fidelity(first), {name: shapes.fidelity(v) for name, v in best.items()},
            float(np.mean(any_right)),
            {name: float(np.mean(v)) if v else float("nan") for name, v in picked_right.items()},
            float(np.median(seconds)) if seconds else float("nan")))
    return results


def format_table(zs: dict[str, float], n_zero_shot: int, results: list[ModeResult], pairs: int,
                 candidates: int, steps: int, cfg: float, threads: int,
                 choices: dict[str, float] | None = None) -> str:
    """One markdown table: zero-shot, then per mode single / best-of-N per reranker fidelity and s/image."""
    def cells(r: dict[str, float]) -> str:
        return " | ".join(f"{r[k]:.1%}" if k in r else "" for k in CHECKS)

    lines = ["| metric | all right | one shape | one colour inside | shape | shape colour | background | s/image "
             "| right pick where one is right | target |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
             f"| tiny-CLIP zero-shot ({n_zero_shot} held-out, 120 captions) | {cells(zs)} | | | >= 95% |"]
    wording = {"count": 'one vs two ("a red circle" / "two red circles")',
               "binding": 'swapped colours ("a red circle on blue" / "a blue circle on red")',
               "mixed": 'a second colour inside ("a red circle" / "a red and yellow circle")'}
    for key, value in (choices or {}).items():
        lines.append(f"| tiny-CLIP two-way choice, {wording[key]} ({n_zero_shot} held-out) | {value:.1%} "
                     "| | | | | | | | >= 95% |")
    for r in results:
        lines.append(f"| {r.mode}: 1 sample ({pairs} prompt x seed, {steps} steps, CFG {cfg:g}) | "
                     f"{cells(r.single)} | {r.seconds_per_image:.2f} | | >= 85% |")
        for name, fidelity in r.best.items():
            lines.append(f"| {r.mode}: best of {candidates} by {name} | {cells(fidelity)} | | "
                         f"{r.pick_rate[name]:.1%} | >= 95%, >= 95% |")
        lines.append(f"| {r.mode}: some candidate of {candidates} right (a perfect reranker) | {r.any_right:.1%} "
                     "| | | | | | | | |")
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
    parser.add_argument("--rerankers", default="clip,contrastive",
                        help=f"comma-separated rerank modes to compare ({', '.join(RERANK_MODES)})")
    parser.add_argument("--candidates-dir", type=Path, default=None,
                        help="keep generated candidates here as PNGs and reuse them on the next run (same settings)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    scorer = ClipScorer.load(args.model / "clip", device="cpu")
    zs = zero_shot(scorer, args.n_zero_shot)
    choices = composition(scorer, args.n_zero_shot)
    mode_keys = [key for key in args.modes.split(",") if key]  # --modes "": the reranker's rows only
    rerankers = {name: reranker_for(scorer, name) for name in args.rerankers.split(",") if name}
    results = generation(args.model, rerankers, mode_keys, args.pairs, args.candidates, args.steps,
                         args.cfg, cache_dir=args.candidates_dir) if mode_keys else []
    print(format_table(zs, args.n_zero_shot, results, args.pairs, args.candidates, args.steps, args.cfg,
                       torch.get_num_threads(), choices))
    print(f"evaluation took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
