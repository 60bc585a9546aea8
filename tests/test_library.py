"""Model folders as A1111 and ComfyUI lay them out: listing, names, refusals, header metadata, the hash cache."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from pipelines.models import hash_cache
from pipelines.models.errors import ModelLoadError
from pipelines.models.hash_cache import HashCache
from pipelines.models.library import ModelLibrary, base_model, read_header


def _file(path, tensors=None, metadata=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors or {"w": torch.zeros(2)}, str(path), metadata=metadata)
    return path


@pytest.fixture()
def a1111(tmp_path, tiny_model):
    root = tmp_path / "stable-diffusion-webui"
    models = root / "models"
    _file(models / "Stable-diffusion" / "sd15.safetensors", {"cond_stage_model.transformer.x": torch.zeros(1)})
    _file(models / "Stable-diffusion" / "anime" / "other.safetensors")
    _file(models / "Stable-diffusion" / "sd15.vae.safetensors")
    shutil.copytree(tiny_model, models / "Stable-diffusion" / "tiny-folder")
    (models / "Stable-diffusion" / "old.ckpt").write_bytes(b"pickle")
    _file(models / "VAE" / "vae-ft-mse.safetensors")
    _file(models / "Lora" / "styles" / "ink.safetensors",
          {"lora_unet_x.lora_down.weight": torch.zeros(4, 768)},
          {"ss_base_model_version": "sd_v1", "ss_network_dim": "4", "ss_output_name": "ink"})
    _file(models / "LyCORIS" / "hada.safetensors")
    (models / "Lora" / "legacy.pt").write_bytes(b"pickle")
    _file(root / "embeddings" / "bad-hands.safetensors", {"emb_params": torch.zeros(2, 768)})
    (root / "embeddings" / "old-emb.pt").write_bytes(b"pickle")
    return root


def names(library, kind):
    return [e.name for e in library.files(kind)]


def test_a1111_layout_with_subfolders_diffusers_folders_and_refused_pickles(a1111):
    library = ModelLibrary([a1111], shipped=False)
    assert names(library, "checkpoint") == ["anime/other.safetensors", "old.ckpt", "sd15.safetensors", "tiny-folder"]
    refused = {e.name: e.refused for e in library.files("checkpoint") if e.refused}
    assert list(refused) == ["old.ckpt"] and "pickle" in refused["old.ckpt"] and "safetensors" in refused["old.ckpt"]
    folder = next(e for e in library.files("checkpoint") if e.name == "tiny-folder")
    assert folder.format == "diffusers" and folder.weights.name == "diffusion_pytorch_model.safetensors"
    assert names(library, "vae") == ["sd15.vae.safetensors", "vae-ft-mse.safetensors"]  # beside checkpoints too
    assert names(library, "lora") == ["hada", "legacy", "styles/ink"]  # models/Lora and models/LyCORIS
    assert names(library, "embedding") == ["bad-hands", "old-emb"]
    assert library.find("lora", "ink").name == "styles/ink" and library.find("lora", "styles/ink").stem == "ink"
    with pytest.raises(ModelLoadError, match=r"legacy\.pt: refused.*pickle"):
        library.find("lora", "legacy")
    with pytest.raises(ModelLoadError, match="no lora named 'nope'.*available: hada, styles/ink"):
        library.find("lora", "nope")


def test_comfyui_layout_and_a_models_folder_as_root(tmp_path):
    root = tmp_path / "ComfyUI"
    _file(root / "models" / "checkpoints" / "sd15.safetensors")
    _file(root / "models" / "vae" / "v.safetensors")
    _file(root / "models" / "loras" / "sub" / "l.safetensors")
    _file(root / "models" / "embeddings" / "e.safetensors")
    for given in (root, root / "models"):
        library = ModelLibrary([given], shipped=False)
        assert names(library, "checkpoint") == ["sd15.safetensors"]
        assert names(library, "vae") == ["v.safetensors"]
        assert names(library, "lora") == ["sub/l"]
        assert names(library, "embedding") == ["e"]


def test_checkpoint_lookup_by_title_stem_and_hash_and_ambiguity(a1111):
    library = ModelLibrary([a1111], shipped=False)
    entry = library.find("checkpoint", "sd15.safetensors")
    short = library.short_hash(entry)
    assert short == hashlib.sha256(entry.path.read_bytes()).hexdigest()[:10]
    assert library.find("checkpoint", f"sd15.safetensors [{short}]") == entry  # A1111's title
    assert library.find("checkpoint", "sd15") == entry
    assert library.find("checkpoint", short) == entry
    _file(a1111 / "models" / "Lora" / "x" / "dup.safetensors")
    _file(a1111 / "models" / "LyCORIS" / "y" / "dup.safetensors", {"w": torch.ones(2)})
    _file(a1111 / "models" / "Lora" / "other" / "hada.safetensors")
    library.refresh()
    with pytest.raises(ModelLoadError, match="'dup' is ambiguous: .* differ; rename one of them"):
        library.find("lora", "dup")
    assert library.find("lora", "y/dup").path.parent.name == "y"
    assert library.find("lora", "hada").path.parent.name == "LyCORIS"  # the exact name wins over a stem


def test_one_name_under_two_roots_a1111_and_comfyui(tmp_path):
    """A checkpoint kept in both an A1111 and a ComfyUI tree: copies of one file are one model; different files
    of one name are told apart by the title's hash, as GET /sd-models and sd-app models show it."""
    webui, comfy = tmp_path / "webui" / "models", tmp_path / "ComfyUI" / "models"
    first = _file(webui / "Stable-diffusion" / "v1-5.safetensors", {"w": torch.zeros(2)})
    shutil.copy(first, _file(comfy / "checkpoints" / "v1-5.safetensors"))
    _file(webui / "Lora" / "ink.safetensors", {"w": torch.ones(2)})
    (comfy / "loras").mkdir(parents=True)
    os.link(webui / "Lora" / "ink.safetensors", comfy / "loras" / "ink.safetensors")  # one file, two names
    library = ModelLibrary([webui.parent, comfy.parent], shipped=False)
    assert library.find("checkpoint", "v1-5.safetensors").path == first
    assert library.find("lora", "ink").path.parent.name == "Lora"
    other = _file(comfy / "checkpoints" / "v1-5.safetensors", {"w": torch.ones(3)})  # now a different file
    library.refresh()
    with pytest.raises(ModelLoadError, match="ambiguous: .* differ; name it by its title with the hash"):
        library.find("checkpoint", "v1-5.safetensors")
    for path in (first, other):
        title = f"v1-5.safetensors [{library.hashes.short_hash(path)}]"
        assert library.find("checkpoint", title).path == path


