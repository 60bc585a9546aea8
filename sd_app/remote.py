"""``sd-app generate --server URL``: hand the request to a running ``sd-app serve`` and write its images.

The warm path: a server keeps the models loaded, so a request costs about the denoising alone, and this
client imports no torch, diffusers or transformers (the standard library's urllib, PIL for the PNGs). It
speaks the server's A1111 route ``POST /sdapi/v1/txt2img`` with sd-app's extension fields (``rerank``,
``rerank_by``, ``scorers``, ``min_score``, ``extra_rounds``, ``prune_to``, ``prune_at``) and
``override_settings`` (checkpoint, VAE, clip skip), and writes the files a local run writes: the same
names (``sd_app.storage.save_png``) and the same ``parameters`` text (the server's
infotexts, made by the same code).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.generation.request import GenerationRequest
from pipelines.generation.schedulers import resolve_sampler

if TYPE_CHECKING:
    from PIL import Image

    from sd_app.run_report import RunReport

TXT2IMG_PATH = "/sdapi/v1/txt2img"
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class RemoteImage:
    """One image as the server sent it: best first when reranked."""

    image: Image.Image
    seed: int
    parameters: str  # the A1111 ``parameters`` text (infotext)
    score: float | None


@dataclass(frozen=True)
class RemoteResult:
    """The server's images and the ``info`` object that describes them."""

    images: list[RemoteImage]
    info: dict[str, Any]


def server_endpoint(url: str, auth: str | None = None) -> tuple[str, str | None]:
    """(base URL without credentials, ``user:password`` or None) of ``--server`` / ``--server-auth``.

    Credentials may also come in the URL (``http://user:pw@127.0.0.1:7860``); ``auth`` wins.
    """
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--server must look like http://127.0.0.1:7860, got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"--server has a bad port: {url!r}") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    base = f"{parts.scheme}://{host}{f':{port}' if port else ''}{parts.path.rstrip('/')}"
    from_url = None
    if parts.username is not None:
        from_url = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    credentials = auth if auth is not None else from_url
    if credentials is not None and (":" not in credentials or not credentials.partition(":")[0]):
        raise ValueError("--server-auth must look like user:password")
    return base, credentials


def txt2img_payload(
    request: GenerationRequest,
    *,
    rerank: bool,
    rerank_by: str,
    model: str | None = None,
    vae: str | None = None,
    scorers: dict[str, float] | None = None,
    min_score: dict[str, float] | None = None,
    extra_rounds: int = 3,
) -> dict[str, Any]:
    """The ``/sdapi/v1/txt2img`` body for ``request``: A1111's fields, sd-app's ranking fields (rerank,
    scorers by name and weight, minimum scores, early pruning), and ``override_settings`` naming the
    checkpoint and VAE for this request only (then switched back)."""
    if request.image is not None:
        raise ValueError("--server takes text-to-image requests; run img2img/inpainting locally (no --server)")
    sampler = resolve_sampler(request.sampler)
    # Always both, so the server's own defaults (serve --clip-skip / --vae-decoder) never change the files.
    overrides: dict[str, Any] = {"CLIP_stop_at_last_layers": request.clip_skip,
                                 "sd_vae_decode_method": request.vae_decoder}
    if model is not None:
        overrides["sd_model_checkpoint"] = model
    if vae is not None:
        overrides["sd_vae"] = vae
    body: dict[str, Any] = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "steps": request.steps,
        "cfg_scale": request.cfg_scale,
        "seed": request.seed,
        "width": request.width,
        "height": request.height,
        "batch_size": request.n,
        "n_iter": 1,
        "sampler_name": sampler.name,
        "scheduler": sampler.schedule,
        "send_images": True,
        "save_images": False,  # the files are written here, where a local run writes them
        "rerank": rerank,
        "rerank_by": rerank_by,
        "prune_to": request.prune_to,
        "prune_at": request.prune_at,
        "override_settings": overrides,
        "override_settings_restore_afterwards": True,
    }
    if request.eta is not None:
        body["eta"] = request.eta  # DDIM's eta, TCD's gamma
    if scorers:
        body["scorers"] = dict(scorers)
    if min_score:
        body.update(min_score=dict(min_score), extra_rounds=extra_rounds)
    if request.hires is not None:
        hires = request.hires
        body.update(
            enable_hr=True,
            hr_scale=hires.scale,
            hr_upscaler=hires.upscaler,
            hr_second_pass_steps=hires.steps,
            denoising_strength=hires.denoising_strength,
            hr_resize_x=hires.resize_x,
            hr_resize_y=hires.resize_y,
        )
    return body


