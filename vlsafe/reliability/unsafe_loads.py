"""Find code that could unpickle untrusted data or run a model's remote code, by reading the AST.

Used by tests/reliability/test_security.py over the whole package and tools: weights must load through
safetensors or `torch.load(..., weights_only=True)`, nothing may call pickle-family loaders, and
`trust_remote_code` may only ever be passed through from a recipe, never hard-coded to True.

Loads Lightning does on our behalf count too: `trainer.fit/validate/test/predict(..., ckpt_path=...)`,
`load_from_checkpoint`, `strategy/checkpoint_io.load_checkpoint`, Lightning's `pl_load`/`_load` and
`torch.hub.load_state_dict_from_url` (Lightning's path for http(s) checkpoints, weights_only=False by
default) must all say `weights_only=True`. What a static scan cannot see (the CLI's own `ckpt_path`, `last`,
`hpc`) is forced at run time by `vlsafe.ops.checkpoint_guard` and tested with real payloads.
"""
from __future__ import annotations

import ast
from pathlib import Path

PICKLE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "_pickle"}
# webdataset's decoders that unpickle (`.pyd`, `.pickle`, `.pth` handlers) come in through these names
WEBDATASET_DECODERS = {"autodecode", "torch_loads", "basichandlers", "default_handlers", "Decoder", "decode"}
TEXT_CODECS = {"utf-8", "utf8", "ascii", "latin-1", "latin1"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


PICKLE_LOADERS = {"load", "loads", "Unpickler", "open"}
# A context manager that forces weights_only=True on every torch.load inside it (vlsafe.scale.convert).
FORCING_CONTEXTS = {"weights_only_torch_load"}


def _forced_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes inside `with weights_only_torch_load():` blocks."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(
                isinstance(item.context_expr, ast.Call) and _dotted(item.context_expr.func).split(".")[-1]
                in FORCING_CONTEXTS for item in node.items):
            inside |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    return inside


# Calls that load a checkpoint inside Lightning or torch.hub (last name of the dotted call).
LIGHTNING_LOADERS = {"load_from_checkpoint", "load_checkpoint", "pl_load", "load_state_dict_from_url"}
TRAINER_ENTRY_POINTS = {"fit", "validate", "test", "predict"}


def _lightning_load(name: str, keywords: dict[str, ast.AST]) -> bool:
    last = name.split(".")[-1]
    if last in LIGHTNING_LOADERS or name.endswith("cloud_io._load"):
        return True
    ckpt = keywords.get("ckpt_path")
    return last in TRAINER_ENTRY_POINTS and ckpt is not None and not (isinstance(ckpt, ast.Constant)
                                                                      and ckpt.value is None)


def unsafe_calls(source: str, filename: str = "<string>") -> list[str]:
    """`file:line: problem` for each unsafe load in `source`."""
    problems = []
    tree = ast.parse(source, filename)
    forced = _forced_nodes(tree)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            for alias in node.names:
                if alias.name in PICKLE_LOADERS:
                    problems.append(f"{where}: imports {node.module}.{alias.name}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        parts = name.split(".")
        if len(parts) == 2 and parts[0] in PICKLE_MODULES and parts[1] in PICKLE_LOADERS:
            problems.append(f"{where}: {name}(...) unpickles")
        if _lightning_load(name, keywords) and id(node) not in forced:
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problems.append(f"{where}: {name}(...) makes Lightning/torch.hub load a checkpoint without "
                                f"weights_only=True")
        if name.endswith("torch.load") and id(node) not in forced:
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problems.append(f"{where}: {name}(...) without weights_only=True")
        if name.endswith(("np.load", "numpy.load")):
            flag = keywords.get("allow_pickle")
            if isinstance(flag, ast.Constant) and flag.value is True or flag is not None and not isinstance(flag, ast.Constant):
                problems.append(f"{where}: {name}(..., allow_pickle=...)")
        remote = keywords.get("trust_remote_code")
        if isinstance(remote, ast.Constant) and remote.value is True:
            problems.append(f"{where}: trust_remote_code=True is hard-coded")
        attr = node.func.attr if isinstance(node.func, ast.Attribute) else name
        if attr in WEBDATASET_DECODERS and attr != "decode":
            problems.append(f"{where}: webdataset decoder {name}")
        if attr == "decode" and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and node.args[0].value.lower() not in TEXT_CODECS:
            problems.append(f"{where}: {name}({node.args[0].value!r}) looks like a webdataset decoder")
    return problems


def scan(paths: list[Path]) -> list[str]:
    """Problems in every .py file under `paths`."""
    problems = []
    for root in paths:
        for path in sorted(Path(root).rglob("*.py")) if Path(root).is_dir() else [Path(root)]:
            problems += unsafe_calls(path.read_text(), str(path))
    return problems
