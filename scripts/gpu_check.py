"""GPU benchmark: plain diffusers fp16 against our default CUDA path, eager and compiled with CUDA graphs.

    python scripts/gpu_check.py                                  # SD 1.5 shapes, 512x512, CFG 7.5, 20 steps
    python scripts/gpu_check.py --device cpu --tiny --steps 2    # the dry run the tests use

Builds an SD 1.5-shaped model with random weights locally (nothing is downloaded), then per mode, in
one process: a warm-up (for the compiled mode this is where compiling happens, and its seconds are
printed), ``--repeats`` timed images, and prints denoising it/s (U-Net steps per second, from the
step callbacks), seconds per image (encode + denoise + decode), peak memory during the image (the
allocator's on CUDA) and PSNR against diffusers fp32 for the same seed. It guards its own time: a
mode that would start after ``--budget`` seconds is skipped and said so. Imports torch, diffusers,
transformers, safetensors and the ``pipelines`` library only (never ``sd_app`` or gradio).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = {  # SD 1.x topology, a few channels wide: a dry run in seconds on a CPU
    "unet": {
        "_class_name": "UNet2DConditionModel", "block_out_channels": [32, 32, 64, 64], "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 32, "sample_size": 8,
    },
    "vae": {
        "_class_name": "AutoencoderKL", "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "latent_channels": 4, "norm_num_groups": 32, "sample_size": 64, "scaling_factor": 0.5,
    },
    "text_encoder": {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 32,
        "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 77,
        "vocab_size": 49408, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
        "hidden_act": "quick_gelu",
    },
}
# Rough seconds per mode on an H100/H200 (load + warm-up + 3 images), to skip what would not fit.
EXPECTED_SECONDS = {"diffusers": 25, "diffusers-half": 20, "fast": 20, "compiled": 150}


def build_model(workdir: Path, tiny: bool) -> Path:
    from pipelines.models.random_model import write_config_dir, write_random_model
    from pipelines.models.shipped import SD1_CONFIG_DIR

    config = write_config_dir(workdir / "tiny-config", **TINY) if tiny else SD1_CONFIG_DIR
    return write_random_model(config, workdir / ("tiny-random" if tiny else "sd15-random"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same topology (dry run)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3, help="timed images per mode (medians printed)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile (CUDA graphs) mode")
    parser.add_argument("--budget", type=float, default=400, help="seconds after which no further mode starts")
    args = parser.parse_args(argv)
    start = time.monotonic()

    import torch

    from pipelines.generation.request import GenerationRequest
    from pipelines.generation.schedulers import sampler_for_config
    from pipelines.models.modes import GPU_MODES, REFERENCE, Mode, Runner
    from pipelines.models.shipped import read_scheduler_config
    from pipelines.speed.measure import psnr

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (use --device cpu --tiny for a dry run)")
        return 2
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    print(f"device: {gpu}; torch {torch.__version__}; {'tiny' if args.tiny else 'SD 1.5-shaped'} model, random "
          f"weights; {args.size}x{args.size}, batch 1, CFG {args.cfg:g}, {args.steps} steps")
    modes = [Mode(REFERENCE, "diffusers"), GPU_MODES[0], Mode("ours default (eager)", "fast")]
    if not args.no_compile:
        modes.append(GPU_MODES[1])
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        model = build_model(Path(workdir), args.tiny)
        print(f"model built in {time.monotonic() - start:.0f} s")
        runner = Runner(model, device, modes, lazy=True)
        request = GenerationRequest(
            prompt="a red circle on a blue background", steps=args.steps, cfg_scale=args.cfg, seed=1234,
            width=args.size, height=args.size, sampler=sampler_for_config(read_scheduler_config(runner.path)),
        )
        reference = None
        for mode in modes:
            elapsed = time.monotonic() - start
            expected = 0 if args.tiny else EXPECTED_SECONDS.get(mode.pipeline, 30)
            if elapsed + expected > args.budget:
                print(f"{mode.name}: skipped ({elapsed:.0f} s used, about {expected} s needed, "
                      f"--budget {args.budget:g})")
                continue
            try:
                warm = time.monotonic()
                runner.run(mode, replace(request, steps=min(2, args.steps)))  # load, compile, CUDA graphs
                warm_seconds = time.monotonic() - warm
                runs = [runner.run(mode, request) for _ in range(1 if mode.pipeline == "diffusers" else args.repeats)]
            except Exception:  # noqa: BLE001 - report and go on with the next mode
                print(f"{mode.name}: FAILED\n{traceback.format_exc()}")
                continue
            image = runs[-1][0]
            if mode.pipeline == "diffusers":
                reference = image
            per_step = statistics.median(r[2] for r in runs)
            row = {
                "mode": mode.name, "it/s": 1 / per_step if per_step > 0 else math.nan,
                "s/image": statistics.median(r[1] for r in runs), "peak MB": statistics.median(r[3] for r in runs),
                "PSNR": psnr(reference, image) if reference is not None else math.nan, "warm-up s": warm_seconds,
            }
            rows.append(row)
            print(f"{mode.name}: {row['it/s']:.1f} it/s, {row['s/image']:.3f} s/image, {row['peak MB']:.0f} MB, "
                  f"PSNR {row['PSNR']:.1f} dB, warm-up (load, compile) {warm_seconds:.1f} s", flush=True)
    half = next((r for r in rows if r["mode"] == GPU_MODES[0].name), None)
    print("\n| mode | denoising it/s | s/image | vs diffusers fp16 (s/image) | peak mem (MB) | PSNR vs fp32 (dB) "
          "| warm-up s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{half['s/image'] / r['s/image']:.2f}x" if half else "n/a"
        print(f"| {r['mode']} | {r['it/s']:.1f} | {r['s/image']:.3f} | {ratio} | {r['peak MB']:.0f} | "
              f"{r['PSNR']:.1f} | {r['warm-up s']:.1f} |")
    print(f"\ntotal {time.monotonic() - start:.0f} s")
    return 0 if len(rows) == len(modes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
