"""Prompt parsing and encoding the AUTOMATIC1111 way: emphasis weights and 75-token chunks.

Emphasis syntax (A1111 wiki, "Attention/emphasis"): ``(word)`` multiplies the attention to ``word``
by 1.1, ``[word]`` divides it by 1.1, ``(word:1.3)`` sets it to 1.3; brackets nest and multiply;
``\\(`` and ``\\)`` are literal brackets. Prompts longer than 75 tokens are not truncated: they are
cut into chunks of 75 tokens, each wrapped in bos/eos and padded to 77, encoded separately and
concatenated along the sequence axis, so the U-Net cross-attends to all of them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

CHUNK_TOKENS = 75  # 77 positions minus bos and eos
EMPHASIS_UP = 1.1

_TOKEN_RE = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|:|\\")


@dataclass(frozen=True)
class WeightedSpan:
    """A piece of prompt text and the attention weight it carries."""

    text: str
    weight: float


@dataclass(frozen=True)
class TokenCount:
    """How many CLIP tokens a prompt uses and how many 75-token chunks that makes."""

    tokens: int
    chunks: int


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids and per-token weights, already cut into chunks of 77 (bos + 75 + eos/padding)."""

    input_ids: list[list[int]]  # chunks x 77
    weights: list[list[float]]  # chunks x 77

    @property
    def chunks(self) -> int:
        return len(self.input_ids)


def parse_emphasis(prompt: str) -> list[WeightedSpan]:
    """Split ``prompt`` into spans with A1111 emphasis weights; unbalanced brackets are closed at the end."""
    spans: list[tuple[str, float]] = []
    open_round: list[int] = []  # span index where each open "(" began
    open_square: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for index in range(start, len(spans)):
            text, weight = spans[index]
            spans[index] = (text, weight * factor)

    for match in _TOKEN_RE.finditer(prompt):
        token, explicit_weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            spans.append((token[1:] or token, 1.0))
        elif token == "(":
            open_round.append(len(spans))
        elif token == "[":
            open_square.append(len(spans))
        elif explicit_weight is not None and open_round:
            multiply_from(open_round.pop(), float(explicit_weight))
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), EMPHASIS_UP)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), 1 / EMPHASIS_UP)
        else:
            spans.append((token, 1.0))
    for start in open_round:
        multiply_from(start, EMPHASIS_UP)
    for start in open_square:
        multiply_from(start, 1 / EMPHASIS_UP)

    merged: list[WeightedSpan] = []
    for text, weight in spans:
        if merged and merged[-1].weight == weight:
            merged[-1] = WeightedSpan(merged[-1].text + text, weight)
        elif text:
            merged.append(WeightedSpan(text, weight))
    return merged


def tokenize_weighted(tokenizer: CLIPTokenizer, prompt: str) -> tuple[list[int], list[float]]:
    """Token ids (no bos/eos) of the prompt with emphasis removed, and each token's weight."""
    ids: list[int] = []
    weights: list[float] = []
    for span in parse_emphasis(prompt):
        span_ids = tokenizer(span.text, add_special_tokens=False, truncation=False, verbose=False).input_ids
        ids.extend(span_ids)
        weights.extend([span.weight] * len(span_ids))
    return ids, weights


def count_tokens(tokenizer: CLIPTokenizer, prompt: str) -> TokenCount:
    """Token count of ``prompt`` (emphasis syntax removed) and the number of 75-token chunks."""
    ids, _ = tokenize_weighted(tokenizer, prompt)
    return TokenCount(tokens=len(ids), chunks=max(1, math.ceil(len(ids) / CHUNK_TOKENS)))


def chunk_prompt(tokenizer: CLIPTokenizer, prompt: str, min_chunks: int = 1) -> EncodedPrompt:
    """Cut a prompt into 77-position chunks: bos + up to 75 tokens + eos, padded with the pad token."""
    ids, weights = tokenize_weighted(tokenizer, prompt)
    n_chunks = max(min_chunks, 1, math.ceil(len(ids) / CHUNK_TOKENS))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    chunk_ids: list[list[int]] = []
    chunk_weights: list[list[float]] = []
    for chunk in range(n_chunks):
        piece = ids[chunk * CHUNK_TOKENS : (chunk + 1) * CHUNK_TOKENS]
        piece_weights = weights[chunk * CHUNK_TOKENS : (chunk + 1) * CHUNK_TOKENS]
        padding = CHUNK_TOKENS - len(piece)
        chunk_ids.append([bos, *piece, eos] + [pad] * padding)
        chunk_weights.append([1.0, *piece_weights, 1.0] + [1.0] * padding)
    return EncodedPrompt(chunk_ids, chunk_weights)


def encode_chunks(text_encoder: CLIPTextModel, encoded: EncodedPrompt) -> torch.Tensor:
    """Encode each chunk with the text encoder, apply the weights, concatenate: [1, 77 * chunks, D].

    Weighted embeddings are rescaled to keep their original mean, as A1111 does, so emphasis changes
    the balance between tokens rather than the overall magnitude (skipped when that mean is ~0).
    """
    import torch

    device = text_encoder.device
    ids = torch.tensor(encoded.input_ids, device=device)  # [chunks, 77]
    hidden = text_encoder(ids)[0]  # [chunks, 77, D]: last hidden state, as SD 1.x uses it
    weights = torch.tensor(encoded.weights, device=device, dtype=hidden.dtype)  # [chunks, 77]
    if bool((weights != 1.0).any()):
        original_mean = hidden.float().mean()
        hidden = hidden * weights.unsqueeze(-1)  # [chunks, 77, D]
        new_mean = hidden.float().mean()
        # The rescale is undefined when the mean is ~0 (possible after the final LayerNorm): skip it then.
        if original_mean.abs() > 1e-3 * hidden.float().std() and new_mean.abs() > 0:
            hidden = hidden * (original_mean / new_mean).to(hidden.dtype)
    return hidden.reshape(1, -1, hidden.shape[-1])  # [1, 77 * chunks, D]


def encode_prompt_pair(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompt: str, negative_prompt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of prompt and negative prompt with the same number of chunks: 2 x [1, 77k, D]."""
    positive = chunk_prompt(tokenizer, prompt)
    negative = chunk_prompt(tokenizer, negative_prompt, min_chunks=positive.chunks)
    if negative.chunks > positive.chunks:
        positive = chunk_prompt(tokenizer, prompt, min_chunks=negative.chunks)
    return encode_chunks(text_encoder, positive), encode_chunks(text_encoder, negative)
