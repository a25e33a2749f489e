"""Words shared by the data and the model, defined once: the phrase types the metrics slice by, and the
vocabulary of the synthetic scenes (``pipeline.scenes`` draws from it, the tiny CLIP's tokenizer covers it).

Plain data only: ``pipeline`` imports it, and the tokenizer in ``segvlm.tokenizer`` builds on it.
"""

from __future__ import annotations

# PhraseCut's phrase types (a task's ``phrase_structure["type"]``), in the order reports list them
PHRASE_TYPES: tuple[str, ...] = ("name", "attribute", "relation", "verbose")

# ------------------------------------------------------------------------------------- synthetic scenes
SCENE_SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "hexagon",
    "diamond",
    "cross",
    "ellipse",
)
SCENE_GENERIC = "shape"  # the name that matches every shape ("the red shapes", "the smallest shape")
SCENE_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "orange", "purple", "white", "pink")
SCENE_SIZES: tuple[str, ...] = ("small", "medium", "large")
SCENE_RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# superlative predicate -> its word in the phrase ("the largest circle")
SCENE_SUPERLATIVES: dict[str, str] = {"largest of": "largest", "smallest of": "smallest"}


def scene_plural(shape: str) -> str:
    return "crosses" if shape == "cross" else f"{shape}s"


SCENE_PLURALS: dict[str, str] = {k: scene_plural(k) for k in (*SCENE_SHAPES, SCENE_GENERIC)}
# every word a scene phrase can contain
SCENE_WORDS: tuple[str, ...] = tuple(
    sorted(
        {"the", "that", "is", "are", "of"}
        | {word for relation in SCENE_RELATIONS for word in relation.split()}
        | set(SCENE_PLURALS)
        | set(SCENE_PLURALS.values())
        | set(SCENE_COLOURS)
        | set(SCENE_SIZES)
        | set(SCENE_SUPERLATIVES.values())
    )
)
