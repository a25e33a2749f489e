"""Synthetic prompts: more phrases per image that still refer to exactly the same mask.

From every ``original`` task of an :class:`~pipeline.schema.ImageRecord` the generator derives

``template``
    the phrase in one of CLIPSeg's nine prompt templates ("a photo of a red cup.");
``recomposed``
    a shorter phrase rebuilt from ``phrase_structure`` (attribute subsets, name + relation);
``relation_rewrite``
    "cup on table" -> "the cup that is on the table";
``negative``
    a phrase from another image that names nothing in this one; its target is the empty mask.

The generator only knows an image through its tasks, so every rule errs towards generating nothing.

Guard rules (why they are safe)
-------------------------------
Recomposition (a reduced phrase with name ``N``, attributes ``A' ⊆ A``, relations ``R' ⊆ R``) matches every
object called ``N`` that carries ``A'`` and ``R'``: more objects than the original phrase. It is generated only if

1. the task's ``phrase_structure.type`` is ``"name"``. PhraseCut's generator (``gen_phrase`` in the PhraseCut
   repository) writes type ``name`` only when no other object of the image's *Visual Genome scene graph* has
   the same category; attributes or a relation of a ``name`` phrase are decoration. Types ``attribute``,
   ``relation`` and ``verbose`` mean same-category objects exist, possibly objects no task mentions, so
   dropping any part of those phrases could widen the target and is never done;
2. no other task of the image has a *conflicting name* and a *different target* (a different set of
   instance polygons). Names conflict when their normalised forms (lowercase, no article, each word
   singularised) are equal, when their head (last) words are equal ("cup" / "coffee cup"), or when the heads
   belong to one synonym group ("man" / "person"). A conflicting task with a different target means a second
   object the reduced phrase could match; tasks with the same target are harmless (same mask);
3. ``phrase_structure`` agrees with the phrase: the name and every attribute occur as words of the phrase,
   else the structure is not trusted;
4. the reduced phrase differs from every phrase already on the image.

Rule 2 alone only sees objects some task mentions; rule 1 covers the others for data whose types mean what
PhraseCut's mean (the synthetic scenes write the PhraseCut format). A structure without a type is not reduced.

Negatives: a pool phrase is used on an image only if none of the content words of its name (singularised)
is a word of any phrase, name or relation object of this image, none shares a synonym group with one, and
it is not a generic word ("object", "thing", ...) that names something in every image. Comparing against all
words of all phrases is deliberately broad: "cup" is refused when "coffee cup" or "cup holder" is there.
Known limit: synonyms outside the small built-in groups ("sofa" / "couch") are not caught.

Templates: "a photo of one {}." is left out for multi-instance targets (it would claim a single object).
Relation rewrites only restate the phrase: they are produced only when the relation descriptions are, in
order, exactly the end of the phrase and the rest of the phrase contains the name.

Rates are the expected number of prompts of a kind per original task: ``floor(r)`` plus one more with
probability ``r - floor(r)``, capped at the number of distinct candidates. So ``negative=0.2`` is CLIPSeg's
"replace the phrase with probability 0.2", as an extra task (expected ``0.2 × originals`` per image).
All randomness comes from the ``rng`` argument: same seed, same record.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from pipeline.grammar import (
    ARTICLES,
    compose_phrase,
    is_plural,
    phrase_type,
    singular,
    strip_article,
    structure_attributes,
    structure_name,
    structure_relations,
    tokens,
)
from pipeline.schema import ImageRecord, Task

CLIPSEG_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photograph of a {}.",
    "an image of a {}.",
    "{}.",
    "a cropped photo of a {}.",
    "a good photo of a {}.",
    "a photo of one {}.",
    "a bad photo of a {}.",
    "a photo of the {}.",
)
_SINGLE_INSTANCE_TEMPLATES = frozenset({"a photo of one {}."})

GENERATED_KINDS: tuple[str, ...] = ("template", "recomposed", "relation_rewrite", "negative")
DEFAULT_RATES: dict[str, float] = {
    "template": 1.0,
    "recomposed": 0.5,
    "relation_rewrite": 1.0,
    "negative": 0.2,
}

# function words never decide whether a negative's name names something in the image
_STOPWORDS = ARTICLES | frozenset(
    {
        "of",
        "on",
        "in",
        "at",
        "to",
        "for",
        "with",
        "and",
        "or",
        "by",
        "from",
        "near",
        "off",
        "is",
        "are",
        "that",
    }
)
# words that name something in (nearly) every image: never a negative
_GENERIC = frozenset(
    {
        "object",
        "thing",
        "item",
        "stuff",
        "part",
        "piece",
        "area",
        "region",
        "shape",
        "background",
        "side",
        "surface",
        "edge",
        "front",
        "back",
        "top",
        "bottom",
        "scene",
        "picture",
        "photo",
        "image",
        "spot",
    }
)
# heads in one group may name the same object ("man" and "person"): the guards treat them as one name
_SYNONYM_GROUPS: tuple[frozenset[str], ...] = (
    frozenset(
        {
            "person",
            "man",
            "woman",
            "boy",
            "girl",
            "child",
            "kid",
            "guy",
            "lady",
            "gentleman",
            "player",
            "skier",
            "surfer",
            "skateboarder",
            "snowboarder",
            "rider",
            "batter",
            "catcher",
            "pitcher",
            "umpire",
            "baby",
            "adult",
            "teenager",
            "crowd",
            "tourist",
            "spectator",
            "worker",
            "people",
            "human",
            "pedestrian",
        }
    ),
)
# predicates that already carry a verb: "that has the hat", not "that is has the hat"
_VERB_PREDICATES = frozenset(
    {
        "has",
        "have",
        "holds",
        "wears",
        "eats",
        "carries",
        "covers",
        "contains",
        "rides",
        "owns",
        "hold",
        "wear",
        "carry",
        "cover",
        "contain",
        "ride",
        "are",
        "is",
        "was",
        "were",
    }
)
_NEGATIVE_TRIES = 32  # pool draws per wanted negative before giving up on it
_MAX_ATTRIBUTES = 4  # recomposition enumerates subsets: keep 2**(A+R) small
_MAX_RELATIONS = 3


# ---------------------------------------------------------------------------------------------- words


def normalise_name(name: str) -> str:
    """Lowercase, no article, every word singular: "The Cups" -> "cup"."""
    return " ".join(singular(w) for w in tokens(strip_article(name)))


def _group_of(word: str) -> int | None:
    for index, group in enumerate(_SYNONYM_GROUPS):
        if word in group:
            return index
    return None


def names_conflict(a: str, b: str) -> bool:
    """Whether two object names may name the same kind of object (see the module docstring, rule 2)."""
    na, nb = normalise_name(a).split(), normalise_name(b).split()
    if not na or not nb:
        return False
    if na == nb or na[-1] == nb[-1]:
        return True
    group = _group_of(na[-1])
    return group is not None and group == _group_of(nb[-1])


def _find(haystack: Sequence[str], needle: Sequence[str]) -> int:
    """Index of the first occurrence of the word sequence ``needle`` in ``haystack``, or -1."""
    n = len(needle)
    for i in range(len(haystack) - n + 1 if n else 0):
        if list(haystack[i : i + n]) == list(needle):
            return i
    return -1


def _contains(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    return _find(haystack, needle) >= 0


# ------------------------------------------------------------------------------------------- structure


def _target_signature(task: Task) -> frozenset:
    """The task's instance set, comparable across tasks (order of instances and float noise ignored)."""
    return frozenset(
        tuple(sorted(tuple((round(float(x), 1), round(float(y), 1)) for x, y in poly) for poly in inst))
        for inst in task.polygons or []
    ) | frozenset((tuple(rle["size"]), rle["counts"]) for rle in task.rles or [])


