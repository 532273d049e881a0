"""Bad and unusual images through writer -> shard -> reader -> processor: each loads to the right RGB or is
rejected with SampleError naming the sample and `images[i]`."""
import io

import pytest
from PIL import Image

from vlsafe.reliability.bad_inputs import image_cases, qa


@pytest.mark.parametrize("case", image_cases(), ids=lambda c: c.name)
def test_image_case(case, bench, assert_case):
    assert_case(case, bench)


def test_bomb_limit_is_configurable(bench, monkeypatch):
    """The limit is explicit: raising VLSAFE_MAX_IMAGE_PIXELS lets a big (real) image through."""
    from vlsafe.data.images import encoded_image
    from vlsafe.data.schema import SampleError

    data = io.BytesIO()
    Image.new("L", (300, 300)).save(data, format="PNG")
    monkeypatch.setenv("VLSAFE_MAX_IMAGE_PIXELS", "80000")
    with pytest.raises(SampleError, match="90,000 pixels exceeds the limit of 80,000"):
        encoded_image(data.getvalue(), "big", "images[0]")
    monkeypatch.setenv("VLSAFE_MAX_IMAGE_PIXELS", "100000")
    assert encoded_image(data.getvalue(), "big", "images[0]")[1] == "png"


def test_corrupt_image_in_a_shard_is_named_at_training_time(bench, tmp_path):
    """Bit rot after writing: the reader does not decode, so the processor must name the sample and field."""
    from vlsafe.data.encoding.encoders import ConversationEncoder
    from vlsafe.data.schema import SampleError
    from vlsafe.data.shards import read_samples, write_shards
    from vlsafe.reliability.bad_inputs import _png, _rewrite_members

    write_shards([qa("rotten", [_png()])], tmp_path)
    _rewrite_members(tmp_path / "shard-000000.tar", lambda name, data: data[:20] if name.endswith(".png") else data)
    (sample,) = read_samples(tmp_path)
    with pytest.raises(SampleError, match=r"sample 'rotten', field 'images\[0\]': image does not decode"):
        ConversationEncoder(bench.processor).encode(sample)


def test_bomb_limit_variable_names_itself_when_malformed_and_accepts_suffixes(monkeypatch):
    """Issue 16.15: `VLSAFE_MAX_IMAGE_PIXELS=50M` gave a bare `int()` error."""
    from vlsafe.data.images import max_image_pixels

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # a raised limit also raises PIL's
    for value, pixels in (("50M", 50_000_000), ("89_478_485", 89_478_485), ("1.5G", 1_500_000_000), ("500k", 500_000)):
        monkeypatch.setenv("VLSAFE_MAX_IMAGE_PIXELS", value)
        assert max_image_pixels() == pixels
    for bad in ("fifty", "0", "-3", "M"):
        monkeypatch.setenv("VLSAFE_MAX_IMAGE_PIXELS", bad)
        with pytest.raises(ValueError, match=f"VLSAFE_MAX_IMAGE_PIXELS='{bad}' is not a pixel count; .*50M"):
            max_image_pixels()
