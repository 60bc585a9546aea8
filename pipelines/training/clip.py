"""Train the tiny CLIP: contrastive image-caption pre-training on the shapes world.

CLIP loss (Radford et al. 2021): symmetric cross-entropy over cosine similarities times a learnable
temperature. Captions repeat within a batch (120 in the world), so each caption's text is encoded
once and every image with that caption counts as a positive (no false negatives). ``--loss siglip``
uses SigLIP's pairwise sigmoid loss with a learnable bias instead (Zhai et al. 2023).
Its text tower later becomes the Stable Diffusion text encoder (last hidden state, 77 x 128).

    python -m pipelines.training.clip --steps 3000 --out runs/clip [--resume]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipelines.training import common, data, shapes

WIDTH = 128
TRAIN_TOKENS = 16


def clip_config(patch: int = 8) -> dict:
    """Both towers width 128, 4 layers, 4 heads; vision 64x64 input; the real CLIP BPE vocabulary."""
    text = dict(vocab_size=49408, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407, projection_dim=WIDTH)
    vision = dict(image_size=64, patch_size=patch, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                  num_hidden_layers=4, num_attention_heads=4, projection_dim=WIDTH)
    return dict(text_config=text, vision_config=vision, projection_dim=WIDTH)


def new_model(patch: int = 8) -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(**clip_config(patch)))


def load_tokenizer():  # noqa: ANN201 - transformers type, imported lazily
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(common.TOKENIZER_DIR))


def tokenize(texts: list[str]) -> torch.Tensor:
    """(N, 77) token ids, padded with eos as Stable Diffusion does."""
    tok = load_tokenizer()
    return tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def image_features(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, 64, 64) normalized pixels -> (B, D) projected image embeddings (float32)."""
    return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).float()


def text_features(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(N, 77) token ids -> (N, D) projected text embeddings (float32), pooled at the eos token."""
    return model.text_projection(model.text_model(input_ids=ids).pooler_output).float()


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """img (B, D) and txt (U, D) unit vectors; labels (B,) index into txt. CLIP or SigLIP (with bias)."""
    logits = scale.exp() * img @ txt.T  # (B, U)
    positive = F.one_hot(labels, txt.shape[0]).float()  # (B, U)
    if bias is not None:  # SigLIP: every (image, text) pair is an independent binary decision
        return -F.logsigmoid((2 * positive - 1) * (logits + bias)).sum(1).mean()
    image_to_text = F.cross_entropy(logits, labels)
    targets = positive.T / positive.T.sum(1, keepdim=True)  # (U, B) uniform over each caption's images
    text_to_image = -(targets * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


@torch.no_grad()
def zero_shot(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, runtime: common.Runtime,
              batch: int = 250) -> dict[str, float]:
    """Accuracy of argmax over all captions, overall and per attribute (from the predicted caption)."""
    model.eval()
    captions = shapes.all_captions()
    ids = tokenize(captions).to(runtime.device)  # (C, 77)
    with runtime.autocast():
        txt = F.normalize(text_features(model, ids), dim=-1)  # (C, D)
    predictions = []
    for start in range(0, len(images), batch):
        pixels = data.clip_normalize(data.to_unit(images[start : start + batch])).to(runtime.device)
        with runtime.autocast():
            img = F.normalize(image_features(model, pixels), dim=-1)  # (b, D)
        predictions.append((img @ txt.T).argmax(1).cpu())
    pred = torch.cat(predictions).numpy()
    attrs = [shapes.parse_caption(c) for c in captions]
    result = {"acc": float((pred == labels).mean())}
    for name in ("shape", "shape_colour", "background"):
        truth = np.array([getattr(attrs[i], name) for i in labels])
        guess = np.array([getattr(attrs[i], name) for i in pred])
        result[name] = float((truth == guess).mean())
    model.train()
    return result


def load_trained(out: Path = Path("runs/clip")) -> torch.nn.Module:
    """The last checkpoint's CLIPModel."""
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(out / "ckpt" / "clip"))


