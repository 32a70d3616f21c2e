"""Stage 1's instruction-task ablation (``--tasks``) and zero-shot rows (``--eval_only --zero_shot``),
#27 items 3 and 4: the conversations a run trains on are the tasks asked for (categorical alone
needs no stage 0), recorded in ``vlm/meta.json`` and ``run.json`` and named in the report; a
zero-shot evaluation scores the base VLM without an adapter into its own folder, equal to scoring
the base directly, leaves ``vlm/`` untouched and becomes a row of ``python -m utils.report``."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import REPO

TOY_CONFIG = str(REPO / "configs" / "toy_vlm.yaml")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread


def stage1_argv(toy_root: Path, output_dir: Path, vlm: Path, *extra: str) -> list[str]:
    return ["--dataname", "toy", "--data_root", str(toy_root), "--output_dir", str(output_dir),
            "--vlm_model", str(vlm), "--num_workers", "0", *extra]


def write_annotations(toy_root: Path, output_dir: Path) -> Path:
    from bench.world import ToyRun, write_annotations as write

    return write(ToyRun(toy_root, output_dir, Path("unused")))


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: its content hash and modification time (ns)."""
    return {path.relative_to(folder).as_posix(): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


# ---------------------------------------------------------------- --tasks

def test_build_examples_keeps_only_the_tasks_asked_for(toy_root, tmp_path):
    from data.annotations import read_annotations
    from data.datasets import load_dataset
    from engine.vlm_train import build_examples, example_counts
    from utils.errors import UserError

    splits = load_dataset(toy_root, "toy", tmp_path)
    path = write_annotations(toy_root, tmp_path)
    annotations = read_annotations(path)
    n = len(splits.train)
    for tasks in (("observation", "reasoning", "categorical"), ("categorical",), ("reasoning",),
                  ("observation", "categorical")):
        examples = build_examples(annotations, splits, path, tasks=tasks)
        assert {example["task"] for example in examples} == set(tasks)
        counts = example_counts(examples, n)
        assert counts["conversations"] == {task: n if task in tasks else 0
                                           for task in ("observation", "reasoning", "categorical")}
        assert counts["with_text"] == (n if set(tasks) - {"categorical"} else 0)
    # The categorical conversation alone needs no annotation at all.
    examples = build_examples([], splits, None, tasks=("categorical",))
    assert len(examples) == n and {example["task"] for example in examples} == {"categorical"}
    # Text tasks without any text: nothing to train on, one line.
    with pytest.raises(UserError, match="nothing to train on"):
        build_examples([], splits, path, tasks=("observation", "reasoning"))


@pytest.fixture(scope="module")
def categorical_run(tmp_path_factory, toy_root, tiny_vlm_dir) -> tuple[Path, list[list[str]]]:
    """``--tasks categorical`` for one epoch with **no** stage-0 output; returns the output folder
    and the tasks of the Trainer's training examples, per Trainer built."""
    import train_vlm
    from engine.vlm_train import AnswerLogitsTrainer

    output_dir = tmp_path_factory.mktemp("tasks")
    seen = []
    real_train = AnswerLogitsTrainer.train

    def train(self, *args, **kwargs):
        seen.append([example["task"] for example in self.train_dataset])
        return real_train(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AnswerLogitsTrainer, "train", train)
        train_vlm.main(train_vlm.parse(stage1_argv(toy_root, output_dir, tiny_vlm_dir, "--config", TOY_CONFIG,
                                                   "--epochs", "1", "--tasks", "categorical")))
    return output_dir, seen


def test_tasks_categorical_trains_only_categorical_conversations_without_stage_0(categorical_run, toy_root):
    from data.datasets import load_dataset

    output_dir, seen = categorical_run
    assert not (output_dir / "toy" / "instructions").exists()  # stage 0 never ran
    n = len(load_dataset(toy_root, "toy", output_dir).train)
    assert seen == [["categorical"] * n]  # what the Trainer was given
    vlm = output_dir / "toy" / "vlm"
    meta = json.loads((vlm / "meta.json").read_text())
    run = json.loads((vlm / "run.json").read_text())
    assert meta["tasks"] == ["categorical"] and run["tasks"] == ["categorical"] and run["args"]["tasks"] == ["categorical"]
    conversations = {"observation": 0, "reasoning": 0, "categorical": n}
    assert meta["counts"]["conversations"] == conversations == run["counts"]["conversations"]
    assert meta["counts"]["with_text"] == 0
    assert (vlm / "eval_score" / "metrics.json").is_file()  # evaluated as every stage 1 is


def test_tasks_reach_the_trainer_and_the_default_is_all_three(toy_root, tiny_vlm_dir, tmp_path, monkeypatch):
    import train_vlm
    from engine.vlm_train import AnswerLogitsTrainer

    class Stop(BaseException):
        pass

    seen = []

    def train(self, *args, **kwargs):
        seen.append(sorted({example["task"] for example in self.train_dataset}))
        raise Stop

    monkeypatch.setattr(AnswerLogitsTrainer, "train", train)
    write_annotations(toy_root, tmp_path)
    for tasks in ((), ("observation", "categorical"), ("reasoning",)):
        with pytest.raises(Stop):
            train_vlm.main(train_vlm.parse(stage1_argv(toy_root, tmp_path, tiny_vlm_dir, "--config", TOY_CONFIG,
                                                       *(("--tasks", *tasks) if tasks else ()))))
    assert seen == [["categorical", "observation", "reasoning"], ["categorical", "observation"], ["reasoning"]]


@pytest.mark.parametrize("flags, config, expected", [
    (("--tasks", "bogus"), None, "--tasks bogus: not a task; choose from observation, reasoning, categorical"),
    (("--tasks", "categorical", "Reasoning"), None, "--tasks Reasoning: not a task"),
    ((), {"tasks": ["categorical", "summary"]}, "--tasks summary: not a task"),
    ((), {"tasks": []}, "--tasks: name at least one of"),
    (("--tasks", "categorical", "--annotations", "a.jsonl"), None, "--annotations: --tasks categorical reads no"),
    (("--zero_shot",), None, "--zero_shot evaluates the base VLM and trains nothing; add --eval_only"),
    (("--tasks", "observation"), None, "no instruction annotations; run `python generate_instructions.py"),
])
def test_bad_tasks_and_zero_shot_flags_are_one_line_and_write_nothing(flags, config, expected, toy_root,
                                                                      tiny_vlm_dir, tmp_path, capsys):
    import yaml

    import train_vlm
    from utils.errors import run_cli

    extra = list(flags)
    if config is not None:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        extra += ["--config", str(tmp_path / "c.yaml")]
    output_dir = tmp_path / "out"
    assert run_cli(train_vlm.main, stage1_argv(toy_root, output_dir, tiny_vlm_dir, *extra), parse=train_vlm.parse) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (output_dir / "toy" / "vlm" / "meta.json").exists()
    assert not (output_dir / "toy" / "vlm_zero_shot").exists()


def test_report_names_the_tasks_of_the_vlm_row(categorical_run, tmp_path):
    import shutil

    from utils.report import build_report
    from utils.runs import build_runs

    output_dir, _ = categorical_run
    # Before stage 3 the VLM row is stage 1's own evaluation (the same number stage 3 reports).
    stage1 = json.loads((output_dir / "toy" / "vlm" / "eval_score" / "metrics.json").read_text())
    row = next(line for line in build_report(output_dir).splitlines() if "| VLM (categorical only) |" in line)
    assert f"| {100 * stage1['accuracy']:.2f} |" in row
    base = tmp_path / "base"
    shutil.copytree(output_dir, tmp_path / "cat_only")
    (base / "toy" / "vlm").mkdir(parents=True)
    meta = json.loads((output_dir / "toy" / "vlm" / "meta.json").read_text())
    (base / "toy" / "vlm" / "meta.json").write_text(json.dumps({**meta, "tasks": None}))  # an older record
    metrics = {"vlm": {"accuracy": 0.5, "macro_f1": 0.4}, "head": {"accuracy": 0.75, "macro_f1": 0.7},
               "gates": {"concat_linear": {"accuracy": 0.875, "macro_f1": 0.8}}, "gate": "concat_linear",
               "test_predictions": {"labels": [0, 1], "vlm": [0, 0], "head": [0, 1], "gates": {"concat_linear": [0, 1]}}}
    for folder in (base, tmp_path / "cat_only"):
        (folder / "toy" / "gate").mkdir(parents=True, exist_ok=True)
        (folder / "toy" / "gate" / "metrics.json").write_text(json.dumps(metrics))
    rows = [line.split(" | ")[1] for line in build_report(tmp_path / "cat_only").splitlines() if line.startswith("| toy")]
    assert "VLM (categorical only)" in rows and "VLM" not in rows
    rows = [line.split(" | ")[1] for line in build_report(base).splitlines() if line.startswith("| toy")]
    assert "VLM" in rows and not any(row.startswith("VLM (") for row in rows)
    text = build_runs([f"base={base}", f"cat_only={tmp_path / 'cat_only'}"])
    assert f"`cat_only` = `{tmp_path / 'cat_only'}` (VLM tuned on categorical only)" in text
    assert f"`base` = `{base}`," in text  # all three tasks: no note


# ---------------------------------------------------------------- --zero_shot

def test_zero_shot_scores_the_base_without_adapter_into_its_own_folder(categorical_run, toy_root, tiny_vlm_dir,
                                                                      monkeypatch):
    import torch

    import train_vlm
    from data.datasets import load_dataset
    from engine.vlm_answers import predict_samples
    from models.vlm import load_processor, load_vlm
    from utils.report import build_report, zero_shot_results

    output_dir, _ = categorical_run
    tuned = output_dir / "toy" / "vlm"
    before = snapshot(tuned)
    loaded = []
    real_load = train_vlm.load_vlm

    def spy(*args, **kwargs):
        model = real_load(*args, **kwargs)
        loaded.append((kwargs.get("adapter"), model))
        return model

    monkeypatch.setattr(train_vlm, "load_vlm", spy)
    train_vlm.main(train_vlm.parse(stage1_argv(toy_root, output_dir, tiny_vlm_dir, "--eval_only", "--zero_shot")))
    monkeypatch.undo()

    assert len(loaded) == 1 and loaded[0][0] is None and not hasattr(loaded[0][1], "peft_config")  # no adapter
    assert snapshot(tuned) == before  # the tuned VLM's folder: not a byte, not a time stamp changed
    folder = output_dir / "toy" / "vlm_zero_shot" / tiny_vlm_dir.name
    for name in ("eval_score/metrics.json", "eval_score/predictions.jsonl", "eval_score/confusion_matrix.png",
                 "run.json", "meta.json"):
        assert (folder / name).is_file(), name
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["stage"] == "vlm_zero_shot" and meta["zero_shot"] is True and meta["base_model"] == str(tiny_vlm_dir)
    metrics = json.loads((folder / "eval_score" / "metrics.json").read_text())
    assert metrics["zero_shot"] is True and metrics["base_model"] == str(tiny_vlm_dir) and metrics["mode"] == "score"

    # The same numbers as scoring the base model directly with the class scorer.
    splits = load_dataset(toy_root, "toy", output_dir)
    model = load_vlm(str(tiny_vlm_dir), "cpu", dtype=torch.float32)
    direct = predict_samples(model, load_processor(str(tiny_vlm_dir)), splits.data_root, splits.test,
                             splits.class_names, "score", 8, 8, pre_resize=1024)
    rows = [json.loads(line) for line in (folder / "eval_score" / "predictions.jsonl").read_text().splitlines()]
    assert [row["pred"] for row in rows] == [splits.class_names[int(p)] for p in direct.pred]
    assert torch.allclose(torch.tensor([row["probs"] for row in rows]), direct.probs.float(), atol=1e-5)
    accuracy = float((direct.pred == torch.tensor([s.label for s in splits.test])).float().mean())
    assert metrics["accuracy"] == pytest.approx(accuracy)
    tuned_metrics = json.loads((tuned / "eval_score" / "metrics.json").read_text())
    assert [json.loads(line)["probs"] for line in (tuned / "eval_score" / "predictions.jsonl").read_text().splitlines()] \
        != [row["probs"] for row in rows]  # the tuned VLM answers otherwise: the adapter was really left out
    assert "zero_shot" not in tuned_metrics

    # A row of the report, found by zero_shot_results.
    results = zero_shot_results(output_dir, "toy")
    assert [(r.name, r.base_model, r.mode) for r in results] == [(tiny_vlm_dir.name, str(tiny_vlm_dir), "score")]
    report = build_report(output_dir)
    row = next(line for line in report.splitlines() if f"zero-shot {tiny_vlm_dir.name} (score)" in line)
    assert f"| {100 * metrics['accuracy']:.2f} |" in row


def test_zero_shot_on_another_family_and_refuses_another_base_of_the_same_name(toy_root, tmp_path, capsys):
    import train_vlm
    from models.tiny import build_tiny_vlm
    from utils.errors import run_cli
    from utils.report import zero_shot_results

    vlm = build_tiny_vlm(tmp_path / "a" / "tiny-llava", arch="llava_onevision", seed=0)
    train_vlm.main(train_vlm.parse(stage1_argv(toy_root, tmp_path / "out", vlm, "--eval_only", "--zero_shot",
                                               "--eval_mode", "generate", "--max_new_tokens", "8")))
    metrics = json.loads((tmp_path / "out" / "toy" / "vlm_zero_shot" / "tiny-llava" / "eval_generate" /
                          "metrics.json").read_text())
    assert metrics["zero_shot"] and metrics["mode"] == "generate" and metrics["parser"] == "lenient"
    assert [r.mode for r in zero_shot_results(tmp_path / "out", "toy")] == ["generate"]
    assert not (tmp_path / "out" / "toy" / "vlm").exists()

    other = build_tiny_vlm(tmp_path / "b" / "tiny-llava", arch="qwen2_vl", seed=0)  # same folder name
    capsys.readouterr()
    assert run_cli(train_vlm.main, stage1_argv(toy_root, tmp_path / "out", other, "--eval_only", "--zero_shot"),
                   parse=train_vlm.parse) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds the zero-shot evaluation of" in err[0], err


def test_preflight_counts_the_tasks_stage_1_will_train(toy_root, tiny_vlm_dir, tmp_path):
    import train_vlm
    from data.datasets import load_dataset
    from engine.preflight import training_conversations

    splits = load_dataset(toy_root, "toy", tmp_path)
    for tasks, expected in ((("categorical",), ["categorical"] * 2),
                            ((), ["observation", "reasoning", "categorical"] * 2)):
        args = train_vlm.parse(stage1_argv(toy_root, tmp_path, tiny_vlm_dir, *(("--tasks", *tasks) if tasks else ())))
        assert [task for _, _, task in training_conversations(splits, args, 2)] == expected
