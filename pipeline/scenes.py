"""Synthetic scenes: rendered shapes with exact polygons and unambiguous referring expressions.

A scene is 2–5 shapes (8 kinds, 8 colours, 3 sizes) on a noisy gradient background. Later shapes may
occlude earlier ones; an instance's polygons are then its *visible* region, computed exactly: every shape is
a union of convex parts, and subtracting a convex occluder from a convex piece is a union of convex pieces
(one per occluder edge, by half-plane clipping). The image and the masks are drawn with the same
rasteriser convention (``int`` cast, ``outline=1``), so an unoccluded instance's mask equals its rendered
pixels and an occluded one differs only along the cut edge.

Phrases come in PhraseCut's four types and are generated from a small grammar whose meaning is computed
by :func:`resolve_structure`: a candidate phrase is kept only when it resolves to exactly its target
instance set (plural iff several), with relations decided only when they hold or fail by a clear margin.

Task ids follow PhraseCut's formula ``f"{image_id}__{'_'.join(ann_ids)}"``. An instance's ann id is
``str(index + 1)``; when a second, third, ... phrase of an image refers to an instance set that already
has a task, each ann id of that task gets the suffix ``x{v}`` (v = 1, 2, ...), so several phrases per
target keep distinct task ids while the formula still holds (``ann_id.split("x")[0]`` is the instance).

Everything is a pure function of ``(seed, image_id)``: :func:`make_scene` can be called in any order or
process and gives the same objects, pixels and tasks.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.grammar import split_noun
from segvlm.atomic import write_bytes_atomic
from segvlm.vocabulary import (
    PHRASE_TYPES,
    SCENE_COLOURS,
    SCENE_GENERIC,
    SCENE_PLURALS,
    SCENE_RELATIONS,
    SCENE_SHAPES,
    SCENE_SIZES,
    SCENE_SUPERLATIVES,
    SCENE_WORDS,  # noqa: F401  (re-exported: what a tokenizer for the scenes must cover)
)

Point = tuple[float, float]
Poly = list[Point]

# The words (segvlm.vocabulary, which the tiny CLIP's tokenizer also covers) and how each is drawn
KINDS = SCENE_SHAPES
PLURALS = SCENE_PLURALS
SINGULARS = {v: k for k, v in PLURALS.items()}
GENERIC = SCENE_GENERIC
# bright, saturated colours that stand out on the dark, desaturated backgrounds below
COLOURS: dict[str, tuple[int, int, int]] = dict(
    zip(
        SCENE_COLOURS,
        [(220, 35, 35), (40, 185, 60), (45, 95, 245), (240, 225, 40), (250, 135, 15), (150, 55, 215),
         (245, 245, 245), (255, 130, 200)],
        strict=True,
    )
)  # fmt: skip
SIZES: dict[str, float] = dict(zip(SCENE_SIZES, (0.075, 0.115, 0.165), strict=True))  # radius / image side
SIZE_RANK = {name: rank for rank, name in enumerate(SIZES)}
RELATIONS = SCENE_RELATIONS
SUPERLATIVES = SCENE_SUPERLATIVES
REL_MARGIN = 0.1  # centre offset (× image side) from which a relation clearly holds
REL_NOT = REL_MARGIN / 3  # ... and up to which it clearly does not; in between no phrase uses it
MIN_VISIBLE = 0.6  # an occluded shape keeps at least this share of its area visible
MIN_PIECE_AREA = 0.25  # px²: slivers of a subtraction below this are dropped (invisible at any scale)
JPEG_QUALITY = 92


# ----------------------------------------------------------------------------------------------- geometry
def polygon_area(poly: Sequence[Point]) -> float:
    """Signed shoelace area (positive for counter-clockwise in x-right/y-up, i.e. clockwise on screen)."""
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(poly, [*poly[1:], poly[0]]))


def _clip(poly: Poly, a: Point, b: Point, sign: float) -> Poly:
    """Sutherland–Hodgman against one line: keep the side where ``sign * cross(b - a, p - a) >= 0``."""
    out: Poly = []
    n = len(poly)
    for i in range(n):
        p, q = poly[i], poly[(i + 1) % n]
        fp = sign * ((b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]))
        fq = sign * ((b[0] - a[0]) * (q[1] - a[1]) - (b[1] - a[1]) * (q[0] - a[0]))
        if fp >= 0:
            out.append(p)
        if (fp >= 0) != (fq >= 0):
            t = fp / (fp - fq)
            out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
    return out


def subtract_convex(piece: Poly, occluder: Poly) -> list[Poly]:
    """``piece − occluder`` for convex polygons, as disjoint convex pieces (exact up to float rounding).

    Walk the occluder's edges: what lies outside edge i but inside edges 0..i−1 is one piece of the result.
    """
    sign = 1.0 if polygon_area(occluder) > 0 else -1.0
    # disjoint shapes must come back whole: the edge walk would cut a piece along the occluder's extended
    # edges even where they do not touch it
    if (
        min(x for x, _ in piece) >= max(x for x, _ in occluder)
        or max(x for x, _ in piece) <= min(x for x, _ in occluder)
        or min(y for _, y in piece) >= max(y for _, y in occluder)
        or max(y for _, y in piece) <= min(y for _, y in occluder)
    ):
        return [piece]
    inter = piece
    for i in range(len(occluder)):
        inter = _clip(inter, occluder[i], occluder[(i + 1) % len(occluder)], sign)
        if len(inter) < 3 or abs(polygon_area(inter)) <= 1e-9:
            return [piece]
    result: list[Poly] = []
    rest = piece
    n = len(occluder)
    for i in range(n):
        a, b = occluder[i], occluder[(i + 1) % n]
        outside = _clip(rest, a, b, -sign)
        if len(outside) >= 3 and abs(polygon_area(outside)) > 1e-9:
            result.append(outside)
        rest = _clip(rest, a, b, sign)
        if len(rest) < 3 or abs(polygon_area(rest)) <= 1e-9:
            break
    return result


def _regular(cx: float, cy: float, r: float, n: int, phase: float, ry: float | None = None) -> Poly:
    ry = r if ry is None else ry
    return [
        (cx + r * math.cos(phase + 2 * math.pi * i / n), cy + ry * math.sin(phase + 2 * math.pi * i / n))
        for i in range(n)
    ]


def shape_geometry(kind: str, cx: float, cy: float, r: float) -> tuple[Poly, list[Poly]]:
    """``(outline, convex parts)`` of a shape of half-extent ``r`` centred at ``(cx, cy)`` (y down)."""
    up = -math.pi / 2
    if kind == "circle":
        outline = _regular(cx, cy, r, 32, 0.0)
    elif kind == "ellipse":
        outline = _regular(cx, cy, r, 32, 0.0, ry=0.55 * r)
    elif kind == "square":
        s = 0.85 * r
        outline = [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    elif kind == "triangle":
        outline = _regular(cx, cy + 0.15 * r, 1.1 * r, 3, up)
    elif kind == "hexagon":
        outline = _regular(cx, cy, r, 6, 0.0)
    elif kind == "diamond":
        outline = [(cx, cy - r), (cx + 0.68 * r, cy), (cx, cy + r), (cx - 0.68 * r, cy)]
    elif kind == "star":
        outer = _regular(cx, cy + 0.08 * r, 1.08 * r, 5, up)
        inner = _regular(cx, cy + 0.08 * r, 0.45 * r, 5, up + math.pi / 5)
        outline = [p for pair in zip(outer, inner) for p in pair]
        parts = [inner] + [[outer[i], inner[i], inner[i - 1]] for i in range(5)]
        return _round(outline), [_round(p) for p in parts]
    elif kind == "cross":
        w = 0.32 * r
        outline = [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
        parts = [
            [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy + r), (cx - w, cy + r)],
            [(cx - r, cy - w), (cx - w, cy - w), (cx - w, cy + w), (cx - r, cy + w)],
            [(cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx + w, cy + w)],
        ]
        return _round(outline), [_round(p) for p in parts]
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    outline = _round(outline)
    return outline, [outline]


def _round(poly: Sequence[Point]) -> Poly:
    """Two decimals (what the JSON stores), so the image is drawn from exactly the stored coordinates."""
    out: Poly = []
    for x, y in poly:
        p = (round(x, 2), round(y, 2))
        if not out or out[-1] != p:
            out.append(p)
    if len(out) > 1 and out[0] == out[-1]:
        out.pop()
    return out


# -------------------------------------------------------------------------------------------------- scene
@dataclasses.dataclass
class SceneObject:
    """One shape; ``visible`` is the list of polygons of its visible region (its instance polygons)."""

    index: int
    kind: str
    colour: str
    size: str
    cx: float
    cy: float
    r: float
    outline: Poly
    parts: list[Poly]
    visible: list[Poly]

    @property
    def area(self) -> float:
        return abs(polygon_area(self.outline))

    @property
    def visible_area(self) -> float:
        return sum(abs(polygon_area(p)) for p in self.visible)

    def box(self) -> list[float]:
        xs = [x for p in self.visible for x, _ in p]
        ys = [y for p in self.visible for _, y in p]
        return [
            round(min(xs), 2),
            round(min(ys), 2),
            round(max(xs) - min(xs), 2),
            round(max(ys) - min(ys), 2),
        ]


@dataclasses.dataclass
class Scene:
    """A rendered scene: pixels, the owner map (0 = background, k + 1 = object k) and its tasks."""

    image_id: int
    width: int
    height: int
    objects: list[SceneObject]
    image: np.ndarray
    owner: np.ndarray
    tasks: list[dict[str, Any]]


def _visible(parts: list[Poly], occluders: list[list[Poly]]) -> list[Poly]:
    pieces = [list(p) for p in parts]
    for occluder in occluders:
        for convex in occluder:
            pieces = [q for piece in pieces for q in subtract_convex(piece, convex)]
    rounded = [_round(p) for p in pieces]
    return [p for p in rounded if len(p) >= 3 and abs(polygon_area(p)) >= MIN_PIECE_AREA]


def _near(a: Poly, b: Poly, gap: float) -> bool:
    """Whether the bounding boxes of two polygons come closer than ``gap`` pixels."""
    return not (
        min(x for x, _ in a) > max(x for x, _ in b) + gap
        or min(x for x, _ in b) > max(x for x, _ in a) + gap
        or min(y for _, y in a) > max(y for _, y in b) + gap
        or min(y for _, y in b) > max(y for _, y in a) + gap
    )


def _place_objects(rng: np.random.Generator, size: int) -> list[SceneObject]:
    """2–5 shapes; kinds and colours repeat often enough for plural phrases; occlusion is bounded."""
    n = int(rng.integers(2, 6))
    objects: list[SceneObject] = []
    for _ in range(n):
        # reuse a kind / colour of the scene now and then, so "the red circles" / "the squares" occur
        kind = (
            objects[int(rng.integers(len(objects)))].kind
            if objects and rng.random() < 0.3
            else KINDS[int(rng.integers(len(KINDS)))]
        )
        colour_names = list(COLOURS)
        colour = (
            objects[int(rng.integers(len(objects)))].colour
            if objects and rng.random() < 0.3
            else colour_names[int(rng.integers(len(colour_names)))]
        )
        size_name = list(SIZES)[int(rng.integers(len(SIZES)))]
        r = SIZES[size_name] * size * (1.0 + rng.uniform(-0.05, 0.05))
        for _attempt in range(40):
            cx = float(rng.uniform(r + 1.5, size - r - 1.5))
            cy = float(rng.uniform(r + 1.5, size - r - 1.5))
            outline, parts = shape_geometry(kind, cx, cy, r)
            if any(o.colour == colour and _near(o.outline, outline, 2.0) for o in objects):
                continue  # same-coloured shapes that touch would merge into one blob in the picture
            new_visible = [_visible(o.visible, [parts]) for o in objects]
            if all(
                sum(abs(polygon_area(p)) for p in vis) >= MIN_VISIBLE * o.area
                for vis, o in zip(new_visible, objects)
            ):
                for o, vis in zip(objects, new_visible):
                    o.visible = vis
                objects.append(
                    SceneObject(len(objects), kind, colour, size_name, cx, cy, r, outline, parts, list(parts))
                )
                break
    for o in objects:
        if len(o.visible) == len(o.parts) and o.visible == o.parts:
            o.visible = [o.outline]  # unoccluded: one outline polygon, as PhraseCut would store it
    return objects


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dark, desaturated gradient with low-frequency texture and pixel noise (float, H×W×3)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size)
    c0 = (rng.uniform(25, 95) + rng.uniform(-12, 12, 3)).astype(np.float32)
    c1 = (rng.uniform(25, 95) + rng.uniform(-12, 12, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = np.clip(0.5 + (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle), 0, 1)[..., None]
    bg = c0 * (1 - t) + c1 * t
    fx, fy, phase = rng.uniform(2, 7), rng.uniform(2, 7), rng.uniform(0, 2 * math.pi)
    bg += np.float32(rng.uniform(3, 10)) * np.sin(np.float32(2 * math.pi) * (fx * xx + fy * yy) + phase)[
        ..., None
    ].astype(np.float32)
    bg += np.float32(rng.uniform(3, 9)) * rng.standard_normal((size, size, 3), dtype=np.float32)
    return bg


def _render(rng: np.random.Generator, objects: list[SceneObject], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (uint8) and owner map; shapes drawn in order with the masks' rasteriser convention."""
    canvas = Image.fromarray(np.clip(_background(rng, size), 0, 255).astype(np.uint8))
    owner = Image.new("L", (size, size), 0)
    draw, draw_owner = ImageDraw.Draw(canvas), ImageDraw.Draw(owner)
    for o in objects:
        rgb = tuple(int(np.clip(c + rng.integers(-14, 15), 0, 255)) for c in COLOURS[o.colour])
        points = [(int(x), int(y)) for x, y in o.outline]
        draw.polygon(points, fill=rgb, outline=rgb)
        draw_owner.polygon(points, fill=o.index + 1, outline=o.index + 1)
    image = np.array(canvas, dtype=np.float32)
    image += np.float32(4.0) * rng.standard_normal(image.shape, dtype=np.float32)  # texture on shapes too
    return np.clip(image, 0, 255).astype(np.uint8), np.asarray(owner, dtype=np.uint8)


