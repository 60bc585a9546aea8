"""Where a denoising step's time goes, against this machine's limit (README "Performance").

    python scripts/bench_flops.py               # SD 1.5-shaped U-Net, random weights, batch 2 (CFG), 64x64
    python scripts/bench_flops.py --tiny        # a few-channel U-Net of the same topology (seconds; the test)

Prints the U-Net's FLOPs per denoising step (FlopCounterMode, ``pipelines.speed.roofline``), this CPU's
bf16 matmul peak (a large square GEMM, best of several), and per path the seconds per U-Net step
(best of the repeats, paths alternating in one process), the achieved TFLOP/s and its share of the peak:
plain diffusers fp32, our default CPU path (bf16, channels_last, oneDNN Graph attention, prepacked
convolutions) and the same without prepacking; and whether prepacking changed any output bit.
Needs only torch and diffusers besides the ``pipelines`` library.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY_UNET = {  # SD 1.x topology, a few channels wide
    "block_out_channels": [32, 32, 64, 64], "layers_per_block": 2, "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 8, "norm_num_groups": 32, "sample_size": 8,
}


def _unets(config: dict, seed: int) -> dict:
    """name -> U-Net: diffusers' fp32 as plain diffusers runs it, and our CPU paths built from the same weights."""
    import torch
    from diffusers import UNet2DConditionModel

    from pipelines.speed.options import default_dtype, default_speed_options, speed_up

    torch.manual_seed(seed)
    reference = UNet2DConditionModel.from_config(config).eval().requires_grad_(False)
    dtype = default_dtype("cpu")
    state = {key: value.to(dtype) for key, value in reference.state_dict().items()}  # one reduced copy per path
    unets = {"diffusers fp32": reference}
    for name, prepack in (("ours default", True), ("ours, no prepacking", False)):
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        unet.load_state_dict(state, assign=True)
        unet.eval().requires_grad_(False)
        options = default_speed_options("cpu")
        unets[name] = speed_up(unet, type(options)(**{**options.__dict__, "prepack_convolutions": prepack}))
    return unets


@contextlib.contextmanager
def paused(pattern: str | None, longest: float = 170) -> Iterator[float]:
    """Stop the processes matching ``pattern`` (not this one or its parents) for the block, for at most
    ``longest`` seconds (a timer resumes them even if the block runs on); always resume them."""
    pids: list[int] = []
    if pattern:
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        mine = {os.getpid(), os.getppid()}
        pids = [int(pid) for pid in found if int(pid) not in mine]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        print(f"paused {len(pids)} processes matching {pattern!r} while timing (at most {longest:g} s)",
              file=sys.stderr)

    def resume() -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    timer = threading.Timer(longest, resume)
    timer.daemon = True
    timer.start()
    try:
        yield time.monotonic()
    finally:
        timer.cancel()
        resume()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny U-Net of the same topology (a dry run)")
    parser.add_argument("--repeats", type=int, default=3, help="timed U-Net calls per path (the best is printed)")
    parser.add_argument("--gemm-size", type=int, default=4096)
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 pixels)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pause", default=None, metavar="PATTERN",
                        help="SIGSTOP the processes whose command line matches PATTERN while timing (SIGCONT after, "
                             "always): the shared-machine protocol, e.g. --pause pipelines.training")
    parser.add_argument("--time-limit", type=float, default=100,
                        help="seconds of timing after which no further repeat starts")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: seconds of CPU time of this process (with --threads 1, robust to other "
                             "processes sharing the cores; then figures are per core)")
    args = parser.parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    import platform

    import torch

    from pipelines.models.shipped import SD1_CONFIG_DIR
    from pipelines.speed.roofline import matmul_peak_flops, unet_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import UNet2DConditionModel

    config = dict(TINY_UNET) if args.tiny else UNet2DConditionModel.load_config(SD1_CONFIG_DIR / "unet")
    latent = 8 if args.tiny else args.latent
    gemm = 256 if args.tiny else args.gemm_size
    flops = unet_flops(config, batch=2, latent=latent)
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; load average {load} before timing")
    print(f"U-Net ({'tiny' if args.tiny else 'SD 1.5 shapes'}), batch 2 (CFG), {latent}x{latent} latents: "
          f"{flops.total / 1e9:.1f} GFLOP per step")
    for op, count in sorted(flops.by_operator.items(), key=lambda item: -item[1]):
        print(f"  {op}: {count / 1e9:.1f} GFLOP ({100 * count / flops.total:.0f}%)")
    unets = _unets(config, seed=0)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, latent, latent, generator=generator)  # [2, 4, h, w]
    states = torch.randn(2, 77, config["cross_attention_dim"], generator=generator)  # [2, 77, D]
    t = torch.tensor(500)
    outputs, seconds, peaks = {}, {name: [] for name in unets}, []
    with paused(args.pause) as started, torch.inference_mode():
        for name, unet in unets.items():  # warm-up: oneDNN primitives, fused-attention traces
            dtype = next(p.dtype for p in unet.parameters())
            outputs[name] = unet(sample.to(dtype), t, encoder_hidden_states=states.to(dtype)).sample
        for repeat in range(args.repeats):
            if repeat and time.monotonic() - started > args.time_limit:
                print(f"(stopped after {repeat} repeats: --time-limit {args.time_limit:g} s)")
                break
            peaks.append(matmul_peak_flops(gemm, torch.bfloat16, repeats=3, clock=clock))  # same load as the steps
            for name, unet in unets.items():
                dtype = next(p.dtype for p in unet.parameters())
                start = clock()
                unet(sample.to(dtype), t, encoder_hidden_states=states.to(dtype))
                seconds[name].append(clock() - start)
    peak = max(peaks)
    print(f"load average after timing: {', '.join(f'{value:.1f}' for value in os.getloadavg())}")
    print(f"bf16 matmul peak ({gemm}x{gemm}, best of 3 per repeat, {len(peaks)} repeats): {peak / 1e9:.1f} GFLOP/s")
    exact = torch.equal(outputs["ours default"], outputs["ours, no prepacking"])
    base = min(seconds["diffusers fp32"])
    print()
    unit = "CPU seconds" if args.clock == "cpu" else "seconds (wall clock)"
    print(f"\n{unit}, best of {len(peaks)} alternating repeats per path")
    print("| path | s/step | GFLOP/s | % of bf16 GEMM peak | speed-up vs diffusers |")
    print("|---|---|---|---|---|")
    for name, times in seconds.items():
        per_step = min(times)
        achieved = flops.total / per_step
        print(f"| {name} | {per_step:.3f} | {achieved / 1e9:.1f} | {100 * achieved / peak:.0f}% | "
              f"{base / per_step:.2f}x |")
    packed, unpacked = min(seconds["ours default"]), min(seconds["ours, no prepacking"])
    ratios = ", ".join(f"{u / p:.3f}" for p, u in zip(seconds["ours default"], seconds["ours, no prepacking"]))
    print(f"\nprepacked convolutions: {unpacked / packed:.3f}x per step (best of each; per repeat {ratios}), "
          f"outputs bit-exact: {exact}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
