"""What every training stage shares: command line, device and bf16 autocast, checkpoints, logging.

Checkpoints are safetensors only: model weights via ``save_pretrained``, AdamW moments flattened into
``optimizer.safetensors``, the step and hyper-parameters in ``state.json``. Writes go to a temporary
folder first and are renamed into place, so an interrupted run never leaves a half-written checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipelines.models.shipped import CLIP_TOKENIZER_DIR

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = CLIP_TOKENIZER_DIR


def base_parser(description: str, out: str, steps: int, batch: int, lr: float) -> argparse.ArgumentParser:
    """The options every stage takes; stages add their own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path(out), help="run folder (checkpoints, log)")
    parser.add_argument("--steps", type=int, default=steps, help="total optimizer steps to reach")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--seed", type=int, default=0, help="data and init seed")
    parser.add_argument("--resume", action="store_true", help="continue from --out/ckpt")
    parser.add_argument("--ckpt-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--no-bf16", action="store_true", help="disable bf16 autocast")
    return parser


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors compute."""

    device: torch.device
    bf16: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def setup(args: argparse.Namespace) -> Runtime:
    """Seed everything, cap CPU threads, pick the device."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    return Runtime(torch.device(name), bf16=not args.no_bf16)


def warmup_lr(step: int, base: float, warmup: int) -> float:
    """Linear warm-up then constant (runs may be extended by resuming with more --steps)."""
    return base * min(1.0, (step + 1) / max(warmup, 1))


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Flatten an optimizer's per-parameter state into one safetensors file (no pickle)."""
    state = optimizer.state_dict()
    tensors = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    save_file(tensors, str(path), metadata={"param_groups": json.dumps(groups)})


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Inverse of :func:`save_optimizer`."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        groups = json.loads(handle.metadata()["param_groups"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(str(path)).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(out: Path, models: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                    state: dict) -> None:
    """Write ``out/ckpt`` atomically: each model via save_pretrained, optimizer, state.json."""
    tmp = out / "ckpt.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, model in models.items():
        model.save_pretrained(tmp / name)
    save_optimizer(optimizer, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    final, old = out / "ckpt", out / "ckpt.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def finish_step(args: argparse.Namespace, log: Log, done: int, loss: float, evaluate: Callable[[], dict[str, float]],
                models: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                state: Callable[[dict[str, float]], dict], key_prefix: str = "") -> None:
    """The tail of a CLIP stage's step ``done``: the loss logged every 25 steps; every ``--ckpt-every`` steps
    and at the last, the held-out metrics of ``evaluate()`` logged and printed, and a checkpoint whose
    state.json is ``state(metrics)``."""
    from tqdm import tqdm

    if done % 25 == 0:
        log.write(step=done, loss=round(loss, 4))
    if done % args.ckpt_every == 0 or done == args.steps:
        metrics = evaluate()
        log.write(step=done, **{f"{key_prefix}{k}": v for k, v in metrics.items()})
        tqdm.write(f"step {done}: loss {loss:.3f} held-out {metrics}")
        save_checkpoint(args.out, models, optimizer, state(metrics))


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` under a temporary name, then renamed: an interrupted write never leaves a half file
    where a cache or a shard is looked for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def read_state(out: Path) -> dict:
    """The state.json of the last checkpoint."""
    return json.loads((out / "ckpt" / "state.json").read_text())


class Log:
    """Append-only JSON-lines log of training metrics."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.time()

    def write(self, **record: float | int | str) -> None:
        record = {"time_s": round(time.time() - self.start, 1), **record}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def batches(n_items: int, batch: int, seed: int, start_step: int) -> Iterator[np.ndarray]:
    """Index batches of a seeded shuffle, epoch after epoch, starting at ``start_step`` (for resume)."""
    per_epoch = n_items // batch
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n_items)
        yield order[offset * batch : (offset + 1) * batch]
        step += 1