def post_json(
    url: str, payload: dict[str, Any], auth: str | None = None, timeout: float = DEFAULT_TIMEOUT_S
) -> dict[str, Any]:
    """POST ``payload`` as JSON and return the JSON answer; OSError / ValueError with one clear line."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode("utf-8")).decode("ascii")
    data = json.dumps(payload).encode("utf-8")
    http_request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(http_request, timeout=timeout) as response:  # noqa: S310 - http(s) only
            text = response.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        detail = _detail(error)
        if error.code == 401:
            hint = "wrong user or password" if auth is not None else "pass --server-auth USER:PASSWORD"
            raise ValueError(f"the server at {url} requires auth ({hint})") from None
        if error.code == 404:
            raise ValueError(f"{url} not found (404): is this an sd-app or A1111 server?") from None
        if error.code in (400, 403, 413, 422, 429, 503):
            raise ValueError(f"the server refused the request ({error.code}): {detail}") from None
        raise OSError(f"the server failed ({error.code}): {detail}") from None
    except urllib.error.URLError as error:
        reason = getattr(error.reason, "strerror", None) or str(error.reason)
        raise OSError(f"cannot reach the server at {url}: {reason} (is `sd-app serve` running there?)") from None
    except TimeoutError:
        raise OSError(f"no answer from {url} within {timeout:.0f} s") from None
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        raise OSError(f"the server at {url} did not answer with JSON") from None
    if not isinstance(answer, dict):
        raise OSError(f"the server at {url} answered with JSON that is not an object")
    return answer


def _detail(error: urllib.error.HTTPError) -> str:
    """The ``detail`` of a JSON error body (FastAPI's), else the reason phrase."""
    try:
        detail = json.loads(error.read().decode("utf-8", "replace")).get("detail")
    except (json.JSONDecodeError, AttributeError, OSError):
        detail = None
    if isinstance(detail, list):  # pydantic validation errors: field paths and messages
        detail = "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', [])[1:])}: {item.get('msg')}"
            for item in detail
            if isinstance(item, dict)
        )
    return str(detail or error.reason)


def txt2img(base_url: str, payload: dict[str, Any], auth: str | None = None,
            timeout: float = DEFAULT_TIMEOUT_S) -> RemoteResult:
    """Run one txt2img request on the server; images in the server's order (best first when reranked)."""
    from PIL import Image

    answer = post_json(base_url + TXT2IMG_PATH, payload, auth, timeout)
    try:
        info = json.loads(answer["info"]) if isinstance(answer.get("info"), str) else dict(answer["info"])
        encoded = list(answer["images"])
        seeds = [int(seed) for seed in info["all_seeds"]]
        texts = [str(text) for text in info["infotexts"]]
    except (KeyError, TypeError, ValueError) as error:
        raise OSError(f"the server's answer lacks images/info ({error})") from None
    if not encoded:  # an sd-app server answers so only for a job stopped before its first step
        how = "interrupted (POST /sdapi/v1/interrupt)" if info.get("interrupted") else "skipped (POST /sdapi/v1/skip)"
        raise OSError(f"the job was {how} on the server before its first step; no image was made")
    scores = info.get("rerank_scores") or [None] * len(encoded)
    if not len(encoded) == len(seeds) == len(texts) == len(scores):
        raise OSError("the server's answer has different numbers of images, seeds and infotexts")
    images = []
    for index, data in enumerate(encoded):
        try:
            image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
            image.load()
        except (binascii.Error, OSError, ValueError) as error:
            raise OSError(f"image {index} from the server is not a base64 PNG ({error})") from None
        images.append(RemoteImage(image, seeds[index], texts[index], scores[index]))
    return RemoteResult(images, info)


def model_for_server(model: str) -> str:
    """The checkpoint as the server should read it: a name ("embedded", a library name, an A1111 title) as it
    is, a local path made absolute (the server has its own working folder). The server takes a path only
    when it is the model it runs already: a client names the files of its model folders."""
    path = Path(model).expanduser()
    return str(path.resolve()) if model != "embedded" and path.exists() else model