# ---------------------------------------------------------------------------------------------- kinds


def template_phrases(task: Task) -> list[str]:
    """Every template phrase allowed for ``task``, in CLIPSEG_TEMPLATES order."""
    core = strip_article(task.phrase)
    if not core:
        return []
    templates = CLIPSEG_TEMPLATES
    if task.num_instances > 1:
        templates = tuple(t for t in templates if t not in _SINGLE_INSTANCE_TEMPLATES)
    return [t.format(core) for t in templates]


def recomposition_allowed(task: Task, others: Sequence[Task]) -> bool:
    """Rules 1-3 of the module docstring: may any reduced phrase of ``task`` be generated at all?"""
    ps = task.phrase_structure or {}
    name = structure_name(ps)
    if ps.get("type") != "name" or not name:
        return False
    words = tokens(task.phrase)
    if not _contains(words, tokens(name)) or not all(
        _contains(words, tokens(a)) for a in structure_attributes(ps)
    ):
        return False
    mine = _target_signature(task)
    for other in others:
        if other.task_id == task.task_id or other.kind == "negative":
            continue
        other_name = structure_name(other.phrase_structure) or other.phrase
        if names_conflict(name, other_name) and _target_signature(other) != mine:
            return False
    return True


def recomposed_structures(task: Task, others: Sequence[Task]) -> list[tuple[str, dict[str, Any]]]:
    """(phrase, phrase_structure) for every allowed reduced phrase of ``task``; [] when the guard refuses."""
    if not recomposition_allowed(task, others):
        return []
    ps = task.phrase_structure or {}
    name, atts, rels = structure_name(ps), structure_attributes(ps), structure_relations(ps)
    words = tokens(task.phrase)
    # the attributes in the order the phrase has them, so reduced phrases read like the original
    atts.sort(key=lambda a: _find(words, tokens(a)))
    if len(atts) > _MAX_ATTRIBUTES or len(rels) > _MAX_RELATIONS or not (atts or rels):
        return []
    rel_ids = list(ps.get("relation_ids") or [])
    ids_aligned = len(rel_ids) == len(rels)
    existing = {" ".join(tokens(t.phrase)) for t in others} | {" ".join(tokens(task.phrase))}
    out: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for n_att in range(len(atts), -1, -1):  # longest first: the closest paraphrases come first
        for att_subset in itertools.combinations(atts, n_att):
            for n_rel in range(len(rels), -1, -1):
                for rel_index in itertools.combinations(range(len(rels)), n_rel):
                    if n_att == len(atts) and n_rel == len(rels):
                        continue  # the original phrase itself
                    rel_subset = [rels[i] for i in rel_index]
                    phrase = compose_phrase(name, att_subset, rel_subset)
                    norm = " ".join(tokens(phrase))
                    if norm in existing or norm in seen:
                        continue
                    seen.add(norm)
                    new_ps = {
                        **copy.deepcopy(dict(ps)),
                        "name": name,
                        "attributes": list(att_subset),
                        "relation_descriptions": [list(r) for r in rel_subset],
                        "relation_ids": [rel_ids[i] for i in rel_index] if ids_aligned else [],
                        "type": phrase_type(att_subset, rel_subset),
                    }
                    out.append((phrase, new_ps))
    return out


