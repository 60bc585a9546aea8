"""``sd-app``: the command line. Thin: parses arguments into a request and calls the engine.

Errors in input exit with status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from sd_app.arguments import add_generation_arguments, ranking_options, request_from_args, scorer_specs


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"sd-app: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sd-app", description="Stable Diffusion 1.x text-to-image with CLIP reranking")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    generate = commands.add_parser("generate", help="generate images and write PNGs with metadata")
    generate.add_argument("prompt", help="the prompt; A1111 emphasis like (word:1.2) works")
    add_generation_arguments(generate)
    from sd_app.remote import add_server_arguments

    add_server_arguments(generate)
    commands.add_parser("info", help="list models and samplers")
    from sd_app.models_command import add_models_arguments

    add_models_arguments(commands.add_parser("models", help="list model folders: checkpoints, VAEs, LoRAs, embeddings"))
    from sd_app.bench import add_bench_arguments

    add_bench_arguments(commands.add_parser("bench", help="time our pipeline against plain diffusers"))
    from sd_app.score import add_score_arguments

    add_score_arguments(commands.add_parser("score", help="CLIP scores / zero-shot table for images"))
    from sd_app.server import add_serve_arguments

    add_serve_arguments(commands.add_parser("serve", help="browser UI and A1111-compatible HTTP API"))
    from sd_app.batch import add_batch_arguments

    add_batch_arguments(commands.add_parser("batch", help="generate every prompt of a file; resumable, multi-process"))
    return parser


def run_generate(args: argparse.Namespace) -> int:
    """Generate locally, or on ``--server`` (the warm path: no torch in this process)."""
    if args.server is not None:
        from sd_app.remote import run_remote_generate

        return run_remote_generate(args)
    from sd_app.checks import check_device, check_output_folder
    from sd_app.engine import Engine

    request = request_from_args(args, args.prompt)
    check_output_folder(args.out, "--out")
    check_device(args.device, "--device")
    specs = scorer_specs(args)
    options = ranking_options(args, specs)
    rerank = not args.no_rerank and (args.reranker.lower() != "none" or bool(specs))
    if options["min_score"] and not rerank:
        raise ValueError("--min-score needs reranking (drop --no-rerank)")
    engine = Engine(
        model=args.model,
        vae=args.vae,
        reranker=args.reranker if args.reranker.lower() != "none" else None,
        output_dir=args.out,
        device=args.device,
        models_dirs=args.models_dir,
        scorers=specs,
    )

    def on_round(report) -> None:  # noqa: ANN001 - pipelines.rerank.min_score.RoundReport
        print(f"min score: {report.text()}", file=sys.stderr)

    started = time.perf_counter()
    result = engine.generate(request, rerank=rerank, keep=args.keep, progress=True, on_round=on_round, **options)
    seconds = time.perf_counter() - started
    for candidate in result.candidates:
        score = f"  {result.score_label} {candidate.score:.2f}" if candidate.score is not None else ""
        if len(candidate.details) and result.score_label == "Weighted score":
            score += "".join(f", {label} {value:.2f}" for label, value in candidate.details.items())
        passed = {True: "  passed", False: "  below the minimum", None: ""}[candidate.passed]
        print(f"{candidate.path}  seed {candidate.seed}{score}{passed}")
    for pruned in result.pruned:
        print(f"pruned at step {pruned.at_step}  seed {pruned.seed}  early {result.early_score_label} "
              f"{pruned.score:.2f} by {result.early_scorer}")
    order = f"best first by {result.reranker_name}" if result.reranker_name else "in generation order"
    made = result.request
    width, height = result.candidates[0].image.size
    mode = made.mode + (" + hires fix" if made.hires is not None else "")
    # with early pruning, a round of new seeds that falls short is followed by one finishing its pruned
    fresh = (result.rounds + 1) // 2 if made.prune_to else result.rounds
    rounds = (f" ({result.rounds} rounds: the pruned finished when no kept one passed)" if made.prune_to
              else f" ({result.rounds} rounds of {made.n})")
    print(
        f"{len(result.candidates)} of {made.n * fresh} image(s)"
        + (rounds if result.rounds > 1 else "")
        + f" written to {args.out}/ {order}; {result.model_name}, "
        f"{mode}, {made.sampler}, {made.total_steps} steps, {width}x{height}, {seconds:.1f} s",
        file=sys.stderr,
    )
    tokens = result.prompt_tokens
    if tokens is not None and tokens.chunks > 1:
        print(
            f"note: the prompt has {tokens.tokens} tokens; it was encoded in {tokens.chunks} chunks of 75 "
            "(A1111's way: nothing was cut)",
            file=sys.stderr,
        )
    if result.passed is False:
        print(
            f"note: no candidate reached the minimum score in {result.rounds} round(s) "
            f"({', '.join(f'{k} {v:g}' for k, v in result.min_scores.items())}); the best are written anyway",
            file=sys.stderr,
        )
    if result.prompt_truncated_for_scoring:
        print("note: the reranker read only the first 77 tokens of the prompt (CLIP's limit)", file=sys.stderr)
    return 0


def run_info() -> int:
    from pipelines.generation.schedulers import sampler_names
    from pipelines.models.shipped import EMBEDDED_MODEL_DIR
    from pipelines.speed.options import default_device

    built = (EMBEDDED_MODEL_DIR / "model_index.json").is_file()
    print("models:")
    print(f"  embedded  {EMBEDDED_MODEL_DIR}  ({'ready' if built else 'not built yet'})")
    print("  or any local diffusers folder / SD 1.x .safetensors file / cached HF repo id")
    print("samplers:")
    for name in sampler_names():
        print(f"  {name}")
    print(f"device: {default_device()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sd-app`` console script. ``argv=None`` (the process's own command line, as the
    console script and ``python -m sd_app.cli`` call it) also lets ``generate`` and ``serve`` import only
    the library code they run (``sd_app.lean_imports``); a caller passing ``argv`` keeps its imports as they are."""
    args = build_parser().parse_args(argv)
    if argv is None and args.command in ("generate", "serve"):
        from sd_app.lean_imports import use_lean_imports

        use_lean_imports()
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "score":
            from sd_app.score import run_score

            return run_score(args)
        if args.command == "serve":
            from sd_app.server import run_serve

            return run_serve(args)
        if args.command == "batch":
            from sd_app.batch import run_batch

            return run_batch(args)
        if args.command == "models":
            from sd_app.models_command import run_models

            return run_models(args)
        if args.command == "bench":
            from sd_app.bench import run_bench

            return run_bench(args)
        return run_info()
    except (ValueError, OSError) as error:
        print(f"sd-app: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sd-app: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
