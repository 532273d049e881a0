"""Meta-device skeletons and tensor-by-tensor weight loading (`load: streamed` on the builders).

Why: building a 7B/13B model in full on every rank before sharding costs the whole model's bytes per process
(twice with a DPO reference). Here a model is first built with its parameters on the meta device (no memory;
buffers such as rotary `inv_freq` are computed for real, as in an ordinary build), and `materialize` later
reads each parameter from the checkpoint files on its own, only the rows this process holds when FSDP2 has
sharded it (a `DTensor` sharded on dim 0), so no process ever holds a full state dict.

A `TensorSource` says, for every parameter name of the model, which file and key(s) hold it and how they
combine (`copy`, `t` for a transpose, `cat0` to stack several tensors along dim 0, e.g. q/k/v into one
`in_proj_weight`). safetensors files are read with `safe_open(...).get_slice`; `.bin` files (released LLaVA
checkpoints) with `torch.load(mmap=True, weights_only=True)`, which maps the file instead of reading it.
One file is open at a time, so its mapped pages leave the process before the next file is read.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

OPS = ("copy", "t", "cat0")


class StreamedLoadError(ValueError):
    """A checkpoint does not fit the skeleton it should fill (named file, key and parameter)."""


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers stay real (computed as usual)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def is_meta(tensor: torch.Tensor) -> bool:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.is_meta


def has_meta_parameters(module: nn.Module) -> bool:
    return any(is_meta(p) for p in module.parameters())


@dataclass(frozen=True)
class TensorPlan:
    """How one model tensor is made from checkpoint tensors: `parts` are (file, key) pairs."""

    parts: tuple[tuple[str, str], ...]
    op: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown tensor op {self.op!r}; use one of {OPS}")


# ---------------------------------------------------------------------------------------------- files
def checkpoint_files(folder: Path) -> list[Path]:
    """Weight files in preference order: safetensors (index, then files), then .bin (index, then files)."""
    for index_glob, file_glob in (("model*.safetensors.index.json", "model*.safetensors"),
                                  ("pytorch_model*.bin.index.json", "pytorch_model*.bin")):
        indexes = sorted(folder.glob(index_glob))
        if indexes:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise StreamedLoadError(f"{missing[0]}: listed in the shard index but missing")
            return files
        files = sorted(folder.glob(file_glob))
        if files:
            return files
    raise StreamedLoadError(f"{folder}: no model*.safetensors or pytorch_model*.bin weights found")


class _Bin:
    """A `.bin` checkpoint mapped into memory, offering safetensors' `keys` / `get_slice` / `get_tensor`."""

    def __init__(self, path: str) -> None:
        self.tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get_slice(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key]


@contextlib.contextmanager
def open_weights(path: str | Path) -> Iterator[Any]:
    """One checkpoint file, tensor access by key, closed (and unmapped) on exit."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as handle:
            yield handle
        return
    handle = _Bin(path)
    try:
        yield handle
    finally:
        del handle.tensors


def _shape(handle: Any, key: str) -> tuple[int, ...]:
    sliced = handle.get_slice(key)
    return tuple(sliced.get_shape()) if hasattr(sliced, "get_shape") else tuple(sliced.shape)


def file_shapes(files: Iterable[Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (file, shape) over all files, from headers only; a key in two files is an error."""
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in files:
        with open_weights(path) as handle:
            for key in handle.keys():  # a safe_open handle, not a dict
                if key in found:
                    raise StreamedLoadError(f"{path}: key {key!r} also present in {found[key][0]}")
                found[key] = (str(path), _shape(handle, key))
    return found


