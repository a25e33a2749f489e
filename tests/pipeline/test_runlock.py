"""The output lock on a real S3 server (SeaweedFS on 127.0.0.1, the session fixture ``s3_server``): a second
run is refused, a stale holder is taken over and notices it, and a released lock is free. No Ray."""

from __future__ import annotations

import uuid

import pytest

from pipeline import shards
from pipeline.prepare import PrepareConfig, run_prepare
from pipeline.runlock import LOCK_NAME, OutputLocked, RunLock

pytestmark = pytest.mark.slow


@pytest.fixture()
def s3_out(request, monkeypatch):
    try:  # the shared SeaweedFS fixture (tests/conftest.py); absent from a checkout without S3 tests
        s3_server = request.getfixturevalue("s3_server")
    except pytest.FixtureLookupError:
        pytest.skip("no s3_server fixture in this checkout")
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server.uri("locks", uuid.uuid4().hex[:8])


def test_s3_lock_refuses_a_second_run_and_survives_takeover(s3_out, tmp_path):
    fs, base = shards.resolve(s3_out)
    # heartbeat=3600: the holder's thread sleeps, so the test renews by hand (no timing races)
    first = RunLock(fs, base, "aaaaaaaaaaaa", heartbeat=3600, settle=0.2).acquire()
    try:
        with pytest.raises(OutputLocked, match="aaaaaaaaaaaa"):
            run_prepare(PrepareConfig("phrasecut", str(tmp_path), "train", s3_out), log=lambda _: None)
        assert first.refresh()
        first.check()  # still ours
        # a run that judges the holder dead (stale_after=0) takes over; the holder finds out and stops
        second = RunLock(fs, base, "bbbbbbbbbbbb", settle=0.2, stale_after=0.0).acquire()
        assert second.previous["run_id"] == "aaaaaaaaaaaa"
        assert not first.refresh()
        with pytest.raises(OutputLocked, match="bbbbbbbbbbbb"):
            first.check()
        second.release()
        assert b'"state": "released"' in shards.read_bytes(fs, shards.join(base, LOCK_NAME))
        with RunLock(fs, base, "cccccccccccc", settle=0.2) as third:  # free at once after a release
            assert third.previous["run_id"] == "bbbbbbbbbbbb"
        assert shards.temp_files(fs, base) == []  # the lock's own writes left no temp objects
    finally:
        first._stop.set()