# -------------------------------------------------------------------------------------------- semantics
def _matches(o: SceneObject, name: str, attributes: Sequence[str]) -> bool:
    return (name == GENERIC or o.kind == name) and all(a in (o.colour, o.size) for a in attributes)


def _noun(name: str, attributes: Sequence[str], plural: bool) -> str:
    return " ".join([*attributes, PLURALS[name] if plural else name])


def _parse_noun(text: str) -> tuple[str, list[str], bool] | None:
    """``"small red circles"`` -> ("circle", ["small", "red"], True); None for words outside the grammar."""
    noun = split_noun(text)
    if noun is None:
        return None
    attributes, head, name, plural = noun
    # only the scenes' own words, each number spelled as the scenes spell it
    if name not in PLURALS or head != (PLURALS[name] if plural else name):
        return None
    if any(a not in COLOURS and a not in SIZES for a in attributes):
        return None
    return name, attributes, plural


def relation_value(a: SceneObject, b: SceneObject, predicate: str, size: int) -> bool | None:
    """True / False when ``a <predicate> b`` holds / fails clearly (by centre offset), None in between."""
    if a.index == b.index:
        return False
    offset = {
        "left of": b.cx - a.cx,
        "right of": a.cx - b.cx,
        "above": b.cy - a.cy,
        "below": a.cy - b.cy,
    }[predicate]
    if offset >= REL_MARGIN * size:
        return True
    if offset <= REL_NOT * size:
        return False
    return None


