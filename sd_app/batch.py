"""``sd-app batch PROMPTS --out DIR``: every prompt of a file generated exactly once, resumable, multi-process.

Input: ``.txt`` (one prompt per line; blank lines and ``#`` comments skipped) or ``.jsonl`` (one object per
line with ``prompt`` and optional overrides ``negative_prompt, steps, cfg_scale, seed, width, height, n,
sampler``). Each line is a job with id ``NNNNN-<hash>``: its index plus a hash of its settings (and
model/reranker), so an edited prompts file never matches stale results.

Output: ``<job id>-<k>-<seed>-<slug>.png`` (atomic writes, A1111 ``parameters`` chunk) and
``manifest.jsonl``, one line per finished job, appended after its PNGs are on disk.

Exactly once: a job counts as done only when its manifest line exists. On start, leftovers of a job that
was killed between its PNGs and its manifest line are deleted before it runs again, and a torn last
manifest line is cut off.

Processes: under ``accelerate launch --num_processes K`` (one process per GPU on a cluster) accelerate's
``PartialState`` gives each process its rank; process ``r`` takes jobs ``r, r+K, r+2K, ...``. Without a GPU
the process group runs on CPU (gloo). Note: accelerate's ``--cpu`` launcher starts ONE process whatever
``--num_processes`` says (multi-CPU needs ``--mpirun_hostfile``); for K CPU processes use
``accelerate launch --multi_gpu --num_processes K`` on a machine without GPUs, or ``torchrun --nproc_per_node K``.
All processes append to the one ``manifest.jsonl`` under an exclusive lock (``filelock``) on
``manifest.lock`` (write + flush + fsync while holding it), so the manifest stays a single readable file
while the run is live. ``flock`` needs a local or lock-capable shared filesystem (NFSv4, Lustre with
``-o flock``). A restart may use a different ``K``: done jobs are read from the manifest, not per rank.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.generation.prompts import check_clip_skip
from pipelines.generation.request import GenerationRequest

if TYPE_CHECKING:

    from sd_app.engine import Engine

MANIFEST = "manifest.jsonl"
LOCK = "manifest.lock"
CLAIMS = ".claims"  # one lock file per job being generated
OVERRIDES = ("negative_prompt", "steps", "cfg_scale", "seed", "width", "height", "n", "sampler", "clip_skip",
             "vae_decoder")


@dataclass(frozen=True)
class Job:
    """One prompt of the prompts file."""

    index: int
    request: GenerationRequest
    job_id: str


def read_prompts(
    path: Path, base: GenerationRequest, text_layers: int | None = None,
    check: Callable[[GenerationRequest], None] | None = None,
) -> list[GenerationRequest]:
    """Requests of a .txt or .jsonl prompts file; ValueError names the file and line. ``text_layers``: the model's
    text encoder layers, the largest ``clip_skip`` a line may ask for; ``check``: more checks of each line's request
    (its LoRAs and embeddings); both run here, before any job runs."""
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise ValueError(f"{path}: prompts file must end in .txt or .jsonl")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte order mark is not the prompt's
    except OSError as error:
        raise ValueError(f"{path}: cannot read it ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8") from None
    requests = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or (path.suffix.lower() == ".txt" and text.startswith("#")):
            continue
        try:
            request = _line_request(text, path.suffix.lower() == ".jsonl", base, text_layers)
            if check is not None:
                check(request)
            requests.append(request)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}:{number}: {error}") from None
    if not requests:
        raise ValueError(f"{path}: no prompts found")
    return requests


def _line_request(text: str, is_jsonl: bool, base: GenerationRequest, text_layers: int | None) -> GenerationRequest:
    if not is_jsonl:
        return replace(base, prompt=text)
    record = json.loads(text)
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError('each JSON line must be an object with a "prompt" string')
    unknown = sorted(set(record) - {"prompt", *OVERRIDES})
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; allowed: prompt, {', '.join(OVERRIDES)}")
    request = replace(base, **record)
    if text_layers is not None:
        check_clip_skip(request.clip_skip, text_layers)
    return request


def job_ids(requests: list[GenerationRequest], identity: dict[str, Any]) -> list[str]:
    """Each request's id: a hash of what shapes its images (prompt, settings, model hash, reranker), not of
    its line, so that editing, reordering or appending lines regenerates only what changed. The k-th
    repeat of the same content gets ``rK`` so that a prompt listed twice is made twice."""
    ids, seen = [], {}
    for request in requests:
        settings = request.to_dict()
        if settings.get("clip_skip") == 1:
            del settings["clip_skip"]  # a setting added later, at its default: earlier batches keep their ids
        payload = json.dumps({"request": settings, **identity}, sort_keys=True, default=str)
        digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
        seen[digest] = seen.get(digest, 0) + 1
        ids.append(digest if seen[digest] == 1 else f"{digest}r{seen[digest]}")
    return ids


@contextlib.contextmanager
def claimed(out: Path, job: Job) -> Iterator[bool]:
    """Hold ``job`` for this process while the block runs: True if we got it, False if another live process
    (another launch on the same folder) holds it. The OS drops the claim of a process that dies."""
    from filelock import FileLock, Timeout

    claims = out / CLAIMS
    claims.mkdir(exist_ok=True)
    lock = FileLock(claims / f"{job.job_id}.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def read_done(out: Path) -> set[str]:
    """Job ids with a complete manifest line (a torn last line does not count)."""
    path = out / MANIFEST
    if not path.is_file():
        return set()
    done = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            done.add(json.loads(line)["job"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


@contextlib.contextmanager
def manifest_lock(out: Path) -> Iterator[None]:
    """Exclusive lock shared by every process writing ``out``'s manifest (``filelock``: flock on POSIX,
    msvcrt locking on Windows)."""
    from filelock import FileLock

    with FileLock(out / LOCK):
        yield


def repair_manifest(out: Path) -> None:
    """Cut a torn last line (a process killed mid-append) so the next append starts a fresh line."""
    path = out / MANIFEST
    with manifest_lock(out):
        if not path.is_file() or path.stat().st_size == 0:
            return
        with open(path, "rb+") as handle:
            data = handle.read()
            if data.endswith(b"\n"):
                return
            handle.truncate(data.rfind(b"\n") + 1)
            handle.flush()
            os.fsync(handle.fileno())


def append_manifest(out: Path, record: dict[str, Any]) -> None:
    """Append one line under the lock, flushed and fsynced before returning."""
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with manifest_lock(out), open(out / MANIFEST, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def remove_leftovers(out: Path, job: Job) -> None:
    """Delete PNGs (and temp files) of an earlier, unfinished attempt at ``job``."""
    for pattern in (f"{job.job_id}-*.png", f".tmp-{job.job_id}-*.png"):
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere (e.g. Windows)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def run_job(
    engine: Engine, job: Job, out: Path, rerank: bool, keep: int | None, rank: int, rerank_by: str = "clip",
    **ranking: Any,
) -> dict[str, Any]:
    """Generate one job, write its PNGs, then its manifest line; returns the manifest record.

    ``ranking``: the engine's scorer options (``scorers``, ``min_score``, ``extra_rounds``)."""
    from sd_app.storage import save_png_as, slugify

    started = time.monotonic()
    remove_leftovers(out, job)
    result = engine.generate(job.request, rerank=rerank, rerank_by=rerank_by, keep=keep, save=False, **ranking)
    files = []
    for k, candidate in enumerate(result.candidates):
        path = out / f"{job.job_id}-{k}-{candidate.seed}-{slugify(job.request.prompt, 40)}.png"
        save_png_as(candidate.image, path, candidate.parameters)
        files.append(path.name)
    _fsync_dir(out)
    record = {
        "job": job.job_id,
        "index": job.index,
        "prompt": job.request.prompt,
        "files": files,
        "seeds": [c.seed for c in result.candidates],
        "scores": [c.score for c in result.candidates],
        "request": result.request.to_dict(),
        "model": result.model_name,
        "reranker": result.reranker_name,
        "score_label": result.score_label,
        "rank": rank,
        "seconds": round(time.monotonic() - started, 3),
    }
    if result.pruned:  # early pruning: the candidates not finished, with their early score
        record["pruned"] = [{"seed": c.seed, "score": c.score, "at_step": c.at_step} for c in result.pruned]
    append_manifest(out, record)
    return record


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """``PROMPTS`` plus the same generation options as ``sd-app generate`` (``--out`` is the output folder)."""
    from sd_app.arguments import add_generation_arguments

    parser.add_argument("prompts", type=Path, help="prompts file: .txt (one per line) or .jsonl")
    add_generation_arguments(parser)