# ---------------------------------------------------------------------------------------------- source
class TensorSource:
    """Model tensor name -> `TensorPlan`, with the reader that executes the plans, one open file at a time."""

    def __init__(self, plans: Mapping[str, TensorPlan], description: str) -> None:
        self.plans = dict(plans)
        self.description = description
        self._open: tuple[str, Any, contextlib.ExitStack] | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.plans

    def prefixed(self, prefix: str) -> "TensorSource":
        return TensorSource({prefix + k: v for k, v in self.plans.items()}, self.description)

    def merged(self, other: "TensorSource") -> "TensorSource":
        clash = self.plans.keys() & other.plans.keys()
        if clash:
            raise StreamedLoadError(f"{self.description} and {other.description} both hold {sorted(clash)[:5]}")
        return TensorSource({**self.plans, **other.plans}, f"{self.description} + {other.description}")

    def check_against(self, module: nn.Module, allow_missing: Iterable[str] = (),
                      unsourced: Iterable[str] = ()) -> None:
        """Every meta parameter has a plan of its shape and every plan a tensor: else a named error, before any
        bytes are read (what `load_state_dict(strict=True)` would say after reading them all)."""
        names = {n: p for n, p in module.named_parameters(remove_duplicate=False)}
        names.update(dict(module.named_buffers()))
        skip = set(allow_missing) | set(unsourced)
        missing = {aliases[0] for p, aliases in _alias_groups(module)  # a tied tensor needs one of its names
                   if is_meta(p) and not (set(aliases) & (self.plans.keys() | skip))}
        unexpected = self.plans.keys() - names.keys()
        if missing or unexpected:
            raise StreamedLoadError(f"{self.description}: weights do not match the model built from config.json: "
                                    f"missing {_short(missing)}, unexpected {_short(unexpected)}")
        for name in self.plans.keys() & names.keys():
            if tuple(names[name].shape) != self.plans[name].shape:
                plan = self.plans[name]
                raise StreamedLoadError(f"{self.description}: {plan.parts[0][1]} has shape {plan.shape} but the "
                                        f"model's {name} is {tuple(names[name].shape)}")

    # ------------------------------------------------------------------ reading
    def _handle(self, path: str) -> Any:
        if self._open is None or self._open[0] != path:
            self.close()
            stack = contextlib.ExitStack()
            self._open = (path, stack.enter_context(open_weights(path)), stack)
        return self._open[1]

    def close(self) -> None:
        if self._open is not None:
            self._open[2].close()
            self._open = None

    def _rows(self, path: str, key: str, start: int, stop: int, ndim: int) -> torch.Tensor:
        handle = self._handle(path)
        if ndim == 0:
            return handle.get_tensor(key)
        return handle.get_slice(key)[start:stop]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name` (rows [start, stop) of dim 0 when given), in the checkpoint's dtype."""
        plan = self.plans[name]
        start, stop = rows if rows is not None else (0, plan.shape[0] if plan.shape else 0)
        if plan.op == "copy":
            (path, key), = plan.parts
            return self._rows(path, key, start, stop, len(plan.shape))
        if plan.op == "t":
            (path, key), = plan.parts
            return self._handle(path).get_slice(key)[:, start:stop].t().contiguous()
        pieces, offset = [], 0  # cat0: the rows that fall in each part
        for path, key in plan.parts:
            size = _shape(self._handle(path), key)[0]
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                pieces.append(self._rows(path, key, lo - offset, hi - offset, len(plan.shape)))
            offset += size
        if not pieces:
            return torch.empty((0, *plan.shape[1:]))
        return torch.cat(pieces, dim=0)


def _short(keys: Iterable[str], n: int = 8) -> str:
    keys = sorted(keys)
    return f"{keys[:n]}{f' (+{len(keys) - n} more)' if len(keys) > n else ''}"


def remapped_plans(shapes: Mapping[str, tuple[str, tuple[int, ...]]], renamed: Mapping[str, str],
                   target_prefix: str = "") -> dict[str, TensorPlan]:
    """`renamed` maps model name -> checkpoint key; each becomes a one-tensor `copy` plan."""
    return {target_prefix + name: TensorPlan(((shapes[key][0], key),), "copy", shapes[key][1])
            for name, key in renamed.items()}


# ---------------------------------------------------------------------------------------------- materialize
def _alias_groups(module: nn.Module) -> list[tuple[torch.Tensor, list[str]]]:
    """Each distinct parameter once, with every name it has (tied weights have several)."""
    groups: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), (param, []))[1].append(name)
    return list(groups.values())


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


def _local_rows(param: torch.Tensor) -> tuple[int, int] | None:
    """The dim-0 rows a sharded DTensor holds on this rank (None: a plain tensor, all rows)."""
    if not hasattr(param, "to_local"):
        return None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = param.placements
    if not all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in placements):
        raise StreamedLoadError(f"streamed loading reads dim-0 shards only, got placements {placements}")
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, placements)
    if not shape:
        return None
    return int(offset[0]), int(offset[0]) + int(shape[0])


def _source_name(source: TensorSource, names: list[str], rename: Any) -> str | None:
    """The last alias that the source holds: `load_state_dict` writes tied names in module order, so the last
    one is what an eager load leaves in the shared tensor."""
    found = None
    for name in names:
        key = rename(name)
        if key in source:
            found = key
    return found


@torch.no_grad()
def materialize(module: nn.Module, source: TensorSource, device: torch.device | str = "cpu",
                rename: Any = None) -> int:
    """Give every meta parameter of `module` its checkpoint values, reading only the rows this rank holds.

    Plain parameters are replaced whole (tied ones stay tied); FSDP2-sharded ones (`DTensor`s) are allocated
    with `to_empty` (what FSDP2 supports for meta-device init) and their local shard filled in place. Real
    tensors (buffers, LoRA adapters, a projector built without weights) keep their values, except buffers the
    checkpoint holds, which are read as `load_state_dict` would. `rename` maps a
    parameter name to the source's (e.g. drops peft's wrapper names). Returns the bytes read.
    """
    rename = rename or (lambda name: name)
    groups = [(p, names) for p, names in _alias_groups(module) if is_meta(p)]
    if not groups:
        return 0
    unsourced = [names[0] for _, names in groups if _source_name(source, names, rename) is None]
    if unsourced:
        raise StreamedLoadError(f"{source.description}: no checkpoint tensor for {_short(unsourced)}")
    reshaped = [f"{names[0]} {tuple(p.shape)} vs {source.plans[_source_name(source, names, rename)].shape}"
                for p, names in groups if tuple(p.shape) != source.plans[_source_name(source, names, rename)].shape]
    if reshaped:  # e.g. embeddings resized for added tokens after the skeleton was built
        raise StreamedLoadError(f"{source.description}: parameters changed shape after the model was built, so the "
                                f"checkpoint no longer fits them: {_short(reshaped)}; use load: eager")
    sharded = any(hasattr(p, "to_local") for p, _ in groups)
    if sharded:
        groups = _allocate_sharded(module, device)
    order = sorted(groups, key=lambda g: source.plans[_source_name(source, g[1], rename)].parts[0][0])
    total = 0
    try:
        for param, names in order:
            key = _source_name(source, names, rename)
            if hasattr(param, "to_local"):
                local = param.to_local()
                rows = _local_rows(param)
                if rows is not None and local.dim() and rows[1] - rows[0] != local.shape[0]:
                    raise StreamedLoadError(f"{names[0]}: this rank holds {local.shape[0]} rows, expected rows "
                                            f"{rows[0]}..{rows[1]} of a dim-0 shard")
                if local.numel():
                    local.copy_(source.read(key, rows))
                total += local.numel() * local.element_size()
                continue
            # a copy the parameter owns: a tensor of a mapped .bin shares the file's pages, which change if the
            # file is rewritten while training runs
            value = source.read(key).to(device=device, dtype=param.dtype, copy=True)
            new = nn.Parameter(value, requires_grad=param.requires_grad)
            for name in names:
                owner, attr = _owner(module, name)
                owner._parameters[attr] = new
            total += value.numel() * value.element_size()
        for name, buffer in module.named_buffers():  # persistent buffers a checkpoint holds, as load_state_dict
            key = rename(name)
            if key in source:
                buffer.copy_(source.read(key))
                total += buffer.numel() * buffer.element_size()
    finally:
        source.close()
    return total


def _allocate_sharded(module: nn.Module, device: torch.device | str) -> list[tuple[torch.Tensor, list[str]]]:
    """`to_empty` the (FSDP2) module, restoring its real tensors and its tied parameters; returns the groups
    that were on meta, now allocated."""
    meta_names = {names[0] for p, names in _alias_groups(module) if is_meta(p)}
    aliases = [names for _, names in _alias_groups(module)]
    keep = {n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
            for n, p in [*module.named_parameters(), *module.named_buffers()] if not is_meta(p)}
    module.to_empty(device=device)
    for names in aliases:  # to_empty gives every owner its own new tensor: tie them again
        first_owner, first_attr = _owner(module, names[0])
        for name in names[1:]:
            owner, attr = _owner(module, name)
            owner._parameters[attr] = first_owner._parameters[first_attr]
    current = dict(module.named_parameters())
    current.update(dict(module.named_buffers()))
    for name, value in keep.items():
        tensor = current[name]
        (tensor.to_local() if hasattr(tensor, "to_local") else tensor).copy_(value)
    return [(p, names) for p, names in _alias_groups(module) if names[0] in meta_names]
