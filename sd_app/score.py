"""``sd-app score``: CLIP scores of images against a prompt, or a zero-shot table of texts for an image."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, help="image files (RGB; see --convert)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="score every image against this prompt (CLIP score, best first)")
    what.add_argument("--texts", nargs="+", help="rank these texts for each image (zero-shot table)")
    parser.add_argument("--reranker", default="embedded", help="CLIP model folder (default: the embedded one)")
    parser.add_argument("--convert", action="store_true", help="convert grayscale/alpha images to RGB")
    parser.add_argument("--rerank-by", choices=("clip", "contrastive", "mixed"), default="clip",
                        help="with --prompt: CLIP score, or the prompt's probability against counterfactuals")
    parser.add_argument("--device", default=None)


def run_score(args: argparse.Namespace) -> int:
    from pipelines.rerank.clip_scorer import ClipScorer, load_image_file
    from sd_app.checks import check_device

    check_device(args.device, "--device")
    images = [load_image_file(path, convert=args.convert) for path in args.images]
    scorer = ClipScorer.load(args.reranker, device=args.device)
    if args.prompt is not None:
        from pipelines.rerank.contrastive import ContrastiveScorer, reranker_for

        reranker = reranker_for(scorer, args.rerank_by)
        if isinstance(reranker, ContrastiveScorer):
            print("counterfactual captions:", "; ".join(c.text for c in reranker.captions(args.prompt)) or "none")
        result = reranker.score(images, args.prompt)
        width = max(len(str(p)) for p in args.images)
        print(f"{'image':<{width}}  {result.label:>17}  cosine   ({reranker.name})")
        for index in result.order():
            path = str(args.images[index])
            print(f"{path:<{width}}  {result.scores[index]:17.2f}  {result.cosines[index]:+.4f}")
        if result.truncated:
            print("note: the prompt is longer than CLIP's 77 tokens and was truncated for scoring")
        return 0
    for path, image in zip(args.images, images):
        rows = scorer.zero_shot(image, args.texts)
        width = max(len(row.text) for row in rows)
        print(f"{path}  ({scorer.name}, logit scale {scorer.logit_scale:.1f})")
        print(f"  {'text':<{width}}  cosine   logit    prob")
        for row in rows:
            note = "  (truncated)" if row.truncated else ""
            print(f"  {row.text:<{width}}  {row.cosine:+.4f}  {row.logit:7.2f}  {row.probability:.4f}{note}")
    return 0
