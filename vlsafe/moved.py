"""Where modules moved in the layout redesign (issue 18), so checkpoints and saved configs written before it still
load and resume: they name classes by dotted path (`vlsafe_method`, a builder's `class_path`). A leaf module.
"""
from __future__ import annotations

import importlib
from typing import Any

#: old module -> new module (a module that became a package maps to the package's module that holds its classes)
MOVED_MODULES: dict[str, str] = {
    "vlsafe.core.builders": "vlsafe.builders",
    "vlsafe.data.blind": "vlsafe.methods.preference.blind",
    "vlsafe.data.encoders": "vlsafe.data.encoding.encoders",
    "vlsafe.data.images_presize": "vlsafe.data.images",
    "vlsafe.data.perception_encoders": "vlsafe.methods.perception.encoders",
    "vlsafe.data.perception_templates": "vlsafe.data.grounding",
    "vlsafe.data.preference_encoding": "vlsafe.methods.preference.encoding",
    "vlsafe.data.processor": "vlsafe.data.encoding.processor",
    "vlsafe.data.protector_presets": "vlsafe.methods.protector.presets",
    "vlsafe.data.reference": "vlsafe.methods.preference.reference",
    "vlsafe.data.synthetic": "vlsafe.data.synthetic.world",
    "vlsafe.data.synthetic_module": "vlsafe.data.synthetic.module",
    "vlsafe.data.templates": "vlsafe.data.encoding.templates",
    "vlsafe.data.text_encoders": "vlsafe.methods.protector.encoders",
    "vlsafe.data.text_synthetic": "vlsafe.data.synthetic.text",
    "vlsafe.eval.refusal": "vlsafe.monitoring.refusal",
    "vlsafe.methods.detoxifier": "vlsafe.methods.protector.detoxifier_module",
    "vlsafe.methods.harm_detector": "vlsafe.methods.protector.detector_module",
    "vlsafe.methods.losses": "vlsafe.methods.preference.losses",
    "vlsafe.methods.perception": "vlsafe.methods.perception.module",
    "vlsafe.methods.preference": "vlsafe.methods.preference.module",
    "vlsafe.methods.shared_prompt": "vlsafe.methods.preference.shared_prompt",
    "vlsafe.perception": "vlsafe.methods.perception",
    "vlsafe.perception.boxes": "vlsafe.data.grounding",
    "vlsafe.protector": "vlsafe.methods.protector",
    "vlsafe.protector.mmsafetybench": "vlsafe.data.sources.mmsafetybench",
    "vlsafe.protector.callbacks": "vlsafe.monitoring.callbacks",
    "vlsafe.reliability.nonfinite": "vlsafe.ops.nonfinite",
}
#: old packages whose every module moved with them (the others above moved one by one)
MOVED_PACKAGES = ("vlsafe.perception", "vlsafe.protector")
#: classes that left their module in the redesign: old dotted path -> new dotted path
MOVED_CLASSES: dict[str, str] = {
    "vlsafe.data.encoders.PreferenceEncoder": "vlsafe.methods.preference.encoding.PreferenceEncoder",
    "vlsafe.eval.callbacks.BeforeAfterEvaluation": "vlsafe.monitoring.callbacks.BeforeAfterEvaluation",
}


def current_class_path(path: str) -> str:
    """`path` rewritten to where its class lives now (unchanged when it did not move)."""
    if path in MOVED_CLASSES:
        return MOVED_CLASSES[path]
    module, _, name = path.rpartition(".")
    if module in MOVED_MODULES:
        return f"{MOVED_MODULES[module]}.{name}"
    for package in MOVED_PACKAGES:  # vlsafe.protector.guard.X -> vlsafe.methods.protector.guard.X
        if module.startswith(package + "."):
            return f"{MOVED_MODULES[package]}{module[len(package):]}.{name}"
    return path


def current_class_paths(value: Any) -> Any:
    """A copy of a config (dicts/lists) with every `class_path` value passed through `current_class_path`."""
    if isinstance(value, dict):
        return {key: current_class_path(item) if key == "class_path" and isinstance(item, str)
                else current_class_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [current_class_paths(item) for item in value]
    return value


def import_vlsafe_class(class_path: str, base: type, what: str) -> type:
    """The class a stored or recipe `class_path` names (pre-redesign paths mapped), refused unless it is a vlsafe
    subclass of `base`: a checkpoint is data, and a class path inside one must not import arbitrary code."""
    module_name, _, class_name = current_class_path(str(class_path)).rpartition(".")
    if not module_name.startswith("vlsafe."):
        raise ValueError(f"refusing to instantiate {class_path!r} as a {what}: not a vlsafe class")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{what} {class_path!r} cannot be imported: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{what} {class_path!r} is not a {base.__module__}.{base.__qualname__} subclass")
    return cls
