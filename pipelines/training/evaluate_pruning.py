"""Early pruning on the embedded model: fidelity against compute, one table.

    python -m pipelines.training.evaluate_pruning [--pairs 96] [--prune-at 2,3,4,6] [--keep 2]
        [--threads 1] [--log runs/pruning.jsonl] [--table-from runs/pruning.jsonl]

Per prompt x seed pair (prompts ``shapes.dataset(PROMPT_SEED, pairs)``, candidate ``c`` of pair ``k`` with
seed ``1000 k + c``, as in :mod:`pipelines.training.evaluate`), the 8 candidates are generated once, as one
batch, with the app's default pipeline and sampler; the scheduler's x0 prediction is kept after each
pruning step K (decoded for scoring by the linear preview, the VAE at half size and, where the model
has one, its TAESD tiny decoder). Every row is derived from these trajectories: the pruned path finishes its kept
candidates exactly as their full trajectories (tests/test_early_pruning.py), so "best of 8 pruned to 2 at
K" is the final-score best of the 2 candidates whose x0 previews scored highest after step K. Rows:
candidate 0; best of the first 2, 4, 8 by the default reranker (CLIP score); pruned 8 -> M at each K,
x0 decoded by the linear latent -> RGB preview (and, on the first ``--vae-pairs`` pairs, by the VAE).
Fidelity: the shapes oracle's "all right" (:func:`pipelines.training.shapes.judge`). Compute: U-Net
steps (one candidate, one step, guidance batch included) and VAE decodes, relative to full best of 8,
also weighted by their measured seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.training import shapes
from pipelines.training.evaluate import PROMPT_SEED
from pipelines.training.export import DEFAULT_OUT


def evaluate_pair(pipe: Any, scorer: Any, attrs: shapes.ShapeAttributes, index: int, candidates: int, steps: int,
                  cfg: float, prune_at: list[int], vae_at: list[int]) -> dict[str, Any]:
    """One pair's record: verdicts, final ranking, early ranking per decoder and K, seconds per unit."""
    import torch

    from pipelines.generation.request import GenerationRequest
    from pipelines.rerank.early_pruning import decode_clean

    prompt = shapes.caption(attrs)
    request = GenerationRequest(prompt=prompt, steps=steps, cfg_scale=cfg, seed=1000 * index, n=candidates)
    clean: dict[int, torch.Tensor] = {}
    stamps: list[float] = []
    with pipe.generating():
        run, _ = pipe.start(request, track_clean=True)
        started = time.perf_counter()
        for k in sorted(prune_at):
            run.run(k, on_step=lambda _info: stamps.append(time.perf_counter()))
            clean[k] = run.clean.clone()  # [N, C, h, w]
        latents = run.run(on_step=lambda _info: stamps.append(time.perf_counter()))
        step_seconds = float(np.median(np.diff([started, *stamps]))) / candidates  # one candidate, one step
        started = time.perf_counter()
        images = pipe.decode(latents)
        decode_seconds = (time.perf_counter() - started) / candidates
        decoders = ["preview", "vae-half"] + (["taesd"] if pipe.components.tiny_decoder is not None else [])
        early: dict[str, dict[str, list[int]]] = {d: {} for d in decoders}  # K -> candidates best first
        spent: dict[str, list[float]] = {d: [] for d in decoders}
        for k, x0 in clean.items():
            for decoder in early:
                if decoder != "preview" and k not in vae_at:
                    continue
                started = time.perf_counter()
                pictures = decode_clean(pipe, x0, decoder)
                spent[decoder].append((time.perf_counter() - started) / candidates)
                early[decoder][str(k)] = scorer.score(pictures, prompt).order()  # ties by cosine, as the app
    verdicts = [shapes.judge(image, attrs) for image in images]
    return {
        "pair": index, "prompt": prompt, "seeds": request.seeds(),
        "verdicts": [{"all": v.all_ok, "count": v.count_ok, "binding": v.binding_ok} for v in verdicts],
        "final": scorer.score(images, prompt).order(), "early": early,
        "seconds": {"step": step_seconds, "decode": decode_seconds,
                    **{decoder: float(np.median(values)) for decoder, values in spent.items() if values}},
    }