def _relation_clause(predicate: str, plural: bool) -> str:
    """ "on" -> "is on", "holding" -> "is holding", "has" -> "has", "with" -> "has" (plural: are/have)."""
    words = predicate.split()
    first = words[0].lower()
    if first == "with":
        return " ".join(["have" if plural else "has", *words[1:]])
    if first in _VERB_PREDICATES:
        if plural and first in ("has", "is"):
            words[0] = "have" if first == "has" else "are"
        return " ".join(words)
    return f"{'are' if plural else 'is'} {predicate}"


def relation_rewrite(task: Task) -> str | None:
    """ "cup on table" -> "the cup that is on the table"; None unless the phrase ends with its relations.

    The relations must be, in order, exactly the last words of the phrase, and the words before them
    (the subject) must contain the name: then the rewrite says the same thing in other words.
    """
    ps = task.phrase_structure or {}
    rels, name = structure_relations(ps), structure_name(ps)
    if not rels or not name:
        return None
    words = strip_article(task.phrase).split()
    tail: list[str] = []
    for pred, obj in rels:
        tail += [*pred.split(), *obj.split()]
    n = len(tail)
    lower = [w.lower() for w in words]
    if len(words) <= n or lower[-n:] != [w.lower() for w in tail]:
        return None
    subject = words[:-n]
    if not _contains([w.lower() for w in subject], tokens(name)):
        return None
    plural = is_plural(name)
    clauses = []
    for pred, obj in rels:
        obj_words = obj.split()
        obj_text = obj if obj_words[0].lower() in ARTICLES else f"the {obj}"
        clauses.append(f"{_relation_clause(pred, plural)} {obj_text}")
    return f"the {' '.join(subject)} that {' and '.join(clauses)}"