def _cpu_only(device: str | None) -> bool:
    """Run the process group on CPU (gloo) for ``--device cpu``, ``accelerate launch --cpu`` or no GPU."""
    import torch

    if device is not None:
        return str(device).startswith("cpu")
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available()


def base_request(args: argparse.Namespace) -> GenerationRequest:
    """The shared settings of a batch; each prompt line fills in (or overrides) its own."""
    from sd_app.arguments import request_from_args

    return request_from_args(args, "")


def run_batch(args: argparse.Namespace) -> int:
    """Run this process's share of the prompts file (see the module docstring)."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from sd_app.arguments import ranking_options, scorer_specs
    from sd_app.checks import check_device, check_output_folder, check_selected_model
    from sd_app.engine import Engine

    specs = scorer_specs(args)
    ranking = ranking_options(args, specs)
    ranking.pop("rerank_by")
    rerank = not args.no_rerank and (str(args.reranker).lower() != "none" or bool(specs))
    check_output_folder(args.out, "--out")
    check_device(args.device, "--device")
    engine = Engine(
        model=args.model, vae=args.vae, reranker=None if str(args.reranker).lower() == "none" else args.reranker,
        output_dir=args.out, device=args.device, models_dirs=args.models_dir, scorers=specs,
    )  # loads nothing yet
    # The largest clip skip and the embeddings' width from the model's config, the LoRAs and embeddings from the
    # folders' listing and the files' headers (no weights read): a bad line fails before any job runs
    base = base_request(args)
    layers, networks = check_selected_model(engine, base.clip_skip)
    requests = read_prompts(args.prompts, base, layers,
                            check=lambda request: networks.check(request.prompt, request.negative_prompt))
    if args.keep is not None and any(not 1 <= args.keep <= r.n for r in requests):
        raise ValueError(f"--keep must be between 1 and --n, got {args.keep}")
    state = PartialState(cpu=_cpu_only(args.device))
    rank, world = state.process_index, state.num_processes
    # This process's device, known now (nothing is loaded yet)
    engine.device = args.device or (None if world == 1 else "cpu" if state.device.type == "cpu" else str(state.device))
    components = engine.pipeline().components  # the model's hash names the jobs, not its path
    identity = {
        "model_hash": components.model_hash or components.source,
        "vae": str(args.vae) if args.vae else None,
        "reranker": args.reranker if rerank else None,
        "rerank_by": args.rerank_by if rerank else None,
        "keep": args.keep,
    }
    if rerank and (specs or ranking["min_score"]):  # only then, so earlier batches' job ids stay valid
        identity["scorers"] = [spec.text() for spec in specs]
        identity["min_score"] = ranking["min_score"]
        identity["extra_rounds"] = ranking["extra_rounds"] if ranking["min_score"] else None
    jobs = [Job(i, request, jid) for i, (request, jid) in enumerate(zip(requests, job_ids(requests, identity)))]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    repair_manifest(out)
    done = read_done(out)
    mine = [job for job in jobs if job.index % world == rank]
    todo = [job for job in mine if job.job_id not in done]
    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(todo),
        desc=f"batch[{rank}/{world}]",
        position=rank,
        unit="prompt",
        dynamic_ncols=True,
    )
    made = elsewhere = 0
    with bar:
        for job in todo:
            with claimed(out, job) as ours:
                # Another launch may hold it, or have finished it since we read the manifest.
                if ours and job.job_id not in read_done(out):
                    run_job(engine, job, out, rerank, args.keep, rank, args.rerank_by, **ranking)
                    made += 1
                else:
                    elsewhere += 1
            bar.update(1)
    print(
        f"sd-app batch[{rank}/{world}]: {made} generated, {len(mine) - len(todo)} already done, "
        f"{elsewhere} done by another launch, manifest {out / MANIFEST}",
        file=sys.stderr,
    )
    return 0
