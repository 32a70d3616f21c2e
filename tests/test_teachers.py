"""The teacher ablation: ``train_distillation.py --teacher_model A B`` trains a teacher per model side
by side and distils a head from each; stage 3 fuses a further teacher's head; ``python -m
utils.report --ablation teacher`` tables the teachers (the conventional baselines) and their heads.
On the toy pipeline with two tiny timm teachers: the stage's own tiny ViT and timm's ``test_resnet``."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import pytest
import torch

from tests.pipeline import CONFIGS, PIPELINE_HEAD_EPOCHS, ToyRun, trained_pipeline  # noqa: F401

OWN, OTHER = "vit_tiny_patch16_224", "test_resnet"
PAPER_RUN = "depth=1,alpha=0.5,seed=42"
OTHER_RUN = f"teacher={OTHER},{PAPER_RUN}"


@dataclass(frozen=True)
class TwoTeachers(ToyRun):
    own_teacher_bytes: bytes = b""  # teacher/teacher.pt before the two-teacher run


def stage2_argv(run: ToyRun, *extra: str) -> list[str]:
    return run.argv("--config", str(CONFIGS / "toy_distill.yaml"), "--teacher_epochs", "2",
                    "--epochs", str(PIPELINE_HEAD_EPOCHS), *extra)


@pytest.fixture(scope="module")
def two_teachers(trained_pipeline, tmp_path_factory) -> TwoTeachers:  # noqa: F811
    """A copy of the trained toy pipeline, then stage 2 with two teachers (the pipeline's own,
    reused, and test_resnet, trained) and stage 3 with the paper's gate on test_resnet's head."""
    import train_distillation
    import train_gate

    root = tmp_path_factory.mktemp("two_teachers")
    shutil.copytree(trained_pipeline.output_dir, root, dirs_exist_ok=True)
    run = ToyRun(trained_pipeline.data_root, root, trained_pipeline.vlm_model)
    before = (run.stage("teacher") / "teacher.pt").read_bytes()
    train_distillation.main(train_distillation.parse(stage2_argv(run, "--teacher_model", OWN, OTHER)))
    train_gate.main(train_gate.parse(run.argv("--config", str(CONFIGS / "toy_gate.yaml"), "--head",
                                              f"teacher={OTHER},depth=1,alpha=0.5")))
    return TwoTeachers(run.data_root, root, run.vlm_model, own_teacher_bytes=before)


def read(path) -> dict:
    return json.loads(path.read_text())


def test_the_plain_command_keeps_one_teacher_folder_and_its_run_names(trained_pipeline):  # noqa: F811
    toy = trained_pipeline.output_dir / "toy"
    assert not (toy / "teachers").exists()
    assert [path.name for path in (toy / "distill" / "runs").iterdir()] == [PAPER_RUN]
    assert not any(path.is_dir() for path in (toy / "distill" / "cache").iterdir())  # no per-teacher cache
    assert read(toy / "distill" / "meta.json")["teacher"] is None
    teacher = read(toy / "teacher" / "meta.json")
    assert teacher["model"] == OWN and teacher["preprocessing"] == "timm"  # configs/toy_distill.yaml's
    checkpoint = torch.load(toy / "teacher" / "teacher.pt", weights_only=True)
    assert teacher["data_config"] == json.loads(json.dumps(checkpoint["data_config"]))


def test_two_teachers_train_side_by_side_each_with_its_heads(two_teachers):
    toy = two_teachers.output_dir / "toy"
    # The stage's own teacher is reused, not replaced; the other one has its own folder.
    assert (toy / "teacher" / "teacher.pt").read_bytes() == two_teachers.own_teacher_bytes
    other = toy / "teachers" / OTHER
    for name in ("teacher.pt", "meta.json", "metrics.json", "run.json", "log.txt"):
        assert (other / name).is_file(), name
    other_record = read(other / "meta.json")
    assert other_record["model"] == OTHER and other_record["preprocessing"] == "timm"
    assert read(other / "run.json")["args"]["teacher_model"] == OTHER
    # One head per teacher, named after it; the default head is still the own teacher's.
    runs = toy / "distill" / "runs"
    assert sorted(path.name for path in runs.iterdir()) == [PAPER_RUN, OTHER_RUN]
    own_head, other_head = read(runs / PAPER_RUN / "meta.json"), read(runs / OTHER_RUN / "meta.json")
    assert own_head["teacher"] is None and own_head["teacher_id"] == read(toy / "teacher" / "meta.json")["teacher_id"]
    assert other_head["teacher"] == OTHER and other_head["teacher_id"] == other_record["teacher_id"]
    assert other_head["run"] == OTHER_RUN and read(toy / "distill" / "meta.json")["run"] == PAPER_RUN
    other_metrics = read(runs / OTHER_RUN / "metrics.json")
    assert other_metrics["teacher_model"] == OTHER
    assert other_metrics["teacher"]["accuracy"] == read(other / "metrics.json")["accuracy"]
    assert (toy / "distill" / "cache" / f"teacher={OTHER}" / "teacher_logits_test.pt").is_file()


def test_a_further_teachers_head_is_distilled_from_its_own_logits(two_teachers):
    """test_resnet's cached logits are a direct pass of its teacher.pt, and its head equals the
    head trained alone on those logits (not on the first teacher's)."""
    from data.datasets import load_dataset, open_image
    from engine.distill import train_head
    from models.teacher import load_teacher, teacher_transforms

    toy = two_teachers.output_dir / "toy"
    splits = load_dataset(two_teachers.data_root, "toy", two_teachers.output_dir)
    teacher, checkpoint = load_teacher(toy / "teachers" / OTHER / "teacher.pt", splits.class_names)
    _, eval_transform = teacher_transforms(checkpoint["data_config"])
    logits = {}
    with torch.no_grad():
        for split in ("train", "val"):
            logits[split] = torch.cat([teacher(eval_transform(open_image(splits.absolute(sample)))[None])
                                       for sample in splits.split(split)])
            cached = torch.load(toy / "distill" / "cache" / f"teacher={OTHER}" / f"teacher_logits_{split}.pt",
                                weights_only=True)["values"]
            assert torch.allclose(cached, logits[split], atol=1e-4), split
    cache = toy / "distill" / "cache"
    features = {s: torch.load(cache / f"vlm_features_{s}.pt", weights_only=True)["values"] for s in logits}
    labels = {s: torch.tensor([sample.label for sample in splits.split(s)]) for s in logits}
    alone = train_head(features, logits, labels, features["train"].shape[1], len(splits.class_names), depth=1,
                       alpha=0.5, seed=42, epochs=PIPELINE_HEAD_EPOCHS, lr=1e-3, batch_size=16, standardize=True)
    saved = torch.load(toy / "distill" / "runs" / OTHER_RUN / "head.pt", weights_only=True)["state_dict"]
    for key, value in alone.best_state.items():
        assert torch.allclose(saved[key], value, rtol=1e-4, atol=1e-6), key


def test_stage3_fuses_a_further_teachers_head(two_teachers, trained_pipeline):  # noqa: F811
    toy = two_teachers.output_dir / "toy"
    fused = read(toy / "gate" / "runs" / OTHER_RUN / "seed=42" / "metrics.json")
    head = read(toy / "distill" / "runs" / OTHER_RUN / "meta.json")
    assert fused["head_run"] == OTHER_RUN and fused["head_id"] == head["head_id"]
    # The teacher row and the complementarity are test_resnet's (its cached logits were found).
    assert fused["teacher"]["accuracy"] == read(toy / "teachers" / OTHER / "metrics.json")["accuracy"]
    assert "vlm_vs_teacher" in fused["complementarity"]
    assert (toy / "gate" / "metrics.json").read_bytes() == \
        (trained_pipeline.output_dir / "toy" / "gate" / "metrics.json").read_bytes()  # the demo's gate untouched


def test_report_tables_each_teacher_as_a_baseline_with_its_head(two_teachers, capsys):
    from utils.ablation import teacher_baselines
    from utils.report import main

    out, toy = two_teachers.output_dir, two_teachers.output_dir / "toy"
    baselines = teacher_baselines(out, "toy")
    assert [(row["model"], row["teacher"], row["metrics"]) for row in baselines] == [
        (OWN, None, toy / "teacher" / "metrics.json"), (OTHER, OTHER, toy / "teachers" / OTHER / "metrics.json")]
    for row in baselines:
        metrics = read(row["metrics"])
        assert (row["accuracy"], row["macro_f1"], row["n"], row["ci95"]) == (
            metrics["accuracy"], metrics["macro_f1"], metrics["n"], metrics["ci95"])

    main(["--output_dir", str(out), "--datasets", "toy", "--ablation", "teacher"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]

    def cell(metrics: dict) -> str:
        low, high = metrics["ci95"]
        return f"{100 * metrics['accuracy']:.2f} [{100 * low:.2f}, {100 * high:.2f}]"

    own_head, other_head = (read(toy / "distill" / "runs" / name / "metrics.json") for name in (PAPER_RUN, OTHER_RUN))
    gate = read(toy / "gate" / "runs" / OTHER_RUN / "seed=42" / "metrics.json")["gates"]["concat_linear"]
    assert rows[0].startswith(f"| {OWN} * | timm | {cell(read(toy / 'teacher' / 'metrics.json'))} | {cell(own_head)} |")
    assert rows[1] == (f"| {OTHER} | timm | {cell(read(toy / 'teachers' / OTHER / 'metrics.json'))} | "
                       f"{cell(other_head)} | {cell(gate)} |")
    assert len(rows) == 2 and (toy / "ablation_teacher.png").stat().st_size > 1000

    # The depth table holds the stage's own teacher's heads only.
    main(["--output_dir", str(out), "--datasets", "toy", "--ablation", "depth"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[:2] for row in rows] == [["| 1 *", f"{100 * own_head['accuracy']:.2f}"]]


def test_head_spec_names_a_teacher():
    from utils.sweeps import parse_head_spec, run_name

    assert parse_head_spec(f"teacher={OTHER},depth=1,alpha=0.5") == {"teacher": OTHER, "depth": 1, "alpha": 0.5}
    assert run_name(1, 0.5, 42, OTHER) == OTHER_RUN and run_name(1, 0.5, 42) == PAPER_RUN


@pytest.mark.parametrize("extra, message", [
    (("--teacher_model", OWN, "no_such_net"), "error: --teacher_model no_such_net: unknown timm model"),
    (("--teacher_model", OWN, OTHER, "--teacher_checkpoint", "t.pt"),
     "error: --teacher_checkpoint distils one teacher, but --teacher_model names 2; drop one of them"),
])
def test_bad_teacher_flags_are_one_line_errors_that_write_nothing(extra, message, toy_root, tmp_path, capsys):
    import train_distillation
    from utils.errors import run_cli

    run = ToyRun(toy_root, tmp_path / "out", tmp_path / "vlm")
    assert run_cli(train_distillation.main, stage2_argv(run, *extra), parse=train_distillation.parse) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)
    assert not (tmp_path / "out").exists()
