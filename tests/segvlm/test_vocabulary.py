"""One vocabulary: the scenes draw their words from it, the tiny tokenizer covers it, one list of phrase types."""

from __future__ import annotations

from pipeline import scenes, schema
from segvlm import metrics, vocabulary
from segvlm.tokenizer import DEFAULT_TINY_WORDS


def test_every_scene_phrase_word_is_in_the_scene_vocabulary_and_the_tiny_tokenizer() -> None:
    words = set()
    for image_id in range(1, 30):
        for task in scenes.make_scene(7, image_id, 96).tasks:
            words |= set(task["phrase"].split())
    assert words <= set(vocabulary.SCENE_WORDS), words - set(vocabulary.SCENE_WORDS)
    assert set(vocabulary.SCENE_WORDS) <= set(DEFAULT_TINY_WORDS)
    assert len(DEFAULT_TINY_WORDS) == len(set(DEFAULT_TINY_WORDS))  # token ids stay unique


def test_scene_colours_and_sizes_are_the_vocabularys_in_order() -> None:
    assert tuple(scenes.COLOURS) == vocabulary.SCENE_COLOURS and tuple(scenes.SIZES) == vocabulary.SCENE_SIZES
    assert scenes.COLOURS["pink"] == (255, 130, 200) and scenes.SIZES["large"] == 0.165
    assert vocabulary.SCENE_PLURALS["cross"] == "crosses" and vocabulary.SCENE_PLURALS["shape"] == "shapes"
    assert scenes.SINGULARS["crosses"] == "cross"


def test_one_list_of_phrase_types() -> None:
    assert schema.PHRASE_TYPES is vocabulary.PHRASE_TYPES is metrics.PHRASE_TYPES
    assert vocabulary.PHRASE_TYPES == ("name", "attribute", "relation", "verbose")
