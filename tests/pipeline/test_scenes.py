"""Synthetic scenes: deterministic, readable as PhraseCut, exact masks, unambiguous phrases."""

from __future__ import annotations

import functools
import json
import os
from collections import Counter

import numpy as np
import pytest

from jobs.synth_scenes import main as synth_main
from pipeline.phrasecut import iter_records
from pipeline.scenes import (
    COLOURS,
    PLURALS,
    REL_MARGIN,
    REL_NOT,
    SCENE_WORDS,
    SINGULARS,
    SIZE_RANK,
    SIZES,
    Scene,
    SceneObject,
    assign_splits,
    every_shape_ious,
    make_scene,
    parse_splits,
    polygon_area,
    render_phrase,
    resolve_structure,
    subtract_convex,
    write_scenes,
)
from pipeline.schema import PHRASE_TYPES
from segvlm.masks import rasterize_polygons

N_IMAGES, SEED, SIZE = 80, 7, 128
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    assert synth_main(["--out", str(out), "--images", str(N_IMAGES), "--seed", str(SEED)]) == 0
    refer = {s: json.loads((out / f"refer_{s}.json").read_text()) for s in SPLITS}
    meta = json.loads((out / "image_data_split.json").read_text())
    return out, refer, meta


@functools.cache
def _scene(image_id: int):
    return make_scene(SEED, image_id, SIZE)


def _files(root) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_same_seed_gives_identical_bytes(dataset, tmp_path):
    out, _, _ = dataset
    assert synth_main(["--out", str(tmp_path / "again"), "--images", str(N_IMAGES), "--seed", str(SEED)]) == 0
    first, second = _files(out), _files(tmp_path / "again")
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)
    assert not any(".tmp" in k for k in first)  # temporary names were renamed away
    other = tmp_path / "other"
    synth_main(["--out", str(other), "--images", "5", "--seed", str(SEED + 1)])
    assert (other / "images" / "1.jpg").read_bytes() != first["images/1.jpg"]


def test_layout_is_phrasecut(dataset):
    _, refer, meta = dataset
    assert len(meta) == N_IMAGES
    assert set(meta[0]) == {"image_id", "coco_id", "flickr_id", "width", "height", "url", "split"}
    assert Counter(m["split"] for m in meta) == {"train": 64, "val": 8, "test": 8}
    by_id = {m["image_id"]: m for m in meta}
    for split, tasks in refer.items():
        for task in tasks:
            assert list(task) == [
                "task_id", "image_id", "ann_ids", "Polygons", "instance_boxes", "phrase", "phrase_structure"
            ]  # fmt: skip
            assert task["task_id"] == f"{task['image_id']}__{'_'.join(task['ann_ids'])}"
            assert by_id[task["image_id"]]["split"] == split
            assert len(task["Polygons"]) == len(task["instance_boxes"]) == len(task["ann_ids"])
            assert set(task["phrase_structure"]) == {
                "name", "attributes", "relation_ids", "relation_descriptions", "type"
            }  # fmt: skip
    all_ids = [t["task_id"] for tasks in refer.values() for t in tasks]
    assert len(all_ids) == len(set(all_ids))  # task ids unique, even with several phrases per target


def test_reads_back_through_the_phrasecut_reader_with_nothing_quarantined(dataset):
    out, refer, _ = dataset
    for split in SPLITS:
        tasks = {}
        for record, jpg, quarantine, stats in iter_records(out, split, source="scenes"):
            assert quarantine == []
            assert stats["clipped_points"] == 0 and stats["converted_rgb"] == 0
            assert record.key == f"scenes_{record.image_id}" and jpg[:2] == b"\xff\xd8"
            tasks.update({t.task_id: t for t in record.tasks})
        assert sorted(tasks) == sorted(t["task_id"] for t in refer[split])
        for raw in refer[split]:
            assert tasks[raw["task_id"]].polygons == raw["Polygons"]
            assert tasks[raw["task_id"]].phrase == raw["phrase"]


def test_phrase_type_mix_and_multi_instance_tasks(dataset):
    _, refer, _ = dataset
    for split in SPLITS:
        types = Counter(t["phrase_structure"]["type"] for t in refer[split])
        assert set(types) == set(PHRASE_TYPES), (split, types)
        assert types["name"] / sum(types.values()) >= 0.20, (split, types)
    tasks = [t for ts in refer.values() for t in ts]
    multi = [t for t in tasks if len(t["ann_ids"]) > 1]
    assert len(multi) / len(tasks) > 0.1
    assert any(t["phrase_structure"]["type"] == "name" and len(t["ann_ids"]) > 1 for t in multi)
    assert any(t["phrase_structure"]["type"] == "attribute" and len(t["ann_ids"]) > 1 for t in multi)
    superlatives = [t for t in tasks if t["phrase"].split()[1] in ("largest", "smallest")]
    assert superlatives and all(t["phrase_structure"]["type"] == "relation" for t in superlatives)


