"""The benchmark runs every mode side by side and its fp32 mode reproduces diffusers."""

from __future__ import annotations

from pipelines.benchmark import DEFAULT_MODES, REFERENCE, format_table, run_benchmark
from pipelines.schedulers import sampler_for_config


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
    assert sampler_for_config({"_class_name": "PNDMScheduler", "skip_prk_steps": True}) == "PNDM"
    assert sampler_for_config({"_class_name": "EulerDiscreteScheduler"}) == "Euler"
    assert sampler_for_config(
        {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "solver_order": 2,
         "use_karras_sigmas": True}
    ) == "DPM++ 2M Karras"
