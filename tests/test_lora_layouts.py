"""LoRA files in the layouts beyond kohya's: ComfyUI's keys, diffusers' attention processors, LyCORIS norm deltas,
bundled embeddings, PEFT's rank-stabilised scale. Each file is built here, merged, and the merged weights
checked against the format's formula (expected module paths written out by hand, not looked up)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors.torch import save_file

from pipelines.generation.request import GenerationRequest
from pipelines.models.errors import IncompatibleModel, ModelLoadError
from pipelines.models.library import ModelLibrary
from pipelines.models.loading import load_pipeline
from pipelines.models.lora import LoraPatcher, WeightedLora
from pipelines.models.lora_formats import read_lora
from tests import lora_fixtures as fx
from tests.test_embeddings import reference_encoding

REQUEST = dict(steps=2, width=64, height=64, seed=3, sampler="Euler")
# (original U-Net path as ComfyUI spells it, the diffusers module it is), a linear, a 3x3 conv, a projection
COMFY_UNET = (("input_blocks.1.1.transformer_blocks.0.attn2.to_k", fx.UNET_LINEAR),
              ("input_blocks.1.0.in_layers.2", fx.UNET_CONV),
              ("input_blocks.1.1.proj_in", fx.UNET_PROJ))


def snapshot(components) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.clone() for name in ("unet", "text_encoder")
            for key, value in getattr(components, name).state_dict().items()}


def merged(pipe, path, te: float = 1.0, unet: float = 1.0) -> dict[str, torch.Tensor]:
    """The model's weights with the file merged at these weights; the model is restored (checked bit for bit)."""
    before = snapshot(pipe.components)
    patcher = LoraPatcher(pipe.components)
    patcher.apply([WeightedLora(read_lora(path, path.stem, ""), te, unet)])
    try:
        return snapshot(pipe.components)
    finally:
        patcher.restore()
        after = snapshot(pipe.components)
        assert all(torch.equal(before[key], after[key]) for key in before)


def delta(pipe, weights: dict[str, torch.Tensor], component: str, name: str) -> torch.Tensor:
    """Merged minus base for one parameter (``<module path>.weight`` or ``.bias``)."""
    return weights[f"{component}.{name}"] - getattr(pipe.components, component).state_dict()[name]


def low_rank(out_features: int, in_shape: tuple[int, ...], rank: int, g: torch.Generator):
    """(up [out, r], down [r, *in_shape]) random factors."""
    return torch.randn(out_features, rank, generator=g) * 0.1, torch.randn(rank, *in_shape, generator=g) * 0.1


def expected_low_rank(up: torch.Tensor, down: torch.Tensor, shape: torch.Size, scale: float) -> torch.Tensor:
    """W' - W = scale * up @ down, shaped like the weight."""
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape) * scale


# ---- 1. ComfyUI: diffusion_model.<original path>, text_encoders.clip_l.transformer.<path> ------------------------


def test_comfyui_keys_patch_the_unet_and_text_encoder_modules(tiny_pipe, tmp_path):
    c, g = tiny_pipe.components, torch.Generator().manual_seed(0)
    state, factors, rank, alpha = {}, {}, 4, 2.0
    for original, path in COMFY_UNET:
        w = fx.weight(c, "unet", path)
        factors[("unet", path)] = low_rank(w.shape[0], tuple(w.shape[1:]), rank, g)
        state[f"diffusion_model.{original}.lora_up.weight"], state[f"diffusion_model.{original}.lora_down.weight"] = (
            factors[("unet", path)])
        state[f"diffusion_model.{original}.alpha"] = torch.tensor(alpha)
    w = fx.weight(c, "text_encoder", fx.TE_LINEAR)
    factors[("text_encoder", fx.TE_LINEAR)] = low_rank(w.shape[0], (w.shape[1],), rank, g)
    te_key = f"text_encoders.clip_l.transformer.text_model.{fx.TE_LINEAR}"
    state[f"{te_key}.lora_up.weight"], state[f"{te_key}.lora_down.weight"] = factors[("text_encoder", fx.TE_LINEAR)]
    state[f"{te_key}.alpha"] = torch.tensor(alpha)
    # ComfyUI's LoRA extraction writes a norm's change whole: diff (weight) and diff_b (bias), [C] each
    norm_weight, norm_bias = torch.randn(32, generator=g), torch.randn(32, generator=g)
    state["diffusion_model.input_blocks.1.0.in_layers.0.diff"] = norm_weight  # down_blocks.0.resnets.0.norm1
    state["diffusion_model.input_blocks.1.0.in_layers.0.diff_b"] = norm_bias
    save_file(state, str(tmp_path / "comfy.safetensors"))

    weights = merged(tiny_pipe, tmp_path / "comfy.safetensors", te=0.7, unet=-0.5)
    for (component, path), (up, down) in factors.items():
        multiplier = 0.7 if component == "text_encoder" else -0.5
        expected = expected_low_rank(up, down, fx.weight(c, component, path).shape, alpha / rank * multiplier)
        assert torch.allclose(delta(tiny_pipe, weights, component, f"{path}.weight"), expected, atol=1e-6), path
    assert torch.allclose(delta(tiny_pipe, weights, "unet", "down_blocks.0.resnets.0.norm1.weight"), -0.5 * norm_weight)
    assert torch.allclose(delta(tiny_pipe, weights, "unet", "down_blocks.0.resnets.0.norm1.bias"), -0.5 * norm_bias)