def evaluate_fallback(pipe: Any, scorer: Any, attrs: shapes.ShapeAttributes, index: int, candidates: int,
                      steps: int, cfg: float, keep: int, at: int, minimum: dict[str, float]) -> dict[str, Any]:
    """One pair through the library's own path (``best_of_until_pass``): pruned to ``keep`` at step ``at``;
    when no kept candidate reaches ``minimum``, the pruned ones are finished and all ranked together.
    The record: the pick's verdict, the rounds, and the U-Net steps spent (candidate-steps)."""
    from pipelines.generation.request import GenerationRequest
    from pipelines.rerank.min_score import best_of_until_pass

    prompt = shapes.caption(attrs)
    request = GenerationRequest(prompt=prompt, steps=steps, cfg_scale=cfg, seed=1000 * index, n=candidates,
                                prune_to=keep, prune_at=at)
    started = time.perf_counter()
    out = best_of_until_pass(pipe, request, scorer, minimum, extra_rounds=1)
    pick = out.output.candidates[0]
    unet_steps = candidates * at + keep * (steps - at) + (candidates - keep) * steps * (out.rounds - 1)
    return {"pair": index, "prompt": prompt, "pick": pick.seed - 1000 * index, "score": pick.score,
            "all": shapes.judge(pick.image, attrs).all_ok, "rounds": out.rounds, "unet_steps": unet_steps,
            "seconds": time.perf_counter() - started}


def fallback_thresholds(text: str) -> dict[str, float]:
    """``--fallback``'s minimum keyed by the label the candidates' scores carry. The value is written as
    ``sd-app generate --min-score`` takes it (``clip=82``, or ``82`` for the only scorer, the CLIP score);
    the label itself (``"CLIP score=82"``, as earlier logs and the README's command write it) is accepted too."""
    from pipelines.rerank.scorer_specs import SCORER_LABELS, parse_min_scores, thresholds_by_label

    kinds_by_label = {label.lower(): kind for kind, label in SCORER_LABELS.items()}
    name, sep, value = text.rpartition("=")
    kind = kinds_by_label.get(name.strip().lower(), name.strip())
    return thresholds_by_label(parse_min_scores([f"{kind}={value}" if sep else value]), ["clip"])


