"""PEFT adapter folders (``PeftModel.save_pretrained``: adapter_model.safetensors + adapter_config.json) as LoRAs.

The adapters are made here by ``peft`` itself on the tiny model's U-Net and text encoder, with nonzero lora_B; the
reference is PEFT's own forward (and its ``get_delta_weight``), never our formula."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipelines.generation.request import GenerationRequest
from pipelines.models.errors import IncompatibleModel, ModelLoadError
from pipelines.models.library import ModelLibrary, place_lora
from pipelines.models.loading import load_pipeline
from pipelines.models.lora import LoraPatcher, WeightedLora
from pipelines.models.lora_formats import read_lora
from tests import lora_fixtures as fx

peft = pytest.importorskip("peft")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"]  # linears, 1x1 and 3x3 convs
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
REQUEST = dict(steps=2, width=64, height=64, seed=3, sampler="Euler")


def plain_models(tiny_model: Path) -> SimpleNamespace:
    """The tiny model's U-Net and text encoder as plain diffusers / transformers modules (fp32, eval)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(tiny_model / "text_encoder").eval()
    return SimpleNamespace(unet=unet, text_encoder=text_encoder)


def peft_wrapped(model: torch.nn.Module, seed: int, **config) -> torch.nn.Module:
    """``model`` with a PEFT LoRA whose lora_B are nonzero (PEFT starts them at zero)."""
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.05)
    return wrapped.eval()


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g)


def run_unet(unet) -> torch.Tensor:
    sample, t, context = unet_inputs()
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=context).sample  # [1, 4, 8, 8]


def run_text_encoder(text_encoder) -> torch.Tensor:
    ids = torch.tensor([[49406, 320, 1746, 49407] + [49407] * 73])
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state  # [1, 77, 32]


def merged_output(tiny_model: Path, adapter: Path, run, component: str, weight: float = 1.0) -> torch.Tensor:
    """``run`` on fresh plain models with the adapter merged by sd-app's patcher; the weights restored after."""
    models = plain_models(tiny_model)
    patcher = LoraPatcher(models)
    base = {k: v.clone() for k, v in getattr(models, component).state_dict().items()}
    patcher.apply([WeightedLora(read_lora(adapter, adapter.name, ""), weight, weight)])
    out = run(getattr(models, component))
    patcher.restore()
    assert all(torch.equal(base[k], v) for k, v in getattr(models, component).state_dict().items())
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    """PEFT adapters saved by PEFT, and its outputs with them: a U-Net adapter (rank and alpha patterns), a
    rank-stabilised text-encoder adapter, and both as unet/ + text_encoder/ parts of one folder."""
    root = tmp_path_factory.mktemp("peft")
    base = plain_models(tiny_model)
    base_unet, base_te = run_unet(base.unet), run_text_encoder(base.text_encoder)
    unet = peft_wrapped(base.unet, 1, r=4, lora_alpha=8, target_modules=UNET_TARGETS,
                        rank_pattern={"attn2.to_k": 2}, alpha_pattern={"proj_in": 3})
    unet.save_pretrained(root / "unet_lora")
    unet.save_pretrained(root / "pair" / "unet")
    te = peft_wrapped(base.text_encoder, 2, r=4, lora_alpha=6, use_rslora=True, target_modules=TE_TARGETS)
    te.save_pretrained(root / "te_lora")
    te.save_pretrained(root / "pair" / "text_encoder")
    deltas = {name.removeprefix("base_model.model."): module.get_delta_weight("default")
              for name, module in unet.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)}
    return SimpleNamespace(root=root, unet_out=run_unet(unet), te_out=run_text_encoder(te), base_unet=base_unet,
                           base_te=base_te, unet_deltas=deltas)


def test_a_unet_adapter_merges_to_peft_forward(tiny_model, adapters):
    ours = merged_output(tiny_model, adapters.root / "unet_lora", run_unet, "unet")
    assert (adapters.unet_out - adapters.base_unet).abs().max() > 1e-3  # the adapter changes the output
    assert torch.allclose(ours, adapters.unet_out, atol=1e-5, rtol=1e-4)


def test_rank_and_alpha_patterns_per_module(adapters):
    lora = read_lora(adapters.root / "unet_lora", "unet_lora", "")
    k = lora.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    q = lora.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"]
    proj = lora.modules["unet.down_blocks.0.attentions.0.proj_in"]
    assert (k.tensors["lora_down.weight"].shape[0], k.alpha) == (2, 8.0)  # rank_pattern
    assert (q.tensors["lora_down.weight"].shape[0], q.alpha) == (4, 8.0)
    assert proj.alpha == 3.0  # alpha_pattern
    assert not any(m.rank_stabilized for m in lora.modules.values())


