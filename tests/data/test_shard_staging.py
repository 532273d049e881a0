"""Staging folders that a killed shard writer leaves behind are cleaned by the next write, and logged."""
from __future__ import annotations

import logging
import os
import signal
import time

from vlsafe.data.schema import Sample
from vlsafe.data.shards import STAGING_PREFIX, _host_tag, read_samples, write_shards


def qa(sample_id: str) -> Sample:
    return Sample(id=sample_id, messages=[{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}])


def killed_writer(out) -> int:
    """A forked `write_shards` that stages three one-sample shards, then is SIGKILLed (so none of its cleanup
    runs, as after an OOM kill or a lost node); returns its pid."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the writer
        try:
            os.close(read_end)

            def samples():
                yield from (qa(f"killed-{i}") for i in range(3))
                os.write(write_end, b"staged")
                time.sleep(60)

            write_shards(samples(), out, max_samples=1)
        finally:
            os._exit(1)
    os.close(write_end)
    try:
        assert os.read(read_end, 6) == b"staged"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
    return pid


def test_staging_left_by_a_sigkilled_writer_is_removed_by_the_next_write_live_ones_are_kept(tmp_path, caplog):
    out = tmp_path / "shards"
    pid = killed_writer(out)
    [left] = list(out.glob(STAGING_PREFIX + "*"))
    assert f"-{pid}-" in left.name and len(list(left.glob("*.tar"))) == 3
    # a folder of a live writer on this host (here: pytest's parent process) and one of an older, unnamed writer
    live = out / f"{STAGING_PREFIX}{_host_tag()}-{os.getppid()}-live"
    unnamed = out / f"{STAGING_PREFIX}k2j3h4"
    for folder in (live, unnamed):
        folder.mkdir()
    hour_ago = time.time() - 3600
    os.utime(unnamed, (hour_ago, hour_ago))

    with caplog.at_level(logging.WARNING, logger="vlsafe.data.shards"):
        write_shards([qa("new-0"), qa("new-1")], out, max_samples=1)
    assert [s.id for s in read_samples(out)] == ["new-0", "new-1"]
    assert sorted(p.name for p in out.glob(STAGING_PREFIX + "*")) == [live.name], "only the live writer's folder"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{left} left by an interrupted shard write (its writer (pid {pid}) is no longer running)" in logged
    assert f"{unnamed} left by an interrupted shard write (it is older than this successful write" in logged
