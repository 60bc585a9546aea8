"""Textual-inversion embeddings by file name (with chunking and emphasis), their formats and refusals; clip skip."""

from __future__ import annotations

import pytest
import torch

from pipelines.generation.prompts import CHUNK_TOKENS, chunk_prompt, encode_chunks
from pipelines.generation.request import GenerationRequest
from pipelines.models.errors import ModelLoadError
from pipelines.models.library import ModelLibrary
from pipelines.models.loading import load_pipeline
from sd_app.metadata import format_parameters, parse_parameters, request_from_parameters
from tests import lora_fixtures as fx

REQUEST = dict(steps=2, width=64, height=64, seed=5, sampler="Euler")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy")
    folder = root / "models" / "embeddings"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    fx.embedding(folder / "shiny-style.safetensors", torch.randn(3, 32, generator=g))  # 3 vectors
    fx.embedding(folder / "one.safetensors", torch.randn(32, generator=g), key="string_to_param.*")  # [D]
    fx.embedding(folder / "concept.safetensors", torch.randn(1, 32, generator=g), key="<concept>")
    fx.embedding(folder / "wide.safetensors", torch.randn(2, 768, generator=g))
    fx.embedding(folder / "xl.safetensors", torch.zeros(1, 32))
    from safetensors.torch import save_file

    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(folder / "xl.safetensors"))
    (folder / "pickled.pt").write_bytes(b"pickle")
    return root


@pytest.fixture(scope="module")
def pipe(tiny_model, root):
    return load_pipeline(tiny_model, device="cpu", dtype=torch.float32, library=ModelLibrary([root], shipped=False))


