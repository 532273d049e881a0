"""The shapes world as a data module: writes its shards once (on local rank 0), then reads them like any
other shard set. This is the "embedded default" the demo recipes and tests train on."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from vlsafe.data.datamodule import ShardDataModule, Source
from vlsafe.data.schema import OnError
from vlsafe.data.shards import INDEX_NAME
from vlsafe.data.synthetic.world import WORLD_VERSION, WorldConfig, write_world
from vlsafe.ops.workers import DEFAULT_WORKER_TIMEOUT

log = logging.getLogger(__name__)
_STAMP = "world.json"


class SyntheticWorld(ShardDataModule):
    """Generate `train`/`val`/`test` splits of the synthetic shapes world under `root`.

    `kinds` picks what the samples teach (see `vlsafe.data.synthetic.world.KINDS`), as a list (uniform) or a
    mapping of weights. Splits use different RNG streams, so validation scenes are held out.

    Preference samples carry the world's fixed placeholder `blind` answers; for answers a real model generates
    without the image (MMSafe-PO's pipeline) use `vlsafe.methods.preference.blind_world.BlindAnswerWorld`.
    """

    def __init__(self, root: str = ".cache/vlsafe/synthetic", kinds: list[str] | dict[str, float] = ("qa",),
                 train_samples: int = 4000, val_samples: int = 200, test_samples: int = 0, world_seed: int = 0,
                 image_size: int = 64, samples_per_shard: int = 256, batch_size: int = 8,
                 eval_batch_size: int | None = None, num_workers: int = 2, shuffle_buffer: int = 1000,
                 seed: int = 0, on_error: OnError = "raise", worker_timeout: float = DEFAULT_WORKER_TIMEOUT):
        self.root = Path(root)
        self.kinds = dict(kinds) if isinstance(kinds, dict) else list(kinds)
        self.sizes = {"train": train_samples, "val": val_samples, "test": test_samples}
        self.world_seed, self.image_size, self.samples_per_shard = world_seed, image_size, samples_per_shard
        split_path = {split: (str(self.read_dir(split)) if n > 0 else None) for split, n in self.sizes.items()}
        super().__init__(train=split_path["train"], val=split_path["val"], test=split_path["test"],
                         predict=split_path["val"], batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, shuffle_buffer=shuffle_buffer, seed=seed, on_error=on_error,
                         worker_timeout=worker_timeout)

    def split_dir(self, split: str) -> Path:
        """Where the world writes a split."""
        return self.root / split

    def read_dir(self, split: str) -> Path:
        """Where training reads a split: the world itself here; a subclass may read a derived copy."""
        return self.split_dir(split)

    def _stamp(self, split: str) -> dict:
        return {"n": self.sizes[split], "seed": self.world_seed, "kinds": self.kinds, "image_size": self.image_size,
                "split": split, "samples_per_shard": self.samples_per_shard, "world_version": WORLD_VERSION}

    def prepare_data(self) -> None:

        for split, n in self.sizes.items():
            if n <= 0:
                continue
            out = self.split_dir(split)
            stamp_path = out / _STAMP
            if (out / INDEX_NAME).exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == self._stamp(split):
                continue
            if out.exists():
                shutil.rmtree(out)
            log.info("writing %d synthetic %s samples to %s", n, split, out)
            write_world(out, n, seed=self.world_seed, kinds=self.kinds, cfg=WorldConfig(image_size=self.image_size),
                        split=split, max_samples_per_shard=self.samples_per_shard, progress=False)
            stamp_path.write_text(json.dumps(self._stamp(split)))
    def sources_for(self, split: str) -> list[Source]:
        return [Source(str(self.read_dir(split)))]
