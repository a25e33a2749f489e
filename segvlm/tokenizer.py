"""Word-level CLIP tokenizers for tiny from-scratch models, and a sanity check for loaded tokenizers.

``build_word_tokenizer`` makes a real ``transformers.CLIPTokenizer`` (byte-level BPE, ``</w>`` word suffix,
``<|startoftext|>`` / ``<|endoftext|>`` specials, OpenAI's vocabulary layout) whose vocabulary holds each
given word as a single token. The 512 byte-level symbols (with and without ``</w>``) stay in the vocabulary,
so words outside the list still tokenize, character by character. Because it is a plain ``CLIPTokenizer`` it
saves and loads with ``save_pretrained`` / ``from_pretrained`` like OpenAI's.

``check_tokenizer`` exists because ``CLIPTokenizer.from_pretrained`` of a model that cannot be found (e.g.
offline) may return an empty tokenizer that maps every string to one id without raising.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable

from transformers import CLIPTokenizer

from segvlm.vocabulary import SCENE_COLOURS, SCENE_SHAPES, SCENE_SIZES, SCENE_SUPERLATIVES, SCENE_WORDS

__all__ = ["DEFAULT_TINY_WORDS", "build_word_tokenizer", "check_tokenizer"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# the scenes' words first, then words of other shapes and phrasings a tiny model may meet
_SHAPES = (*SCENE_SHAPES, "pentagon", "heart")
_SHAPE_PLURALS = tuple(s + ("es" if s.endswith("s") else "s") for s in _SHAPES)
# "black" keeps its place before the scenes' last colour: the order of these words is the tiny tokenizer's
# token ids, which checkpoints of arch "tiny" rely on
_COLOURS = (*SCENE_COLOURS[:-1], "black", SCENE_COLOURS[-1], "cyan", "gray", "grey", "brown")
_SIZES = (*SCENE_SIZES, "big", "tiny", *SCENE_SUPERLATIVES.values(), "biggest", "larger", "smaller", "bigger", "huge",
          "little", "size", "sized")  # fmt: skip
_RELATIONS = ("left", "right", "above", "below", "of", "the", "a", "an", "on", "that", "is", "are", "to", "next",
              "near", "in", "photo", "image", "cropped", "good", "bad", "one", "ones", "photograph", "shape",
              "shapes", "object", "objects", "thing", "things", "and", "with", "which", "top", "bottom", "front",
              "behind", "leftmost", "rightmost", "topmost", "middle", "center", "centre", "corner", "side",
              "all", "every", "other", "only", "there", "this", "it", "its", "at", "by", "under", "over",
              "beside", "between", "closest", "nearest", "farthest", "far", "most", "highest", "lowest",
              "upper", "lower", "colored", "coloured", "color", "colour", "picture", "scene", "find", "segment",
              "show", "me", "not", "no", "both", "two", "three", "four", "five", "first", "second", "last")  # fmt: skip
_DIGITS = tuple(str(d) for d in range(10))
_PUNCTUATION = (".", ",")

DEFAULT_TINY_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        _SHAPES + _SHAPE_PLURALS + _COLOURS + _SIZES + _RELATIONS + _DIGITS + _PUNCTUATION + SCENE_WORDS
    )
)
"""Vocabulary of the synthetic-scene phrases and of CLIPSeg's prompt templates ("a photo of a {}.", ...)."""


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters (the byte-level alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges by rank (lowest first, leftmost on ties), as the tokenizers library does."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(itertools.pairwise(symbols))]
        candidates = [(r, i) for r, i in pairs if r is not None]
        if not candidates:
            break
        _, i = min(candidates)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_word_tokenizer(words: Iterable[str], *, model_max_length: int = 77) -> CLIPTokenizer:
    """Build a ``CLIPTokenizer`` holding every word in ``words`` as one token.

    The vocabulary is laid out like OpenAI CLIP's: 256 byte symbols, the same with ``</w>``, merged tokens
    in merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` last (``eos`` = ``pad`` = ``len - 1``).
    Merges are generated so that each word composes from its characters under real BPE rank order, and
    the result is verified against the tokenizer itself.

    Raises:
        ValueError: a word that CLIP's pre-tokenizer would split into several pieces (e.g. "red circle").
    """
    byte_chars = list(_bytes_to_unicode().values())
    base = byte_chars + [c + END_OF_WORD for c in byte_chars]
    probe = CLIPTokenizer(
        vocab={**{t: i for i, t in enumerate(base)}, BOS_TOKEN: len(base), EOS_TOKEN: len(base) + 1}
    )
    backend = probe.backend_tokenizer

    ranks: dict[tuple[str, str], int] = {}
    merged: list[str] = []
    for word in dict.fromkeys(words):
        pieces = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(word))
        if len(pieces) != 1:
            raise ValueError(f"word {word!r} is not a single CLIP pre-token (got {[p for p, _ in pieces]})")
        chars = list(pieces[0][0])
        chars[-1] += END_OF_WORD
        # Earlier merges may already fire inside this word; keep merging whatever pieces BPE leaves, left to
        # right. New merges rank last, so they never change the tokenization of words already finished.
        while len(symbols := _bpe(chars, ranks)) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(ranks)
            merged.append(pair[0] + pair[1])

    vocab = {token: i for i, token in enumerate(dict.fromkeys(base + merged))}
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    merges = sorted(ranks, key=ranks.__getitem__)  # list of (left, right) pairs, by rank
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)

    for word in dict.fromkeys(words):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:  # would be a bug in _bpe's emulation of the tokenizers library
            raise RuntimeError(f"word {word!r} tokenizes to {len(ids)} tokens, expected 1")
    return tokenizer


def check_tokenizer(tokenizer: object, source: str) -> None:
    """Fail loudly when ``tokenizer`` (loaded from ``source``) is empty or broken.

    Checks: at least 50 entries; ``decode(encode("a red circle"))`` gives the words back; distinct words get
    distinct ids that are not the unknown token.

    Raises:
        ValueError: naming ``source`` and what is wrong.
    """
    hint = (
        "an empty tokenizer is what transformers returns for a model it cannot find (offline, HF_HUB_OFFLINE=1, "
        "or a wrong path); pass a local folder holding the model's tokenizer files"
    )
    if tokenizer is None:
        raise ValueError(f"{source}: no tokenizer loaded; {hint}")
    try:
        size = len(tokenizer)  # type: ignore[arg-type]
    except TypeError as err:
        raise ValueError(f"{source}: {type(tokenizer).__name__} is not a tokenizer") from err
    if size < 50:
        raise ValueError(f"{source}: tokenizer has only {size} entries; {hint}")

    text = "a red circle"
    ids = tokenizer(text)["input_ids"]  # type: ignore[operator]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]
    if " ".join(decoded.split()) != text:
        raise ValueError(f"{source}: tokenizer round trip of {text!r} gave {decoded!r}; {hint}")

    unk = getattr(tokenizer, "unk_token_id", None)
    word_ids = [tuple(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in text.split()]  # type: ignore[operator]
    if len(set(word_ids)) != len(word_ids) or any(not w or (len(w) == 1 and w[0] == unk) for w in word_ids):
        raise ValueError(f"{source}: tokenizer maps distinct words {text.split()} to {word_ids}; {hint}")
