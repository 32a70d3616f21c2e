"""The paper's ablation tables (head depth, distillation weight alpha, gate type) and the teacher
ablation (conventional baselines and the heads distilled from them) from kept runs.

    python -m utils.report --datasets FI --ablation depth      # also: alpha, gate, teacher, all

Numbers come from stage 2's ``distill/runs/<setting>/metrics.json`` (the head's test accuracy)
and stage 3's ``gate/runs/<head run>/seed=<s>/metrics.json`` (EmoVLM-KD's). Every table compares
one gate type across its rows: the depth and alpha tables' EmoVLM-KD column is the paper's gate
(``concat_linear``) on every row, whichever gate a run selected (a ``--gate all`` run on the
default head selects the variant best on validation; a run without a ``concat_linear`` gate
counts as not run); the gate table is where the gates differ. One row per setting, mean ± standard
deviation over the seeds found, the paper's best setting marked; a PNG per swept parameter (error
bars over seeds) is written beside the dataset's outputs. The depth and alpha tables hold the heads
of the stage's own teacher (``teacher/``); the teacher table has a row per teacher of
``train_distillation.py --teacher_model A B C``: its test accuracy (the conventional baseline,
:func:`teacher_baselines`), the head distilled from it at the paper's setting and EmoVLM-KD with the
paper's gate on that head.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from utils.errors import UserError
from utils.io import atomic_write, read_json
from utils.records import DistillRecord
from utils.stats import mean_std
from utils.records import TeacherRecord
from utils.sweeps import PAPER_SETTING, RUNS, TEACHERS, list_runs, setting_of, teacher_folder

ABLATIONS = ("depth", "alpha", "gate", "teacher")
PAPER_GATE = "concat_linear"
# Stage 2 and 3 commands that produce each ablation's runs (quoted when a table has no data).
COMMANDS = {
    "depth": "python train_distillation.py --dataname {d} --depth 1 2 3 4 5",
    "alpha": "python train_distillation.py --dataname {d} --alpha 0 0.25 0.5 0.75 1",
    "gate": "python train_gate.py --dataname {d} --gate all",
    "teacher": "python train_distillation.py --dataname {d} --teacher_model vit_base_patch16_384.orig_in21k_ft_in1k "
               "vgg16 resnet50",
}


def _cell(values: list[float]) -> str:
    """``mean ± std (n=k)`` in percent; a single run shows its value alone."""
    if not values:
        return "not run"
    mean, std = mean_std(values)
    return f"{100 * mean:.2f}" if len(values) == 1 else f"{100 * mean:.2f} ± {100 * std:.2f} (n={len(values)})"


def gate_runs(root: Path, head_run: str, head_id: str | None) -> list[dict]:
    """The metrics.json of every gate seed trained on head run ``head_run`` as it is now (gates
    fused with an earlier head of the same name, since retrained, are left out)."""
    runs = [read_json(path) for path in sorted((root / "gate" / RUNS / head_run).glob("seed=*/metrics.json"))]
    return [metrics for metrics in runs if metrics.get("head_id") == head_id]


def paper_gate_accuracies(runs: list[dict]) -> list[float]:
    """The test accuracy of the paper's gate (``concat_linear``) in each gate run that trained it,
    whichever gate the run selected: the rows of a depth or alpha table compare one gate type."""
    return [metrics["gates"][PAPER_GATE]["accuracy"] for metrics in runs if PAPER_GATE in metrics.get("gates", {})]


def head_rows(root: Path, parameter: str) -> list[dict]:
    """Per value of ``parameter`` (depth or alpha, the other held at the paper's value): the head's
    test accuracies over seeds and EmoVLM-KD's, the paper's gate in every gate run on those heads."""
    held = "alpha" if parameter == "depth" else "depth"
    groups: dict = {}
    for name, record in list_runs(root / "distill").items():
        setting = setting_of(record)
        if setting[held] != PAPER_SETTING[held] or setting[parameter] is None or setting["teacher"] is not None:
            continue  # the stage's own teacher's heads only (a further teacher's are the teacher table's)
        group = groups.setdefault(setting[parameter], {"head": [], "fused": []})
        group["head"].append(read_json(root / "distill" / RUNS / name / "metrics.json")["accuracy"])
        group["fused"] += paper_gate_accuracies(gate_runs(root, name, record.head_id))
    return [{"value": value, **groups[value], "paper": value == PAPER_SETTING[parameter]} for value in sorted(groups)]


def teacher_baselines(output_dir: str | Path, dataname: str) -> list[dict]:
    """The conventional baselines of one dataset: every finished teacher of stage 2 (the stage's
    own in ``teacher/`` first, then each further one of ``--teacher_model A B C`` in
    ``teachers/<name>/``, by name) with a test ``metrics.json``. Each row: ``model`` (the timm
    name), ``teacher`` (None for the stage's own, else the name its heads' runs carry),
    ``preprocessing`` (``reference``/``timm``; None in an older record), ``teacher_id``,
    ``accuracy``, ``macro_f1``, ``n`` (test images), ``ci95`` (the 95% bootstrap interval of the
    accuracy, None where stage 2 did not record one) and ``metrics`` (the metrics.json path)."""
    root = Path(output_dir) / dataname
    names = [None] + sorted(path.name for path in (root / TEACHERS).glob("*") if not path.name.startswith("."))
    rows = []
    for name in names:
        folder = teacher_folder(root, name)
        if not (folder / "meta.json").is_file() or not (folder / "metrics.json").is_file():
            continue  # not finished, or never tested (a folder is trusted once its meta.json is written)
        record = TeacherRecord.load(folder, dataname)
        metrics = read_json(folder / "metrics.json")
        rows.append({"model": record.model, "teacher": name, "preprocessing": record.preprocessing,
                     "teacher_id": record.teacher_id, "accuracy": metrics["accuracy"],
                     "macro_f1": metrics.get("macro_f1"), "n": metrics.get("n"), "ci95": metrics.get("ci95"),
                     "metrics": folder / "metrics.json"})
    return rows


def teacher_rows(root: Path) -> list[dict]:
    """Per teacher (:func:`teacher_baselines`): its test accuracy, the test accuracies over seeds of
    the heads distilled from it as it is now (its ``teacher_id``) at the paper's setting, and
    EmoVLM-KD's with the paper's gate in every gate run on those heads; each with its interval."""
    heads = list_runs(root / "distill") if (root / "distill").is_dir() else {}
    rows = []
    for baseline in teacher_baselines(root.parent, root.name):
        row = {"value": baseline["model"], "teacher": [baseline["accuracy"]], "teacher_ci": [baseline["ci95"]],
               "head": [], "head_ci": [], "fused": [], "fused_ci": [], "paper": baseline["teacher"] is None,
               "preprocessing": baseline["preprocessing"]}
        for name, record in heads.items():
            setting = setting_of(record)
            if (setting["teacher"] != baseline["teacher"] or record.teacher_id != baseline["teacher_id"]
                    or any(setting[key] != value for key, value in PAPER_SETTING.items())):
                continue
            metrics = read_json(root / "distill" / RUNS / name / "metrics.json")
            row["head"].append(metrics["accuracy"])
            row["head_ci"].append(metrics.get("ci95"))
            for fused in gate_runs(root, name, record.head_id):
                if PAPER_GATE in fused.get("gates", {}):
                    row["fused"].append(fused["gates"][PAPER_GATE]["accuracy"])
                    row["fused_ci"].append(fused["gates"][PAPER_GATE].get("ci95"))
        rows.append(row)
    return rows


def _cell_interval(values: list[float], intervals: list) -> str:
    """:func:`_cell`, with the 95% interval where there is one run and it recorded one."""
    text = _cell(values)
    if len(values) == 1 and intervals and intervals[0]:
        text += f" [{100 * intervals[0][0]:.2f}, {100 * intervals[0][1]:.2f}]"
    return text


def gate_rows(root: Path) -> list[dict]:
    """Per gate variant: test accuracies over the seeds of the default head's gate runs (the
    top-level gate/metrics.json when no runs are kept), with the largest McNemar p over seeds."""
    runs = []
    if (root / "distill" / "meta.json").is_file():
        default_head = DistillRecord.load(root / "distill", root.name)
        runs = gate_runs(root, default_head.run, default_head.head_id)
    if not runs and (root / "gate" / "metrics.json").is_file():
        runs = [read_json(root / "gate" / "metrics.json")]
    rows: dict = {}
    for metrics in runs:
        for name, result in metrics.get("gates", {}).items():
            row = rows.setdefault(name, {"value": name, "fused": [], "p_vlm": [], "p_head": [],
                                         "paper": name == PAPER_GATE})
            row["fused"].append(result["accuracy"])
            for key, test in (("p_vlm", "mcnemar_vs_vlm"), ("p_head", "mcnemar_vs_head")):
                if result.get(test):
                    row[key].append(result[test]["p_value"])
    return list(rows.values())


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def ablation_table(dataset: str, parameter: str, rows: list[dict]) -> str:
    """One markdown table shaped like the paper's ablation of ``parameter``; ``*`` marks its best."""
    mark = lambda row: f"{row['value']:g} *" if row["paper"] else f"{row['value']:g}"  # noqa: E731
    if parameter == "teacher":
        header = ["teacher", "preprocessing", "teacher accuracy % (baseline)", "distilled head accuracy %",
                  f"EmoVLM-KD ({PAPER_GATE}) accuracy %"]
        body = [[f"{row['value']} *" if row["paper"] else row["value"], row["preprocessing"] or "",
                 _cell_interval(row["teacher"], row["teacher_ci"]), _cell_interval(row["head"], row["head_ci"]),
                 _cell_interval(row["fused"], row["fused_ci"])] for row in rows]
        note = (f"`*` the stage's own teacher (`teacher/`, whose heads are the default's and the depth and alpha "
                f"tables'). Heads at the paper's setting (depth {PAPER_SETTING['depth']}, alpha "
                f"{PAPER_SETTING['alpha']:g}) distilled from each teacher; EmoVLM-KD: the paper's gate "
                f"({PAPER_GATE}) on that head (`not run`: none fused it, `python train_gate.py --dataname "
                f"{dataset} --head teacher=<name>,depth=1,alpha=0.5`). 95% percentile bootstrap intervals over the "
                "test images where there is one run.")
    elif parameter == "gate":
        header = ["gate", "EmoVLM-KD accuracy %", "McNemar p vs VLM (max over seeds)", "p vs head (max)"]
        body = [[f"{row['value']} *" if row["paper"] else row["value"], _cell(row["fused"]),
                 f"{max(row['p_vlm']):.3g}" if row["p_vlm"] else "", f"{max(row['p_head']):.3g}" if row["p_head"] else ""]
                for row in rows]
        note = f"`*` the paper's gate ({PAPER_GATE}); gates fused with the default head."
    else:
        header = [parameter, "distilled head accuracy %", "EmoVLM-KD accuracy %"]
        body = [[mark(row), _cell(row["head"]), _cell(row["fused"])] for row in rows]
        held = "alpha" if parameter == "depth" else "depth"
        note = (f"`*` the paper's best {parameter} ({PAPER_SETTING[parameter]:g}); {held} held at "
                f"{PAPER_SETTING[held]:g}. EmoVLM-KD: the paper's gate ({PAPER_GATE}) on every row, "
                f"whichever gate a stage-3 run selected; `not run`: no {PAPER_GATE} gate fused that head "
                f"(`python train_gate.py --dataname {dataset} --head "
                f"{parameter}=<value>,{held}={PAPER_SETTING[held]:g}`).")
    return (f"### {dataset}: ablation of {parameter}\n\n" + _markdown(header, body)
            + f"\n\nTest accuracy, mean ± std over seeds. {note}")


