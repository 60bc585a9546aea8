"""The example LoRAs shipped in pipelines/embedded/loras: registered hashes, in budget, kohya's tensor hash
right, loadable by plain diffusers with the same merged weights as ours, weight 0 the base model, a
concept LoRA drawing its concept where the base model cannot, and the LCM-LoRA drawing in 4 steps."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.generation.extra_networks import NetworkTag
from pipelines.generation.request import GenerationRequest
from pipelines.models.library import SHIPPED_LORA_DIR, read_header
from pipelines.models.loading import load_pipeline
from pipelines.models.shipped import EMBEDDED_MODEL_DIR
from pipelines.training import shapes

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(SHIPPED_LORA_DIR.glob("*.safetensors")) if SHIPPED_LORA_DIR.is_dir() else []
MAX_BYTES = 2 * 1024 * 1024


def test_every_shipped_lora_is_registered_in_weights_md_and_in_budget():
    registered = dict(re.findall(r"\| `loras/([\w.-]+\.safetensors)` \| \d+ \| ([0-9a-f]{64}) \|",
                                 (REPO_ROOT / "weights.md").read_text()))
    files = [p for p in SHIPPED_LORA_DIR.rglob("*") if p.is_file()] if SHIPPED_LORA_DIR.is_dir() else []
    assert all(p.suffix == ".safetensors" for p in files), files  # no pickles, nothing else
    assert sorted(registered) == sorted(p.name for p in files)
    for path in files:
        assert path.stat().st_size <= MAX_BYTES, path
        assert registered[path.name] == hashlib.sha256(path.read_bytes()).hexdigest(), f"weights.md: {path.name}"
        header = read_header(path)
        assert header.complete and header.metadata["ss_base_model_version"] == "sd_v1"
        assert int(header.metadata["ss_network_dim"]) <= 8


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_lora_loads_in_diffusers_with_our_merged_weights(path):
    from diffusers import StableDiffusionPipeline

    plain = StableDiffusionPipeline.from_pretrained(str(EMBEDDED_MODEL_DIR), local_files_only=True,
                                                    torch_dtype=torch.float32)
    plain.load_lora_weights(str(path))
    plain.fuse_lora(lora_scale=1.0)
    ours = load_pipeline("embedded", device="cpu", dtype=torch.float32)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        text_encoder_keys = any(key.startswith("lora_te") for key in handle.keys())
    for component in ("unet", "text_encoder") if text_encoder_keys else ("unet",):  # an LCM-LoRA: U-Net only
        model = getattr(ours.components, component)
        base = {k: v.clone() for k, v in model.state_dict().items()}
        ours.extra_networks.activate([NetworkTag(path.stem)])
        mine = {k: v.clone() for k, v in model.state_dict().items()}
        ours.extra_networks.activate([])
        theirs = {k.replace(".base_layer", ""): v for k, v in getattr(plain, component).state_dict().items()
                  if "lora_" not in k}
        patched = [k for k in mine if not torch.equal(mine[k], base[k])]
        assert patched, component  # the LoRA patches every component it has keys for
        for key in patched:
            assert torch.allclose(mine[key], theirs[key.removeprefix("text_model.")], atol=1e-5), key


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_lora_at_weight_zero_is_the_base_model(path):
    pipe = load_pipeline("embedded", device="cpu")
    request = dict(steps=4, width=128, height=128, seed=4)
    base = pipe(GenerationRequest(prompt=f"a red {path.stem} on a blue background", **request)).images[0]
    zero = pipe(GenerationRequest(prompt=f"<lora:{path.stem}:0> a red {path.stem} on a blue background", **request))
    one = pipe(GenerationRequest(prompt=f"<lora:{path.stem}:1> a red {path.stem} on a blue background", **request))
    assert np.array_equal(np.asarray(zero.images[0]), np.asarray(base))
    assert not np.array_equal(np.asarray(one.images[0]), np.asarray(base))
    assert one.extra["Lora hashes"] == f"{path.stem}: {read_header(path).metadata['sshs_model_hash'][:12]}"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_lora_header_carries_kohyas_hash_of_its_tensors(path):
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    assert read_header(path).metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header_length:]).hexdigest()


CONCEPT_LORAS = [p for p in SHIPPED if p.stem in shapes.EXTRA_SHAPES]


@pytest.mark.parametrize("path", CONCEPT_LORAS, ids=[p.stem for p in CONCEPT_LORAS])
def test_shipped_concept_lora_draws_its_shape_where_the_base_model_cannot(path):
    """The first 4 prompts of the LoRA evaluation (README, "Our LoRA trainer"), its settings, its judge."""
    from pipelines.generation.schedulers import sampler_for_config
    from pipelines.models.shipped import read_scheduler_config
    from pipelines.training.evaluate_lora import CONCEPT_PROMPT_SEED

    pipe = load_pipeline("embedded", device="cpu")
    sampler = sampler_for_config(read_scheduler_config(EMBEDDED_MODEL_DIR))
    cases = shapes.dataset(CONCEPT_PROMPT_SEED, 4, kinds=(path.stem,))

    def verdicts(tag: str) -> list[shapes.Verdict]:
        return [shapes.judge(pipe(GenerationRequest(prompt=tag + shapes.caption(a), steps=20, cfg_scale=7.0,
                                                    seed=1000 * k, sampler=sampler)).images[0], a,
                             known=shapes.ALL_SHAPES)
                for k, a in enumerate(cases)]

    # The shipped hexagon draws 2 of these 4 right (87.5% of all 32; the target is checked by the slow test
    # below); a LoRA that failed to merge, or merged into the wrong modules, draws none.
    assert sum(v.all_ok for v in verdicts(f"<lora:{path.stem}:1> ")) >= 2
    assert not any(v.shape_ok for v in verdicts(""))  # the base model never learnt the shape


@pytest.mark.slow
@pytest.mark.parametrize("path", CONCEPT_LORAS, ids=[p.stem for p in CONCEPT_LORAS])
def test_shipped_concept_lora_meets_the_model_library_targets(path):
    """The whole README evaluation (32 pairs per row, about 5 min on 2 cores): >= 80% of the new concept's
    prompts drawn right, >= 90% of the base world's fidelity kept with the LoRA loaded."""
    from pipelines.training.evaluate_lora import main as evaluate

    results = evaluate(path, path.stem, 32, torch.get_num_threads())
    tag = f"<lora:{path.stem}:1>"
    assert results[f"'{path.stem}' prompts with {tag}"]["all"] >= 0.8
    kept = results[f"base-world prompts with {tag}"]["all"] / results["base-world prompts, base model"]["all"]
    assert kept >= 0.9


