"""Synthetic prompts (pipeline/prompts.py): every guard that keeps a generated phrase on the original mask."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pipeline import prompts
from pipeline.schema import ImageRecord, Task

SEEDS = range(200)
ALL_ON = {"template": 3.0, "recomposed": 10.0, "relation_rewrite": 1.0, "negative": 3.0}


def square(x: float, y: float, size: float = 10.0) -> list[list[list[float]]]:
    """One instance: one square polygon."""
    return [[[x, y], [x + size, y], [x + size, y + size], [x, y + size]]]


def task(
    task_id: str,
    phrase: str,
    name: str | None,
    attributes: list[str] | None = None,
    relations: list[list[str]] | None = None,
    *,
    type_: str = "name",
    instances: list | None = None,
) -> Task:
    instances = instances if instances is not None else [square(0, 0)]
    ps = None
    if name is not None:
        ps = {
            "name": name,
            "attributes": attributes or [],
            "relation_ids": list(range(len(relations or []))),
            "relation_descriptions": relations or [],
            "type": type_,
        }
    boxes = [[inst[0][0][0], inst[0][0][1], 10.0, 10.0] for inst in instances]
    return Task(task_id=task_id, phrase=phrase, polygons=instances, boxes=boxes, phrase_structure=ps)


def record(*tasks: Task, image_id: int = 1) -> ImageRecord:
    return ImageRecord(
        source="test", image_id=image_id, split="train", width=100, height=100, tasks=list(tasks)
    )


def generated(rec: ImageRecord, kind: str | None = None) -> list[Task]:
    return [t for t in rec.tasks if t.kind != "original" and (kind is None or t.kind == kind)]


def run_seeds(rec: ImageRecord, rates: dict[str, float], pool=(), seeds=SEEDS) -> list[Task]:
    out: list[Task] = []
    for seed in seeds:
        out += generated(
            prompts.augment_record(rec, rng=random.Random(seed), rates=rates, negative_pool=pool)
        )
    return out


# ------------------------------------------------------------------------------------------ templates


def test_all_nine_templates_keep_phrase_core_and_target():
    original = task("1__5", "the red cup", "cup", ["red"], type_="attribute")
    rec = record(original)
    produced = run_seeds(rec, {"template": 1.0}, seeds=range(120))
    assert {t.kind for t in produced} == {"template"}
    assert {t.phrase for t in produced} == {tpl.format("red cup") for tpl in prompts.CLIPSEG_TEMPLATES}
    assert "a photo of a red cup." in {t.phrase for t in produced}  # the leading article is stripped
    for t in produced:
        assert "red cup" in t.phrase
        assert (
            "the red cup" not in t.phrase or t.phrase == "a photo of the red cup."
        )  # only the template's "the"
        assert t.polygons == original.polygons and t.boxes == original.boxes
        assert t.source_task_id == "1__5"
        assert t.phrase_structure == original.phrase_structure  # type kept
        assert t.polygons is not original.polygons  # a copy: editing one never edits the other


def test_one_template_per_task_by_default_and_single_instance_template_skipped_for_groups():
    many = task("1__1_2", "cups", "cups", instances=[square(0, 0), square(50, 50)])
    phrases = prompts.template_phrases(many)
    assert len(phrases) == 8 and "a photo of one cups." not in phrases
    rec = record(task("1__3", "dog", "dog"), many)
    out = prompts.augment_record(rec, rng=random.Random(0), rates={"template": 1.0})
    assert [t.source_task_id for t in generated(out)] == ["1__3", "1__1_2"]


# ------------------------------------------------------------------------------------- recomposition


def two_red_circles(type_: str) -> ImageRecord:
    return record(
        task("1__1", "small red circle", "circle", ["small", "red"], type_=type_, instances=[square(0, 0)]),
        task(
            "1__2",
            "large red circle",
            "circle",
            ["large", "red"],
            type_=type_,
            instances=[square(50, 50, 30)],
        ),
    )


@pytest.mark.parametrize("type_", ["name", "attribute"])  # "name" here is mislabelled: rule 2 must still hold
def test_ambiguous_reduction_never_generated(type_):
    rec = two_red_circles(type_)
    forbidden = {"red circle", "circle", "circles", "red circles"}
    produced = run_seeds(rec, ALL_ON, pool=[("dog", "brown dog")])
    assert not [t for t in produced if t.kind == "recomposed"]
    for t in produced:
        assert prompts.strip_article(t.phrase).lower() not in forbidden
        for tpl in prompts.CLIPSEG_TEMPLATES:
            assert t.phrase not in {tpl.format(f) for f in forbidden}


def test_unique_name_produces_reduced_phrases_with_the_same_target():
    circle = task("1__1", "small red circle", "circle", ["small", "red"], instances=[square(0, 0)])
    rec = record(circle, task("1__2", "blue square", "square", ["blue"], instances=[square(50, 50)]))
    produced = [t for t in run_seeds(rec, {"recomposed": 10.0}) if t.source_task_id == "1__1"]
    assert {t.phrase for t in produced} == {"red circle", "small circle", "circle"}
    for t in produced:
        assert t.kind == "recomposed" and t.polygons == circle.polygons
    types = {t.phrase: t.phrase_structure["type"] for t in produced}
    assert types == {"red circle": "attribute", "small circle": "attribute", "circle": "name"}


def test_name_plus_relation_recomposition():
    circle = task("1__1", "small circle left of square", "circle", ["small"], [["left of", "square"]])
    rec = record(circle)
    phrases = {p for p, _ in prompts.recomposed_structures(circle, rec.tasks)}
    assert phrases == {"circle left of square", "small circle", "circle"}


@pytest.mark.parametrize("type_", ["attribute", "relation", "verbose"])
def test_rule1_phrase_types_that_needed_their_parts_are_never_reduced(type_):
    # PhraseCut writes these types only when same-category objects exist in the scene graph, maybe untasked
    circle = task(
        "1__1", "small circle left of square", "circle", ["small"], [["left of", "square"]], type_=type_
    )
    assert prompts.recomposed_structures(circle, [circle]) == []


def test_same_target_does_not_block_and_existing_phrases_are_not_repeated():
    a = task("1__1", "red circle", "circle", ["red"], instances=[square(0, 0)])
    b = task("1__9", "circle", "circle", instances=[square(0, 0)])  # same instances: same mask
    assert prompts.recomposition_allowed(a, [a, b])
    assert prompts.recomposed_structures(a, [a, b]) == []  # "circle" already exists on the image


@pytest.mark.parametrize(
    ("mine", "other"),
    [("cup", "cups"), ("cup", "coffee cup"), ("man", "person"), ("woman", "people"), ("Cup", "the cup")],
)
def test_conflicting_names_with_other_targets_block(mine, other):
    a = task("1__1", f"red {mine}", mine, ["red"], instances=[square(0, 0)])
    b = task("1__2", other, other, instances=[square(50, 50)])
    assert prompts.names_conflict(mine, other)
    assert not prompts.recomposition_allowed(a, [a, b])


def test_unrelated_name_and_inconsistent_structure():
    a = task("1__1", "red cup", "cup", ["red"])
    assert prompts.recomposition_allowed(
        a, [a, task("1__2", "cup holder", "cup holder", instances=[square(5, 5)])]
    )
    # structure that does not match the phrase is not trusted
    assert not prompts.recomposition_allowed(task("1__3", "red mug", "cup", ["red"]), [])
    assert not prompts.recomposition_allowed(task("1__4", "red cup", "cup", ["blue"]), [])


# ------------------------------------------------------------------------------------ relation rewrite


def test_relation_rewrite_cup_on_table():
    cup = task("1__1", "cup on table", "cup", [], [["on", "table"]], type_="relation")
    assert prompts.relation_rewrite(cup) == "the cup that is on the table"
    out = prompts.augment_record(record(cup), rng=random.Random(0), rates={"relation_rewrite": 1.0})
    (rewrite,) = generated(out)
    assert rewrite.kind == "relation_rewrite" and rewrite.phrase == "the cup that is on the table"
    assert rewrite.polygons == cup.polygons and rewrite.phrase_structure["type"] == "relation"


@pytest.mark.parametrize(
    ("phrase", "name", "atts", "rels", "expected"),
    [
        ("cups on table", "cups", [], [["on", "table"]], "the cups that are on the table"),
        ("man with hat", "man", [], [["with", "hat"]], "the man that has the hat"),
        ("man holding umbrella", "man", [], [["holding", "umbrella"]], "the man that is holding the umbrella"),
        ("dog has collar", "dog", [], [["has", "collar"]], "the dog that has the collar"),
        ("red cup on table near window", "cup", ["red"], [["on", "table"], ["near", "window"]],
         "the red cup that is on the table and is near the window"),
        ("circle left of square", "circle", [], [["left of", "square"]], "the circle that is left of the square"),
        ("cup on table", "cup", [], [["under", "table"]], None),  # relation not in the phrase
        ("cup", "cup", [], [["on", "table"]], None),
        ("on table", "cup", [], [["on", "table"]], None),  # no subject left
        ("cup on table", "cup", [], [], None),
    ],
)  # fmt: skip
def test_relation_rewrite_cases(phrase, name, atts, rels, expected):
    assert prompts.relation_rewrite(task("1__1", phrase, name, atts, rels, type_="relation")) == expected


def test_missing_structure_parts_are_handled():
    bare = Task(task_id="1__1", phrase="cup", polygons=[square(0, 0)], phrase_structure=None)
    odd = Task(task_id="1__2", phrase="mug", polygons=[square(50, 50)], phrase_structure={"name": "mug"})
    broken = Task(
        task_id="1__3",
        phrase="bowl on shelf",
        polygons=[square(20, 20)],
        phrase_structure={
            "name": "bowl",
            "type": "name",
            "attributes": None,
            "relation_descriptions": [["on"]],
        },
    )
    rec = record(bare, odd, broken)
    out = prompts.augment_record(rec, rng=random.Random(1), rates=ALL_ON, negative_pool=[("dog", "dog")])
    assert {t.kind for t in generated(out)} <= {"template", "negative"}
    assert prompts.relation_rewrite(broken) is None


# --------------------------------------------------------------------------------------------- negatives


def test_negatives_never_name_an_object_of_the_image():
    rec = record(
        task("1__1", "coffee cup on table", "coffee cup", [], [["on", "table"]], type_="relation"),
        task("1__2", "man", "man", instances=[square(50, 50)]),
        task("1__3", "white plates", "plates", ["white"], type_="attribute", instances=[square(20, 60)]),
    )
    allowed = {"dog", "tall tree"}
    pool = [
        ("dog", "brown dog"),
        ("tall tree", "tall tree"),
        ("cup", "cup"),  # a coffee cup is a cup
        ("cups", "two cups"),
        ("coffee", "coffee"),
        ("table", "wooden table"),  # a relation object of the image
        ("plate", "plate"),  # singular of a name in the image
        ("person", "person on left"),  # synonym group of "man"
        ("women", "women"),
        ("object", "object"),  # generic
        ("white", "white"),  # a word of a phrase
        ("the", "the"),  # nothing but stopwords
    ]
    produced = run_seeds(rec, {"negative": 3.0}, pool=pool)
    assert produced, "expected some negatives"
    for t in produced:
        assert t.kind == "negative"
        assert t.phrase_structure["name"] in allowed
        assert t.polygons == [] and t.boxes == []
        assert t.phrase_structure["negative"] is True
        assert t.source_task_id in {"1__1", "1__2", "1__3"}
    assert {t.phrase for t in produced} == {"brown dog", "tall tree"}


def test_negative_vocabulary_and_check():
    vocab = prompts.image_vocabulary(
        [task("1__1", "coffee cups on the table", "coffee cups", [], [["on", "table"]])]
    )
    assert {"coffee", "cup", "table"} <= vocab and "the" not in vocab
    assert not prompts.negative_allowed("cup", vocab)
    assert not prompts.negative_allowed("glass of coffee", vocab)
    assert prompts.negative_allowed("horse", vocab)
    assert not prompts.negative_allowed("thing", vocab)


def test_negative_rate_is_probability_per_original():
    rec = record(*(task(f"1__{i}", f"shape{i}", f"shape{i}", instances=[square(i, i)]) for i in range(5)))
    pool = [(f"animal{i}", f"animal{i}") for i in range(100)]
    counts = [len(generated(prompts.augment_record(rec, rng=random.Random(s), rates={"negative": 0.2},
                                                    negative_pool=pool))) for s in range(400)]  # fmt: skip
    mean = sum(counts) / len(counts)
    assert 0.8 < mean < 1.2  # 0.2 × 5 originals


def test_no_pool_no_negatives():
    out = prompts.augment_record(
        record(task("1__1", "cup", "cup")), rng=random.Random(0), rates={"negative": 5}
    )
    assert generated(out) == []


def test_build_negative_pool_skips_generated_dedupes_caps_and_is_deterministic():
    rec_a = record(task("1__1", "cup", "cup"), task("1__2", "cup", "cup", instances=[square(40, 40)]))
    rec_a.tasks.append(Task("1__1__negative0", "dog", [], kind="negative", phrase_structure={"name": "dog"}))
    rec_a.tasks.append(Task("1__1__template0", "a photo of a cup.", [square(0, 0)], kind="template"))
    rec_b = record(Task("2__1", "blue sky", [square(0, 0)], phrase_structure=None), image_id=2)
    assert prompts.build_negative_pool([rec_a, rec_b]) == [("cup", "cup"), ("blue sky", "blue sky")]
    many = [record(task(f"{i}__1", f"thing{i}", f"thing{i}"), image_id=i) for i in range(50)]
    pool = prompts.build_negative_pool(many, max_size=10, rng=random.Random(3))
    assert len(pool) == 10 and len(set(pool)) == 10
    assert pool == prompts.build_negative_pool(many, max_size=10, rng=random.Random(3))
    with pytest.raises(ValueError):
        prompts.build_negative_pool(many, max_size=-1)


# ---------------------------------------------------------------------------------- determinism, ids


def busy_record() -> ImageRecord:
    return record(
        task("7__1", "small red circle left of square", "circle", ["small", "red"], [["left of", "square"]]),
        task("7__2", "blue square", "square", ["blue"], type_="attribute", instances=[square(50, 50)]),
        task(
            "7__3",
            "cups on table",
            "cups",
            [],
            [["on", "table"]],
            type_="relation",
            instances=[square(5, 70)],
        ),
        # an original whose id looks like a generated one must not be overwritten
        task("7__1__template0", "green triangle", "triangle", ["green"], instances=[square(70, 5)]),
        image_id=7,
    )


POOL = [("dog", "brown dog"), ("horse", "horse"), ("tree", "tall tree"), ("circle", "big circle")]


def test_same_seed_same_output_and_ids_unique():
    rec = busy_record()
    before = rec.to_json()
    first = prompts.augment_record(rec, rng=random.Random(42), rates=ALL_ON, negative_pool=POOL)
    again = prompts.augment_record(rec, rng=random.Random(42), rates=ALL_ON, negative_pool=POOL)
    assert first.to_json() == again.to_json()
    assert rec.to_json() == before  # the input record is not modified
    assert first.tasks[: len(rec.tasks)] == rec.tasks  # originals first, unchanged
    ids = [t.task_id for t in first.tasks]
    assert len(ids) == len(set(ids))
    original_ids = {t.task_id for t in rec.tasks}
    for t in generated(first):
        assert t.task_id not in original_ids and t.task_id.startswith(f"{t.source_task_id}__{t.kind}")
    assert {t.kind for t in generated(first)} == {"template", "recomposed", "relation_rewrite", "negative"}
    outputs = {prompts.augment_record(rec, rng=random.Random(s), rates=ALL_ON, negative_pool=POOL).to_json()
               for s in range(5)}  # fmt: skip
    assert len(outputs) > 1


def test_record_rng_is_stable():
    assert prompts.record_rng(3, "a_1").random() == prompts.record_rng(3, "a_1").random()
    assert prompts.record_rng(3, "a_1").random() != prompts.record_rng(4, "a_1").random()


@pytest.mark.parametrize("kind", prompts.GENERATED_KINDS)
def test_rate_zero_gives_none_of_that_kind(kind):
    rates = {**ALL_ON, kind: 0.0}
    produced = run_seeds(busy_record(), rates, pool=POOL, seeds=range(30))
    assert kind not in {t.kind for t in produced}
    assert produced  # the other kinds still come


def test_all_rates_zero_gives_the_record_back():
    rec = busy_record()
    out = prompts.augment_record(rec, rng=random.Random(0), rates=dict.fromkeys(prompts.GENERATED_KINDS, 0.0),
                                 negative_pool=POOL)  # fmt: skip
    assert out.tasks == rec.tasks


def test_parse_rates():
    assert prompts.parse_rates([]) == prompts.DEFAULT_RATES
    assert prompts.parse_rates(["template=2", " negative = 0.5"]) == {**prompts.DEFAULT_RATES, "template": 2.0,
                                                                       "negative": 0.5}  # fmt: skip
    with pytest.raises(ValueError, match="unknown prompt kind 'paraphrase'"):
        prompts.parse_rates(["paraphrase=1"])
    with pytest.raises(ValueError, match="kind=R"):
        prompts.parse_rates(["template"])
    with pytest.raises(ValueError, match="not a number"):
        prompts.parse_rates(["template=lots"])
    with pytest.raises(ValueError, match=">= 0"):
        prompts.parse_rates(["negative=-1"])
    with pytest.raises(ValueError, match=">= 0"):
        prompts.parse_rates(["negative=nan"])
    with pytest.raises(ValueError, match="unknown prompt kind"):
        prompts.augment_record(busy_record(), rng=random.Random(0), rates={"original": 1.0})


def test_normalise_name():
    assert prompts.normalise_name("The Coffee Cups") == "coffee cup"


# ------------------------------------------------------------------------------- synth-prompts job


def write_set(base, records_by_shard: dict[str, list[ImageRecord]]) -> None:
    """A finished shard set through the shard set's own writers (what `segvlm prepare` leaves)."""
    import pyarrow.fs as pafs

    from pipeline import manifest as mf
    from pipeline import shards

    fs = pafs.LocalFileSystem()
    rows, sizes = [], {}
    for name, recs in records_by_shard.items():
        samples = [(rec, f"jpeg-of-{rec.key}".encode()) for rec in recs]
        info = shards.write_shard(samples, fs, str(base / name))
        sizes[name] = info.samples
        rows += [row for rec in recs for row in mf.manifest_rows(rec, name)]
    mf.write_manifest(fs, str(base), rows, sizes)


