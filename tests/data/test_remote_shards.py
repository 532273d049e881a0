"""Shards read over HTTP from a real server on 127.0.0.1: complete epochs despite dropped connections, a named error
(url, bytes read) when the retries or the time budget run out, never a hang, and exact mid-epoch resume."""
from __future__ import annotations

import re
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from vlsafe.data.datamodule import ShardDataModule, ShardStream, Source
from vlsafe.data.remote import RemoteReadPolicy, ShardReadError, http_url
from vlsafe.data.schema import Sample
from vlsafe.data.shards import iter_shard, load_index, read_samples, write_shards

FAST = RemoteReadPolicy(timeout=10.0, read_timeout=2.0, retries=3, backoff=0.01, backoff_max=0.05)
SHARDS = [f"set/shard-{i:06d}.tar" for i in range(5)]


class ShardServer(ThreadingHTTPServer):
    """Serves a folder; can cut a response after a byte offset of the object, or stall after one, per path.

    `drops[path] = (times, offset)`: the next `times` responses for `path` that start at or before `offset` send the
    bytes up to `offset` and close the connection (`reset=True`: with a TCP reset). `stalls[path] = offset`: every
    response for `path` sends its headers and the bytes up to `offset`, then nothing until the test ends."""

    daemon_threads = True

    def __init__(self, root: Path, ranges: bool = True):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.ranges = root, ranges
        self.drops: dict[str, tuple[int, int]] = {}
        self.stalls: dict[str, int] = {}
        self.reset = False
        self.released = threading.Event()
        self.requests: Counter = Counter()  # path -> GETs
        self.partial: Counter = Counter()  # path -> 206 answers (resumed with Range)
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ShardServer

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:
        server, name = self.server, self.path.lstrip("/")
        with server.lock:
            server.requests[name] += 1
        path = server.root / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if wanted and server.ranges:
            start = int(wanted.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            with server.lock:
                server.partial[name] += 1
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", f'"{zlib.crc32(data):08x}"')
        self.end_headers()
        cut = None
        with server.lock:
            times, offset = server.drops.get(name, (0, 0))
            if times and start <= offset:
                server.drops[name] = (times - 1, offset)
                cut = offset - start
        if name in server.stalls:
            self.wfile.write(data[start:max(start, server.stalls[name])])
            self.wfile.flush()
            server.released.wait(30)
            self.close_connection = True
        elif cut is not None:
            self.wfile.write(data[start:start + cut])
            self.wfile.flush()
            if server.reset:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
        else:
            self.wfile.write(data[start:])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """`<root>/set`: 41 text samples in 5 shards of ~10 KB (10, 10, 10, 10, 1)."""
    out = tmp_path_factory.mktemp("store")
    samples = (Sample(id=f"s{i}", messages=[{"role": "user", "content": f"question {i} " * 20},
                                            {"role": "assistant", "content": "answer"}]) for i in range(41))
    write_shards(samples, out / "set", max_samples=10)
    return out


def serve(root: Path, ranges: bool = True):
    server = ShardServer(root, ranges)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    return server


@pytest.fixture
def server(root):
    server = serve(root)
    yield server
    server.released.set()
    server.shutdown()
    server.server_close()


class IdEncoder:
    def encode(self, sample):
        return sample.id

    def collate(self, items):
        return list(items)


def epoch(path: str, num_workers: int = 0, remote: RemoteReadPolicy = FAST, on_error: str = "raise") -> list:
    """A shuffled, padded training epoch of one rank as batches of sample ids."""
    stream = ShardStream([Source(path).planned(remote)], IdEncoder(), batch_size=4, num_workers=num_workers, seed=7,
                         shuffle=True, shuffle_buffer=6, pad_to_equal=True, on_error=on_error, remote=remote)
    return list(DataLoader(stream, batch_size=None, num_workers=num_workers))


def test_http_epoch_equals_disk_epoch(root, server, monkeypatch):
    disk = epoch(str(root / "set"), num_workers=2)
    assert epoch(f"{server.url}/set", num_workers=2) == disk
    assert [s.id for s in read_samples(f"{server.url}/set", remote=FAST)] == [f"s{i}" for i in range(41)]
    monkeypatch.setenv("VLSAFE_S3_ENDPOINT", server.url)  # s3://bucket/key -> <endpoint>/bucket/key
    assert http_url("s3://set/shard-000000.tar") == f"{server.url}/set/shard-000000.tar"
    assert [s.id for s in read_samples("s3://set", remote=FAST)] == [f"s{i}" for i in range(41)]
    picked = load_index(f"{server.url}/set/shard-{{000001..000002}}.tar", FAST)  # counts from the remote index
    assert [(s.url, s.count) for s in picked.shards] == [(f"{server.url}/{name}", 10) for name in SHARDS[1:3]]
    with pytest.raises(FileNotFoundError, match=r"no shard index at http://127\.0\.0\.1:\d+/nothing/index\.json"):
        load_index(f"{server.url}/nothing", FAST)


@pytest.mark.parametrize("ranges", [True, False], ids=["range-resume", "no-range-restart"])
def test_dropped_connections_are_retried_and_the_epoch_is_complete(root, ranges):
    disk = epoch(str(root / "set"))
    server = serve(root, ranges)
    try:
        server.drops = {name: (1, 3000) for name in SHARDS[:4]}  # mid-shard (30,720 bytes each)
        server.drops[SHARDS[4]] = (1, 0)  # headers, then the connection closes
        server.drops["set/index.json"] = (1, 100)
        server.reset = not ranges  # the second case sees TCP resets instead of orderly closes
        assert epoch(f"{server.url}/set") == disk
        assert all(server.requests[name] == 2 for name in SHARDS + ["set/index.json"]), server.requests
        assert sum(server.partial.values()) == (5 if ranges else 0), "resumed with Range where the server has it"
    finally:
        server.shutdown()
        server.server_close()


def test_drops_beyond_the_retry_budget_raise_a_named_error(server):
    server.drops = {SHARDS[1]: (99, 3000)}  # cut at byte 3000, again and again
    policy = RemoteReadPolicy(timeout=10.0, read_timeout=2.0, retries=2, backoff=0.01)
    with pytest.raises(ShardReadError) as caught:
        list(iter_shard(f"{server.url}/{SHARDS[1]}", remote=policy))
    err = caught.value
    assert err.url == f"{server.url}/{SHARDS[1]}" and err.bytes_read == 3000
    assert re.search(r"cannot read shard http://\S+/set/shard-000001\.tar: 3 attempt\(s\) in a row failed .*; "
                     r"3000 of 30720 bytes read, 2 retries", str(err)), str(err)
    assert server.requests[SHARDS[1]] == 3, "the first attempt and 2 retries"
    server.drops = {SHARDS[1]: (99, 3000)}  # through dataloader workers: the same error type and message
    stream = ShardStream([Source(f"{server.url}/set").planned(policy)], IdEncoder(), batch_size=4, num_workers=2,
                         remote=policy)
    batches = iter(DataLoader(stream, batch_size=None, num_workers=2))
    try:
        with pytest.raises(ShardReadError, match=r"set/shard-000001\.tar: .*3000 of 30720 bytes read"):
            list(batches)
    finally:  # now, not when a later test's garbage collection finds it (PyTorch then waits 5 s per worker)
        batches._shutdown_workers()


@pytest.mark.parametrize("read_timeout", [0.3, 30.0], ids=["stalls-retried", "one-long-stall"])
def test_a_stalled_server_hits_the_total_timeout_not_a_hang(server, read_timeout):
    server.stalls = {SHARDS[2]: 2000}  # headers and 2000 bytes, then silence (each attempt)
    budget = 1.0
    policy = RemoteReadPolicy(timeout=budget, read_timeout=read_timeout, retries=100, backoff=0.05, backoff_max=0.1)
    started = time.monotonic()
    with pytest.raises(ShardReadError, match=r"set/shard-000002\.tar: .*time budget.*2000 of 30720 bytes read"):
        list(iter_shard(f"{server.url}/{SHARDS[2]}", remote=policy))
    elapsed = time.monotonic() - started
    assert budget - 0.05 <= elapsed < budget + 0.5, elapsed
    if read_timeout > budget:
        assert server.requests[SHARDS[2]] == 1, "one stall, cut at the budget"
    else:
        assert server.requests[SHARDS[2]] >= 2, "0.3 s stalls are retried (with backoff) until the budget is spent"


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []

    def data_encoder(self, stage):
        return IdEncoder()

    def training_step(self, batch, batch_idx):
        self.seen.append(batch)
        return (self.weight * 0 + 1).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_mid_epoch_resume_from_http_shards_is_exact(root, server, tmp_path):
    """Shards that drop their connection once in each run: the run resumed from the step-4 checkpoint trains exactly
    the rest of the uninterrupted run."""
    def data():
        return ShardDataModule(train=f"{server.url}/set", batch_size=4, num_workers=2, shuffle_buffer=6, seed=3,
                               remote=FAST)

    quiet = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    server.drops = {name: (1, 3000) for name in SHARDS[:4]}
    whole = Recorder()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    L.Trainer(max_epochs=1, callbacks=[checkpoint], **quiet).fit(whole, data())
    server.drops = {name: (1, 3000) for name in SHARDS[:4]}
    resumed = Recorder()
    L.Trainer(max_epochs=1, enable_checkpointing=False, **quiet).fit(resumed, data(),
                                                                   ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    assert sorted({x for batch in whole.seen for x in batch}) == sorted(f"s{i}" for i in range(41))
    assert len(resumed.seen) == len(whole.seen) - 4 and resumed.seen == whole.seen[4:]
    assert all(server.drops[name][0] == 0 for name in SHARDS[:4]), "the resumed run met the drops too"