def test_phrases_use_only_scene_words(dataset):
    _, refer, _ = dataset
    vocabulary = set(SCENE_WORDS)
    for tasks in refer.values():
        for task in tasks:
            assert set(task["phrase"].split()) <= vocabulary, task["phrase"]
            assert task["phrase"] == render_phrase(task["phrase_structure"])


def _instances(task) -> list[int]:
    return [int(a.split("x")[0]) - 1 for a in task["ann_ids"]]


def test_masks_from_polygons_match_rendered_visible_pixels(dataset):
    _, refer, _ = dataset
    ious = []
    for tasks in refer.values():
        by_image: dict[int, list] = {}
        for task in tasks:
            by_image.setdefault(task["image_id"], []).append(task)
        for image_id, image_tasks in by_image.items():
            scene = _scene(image_id)
            seen = set()
            for task in image_tasks:
                for index, polygons in zip(_instances(task), task["Polygons"]):
                    if index in seen:
                        continue
                    seen.add(index)
                    mask = rasterize_polygons([polygons], SIZE, SIZE).astype(bool)
                    visible = scene.owner == index + 1
                    ious.append((mask & visible).sum() / (mask | visible).sum())
    assert np.mean(ious) >= 0.97
    assert np.median(ious) == 1.0  # unoccluded shapes are pixel-exact
    assert min(ious) >= 0.6


def test_make_scene_is_pure_and_matches_the_files(dataset):
    _, refer, _ = dataset
    tasks = [t for ts in refer.values() for t in ts if t["image_id"] == 5]
    scene_a, scene_b = make_scene(SEED, 5, SIZE), make_scene(SEED, 5, SIZE)
    assert json.dumps(scene_a.tasks) == json.dumps(scene_b.tasks) == json.dumps(tasks)
    assert np.array_equal(scene_a.image, scene_b.image)


# --- an independent checker: parse the phrase text and find its referent from the scene's objects
def _match(objects: list[SceneObject], words: list[str]) -> tuple[list[SceneObject], bool]:
    *attributes, head = words
    plural = head in SINGULARS
    name = SINGULARS.get(head, head)
    assert name in PLURALS, words
    assert all(a in COLOURS or a in SIZES for a in attributes), words
    found = [
        o
        for o in objects
        if (name == "shape" or o.kind == name) and all(a in (o.colour, o.size) for a in attributes)
    ]
    return found, plural


def _holds(a: SceneObject, b: SceneObject, predicate: str) -> bool:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    offset = {"left": dx, "right": -dx, "above": dy, "below": -dy}[predicate]
    if a is b or offset <= REL_NOT * SIZE:
        return False
    assert offset >= REL_MARGIN * SIZE, "a phrase relies on an unclear relation"
    return True


def referent_of(phrase: str, objects: list[SceneObject]) -> list[int]:
    words = phrase.split()
    assert words[0] == "the"
    words = words[1:]
    if words[0] in ("largest", "smallest"):
        found, plural = _match(objects, words[1:])
        assert not plural and len(found) >= 2
        ranks = [SIZE_RANK[o.size] for o in found]
        extreme = max(ranks) if words[0] == "largest" else min(ranks)
        target = [o for o, r in zip(found, ranks) if r == extreme]
        assert len(target) == 1, f"{phrase!r}: the extreme is not unique"
        return [target[0].index]
    position = next((i for i, w in enumerate(words) if w in ("left", "right", "above", "below")), None)
    if position is None:
        found, plural = _match(objects, words)
    else:
        subject = words[:position]
        if subject[-2:-1] == ["that"]:
            assert subject[-1] == ("are" if subject[-3] in SINGULARS else "is"), phrase
            subject = subject[:-2]
        rest = words[position + 1 :]
        rest = rest[1:] if rest[0] == "of" else rest
        assert rest[0] == "the"
        references, ref_plural = _match(objects, rest[1:])
        assert len(references) == 1 and not ref_plural, f"{phrase!r}: the relation object is ambiguous"
        candidates, plural = _match(objects, subject)
        found = [o for o in candidates if _holds(o, references[0], words[position])]
    assert found, f"{phrase!r} refers to nothing"
    assert plural == (len(found) > 1), f"{phrase!r}: number does not agree with {len(found)} instance(s)"
    return sorted(o.index for o in found)


