"""``sd-app score``: rank images (files or folders) against a prompt with any scorers, or a zero-shot table.

With ``--prompt`` the images are sorted best first with every scorer's number (``sd_app.rerank_folder``,
shared with the UI's Rerank view); ``--csv`` writes the table, ``--keep-best K --into DIR`` copies the best.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, help="image files or folders of images (RGB; see --convert)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="score every image against this prompt (CLIP score, best first)")
    what.add_argument("--texts", nargs="+", help="rank these texts for each image (zero-shot table)")
    parser.add_argument("--reranker", default="embedded", help="CLIP model folder (default: the embedded one)")
    parser.add_argument("--convert", action="store_true", help="convert grayscale/alpha images to RGB")
    parser.add_argument("--rerank-by", choices=("clip", "contrastive", "mixed"), default="clip",
                        help="with --prompt: CLIP score, or the prompt's probability against counterfactuals")
    from sd_app.arguments import add_scorer_arguments

    add_scorer_arguments(parser)
    parser.add_argument("--csv", type=Path, default=None, metavar="FILE", help="with --prompt: write the table as CSV")
    parser.add_argument("--keep-best", type=int, default=None, metavar="K",
                        help="with --prompt: copy the best K images into --into (never overwriting)")
    parser.add_argument("--into", type=Path, default=None, metavar="DIR", help="folder for --keep-best")
    parser.add_argument("--device", default=None)


def run_score(args: argparse.Namespace) -> int:
    from pipelines.rerank.clip_scorer import ClipScorer, load_image_file
    from pipelines.rerank.prompt_text import scoring_prompt
    from sd_app.checks import check_device

    check_device(args.device, "--device")
    if args.prompt is not None:
        return _rank_against_prompt(args)
    if args.scorer or args.csv or args.keep_best is not None:
        raise ValueError("--scorer, --csv and --keep-best go with --prompt")
    images = [load_image_file(path, convert=args.convert) for path in args.images]
    scorer = ClipScorer.load(args.reranker, device=args.device)
    texts = [scoring_prompt(text) for text in args.texts]  # as generation scores its prompt
    for path, image in zip(args.images, images):
        rows = scorer.zero_shot(image, texts)
        width = max(len(row.text) for row in rows)
        print(f"{path}  ({scorer.name}, logit scale {scorer.logit_scale:.1f})")
        print(f"  {'text':<{width}}  cosine   logit    prob")
        for row in rows:
            note = "  (truncated)" if row.truncated else ""
            print(f"  {row.text:<{width}}  {row.cosine:+.4f}  {row.logit:7.2f}  {row.probability:.4f}{note}")
    return 0


def check_outputs(args: argparse.Namespace) -> None:
    """``--keep-best``, ``--into`` and ``--csv`` can be honoured; ValueError naming the option otherwise."""
    from sd_app.checks import check_output_folder

    if args.keep_best is not None and args.keep_best < 1:
        raise ValueError(f"--keep-best must be at least 1, got {args.keep_best}")
    if args.into is not None:
        check_output_folder(args.into, "--into")
    if args.csv is not None:
        csv = Path(args.csv).expanduser()
        if csv.is_dir():
            raise ValueError(f"--csv {args.csv}: a folder; name the file to write")
        check_output_folder(csv.parent, "--csv")


def _rank_against_prompt(args: argparse.Namespace) -> int:
    from pipelines.rerank.contrastive import ContrastiveScorer
    from sd_app.arguments import scorer_specs
    from sd_app.engine import Engine
    from sd_app.rerank_folder import expand_paths, keep_best, rank_files

    if (args.keep_best is None) != (args.into is None):
        raise ValueError("--keep-best K and --into DIR go together")
    check_outputs(args)  # before anything is scored
    specs = scorer_specs(args)
    paths = expand_paths(args.images)  # a missing file or an empty folder fails before any model loads
    engine = Engine(reranker=None if str(args.reranker).lower() == "none" else args.reranker, scorers=specs,
                    device=args.device)
    scorer = engine.ranking_scorer({spec.kind: spec.weight for spec in specs} or {args.rerank_by: 1.0})
    ranking = rank_files(paths, args.prompt, scorer, convert=args.convert, strict=True)
    if ranking.note:
        print(ranking.note)
    if isinstance(scorer, ContrastiveScorer):
        print("counterfactual captions:", "; ".join(c.text for c in scorer.captions(ranking.scored_text)) or "none")
    width = max(len(str(row.path)) for row in ranking.rows)
    labels = ranking.labels
    print(f"{'image':<{width}}  " + "  ".join(f"{label:>17}" for label in labels) + f"  ({ranking.scorer})")
    for row in ranking.rows:
        numbers = "  ".join(f"{row.scores[label]:17.2f}" if label in row.scores else " " * 17 for label in labels)
        print(f"{str(row.path):<{width}}  {numbers}")
    if ranking.truncated:
        print("note: the prompt is longer than CLIP's 77 tokens and was truncated for scoring")
    if args.csv is not None:
        args.csv.write_text(ranking.csv_text(), encoding="utf-8")
        print(f"table written to {args.csv}")
    if args.keep_best is not None:
        copies = keep_best(ranking, args.keep_best, args.into)
        print(f"best {len(copies)} copied into {args.into}: {', '.join(p.name for p in copies)}")
    return 0
