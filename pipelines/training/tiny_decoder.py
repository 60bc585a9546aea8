"""Train the embedded model's tiny decoder: its latents to 512x512 pixels in a fraction of the VAE decoder's time.

The architecture is TAESD's decoder (Ollin Boer Bohan, "Tiny AutoEncoder for Stable Diffusion"; diffusers'
``AutoencoderTiny``): a tanh clamp, 3x3 convolutions with ReLU in residual blocks, nearest 2x upsampling,
no normalisation and no attention. TAESD's 64 channels and 3/3/3/1 blocks are sized for real photographs;
this world of flat shapes needs far less, so the default is 32 channels and 2/2/1/0 blocks (no block at full
resolution, where a 3x3 convolution costs most). Like TAESD it reads the latents the U-Net works in
(the VAE's posterior means times its ``scaling_factor``; its own ``scaling_factor`` is 1).

Loss: L1 + MSE between the decoded crop and the drawing the latents encode (the shipped VAE's encodings of
drawings of the shapes world), on random 32x32 latent crops (256x256 pixels: the model is convolutional).
A little Gaussian noise on the latents (``--latent-noise``) teaches it the U-Net's not-quite-encoder
latents too. Each checkpoint reports the PSNR of held-out drawings through the full VAE and through the
tiny decoder, from the same latents.

``--generated N`` adds latents the U-Net generated (:mod:`pipelines.training.generated_latents`: a default
20-step request and, with ``--generated-lora``, 4-step LCM) with the full VAE decoder's picture as the
target, ``--generated-share`` of each batch; its last 16 (4-step ones with a LoRA) are held out and
reported as the tiny decoder's PSNR against the VAE decoder. ``--init DIR`` starts from a tiny decoder
folder (e.g. the shipped one).

    python -m pipelines.training.tiny_decoder --steps 3000 --out runs/tiny-decoder [--resume]
    python -m pipelines.training.tiny_decoder --init pipelines/embedded/shapes-tiny/vae_decoder_tiny \\
        --generated 512 --generated-lora runs/lcm-ft/lcm-shapes-ft-step1000.safetensors --steps 600 \\
        --lr 2e-4 --out runs/tiny-decoder-gen
    python -m pipelines.training.tiny_decoder --out runs/tiny-decoder \\
        --export pipelines/embedded/shapes-tiny/vae_decoder_tiny
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipelines.models.shipped import EMBEDDED_MODEL_DIR
from pipelines.models.tiny_decoder import TAESD_CONFIG, save_tiny_decoder
from pipelines.training import common, data, shapes
from pipelines.training.unet import latent_set, weights_id

LATENT_CROP = 32  # latent pixels per side of a training crop (x8 image pixels)
HELDOUT_IMAGES = 16
HELDOUT_GENERATED = 16  # the generated set's last latents, never trained on


def decoder_config(channels: int, blocks: tuple[int, ...]) -> dict:
    """An ``AutoencoderTiny`` config: TAESD's, with the decoder's width and depth replaced."""
    return {**TAESD_CONFIG, "decoder_block_out_channels": [channels] * len(blocks), "num_decoder_blocks": list(blocks)}


@torch.no_grad()
def heldout_psnr(tiny: torch.nn.Module, vae: torch.nn.Module, runtime: common.Runtime) -> dict[str, float]:
    """Mean PSNR of held-out 512x512 drawings decoded from their scaled latents by the tiny decoder and the VAE."""
    tiny.eval()
    attrs = shapes.dataset(data.HELDOUT_SEED, HELDOUT_IMAGES)
    images = data.to_unit(np.stack([data.render(a, 512) for a in attrs])).to(runtime.device)  # (N, 3, 512, 512)
    out: dict[str, list[torch.Tensor]] = {"tiny": [], "vae": []}
    for chunk in images.split(4):
        with runtime.autocast():
            latents = vae.encode(chunk).latent_dist.mean * vae.config.scaling_factor  # (b, 4, 64, 64)
            out["tiny"].append(data.unit_psnr(tiny(latents.float()), chunk).cpu())
            out["vae"].append(data.unit_psnr(vae.decode(latents / vae.config.scaling_factor).sample, chunk).cpu())
    tiny.train()
    return {name: float(torch.cat(values).mean()) for name, values in out.items()}


@torch.no_grad()
def generated_psnr(tiny: torch.nn.Module, latents: np.ndarray, pictures: np.ndarray, runtime: common.Runtime) -> float:
    """Mean PSNR of the tiny decoder's pictures of generated latents (N, 4, 64, 64) against the VAE decoder's
    (N, 512, 512, 3) uint8."""
    tiny.eval()
    values = []
    for start in range(0, len(latents), 4):
        z = torch.from_numpy(latents[start : start + 4]).float().to(runtime.device)
        target = data.to_unit(pictures[start : start + 4]).to(runtime.device)
        with runtime.autocast():
            values.append(data.unit_psnr(tiny(z).float().clamp(-1, 1), target).cpu())
    tiny.train()
    return float(torch.cat(values).mean())


def initial_decoder(folder: Path) -> torch.nn.Module:
    """A trainable ``AutoencoderTiny`` whose decoder is the tiny decoder folder's (its encoder is unused)."""
    from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny

    from pipelines.models.tiny_decoder import load_tiny_decoder

    shipped = load_tiny_decoder(folder, torch.float32)
    config = {k: v for k, v in shipped.config.items() if not k.startswith("_") and k != "block_out_channels"}
    model = AutoencoderTiny.from_config(config)
    model.decoder.load_state_dict(shipped.decoder.state_dict())
    return model