def test_a_users_lora_shadows_a_shipped_example_of_its_name(tmp_path):
    from pipelines.models.library import SHIPPED_LORA_DIR

    shipped = ModelLibrary([], shipped=True).find("lora", "hexagon")
    assert shipped.folder == "shipped"
    mine = _file(tmp_path / "webui" / "models" / "Lora" / "hexagon.safetensors", {"w": torch.ones(2)})
    library = ModelLibrary([tmp_path / "webui"], shipped=True)
    assert library.find("lora", "hexagon").path == mine
    shutil.copy(SHIPPED_LORA_DIR / "hexagon.safetensors", mine)  # a copy of the example: still the user's
    library.refresh()
    assert library.find("lora", "hexagon").path == mine


def test_symlinked_subfolders_are_walked_once(tmp_path):
    """A shared store linked into the LoRA folder is listed (A1111 walks with followlinks); a link back up the
    tree does not loop."""
    store = tmp_path / "store"
    _file(store / "linked-lora.safetensors")
    loras = tmp_path / "webui" / "models" / "Lora"
    loras.mkdir(parents=True)
    (loras / "shared").symlink_to(store, target_is_directory=True)
    (store / "loop").symlink_to(loras, target_is_directory=True)
    library = ModelLibrary([tmp_path / "webui"], shipped=False)
    assert [e.name for e in library.files("lora")] == ["shared/linked-lora"]
    assert library.find("lora", "linked-lora").path == loras / "shared" / "linked-lora.safetensors"


