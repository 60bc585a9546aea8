"""Image-to-image on the embedded model, judged by the shapes oracle; prints one table.

    python -m pipelines.training.evaluate_image_to_image [--cases 32] [--steps 20] [--only recolour,inpaint,hires]

Each case is a drawing or prompt of the shapes world (``shapes.dataset(CASE_SEED, cases)``), seed
``1000 k``, the model's own scheduler, CFG 7, our default (fast) pipeline:

- recolour: img2img of a drawn "a red circle on a blue background" (its own shape and colours) to the
  caption with another shape colour, strength 0.6 (and 0.75). Right when the oracle sees the new colour, the same
  shape kind and background, and the shape's centre moved by at most 10% of the side.
- inpaint: the drawn shape's area masked (a disc 1.15 times its circumscribed circle, mask blur 4,
  masked content "fill", strength 1), prompting another shape kind in the same colours. Right when the
  oracle sees the new kind, colour and background, at least 90% of that shape lies inside the mask,
  and outside the blurred mask every pixel is the drawing's.
- with ``--best-of N``: the recolour and inpaint rows again, each case as N candidates (seeds ``1000 k``
  ... ``1000 k + N - 1``) ranked by the shipped reranker CLIP, the first judged; "some candidate right"
  says how often any of the N was.
- hires fix: the caption at 768 and 1024 px drawn directly, and drawn at 512 then hires-fixed (x1.5,
  x2; Latent upscaler, denoising 0.6, as many steps again); 512 drawn directly is the control. Right
  when the oracle's verdict is right and there is one shape ("a"): one region of the shape colour
  (``shapes.count_shapes``).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipelines.training import shapes
from pipelines.training.export import DEFAULT_OUT

CASE_SEED = 2025
RECOLOUR_STRENGTHS = "0.6,0.75"
INPAINT_MASK_SCALE = 1.15
HIRES_UPSCALER, HIRES_DENOISE = "Latent", 0.6
CENTRE_TOLERANCE = 0.10
INSIDE_FRACTION = 0.9


@dataclass
class Row:
    """One line of the table: a name, fractions of cases passing each check, seconds per image."""

    name: str
    checks: dict[str, float]
    seconds: float


def _rate(values: list[bool]) -> float:
    return float(np.mean(values)) if values else 0.0


def disc_mask(attrs: shapes.ShapeAttributes, side: int, scale: float) -> object:
    """White disc over the shape: its circumscribed circle grown by ``scale``."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (side, side), 0)
    r = attrs.size * scale * side
    cx, cy = attrs.cx * side, attrs.cy * side
    ImageDraw.Draw(mask).ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    return mask


def _candidates(pipe: object, request: object, scorer: object | None, best_of: int) -> list[object]:
    """The request's picture, or ``best_of`` candidates best first by ``scorer`` (the reranker CLIP)."""
    if scorer is None:
        return pipe(request).images[:1]
    from pipelines.rerank.best_of import best_of_n

    output = best_of_n(pipe, replace(request, n=best_of), scorer, batch_size=best_of)
    return [candidate.image for candidate in output.candidates]


def _recolour_checks(image: object, attrs: shapes.ShapeAttributes, target: shapes.ShapeAttributes) -> dict[str, bool]:
    verdict = shapes.judge(image, target)
    centre = shapes.shape_centre(image, target.shape_colour)
    kept = centre is not None and np.hypot(centre[0] - attrs.cx, centre[1] - attrs.cy) <= CENTRE_TOLERANCE
    return {"all right": verdict.all_ok and kept, "new colour": verdict.shape_colour_ok,
            "shape kept": verdict.shape_ok, "background": verdict.background_ok, "centre kept": kept}


