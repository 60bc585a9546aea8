"""What ``sd-app generate`` prints once its files are written, the same for a local run and ``--server``.

One line per file on stdout (path, seed, score, whether it reached the minimum), then on stderr the
candidates pruned early, one summary line and the notes. No torch here: the ``--server`` client uses it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.rerank.scorer_specs import WEIGHTED_LABEL


@dataclass(frozen=True)
class WrittenImage:
    """One file written: best first when reranked."""

    path: Path
    seed: int
    score: float | None = None  # by ``RunReport.score_label``
    details: Mapping[str, float] = field(default_factory=dict)  # each scorer's number behind a Weighted score
    passed: bool | None = None  # reached the minimum scores (None: none asked)


@dataclass(frozen=True)
class PrunedLine:
    """A candidate dropped after ``at_step`` steps, with its early score."""

    seed: int
    score: float
    at_step: int


@dataclass(frozen=True)
class RunReport:
    """Everything the lines say about one ``generate`` run."""

    written: Sequence[WrittenImage]
    out_dir: Path
    model_name: str
    mode: str  # "txt2img", "img2img + hires fix", ...
    sampler: str
    steps: int  # denoising steps of one image, all passes
    size: tuple[int, int]  # (width, height) of the files
    seconds: float
    candidates_made: int  # started over all rounds, pruned ones included
    rounds: int = 1
    n: int = 1  # candidates per round
    pruning: bool = False  # request.prune_to: rounds alternate new seeds and finishing the pruned
    score_label: str = "CLIP score"
    reranker_name: str | None = None  # None: not scored, generation order
    pruned: Sequence[PrunedLine] = ()
    early_score_label: str = "CLIP score"
    early_scorer: str | None = None
    min_scores: Mapping[str, float] = field(default_factory=dict)  # label -> minimum asked
    passed: bool | None = None  # some candidate reached the minimum scores (None: none asked)
    prompt_tokens: int | None = None
    prompt_chunks: int | None = None
    truncated_for_scoring: bool = False
    where: str = ""  # " (on http://...)" for --server
    interrupted: bool = False  # the server's job was interrupted (A1111's POST /sdapi/v1/interrupt)
    stopped_early: int = 0  # images written as they were when interrupted or skipped


def file_line(image: WrittenImage, score_label: str) -> str:
    """``PATH  seed S  LABEL V[, each scorer's number][  passed | below the minimum]``."""
    score = f"  {score_label} {image.score:.2f}" if image.score is not None else ""
    if image.details and score_label == WEIGHTED_LABEL:
        score += "".join(f", {label} {value:.2f}" for label, value in image.details.items())
    passed = {True: "  passed", False: "  below the minimum", None: ""}[image.passed]
    return f"{image.path}  seed {image.seed}{score}{passed}"


def summary_line(report: RunReport) -> str:
    """How many files of how many candidates, where, in which order, and what made them."""
    order = f"best first by {report.reranker_name}" if report.reranker_name else "in generation order"
    if report.rounds <= 1:
        rounds = ""
    elif report.pruning:
        rounds = f" ({report.rounds} rounds: the pruned finished when no kept one passed)"
    else:
        rounds = f" ({report.rounds} rounds of {report.n})"
    width, height = report.size
    return (
        f"{len(report.written)} of {report.candidates_made} image(s){rounds} written to {report.out_dir}/ {order}; "
        f"{report.model_name}, {report.mode}, {report.sampler}, {report.steps} steps, {width}x{height}, "
        f"{report.seconds:.1f} s{report.where}"
    )


def notes(report: RunReport) -> list[str]:
    """What the user should know beyond the files: a long prompt's chunks, a minimum not reached, CLIP's limit."""
    lines = []
    if report.prompt_chunks is not None and report.prompt_chunks > 1:
        lines.append(
            f"note: the prompt has {report.prompt_tokens} tokens; it was encoded in {report.prompt_chunks} chunks "
            "of 75 (A1111's way: nothing was cut)"
        )
    if report.passed is False:
        wanted = ", ".join(f"{label} {value:g}" for label, value in report.min_scores.items())
        lines.append(
            f"note: no candidate reached the minimum score in {report.rounds} round(s) ({wanted}); "
            "the best are written anyway"
        )
    if report.truncated_for_scoring:
        lines.append("note: the reranker read only the first 77 tokens of the prompt (CLIP's limit)")
    if report.interrupted or report.stopped_early:
        how, route = ("interrupted", "interrupt") if report.interrupted else ("skipped", "skip")
        lines.append(
            f"note: the job was {how} on the server (POST /sdapi/v1/{route}): {report.stopped_early} of the "
            f"{len(report.written)} image(s) written were stopped early ('Stopped at step' in their parameters)"
        )
    return lines


def print_report(report: RunReport) -> None:
    """The file lines on stdout; the pruned candidates, the summary and the notes on stderr."""
    for image in report.written:
        print(file_line(image, report.score_label))
    for pruned in report.pruned:
        print(f"pruned at step {pruned.at_step}  seed {pruned.seed}  early {report.early_score_label} "
              f"{pruned.score:.2f} by {report.early_scorer}")
    print(summary_line(report), file=sys.stderr)
    for line in notes(report):
        print(line, file=sys.stderr)
