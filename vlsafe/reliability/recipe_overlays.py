"""Recipe overlays: a recipe that differs from another in a few keys holds only those keys.

An overlay's first line names the recipe it goes on top of, and the header shows the command:

    # Overlay on recipes/bpo.yaml: LoRA, the adapter-off model as reference, lr 1e-5.
    #   vlsafe fit --config recipes/bpo.yaml --config recipes/bpo_lora.yaml

LightningCLI (jsonargparse) merges `--config` files in order: mappings key by key (an overlay's
`model.init_args.lora` joins the base's `init_args`; a `class_path` naming another class replaces the base's
spec), while a list (`trainer.logger`, `trainer.callbacks`, `data.init_args.train`) is replaced whole, so an
overlay restates any list it changes. An overlay given without its base fails in jsonargparse with a long type
explanation; `missing_base` lets the CLI say what to run instead.
"""
from __future__ import annotations

import re
from pathlib import Path

OVERLAY_HEADER = re.compile(r"#\s*Overlay on (\S+?\.ya?ml)\b")


def overlay_base(path: str | Path) -> Path | None:
    """The recipe `path` is an overlay on (named on its first line), or None for a standalone recipe.

    The base is written as seen from the repository root (`recipes/bpo.yaml`), so it is looked up from each
    folder above the overlay.
    """
    with open(path, encoding="utf-8") as handle:
        match = OVERLAY_HEADER.match(handle.readline())
    if match is None:
        return None
    for folder in Path(path).resolve().parents:
        if (folder / match.group(1)).is_file():
            return folder / match.group(1)
    raise FileNotFoundError(f"{path}: its first line names the base {match.group(1)}, which does not exist")


def config_chain(path: str | Path) -> list[Path]:
    """The `--config` files that make up `path`, base first: [bpo.yaml, bpo_lora.yaml] for bpo_lora.yaml."""
    base = overlay_base(path)
    return [*config_chain(base), Path(path)] if base is not None else [Path(path)]


def missing_base(configs: list[str]) -> str | None:
    """An error message when an overlay comes without its base earlier on the command line, else None."""
    seen: set[Path] = set()
    for config in configs:
        if not Path(config).is_file():
            continue
        base = overlay_base(config)
        if base is not None and base.resolve() not in seen:
            chain = " ".join(f"--config {_shown(file)}" for file in config_chain(config))
            return (f"{config} is an overlay on {_shown(base)} (it holds only the keys that differ): "
                    f"give its base first, e.g. `vlsafe fit {chain}`")
        seen.add(Path(config).resolve())
    return None


def _shown(path: Path) -> str:
    """`recipes/x.yaml` when under the current directory, else the absolute path."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(Path(path).resolve())
