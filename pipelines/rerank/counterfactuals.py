"""Close counterfactual captions made from a prompt, for scoring that is not a bag of words.

CLIP ranks "a red cube and a blue ball" and "a blue cube and a red ball" about the same: it reads
words, not who has which colour, and it does not count (Yuksekgonul et al. 2023, "When and why
vision-language models behave like bags-of-words"; Thrush et al. 2022, Winoground). Asking CLIP
whether an image fits the prompt *better than* captions that differ only in binding or count turns
those weaknesses into the question itself. From ordinary English prompts this makes:

- colour swaps: two colour words exchange places ("a blue cube and a red ball");
- count changes: "a"/"an"/"one" + noun -> "two"/"several" + plural, and a number -> "a" + singular
  ("two red cubes and a blue ball", "a red cube and several blue balls");
- attribute replacements: one colour word replaced by a colour the prompt does not use
  ("a green cube and a blue ball").

Scene nouns (background, sky, ...) keep their count. Plurals come from ``inflect``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass

COLOUR_WORDS = (
    "red", "green", "blue", "yellow", "purple", "white", "black", "orange", "pink", "brown", "gray", "grey",
    "cyan", "magenta", "violet", "gold", "silver", "teal", "beige",
)
# Replacements are taken in this order, skipping colours the prompt already uses.
REPLACEMENT_COLOURS = ("red", "green", "blue", "yellow", "purple", "white", "black", "orange")
SINGULAR_COUNTS = ("a", "an", "one", "single")
NUMBER_WORDS = ("two", "three", "four", "five", "several", "many")
SCENE_NOUNS = frozenset({"background", "sky", "ground", "wall", "floor", "scene", "picture", "photo", "image",
                         "backdrop", "field", "table", "room"})
ADJECTIVES = frozenset({*COLOUR_WORDS, "big", "small", "large", "tiny", "little", "huge", "bright", "dark",
                        "light", "shiny", "round", "square", "wooden", "metal", "glass", "old", "new"})
_WORD = re.compile(r"[A-Za-z]+")
# CLIP reads the first 77 tokens and a word is at least one: later words never reach the scorer. Reading only
# these keeps the colour pairs (quadratic in the colours) bounded for any prompt.
MAX_WORDS = 77


@dataclass(frozen=True)
class Counterfactual:
    """A caption close to the prompt and what was changed to make it."""

    text: str
    kind: str  # "colour swap", "count", "attribute"


@dataclass(frozen=True)
class _Word:
    text: str
    start: int
    end: int

    @property
    def lower(self) -> str:
        return self.text.lower()


def _replace(prompt: str, changes: dict[int, str], words: list[_Word]) -> str:
    """The prompt with word ``i`` replaced by ``changes[i]`` (capitalisation of the first letter kept)."""
    out, last = [], 0
    for index in sorted(changes):
        word = words[index]
        new = changes[index]
        if word.text[:1].isupper():
            new = new[:1].upper() + new[1:]
        out += [prompt[last : word.start], new]
        last = word.end
    return "".join(out + [prompt[last:]])


def _noun_after(words: list[_Word], index: int) -> int | None:
    """Index of the head noun of the phrase starting after word ``index`` (adjectives skipped)."""
    j = index + 1
    while j < len(words) and words[j].lower in ADJECTIVES:
        j += 1
    return j if j < len(words) and words[j].lower not in ADJECTIVES else None


def counterfactual_captions(prompt: str, max_captions: int = 12) -> list[Counterfactual]:
    """Captions that differ from ``prompt`` in colour binding, count or one attribute (module docstring)."""
    import inflect

    grammar = inflect.engine()
    words = [_Word(m.group(), m.start(), m.end()) for m in itertools.islice(_WORD.finditer(prompt), MAX_WORDS)]
    colours = [i for i, w in enumerate(words) if w.lower in COLOUR_WORDS]
    def changes() -> Iterator[tuple[dict[int, str], str]]:
        for a_pos, a in enumerate(colours):  # who has which colour
            for b in colours[a_pos + 1 :]:
                if words[a].lower != words[b].lower:
                    yield {a: words[b].text.lower(), b: words[a].text.lower()}, "colour swap"
        for i, word in enumerate(words):  # how many
            noun = _noun_after(words, i)
            if noun is None or words[noun].lower in SCENE_NOUNS:
                continue
            if word.lower in SINGULAR_COUNTS:
                plural = grammar.plural_noun(words[noun].text)
                for number in ("two", "several"):
                    yield {i: number, noun: plural}, "count"
            elif word.lower in NUMBER_WORDS:
                singular = grammar.singular_noun(words[noun].text) or words[noun].text
                yield {i: grammar.a(singular).split()[0], noun: singular}, "count"
        used = {words[i].lower for i in colours}
        spare = [c for c in REPLACEMENT_COLOURS if c not in used]
        for i in colours:  # which colour
            for colour in spare[:2]:
                yield {i: colour}, "attribute"

    made: list[Counterfactual] = []
    seen = {prompt.lower()}
    for change, kind in changes():  # in that order, until there are enough
        if len(made) >= max_captions:
            break
        text = _replace(prompt, change, words)
        if text.lower() not in seen:
            seen.add(text.lower())
            made.append(Counterfactual(text, kind))
    return made
