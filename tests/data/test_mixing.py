"""Weighted mixing reaches every (rank, worker) slot, through its whole epoch (issue 17 §1), and the
source amounts and padding that cannot make a sensible epoch are named (issue 16 case 15)."""
import logging
import math
from collections import Counter

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from vlsafe.data.datamodule import ShardStream, Source
from vlsafe.data.encoding.processor import image_bytes
from vlsafe.data.grouping import conversation_length
from vlsafe.data.plan import PlannedSource, plan_epoch, slot_sizes
from vlsafe.data.schema import Sample
from vlsafe.data.shards import ShardInfo, write_shards


def shards(name: str, n: int, size: int = 1000) -> tuple[ShardInfo, ...]:
    return tuple(ShardInfo(f"{name}-{i:06d}.tar", size) for i in range(n))


def slot_order(slot) -> list[str]:
    """The sources of a slot's samples in the order it yields them."""
    return [slot.streams[i][0].source for i in slot.schedule()]


def test_a_small_source_reaches_every_slot_through_its_whole_epoch():
    """VLGuard's 2 shards mixed into LLaVA-665k's 665, 8 GPUs x 4 workers: every slot gets VLGuard at its global
    share (+-50%), spread over more than half of the slot's epoch (it was 2 slots of 32, each in a 5% window)."""
    llava, vlguard = PlannedSource("llava", shards("llava", 665)), PlannedSource("vlguard", shards("vlguard", 2))
    share = 2000 / 667_000
    for epoch in (0, 1):
        plan = plan_epoch([llava, vlguard], epoch=epoch, seed=0, num_slots=32, shuffle=True)
        assert [slot.size for slot in plan] == slot_sizes([llava, vlguard], 32), "len() stays what it was"
        for slot in plan:
            order = slot_order(slot)
            at = [k for k, source in enumerate(order) if source == "vlguard"]
            assert 0.5 * share <= len(at) / len(order) <= 1.5 * share
            assert (at[-1] - at[0]) / len(order) > 0.5, "spread over the slot's epoch, not in one block"
            assert len({p.url for p in slot.streams[0]}) <= 23, "each slot still reads ~665/32 whole shards"
        read = {}
        for piece in (p for slot in plan for p in slot):
            read.setdefault(piece.url, []).extend(piece.positions)
        assert len(read) == 667 and all(sorted(p) == list(range(1000)) for p in read.values()), "exactly once"


def test_post_hoc_mix_gives_every_slot_both_sources():
    """VLGuard post-hoc: all 2000 VLGuard + a random 5000 of the 665k. No rank sees only one of them."""
    sources = [PlannedSource("vlguard", shards("vlguard", 2)), PlannedSource("llava", shards("llava", 665),
                                                                             num_samples=5000)]
    plan = plan_epoch(sources, epoch=0, seed=0, num_slots=32, shuffle=True)
    for slot in plan:
        counts = Counter(slot_order(slot))
        assert counts["vlguard"] in (62, 63) and counts["llava"] in (156, 157)


@pytest.mark.parametrize("sizes,weights,slots", [([[10, 10, 10, 10, 1], [3]], [1.0, 2.0], 4),
                                                 ([[7], [50, 2], [5]], [0.5, 1.0, 0.2], 7),
                                                 ([[5, 5], [1]], [1.0, 1.0], 1), ([[100], [4]], [1.0, 1.0], 6)])
def test_every_source_splits_evenly_and_reads_shards_front_to_back(sizes, weights, slots):
    sources = [PlannedSource(f"s{i}", tuple(ShardInfo(f"s{i}-{k}", c) for k, c in enumerate(counts)), weight)
               for i, (counts, weight) in enumerate(zip(sizes, weights))]
    for epoch in (0, 1):
        plan = plan_epoch(sources, epoch=epoch, seed=5, num_slots=slots, shuffle=True)
        assert [slot.size for slot in plan] == slot_sizes(sources, slots)
        reads = Counter((p.url, pos) for slot in plan for p in slot for pos in p.positions)
        for source in sources:
            assert sum(n for (url, _), n in reads.items() if url.startswith(source.name + "-")) == source.allotment
            per_slot = [sum(len(p) for p in slot.streams[sources.index(source)]) for slot in plan]
            assert max(per_slot) - min(per_slot) <= 1, "each source is split evenly over the slots"
        for slot in plan:
            assert sorted(slot.schedule()) == [i for i, n in enumerate(slot.stream_sizes()) for _ in range(n)]
            for piece in slot:
                assert list(piece.positions) == sorted(piece.positions), "a piece reads its shard front to back"
    whole_passes = [s for s in sources if s.weight == 1.0]
    plan = plan_epoch(whole_passes, epoch=0, seed=5, num_slots=slots, shuffle=True)
    assert Counter((p.url, q) for slot in plan for p in slot for q in p.positions) == Counter(
        (shard.url, q) for s in whole_passes for shard in s.shards for q in range(shard.count))


def _text(i: int, source: str, words: int = 1) -> Sample:
    return Sample(id=f"{source}{i}", messages=[{"role": "user", "content": "q " * words},
                                               {"role": "assistant", "content": "a"}])


