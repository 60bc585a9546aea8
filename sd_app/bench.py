"""``sd-app bench``: our pipeline's modes against plain diffusers, side by side in one run."""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

SD15_RANDOM = "sd15-random"


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="embedded",
        help=f"'embedded', a model folder, or '{SD15_RANDOM}' (SD 1.5 shapes, random weights, built locally)",
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per mode (medians are printed)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--startup", action="store_true", help="also time `sd-app generate` start to PNG")
    parser.add_argument("--modes", default=None,
                        help="comma-separated modes (default: all but fast-sdpa and taesd): diffusers, fp32, fast, "
                             "deepcache3, cfg-cutoff, diffusers-half and compiled (CUDA: diffusers fp16; ours with "
                             "torch.compile and CUDA graphs), fast-sdpa (the fast path with PyTorch's attention), "
                             "taesd (the fast path decoding with the model's tiny decoder)")


def _model_path(spec: str, workdir: Path) -> str:
    if spec != SD15_RANDOM:
        return spec
    from pipelines.models.random_model import write_random_model
    from pipelines.models.shipped import SD1_CONFIG_DIR

    print("writing an SD 1.5-shaped model with random weights ...", file=sys.stderr)
    return str(write_random_model(SD1_CONFIG_DIR, workdir / SD15_RANDOM))


def run_bench(args: argparse.Namespace) -> int:
    import torch

    from pipelines.models.modes import modes_by_key
    from sd_app.benchmark import format_table, measure_startup, run_benchmark
    from sd_app.checks import check_device

    check_device(args.device)
    for option, value, least in (("--repeats", args.repeats, 1), ("--steps", args.steps, 1), ("--size", args.size, 8)):
        if value < least:
            raise ValueError(f"{option} must be at least {least}, got {value}")
    if args.size % 8:
        raise ValueError(f"--size must be a multiple of 8, got {args.size}")
    if args.modes is not None and not [mode for mode in args.modes.split(",") if mode.strip()]:
        raise ValueError("--modes names no mode; leave it out for the default set")
    modes = modes_by_key([mode.strip() for mode in args.modes.split(",") if mode.strip()]) if args.modes else None
    with tempfile.TemporaryDirectory(prefix="sd-app-bench-") as workdir:
        model = _model_path(args.model, Path(workdir))
        results = run_benchmark(
            model, modes=modes, steps=args.steps, size=args.size, cfg_scale=args.cfg, repeats=args.repeats,
            device=args.device, log=lambda line: print(line, file=sys.stderr),
        )
        threads = torch.get_num_threads()
        machine = f"{platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}"
        title = (
            f"Model {args.model}, {args.size}x{args.size}, {args.steps} steps, CFG {args.cfg:g}, batch 1; "
            f"{machine}"
        )
        print(format_table(results, title))
        if args.startup:
            startup = measure_startup(model, Path(workdir) / "startup")
            print(
                f"\nsd-app generate, process start to PNG written: {startup['total_seconds']:.1f} s "
                f"(imports {startup['import_seconds']:.1f} s = {100 * startup['import_share']:.0f}%)"
            )
    return 0
