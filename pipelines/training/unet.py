"""Train the tiny U-Net: text-conditioned latent diffusion on cached VAE latents.

DDPM's epsilon-prediction objective (Ho et al. 2020) on Stable Diffusion's noise schedule
(scaled_linear betas 0.00085..0.012, 1000 steps) in the frozen VAE's latent space, with
cross-attention to the frozen tiny-CLIP text tower's last hidden state (Rombach et al. 2022).
About 10% of captions are dropped to "" so classifier-free guidance works; an EMA of the weights
is kept for sampling. The loss is Min-SNR weighted (Hang et al. 2023) and latents are flipped
left-right at random (every caption stays true). Latents are encoded once and cached; most steps run
at 256x256 images (32x32 latents) and a fine-tune at 512x512 (64x64), the resolution inference uses,
as Stable Diffusion itself was trained.

    python -m pipelines.training.unet --res 256 --n-latents 6000 --batch 32 --steps 8000 --out runs/unet
    python -m pipelines.training.unet --res 512 --n-latents 2000 --batch 8 --steps 11000 --lr 5e-4 \
        --out runs/unet --resume

``--init-from pipelines/embedded/shapes-tiny`` fine-tunes the shipped model instead (its U-Net, and
the text encoder and VAE it was trained against) when the original runs are gone.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipelines.training import common, data, shapes

EMPTY = ""  # the unconditional caption of classifier-free guidance
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def unet_config(cross_attention_dim: int = 128) -> dict:
    """4 levels (32, 64, 128, 128), cross-attention on the middle two and the mid block: 5.8M parameters.

    SD's layout shrunk: the deepest level sees the whole 64x64 latent at 8x8, so a shape 30 latent
    pixels wide is drawn coherently; it costs no more per step than 3 levels (32, 64, 96) did.
    """
    return dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=[32, 64, 128, 128],
                layers_per_block=1,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8)


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B,) Min-SNR-gamma loss weights for epsilon prediction, min(SNR, gamma) / SNR (Hang et al. 2023).

    Low-noise steps (high SNR) dominate plain epsilon MSE yet decide little; capping their weight
    spends the updates on the noisy steps where layout and colours are decided. gamma <= 0: all ones.
    """
    if gamma <= 0:
        return torch.ones(t.shape)
    alphas = alphas_cumprod[t.cpu()]  # (B,)
    snr = alphas / (1 - alphas)
    return snr.clamp(max=gamma) / snr


@torch.no_grad()
def caption_states(text_model: torch.nn.Module, captions: list[str], runtime: common.Runtime) -> torch.Tensor:
    """(N, 77, D) last hidden states of the frozen text tower, as the SD pipeline computes them."""
    from pipelines.training.clip import tokenize

    ids = tokenize(captions).to(runtime.device)  # (N, 77)
    return text_model(input_ids=ids).last_hidden_state.float()  # (N, 77, D)


