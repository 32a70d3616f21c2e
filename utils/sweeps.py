"""Sweeps of the distillation head: one kept run per setting, named after the setting.

Stage 2 trains one head per (depth, alpha, seed) on the same cached features and keeps each in
``<output_dir>/<dataname>/distill/runs/depth=D,alpha=A,seed=S/`` (head.pt, metrics.json, curves,
log.txt, run.json, meta.json). With several teachers (``--teacher_model A B C``) the first is the
stage's own (``teacher/``, the run names above); each further one trains into
``teachers/<name>/``, its teacher logits are cached in ``distill/cache/teacher=<name>/`` and its heads
are the runs ``teacher=<name>,depth=D,alpha=A,seed=S``. The top-level ``distill/`` holds a copy of
the *default* head, the one stage 3, the demo and the predictor use without being told otherwise.
Stage 3 writes each gate seed to ``gate/runs/<head run>/seed=S/`` and, for the default head, the
first seed also to ``gate/`` as before.
"""
from __future__ import annotations

import itertools
from pathlib import Path

from utils.errors import UserError
from utils.records import DistillRecord

RUNS = "runs"
TEACHERS = "teachers"  # <output_dir>/<dataname>/teachers/<name>/: the further teachers of --teacher_model
# The paper's best head (depth 1, alpha 0.5): the default head of a sweep that includes it.
PAPER_SETTING = {"depth": 1, "alpha": 0.5}
SETTING_KEYS = ("teacher", "depth", "alpha", "seed")


def as_list(value) -> list:
    """A multi-valued flag's values, duplicates dropped, order kept (a config may give one value)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return list(dict.fromkeys(values))


def run_name(depth: int, alpha: float, seed: int, teacher: str | None = None) -> str:
    """``depth=D,alpha=A,seed=S``; a head of a further teacher ``teacher=<name>,depth=D,...``."""
    return ("" if teacher is None else f"teacher={teacher},") + f"depth={depth},alpha={alpha:g},seed={seed}"


def teacher_folder(dataset_dir: str | Path, teacher: str | None) -> Path:
    """Where a teacher lives: ``<dataset_dir>/teacher`` for the stage's own (``teacher`` None),
    ``<dataset_dir>/teachers/<teacher>`` for a further one of ``--teacher_model``."""
    return Path(dataset_dir) / ("teacher" if teacher is None else f"{TEACHERS}/{teacher}")


def teacher_cache(cache_dir: str | Path, teacher: str | None) -> Path:
    """Where stage 2 caches a teacher's logits: ``distill/cache`` for the stage's own teacher,
    ``distill/cache/teacher=<name>`` for a further one (stage 3 reads them there)."""
    return Path(cache_dir) if teacher is None else Path(cache_dir) / f"teacher={teacher}"


def settings(depths, alphas, seeds) -> list[dict]:
    """Every (depth, alpha, seed) of the sweep, seeds innermost."""
    return [{"depth": d, "alpha": a, "seed": s} for d, a, s in itertools.product(depths, alphas, seeds)]


def default_setting(depths, alphas, seeds) -> dict | None:
    """The head to publish as the top-level default: the paper's setting with the first seed when
    the sweep includes it, the only setting of a single run (today's ``--depth 3`` keeps making
    depth 3 the default), and None for a sweep without the paper's setting (the current default
    is left as it is)."""
    if PAPER_SETTING["depth"] in depths and PAPER_SETTING["alpha"] in alphas:
        return {**PAPER_SETTING, "seed": seeds[0]}
    if len(depths) == 1 and len(alphas) == 1:
        return {"depth": depths[0], "alpha": alphas[0], "seed": seeds[0]}
    return None


def list_runs(distill_dir: str | Path) -> dict[str, DistillRecord]:
    """``{run name: record}`` of the finished head runs in ``distill_dir/runs`` (meta.json present)."""
    distill_dir = Path(distill_dir)
    runs = {}
    for meta_path in sorted((distill_dir / RUNS).glob("*/meta.json")):
        if meta_path.parent.name.startswith("."):  # a run's staging folder (utils.outputs)
            continue
        runs[meta_path.parent.name] = DistillRecord.load(meta_path.parent, distill_dir.parent.name)
    return runs


def setting_of(record: DistillRecord) -> dict:
    """A head run's ``{"teacher", "depth", "alpha", "seed"}`` (None where its meta.json does not
    say; ``teacher`` None: the stage's own teacher)."""
    return {"teacher": record.teacher, "depth": record.depth, "alpha": record.alpha, "seed": record.seed}


def parse_head_spec(spec: str) -> dict:
    """``"[teacher=vgg16,]depth=2,alpha=0.5[,seed=0]"`` -> ``{"depth": 2, "alpha": 0.5, ...}``."""
    values = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, text = part.partition("=")
        if not sep or key not in SETTING_KEYS:
            raise UserError(f"--head {spec}: expected key=value pairs of {', '.join(SETTING_KEYS)}, "
                            "e.g. --head depth=2,alpha=0.5")
        try:
            values[key] = text if key == "teacher" else float(text) if key == "alpha" else int(text)
        except ValueError:
            raise UserError(f"--head {spec}: {key}={text!r} is not a number") from None
    if not values:
        raise UserError(f"--head {spec}: empty; e.g. --head depth=2,alpha=0.5")
    return values


def resolve_head(distill_dir: str | Path, spec: str | None) -> Path:
    """The head folder: the top-level default head for no ``spec``; else the run matching it (the
    lowest seed when the seed is not given; the stage's own teacher's runs when no ``teacher=`` is
    given), refusing a missing one and naming those that exist. Its meta.json names the run (``run``)."""
    distill_dir = Path(distill_dir)
    if spec is None:
        return distill_dir
    wanted = {"teacher": None, **parse_head_spec(spec)}
    runs = list_runs(distill_dir)
    matches = [(record.seed or 0, name) for name, record in runs.items()
               if all(setting_of(record)[key] == value for key, value in wanted.items())]
    if not matches:
        have = "; ".join(runs) if runs else "none (train some with python train_distillation.py --depth ...)"
        raise UserError(f"--head {spec}: no such head run in {distill_dir / RUNS}; runs there: {have}")
    return distill_dir / RUNS / min(matches)[1]
