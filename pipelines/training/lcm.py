"""Distil the embedded model into an LCM-LoRA: good pictures in 4 steps without classifier-free guidance.

Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", Algorithm 1; "LCM-LoRA",
Luo et al. 2023): the frozen shipped U-Net is the teacher; the student is the same U-Net plus a low-rank
update of every Linear and Conv2d of its blocks (LCM-LoRA's targets: attention and feed-forward
projections, proj_in/out, resnet convs, time-embedding projections, down/up-samplers). Each step:

1. draw an index n on the 50-step DDIM grid t_n = 20 (n + 1) - 1 and noise a clean latent to t_{n+k};
2. student: f(z, t) = c_skip(t) z + c_out(t) x0_pred(z, t), the consistency parametrisation whose
   boundary conditions (sigma_data 0.5, timestep scaling 10, as diffusers' LCMScheduler) make f the
   identity at t = 0;
3. teacher (LoRA off): one DDIM step from t_{n+k} to t_n on the classifier-free-guided estimate
   x0 = x0_c + w (x0_c - x0_u) (the LCM paper's w, so CFG scale w + 1), w ~ U[w_min, w_max];
4. target: f(z_{t_n}, t_n) by the student itself without gradient (LCM-LoRA uses no separate EMA net);
5. pseudo-Huber loss sqrt((f - target)^2 + c^2) - c, c = 0.001.

``--ema D`` keeps an exponential moving average of the LoRA weights (the LCM paper's EMA, here of the
exported weights rather than the target net): the monitor samples with it and the export writes it.
``--init-lora FILE`` starts from an earlier LCM-LoRA file of the same rank (a re-distillation after the
teacher was fine-tuned).

``--trajectories N`` adds a second term: N trajectories of the teacher's own 20-step sampler at CFG 7
(:mod:`pipelines.training.teacher_trajectories`); the student's f at a point of one, at its timestep, is
pulled to that trajectory's end (pseudo-Huber, weight ``--trajectory-weight``). The consistency loss alone
learns the teacher's ODE one DDIM skip at a time; this term anchors f to the pictures the product draws.

Clean latents are the shipped VAE's encodings of drawings of the shapes world, with their captions
(:mod:`pipelines.training.data`, :mod:`pipelines.training.shapes`). The LoRA file is written in the layout
of ``latent-consistency/lcm-lora-sdv1-5`` (``pytorch_lora_weights.safetensors``: kohya-style
``lora_unet_<diffusers module path>.lora_down.weight / .lora_up.weight / .alpha``, U-Net only).

    python -m pipelines.training.lcm --threads 1 --steps 3000 --out runs/lcm
    python -m pipelines.training.lcm --threads 1 --steps 4000 --out runs/lcm --resume
    python -m pipelines.training.lcm --out runs/lcm --export pipelines/embedded/loras/lcm-shapes.safetensors
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipelines.models.lora_keys import kohya_name
from pipelines.models.shipped import EMBEDDED_MODEL_DIR
from pipelines.training import common, data, shapes
from pipelines.training.lora import (
    LoraLayer,
    encoded_latents,
    load_lora_state,
    lora_state,
    resume_lora_run,
    save_lora_file,
    save_run,
    tokenize,
)
from pipelines.training.unet import EMPTY, SCHEDULE, oracle_fidelity, weights_id

WORLD_SEED = data.TRAIN_SEED + 29  # drawings whose latents the distillation starts from
MONITOR_SEED = 515_151
TRAJECTORY_SEED = data.TRAIN_SEED + 31  # captions of the teacher trajectories
BLOCKS = ("down_blocks", "mid_block", "up_blocks")  # LCM-LoRA patches every Linear/Conv2d inside these
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0  # diffusers' LCMScheduler default


class SwitchableLora(LoraLayer):
    """A LoRA layer that can be switched off, so the frozen base U-Net serves as the teacher."""

    enabled: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        return super().forward(x)


def inject_everywhere(unet: torch.nn.Module, rank: int, alpha: float) -> dict[str, SwitchableLora]:
    """Wrap every Linear and Conv2d in the U-Net's down/mid/up blocks; returns kohya name -> layer."""
    layers: dict[str, SwitchableLora] = {}
    for path, module in list(unet.named_modules()):
        parts = path.split(".")
        if parts[0] not in BLOCKS or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        parent = unet.get_submodule(".".join(parts[:-1]))
        layer = SwitchableLora(module, rank, alpha)
        setattr(parent, parts[-1], layer)
        layers[kohya_name("unet", path)] = layer
    return layers


