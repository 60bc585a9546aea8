"""Train the tiny VAE: a diffusers AutoencoderKL mapping 512x512x3 pixels to 64x64x4 latents.

Loss = L1 + MSE reconstruction + a small KL(q(z|x) || N(0, I)), i.e. a beta-weighted negative ELBO
(Kingma & Welling 2014); the KL keeps the latent space regular, reconstruction keeps it sharp.
Trained on random 128x128 crops (the model is convolutional), then the latent standard deviation is
measured on 512x512 drawings and ``scaling_factor = 1 / std`` is written to its config, as in latent
diffusion (Rombach et al. 2022).

    python -m pipelines.training.vae --steps 2000 --out runs/vae [--resume]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipelines.training import common, data, shapes


def vae_config() -> dict:
    """4 blocks -> 8x downsampling, 4 latent channels, 1.25M parameters.

    8 norm groups, not 32: a group of one channel is instance norm, which erases the absolute colour
    of a flat crop (most of this world).
    """
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 64, 64, 64],
                layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=512,
                scaling_factor=0.5)


def load_trained(out: Path = Path("runs/vae")) -> torch.nn.Module:
    """The last checkpoint's AutoencoderKL (with its measured scaling_factor)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(out / "ckpt" / "vae"))


@torch.no_grad()
def measure_scaling(vae: torch.nn.Module, runtime: common.Runtime, n: int = 16, seed: int = 7) -> float:
    """1 / std of the posterior means of ``n`` 512x512 drawings."""
    vae.eval()
    latents = []
    for attrs in shapes.dataset(seed, n):
        pixels = data.to_unit(data.render(attrs, 512)[None]).to(runtime.device)  # (1, 3, 512, 512)
        with runtime.autocast():
            latents.append(vae.encode(pixels).latent_dist.mean.float().cpu())  # (1, 4, 64, 64)
    vae.train()
    return float(1.0 / torch.cat(latents).std())


@torch.no_grad()
def reconstruction_psnr(vae: torch.nn.Module, images: np.ndarray, runtime: common.Runtime) -> float:
    """Mean PSNR (dB) of mean-latent reconstructions of uint8 images."""
    vae.eval()
    psnrs = []
    for start in range(0, len(images), 8):
        x = data.to_unit(images[start : start + 8]).to(runtime.device)  # (b, 3, H, W)
        with runtime.autocast():
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
        psnrs.append(data.unit_psnr(y, x))  # (b,)
    vae.train()
    return float(torch.cat(psnrs).mean())


def main(argv: list[str] | None = None) -> None:
    parser = common.base_parser(__doc__.splitlines()[0], "runs/vae", steps=2000, batch=8, lr=4e-4)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--kl-weight", type=float, default=1e-6, help="weight of the summed KL per image")
    parser.add_argument("--n-train", type=int, default=2000)
    args = parser.parse_args(argv)
    train(args, common.setup(args))


def train(args: argparse.Namespace, runtime: common.Runtime) -> None:
    from diffusers import AutoencoderKL

    images, _ = data.image_set(data.TRAIN_SEED + args.seed, args.n_train, 256)
    eval_images, _ = data.image_set(data.HELDOUT_SEED, 32, 256)
    start = 0
    if args.resume and (args.out / "ckpt").exists():
        vae = AutoencoderKL.from_pretrained(str(args.out / "ckpt" / "vae"))
        start = common.read_state(args.out)["step"]
    else:
        vae = AutoencoderKL(**vae_config())
    vae.to(runtime.device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    if start:
        common.load_optimizer(optimizer, args.out / "ckpt" / "optimizer.safetensors")
    log = common.Log(args.out / "log.jsonl")
    rng = np.random.default_rng([args.seed, start])
    generator = torch.Generator().manual_seed(args.seed * 1000 + start)
    batch_iter = common.batches(len(images), args.batch, args.seed, start)
    side = images.shape[1]
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="vae", mininterval=10)
    for step in bar:
        index = np.sort(next(batch_iter))
        ys, xs = rng.integers(0, side - args.crop + 1, size=(2, len(index)))
        crops = np.stack([images[i, y : y + args.crop, x : x + args.crop] for i, y, x in zip(index, ys, xs)])
        x = data.to_unit(crops).to(runtime.device)  # (B, 3, crop, crop)
        for group in optimizer.param_groups:
            group["lr"] = common.warmup_lr(step, args.lr, 100)
        with runtime.autocast():
            posterior = vae.encode(x).latent_dist
            on_cpu = runtime.device.type == "cpu"
            z = posterior.sample(generator=generator if on_cpu else None)  # (B, 4, h, w)
            recon = vae.decode(z).sample.float()  # (B, 3, crop, crop)
        l1, mse = F.l1_loss(recon, x), F.mse_loss(recon, x)
        kl = posterior.kl().float().mean()
        loss = l1 + mse + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(l1=f"{l1.item():.4f}", kl=f"{kl.item():.0f}", refresh=False)
        done = step + 1
        if done % 25 == 0:
            log.write(step=done, loss=round(loss.item(), 5), l1=round(l1.item(), 5), kl=round(kl.item(), 1))
        if done % args.ckpt_every == 0 or done == args.steps:
            scaling = measure_scaling(vae, runtime)
            vae.register_to_config(scaling_factor=scaling)
            psnr = reconstruction_psnr(vae, eval_images, runtime)
            log.write(step=done, psnr=round(psnr, 2), scaling_factor=round(scaling, 4))
            tqdm.write(f"step {done}: l1 {l1.item():.4f} kl {kl.item():.0f} psnr {psnr:.2f} dB "
                       f"scaling {scaling:.4f}")
            state = {"step": done, "seed": args.seed, "batch": args.batch, "lr": args.lr, "crop": args.crop,
                     "kl_weight": args.kl_weight, "psnr_db": psnr, "scaling_factor": scaling}
            common.save_checkpoint(args.out, {"vae": vae}, optimizer, state)


if __name__ == "__main__":
    main()
