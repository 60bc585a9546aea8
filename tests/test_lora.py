"""LoRAs merged into the model: every format against its formula, exact restore, prompt tags, errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.generation.extra_networks import NetworkTag, parse_network_tags, strip_network_tags
from pipelines.generation.request import GenerationRequest
from pipelines.models.errors import ModelLoadError
from pipelines.models.library import ModelLibrary
from pipelines.models.loading import load_pipeline
from tests import lora_fixtures as fx

REQUEST = dict(steps=2, width=64, height=64, seed=3, sampler="Euler")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("a1111")
    (root / "models" / "Lora" / "styles").mkdir(parents=True)
    (root / "models" / "LyCORIS").mkdir(parents=True)
    return root


@pytest.fixture(scope="module")
def pipe(tiny_model, models_dir):
    """An fp32 tiny model with its own library (the formats' files are written into it below)."""
    library = ModelLibrary([models_dir], shipped=False)
    pipe = load_pipeline(tiny_model, device="cpu", dtype=torch.float32, library=library)
    c = pipe.components
    lora_dir, lyco_dir = models_dir / "models" / "Lora", models_dir / "models" / "LyCORIS"
    fx.kohya_lora(c, lora_dir / "styles" / "kohya.safetensors")
    fx.kohya_lora(c, lora_dir / "second.safetensors", rank=2, alpha=1.0, seed=9)
    fx.peft_lora(c, lora_dir / "peft.safetensors")
    fx.locon_cp(c, lyco_dir / "locon.safetensors")
    fx.loha(c, lyco_dir / "loha.safetensors")
    fx.lokr(c, lyco_dir / "lokr.safetensors")
    fx.sdxl_lora(lora_dir / "sdxl.safetensors")
    library.refresh()
    return pipe


def snapshot(components) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.clone() for name in ("unet", "text_encoder")
            for key, value in getattr(components, name).state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def merged(pipe, tags: list[NetworkTag]) -> dict[str, torch.Tensor]:
    """Weights with the tagged LoRAs merged, then restored; returns (module path -> merged weight)."""
    pipe.extra_networks.activate(tags)
    try:
        return snapshot(pipe.components)
    finally:
        pipe.extra_networks.activate([])


def delta_of(pipe, tags, component, path):
    base = fx.weight(pipe.components, component, path).detach().clone()
    return merged(pipe, tags)[f"{component}.{path}.weight"] - base


def lora_tensor(pipe, name, component, path, tensor):
    from pipelines.models.lora_keys import kohya_name

    return pipe.extra_networks.lora(name).modules[kohya_name(component, path)].tensors[tensor].float()


# ---- formats: merged weight = base + weight * delta, delta by each format's formula --------------------


def test_kohya_linear_conv_and_text_encoder_follow_up_down_alpha_over_rank(pipe):
    tags = [NetworkTag("kohya", te=0.7, unet=-0.5)]
    scale = 2.0 / 4  # alpha / rank
    for component, path, weight in (("unet", fx.UNET_LINEAR, -0.5), ("text_encoder", fx.TE_LINEAR, 0.7),
                                    ("unet", fx.UNET_PROJ, -0.5)):
        up = lora_tensor(pipe, "kohya", component, path, "lora_up.weight")
        down = lora_tensor(pipe, "kohya", component, path, "lora_down.weight")
        expected = (up.flatten(1) @ down.flatten(1)).reshape(fx.weight(pipe.components, component, path).shape)
        assert torch.allclose(delta_of(pipe, tags, component, path), expected * scale * weight, atol=1e-6)
    # the 3x3 conv: applying the delta equals running lora_down (3x3) then lora_up (1x1), scaled
    up = lora_tensor(pipe, "kohya", "unet", fx.UNET_CONV, "lora_up.weight")
    down = lora_tensor(pipe, "kohya", "unet", fx.UNET_CONV, "lora_down.weight")
    x = torch.randn(1, down.shape[1], 9, 9)
    delta = delta_of(pipe, tags, "unet", fx.UNET_CONV)
    through = F.conv2d(F.conv2d(x, down, padding=1), up) * scale * -0.5
    assert torch.allclose(F.conv2d(x, delta, padding=1), through, atol=1e-5)


def test_locon_cp_decomposition_equals_its_three_convolutions(pipe):
    up = lora_tensor(pipe, "locon", "unet", fx.UNET_CONV, "lora_up.weight")
    mid = lora_tensor(pipe, "locon", "unet", fx.UNET_CONV, "lora_mid.weight")
    down = lora_tensor(pipe, "locon", "unet", fx.UNET_CONV, "lora_down.weight")
    delta = delta_of(pipe, [NetworkTag("locon", 1.0, 1.0)], "unet", fx.UNET_CONV)
    x = torch.randn(2, down.shape[1], 7, 7)
    through = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up) * (1.5 / 3)
    assert torch.allclose(F.conv2d(x, delta, padding=1), through, atol=1e-5)


