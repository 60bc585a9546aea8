"""Few-step sampling: LCM-LoRA files in the layout of ``latent-consistency/lcm-lora-sdv1-5``, the LCM and TCD
samplers through the pipeline, their defaults and warnings, and the pieces of our distillation trainer.

The LCM-LoRA file is written here from the U-Net's own module list, independently of the trainer: the
published file (``pytorch_lora_weights.safetensors``) uses kohya tensor names on diffusers module paths,
``lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
for every Linear and Conv2d of the U-Net's blocks (attention, feed-forward, proj_in/out, resnet convs and
time-embedding projections, down/up-samplers), and nothing for the text encoder.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipelines.generation.extra_networks import NetworkTag
from pipelines.generation.request import GenerationRequest

RANK, ALPHA = 4, 2.0
LCM_FOLDER, LCM_FILE = "lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors"


def _lcm_lora_state(unet: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """An LCM-LoRA for ``unet`` in the published layout, with random up and down weights."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for path, module in unet.named_modules():
        if path.split(".")[0] not in ("down_blocks", "mid_block", "up_blocks"):
            continue
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        key = "lora_unet_" + path.replace(".", "_")
        w = module.weight
        if w.ndim == 4:
            state[f"{key}.lora_down.weight"] = torch.randn(RANK, w.shape[1], *w.shape[2:], generator=g) * 0.1
            state[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], RANK, 1, 1, generator=g) * 0.1
        else:
            state[f"{key}.lora_down.weight"] = torch.randn(RANK, w.shape[1], generator=g) * 0.1
            state[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], RANK, generator=g) * 0.1
        state[f"{key}.alpha"] = torch.tensor(ALPHA)
    return state


