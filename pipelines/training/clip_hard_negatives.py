"""Fine-tune the reranker's CLIP with hard negatives, so that it counts and binds colours to shapes.

Every batch holds base drawings next to their hard negatives (:mod:`pipelines.training.hard_negatives`:
two shapes, a second colour inside, swapped colours), each with its own caption, under the CLIP loss of
:mod:`pipelines.training.clip` (Radford et al. 2021; composition-aware hard negatives as in Yuksekgonul
et al. 2023). The token embedding stays frozen: it is shared with the U-Net's text encoder (the shipped
model stores it once). The vision tower, both projections and the temperature learn; with
``--tune-text-layers`` the reranker's own copy of the text transformer layers learns too (counting
lives there: a frozen tower pools "a red circle" and "two red circles" too close together), and the
export stores those layers beside the vision tower (about 1.6 MB in fp16); the U-Net's text encoder
is untouched.

    python -m pipelines.training.clip_hard_negatives --steps 800 --out runs/clip-hn [--resume]
        [--tune-text-layers] [--from-clip runs/clip-hn/ckpt/clip]
    python -m pipelines.training.export --clip-only --clip runs/clip-hn      # -> the embedded clip/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from pipelines.training import common, data, hard_negatives, shapes
from pipelines.training.clip import contrastive_loss, image_features, optimizer_step, text_features, tokenize

HARD_NEGATIVE_SEED = 77  # base drawings of the training batches: rng(HARD_NEGATIVE_SEED + seed, step)


def _pixels(images: list[Image.Image]) -> torch.Tensor:
    """PIL drawings -> (B, 3, 64, 64) in [-1, 1], resized as CLIP's processor would (bicubic)."""
    small = [np.asarray(im.resize((64, 64), Image.Resampling.BICUBIC)) for im in images]
    return data.to_unit(np.stack(small))


def batch(rng: np.random.Generator, bases: int) -> tuple[list[Image.Image], list[str], list[str]]:
    """``bases`` drawings of the world, each followed by its three hard negatives: images, captions, kinds."""
    images, captions, kinds = [], [], []
    for attrs in (shapes.sample_attributes(rng) for _ in range(bases)):
        for image, caption, kind in hard_negatives.variants(attrs, rng):
            images.append(image)
            captions.append(caption)
            kinds.append(kind)
    return images, captions, kinds


class TextBank:
    """Pooled outputs of the frozen text tower, computed once per caption (the projection still learns)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self.pooled: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> None:
        todo = [c for c in dict.fromkeys(captions) if c not in self.pooled]
        if todo:
            ids = tokenize(todo).to(self.device)  # (T, 77)
            pooled = self.model.text_model(input_ids=ids).pooler_output.float()  # (T, W)
            self.pooled.update(zip(todo, pooled))

    def features(self, captions: list[str]) -> torch.Tensor:
        """(U, D) unit text embeddings of the captions, through the (trainable) text projection."""
        self._encode(captions)
        pooled = torch.stack([self.pooled[c] for c in captions])  # (U, W)
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)


class TokenIds:
    """Token ids per caption, tokenized once (the world has a few hundred captions)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ids: dict[str, torch.Tensor] = {}

    def of(self, captions: list[str]) -> torch.Tensor:
        """(U, 77) token ids of the captions."""
        todo = [c for c in dict.fromkeys(captions) if c not in self.ids]
        if todo:
            self.ids.update(zip(todo, tokenize(todo).to(self.device)))
        ids = torch.stack([self.ids[c] for c in captions])  # (U, 77), padded with eos
        # CLIP's causal text tower pools at the first eos: the padding after it changes nothing, so the
        # (short) captions run at the length of the longest one, not 77 positions.
        first_eos = (ids == ids[0, -1]).int().argmax(dim=-1)  # (U,)
        return ids[:, : int(first_eos.max()) + 1]


