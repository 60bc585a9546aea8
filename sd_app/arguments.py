"""Generation options shared by ``sd-app generate`` and ``sd-app batch``, and the request they describe."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.generation.request import GenerationRequest
from pipelines.generation.schedulers import DEFAULT_SAMPLER


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that describe one generation request, plus model, reranking and output."""
    defaults = GenerationRequest()
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="denoising steps (1-150)")
    parser.add_argument("--cfg", type=float, default=defaults.cfg_scale, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=-1, help="seed of the first image; -1 = random")
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--height", type=int, default=defaults.height)
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, help="A1111 sampler name (see `sd-app info`)")
    parser.add_argument("--n", type=int, default=1, help="number of images / candidates (1-16)")
    parser.add_argument("--model", default="embedded", help="'embedded', a diffusers folder or a .safetensors")
    parser.add_argument("--vae", default=None, help="separate VAE .safetensors")
    add_library_arguments(parser)
    parser.add_argument("--reranker", default="embedded", help="CLIP model folder used to score candidates")
    parser.add_argument("--no-rerank", action="store_true", help="keep generation order, no CLIP scores")
    parser.add_argument(
        "--rerank-by", choices=("clip", "contrastive", "mixed"), default="clip",
        help="clip: CLIP score; contrastive: the prompt's probability against counterfactual captions made from "
             "it (swapped colours, other counts); mixed: half of each",
    )
    parser.add_argument("--keep", type=int, default=None, help="save only the best K candidates")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs/)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def request_from_args(args: argparse.Namespace, prompt: str) -> GenerationRequest:
    """The request the generation options of ``add_generation_arguments`` describe."""
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=args.negative,
        steps=args.steps,
        cfg_scale=args.cfg,
        seed=args.seed,
        width=args.width,
        height=args.height,
        n=args.n,
        clip_skip=args.clip_skip,
        sampler=args.sampler,
    )


def add_library_arguments(parser: argparse.ArgumentParser) -> None:
    """``--models-dir`` (A1111 / ComfyUI model folders: --model and --vae may then be names) and ``--clip-skip``."""
    parser.add_argument(
        "--models-dir", type=Path, action="append", default=[], metavar="DIR",
        help="an A1111 or ComfyUI folder (or its models/): checkpoints, VAEs, LoRAs, embeddings (repeatable)",
    )
    parser.add_argument("--clip-skip", type=int, default=1, help="A1111's clip skip: 1 (default) to 12")
