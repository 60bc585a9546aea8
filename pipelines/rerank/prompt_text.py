"""The text a scorer reads for a prompt: THE one every scoring path uses (generation, rerank, score).

Generation reads A1111 prompt syntax; CLIP and the other scorers read plain text. So before scoring, the
prompt loses its extra-network tags (``<lora:name:0.8>``, :func:`strip_network_tags`) and its emphasis
syntax (``(word:1.5)``, ``(word)``, ``[word]`` become ``word``; ``\\(`` a literal bracket:
:func:`parse_emphasis`, A1111 wiki "Attention/emphasis"); runs of whitespace become one space, as CLIP's
tokenizer reads them anyway. An embedding's name stays a word (the scorer does not know the embedding).
Cutting to the scorer's 77 token positions is the scorer's (``ScoreResult.truncated``).
"""

from __future__ import annotations

from pipelines.generation.extra_networks import strip_network_tags
from pipelines.generation.prompts import parse_emphasis


def scoring_prompt(prompt: str) -> str:
    """What a scorer reads of ``prompt``: no ``<lora:...>`` tags, no emphasis syntax, single spaces."""
    text = "".join(span.text for span in parse_emphasis(strip_network_tags(prompt)))
    return " ".join(text.split())


def scoring_note(prompt: str) -> str | None:
    """``scored against: <text>`` when the scorer reads something else than ``prompt`` (its syntax was
    removed), else None: for showing beside the scores."""
    text = scoring_prompt(prompt)
    return None if text == " ".join(prompt.split()) else f"scored against: {text!r}"