# ---- 2. diffusers' attention processors: <block>.attn1.processor.to_q_lora.down.weight ---------------------------


def test_diffusers_attention_processor_keys(tiny_pipe, tmp_path):
    c, g = tiny_pipe.components, torch.Generator().manual_seed(1)
    attn1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    attn2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    te_attn = "encoder.layers.0.self_attn"
    layers = {  # key stem -> (component, module it patches)
        f"unet.{attn1}.processor.to_q_lora": ("unet", f"{attn1}.to_q"),
        f"unet.{attn1}.processor.to_out_lora": ("unet", f"{attn1}.to_out.0"),
        f"{attn2}.processor.to_k_lora": ("unet", f"{attn2}.to_k"),  # save_attn_procs: the U-Net's keys unprefixed
        f"text_encoder.text_model.{te_attn}.to_v_lora": ("text_encoder", f"{te_attn}.v_proj"),
        f"text_encoder.text_model.{te_attn}.to_out_lora": ("text_encoder", f"{te_attn}.out_proj"),
    }
    state, factors = {}, {}
    for stem, (component, path) in layers.items():
        w = fx.weight(c, component, path)
        up, down = low_rank(w.shape[0], (w.shape[1],), 2, g)
        state[f"{stem}.up.weight"], state[f"{stem}.down.weight"] = up, down
        factors[(component, path)] = (up, down)
    save_file(state, str(tmp_path / "attn_procs.safetensors"))

    weights = merged(tiny_pipe, tmp_path / "attn_procs.safetensors", te=1.0, unet=0.8)
    for (component, path), (up, down) in factors.items():
        multiplier = 1.0 if component == "text_encoder" else 0.8
        expected = (up @ down) * multiplier  # no alpha: scale 1, as diffusers
        assert torch.allclose(delta(tiny_pipe, weights, component, f"{path}.weight"), expected, atol=1e-6), path


# ---- 3. LyCORIS norm deltas: w_norm, b_norm --------------------------------------------------------------------


def test_lycoris_w_norm_and_b_norm_change_the_norm_layers(tiny_pipe, tmp_path):
    g = torch.Generator().manual_seed(2)
    norms = {  # kohya key -> (component, norm module): a GroupNorm, a LayerNorm in the U-Net, one in the text encoder
        "lora_unet_down_blocks_0_resnets_0_norm1": ("unet", "down_blocks.0.resnets.0.norm1"),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_norm1": (
            "unet", "down_blocks.0.attentions.0.transformer_blocks.0.norm1"),
        "lora_te_text_model_encoder_layers_0_layer_norm1": ("text_encoder", "encoder.layers.0.layer_norm1"),
    }
    state = {}
    for key, (component, path) in norms.items():
        channels = getattr(tiny_pipe.components, component).get_submodule(path).weight.shape[0]
        state[f"{key}.w_norm"] = torch.randn(channels, generator=g)
        state[f"{key}.b_norm"] = torch.randn(channels, generator=g)
    save_file(state, str(tmp_path / "norms.safetensors"))

    weights = merged(tiny_pipe, tmp_path / "norms.safetensors", te=0.5, unet=2.0)
    for key, (component, path) in norms.items():
        multiplier = 0.5 if component == "text_encoder" else 2.0
        for parameter, tensor in (("weight", "w_norm"), ("bias", "b_norm")):  # W' = W + multiplier * w_norm
            changed = delta(tiny_pipe, weights, component, f"{path}.{parameter}")
            assert torch.allclose(changed, state[f"{key}.{tensor}"] * multiplier, atol=1e-6), path


# ---- 5. PEFT use_rslora: scale alpha / sqrt(r) -------------------------------------------------------------------


