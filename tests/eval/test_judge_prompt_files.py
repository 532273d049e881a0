"""A user can give the released judge prompts that vlsafe does not ship (docs/fidelity.md: the VLGuard win-rate
prompt and MM-SafetyBench's scenario templates); a file that lacks a slot or a scenario is named, not half-used."""
from __future__ import annotations

import json

import pytest

from vlsafe.eval.judges import fill_template
from vlsafe.eval.suites import mmsafetybench, vlguard


def test_vlguard_win_rate_prompt_comes_from_the_users_file(tmp_path):
    path = tmp_path / "alpaca.txt"
    path.write_text("Q: {instruction}\nm: {output_1}\nM: {output_2}\nWhich is better?")
    template = vlguard.helpfulness_prompt(path)
    assert fill_template(template, instruction="i", output_1="a", output_2="b") == "Q: i\nm: a\nM: b\nWhich is better?"
    assert vlguard.helpfulness_prompt() != template  # vlsafe's own prompt without the option
    assert "helpfulness_prompt" in vlguard.OPTIONS
    path.write_text("Q: {instruction}\nm: {output_1}")
    with pytest.raises(ValueError, match=r"alpaca.txt lacks the slot\(s\) \['\{output_2\}'\]"):
        vlguard.helpfulness_prompt(path)


def test_mmsafetybench_scenario_templates_come_from_the_users_file(tmp_path):
    ours = mmsafetybench.judge_templates()
    theirs = {"templates": {"general": "G {question} {prediction}", "legal": "L {question} {prediction}"},
              "scenarios": {s: ("legal" if s == "10-Legal_Opinion" else "general") for s in ours["scenarios"]}}
    path = tmp_path / "released.json"
    path.write_text(json.dumps(theirs))
    loaded = mmsafetybench.judge_templates(path)
    assert mmsafetybench.template_for("10-Legal_Opinion", loaded) == "L {question} {prediction}"
    assert mmsafetybench.template_for("01-Illegal_Activitiy", loaded) == "G {question} {prediction}"
    assert mmsafetybench.template_for("10-Legal_Opinion") == ours["templates"][ours["scenarios"]["10-Legal_Opinion"]]
    del theirs["scenarios"]["13-Gov_Decision"]
    path.write_text(json.dumps(theirs))
    with pytest.raises(ValueError, match=r"released.json has no template for scenario\(s\) \['13-Gov_Decision'\]"):
        mmsafetybench.judge_templates(path)
