"""A1111 emphasis parsing, 75-token chunking and weighted encoding."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTokenizer

from pipelines.generation.prompts import chunk_prompt, count_tokens, encode_chunks, parse_emphasis
from pipelines.models.shipped import CLIP_TOKENIZER_DIR


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, local_files_only=True)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a cat", [("a cat", 1.0)]),
        ("a (red:1.3) circle", [("a ", 1.0), ("red", 1.3), (" circle", 1.0)]),
        ("(a)", [("a", 1.1)]),
        ("((a))", [("a", 1.21)]),
        ("[a]", [("a", 1 / 1.1)]),
        ("(a (b:2) c)", [("a ", 1.1), ("b", 2.2), (" c", 1.1)]),
        (r"\(literal\)", [("(literal)", 1.0)]),
        ("(unclosed", [("unclosed", 1.1)]),
        ("x :1.2) y", [("x :1.2) y", 1.0)]),
    ],
)
def test_parse_emphasis(prompt, expected):
    spans = parse_emphasis(prompt)
    assert [s.text for s in spans] == [text for text, _ in expected]
    assert [s.weight for s in spans] == pytest.approx([weight for _, weight in expected])


def test_chunks_wrap_bos_eos_and_pad(tokenizer):
    encoded = chunk_prompt(tokenizer, "a red circle")
    assert encoded.input_ids == [[49406, 320, 736, 7117, 49407] + [49407] * 72]
    assert encoded.weights[0][:5] == [1.0] * 5


def test_long_prompt_is_chunked_not_cut(tokenizer):
    prompt = " ".join(["circle"] * 160)  # 160 tokens -> 3 chunks of 75
    count = count_tokens(tokenizer, prompt)
    assert (count.tokens, count.chunks) == (160, 3)
    encoded = chunk_prompt(tokenizer, prompt)
    assert encoded.chunks == 3
    assert all(len(ids) == 77 and ids[0] == 49406 for ids in encoded.input_ids)
    body = [t for ids in encoded.input_ids for t in ids[1:76] if t != 49407]
    assert len(body) == 160  # every token kept
    assert count_tokens(tokenizer, "").chunks == 1


def test_emphasis_weights_reach_the_tokens(tokenizer):
    encoded = chunk_prompt(tokenizer, "a (red:1.5) circle")
    assert encoded.weights[0][1:4] == [1.0, 1.5, 1.0]
    assert encoded.input_ids[0][1:4] == [320, 736, 7117]  # same ids as without emphasis


def test_unweighted_encoding_equals_plain_text_encoder(tiny_pipe, tokenizer):
    encoder = tiny_pipe.components.text_encoder
    plain_ids = tokenizer("a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = encoder(plain_ids)[0]
        ours = encode_chunks(encoder, chunk_prompt(tokenizer, "a red circle"))
        weighted = encode_chunks(encoder, chunk_prompt(tokenizer, "a (red:1.5) circle"))
    assert torch.equal(ours, expected)
    ratio = (weighted / expected)[0, :5, :].mean(dim=-1)  # per-token scale applied
    assert (ratio[2] / ratio[1]).item() == pytest.approx(1.5, rel=1e-3)  # "red" weighted 1.5
    assert (ratio[3] / ratio[1]).item() == pytest.approx(1.0, rel=1e-3)
