"""The benchmark runs every mode side by side and its fp32 mode reproduces diffusers."""

from __future__ import annotations

import math

import pytest

from pipelines.generation.schedulers import sampler_for_config
from pipelines.models.modes import DEFAULT_MODES, REFERENCE
from sd_app.benchmark import format_table, run_benchmark


def test_benchmark_table_on_the_tiny_model(tiny_model):
    results = run_benchmark(tiny_model, steps=3, size=64, repeats=1, device="cpu", log=lambda _: None)
    by_mode = {r.mode: r for r in results}
    assert set(by_mode) == {m.name for m in DEFAULT_MODES}
    assert by_mode[REFERENCE].psnr_db == float("inf")
    assert by_mode["ours fp32"].psnr_db >= 40  # same weights, seed and scheduler as diffusers
    for result in results:
        assert result.seconds_per_image[0] > 0 and result.seconds_per_step[0] > 0
    table = format_table(results, "tiny")
    assert table.count("\n| ") == len(DEFAULT_MODES) + 1 and "1.00x" in table


def test_sampler_for_config_names_the_models_scheduler():
    assert sampler_for_config({"_class_name": "PNDMScheduler", "skip_prk_steps": True}) == "PLMS"
    assert sampler_for_config({"_class_name": "EulerDiscreteScheduler"}) == "Euler"
    assert sampler_for_config({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}) == "Euler Karras"
    assert sampler_for_config(
        {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "solver_order": 2,
         "use_karras_sigmas": True}
    ) == "DPM++ 2M"  # Karras is what A1111's DPM++ 2M means
    assert sampler_for_config(
        {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "solver_order": 2}
    ) == "DPM++ 2M Uniform"


def test_modes_by_key_and_unknown_mode():
    import pytest

    from pipelines.models.modes import modes_by_key

    assert [m.name for m in modes_by_key(["fast", "diffusers"])] == ["ours fast (default)", REFERENCE]
    with pytest.raises(ValueError, match="unknown mode 'turbo'; choose from diffusers, fp32"):
        modes_by_key(["turbo"])


def test_shapes_evaluation_table_on_the_tiny_model(tiny_model, tmp_path):
    """The evaluation script's generation part runs each mode on the same seeds, judges every image, ranks
    with every reranker, and reuses its cached candidates (same pictures, no generation) on a second run."""
    import shutil

    from pipelines.rerank.clip_scorer import ClipScorer
    from pipelines.rerank.contrastive import reranker_for
    from pipelines.training import evaluate
    from tests.clip_fixtures import tiny_clip_dir

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    shutil.copytree(tiny_clip_dir(tmp_path), folder / "clip")
    scorer = ClipScorer.load(folder / "clip", device="cpu")
    rerankers = {name: reranker_for(scorer, name) for name in ("clip", "contrastive")}
    cache = tmp_path / "candidates"
    results = evaluate.generation(folder, rerankers, ["fp32", "fast"], pairs=2, candidates=2, steps=2, cfg=7.0,
                                   size=64, cache_dir=cache)
    assert [r.mode for r in results] == ["ours fp32", "ours fast (default)"]
    for r in results:
        for part in (r.single, *r.best.values()):
            assert set(part) == set(evaluate.CHECKS) and all(0 <= v <= 1 for v in part.values())
        assert set(r.best) == {"clip", "contrastive"} and r.seconds_per_image > 0
        assert r.best["clip"]["all"] <= r.any_right  # no reranker beats "some candidate is right"
    assert len(list(cache.glob("*/*.png"))) == 2 * 2 * 2

    again = evaluate.generation(folder, rerankers, ["fp32", "fast"], pairs=2, candidates=2, steps=2, cfg=7.0,
                                size=64, cache_dir=cache)
    assert [(r.single, r.best, r.any_right) for r in again] == [(r.single, r.best, r.any_right) for r in results]
    assert all(math.isnan(r.seconds_per_image) for r in again)  # nothing was generated the second time
    with pytest.raises(SystemExit, match="candidates made with"):
        evaluate.generation(folder, rerankers, ["fast"], pairs=2, candidates=2, steps=3, cfg=7.0, size=64,
                            cache_dir=cache)

    zs = {key: 0.5 for key in evaluate.ATTRIBUTES}
    table = evaluate.format_table(zs, 10, results, 2, 2, 2, 7.0, 1)
    assert table.count("best of 2 by clip") == 2 and table.count("best of 2 by contrastive") == 2
    assert "ours fp32: 1 sample" in table and "some candidate of 2 right" in table
