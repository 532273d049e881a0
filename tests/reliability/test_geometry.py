"""Boxes and masks: outside the image, inverted, NaN/Inf, wrong mask size or count -> SampleError naming
`boxes[i]`/`masks[i]`, both when writing and when a shard written elsewhere is read."""
import json

import pytest

from vlsafe.reliability.bad_inputs import geometry_cases


@pytest.mark.parametrize("case", geometry_cases(), ids=lambda c: c.name)
def test_geometry_case(case, bench, assert_case):
    assert_case(case, bench)


def test_reader_checks_geometry_of_shards_written_elsewhere(tmp_path):
    """A shard whose JSON was edited after writing (box now outside the 20x10 image) is refused on read."""
    from PIL import Image

    from vlsafe.data.encoding.processor import image_bytes
    from vlsafe.data.schema import SampleError
    from vlsafe.data.shards import read_samples, write_shards
    from vlsafe.reliability.bad_inputs import _rewrite_members, qa

    write_shards([qa("g", [image_bytes(Image.new("RGB", (20, 10)))], boxes=[[0, 0, 20, 10]])], tmp_path)

    def widen(name, data):
        if not name.endswith(".json"):
            return data
        meta = json.loads(data)
        meta["boxes"] = [[0, 0, 25, 10]]
        return json.dumps(meta).encode()

    _rewrite_members(tmp_path / "shard-000000.tar", widen)
    with pytest.raises(SampleError, match=r"shard-000000.tar#000000000: sample 'g', field 'boxes\[0\]'.*outside"):
        list(read_samples(tmp_path))
