"""The preview scorer of early pruning: the reranker's CLIP fine-tuned on early x0 previews, each captioned
with what its finished image turned out to be.

    python -m pipelines.training.clip_previews --data runs/preview-outcomes --out runs/clip-previews
        [--steps 600] [--decoder taesd] [--resume]
    python -m pipelines.training.export --preview-clip runs/clip-previews --out MODEL   # -> MODEL/clip_preview/
    python -m pipelines.training.clip_previews --judge-pruning runs/preview-outcomes-eval
        --log runs/pruning-taesd/pruning.jsonl [--scorer MODEL/clip_preview] [--decoder taesd] [--keep 2]

Early pruning scores each candidate's predicted clean image after step K, decoded by the linear latent ->
RGB preview (:mod:`pipelines.rerank.early_pruning`). The reranker's CLIP was trained on finished drawings:
on a step-2 blur it ranks almost at random which of 8 candidates will end with one clean shape (it kept
the pick of full best-of-8 in 27% of the pairs). This stage teaches a copy of it what the finished image
will be: each preview of :mod:`pipelines.training.preview_outcomes` (steps 1-4) is captioned by the shapes
oracle's reading of its own finished image (:func:`outcome_caption`: the prompt when it is all right,
else "two purple stars ...", "a purple and blue star ..." or the colours and kind it drew), next to the
prompt's counterfactual captions (two, mixed, swapped) as extra negatives. Image -> text cross-entropy
(Radford et al. 2021) over the batch's captions, plus (``--rank-weight``) a listwise loss on the decision
itself: among one prompt's N candidates, the softmax of their logits with the prompt should sit on
those that finish right. This is learning a reward model from labelled samples of
the generator itself, as ImageReward (Xu et al. 2023) does from human labels, here on the x0 prediction
of an early step (the coarse layout is settled early; Ho et al. 2020, Fig. 6).

Measured on the embedded model (README, "What the x0 of step K can know"): no gain over the reranker on
the pruning evaluation, and a held-out within-pair AUC near chance, because which candidate ends
mottled is decided after step 4; none is shipped.

The text side is frozen (its token embedding is the U-Net's text encoder's, shipped once); the vision
tower, its projection and the temperature learn. Training pairs are held apart from the evaluation's
prompts and seeds (:mod:`pipelines.training.preview_outcomes`); the last ``--holdout`` pairs of the data
are a validation split.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from pipelines.training import common, hard_negatives, shapes
from pipelines.training.clip import image_features, optimizer_step
from pipelines.training.clip_hard_negatives import TextBank
from pipelines.training.preview_outcomes import pair_attributes, read_shards


def outcome_caption(attrs: shapes.ShapeAttributes, verdict: shapes.Verdict) -> str:
    """The caption of what the finished image shows, by the oracle's verdict on it against ``attrs``.

    All right: the prompt itself. Two or more shapes: "two <colour> <shape>s ...". A shape with a second
    colour inside: "a <colour> and <inner colour> <shape> ...". Otherwise the colours and kind the oracle
    saw; no shape at all: "a <background> background".
    """
    if verdict.all_ok:
        return shapes.caption(attrs)
    seen = shapes.ShapeAttributes(verdict.seen_shape or attrs.shape, verdict.seen_shape_colour or attrs.shape_colour,
                                  verdict.seen_background or attrs.background, attrs.size, attrs.cx, attrs.cy)
    if verdict.seen_count == 0 or verdict.seen_shape is None:
        return f"a {seen.background} background"
    if verdict.seen_count >= 2:
        return hard_negatives.two_caption(seen)
    if not verdict.binding_ok:  # the kind is the prompt's: a second colour breaks up the outline the oracle reads
        mixed = shapes.ShapeAttributes(attrs.shape, seen.shape_colour, seen.background, attrs.size, attrs.cx, attrs.cy)
        return hard_negatives.mixed_caption(mixed, verdict.seen_inner_colour or seen.background)
    return shapes.caption(seen)


def counterfactual_captions(attrs: shapes.ShapeAttributes) -> list[str]:
    """The prompt's near misses: two shapes, mottled with the background colour, colours swapped."""
    return [hard_negatives.two_caption(attrs), hard_negatives.mixed_caption(attrs, attrs.background),
            shapes.caption(hard_negatives.swapped(attrs))]


