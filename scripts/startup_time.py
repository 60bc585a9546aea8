"""Process start to PNG: cold ``sd-app generate`` against plain diffusers' own cold script, side by side.

    python scripts/startup_time.py --repeats 5 [--before DIR] [--serve]

Each round runs every command once, in turn (so background load hits all alike), each in a fresh
process; the table shows medians. ``--before DIR``: also time the same command in another checkout
(e.g. ``git archive <commit> | tar -x -C DIR``). ``--serve``: start ``sd-app serve`` on a free port,
time process start to its first image served (the first request loads the models), then time
``sd-app generate --server URL`` (the warm path). Wall-clock and CPU seconds; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red square on a green background"

# Plain diffusers, as its documentation writes a first script: the pipeline class from the package,
# from_pretrained on the same embedded folder, its own scheduler (DPM++ 2M from the folder), 20 steps, save.
DIFFUSERS_SCRIPT = f"""
import sys, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, feature_extractor=None,
    requires_safety_checker=False, local_files_only=True, use_safetensors=True)
pipe.set_progress_bar_config(disable=True)
image = pipe({PROMPT!r}, num_inference_steps=20, generator=torch.Generator().manual_seed(1)).images[0]
image.save(sys.argv[2])
"""

# The libraries' import floor for this path: torch and the model classes sd-app uses, imported by their module
# paths, nothing built or run, in a process run as sd-app generate runs (sd_app.lean_imports, sd_app.lifetime:
# no cyclic GC, no interpreter teardown). Whatever a program that generates with diffusers' and transformers'
# SD 1.x classes does, it imports at least this.
LIBRARY_FLOOR_SCRIPT = """
import gc
gc.disable()
from sd_app.lean_imports import use_lean_imports
use_lean_imports()
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from transformers.models.clip.modeling_clip import CLIPTextModel
from transformers.models.clip.tokenization_clip import CLIPTokenizer
import os
os._exit(0)
"""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], cwd: Path = REPO) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one fresh process, start to exit; raises with its stderr if it fails.

    CPU seconds (user + system, all threads) say how much work the process did, which other load on the
    machine changes much less than the wall clock."""
    cpu = _children_cpu()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])}... failed:\n{done.stderr[-2000:]}")
    return seconds, _children_cpu() - cpu


def generate_command(out: Path, server: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "sd_app.cli", "generate", PROMPT, "--n", "1", "--steps", "20",
               "--seed", "1", "--out", str(out)]
    return command + (["--server", server] if server else [])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_first_image(out: Path, timeout_s: float = 600) -> tuple[subprocess.Popen, str, float]:
    """Start ``sd-app serve``; seconds from process start to the first txt2img image received."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    body = json.dumps({"prompt": PROMPT, "steps": 20, "seed": 1, "batch_size": 1}).encode()
    start = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "sd_app.cli", "serve", "--port", str(port), "--out", str(out)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    while time.perf_counter() - start < timeout_s:
        if server.poll() is not None:
            raise RuntimeError("sd-app serve exited before serving an image")
        request = urllib.request.Request(url + "/sdapi/v1/txt2img", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                if json.loads(response.read())["images"]:
                    return server, url, time.perf_counter() - start
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)  # not listening yet
    server.kill()
    raise RuntimeError(f"no image from sd-app serve within {timeout_s:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", type=Path, default=REPO / "pipelines" / "embedded" / "shapes-tiny")
    parser.add_argument("--before", type=Path, default=None, help="another checkout to time the same command in")
    parser.add_argument("--serve", action="store_true", help="also time serve's first image and --server")
    parser.add_argument("--only-serve", action="store_true", help="time only serve's first image and --server")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="startup-"))
    runs: dict[str, tuple[list[str], Path]] = {
        "python -c 'import torch' (floor: imports)": ([sys.executable, "-c", "import torch"], REPO),
        "torch + the model classes, imported only (the libraries' floor)": (
            [sys.executable, "-c", LIBRARY_FLOOR_SCRIPT], REPO),
        "plain diffusers, cold script": ([sys.executable, "-c", DIFFUSERS_SCRIPT, str(args.model),
                                          str(work / "diffusers.png")], REPO),
        "sd-app generate, cold": (generate_command(work / "ours"), REPO),
    }
    if args.only_serve:
        runs = {}
        args.serve = True
    if args.before is not None:
        runs["sd-app generate, cold, before"] = (generate_command(work / "before"), args.before.resolve())
    server = None
    serve_seconds = None
    if args.serve:
        server, url, serve_seconds = serve_first_image(work / "served")
        runs["sd-app generate --server (warm)"] = (generate_command(work / "warm", url), REPO)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    try:
        for _ in range(args.repeats):
            for name, (command, cwd) in runs.items():
                wall, work = timed(command, cwd)
                seconds[name].append(wall)
                cpu[name].append(work)
                print(f"{name}: {wall:.2f} s wall, {work:.2f} s CPU", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    base = statistics.median(seconds.get("plain diffusers, cold script") or [float("nan")])
    print(f"Process start to PNG, median of {args.repeats} (s); {args.model.name}, 512x512, 20 steps, seed 1")
    base_cpu = statistics.median(cpu.get("plain diffusers, cold script") or [float("nan")])
    print("\n| command | wall s (median) | vs plain diffusers | CPU s (median) | vs plain diffusers |")
    print("|---|---|---|---|---|")
    for name, values in seconds.items():
        median, work = statistics.median(values), statistics.median(cpu[name])
        print(f"| {name} | {median:.2f} | {base / median:.2f}x | {work:.2f} | {base_cpu / work:.2f}x |")
    if serve_seconds is not None:
        print(f"| sd-app serve, process start to first image served | {serve_seconds:.2f} | | | |")
    print(f"\nall runs: {json.dumps({k: [round(v, 2) for v in vs] for k, vs in seconds.items()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