@contextlib.contextmanager
def lora_off(layers: dict[str, SwitchableLora]) -> Iterator[None]:
    """The base model (the teacher) inside the block."""
    for layer in layers.values():
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers.values():
            layer.enabled = True


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the consistency parametrisation at integer timesteps t (B,): c_skip(0) = 1, c_out(0) = 0."""
    scaled = TIMESTEP_SCALING * t.float()
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


class DDIMGrid:
    """The skipping-step DDIM solver of LCM: timesteps t_n = k (n + 1) - 1 with k = 1000 / n_steps."""

    def __init__(self, alphas_cumprod: torch.Tensor, n_steps: int) -> None:
        self.alphas_cumprod = alphas_cumprod.float()  # (1000,)
        self.skip = len(alphas_cumprod) // n_steps
        self.timesteps = torch.arange(1, n_steps + 1) * self.skip - 1  # (n,) ascending: 19, 39, ..., 999
        self.n_steps = n_steps

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha-bar at t (B,), (B, 1, 1, 1); t = -1 stands for the clean end (alpha-bar 1)."""
        a = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones(()))
        return a.view(-1, 1, 1, 1)

    def x0(self, eps: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha(t)
        return (z - (1 - a).sqrt() * eps) / a.sqrt()

    def ddim_step(self, x0: torch.Tensor, eps: torch.Tensor, t_prev: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (eta 0) to t_prev from the estimates x0 and eps."""
        a = self.alpha(t_prev)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    return (((a.float() - b.float()) ** 2 + c * c).sqrt() - c).mean()


def distillation_loss(unet: torch.nn.Module, layers: dict[str, SwitchableLora], grid: DDIMGrid, x0: torch.Tensor,
                      cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor, generator: torch.Generator,
                      runtime: common.Runtime, huber_c: float) -> torch.Tensor:
    """One LCD loss on clean latents x0 (B, 4, h, w) with text states cond (B, 77, D) and uncond (1, 77, D)."""
    b = x0.shape[0]
    index = torch.randint(0, grid.n_steps, (b,), generator=generator)  # (B,)
    t_start = grid.timesteps[index]  # t_{n+k}
    t_end = t_start - grid.skip  # t_n; -1 below the grid's first point: the clean end
    noise = torch.randn(x0.shape, generator=generator)
    a_start = grid.alpha(t_start)
    z = a_start.sqrt() * x0 + (1 - a_start).sqrt() * noise  # (B, 4, h, w)
    dev = runtime.device
    z, t_start_d, cond = z.to(dev), t_start.to(dev), cond.to(dev)
    c_skip_s, c_out_s = boundary_scalings(t_start)
    c_skip_e, c_out_e = boundary_scalings(t_end.clamp(min=0))
    with runtime.autocast():
        eps_student = unet(z, t_start_d, encoder_hidden_states=cond).sample.float()
    student = c_skip_s * z + c_out_s * grid.x0(eps_student, z, t_start)
    with torch.no_grad():
        with lora_off(layers), runtime.autocast():
            eps_teacher = unet(torch.cat([z, z]), torch.cat([t_start_d, t_start_d]),
                               encoder_hidden_states=torch.cat([cond, uncond.to(dev).expand(b, -1, -1)])).sample.float()
        eps_c, eps_u = eps_teacher.chunk(2)
        x0_c, x0_u = grid.x0(eps_c, z, t_start), grid.x0(eps_u, z, t_start)
        w = w.view(-1, 1, 1, 1)
        z_end = grid.ddim_step(x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u), t_end)  # (B, 4, h, w)
        t_end_d = t_end.clamp(min=0).to(dev)
        with runtime.autocast():
            eps_target = unet(z_end, t_end_d, encoder_hidden_states=cond).sample.float()
        target = c_skip_e * z_end + c_out_e * grid.x0(eps_target, z_end, t_end.clamp(min=0))
    return pseudo_huber(student, target, huber_c)


def trajectory_loss(unet: torch.nn.Module, grid: DDIMGrid, z: torch.Tensor, t: torch.Tensor, end: torch.Tensor,
                    cond: torch.Tensor, runtime: common.Runtime, huber_c: float) -> torch.Tensor:
    """The student's f(z, t) against the end of the teacher trajectory through z; z, end (B, 4, h, w), t (B,)."""
    dev = runtime.device
    z, end = z.to(dev), end.to(dev)
    c_skip, c_out = boundary_scalings(t)
    with runtime.autocast():
        eps = unet(z, t.to(dev), encoder_hidden_states=cond.to(dev)).sample.float()
    student = c_skip.to(dev) * z + c_out.to(dev) * grid.x0(eps, z, t)
    return pseudo_huber(student, end, huber_c)


@torch.no_grad()
def lcm_sample(unet: torch.nn.Module, vae: torch.nn.Module, states: torch.Tensor, runtime: common.Runtime,
               res: int, steps: int = 4, seed: int = 0) -> torch.Tensor:
    """diffusers' LCMScheduler without guidance; states (B, 77, D) -> images (B, 3, res, res) in [-1, 1]."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(**SCHEDULE)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((states.shape[0], 4, res // 8, res // 8), generator=generator)  # (B, 4, h, w)
    for t in scheduler.timesteps:
        with runtime.autocast():
            eps = unet(latents.to(runtime.device), t, encoder_hidden_states=states).sample.float().cpu()
        latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
    images = []
    for chunk in latents.split(4):
        with runtime.autocast():
            images.append(vae.decode(chunk.to(runtime.device) / vae.config.scaling_factor).sample.float().clamp(-1, 1))
    return torch.cat(images)


class LoraEma:
    """An exponential moving average of the LoRA layers' weights, swapped in to sample or save."""

    def __init__(self, layers: dict[str, SwitchableLora], decay: float) -> None:
        self.layers, self.decay = layers, decay
        self.shadow = {name: (layer.down.weight.detach().clone(), layer.up.weight.detach().clone())
                       for name, layer in layers.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, layer in self.layers.items():
            down, up = self.shadow[name]
            down.lerp_(layer.down.weight, 1 - self.decay)
            up.lerp_(layer.up.weight, 1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The layers hold the average inside the block and their trained weights again after it."""
        with torch.no_grad():
            live = {name: (layer.down.weight.clone(), layer.up.weight.clone()) for name, layer in self.layers.items()}
            for name, layer in self.layers.items():
                layer.down.weight.copy_(self.shadow[name][0])
                layer.up.weight.copy_(self.shadow[name][1])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, layer in self.layers.items():
                    layer.down.weight.copy_(live[name][0])
                    layer.up.weight.copy_(live[name][1])


def kohya_metadata(args: argparse.Namespace, step: int, base_hash: str) -> dict[str, str]:
    """``ss_*`` keys as kohya writes them, so library views and A1111 show what the file is."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(args.rank),
        "ss_network_alpha": f"{args.alpha:g}",
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": EMBEDDED_MODEL_DIR.name,
        "ss_new_sd_model_hash": base_hash,
        "ss_output_name": "lcm-shapes",
        "ss_resolution": f"({args.res}, {args.res})",
        "ss_steps": str(step),
        "ss_batch_size_per_device": str(args.batch),
        "ss_learning_rate": f"{args.lr:g}",
        "ss_seed": str(args.seed),
        "ss_training_comment": ("sd-app pipelines.training.lcm: LCM-LoRA (latent consistency distillation) of the "
                                "embedded model; sample with the LCM sampler, 4 steps, CFG 1"),
        "lcm_w_range": f"{args.w_min:g}-{args.w_max:g}",
        "lcm_ddim_steps": str(args.ddim_steps),
        **({"lcm_trajectories": str(args.trajectories), "lcm_trajectory_weight": f"{args.trajectory_weight:g}"}
           if args.trajectories else {}),  # the second term (module docstring), when the run had it
        **({"lcm_init_lora": Path(args.init_lora).name} if args.init_lora else {}),
    }


def export(run: Path, out: Path, fp16: bool = True) -> Path:
    """The run's last checkpoint as an LCM-LoRA file (lcm-lora-sdv1-5 key layout, fp16 by default)."""
    from safetensors.torch import load_file

    from pipelines.models.hashing import file_hash

    state = common.read_state(run)
    ema = run / "ckpt" / "lora_ema.safetensors"
    tensors = load_file(str(ema if ema.exists() else run / "ckpt" / "lora.safetensors"))
    args = argparse.Namespace(**{k: state[k] for k in ("rank", "alpha", "res", "batch", "lr", "seed", "w_min",
                                                       "w_max", "ddim_steps")},
                              **{k: state.get(k) for k in ("trajectories", "trajectory_weight", "init_lora")})
    base_hash = file_hash(EMBEDDED_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors")
    return save_lora_file(tensors, out, kohya_metadata(args, state["step"], base_hash), fp16)


def train(args: argparse.Namespace, runtime: common.Runtime) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(EMBEDDED_MODEL_DIR, subfolder="unet", torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(EMBEDDED_MODEL_DIR, subfolder="text_encoder", dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(EMBEDDED_MODEL_DIR, subfolder="vae", torch_dtype=torch.float32)
    for model in (unet, text_encoder, vae):
        model.to(runtime.device).requires_grad_(False).eval()
    torch.manual_seed(args.seed)
    layers = inject_everywhere(unet, args.rank, args.alpha)
    params = [p for layer in layers.values() for p in (layer.down.weight, layer.up.weight)]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    start = resume_lora_run(args, layers, optimizer)
    if start == 0 and args.init_lora is not None:
        from safetensors.torch import load_file

        load_lora_state(layers, load_file(str(args.init_lora)))
    ema = LoraEma(layers, args.ema) if args.ema else None
    ema_file = args.out / "ckpt" / "lora_ema.safetensors"
    if ema is not None and start and ema_file.exists():
        from safetensors.torch import load_file

        saved = load_file(str(ema_file))
        for name in layers:
            ema.shadow[name][0].copy_(saved[f"{name}.lora_down.weight"])
            ema.shadow[name][1].copy_(saved[f"{name}.lora_up.weight"])
    n_params = sum(p.numel() for p in params)

    world = shapes.dataset(WORLD_SEED + args.seed, args.n_latents)
    vae_id = weights_id(EMBEDDED_MODEL_DIR / "vae")
    latents = encoded_latents(vae, world, args.res, f"vae{vae_id}-world-s{WORLD_SEED + args.seed}-n{args.n_latents}"
                              f"-{args.res}", runtime)  # (N, 4, h, w) float16, unscaled
    captions = shapes.all_captions()
    label = {c: i for i, c in enumerate(captions)}
    labels = np.array([label[shapes.caption(a)] for a in world])
    with torch.no_grad(), runtime.autocast():
        table = text_encoder(input_ids=tokenize(captions + [EMPTY]).to(runtime.device)).last_hidden_state
    table = table.float()  # (C + 1, 77, D): every caption's states, then the empty prompt's
    uncond = table[-1:]
    scale = vae.config.scaling_factor
    from diffusers import DDPMScheduler

    grid = DDIMGrid(DDPMScheduler(**SCHEDULE).alphas_cumprod, args.ddim_steps)
    trajectories = None
    if args.trajectories:
        from pipelines.training.teacher_trajectories import trajectory_set

        wanted = np.array([label[shapes.caption(a)] for a in shapes.dataset(TRAJECTORY_SEED + args.seed,
                                                                              args.trajectories)])
        with lora_off(layers):
            teacher_id = "-".join(f"{part}{weights_id(EMBEDDED_MODEL_DIR / part)}" for part in ("unet", "text_encoder"))
            trajectories = trajectory_set(data.DATA_DIR, unet, table, wanted, runtime, args.res, args.seed, teacher_id)
    monitor = shapes.dataset(MONITOR_SEED, args.monitor)
    monitor_states = table[[label[shapes.caption(a)] for a in monitor]]
    log = common.Log(args.out / "log.jsonl")
    log.write(event="start", step=start, lora_params=n_params, layers=len(layers))
    generator = torch.Generator().manual_seed(args.seed * 1000 + start)
    rng = np.random.default_rng([args.seed, start])
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="lcm", mininterval=30)
    running, started = None, time.time()
    for step in bar:
        index = rng.choice(len(labels), args.batch)
        x0 = torch.from_numpy(latents[index]).float() * scale  # (B, 4, h, w)
        flip = (torch.rand(len(index), generator=generator) < 0.5).view(-1, 1, 1, 1)
        x0 = torch.where(flip, x0.flip(-1), x0)
        w = args.w_min + (args.w_max - args.w_min) * torch.rand(len(index), generator=generator)  # (B,)
        for group in optimizer.param_groups:
            group["lr"] = common.warmup_lr(step, args.lr, args.warmup)
        loss = distillation_loss(unet, layers, grid, x0, table[labels[index]], uncond, w.to(runtime.device),
                                 generator, runtime, args.huber_c)
        if trajectories is not None:
            pick = rng.choice(len(trajectories.labels), args.batch)
            at = rng.integers(0, len(trajectories.timesteps), args.batch)
            z = torch.from_numpy(trajectories.points[pick, at]).float()  # (B, 4, h, w)
            end = torch.from_numpy(trajectories.ends[pick]).float()  # (B, 4, h, w)
            t = torch.from_numpy(trajectories.timesteps[at])  # (B,)
            loss = loss + args.trajectory_weight * trajectory_loss(
                unet, grid, z, t, end, table[trajectories.labels[pick]], runtime, args.huber_c)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if ema is not None:
            ema.update()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.5f}", refresh=False)
        done = step + 1
        if done % 25 == 0:
            log.write(step=done, loss=round(running, 6), s_per_step=round((time.time() - started) / (done - start), 2))
        if done % args.ckpt_every == 0 or done == args.steps:
            state = {"step": done, "wall_s": round(time.time() - started, 1), "loss_ema": running,
                     "lora_params": n_params,
                     **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
            if args.monitor:
                with ema.swapped_in() if ema is not None else contextlib.nullcontext():
                    images = lcm_sample(unet, vae, monitor_states, runtime, args.monitor_res, steps=4, seed=done)
                state["monitor_4step"] = oracle_fidelity(images, monitor)
                log.write(step=done, **{f"monitor_{k}": v for k, v in state["monitor_4step"].items()})
                tqdm.write(f"step {done}: loss {running:.5f} 4-step {json.dumps(state['monitor_4step'])}")
            save_run(args.out, layers, optimizer, state)
            if ema is not None:
                from safetensors.torch import save_file

                with ema.swapped_in():
                    save_file(lora_state(layers), str(ema_file))


def main(argv: list[str] | None = None) -> None:
    parser = common.base_parser(__doc__.splitlines()[0], "runs/lcm", steps=3000, batch=8, lr=5e-4)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of every patched layer")
    parser.add_argument("--alpha", type=float, default=8.0, help="LoRA alpha (scale alpha / rank)")
    parser.add_argument("--res", type=int, default=512, help="image side of the training latents")
    parser.add_argument("--n-latents", type=int, default=1000, help="drawings encoded as clean latents")
    parser.add_argument("--ddim-steps", type=int, default=50, help="the teacher solver's grid (skip 1000 / n)")
    parser.add_argument("--w-min", type=float, default=4.0, help="guidance w range (CFG scale w + 1)")
    parser.add_argument("--w-max", type=float, default=8.0)
    parser.add_argument("--huber-c", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--monitor", type=int, default=16, help="prompts sampled in 4 steps and judged per checkpoint")
    parser.add_argument("--monitor-res", type=int, default=512, help="image side of the monitor's samples")
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay of the LoRA weights (0: off); "
                        "the monitor and the export use the average")
    parser.add_argument("--init-lora", type=Path, default=None, help="an LCM-LoRA file to start from (same rank)")
    parser.add_argument("--trajectories", type=int, default=0,
                        help="teacher 20-step trajectories for the trajectory term (0: consistency loss only)")
    parser.add_argument("--trajectory-weight", type=float, default=1.0, help="weight of the trajectory term")
    parser.add_argument("--export", type=Path, default=None, help="write the run's LCM-LoRA (fp16) here and stop")
    parser.add_argument("--fp32", action="store_true", help="export in fp32")
    args = parser.parse_args(argv)
    if args.export is not None:
        path = export(args.out, args.export, fp16=not args.fp32)
        print(f"wrote {path} ({path.stat().st_size} bytes)")
        return
    train(args, common.setup(args))


if __name__ == "__main__":
    main()