def preview_pixels(clean: np.ndarray, pipe: Any, processor: Any, decoder: str = "preview") -> torch.Tensor:
    """Predicted clean latents [M, C, h, w] -> CLIP input [M, 3, S, S] (fp16), by the very code early pruning
    feeds its scorer with (``decode_clean`` of ``pipe`` with ``decoder``, then the CLIP image processor)."""
    from pipelines.rerank.early_pruning import decode_clean

    out = []
    for start in range(0, len(clean), 256):
        images = decode_clean(pipe, torch.from_numpy(clean[start:start + 256]).float(), decoder)
        out.append(processor(images=images, return_tensors="pt")["pixel_values"].half())  # [m, 3, S, S]
    return torch.cat(out)


def _pipeline(model: Path) -> Any:
    """The app's pipeline of ``model`` (its previews' latent -> RGB map is fitted to its VAE)."""
    from pipelines.models.loading import load_pipeline

    return load_pipeline(model, device="cpu")


@dataclass
class OutcomeSet:
    """Previews of every (pair, candidate, K) and the captions of their finished images."""

    pixels: torch.Tensor  # [P, N, K, 3, S, S] fp16
    prompts: list[str]  # [P]
    outcomes: list[list[str]]  # [P][N]
    right: np.ndarray  # [P, N] bool: the finished image is all right
    counterfactuals: list[list[str]]  # [P][3]
    at: list[int]


def load_outcomes(folder: Path, processor: Any, decoder: str = "preview") -> OutcomeSet:
    """Read ``preview_outcomes`` shards, judge the finished images and render the previews."""
    arrays, meta = read_shards(folder)
    if "finished" not in arrays:
        raise ValueError(f"{folder} holds x0 only (made with --evaluation): no finished images to learn from")
    attrs = pair_attributes(int(arrays["pair"].max()) + 1, evaluation=False)
    pairs = [attrs[int(i)] for i in arrays["pair"]]
    clean = arrays["clean"]  # [P, N, K, C, h, w]
    p, n, k = clean.shape[:3]
    pixels = preview_pixels(clean.reshape(p * n * k, *clean.shape[3:]), _pipeline(Path(meta["model"])), processor,
                            decoder)
    outcomes, right = [], np.zeros((p, n), dtype=bool)
    for i, (a, finished) in enumerate(zip(pairs, arrays["finished"], strict=True)):
        verdicts = [shapes.judge(Image.fromarray(image), a) for image in finished]
        right[i] = [v.all_ok for v in verdicts]
        outcomes.append([outcome_caption(a, v) for v in verdicts])
    return OutcomeSet(pixels.reshape(p, n, k, *pixels.shape[1:]), [shapes.caption(a) for a in pairs], outcomes,
                      right, [counterfactual_captions(a) for a in pairs], list(meta["at"]))


@torch.no_grad()
def prompt_cosines(model: torch.nn.Module, pixels: torch.Tensor, prompts: list[str], bank: TextBank
                   ) -> torch.Tensor:
    """Cosine of each preview [P, N, 3, S, S] with its pair's prompt -> [P, N]."""
    p, n = pixels.shape[:2]
    img = F.normalize(image_features(model, pixels.reshape(p * n, *pixels.shape[2:]).float()), dim=-1)  # [P N, D]
    txt = bank.features(prompts)  # [P, D]
    return (img.reshape(p, n, -1) * txt[:, None, :]).sum(-1)  # [P, N]


