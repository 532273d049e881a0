"""tools/report.py on real tiny runs: the files exist, the PNGs decode, the numbers are the logged ones."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlsafe.monitoring.logs import load_run

ROOT = Path(__file__).resolve().parents[2]


def report(args: list[str]) -> int:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import report as tool
    finally:
        sys.path.pop(0)
    return tool.main([*args, "--no-progress"])


def markdown_table(text: str, header_start: str) -> list[list[str]]:
    lines = text[text.index(header_start):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def assert_pngs_decode(paths: list[Path]) -> None:
    assert paths
    for path in paths:
        with Image.open(path) as image:
            image.load()
            assert image.format == "PNG" and image.width > 300 and image.height > 200


@pytest.fixture(scope="module")
def sft_report(sft_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_report")
    assert report([str(sft_run.root), "--out", str(out)]) == 0  # the run's parent folder: newest log folder
    return out


def test_sft_report_files_charts_and_table_values(sft_run, sft_report):
    md = (sft_report / "report.md").read_text()
    charts = sorted((sft_report / "charts").glob("*.png"))
    assert_pngs_decode(charts)
    assert {"loss", "token_accuracy", "learning_rate", "tokens_per_sec", "mfu"} <= {p.stem for p in charts}
    for png in charts:
        assert f"](charts/{png.name})" in md
    html = (sft_report / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == len(charts), "one self-contained page"

    columns = sft_run.csv_columns()
    rows = {row[0]: row for row in markdown_table(md, "| metric | last |")}
    assert set(rows) == set(columns), "every logged metric has a row"
    for name, values in columns.items():
        _, last, last_step, best, best_step, points = rows[name]
        assert float(last) == pytest.approx(values[-1][1], rel=1e-4) and int(last_step) == values[-1][0]
        assert int(points) == len(values)
    val_losses = [v for _, v in columns["val/loss"]]
    assert float(rows["val/loss"][3]) == pytest.approx(min(val_losses), rel=1e-4)
    accs = columns["train/token_acc"]
    best_acc = max(v for _, v in accs)
    assert float(rows["train/token_acc"][3]) == pytest.approx(best_acc, rel=1e-4)
    assert rows["train/token_acc"][4] == str(next(s for s, v in accs if v == best_acc))

    summary = json.loads((sft_report / "summary.json").read_text())
    by_name = {row["metric"]: row for row in summary["metrics"]}
    assert by_name["train/loss"]["last"] == columns["train/loss"][-1][1]  # exact in the machine-readable copy
    assert by_name["val/loss"]["direction"] == "min" and by_name["val/token_acc"]["direction"] == "max"


def test_sft_report_shows_hyperparameters_and_the_before_after_evaluation(sft_run, sft_report):
    md = (sft_report / "report.md").read_text()
    params = dict(row[:2] for row in markdown_table(md, "| hyperparameter | value |"))
    assert params["optim.lr"] == "0.001" and params["vlm.init_args.hidden_size"] == "64"
    assert params["optim.betas"] == "[0.9, 0.999]", "Lightning's !!python/tuple read as plain data"
    recorded = json.loads((sft_run.log_dir / "answer_accuracy.json").read_text())
    table = {row[0]: row[1:] for row in markdown_table(md, "|  | before training | after training |")}
    assert float(table["accuracy"][0]) == pytest.approx(recorded["before training"]["accuracy"], abs=1e-5)
    assert float(table["accuracy"][1]) == pytest.approx(recorded["after training"]["accuracy"], abs=1e-5)
    assert (sft_report / "charts" / "eval_answer_accuracy.png").is_file()


def test_tensorboard_events_give_the_same_series_as_the_csv(sft_run):
    from_csv = load_run(sft_run.log_dir, "csv").series
    from_tb = load_run(sft_run.extra["tensorboard_dir"], "tensorboard").series
    for name in ("train/loss", "val/loss", "train/device/items_per_sec", "lr-AdamW/llm"):
        assert from_tb[name].steps == from_csv[name].steps
        assert from_tb[name].values == pytest.approx(from_csv[name].values, rel=1e-6)  # TB stores float32


def test_preference_report_leads_with_reward_margins_and_the_safety_rate(bpo_run, tmp_path):
    assert report([str(bpo_run.log_dir / "metrics.csv"), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    charts = re.findall(r"\]\(charts/(\w+)\.png\)", md)
    assert charts[:3] == ["eval_safety_rate", "loss", "reward_margins"], charts
    assert_pngs_decode(sorted((tmp_path / "charts").glob("*.png")))
    recorded = json.loads((bpo_run.log_dir / "safety_rate.json").read_text())
    table = {row[0]: row[1:] for row in markdown_table(md, "|  | before training | after training |")}
    for i, when in enumerate(("before training", "after training")):
        assert float(table["safety_rate"][i]) == pytest.approx(recorded[when]["safety_rate"], abs=1e-5)
    margins = bpo_run.csv_columns()["train/rewards/margins"]
    row = next(r for r in markdown_table(md, "| metric | last |") if r[0] == "train/rewards/margins")
    assert float(row[1]) == pytest.approx(margins[-1][1], rel=1e-4, abs=1e-9)


def test_bad_input_exits_non_zero_naming_the_problem(tmp_path, capsys):
    assert report([str(tmp_path / "missing")]) == 2
    assert "missing: no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report([str(tmp_path / "empty")]) == 2
    assert "no metrics.csv and no TensorBoard event files" in capsys.readouterr().err
    bad = tmp_path / "bad" / "metrics.csv"
    bad.parent.mkdir()
    bad.write_text("epoch,step,train/loss\n0,0,1.5\n0,1,oops\n")
    assert report([str(bad.parent)]) == 2
    assert f"{bad}, line 3: column 'train/loss' is 'oops', not a number" in capsys.readouterr().err


def test_help_runs_as_a_script():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--max-charts" in proc.stdout