def test_every_phrase_refers_to_exactly_its_instances(dataset):
    _, refer, _ = dataset
    checked = 0
    for tasks in refer.values():
        for task in tasks:
            scene = _scene(task["image_id"])
            expected = sorted(_instances(task))
            assert referent_of(task["phrase"], scene.objects) == expected, task["phrase"]
            assert resolve_structure(task["phrase_structure"], scene.objects, SIZE) == expected
            checked += 1
    assert checked > 5 * N_IMAGES


def test_checker_catches_an_ambiguous_phrase():
    scene = make_scene(SEED, 3, SIZE)
    a = scene.objects[0]
    twin = SceneObject(99, a.kind, a.colour, a.size, a.cx + 1, a.cy, a.r, a.outline, a.parts, a.visible)
    structure = {"name": a.kind, "attributes": [a.colour], "relation_ids": [], "relation_descriptions": []}
    assert resolve_structure({**structure, "type": "attribute"}, [a], SIZE) == [a.index]
    assert resolve_structure({**structure, "type": "attribute"}, [a, twin], SIZE) is None  # now two match
    with pytest.raises(AssertionError):
        referent_of(f"the {a.colour} {a.kind}", [a, twin])


def test_subtract_convex_conserves_area():
    rng = np.random.default_rng(0)
    for _ in range(200):
        cx, cy = rng.uniform(0, 20, 2)
        square = [(cx, cy), (cx + 10, cy), (cx + 10, cy + 10), (cx, cy + 10)]
        angles = np.sort(rng.uniform(0, 2 * np.pi, 6))
        ox, oy = rng.uniform(0, 30, 2)
        occluder = [(ox + 8 * np.cos(t), oy + 8 * np.sin(t)) for t in angles]
        pieces = subtract_convex(square, occluder)
        inside = subtract_convex(square, square)  # a shape minus itself is nothing
        assert inside == []
        rest = sum(abs(polygon_area(p)) for p in pieces)
        # Monte-Carlo check of the difference's area
        pts = rng.uniform(0, 1, (4000, 2)) * 10 + [cx, cy]
        in_occ = _inside_convex(pts, occluder)
        assert rest == pytest.approx(100 * (1 - in_occ.mean()), abs=4.0)


def _inside_convex(points: np.ndarray, poly) -> np.ndarray:
    poly = np.asarray(poly)
    sign = np.sign(polygon_area([tuple(p) for p in poly]))
    inside = np.ones(len(points), bool)
    for a, b in zip(poly, np.roll(poly, -1, axis=0)):
        cross = (b[0] - a[0]) * (points[:, 1] - a[1]) - (b[1] - a[1]) * (points[:, 0] - a[0])
        inside &= sign * cross >= 0
    return inside


def test_split_helpers():
    assert parse_splits("train=8,val=1,test=1") == pytest.approx({"train": 0.8, "val": 0.1, "test": 0.1})
    with pytest.raises(ValueError):
        parse_splits("train")
    assignment = assign_splits(11, {"train": 0.8, "val": 0.1, "test": 0.1}, 0)
    assert sorted(assignment) == list(range(1, 12))
    assert Counter(assignment.values()) == {"train": 9, "val": 1, "test": 1}
    assert assign_splits(11, {"train": 0.8, "val": 0.1, "test": 0.1}, 0) == assignment


def test_every_shape_floor_is_target_area_over_all_shape_area(dataset, tmp_path):
    owner = np.zeros((10, 10), dtype=np.uint8)
    owner.flat[:10], owner.flat[10:30], owner.flat[30:60] = 1, 2, 3  # 10, 20 and 30 shape pixels
    tasks = [{"ann_ids": ["1"]}, {"ann_ids": ["2", "3"]}, {"ann_ids": ["3x1"]}]  # "3x1": a 2nd phrase for 3
    scene = Scene(0, 10, 10, [], np.zeros((10, 10, 3), np.uint8), owner, tasks)
    assert every_shape_ious(scene) == pytest.approx([10 / 60, 50 / 60, 30 / 60])

    _, refer, _ = dataset
    summary = write_scenes(tmp_path / "again", n_images=N_IMAGES, seed=SEED, size=SIZE)
    for split in SPLITS:
        image_ids = sorted({t["image_id"] for t in refer[split]})
        expected = np.mean([iou for i in image_ids for iou in every_shape_ious(_scene(i))])
        assert summary["every_shape_mean_iou"][split] == pytest.approx(expected)
        assert 0.1 < expected < 0.9
