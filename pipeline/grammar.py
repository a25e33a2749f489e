"""The phrase grammar, defined once: PhraseCut's phrase layout (attributes around a name, then "predicate
object" relations), the phrase types, singular forms, the words of a phrase's subject, and left/right
mirroring. The prompt generator (``pipeline.prompts``), the synthetic scenes (``pipeline.scenes``), the
training loader (``pipeline.loader``) and its augmentation (``pipeline.augment``) all use these.

A ``phrase_structure`` is PhraseCut's: ``{"name": str, "attributes": [str], "relation_descriptions":
[[predicate, object]], "type": one of PHRASE_TYPES}``; the accessors below drop malformed parts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from segvlm.vocabulary import PHRASE_TYPES

__all__ = [
    "ARTICLES",
    "PHRASE_TYPES",
    "compose_phrase",
    "is_plural",
    "mirror_phrase",
    "phrase_type",
    "postposed",
    "singular",
    "split_noun",
    "strip_article",
    "structure_attributes",
    "structure_name",
    "structure_relations",
    "target_words",
    "tokens",
]

ARTICLES = frozenset({"a", "an", "the"})
_IRREGULAR_PLURALS = {
    "men": "man", "women": "woman", "people": "person", "children": "child", "feet": "foot", "teeth": "tooth",
    "mice": "mouse", "geese": "goose", "leaves": "leaf", "knives": "knife", "shelves": "shelf",
    "wolves": "wolf", "halves": "half", "loaves": "loaf", "scarves": "scarf", "lives": "life",
}  # fmt: skip
# words ending in "s" that are not plurals
_NOT_PLURAL = frozenset(
    {"glass", "grass", "bus", "gas", "dress", "cross", "lens", "series", "species", "news"}
)
# words PhraseCut puts after the name when an attribute starts with them (its att_name_phrase)
_POSTPOSED_ATT_STARTS = frozenset(
    {"in", "on", "for", "of", "with", "made", "to", "not", "turned", "off", "from"}
)
_ING_NOT_VERBS = frozenset(
    {"living", "king", "ping", "ceiling", "building", "painting", "clothing", "string"}
)

# ---------------------------------------------------------------------------------------------- words


def singular(word: str) -> str:
    """A simple singular of one lowercase word ("cups" -> "cup", "boxes" -> "box", "men" -> "man").

    Not a lemmatiser: it only has to map both sides of a comparison to the same form.
    """
    word = word.lower()
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word in _NOT_PLURAL or len(word) <= 3 or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses", "zes")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def tokens(text: str) -> list[str]:
    """Lowercase words of a phrase, without trailing punctuation."""
    return [w for w in (t.strip(".,;:!?\"'") for t in text.lower().split()) if w]


def strip_article(phrase: str) -> str:
    """``phrase`` without surrounding whitespace, a final period and a leading "the"/"a"/"an"."""
    words = phrase.strip().rstrip(".").split()
    if len(words) > 1 and words[0].lower() in ARTICLES:
        words = words[1:]
    return " ".join(words)


def is_plural(name: str) -> bool:
    words = tokens(name)
    return bool(words) and singular(words[-1]) != words[-1]


# ------------------------------------------------------------------------------------------- structure


def structure_relations(ps: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """``relation_descriptions`` as (predicate, object) pairs; malformed entries are dropped."""
    out = []
    for rd in (ps or {}).get("relation_descriptions") or []:
        if (
            isinstance(rd, list | tuple)
            and len(rd) == 2
            and all(isinstance(x, str) and x.strip() for x in rd)
        ):
            out.append((rd[0].strip(), rd[1].strip()))
    return out


def structure_attributes(ps: Mapping[str, Any] | None) -> list[str]:
    return [a.strip() for a in (ps or {}).get("attributes") or [] if isinstance(a, str) and a.strip()]


def structure_name(ps: Mapping[str, Any] | None) -> str:
    name = (ps or {}).get("name")
    return name.strip() if isinstance(name, str) else ""


def postposed(att: str) -> bool:
    """Whether PhraseCut writes ``att`` after the name ("cup in water", "man wearing hat"; its att_name_phrase)."""
    words = att.split()
    return len(words) > 1 and (
        words[0] in _POSTPOSED_ATT_STARTS or (words[0].endswith("ing") and words[0] not in _ING_NOT_VERBS)
    )


def compose_phrase(name: str, attributes: Sequence[str], relations: Sequence[tuple[str, str]]) -> str:
    """A phrase the way PhraseCut writes one: attributes around the name, then "predicate object" pairs.

    Attributes keep the given order ("small red circle"); postposed ones follow the name.
    """
    before = [a for a in attributes if not postposed(a)]
    after = [a for a in attributes if postposed(a)]
    return " ".join([*before, name, *after, *(f"{pred} {obj}" for pred, obj in relations)])


def phrase_type(attributes: Sequence[str], relations: Sequence[Any]) -> str:
    """The PhraseCut type a phrase of this shape would get."""
    if attributes and relations:
        return "verbose"
    return "attribute" if attributes else "relation" if relations else "name"


def target_words(structure: Mapping[str, Any] | None) -> str:
    """``"red triangle"``: the attributes and name of a phrase's subject, the name's last word in the
    singular ("the red triangles" and "the red triangle" name their targets alike)."""
    if not structure:
        return ""
    name = str(structure.get("name") or "").lower().split()
    if name:
        name[-1] = singular(name[-1])
    attributes = [" ".join(str(a).lower().split()) for a in structure.get("attributes") or []]
    return " ".join([*(a for a in attributes if a), *name])


def split_noun(text: str) -> tuple[list[str], str, str, bool] | None:
    """``"small red circles"`` -> (["small", "red"], "circles", "circle", True): the words before the head,
    the head as written, its singular, and whether it is plural; None for no words."""
    words = text.split()
    if not words:
        return None
    *attributes, head = words
    name = singular(head)
    return attributes, head, name, name != head.lower()


_LEFT_RIGHT = re.compile(r"\b(left|right)(?=(?:most|hand|side|ward|wards)?\b)", re.IGNORECASE)


def mirror_phrase(phrase: str) -> str:
    """The phrase that refers to the same region of the horizontally flipped image: ``left`` and ``right``
    trade places, alone or in leftmost / left-hand / lefthand / leftside / leftward(s) ("the cup left of the
    bowl" → "the cup right of the bowl"), in the case they were written in ("Left" → "Right", "LEFT" →
    "RIGHT"); other words that merely start with them ("leftover", "rights") stay."""

    def swap(match: re.Match[str]) -> str:
        word = match.group(1)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    return _LEFT_RIGHT.sub(swap, phrase)
