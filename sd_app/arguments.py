"""Generation options shared by ``sd-app generate`` and ``sd-app batch``, and the request they describe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.generation.conditioning import LATENT_UPSCALERS, MASKED_CONTENT, PIXEL_UPSCALERS, RESIZE_MODES
from pipelines.generation.request import GenerationRequest
from pipelines.generation.schedulers import DEFAULT_SAMPLER, few_step_defaults

SIDES = ("left", "right", "top", "bottom")


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that describe one generation request, plus model, reranking and output."""
    defaults = GenerationRequest()
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"denoising steps (1-150; default {defaults.steps}, 4 for LCM and TCD)")
    parser.add_argument("--cfg", type=float, default=None,
                        help=f"classifier-free guidance scale (default {defaults.cfg_scale:g}, 1 for LCM and TCD)")
    parser.add_argument("--eta", type=float, default=None, help="TCD's gamma (default 0.3) or DDIM's eta (0)")
    parser.add_argument("--seed", type=int, default=-1, help="seed of the first image; -1 = random")
    parser.add_argument("--width", type=int, default=None, help="default 512, or the init image's width")
    parser.add_argument("--height", type=int, default=None, help="default 512, or the init image's height")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, help="A1111 sampler name (see `sd-app info`)")
    parser.add_argument("--n", type=int, default=1, help="number of images / candidates (1-16)")
    parser.add_argument("--model", default="embedded", help="'embedded', a diffusers folder or a .safetensors")
    parser.add_argument("--vae", default=None, help="separate VAE .safetensors")
    add_decoder_argument(parser)
    add_library_arguments(parser)
    parser.add_argument("--reranker", default="embedded", help="CLIP model folder used to score candidates")
    parser.add_argument("--no-rerank", action="store_true", help="keep generation order, no CLIP scores")
    parser.add_argument(
        "--rerank-by", choices=("clip", "contrastive", "mixed"), default="clip",
        help="clip: CLIP score; contrastive: the prompt's probability against counterfactual captions made from "
             "it (swapped colours, other counts); mixed: half of each",
    )
    add_scorer_arguments(parser)
    parser.add_argument("--min-score", action="append", default=[], metavar="[NAME=]VALUE",
                        help="regenerate with new seeds until a candidate reaches this score, in the scorer's own "
                             "units (e.g. aesthetic=5.5; a bare VALUE when one scorer ranks; repeatable)")
    parser.add_argument("--extra-rounds", type=int, default=3,
                        help="with --min-score: at most this many more rounds of --n candidates (0-10, default 3); "
                             "with --prune-to, a round after a pruned one finishes the candidates it pruned")
    parser.add_argument("--keep", type=int, default=None, help="save only the best K candidates")
    parser.add_argument(
        "--prune-to", type=int, default=0, metavar="M",
        help="early pruning: finish only the M candidates whose predicted image scores best at --prune-at",
    )
    parser.add_argument("--prune-at", type=int, default=0, metavar="K",
                        help="the step after which candidates are pruned (1 to steps - 1; with --prune-to)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs/)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_image_arguments(parser)


SCORER_HELP = (
    "rank by this scorer, KIND[=SOURCE[@COMPANION]][:WEIGHT] (repeatable; overrides --rerank-by): clip, contrastive, "
    "mixed (on --reranker, or =FOLDER), pickscore=CLIP_FOLDER[@PROCESSOR_FOLDER] (logit_scale x cosine), "
    "aesthetic=HEAD.safetensors[@CLIP_ViT-L/14_FOLDER] (LAION's head); several combine by WEIGHT (default 1) "
    "over each scorer's standardised scores"
)


def add_scorer_arguments(parser: argparse.ArgumentParser) -> None:
    """``--scorer`` (repeatable): the preference scorers beside the reranker CLIP and their weights."""
    parser.add_argument("--scorer", action="append", default=[], metavar="KIND[=SOURCE][:WEIGHT]", help=SCORER_HELP)


def scorer_specs(args: argparse.Namespace) -> tuple:
    """The ``--scorer`` values parsed (ValueError naming the bad one); each kind at most once."""
    from pipelines.rerank.scorer_specs import parse_scorer

    specs = []
    for text in args.scorer:
        try:
            specs.append(parse_scorer(text))
        except ValueError as error:
            raise ValueError(f"--scorer {text!r}: {error}") from None
    kinds = [spec.kind for spec in specs]
    twice = sorted({kind for kind in kinds if kinds.count(kind) > 1})
    if twice:
        raise ValueError(f"--scorer: each kind may be given once, got {', '.join(twice)} more than once")
    if specs and sum(spec.weight for spec in specs) <= 0:
        raise ValueError("--scorer: at least one scorer needs a weight above 0")
    return tuple(specs)


def scores_wanted(args: argparse.Namespace, scorers_named: bool, n: int) -> bool:
    """Whether ``sd-app generate`` loads a scorer: to rank several candidates, to hold a ``--min-score``, or
    when asked (``--scorer``, ``--score``). A single image is not scored by default: there is nothing to
    rank, and a one-shot process saves the scorer's import and load. ValueError for a minimum score that
    ``--no-rerank`` switches off."""
    if args.no_rerank or (args.reranker.lower() == "none" and not scorers_named):
        if args.min_score:
            raise ValueError("--min-score needs reranking (drop --no-rerank, or name a --reranker)")
        return False
    return n > 1 or bool(args.min_score) or scorers_named or args.score


def check_flag_combinations(args: argparse.Namespace, defaults: argparse.Namespace) -> None:
    """ValueError for ``generate`` / ``batch`` flags that the other flags make meaningless (they would be silently
    ignored): ranking flags without ranking; image-to-image settings without an init image, mask settings without a
    mask (``--mask`` or the one ``--outpaint`` makes), ``--padding`` without ``--only-masked``, ``--outpaint-sides``
    without ``--outpaint``; hires fix settings without a hires fix, ``--hires-scale`` beside a ``--hires-size`` (the
    size wins, A1111's rule); ``--extra-rounds`` without ``--min-score``; ``--server-auth`` without ``--server``.
    ``defaults``: the parser's defaults, to tell a flag given from one left alone (hence the options whose
    default is None: a value equal to the default would pass for "not given")."""

    def given(name: str) -> bool:
        return hasattr(args, name) and getattr(args, name) != getattr(defaults, name)

    def refuse(names: tuple[str, ...], reason: str) -> None:
        flags = [f"--{name.replace('_', '-')}" for name in names if given(name)]
        if flags:
            raise ValueError(f"{', '.join(flags)} {'has' if len(flags) == 1 else 'have'} no effect {reason}")

    if args.no_rerank or (args.reranker.lower() == "none" and not args.scorer):
        refuse(("scorer", "score", "rerank_by", "keep"), "without reranking (--no-rerank or --reranker "
               "none): nothing is scored, so nothing is ranked")
    hires = args.hires_scale is not None or args.hires_size is not None
    if args.init_image is None:
        refuse(("mask_blur", "masked_content", "only_masked", "padding", "invert_mask", "resize_mode",
                "outpaint_sides"), "without --init-image")
        if not hires:
            refuse(("strength",), "without --init-image or a hires fix (--hires-scale or --hires-size)")
    if not hires:
        refuse(("hires_steps", "hires_upscaler"), "without a hires fix (--hires-scale or --hires-size)")
    if not args.outpaint:
        refuse(("outpaint_sides",), "without --outpaint")
    if args.mask is None and not args.outpaint:
        refuse(("mask_blur", "masked_content", "only_masked", "padding", "invert_mask"),
               "without a mask (--mask, or the border --outpaint repaints)")
    if not args.only_masked:
        refuse(("padding",), "without --only-masked (it pads the mask's box that --only-masked generates)")
    if args.hires_scale is not None and args.hires_size is not None and any(
            parse_hires_size(args.hires_size, "--hires-size")):
        raise ValueError("--hires-scale has no effect with --hires-size (the size wins, as A1111's hr_resize_x/y "
                         "over hr_scale); give one of them")
    if not args.min_score:
        refuse(("extra_rounds",), "without --min-score")
    if getattr(args, "server", None) is None:
        refuse(("server_auth", "server_timeout"), "without --server")


def ranking_options(args: argparse.Namespace, specs: tuple) -> dict:
    """``engine.generate`` options of the scorer flags: scorers and weights, minimum scores, extra rounds."""
    from pipelines.rerank.scorer_specs import parse_min_scores, thresholds_by_label

    try:
        thresholds = parse_min_scores(args.min_score)
        if thresholds:  # named for scorers in use, within their range: checked before anything loads
            thresholds_by_label(thresholds, [spec.kind for spec in specs] or [args.rerank_by])
    except ValueError as error:
        raise ValueError(f"--min-score: {error}") from None
    if not 0 <= args.extra_rounds <= 10:
        raise ValueError(f"--extra-rounds must be between 0 and 10, got {args.extra_rounds}")
    options: dict = {"rerank_by": args.rerank_by, "min_score": thresholds or None, "extra_rounds": args.extra_rounds}
    if specs:
        options["scorers"] = {spec.kind: spec.weight for spec in specs}
    return options


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """img2img / inpainting / outpainting and hires fix options (A1111's, spelled as flags)."""
    group = parser.add_argument_group("image to image (img2img, inpaint, outpaint)")
    group.add_argument("--init-image", type=Path, default=None, help="start from this image (img2img)")
    group.add_argument("--mask", type=Path, default=None, help="inpaint: white = repaint (resized to the image)")
    group.add_argument(
        "--strength", type=float, default=None,
        help="denoising strength 0-1 (default 0.75 for img2img, 0.7 for the hires fix)",
    )
    group.add_argument("--mask-blur", type=int, default=None, help="Gaussian blur of the mask, px (default 4)")
    group.add_argument("--masked-content", choices=MASKED_CONTENT, default=None,
                       help="what the masked area starts from (default original; fill when outpainting)")
    group.add_argument("--only-masked", action="store_true",
                       help="inpaint area 'only masked': generate the mask's box at full size, paste it back")
    group.add_argument("--padding", type=int, default=None,
                       help="pixels around the mask with --only-masked (default 32)")
    group.add_argument("--invert-mask", action="store_true", help="repaint what is black in the mask")
    group.add_argument("--resize-mode", choices=tuple(RESIZE_MODES), default=None,
                       help="fit the init image to --width x --height (default: just resize)")
    group.add_argument("--outpaint", type=int, default=0, metavar="PIXELS",
                       help="pad the init image by PIXELS on --outpaint-sides and inpaint the new border")
    group.add_argument("--outpaint-sides", default=None,
                       help="comma-separated, some of left,right,top,bottom (default: all four)")
    hires = parser.add_argument_group("hires fix (text to image)")
    hires.add_argument("--hires-scale", type=float, default=None, help="upscale the first pass by this (e.g. 2)")
    hires.add_argument("--hires-size", default=None, metavar="WxH", help="or upscale to this size (0 = keep aspect)")
    hires.add_argument("--hires-upscaler", choices=(*LATENT_UPSCALERS, *PIXEL_UPSCALERS), default=None,
                       help="default Latent")
    hires.add_argument("--hires-steps", type=int, default=None,
                       help="second-pass steps (0, the default: same as --steps)")


def request_from_args(args: argparse.Namespace, prompt: str) -> GenerationRequest:
    """The request the generation options of ``add_generation_arguments`` describe; notes go to stderr."""
    request, notes = request_and_notes(args, prompt)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return request


def request_and_notes(args: argparse.Namespace, prompt: str) -> tuple[GenerationRequest, list[str]]:
    """The request, and notes on what was adjusted (a mask resized to the image, an outpainting canvas)."""
    image, notes = image_from_args(args)
    hires = hires_from_args(args)
    if image is not None and hires is not None:
        raise ValueError("--hires-scale/--hires-size are for text to image; with --init-image set --width/--height")
    width, height = args.width, args.height
    if image is not None:
        from pipelines.generation.masks import generation_size

        own_width, own_height = generation_size(image.init_image)
        width = own_width if width is None else width
        height = own_height if height is None else height
    defaults = GenerationRequest()
    steps, cfg = few_step_defaults(args.sampler) or (defaults.steps, defaults.cfg_scale)
    request = GenerationRequest(
        prompt=prompt,
        negative_prompt=args.negative,
        steps=steps if args.steps is None else args.steps,
        cfg_scale=cfg if args.cfg is None else args.cfg,
        eta=args.eta,
        seed=args.seed,
        width=defaults.width if width is None else width,
        height=defaults.height if height is None else height,
        n=args.n,
        clip_skip=args.clip_skip,
        sampler=args.sampler,
        image=image,
        hires=hires,
        prune_to=args.prune_to,
        prune_at=args.prune_at,
        vae_decoder=args.vae_decoder,
    )
    return request, notes


def image_from_args(args: argparse.Namespace):  # noqa: ANN201 - (ImageConditioning | None, notes)
    """The init image settings of ``--init-image`` and friends, or (None, []) without an init image."""
    if args.init_image is None:
        for flag, value in (("--mask", args.mask), ("--outpaint", args.outpaint)):
            if value:
                raise ValueError(f"{flag} needs --init-image")
        return None, []
    from pipelines.generation.masks import image_conditioning
    from sd_app.images import open_image_file

    init = open_image_file(args.init_image, "--init-image")
    mask = open_image_file(args.mask, "--mask", mask=True) if args.mask is not None else None
    outpaint = None
    if args.outpaint:
        text = ",".join(SIDES) if args.outpaint_sides is None else args.outpaint_sides
        sides = [side.strip() for side in text.split(",") if side.strip()]
        unknown = [side for side in sides if side not in SIDES]
        if unknown or not sides:
            raise ValueError(f"--outpaint-sides must name some of {', '.join(SIDES)}, got {args.outpaint_sides!r}")
        outpaint = {side: args.outpaint for side in sides}
    settings: dict[str, object] = {
        "strength": 0.75 if args.strength is None else args.strength,
        "inpaint_full_res": args.only_masked,
        "invert_mask": args.invert_mask,
    }
    for name in ("mask_blur", "padding", "resize_mode", "masked_content"):  # None: ImageConditioning's default
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    return image_conditioning(init, mask, outpaint=outpaint, **settings)


def parse_hires_size(text: str, name: str) -> tuple[int, int]:
    """A hires fix's "resize to" ``WxH`` (A1111's hr_resize_x, hr_resize_y; 0 keeps the aspect); ValueError
    naming ``name`` otherwise."""
    x, sep, y = text.lower().partition("x")
    if not sep or not x.strip().isdigit() or not y.strip().isdigit():
        raise ValueError(f"{name} must look like 1024x768 (0 keeps the aspect), got {text!r}")
    return int(x), int(y)


def hires_from_args(args: argparse.Namespace):  # noqa: ANN201 - HiresFix | None
    """The hires fix of ``--hires-scale`` / ``--hires-size``, or None."""
    if args.hires_scale is None and args.hires_size is None:
        return None
    from pipelines.generation.conditioning import HiresFix

    resize_x, resize_y = parse_hires_size(args.hires_size, "--hires-size") if args.hires_size is not None else (0, 0)
    return HiresFix(
        scale=2.0 if args.hires_scale is None else args.hires_scale,
        upscaler="Latent" if args.hires_upscaler is None else args.hires_upscaler,
        steps=0 if args.hires_steps is None else args.hires_steps,
        denoising_strength=0.7 if args.strength is None else args.strength,
        resize_x=resize_x,
        resize_y=resize_y,
    )


def add_decoder_argument(parser: argparse.ArgumentParser) -> None:
    """``--vae-decoder``: A1111's "VAE type for decode" (``sd_vae_decode_method``)."""
    parser.add_argument("--vae-decoder", default="Full", type=str.strip, metavar="{Full,TAESD}",
                        help="Full: the model's VAE decoder; TAESD: its tiny decoder, several times faster and "
                             "slightly softer (A1111's 'VAE type for decode')")


def add_library_arguments(parser: argparse.ArgumentParser) -> None:
    """``--models-dir`` (A1111 / ComfyUI model folders: --model and --vae may then be names) and ``--clip-skip``."""
    parser.add_argument(
        "--models-dir", type=Path, action="append", default=[], metavar="DIR",
        help="an A1111 or ComfyUI folder (or its models/): checkpoints, VAEs, LoRAs, embeddings (repeatable)",
    )
    parser.add_argument("--clip-skip", type=int, default=1, help="A1111's clip skip: 1 (default) to 12")