def _referents(
    name: str,
    attributes: Sequence[str],
    relation: tuple[str, str] | None,
    objects: Sequence[SceneObject],
    size: int,
) -> list[SceneObject] | None:
    """What ``name``/``attributes`` (+ one relation) picks out, ignoring number; None when ambiguous."""
    candidates = [o for o in objects if _matches(o, name, attributes)]
    if relation is None:
        return candidates
    predicate, object_text = relation
    if predicate in SUPERLATIVES:
        # "the largest circle": [["largest of", "circles"]]: compared among the name's instances
        if object_text != _noun(name, attributes, True) or len(candidates) < 2:
            return None
        ranks = [SIZE_RANK[o.size] for o in candidates]
        extreme = max(ranks) if predicate == "largest of" else min(ranks)
        target = [o for o, rank in zip(candidates, ranks) if rank == extreme]
        return target if len(target) == 1 else None
    if predicate in RELATIONS:
        ref_noun = _parse_noun(object_text)
        if ref_noun is None or ref_noun[2]:
            return None
        refs = [o for o in objects if _matches(o, ref_noun[0], ref_noun[1])]
        if len(refs) != 1:
            return None
        values = [relation_value(o, refs[0], predicate, size) for o in candidates]
        if any(v is None for v in values):
            return None
        return [o for o, v in zip(candidates, values) if v]
    return None