def test_new_files_are_found_without_a_refresh_and_listings_are_cached(a1111):
    library = ModelLibrary([a1111], shipped=False)
    before = names(library, "lora")
    _file(a1111 / "models" / "Lora" / "fresh.safetensors")
    assert names(library, "lora") == before  # cached until refresh
    assert library.find("lora", "fresh").stem == "fresh"  # a miss rescans once
    assert "fresh" in names(library, "lora")


def test_header_metadata_and_base_model(a1111, tmp_path):
    library = ModelLibrary([a1111], shipped=False)
    row = library.describe(library.find("lora", "ink"))
    assert row["metadata"]["ss_network_dim"] == "4" and row["base_model"] == "SD 1.x" and row["size"] > 0
    assert len(row["hash"]) == 10 and row["refused"] is None
    assert base_model(read_header(_file(tmp_path / "xl.safetensors", {"lora_te2_a.lora_down.weight": torch.zeros(1)})))\
        == "SDXL"
    assert base_model(read_header(_file(tmp_path / "e2.safetensors", {"emb_params": torch.zeros(1, 1024)}))) == "SD 2.x"
    assert base_model(read_header(_file(tmp_path / "v2.safetensors", metadata={"ss_v2": "True"}))) == "SD 2.x"
    # no metadata: the cross-attention key projection's width, as kohya and PEFT spell its key
    for key, width, base in (("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
                              1024, "SD 2.x"),
                             ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight", 768,
                              "SD 1.x"),
                             ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_down.weight", 2048,
                              "SDXL")):
        assert base_model(read_header(_file(tmp_path / "bare.safetensors", {key: torch.zeros(4, width)}))) == base
    ckpt = library.describe(library.find("checkpoint", "sd15"))
    assert ckpt["base_model"] == "SD 1.x"
    cut = tmp_path / "cut" / "models" / "Lora" / "cut.safetensors"
    raw = _file(tmp_path / "whole.safetensors", {"w": torch.zeros(1000)}).read_bytes()
    cut.parent.mkdir(parents=True)
    cut.write_bytes(raw[:-100])
    cut_row = ModelLibrary([tmp_path / "cut"], shipped=False).describe(
        ModelLibrary([tmp_path / "cut"], shipped=False).files("lora")[0])
    assert "truncated" in cut_row["refused"]
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(ModelLoadError, match=r"junk\.safetensors"):
        read_header(tmp_path / "junk.safetensors")


def test_shipped_model_and_loras_are_always_listed(tmp_path):
    library = ModelLibrary()
    assert [e.name for e in library.files("checkpoint")] == ["shapes-tiny"]
    assert library.find("checkpoint", "embedded").name == "shapes-tiny"
    with pytest.raises(ModelLoadError, match="models folder not found"):
        ModelLibrary([tmp_path / "missing"])


def test_hash_cache_keys_on_path_mtime_and_size(tmp_path, monkeypatch):
    calls = []
    real = hash_cache.sha256_file
    monkeypatch.setattr(hash_cache, "sha256_file", lambda path: calls.append(path) or real(path))
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"a" * 1000)
    cache_file = tmp_path / "cache" / "hashes.json"
    cache = HashCache(cache_file)
    first = cache.sha256(file)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest() and len(calls) == 1
    assert cache.sha256(file) == first and len(calls) == 1  # cached
    assert HashCache(cache_file).sha256(file) == first and len(calls) == 1  # another process, same cache file
    stat = file.stat()
    file.write_bytes(b"b" * 1000)  # same size, same mtime: taken as unchanged (the key is path+mtime+size)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache.sha256(file) == first and len(calls) == 1
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: hashed again
    assert cache.sha256(file) == hashlib.sha256(b"b" * 1000).hexdigest() and len(calls) == 2
    file.write_bytes(b"b" * 999)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # same mtime, new size: hashed again
    assert cache.short_hash(file) == hashlib.sha256(b"b" * 999).hexdigest()[:10] and len(calls) == 3
    assert cache.cached(tmp_path / "absent") is None


