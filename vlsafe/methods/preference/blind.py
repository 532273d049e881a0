"""Blind (image-free) responses for BPO, and the resumable chunked shard runner the offline tools share.

BPO (MMSafe-PO) adds what the *base* model answers without seeing the image as an extra rejected
response. `blind_messages` builds that image-free prompt, `generate_blind_responses` runs greedy batched
generation on it, and `with_blind` turns a sample and its blind response into a training record:

- `field`: the sample with `blind` set (for `PreferenceModule(blind="sum")`);
- `rows`: BPO's released form, an extra row whose `rejected` is the blind response (id suffixed
  `-blind`, `meta["pair"] = "blind"`), to be mixed with the original rows (`blind: rows`).

`run_chunked` processes a shard set in order, input chunk by input chunk, writing one output shard per
chunk (temp name + rename) and a progress file, so an interrupted run continues where it stopped and
gives byte-identical shards to an uninterrupted one. A resume is keyed on the model's *content*, not
its path (`model_identity`): a model replaced behind the same path stops the run instead of mixing two
models' outputs. tools/blind_generate.py and tools/precompute_reference.py are thin CLIs over this module
and `vlsafe.methods.preference.reference`; `blind_shards` is the whole blind-generation run, which the demo data module
(`BlindAnswerWorld(blind_model=...)`) calls too.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from vlsafe.builders import FromCheckpoint, LlavaHF, LlavaOriginal, resolve_dtype
from vlsafe.constants import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from vlsafe.data.encoding.encoders import PromptEncoder, split_reference
from vlsafe.data.encoding.processor import VLMProcessor
from vlsafe.data.encoding.templates import get_template
from vlsafe.data.schema import Sample, SampleError, SampleLeftOut, is_blank
from vlsafe.data.shards import (
    INDEX_NAME,
    ShardIndex,
    ShardInfo,
    iter_shard,
    load_index,
    sample_members,
)

PROMPT_SOURCES = ("prompt", "blind_prompt")
BLIND_FORMS = ("field", "rows")
MODEL_TYPES = ("ckpt", "llava-hf", "llava-original")
BLIND_ROW_SUFFIX = "-blind"
PROGRESS_NAME = "progress.json"
PROGRESS_FORMAT = "vlsafe-chunked-progress/1"

_SPACES = re.compile(r"[ \t]+")


# ---------------------------------------------------------------------------------------- models
def load_frozen_model(path: str, model_type: str = "ckpt", template: str | None = None,
                      device: str | torch.device = "cpu", dtype: str | None = None):
    """`(vlm, processor)` of a frozen model in eval mode: a vlsafe checkpoint or a LLaVA folder.

    `model_type`: `ckpt` (a vlsafe Lightning checkpoint, `FromCheckpoint`), `llava-hf`
    (`LlavaForConditionalGeneration` folder, `LlavaHF`) or `llava-original` (haotian-liu layout,
    `LlavaOriginal`). `template` overrides the chat template the builder chose; `dtype` (e.g. `bf16`)
    casts the model after loading.
    """

    torch_dtype = resolve_dtype(dtype)

    builders = {"ckpt": FromCheckpoint, "llava-hf": LlavaHF, "llava-original": LlavaOriginal}
    if model_type not in builders:
        raise ValueError(f"unknown model type {model_type!r}; choose one of {MODEL_TYPES}")
    if not Path(path).exists():
        raise FileNotFoundError(f"model {path} does not exist")
    vlm, processor = builders[model_type](path).build()
    if template:
        processor.template = get_template(template)
    vlm = vlm.to(device=device, dtype=torch_dtype) if torch_dtype is not None else vlm.to(device)
    return vlm.eval().requires_grad_(False), processor


def add_model_arguments(parser) -> None:
    """The model flags both offline tools share."""
    parser.add_argument("--model", required=True, help="checkpoint file (ckpt) or model folder (llava-*)")
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="ckpt",
                        help="ckpt = vlsafe Lightning checkpoint (default); llava-hf = LlavaForConditionalGeneration "
                             "folder; llava-original = haotian-liu/LLaVA checkpoint")
    parser.add_argument("--template", default=None, help="override the chat template (e.g. vicuna_v1, llava_v1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, help="cast the model after loading: bf16, fp16 or fp32")


# ---------------------------------------------------------------------------------------- model identity
#: Files of a model folder that decide its outputs (weights, configs, tokenizer); READMEs and the like are not.
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".model", ".txt", ".tiktoken")
_HASH_BLOCK = 8 << 20


def _model_files(path: Path) -> dict[str, Path]:
    if path.is_file():
        return {path.name: path}
    if not path.is_dir():
        raise FileNotFoundError(f"model {path} does not exist")
    files = {f.relative_to(path).as_posix(): f for f in sorted(path.rglob("*"))
             if f.is_file() and f.suffix in MODEL_FILE_SUFFIXES
             and not any(part.startswith(".") for part in f.relative_to(path).parts)}
    if not files:
        raise ValueError(f"model folder {path} holds no weight/config files ({', '.join(MODEL_FILE_SUFFIXES)})")
    return files


def _stat_key(path: Path) -> dict[str, int]:
    """What changes whenever a file is written, renamed over or replaced: the kernel sets `ctime` on every
    such change and, unlike `mtime`, it cannot be set back by `touch -d`, `cp -p` or `rsync -t`."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino,
            "device": st.st_dev}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def model_identity(path: str | Path) -> dict[str, Any]:
    """The content identity of a model file or folder: per file, its sha256 plus its stat key.

    Hashing reads the file once; right after the model was loaded from it the page cache usually serves
    those bytes (a 14 GB checkpoint hashes at disk/page-cache speed, seconds to a minute, once per run).
    """
    return {"files": {name: {**_stat_key(f), "sha256": file_sha256(f)} for name, f in _model_files(Path(path)).items()}}