def resolve_structure(
    structure: dict[str, Any], objects: Sequence[SceneObject], size: int
) -> list[int] | None:
    """The instance indices a phrase structure refers to, or None when it is ambiguous or ill-formed.

    Well-formed means: words from the grammar, a relation's object names exactly one instance, every
    candidate's relation is clear (:func:`relation_value`), a superlative has a unique extreme among at least
    two candidates, and the name is plural exactly when the referent has several instances.
    """
    noun = _parse_noun(" ".join([*structure.get("attributes", []), structure.get("name", "")]))
    if noun is None:
        return None
    name, attributes, plural = noun
    relations = structure.get("relation_descriptions") or []
    if len(relations) > 1:
        return None
    relation = (relations[0][0], relations[0][1]) if relations else None
    if relation is not None and relation[0] in SUPERLATIVES and plural:
        return None
    target = _referents(name, attributes, relation, objects, size)
    if not target or plural != (len(target) > 1):
        return None
    return sorted(o.index for o in target)


def render_phrase(structure: dict[str, Any]) -> str:
    """The phrase text of a structure (the grammar is small enough that this is a bijection)."""
    noun = " ".join([*structure["attributes"], structure["name"]])
    relations = structure["relation_descriptions"]
    if not relations:
        return f"the {noun}"
    predicate, object_text = relations[0]
    if predicate in SUPERLATIVES:
        return f"the {SUPERLATIVES[predicate]} {noun}"
    if structure["type"] == "verbose":
        verb = "are" if structure["name"] in SINGULARS else "is"
        return f"the {noun} that {verb} {predicate} the {object_text}"
    return f"the {noun} {predicate} the {object_text}"


