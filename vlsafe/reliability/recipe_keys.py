"""Name every unknown key in a recipe and suggest the closest valid one.

LightningCLI (jsonargparse) already refuses unknown keys, but it reports only the first, buried in a
union-type explanation, and never says what was probably meant. This check walks the YAML against the
signatures of the classes it names (`class_path` + `init_args`, dataclass-typed arguments such as
`optim`, the Trainer's own arguments, sections the vlsafe CLI adds) and reports `model.init_args.optim.lrr: unknown key; did you mean
'lr'?` for all of them at once. It never instantiates anything.

    python -m vlsafe.reliability.recipe_keys recipes/demo/sft.yaml

It checks training recipes (`tools/fit.py`), not the evaluation recipes under recipes/eval/.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

TOP_LEVEL = ("seed_everything", "trainer", "model", "data", "ckpt_path", "optimizer", "lr_scheduler", "weights_only")
CLASS_SPEC_KEYS = ("class_path", "init_args", "dict_kwargs")


class RecipeKeyError(ValueError):
    """A recipe holds keys no class accepts; the message lists each with a suggestion."""


def _suggest(key: str, allowed: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f"did you mean '{match[0]}'?" if match else f"valid keys: {', '.join(sorted(allowed))}"


def _import(class_path: str) -> type | None:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _parameters(cls: type) -> tuple[dict[str, inspect.Parameter], dict[str, Any]] | None:
    """Constructor parameters and type hints, following `*args, **kwargs` to the parent class the way
    jsonargparse does; None when the accepted keys cannot be known (an open `**kwargs`)."""
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            signature = inspect.signature(init)
        except (TypeError, ValueError):
            return None
        try:
            hints.update({k: v for k, v in typing.get_type_hints(init).items() if k not in hints})
        except Exception:
            pass
        own = {n: p for n, p in signature.parameters.items() if n != "self"
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        for name, param in own.items():
            params.setdefault(name, param)
        if not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
            return params, hints
        if klass is object:
            break
    return None


def _dataclasses_in(annotation: Any) -> list[type]:
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return [annotation]
    return [dc for arg in typing.get_args(annotation) for dc in _dataclasses_in(arg)]


def _check_value(value: Any, annotation: Any, where: str, problems: list[str]) -> None:
    if isinstance(value, dict) and "class_path" in value:
        _check_class(value, where, problems)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_value(item, annotation, f"{where}[{i}]", problems)
    elif isinstance(value, dict):
        for dc in _dataclasses_in(annotation)[:1]:
            fields = {f.name: f for f in dataclasses.fields(dc)}
            for key, item in value.items():
                if key not in fields:
                    problems.append(f"{where}.{key}: unknown key for {dc.__name__}; {_suggest(key, fields)}")


def _check_class(spec: dict[str, Any], where: str, problems: list[str]) -> None:
    cls = _import(str(spec["class_path"]))
    if cls is None:
        problems.append(f"{where}.class_path: cannot import {spec['class_path']!r}")
        return
    for key in spec:
        if key not in CLASS_SPEC_KEYS:
            problems.append(f"{where}.{key}: unknown key next to class_path; {_suggest(key, CLASS_SPEC_KEYS)}")
    known = _parameters(cls)
    if known is None:
        return
    params, hints = known
    for key, value in (spec.get("init_args") or {}).items():
        key = key.removesuffix("+")
        if key not in params:
            problems.append(f"{where}.init_args.{key}: unknown key for {cls.__name__}; {_suggest(key, params)}")
        else:
            _check_value(value, hints.get(key), f"{where}.init_args.{key}", problems)


def cli_sections() -> dict[str, type]:
    """Top-level sections the vlsafe CLI adds beyond Lightning's (its forced callbacks), key -> class."""
    from vlsafe.cli_sections import FORCED_CALLBACKS  # imports Lightning callbacks: only when checking

    return dict(FORCED_CALLBACKS)


def recipe_key_problems(config: dict[str, Any]) -> list[str]:
    """Every unknown key in a parsed recipe, as `dotted.key: unknown key ...; did you mean '...'?`."""
    import lightning as L

    problems: list[str] = []
    extra = cli_sections()
    for key, value in config.items():
        if key in extra:
            known = _parameters(extra[key])
            for name in (value or {}) if known and isinstance(value, dict) else ():
                if name not in known[0]:
                    problems.append(f"{key}.{name}: unknown key for {extra[key].__name__}; {_suggest(name, known[0])}")
        elif key not in TOP_LEVEL:
            problems.append(f"{key}: unknown top-level key; {_suggest(key, [*TOP_LEVEL, *extra])}")
        elif key == "trainer" and isinstance(value, dict):
            params, hints = _parameters(L.Trainer)
            for name, item in value.items():
                name = name.removesuffix("+")  # jsonargparse's list-append syntax (`callbacks+:`)
                if name not in params:
                    problems.append(f"trainer.{name}: unknown key for Trainer; {_suggest(name, params)}")
                else:
                    _check_value(item, hints.get(name), f"trainer.{name}", problems)
        elif key in ("model", "data", "optimizer", "lr_scheduler") and isinstance(value, dict) and "class_path" in value:
            _check_class(value, key, problems)
    return problems


def check_recipe_keys(path: str | Path, raise_error: bool = False) -> list[str]:
    """Problems in the recipe at `path` (empty if none); with `raise_error`, raise `RecipeKeyError` listing them."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    problems = recipe_key_problems(config) if isinstance(config, dict) else ["the recipe is not a YAML mapping"]
    if problems and raise_error:
        raise RecipeKeyError(f"{path}: " + "\n  ".join(["unknown recipe key(s):", *problems]))
    return problems


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", help="recipe YAML files")
    args = parser.parse_args(argv)
    status = 0
    for recipe in args.recipes:
        for problem in check_recipe_keys(recipe):
            print(f"{recipe}: {problem}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