def check_model_identity(recorded: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The current identity of `path` if its content equals `recorded`; `ValueError` naming the file otherwise.

    A file whose stat key is unchanged is the same file and is not read again (resuming costs a `stat`).
    Any stat difference (copied, moved, rewritten, touched) re-hashes it: same bytes continue, other bytes stop.
    """
    files = _model_files(Path(path))
    old = recorded.get("files", {})
    if set(files) != set(old):
        added, removed = sorted(set(files) - set(old)), sorted(set(old) - set(files))
        raise ValueError(f"model {path} is not the model this run started with: files added {added}, "
                         f"removed {removed}")
    current = {}
    for name, f in files.items():
        stat = _stat_key(f)
        if all(old[name].get(k) == v for k, v in stat.items()):
            current[name] = old[name]
            continue
        digest = file_sha256(f)
        if digest != old[name].get("sha256"):
            was = old[name].get("sha256", "?")[:12]
            raise ValueError(f"model file {f} changed since this run started (sha256 {was} -> {digest[:12]}): its "
                             f"earlier output came from another model")
        current[name] = {**stat, "sha256": digest}
    return {"files": current}


# ---------------------------------------------------------------------------------------- prompts
def strip_image_placeholders(text: str) -> str:
    """Remove every `<image>` and tidy the whitespace it leaves; lines without one are left untouched.

    `"<image>\\nWhat is this?"` -> `"What is this?"`; `"Look at <image> here"` -> `"Look at here"`; a line
    holding only placeholders disappears.
    """
    if IMAGE_PLACEHOLDER not in text:
        return text.strip()
    lines = []
    for line in text.split("\n"):
        if IMAGE_PLACEHOLDER not in line:
            lines.append(line)
            continue
        rest = line.replace(IMAGE_PLACEHOLDER, " ")
        if rest.strip():
            lines.append(_SPACES.sub(" ", rest).strip())
    return "\n".join(lines).strip()


def blind_messages(sample: Sample, source: str = "prompt") -> list[dict[str, str]]:
    """The image-free prompt (ending with a user turn) the base model answers for `sample`.

    - `source="prompt"`: the sample's prompt (`split_reference`) with every `<image>` removed;
    - `source="blind_prompt"`: `meta["blind_messages"]` if present, else one user turn `meta["blind_prompt"]`
      (MMSafe-PO's text-only prompt naming the entity). A sample without either raises `SampleError`.
    """
    if source == "prompt":
        messages, _ = split_reference(sample)
        field_name = "messages"
    elif source == "blind_prompt":
        if sample.meta.get("blind_messages"):
            messages, field_name = sample.meta["blind_messages"], "meta.blind_messages"
        elif isinstance(sample.meta.get("blind_prompt"), str) and not is_blank(sample.meta["blind_prompt"]):
            messages, field_name = [{"role": "user", "content": sample.meta["blind_prompt"]}], "meta.blind_prompt"
        else:
            raise SampleError(sample.id, "meta.blind_prompt", "is missing (and so is meta.blind_messages); "
                                                              "use --prompt-source prompt for this data")
    else:
        raise ValueError(f"unknown prompt source {source!r}; choose one of {PROMPT_SOURCES}")
    if not isinstance(messages, list) or not messages:
        raise SampleError(sample.id, field_name, "must be a non-empty list of {role, content}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise SampleError(sample.id, f"{field_name}[{i}]", "must be a dict with 'role' and a string 'content'")
        content = strip_image_placeholders(message["content"])
        if not content:
            raise SampleError(sample.id, f"{field_name}[{i}]", f"is empty once {IMAGE_PLACEHOLDER} is removed")
        out.append({"role": message["role"], "content": content})
    if out[-1]["role"] != "user":
        raise SampleError(sample.id, field_name, "the blind prompt must end with a user turn")
    return out


def blind_prompt_sample(sample: Sample, source: str = "prompt") -> Sample:
    """A text-only copy of `sample` whose messages are the blind prompt (no images, no responses)."""
    return Sample(id=sample.id, messages=blind_messages(sample, source), meta=sample.meta)


# ---------------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_blind_responses(vlm, processor: VLMProcessor, samples: Sequence[Sample], batch_size: int = 8,
                             max_new_tokens: int = 256, source: str = "prompt",
                             on_sample_error: Callable[[SampleError], None] | None = None) -> list[str | None]:
    """Greedy responses to each sample's blind prompt, in order, `batch_size` left-padded prompts at a time.

    Batches are `PromptEncoder` batches of the image-free prompts, so the model sees no image tokens and
    no pixels. Deterministic: same model, samples and batch size -> same strings. A sample whose blind
    prompt cannot be built raises `SampleError`, or, with `on_sample_error`, is reported there and gets
    `None` (the others are batched as if it were not there).
    """

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(vlm.parameters()).device
    encoder = PromptEncoder(processor)
    items: list[dict[str, Any] | None] = []
    for sample in samples:
        try:
            item = encoder.encode(blind_prompt_sample(sample, source))
            if IMAGE_TOKEN_INDEX in item["input_ids"] or item["pixel_values"].numel():
                raise SampleError(sample.id, "messages", "the blind prompt still holds an image")  # defensive
            items.append(item)
        except SampleError as err:
            if on_sample_error is None:
                raise
            on_sample_error(err)
            items.append(None)
    usable = [i for i, item in enumerate(items) if item is not None]
    out: list[str | None] = [None] * len(items)
    for start in range(0, len(usable), batch_size):
        rows = usable[start:start + batch_size]
        batch = encoder.collate([items[i] for i in rows])
        new_tokens = vlm.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device), None,
                                  max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=processor.pad_token_id,
                                  eos_token_id=processor.tokenizer.eos_token_id)
        for i, row in zip(rows, new_tokens):
            out[i] = processor.decode(row)
    return out


def same_response(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.strip() == b.strip()


def with_blind(sample: Sample, response: str, form: str = "field") -> Sample:
    """A copy of `sample` carrying its blind response.

    `field`: `blind = response`. `rows`: BPO's extra row, `rejected = response`, id + `-blind`,
    `meta["pair"] = "blind"` and `blind` unset. Raises `SampleError` for an empty response and, in rows
    form, for a response identical to `chosen` (such a pair carries no preference).
    """
    if form not in BLIND_FORMS:
        raise ValueError(f"unknown form {form!r}; choose one of {BLIND_FORMS}")
    if not isinstance(response, str) or is_blank(response):
        raise SampleError(sample.id, "blind", "the generated blind response is empty")
    out = copy.deepcopy(sample)
    if form == "field":
        out.blind = response
        return out
    if same_response(response, sample.chosen):
        raise SampleError(sample.id, "rejected", "the blind response is identical to chosen; the pair carries "
                                                 "no preference")
    out.id = f"{sample.id}{BLIND_ROW_SUFFIX}"
    out.rejected = response
    out.blind = None
    out.meta = {**out.meta, "pair": "blind"}
    return out


IDENTICAL = "blind response identical to chosen; row left out"


def blind_shards(input_location: str | Path, out_dir: str | Path, vlm, processor: VLMProcessor, *,
                 model_path: str | Path, settings: dict[str, Any] | None = None, form: str = "field",
                 prompt_source: str = "prompt", batch_size: int = 8, max_new_tokens: int = 256,
                 chunk_size: int = 1000, on_error: str = "raise", stop_after: int | None = None,
                 progress: bool = True) -> "RunSummary":
    """Generate every input sample's blind response with `vlm` (loaded from `model_path`) into shards.

    `form="field"` sets `blind`; `"rows"` writes BPO's extra rows and leaves out (as skipped rows) those
    whose blind response equals `chosen`. Resumable through `run_chunked`, keyed on the model's content.
    """
    if form not in BLIND_FORMS:
        raise ValueError(f"unknown form {form!r}; choose one of {BLIND_FORMS}")

    def process(items: list[tuple[int, Sample]]) -> ChunkResult:
        on_sample_error, skipped = sample_error_policy(on_error)
        samples = [sample for _, sample in items]
        responses = generate_blind_responses(vlm, processor, samples, batch_size, max_new_tokens, prompt_source,
                                             on_sample_error)
        out = []
        for sample, response in zip(samples, responses):
            if response is None:
                continue
            if is_blank(response):
                skipped.append({"id": sample.id, "field": "blind", "error": "the generated blind response is empty"})
                continue
            if form == "rows" and same_response(response, sample.chosen):
                skipped.append({"id": sample.id, "field": "rejected", "error": IDENTICAL})
                continue
            out.append(with_blind(sample, response, form))
        return ChunkResult(out, skipped)

    settings = {**(settings or {}), "prompt_source": prompt_source, "form": form, "batch_size": batch_size,
                "max_new_tokens": max_new_tokens}
    return run_chunked(input_location, out_dir, process, chunk_size=chunk_size, settings=settings, on_error=on_error,
                       stop_after=stop_after, progress=progress, desc="blind responses", model_path=model_path)


# ---------------------------------------------------------------------------------------- chunked runner
@dataclass
class ChunkResult:
    """What `process` returns for one input chunk: output samples (in order) and skipped rows."""

    samples: list[Sample]
    skipped: list[dict[str, str]] = field(default_factory=list)


@dataclass
class RunSummary:
    written: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    shards: int = 0  # output shards so far, this run and earlier ones
    new_chunks: int = 0  # input chunks finished by this run
    resumed_chunks: int = 0  # input chunks an earlier run had finished
    finished: bool = False
    out_dir: str = ""


def print_run_summary(summary: RunSummary, what: str, note: str = "") -> None:
    """The closing lines both chunked tools print: what was written, what was skipped, how to continue."""
    state = "wrote" if summary.finished else "stopped early (--stop-after-shards); so far wrote"
    resumed = f" ({summary.resumed_chunks} chunk(s) kept from an earlier run)" if summary.resumed_chunks else ""
    print(f"{state} {summary.written} samples{what} in {summary.shards} shard(s) to {summary.out_dir}{resumed}; "
          f"skipped {len(summary.skipped)}{note}")
    for row in summary.skipped[:10]:
        print(f"  skipped {row['id']}: {row['field']}: {row['error']}")
    if len(summary.skipped) > 10:
        print(f"  ... and {len(summary.skipped) - 10} more (listed in {summary.out_dir}/index.json when finished)")
    if not summary.finished:
        print("re-run the same command without --stop-after-shards to continue")


def add_chunked_run_arguments(parser) -> None:
    """Flags shared by the tools built on `run_chunked`: shard size, error policy, interruption, progress."""
    parser.add_argument("--max-samples", type=int, default=1000,
                        help="input samples per output shard (default 1000)")
    parser.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                        help="stop at the first unusable sample (default) or skip it and list it in index.json")
    parser.add_argument("--stop-after-shards", type=int, default=None, metavar="N",
                        help="stop after N output shards as if interrupted (testing/debugging)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_tool(build_parser, run, argv: list[str] | None = None):
    """Parse arguments and run a chunked tool; bad input exits non-zero with a one-line message."""

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (SampleError, ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None


def absolute(location: str | Path) -> str:
    """A local path made absolute (remote urls unchanged), for recording what a run read."""
    location = str(location)
    return location if "://" in location or location.startswith("pipe:") else str(Path(location).resolve())


def skipped_row(err: SampleError) -> dict[str, str]:
    return {"id": err.sample_id, "field": err.field_name, "error": err.problem}


def sample_error_policy(on_error: str) -> tuple[Callable[[SampleError], None], list[dict[str, str]]]:
    """The tools' `--on-error`: a callback that raises (`raise`) or records the sample (`skip`), and the record.
    A pair a length rule leaves out (`SampleLeftOut`) is always recorded, never fatal: training leaves it out too."""
    skipped: list[dict[str, str]] = []

    def on_sample_error(err: SampleError) -> None:
        if on_error == "raise" and not isinstance(err, SampleLeftOut):
            raise err
        skipped.append(skipped_row(err))

    return on_sample_error, skipped


def _write_tar(path: Path, samples: list[Sample], keys: list[str]) -> None:
    import webdataset as wds


    tmp = path.with_name(path.name + ".tmp")
    writer = wds.TarWriter(str(tmp), encoder=False, mtime=0.0)
    try:
        for sample, key in zip(samples, keys):
            writer.write(sample_members(sample.validate(), key))
    finally:
        writer.close()
    os.replace(tmp, path)


def _load_progress(out: Path, settings: dict[str, Any],
                   model_path: str | Path | None = None) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Finished chunks of an earlier run with the same settings and the same model content, and the model's
    current identity (None without `model_path`)."""
    path = out / PROGRESS_NAME
    if not path.exists():
        return [], model_identity(model_path) if model_path is not None else None
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed progress file ({err}); delete it to start over") from None
    if payload.get("format") != PROGRESS_FORMAT:
        raise ValueError(f"{path}: not a vlsafe progress file (format {payload.get('format')!r})")
    if payload.get("settings") != settings:
        changed = sorted(k for k in set(settings) | set(payload.get("settings", {}))
                         if settings.get(k) != payload.get("settings", {}).get(k))
        raise ValueError(f"{out} holds a run started with different settings ({', '.join(changed)}); use another "
                         f"--out, or delete {path} and the shards to start over")
    chunks = payload.get("chunks", [])
    identity = None
    if model_path is not None:
        if payload.get("model") is None:
            raise ValueError(f"{path} does not record which model wrote it, so resuming could mix two models' "
                             f"outputs; delete it and the shards to start over")
        try:
            identity = check_model_identity(payload["model"], model_path)
        except ValueError as err:
            raise ValueError(f"{out}: {err}; use another --out, or delete {path} and the shards to start over") \
                from None
    # keep the finished prefix whose shards are still there
    kept = []
    for chunk in chunks:
        if chunk.get("url") and not (out / chunk["url"]).is_file():
            break
        kept.append(chunk)
    return kept, identity


def _save_progress(out: Path, settings: dict[str, Any], chunks: list[dict[str, Any]],
                   model: dict[str, Any] | None = None) -> None:
    path = out / PROGRESS_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": PROGRESS_FORMAT, "settings": settings, "model": model, "chunks": chunks},
                              indent=1))
    os.replace(tmp, path)


