"""Checkpoints written before the layout redesign name classes by their old dotted paths; they still load,
evaluate and resume (`vlsafe/moved.py`), and a checkpoint of another method is still refused."""
import pytest
import torch

from vlsafe.builders import FromCheckpoint, TinyVLM
from vlsafe.eval.checkpoint import resolve_module_class
from vlsafe.methods.preference.module import PreferenceModule
from vlsafe.methods.sft import SFTModule
from vlsafe.moved import current_class_path, current_class_paths
from vlsafe.ops.checkpoint_guard import METHOD_KEY, CheckpointMismatchError, check_resume, class_path


@pytest.mark.parametrize("old, new", [
    ("vlsafe.core.builders.TinyVLM", "vlsafe.builders.TinyVLM"),
    ("vlsafe.methods.preference.PreferenceModule", "vlsafe.methods.preference.module.PreferenceModule"),
    ("vlsafe.methods.harm_detector.HarmDetectorModule", "vlsafe.methods.protector.detector_module.HarmDetectorModule"),
    ("vlsafe.protector.builders.TinyTextLM", "vlsafe.methods.protector.builders.TinyTextLM"),
    ("vlsafe.perception.heads.PerceptionHeads", "vlsafe.methods.perception.heads.PerceptionHeads"),
    ("vlsafe.methods.sft.SFTModule", "vlsafe.methods.sft.SFTModule"),  # did not move
    ("vlsafe.methods.preference.module.PreferenceModule", "vlsafe.methods.preference.module.PreferenceModule"),
])
def test_old_class_paths_map_to_classes_that_exist(old, new):
    import importlib

    assert current_class_path(old) == new
    module, _, name = new.rpartition(".")
    assert hasattr(importlib.import_module(module), name)


def _old_checkpoint(tmp_path, module, method_path):
    hparams = dict(module.hparams)
    hparams["vlm"] = {**hparams["vlm"], "class_path": "vlsafe.core.builders.TinyVLM"}
    hparams.pop("blind_weight")  # an argument added with the redesign: old checkpoints do not have it
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": hparams, METHOD_KEY: method_path,
                  "epoch": 0, "global_step": 3}
    path = tmp_path / "old.ckpt"
    torch.save(checkpoint, path)
    return path, checkpoint


def test_a_pre_redesign_checkpoint_loads_resumes_and_evaluates(tmp_path):
    torch.manual_seed(0)
    module = PreferenceModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64), reference="copy")
    path, checkpoint = _old_checkpoint(tmp_path, module, "vlsafe.methods.preference.PreferenceModule")
    assert current_class_paths(checkpoint["hyper_parameters"])["vlm"]["class_path"] == "vlsafe.builders.TinyVLM"
    # resume: same method and settings under their new names -> nothing refused, nothing ignored
    assert check_resume(checkpoint, path, class_path(module), dict(module.hparams)) == []
    # evaluate / start from its weights
    assert resolve_module_class("vlsafe.methods.preference.PreferenceModule") is PreferenceModule
    vlm, _ = FromCheckpoint(str(path)).build()
    for name, value in module.vlm.state_dict().items():
        torch.testing.assert_close(vlm.state_dict()[name], value)


def test_a_checkpoint_of_another_method_is_still_refused_after_the_mapping(tmp_path):
    torch.manual_seed(0)
    module = PreferenceModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64), reference="copy")
    path, checkpoint = _old_checkpoint(tmp_path, module, "vlsafe.methods.preference.PreferenceModule")
    with pytest.raises(CheckpointMismatchError, match="PreferenceModule"):
        check_resume(checkpoint, path, class_path(SFTModule), {})


@pytest.mark.parametrize("class_path, message", [
    ("os.system", "not a vlsafe class"),                          # never imports code outside vlsafe
    ("vlsafe.methods.sft.SFTModule", "is not a vlsafe.builders.VLMBuilder subclass"),
    ("vlsafe.builders.NoSuchBuilder", "cannot be imported"),
])
def test_a_stored_class_path_must_name_a_vlsafe_class_of_the_right_kind(class_path, message):
    from vlsafe.builders import VLMBuilder

    with pytest.raises(ValueError, match=message):
        VLMBuilder.from_config({"class_path": class_path, "init_args": {}})