def image_vocabulary(tasks: Iterable[Task]) -> set[str]:
    """Singular content words of every phrase, name and relation object of the non-negative tasks."""
    vocab: set[str] = set()
    for task in tasks:
        if task.kind == "negative":
            continue
        ps = task.phrase_structure or {}
        texts = [task.phrase, structure_name(ps), *(obj for _, obj in structure_relations(ps))]
        for text in texts:
            vocab.update(singular(w) for w in tokens(text) if w not in _STOPWORDS)
    return vocab


def negative_allowed(name: str, vocabulary: set[str]) -> bool:
    """Whether a phrase whose object name is ``name`` surely names nothing in an image with ``vocabulary``."""
    words = [singular(w) for w in tokens(name) if w not in _STOPWORDS]
    if not words:
        return False
    groups = {g for g in (_group_of(w) for w in vocabulary) if g is not None}
    for word in words:
        if (
            word in vocabulary
            or word in _GENERIC
            or (_group_of(word) is not None and _group_of(word) in groups)
        ):
            return False
    return True


# ------------------------------------------------------------------------------------------- rates


def validate_rates(rates: Mapping[str, float]) -> dict[str, float]:
    """``rates`` as a dict of finite non-negative floats; unknown kinds raise ValueError. Missing kinds: 0."""
    unknown = sorted(set(rates) - set(GENERATED_KINDS))
    if unknown:
        raise ValueError(f"unknown prompt kind(s) {unknown}; choose from {list(GENERATED_KINDS)}")
    out = {kind: 0.0 for kind in GENERATED_KINDS}
    for kind, value in rates.items():
        try:
            rate = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"rate for {kind!r} is not a number: {value!r}") from None
        if not math.isfinite(rate) or rate < 0:
            raise ValueError(f"rate for {kind!r} must be a finite number >= 0, got {value!r}")
        out[kind] = rate
    return out


def parse_rates(items: Iterable[str], *, defaults: Mapping[str, float] = DEFAULT_RATES) -> dict[str, float]:
    """``["template=1", "negative=0.2"]`` -> all four rates, the unnamed ones from ``defaults``.

    Raises ValueError naming the offending item for a missing ``=``, an unknown kind or a bad number.
    """
    given: dict[str, float] = {}
    for item in items:
        kind, sep, value = item.partition("=")
        kind = kind.strip()
        if not sep or not kind:
            raise ValueError(f"rate {item!r} is not of the form kind=R (kinds: {', '.join(GENERATED_KINDS)})")
        if kind not in GENERATED_KINDS:
            raise ValueError(f"unknown prompt kind {kind!r} in {item!r}; choose from {list(GENERATED_KINDS)}")
        try:
            given[kind] = float(value)
        except ValueError:
            raise ValueError(f"rate {item!r}: {value!r} is not a number") from None
    return validate_rates({**defaults, **given})


def _draw_count(rate: float, rng: random.Random) -> int:
    """floor(rate), plus one with probability frac(rate): an integer with mean ``rate``."""
    whole = math.floor(rate)
    frac = rate - whole
    # draw even when frac == 0 so the rng stream does not depend on the rate's fractional part
    return whole + (1 if rng.random() < frac else 0)


# --------------------------------------------------------------------------------------------- API


def negative_pool_entries(tasks: Iterable[Task]) -> Iterator[tuple[str, str]]:
    """(name, phrase) of each original task with a phrase: what a negative pool draws from."""
    for task in tasks:
        if task.kind == "original" and task.phrase.strip():
            yield (structure_name(task.phrase_structure) or task.phrase.strip(), task.phrase.strip())


