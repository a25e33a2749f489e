"""The phrase grammar (pipeline/grammar.py): singulars, PhraseCut's phrase layout and types, the words of a
phrase's subject, and left/right mirroring."""

from __future__ import annotations

from pipeline import grammar
from pipeline.grammar import mirror_phrase


def test_singular_and_strip_article():
    assert [grammar.singular(w) for w in ["cups", "boxes", "berries", "men", "glass", "bus", "leaves", "dress"]] == [
        "cup", "box", "berry", "man", "glass", "bus", "leaf", "dress"]  # fmt: skip
    assert [grammar.singular(w) for w in ["crosses", "ellipses", "circles", "shapes", "cross"]] == [
        "cross", "ellipse", "circle", "shape", "cross"]  # fmt: skip
    assert grammar.strip_article("a red cup.") == "red cup"
    assert grammar.strip_article("the") == "the"


def test_compose_phrase_puts_postposed_attributes_after_the_name_and_types_the_phrase():
    assert (
        grammar.compose_phrase("cup", ["red", "in water"], [("on", "table")]) == "red cup in water on table"
    )
    assert grammar.compose_phrase("man", ["wearing hat"], []) == "man wearing hat"
    assert grammar.compose_phrase("ceiling", ["building light"], []) == "building light ceiling"
    assert grammar.phrase_type([], []) == "name"
    assert grammar.phrase_type(["red"], []) == "attribute"
    assert grammar.phrase_type([], [("on", "table")]) == "relation"
    assert grammar.phrase_type(["red"], [("on", "table")]) == "verbose"
    assert set(grammar.PHRASE_TYPES) == {"name", "attribute", "relation", "verbose"}


def test_structure_accessors_drop_malformed_parts():
    ps = {
        "name": " cup ",
        "attributes": ["red", "", 3, " hot "],
        "relation_descriptions": [["on", "table"], ["x"], [1, 2]],
    }
    assert grammar.structure_name(ps) == "cup" and grammar.structure_name({"name": 5}) == ""
    assert grammar.structure_attributes(ps) == ["red", "hot"]
    assert grammar.structure_relations(ps) == [("on", "table")]
    assert grammar.structure_relations(None) == [] and grammar.structure_attributes(None) == []


def test_target_words_name_the_subject_in_the_singular():
    assert grammar.target_words({"name": "crosses", "attributes": ["small", "Red"]}) == "small red cross"
    assert (
        grammar.target_words({"name": "baseball caps", "relation_descriptions": [["on", "man"]]})
        == "baseball cap"
    )
    assert grammar.target_words({"name": "glass", "attributes": ["empty"]}) == "empty glass"
    assert grammar.target_words(None) == "" and grammar.target_words({}) == ""


def test_split_noun():
    assert grammar.split_noun("small red circles") == (["small", "red"], "circles", "circle", True)
    assert grammar.split_noun("cross") == ([], "cross", "cross", False)
    assert grammar.split_noun("  ") is None


def test_mirror_phrase_swaps_left_and_right_words_only() -> None:
    assert mirror_phrase("the cup left of the bowl") == "the cup right of the bowl"
    assert mirror_phrase("Right of the TV, LEFT of the door") == "Left of the TV, RIGHT of the door"
    assert mirror_phrase("the leftmost chair") == "the rightmost chair"
    assert mirror_phrase("a left-hand glove, rightward") == "a right-hand glove, leftward"
    assert mirror_phrase("the leftover cake and the rights") == "the leftover cake and the rights"
    assert mirror_phrase("a bright light on the upright pole") == "a bright light on the upright pole"
    assert mirror_phrase("the circle above the square") == "the circle above the square"
    for phrase in ("left of the red one and right of it", "Leftmost", "RIGHT-HAND"):
        assert mirror_phrase(mirror_phrase(phrase)) == phrase
