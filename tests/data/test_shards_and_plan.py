"""Shard writing/reading and the epoch plan: every sample exactly once per epoch across ranks x workers."""
from collections import Counter

import pytest
from torch.utils.data import DataLoader

from vlsafe.data.datamodule import ShardStream, Source
from vlsafe.data.encoding.processor import image_bytes
from vlsafe.data.plan import PlannedSource, plan_epoch
from vlsafe.data.schema import Sample, SampleError
from vlsafe.data.shards import ShardInfo, load_index, read_samples, write_shards


def text_sample(i: int) -> Sample:
    return Sample(id=f"s{i}", messages=[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}])


class IdEncoder:
    """Minimal picklable encoder: a batch is the list of sample ids."""

    def encode(self, sample):
        return sample.id

    def collate(self, items):
        return list(items)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards((text_sample(i) for i in range(41)), out, max_samples=10)
    return out


def test_write_and_read_round_trip(shard_dir, tmp_path):
    index = load_index(shard_dir)
    assert [s.count for s in index.shards] == [10, 10, 10, 10, 1]
    assert [s.id for s in read_samples(shard_dir)] == [f"s{i}" for i in range(41)]
    from PIL import Image
    png = image_bytes(Image.new("RGB", (5, 3), (1, 2, 3)))
    sample = Sample(id="img/with.dots", messages=[{"role": "user", "content": "<image>\nhi"},
                                                  {"role": "assistant", "content": "ok"}],
                    images=[png], boxes=[[0, 0, 2, 2]], masks=[image_bytes(Image.new("L", (5, 3), 255))],
                    labels={"safe": 1.0}, meta={"source": "t"})
    write_shards([sample], tmp_path / "one")
    (back,) = list(read_samples(tmp_path / "one"))
    assert back.id == "img/with.dots" and back.images == [png] and back.boxes == [[0, 0, 2, 2]]
    assert back.labels == {"safe": 1.0} and back.meta == {"source": "t"} and len(back.masks) == 1


def test_unusable_samples_are_named_or_counted(tmp_path):
    broken = Sample(id="broken-7", messages=[{"role": "user", "content": "<image>\nhi"},
                                             {"role": "assistant", "content": "x"}], images=[b"not an image"])
    samples = [text_sample(0), broken, text_sample(1)]
    with pytest.raises(SampleError, match=r"sample 'broken-7', field 'images\[0\]': image does not decode"):
        write_shards(samples, tmp_path / "raise")
    index = write_shards(samples, tmp_path / "skip", on_error="skip")
    assert index.total == 2 and index.skipped[0]["id"] == "broken-7"
    assert load_index(tmp_path / "skip").skipped[0]["field"] == "images[0]"


@pytest.mark.parametrize("counts,slots", [([10, 10, 10, 10, 1], 4), ([7], 3), ([3, 50, 2], 7), ([5, 5], 1)])
def test_plan_reads_each_sample_exactly_once_with_balanced_slots(counts, slots):
    source = PlannedSource("s", tuple(ShardInfo(f"u{i}", c) for i, c in enumerate(counts)))
    for epoch in (0, 1):
        plan = plan_epoch([source], epoch=epoch, seed=3, num_slots=slots, shuffle=True)
        reads = Counter((p.url, pos) for slot in plan for p in slot for pos in p.positions)
        assert len(reads) == sum(counts) and set(reads.values()) == {1}
        sizes = [sum(len(p) for p in slot) for slot in plan]
        assert max(sizes) - min(sizes) <= 1


def test_plan_weights_mix_sources_at_a_ratio():
    big = PlannedSource("big", (ShardInfo("b", 100),), weight=0.25)
    small = PlannedSource("small", (ShardInfo("s", 10),), weight=2.0)
    picked = []
    for epoch in (0, 1):
        plan = plan_epoch([big, small], epoch=epoch, seed=0, num_slots=2, shuffle=True)
        reads = Counter((p.url, pos) for slot in plan for p in slot for pos in p.positions)
        assert sum(v for (url, _), v in reads.items() if url == "b") == 25
        assert all(reads[("s", pos)] == 2 for pos in range(10))
        picked.append({pos for (url, pos) in reads if url == "b"})
    assert picked[0] != picked[1], "the random subset of a down-weighted source changes every epoch"