def test_peft_rank_stabilised_scale_is_alpha_over_sqrt_rank(tiny_pipe, tiny_model, tmp_path):
    c, g = tiny_pipe.components, torch.Generator().manual_seed(3)
    rank, alpha = 4, 8.0
    state, factors = {}, {}
    for component, path, spelled in (("unet", fx.UNET_LINEAR, fx.UNET_LINEAR),
                                     ("text_encoder", fx.TE_MLP, "text_model." + fx.TE_MLP)):
        w = fx.weight(c, component, path)
        up, down = low_rank(w.shape[0], (w.shape[1],), rank, g)
        state[f"{component}.{spelled}.lora_A.weight"], state[f"{component}.{spelled}.lora_B.weight"] = down, up
        factors[(component, path)] = (up, down)
    # the U-Net's config rank-stabilised, the text encoder's not (diffusers packs each LoraConfig by component)
    meta = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.use_rslora": True, "unet.target_modules": [fx.UNET_LINEAR],
            "text_encoder.r": rank, "text_encoder.lora_alpha": alpha, "text_encoder.use_rslora": False,
            "text_encoder.target_modules": [fx.TE_MLP]}
    path = tmp_path / "rslora.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})

    weights = merged(tiny_pipe, path)
    scales = {"unet": alpha / math.sqrt(rank), "text_encoder": alpha / rank}  # 4.0 and 2.0
    for (component, module), (up, down) in factors.items():
        expected = (up @ down) * scales[component]
        assert torch.allclose(delta(tiny_pipe, weights, component, f"{module}.weight"), expected, atol=1e-6), module

    # diffusers (a LoraConfig from the same metadata, PEFT's scaling) fuses the U-Net to the same weight; the U-Net's
    # part alone (diffusers 0.42 cannot infer a text encoder's lora_A/lora_B layout)
    from diffusers import StableDiffusionPipeline

    unet_part = tmp_path / "rslora-unet.safetensors"
    save_file({k: v for k, v in state.items() if k.startswith("unet.")}, str(unet_part),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(
                  {k: v for k, v in meta.items() if k.startswith("unet.")})})
    plain = StableDiffusionPipeline.from_pretrained(str(tiny_model), local_files_only=True, safety_checker=None)
    plain.load_lora_weights(str(unet_part))
    plain.fuse_lora(lora_scale=1.0)
    theirs = plain.unet.state_dict()
    key = f"{fx.UNET_LINEAR}.weight"
    fused = theirs.get(key, theirs.get(f"{fx.UNET_LINEAR}.base_layer.weight"))
    assert torch.allclose(weights[f"unet.{key}"], fused, atol=1e-5)


# ---- errors: unknown and malformed keys of these layouts are still refused, naming the file and key ---------------


@pytest.mark.parametrize(
    ("key", "tensor", "message"),
    [
        ("diffusion_model.input_blocks.1.1.proj_in.lora_sideways.weight", torch.zeros(2, 2), "lora_sideways"),
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_z_lora.down.weight",
         torch.zeros(2, 32), "to_z_lora"),
        ("text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.lora_up", torch.zeros(2, 2),
         r"fc1\.lora_up\b"),
        ("lora_unet_down_blocks_0_resnets_0_norm1.w_normal", torch.zeros(32), "w_normal"),
        ("bundle_emb.lonely", torch.zeros(1, 32), r"bundle_emb\.lonely"),
    ],
)
def test_unknown_keys_of_the_new_layouts_are_refused(tmp_path, key, tensor, message):
    save_file({key: tensor}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ModelLoadError, match=rf"odd\.safetensors: 1 key\(s\) are no LoRA/LyCORIS key.*{message}"):
        read_lora(tmp_path / "odd.safetensors", "odd", "")


def test_malformed_modules_of_the_new_layouts_are_refused(tiny_pipe, tmp_path):
    def refused(state: dict, match: str, error: type = ModelLoadError) -> None:
        save_file(state, str(tmp_path / "bad.safetensors"))
        with pytest.raises(error, match=match):
            merged(tiny_pipe, tmp_path / "bad.safetensors")

    refused({"lora_unet_down_blocks_0_resnets_0_norm1.b_norm": torch.zeros(32)}, r"incomplete norm \(b_norm\)")
    refused({"lora_unet_down_blocks_0_resnets_0_norm1.w_norm": torch.zeros(7)}, r"bad\.safetensors.*does not fit")
    refused({"diffusion_model.input_blocks.99.1.proj_in.lora_up.weight": torch.zeros(32, 2),
             "diffusion_model.input_blocks.99.1.proj_in.lora_down.weight": torch.zeros(2, 32)},
            r"bad\.safetensors: 1 of its modules are not in this model \(diffusion_model\.input_blocks\.99")
    clip_g = "text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1"  # ComfyUI's SDXL text encoder
    refused({f"{clip_g}.lora_up.weight": torch.zeros(4, 2), f"{clip_g}.lora_down.weight": torch.zeros(2, 4)},
            r"bad\.safetensors: a LoRA for another base \(SDXL\)", IncompatibleModel)