@torch.no_grad()
def latent_set(vae: torch.nn.Module, vae_id: str, res: int, n: int, seed: int, runtime: common.Runtime,
               root: Path = data.DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Cached (unscaled posterior means (N, 4, res/8, res/8) float16, labels (N,)) of n drawings.

    ``vae_id`` names the exact VAE weights (see :func:`weights_id`), so a retrained VAE never reuses
    another's cache.
    """
    stem = root / f"latents-vae{vae_id}-s{seed}-n{n}-{res}"
    latents_path, labels_path = stem.with_suffix(".latents.npy"), stem.with_suffix(".labels.npy")
    if not latents_path.exists():
        root.mkdir(parents=True, exist_ok=True)
        attrs = shapes.dataset(seed, n)
        index = data.caption_index()
        out = np.zeros((n, 4, res // 8, res // 8), np.float16)
        vae.eval()
        for start in tqdm(range(0, n, 16), desc=f"encoding {n} x {res}px", mininterval=10):
            chunk = np.stack([data.render(a, res) for a in attrs[start : start + 16]])
            pixels = data.to_unit(chunk).to(runtime.device)  # (b, 3, res, res)
            with runtime.autocast():
                out[start : start + 16] = vae.encode(pixels).latent_dist.mean.float().cpu().numpy()
        np.save(labels_path, np.array([index[shapes.caption(a)] for a in attrs], np.int64))
        np.save(latents_path, out)
    return np.load(latents_path), np.load(labels_path)


@torch.no_grad()
def sample(unet: torch.nn.Module, vae: torch.nn.Module, states: torch.Tensor, empty: torch.Tensor,
           runtime: common.Runtime, res: int, steps: int = 20, cfg: float = 7.0,
           seed: int = 0) -> torch.Tensor:
    """DPM-Solver++ with classifier-free guidance; states (B, 77, D) -> images (B, 3, res, res) in [-1, 1]."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(**SCHEDULE)
    scheduler.set_timesteps(steps)
    b = states.shape[0]
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((b, 4, res // 8, res // 8), generator=generator).to(runtime.device)  # (B, 4, h, w)
    context = torch.cat([empty.expand(b, -1, -1), states])  # (2B, 77, D)
    for t in scheduler.timesteps:
        with runtime.autocast():
            eps = unet(torch.cat([latents, latents]), t, encoder_hidden_states=context).sample.float()
        uncond, cond = eps.chunk(2)  # (B, 4, h, w) each
        latents = scheduler.step(uncond + cfg * (cond - uncond), t, latents).prev_sample
    with runtime.autocast():
        return vae.decode(latents / vae.config.scaling_factor).sample.float().clamp(-1, 1)


def oracle_fidelity(images: torch.Tensor, attrs: list[shapes.ShapeAttributes]) -> dict[str, float]:
    """Fraction of images the pixel oracle finds all right, and per attribute."""
    from PIL import Image

    verdicts = []
    for image, a in zip(images, attrs):
        array = ((image.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        verdicts.append(shapes.judge(Image.fromarray(array), a))
    return shapes.fidelity(verdicts)


def main(argv: list[str] | None = None) -> None:
    parser = common.base_parser(__doc__.splitlines()[0], "runs/unet", steps=8000, batch=32, lr=1e-3)
    parser.add_argument("--clip", type=Path, default=Path("runs/clip"), help="CLIP run (text tower)")
    parser.add_argument("--vae", type=Path, default=Path("runs/vae"), help="VAE run")
    parser.add_argument("--res", type=int, default=256, help="image side of the training latents")
    parser.add_argument("--n-latents", type=int, default=6000)
    parser.add_argument("--p-uncond", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR loss weighting; 0 disables")
    parser.add_argument("--p-flip", type=float, default=0.5,
                        help="horizontal flips (captions stay true: triangles and stars stay upright)")
    parser.add_argument("--monitor", type=int, default=16, help="prompts sampled and judged per checkpoint")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="an exported model folder to fine-tune (its unet/, text_encoder/ and vae/) "
                             "instead of a fresh U-Net on --clip/--vae")
    args = parser.parse_args(argv)
    train(args, common.setup(args))


def write_frozen(text_encoder: torch.nn.Module, vae: torch.nn.Module, frozen: Path, state: dict) -> None:
    """The text encoder and VAE a U-Net is trained against, saved in ``frozen`` with where they came from."""
    text_encoder.save_pretrained(frozen / "text_encoder")
    vae.save_pretrained(frozen / "vae")
    (frozen / "state.json").write_text(json.dumps(state, indent=1))


def freeze(clip_run: Path, vae_run: Path, frozen: Path) -> None:
    """Copy the CLIP text tower (as a CLIPTextModel) and the VAE of the last checkpoints into ``frozen``.

    The U-Net depends on exactly these two; CLIP and VAE runs may go on training without breaking it.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPModel, CLIPTextModel

    clip = CLIPModel.from_pretrained(str(clip_run / "ckpt" / "clip"))
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    state = {"clip_run": str(clip_run), "clip_step": common.read_state(clip_run)["step"],
             "vae_run": str(vae_run), "vae_step": common.read_state(vae_run)["step"]}
    write_frozen(text_encoder, AutoencoderKL.from_pretrained(str(vae_run / "ckpt" / "vae")), frozen, state)


def freeze_from_model(model: Path, frozen: Path) -> None:
    """Copy an exported model's text encoder and VAE (as fp32) into ``frozen``, with their provenance."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    provenance = json.loads((model / "provenance.json").read_text())
    state = {"init_from": str(model), "clip_step": provenance["frozen"]["clip_step"],
             "vae_step": provenance["frozen"]["vae_step"], "clip_run": provenance["frozen"]["clip_run"],
             "vae_run": provenance["frozen"]["vae_run"], "unet_step": provenance["unet"]["step"]}
    write_frozen(CLIPTextModel.from_pretrained(str(model / "text_encoder"), dtype=torch.float32),
                 AutoencoderKL.from_pretrained(str(model / "vae"), torch_dtype=torch.float32), frozen, state)


def weights_id(folder: Path) -> str:
    """Short sha256 of a model folder's safetensors files: names the exact weights in cache names."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def train(args: argparse.Namespace, runtime: common.Runtime) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    frozen = args.out / "frozen"  # the text encoder and VAE this U-Net is trained against
    if not (frozen / "state.json").exists():
        if args.init_from:
            freeze_from_model(args.init_from, frozen)
        else:
            freeze(args.clip, args.vae, frozen)
    text_model = CLIPTextModel.from_pretrained(str(frozen / "text_encoder")).to(runtime.device).eval()
    vae = AutoencoderKL.from_pretrained(str(frozen / "vae")).to(runtime.device).eval()
    vae.requires_grad_(False)
    frozen_state = json.loads((frozen / "state.json").read_text())
    vae_step = frozen_state["vae_step"]
    captions = shapes.all_captions()
    states = caption_states(text_model, captions + [EMPTY], runtime)  # (C + 1, 77, D)
    empty_index = len(captions)
    seed = data.TRAIN_SEED + args.seed
    latents, labels = latent_set(vae, weights_id(frozen / "vae"), args.res, args.n_latents, seed, runtime)
    scale = vae.config.scaling_factor

    start = 0
    if args.resume and (args.out / "ckpt").exists():
        unet = UNet2DConditionModel.from_pretrained(str(args.out / "ckpt" / "unet"))
        ema = UNet2DConditionModel.from_pretrained(str(args.out / "ckpt" / "unet_ema"))
        start = common.read_state(args.out)["step"]
    elif args.init_from:
        unet = UNet2DConditionModel.from_pretrained(str(args.init_from / "unet"), torch_dtype=torch.float32)
        ema = copy.deepcopy(unet)
    else:
        unet = UNet2DConditionModel(**unet_config(states.shape[-1]))
        ema = copy.deepcopy(unet)
    unet.to(runtime.device).train()
    ema.to(runtime.device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    if start:
        common.load_optimizer(optimizer, args.out / "ckpt" / "optimizer.safetensors")
    noise_schedule = DDPMScheduler(**SCHEDULE)
    log = common.Log(args.out / "log.jsonl")
    generator = torch.Generator().manual_seed(args.seed * 1000 + start)
    batch_iter = common.batches(len(latents), args.batch, args.seed, start)
    monitor = shapes.dataset(424242, args.monitor)
    monitor_states = states[[captions.index(shapes.caption(a)) for a in monitor]]  # (M, 77, D)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f"unet@{args.res}",
               mininterval=10)
    running = None
    for step in bar:
        index = np.sort(next(batch_iter))
        x0 = torch.from_numpy(latents[index]).float() * scale  # (B, 4, h, w)
        flip = (torch.rand(len(index), generator=generator) < args.p_flip).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        x0 = torch.where(flip, x0.flip(-1), x0).to(runtime.device)  # (B, 4, h, w)
        cond = torch.from_numpy(labels[index])
        drop = torch.rand(len(index), generator=generator) < args.p_uncond
        cond = torch.where(drop, torch.full_like(cond, empty_index), cond)
        noise = torch.randn(x0.shape, generator=generator).to(runtime.device)  # (B, 4, h, w)
        t = torch.randint(0, 1000, (len(index),), generator=generator).to(runtime.device)  # (B,)
        noisy = noise_schedule.add_noise(x0, noise, t)  # (B, 4, h, w)
        for group in optimizer.param_groups:
            group["lr"] = common.warmup_lr(step, args.lr, 200)
        with runtime.autocast():
            pred = unet(noisy, t, encoder_hidden_states=states[cond.to(runtime.device)]).sample.float()
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        weights = min_snr_weights(noise_schedule.alphas_cumprod, t, args.snr_gamma).to(runtime.device)  # (B,)
        loss = (per_sample * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        update_ema(ema, unet, min(args.ema_decay, (1 + step) / (10 + step)))
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        done = step + 1
        if done % 50 == 0:
            log.write(step=done, loss=round(running, 5), res=args.res)
        if done % args.ckpt_every == 0 or done == args.steps:
            save = {"step": done, "seed": args.seed, "batch": args.batch, "lr": args.lr, "res": args.res,
                    "n_latents": args.n_latents, "snr_gamma": args.snr_gamma, "p_flip": args.p_flip,
                    "loss_ema": running, "vae_step": vae_step,
                    "clip_step": frozen_state["clip_step"]}
            if "init_from" in frozen_state:
                save["init_from"] = frozen_state["init_from"]
                save["init_unet_step"] = frozen_state["unet_step"]
            if args.monitor:
                empty = states[empty_index : empty_index + 1]  # (1, 77, D)
                images = sample(ema, vae, monitor_states, empty, runtime, args.res)
                save["monitor_fidelity"] = oracle_fidelity(images, monitor)
                log.write(step=done, **{f"fidelity_{k}": v for k, v in save["monitor_fidelity"].items()})
                tqdm.write(f"step {done}: loss {running:.4f} fidelity {json.dumps(save['monitor_fidelity'])}")
            common.save_checkpoint(args.out, {"unet": unet, "unet_ema": ema}, optimizer, save)


if __name__ == "__main__":
    main()
