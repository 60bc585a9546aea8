"""LoRAs named by their alias (kohya's ``ss_output_name``) and found by their ``Lora hashes``, as in A1111.

A1111 (extensions-builtin/Lora): ``NetworkOnDisk.alias`` is the header's ``ss_output_name``; a tag finds a file by
name, else by alias, and an alias two files share is forbidden (then only names work). ``Lora hashes`` pairs the
name the tag mentions (``:`` and ``,`` removed) with the 12-digit hash; a pasted infotext's ``<lora:NAME:`` is
renamed to the local file of its hash (``infotext_pasted``).
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.generation.request import GenerationRequest
from pipelines.models.errors import ModelNotFound
from pipelines.models.library import ModelLibrary
from pipelines.models.loading import load_pipeline
from pipelines.models.network_checks import NetworkChecker
from pipelines.models.network_hashes import lora_hashes_text, parse_hashes_text
from tests import lora_fixtures as fx

REQUEST = dict(steps=2, width=64, height=64, seed=3, sampler="Euler")
KNOWN_HASH = "abcdef123456" + "7" * 52  # kohya writes sshs_model_hash in the header: known without hashing


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("a1111")
    (root / "models" / "Lora" / "sub").mkdir(parents=True)
    return root


@pytest.fixture(scope="module")
def pipe(tiny_model, models_dir):
    """A tiny model whose library holds a LoRA under another file name than its alias, and two sharing one."""
    library = ModelLibrary([models_dir], shipped=False)
    pipe = load_pipeline(tiny_model, device="cpu", dtype=torch.float32, library=library)
    c, lora_dir = pipe.components, models_dir / "models" / "Lora"
    fx.kohya_lora(c, lora_dir / "sub" / "inkstyle_v2-000010.safetensors", output_name="inkstyle")
    fx.kohya_lora(c, lora_dir / "shared_a.safetensors", seed=1, output_name="twin")
    fx.kohya_lora(c, lora_dir / "shared_b.safetensors", seed=2, output_name="twin")
    fx.kohya_lora(c, lora_dir / "plain.safetensors", seed=3)
    fx.kohya_lora(c, lora_dir / "taken.safetensors", seed=4, output_name="plain")  # alias = another file's name
    fx.kohya_lora(c, lora_dir / "nothing.safetensors", seed=5, output_name="none")
    fx.kohya_lora(c, lora_dir / "ink,v2.safetensors", seed=6)
    state = load_file(lora_dir / "plain.safetensors")
    save_file({k: v + 1 for k, v in state.items()}, str(lora_dir / "hashed_9.safetensors"),
              metadata={"ss_output_name": "hashed", "sshs_model_hash": KNOWN_HASH, "ss_base_model_version": "sd_v1"})
    library.refresh()
    return pipe


def image(pipe, prompt: str):
    output = pipe(GenerationRequest(prompt=prompt, **REQUEST))
    return np.asarray(output.images[0]), output.extra


def test_a_tag_finds_a_lora_by_its_alias_and_the_infotext_names_it_as_typed(pipe):
    library = pipe.extra_networks.library
    by_name, by_name_extra = image(pipe, "a red circle <lora:inkstyle_v2-000010:1>")
    by_alias, extra = image(pipe, "a red circle <lora:inkstyle:1>")
    assert np.array_equal(by_alias, by_name)
    assert not np.array_equal(by_alias, image(pipe, "a red circle")[0])
    short_hash = library.network_hash(library.find("lora", "sub/inkstyle_v2-000010"))
    assert extra["Lora hashes"] == f"inkstyle: {short_hash}"  # A1111 writes the name the tag mentions
    assert by_name_extra["Lora hashes"] == f"inkstyle_v2-000010: {short_hash}"
    assert library.find("lora", "inkstyle").path.name == "inkstyle_v2-000010.safetensors"
    assert library.prompt_name(library.find("lora", "inkstyle_v2-000010")) == "inkstyle"  # A1111's get_alias()


def test_headers_are_read_only_when_no_name_fits(tiny_model, tmp_path):
    (tmp_path / "models" / "Lora").mkdir(parents=True)
    components = load_pipeline(tiny_model, device="cpu", dtype=torch.float32).components
    fx.kohya_lora(components, tmp_path / "models" / "Lora" / "file.safetensors", output_name="other")
    library = ModelLibrary([tmp_path], shipped=False)
    assert library.find("lora", "file").name == "file"
    assert library._aliases == {}  # a name lookup reads no header
    assert library.find("lora", "other").name == "file"
    assert len(library._aliases) == 1


def test_an_alias_two_files_share_names_neither_and_names_still_work(pipe):
    library = pipe.extra_networks.library
    with pytest.raises(ModelNotFound, match=r"alias 'twin' .*shared by .*shared_a\.safetensors.*shared_b\.safetensors"
                                            r".*<lora:shared_a:\.\.\.> or <lora:shared_b:\.\.\.>"):
        image(pipe, "a cat <lora:twin:1>")
    assert library.find("lora", "shared_a").path.name == "shared_a.safetensors"
    assert library.find("lora", "plain").path.name == "plain.safetensors"  # a name wins over another's alias
    assert library.prompt_name(library.find("lora", "taken")) == "taken"  # its alias names another file
    assert library.prompt_name(library.find("lora", "shared_b")) == "shared_b"
    with pytest.raises(ModelNotFound, match="no lora named 'none'.*alias"):
        library.find("lora", "none")  # A1111 never resolves 'none' as an alias


def test_batch_checks_find_aliases_and_refuse_a_shared_one(pipe):
    checker = NetworkChecker(pipe.extra_networks.library, pipe.extra_networks.width)
    checker.check("a cat <lora:inkstyle:0.5>")
    with pytest.raises(ModelNotFound, match="alias 'twin'"):
        checker.check("a cat <lora:twin:1>")


def test_lora_hashes_drop_colons_and_commas_and_name_each_lora_once(pipe):
    assert lora_hashes_text([("a,b", "1"), ("c", ""), ("a,b", "1"), ("d", "2")]) == "ab: 1, d: 2"
    library = pipe.extra_networks.library
    _, extra = image(pipe, "a cat <lora:ink,v2:0.5> <lora:plain:0.2> <lora:ink,v2:0.5>")
    expected = {"inkv2": library.network_hash(library.find("lora", "ink,v2")),
                "plain": library.network_hash(library.find("lora", "plain"))}
    assert extra["Lora hashes"] == f"inkv2: {expected['inkv2']}, plain: {expected['plain']}"
    assert parse_hashes_text(extra["Lora hashes"]) == expected


# ---- a pasted infotext: its LoRAs found by hash --------------------------------------------------------------


def pasted(prompt: str, hashes: str) -> str:
    return (f"{prompt}\nNegative prompt: blurry\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64, "
            f'Model: other, Lora hashes: "{hashes}", Version: v1.10.1')


def png_base64(parameters: str) -> str:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def test_send_to_generate_finds_a_pasted_loras_file_by_its_hash(pipe):
    from sd_app.metadata import parse_parameters, request_from_parameters
    from sd_app.ui_handlers import UiHandlers

    library = pipe.extra_networks.library
    text = pasted("a cat <lora:foo:0.7>, <lora:bar:1> <lora:plain:1>",
                  f"foo: {KNOWN_HASH[:12]}, bar: 0123456789ab, plain: {KNOWN_HASH[:12]}")
    filled = UiHandlers.send_to_generate(text, library)
    # foo: no such file, its hash is hashed_9's (alias 'hashed'); bar: unknown hash, left; plain: its own file
    # is another than the hash's, so the hash's file is meant (A1111 renames it too)
    assert filled[0] == "a cat <lora:hashed:0.7>, <lora:bar:1> <lora:hashed:1>"
    assert UiHandlers.send_to_generate(text)[0] == "a cat <lora:foo:0.7>, <lora:bar:1> <lora:plain:1>"  # no library
    request = request_from_parameters(parse_parameters(pasted("a cat <lora:hashed:0.7>", "x: 1")))
    output = pipe(GenerationRequest(prompt=request.prompt, **REQUEST))
    assert output.extra["Lora hashes"] == f"hashed: {KNOWN_HASH[:12]}"


def test_a_hash_cached_by_a_generation_finds_the_file_and_the_png_info_api_renames_as_a1111(pipe, tmp_path):
    from sd_app.api_png_info import png_info_payload
    from sd_app.ui_handlers import UiHandlers

    library = pipe.extra_networks.library
    short_hash = library.network_hash(library.find("lora", "inkstyle"))  # a generation hashed it: now known
    text = pasted("<lora:oldname:1> a dog", f"oldname: {short_hash}")
    payload = png_info_payload(png_base64(text), library)
    assert payload["parameters"]["Prompt"] == "<lora:inkstyle:1> a dog"
    assert payload["info"] == text  # the text as written
    assert png_info_payload(png_base64(text))["parameters"]["Prompt"] == "<lora:oldname:1> a dog"
    path = tmp_path / "pasted.png"
    path.write_bytes(base64.b64decode(png_base64(text)))
    filled = UiHandlers.send_png_to_image(str(path), text, library)
    assert filled[1] == "<lora:inkstyle:1> a dog"


def test_sd_app_models_shows_an_alias_other_than_the_stem(pipe, models_dir, capsys):
    import argparse

    from sd_app.models_command import run_models

    run_models(argparse.Namespace(models_dir=[str(models_dir)], kind=["lora"], no_hash=True, json=False))
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "alias inkstyle" in lines["sub/inkstyle_v2-000010"] and "alias" not in lines["plain"]
    run_models(argparse.Namespace(models_dir=[str(models_dir)], kind=["lora"], no_hash=True, json=True))
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {row["name"]: row["alias"] for row in rows}["shared_a"] == "twin"
