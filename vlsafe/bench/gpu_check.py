"""The measurements of `tools/gpu_check.py`: bf16 SFT and DPO steps on a ~1B-parameter random LLaVA layout under
FSDP2 on one device, and TRL's `DPOTrainer` on the same model and batches.

Everything is made here: random weights (`RandomLlava`), the bench tokenizer, synthetic scenes whose text lengths
have a LLaVA-like long tail (`llava_like_samples`). No network, no checkpoint. `GpuCheckConfig.tiny()` runs the
same code paths on a CPU in seconds, which is how the suite keeps this check working between GPU runs.

Phases run one after the other in this process. Each gets a share of the time budget (it stops after the
step that crosses its deadline, never before warm-up + 2 timed steps), its own peak-memory window, and its own
failure record: an out-of-memory error or any other exception is written into the phase's result, the
device memory is freed, and the next phase runs.
"""
from __future__ import annotations

import gc
import math
import os
import random
import resource
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vlsafe.bench.contenders import (
    _sft_module,
    _work,
    fit_timed,
    preference_module,
    training_flops,
    trl_dpo_trainer,
    trl_train_timed,
)
from vlsafe.bench.setup import (
    batches,
    bench_tokenizer,
    export_hf,
    freeze_like_vlsafe,
    frozen_copy,
    real_tokens,
)
from vlsafe.builders import TinyVLM

Result = dict[str, Any]
PHASES = ("sft/vlsafe_fsdp2", "dpo/vlsafe_fsdp2", "dpo/trl")
MIN_TIMED_STEPS = 2
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, by a substring of the device name.
# Lightning's table (used for other devices) lists some Hopper parts with their 2:4-sparsity figure.
DENSE_BF16_PEAKS = (("h200 nvl", 835e12), ("h200", 989e12), ("h100 nvl", 835e12), ("h100 pcie", 756e12),
                    ("h100", 989e12), ("a100", 312e12))


@dataclass(frozen=True)
class GpuCheckConfig:
    """Sizes of a check. The default is a ~1.4B-parameter LLaVA-1.5 layout: a CLIP-L/14-336-shaped ViT (576 image
    tokens, width 1024, 24 blocks; MLP ratio 2, as `TinyVLM` builds it) and a 1.2B Llama (hidden 2048, 20 layers,
    16 heads of 128, MLP 5632, Llama-2's 32000-token vocabulary). Text lengths are lognormal (median, sigma),
    clipped to [8, max]: an assumed shape with LLaVA-665k's long tail, not a fit to it."""

    image_size: int = 336
    patch_size: int = 14
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    hidden_size: int = 2048
    num_layers: int = 20
    num_heads: int = 16
    intermediate_size: int = 5632
    llm_vocab_size: int = 32000
    max_length: int = 2048
    batch_size: int = 8  # SFT samples per step
    dpo_batch_size: int = 4  # DPO pairs per step (2 sequences each)
    warmup_steps: int = 3
    timed_steps: int = 20
    text_median: int = 160  # SFT answer words
    text_sigma: float = 0.8
    text_max: int = 1024
    response_median: int = 96  # each DPO response, words
    response_sigma: float = 0.7
    response_max: int = 512
    lr: float = 1e-5
    seed: int = 0

    @classmethod
    def tiny(cls) -> GpuCheckConfig:
        """For CPU tests: seconds in all, the same code paths (FSDP2, bf16, SDPA, TRL)."""
        return cls(image_size=64, patch_size=16, vision_width=64, vision_layers=2, vision_heads=2, hidden_size=64,
                   num_layers=2, num_heads=4, intermediate_size=128, llm_vocab_size=1088, max_length=256,
                   batch_size=2, dpo_batch_size=2, warmup_steps=1, timed_steps=2, text_median=24, text_max=96,
                   response_median=12, response_max=48)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def builder(self) -> RandomLlava:
        return RandomLlava(image_size=self.image_size, patch_size=self.patch_size, vision_width=self.vision_width,
                           vision_layers=self.vision_layers, vision_heads=self.vision_heads,
                           hidden_size=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads,
                           intermediate_size=self.intermediate_size, llm_vocab_size=self.llm_vocab_size,
                           max_length=self.max_length, seed=self.seed, tokenizer=str(bench_tokenizer()))

    def for_dpo(self) -> GpuCheckConfig:
        """`batch_size` is what the shared contender helpers read; for DPO it counts pairs."""
        return replace(self, batch_size=self.dpo_batch_size)


