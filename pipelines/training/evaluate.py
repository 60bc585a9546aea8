"""Evaluate the embedded model and print one table.

    python -m pipelines.training.evaluate [--model pipelines/embedded/shapes-tiny] [--pairs 48]

Rows: tiny-CLIP zero-shot accuracy (image -> correct caption among all 120) on held-out 512x512
drawings through the shipped image processor; generation fidelity judged by the pixel oracle
(:func:`pipelines.shapes.judge`) over prompt x seed pairs at 20 steps and CFG 7, for the first
candidate and for the best of 4 by CLIP score (Radford et al. 2021); seconds per 512x512 image.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from pipelines import shapes
from pipelines.training import data
from pipelines.training.export import DEFAULT_OUT


class Scorer:
    """CLIP score = max(100 * cos(image, text), 0) with the shipped tiny CLIP."""

    def __init__(self, folder: Path) -> None:
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(str(folder / "clip"), dtype=torch.float32).eval()
        self.processor = CLIPImageProcessor.from_pretrained(str(folder / "clip"))
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))

    @torch.no_grad()
    def text(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids  # (N, 77)
        out = self.model.text_projection(self.model.text_model(input_ids=ids).pooler_output)  # (N, D)
        return torch.nn.functional.normalize(out, dim=-1)

    @torch.no_grad()
    def images(self, images: list) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt").pixel_values  # (N, 3, 64, 64)
        out = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)
        return torch.nn.functional.normalize(out, dim=-1)  # (N, D)

    def scores(self, images: list, text: str) -> torch.Tensor:
        """(N,) CLIP scores of images against one text."""
        return (100 * self.images(images) @ self.text([text])[0]).clamp_min(0)


def zero_shot(scorer: Scorer, n: int) -> dict[str, float]:
    """Accuracy over all captions on n held-out 512x512 drawings, overall and per attribute."""
    captions = shapes.all_captions()
    text = scorer.text(captions)  # (C, D)
    attrs = shapes.dataset(data.HELDOUT_SEED, n)
    hits = {"all": [], "shape": [], "shape_colour": [], "background": []}
    for start in range(0, n, 50):
        chunk = attrs[start : start + 50]
        pred = (scorer.images([shapes.draw(a) for a in chunk]) @ text.T).argmax(1)  # (b,)
        for a, p in zip(chunk, pred):
            guess = shapes.parse_caption(captions[int(p)])
            hits["all"].append(captions[int(p)] == shapes.caption(a))
            for key in ("shape", "shape_colour", "background"):
                hits[key].append(getattr(guess, key) == getattr(a, key))
    return {k: float(np.mean(v)) for k, v in hits.items()}


def fidelity(verdicts: list[shapes.Verdict]) -> dict[str, float]:
    return {"all": float(np.mean([v.all_ok for v in verdicts])),
            "shape": float(np.mean([v.shape_ok for v in verdicts])),
            "shape_colour": float(np.mean([v.shape_colour_ok for v in verdicts])),
            "background": float(np.mean([v.background_ok for v in verdicts]))}


def generation(folder: Path, scorer: Scorer, pairs: int, candidates: int, steps: int, cfg: float,
               timing_runs: int) -> tuple[dict, dict, float]:
    """(single-sample fidelity, best-of-N fidelity, seconds per image at batch 1)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    prompts = shapes.dataset(2024, pairs)  # distinct prompt x seed pairs
    first, best = [], []
    for k, attrs in enumerate(prompts):
        prompt = shapes.caption(attrs)
        generators = [torch.Generator().manual_seed(1000 * k + c) for c in range(candidates)]
        images = pipe(prompt, num_inference_steps=steps, guidance_scale=cfg, num_images_per_prompt=candidates,
                      generator=generators).images
        verdicts = [shapes.judge(image, attrs) for image in images]
        first.append(verdicts[0])
        best.append(verdicts[int(scorer.scores(images, prompt).argmax())])
    start = time.perf_counter()
    for k in range(timing_runs):
        pipe("a red circle on a blue background", num_inference_steps=steps, guidance_scale=cfg,
             generator=torch.Generator().manual_seed(k))
    seconds = (time.perf_counter() - start) / max(timing_runs, 1)
    return fidelity(first), fidelity(best), seconds


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_OUT, help="diffusers folder with clip/")
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--n-zero-shot", type=int, default=600)
    parser.add_argument("--timing-runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scorer = Scorer(args.model)
    zs = zero_shot(scorer, args.n_zero_shot)
    single, best, seconds = generation(args.model, scorer, args.pairs, args.candidates, args.steps, args.cfg,
                                       args.timing_runs)
    rows = [
        (f"tiny-CLIP zero-shot ({args.n_zero_shot} held-out, 120 captions)", zs, ">= 95%"),
        (f"generation, 1 sample ({args.pairs} prompt x seed, {args.steps} steps, CFG {args.cfg:g})", single,
         ">= 70%"),
        (f"generation, best of {args.candidates} by CLIP score", best, ">= 90%"),
    ]
    print("| metric | all right | shape | shape colour | background | target |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r, target in rows:
        cells = " | ".join(f"{r[k]:.1%}" for k in ("all", "shape", "shape_colour", "background"))
        print(f"| {name} | {cells} | {target} |")
    print(f"| seconds per 512x512 image ({args.steps} steps, batch 1, {torch.get_num_threads()} threads) "
          f"| {seconds:.2f} s | | | | <= 10 s |")


if __name__ == "__main__":
    main()