def run_chunked(input_location: str | Path, out_dir: str | Path,
                process: Callable[[list[tuple[int, Sample]]], ChunkResult], *, chunk_size: int = 1000,
                settings: dict[str, Any] | None = None, on_error: str = "raise", stop_after: int | None = None,
                progress: bool = True, desc: str = "samples", prefix: str = "shard",
                model_path: str | Path | None = None) -> RunSummary:
    """Map `process` over `input_location`'s samples, `chunk_size` input samples at a time, into shards.

    Output shard k holds what `process` made of input positions `[k * chunk_size, (k + 1) * chunk_size)`
    (fewer samples when some were skipped; no shard at all when every one was). Each shard is written
    under a temporary name and renamed, then `progress.json` records the chunk; a re-run with the same
    `settings` and the same `model_path` content (`check_model_identity`) keeps finished shards untouched and
    continues after them; a changed model stops with `ValueError`. `stop_after=N` stops after N
    chunks of this run as if interrupted. `index.json` is written once every chunk is done.
    Unreadable input records raise (`on_error="raise"`) or are recorded as skipped (`"skip"`).
    """

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk size (--max-samples) must be >= 1, got {chunk_size}")
    out = Path(out_dir)
    input_index = load_index(input_location)
    if out.resolve() in {Path(s.url).resolve().parent for s in input_index.shards if "://" not in s.url}:
        raise ValueError(f"--out {out} is the input's folder; write the new shards somewhere else")
    # plain JSON data, as stored; the input's shard counts catch a changed input behind the same path
    settings = json.loads(json.dumps({**(settings or {}), "chunk_size": chunk_size,
                                      "input_counts": [s.count for s in input_index.shards]}))
    out.mkdir(parents=True, exist_ok=True)
    chunks, model = _load_progress(out, settings, model_path)
    done = chunks[-1]["end"] if chunks else 0
    total = input_index.total
    summary = RunSummary(resumed_chunks=len(chunks), out_dir=str(out))
    if (out / INDEX_NAME).exists() and done < total:
        (out / INDEX_NAME).unlink()  # a stale index from another run must not describe partial output

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=min(done, total), desc=desc, unit="sample")

    read_errors: list[tuple[int, dict[str, str]]] = []  # (input position, skipped row)
    current = [0]  # the input position being parsed (iter_shard calls keep() just before parsing it)

    def on_sample_error(err: SampleError) -> None:
        read_errors.append((current[0], skipped_row(err)))

    def keep_from(base: int):
        def keep(p: int) -> bool:
            current[0] = base + p
            return base + p >= done
        return keep

    def positions():
        base = 0
        for shard in input_index.shards:
            if base + shard.count <= done:
                base += shard.count
                continue
            for position, sample in iter_shard(shard.url, keep=keep_from(base),
                                               on_sample_error=on_sample_error if on_error == "skip" else None):
                yield base + position, sample
            base += shard.count

    def finish_chunk(start: int, end: int, items: list[tuple[int, Sample]]) -> None:
        result = process(items) if items else ChunkResult([])
        skipped = [row for position, row in read_errors if position < end] + list(result.skipped)
        read_errors[:] = [(position, row) for position, row in read_errors if position >= end]
        name = None
        if result.samples:
            name = f"{prefix}-{start // chunk_size:06d}.tar"
            keys = [f"{start:09d}-{i:06d}" for i in range(len(result.samples))]
            _write_tar(out / name, result.samples, keys)
        chunks.append({"start": start, "end": end, "url": name, "count": len(result.samples), "skipped": skipped})
        _save_progress(out, settings, chunks, model)
        summary.new_chunks += 1
        if bar is not None:
            bar.update(end - start)

    pending: list[tuple[int, Sample]] = []
    chunk_start = done
    ran = 0
    try:
        stream = positions()
        while chunk_start < total:
            if stop_after is not None and ran >= stop_after:
                break
            chunk_end = min(chunk_start + chunk_size, total)
            for position, sample in stream:
                pending.append((position, sample))
                if position + 1 >= chunk_end:
                    break
            finish_chunk(chunk_start, chunk_end, [item for item in pending if item[0] < chunk_end])
            pending = [item for item in pending if item[0] >= chunk_end]
            chunk_start = chunk_end
            ran += 1
    finally:
        if bar is not None:
            bar.close()

    summary.written = sum(c["count"] for c in chunks)
    summary.shards = sum(1 for c in chunks if c["url"])
    summary.skipped = [row for c in chunks for row in c["skipped"]]
    summary.finished = chunk_start >= total
    if summary.finished:
        shards = [ShardInfo(c["url"], c["count"]) for c in chunks if c["url"]]
        if not shards:
            raise ValueError(f"no usable samples to write to {out} ({len(summary.skipped)} skipped)")
        # images pass through unchanged, so shards pre-sized for a model stay so (`make_shards --presize`)
        ShardIndex(shards=shards, skipped=summary.skipped, presized=input_index.presized).save(out)
    return summary