def export(run: Path, out: Path) -> Path:
    """The run's last checkpoint as a tiny decoder folder: config.json and the ``decoder.*`` weights in fp16.
    Inside a model folder with a ``provenance.json``, the run's state is recorded there as ``vae_decoder_tiny``."""
    from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny

    model = AutoencoderTiny.from_pretrained(str(run / "ckpt" / "decoder"))
    state = common.read_state(run)
    metadata = {"trained_by": "pipelines.training.tiny_decoder", "step": str(state["step"]),
                "heldout_psnr_db": f"{state['psnr_tiny_db']:.2f}", "vae_psnr_db": f"{state['psnr_vae_db']:.2f}"}
    folder = save_tiny_decoder(model, out, metadata)
    provenance = out.parent / "provenance.json"
    if provenance.is_file():
        record = json.loads(provenance.read_text())
        record["vae_decoder_tiny"] = state
        provenance.write_text(json.dumps(record, indent=1) + "\n")
    return folder


def train(args: argparse.Namespace, runtime: common.Runtime) -> None:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny

    vae = AutoencoderKL.from_pretrained(EMBEDDED_MODEL_DIR, subfolder="vae", torch_dtype=torch.float32)
    vae.to(runtime.device).requires_grad_(False).eval()
    scale = vae.config.scaling_factor
    start = 0
    if args.resume and (args.out / "ckpt").exists():
        model = AutoencoderTiny.from_pretrained(str(args.out / "ckpt" / "decoder"))
        start = common.read_state(args.out)["step"]
    elif args.init is not None:
        model = initial_decoder(args.init)
    else:
        model = AutoencoderTiny.from_config(decoder_config(args.channels, tuple(args.blocks)))
    model.to(runtime.device).train()
    params = list(model.decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    if start:
        common.load_optimizer(optimizer, args.out / "ckpt" / "optimizer.safetensors")
    latents, _ = latent_set(vae, weights_id(EMBEDDED_MODEL_DIR / "vae"), 512, args.n_latents, data.TRAIN_SEED,
                            runtime)  # (N, 4, 64, 64) float16, unscaled posterior means
    attrs = shapes.dataset(data.TRAIN_SEED, args.n_latents)  # the drawings those latents encode
    gen_latents = gen_pictures = None
    n_generated = round(args.batch * args.generated_share) if args.generated else 0
    if args.generated:
        from pipelines.training.generated_latents import generated_set

        gen_latents, gen_pictures = generated_set(data.DATA_DIR, args.generated, args.seed, args.generated_lora)
    log = common.Log(args.out / "log.jsonl")
    log.write(event="start", step=start, decoder_params=sum(p.numel() for p in params))
    rng = np.random.default_rng([args.seed, start])
    generator = torch.Generator().manual_seed(args.seed * 1000 + start)
    batch_iter = common.batches(len(attrs), args.batch, args.seed, start)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="tiny decoder", mininterval=20)
    crop, side = LATENT_CROP, latents.shape[-1]
    for step in bar:
        index = np.sort(next(batch_iter))[: args.batch - n_generated]
        ys, xs = rng.integers(0, side - crop + 1, size=(2, len(index)))
        z = np.stack([latents[i, :, y : y + crop, x : x + crop] for i, y, x in zip(index, ys, xs, strict=True)])
        pixels = np.stack([data.render(attrs[i], 512)[8 * y : 8 * (y + crop), 8 * x : 8 * (x + crop)]
                           for i, y, x in zip(index, ys, xs, strict=True)])
        z = torch.from_numpy(z).float() * scale  # (b, 4, crop, crop), as the U-Net sees them
        z = z + args.latent_noise * torch.randn(z.shape, generator=generator)
        if n_generated:
            picks = rng.integers(0, len(gen_latents) - HELDOUT_GENERATED, size=n_generated)
            ys, xs = rng.integers(0, side - crop + 1, size=(2, n_generated))
            z = torch.cat([z, torch.from_numpy(np.stack([gen_latents[i, :, y : y + crop, x : x + crop] for i, y, x
                                                         in zip(picks, ys, xs, strict=True)])).float()])
            pixels = np.concatenate([pixels, np.stack([
                gen_pictures[i, 8 * y : 8 * (y + crop), 8 * x : 8 * (x + crop)]
                for i, y, x in zip(picks, ys, xs, strict=True)])])
        target = data.to_unit(pixels).to(runtime.device)  # (B, 3, 8 crop, 8 crop)
        for group in optimizer.param_groups:
            group["lr"] = common.warmup_lr(step, args.lr, 100)
        with runtime.autocast():
            decoded = model.decoder(z.to(runtime.device)).float()  # (B, 3, 8 crop, 8 crop) in [-1, 1]
        l1, mse = F.l1_loss(decoded, target), F.mse_loss(decoded, target)
        loss = l1 + mse
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        bar.set_postfix(l1=f"{l1.item():.4f}", refresh=False)
        done = step + 1
        if done % 25 == 0:
            log.write(step=done, loss=round(loss.item(), 5), l1=round(l1.item(), 5))
        if done % args.ckpt_every == 0 or done == args.steps:
            scores = heldout_psnr(model.decoder, vae, runtime)
            log.write(step=done, psnr_tiny_db=round(scores["tiny"], 2), psnr_vae_db=round(scores["vae"], 2))
            message = (f"step {done}: l1 {l1.item():.4f}; held-out PSNR tiny {scores['tiny']:.2f} dB, "
                       f"VAE {scores['vae']:.2f} dB")
            state = {"step": done, "seed": args.seed, "batch": args.batch, "lr": args.lr, "channels": args.channels,
                     "blocks": list(args.blocks), "n_latents": args.n_latents, "latent_noise": args.latent_noise,
                     "psnr_tiny_db": scores["tiny"], "psnr_vae_db": scores["vae"]}
            if n_generated:
                held = slice(len(gen_latents) - HELDOUT_GENERATED, None)
                state["psnr_generated_db"] = generated_psnr(model.decoder, gen_latents[held], gen_pictures[held],
                                                            runtime)
                log.write(step=done, psnr_generated_db=round(state["psnr_generated_db"], 2))
                message += f"; generated latents against the VAE decoder {state['psnr_generated_db']:.2f} dB"
                state.update(init=str(args.init), generated=args.generated, generated_share=args.generated_share,
                             generated_lora=str(args.generated_lora))
            tqdm.write(message)
            common.save_checkpoint(args.out, {"decoder": model}, optimizer, state)


