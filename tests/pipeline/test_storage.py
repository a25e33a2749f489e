"""Storage locations (``pipeline.storage``) on the local filesystem, and what is refused.

The same functions against a real S3 server are in ``tests/system/test_s3.py``.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline import storage
from pipeline.loader import list_shards, make_eval_loader


def test_pipe_and_unknown_schemes_are_refused_with_the_location_named(tmp_path):
    with pytest.raises(storage.StorageError, match=r"'pipe:cat /etc/passwd'.*shell"):
        storage.check_location("pipe:cat /etc/passwd")
    with pytest.raises(storage.StorageError, match="nosuchfs://bucket/x"):
        storage.resolve("nosuchfs://bucket/x")
    # the loaders refuse them before any worker would try to open a shard
    with pytest.raises(storage.StorageError, match="pipe:"):
        list_shards("pipe:curl -s http://example.com/train-000000.tar")
    with pytest.raises(storage.StorageError, match="pipe:"):
        list_shards([str(tmp_path / "train-000000.tar"), "pipe:cat x.tar"])


def test_join_parent_and_name_keep_the_kind_of_location(tmp_path):
    assert storage.join("s3://bucket/runs/", "a", "b.json") == "s3://bucket/runs/a/b.json"
    assert storage.parent("s3://bucket/runs/best/") == "s3://bucket/runs"
    assert storage.name("s3://bucket/runs/best/") == "best"
    assert storage.join(str(tmp_path), "x") == str(tmp_path / "x")
    assert storage.parent(str(tmp_path / "a" / "best")) == str(tmp_path / "a")
    assert storage.is_uri("file:///x") and not storage.is_uri("/x") and not storage.is_uri("runs/x")


def test_upload_and_download_a_folder_round_trip(tmp_path):
    source = tmp_path / "ckpt"
    (source / "backbone").mkdir(parents=True)
    files = {"meta.json": b'{"a": 1}', "model.safetensors": bytes(range(256)) * 40, "backbone/c.json": b"{}"}
    for relative, data in files.items():
        (source / relative).write_bytes(data)
    # a stale file of an earlier upload disappears: the target is replaced, not merged
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "stale.bin").write_bytes(b"old")
    storage.upload_dir(source, str(tmp_path / "dest"))
    uri = (tmp_path / "dest").as_uri()  # file://: the URI code path on the local filesystem
    assert [storage.name(u) for u in storage.list_files(uri, recursive=True)] == sorted(
        Path(r).name for r in files
    )
    back = storage.download_dir(uri, tmp_path / "back")
    assert {p.relative_to(back).as_posix(): p.read_bytes() for p in back.rglob("*") if p.is_file()} == files
    with storage.local_copy(str(tmp_path / "dest")) as folder:
        assert folder == tmp_path / "dest"  # a local folder is used in place, not copied
    storage.write_bytes(storage.join(uri, "report.json"), b"{}")
    assert storage.read_bytes(str(tmp_path / "dest" / "report.json")) == b"{}"
    assert not [p for p in (tmp_path / "dest").iterdir() if ".tmp-" in p.name]


def _write_shard(path: Path, samples: list[tuple[str, bytes, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, jpg, js in samples:
            for ext, data in (("jpg", jpg), ("json", js)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_eval_loader_reads_the_same_items_from_a_folder_and_its_file_uri(tmp_path):
    from PIL import Image

    from pipeline.schema import ImageRecord, Task

    def sample(i: int) -> tuple[str, bytes, bytes]:
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30), (i * 20, 0, 0)).save(buffer, format="JPEG")
        task = Task(task_id=f"t{i}", phrase=f"thing {i}", polygons=[[[[2, 2], [20, 2], [20, 20]]]])
        record = ImageRecord(source="test", image_id=str(i), split="test", width=40, height=30, tasks=[task])
        return record.key, buffer.getvalue(), record.to_json()

    folder = tmp_path / "shards"
    folder.mkdir()
    _write_shard(folder / "test-000000.tar", [sample(0), sample(1)])
    _write_shard(folder / "test-000001.tar", [sample(2)])
    (folder / "notes.tar").write_bytes(b"not a shard of the split")

    def tokenize(phrases):
        import torch

        return {"input_ids": torch.ones(len(phrases), 4), "attention_mask": torch.ones(len(phrases), 4)}

    urls, _ = list_shards(folder.as_uri(), "test")
    assert urls == [(folder / "test-000000.tar").as_uri(), (folder / "test-000001.tar").as_uri()]
    batches = {}
    for location in (str(folder), folder.as_uri()):
        loader = make_eval_loader(location, split="test", batch_size=2, image_size=32, tokenizer=tokenize)
        batches[location] = list(loader)
    plain, uri = batches.values()
    assert [b["task_id"] for b in plain] == [["t0", "t1"], ["t2"]]
    assert [b["task_id"] for b in uri] == [b["task_id"] for b in plain]
    for a, b in zip(plain, uri):
        assert np.array_equal(a["pixel_values"].numpy(), b["pixel_values"].numpy())
        assert np.array_equal(a["masks"].numpy(), b["masks"].numpy())


def test_eval_default_output_lies_beside_the_checkpoint_never_inside(tmp_path, capsys):
    from jobs.eval import _inside, default_out, main

    assert default_out("s3://b/runs/r1/best", "test") == "s3://b/runs/r1/eval-best-test"
    assert default_out(str(tmp_path / "r1" / "best"), "val") == str(tmp_path / "r1" / "eval-best-val")
    assert _inside("s3://b/runs/r1/best/eval", "s3://b/runs/r1/best")
    assert not _inside("s3://b/runs/r1/best-eval", "s3://b/runs/r1/best")
    assert not _inside(default_out(str(tmp_path / "best"), "test"), str(tmp_path / "best"))

    checkpoint = tmp_path / "best"
    checkpoint.mkdir()
    code = main(["--checkpoint", str(checkpoint), "--data", str(tmp_path), "--out", str(checkpoint / "eval")])
    assert code == 2
    assert "inside the checkpoint" in capsys.readouterr().out
    assert not (checkpoint / "eval").exists()
    assert main(["--checkpoint", "pipe:cat x", "--data", str(tmp_path)]) == 2
    assert "shell" in capsys.readouterr().out
