"""Flags every stage shares, ``--config`` defaults, and device selection."""
from __future__ import annotations

import argparse
import importlib
import json
import math
from pathlib import Path
from typing import Sequence

import torch
import yaml

from utils.errors import UserError


def base_parser(description: str, batch_size: int | None = None) -> argparse.ArgumentParser:
    """A parser with the shared flags in a ``common`` group; stages add their own groups."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("common")
    group.add_argument("--dataname", required=True,
                       help="dataset folder name under --data_root (e.g. emoset, FI, toy)")
    group.add_argument("--data_root", default="images",
                       help="root holding <dataname>/{train,val,test}/<class>/<image>")
    group.add_argument("--output_dir", default="outputs",
                       help="stage outputs go to <output_dir>/<dataname>/<stage>/")
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--gpu", type=int, default=None,
                       help="CUDA device index; falls back to CPU when CUDA is absent")
    group.add_argument("--num_workers", type=int, default=2, help="data-loading worker processes")
    group.add_argument("--skip_bad_images", action="store_true",
                       help="skip (and count) images that cannot be decoded instead of stopping")
    group.add_argument("--config", default=None,
                       help="YAML or JSON file whose keys become defaults; the command line wins")
    if batch_size is not None:
        group.add_argument("--batch_size", type=int, default=batch_size)
    return parser


def add_base_vlm_flag(group) -> None:
    """``--vlm_model`` of a stage built on stage 1's adapter (stages 2 and 3): by default the base
    stage 1 recorded; a given one must be that same id (``utils.records.VLMRecord.check_run``)."""
    group.add_argument("--vlm_model", default=None,
                       help="base VLM (hub id or folder); default: the one stage 1 was trained on, "
                            "which a given one must match")


# --report_to's trackers (utils/tracking.py) -> the package each needs (what the error names).
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
NONE = "none"


def add_report_to_flag(group) -> None:
    """``--report_to`` of a training stage (stages 1-3; :func:`parse_args` checks its packages)."""
    group.add_argument("--report_to", nargs="+", choices=[NONE, *TRACKERS], default=[NONE],
                       help="follow the training in TensorBoard, W&B or MLflow (one or more; none: off): "
                            "per-epoch train_loss, val_loss, val_acc (stage 1: also per-step loss and learning "
                            "rate), the arguments as the run's config; files under the stage folder")


def trackers(report_to) -> list[str]:
    """The trackers ``--report_to`` asks for, in order, without ``none`` ([] for none or no flag)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return list(dict.fromkeys(name for name in names if name != NONE))


def check_report_to(report_to) -> None:
    """One UserError line, before any work, for ``none`` beside a tracker or for a tracker whose
    package is not installed (naming the ``pip install`` that adds it)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if NONE in names and len(set(names)) > 1:
        raise UserError(f"--report_to {' '.join(names)}: none turns tracking off; give it alone or leave it out")
    for name in trackers(names):
        try:
            importlib.import_module(TRACKERS[name])
        except ImportError:
            raise UserError(f"--report_to {name}: the {TRACKERS[name]} package is not installed; "
                            f"pip install {TRACKERS[name]}") from None


def load_config(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--config {path}: no such file")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            values = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - any parse error is the user's file
        # YAML's messages span several lines (the problem, then where); one line is enough.
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip() and "^" not in line)
        raise UserError(f"--config {path}: cannot parse ({err.__class__.__name__}: {message})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values")
    return values


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
               rules: dict[str, str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config`` become defaults that the command line overrides.
    With ``rules`` (see :func:`check_flags`) every numeric flag is checked before anything runs;
    so is ``--report_to`` (:func:`check_report_to`), where the stage has it."""
    args = _parse(parser, argv)
    if rules is not None:
        check_flags(parser, args, rules)
    if hasattr(args, "report_to"):
        check_report_to(args.report_to)
    return args


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    pre, _ = parser.parse_known_args(argv)
    if getattr(pre, "config", None):
        values = load_config(pre.config)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"--config {pre.config}: unknown keys {unknown}; valid keys are the flag names")
        actions = {action.dest: action for action in parser._actions}
        parser.set_defaults(**{key: _config_value(actions[key], value, f"--config {pre.config}: {key}")
                               for key, value in values.items()})
    return parser.parse_args(argv)