def save_ablation_png(dataset: str, parameter: str, rows: list[dict], path: Path) -> Path:
    """Accuracy against the swept value, error bars = std over seeds (bars for the gate types)."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    categorical = parameter in ("gate", "teacher")  # bars per gate or teacher, not a line over values
    series = ([("EmoVLM-KD", "fused")] if parameter == "gate"
              else [("teacher", "teacher")] * (parameter == "teacher")
              + [("distilled head", "head"), (f"EmoVLM-KD ({PAPER_GATE})", "fused")])
    width = 0.8 / len(series)
    for offset, (label, key) in enumerate(series):
        points = [(i, row) for i, row in enumerate(rows) if row[key]]
        if not points:
            continue
        x = [i + (offset - (len(series) - 1) / 2) * width if categorical else row["value"] for i, row in points]
        stats = [mean_std(row[key]) for _, row in points]
        means, stds = [100 * m for m, _ in stats], [100 * s for _, s in stats]
        if categorical:
            ax.bar(x, means, yerr=stds, capsize=4, label=label, **({"width": width} if len(series) > 1 else {}))
        else:
            ax.errorbar(x, means, yerr=stds, marker="o", capsize=4, label=label)
    if categorical:
        ax.set_xticks(range(len(rows)), [row["value"] for row in rows], rotation=30, ha="right")
    ax.set_xlabel(parameter)
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"{dataset}: ablation of {parameter}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path


def build_ablation(output_dir: str | Path, datasets: list[str], which: str) -> str:
    """The markdown tables of ``which`` (one of ABLATIONS or ``all``) for every dataset, writing
    ``<output_dir>/<dataset>/ablation_<parameter>.png`` for each table."""
    output_dir = Path(output_dir)
    parameters = ABLATIONS if which == "all" else (which,)
    parts = []
    for dataset in datasets:
        root = output_dir / dataset
        for parameter in parameters:
            rows = (gate_rows(root) if parameter == "gate" else teacher_rows(root) if parameter == "teacher"
                    else head_rows(root, parameter))
            if not rows:
                if which == "all":
                    continue
                raise UserError(f"{root}: no runs for the {parameter} ablation; run "
                                f"`{COMMANDS[parameter].format(d=dataset)}` first")
            png = save_ablation_png(dataset, parameter, rows, root / f"ablation_{parameter}.png")
            parts.append(ablation_table(dataset, parameter, rows) + f" Plot: [{png.name}]({dataset}/{png.name}).")
    if not parts:
        raise UserError(f"{output_dir}: no ablation runs for {', '.join(datasets)}; run e.g. "
                        f"`{COMMANDS['depth'].format(d=datasets[0])}` first")
    return "\n\n".join(parts) + "\n"