def scene(image_id: int, split: str, names: list[str]) -> ImageRecord:
    tasks = [
        task(
            f"{image_id}__{i}",
            f"red {n} left of box",
            n,
            ["red"],
            [["left of", "box"]],
            instances=[square(9 * i, 0)],
        )
        for i, n in enumerate(names)
    ]
    return ImageRecord(source="scenes", image_id=image_id, split=split, width=100, height=100, tasks=tasks)


@pytest.fixture
def shard_set(tmp_path):
    train = [scene(i, "train", [f"circle{i}", f"square{i}"]) for i in range(6)]
    val = [scene(100 + i, "val", [f"cat{i}"]) for i in range(3)]
    write_set(
        tmp_path / "in", {"train-000000.tar": train[:4], "train-000001.tar": train[4:], "val-000000.tar": val}
    )
    return tmp_path / "in", train + val


def read_set(path) -> dict[str, tuple[ImageRecord, bytes]]:
    from pipeline import shards

    return {rec.key: (rec, jpg) for rec, jpg in shards.iter_shard_set(str(path))}


def test_synth_prompts_round_trip(shard_set, tmp_path):
    from jobs import synth_prompts
    from pipeline import manifest as mf

    src, _ = shard_set
    out = tmp_path / "out"
    argv = ["--shards", str(src), "--out", str(out), "--rates", "negative=1", "--seed", "3"]
    assert synth_prompts.main(argv) == 0
    assert mf.is_complete(str(out))
    assert mf.load_sizes(str(out)) == mf.load_sizes(str(src))  # same shard names and sizes
    table = mf.load_manifest(str(out)).to_pylist()
    kinds = Counter(r["kind"] for r in table)
    assert set(kinds) == {"original", "template", "recomposed", "relation_rewrite", "negative"}
    assert kinds["original"] == kinds["template"] == kinds["relation_rewrite"] == 15
    assert all(r["size"] == "none" for r in table if r["kind"] == "negative")
    before, after = read_set(src), read_set(out)
    assert before.keys() == after.keys()
    for key, (rec, jpg) in before.items():
        new, new_jpg = after[key]
        assert new_jpg == jpg  # images pass through untouched
        assert new.tasks[: len(rec.tasks)] == rec.tasks  # originals unchanged, first
        manifest_ids = {r["task_id"] for r in table if r["key"] == key}
        assert manifest_ids == {t.task_id for t in new.tasks}
        for t in new.tasks:
            if t.kind == "negative":  # negatives of a split come from that split's phrases only
                assert t.phrase_structure["name"].startswith(
                    "cat" if rec.split == "val" else ("circle", "square")
                )
    summary = mf.load_summary(str(out))
    assert summary["tasks_per_kind"] == dict(sorted(kinds.items())) and summary["seed"] == 3

    # same seed: same bytes; a prompt set as input gives the same set again (its prompts are regenerated)
    again = tmp_path / "again"
    assert (
        synth_prompts.main(
            ["--shards", str(out), "--out", str(again), "--rates", "negative=1", "--seed", "3"]
        )
        == 0
    )
    assert mf.manifest_hash(str(again)) == mf.manifest_hash(str(out))
    assert (again / "train-000001.tar").read_bytes() == (out / "train-000001.tar").read_bytes()


