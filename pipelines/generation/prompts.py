"""Prompt parsing and encoding the AUTOMATIC1111 way: emphasis weights and 75-token chunks.

Emphasis syntax (A1111 wiki, "Attention/emphasis"): ``(word)`` multiplies the attention to ``word``
by 1.1, ``[word]`` divides it by 1.1, ``(word:1.3)`` sets it to 1.3; brackets nest and multiply;
``\\(`` and ``\\)`` are literal brackets. Prompts longer than 75 tokens are not truncated: they are
cut into chunks of 75 tokens, each wrapped in bos/eos and padded to 77, encoded separately and
concatenated along the sequence axis, so the U-Net cross-attends to all of them.

Extra-network tags (``<lora:name:1>``) are removed before tokenizing (``extra_networks``). Textual
inversion (A1111): an embedding's name in the prompt (matched on its tokens, so case does not matter)
stands for its n vectors, which take n positions, carry the emphasis of their span, and are never cut
across two chunks (a chunk is closed early instead, as A1111 does). Clip skip N (A1111's
``CLIP_stop_at_last_layers``) takes the hidden state N layers from the end and applies the encoder's
final layer norm to it, as A1111 does; 1 is the last layer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipelines.generation.extra_networks import TextualInversion, strip_network_tags

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
    """Token ids and per-token weights, already cut into chunks of 77 (bos + 75 + eos/padding), and the
    embedding vectors that replace some positions' token embeddings."""

    input_ids: list[list[int]]  # chunks x 77
    weights: list[list[float]]  # chunks x 77
    vectors: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # (chunk, position, [D])
    embeddings_used: tuple[str, ...] = ()

    @property
    def chunks(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt's tokens (no bos/eos): ids, weights, and per position the embedding vector replacing it
    (None for plain tokens); ``groups`` are the (start, length) runs of one embedding's vectors."""

    ids: list[int]
    weights: list[float]
    vectors: list[torch.Tensor | None]
    groups: list[tuple[int, int]]
    embeddings_used: tuple[str, ...] = ()


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
    """Token ids (no bos/eos) of the prompt with emphasis and extra-network tags removed, and each token's weight."""
    tokens = tokenize_prompt(tokenizer, prompt)
    return tokens.ids, tokens.weights


def _embedding_lookup(
    tokenizer: CLIPTokenizer, embeddings: Mapping[str, TextualInversion]
) -> dict[int, list[tuple[list[int], TextualInversion]]]:
    """First token id -> (name's token ids, embedding), longest names first (A1111's ``ids_lookup``)."""
    lookup: dict[int, list[tuple[list[int], TextualInversion]]] = {}
    for name, embedding in embeddings.items():
        ids = tokenizer(name, add_special_tokens=False, truncation=False, verbose=False).input_ids
        if ids:
            lookup.setdefault(ids[0], []).append((ids, embedding))
    for candidates in lookup.values():
        candidates.sort(key=lambda item: len(item[0]), reverse=True)
    return lookup


def tokenize_prompt(
    tokenizer: CLIPTokenizer, prompt: str, embeddings: Mapping[str, TextualInversion] | None = None
) -> TokenizedPrompt:
    """Tokens of ``prompt`` with emphasis weights; an embedding's name becomes its n vectors."""
    lookup = _embedding_lookup(tokenizer, embeddings) if embeddings else {}
    ids: list[int] = []
    weights: list[float] = []
    vectors: list[torch.Tensor | None] = []
    groups: list[tuple[int, int]] = []
    used: list[str] = []
    for span in parse_emphasis(strip_network_tags(prompt)):
        span_ids = tokenizer(span.text, add_special_tokens=False, truncation=False, verbose=False).input_ids
        index = 0
        while index < len(span_ids):
            match = next(
                (
                    (name_ids, embedding)
                    for name_ids, embedding in lookup.get(span_ids[index], [])
                    if span_ids[index : index + len(name_ids)] == name_ids
                ),
                None,
            )
            if match is None:
                ids.append(span_ids[index])
                weights.append(span.weight)
                vectors.append(None)
                index += 1
                continue
            name_ids, embedding = match
            n = embedding.vectors.shape[0]
            groups.append((len(ids), n))
            ids.extend([name_ids[0]] * n)  # placeholders: their token embeddings are replaced
            weights.extend([span.weight] * n)
            vectors.extend(embedding.vectors)  # n x [D]
            if embedding.name not in used:
                used.append(embedding.name)
            index += len(name_ids)
    return TokenizedPrompt(ids, weights, vectors, groups, tuple(used))


def count_tokens(tokenizer: CLIPTokenizer, prompt: str) -> TokenCount:
    """Token count of ``prompt`` (emphasis syntax and extra-network tags removed) and the number of 75-token chunks."""
    ids, _ = tokenize_weighted(tokenizer, prompt)
    return TokenCount(tokens=len(ids), chunks=max(1, math.ceil(len(ids) / CHUNK_TOKENS)))


def _chunk_spans(tokens: TokenizedPrompt) -> list[tuple[int, int]]:
    """(start, end) of each chunk's tokens: 75 at most, and an embedding's vectors never split (if it fits)."""
    group_at = {start: length for start, length in tokens.groups if length <= CHUNK_TOKENS}
    spans: list[tuple[int, int]] = []
    begin = index = 0
    while index < len(tokens.ids):
        length = group_at.get(index, 1)  # a token, or an embedding's vectors as one unit
        if index + length - begin > CHUNK_TOKENS:
            spans.append((begin, index))  # the chunk is full, or closed early so the embedding goes whole
            begin = index
        index += length
    spans.append((begin, len(tokens.ids)))
    return spans


def chunk_prompt(
    tokenizer: CLIPTokenizer,
    prompt: str,
    min_chunks: int = 1,
    embeddings: Mapping[str, TextualInversion] | None = None,
) -> EncodedPrompt:
    """Cut a prompt into 77-position chunks: bos + up to 75 tokens + eos, padded with the pad token."""
    tokens = tokenize_prompt(tokenizer, prompt, embeddings)
    spans = _chunk_spans(tokens)
    spans += [(len(tokens.ids), len(tokens.ids))] * (min_chunks - len(spans))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    chunk_ids: list[list[int]] = []
    chunk_weights: list[list[float]] = []
    vectors: list[tuple[int, int, torch.Tensor]] = []
    for chunk, (start, end) in enumerate(spans):
        piece, piece_weights = tokens.ids[start:end], tokens.weights[start:end]
        padding = CHUNK_TOKENS - len(piece)
        chunk_ids.append([bos, *piece, eos] + [pad] * padding)
        chunk_weights.append([1.0, *piece_weights, 1.0] + [1.0] * padding)
        vectors += [(chunk, 1 + i, v) for i, v in enumerate(tokens.vectors[start:end]) if v is not None]
    return EncodedPrompt(chunk_ids, chunk_weights, vectors, tokens.embeddings_used)


def encode_chunks(text_encoder: CLIPTextModel, encoded: EncodedPrompt, clip_skip: int = 1) -> torch.Tensor:
    """Encode each chunk with the text encoder, apply the weights, concatenate: [1, 77 * chunks, D].

    Weighted embeddings are rescaled to keep their original mean, as A1111 does, so emphasis changes
    the balance between tokens rather than the overall magnitude (skipped when that mean is ~0).
    Embedding vectors replace their positions' token embeddings (before the position embeddings are
    added); ``clip_skip`` > 1 reads an earlier layer (see the module docstring).
    """
    import torch

    device = text_encoder.device
    ids = torch.tensor(encoded.input_ids, device=device)  # [chunks, 77]
    hidden = _encode(text_encoder, ids, encoded.vectors, clip_skip)  # [chunks, 77, D]
    weights = torch.tensor(encoded.weights, device=device, dtype=hidden.dtype)  # [chunks, 77]
    if bool((weights != 1.0).any()):
        original_mean = hidden.float().mean()
        hidden = hidden * weights.unsqueeze(-1)  # [chunks, 77, D]
        new_mean = hidden.float().mean()
        # The rescale is undefined when the mean is ~0 (possible after the final LayerNorm): skip it then.
        if original_mean.abs() > 1e-3 * hidden.float().std() and new_mean.abs() > 0:
            hidden = hidden * (original_mean / new_mean).to(hidden.dtype)
    return hidden.reshape(1, -1, hidden.shape[-1])  # [1, 77 * chunks, D]


def check_clip_skip(clip_skip: object, layers: int, argument: str = "clip_skip") -> None:
    """ValueError naming ``argument`` unless ``clip_skip`` is an integer from 1 to ``layers``, the text encoder's
    layer count (A1111's "Clip skip" N encodes with the N-th layer from the end)."""
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= layers:
        raise ValueError(f"{argument} must be between 1 and {layers} (this model's text encoder has {layers} "
                         f"layers), got {clip_skip!r}")


def _encode(
    text_encoder: CLIPTextModel, ids: torch.Tensor, vectors: list[tuple[int, int, torch.Tensor]], clip_skip: int
) -> torch.Tensor:
    """Hidden states [chunks, 77, D] with embedding vectors in place and clip skip applied."""
    check_clip_skip(clip_skip, text_encoder.config.num_hidden_layers)
    token_embedding = text_encoder.get_input_embeddings()

    def put_vectors(_module: object, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()  # [chunks, 77, D]
        for chunk, position, vector in vectors:
            output[chunk, position] = vector.to(output.device, output.dtype)
        return output

    hook = token_embedding.register_forward_hook(put_vectors) if vectors else None
    try:
        if clip_skip == 1:
            return text_encoder(ids)[0]  # last hidden state, as SD 1.x uses it
        states = text_encoder(ids, output_hidden_states=True).hidden_states  # layers + 1 x [chunks, 77, D]
        final_norm = getattr(text_encoder, "final_layer_norm", None) or text_encoder.text_model.final_layer_norm
        return final_norm(states[-clip_skip])
    finally:
        if hook is not None:
            hook.remove()


def encode_prompt_pair(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    prompt: str,
    negative_prompt: str,
    embeddings: Mapping[str, TextualInversion] | None = None,
    clip_skip: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of prompt and negative prompt with the same number of chunks: 2 x [1, 77k, D]."""
    positive = chunk_prompt(tokenizer, prompt, embeddings=embeddings)
    negative = chunk_prompt(tokenizer, negative_prompt, min_chunks=positive.chunks, embeddings=embeddings)
    if negative.chunks > positive.chunks:
        positive = chunk_prompt(tokenizer, prompt, min_chunks=negative.chunks, embeddings=embeddings)
    return encode_chunks(text_encoder, positive, clip_skip), encode_chunks(text_encoder, negative, clip_skip)
