"""Read a checkpoint without running code: `torch.load(weights_only=True)` and nothing else.

Every checkpoint vlsafe reads (`--ckpt_path` as a local file, an http(s)/fsspec URL, `last`, `hpc`; the
evaluation loader; the tools) goes through `read_checkpoint`, with the allow-list below, so a pickled
payload is refused before any of it runs. Lightning would load an http(s) checkpoint with
`weights_only=False` (through torch.hub, whose cache keys files by base name, so two servers' `last.ckpt`
collide); `checkpoint_io.AtomicCheckpointIO.load_checkpoint` routes Lightning's own loads here instead.
A leaf module: the checkpoint IO (writing) and the resume guard (which run a checkpoint belongs to) build on it.
"""
from __future__ import annotations

import atexit
import pickle
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import torch

# Globals the weights-only unpickler may build beyond torch's own defaults (tensors, dicts, lists, tuples,
# numbers, strings, OrderedDict). vlsafe checkpoints are plain data and need none; add a type here, never
# weights_only=False.
SAFE_GLOBALS: tuple[Any, ...] = ()

_downloads: dict[str, Path] = {}


class CheckpointLoadError(ValueError):
    """A checkpoint cannot be read safely (pickled code, not a checkpoint, unreachable); names the file."""


def is_remote(path: Any) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def _local_copy(url: str) -> Path:
    """Download an http(s) checkpoint once per process into a private temporary folder."""
    if url not in _downloads:
        folder = Path(tempfile.mkdtemp(prefix="vlsafe-remote-ckpt-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        target = folder / "checkpoint.ckpt"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as file:  # noqa: S310
                shutil.copyfileobj(response, file, 1 << 20)
        except (urllib.error.URLError, OSError) as err:
            raise CheckpointLoadError(f"{url}: cannot download the checkpoint: {err}") from err
        _downloads[url] = target
    return _downloads[url]


def _refusal(path: Any, err: Exception, size: int | None) -> CheckpointLoadError:
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text:
        reason = next((line.strip() for line in text.splitlines() if "GLOBAL" in line or "Unsupported" in line),
                      text.splitlines()[0]).split(" Please use")[0]  # torch goes on to suggest allow-listing it
        return CheckpointLoadError(
            f"{path}: refused: the checkpoint contains pickled objects that are not plain tensors or data "
            f"({reason}). vlsafe loads checkpoints with torch.load(weights_only=True) only and never runs code "
            f"from a checkpoint; if this file is yours, re-save its state_dict as plain tensors")
    if size == 0:
        return CheckpointLoadError(f"{path}: the checkpoint file is empty (0 bytes); an interrupted copy or save?")
    detail = f"{type(err).__name__}: {text}" if text else type(err).__name__
    sized = f" ({size:,} bytes)" if size is not None else ""
    return CheckpointLoadError(f"{path}: not a readable PyTorch checkpoint{sized}: {detail}. Was it truncated, "
                               f"or is it another kind of file?")


def read_checkpoint(path: Any, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint at `path` (file, http(s) URL or fsspec URL), loaded with `weights_only=True`.

    Raises `CheckpointLoadError` naming the file for pickled code, empty or garbage files and failed
    downloads; `FileNotFoundError` when a local file is missing.
    """
    source = str(path)
    size = None
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            if source.startswith(("http://", "https://")):
                local = _local_copy(source)
                size = local.stat().st_size
                checkpoint = torch.load(local, map_location=map_location, weights_only=True)
            elif is_remote(source):
                import fsspec

                with fsspec.open(source, "rb") as file:
                    checkpoint = torch.load(file, map_location=map_location, weights_only=True)
            else:
                local = Path(source.removeprefix("file://"))
                if not local.is_file():
                    raise FileNotFoundError(f"checkpoint {local} does not exist (or is not a file)")
                size = local.stat().st_size
                checkpoint = torch.load(local, map_location=map_location, weights_only=True)
    except (FileNotFoundError, CheckpointLoadError):
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, IndexError, KeyError, TypeError,
            AttributeError, zipfile.BadZipFile, OSError) as err:
        raise _refusal(source, err, size) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointLoadError(f"{source}: holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    return checkpoint