def test_synth_prompts_one_split_and_guards(shard_set, tmp_path, capsys):
    from jobs import synth_prompts
    from pipeline import manifest as mf

    src, _ = shard_set
    out = tmp_path / "val"
    assert synth_prompts.main(["--shards", str(src), "--out", str(out), "--split", "val"]) == 0
    assert mf.load_sizes(str(out)) == {"val-000000.tar": 3}
    # a finished set is not replaced without --overwrite; with it, stale shards go
    assert synth_prompts.main(["--shards", str(src), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (
        synth_prompts.main(["--shards", str(src), "--out", str(out), "--overwrite", "--split", "train"]) == 0
    )
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    # bad inputs: one line on stderr, exit 2
    for argv, message in [
        (["--shards", str(src), "--out", str(src)], "must differ"),
        (["--shards", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")], "not a finished shard set"),
        (["--shards", str(src), "--out", str(tmp_path / "y"), "--rates", "bogus=1"], "unknown prompt kind"),
        (
            ["--shards", str(src), "--out", str(tmp_path / "z"), "--split", "test"],
            "no shards of split 'test'",
        ),
    ]:
        assert synth_prompts.main(argv) == 2
        assert message in capsys.readouterr().err
    (src / "sizes.json").unlink()  # an unfinished input set
    assert synth_prompts.main(["--shards", str(src), "--out", str(tmp_path / "w")]) == 2


def test_synth_prompts_respects_the_output_lock_and_other_runs_temp_files(shard_set, tmp_path, capsys):
    from jobs import synth_prompts
    from pipeline import manifest as mf
    from pipeline import shards
    from pipeline.runlock import RunLock

    src, _ = shard_set
    out = tmp_path / "out"
    fs, base = shards.resolve(str(out))
    holder = RunLock(fs, base, "aaaaaaaaaaaa", settle=0.0, heartbeat=3600).acquire()
    foreign = out / "train-000000.tar.tmp-bbbbbbbbbbbb-12345678"  # a third run's upload in progress
    foreign.write_bytes(b"not ours")
    try:
        assert synth_prompts.main(["--shards", str(src), "--out", str(out)]) == 3
        assert "aaaaaaaaaaaa" in capsys.readouterr().err
        assert not mf.is_complete(str(out)) and not list(out.glob("*.tar"))
        left = out / "train-000001.tar.tmp-aaaaaaaaaaaa-87654321"  # the holder's leftover
        left.write_bytes(b"partial")
    finally:
        holder.release()
    assert synth_prompts.main(["--shards", str(src), "--out", str(out)]) == 0
    assert mf.is_complete(str(out))
    assert not left.exists()  # the run it took over from is over: its temp file went
    assert foreign.read_bytes() == b"not ours"  # another run's never goes


def test_cli_dispatches_synth_prompts(capsys):
    from jobs import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["synth-prompts", "--help"])
    assert exit_info.value.code == 0
    assert "--rates" in capsys.readouterr().out


def test_prompts_of_an_rle_task_keep_its_rles_and_negatives_have_none():
    # a RefCOCO-style task: the target is a COCO RLE, no polygon, no phrase structure
    rle = {"size": [20, 30], "counts": "b03c03"}
    crowd = Task(task_id="7", phrase="the crowd on the left", polygons=[], boxes=[[1, 2, 3, 4]], rles=[rle])
    rec = ImageRecord(source="refcoco", image_id=1, split="train", width=30, height=20, tasks=[crowd])
    out = prompts.augment_record(
        rec, rng=random.Random(0), rates={"template": 2.0, "negative": 1.0}, negative_pool=[("cat", "a cat")]
    )
    made = generated(out)
    templates = [t for t in made if t.kind == "template"]
    negatives = [t for t in made if t.kind == "negative"]
    assert templates and negatives
    assert all(t.rles == [rle] and t.boxes == [[1, 2, 3, 4]] and t.has_target for t in templates)
    assert all(t.rles == [] and not t.has_target for t in negatives)
    assert templates[0].rles is not crowd.rles  # a copy: editing one task never edits another