def build_negative_pool(
    records: Iterable[ImageRecord], max_size: int = 10000, rng: random.Random | None = None
) -> list[tuple[str, str]]:
    """(name, phrase) of distinct original phrases across ``records``, a uniform sample of at most ``max_size``.

    Generated tasks are skipped: they derive from originals and add no new objects, and a negative's
    phrase must never become another negative. The name is ``phrase_structure.name``, or the whole phrase
    when the structure has none (every word is then checked: conservative). Reservoir sampling keeps memory
    at ``max_size`` whatever the number of records; deterministic given ``rng``.
    """
    if max_size < 0:
        raise ValueError(f"max_size must be >= 0, got {max_size}")
    rng = rng or random.Random(0)
    pool: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    count = 0
    for record in records:
        for entry in negative_pool_entries(record.tasks):
            if entry in seen:
                continue
            seen.add(entry)
            count += 1
            if len(pool) < max_size:
                pool.append(entry)
            else:
                j = rng.randrange(count)
                if j < max_size:
                    pool[j] = entry
    return pool


def record_rng(seed: int, key: str) -> random.Random:
    """The rng for one image: depends on the run seed and the image key only, so workers and reruns agree."""
    return random.Random(f"{seed}:{key}")  # str seeds hash with sha512: stable across processes


def augment_record(
    record: ImageRecord,
    *,
    rng: random.Random,
    rates: Mapping[str, float],
    negative_pool: Sequence[tuple[str, str]] = (),
) -> ImageRecord:
    """A new record: every task of ``record`` unchanged, then the prompts generated from each original.

    ``rates``: expected number of prompts of each kind per original task (kinds missing from it: 0; use
    :func:`parse_rates` for the defaults). Generated tasks get ``kind``, ``source_task_id`` = the original's
    id, ``task_id`` = ``f"{original}__{kind}{n}"`` (made unique against every id of the record), copies of
    the original's polygons, RLEs and boxes (negatives: none), and an adjusted ``phrase_structure``.
    """
    rates = validate_rates(rates)
    tasks = list(record.tasks)
    used_ids = {t.task_id for t in tasks}
    used_phrases = {" ".join(tokens(t.phrase)) for t in tasks}
    vocabulary = image_vocabulary(tasks)
    generated: list[Task] = []

    def new_id(source: Task, kind: str) -> str:
        n = 0
        while f"{source.task_id}__{kind}{n}" in used_ids:
            n += 1
        task_id = f"{source.task_id}__{kind}{n}"
        used_ids.add(task_id)
        return task_id

    def derive(
        source: Task, kind: str, phrase: str, ps: dict[str, Any] | None, *, empty: bool = False
    ) -> Task:
        return Task(
            task_id=new_id(source, kind),
            phrase=phrase,
            polygons=[] if empty else copy.deepcopy(source.polygons),
            boxes=[] if empty else copy.deepcopy(source.boxes),
            rles=[] if empty else copy.deepcopy(source.rles),
            phrase_structure=ps,
            kind=kind,
            source_task_id=source.task_id,
        )

    for source in (t for t in tasks if t.kind == "original"):
        # each kind draws its count first, so the draws of one kind do not shift another's
        counts = {kind: _draw_count(rates[kind], rng) for kind in GENERATED_KINDS}

        candidates = template_phrases(source)
        for phrase in rng.sample(candidates, min(counts["template"], len(candidates))):
            generated.append(derive(source, "template", phrase, copy.deepcopy(source.phrase_structure)))

        if counts["recomposed"]:
            options = recomposed_structures(source, tasks)
            for phrase, ps in rng.sample(options, min(counts["recomposed"], len(options))):
                generated.append(derive(source, "recomposed", phrase, ps))

        if counts["relation_rewrite"]:
            rewrite = relation_rewrite(source)
            if rewrite is not None:
                generated.append(
                    derive(source, "relation_rewrite", rewrite, copy.deepcopy(source.phrase_structure))
                )

        for _ in range(counts["negative"] if negative_pool else 0):
            for _try in range(_NEGATIVE_TRIES):
                name, phrase = negative_pool[rng.randrange(len(negative_pool))]
                norm = " ".join(tokens(phrase))
                if norm in used_phrases or not negative_allowed(name, vocabulary):
                    continue
                used_phrases.add(norm)
                ps = {
                    "name": name,
                    "attributes": [],  # not recovered from the pool phrase
                    "relation_ids": [],
                    "relation_descriptions": [],
                    "type": source.phrase_type,
                    "negative": True,
                }
                generated.append(derive(source, "negative", phrase, ps, empty=True))
                break
    return dataclasses.replace(record, tasks=tasks + generated)