def test_network_hashes_are_what_a1111_writes_in_the_infotext(a1111, tmp_path):
    """A1111 (extensions-builtin/Lora/network.py, textual_inversion.py): shorthash = hash[0:12], where a
    .safetensors LoRA's hash is its header's sshs_model_hash or else the SHA-256 of the bytes after the header
    (use_addnet_hash), and an embedding's is the file's SHA-256."""
    library = ModelLibrary([a1111], shipped=False, hashes=HashCache(None))
    ink = library.find("lora", "ink")
    data = ink.path.read_bytes()
    after_header = data[8 + int.from_bytes(data[:8], "little"):]
    assert library.network_hash(ink) == hashlib.sha256(after_header).hexdigest()[:12]
    assert library.network_hash(ink) != hashlib.sha256(data).hexdigest()[:12]  # not the file's AutoV2
    emb = library.find("embedding", "bad-hands")
    assert library.network_hash(emb) == hashlib.sha256(emb.path.read_bytes()).hexdigest()[:12]
    legacy = next(e for e in library.files("lora") if e.stem == "legacy")
    assert legacy.refused and library.network_hash(legacy) is None  # a refused pickle is never read
    _file(a1111 / "models" / "Lora" / "kohya.safetensors", {"lora_unet_x.lora_down.weight": torch.zeros(4, 768)},
          {"sshs_model_hash": "0123456789abcdef" * 4})
    assert library.network_hash(ModelLibrary([a1111], shipped=False).find("lora", "kohya")) == "0123456789ab"


def test_cli_models_lists_the_folders(a1111, capsys):
    from sd_app.cli import main

    assert main(["models", "--models-dir", str(a1111), "--kind", "lora"]) == 0
    out = capsys.readouterr().out
    assert "styles/ink" in out and "SD 1.x" in out and "legacy" in out and "REFUSED" in out
    assert main(["models", "--models-dir", str(a1111 / "nope")]) == 2
    assert "models folder not found" in capsys.readouterr().err


def test_a_vae_is_named_by_its_short_hash_and_title_like_a_checkpoint(a1111, tmp_path):
    """README: VAEs by stem, title ``name [hash]`` or short hash; two different VAEs of one name are told apart
    by their titles, which the error names."""
    library = ModelLibrary([a1111], shipped=False)
    entry = library.find("vae", "vae-ft-mse.safetensors")
    short = library.short_hash(entry)  # hashed (and cached), as sd-app models lists it
    assert library.find("vae", short) == entry and library.find("vae", short.upper()) == entry
    assert library.find("vae", f"vae-ft-mse.safetensors [{short}]") == entry
    with pytest.raises(ModelLoadError, match="a short hash names a file once it is hashed"):
        library.find("vae", "0123456789")
    other = _file(tmp_path / "ComfyUI" / "models" / "vae" / "vae-ft-mse.safetensors", {"w": torch.ones(3)})
    both = ModelLibrary([a1111, tmp_path / "ComfyUI"], shipped=False)
    titles = [f"vae-ft-mse.safetensors [{both.hashes.short_hash(path)}]" for path in (entry.path, other)]
    with pytest.raises(ModelLoadError, match="ambiguous") as error:
        both.find("vae", "vae-ft-mse.safetensors")
    assert all(title in str(error.value) for title in titles) and "rename one of them" in str(error.value)
    assert [both.find("vae", title).path for title in titles] == [entry.path, other]