def _config_value(action: argparse.Action, value, where: str):
    """A config value checked as argparse checks the command line (defaults bypass it): strings
    converted with the flag's type (YAML reads ``1e-4`` as a string), choices enforced, and a
    single item for a list flag wrapped in a list."""
    if action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 0):  # not store_true's 0
        items = value if isinstance(value, list) else [value]
        return [_config_item(action, item, where) for item in items]
    if isinstance(value, (list, dict)):
        raise UserError(f"{where}: expected a single value, got {value!r}")
    return _config_item(action, value, where)


def _config_item(action: argparse.Action, item, where: str):
    kind = action.type
    if isinstance(item, bool) and action.choices is not None and {"on", "off"} <= set(action.choices):
        item = "on" if item else "off"  # YAML reads a bare on/off as true/false
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(item, bool):
            raise UserError(f"{where}: {item!r} is not true or false")
        return item
    if kind is None and not isinstance(item, str):  # a text flag (module names, paths, ...)
        raise UserError(f"{where}: {item!r} is not text; write it as a name (or a list of names)")
    if kind in (int, float) and (isinstance(item, bool) or not isinstance(item, (str, int, float))
                                 or (kind is int and isinstance(item, float))):
        raise UserError(f"{where}: {item!r} is not a valid {kind.__name__}")
    if isinstance(item, str) and callable(kind):
        try:
            item = kind(item)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise UserError(f"{where}: {item!r} is not a valid {getattr(kind, '__name__', 'value')}") from None
    if action.choices is not None and item not in action.choices:
        raise UserError(f"{where}: {item!r} is not one of {', '.join(map(str, action.choices))}")
    return item


# The rules of check_flags: what a numeric flag's value must be, and how the error says it.
RULES = {
    "count": (lambda v: v >= 1, "at least 1"),
    "index": (lambda v: v >= 0, "0 or more"),
    "positive": (lambda v: v > 0, "a finite number greater than 0"),
    "nonnegative": (lambda v: v >= 0, "a finite number, 0 or more"),
    "fraction": (lambda v: 0 <= v <= 1, "a finite number in [0, 1]"),
    "fraction_open": (lambda v: 0 <= v < 1, "a finite number in [0, 1)"),
    "seed": (lambda v: 0 <= v < 2 ** 32, "in [0, 2**32)"),
    "port": (lambda v: 1 <= v <= 65535, "a TCP port in [1, 65535]"),
}
RULES["finite"] = (lambda v: True, "a finite number")
# Flags every stage shares (base_parser).
COMMON_RULES = {"seed": "seed", "gpu": "index", "num_workers": "index", "batch_size": "count"}


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, rules: dict[str, str]) -> None:
    """One ``UserError`` line for the first numeric flag outside its range (``rules``: dest name ->
    a key of :data:`RULES`; the shared flags are added), a non-finite float, or an empty name in
    a list flag. Every int/float flag should have a rule (:func:`flags_without_rules`, which a
    test checks for every stage); one without is only required to be finite."""
    rules = {**COMMON_RULES, **rules}
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        flag = action.option_strings[0] if action.option_strings else action.dest
        if action.type in (int, float):
            if value is None:
                continue
            check, requirement = RULES[rules.get(action.dest, "finite")]
            for item in value if isinstance(value, list) else [value]:  # nargs="+": every value
                if not math.isfinite(item) or not check(item):
                    raise UserError(f"{flag} must be {requirement} (got {item})")
        elif isinstance(value, list) and action.type is None:
            if any(not isinstance(item, str) or not item.strip() for item in value):
                raise UserError(f"{flag} must be a list of non-empty names (got {value})")


def flags_without_rules(parser: argparse.ArgumentParser, rules: dict[str, str]) -> list[str]:
    """The int/float flags of ``parser`` that ``rules`` (plus the shared ones) leave unchecked."""
    rules = {**COMMON_RULES, **rules}
    return [action.option_strings[0] for action in parser._actions
            if action.type in (int, float) and action.dest not in rules]


def resolve_device(gpu: int | None) -> torch.device:
    """``--gpu N`` -> cuda:N; no flag -> cuda:0 if present; CPU when CUDA is absent."""
    if torch.cuda.is_available():
        index = 0 if gpu is None else gpu
        if index >= torch.cuda.device_count():
            raise UserError(f"--gpu {gpu}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    if gpu is not None:
        print(f"warning: --gpu {gpu} given but CUDA is not available; running on CPU")
    return torch.device("cpu")


def stage_dir(args: argparse.Namespace, stage: str) -> Path:
    """``<output_dir>/<dataname>/<stage>``: where a stage writes and the next one reads."""
    return Path(args.output_dir) / args.dataname / stage