def recolour(pipe: object, cases: list[shapes.ShapeAttributes], sampler: str, steps: int, strength: float,
             scorer: object | None = None, best_of: int = 1) -> Row:
    """Recolour rows; with ``scorer`` each case is ``best_of`` candidates and the CLIP's first is judged."""
    from pipelines.generation.conditioning import ImageConditioning
    from pipelines.generation.request import GenerationRequest

    checks: dict[str, list[bool]] = {"all right": [], "new colour": [], "shape kept": [], "background": [],
                                     "centre kept": []}
    if scorer is not None:
        checks["some candidate right"] = []
    seconds = []
    for k, attrs in enumerate(tqdm(cases, desc="recolour", mininterval=10)):
        new_colour = next(c for c in shapes.COLOURS[k % 6:] + shapes.COLOURS[: k % 6]
                          if c not in (attrs.shape_colour, attrs.background))
        target = replace(attrs, shape_colour=new_colour)
        request = GenerationRequest(
            prompt=shapes.caption(target), steps=steps, cfg_scale=7.0, seed=1000 * k, sampler=sampler,
            image=ImageConditioning(shapes.draw(attrs, 512), strength=strength),
        )
        start = time.perf_counter()
        images = _candidates(pipe, request, scorer, best_of)
        seconds.append((time.perf_counter() - start) / len(images))
        for key, value in _recolour_checks(images[0], attrs, target).items():
            checks[key].append(value)
        if scorer is not None:
            checks["some candidate right"].append(any(_recolour_checks(i, attrs, target)["all right"] for i in images))
    name = f"recolour: img2img to another shape colour, strength {strength:g}"
    if scorer is not None:
        name += f", best of {best_of} by CLIP"
    return Row(name, {key: _rate(v) for key, v in checks.items()}, float(np.median(seconds)))


def _inpaint_checks(image: object, drawing: object, mask: object, outside: np.ndarray,
                    target: shapes.ShapeAttributes) -> dict[str, bool]:
    verdict = shapes.judge(image, target)
    unchanged = bool((np.asarray(image) == np.asarray(drawing))[outside].all())  # outside: (H, W) bool
    inside = shapes.region_inside(image, target.shape_colour, mask) >= INSIDE_FRACTION
    return {"all right": verdict.all_ok and inside and unchanged, "new shape": verdict.shape_ok,
            "colours": verdict.shape_colour_ok and verdict.background_ok, "inside mask": inside,
            "outside unchanged": unchanged}


def inpaint(pipe: object, cases: list[shapes.ShapeAttributes], sampler: str, steps: int,
            scorer: object | None = None, best_of: int = 1) -> Row:
    """Inpaint rows; with ``scorer`` each case is ``best_of`` candidates and the CLIP's first is judged."""
    from pipelines.generation.conditioning import ImageConditioning
    from pipelines.generation.masks import processed_mask
    from pipelines.generation.request import GenerationRequest

    checks: dict[str, list[bool]] = {"all right": [], "new shape": [], "colours": [], "inside mask": [],
                                     "outside unchanged": []}
    if scorer is not None:
        checks["some candidate right"] = []
    seconds = []
    for k, attrs in enumerate(tqdm(cases, desc="inpaint", mininterval=10)):
        new_shape = shapes.SHAPES[(shapes.SHAPES.index(attrs.shape) + 1 + k % 3) % len(shapes.SHAPES)]
        target = replace(attrs, shape=new_shape)
        drawing = shapes.draw(attrs, 512)
        mask = disc_mask(attrs, 512, INPAINT_MASK_SCALE)
        settings = ImageConditioning(drawing, strength=1.0, mask=mask, mask_blur=4, masked_content="fill")
        request = GenerationRequest(prompt=shapes.caption(target), steps=steps, cfg_scale=7.0, seed=1000 * k,
                                    sampler=sampler, image=settings)
        start = time.perf_counter()
        images = _candidates(pipe, request, scorer, best_of)
        seconds.append((time.perf_counter() - start) / len(images))
        outside = np.asarray(processed_mask(mask, False, 4)) == 0
        judged = [_inpaint_checks(image, drawing, mask, outside, target) for image in images]
        for key, value in judged[0].items():
            checks[key].append(value)
        if scorer is not None:
            checks["some candidate right"].append(any(j["all right"] for j in judged))
    name = "inpaint: the shape masked, another shape kind prompted"
    if scorer is not None:
        name += f", best of {best_of} by CLIP"
    return Row(name, {key: _rate(v) for key, v in checks.items()}, float(np.median(seconds)))


