"""Assemble the shipped embedded model from training runs, in diffusers folder layout.

    python -m pipelines.training.export --unet runs/unet --clip runs/clip --out pipelines/embedded/shapes-tiny

Writes model_index.json (StableDiffusionPipeline, no safety checker), unet/ (EMA weights), vae/ and
text_encoder/ (the exact ones the U-Net was trained against), tokenizer/, scheduler/ (DPM-Solver++
with SD's betas) and clip/ (the tiny CLIPModel + image processor: the reranker; its text tower
is text_encoder/ and its tokenizer is tokenizer/, each stored once).
safetensors only, fp16. Checks that plain diffusers loads it and prints each file's sha256.

Parts trained later against one part of the model (the tiny decoder against vae/, a preview scorer
against text_encoder/) are kept across a whole export when that part's weights are unchanged, and
dropped with a message naming what to retrain when they are not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from pipelines.training import common, data

MAX_BYTES = 40_000_000
DEFAULT_OUT = common.REPO_ROOT / "pipelines" / "embedded" / "shapes-tiny"


def model_index(diffusers_version: str) -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers_version,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def scheduler_config() -> dict:
    """DPM-Solver++ (2M) on Stable Diffusion's training schedule."""
    from diffusers import DPMSolverMultistepScheduler

    from pipelines.training.unet import SCHEDULE

    scheduler = DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                            steps_offset=1)
    config = {"_class_name": type(scheduler).__name__, **dict(scheduler.config)}  # as save_config writes it
    config.pop("_use_default_values", None)  # diffusers bookkeeping (a set: its order changes between runs)
    return config


def save_text_encoder(text_encoder: torch.nn.Module, folder: Path) -> None:
    """CLIPTextModel in the classic key layout (``text_model.*``, as SD's text_encoder), fp16."""
    from safetensors.torch import save_file

    from pipelines.rerank.clip_scorer import text_tower_key

    folder.mkdir(parents=True, exist_ok=True)
    state = {text_tower_key(k): v.half().contiguous() for k, v in text_encoder.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = text_encoder.config
    config.dtype = "float32"  # transformers 5 loads "auto" as this, matching diffusers' float32 default
    config.save_pretrained(str(folder))


def save_clip(clip_run: Path, folder: Path, text_encoder: Path) -> None:
    """The reranker: CLIPModel fp16 without the text weights it shares + a CLIPImageProcessor for 64x64 input.

    Text-tower weights equal (in fp16) to ``text_encoder`` (the U-Net's, shipped as ``../text_encoder``)
    are left out; only those a reranker fine-tune changed (:mod:`pipelines.training.clip_hard_negatives`
    tunes the text layers, never the token embedding) are stored. The tokenizer is ``../tokenizer``;
    :func:`pipelines.rerank.clip_scorer.load_clip_model` joins them. Copies would push the folder over
    the 40 MB budget.
    """
    from safetensors.torch import load_file, save_file
    from transformers import CLIPImageProcessor, CLIPModel

    from pipelines.rerank.clip_scorer import TEXT_TOWER_PREFIX, text_tower_key

    check_shared_text_tower(text_encoder, clip_run)
    shared = {text_tower_key(k): v.half() for k, v in load_file(str(text_encoder / "model.safetensors")).items()}
    folder.mkdir(parents=True, exist_ok=True)
    clip = CLIPModel.from_pretrained(str(clip_run / "ckpt" / "clip"), dtype=torch.float32)
    state = {}
    for key, value in clip.state_dict().items():
        value = value.half().contiguous()
        if key.startswith(TEXT_TOWER_PREFIX) and key in shared and torch.equal(shared[key], value):
            continue
        state[key] = value
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    clip.config.dtype = "float32"  # stored fp16, computed in float32 unless asked otherwise
    clip.config.save_pretrained(str(folder))
    side = clip.config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                       image_mean=list(data.CLIP_MEAN), image_std=list(data.CLIP_STD),
                       do_center_crop=True, resample=3).save_pretrained(str(folder))


def check_shared_text_tower(text_encoder: Path, clip_run: Path) -> None:
    """The reranker shares the U-Net's token embedding (shipped once, in ``text_encoder``): it must be equal."""
    from safetensors import safe_open

    from pipelines.rerank.clip_scorer import TOKEN_EMBEDDING_KEY, text_tower_key

    with safe_open(str(text_encoder / "model.safetensors"), "pt") as handle:
        key = next(k for k in handle.keys() if text_tower_key(k) == TOKEN_EMBEDDING_KEY)
        shipped = handle.get_tensor(key).half()
    with safe_open(str(clip_run / "ckpt" / "clip" / "model.safetensors"), "pt") as handle:
        tuned = handle.get_tensor(TOKEN_EMBEDDING_KEY).half() if TOKEN_EMBEDDING_KEY in handle.keys() else None
    if tuned is None or not torch.equal(tuned, shipped):
        raise SystemExit(f"{text_encoder} and {clip_run}'s CLIP differ in {TOKEN_EMBEDDING_KEY}: the "
                         "U-Net was trained against another CLIP; export with that CLIP run (--clip)")