class RandomLlava(TinyVLM):
    """`TinyVLM` at any size, with the LLM's vocabulary padded to a real tokenizer's size (the LM head's cost and
    logits memory are part of what a GPU check measures) and an explicit attention kernel (`sdpa`)."""

    def __init__(self, image_size: int = 336, patch_size: int = 14, vision_width: int = 1024, vision_layers: int = 24,
                 vision_heads: int = 16, hidden_size: int = 2048, num_layers: int = 20, num_heads: int = 16,
                 intermediate_size: int = 5632, llm_vocab_size: int = 32000, attn_implementation: str = "sdpa",
                 select_layer: int = -2, max_length: int = 2048, seed: int = 0, tokenizer: str | None = None):
        super().__init__(image_size=image_size, patch_size=patch_size, vision_width=vision_width,
                         vision_layers=vision_layers, vision_heads=vision_heads, hidden_size=hidden_size,
                         num_layers=num_layers, num_heads=num_heads, intermediate_size=intermediate_size,
                         select_layer=select_layer, max_length=max_length, seed=seed, tokenizer=tokenizer)
        self.llm_vocab_size, self.attn_implementation = llm_vocab_size, attn_implementation

    def build(self):
        vlm, processor = super().build()
        llm = vlm.llm
        rows = llm.get_input_embeddings().weight.shape[0]
        if self.llm_vocab_size < rows:
            raise ValueError(f"RandomLlava: llm_vocab_size={self.llm_vocab_size} is smaller than the tokenizer's "
                             f"{rows} tokens")
        if self.llm_vocab_size > rows:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + 1)
                llm.resize_token_embeddings(self.llm_vocab_size, mean_resizing=False)
        llm.set_attn_implementation(self.attn_implementation)
        return vlm, processor