# ---- 4. embeddings bundled in a LoRA (kohya bundle_emb): usable by name while the LoRA is in the prompt -----------


@pytest.fixture(scope="module")
def bundled_pipe(tiny_model, tmp_path_factory):
    """A library with a LoRA bundling 'mychar' (2 vectors, string_to_param) and 'otherchar' (emb_params), an
    embedding file 'otherchar' of its own, and a LoRA whose bundled embedding is malformed."""
    root = tmp_path_factory.mktemp("bundles")
    lora_dir, emb_dir = root / "models" / "Lora", root / "embeddings"
    lora_dir.mkdir(parents=True)
    emb_dir.mkdir()
    pipe = load_pipeline(tiny_model, device="cpu", dtype=torch.float32, library=ModelLibrary([root], shipped=False))
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(4)
    weights = load_file(fx.kohya_lora(pipe.components, lora_dir / "plain.safetensors"))
    bundles = {"bundle_emb.mychar.string_to_param.*": torch.randn(2, 32, generator=g),
               "bundle_emb.otherchar.emb_params": torch.randn(1, 32, generator=g)}
    save_file({**weights, **bundles}, str(lora_dir / "bundled.safetensors"))
    save_file({**weights, "bundle_emb.twokeys.emb_params": torch.zeros(1, 32),
               "bundle_emb.twokeys.extra": torch.zeros(1, 32)}, str(lora_dir / "malformed.safetensors"))
    fx.embedding(emb_dir / "otherchar.safetensors", torch.full((1, 32), 0.25))
    pipe.extra_networks.library.refresh()
    return pipe


def test_a_bundled_embedding_is_used_by_name_when_its_lora_is_in_the_prompt(bundled_pipe):
    pipe, networks = bundled_pipe, bundled_pipe.extra_networks
    vectors = read_lora(networks.lora("bundled").path, "bundled", "").embeddings["mychar"]["string_to_param.*"]
    with torch.no_grad():
        ours = pipe.encode_prompt("a mychar circle <lora:bundled:1>", "", 1, guided=False)
        theirs = reference_encoding(pipe, "a <mychar_0> <mychar_1> circle", {"mychar": vectors.float()})
        without = pipe.encode_prompt("a mychar circle", "", 1, guided=False)  # no tag: "mychar" is only text
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, without)
    assert networks.embeddings(["a mychar circle"]) == {}
    assert set(networks.embeddings(["(mychar) <lora:bundled:0.5>"])) == {"mychar"}  # in use at any weight
    # the LoRA's weights load as they do without the bundle
    plain, bundled = networks.lora("plain"), networks.lora("bundled")
    assert plain.modules.keys() == bundled.modules.keys()
    assert all(torch.equal(plain.modules[k].tensors[t], bundled.modules[k].tensors[t])
               for k in plain.modules for t in plain.modules[k].tensors)


def test_bundled_embedding_in_the_infotext_and_an_embedding_file_wins(bundled_pipe, caplog):
    pipe, networks = bundled_pipe, bundled_pipe.extra_networks
    output = pipe(GenerationRequest(prompt="a mychar circle <lora:bundled:1>", negative_prompt="otherchar", **REQUEST))
    library = networks.library
    standalone_hash = library.network_hash(library.find("embedding", "otherchar"))
    assert output.extra["TI hashes"] == f"mychar: bundled, otherchar: {standalone_hash}"  # A1111: the LoRA's name
    with caplog.at_level(logging.WARNING, logger="pipelines.models.networks"):
        found = networks.embeddings(["otherchar <lora:bundled:1>"])
    assert torch.equal(found["otherchar"].vectors, torch.full((1, 32), 0.25))
    assert "bundled embedding 'otherchar' not used" in caplog.text


def test_a_malformed_bundled_embedding_is_refused_naming_the_lora(bundled_pipe):
    steps = []
    with pytest.raises(ModelLoadError, match=r"malformed\.safetensors \(embedding 'twokeys' bundled.*holds one tensor"):
        bundled_pipe(GenerationRequest(prompt="twokeys <lora:malformed:1>", **REQUEST), on_step=steps.append)
    assert steps == []
    bundled_pipe(GenerationRequest(prompt="a circle <lora:malformed:1>", **REQUEST))  # unused: the LoRA works