def test_the_loader_interleaves_sources_in_every_worker_and_resumes_exactly(tmp_path):
    """Real shards through the DataLoader: 2 ranks x 2 workers, a 60-sample and an 8-sample source; each worker
    yields its 2 small samples apart; exactly once over the ranks; a resumed stream continues exactly."""
    write_shards((_text(i, "big") for i in range(60)), tmp_path / "big", max_samples=20)
    write_shards((_text(i, "small") for i in range(8)), tmp_path / "small", max_samples=8)
    sources = [Source(str(tmp_path / "big")).planned(), Source(str(tmp_path / "small")).planned()]
    seen = Counter()
    for rank in (0, 1):
        stream = ShardStream(sources, IdEncoder(), batch_size=17, rank=rank, world_size=2, num_workers=2, seed=1,
                             shuffle=True, shuffle_buffer=0)
        batches = list(DataLoader(stream, batch_size=None, num_workers=2))
        assert len(batches) == len(stream) == 2
        for batch in batches:  # one worker's whole epoch: 15 big, 2 small
            assert sum(sample_id.startswith("small") for sample_id in batch) == 2
        seen.update(x for batch in batches for x in batch)
    assert seen == Counter([f"big{i}" for i in range(60)] + [f"small{i}" for i in range(8)])
    stream = ShardStream(sources, IdEncoder(), batch_size=4, seed=1, shuffle=True, shuffle_buffer=8, pad_to_equal=True)
    full = list(stream)
    stream.resume_at(0, 7)
    assert list(stream) == full[7:]


class IdEncoder:
    def encode(self, sample):
        return sample.id

    def collate(self, items):
        return list(items)


def test_group_by_modality_length_gives_single_modality_batches_of_similar_length(tmp_path):
    """LLaVA's `group_by_modality_length`: batches never mix image and text-only samples (but for the epoch's
    odd end), are sorted by length within a megabatch; same samples, same len(), exact resume."""
    png = image_bytes(Image.new("RGB", (2, 2)))
    samples = [Sample(id=f"img{i}", messages=[{"role": "user", "content": "<image>\n" + "w " * (i % 7)},
                                              {"role": "assistant", "content": "a"}], images=[png]) for i in range(37)]
    samples += [_text(i, "txt", words=i % 5 + 1) for i in range(27)]
    write_shards(samples, tmp_path / "mixed", max_samples=16)
    by_id = {s.id: s for s in samples}

    def stream(group: bool, world_size: int = 1) -> ShardStream:
        return ShardStream([Source(str(tmp_path / "mixed")).planned()], IdEncoder(), batch_size=4, seed=2,
                           world_size=world_size, shuffle=True, shuffle_buffer=8, pad_to_equal=True,
                           group_by_modality_length=group)

    plain, grouped = list(stream(False)), list(stream(True))
    assert len(grouped) == len(plain) == len(stream(True)) == 16
    assert Counter(x for b in grouped for x in b) == Counter(x for b in plain for x in b)
    mixed = lambda batches: sum(len({x[:3] for x in b}) > 1 for b in batches)  # noqa: E731
    assert mixed(grouped) <= 2 < mixed(plain), "single-modality batches, but for the epoch's odd end"
    ranked = list(stream(True, world_size=2))  # rank 0 of 2: megabatches of 2 x 4, sorted longest first
    lengths = [conversation_length(by_id[x]) for b in ranked for x in b]
    for start in (0, 8):  # the first two megabatches (the odd end, <= 7 + 7 samples, comes after them)
        megabatch = lengths[start:start + 8]
        assert megabatch == sorted(megabatch, reverse=True)
    grouped_stream = stream(True)
    grouped_stream.resume_at(0, 5)
    assert list(grouped_stream) == grouped[5:]


# ------------------------------------------------------------------------- issue 16 case 15: amounts, padding
@pytest.mark.parametrize("weight", [math.nan, math.inf, -1.0])
def test_a_weight_that_cannot_size_an_epoch_names_the_source(tmp_path, weight):
    write_shards([_text(0, "s")], tmp_path / "vlguard_train")
    with pytest.raises(ValueError, match=r"source .*vlguard_train: field 'weight' must be a finite number >= 0"):
        Source(str(tmp_path / "vlguard_train"), weight=weight).planned()


def test_all_zero_weights_say_so_rather_than_empty_shard_list(tmp_path):
    write_shards([_text(0, "s")], tmp_path / "a")
    sources = [Source(str(tmp_path / "a"), weight=0.0).planned(), Source(str(tmp_path / "a"), num_samples=0).planned()]
    with pytest.raises(ValueError, match=r"no source contributes a sample .*weight 0 x 1 sample.*num_samples 0"):
        ShardStream(sources, IdEncoder(), batch_size=2)


def test_heavy_padding_is_warned_with_numbers(tmp_path, caplog):
    """A batch larger than a worker's share repeats samples: 40 samples over 2 ranks x 4 workers at batch 16
    yield 8 x 16 = 128, 88 of them repeats (220% of the epoch). At batch 5 nothing is repeated: no warning."""
    write_shards((_text(i, "s") for i in range(40)), tmp_path / "s")
    sources = [Source(str(tmp_path / "s")).planned()]
    with caplog.at_level(logging.WARNING, logger="vlsafe.data.datamodule"):
        ShardStream(sources, IdEncoder(), batch_size=16, world_size=2, num_workers=4, pad_to_equal=True)
    assert "88 repeated sample(s) per epoch (220% of it)" in caplog.text and "batch_size" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlsafe.data.datamodule"):
        ShardStream(sources, IdEncoder(), batch_size=5, world_size=2, num_workers=4, pad_to_equal=True)
    assert "repeated" not in caplog.text
