"""Judge a concept LoRA on the embedded model through the product's own path (library, tags, merging).

    python -m pipelines.training.lora --evaluate pipelines/embedded/loras/hexagon.safetensors --pairs 48

Rows, each over ``pairs`` prompt x seed pairs (the README evaluation's settings: the default CPU path,
20 steps of the model's own DPM++ 2M, CFG 7), judged by the pixel oracle that knows the new shape
(``shapes.judge(..., known=ALL_SHAPES)``): the new concept with ``<lora:NAME:1>`` (target >= 80% drawn
right) and without it (the base model never learnt it); the base world's prompts without the LoRA and
with it loaded (target: >= 90% of the fidelity kept); and ``<lora:NAME:0>`` against no tag, pixel for
pixel (target: identical).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipelines.training import shapes

PROMPT_SEED = 2024  # the base world's evaluation prompts (pipelines.training.evaluate)
CONCEPT_PROMPT_SEED = 2025
ATTRIBUTES = ("all", "count", "binding", "shape", "shape_colour", "background")


def _cells(result: dict[str, float]) -> str:
    return " | ".join(f"{result[k]:.1%}" for k in ATTRIBUTES)


def main(lora: Path, concept: str, pairs: int, threads: int) -> dict[str, dict[str, float]]:
    import torch

    from pipelines.generation.request import GenerationRequest
    from pipelines.generation.schedulers import sampler_for_config
    from pipelines.models.library import ModelLibrary, place_lora
    from pipelines.models.loading import load_pipeline
    from pipelines.models.shipped import EMBEDDED_MODEL_DIR, read_scheduler_config

    torch.set_num_threads(threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        lora_dir = Path(folder) / "Lora"
        lora_dir.mkdir()
        place_lora(lora, lora_dir, concept)
        library = ModelLibrary([Path(folder)], shipped=False)
        pipe = load_pipeline("embedded", device="cpu", library=library)
        sampler = sampler_for_config(read_scheduler_config(EMBEDDED_MODEL_DIR))

        def image(prompt: str, seed: int) -> object:
            request = GenerationRequest(prompt=prompt, steps=20, cfg_scale=7.0, seed=seed, sampler=sampler)
            return pipe(request).images[0]

        def fidelity(attrs: list[shapes.ShapeAttributes], tag: str, label: str) -> dict[str, float]:
            verdicts = []
            for k, a in enumerate(tqdm(attrs, desc=label, mininterval=10)):
                verdicts.append(shapes.judge(image(f"{tag}{shapes.caption(a)}", 1000 * k), a, known=shapes.ALL_SHAPES))
            return shapes.fidelity(verdicts)

        tag = f"<lora:{concept}:1> "
        new = shapes.dataset(CONCEPT_PROMPT_SEED, pairs, kinds=(concept,))
        old = shapes.dataset(PROMPT_SEED, pairs)
        results = {
            f"'{concept}' prompts with {tag.strip()}": fidelity(new, tag, "new+lora"),
            f"'{concept}' prompts, base model": fidelity(new, "", "new base"),
            "base-world prompts, base model": fidelity(old, "", "old base"),
            f"base-world prompts with {tag.strip()}": fidelity(old, tag, "old+lora"),
        }
        identical = sum(
            np.array_equal(np.asarray(image(f"<lora:{concept}:0> {shapes.caption(a)}", 1000 * k)),
                           np.asarray(image(shapes.caption(a), 1000 * k)))
            for k, a in enumerate(new[:4] + old[:4])
        )
    lines = ["| prompts | all right | one shape | one colour inside | shape | shape colour | background |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {label} ({pairs} prompt x seed) | {_cells(r)} |" for label, r in results.items()]
    old_base, old_lora = results["base-world prompts, base model"], results[f"base-world prompts with {tag.strip()}"]
    kept = old_lora["all"] / old_base["all"] if old_base["all"] else float("nan")
    lines.append(f"\nbase-world fidelity kept with the LoRA loaded: {kept:.1%} (target >= 90%)")
    lines.append(f"<lora:{concept}:0> pixel-identical to no tag: {identical} of 8 images (target 8)")
    lines.append(f"evaluation took {time.perf_counter() - started:.0f} s, {threads} CPU threads")
    print("\n".join(lines))
    return results