def main(argv: list[str] | None = None) -> None:
    parser = common.base_parser(__doc__.splitlines()[0], "runs/clip", steps=3000, batch=128, lr=5e-4)
    parser.add_argument("--loss", choices=("clip", "siglip"), default="clip")
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-eval", type=int, default=1200)
    args = parser.parse_args(argv)
    runtime = common.setup(args)
    train(args, runtime)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                   model: torch.nn.Module) -> None:
    """Backward, gradients clipped to norm 1, one step, and CLIP's logit scale kept in [0, ln 100]
    (temperature clipped at 100, as Radford et al. 2021 do)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100.0))


def train(args: argparse.Namespace, runtime: common.Runtime) -> None:
    from transformers import CLIPModel

    images, labels = data.image_set(data.TRAIN_SEED + args.seed, args.n_train, 64, draw_size=256)
    eval_images, eval_labels = data.image_set(data.HELDOUT_SEED, args.n_eval, 64, draw_size=256)
    caption_ids = tokenize(shapes.all_captions())  # (C, 77)
    # Attention is causal and the pooled state sits at the eos token, so the padding after the
    # longest caption changes nothing in the CLIP loss: train on the first TRAIN_TOKENS positions.
    assert (caption_ids[:, TRAIN_TOKENS:] == 49407).all(), "a caption is longer than TRAIN_TOKENS"
    caption_ids = caption_ids[:, :TRAIN_TOKENS].to(runtime.device)  # (C, 16)

    start = 0
    if args.resume and (args.out / "ckpt").exists():
        model = CLIPModel.from_pretrained(str(args.out / "ckpt" / "clip"))
        state = common.read_state(args.out)
        start = state["step"]
    else:
        model = new_model(args.patch)
        state = {}
    model.to(runtime.device).train()
    bias = None
    if args.loss == "siglip":  # SigLIP init: t' = log 10, b = -10
        bias = torch.nn.Parameter(torch.tensor(state.get("logit_bias", -10.0), device=runtime.device))
        if start == 0:
            model.logit_scale.data.fill_(math.log(10.0))
    params = list(model.parameters()) + ([bias] if bias is not None else [])
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    if start:
        common.load_optimizer(optimizer, args.out / "ckpt" / "optimizer.safetensors")
    log = common.Log(args.out / "log.jsonl")
    generator = torch.Generator().manual_seed(args.seed * 1000 + start)
    batch_iter = common.batches(len(images), args.batch, args.seed, start)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="clip", mininterval=10)
    for step in bar:
        index = np.sort(next(batch_iter))
        pixels = data.to_unit(images[index])  # (B, 3, 64, 64)
        flip = torch.rand(len(index), generator=generator) < 0.5
        pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
        pixels = data.clip_normalize(data.degrade(pixels, generator)).to(runtime.device)
        unique, inverse = np.unique(labels[index], return_inverse=True)
        for group in optimizer.param_groups:
            group["lr"] = common.warmup_lr(step, args.lr, 100)
        with runtime.autocast():
            img = F.normalize(image_features(model, pixels), dim=-1)  # (B, D)
            txt = F.normalize(text_features(model, caption_ids[unique]), dim=-1)  # (U, D)
        targets = torch.from_numpy(inverse).to(runtime.device)  # (B,) index into the batch's captions
        loss = contrastive_loss(img, txt, targets, model.logit_scale, bias)
        optimizer_step(loss, optimizer, params, model)
        scale = model.logit_scale.exp().item()
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{scale:.1f}", refresh=False)
        done = step + 1
        if done % 25 == 0:
            log.write(step=done, loss=round(loss.item(), 4), logit_scale=round(scale, 2))
        if done % args.ckpt_every == 0 or done == args.steps:
            metrics = zero_shot(model, eval_images, eval_labels, runtime)
            log.write(step=done, **{f"zero_shot_{k}": v for k, v in metrics.items()})
            tqdm.write(f"step {done}: loss {loss.item():.3f} zero-shot {metrics}")
            save = {"step": done, "loss": args.loss, "seed": args.seed, "batch": args.batch, "lr": args.lr,
                    "zero_shot": metrics}
            if bias is not None:
                save["logit_bias"] = float(bias.item())
            common.save_checkpoint(args.out, {"clip": model}, optimizer, save)


if __name__ == "__main__":
    main()