def rank_loss(logits: torch.Tensor, prompts: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Listwise loss of the pruning decision: per pair, the softmax over its N candidates' logits with the
    prompt should sit on the right ones (-log of their summed probability; ListNet-style, Cao et al. 2007).
    logits [P, N, U], prompts [P] (caption index of each pair's prompt), right [P, N] bool. Pairs whose
    candidates are all right or all wrong say nothing about the ranking and are skipped (0 if none)."""
    with_prompt = logits.gather(2, prompts[:, None, None].expand(-1, logits.shape[1], 1))[..., 0]  # [P, N]
    mixed = right.any(dim=1) & ~right.all(dim=1)  # [P]
    if not mixed.any():
        return logits.new_zeros(())
    log_p = F.log_softmax(with_prompt[mixed], dim=1)  # [M, N]
    return -torch.logsumexp(log_p.masked_fill(~right[mixed], float("-inf")), dim=1).mean()


def kept_right(scores: np.ndarray, right: np.ndarray, keep: int) -> float:
    """Among pairs where some candidate is right, the share whose ``keep`` best early scores hold one."""
    some = right.any(axis=1)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :keep]  # [P, keep]
    hold = np.take_along_axis(right, top, axis=1).any(axis=1)
    return float(hold[some].mean()) if some.any() else float("nan")


def pairwise_right(scores: np.ndarray, right: np.ndarray) -> float:
    """Within each pair, the share of (right, wrong) candidate pairs that the scores order right first
    (ties count half): the pruning decision's AUC, pooled over pairs."""
    hits, total = 0.0, 0
    for s, r in zip(scores, right, strict=True):
        diff = s[r][:, None] - s[~r][None, :]  # [right, wrong]
        hits += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
        total += diff.size
    return hits / total if total else float("nan")


def validate(model: torch.nn.Module, data: OutcomeSet, pairs: np.ndarray, bank: TextBank, keep: int
             ) -> dict[str, float]:
    """Per K: pairs whose kept ``keep`` hold a right candidate (of those where some is right), and the
    within-pair AUC of right over wrong candidates."""
    model.eval()
    result = {}
    for j, k in enumerate(data.at):
        cos = prompt_cosines(model, data.pixels[pairs, :, j], [data.prompts[i] for i in pairs], bank).cpu().numpy()
        result[f"kept_right_at_{k}"] = kept_right(cos, data.right[pairs], keep)
        result[f"auc_at_{k}"] = pairwise_right(cos, data.right[pairs])
    model.train()
    return result


def train(args: argparse.Namespace, runtime: common.Runtime) -> None:
    from transformers import CLIPModel

    from pipelines.rerank.clip_scorer import EMBEDDED_CLIP, image_processor_class, load_clip_model

    processor = image_processor_class().from_pretrained(str(EMBEDDED_CLIP), local_files_only=True)
    data = load_outcomes(args.data, processor, args.decoder)
    pairs = len(data.prompts)
    holdout = np.arange(pairs - args.holdout, pairs)
    train_pairs = np.arange(pairs - args.holdout)
    print(f"{pairs} pairs ({len(train_pairs)} to learn from, {len(holdout)} held out); finished images right: "
          f"{data.right.mean():.1%}; pairs with a wrong one: {(~data.right).any(axis=1).mean():.1%}")
    start = 0
    if args.resume and (args.out / "ckpt").exists():
        model = CLIPModel.from_pretrained(str(args.out / "ckpt" / "clip"))
        start = common.read_state(args.out)["step"]
    else:
        model = load_clip_model(EMBEDDED_CLIP).float()
    model.to(runtime.device).train()
    model.text_model.requires_grad_(False)  # the text side stays the reranker's: frozen
    model.text_projection.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    if start:
        common.load_optimizer(optimizer, args.out / "ckpt" / "optimizer.safetensors")
    bank = TextBank(model, runtime.device)
    log = common.Log(args.out / "log.jsonl")
    if start == 0:
        before = validate(model, data, holdout, bank, args.keep)
        log.write(step=0, **before)
        tqdm.write(f"before: {before}")
    per_batch = max(args.batch // data.pixels.shape[1], 1)  # whole pairs: all N candidates of a prompt
    n, k = data.pixels.shape[1:3]
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="clip-previews", mininterval=10)
    for step in bar:
        rng = np.random.default_rng([args.seed, step])
        chosen = rng.choice(train_pairs, size=per_batch, replace=False)
        at = rng.integers(k, size=(per_batch, n))  # a random K per candidate
        pixels = data.pixels[chosen[:, None], np.arange(n)[None, :], at].reshape(-1, *data.pixels.shape[3:])
        flip = torch.from_numpy(rng.random(len(pixels)) < 0.5)  # mirror images: the world is left-right symmetric
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels).float().to(runtime.device)
        captions = [data.outcomes[i][c] for i in chosen for c in range(n)]
        unique = list(dict.fromkeys(captions + [cf for i in chosen for cf in data.counterfactuals[i]]))
        labels = torch.tensor([unique.index(c) for c in captions], device=runtime.device)
        for group in optimizer.param_groups:
            group["lr"] = common.warmup_lr(step, args.lr, 50)
        with runtime.autocast():
            img = F.normalize(image_features(model, pixels), dim=-1)  # [B, D]
        txt = bank.features(unique)  # [U, D], frozen
        logits = model.logit_scale.exp() * img.float() @ txt.T  # [B, U]
        loss = F.cross_entropy(logits, labels)
        if args.rank_weight:
            prompts = torch.tensor([unique.index(data.prompts[i]) for i in chosen], device=runtime.device)  # [b]
            loss = loss + args.rank_weight * rank_loss(logits.reshape(per_batch, n, -1), prompts,
                                                       torch.from_numpy(data.right[chosen]).to(runtime.device))
        optimizer_step(loss, optimizer, params, model)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        done = step + 1
        common.finish_step(
            args, log, done, loss.item(), lambda: validate(model, data, holdout, bank, args.keep), {"clip": model},
            optimizer, lambda metrics, done=done: {
                "step": done, "seed": args.seed, "batch": args.batch, "lr": args.lr, "eval": metrics,
                "rank_weight": args.rank_weight, "data": str(args.data), "pairs": pairs, "holdout": args.holdout,
                "decoder": args.decoder})


def judge_pruning(eval_dir: Path, log: Path, scorer_spec: str, keep: int, decoder: str = "preview") -> str:
    """Markdown rows: best of N pruned to ``keep`` at each K of ``eval_dir``, with the finished candidates'
    verdicts and final ranking from the early-pruning evaluation's ``log``. Two early rankings of the x0
    pictures (``decoder``): ``scorer_spec``'s CLIP score (through the app's own ClipScorer), and the
    shapes oracle itself on them (not a scorer the app has: the evaluation's judge, all right first, ties
    by the CLIP score), a measure of what any ranking of the x0 picture can know at step K."""
    from pipelines.rerank.clip_scorer import ClipScorer
    from pipelines.rerank.early_pruning import decode_clean
    from pipelines.training.evaluate_pruning import best_among

    arrays, meta = read_shards(eval_dir)
    records = {r["pair"]: r for r in (json.loads(line) for line in log.read_text().splitlines() if line.strip())}
    order = np.argsort(arrays["pair"])
    pairs = [int(p) for p in arrays["pair"][order]]
    missing = [p for p in pairs if p not in records]
    if missing:
        raise ValueError(f"{log} has no record of pairs {missing[:5]}...: evaluate them first")
    attrs = pair_attributes(max(pairs) + 1, evaluation=True)
    scorer = ClipScorer.load(scorer_spec, device="cpu")
    pipe = _pipeline(Path(meta["model"]))
    right = np.array([[v["all"] for v in records[p]["verdicts"]] for p in pairs])  # [P, N]
    lines = [f"early scorer: {scorer.name} ({scorer_spec}); x0 decoded by {decoder}; {len(pairs)} pairs",
             "| generation | early ranking | all right | pairs whose kept hold a right one (of those with one) |",
             "|---|---|---:|---:|"]
    for j, k in enumerate(meta["at"]):
        scores = {"scorer": [], "oracle": []}
        picks = {"scorer": [], "oracle": []}
        for row, p in zip(order, pairs, strict=True):
            images = decode_clean(pipe, torch.from_numpy(arrays["clean"][row, :, j]).float(), decoder)
            result = scorer.score(images, records[p]["prompt"])
            judged = [shapes.judge(image, attrs[p]).all_ok for image in images]
            for name, early in (("scorer", np.array(result.scores)), ("oracle", np.array(judged) * 1000.0
                                                                                + np.array(result.scores))):
                scores[name].append(early)
                kept = list(np.argsort(-early, kind="stable")[:keep])
                picks[name].append(best_among(records[p]["final"], kept))
        for name, label in (("scorer", f"{scorer.name} CLIP score"), ("oracle", "the oracle on x0 (bound)")):
            fidelity = np.mean([right[i, pick] for i, pick in enumerate(picks[name])])
            lines.append(f"| best of {right.shape[1]} pruned to {keep} at step {k} | {label} | {fidelity:.1%} | "
                         f"{kept_right(np.array(scores[name]), right, keep):.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = common.base_parser(__doc__.splitlines()[0], "runs/clip-previews", steps=600, batch=128, lr=5e-5)
    parser.add_argument("--data", type=Path, default=Path("runs/preview-outcomes"),
                        help="preview_outcomes folder (training pairs)")
    parser.add_argument("--holdout", type=int, default=32, help="last pairs of --data kept for validation")
    parser.add_argument("--keep", type=int, default=2, help="M of 'pruned to M'")
    parser.add_argument("--rank-weight", type=float, default=1.0,
                        help="weight of the listwise pruning loss beside the outcome-caption loss")
    parser.add_argument("--judge-pruning", type=Path, default=None,
                        help="preview_outcomes --evaluation folder: print the pruning rows and stop")
    parser.add_argument("--log", type=Path, default=Path("runs/pruning-taesd/pruning.jsonl"),
                        help="the early-pruning evaluation's log (verdicts and final rankings)")
    parser.add_argument("--decoder", default="preview", help="how x0 becomes a picture: preview (the linear "
                        "latent -> RGB map) or taesd (the model's tiny decoder); early pruning must use the same")
    parser.add_argument("--scorer", default="embedded", help="CLIP folder scoring the previews (--judge-pruning)")
    args = parser.parse_args(argv)
    if args.judge_pruning is not None:
        torch.set_num_threads(args.threads)
        print(judge_pruning(args.judge_pruning, args.log, args.scorer, args.keep, args.decoder))
        return
    runtime = common.setup(args)
    train(args, runtime)


if __name__ == "__main__":
    main()
