"""Wall-clock time of a minimum-score request whose kept candidates fall short, so that round 2 finishes the
ones pruned in round 1: best of 4, pruned to 1 at step 5 of 20, a minimum no candidate reaches, one extra round.

    python scripts/pruned_fallback_time.py [--checkout DIR] [--repeats 3]

``--checkout DIR``: time another checkout's library instead (e.g. ``git archive <commit> | tar -x -C DIR``), to
compare side by side; run both in turn on a quiet machine. Prints the median of the repeats after a warm-up;
nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(args.checkout.resolve()))  # its pipelines/ before the installed one

    from pipelines.generation.request import GenerationRequest
    from pipelines.models.loading import load_pipeline
    from pipelines.rerank.clip_scorer import ClipScorer
    from pipelines.rerank.min_score import best_of_until_pass

    pipe = load_pipeline("embedded", device="cpu")
    scorer = ClipScorer.load("embedded", device="cpu")
    request = GenerationRequest(prompt="a red circle on a blue background", steps=20, n=4, prune_to=1, prune_at=5,
                                seed=3)
    unreachable = {"CLIP score": 1e9}
    best_of_until_pass(pipe, request, scorer, unreachable, 1)  # warm-up
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        output = best_of_until_pass(pipe, request, scorer, unreachable, 1)
        seconds.append(time.perf_counter() - started)
    print(f"{args.checkout}: {output.rounds} rounds, {len(output.output.candidates)} candidates finished, "
          f"median {statistics.median(seconds):.2f} s ({', '.join(f'{s:.2f}' for s in seconds)})")


if __name__ == "__main__":
    main()