def _descriptions(o: SceneObject) -> list[tuple[str, list[str]]]:
    """Ways to name ``o`` (name, attributes), size before colour as in English."""
    return [
        (o.kind, []),
        (o.kind, [o.colour]),
        (o.kind, [o.size]),
        (o.kind, [o.size, o.colour]),
        (GENERIC, [o.colour]),
        (GENERIC, [o.size, o.colour]),
    ]


Candidate = tuple[dict[str, Any], tuple[int, ...]]  # (phrase_structure, target instance indices)
Spec = tuple[str, tuple[str, ...], tuple[str, str, tuple[int, ...]] | None]  # name, attributes, relation


def _candidate(spec: Spec, phrase_type: str, objects: list[SceneObject], size: int) -> Candidate | None:
    """The structure and target of one spec, number chosen from the target; None when ambiguous."""
    name, attributes, relation = spec
    target = _referents(name, attributes, relation[:2] if relation else None, objects, size)
    if not target:
        return None
    plural = len(target) > 1
    if relation is not None and relation[0] in SUPERLATIVES and plural:
        return None
    structure = {
        "name": PLURALS[name] if plural else name,
        "attributes": list(attributes),
        "relation_ids": [] if relation is None else list(relation[2]),
        "relation_descriptions": [] if relation is None else [[relation[0], relation[1]]],
        "type": phrase_type,
    }
    return structure, tuple(o.index for o in target)


