"""Every numeric and list flag of every stage is checked before anything runs: one line, exit 2."""
from __future__ import annotations

import importlib
import math
import re

import pytest

from utils.cli import COMMON_RULES
from utils.errors import UserError

STAGES = ("generate_instructions", "train_vlm", "train_distillation", "train_gate", "demo", "predict",
          "data.__main__")
# Values each rule must refuse (for int flags only the ones argparse can parse as int).
BAD_VALUES = {"count": ["0", "-3"], "index": ["-1"], "positive": ["0", "-1e-4", "nan", "inf"],
              "nonnegative": ["-0.1", "nan", "-inf"], "fraction": ["-0.1", "1.5", "nan"],
              "fraction_open": ["-0.1", "1", "nan"], "seed": ["-1", str(2 ** 32)], "port": ["0", "70000"]}


def numeric_flags(module):
    parser = module.get_args_parser()
    rules = {**COMMON_RULES, **getattr(module, "FLAG_RULES", {})}
    for action in parser._actions:
        if action.type in (int, float):
            yield action, rules.get(action.dest)


def refuses(module, argv, capsys) -> str:
    from utils.errors import run_cli

    assert run_cli(module.main, argv, parse=getattr(module, "parse", None)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("stage", STAGES)
def test_every_numeric_flag_is_range_checked_in_one_line(stage, tmp_path, capsys):
    module = importlib.import_module(stage)
    base = ["--dataname", "toy", "--data_root", str(tmp_path / "images"), "--output_dir", str(tmp_path / "out")]
    if stage == "predict":  # its required flags
        base += ["--images", str(tmp_path / "photos"), "--out", str(tmp_path / "out" / "predictions.jsonl")]
    checked = 0
    for action, rule in numeric_flags(module):
        flag = action.option_strings[0]
        assert rule is not None, f"{stage}: {flag} has no validation rule"
        if action.choices is not None:  # argparse itself refuses other values
            continue
        for bad in BAD_VALUES[rule]:
            if action.type is int and not re.fullmatch(r"-?\d+", bad):
                continue
            line = refuses(module, base + [f"{flag}={bad}"], capsys)
            assert line.startswith(f"error: {flag} must be "), line
            checked += 1
    assert checked >= 4
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("text, message", [
    ("target_modules: 5\n", "target_modules: 5 is not text"),
    ("target_modules: [q_proj, '']\n", "--target_modules must be a list of non-empty names"),
    ("lr: .nan\n", "--lr must be a finite number greater than 0 (got nan)"),
    ("lora_dropout: 1.0\n", "--lora_dropout must be a finite number in [0, 1)"),
    ("skip_bad_images: maybe\n", "skip_bad_images: 'maybe' is not true or false"),
    ("lr: [1\nepochs: 2\n", "cannot parse"),
])
def test_config_values_are_checked_like_flags(text, message, tmp_path, capsys):
    import train_vlm

    config = tmp_path / "bad.yaml"
    config.write_text(text)
    line = refuses(train_vlm, ["--dataname", "toy", "--output_dir", str(tmp_path / "out"), "--config", str(config)],
                   capsys)
    assert message in line, line


def test_pixel_budget_min_above_max_is_refused(tmp_path, capsys):
    import train_vlm

    line = refuses(train_vlm, ["--dataname", "toy", "--min_pixels", "5000", "--max_pixels", "4000"], capsys)
    assert line == "error: --min_pixels 5000 is above --max_pixels 4000"


@pytest.mark.parametrize("stage", STAGES)
def test_no_numeric_flag_is_left_without_a_rule(stage):
    from utils.cli import flags_without_rules

    module = importlib.import_module(stage)
    assert flags_without_rules(module.get_args_parser(), getattr(module, "FLAG_RULES", {})) == []


def test_a_flag_without_a_rule_must_still_be_finite():
    from utils.cli import base_parser, check_flags, flags_without_rules

    parser = base_parser("x")
    parser.add_argument("--beta", type=float, default=math.pi)
    assert flags_without_rules(parser, {}) == ["--beta"]
    check_flags(parser, parser.parse_args(["--dataname", "x", "--beta", "-2"]), {})
    with pytest.raises(UserError, match="--beta must be a finite number"):
        check_flags(parser, parser.parse_args(["--dataname", "x", "--beta", "nan"]), {})