def hires(pipe: object, cases: list[shapes.ShapeAttributes], sampler: str, steps: int, size: int,
          ways: tuple[str, ...] = ("direct", "hires")) -> list[Row]:
    """Rows for ``size``: drawn directly and hires-fixed from 512 (``ways``); 512 is the control (training size)."""
    from pipelines.generation.conditioning import HiresFix
    from pipelines.generation.request import GenerationRequest

    rows = []
    runs: list[tuple[str, dict]] = []
    if "direct" in ways:
        runs.append((f"txt2img at {size}x{size} directly", {"width": size, "height": size}))
    if size != 512 and "hires" in ways:
        fix = HiresFix(scale=size / 512, upscaler=HIRES_UPSCALER, denoising_strength=HIRES_DENOISE)
        runs.append((f"txt2img at 512 + hires fix to {size} ({HIRES_UPSCALER}, denoising {HIRES_DENOISE:g})",
                     {"width": 512, "height": 512, "hires": fix}))
    for label, settings in runs:
        checks: dict[str, list[bool]] = {"all right": [], "one shape": [], "oracle verdict": []}
        seconds = []
        for k, attrs in enumerate(tqdm(cases, desc=label[:30], mininterval=10)):
            request = GenerationRequest(prompt=shapes.caption(attrs), steps=steps, cfg_scale=7.0, seed=1000 * k,
                                        sampler=sampler, **settings)
            start = time.perf_counter()
            image = pipe(request).images[0]
            seconds.append(time.perf_counter() - start)
            one = shapes.count_shapes(image, attrs.shape_colour) == 1
            verdict = shapes.judge(image, attrs)
            checks["one shape"].append(one)
            checks["oracle verdict"].append(verdict.all_ok)
            checks["all right"].append(one and verdict.all_ok)
        rows.append(Row(label, {key: _rate(v) for key, v in checks.items()}, float(np.median(seconds))))
    return rows


def format_table(rows: list[Row], cases: int, steps: int, threads: int) -> str:
    lines = ["| case | all right | checks | s/image |", "|---|---:|---|---:|"]
    for row in rows:
        detail = ", ".join(f"{key} {value:.1%}" for key, value in row.checks.items() if key != "all right")
        lines.append(f"| {row.name} | {row.checks['all right']:.1%} | {detail} | {row.seconds:.2f} |")
    lines.append(f"\n{cases} cases each, {steps} steps, CFG 7, the model's own scheduler, {threads} CPU threads.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from pipelines.generation.schedulers import sampler_for_config
    from pipelines.models.loading import load_pipeline
    from pipelines.models.shipped import read_scheduler_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_OUT, help="diffusers folder of the embedded model")
    parser.add_argument("--cases", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default="recolour,inpaint,hires", help="comma-separated: recolour,inpaint,hires")
    parser.add_argument("--strengths", default=RECOLOUR_STRENGTHS, help="recolour denoising strengths")
    parser.add_argument("--hires-sizes", default="512,768,1024", help="hires fix targets (512: the control)")
    parser.add_argument("--hires-ways", default="direct,hires", help="direct (txt2img at the size), hires (fix)")
    parser.add_argument("--best-of", type=int, default=1,
                        help="N > 1: recolour and inpaint again as N candidates ranked by the reranker CLIP")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.best_of < 1:
        parser.error(f"--best-of must be at least 1, got {args.best_of}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pipe = load_pipeline(args.model)
    sampler = sampler_for_config(read_scheduler_config(Path(args.model)))
    cases = shapes.dataset(CASE_SEED, args.cases)
    parts = set(args.only.split(","))
    rows: list[Row] = []

    def done(*new: Row) -> None:  # each row as soon as it is measured: a long run shows what it has so far
        rows.extend(new)
        for row in new:
            print(format_table([row], args.cases, args.steps, torch.get_num_threads()).splitlines()[2], flush=True)

    scorer = None
    if args.best_of > 1:
        from pipelines.rerank.clip_scorer import ClipScorer

        scorer = ClipScorer.load(args.model / "clip", device="cpu")
    if "recolour" in parts:
        for strength in args.strengths.split(","):
            done(recolour(pipe, cases, sampler, args.steps, float(strength)))
            if scorer is not None:
                done(recolour(pipe, cases, sampler, args.steps, float(strength), scorer, args.best_of))
    if "inpaint" in parts:
        done(inpaint(pipe, cases, sampler, args.steps))
        if scorer is not None:
            done(inpaint(pipe, cases, sampler, args.steps, scorer, args.best_of))
    if "hires" in parts:
        for size in args.hires_sizes.split(","):
            done(*hires(pipe, cases, sampler, args.steps, int(size), tuple(args.hires_ways.split(","))))
    print(format_table(rows, args.cases, args.steps, torch.get_num_threads()))
    print(f"evaluation took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
