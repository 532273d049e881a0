"""Bad files: malformed JSON, missing/truncated shards, path-traversal members, empty shard lists, unknown
recipe keys. Each is a clear error naming the file (and key), or with `on_error: skip` a counted skip that
a training run summarises at the end."""
import logging

import lightning as L
import pytest
import torch

from vlsafe.reliability.bad_inputs import file_cases


@pytest.mark.parametrize("case", file_cases(), ids=lambda c: c.name)
def test_file_case(case, bench, assert_case):
    assert_case(case, bench)


class CountingModule(L.LightningModule):
    """The smallest module a ShardDataModule accepts: it trains one weight on the pixel mean."""

    def __init__(self, processor):
        super().__init__()
        self.processor, self.weight, self.seen = processor, torch.nn.Parameter(torch.zeros(())), []

    def data_encoder(self, stage):
        from vlsafe.data.encoding.encoders import ConversationEncoder
        return ConversationEncoder(self.processor)

    def training_step(self, batch, batch_idx):
        assert "skipped_samples" not in batch, "skip rows are taken off the batch before the model sees it"
        self.seen += batch["ids"]
        return (self.weight - batch["pixel_values"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_training_with_skip_counts_and_summarises_bad_samples(bench, tmp_path, caplog):
    """Rotten image bytes, a traversal member and a truncated shard in one training run with on_error: skip."""
    import json

    from vlsafe.data.datamodule import ShardDataModule
    from vlsafe.data.shards import load_index, write_shards
    from vlsafe.reliability.bad_inputs import _png, _rewrite_members, qa

    write_shards([qa(f"s{i}", [_png()]) for i in range(12)], tmp_path, max_samples=6)
    _rewrite_members(tmp_path / "shard-000000.tar",
                     lambda name, data: data[:30] if name in ("000000001.img0.png", "000000004.img0.png") else data,
                     extra=[("../evil.json", json.dumps({"id": "evil", "messages": []}).encode())])
    index = load_index(tmp_path)
    index.shards[0].count += 1
    index.save(tmp_path)
    import tarfile
    last = tmp_path / "shard-000001.tar"
    with tarfile.open(last) as tar:
        cut = [m for m in tar.getmembers() if m.name.startswith("000000010")][0].offset + 700
    last.write_bytes(last.read_bytes()[:cut])  # records 9-11 of the second shard are lost
    data = ShardDataModule(train=str(tmp_path), batch_size=2, num_workers=0, on_error="skip", shuffle_buffer=0)
    module = CountingModule(bench.processor)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level(logging.WARNING, logger="vlsafe.data.datamodule"):
        trainer.fit(module, data)
    report = data.last_skip_report
    fields = sorted(row["field"] for row in report.rows["train"])
    assert fields.count("images[0]") == 2 and fields.count("tar member name") == 1 and fields.count("shard") == 3
    assert {"s1", "s4", "evil"}.isdisjoint(module.seen)
    assert len(set(module.seen)) + report.total == 13, "every planned sample is either trained on or counted"
    summary = [r.getMessage() for r in caplog.records if "rank 0: train: skipped" in r.getMessage()]
    assert summary and f"skipped {report.total} unusable sample(s)" in summary[0] and "images[0]: 2" in summary[0]


def test_make_shards_skip_summary_names_each_sample(tmp_path):
    """Conversion with --on-error skip: counted, listed in index.json, summarised on stdout."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "ok.png")
    (images / "bomb.png").write_bytes(__import__("vlsafe.reliability.bad_inputs", fromlist=["raw_png"]).raw_png(
        100_000, 100_000, 8, 0, b"\0"))
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A box."}]
    records = [{"id": "good", "image": "ok.png", "conversations": turns},
               {"id": "bomb", "image": "bomb.png", "conversations": turns},
               {"id": "escape", "image": "../x.png", "conversations": turns},
               {"id": "empty-answer", "conversations": [turns[0] | {"value": "Hi"}, {"from": "gpt", "value": ""}]}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "tools/make_shards.py", "llava", "--json", str(tmp_path / "d.json"),
                           "--images", str(images), "--out", str(tmp_path / "out"), "--on-error", "skip"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1 samples" in proc.stdout and "skipped 3" in proc.stdout
    assert "skipped bomb: images[0]: refused as a possible decompression bomb" in proc.stdout
    assert "skipped escape: image: '../x.png' points outside the image folder" in proc.stdout
    assert "skipped empty-answer: messages[1].content: assistant turn is empty" in proc.stdout


def test_shipped_training_recipes_pass_the_key_check():
    """No false alarms: every training recipe in the repository is clean (evaluation recipes are not fit configs)."""
    from pathlib import Path

    from vlsafe.reliability.recipe_keys import check_recipe_keys

    root = Path(__file__).resolve().parents[2] / "recipes"
    recipes = [p for p in root.rglob("*.yaml") if "eval" not in p.relative_to(root).parts]
    assert len(recipes) > 10
    assert {str(p): check_recipe_keys(p) for p in recipes if check_recipe_keys(p)} == {}
