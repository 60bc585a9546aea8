"""``sd-app``: the command line. Thin: parses arguments into a request and calls the engine.

Errors in input exit with status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from sd_app.arguments import (
    add_generation_arguments,
    check_flag_combinations,
    ranking_options,
    request_from_args,
    scorer_specs,
    scores_wanted,
)

if TYPE_CHECKING:
    from sd_app.engine import GenerationResult
    from sd_app.run_report import RunReport


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
    generate.add_argument(
        "--score", action="store_true",
        help="score a single image too (--n 1 is not scored by default: nothing to rank, and the scorer's load "
             "is saved)",
    )
    from sd_app.remote import add_server_arguments

    add_server_arguments(generate)
    info = commands.add_parser("info", help="list models and samplers")
    info.add_argument("--models-dir", type=Path, action="append", default=[], metavar="DIR",
                      help="an A1111 or ComfyUI folder (or its models/): list its checkpoints and VAEs too")
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


def flag_defaults(command: str) -> argparse.Namespace:
    """The options of ``command`` (``generate`` or ``batch``) as they are when no flag is given."""
    return build_parser().parse_args([command, "defaults"])


def run_generate(args: argparse.Namespace) -> int:
    """Generate locally, or on ``--server`` (the warm path: no torch in this process)."""
    check_flag_combinations(args, flag_defaults("generate"))
    if args.server is not None:
        from sd_app.remote import run_remote_generate

        return run_remote_generate(args)
    from sd_app.checks import check_device, check_output_folder, check_selected_model
    from sd_app.engine import Engine
    from sd_app.run_report import print_report

    request = request_from_args(args, args.prompt)
    check_output_folder(args.out, "--out")
    check_device(args.device, "--device")
    specs = scorer_specs(args)
    options = ranking_options(args, specs)
    rerank = scores_wanted(args, bool(specs), request.n)
    engine = Engine(
        model=args.model,
        vae=args.vae,
        reranker=args.reranker if args.reranker.lower() != "none" else None,
        output_dir=args.out,
        device=args.device,
        models_dirs=args.models_dir,
        scorers=specs,
    )
    # --model, --vae, --clip-skip and the prompt's LoRAs and embeddings, before the model loads (seconds, or a
    # minute for a large checkpoint)
    _, networks = check_selected_model(engine, request.clip_skip)
    networks.check(request.prompt, request.negative_prompt)

    def on_round(report) -> None:  # noqa: ANN001 - pipelines.rerank.min_score.RoundReport
        print(f"min score: {report.text()}", file=sys.stderr)

    started = time.perf_counter()
    result = engine.generate(request, rerank=rerank, keep=args.keep, progress=True, on_round=on_round, **options)
    print_report(local_report(result, args.out, time.perf_counter() - started))
    return 0


def local_report(result: GenerationResult, out_dir: Path, seconds: float) -> RunReport:
    """What the lines say about a local run."""
    from sd_app.run_report import PrunedLine, RunReport, WrittenImage

    made = result.request
    tokens = result.prompt_tokens
    return RunReport(
        written=[WrittenImage(c.path, c.seed, c.score, c.details, c.passed) for c in result.candidates],
        out_dir=out_dir,
        model_name=result.model_name,
        mode=made.mode + (" + hires fix" if made.hires is not None else ""),
        sampler=made.sampler,
        steps=made.total_steps,
        size=result.candidates[0].image.size,
        seconds=seconds,
        candidates_made=result.candidates_made,
        rounds=result.rounds,
        n=made.n,
        pruning=bool(made.prune_to),
        score_label=result.score_label,
        reranker_name=result.reranker_name,
        pruned=[PrunedLine(p.seed, p.score, p.at_step) for p in result.pruned],
        early_score_label=result.early_score_label,
        early_scorer=result.early_scorer,
        min_scores=result.min_scores,
        passed=result.passed,
        prompt_tokens=tokens.tokens if tokens is not None else None,
        prompt_chunks=tokens.chunks if tokens is not None else None,
        truncated_for_scoring=result.prompt_truncated_for_scoring,
    )


def run_info(models_dirs: Sequence[Path] = ()) -> int:
    from pipelines.generation.schedulers import sampler_names
    from pipelines.models.library import ModelLibrary
    from pipelines.models.shipped import EMBEDDED_MODEL_DIR
    from pipelines.speed.options import default_device

    built = (EMBEDDED_MODEL_DIR / "model_index.json").is_file()
    print("models:")
    print(f"  embedded  {EMBEDDED_MODEL_DIR}  ({'ready' if built else 'not built yet'})")
    library = ModelLibrary(list(models_dirs), shipped=False)  # names only: nothing is hashed
    for kind in ("checkpoint", "vae"):
        for entry in library.files(kind):
            print(f"  {entry.name}  ({kind}{', REFUSED: ' + entry.refused if entry.refused else ''})")
    more = "; sd-app models lists LoRAs, embeddings and hashes" if models_dirs else " (--models-dir DIR: its models)"
    print(f"  or any local diffusers folder / SD 1.x .safetensors file / cached HF repo id{more}")
    print("samplers:")
    for name in sampler_names():
        print(f"  {name}")
    print(f"device: {default_device()}")
    return 0


ONE_SHOT_COMMANDS = ("generate", "score")  # their process skips work it does not need (sd_app.lifetime)
# The library names a bad value by its field (A1111's name); the command line says the flag. Fields not here
# are their flag already (``mask_blur`` -> ``--mask-blur``).
FLAGS_OF_FIELDS = {
    "cfg_scale": "--cfg", "negative_prompt": "--negative", "hr_scale": "--hires-scale", "hr_resize_x": "--hires-size",
    "hr_resize_y": "--hires-size", "hr_second_pass_steps": "--hires-steps", "denoising_strength": "--strength",
    "init_image": "--init-image",
}
FLAG_FIELDS = ("steps", "seed", "width", "height", "n", "eta", "sampler", "strength", "mask_blur", "padding",
               "clip_skip", "vae_decoder", "prune_to", "prune_at", "keep")


def flag_message(message: str) -> str:
    """A library error that begins with a request field, begun with the flag for it instead (``generate``'s,
    which ``serve`` shares for its defaults)."""
    field, space, rest = message.partition(" ")
    flag = FLAGS_OF_FIELDS.get(field) or ("--" + field.replace("_", "-") if field in FLAG_FIELDS else None)
    return f"{flag}{space}{rest}" if flag else message


def show_warnings_as_notes() -> None:
    """Library warnings as one ``sd-app: note:`` line each, without the file path and source line that Python
    prints (e.g. LCM's note on a CFG above 2); torchsde's rounding notice at a Brownian tree's edge (a query
    1e-7 below its start, harmless) not at all. For the process's own command line only."""

    def show(message: Warning | str, *_: object, **__: object) -> None:
        print(f"sd-app: note: {message}", file=sys.stderr)

    warnings.showwarning = show
    warnings.filterwarnings("ignore", message=r"Should have ta>=t0", category=UserWarning)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sd-app`` console script. ``argv=None`` (the process's own command line, as the
    console script and ``python -m sd_app.cli`` call it) also lets ``generate`` and ``serve`` import only
    the library code they run (``sd_app.lean_imports``), runs a ``generate`` or ``score`` process without
    the cyclic garbage collector and ends it without the interpreter's teardown, and holds the collector
    while ``serve`` starts (``sd_app.lifetime``); a caller passing ``argv`` keeps its imports and its process
    as they are."""
    args = build_parser().parse_args(argv)
    if argv is None:
        show_warnings_as_notes()
    one_shot = argv is None and args.command in ONE_SHOT_COMMANDS
    if one_shot or (argv is None and args.command == "serve"):
        from sd_app.lifetime import pause_gc

        pause_gc()  # serve resumes it once loaded
    if argv is None and args.command in ("generate", "serve"):
        from sd_app.lean_imports import use_lean_imports

        use_lean_imports()
    code = run_command(args)
    if one_shot:
        from sd_app.lifetime import end_process

        end_process(code)
    return code


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; bad input and failures print one line and give status 2."""
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

            check_flag_combinations(args, flag_defaults("batch"))
            return run_batch(args)
        if args.command == "models":
            from sd_app.models_command import run_models

            return run_models(args)
        if args.command == "bench":
            from sd_app.bench import run_bench

            return run_bench(args)
        return run_info(args.models_dir)
    except BrokenPipeError:  # the reader went away (`sd-app models --json | head -1`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush fails no more
        return 1
    except (ValueError, OSError) as error:
        message = flag_message(str(error)) if args.command in ("generate", "serve") else str(error)
        message = message.replace("pass convert=True", "add --convert") if args.command == "score" else message
        print(f"sd-app: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sd-app: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
