"""Trust cases of the epoch planner (issue 16 cases 5 and 15): source amounts that cannot size an epoch, heavy
padding, and a mid-epoch resume with skipped samples. Pinned by tests/data/test_mixing.py and
tests/data/test_resume_position.py."""
from __future__ import annotations

import io
import logging
import math
import tarfile
from pathlib import Path

from PIL import Image

from vlsafe.data.encoding.processor import image_bytes
from vlsafe.data.images import decode_image
from vlsafe.data.schema import Sample
from vlsafe.data.shards import write_shards
from vlsafe.reliability.bad_inputs import LOADS, REJECTED, Bench, Case, WrongResult


class _DecodingIdEncoder:
    """Decodes the sample's image as a real encoder does (an undecodable one raises SampleError)."""

    def encode(self, sample: Sample) -> str:
        decode_image(sample.images[0], sample.id, "images[0]")
        return sample.id

    def collate(self, items: list[str]) -> list[str]:
        return list(items)


def _texts(folder: Path, n: int) -> Path:
    write_shards((Sample(id=f"s{i}", messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
                  for i in range(n)), folder)
    return folder


def _nan_weight(bench: Bench) -> str:
    from vlsafe.data.datamodule import Source

    Source(str(_texts(bench.folder("vlguard_train"), 3)), weight=math.nan).planned()
    return "planned"


def _zero_weights(bench: Bench) -> str:
    from vlsafe.data.datamodule import ShardStream, Source

    path = str(_texts(bench.folder("zero"), 3))
    ShardStream([Source(path, weight=0.0).planned(), Source(path, num_samples=0).planned()], _DecodingIdEncoder(),
                batch_size=2)
    return "streamed"


def _heavy_padding(bench: Bench) -> str:
    from vlsafe.data.datamodule import ShardStream, Source

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("vlsafe.data.datamodule")
    logger.addHandler(handler)
    disabled = logging.root.manager.disable  # tools/reliability_report.py silences logs below ERROR
    logging.disable(logging.NOTSET)
    try:
        ShardStream([Source(str(_texts(bench.folder("padding"), 40))).planned()], _DecodingIdEncoder(),
                    batch_size=16, world_size=2, num_workers=4, pad_to_equal=True)
    finally:
        logging.disable(disabled)
        logger.removeHandler(handler)
    warned = [r for r in records if "repeated sample(s)" in r]
    if not warned:
        raise WrongResult("88 of 128 samples per epoch are repeats, without a warning")
    return warned[0]


def _resume_with_skips(bench: Bench) -> str:
    """Two undecodable images in the first batches, on_error='skip', resume after 3 batches."""
    from vlsafe.data.datamodule import ShardStream, Source

    folder = bench.folder("skip-resume")
    png = image_bytes(Image.new("RGB", (2, 2)))
    write_shards((Sample(id=f"s{i}", messages=[{"role": "user", "content": "<image>\nq"},
                                               {"role": "assistant", "content": "a"}], images=[png])
                  for i in range(24)), folder, max_samples=8)
    tar_path = folder / "shard-000000.tar"
    with tarfile.open(tar_path) as tar:
        members = [(info.name, tar.extractfile(info).read()) for info in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            data = b"\x89PNG cut" if name in ("000000001.img0.png", "000000002.img0.png") else data
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stream = ShardStream([Source(str(folder)).planned()], _DecodingIdEncoder(), batch_size=4, on_error="skip",
                         pad_to_equal=True)
    full = list(stream)
    stream.resume_at(0, 3)
    tail = list(stream)
    if tail != full[3:]:
        raise WrongResult(f"the resumed epoch differs from the uninterrupted one: {tail[:1]} vs {full[3:4]}")
    return f"resumed after 3 of {len(full)} batches: the same {len(tail)} batches as the uninterrupted run"


def mixing_cases() -> list[Case]:
    return [
        Case("data", "source weight NaN/inf", REJECTED, ("vlguard_train", "field 'weight'", "finite"), _nan_weight),
        Case("data", "every source weight 0 / num_samples 0", REJECTED,
             ("no source contributes", "weight 0", "num_samples 0"), _zero_weights),
        Case("data", "batch larger than a worker's share (padding repeats samples)", LOADS,
             ("88 repeated sample(s) per epoch", "batch_size"), _heavy_padding),
        Case("data", "on_error skip + mid-epoch resume, 2 undecodable images", LOADS, ("the same 3 batches",),
             _resume_with_skips),
    ]