def test_loha_is_the_hadamard_product_of_two_low_rank_products(pipe):
    for path in (fx.UNET_LINEAR, fx.UNET_CONV):
        t = {n: lora_tensor(pipe, "loha", "unet", path, n)
             for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        shape = fx.weight(pipe.components, "unet", path).shape
        expected = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(shape) * (1.0 / 2)
        assert torch.allclose(delta_of(pipe, [NetworkTag("loha", 1.0, 0.8)], "unet", path), expected * 0.8, atol=1e-6)


def test_lokr_is_the_kronecker_product(pipe):
    w1 = lora_tensor(pipe, "lokr", "unet", fx.UNET_LINEAR, "lokr_w1")
    w2 = lora_tensor(pipe, "lokr", "unet", fx.UNET_LINEAR, "lokr_w2_a") @ lora_tensor(
        pipe, "lokr", "unet", fx.UNET_LINEAR, "lokr_w2_b")
    kron = torch.kron(w1, w2)  # element by element: kron[i * 8 + p, j * 16 + q] = w1[i, j] * w2[p, q]
    assert torch.isclose(kron[1 * 8 + 3, 1 * 16 + 5], w1[1, 1] * w2[3, 5])
    expected = kron * (4.0 / 2)  # alpha / rank of the decomposed w2
    assert torch.allclose(delta_of(pipe, [NetworkTag("lokr")], "unet", fx.UNET_LINEAR), expected, atol=1e-6)
    c1 = lora_tensor(pipe, "lokr", "unet", fx.UNET_CONV, "lokr_w1")
    c2 = lora_tensor(pipe, "lokr", "unet", fx.UNET_CONV, "lokr_w2")
    conv = delta_of(pipe, [NetworkTag("lokr")], "unet", fx.UNET_CONV)  # both factors whole: no rank, scale 1
    assert torch.allclose(conv[1 * 16 + 2, 3 * 8 + 5], c1[1, 3] * c2[2, 5], atol=1e-6)
    assert torch.allclose(conv, torch.kron(c1[:, :, None, None], c2), atol=1e-6)


def test_peft_keys_with_alpha_from_diffusers_metadata(pipe):
    for component, path, spelled in (("unet", fx.UNET_LINEAR, fx.UNET_LINEAR),
                                     ("text_encoder", fx.TE_MLP, "text_model." + fx.TE_MLP)):
        module = pipe.extra_networks.lora("peft").modules[f"{component}.{spelled}"]
        a, b = module.tensors["lora_down.weight"], module.tensors["lora_up.weight"]
        expected = b @ a * (8.0 / 4)
        assert torch.allclose(delta_of(pipe, [NetworkTag("peft")], component, path), expected, atol=1e-6)


def test_several_loras_add_up_and_restore_is_exact(pipe):
    base = snapshot(pipe.components)
    one = delta_of(pipe, [NetworkTag("kohya")], "unet", fx.UNET_LINEAR)
    two = delta_of(pipe, [NetworkTag("second", 1, 0.5)], "unet", fx.UNET_LINEAR)
    both = delta_of(pipe, [NetworkTag("kohya"), NetworkTag("second", 1, 0.5)], "unet", fx.UNET_LINEAR)
    assert torch.allclose(both, one + two, atol=1e-6)
    pipe.extra_networks.activate([NetworkTag("kohya"), NetworkTag("loha", 1, -1.0), NetworkTag("lokr")])
    assert not same(base, snapshot(pipe.components))
    pipe.extra_networks.activate([])
    assert same(base, snapshot(pipe.components))  # bit for bit


# ---- through the pipeline: tags, weight 0, infotext ------------------------------------------------------


def test_weight_zero_is_the_base_model_pixel_for_pixel(pipe):
    base = pipe(GenerationRequest(prompt="a red circle", **REQUEST)).images[0]
    zero = pipe(GenerationRequest(prompt="a red circle <lora:kohya:0>", **REQUEST))
    one = pipe(GenerationRequest(prompt="a red circle <lora:kohya:1>", **REQUEST))
    assert np.array_equal(np.asarray(zero.images[0]), np.asarray(base))
    assert not np.array_equal(np.asarray(one.images[0]), np.asarray(base))
    assert one.extra["Lora hashes"].startswith("kohya: ") and len(one.extra["Lora hashes"]) == len("kohya: ") + 12
    again = pipe(GenerationRequest(prompt="a red circle", **REQUEST)).images[0]  # next request: LoRA gone
    assert np.array_equal(np.asarray(again), np.asarray(base))


def test_the_encoder_never_sees_the_tags(pipe):
    plain = pipe.encode_prompt("a red circle", "", 1, guided=False)
    tagged = pipe.encode_prompt("a red <lora:kohya:0.0> circle<lyco:loha:0>", "", 1, guided=False)
    assert torch.equal(plain, tagged)
    assert pipe.count_tokens("a red circle <lora:kohya:1>").tokens == pipe.count_tokens("a red circle").tokens


def test_tag_syntax():
    text, tags = parse_network_tags(
        "a <lora:styles/kohya:0.6> cat <lyco:loha:1:-0.5>, <lora:x> <lora:y:te=0.2:unet=0.3>"
    )
    assert text == "a  cat , " + " "
    assert tags == [NetworkTag("styles/kohya", 0.6, 0.6), NetworkTag("loha", 1.0, -0.5), NetworkTag("x", 1.0, 1.0),
                    NetworkTag("y", 0.2, 0.3)]
    assert strip_network_tags("<lora:a:1>b") == "b"
    for bad, message in (("<lora::1>", "name is missing"), ("<lora:a:lots>", "not a number"),
                         ("<hypernet:h:1>", "'hypernet' is not supported"), ("<lora:a:1:2:3>", "at most two"),
                         ("<lora:a:dyn=4>", "'dyn' is not supported"), ("<lora:a:nan>", "between -100 and 100"),
                         ("<lora:a:1e308>", "between -100 and 100"), ("<lora:a:1:te=-101>", "between")):
        with pytest.raises(ValueError, match=message):
            parse_network_tags(bad)


def test_names_by_stem_or_folder_and_lyco_folder(pipe):
    assert pipe.extra_networks.lora("styles/kohya").path.name == "kohya.safetensors"
    assert pipe.extra_networks.lora("kohya").path == pipe.extra_networks.lora("styles/kohya").path


# ---- bad input: a clear error naming the file, nothing generated, the model untouched --------------------


def _fails_untouched(pipe, prompt: str, match: str, negative: str = "") -> None:
    pipe.extra_networks.activate([NetworkTag("second")])  # a LoRA merged before the failing request
    before = snapshot(pipe.components)
    steps = []
    with pytest.raises((ModelLoadError, ValueError), match=match):
        pipe(GenerationRequest(prompt=prompt, negative_prompt=negative, **REQUEST), on_step=steps.append)
    assert steps == []  # generation never started
    assert same(before, snapshot(pipe.components))
    pipe.extra_networks.activate([])


def test_lora_for_another_base_is_refused_by_file_name(pipe):
    _fails_untouched(pipe, "a cat <lora:kohya:1> <lora:sdxl:1>", r"sdxl\.safetensors.*another base")


def test_missing_name_unknown_keys_truncated_and_wrong_shapes(pipe, models_dir):
    lora_dir = models_dir / "models" / "Lora"
    _fails_untouched(pipe, "a cat <lora:nope:1>", "no lora named 'nope'.*available: .*kohya")
    from safetensors.torch import load_file, save_file

    state = load_file(lora_dir / "second.safetensors")
    save_file({**state, "lora_unet_foo.weird_tensor": torch.zeros(1)}, lora_dir / "unknown.safetensors")
    _fails_untouched(pipe, "<lora:unknown:1> cat", r"unknown\.safetensors.*lora_unet_foo\.weird_tensor")
    raw = (lora_dir / "second.safetensors").read_bytes()
    (lora_dir / "cut.safetensors").write_bytes(raw[: len(raw) * 2 // 3])
    _fails_untouched(pipe, "<lora:cut:1> cat", r"cut\.safetensors.*not a valid or complete")
    key = next(k for k in state if k.endswith("attn2_to_k.lora_up.weight"))
    save_file({**state, key: torch.zeros(7, state[key].shape[1])}, lora_dir / "shapes.safetensors")
    _fails_untouched(pipe, "<lora:shapes:1> cat", r"shapes\.safetensors.*(does not fit|another base)")
    _fails_untouched(pipe, "cat", "tags belong in the prompt", negative="<lora:kohya:1>")
    (lora_dir / "pickled.pt").write_bytes(b"\x80\x04 not a pickle really")
    _fails_untouched(pipe, "<lora:pickled:1> cat", r"pickled\.pt.*refused.*pickle")


def test_a_pipeline_without_library_refuses_tags(tiny_model):
    from pipelines.generation.text_to_image import TextToImagePipeline

    bare = TextToImagePipeline(load_pipeline(tiny_model, device="cpu", dtype=torch.float32).components)
    with pytest.raises(ValueError, match="names LoRA 'x' but this pipeline has no model library"):
        bare(GenerationRequest(prompt="<lora:x:1>", **REQUEST))


def test_concurrent_requests_with_different_loras_get_their_own(pipe):
    """The pipeline lock covers merging and sampling: each request is drawn with its own LoRA set."""
    alone = {p: np.asarray(pipe(GenerationRequest(prompt=p, **REQUEST)).images[0])
             for p in ("a <lora:kohya:1>", "a <lora:loha:1>", "a")}
    results: dict[str, np.ndarray] = {}

    def run(prompt: str) -> None:
        results[prompt] = np.asarray(pipe(GenerationRequest(prompt=prompt, **REQUEST)).images[0])

    threads = [threading.Thread(target=run, args=(p,)) for p in alone]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for prompt, image in alone.items():
        assert np.array_equal(results[prompt], image), prompt


# ---- the same file in plain diffusers ---------------------------------------------------------------------


def test_kohya_file_loads_in_diffusers_and_fuses_to_our_merge(tiny_model, pipe, models_dir):
    from diffusers import StableDiffusionPipeline

    plain = StableDiffusionPipeline.from_pretrained(str(tiny_model), local_files_only=True, safety_checker=None)
    plain.load_lora_weights(str(models_dir / "models" / "Lora" / "styles" / "kohya.safetensors"))
    plain.fuse_lora(lora_scale=1.0)
    ours = merged(pipe, [NetworkTag("kohya", 1.0, 1.0)])
    theirs = plain.unet.state_dict()
    for path in (fx.UNET_LINEAR, fx.UNET_CONV, fx.UNET_PROJ):
        key = f"{path}.weight"
        fused = theirs.get(key, theirs.get(key.replace(".weight", ".base_layer.weight")))
        assert torch.allclose(ours[f"unet.{key}"], fused, atol=1e-5), path
    te = plain.text_encoder.state_dict()
    key = next(k for k in te if k.endswith("layers.0.self_attn.q_proj.weight") or
               k.endswith("layers.0.self_attn.q_proj.base_layer.weight"))
    assert torch.allclose(ours[f"text_encoder.{fx.TE_LINEAR}.weight"], te[key], atol=1e-5)


def test_lora_hashes_in_the_png_and_png_info_reads_them_back(pipe, tiny_model, models_dir, tmp_path):
    from PIL import Image

    from pipelines.models.network_hashes import parse_hashes_text
    from sd_app.engine import Engine
    from sd_app.metadata import parse_parameters, request_from_parameters
    from sd_app.ui_handlers import UiHandlers

    engine = Engine(model=str(tiny_model), reranker=None, output_dir=tmp_path, device="cpu", models_dirs=[models_dir])
    prompt = "a red circle <lora:kohya:0.5> <lora:second:1:-1>"
    result = engine.generate(GenerationRequest(prompt=prompt, **REQUEST), rerank=False)
    library = engine.library()
    expected = {name: library.network_hash(library.find("lora", name)) for name in ("kohya", "second")}
    text, fields = UiHandlers.png_info(str(result.candidates[0].path))
    assert fields["Lora hashes"] == f"kohya: {expected['kohya']}, second: {expected['second']}"
    assert parse_hashes_text(fields["Lora hashes"]) == expected
    assert request_from_parameters(parse_parameters(text)).prompt == prompt  # reused with its tags
    with Image.open(result.candidates[0].path) as image:
        assert 'Lora hashes: "kohya: ' in image.info["parameters"]