def save_remote_images(result: RemoteResult, prompt: str, out_dir: Path, keep: int | None) -> list[Path]:
    """Write the images as a local run does (``NNNNN-SEED-slug.png`` with the ``parameters`` chunk)."""
    from sd_app.storage import save_png

    chosen = result.images[:keep] if keep is not None else result.images
    return [save_png(item.image, out_dir, item.seed, prompt, item.parameters) for item in chosen]


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """``--server`` and its auth / timeout (``sd-app generate``)."""
    group = parser.add_argument_group("warm path: a running `sd-app serve`")
    group.add_argument("--server", default=None, metavar="URL",
                       help="send the request to this running sd-app serve (e.g. http://127.0.0.1:7860) and "
                            "write its images here; the models stay loaded there, so no start-up cost")
    group.add_argument("--server-auth", default=None, metavar="USER:PASSWORD",
                       help="HTTP Basic credentials of a server started with --auth")
    group.add_argument("--server-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                       help=f"seconds to wait for the server's answer (default {DEFAULT_TIMEOUT_S:.0f})")


def server_scorers(texts: list[str]) -> dict[str, float]:
    """``--scorer`` values as the server takes them, kinds and weights (``aesthetic:0.5``): its scorers'
    files are its own (``serve --scorer``), so a value naming a file is refused here, before anything is sent."""
    from pipelines.rerank.scorer_specs import parse_weights

    try:
        return parse_weights(", ".join(texts))
    except ValueError as error:
        raise ValueError(f"--scorer with --server: {error}; the files are the server's setting") from None


def run_remote_generate(args: argparse.Namespace) -> int:
    """``sd-app generate --server``: same request checks, same files and lines as a local run."""
    from pipelines.rerank.best_of import check_keep
    from sd_app.arguments import ranking_options, request_from_args, scores_wanted
    from sd_app.checks import check_output_folder
    from sd_app.run_report import print_report

    local_only = {
        "--device": args.device is not None,
        "--models-dir": bool(args.models_dir),
        "--reranker": args.reranker != "embedded" and args.reranker.lower() != "none",
    }
    for flag, given in local_only.items():
        if given:
            raise ValueError(f"{flag} is the server's setting; leave it out with --server (or run without --server)")
    if not args.server_timeout > 0:
        raise ValueError(f"--server-timeout must be positive, got {args.server_timeout}")
    base_url, auth = server_endpoint(args.server, args.server_auth)
    request = request_from_args(args, args.prompt).resolved()
    check_keep(args.keep, request.n)
    check_output_folder(args.out, "--out")
    scorers = server_scorers(args.scorer)
    options = ranking_options(args, ())
    payload = txt2img_payload(
        request,
        rerank=scores_wanted(args, bool(scorers), request.n),
        rerank_by=args.rerank_by,
        model=model_for_server(args.model),
        vae=model_for_server(args.vae) if args.vae is not None else None,
        scorers=scorers,
        min_score=options["min_score"],
        extra_rounds=options["extra_rounds"],
    )
    started = time.perf_counter()
    result = txt2img(base_url, payload, auth, args.server_timeout)
    paths = save_remote_images(result, request.prompt, args.out, args.keep)
    print_report(remote_report(result, request, paths, args.out, time.perf_counter() - started, base_url))
    return 0


def _per_image(values: object, count: int, default: object) -> list:
    """A per-image list from the server's ``info``, or ``default`` for each image when it sent none (an
    older server, or an A1111 one)."""
    return list(values) if isinstance(values, list) and len(values) == count else [default] * count


def remote_report(
    result: RemoteResult, request: GenerationRequest, paths: list[Path], out_dir: Path, seconds: float, base_url: str
) -> RunReport:
    """What the lines say about a run on the server, from its ``info`` (the fields a local run reports)."""
    from sd_app.run_report import PrunedLine, RunReport, WrittenImage

    info = result.info
    count = len(result.images)
    details = _per_image(info.get("rerank_details"), count, {})
    passed = _per_image(info.get("min_score_passed"), count, None)
    written = [
        WrittenImage(path, item.seed, item.score, details[index] if isinstance(details[index], dict) else {},
                     passed[index])
        for index, (item, path) in enumerate(zip(result.images, paths))
    ]
    min_scores = info.get("min_score") or {}
    try:
        pruned = [PrunedLine(int(p["seed"]), float(p["score"]), int(p["at_step"])) for p in info.get("pruned") or []]
    except (KeyError, TypeError, ValueError) as error:
        raise OSError(f"the server's answer has a malformed 'pruned' list ({error})") from None
    chunks, tokens = info.get("prompt_chunks"), info.get("prompt_tokens")
    stopped_at = _per_image(info.get("stopped_at_step"), count, None)  # steps done; None: finished
    return RunReport(
        written=written,
        out_dir=out_dir,
        model_name=str(info.get("sd_model_name")),
        mode=request.mode + (" + hires fix" if request.hires is not None else ""),
        sampler=request.sampler,
        steps=request.total_steps,
        size=result.images[0].image.size,
        seconds=seconds,
        candidates_made=int(info.get("candidates_made") or request.n),
        rounds=int(info.get("rounds") or 1),
        n=request.n,
        pruning=bool(request.prune_to),
        score_label=info.get("score_label") or "CLIP score",
        # no "best first by" when no image was scored (every one stopped by an interrupt before it finished)
        reranker_name=info.get("reranker") if any(item.score is not None for item in result.images) else None,
        pruned=pruned,
        early_score_label=info.get("early_score_label") or "CLIP score",
        early_scorer=info.get("early_scorer"),
        min_scores=min_scores,
        passed=any(bool(p) for p in passed) if min_scores else None,
        interrupted=bool(info.get("interrupted")),
        stopped_early=sum(step is not None for step in stopped_at[:len(paths)]),
        prompt_tokens=tokens if isinstance(tokens, int) else None,
        prompt_chunks=chunks if isinstance(chunks, int) else None,
        truncated_for_scoring=bool(info.get("prompt_truncated_for_scoring")),
        where=f" (on {base_url})",
    )