@torch.no_grad()
def evaluate(model: torch.nn.Module, device: torch.device, n: int = 400) -> dict[str, float]:
    """Held-out two-way choices: the single caption against "two ..." (count, on single and two-shape
    drawings) and against the swapped-colour caption (binding), and against the mixed caption (on mixed
    drawings); plus zero-shot over all 120 captions on the single drawings."""
    model.eval()
    rng = np.random.default_rng(data.HELDOUT_SEED)
    bank = TextBank(model, device)
    hits: dict[str, list[bool]] = {key: [] for key in (*hard_negatives.CHOICES, "zero_shot")}
    world = shapes.all_captions()
    world_text = bank.features(world)  # (120, D)
    for images, captions in hard_negatives.choice_cases(rng, n):
        img = F.normalize(image_features(model, data.clip_normalize(_pixels(images)).to(device)), dim=-1)  # (3, D)
        sims = (img @ bank.features(captions).T).cpu().numpy()  # (3 images, 4 captions)
        for key, right in hard_negatives.two_way_hits(sims).items():
            hits[key] += right
        hits["zero_shot"].append(world[int((img[0] @ world_text.T).argmax())] == captions[0])
    model.train()
    return {key: float(np.mean(value)) for key, value in hits.items()}


def main(argv: list[str] | None = None) -> None:
    parser = common.base_parser(__doc__.splitlines()[0], "runs/clip-hn", steps=800, batch=128, lr=1e-4)
    parser.add_argument("--from-clip", type=Path, default=None,
                        help="CLIP folder to start from (default: the embedded model's clip/)")
    parser.add_argument("--n-eval", type=int, default=400)
    parser.add_argument("--tune-text-layers", action="store_true",
                        help="also train the text transformer layers (not the shared token embedding)")
    args = parser.parse_args(argv)
    runtime = common.setup(args)
    train(args, runtime)


def train(args: argparse.Namespace, runtime: common.Runtime) -> None:
    from transformers import CLIPModel

    from pipelines.rerank.clip_scorer import EMBEDDED_CLIP, load_clip_model

    start = 0
    if args.resume and (args.out / "ckpt").exists():
        model = CLIPModel.from_pretrained(str(args.out / "ckpt" / "clip"))
        start = common.read_state(args.out)["step"]
    else:
        model = load_clip_model(args.from_clip or EMBEDDED_CLIP).float()
    model.to(runtime.device).train()
    model.text_model.requires_grad_(False)  # shared with the U-Net's text encoder: frozen ...
    if args.tune_text_layers:  # ... except the reranker's own copy of the layers above the embeddings
        model.text_model.encoder.requires_grad_(True)
        model.text_model.final_layer_norm.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    if start:
        common.load_optimizer(optimizer, args.out / "ckpt" / "optimizer.safetensors")
    bank = TextBank(model, runtime.device)
    token_ids = TokenIds(runtime.device)
    log = common.Log(args.out / "log.jsonl")
    if start == 0:
        before = evaluate(model, runtime.device, args.n_eval)
        log.write(step=0, **{f"eval_{k}": v for k, v in before.items()})
        tqdm.write(f"before: {before}")
    bases = max(args.batch // len(hard_negatives.KINDS), 1)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="clip-hn", mininterval=10)
    for step in bar:
        rng = np.random.default_rng([HARD_NEGATIVE_SEED + args.seed, step])
        images, captions, _ = batch(rng, bases)
        generator = torch.Generator().manual_seed(args.seed * 100_003 + step)
        pixels = _pixels(images)  # (B, 3, 64, 64); no flips: "two" drawings are symmetric, others too
        pixels = data.clip_normalize(data.degrade(pixels, generator)).to(runtime.device)
        unique, inverse = np.unique(np.array(captions), return_inverse=True)
        for group in optimizer.param_groups:
            group["lr"] = common.warmup_lr(step, args.lr, 50)
        with runtime.autocast():
            img = F.normalize(image_features(model, pixels), dim=-1)  # (B, D)
            if args.tune_text_layers:
                txt = F.normalize(text_features(model, token_ids.of(list(unique))), dim=-1)  # (U, D)
            else:
                txt = bank.features(list(unique))  # (U, D)
        targets = torch.from_numpy(inverse).to(runtime.device)  # (B,)
        loss = contrastive_loss(img, txt, targets, model.logit_scale, None)
        optimizer_step(loss, optimizer, params, model)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        done = step + 1
        common.finish_step(
            args, log, done, loss.item(), lambda: evaluate(model, runtime.device, args.n_eval), {"clip": model},
            optimizer, lambda metrics, done=done: {
                "step": done, "seed": args.seed, "batch": args.batch, "lr": args.lr, "eval": metrics,
                "tune_text_layers": args.tune_text_layers, "from_clip": str(args.from_clip or "embedded")},
            key_prefix="eval_")


if __name__ == "__main__":
    main()
