"""The quickstart end to end (the real script in a subprocess), the reproduction script's usage
errors, and the settings files in configs/ (loadable, and the paper's equal to the defaults)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from utils.cli import parse_args
from utils.io import read_json

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
PAPER_CONFIGS = [config for config in CONFIGS if config.name.startswith("paper_")]
CLASSES, PER_CLASS, TEST_PER_CLASS = 4, 24, 8  # the suite's toy size; quickstart defaults: 40, 20
STAGES = ("instructions", "vlm", "teacher", "distill", "gate")
# Final-table row label -> key in gate/metrics.json (the gate row is "EmoVLM-KD (<gate>)").
ROWS = {"VLM": "vlm", "distill module": "head", "teacher": "teacher", "EmoVLM-KD": "gate"}
# Test accuracy (%) the quickstart measured at the suite's toy size (32 test images, chance 25%),
# asserted minus MARGIN points (10: 3 of 32 images, room for library and numeric changes).
MEASURED = {"VLM": 75.00, "distill module": 90.62, "teacher": 93.75, "EmoVLM-KD": 90.62}
MARGIN = 10.0


def table_rows(text: str, dataset: str) -> dict[str, tuple[float, float]]:
    """``model -> (accuracy %, macro-F1 %)`` from the markdown table rows of ``dataset`` in ``text``."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0] == dataset:  # then 95% CI and McNemar p columns
            model = re.sub(r" \(.*\)$", "", cells[1])  # "EmoVLM-KD (concat_linear)" -> "EmoVLM-KD"
            rows[model] = (float(cells[2]), float(cells[3]))
    return rows


def test_quickstart_runs_every_stage_and_reaches_its_measured_accuracy(tmp_path):
    env = {**os.environ, "PY": sys.executable, "DATA_ROOT": str(tmp_path / "images"),
           "OUT": str(tmp_path / "outputs"), "VLM": str(tmp_path / "tiny-qwen2-vl"),
           "CLASSES": str(CLASSES), "PER_CLASS": str(PER_CLASS), "TEST_PER_CLASS": str(TEST_PER_CLASS)}
    done = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    log = f"--- stdout (tail)\n{done.stdout[-4000:]}\n--- stderr (tail)\n{done.stderr[-4000:]}"
    assert done.returncode == 0, log
    assert "quickstart finished" in done.stdout, log

    rows = table_rows(done.stdout.split("python -m utils.report")[-1], "toy")
    assert set(rows) == set(ROWS), log
    for model, measured in MEASURED.items():
        assert rows[model][0] >= measured - MARGIN, (model, rows[model], measured)

    out = tmp_path / "outputs" / "toy"
    metrics = read_json(out / "gate" / "metrics.json")
    assert metrics["n"] == CLASSES * TEST_PER_CLASS and len(metrics["class_names"]) == CLASSES
    for model, key in ROWS.items():
        result = metrics["gates"][metrics["gate"]] if key == "gate" else metrics[key]
        assert rows[model][0] == pytest.approx(100 * result["accuracy"], abs=0.006), model  # table = file
    missing = [stage for stage in STAGES if not (out / stage / "meta.json").is_file()]
    assert not missing, f"stages without meta.json: {missing}"


@pytest.mark.parametrize("argv, message", [
    ([], "usage: bash scripts/reproduce.sh <dataname>"),
    (["FI"], "NPROC=x: expected a number of processes"),
])
def test_reproduce_refuses_bad_usage_before_running_anything(tmp_path, argv, message):
    env = {**os.environ, "PY": "false", "NPROC": "x" if argv else "1", "OUT": str(tmp_path)}
    done = subprocess.run(["bash", "scripts/reproduce.sh", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not any(tmp_path.iterdir())


def stage_parser(config: Path):
    """The argument parser of the stage script a config belongs to (by the file name's suffix)."""
    import train_distillation
    import train_gate
    import train_vlm

    scripts = {"vlm": train_vlm, "distill": train_distillation, "gate": train_gate}
    suffix = config.stem.rsplit("_", 1)[-1]
    assert suffix in scripts, f"{config.name}: name it <setting>_{{{'|'.join(scripts)}}}.yaml"
    return scripts[suffix], scripts[suffix].get_args_parser()


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_loads_through_its_stage_parser(config):
    _, parser = stage_parser(config)
    values = yaml.safe_load(config.read_text(encoding="utf-8"))
    args = parse_args(parser, ["--dataname", "x", "--config", str(config)])  # unknown keys raise UserError
    assert {key: getattr(args, key) for key in values} == values  # every value arrives with its type


# Where a paper setting is not the default, and why. Anything else in paper_*.yaml must equal the
# parser's default (resolved where the default is None), so a default cannot drift from the paper.
NOT_DEFAULT = {
    ("paper_vlm.yaml", "quant"): "default auto: the paper's 4bit where CUDA and bitsandbytes exist",
    ("paper_gate.yaml", "vlm_answer"): "default score: deterministic class answer, one forward per image",
    ("paper_gate.yaml", "parser"): "default lenient: also either quote, any case, a lone class word; "
                                   "the reference reads the dict literal only",
}


def resolved_default(script, key: str, default):
    if default is not None:
        return default
    if script.__name__ == "train_vlm" and key == "vlm_model":
        return script.DEFAULT_VLM
    if script.__name__ == "train_vlm" and key == "target_modules":  # the default VLM's family's
        from models.backbones import BACKBONES

        return list(BACKBONES["qwen2_vl"].lora_targets)
    if script.__name__ == "train_distillation" and key == "teacher_img_size":
        from models.teacher import DEFAULT_TEACHER, default_img_size

        return default_img_size(DEFAULT_TEACHER)
    return None


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=[c.name for c in PAPER_CONFIGS])
def test_paper_config_matches_the_defaults(config):
    script, parser = stage_parser(config)
    values = yaml.safe_load(config.read_text(encoding="utf-8"))
    differing = {key for key, value in values.items()
                 if resolved_default(script, key, parser.get_default(key)) != value}
    exceptions = {key: why for (name, key), why in NOT_DEFAULT.items() if name == config.name}
    assert differing == set(exceptions), (f"{config.name}: keys {sorted(differing)} differ from the parser's defaults; "
                                          f"documented exceptions: {exceptions}")