def _specs(objects: list[SceneObject], rng: np.random.Generator) -> dict[str, list[Spec]]:
    """Every phrase of the grammar that can be said about this scene (ambiguity not yet checked), by type."""
    kinds = sorted({o.kind for o in objects}, key=KINDS.index)
    described = sorted({(n, tuple(a)) for o in objects for n, a in _descriptions(o) if a})
    # relation objects: for each instance, one of its shortest descriptions that name it alone
    references: list[tuple[str, tuple[int, ...]]] = []
    for o in objects:
        unique = [
            (n, a)
            for n, a in _descriptions(o)
            if [p.index for p in objects if _matches(p, n, a)] == [o.index]
        ]
        if unique:
            shortest = min(len(a) for _, a in unique)
            options = [(n, a) for n, a in unique if len(a) == shortest]
            n, a = options[int(rng.integers(len(options)))]
            references.append((_noun(n, a, False), (o.index,)))
    superlatives = [
        (name, (), (predicate, PLURALS[name], tuple(o.index for o in objects if _matches(o, name, []))))
        for predicate in SUPERLATIVES
        for name in [*kinds, GENERIC]
    ]
    return {
        "name": [(kind, (), None) for kind in kinds],
        "attribute": [(name, attributes, None) for name, attributes in described],
        "relation": superlatives
        + [
            (name, (), (predicate, text, ids))
            for predicate in RELATIONS
            for text, ids in references
            for name in [*kinds, GENERIC]
        ],
        "verbose": [
            (name, attributes, (predicate, text, ids))
            for predicate in RELATIONS
            for text, ids in references
            for name, attributes in described
        ],
    }


def _select(objects: list[SceneObject], size: int, rng: np.random.Generator) -> list[Candidate]:
    """All name phrases, and as many of each other type: a balanced mix, new targets preferred.

    Specs are tried in random order and only until enough valid ones are found: resolving every relation
    phrase of a five-shape scene would cost more than rendering it.
    """
    specs = _specs(objects, rng)
    chosen = [c for spec in specs["name"] if (c := _candidate(spec, "name", objects, size))]
    quota = max(len(chosen), 2)
    for phrase_type in ("attribute", "relation", "verbose"):
        pool = specs[phrase_type]
        used = {target for _, target in chosen}
        fresh: list[Candidate] = []
        stale: list[Candidate] = []
        seen: set[str] = set()
        for i in rng.permutation(len(pool)):
            candidate = _candidate(pool[int(i)], phrase_type, objects, size)
            if candidate is None:
                continue
            phrase = render_phrase(candidate[0])
            if phrase in seen:
                continue
            seen.add(phrase)
            (stale if candidate[1] in used else fresh).append(candidate)
            if len(fresh) >= quota or len(fresh) + len(stale) >= 4 * quota:
                break
        chosen += (fresh + stale)[:quota]
    return chosen


def make_tasks(image_id: int, objects: list[SceneObject], size: int, rng: np.random.Generator) -> list[dict]:
    """PhraseCut tasks (exactly the seven keys) for a scene; task ids unique (see the module docstring)."""
    tasks = []
    per_target: Counter[tuple[int, ...]] = Counter()
    for structure, target in _select(objects, size, rng):
        variant = per_target[target]
        per_target[target] += 1
        suffix = f"x{variant}" if variant else ""
        ann_ids = [f"{i + 1}{suffix}" for i in target]
        tasks.append(
            {
                "task_id": f"{image_id}__{'_'.join(ann_ids)}",
                "image_id": image_id,
                "ann_ids": ann_ids,
                "Polygons": [[[list(p) for p in poly] for poly in objects[i].visible] for i in target],
                "instance_boxes": [objects[i].box() for i in target],
                "phrase": render_phrase(structure),
                "phrase_structure": structure,
            }
        )
    return tasks


def make_scene(seed: int, image_id: int, size: int = 128) -> Scene:
    """The scene of ``image_id`` under ``seed``: a pure function (its own RNG stream per image)."""
    rng = np.random.default_rng([seed, image_id])
    objects = _place_objects(rng, size)
    image, owner = _render(rng, objects, size)
    tasks = make_tasks(image_id, objects, size, rng)
    return Scene(image_id, size, size, objects, image, owner, tasks)