def _run_rank(shard_dir, rank, training, batch_size=4):
    stream = ShardStream([Source(str(shard_dir)).planned()], IdEncoder(), batch_size=batch_size, rank=rank,
                         world_size=2, num_workers=2, seed=0, shuffle=training, shuffle_buffer=8,
                         pad_to_equal=training)
    batches = list(DataLoader(stream, batch_size=None, num_workers=2))
    return stream, batches


def test_two_ranks_two_workers_see_each_sample_exactly_once(shard_dir):
    seen = []
    for rank in (0, 1):
        stream, batches = _run_rank(shard_dir, rank, training=False)
        assert len(batches) == len(stream), "len() must be the exact number of batches"
        seen += [i for batch in batches for i in batch]
    assert sorted(seen) == sorted(f"s{i}" for i in range(41))


def test_training_ranks_get_equal_full_batches_covering_everything(shard_dir):
    lengths, seen = [], Counter()
    for rank in (0, 1):
        stream, batches = _run_rank(shard_dir, rank, training=True)
        assert len(batches) == len(stream) and all(len(b) == 4 for b in batches)
        lengths.append(len(batches))
        seen.update(i for batch in batches for i in batch)
    assert lengths[0] == lengths[1], "DDP ranks must run the same number of steps"
    assert set(seen) == {f"s{i}" for i in range(41)}
    assert sum(seen.values()) - 41 < 4 * 4, "padding repeats less than one batch per worker"


def test_epochs_reshuffle_deterministically(shard_dir):
    def order(epoch):
        stream = ShardStream([Source(str(shard_dir)).planned()], IdEncoder(), batch_size=41, shuffle=True,
                             shuffle_buffer=16, seed=1)
        stream.set_epoch(epoch)
        return next(iter(stream))

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == sorted(order(1))


def test_empty_shard_list_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard index"):
        Source(str(tmp_path)).planned()


def test_brace_patterns_select_shards(shard_dir, tmp_path):
    picked = load_index(str(shard_dir / "shard-{000001..000002}.tar"))
    assert [s.count for s in picked.shards] == [10, 10] and picked.shards[0].url.endswith("shard-000001.tar")
    # without an index beside them, shards are counted by reading
    import shutil
    shutil.copy(shard_dir / "shard-000004.tar", tmp_path / "lonely-0.tar")
    assert load_index(str(tmp_path / "lonely-{0..0}.tar")).total == 1
    stream = ShardStream([Source(str(shard_dir / "shard-{000000..000001}.tar")).planned()], IdEncoder(),
                         batch_size=100)
    assert sorted(next(iter(stream))) == sorted(f"s{i}" for i in range(20))


def test_index_with_shell_command_urls_is_refused(shard_dir, tmp_path, monkeypatch):
    import json
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "ran"
    (evil / "index.json").write_text(json.dumps({"format": "vlsafe-shards/1", "shards": [
        {"url": f"pipe:touch {marker}; cat {shard_dir / 'shard-000000.tar'}", "count": 10}]}))
    with pytest.raises(ValueError, match="shell command"):
        list(read_samples(evil))
    assert not marker.exists()


def test_skip_covers_records_that_fail_to_parse(tmp_path):
    import io
    import tarfile
    write_shards([text_sample(0), text_sample(1), text_sample(2)], tmp_path / "s")
    tar_path = tmp_path / "s" / "shard-000000.tar"
    members = []
    with tarfile.open(tar_path) as tar:
        for info in tar.getmembers():
            data = tar.extractfile(info).read()
            if info.name.startswith("000000001"):
                data = data.replace(b'"num_images": 0', b'"num_images": 1')  # promises an image it lacks
            members.append((info, data))
    with tarfile.open(tar_path, "w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SampleError, match=r"sample 's1', field 'images'"):
        list(read_samples(tmp_path / "s"))
    stream = ShardStream([Source(str(tmp_path / "s")).planned()], IdEncoder(), batch_size=8, on_error="skip")
    assert next(iter(stream)) == ["s0", "s2"]


def test_resumed_stream_yields_only_the_rest_of_the_epoch(shard_dir):
    stream = ShardStream([Source(str(shard_dir)).planned()], IdEncoder(), batch_size=4, shuffle=True,
                         shuffle_buffer=8, pad_to_equal=True)
    full = list(stream)
    assert len(full) == len(stream) == 11  # 41 samples padded to 44
    stream.resume_at(0, 10)
    assert list(stream) == full[10:], "the last batch: one real sample topped up with repeats"
    stream.resume_at(0, 4)
    assert list(stream) == full[4:]