# ---------------------------------------------------------------------------------------------------- data
def _lengths(n: int, median: int, sigma: float, maximum: int, rng: random.Random) -> list[int]:
    return [min(maximum, max(8, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def _filler(words: list[str], count: int, rng: random.Random) -> str:
    return " ".join(rng.choice(words) for _ in range(count))


def llava_like_samples(kind: str, n: int, cfg: GpuCheckConfig) -> list:
    """`n` synthetic scenes (`caption` for SFT, `preference` for DPO) whose answers are lengthened with words of
    the synthetic world to lognormal lengths (about one token per word with the bench tokenizer)."""
    from vlsafe.bench.setup import synthetic_samples
    from vlsafe.data.synthetic.world import corpus

    words = sorted({w for text in corpus() for w in text.split() if w.isalpha()})
    rng = random.Random(cfg.seed)
    samples = synthetic_samples(kind, n, cfg.seed, cfg.image_size)
    if kind == "caption":
        for sample, length in zip(samples, _lengths(n, cfg.text_median, cfg.text_sigma, cfg.text_max, rng)):
            answer = sample.messages[-1]["content"]
            sample.messages[-1] = {"role": "assistant", "content": f"{answer} {_filler(words, length, rng)}"}
    elif kind == "preference":
        chosen = _lengths(n, cfg.response_median, cfg.response_sigma, cfg.response_max, rng)
        rejected = _lengths(n, cfg.response_median, cfg.response_sigma, cfg.response_max, rng)
        for sample, a, b in zip(samples, chosen, rejected):
            sample.chosen = f"{sample.chosen} {_filler(words, a, rng)}"
            sample.rejected = f"{sample.rejected} {_filler(words, b, rng)}"
    else:
        raise ValueError(f"llava_like_samples: kind must be caption or preference, got {kind!r}")
    return samples


def _steps(cfg: GpuCheckConfig) -> int:
    return cfg.warmup_steps + cfg.timed_steps


def sft_batches(cfg: GpuCheckConfig, module) -> list[dict[str, Any]]:
    samples = llava_like_samples("caption", 8 * cfg.batch_size, cfg)
    return batches(module.data_encoder("fit"), samples, cfg.batch_size, _steps(cfg))


def dpo_batches(cfg: GpuCheckConfig, module) -> list[dict[str, Any]]:
    """`cfg.batch_size` pairs per batch (pass `cfg.for_dpo()`), no stored reference log-probs."""
    from vlsafe.methods.preference.encoding import PreferenceEncoder

    samples = llava_like_samples("preference", 8 * cfg.batch_size, cfg)
    return batches(PreferenceEncoder(module.processor, module.responses), samples, cfg.batch_size, _steps(cfg))


def describe_batches(data: list[dict[str, Any]]) -> dict[str, float]:
    """Sequence lengths the phase trained on (LLM positions incl. image tokens, padding excluded)."""
    rows = [int(n) for b in data for n in b["attention_mask"].sum(dim=1)]
    return {"sequences": len(rows), "tokens_mean": statistics.fmean(rows), "tokens_min": min(rows),
            "tokens_max": max(rows), "padded_length_mean": statistics.fmean(b["input_ids"].shape[1] for b in data)}


# --------------------------------------------------------------------------------------------------- flops
def _param_counts(vlm) -> dict[str, int]:
    llm = sum(p.numel() for n, p in vlm.llm.named_parameters() if "embed_tokens" not in n)
    return {"llm_without_embeddings": llm, "vision": sum(p.numel() for p in vlm.vision.parameters()),
            "projector": sum(p.numel() for p in vlm.projector.parameters()),
            "total": sum(p.numel() for p in vlm.parameters()),
            "trainable": sum(p.numel() for p in vlm.parameters() if p.requires_grad)}


def dpo_model_flops(module, batch: dict[str, Any]) -> float:
    """Model FLOPs of one DPO step as the textbook computation does it, charged equally to every contender:
    each sequence (chosen and rejected, image included) through the policy (6·N per LLM position and per patch of
    the trained projector, 2·N per patch of the frozen tower) and through the reference (2·N everywhere).
    vlsafe's shared prompt and image features do less work than this; that shows up as higher MFU."""
    counts = _param_counts(module.vlm)
    rows = int(batch["input_ids"].shape[0])
    patches = rows * module.vlm.vision.num_patches
    tokens = real_tokens(batch)
    policy = 6.0 * counts["llm_without_embeddings"] * tokens + 2.0 * counts["vision"] * patches \
        + 6.0 * counts["projector"] * patches
    reference = 2.0 * (counts["llm_without_embeddings"] * tokens + (counts["vision"] + counts["projector"]) * patches)
    return policy + reference


# -------------------------------------------------------------------------------------------------- device
def compute_device(tiny: bool) -> torch.device:
    """CUDA when there is one; the CPU only for `--tiny` (the full check on a CPU would take hours)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if not tiny:
        raise RuntimeError("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False). The full "
                           "check needs one NVIDIA GPU with 80 GB (sizes chosen for an H100/A100 80GB); `--tiny` "
                           "runs the same code paths at tiny size on a CPU.")
    return torch.device("cpu")


def matmul_peak(device: torch.device) -> float:
    """Dense bf16 matmul FLOP/s measured on `device` (a practical ceiling next to the data-sheet figure)."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2.0 * n ** 3 * reps / (time.perf_counter() - start)


def datasheet_peak(device: torch.device) -> tuple[float | None, str]:
    """Dense bf16 peak FLOP/s of a known GPU: our dense table first, then Lightning's."""
    if device.type != "cuda":
        return None, "none (not a GPU)"
    name = torch.cuda.get_device_name(device).lower()
    for key, flops in DENSE_BF16_PEAKS:
        if key in name:
            return flops, f"data sheet, dense bf16 ({key})"
    from lightning.fabric.utilities.throughput import get_available_flops

    flops = get_available_flops(device, torch.bfloat16)
    return (float(flops), "Lightning's table (bf16)") if flops else (None, f"unknown device {name!r}")


def device_report(device: torch.device, peak_flops: float | None = None) -> dict[str, Any]:
    measured = matmul_peak(device)
    sheet, source = (peak_flops, "--peak-flops") if peak_flops else datasheet_peak(device)
    report = {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "matmul_peak_flops": measured, "datasheet_peak_flops": sheet,
              "peak_flops": sheet or measured, "peak_flops_source": source if sheet else "measured bf16 matmul",
              "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        report.update(total_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                      sdpa_backends={"flash": torch.backends.cuda.flash_sdp_enabled(),
                                     "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                     "math": torch.backends.cuda.math_sdp_enabled()})
    return report


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Between phases: no process group left for the next trainer to trip over, no cached blocks."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def restore_environment(saved: dict[str, str]) -> None:
    """Undo what a phase's launcher wrote into `os.environ`: Lightning leaves MASTER_ADDR/MASTER_PORT behind,
    and accelerate (under TRL) reads those as a distributed launch and wraps the model in DDP."""
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
                "peak_memory_kind": "torch.cuda.max_memory_allocated over this phase"}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "host peak RSS of the whole process so far (CPU run)"}


# -------------------------------------------------------------------------------------------------- budget
class TimeBudget:
    """Seconds for the whole check; each phase may use what is left divided by the phases still to run."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def phase_deadline(self, phases_left: int) -> float:
        return time.perf_counter() + max(0.0, self.left()) / max(1, phases_left)


def lightning_stopper(deadline: float, min_steps: int):
    import lightning as L

    class StopAtDeadline(L.Callback):
        stopped = False

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx + 1 >= min_steps and time.perf_counter() > deadline:
                trainer.should_stop = StopAtDeadline.stopped = True

    return StopAtDeadline()


def trl_stopper(deadline: float, min_steps: int):
    from transformers import TrainerCallback

    class StopAtDeadline(TrainerCallback):
        stopped = False

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= min_steps and time.perf_counter() > deadline:
                control.should_training_stop = StopAtDeadline.stopped = True

    return StopAtDeadline()


# -------------------------------------------------------------------------------------------------- phases
def lightning_options(device: torch.device) -> dict[str, Any]:
    """FSDP2 on one device with bf16 compute, fp32 master weights and fp32 gradient reduction: the strategy of
    recipes/scale/sft_7b_fsdp2.yaml."""
    from vlsafe.scale.fsdp2 import FSDP2

    return {"accelerator": "gpu" if device.type == "cuda" else "cpu", "devices": 1, "precision": "32-true",
            "strategy": FSDP2(param_dtype="bf16", reduce_dtype="fp32")}


def _per_batch(result: Result, data: list[dict[str, Any]], flops: list[float]) -> Result:
    result["tokens_per_batch"] = [float(real_tokens(b)) for b in data]
    result["flops_per_batch"] = [float(f) for f in flops]
    result["batches"] = describe_batches(data)
    return result


def sft_vlsafe_fsdp2(cfg: GpuCheckConfig, workdir: Path, device: torch.device, deadline: float) -> Result:
    """vlsafe's `SFTModule` under Lightning + FSDP2 (frozen tower, trained projector and LLM)."""
    module = _sft_module(cfg)
    data = sft_batches(cfg, module)
    flops = [training_flops(module, b) for b in data]
    params = _param_counts(module.vlm)
    stopper = lightning_stopper(deadline, cfg.warmup_steps + MIN_TIMED_STEPS)
    result = fit_timed(cfg, workdir, module, data, _work(data, cfg.batch_size), callbacks=[stopper],
                       **lightning_options(device))
    result.update(params=params, stopped_by_budget=type(stopper).stopped)
    return _per_batch(result, data, flops)


def dpo_vlsafe_fsdp2(cfg: GpuCheckConfig, workdir: Path, device: torch.device, deadline: float) -> Result:
    """vlsafe's `PreferenceModule` (DPO, live reference copy, shared prompt and image features) under FSDP2."""
    cfg = cfg.for_dpo()
    module = preference_module(cfg)
    data = dpo_batches(cfg, module)
    flops = [dpo_model_flops(module, b) for b in data]
    params = _param_counts(module.vlm)
    stopper = lightning_stopper(deadline, cfg.warmup_steps + MIN_TIMED_STEPS)
    result = fit_timed(cfg, workdir, module, data, _work(data, cfg.batch_size, cfg.batch_size),
                       callbacks=[stopper], **lightning_options(device))
    result.update(params=params, stopped_by_budget=type(stopper).stopped)
    return _per_batch(result, data, flops)


def dpo_trl(cfg: GpuCheckConfig, workdir: Path, device: torch.device, deadline: float) -> Result:
    """TRL's `DPOTrainer` (its VLM path, live reference copy, bf16 autocast over fp32 weights, SDPA) on the
    exported weights of the same random model and the same batches."""
    cfg = cfg.for_dpo()
    module = preference_module(cfg, reference="precomputed")  # same seed: the policy of dpo/vlsafe_fsdp2
    data = dpo_batches(cfg, module)
    flops = [dpo_model_flops(module, b) for b in data]
    params = _param_counts(module.vlm)
    model, _ = export_hf(module, workdir / "hf", attn_implementation="sdpa")
    del module
    freeze_like_vlsafe(model)
    trainer = trl_dpo_trainer(model, frozen_copy(model), data, cfg, workdir, use_cpu=device.type != "cuda",
                              bf16=True)
    stopper = trl_stopper(deadline, cfg.warmup_steps + MIN_TIMED_STEPS)
    result = trl_train_timed(trainer, cfg, _work(data, cfg.batch_size, cfg.batch_size), callbacks=[stopper])
    result.update(params=params, stopped_by_budget=type(stopper).stopped, optimizer=str(trainer.args.optim))
    return _per_batch(result, data, flops)


PHASE_FUNCTIONS: dict[str, Callable[[GpuCheckConfig, Path, torch.device, float], Result]] = {
    "sft/vlsafe_fsdp2": sft_vlsafe_fsdp2,
    "dpo/vlsafe_fsdp2": dpo_vlsafe_fsdp2,
    "dpo/trl": dpo_trl,
}


def summarise(raw: Result, cfg: GpuCheckConfig, peak_flops: float, matmul_flops: float) -> Result:
    """Throughput over the timed steps (warm-up excluded): totals over the timed window, with their n."""
    durations = raw["step_seconds"]
    timed = range(cfg.warmup_steps, cfg.warmup_steps + len(durations))
    seconds = sum(durations)
    samples = raw["work_per_step"]["samples"] * len(durations)
    tokens = sum(raw["tokens_per_batch"][i] for i in timed)
    flops = sum(raw["flops_per_batch"][i] for i in timed)
    if not durations or seconds <= 0:
        raise RuntimeError(f"no timed step was measured ({len(durations)} steps, {seconds} s)")
    return {"status": "ok", "steps": len(durations), "samples": samples, "tokens": tokens, "seconds": seconds,
            "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
            "median_step_seconds": statistics.median(durations), "model_flops": flops,
            "achieved_flops_per_s": flops / seconds, "mfu": flops / seconds / peak_flops,
            "mfu_vs_matmul": flops / seconds / matmul_flops, "first_loss": raw["first_loss"],
            "stopped_by_budget": raw["stopped_by_budget"], "params": raw["params"], "batches": raw["batches"],
            "optimizer": raw.get("optimizer", "vlsafe AdamW (optim.fused=auto: fused kernel where possible)")}


def run_phase(name: str, cfg: GpuCheckConfig, workdir: Path, device: torch.device, budget: TimeBudget,
              phases_left: int, peak: dict[str, Any]) -> Result:
    """One phase with its own memory window; an exception becomes the phase's record, never the check's end."""
    start, environment = time.perf_counter(), dict(os.environ)
    release_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    allocated_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    try:
        raw = PHASE_FUNCTIONS[name](cfg, workdir / name.replace("/", "__"), device, budget.phase_deadline(phases_left))
        out = summarise(raw, cfg, peak["peak_flops"], peak["matmul_peak_flops"])
    except torch.cuda.OutOfMemoryError as e:
        out = {"status": "oom", "error": f"OutOfMemoryError: {str(e).splitlines()[0]}"}
    except Exception as e:  # noqa: BLE001 - recorded, printed, and the check exits 1 (vlsafe/tools/gpu_check.py)
        out = {"status": "error", "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc(limit=-8)}
    out.update(_peak_memory(device), allocated_at_start_bytes=allocated_before,
               wall_seconds=time.perf_counter() - start)
    release_memory(device)
    restore_environment(environment)
    return out


def ratios(phases: dict[str, Result]) -> dict[str, float | None]:
    """vlsafe / TRL on the DPO step (> 1: vlsafe faster, or TRL needs more memory), from the measured figures."""
    ours, theirs = phases.get("dpo/vlsafe_fsdp2", {}), phases.get("dpo/trl", {})
    if ours.get("status") != "ok" or theirs.get("status") != "ok":
        return {"dpo_samples_per_s_vlsafe_over_trl": None, "dpo_tokens_per_s_vlsafe_over_trl": None,
                "dpo_peak_memory_trl_over_vlsafe": None}
    return {"dpo_samples_per_s_vlsafe_over_trl": ours["samples_per_s"] / theirs["samples_per_s"],
            "dpo_tokens_per_s_vlsafe_over_trl": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "dpo_peak_memory_trl_over_vlsafe": theirs["peak_memory_bytes"] / ours["peak_memory_bytes"]}


def run_check(cfg: GpuCheckConfig, workdir: Path, device: torch.device, time_budget: float,
              phases: tuple[str, ...] = PHASES, peak_flops: float | None = None) -> Result:
    """Every phase in order, then the ratios; the whole report as plain data."""
    import lightning
    import transformers
    import trl

    budget = TimeBudget(time_budget)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_float32_matmul_precision("high")  # the same for every phase: TF32 for whatever stays in fp32
    peak = device_report(device, peak_flops)
    results: dict[str, Result] = {}
    for i, name in enumerate(phases):
        if budget.left() <= 0:
            results[name] = {"status": "skipped", "error": f"time budget of {time_budget:.0f} s spent"}
            continue
        results[name] = run_phase(name, cfg, workdir, device, budget, len(phases) - i, peak)
    return {"config": cfg.as_dict(), "device": peak, "time_budget_seconds": time_budget,
            "total_seconds": time.perf_counter() - budget.start,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "trl": trl.__version__, "lightning": lightning.__version__},
            "phases": results, "ratios": ratios(results),
            "ok": all(r.get("status") == "ok" for r in results.values())}