def test_a_title_whose_hash_is_another_files_is_refused_naming_both(a1111):
    """A title whose name is one file's and whose hash is another's names no file: not the file of its name,
    silently, and not the file of its hash either."""
    library = ModelLibrary([a1111], shipped=False)
    sd15, other = library.find("checkpoint", "sd15"), library.find("checkpoint", "other")
    theirs = library.short_hash(other)
    with pytest.raises(ModelLoadError, match="does not match its file") as error:
        library.find("checkpoint", f"sd15.safetensors [{theirs}]")
    message = str(error.value)
    assert f"{sd15.path} has hash {library.short_hash(sd15)}, not {theirs}" in message
    assert f"{theirs} is the hash of {other.path} ('anime/other.safetensors [{theirs}]')" in message
    # a hash no file has (the file updated since, or A1111's old 8-digit hash): the file of its name, as A1111
    for unknown in ("0000000000", "a9263745"):
        with pytest.warns(UserWarning, match=f"not {unknown}, and no checkpoint of the model folders is known by"):
            assert library.find("checkpoint", f"sd15 [{unknown}]") == sd15
    vae, ink, sd15_hash = library.find("vae", "vae-ft-mse"), library.find("lora", "ink"), library.short_hash(sd15)
    # a checkpoint's hash in a VAE's or LoRA's title: no file of that kind has it, so the file of the name, said
    with pytest.warns(UserWarning, match=f"{vae.path} has hash"):
        assert library.find("vae", f"vae-ft-mse.safetensors [{sd15_hash}]") == vae
    with pytest.warns(UserWarning, match=f"{ink.path} has hash"):
        assert library.find("lora", f"styles/ink [{sd15_hash}]") == ink
    assert library.find("lora", f"styles/ink [{library.short_hash(ink)}]") == ink
    from sd_app.checkpoints import checkpoint_path

    with pytest.raises(ModelLoadError, match="does not match its file"):  # a title of a subfolder: no repo id
        checkpoint_path(library, f"anime/other.safetensors [{sd15_hash}]")


@pytest.mark.parametrize("given", ["checkpoints folder", "empty folder"])
def test_a_models_dir_without_the_layout_warns_and_a_missing_name_says_why(a1111, tmp_path, given):
    """The checkpoints folder itself (a common mistake) or an empty folder is read with a warning naming the
    folders looked for; a name not found then says so too. A correct install with empty kind folders does not."""
    root = a1111 / "models" / "Stable-diffusion" if given == "checkpoints folder" else tmp_path / "empty"
    root.mkdir(exist_ok=True)
    with pytest.warns(UserWarning, match=f"models folder {root} has none of the model folders") as warned:
        library = ModelLibrary([root], shipped=True)
    message = str(warned[0].message)
    assert "models/Stable-diffusion" in message and "models/checkpoints" in message
    assert ("give its parent, " + str(root.parent)) in message if given == "checkpoints folder" else True
    with pytest.raises(ModelLoadError, match=r"no checkpoint named 'sd15' .*available: shapes-tiny\); models folder "
                                             f"{root} has none of the model folders"):
        library.find("checkpoint", "sd15")
    for kind in ("Stable-diffusion", "VAE", "Lora"):
        (tmp_path / "fresh" / "models" / kind).mkdir(parents=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = ModelLibrary([tmp_path / "fresh"], shipped=True)
    with pytest.raises(ModelLoadError, match=r"available: shapes-tiny\)$"):
        fresh.find("checkpoint", "sd15")


def test_cli_info_lists_the_models_dirs_checkpoints_and_vaes(a1111, capsys):
    from sd_app.cli import main

    assert main(["info", "--models-dir", str(a1111)]) == 0
    out = capsys.readouterr().out
    assert "sd15.safetensors  (checkpoint)" in out and "tiny-folder  (checkpoint)" in out
    assert "vae-ft-mse.safetensors  (vae)" in out and "sd-app models" in out