def logged_pairs(log: Path | None, pairs: int,
                 evaluate: Callable[[int, shapes.ShapeAttributes], dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the evaluation's first ``pairs`` pairs: those already in ``log`` (JSON lines, so a run
    resumes), then ``evaluate(index, attrs)`` of each one after them, appended to ``log`` as it is made."""
    from tqdm import tqdm

    records = []
    if log is not None and log.is_file():
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    for index, attrs in enumerate(tqdm(shapes.dataset(PROMPT_SEED, pairs), desc="pairs", mininterval=30)):
        if index < len(records):
            continue
        records.append(evaluate(index, attrs))
        if log is not None:
            with log.open("a") as handle:
                handle.write(json.dumps(records[-1]) + "\n")
    return records


def best_among(order: list[int], among: list[int]) -> int:
    """The first of ``order`` (the reranker's, best first) that is in ``among``."""
    return next(i for i in order if i in among)


def table(records: list[dict[str, Any]], candidates: int, keep: int, steps: int, prune_at: list[int]) -> str:
    """Markdown: per row, all right over the pairs, U-Net steps and decodes, compute vs full best of N."""
    seconds = {key: float(np.median([r["seconds"][key] for r in records if key in r["seconds"]] or [np.nan]))
               for key in ("step", "decode", "preview", "vae-half", "taesd")}
    full = candidates * steps * seconds["step"] + candidates * seconds["decode"]
    lines = ["| generation | all right | best of 8's pick kept | U-Net steps | VAE decodes | U-Net steps vs best of 8 "
             "| seconds vs best of 8 |", "|---|---:|---:|---:|---:|---:|---:|"]

    def add(name: str, picks: list[int], unet_steps: float, decodes: str, spent: float, kept: str = "") -> None:
        right = np.mean([r["verdicts"][p]["all"] for r, p in zip(records, picks, strict=True)])
        lines.append(f"| {name} | {right:.1%} | {kept} | {unet_steps:g} | {decodes} | "
                     f"{unet_steps / (candidates * steps):.0%} | {spent / full:.0%} |")

    add("1 sample", [0] * len(records), steps, "1", steps * seconds["step"] + seconds["decode"])
    for m in (2, 4, candidates):
        add(f"best of {m} by CLIP score", [best_among(r["final"], list(range(m))) for r in records], m * steps, str(m),
            m * (steps * seconds["step"] + seconds["decode"]))
    for decoder, label in (("preview", "x0 as linear latent->RGB preview"), ("vae-half", "x0 half-size VAE"),
                           ("taesd", "x0 TAESD decoder")):
        for k in prune_at:
            if not all(str(k) in r["early"].get(decoder, {}) for r in records):
                continue
            kept = [r["early"][decoder][str(k)][:keep] for r in records]
            unet_steps = candidates * k + keep * (steps - k)
            spent = unet_steps * seconds["step"] + keep * seconds["decode"] + candidates * seconds[decoder]
            decodes = f"{keep}" + {"vae-half": f" + {candidates} at half size",
                                   "taesd": f" + {candidates} TAESD"}.get(decoder, "")
            pick_kept = np.mean([r["final"][0] in ks for r, ks in zip(records, kept, strict=True)])
            add(f"best of {candidates} pruned to {keep} at step {k}, {label}",
                [best_among(r["final"], ks) for r, ks in zip(records, kept, strict=True)], unet_steps, decodes, spent,
                f"{pick_kept:.0%}")
    oracle = [any(v["all"] for v in r["verdicts"]) for r in records]
    lines.append(f"| (some candidate of {candidates} right) | {np.mean(oracle):.1%} | | | | | |")
    lines.append(f"\n{len(records)} prompt x seed pairs, {steps} steps; medians: U-Net step {seconds['step']:.3f} s "
                 f"per candidate, VAE decode {seconds['decode']:.2f} s, x0 preview {seconds['preview'] * 1000:.1f} ms, "
                 f"x0 half-size VAE decode {seconds['vae-half']:.2f} s"
                 + (f", x0 TAESD decode {seconds['taesd']:.3f} s" if not np.isnan(seconds["taesd"]) else "")
                 + " (per candidate; CPU shared with other jobs).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_OUT, help="diffusers folder with clip/")
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--prune-at", default="2,3,4,6", help="comma-separated steps K")
    parser.add_argument("--vae-at", default="2,3,4", help="steps K whose x0 is also decoded by the VAE at half size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log", type=Path, default=None, help="append each pair's record (JSON lines); resumes")
    parser.add_argument("--table-from", type=Path, default=None, help="print the table of a log and stop")
    parser.add_argument("--fallback", default=None, metavar="LABEL=MIN",
                        help='prune to --keep at the first --prune-at step through the library, and finish the '
                             'pruned when no kept candidate reaches this minimum (e.g. "clip=82", as --min-score '
                             'takes it); '
                             'one record per pair in --log')
    args = parser.parse_args(argv)
    try:
        minimum = None if args.fallback is None else fallback_thresholds(args.fallback)
    except ValueError as error:
        parser.error(f"--fallback: {error}")
    prune_at = [int(k) for k in args.prune_at.split(",") if k]
    vae_at = [int(k) for k in args.vae_at.split(",") if k]
    if args.table_from is not None:
        records = [json.loads(line) for line in args.table_from.read_text().splitlines() if line.strip()]
        print(table(records, args.candidates, args.keep, args.steps, prune_at))
        return
    import torch

    from pipelines.models.loading import load_pipeline
    from pipelines.rerank.clip_scorer import ClipScorer
    from pipelines.rerank.contrastive import reranker_for

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = load_pipeline(args.model, device="cpu")  # the app's default (fast) path
    scorer = reranker_for(ClipScorer.load(args.model / "clip", device="cpu"), "clip")  # `sd-app generate`'s default
    if minimum is not None:
        done = logged_pairs(args.log, args.pairs, lambda index, attrs: evaluate_fallback(
            pipe, scorer, attrs, index, args.candidates, args.steps, args.cfg, args.keep, prune_at[0], minimum))
        spent = np.mean([r["unet_steps"] for r in done]) / (args.candidates * args.steps)
        print(f"best of {args.candidates} pruned to {args.keep} at step {prune_at[0]}, the pruned finished when no "
              f"kept reaches {args.fallback}: {np.mean([r['all'] for r in done]):.1%} all right over {len(done)} "
              f"pairs; {sum(r['rounds'] > 1 for r in done)} finished the pruned; U-Net steps {spent:.1%} of full "
              f"best of {args.candidates}; median {np.median([r['seconds'] for r in done]):.2f} s per request")
        return
    records = logged_pairs(args.log, args.pairs, lambda index, attrs: evaluate_pair(
        pipe, scorer, attrs, index, args.candidates, args.steps, args.cfg, prune_at, vae_at=vae_at))
    print(f"scorer of x0 and of the finished images: {scorer.name} (CLIP score)")
    print(table(records, args.candidates, args.keep, args.steps, prune_at))
    print(f"evaluation took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