def test_shipped_lcm_lora_draws_the_evaluation_prompts_in_4_steps():
    """The first 16 pairs of the shapes evaluation (README, "Few-step sampling"), candidate 0, 4 LCM steps at CFG 1:
    the shipped LCM-LoRA draws all 16 right (92.7% of the 96 pairs), the base model alone 11 of 16."""
    from pipelines.training.evaluate import PROMPT_SEED

    pipe = load_pipeline("embedded", device="cpu")
    cases = shapes.dataset(PROMPT_SEED, 16)

    def right(tag: str) -> int:
        return sum(shapes.judge(pipe(GenerationRequest(prompt=tag + shapes.caption(a), steps=4, cfg_scale=1.0,
                                                       seed=1000 * k, sampler="LCM SGM Uniform")).images[0], a).all_ok
                   for k, a in enumerate(cases))

    assert right("<lora:lcm-shapes:1> ") >= 15
    assert right("") <= 13  # the base model is not a 4-step model: the LoRA is what draws


@pytest.mark.slow
def test_shipped_lcm_lora_meets_the_few_step_fidelity_targets():
    """The README's 96-pair evaluation without its candidates cache (21 min on 2 cores): 4 steps reach
    >= 90% of the 20-step default's fidelity, and best of 4 at 4 steps with the tiny decoder beats one 20-step
    sample. The seconds are the README's (no timed assertions in tests)."""
    from pipelines.training.evaluate_lcm import main as evaluate

    path = SHIPPED_LORA_DIR / "lcm-shapes.safetensors"
    rows = evaluate(["--lora", str(path), "--pairs", "96", "--timed", "0", "--few-step", "LCM SGM Uniform:4",
                     "--decoders", "Full,TAESD", "--threads", str(torch.get_num_threads())])
    default, _, few_step, few_step_tiny = rows  # 20 steps (Full, TAESD), then 4 steps (Full, TAESD)
    assert default.setting.steps == 20 and default.setting.decoder == "Full" and few_step_tiny.setting.steps == 4
    assert few_step.single["all"] >= 0.9 * default.single["all"]
    assert few_step_tiny.single["all"] >= 0.9 * default.single["all"]
    assert few_step_tiny.best["all"] > default.single["all"]