def copy_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file in common.TOKENIZER_DIR.iterdir():
        shutil.copy2(file, folder / file.name)


# Parts trained after the model against one of its parts: (the part, how to make them again).
DEPENDENT_PARTS = {
    "vae_decoder_tiny": ("vae", "python -m pipelines.training.tiny_decoder"),
    "clip_preview": ("text_encoder", "python -m pipelines.training.clip_previews, then export --preview-clip"),
}


def carry_dependent_parts(old: Path, new: Path, provenance: dict) -> list[str]:
    """Copy ``old``'s dependent parts (DEPENDENT_PARTS) into ``new`` where the part each was trained against
    has the same weights in both, with their provenance entries; returns a line for each one dropped."""
    old_provenance = json.loads((old / "provenance.json").read_text()) if (old / "provenance.json").is_file() else {}
    dropped = []
    for name, (part, remake) in DEPENDENT_PARTS.items():
        if not (old / name).is_dir():
            continue
        if (new / part).is_dir() and same_weights(old / part, new / part):
            shutil.copytree(old / name, new / name)
            if name in old_provenance:
                provenance[name] = old_provenance[name]
        else:
            dropped.append(f"dropped {name}/: it was trained against the previous {part}/; make it again with {remake}")
    return dropped


def export(unet_run: Path, clip_run: Path, out: Path) -> dict:
    """Write the folder; returns provenance (steps of each part)."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    frozen = unet_run / "frozen"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "model_index.json").write_text(json.dumps(model_index(diffusers.__version__), indent=2) + "\n")
    half = torch.float16
    unet = UNet2DConditionModel.from_pretrained(str(unet_run / "ckpt" / "unet_ema"), torch_dtype=half)
    unet.save_pretrained(str(tmp / "unet"))
    AutoencoderKL.from_pretrained(str(frozen / "vae"), torch_dtype=half).save_pretrained(str(tmp / "vae"))
    save_text_encoder(CLIPTextModel.from_pretrained(str(frozen / "text_encoder")), tmp / "text_encoder")
    copy_tokenizer(tmp / "tokenizer")
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(), indent=2) + "\n")
    save_clip(clip_run, tmp / "clip", frozen / "text_encoder")
    provenance = {
        "unet": common.read_state(unet_run),
        "frozen": json.loads((frozen / "state.json").read_text()),
        "reranker_clip": common.read_state(clip_run),
        "data_seeds": {"train": data.TRAIN_SEED, "heldout": data.HELDOUT_SEED},
    }
    for line in carry_dependent_parts(out, tmp, provenance):
        print(line)
    (tmp / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return provenance


def replace_part(out: Path, name: str, write: Callable[[Path], None]) -> None:
    """Make ``out/name`` anew: ``write(folder)`` fills a temporary folder, which then takes its place."""
    tmp = out / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(out / name, ignore_errors=True)
    tmp.rename(out / name)


def record_provenance(out: Path, key: str, state: dict, fine_tune: bool) -> dict:
    """Set ``key`` in ``out/provenance.json`` to a run's state; for a ``fine_tune`` of the part, the entry it
    replaces stays as ``<key>_before_fine_tune`` (the first such, over several fine-tunes)."""
    provenance = json.loads((out / "provenance.json").read_text())
    if fine_tune:
        provenance[f"{key}_before_fine_tune"] = provenance.get(f"{key}_before_fine_tune", provenance[key])
    provenance[key] = state
    (out / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    return provenance


def export_clip_only(clip_run: Path, out: Path, name: str = "clip") -> dict:
    """Replace only a CLIP folder of ``out`` by a CLIP run sharing the shipped token embedding: the reranker
    (``clip``, e.g. the hard-negative fine-tune) or early pruning's preview scorer (``clip_preview``,
    :mod:`pipelines.training.clip_previews`); the U-Net, VAE and text encoder stay as they are."""
    replace_part(out, name, lambda folder: save_clip(clip_run, folder, out / "text_encoder"))
    reranker = name == "clip"
    return record_provenance(out, "reranker_clip" if reranker else name, common.read_state(clip_run), reranker)


def same_weights(folder: Path, other: Path) -> bool:
    """Whether two parts' safetensors files hold the same tensors, ``folder``'s cast to ``other``'s dtypes
    (fp32 training copies against the fp16 shipped ones). Configs are not compared: they name the writer."""
    from safetensors.torch import load_file

    names = sorted(p.name for p in folder.glob("*.safetensors"))
    if not names or names != sorted(p.name for p in other.glob("*.safetensors")):
        return False
    for name in names:
        mine, theirs = load_file(str(folder / name)), load_file(str(other / name))
        if mine.keys() != theirs.keys() or any(
                not torch.equal(mine[k].to(theirs[k].dtype), theirs[k]) for k in theirs):
            return False
    return True


def same_frozen_parts(frozen: Path, model: Path) -> None:
    """Raise unless ``frozen``'s text encoder and VAE are ``model``'s (up to the fp16 it ships in)."""
    for part in ("text_encoder", "vae"):
        if not same_weights(frozen / part, model / part):
            raise SystemExit(f"{frozen / part} is not {model / part}: the U-Net was trained against another "
                             f"{part}; export the whole model instead")


def export_unet_only(unet_run: Path, out: Path) -> dict:
    """Replace only ``out/unet`` by the EMA U-Net of a run fine-tuned from this very model
    (``unet --init-from``); the text encoder, VAE and reranker stay as they are."""
    from diffusers import UNet2DConditionModel

    same_frozen_parts(unet_run / "frozen", out)
    unet = UNet2DConditionModel.from_pretrained(str(unet_run / "ckpt" / "unet_ema"), torch_dtype=torch.float16)
    replace_part(out, "unet", lambda folder: unet.save_pretrained(str(folder)))
    return record_provenance(out, "unet", common.read_state(unet_run), fine_tune=True)


def file_table(folder: Path) -> tuple[list[tuple[str, int, str]], int]:
    """(relative path, bytes, sha256) of every file, and the total size."""
    rows = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        rows.append((str(path.relative_to(folder)), path.stat().st_size, digest))
    return rows, sum(r[1] for r in rows)


def check_loads(folder: Path) -> None:
    """Plain diffusers loads the folder offline and a 2-step 512x512 generation runs."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    image = pipe("a red circle on a blue background", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (512, 512), image.size


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", type=Path, default=Path("runs/unet"), help="U-Net run (with frozen/)")
    parser.add_argument("--clip", type=Path, default=Path("runs/clip"), help="CLIP run for the reranker")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--clip-only", action="store_true",
                        help="replace only clip/ (a CLIP run sharing the shipped text encoder)")
    parser.add_argument("--preview-clip", type=Path, default=None,
                        help="replace only clip_preview/ (a pipelines.training.clip_previews run)")
    parser.add_argument("--unet-only", action="store_true",
                        help="replace only unet/ (a U-Net run fine-tuned with --init-from this model)")
    args = parser.parse_args(argv)
    if args.unet_only:
        provenance = export_unet_only(args.unet, args.out)
        for name, size, digest in file_table(args.out / "unet")[0]:
            print(f"| `{args.out.name}/unet/{name}` | {size} | {digest} |")
        print(f"unet step {provenance['unet']['step']} (from step {provenance['unet_before_fine_tune']['step']})")
        if not args.no_check:
            check_loads(args.out)
        return
    if args.preview_clip is not None and common.read_state(args.preview_clip).get("decoder", "preview") != "preview":
        raise SystemExit(f"{args.preview_clip} learned from x0 decoded by another decoder; early pruning in the app "
                         "scores the linear preview (pipelines.rerank.early_pruning.DEFAULT_EARLY_DECODER)")
    if args.clip_only or args.preview_clip is not None:
        folder = "clip" if args.clip_only else "clip_preview"
        export_clip_only(args.clip if args.clip_only else args.preview_clip, args.out, folder)
        for name, size, digest in file_table(args.out / folder)[0]:
            print(f"| `{args.out.name}/{folder}/{name}` | {size} | {digest} |")
        total = file_table(args.out)[1]
        print(f"{args.out} is {total / 2**20:.2f} MiB")
        if total > MAX_BYTES:
            raise SystemExit(f"{args.out} is {total} bytes, over the {MAX_BYTES} byte budget")
        return
    provenance = export(args.unet, args.clip, args.out)
    rows, total = file_table(args.out)
    print("| file | bytes | sha256 |\n|---|---:|---|")
    for name, size, digest in rows:
        print(f"| `{args.out.name}/{name}` | {size} | {digest} |")  # the rows of weights.md
    print(f"total {total / 2**20:.2f} MiB; unet step {provenance['unet']['step']}, "
          f"text encoder/VAE from CLIP step {provenance['frozen']['clip_step']} / VAE step "
          f"{provenance['frozen']['vae_step']}, reranker CLIP step {provenance['reranker_clip']['step']}")
    if total > MAX_BYTES:
        raise SystemExit(f"{args.out} is {total} bytes, over the {MAX_BYTES} byte budget")
    if not args.no_check:
        check_loads(args.out)
        print("diffusers.StableDiffusionPipeline.from_pretrained loads it; a 2-step generation ran")


if __name__ == "__main__":
    main()