def _merged_by_hand(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``unet`` with W + up @ down * alpha / rank in every patched module (conv: up [o, r] @ down
    [r, i*k*k], reshaped), computed here from the file's tensors."""
    merged = copy.deepcopy(unet)
    with torch.no_grad():
        for path, module in merged.named_modules():
            key = "lora_unet_" + path.replace(".", "_")
            if f"{key}.lora_down.weight" not in state:
                continue
            down, up = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"]
            scale = float(state[f"{key}.alpha"]) / down.shape[0]
            module.weight += (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape) * scale
    return merged


@pytest.fixture(scope="module")
def lcm_library(tiny_model, tmp_path_factory):
    """An A1111 models folder with the LCM-LoRA where users put it: models/Lora/lcm-lora-sdv1-5/."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("a1111-lcm")
    folder = root / "models" / "Lora" / LCM_FOLDER
    folder.mkdir(parents=True)
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    state = _lcm_lora_state(unet)
    save_file(state, str(folder / LCM_FILE))
    return root, state


@pytest.fixture(scope="module")
def lcm_pipe(tiny_model, lcm_library):
    from pipelines.models.library import ModelLibrary
    from pipelines.models.loading import load_pipeline
    from pipelines.speed.options import SpeedOptions

    library = ModelLibrary([lcm_library[0]], shipped=False)
    return load_pipeline(tiny_model, device="cpu", dtype=torch.float32, library=library,
                         speed=SpeedOptions(channels_last=False))


def test_lcm_lora_file_covers_the_unet_blocks_like_the_published_one(lcm_library):
    _, state = lcm_library
    modules = {key.rsplit(".", 2)[0] if key.endswith("weight") else key.rsplit(".", 1)[0] for key in state}
    for part in ("attn1_to_q", "attn2_to_k", "attn1_to_out_0", "ff_net_0_proj", "ff_net_2", "proj_in", "proj_out",
                 "resnets_0_conv1", "resnets_0_conv2", "time_emb_proj", "downsamplers_0_conv", "upsamplers_0_conv"):
        assert any(m.endswith(part) for m in modules), part
    assert all(key.startswith("lora_unet_") for key in state)  # no text encoder


def test_lcm_lora_loads_through_the_library_and_merges_as_computed_by_hand(tiny_model, lcm_pipe, lcm_library):
    from diffusers import UNet2DConditionModel

    _, state = lcm_library
    base = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").eval()
    expected_unet = _merged_by_hand(base, state)
    c = lcm_pipe.components
    ids = torch.tensor([[49406, 320, 736, 49407] + [49407] * 73])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([759])
    for name in (f"{LCM_FOLDER}/pytorch_lora_weights", "pytorch_lora_weights"):  # A1111's name, or the unique stem
        lcm_pipe.extra_networks.activate([NetworkTag(name)])
        try:
            with torch.no_grad():
                states = c.text_encoder(ids)[0]
                ours = c.unet(latents, t, encoder_hidden_states=states).sample
        finally:
            lcm_pipe.extra_networks.activate([])
        with torch.no_grad():
            expected = expected_unet(latents, t, encoder_hidden_states=states).sample
            plain = base(latents, t, encoder_hidden_states=states).sample
        assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()
        assert (ours - plain).abs().max() > 1e-2  # the LoRA does change the U-Net


def test_lcm_lora_tag_with_the_lcm_sampler_changes_the_picture_and_weight_zero_does_not(lcm_pipe):
    settings = dict(steps=4, cfg_scale=1.0, width=64, height=64, seed=11, sampler="LCM")
    plain = np.asarray(lcm_pipe(GenerationRequest(prompt="a red circle", **settings)).images[0], dtype=np.int16)
    tagged = lcm_pipe(GenerationRequest(prompt=f"a red circle <lora:{LCM_FOLDER}/pytorch_lora_weights:1>", **settings))
    zero = lcm_pipe(GenerationRequest(prompt=f"a red circle <lora:{LCM_FOLDER}/pytorch_lora_weights:0>", **settings))
    assert np.abs(np.asarray(tagged.images[0], dtype=np.int16) - plain).max() > 10
    assert np.array_equal(np.asarray(zero.images[0], dtype=np.int16), plain)


# ---- samplers: steps, CFG, eta -----------------------------------------------------------------------


def _unet_timesteps(pipe, request: GenerationRequest) -> tuple[list[float], list[int]]:
    seen: list[float] = []
    batches: list[int] = []

    def hook(_module, args, kwargs):
        seen.append(float(args[1].flatten()[0]))
        batches.append(args[0].shape[0])

    handle = pipe.components.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(request)
    finally:
        handle.remove()
    return seen, batches


@pytest.mark.parametrize("sampler, expected", [("LCM", [999, 679, 339, 19]), ("LCM SGM Uniform", [999, 759, 499, 259]),
                                               ("TCD", [999, 759, 499, 259])])
def test_few_step_samplers_run_four_unguided_evaluations_on_the_grid(tiny_pipe, sampler, expected):
    request = GenerationRequest(prompt="a star", steps=4, cfg_scale=1.0, width=64, height=64, seed=2, sampler=sampler)
    seen, batches = _unet_timesteps(tiny_pipe, request)
    assert seen == expected
    assert batches == [1, 1, 1, 1]  # CFG 1: no unconditional half


def test_tcd_eta_is_gamma_default_0_3_and_a_request_may_set_it(tiny_pipe):
    settings = dict(prompt="a star", steps=4, cfg_scale=1.0, width=64, height=64, seed=4, sampler="TCD")

    def pixels(**extra):
        return np.asarray(tiny_pipe(GenerationRequest(**settings, **extra)).images[0], dtype=np.int16)

    default, explicit, deterministic = pixels(), pixels(eta=0.3), pixels(eta=0.0)
    assert np.array_equal(default, explicit)
    assert np.abs(default - deterministic).max() > 0
    with pytest.raises(ValueError, match="eta must be a number in"):
        GenerationRequest(eta=1.5)


def test_eta_is_taken_where_the_schedulers_step_takes_it_and_refused_elsewhere():
    import inspect

    import diffusers

    from pipelines.generation.schedulers import SAMPLERS

    for spec in SAMPLERS.values():  # the specs say what the schedulers do: no eta set and then ignored
        takes = "eta" in inspect.signature(getattr(diffusers, spec.scheduler_class).step).parameters
        assert (spec.eta is not None) == takes, spec.name
    assert GenerationRequest(sampler="DDIM", eta=0.5).eta == 0.5
    with pytest.raises(ValueError, match="the Euler a sampler takes none"):
        GenerationRequest(sampler="Euler a", eta=0.5)


def test_high_cfg_with_a_few_step_sampler_warns_and_steps_are_capped_by_the_grid(tiny_pipe):
    request = dict(prompt="a star", steps=2, width=64, height=64, seed=1)
    with pytest.warns(UserWarning, match="CFG 1-2"):
        tiny_pipe(GenerationRequest(sampler="LCM", cfg_scale=7.0, **request))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        tiny_pipe(GenerationRequest(sampler="LCM", cfg_scale=1.5, **request))
        tiny_pipe(GenerationRequest(sampler="Euler", cfg_scale=7.0, **request))
    with pytest.raises(ValueError, match="between 1 and 50 for the LCM sampler"):
        GenerationRequest(sampler="LCM", steps=51)


def test_cli_defaults_to_4_steps_cfg_1_for_few_step_samplers():
    import argparse

    from sd_app.arguments import add_generation_arguments, request_from_args

    parser = argparse.ArgumentParser()
    add_generation_arguments(parser)
    lcm = request_from_args(parser.parse_args(["--sampler", "LCM"]), "a star")
    tcd = request_from_args(parser.parse_args(["--sampler", "tcd", "--steps", "6", "--cfg", "1.5", "--eta", "0.5"]),
                            "a star")
    plain = request_from_args(parser.parse_args([]), "a star")
    assert (lcm.steps, lcm.cfg_scale, lcm.eta) == (4, 1.0, None)
    assert (tcd.steps, tcd.cfg_scale, tcd.eta) == (6, 1.5, 0.5)
    assert (plain.steps, plain.cfg_scale) == (20, 7.0)


def test_eta_is_written_to_the_png_parameters_and_read_back():
    from sd_app.metadata import format_parameters, parse_parameters, request_from_parameters

    request = GenerationRequest(prompt="a star", sampler="TCD", steps=4, cfg_scale=1.0, seed=3, eta=0.5)
    text = format_parameters(request, 3, "shapes-tiny")
    assert "Sampler: TCD, Schedule type: SGM Uniform" in text and "Eta: 0.5" in text
    again = request_from_parameters(parse_parameters(text))
    assert (again.sampler, again.eta, again.steps) == ("TCD", 0.5, 4)
    assert "Eta" not in format_parameters(GenerationRequest(prompt="x", seed=1), 1, "m")


# ---- the distillation trainer's pieces ---------------------------------------------------------------


def test_consistency_boundary_conditions_and_ddim_step():
    from diffusers import DDPMScheduler, LCMScheduler

    from pipelines.training.lcm import DDIMGrid, boundary_scalings
    from pipelines.training.unet import SCHEDULE

    t = torch.tensor([0, 1, 19, 259, 999])
    c_skip, c_out = boundary_scalings(t)
    assert c_skip.flatten()[0] == 1 and c_out.flatten()[0] == 0  # f(z, 0) = z
    sampler_skip, sampler_out = LCMScheduler(**SCHEDULE).get_scalings_for_boundary_condition_discrete(t)
    assert torch.allclose(c_skip.flatten(), sampler_skip) and torch.allclose(c_out.flatten(), sampler_out)
    grid = DDIMGrid(DDPMScheduler(**SCHEDULE).alphas_cumprod, 50)
    assert grid.timesteps[:3].tolist() == [19, 39, 59] and grid.timesteps[-1] == 999 and grid.skip == 20
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    t, t_prev = torch.tensor([999, 259]), torch.tensor([979, 239])
    a, a_prev = grid.alphas_cumprod[t].view(-1, 1, 1, 1), grid.alphas_cumprod[t_prev].view(-1, 1, 1, 1)
    z = a.sqrt() * x0 + (1 - a).sqrt() * eps
    assert torch.allclose(grid.x0(eps, z, t), x0, atol=1e-4)
    # DDIM with the true x0 and eps lands on the same trajectory: the noised x0 at t_prev
    assert torch.allclose(grid.ddim_step(x0, eps, t_prev), a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, atol=1e-5)
    assert torch.allclose(grid.ddim_step(x0, eps, torch.tensor([-1, -1])), x0)  # below the grid: the clean end


def test_trainer_lora_is_the_teacher_when_off_and_saves_the_published_layout(tiny_model, lcm_library):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from pipelines.training.common import Runtime
    from pipelines.training.lcm import DDIMGrid, distillation_loss, inject_everywhere, lora_off
    from pipelines.training.lora import lora_state
    from pipelines.training.unet import SCHEDULE

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").requires_grad_(False)
    teacher = copy.deepcopy(unet)
    layers = inject_everywhere(unet, rank=4, alpha=4.0)
    assert {k.rsplit(".", 1)[0] for k in lora_state(layers) if k.endswith("alpha")} == {
        k.rsplit(".", 1)[0] for k in lcm_library[1] if k.endswith("alpha")}  # the same modules as the published file
    for layer in layers.values():
        torch.nn.init.normal_(layer.up.weight, 0, 0.05)
    z, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    states = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        with lora_off(layers):
            off = unet(z, t, encoder_hidden_states=states).sample
        on = unet(z, t, encoder_hidden_states=states).sample
        assert torch.allclose(off, teacher(z, t, encoder_hidden_states=states).sample, atol=1e-5)
        assert (on - off).abs().max() > 1e-3
    grid = DDIMGrid(DDPMScheduler(**SCHEDULE).alphas_cumprod, 50)
    loss = distillation_loss(unet, layers, grid, torch.randn(2, 4, 8, 8), states.expand(2, -1, -1), states,
                             torch.tensor([4.0, 6.0]), torch.Generator().manual_seed(0),
                             Runtime(torch.device("cpu"), bf16=False), huber_c=1e-3)
    loss.backward()
    assert loss.item() > 0 and all(layer.down.weight.grad is not None for layer in layers.values())
    assert all(p.grad is None for p in teacher.parameters())


def test_lora_ema_averages_the_trained_weights_and_swaps_them_in_only_inside_the_block():
    from pipelines.training.lcm import LoraEma, SwitchableLora

    layer = SwitchableLora(torch.nn.Linear(3, 2), rank=2, alpha=2.0)
    start_down, start_up = layer.down.weight.detach().clone(), layer.up.weight.detach().clone()
    ema = LoraEma({"l": layer}, decay=0.9)
    with torch.no_grad():
        layer.up.weight.fill_(1.0)
        layer.down.weight.add_(1.0)
    ema.update()
    expected_up = 0.9 * start_up + 0.1 * torch.ones_like(start_up)  # shadow <- decay shadow + (1 - decay) live
    expected_down = 0.9 * start_down + 0.1 * (start_down + 1.0)
    with ema.swapped_in():
        assert torch.allclose(layer.up.weight, expected_up) and torch.allclose(layer.down.weight, expected_down)
    assert torch.equal(layer.up.weight, torch.ones_like(start_up))  # the trained weights are back
    assert torch.allclose(layer.down.weight, start_down + 1.0)


def test_teacher_trajectories_start_from_the_seeds_noise_and_end_where_the_product_draws():
    from pipelines.models.loading import load_pipeline
    from pipelines.training.common import Runtime
    from pipelines.training.teacher_trajectories import STEPS, sample_trajectories

    pipe = load_pipeline("embedded", device="cpu", dtype=torch.float32)
    request = GenerationRequest(prompt="a red circle on a blue background", n=2, seed=7, steps=STEPS, cfg_scale=7.0,
                                sampler="DPM++ 2M Uniform", width=128, height=128).resolved()  # the model's own
    with pipe.generating():
        run, _ = pipe.start(request)
        noise = run.latents.clone()  # (2, 4, 16, 16)
        product = run.run()  # (2, 4, 16, 16)
        states = pipe.encode_prompt(request.prompt, "", 1, True)  # (2, 77, D): empty, prompt
    points, timesteps, ends = sample_trajectories(pipe.components.unet, states[1:].expand(2, -1, -1), states[:1],
                                                  Runtime(torch.device("cpu"), False), 128, seed=7)
    assert points.shape == (2, STEPS, 4, 16, 16) and timesteps.tolist()[:2] == [999, 949]
    assert torch.equal(points[:, 0], noise)
    assert torch.allclose(ends, product, atol=1e-4)


def test_the_lora_files_header_names_every_term_the_run_trained_with():
    import argparse

    from pipelines.training.lcm import kohya_metadata

    base = dict(rank=8, alpha=8.0, res=512, batch=4, lr=3e-4, seed=0, w_min=4.0, w_max=8.0, ddim_steps=50)
    plain = kohya_metadata(argparse.Namespace(**base, trajectories=0, trajectory_weight=1.0, init_lora=None), 400, "h")
    assert plain["lcm_w_range"] == "4-8" and plain["ss_steps"] == "400"
    assert not any(key in plain for key in ("lcm_trajectories", "lcm_trajectory_weight", "lcm_init_lora"))
    both = kohya_metadata(argparse.Namespace(**base, trajectories=256, trajectory_weight=0.25,
                                             init_lora="runs/lcm-ft/lcm-shapes-ft-step1000.safetensors"), 400, "h")
    assert (both["lcm_trajectories"], both["lcm_trajectory_weight"]) == ("256", "0.25")
    assert both["lcm_init_lora"] == "lcm-shapes-ft-step1000.safetensors"  # the file's name, not the run's path