def every_shape_ious(scene: Scene) -> list[float]:
    """Per task, the IoU of a prediction that marks every shape of the scene, whatever the phrase.

    The floor a model reaches by finding shapes without grounding the phrase: targets are visible shapes, so
    IoU = target pixels / all shape pixels.
    """
    shapes = np.count_nonzero(scene.owner)
    ious = []
    for task in scene.tasks:
        instances = [int(ann.split("x")[0]) for ann in task["ann_ids"]]  # ann id k (+ "x<v>") = owner value k
        ious.append(np.count_nonzero(np.isin(scene.owner, instances)) / shapes)
    return ious


def encode_jpeg(image: np.ndarray) -> bytes:
    """JPEG bytes; 4:4:4 so thin coloured shapes keep their colour."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ writing
def parse_splits(text: str) -> dict[str, float]:
    """``"train=0.8,val=0.1,test=0.1"`` -> ``{"train": 0.8, ...}`` (fractions normalised to sum 1)."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"splits must look like train=0.8,val=0.1,test=0.1, got {text!r}")
    splits = {name.strip(): float(value) for name, value in pairs}
    total = sum(splits.values())
    if total <= 0 or any(v < 0 for v in splits.values()):
        raise ValueError(f"split fractions must be >= 0 and sum to > 0, got {text!r}")
    return {name: value / total for name, value in splits.items()}


def assign_splits(n_images: int, splits: dict[str, float], seed: int) -> dict[int, str]:
    """``{image_id: split}`` for ids 1..n: rounded counts (remainder to the largest split), shuffled by seed."""
    counts = {name: math.floor(frac * n_images) for name, frac in splits.items()}
    counts[max(splits, key=lambda s: splits[s])] += n_images - sum(counts.values())
    order = np.random.default_rng([seed, 2**31 - 1]).permutation(n_images) + 1
    out: dict[int, str] = {}
    start = 0
    for name, count in counts.items():
        for image_id in order[start : start + count]:
            out[int(image_id)] = name
        start += count
    return out


def write_scenes(
    out: str | os.PathLike[str],
    n_images: int,
    seed: int,
    *,
    size: int = 128,
    splits: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Write a PhraseCut-format folder of ``n_images`` scenes; returns a summary.

    Images first, then ``refer_{split}.json`` and last ``image_data_split.json``, each JSON through a
    temporary name: a folder with the metadata file is complete. Same arguments, same bytes.
    """
    out = os.fspath(out)
    splits = splits or {"train": 0.8, "val": 0.1, "test": 0.1}
    started = time.perf_counter()
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    assignment = assign_splits(n_images, splits, seed)
    metadata: list[dict[str, Any]] = []
    refer: dict[str, list[dict[str, Any]]] = {name: [] for name in splits}
    types: dict[str, Counter[str]] = {name: Counter() for name in splits}
    floor: dict[str, list[float]] = {name: [] for name in splits}
    for image_id in range(1, n_images + 1):
        scene = make_scene(seed, image_id, size)
        split = assignment[image_id]
        with open(os.path.join(out, "images", f"{image_id}.jpg"), "wb") as f:
            f.write(encode_jpeg(scene.image))
        metadata.append(
            {
                "image_id": image_id,
                "coco_id": None,
                "flickr_id": None,
                "width": scene.width,
                "height": scene.height,
                "url": "",
                "split": split,
            }
        )
        refer[split] += scene.tasks
        floor[split] += every_shape_ious(scene)
        types[split].update(t["phrase_structure"]["type"] for t in scene.tasks)
    for split, tasks in refer.items():
        write_bytes_atomic(
            os.path.join(out, f"refer_{split}.json"), json.dumps(tasks, separators=(",", ":")).encode()
        )
    write_bytes_atomic(
        os.path.join(out, "image_data_split.json"), json.dumps(metadata, separators=(",", ":")).encode()
    )
    return {
        "out": out,
        "images": dict(Counter(assignment.values())),
        "tasks": {split: len(tasks) for split, tasks in refer.items()},
        "phrase_types": {split: {t: types[split][t] for t in PHRASE_TYPES} for split in splits},
        "multi_instance_tasks": sum(len(t["ann_ids"]) > 1 for tasks in refer.values() for t in tasks),
        # mean IoU of marking every shape: what a model that ignores the phrase scores
        "every_shape_mean_iou": {split: float(np.mean(v)) if v else 0.0 for split, v in floor.items()},
        "seconds": time.perf_counter() - started,
    }
