"""One function per benchmark contender; each returns its measurements as plain data.

A contender builds everything it needs from `BenchConfig` (same seed → same weights and batches in every
process), times `warmup_steps + timed_steps` steps, and reports the step times, the work per step (samples,
pairs, real tokens) and the first step's loss, so the side-by-side table compares equal work.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from vlsafe.bench.setup import (
    BenchConfig,
    batches,
    export_hf,
    freeze_like_vlsafe,
    frozen_copy,
    hf_labels,
    real_tokens,
    synthetic_samples,
    to_hf_inputs,
)

from vlsafe.bench.packing import PACKING_CONTENDERS
from vlsafe.bench.serving import SERVING_CONTENDERS

Result = dict[str, Any]


def _steps_result(times: list[float], cfg: BenchConfig, work: dict[str, float], loss: float) -> Result:
    """Per-step durations from consecutive step start times (so everything between steps is counted)."""
    durations = [b - a for a, b in zip(times, times[1:])][cfg.warmup_steps:]
    return {"step_seconds": durations, "work_per_step": work, "first_loss": loss}


def _work(batch_list: list[dict[str, Any]], samples: int, pairs: int = 0) -> dict[str, float]:
    tokens = sum(real_tokens(b) for b in batch_list) / len(batch_list)
    work = {"samples": float(samples), "tokens": tokens}
    if pairs:
        work["pairs"] = float(pairs)
    return work


class _StepClock:
    """Start time of every step, plus one final stamp after the last step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def tick(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # kernels still queued belong to the step that launched them
        self.times.append(time.perf_counter())


# ----------------------------------------------------------------------------------------------- SFT
def _sft_module(cfg: BenchConfig):
    from vlsafe.methods.base import OptimSettings
    from vlsafe.methods.sft import SFTModule

    torch.manual_seed(cfg.seed)
    return SFTModule(vlm=cfg.builder(), optim=OptimSettings(lr=cfg.lr, warmup_steps=0, schedule="constant"))


def training_flops(module, batch: dict[str, Any]) -> float:
    """Analytic FLOPs of one training step: 6·N per LLM token (forward + backward) plus 2·N per image patch
    for a frozen tower's forward. Attention's quadratic term is left out (small at these lengths)."""
    vlm = module.vlm
    llm_params = sum(p.numel() for n, p in vlm.llm.named_parameters() if "embed_tokens" not in n)
    vision_params = sum(p.numel() for p in vlm.vision.parameters())
    projector_params = sum(p.numel() for p in vlm.projector.parameters())
    tokens = real_tokens(batch)
    images = int(batch["pixel_values"].shape[0])
    patches = images * vlm.vision.num_patches
    return 6.0 * llm_params * tokens + 2.0 * vision_params * patches + 6.0 * projector_params * patches


def _sft_batches(cfg: BenchConfig, module) -> list[dict[str, Any]]:
    samples = synthetic_samples("caption", 64, cfg.seed, cfg.image_size)
    return batches(module.data_encoder("fit"), samples, cfg.batch_size, cfg.warmup_steps + cfg.timed_steps + 1)


def cli_forced_callbacks() -> list:
    """The callbacks `tools/fit.py` adds to every run (`VLSafeCLI.add_arguments_to_parser`), with their defaults:
    the benchmark times what users run, per-step guards included."""
    from vlsafe.ops.nonfinite import NonFiniteGuard
    from vlsafe.ops.preemption import PreemptionCheckpoint
    from vlsafe.ops.rng import RNGStateCheckpoint

    return [RNGStateCheckpoint(), PreemptionCheckpoint(), NonFiniteGuard()]


def fit_timed(cfg: BenchConfig, workdir: Path, module, data: list[dict[str, Any]], work: dict[str, float],
              callbacks: list | None = None, **trainer_options: Any) -> Result:
    """`trainer.fit(module)` over `data` under Lightning with the CLI's forced callbacks and checkpoint IO (no
    logger or progress bar, like the baselines), timed per step. `trainer_options` replace the single-CPU
    defaults (accelerator, devices, strategy, precision: `tools/gpu_check.py` runs FSDP2 on a GPU)."""
    import lightning as L

    from vlsafe.ops.checkpoint_io import use_atomic_checkpoint_io

    clock, losses = _StepClock(), []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.tick()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

        def on_train_end(self, trainer, pl_module):
            clock.tick()

    options = {"accelerator": "cpu", "devices": 1, **trainer_options}
    trainer = L.Trainer(max_steps=len(data), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[*cli_forced_callbacks(), Clock(), *(callbacks or [])],
                        default_root_dir=str(workdir), num_sanity_val_steps=0, **options)
    use_atomic_checkpoint_io(trainer)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return _steps_result(clock.times, cfg, work, losses[0])


def sft_vlsafe(cfg: BenchConfig, workdir: Path) -> Result:
    """`SFTModule` under a Lightning Trainer."""
    module = _sft_module(cfg)
    data = _sft_batches(cfg, module)
    work = _work(data, cfg.batch_size)
    work["flops"] = sum(training_flops(module, b) for b in data) / len(data)
    return fit_timed(cfg, workdir, module, data, work)


def sft_plain_torch(cfg: BenchConfig, workdir: Path) -> Result:
    """A hand-written PyTorch loop over transformers' `LlavaForConditionalGeneration`, same weights/batches."""
    module = _sft_module(cfg)
    data = _sft_batches(cfg, module)
    model, _ = export_hf(module, workdir / "hf")
    del module
    model.train()
    freeze_like_vlsafe(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    index = model.config.image_token_index
    clock, losses = _StepClock(), []
    for batch in data:
        clock.tick()
        out = model(**to_hf_inputs(batch, index), labels=hf_labels(batch))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
    clock.tick()
    return _steps_result(clock.times, cfg, _work(data, cfg.batch_size), losses[0])


# ---------------------------------------------------------------------------------------- preference
def preference_module(cfg: BenchConfig, **options: Any):
    """The policy every preference contender starts from (same seed → same weights in every process)."""
    from vlsafe.core.lora import LoraSettings
    from vlsafe.methods.base import OptimSettings
    from vlsafe.methods.preference.module import PreferenceModule

    lora = options.pop("lora", False)
    torch.manual_seed(cfg.seed)
    return PreferenceModule(vlm=cfg.builder(), beta=0.1,
                            lora=LoraSettings(r=16, alpha=32, dropout=0.0) if lora else None,
                            optim=OptimSettings(lr=cfg.lr, warmup_steps=0, schedule="constant"), **options)


def preference_batches(cfg: BenchConfig, module) -> list[dict[str, Any]]:
    """Pairs (plus blind answers for BPO) without stored reference log-probs; callers add them if needed."""
    from vlsafe.methods.preference.encoding import PreferenceEncoder

    samples = synthetic_samples("preference", 64, cfg.seed, cfg.image_size)
    encoder = PreferenceEncoder(module.processor, module.responses)
    return batches(encoder, samples, cfg.batch_size, cfg.warmup_steps + cfg.timed_steps + 1)


def _preference_contender(**options: Any) -> Callable[[BenchConfig, Path], Result]:
    def run(cfg: BenchConfig, workdir: Path) -> Result:
        precompute = options.get("reference") == "precomputed"
        module = preference_module(cfg, **options)
        data = preference_batches(cfg, module)
        if precompute:  # what tools/precompute_reference.py stores in the shards (a one-off pass, not timed)
            from vlsafe.methods.preference.module import batch_reference_logps

            module.vlm.eval()
            for batch in data:
                batch["ref_logps"] = batch_reference_logps(module.vlm, batch)
            module.vlm.train()
        pairs = cfg.batch_size * (2 if options.get("blind") == "sum" else 1)
        return fit_timed(cfg, workdir, module, data, _work(data, cfg.batch_size, pairs))

    return run


dpo_vlsafe = _preference_contender()
dpo_vlsafe_per_sequence_images = _preference_contender(share_image_features=False)
dpo_vlsafe_full_sequences = _preference_contender(share_prompt=False)
dpo_vlsafe_precomputed_reference = _preference_contender(reference="precomputed")
bpo_vlsafe = _preference_contender(blind="sum")
dpo_vlsafe_lora_adapter_reference = _preference_contender(lora=True, reference="adapter")
dpo_vlsafe_lora_copy_reference = _preference_contender(lora=True, reference="copy")


def trl_inputs(batch: dict[str, Any], image_token_index: int) -> dict[str, torch.Tensor]:
    """A vlsafe preference batch (chosen rows then rejected rows) in the layout TRL's DPO collator emits."""
    inputs = to_hf_inputs(batch, image_token_index, copies=len(batch["responses"]))
    inputs["completion_mask"] = (batch["labels"] != -100).long()
    return inputs


def trl_dpo_trainer(model, ref_model, data: list[dict[str, Any]], cfg: BenchConfig, workdir: Path,
                    **config_overrides: Any):
    """TRL's `DPOTrainer` on exactly `data` (a collator hands it our batches converted to its layout).
    `config_overrides` replace `DPOConfig` fields (the GPU check sets `use_cpu=False, bf16=True`)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    index = model.config.image_token_index
    queue = iter(data)

    def collate(_examples):
        return trl_inputs(next(queue), index)

    rows = cfg.batch_size * len(data)
    dataset = Dataset.from_dict({"image": list(range(rows)), "prompt": ["x"] * rows, "chosen": ["y"] * rows,
                                 "rejected": ["z"] * rows})
    fields = DPOConfig.__dataclass_fields__  # the flag was renamed; ours never checkpoints activations either
    no_checkpointing = {"activation_checkpointing" if "activation_checkpointing" in fields
                        else "gradient_checkpointing": False}
    settings = dict(output_dir=str(workdir / "trl"), per_device_train_batch_size=cfg.batch_size,
                    max_steps=len(data), learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0,
                    weight_decay=0.0, beta=0.1, max_length=None, **no_checkpointing,
                    remove_unused_columns=False, report_to=[], save_strategy="no", logging_steps=10_000,
                    use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=cfg.seed, bf16=False)
    args = DPOConfig(**{**settings, **config_overrides})
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(workdir / "hf"))
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                      processing_class=processor, data_collator=collate)


def dpo_trl(cfg: BenchConfig, workdir: Path) -> Result:
    """TRL's DPOTrainer (live reference model copy, its VLM path) on the same weights and pairs."""
    module = preference_module(cfg, reference="precomputed")  # no reference copy needed on our side
    data = preference_batches(cfg, module)
    model, _ = export_hf(module, workdir / "hf")
    del module
    freeze_like_vlsafe(model)
    trainer = trl_dpo_trainer(model, frozen_copy(model), data, cfg, workdir)
    return trl_train_timed(trainer, cfg, _work(data, cfg.batch_size, cfg.batch_size))


def trl_train_timed(trainer, cfg: BenchConfig, work: dict[str, float], callbacks: Iterable[Any] = ()) -> Result:
    """`trainer.train()` of a transformers/TRL trainer, timed per step like `fit_timed`."""
    from transformers import TrainerCallback

    clock, losses = _StepClock(), []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.tick()

        def on_train_end(self, args, state, control, **kwargs):
            clock.tick()

    original = trainer.compute_loss

    def compute_loss(*args: Any, **kwargs: Any):
        loss = original(*args, **kwargs)
        losses.append(float(loss[0] if isinstance(loss, tuple) else loss))
        return loss

    trainer.compute_loss = compute_loss
    for callback in (Clock(), *callbacks):
        trainer.add_callback(callback)
    trainer.train()
    return _steps_result(clock.times, cfg, work, losses[0])


# ------------------------------------------------------------------------------------- data loading
# The images a LLaVA-style trainer reads are the dataset's originals (COCO: ~640x480 JPEG, ~100-200 KB), not
# images already at the model's side; the bench makes its synthetic scenes look like that on disk (~90 KB each).
ORIGINAL_IMAGE_SIZE = (640, 480)
DATA_BATCH_SIZE = 16
DATA_WORKERS = 2


def _photo_like_jpeg(png: bytes, noise: Any, offset: int) -> bytes:
    """A synthetic scene as a COCO-like original: 640x480, sensor-like noise so that it compresses like a
    photo rather than flat colour, JPEG quality 90."""
    import io

    import numpy as np
    from PIL import Image

    scene = Image.open(io.BytesIO(png)).convert("RGB").resize(ORIGINAL_IMAGE_SIZE, Image.Resampling.BILINEAR)
    shifted = np.roll(noise, offset, axis=(0, 1))
    pixels = np.clip(np.asarray(scene, dtype=np.int16) + shifted, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def data_processor(cfg: BenchConfig):
    """The bench model's processor without building the model (the data contenders need only this; a test
    checks it equals `cfg.builder().build()[1]` in every setting that touches the data)."""
    from transformers import AutoTokenizer

    from vlsafe.bench.setup import bench_tokenizer
    from vlsafe.data.encoding.processor import VLMProcessor

    builder = cfg.builder()
    return VLMProcessor(AutoTokenizer.from_pretrained(str(bench_tokenizer()), use_fast=True), builder.template,
                        image_size=cfg.image_size, num_image_tokens=(cfg.image_size // cfg.patch_size) ** 2,
                        max_length=builder.max_length)


def _data_sources(cfg: BenchConfig, workdir: Path) -> dict[str, Path]:
    """The same samples three ways, built once per bench run and shared by every data contender:

    - `listing` + `images`: LLaVA layout, a JSON list and one 640x480 JPEG per sample;
    - `original`: `make_shards llava` of that JSON (shards hold the very same JPEG bytes);
    - `presized`: `make_shards llava --presize <model side>` (squared, resized, raw PPM pixels).

    Writing costs (a one-off, not in the loader timings) are stored in `prep.json`.
    """
    root = workdir.parent / f"data-sources-{cfg.data_samples}-{cfg.image_size}-{cfg.seed}"
    paths = {"listing": root / "llava.json", "images": root / "images", "original": root / "shards-original",
             "presized": root / "shards-presized", "prep": root / "prep.json"}
    if not paths["prep"].exists():
        # In a child process: the contender that happens to build the data must not fork its loader workers
        # from a bigger heap than the others (measured: up to 1.5x slower loading in that contender).
        import multiprocessing

        child = multiprocessing.get_context("fork").Process(target=_write_data_sources, args=(cfg, paths))
        child.start()
        child.join()
        if child.exitcode != 0 or not paths["prep"].exists():
            raise RuntimeError(f"writing the data benchmark's sources to {root} failed (exit {child.exitcode})")
    return paths


def _write_data_sources(cfg: BenchConfig, paths: dict[str, Path]) -> None:
    import json
    import shutil

    import numpy as np

    from vlsafe.data.images import Presize
    from vlsafe.data.shards import write_shards
    from vlsafe.data.sources.llava import read_llava_json

    shutil.rmtree(paths["prep"].parent, ignore_errors=True)
    paths["images"].mkdir(parents=True)
    samples = synthetic_samples("caption", cfg.data_samples, cfg.seed, cfg.image_size)
    rng = np.random.default_rng(cfg.seed)
    width, height = ORIGINAL_IMAGE_SIZE
    noise = rng.normal(0, 10, (height, width, 3)).astype(np.int16)
    prep: dict[str, float] = {}
    start = time.perf_counter()
    records = []
    for i, s in enumerate(samples):
        name = f"{s.id}.jpg"
        (paths["images"] / name).write_bytes(_photo_like_jpeg(s.images[0], noise, 7919 * i))
        records.append({"id": s.id, "image": name, "conversations": [
            {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in s.messages]})
    paths["listing"].write_text(json.dumps(records))
    prep["originals_seconds"] = time.perf_counter() - start
    shard_size = max(1, cfg.data_samples // 4)
    for kind, presize in (("original", None), ("presized", Presize.for_processor(data_processor(cfg)))):
        start = time.perf_counter()  # exactly what `tools/make_shards.py llava [--presize N]` runs
        write_shards(read_llava_json(paths["listing"], paths["images"]), paths[kind], max_samples=shard_size,
                     presize=presize)
        prep[f"make_shards_{kind}_seconds"] = time.perf_counter() - start
    sizes = {kind: sum(f.stat().st_size for f in paths[kind].rglob("*") if f.is_file())
             for kind in ("images", "original", "presized")}
    prep.update({f"{kind}_mb": size / 2**20 for kind, size in sizes.items()}, samples=float(cfg.data_samples))
    paths["prep"].write_text(json.dumps(prep))


def evict_from_page_cache(paths: list[Path]) -> int:
    """Emulate cold storage: drop every file's pages from the OS page cache (fsync first, dirty pages stay),
    so the next read goes to the disk. Returns the bytes evicted."""
    import os

    if not hasattr(os, "posix_fadvise"):
        raise RuntimeError("the cold-cache data contenders need os.posix_fadvise (Linux); run without them")
    total = 0
    for path in paths:
        for file in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


class _PerFileDataset(torch.utils.data.Dataset):
    """What LLaVA-style trainers do: a JSON list in memory, one image file opened per `__getitem__`."""

    def __init__(self, listing: Path, images: Path, encoder: Any):
        import json

        self.records, self.images, self.encoder = json.loads(listing.read_text()), images, encoder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from vlsafe.data.sources.llava import llava_record_to_sample

        sample = llava_record_to_sample(self.records[i], self.images)
        sample.images = [Path(p).read_bytes() for p in sample.images]  # one open() per image, as LLaVA does
        return self.encoder.encode(sample)


def per_file_loader(listing: Path, images: Path, encoder: Any, num_workers: int = DATA_WORKERS,
                    shuffle: bool = True) -> torch.utils.data.DataLoader:
    """The LLaVA-style baseline: map-style dataset over the JSON, random order, torch DataLoader."""
    return torch.utils.data.DataLoader(_PerFileDataset(listing, images, encoder), batch_size=DATA_BATCH_SIZE,
                                       shuffle=shuffle, num_workers=num_workers, collate_fn=encoder.collate)


def shard_loader(shards: Path, encoder: Any, num_workers: int = DATA_WORKERS) -> Iterable[dict[str, Any]]:
    """What a vlsafe recipe gets: `ShardDataModule` over the shard folder (training order, no shuffle buffer:
    the buffer only holds undecoded bytes and would move reading work before the timed window). Workers ship
    uint8 images; the normalisation Lightning runs after the device transfer runs here, inside the timing."""
    from vlsafe.data.datamodule import ShardDataModule

    dm = ShardDataModule(train=str(shards), batch_size=DATA_BATCH_SIZE, num_workers=num_workers, shuffle_buffer=0)
    dm.connect(encoder)
    dm.setup("fit")
    return _Mapped(dm.train_dataloader(), dm.normalize_batch)


class _Mapped:
    """Re-iterable `map(fn, loader)`: one pass per `for` loop, like the loader itself."""

    def __init__(self, loader: Iterable[Any], fn: Callable[[Any], Any]):
        self.loader, self.fn = loader, fn

    def __iter__(self) -> Iterator[Any]:
        return (self.fn(batch) for batch in self.loader)


def _cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the dataloader workers, joined when the loader ends)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _time_loader(loader, passes: int = 3, before_pass: Callable[[], Any] | None = None) -> Result:
    """Images/s of each pass over `loader` (a "step"; the bench takes the median), timed from the end of
    the first batch (worker start-up is not throughput) to the last batch. Also CPU ms per image over all
    passes including worker start-up: less disturbed by other load on the machine, but start-up weighs on
    small runs."""
    durations, images, total, first_batch = [], 0, 0, []
    cpu = _cpu_seconds()
    for _ in range(passes):
        if before_pass is not None:
            before_pass()
        images, start, first = 0, time.perf_counter(), None
        for batch in loader:
            total += int(batch["pixel_values"].shape[0])
            if first is None:
                first = time.perf_counter() - start
                start = time.perf_counter()
                continue
            images += int(batch["pixel_values"].shape[0])
        durations.append(time.perf_counter() - start)
        first_batch.append(first)
    return {"step_seconds": durations, "work_per_step": {"images": float(images)}, "first_loss": None,
            "first_batch_seconds": first_batch, "cpu_ms_per_image_with_startup": (_cpu_seconds() - cpu) / total * 1e3}


def _data_contender(layout: str, cold: bool = False) -> Callable[[BenchConfig, Path], Result]:
    def run(cfg: BenchConfig, workdir: Path) -> Result:
        import json

        from vlsafe.data.encoding.encoders import ConversationEncoder

        paths = _data_sources(cfg, workdir)
        encoder = ConversationEncoder(data_processor(cfg))
        # The loader workers own the cores; a consumer with a thread pool of its own only spins against
        # them (measured: normalising a uint8 batch cost 1.3 CPU ms per image with 2 threads, 0.3 with 1).
        # Both contenders' consumers run with one thread. In training, the normalisation is device work.
        torch.set_num_threads(1)
        if layout == "per_file":
            read = [paths["listing"], paths["images"]]
            loader = per_file_loader(paths["listing"], paths["images"], encoder)
        else:
            read = [paths[layout]]
            loader = shard_loader(paths[layout], encoder)
        evicted: list[int] = []

        def evict() -> None:
            evicted.append(evict_from_page_cache(read))

        result = _time_loader(loader, before_pass=evict if cold else None)
        result.update(evicted_mb=sum(evicted) / 2**20, prep=json.loads(paths["prep"].read_text()))
        return result

    run.__doc__ = f"{layout} loading, 2 workers, {'cold page cache (posix_fadvise DONTNEED)' if cold else 'warm cache'}"
    return run


data_per_file = _data_contender("per_file")
data_per_file_cold = _data_contender("per_file", cold=True)
data_webdataset_original = _data_contender("original")
data_webdataset = _data_contender("presized")
data_webdataset_cold = _data_contender("presized", cold=True)


# --------------------------------------------------------------------------------------- generation
def _generation(cfg: BenchConfig, batch_size: int) -> Result:
    from vlsafe.data.encoding.encoders import PromptEncoder

    torch.manual_seed(cfg.seed)
    vlm, processor = cfg.builder().build()
    vlm.eval()
    encoder = PromptEncoder(processor)
    samples = synthetic_samples("qa", cfg.generate_prompts, cfg.seed, cfg.image_size)  # the answer is dropped
    clock, new_tokens = _StepClock(), 0
    clock.tick()
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            batch = encoder.collate([encoder.encode(s) for s in samples[i:i + batch_size]])
            out = vlm.generate(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                               max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens, do_sample=False,
                               pad_token_id=processor.tokenizer.pad_token_id)
            new_tokens += int(out.shape[0] * out.shape[1])
    clock.tick()
    return {"step_seconds": [clock.times[1] - clock.times[0]],
            "work_per_step": {"tokens": float(new_tokens), "samples": float(len(samples))}, "first_loss": None}


def generate_batched(cfg: BenchConfig, workdir: Path) -> Result:
    """Batched greedy generation (left padding, KV cache) as `tools/evaluate.py` runs it."""
    return _generation(cfg, batch_size=cfg.generate_prompts)


def generate_one_by_one(cfg: BenchConfig, workdir: Path) -> Result:
    """One prompt at a time, as most research eval scripts do."""
    return _generation(cfg, batch_size=1)


# -------------------------------------------------------------------------------------- utilisation
def matmul_peak(cfg: BenchConfig, workdir: Path) -> Result:
    """This machine's dense fp32 matmul FLOP/s (the denominator of model FLOP utilisation)."""
    n = 1024 if cfg.hidden_size >= 256 else 256
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return {"step_seconds": times, "work_per_step": {"flops": 2.0 * n ** 3}, "first_loss": None}


CONTENDERS: dict[str, Callable[[BenchConfig, Path], Result]] = {
    "sft/vlsafe": sft_vlsafe,
    "sft/plain_torch": sft_plain_torch,
    "dpo/vlsafe": dpo_vlsafe,
    "dpo/vlsafe_per_sequence_images": dpo_vlsafe_per_sequence_images,
    "dpo/vlsafe_full_sequences": dpo_vlsafe_full_sequences,
    "dpo/vlsafe_precomputed_reference": dpo_vlsafe_precomputed_reference,
    "dpo/vlsafe_lora_adapter_reference": dpo_vlsafe_lora_adapter_reference,
    "dpo/vlsafe_lora_copy_reference": dpo_vlsafe_lora_copy_reference,
    "bpo/vlsafe": bpo_vlsafe,
    "dpo/trl": dpo_trl,
    "data/webdataset": data_webdataset,
    "data/webdataset_original": data_webdataset_original,
    "data/webdataset_cold": data_webdataset_cold,
    "data/per_file": data_per_file,
    "data/per_file_cold": data_per_file_cold,
    "generate/batched": generate_batched,
    "generate/one_by_one": generate_one_by_one,
    "peak/matmul": matmul_peak,
    **SERVING_CONTENDERS,
    **PACKING_CONTENDERS,
}
