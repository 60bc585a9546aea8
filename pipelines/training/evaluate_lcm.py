"""Judge an LCM-LoRA of the embedded model: few steps with the LoRA against the default 20 steps.

    python -m pipelines.training.evaluate_lcm --lora pipelines/embedded/loras/lcm-shapes.safetensors --pairs 48

Rows, over ``pairs`` prompt x seed pairs of the shapes evaluation (``pipelines.training.evaluate``: the
same prompts, candidate c of pair k uses seed 1000 k + c), all through the product's default CPU path
(library, ``<lora:NAME:1>`` tag, merging): the model's own sampler (DPM++ 2M) at 20 steps and CFG 7
without the LoRA, then each ``--few-step`` setting (sampler:steps, CFG 1) with it. For each: oracle
fidelity (:func:`pipelines.training.shapes.judge`) of candidate 0 and of the best of ``candidates`` by
CLIP score (one batched request of ``candidates`` images, as ``--n`` runs them), the median seconds of a
single image (a request of 1, on the first ``--timed`` pairs) and of a whole best-of-N request
(generation and scoring). ``--decoders Full,TAESD`` runs every row with each VAE decoder (the tiny
decoder of ``pipelines.models.tiny_decoder``). ``--baseline-from DIR`` takes the 20-step row's pictures
from a candidates folder of ``pipelines.training.evaluate`` (its ``--candidates-dir``: the same prompts and
seeds; mode ``fast`` for the Full decoder, ``taesd`` for TAESD) and generates only its ``--timed``
requests. Targets (issue 16): 4 steps >= 90% of the 20-step fidelity at <= 0.3 s per 512x512 image on
this 2-core CPU; best-of-4 at 4 steps beats single at 20 steps in fidelity and time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipelines.training import shapes
from pipelines.training.evaluate import PROMPT_SEED, CandidateCache

if TYPE_CHECKING:
    from pipelines.generation.text_to_image import TextToImagePipeline
    from pipelines.rerank.clip_scorer import ClipScorer

CHECKS = ("all", "count", "binding", "shape", "shape_colour", "background")
LORA_NAME = "lcm-eval"
CACHE_MODES = {"Full": "fast", "TAESD": "taesd"}  # request vae_decoder -> pipelines.training.evaluate mode key


@dataclass(frozen=True)
class Setting:
    label: str
    sampler: str
    steps: int
    cfg: float
    tag: str  # prepended to the prompt
    decoder: str = "Full"  # the request's vae_decoder


@dataclass(frozen=True)
class Row:
    setting: Setting
    single: dict[str, float]
    best: dict[str, float]
    seconds_single: float  # median over the timed single-image requests
    seconds_best: float  # median over the best-of-N requests, scoring included


def run_setting(pipe: TextToImagePipeline, scorer: ClipScorer, setting: Setting,
                prompts: list[shapes.ShapeAttributes], candidates: int, timed: int,
                cache: CandidateCache | None = None) -> Row:
    """One row; with ``cache`` (the baseline's pictures) only the first ``timed`` pairs' requests are generated."""
    from pipelines.generation.request import GenerationRequest

    first, best, single_s, best_s = [], [], [], []
    for k, attrs in enumerate(tqdm(prompts, desc=setting.label, mininterval=20)):
        prompt = shapes.caption(attrs)
        settings = dict(prompt=setting.tag + prompt, steps=setting.steps, cfg_scale=setting.cfg, seed=1000 * k,
                        sampler=setting.sampler, vae_decoder=setting.decoder)
        if k < timed:
            start = time.perf_counter()
            pipe(GenerationRequest(n=1, **settings))
            single_s.append(time.perf_counter() - start)
        if cache is None or k < timed:
            start = time.perf_counter()
            images = pipe(GenerationRequest(n=candidates, **settings)).images
            order = scorer.score(images, prompt).order()
            best_s.append(time.perf_counter() - start)
        if cache is not None:
            images = [cached_candidate(cache, setting.decoder, k, c) for c in range(candidates)]
            order = scorer.score(images, prompt).order()
        verdicts = [shapes.judge(image, attrs) for image in images]
        first.append(verdicts[0])
        best.append(verdicts[order[0]])
    return Row(setting, shapes.fidelity(first), shapes.fidelity(best), median(single_s), median(best_s))


def median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def baseline_cache(folder: Path, steps: int, cfg: float, sampler: str, candidates: int) -> CandidateCache:
    """The candidates folder of ``pipelines.training.evaluate`` holding the embedded model's 20-step pictures;
    SystemExit when it was made with other settings."""
    from pipelines.models.shipped import EMBEDDED_MODEL_DIR

    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise SystemExit(f"{folder} has no manifest.json: not a --candidates-dir of pipelines.training.evaluate")
    stored = json.loads(manifest.read_text())
    wanted = {"steps": steps, "cfg": cfg, "sampler": sampler, "size": 512}
    if (any(stored.get(key) != value for key, value in wanted.items()) or stored.get("candidates", 0) < candidates
            or Path(stored.get("model", "")).resolve() != EMBEDDED_MODEL_DIR.resolve()):
        raise SystemExit(f"{folder} holds candidates made with {json.dumps(stored)}; the baseline needs the embedded "
                         f"model with {json.dumps(wanted)} and at least {candidates} candidates")
    return CandidateCache(folder, stored)


def cached_candidate(cache: CandidateCache, decoder: str, pair: int, candidate: int) -> Image.Image:
    image = cache.get(CACHE_MODES[decoder], pair, candidate)
    if image is None:
        raise SystemExit(f"{cache.path(CACHE_MODES[decoder], pair, candidate)} is missing: run pipelines.training."
                         f"evaluate with at least {pair + 1} pairs and mode {CACHE_MODES[decoder]} into that folder")
    return image


def with_decoders(settings: list[Setting], decoders: list[str]) -> list[Setting]:
    """Each setting once per VAE decoder ("Full" keeps its label; others say so)."""
    return [replace(s, decoder=d, label=s.label if d == "Full" else f"{s.label}, {d} decoder")
            for s in settings for d in decoders]


def few_step_settings(spec: str) -> list[Setting]:
    """``"LCM:4,TCD:4:1.5"`` (sampler:steps[:CFG, default 1]) -> the few-step rows, each with the LoRA."""
    out = []
    for item in filter(None, spec.split(",")):
        sampler, steps, *cfg = item.split(":")
        scale = float(cfg[0]) if cfg else 1.0
        out.append(Setting(f"{sampler} {steps} steps + LCM-LoRA, CFG {scale:g}", sampler, int(steps), scale,
                           f"<lora:{LORA_NAME}:1> "))
    return out


def format_table(rows: list[Row], pairs: int, candidates: int) -> str:
    def cells(r: dict[str, float]) -> str:
        return " | ".join(f"{r[k]:.1%}" for k in CHECKS)

    base = rows[0]
    lines = ["| setting | all right | one shape | one colour inside | shape | shape colour | background "
             "| s/image | vs 20 steps |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r.single["all"] / base.single["all"] if base.single["all"] else float("nan")
        lines.append(f"| {r.setting.label}: 1 sample | {cells(r.single)} | {r.seconds_single:.2f} | "
                     f"{ratio:.0%} of fidelity |")
        lines.append(f"| {r.setting.label}: best of {candidates} by CLIP score | {cells(r.best)} | "
                     f"{r.seconds_best:.2f} per request | {base.seconds_single / r.seconds_best:.2f}x the speed of "
                     "1 sample at 20 steps |")
    lines.append(f"\n{pairs} prompt x seed pairs, 512x512; s/image: median of single-image requests; a best-of-"
                 f"{candidates} request generates its {candidates} images in one batch and scores them.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    """Print the table; return its rows (the 20-step rows first, then each few-step setting, per decoder)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from pipelines.generation.schedulers import sampler_for_config
    from pipelines.models.library import ModelLibrary, place_lora
    from pipelines.models.loading import load_pipeline
    from pipelines.models.shipped import EMBEDDED_MODEL_DIR, read_scheduler_config
    from pipelines.rerank.clip_scorer import ClipScorer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora", type=Path, required=True, help="the LCM-LoRA (.safetensors or PEFT adapter folder)")
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--timed", type=int, default=8, help="pairs whose single-image request is timed")
    parser.add_argument("--few-step", default="LCM:4", help="sampler:steps[:CFG] rows with the LoRA, comma-separated")
    parser.add_argument("--no-baseline", action="store_true", help="skip the 20-step row")
    parser.add_argument("--baseline-from", type=Path, default=None,
                        help="a --candidates-dir of pipelines.training.evaluate with the 20-step row's pictures")
    parser.add_argument("--decoders", default="Full", help="VAE decoders of every row, comma-separated: Full, TAESD")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    prompts = shapes.dataset(PROMPT_SEED, args.pairs)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "Lora").mkdir()
        place_lora(args.lora, Path(folder) / "Lora", LORA_NAME)
        pipe = load_pipeline("embedded", device="cpu", library=ModelLibrary([Path(folder)], shipped=False))
        scorer = ClipScorer.load(EMBEDDED_MODEL_DIR / "clip", device="cpu")
        settings = few_step_settings(args.few_step)
        if not args.no_baseline:
            sampler = sampler_for_config(read_scheduler_config(EMBEDDED_MODEL_DIR))
            settings.insert(0, Setting(f"{sampler} 20 steps, CFG 7 (default)", sampler, 20, 7.0, ""))
        settings = with_decoders(settings, [d.strip() for d in args.decoders.split(",") if d.strip()])
        for setting in settings:  # first-call costs (attention traced per batch shape) are not the model's
            for n in (1, args.candidates):
                pipe(warmup_request(setting, n))
        cache = None
        if args.baseline_from is not None and not args.no_baseline:
            cache = baseline_cache(args.baseline_from, 20, 7.0, settings[0].sampler, args.candidates)
        rows = [run_setting(pipe, scorer, s, prompts, args.candidates, args.timed, cache if s.tag == "" else None)
                for s in settings]
    print(format_table(rows, args.pairs, args.candidates))
    print(f"evaluation took {time.perf_counter() - started:.0f} s, {torch.get_num_threads()} CPU threads")
    return rows


def warmup_request(setting: Setting, n: int):  # noqa: ANN201 - a GenerationRequest (imported lazily)
    from pipelines.generation.request import GenerationRequest

    return GenerationRequest(prompt=setting.tag + "a red circle", steps=2, cfg_scale=setting.cfg, seed=0, n=n,
                             sampler=setting.sampler, vae_decoder=setting.decoder)


if __name__ == "__main__":
    main()