def main(argv: list[str] | None = None) -> None:
    parser = common.base_parser(__doc__.splitlines()[0], "runs/tiny-decoder", steps=3000, batch=8, lr=1e-3)
    parser.add_argument("--channels", type=int, default=32, help="decoder width (TAESD: 64)")
    parser.add_argument("--blocks", type=int, nargs=4, default=(2, 2, 1, 0),
                        help="residual blocks per resolution, lowest first (TAESD: 3 3 3 1)")
    parser.add_argument("--n-latents", type=int, default=1000, help="drawings encoded as training latents")
    parser.add_argument("--latent-noise", type=float, default=0.05, help="std of the noise added to scaled latents")
    parser.add_argument("--init", type=Path, default=None, help="a tiny decoder folder to start from")
    parser.add_argument("--generated", type=int, default=0,
                        help="latents generated by the U-Net, targets from the VAE decoder (multiple of 8; 0: none)")
    parser.add_argument("--generated-lora", type=Path, default=None,
                        help="an LCM-LoRA: half the generated latents are 4-step LCM ones")
    parser.add_argument("--generated-share", type=float, default=0.5, help="share of each batch from generated latents")
    parser.add_argument("--export", type=Path, default=None, help="write the run's tiny decoder folder here and stop")
    args = parser.parse_args(argv)
    if args.generated and args.generated <= HELDOUT_GENERATED:
        parser.error(f"--generated must be above the {HELDOUT_GENERATED} held-out latents, got {args.generated}")
    if args.export is not None:
        print(f"wrote {export(args.out, args.export)}")
        return
    train(args, common.setup(args))


if __name__ == "__main__":
    main()