def test_a_rank_stabilised_text_encoder_adapter_is_found_by_its_module_names(tiny_model, adapters):
    lora = read_lora(adapters.root / "te_lora", "te_lora", "")
    assert lora.modules and all(key.startswith("text_encoder.encoder.layers.") for key in lora.modules)
    assert all(m.rank_stabilized and m.alpha == 6.0 for m in lora.modules.values())
    ours = merged_output(tiny_model, adapters.root / "te_lora", run_text_encoder, "text_encoder")
    assert (adapters.te_out - adapters.base_te).abs().max() > 1e-3
    assert torch.allclose(ours, adapters.te_out, atol=1e-5, rtol=1e-4)
    # alpha / sqrt(r), not alpha / r: the wrong scale is far off
    assert not torch.allclose(adapters.base_te + (ours - adapters.base_te) * math.sqrt(4) / 4, adapters.te_out,
                              atol=1e-4)


def test_unet_and_text_encoder_parts_of_one_folder(tiny_model, adapters):
    pair = adapters.root / "pair"
    lora = read_lora(pair, "pair", "")
    assert {key.split(".")[0] for key in lora.modules} == {"unet", "text_encoder"}
    assert torch.allclose(merged_output(tiny_model, pair, run_unet, "unet"), adapters.unet_out, atol=1e-5, rtol=1e-4)
    assert torch.allclose(merged_output(tiny_model, pair, run_text_encoder, "text_encoder"), adapters.te_out,
                          atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def library_pipe(tiny_model, adapters, tmp_path_factory):
    """A model folder whose Lora folder holds the adapters, a folder with weights but no config, and a pickled
    adapter."""
    root = tmp_path_factory.mktemp("peft-library")
    lora_dir = root / "models" / "Lora"
    shutil.copytree(adapters.root / "unet_lora", lora_dir / "inkpeft")
    shutil.copytree(adapters.root / "pair", lora_dir / "styles" / "pair")
    (lora_dir / "noconfig").mkdir()
    shutil.copy(adapters.root / "unet_lora" / "adapter_model.safetensors", lora_dir / "noconfig")
    (lora_dir / "pickled").mkdir()
    shutil.copy(adapters.root / "unet_lora" / "adapter_config.json", lora_dir / "pickled")
    (lora_dir / "pickled" / "adapter_model.bin").write_bytes(b"not to be opened")
    return load_pipeline(tiny_model, device="cpu", dtype=torch.float32, library=ModelLibrary([root], shipped=False))


def test_the_library_lists_adapter_folders_by_folder_name(library_pipe):
    library = library_pipe.extra_networks.library
    rows = {e.name: e for e in library.files("lora")}
    assert sorted(rows) == ["inkpeft", "noconfig/adapter_model", "pickled", "styles/pair"]
    assert [rows[n].format for n in ("inkpeft", "pickled", "styles/pair")] == ["peft"] * 3
    assert rows["inkpeft"].refused is None and rows["styles/pair"].refused is None
    assert "adapter_model.bin is a Python pickle" in rows["pickled"].refused
    assert library.find("lora", "pair").path == rows["styles/pair"].path  # a unique folder name works too
    described = library.describe(rows["inkpeft"])
    assert described["format"] == "peft" and described["refused"] is None and described["size"] > 0
    assert described["base_model"] == "unknown"  # read from the adapter's header: the tiny model is 32 wide
    assert len(library.network_hash(rows["styles/pair"])) == 12
    assert library.network_hash(rows["styles/pair"]) != library.network_hash(rows["inkpeft"])


def test_a_prompt_tag_merges_the_adapter_at_its_weight(library_pipe, adapters):
    pipe, library = library_pipe, library_pipe.extra_networks.library
    unet = pipe.components.unet
    from pipelines.speed.conv_packing import current_weight

    base = {path: current_weight(unet.get_submodule(path)).clone() for path in adapters.unet_deltas}
    output = pipe(GenerationRequest(prompt="a red circle <lora:inkpeft:0.5>", **REQUEST))
    assert output.extra["Lora hashes"] == f"inkpeft: {library.network_hash(library.find('lora', 'inkpeft'))}"
    for path, peft_delta in adapters.unet_deltas.items():  # merged now (until a request without the tag)
        ours = current_weight(unet.get_submodule(path)) - base[path]
        assert torch.allclose(ours, 0.5 * peft_delta, atol=1e-6), path
    pipe(GenerationRequest(prompt="a red circle", **REQUEST))
    assert all(torch.equal(current_weight(unet.get_submodule(p)), w) for p, w in base.items())


def test_a_pickled_adapter_or_one_without_config_is_refused_by_name(library_pipe, adapters):
    with pytest.raises(ModelLoadError, match=r"pickled.*refused.*adapter_model\.bin is a Python pickle"):
        library_pipe(GenerationRequest(prompt="a circle <lora:pickled:1>", **REQUEST))
    with pytest.raises(ModelLoadError, match=r"adapter_model\.safetensors.*PEFT adapter's weights: use the folder"):
        library_pipe(GenerationRequest(prompt="a circle <lora:noconfig/adapter_model:1>", **REQUEST))
    lora_dir = library_pipe.extra_networks.library.roots[0] / "models" / "Lora"
    with pytest.raises(ModelLoadError, match=r"noconfig: not a PEFT adapter folder \(adapter_config\.json missing"):
        read_lora(lora_dir / "noconfig", "noconfig", "")


def test_place_lora_copies_a_file_or_an_adapter_folder_under_a_name(tiny_model, adapters, tmp_path):
    """What the evaluation tools do with ``--lora PATH`` / ``--evaluate PATH``."""
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    place_lora(adapters.root / "pair", lora_dir, "concept")
    fx.kohya_lora(plain_models(tiny_model), tmp_path / "k.safetensors")
    place_lora(tmp_path / "k.safetensors", lora_dir, "kohya")
    library = ModelLibrary([tmp_path], shipped=False)
    assert [(e.name, e.format) for e in library.files("lora")] == [("concept", "peft"), ("kohya", "safetensors")]
    assert read_lora(library.find("lora", "concept").path, "concept", "").modules.keys() == read_lora(
        adapters.root / "pair", "pair", "").modules.keys()
    with pytest.raises(ModelLoadError, match=r"Lora: a folder, but no PEFT adapter"):
        place_lora(lora_dir, tmp_path, "again")


# ---- errors: the config is JSON, checked field by field -----------------------------------------------------------


def edited_copy(adapters, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(adapters.root / "unet_lora", folder)
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    edited = edit(config)
    config_file.write_text(edited if isinstance(edited, str) else json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: "{ r: 4, lora_alpha", r"adapter_config\.json: not a valid adapter config \(Expecting"),
        (lambda c: "[4, 8]", r"adapter_config\.json: not a valid adapter config \(a JSON object"),
        (lambda c: c.pop("r"), r"adapter_config\.json: r must be a positive number, got None"),
        (lambda c: c.update(lora_alpha="8"), r"lora_alpha must be a number, got '8'"),
        (lambda c: c.update(peft_type="LOHA"), r"peft_type 'LOHA' is not supported"),
        (lambda c: c.update(bias="all"), r"bias = 'all' is not supported"),
        (lambda c: c.update(modules_to_save=["conv_in"]), r"modules_to_save = \['conv_in'\] is not supported"),
        (lambda c: c.update(init_lora_weights="pissa_niter_4"), r"init_lora_weights = 'pissa_niter_4'"),
        (lambda c: c.update(rank_pattern={"attn2.to_k": "two"}), r"rank_pattern must map module patterns"),
        (lambda c: c.update(r=8), r"module down_blocks\.0\.attentions\.0\.proj_in has rank 4, but adapter_config\."
                                  r"json says 8"),
    ],
)
def test_a_malformed_or_unsupported_config_is_refused_naming_the_field(adapters, tmp_path, edit, message):
    with pytest.raises(ModelLoadError, match=message):
        read_lora(edited_copy(adapters, tmp_path, edit), "edited", "")


def test_dora_is_refused_naming_use_dora(tiny_model, tmp_path):
    models = plain_models(tiny_model)
    peft_wrapped(models.unet, 3, r=2, lora_alpha=2, use_dora=True, target_modules=["to_q"]).save_pretrained(
        tmp_path / "dora")
    with pytest.raises(ModelLoadError, match=r"dora[/\\]adapter_config\.json: use_dora = True is not supported \(DoRA"):
        read_lora(tmp_path / "dora", "dora", "")


def test_an_adapter_of_unknown_modules_or_another_base_is_refused(adapters, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "odd"
    folder.mkdir()
    shutil.copy(adapters.root / "unet_lora" / "adapter_config.json", folder)
    save_file({"base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
               "base_model.model.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"cannot tell whether this adapter is for the U-Net or the text encoder "
                                             r"\(module 'transformer_blocks\.0\.attn\.to_q' is neither's\)"):
        read_lora(folder, "odd", "")
    sdxl = tmp_path / "sdxl"
    shutil.copytree(adapters.root / "te_lora", sdxl / "text_encoder_2")
    with pytest.raises(IncompatibleModel, match=r"an adapter for another base"):
        read_lora(sdxl, "sdxl", "")