def reference_encoding(pipe, prompt_with_placeholders: str, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The independent way (diffusers' load_textual_inversion): new tokens in a copy of the tokenizer whose rows
    of the token embedding are the vectors; the prompt names them ``<name_0> <name_1> ...``."""
    import copy

    tokenizer = copy.deepcopy(pipe.components.tokenizer)
    encoder = copy.deepcopy(pipe.components.text_encoder)
    names = [f"<{name}_{i}>" for name, v in vectors.items() for i in range(v.shape[0])]
    tokenizer.add_tokens(names)
    encoder.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        for name, v in vectors.items():
            for i in range(v.shape[0]):
                encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(f"<{name}_{i}>")] = v[i]
    return encode_chunks(encoder, chunk_prompt(tokenizer, prompt_with_placeholders))


def vectors_of(pipe, name):
    return pipe.extra_networks.embeddings([name])[name].vectors


def test_multi_vector_embedding_by_file_name_equals_added_tokens(pipe):
    with torch.no_grad():
        ours = pipe.encode_prompt("a Shiny-Style circle", "", 1, guided=False)
        theirs = reference_encoding(pipe, "a <shiny-style_0> <shiny-style_1> <shiny-style_2> circle",
                                    {"shiny-style": vectors_of(pipe, "shiny-style")})
    assert torch.allclose(ours, theirs, atol=1e-5)
    plain = pipe.encode_prompt("a circle", "", 1, guided=False)
    assert not torch.allclose(ours, plain)


def test_formats_single_vector_and_concept_keys(pipe):
    assert vectors_of(pipe, "one").shape == (1, 32) and vectors_of(pipe, "concept").shape == (1, 32)
    with torch.no_grad():
        ours = pipe.encode_prompt("one and concept", "", 1, guided=False)
        theirs = reference_encoding(pipe, "<one_0> and <concept_0>",
                                    {"one": vectors_of(pipe, "one"), "concept": vectors_of(pipe, "concept")})
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_emphasis_weights_the_embeddings_vectors(pipe):
    encoded = chunk_prompt(pipe.components.tokenizer, "a (shiny-style:1.3) circle",
                           embeddings=pipe.extra_networks.embeddings(["shiny-style"]))
    assert encoded.weights[0][:6] == [1.0, 1.0, 1.3, 1.3, 1.3, 1.0]  # bos, a, 3 vectors, circle
    assert [position for _, position, _ in encoded.vectors] == [2, 3, 4]


def test_an_embedding_is_never_cut_across_chunks(pipe):
    tokenizer = pipe.components.tokenizer
    embeddings = pipe.extra_networks.embeddings(["shiny-style"])
    filler = " ".join(["red"] * (CHUNK_TOKENS - 1))  # 74 tokens: the 3 vectors do not fit in chunk 1
    encoded = chunk_prompt(tokenizer, f"{filler} shiny-style blue", embeddings=embeddings)
    assert encoded.chunks == 2
    assert encoded.input_ids[0][75] == tokenizer.eos_token_id  # chunk 1 closed early: 74 tokens then eos
    assert [(chunk, position) for chunk, position, _ in encoded.vectors] == [(1, 1), (1, 2), (1, 3)]
    fits = chunk_prompt(tokenizer, " ".join(["red"] * (CHUNK_TOKENS - 3)) + " shiny-style", embeddings=embeddings)
    assert fits.chunks == 1 and [p for _, p, _ in fits.vectors] == [73, 74, 75]


def test_ti_hashes_in_the_infotext_and_negative_prompts(pipe):
    output = pipe(GenerationRequest(prompt="a shiny-style circle", negative_prompt="one", **REQUEST))
    library = pipe.extra_networks.library
    expected = {name: library.network_hash(library.find("embedding", name)) for name in ("shiny-style", "one")}
    assert output.extra["TI hashes"] == f"shiny-style: {expected['shiny-style']}, one: {expected['one']}"
    text = format_parameters(output.request, output.seeds[0], "tiny", None, output.extra)
    assert parse_parameters(text)["TI hashes"] == output.extra["TI hashes"]
    assert "TI hashes" not in pipe(GenerationRequest(prompt="a circle", **REQUEST)).extra


@pytest.mark.parametrize(
    ("prompt", "message"),
    [("a wide circle", r"wide\.safetensors.*width 768.*SD 1\.x.*width is 32"),
     ("xl", r"xl\.safetensors.*SDXL"),
     ("a pickled thing", r"pickled\.pt.*refused.*pickle")],
)
def test_wrong_width_sdxl_and_pickles_name_the_file(pipe, prompt, message):
    steps = []
    with pytest.raises(ModelLoadError, match=message):
        pipe(GenerationRequest(prompt=prompt, **REQUEST), on_step=steps.append)
    assert steps == []


def test_an_embedding_dropped_in_after_start_is_used_and_a_lora_tag_is_no_word(tiny_model, tmp_path):
    """A1111 reloads embeddings when their folder changes: a word must not silently stay text because its file
    came later. A ``<lora:name>`` tag is not a word: a refused embedding of that name does not fail it."""
    folder = tmp_path / "embeddings"
    folder.mkdir()
    (folder / "charname.pt").write_bytes(b"pickle")
    pipe = load_pipeline(tiny_model, device="cpu", dtype=torch.float32, library=ModelLibrary([tmp_path], shipped=False))
    networks = pipe.extra_networks
    assert networks.embeddings(["a newemb photo", "<lora:charname:0.8> a cat"]) == {}
    with pytest.raises(ModelLoadError, match=r"charname\.pt.*refused"):
        networks.embeddings(["charname, a cat"])
    (folder / "late").mkdir()
    fx.embedding(folder / "late" / "newemb.safetensors", torch.ones(2, 32))  # in a new subfolder, no refresh
    found = networks.embeddings(["a newemb photo"])
    assert list(found) == ["newemb"] and torch.equal(found["newemb"].vectors, torch.ones(2, 32))
    output = pipe(GenerationRequest(prompt="a newemb photo", **REQUEST))
    assert output.extra["TI hashes"].startswith("newemb: ")


# ---- clip skip ------------------------------------------------------------------------------------------


def test_clip_skip_is_an_earlier_layer_through_the_final_layer_norm(pipe):
    encoder = pipe.components.text_encoder
    encoded = chunk_prompt(pipe.components.tokenizer, "a red circle")
    ids = torch.tensor(encoded.input_ids)
    with torch.no_grad():
        states = encoder(ids, output_hidden_states=True).hidden_states  # embeddings + one per layer
        expected = encoder.final_layer_norm(states[-2])
        assert torch.allclose(encode_chunks(encoder, encoded, clip_skip=2), expected, atol=1e-6)
        assert torch.allclose(encode_chunks(encoder, encoded, clip_skip=1), encoder(ids)[0])
        assert not torch.allclose(encode_chunks(encoder, encoded, clip_skip=2), encoder(ids)[0])
    with pytest.raises(ValueError, match="clip_skip must be between 1 and 2"):
        encode_chunks(encoder, encoded, clip_skip=3)  # the tiny encoder has 2 layers


def test_clip_skip_in_request_and_metadata():
    with pytest.raises(ValueError, match="clip_skip must be between 1 and 12, got 13"):
        GenerationRequest(clip_skip=13)
    request = GenerationRequest(prompt="a cat", seed=3, clip_skip=2)
    text = format_parameters(request, 3, "m")
    assert "Clip skip: 2" in text
    assert request_from_parameters(parse_parameters(text)).clip_skip == 2
    assert "Clip skip" not in format_parameters(GenerationRequest(prompt="a cat", seed=3), 3, "m")  # A1111: only > 1


def test_clip_skip_changes_the_picture(pipe):
    import numpy as np

    one = pipe(GenerationRequest(prompt="a red circle", **REQUEST)).images[0]
    two = pipe(GenerationRequest(prompt="a red circle", clip_skip=2, **REQUEST)).images[0]
    assert not np.array_equal(np.asarray(one), np.asarray(two))
