"""Train a LoRA that teaches the embedded model a shape its world never had (the hexagon).

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): each patched weight W
gets a trainable low-rank update, W x + (alpha / r) * B A x, with A [r, in] (kaiming init) and B
[out, r] (zeros, so training starts at the base model); the base stays frozen. As kohya sd-scripts
does for Stable Diffusion, the patched modules are the U-Net's transformer blocks (attention and
feed-forward projections, proj_in/out) and the text encoder's attention and MLP; ``--conv-rank`` adds
the resnets' 3x3 convolutions (LoCon). The objective is the embedded model's own (epsilon MSE,
Min-SNR-5, 10% empty captions) on half new-concept drawings and half drawings of the base world,
so the base concepts are kept while the LoRA is loaded. The file is kohya's format (``lora_unet_*``,
``lora_te_*``, ``.alpha``, ``ss_*`` metadata), which A1111, ComfyUI and diffusers'
``load_lora_weights`` read.

    python -m pipelines.training.lora --steps 1500 --out runs/lora-hexagon
    python -m pipelines.training.lora --steps 2000 --out runs/lora-hexagon --resume
    python -m pipelines.training.lora --out runs/lora-hexagon --export pipelines/embedded/loras/hexagon.safetensors
    python -m pipelines.training.lora --evaluate pipelines/embedded/loras/hexagon.safetensors --pairs 48
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipelines.models.lora_keys import kohya_name
from pipelines.models.shipped import EMBEDDED_MODEL_DIR
from pipelines.training import common, data, shapes
from pipelines.training.unet import EMPTY, SCHEDULE, min_snr_weights, oracle_fidelity, sample, weights_id

CONCEPT_SEED = 7_000_001  # drawings of the new concept (never the base world's seeds)
MONITOR_SEED = 424_243
UNET_TARGETS = ("attentions",)  # kohya's default: the Transformer2DModel blocks
TE_TARGETS = ("self_attn", "mlp")


class LoraLayer(torch.nn.Module):
    """A frozen Linear/Conv2d plus a trainable low-rank update: y = base(x) + up(down(x)) * alpha / rank."""

    def __init__(self, base: torch.nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        if isinstance(base, torch.nn.Conv2d):
            self.down = torch.nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = torch.nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = torch.nn.Linear(base.in_features, rank, bias=False)
            self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x)) * (self.alpha / self.rank)


def inject(model: torch.nn.Module, component: str, targets: tuple[str, ...], rank: int, conv_rank: int,
           alpha: float) -> dict[str, LoraLayer]:
    """Wrap the patchable modules under ``targets`` (1x1 convs and Linear; 3x3 convs if ``conv_rank``) in
    LoRA layers; returns kohya name -> layer."""
    layers: dict[str, LoraLayer] = {}
    for path, module in list(model.named_modules()):
        parts = path.split(".")
        if not any(t in parts for t in targets) and not (conv_rank and "resnets" in parts):
            continue
        if isinstance(module, torch.nn.Linear) and "resnets" not in parts:
            r = rank
        elif isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1) and "resnets" not in parts:
            r = rank
        elif isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3) and conv_rank:
            r = conv_rank
        else:
            continue
        parent = model.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else model
        layer = LoraLayer(module, r, alpha if r == rank else float(r))
        setattr(parent, parts[-1], layer)
        layers[kohya_name(component, path)] = layer
    return layers


def lora_state(layers: dict[str, LoraLayer], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """kohya keys: ``<name>.lora_down.weight`` [r, in(, k, k)], ``.lora_up.weight`` [out, r(, 1, 1)], ``.alpha``."""
    state = {}
    for name, layer in layers.items():
        state[f"{name}.lora_down.weight"] = layer.down.weight.detach().to(dtype).contiguous()
        state[f"{name}.lora_up.weight"] = layer.up.weight.detach().to(dtype).contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(layer.alpha), dtype=dtype)
    return state


def canonical_key(key: str) -> str:
    """Checkpoints of the first run named text-encoder modules without ``text_model_`` (transformers 5's paths)."""
    if key.startswith("lora_te_") and not key.startswith("lora_te_text_model_"):
        return "lora_te_text_model_" + key.removeprefix("lora_te_")
    return key


def load_lora_state(layers: dict[str, LoraLayer], state: dict[str, torch.Tensor]) -> None:
    state = {canonical_key(key): value for key, value in state.items()}
    with torch.no_grad():
        for name, layer in layers.items():
            layer.down.weight.copy_(state[f"{name}.lora_down.weight"])
            layer.up.weight.copy_(state[f"{name}.lora_up.weight"])


def resume_lora_run(args: argparse.Namespace, layers: dict[str, LoraLayer],
                    optimizer: torch.optim.Optimizer) -> int:
    """With ``--resume`` and a checkpoint in ``args.out``: load the LoRA layers and the optimizer, and
    return the step reached; else 0."""
    if not (args.resume and (args.out / "ckpt").exists()):
        return 0
    from safetensors.torch import load_file

    load_lora_state(layers, load_file(str(args.out / "ckpt" / "lora.safetensors")))
    common.load_optimizer(optimizer, args.out / "ckpt" / "optimizer.safetensors")
    return common.read_state(args.out)["step"]


def kohya_metadata(args: argparse.Namespace, step: int, base_hash: str) -> dict[str, str]:
    """kohya's ``ss_*`` training keys (strings, as sd-scripts writes them)."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(args.rank),
        "ss_network_alpha": f"{args.alpha:g}",
        "ss_network_args": json.dumps({"conv_dim": str(args.conv_rank), "conv_alpha": str(args.conv_rank)})
        if args.conv_rank else "null",
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": EMBEDDED_MODEL_DIR.name,
        "ss_new_sd_model_hash": base_hash,
        "ss_output_name": args.concept,
        "ss_resolution": f"({args.res}, {args.res})",
        "ss_steps": str(step),
        "ss_batch_size_per_device": str(args.batch),
        "ss_learning_rate": f"{args.lr:g}",
        "ss_unet_lr": f"{args.lr:g}",
        "ss_text_encoder_lr": f"{args.lr if args.te else 0:g}",
        "ss_min_snr_gamma": "5",
        "ss_seed": str(args.seed),
        "ss_training_comment": f"sd-app pipelines.training.lora: teaches '{args.concept}' to the embedded model",
    }


def concept_attributes(concept: str, n: int, seed: int) -> list[shapes.ShapeAttributes]:
    return shapes.dataset(seed, n, kinds=(concept,))


@torch.no_grad()
def encoded_latents(vae: torch.nn.Module, attrs: list[shapes.ShapeAttributes], res: int, name: str,
                    runtime: common.Runtime, root: Path = data.DATA_DIR) -> np.ndarray:
    """Cached unscaled posterior means (N, 4, res/8, res/8) float16 of the drawings of ``attrs``."""
    path = root / f"latents-{name}.npy"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        out = np.zeros((len(attrs), 4, res // 8, res // 8), np.float16)
        for start in tqdm(range(0, len(attrs), 16), desc=f"encoding {len(attrs)} x {res}px", mininterval=10):
            chunk = np.stack([data.render(a, res) for a in attrs[start : start + 16]])
            with runtime.autocast():
                posterior = vae.encode(data.to_unit(chunk).to(runtime.device)).latent_dist
                out[start : start + 16] = posterior.mean.float().cpu()
        np.save(path.with_suffix(".tmp.npy"), out)
        path.with_suffix(".tmp.npy").rename(path)
    return np.load(path)


def save_run(out: Path, layers: dict[str, LoraLayer], optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``out/ckpt`` atomically: the LoRA (fp32, kohya keys), optimizer moments, state.json."""
    from safetensors.torch import save_file

    tmp, final, old = out / "ckpt.tmp", out / "ckpt", out / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(lora_state(layers), str(tmp / "lora.safetensors"))
    common.save_optimizer(optimizer, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def tokenize(captions: list[str]) -> torch.Tensor:
    from pipelines.training.clip import tokenize as clip_tokenize

    return clip_tokenize(captions)  # (B, 77)


def train(args: argparse.Namespace, runtime: common.Runtime) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(EMBEDDED_MODEL_DIR, subfolder="unet", torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(EMBEDDED_MODEL_DIR, subfolder="text_encoder", dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(EMBEDDED_MODEL_DIR, subfolder="vae", torch_dtype=torch.float32)
    for model in (unet, text_encoder, vae):
        model.to(runtime.device).requires_grad_(False)
    vae.eval()
    torch.manual_seed(args.seed)
    layers = inject(unet, "unet", UNET_TARGETS, args.rank, args.conv_rank, args.alpha)
    if args.te:
        layers.update(inject(text_encoder, "text_encoder", TE_TARGETS, args.rank, 0, args.alpha))
    params = [p for layer in layers.values() for p in (layer.down.weight, layer.up.weight)]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    start = resume_lora_run(args, layers, optimizer)

    vae_id = weights_id(EMBEDDED_MODEL_DIR / "vae")
    concept = concept_attributes(args.concept, args.n_concept, CONCEPT_SEED + args.seed)
    world = shapes.dataset(data.TRAIN_SEED + 17 + args.seed, args.n_world)
    concept_latents = encoded_latents(vae, concept, args.res, f"vae{vae_id}-{args.concept}-s{CONCEPT_SEED + args.seed}"
                                      f"-n{args.n_concept}-{args.res}", runtime)
    world_latents = encoded_latents(vae, world, args.res, f"vae{vae_id}-world-s{data.TRAIN_SEED + 17 + args.seed}"
                                    f"-n{args.n_world}-{args.res}", runtime)
    latents = np.concatenate([concept_latents, world_latents])  # (N, 4, h, w)
    captions = [shapes.caption(a) for a in concept + world]
    is_concept = np.arange(len(captions)) < len(concept)
    scale = vae.config.scaling_factor
    noise_schedule = DDPMScheduler(**SCHEDULE)
    log = common.Log(args.out / "log.jsonl")
    generator = torch.Generator().manual_seed(args.seed * 1000 + start)
    rng = np.random.default_rng([args.seed, start])
    monitor = concept_attributes(args.concept, args.monitor, MONITOR_SEED) + shapes.dataset(MONITOR_SEED, args.monitor)
    unet.train()
    text_encoder.train()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f"lora-{args.concept}", mininterval=10)
    running = None
    started = time.time()
    for step in bar:
        n_concept = int(round(args.batch * args.p_concept))
        index = np.concatenate([rng.choice(np.flatnonzero(is_concept), n_concept),
                                rng.choice(np.flatnonzero(~is_concept), args.batch - n_concept)])
        x0 = torch.from_numpy(latents[index]).float() * scale  # (B, 4, h, w)
        flip = (torch.rand(len(index), generator=generator) < 0.5).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        x0 = torch.where(flip, x0.flip(-1), x0).to(runtime.device)
        texts = [EMPTY if torch.rand(1, generator=generator).item() < args.p_uncond else captions[i] for i in index]
        noise = torch.randn(x0.shape, generator=generator).to(runtime.device)  # (B, 4, h, w)
        t = torch.randint(0, 1000, (len(index),), generator=generator).to(runtime.device)  # (B,)
        noisy = noise_schedule.add_noise(x0, noise, t)  # (B, 4, h, w)
        for group in optimizer.param_groups:
            group["lr"] = common.warmup_lr(step, args.lr, 100)
        with runtime.autocast():
            states = text_encoder(input_ids=tokenize(texts).to(runtime.device)).last_hidden_state  # (B, 77, D)
            pred = unet(noisy, t, encoder_hidden_states=states).sample.float()
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        loss = (per_sample * min_snr_weights(noise_schedule.alphas_cumprod, t, 5.0).to(runtime.device)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        done = step + 1
        if done % 50 == 0:
            log.write(step=done, loss=round(running, 5))
        if done % args.ckpt_every == 0 or done == args.steps:
            state = {"step": done, "wall_s": round(time.time() - started, 1), "loss_ema": running,
                     **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
            if args.monitor:
                state["monitor"] = monitor_fidelity(unet, text_encoder, vae, monitor, args, runtime)
                log.write(step=done, **{f"{k}_{a}": v for k, r in state["monitor"].items() for a, v in r.items()})
                tqdm.write(f"step {done}: loss {running:.4f} {json.dumps(state['monitor'])}")
            save_run(args.out, layers, optimizer, state)


@torch.no_grad()
def monitor_fidelity(unet: torch.nn.Module, text_encoder: torch.nn.Module, vae: torch.nn.Module,
                     monitor: list[shapes.ShapeAttributes], args: argparse.Namespace,
                     runtime: common.Runtime) -> dict[str, dict[str, float]]:
    """Oracle fidelity of the monitor prompts (new concept, base world) sampled with the LoRA at ``--res``."""
    unet.eval()
    text_encoder.eval()
    with runtime.autocast():
        states = text_encoder(input_ids=tokenize([shapes.caption(a) for a in monitor] + [EMPTY])).last_hidden_state
    states = states.float()
    images = sample(unet, vae, states[:-1], states[-1:], runtime, args.res)
    unet.train()
    text_encoder.train()
    half = args.monitor
    return {"concept": oracle_fidelity(images[:half], monitor[:half]),
            "world": oracle_fidelity(images[half:], monitor[half:])}


def save_lora_file(tensors: dict[str, torch.Tensor], out: Path, metadata: dict[str, str], fp16: bool = True) -> Path:
    """Write a trained LoRA (fp16 by default) with ``metadata`` and kohya's ``sshs_model_hash`` of its tensors."""
    from safetensors.torch import save, save_file

    from pipelines.models.hashing import safetensors_data_sha256

    if fp16:
        tensors = {k: v.half().contiguous() for k, v in tensors.items()}
    metadata = {**metadata, "sshs_model_hash": safetensors_data_sha256(save(tensors))}  # tensor bytes only
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return out


def export(run: Path, out: Path, fp16: bool = True) -> Path:
    """The run's last checkpoint as a kohya-format LoRA file (fp16 by default) with ``ss_*`` metadata."""
    from safetensors.torch import load_file

    from pipelines.models.hashing import file_hash

    state = common.read_state(run)
    tensors = {canonical_key(k): v for k, v in load_file(str(run / "ckpt" / "lora.safetensors")).items()}
    args = argparse.Namespace(**{k: state[k] for k in ("rank", "alpha", "conv_rank", "concept", "res", "batch",
                                                       "lr", "te", "seed")})
    base_hash = file_hash(EMBEDDED_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors")
    return save_lora_file(tensors, out, kohya_metadata(args, state["step"], base_hash), fp16)


def main(argv: list[str] | None = None) -> None:
    parser = common.base_parser(__doc__.splitlines()[0], "runs/lora-hexagon", steps=1500, batch=8, lr=5e-4)
    parser.add_argument("--concept", default="hexagon", choices=shapes.EXTRA_SHAPES, help="the new shape")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the linear / 1x1 layers")
    parser.add_argument("--alpha", type=float, default=8.0, help="LoRA alpha (scale alpha / rank)")
    parser.add_argument("--conv-rank", type=int, default=4, help="rank of the resnets' 3x3 convs (LoCon); 0: none")
    parser.add_argument("--no-te", dest="te", action="store_false", help="leave the text encoder alone")
    parser.add_argument("--res", type=int, default=512, help="image side of the training latents")
    parser.add_argument("--n-concept", type=int, default=800, help="drawings of the new concept")
    parser.add_argument("--n-world", type=int, default=800, help="drawings of the base world (kept as it is)")
    parser.add_argument("--p-concept", type=float, default=0.5, help="share of the new concept in a batch")
    parser.add_argument("--p-uncond", type=float, default=0.1)
    parser.add_argument("--monitor", type=int, default=8, help="prompts of each kind judged per checkpoint")
    parser.add_argument("--export", type=Path, default=None, help="write the run's LoRA (fp16) here and stop")
    parser.add_argument("--fp32", action="store_true", help="export in fp32")
    parser.add_argument("--evaluate", type=Path, default=None, help="judge this LoRA (file or PEFT folder)")
    parser.add_argument("--pairs", type=int, default=48, help="prompt x seed pairs of --evaluate")
    args = parser.parse_args(argv)
    if args.export is not None:
        path = export(args.out, args.export, fp16=not args.fp32)
        print(f"wrote {path} ({path.stat().st_size} bytes)")
        return
    if args.evaluate is not None:
        from pipelines.training.evaluate_lora import main as evaluate

        evaluate(args.evaluate, args.concept, args.pairs, args.threads)
        return
    train(args, common.setup(args))


if __name__ == "__main__":
    main()
